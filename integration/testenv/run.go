package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazycas/lazycas/integration/testimages"
)

// Runtime is the containerd runtime the containers run with.
const Runtime = "io.containerd.runc.v2"

// runTimeout bounds one container run unless ctx ends sooner.
const runTimeout = 2 * time.Minute

// Pushed describes an image pushed into the environment's registry.
type Pushed struct {
	// Ref is the reference to pull, e.g. 127.0.0.1:PORT/python:latest.
	Ref string
	// Built tells whether the image was built (false: taken from the
	// cache); BuildTime is how long that took.
	Built     bool
	BuildTime time.Duration
	// PushTime is how long the push took.
	PushTime time.Duration
	// Layers and Bytes count the image's layers and their compressed size.
	Layers int
	Bytes  int64
}

// PushImage takes im from the image cache (building it when missing) and
// pushes it to the registry as <registry>/<name>:latest.
func (e *Env) PushImage(ctx context.Context, im *testimages.Image) (*Pushed, error) {
	loaded, err := im.Load(ctx, testimages.CacheDir(), e.logf)
	if err != nil {
		return nil, err
	}
	p := &Pushed{Ref: e.RegistryHost + "/" + im.Name + ":latest", Built: loaded.Built, BuildTime: loaded.BuildTime}
	layers, err := loaded.Image.Layers()
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", im.Name, err)
	}
	for _, l := range layers {
		size, err := l.Size()
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.Name, err)
		}
		p.Layers++
		p.Bytes += size
	}
	ref, err := name.ParseReference(p.Ref, name.Insecure)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	ropts := []remote.Option{remote.WithContext(ctx)}
	if a := e.opts.RegistryAuth; a != nil {
		ropts = append(ropts, remote.WithAuth(&authn.Basic{Username: a.User, Password: a.Password}))
	}
	if err := remote.Write(ref, loaded.Image, ropts...); err != nil {
		return nil, fmt.Errorf("push %s: %w", p.Ref, err)
	}
	p.PushTime = time.Since(start)
	return p, nil
}

// Resolver resolves references against the loopback registry over plain
// HTTP.
func (e *Env) Resolver() remotes.Resolver {
	opts := []docker.RegistryOpt{docker.WithPlainHTTP(docker.MatchLocalhost)}
	if a := e.opts.RegistryAuth; a != nil {
		opts = append(opts, docker.WithAuthorizer(docker.NewDockerAuthorizer(docker.WithAuthCreds(func(string) (string, string, error) {
			return a.User, a.Password, nil
		}))))
	}
	return docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(opts...)})
}

// Pull pulls ref through containerd's client into the lazycas snapshotter
// and unpacks it, the way `ctr images pull --snapshotter lazycas` does;
// opts are added to those.
func (e *Env) Pull(ctx context.Context, ref string, opts ...client.RemoteOpt) (client.Image, error) {
	all := append([]client.RemoteOpt{
		client.WithPullUnpack,
		client.WithPullSnapshotter(Snapshotter),
		client.WithResolver(e.Resolver()),
	}, opts...)
	img, err := e.Client.Pull(e.Context(ctx), ref, all...)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	return img, nil
}

// WithSnapshotLabels makes a pull pass the image and layer labels that CRI
// and nerdctl pass to a remote snapshotter (containerd.io/snapshot/cri.*).
func WithSnapshotLabels(ref string) client.RemoteOpt {
	return client.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref))
}

// UniqueID returns prefix with a random suffix, for container IDs.
func UniqueID(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

// NewContainer creates container id from img on a new lazycas snapshot
// named id. Without args it runs the image's command.
func (e *Env) NewContainer(ctx context.Context, img client.Image, id string, args ...string) (client.Container, error) {
	return e.NewContainerOn(ctx, Snapshotter, img, id, args...)
}

// Result is the outcome of a task run to completion.
type Result struct {
	Stdout, Stderr string
	ExitCode       uint32
}

// RunTask starts c's task, waits for it to exit and deletes the task; the
// container and its snapshot stay.
func (e *Env) RunTask(ctx context.Context, c client.Container) (_ *Result, err error) {
	ctx, cancel := context.WithTimeout(e.Context(ctx), runTimeout)
	defer cancel()
	var stdout, stderr syncBuffer
	task, err := c.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &stdout, &stderr),
		cio.WithFIFODir(filepath.Join(e.RunDir, "fifo"))))
	if err != nil {
		return nil, fmt.Errorf("create task %s: %w", c.ID(), err)
	}
	defer func() {
		if err != nil {
			// A fresh context: ctx may be what ran out.
			dctx, dcancel := context.WithTimeout(e.Context(context.Background()), 30*time.Second)
			defer dcancel()
			_, _ = task.Delete(dctx, client.WithProcessKill)
		}
	}()
	statusC, err := task.Wait(ctx)
	if err != nil {
		return nil, fmt.Errorf("wait task %s: %w", c.ID(), err)
	}
	if err := task.Start(ctx); err != nil {
		return nil, fmt.Errorf("start task %s: %w", c.ID(), err)
	}
	var status client.ExitStatus
	select {
	case status = <-statusC:
	case <-ctx.Done():
		return nil, fmt.Errorf("task %s did not exit: %w (output so far: %q %q)",
			c.ID(), ctx.Err(), stdout.String(), stderr.String())
	}
	code, _, err := status.Result()
	if err != nil {
		return nil, fmt.Errorf("task %s exit status: %w", c.ID(), err)
	}
	// Delete cancels output copiers that have not opened their FIFOs yet
	// (on a loaded machine, a short task can exit first), and its output
	// is lost: wait for the copiers to read to the end first, boundedly.
	copied := make(chan struct{})
	go func() {
		task.IO().Wait()
		close(copied)
	}()
	select {
	case <-copied:
	case <-time.After(30 * time.Second):
	case <-ctx.Done():
	}
	if _, err := task.Delete(ctx); err != nil {
		return nil, fmt.Errorf("delete task %s: %w", c.ID(), err)
	}
	return &Result{Stdout: stdout.String(), Stderr: stderr.String(), ExitCode: code}, nil
}

// DeleteContainer deletes c (killing its task if any) and its snapshot.
func (e *Env) DeleteContainer(ctx context.Context, c client.Container) error {
	return deleteContainer(e.Context(ctx), c)
}

// Run creates a container from img, runs args (or the image's command) in
// it to completion, and deletes the container and its snapshot.
func (e *Env) Run(ctx context.Context, img client.Image, id string, args ...string) (*Result, error) {
	return e.RunOn(ctx, Snapshotter, img, id, args...)
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a task's
// output copiers and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
