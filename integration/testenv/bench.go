package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Helpers for script/bench, which needs a node that has never pulled
// anything before every cold run, a second registry serving the same blobs
// from elsewhere (a network namespace behind a shaped link), the daemons'
// process ids for their memory figures, and a way to clean up after a
// benchmark that was killed.

// RegistryStorage is the directory the registry keeps its repositories in.
// Another registry process may serve it too, once nothing pushes any more.
func (e *Env) RegistryStorage() string { return filepath.Join(e.Dir, "registry") }

// RegistryConfig is a docker-registry config serving storage on addr
// (host:port), as the environment's own registry is configured.
func RegistryConfig(storage, addr string) string {
	return fmt.Sprintf(registryConfig, storage, addr)
}

// ContainerdRoot is containerd's root directory, where its own
// snapshotters (overlayfs) keep their snapshots.
func (e *Env) ContainerdRoot() string { return filepath.Join(e.Dir, "containerd") }

// DaemonPID is the process id of the running lazycas daemon, 0 if none.
func (e *Env) DaemonPID() int { return e.pid(func() *process { return e.daemon }) }

// ContainerdPID is the process id of the running containerd, 0 if none.
func (e *Env) ContainerdPID() int { return e.pid(func() *process { return e.ctrd }) }

func (e *Env) pid(which func() *process) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := which()
	if p == nil {
		return 0
	}
	if done, _ := p.exited(); done {
		return 0
	}
	return p.cmd.Process.Pid
}

// ResetNode makes the node new again, with the registry untouched: it
// deletes every container, stops containerd (and its shims) and the lazycas
// daemon, unmounts and removes containerd's root and state and the daemon's
// root (its snapshots, metadata and store), and starts both daemons again on
// the same sockets and configs. Client is replaced by a new connection.
func (e *Env) ResetNode(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	if e.Client != nil {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := e.removeAllContainers(cctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
		e.Client.Close()
		e.Client = nil
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
	// A new node has no holder either: it would keep the old layers'
	// FUSE connections, unmounted below, for nobody.
	if err := killHolders(e.DaemonRoot, e.Dir, e.RunDir); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("reset node: %w", errors.Join(errs...))
	}
	for _, d := range []string{filepath.Join(e.Dir, "containerd"), filepath.Join(e.RunDir, "state"),
		filepath.Join(e.RunDir, "fifo"), e.DaemonRoot} {
		if err := unmountUnder(d); err != nil {
			return fmt.Errorf("reset node: %w", err)
		}
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("reset node: %w", err)
		}
	}
	if err := e.startDaemon(ctx); err != nil {
		return fmt.Errorf("reset node: start lazycas: %w\n%s", err, e.LogTail(20))
	}
	if err := e.startContainerd(ctx); err != nil {
		return fmt.Errorf("reset node: start containerd: %w\n%s", err, e.LogTail(20))
	}
	return nil
}

// RemoveLeftovers cleans up after an environment whose owner was killed
// before Close: it kills the containerd shims serving runDir's containerd
// socket and the lazycas FUSE holder of workDir's daemon (the daemons
// themselves die with their parent; the holder, in a session of its own
// and not the owner's child, does not), then unmounts everything under
// workDir and runDir and removes both. Either may be "".
func RemoveLeftovers(workDir, runDir string) error {
	var errs []error
	if runDir != "" {
		if err := killShims(filepath.Join(runDir, "containerd.sock")); err != nil {
			errs = append(errs, err)
		}
	}
	if workDir != "" {
		if err := killHolders(filepath.Join(workDir, daemonRootName), workDir, runDir); err != nil {
			errs = append(errs, err)
		}
	}
	for _, d := range []string{runDir, workDir} {
		if d == "" {
			continue
		}
		if err := unmountUnder(d); err != nil {
			errs = append(errs, err)
			continue // never remove through a mount
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// SetDaemonConfig replaces the daemon's TOML config (Options.DaemonConfig)
// for its next start, e.g. by ResetNode.
func (e *Env) SetDaemonConfig(cfg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.opts.DaemonConfig = cfg
}
