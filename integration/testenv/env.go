// Package testenv runs lazycas end to end on this machine: a real registry
// (Debian's docker-registry), a private containerd 1.6 (or 2.x with
// Options.Containerd2) whose proxy plugin "lazycas" is the lazycas daemon,
// and that daemon, all in one private work directory. The integration tests
// and the demo use it; production code must not import it.
//
// Contract: Start either returns a running environment or cleans up what it
// started. Close always stops every process the environment started (and
// the containerd shims and the lazycas FUSE holder they left), unmounts
// everything under its directories, and removes them; it is safe after a
// half-finished Start or a failed test, and idempotent. Nothing here
// touches the host's own containerd: sockets, state and roots are private.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
)

// Snapshotter is the name containerd knows lazycas by.
const Snapshotter = "lazycas"

// DefaultNamespace is the containerd namespace the environment works in.
const DefaultNamespace = "lazycas-test"

// Timeouts of the environment's own steps.
const (
	readyTimeout = 30 * time.Second // a daemon starting to answer
	stopGrace    = 15 * time.Second // SIGTERM before SIGKILL
)

// Options configure Start.
type Options struct {
	// WorkDir is the environment's private directory; it must exist and
	// is removed by Close. Required.
	WorkDir string
	// DaemonPath is the containerd-lazycas-grpc binary. Required. SetDaemonPath
	// replaces it for later starts.
	DaemonPath string
	// DaemonConfig is the content of the daemon's TOML config; empty means
	// all defaults.
	DaemonConfig string
	// Namespace is the containerd namespace; DefaultNamespace when empty.
	Namespace string
	// Containerd2 runs containerd Containerd2Version (built once into the
	// test cache, see BuildContainerd2) instead of Debian's 1.6.
	Containerd2 bool
	// NoDaemon starts no lazycas daemon: the caller runs one (in a
	// container, say) on DaemonRoot, serving DaemonAddress, which is then
	// in a directory of its own (DaemonSocketDir) so that it can be
	// mounted as a whole. DaemonRoot and RunDir are then shared mounts, as
	// a systemd host's / and /run are, so that a container's Bidirectional
	// (rshared) mount of the root propagates its mounts back to the host
	// and a HostToContainer (rslave) one receives them (CRI refuses those
	// propagations on a private mount). Close still stops
	// everything: containers in every namespace with their shims, holders,
	// and every mount under the environment's directories.
	NoDaemon bool
	// ProxySnapshotters are more snapshotters containerd reaches as proxy
	// plugins, besides lazycas: daemons the caller runs (the benchmark's
	// peers). containerd's garbage collector removes every snapshot of
	// theirs that its own metadata does not list.
	ProxySnapshotters []ProxySnapshotter
	// CRIConfig, when set, enables containerd's CRI plugins with the
	// config it returns for the started environment: the TOML of their
	// tables, in the schema of the containerd that runs (1.6's version 2,
	// 2.x's version 3).
	CRIConfig func(e *Env) string
	// RegistryAuth, when set, makes the registry require these
	// credentials (htpasswd, HTTP basic); PushImage and Resolver use
	// them, the daemon has none of its own.
	RegistryAuth *BasicAuth
	// Logf receives progress messages; nil discards them.
	Logf func(format string, args ...any)
}

// BasicAuth is a user name and password.
type BasicAuth struct{ User, Password string }

// ProxySnapshotter is a snapshotter daemon serving containerd's snapshots
// API on a unix socket.
type ProxySnapshotter struct {
	Name, Address string
}

// Env is a running registry, containerd and lazycas daemon.
type Env struct {
	// Dir is the work directory; RunDir a short directory under /run for
	// sockets and containerd's state (unix socket paths must stay short).
	Dir, RunDir string
	// RegistryHost is the registry's host:port on the loopback.
	RegistryHost string
	// ContainerdAddress is containerd's gRPC socket.
	ContainerdAddress string
	// DaemonAddress is lazycas's socket; DaemonRoot its root directory.
	DaemonAddress, DaemonRoot string
	// HostsDir is the containerd hosts directory (hosts.toml) through
	// which the daemon reaches the registry over plain HTTP.
	HostsDir string
	// Namespace is the containerd namespace of Context.
	Namespace string
	// Client is connected to containerd, with Namespace as its default.
	Client *client.Client

	opts      Options
	logf      func(format string, args ...any)
	mu        sync.Mutex // guards the processes during restart and close
	registry  *process
	ctrd      *process
	daemon    *process
	closeOnce sync.Once
	closeErr  error
}

