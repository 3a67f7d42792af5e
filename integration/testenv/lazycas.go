package testenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/lazycas/lazycas/fs/convert"

	lazyfs "github.com/lazycas/lazycas/fs"

	"github.com/lazycas/lazycas/service"
)

// The lazycas CLI against the environment, other snapshotters, and the
// daemon's log read back as data.

// JSONLogConfig is a daemon config (Options.DaemonConfig) that makes lazycas
// log one JSON object a line, which SnapshotCalls parses. The text format
// prints labels as a Go map ("map[k:v k:v]"), which no parser can split
// reliably.
const JSONLogConfig = "log_format = \"json\"\n"

// cliTimeout bounds one run of the lazycas CLI unless ctx ends sooner.
const cliTimeout = 5 * time.Minute

// PythonStartupFiles are regular files python3 of testimages.Python reads
// when it starts (the interpreter, its ELF interpreter and libraries, the
// loader cache, the first modules), relative to the root: a prefetch list.
// etc/ld.so.cache is in both of the image's layers.
var PythonStartupFiles = []string{
	"usr/bin/python3.11",
	"usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
	"etc/ld.so.cache",
	"usr/lib/x86_64-linux-gnu/libc.so.6",
	"usr/lib/x86_64-linux-gnu/libm.so.6",
	"usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
	"usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10",
	"usr/lib/python3.11/encodings/__init__.py",
	"usr/lib/python3.11/os.py",
	"usr/lib/python3.11/site.py",
}

// CLIError is a lazycas CLI run that failed: its exit error and output.
type CLIError struct {
	Args           []string
	Err            error
	Stdout, Stderr string
}

func (e *CLIError) Error() string {
	return fmt.Sprintf("lazycas %s: %v\nstderr: %s", strings.Join(e.Args, " "), e.Err, strings.TrimSpace(e.Stderr))
}

func (e *CLIError) Unwrap() error { return e.Err }

// RunCLI runs the lazycas CLI binary bin with args to completion and
// returns its stdout and stderr; a failure is a *CLIError.
func (e *Env) RunCLI(ctx context.Context, bin string, args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(ctx, cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = e.Dir
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return so.String(), se.String(), &CLIError{Args: args, Err: err, Stdout: so.String(), Stderr: se.String()}
	}
	return so.String(), se.String(), nil
}

// ConvertArgs are the arguments of `lazycas image convert` from src to dst
// in the environment's registry, with flags before the references.
func (e *Env) ConvertArgs(src, dst string, flags ...string) []string {
	args := append([]string{"image", "convert", "--plain-http"}, flags...)
	return append(args, src, dst)
}

// ConvertWithCLI runs `lazycas image convert --plain-http --json flags...
// src dst` and returns the conversion it reports.
func (e *Env) ConvertWithCLI(ctx context.Context, bin, src, dst string, flags ...string) (*convert.Result, error) {
	stdout, _, err := e.RunCLI(ctx, bin, e.ConvertArgs(src, dst, append([]string{"--json"}, flags...)...)...)
	if err != nil {
		return nil, err
	}
	var res convert.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		return nil, fmt.Errorf("lazycas image convert --json printed %q: %w", stdout, err)
	}
	return &res, nil
}

// CLIPull is what `lazycas image pull --json` prints; the tests read the
// CLI's output through it, so a renamed field fails them.
type CLIPull struct {
	Image       string         `json:"image"`
	Digest      string         `json:"digest"`
	Snapshotter string         `json:"snapshotter"`
	Seconds     float64        `json:"seconds"`
	Layers      []CLIPullLayer `json:"layers"`
}

// CLIPullLayer is one layer of a CLIPull, bottom first.
type CLIPullLayer struct {
	Digest    string `json:"digest"`
	MediaType string `json:"mediaType"`
	Size      int64  `json:"size"`
	ChainID   string `json:"chainID"`
	Mode      string `json:"mode"`   // "lazy" or "unpacked"
	Why       string `json:"why"`    // for an unpacked layer, what the daemon said
	Reason    string `json:"reason"` // and its class (snapshot.Reason*)
	DiskUsage int64  `json:"diskUsage"`
}

// PullArgs are the arguments of `lazycas image pull` of ref into the
// environment's containerd and namespace over plain HTTP, with flags
// before the reference.
func (e *Env) PullArgs(ref string, flags ...string) []string {
	args := append([]string{"image", "pull", "--address", e.ContainerdAddress,
		"--namespace", e.Namespace, "--plain-http", "--api-address", e.APISocket()}, flags...)
	return append(args, ref)
}

// PullWithCLI runs `lazycas image pull ... --json flags... ref` and returns
// what it reports.
func (e *Env) PullWithCLI(ctx context.Context, bin, ref string, flags ...string) (*CLIPull, error) {
	stdout, _, err := e.RunCLI(ctx, bin, e.PullArgs(ref, append([]string{"--json"}, flags...)...)...)
	if err != nil {
		return nil, err
	}
	var res CLIPull
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		return nil, fmt.Errorf("lazycas image pull --json printed %q: %w", stdout, err)
	}
	return &res, nil
}

// PullOn pulls ref and unpacks it into containerd's snapshotter sn (e.g.
// "overlayfs", containerd's own); opts are added.
func (e *Env) PullOn(ctx context.Context, sn, ref string, opts ...client.RemoteOpt) (client.Image, error) {
	return e.Pull(ctx, ref, append([]client.RemoteOpt{client.WithPullSnapshotter(sn)}, opts...)...)
}

// NewContainerOn is NewContainer on snapshotter sn.
func (e *Env) NewContainerOn(ctx context.Context, sn string, img client.Image, id string, args ...string) (client.Container, error) {
	return e.NewContainerWith(ctx, sn, img, id, args)
}

// NewContainerWith is NewContainerOn with more spec options (bind mounts,
// environment), applied after the image's config and args.
func (e *Env) NewContainerWith(ctx context.Context, sn string, img client.Image, id string, args []string, more ...oci.SpecOpts) (client.Container, error) {
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(args) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(args...))
	}
	specOpts = append(specOpts, more...)
	c, err := e.Client.NewContainer(e.Context(ctx), id,
		client.WithImage(img),
		client.WithSnapshotter(sn),
		client.WithNewSnapshot(id, img),
		client.WithRuntime(Runtime, nil),
		client.WithNewSpec(specOpts...),
	)
	if err != nil {
		return nil, fmt.Errorf("create container %s on %s: %w", id, sn, err)
	}
	return c, nil
}

// RunOn is Run on snapshotter sn.
func (e *Env) RunOn(ctx context.Context, sn string, img client.Image, id string, args ...string) (*Result, error) {
	c, err := e.NewContainerOn(ctx, sn, img, id, args...)
	if err != nil {
		return nil, err
	}
	res, runErr := e.RunTask(ctx, c)
	if err := e.DeleteContainer(ctx, c); err != nil && runErr == nil {
		return nil, err
	}
	return res, runErr
}

// DeleteImage deletes the image name from containerd and waits for its
// garbage collection, which removes its content and snapshots.
func (e *Env) DeleteImage(ctx context.Context, name string) error {
	if err := e.Client.ImageService().Delete(e.Context(ctx), name, images.SynchronousDelete()); err != nil {
		return fmt.Errorf("delete image %s: %w", name, err)
	}
	return nil
}

// SnapshotCall is a Prepare or View the lazycas daemon logged at debug
// level (snapshot.Snapshotter logs each one it created).
type SnapshotCall struct {
	// Kind is "prepare" or "view".
	Kind        string
	Key, Parent string
	Labels      map[string]string
}

// SnapshotCalls reads the daemon's log, which must be JSON (JSONLogConfig),
// and returns every Prepare and View it logged, in order, across restarts.
func (e *Env) SnapshotCalls() ([]SnapshotCall, error) {
	var calls []SnapshotCall
	err := e.DaemonLog(func(line []byte, msg string) error {
		if msg != "prepare" && msg != "view" {
			return nil
		}
		var ent struct {
			Key    string            `json:"key"`
			Parent string            `json:"parent"`
			Labels map[string]string `json:"labels"`
		}
		if err := json.Unmarshal(line, &ent); err != nil {
			return err
		}
		calls = append(calls, SnapshotCall{Kind: msg, Key: ent.Key, Parent: ent.Parent, Labels: ent.Labels})
		return nil
	})
	return calls, err
}

// DaemonLog calls fn with every line of the daemon's log, which must be
// JSON (JSONLogConfig), and its message, in order, across restarts.
func (e *Env) DaemonLog(fn func(line []byte, msg string) error) error {
	f, err := os.Open(filepath.Join(e.Dir, daemonLog))
	if err != nil {
		return err
	}
	defer f.Close()
	jsonLines := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 16<<20) // an image-layers label can be long
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.HasPrefix(line, []byte("{")) {
			continue // the environment's "=== start" headers, a panic's trace
		}
		var ent struct {
			Msg string `json:"msg"`
		}
		if err := json.Unmarshal(line, &ent); err != nil {
			return fmt.Errorf("%s: a line that is not JSON: %w: %.200s", daemonLog, err, line)
		}
		jsonLines++
		if err := fn(line, ent.Msg); err != nil {
			return fmt.Errorf("%s: %w: %.200s", daemonLog, err, line)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", daemonLog, err)
	}
	if jsonLines == 0 {
		return errors.New("the lazycas log holds no JSON lines: start the environment with DaemonConfig JSONLogConfig")
	}
	return nil
}

// APISocket is the daemon's own API socket, next to its snapshots socket.
func (e *Env) APISocket() string {
	return strings.TrimSuffix(e.DaemonAddress, ".sock") + "-api.sock"
}

// DaemonStats asks the daemon's API for its store and fetch figures.
func (e *Env) DaemonStats(ctx context.Context) (lazyfs.Stats, error) {
	var st lazyfs.Stats
	body, err := e.DaemonAPI(ctx, http.MethodGet, service.APIStats, nil)
	if err != nil {
		return st, fmt.Errorf("daemon stats: %w", err)
	}
	return st, json.Unmarshal(body, &st)
}

// DaemonAPI calls the daemon's own API (method, path, body) and returns
// the body of a 200 answer.
func (e *Env) DaemonAPI(ctx context.Context, method, path string, body io.Reader) ([]byte, error) {
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", e.APISocket())
		},
	}}
	req, err := http.NewRequestWithContext(ctx, method, "http://lazycas"+path, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s %s: %s: %.300s", method, path, resp.Status, data)
	}
	return data, nil
}