// daemonRootName is the daemon's root directory in the work directory.
const daemonRootName = "lazycas"

// daemonSocketDirName is, with Options.NoDaemon, the directory in RunDir
// holding the daemon's sockets.
const daemonSocketDirName = "lazycas"

// Log files in the work directory, one per daemon.
const (
	registryLog   = "registry.log"
	containerdLog = "containerd.log"
	daemonLog     = "lazycas.log"
)

// Start starts the registry, the lazycas daemon and containerd, and waits
// until each answers. On error everything started is stopped and removed.
func Start(ctx context.Context, opts Options) (_ *Env, err error) {
	if opts.WorkDir == "" || opts.DaemonPath == "" {
		return nil, errors.New("testenv: WorkDir and DaemonPath are required")
	}
	dir, err := filepath.Abs(opts.WorkDir)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(opts.DaemonPath); err != nil {
		return nil, fmt.Errorf("lazycas daemon binary: %w", err)
	}
	runDir, err := os.MkdirTemp("/run", "lzc-")
	if err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	e := &Env{
		Dir:               dir,
		RunDir:            runDir,
		ContainerdAddress: filepath.Join(runDir, "containerd.sock"),
		DaemonAddress:     filepath.Join(runDir, "lazycas.sock"),
		DaemonRoot:        filepath.Join(dir, daemonRootName),
		Namespace:         opts.Namespace,
		opts:              opts,
		logf:              opts.Logf,
	}
	if e.Namespace == "" {
		e.Namespace = DefaultNamespace
	}
	if e.logf == nil {
		e.logf = func(string, ...any) {}
	}
	defer func() {
		if err != nil {
			if cerr := e.Close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("cleanup after failed start: %w", cerr))
			}
		}
	}()
	steps := []struct {
		what string
		fn   func(context.Context) error
	}{
		{"registry", e.startRegistry},
		{"lazycas daemon", e.startDaemon},
		{"containerd", e.startContainerd},
	}
	if opts.NoDaemon {
		e.DaemonAddress = filepath.Join(runDir, daemonSocketDirName, "lazycas.sock")
		steps[1] = struct {
			what string
			fn   func(context.Context) error
		}{"shared mounts for a containerized daemon", e.prepareNoDaemon}
	}
	for _, s := range steps {
		start := time.Now()
		if err := s.fn(ctx); err != nil {
			return nil, fmt.Errorf("start %s: %w\n%s", s.what, err, e.LogTail(20))
		}
		e.logf("%s started in %s", s.what, time.Since(start).Round(time.Millisecond))
	}
	return e, nil
}

// Context returns ctx in the environment's containerd namespace.
func (e *Env) Context(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, e.Namespace)
}

// Close stops and removes everything; see the package comment.
func (e *Env) Close() error {
	e.closeOnce.Do(func() { e.closeErr = e.close() })
	return e.closeErr
}

func (e *Env) close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if e.Client != nil {
		if err := e.removeAllContainers(ctx); err != nil {
			errs = append(errs, err)
		}
		e.Client.Close()
	}
	if err := e.ctrd.stop(stopGrace); err != nil {
		errs = append(errs, err)
	}
	if err := killShims(e.ContainerdAddress); err != nil {
		errs = append(errs, err)
	}
	if err := e.daemon.stop(stopGrace); err != nil {
		errs = append(errs, err)
	}
	// The holder keeps the lazy layers' FUSE connections alive past the
	// daemon: killed after it, so that nothing serves them any more, and
	// before the unmount, which would otherwise leave it running.
	if err := killHolders(e.DaemonRoot, e.Dir, e.RunDir); err != nil {
		errs = append(errs, err)
	}
	if err := e.registry.stop(stopGrace); err != nil {
		errs = append(errs, err)
	}
	for _, d := range []string{e.RunDir, e.Dir} {
		if err := unmountUnder(d); err != nil {
			errs = append(errs, err)
			continue // never remove through a mount
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}
