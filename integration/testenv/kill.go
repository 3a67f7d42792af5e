package testenv

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// killWait bounds how long a SIGKILLed daemon may take to be reaped.
const killWait = 10 * time.Second

// KillDaemon kills the lazycas daemon's process group with SIGKILL, as a
// crash or the OOM killer would, and waits until it is reaped. Its FUSE
// mounts stay behind: kept by its FUSE holder, in a session of its own
// that the kill does not reach, until StartDaemonAgain's daemon takes them
// over (reads wait meanwhile); without a holder, dead ("transport endpoint
// is not connected") until Close unmounts them. It fails when the daemon
// had already exited.
func (e *Env) KillDaemon() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.daemon
	if p == nil {
		return errors.New("kill lazycas: no daemon was started")
	}
	if done, err := p.exited(); done {
		return fmt.Errorf("kill lazycas: it had already exited (%v)\n%s", err, e.LogTail(20))
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill lazycas (pid %d): %w", p.cmd.Process.Pid, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(killWait):
		return fmt.Errorf("lazycas (pid %d) survived SIGKILL for %s", p.cmd.Process.Pid, killWait)
	}
}

// StartDaemonAgain starts lazycas on the same root, config and socket
// after KillDaemon (or any exit), and waits until it answers, and until
// containerd reaches it again: containerd's connection to a snapshotter
// that died backs off before it redials, and calls through containerd
// fail with "unavailable" meanwhile.
func (e *Env) StartDaemonAgain(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.daemon != nil {
		if done, _ := e.daemon.exited(); !done {
			return errors.New("start lazycas again: it is still running")
		}
	}
	if err := e.startDaemon(ctx); err != nil {
		return fmt.Errorf("start lazycas again: %w\n%s", err, e.LogTail(20))
	}
	if err := e.waitContainerdReachesDaemon(ctx); err != nil {
		return fmt.Errorf("start lazycas again: %w", err)
	}
	return nil
}

// waitContainerdReachesDaemon lists lazycas's snapshots through
// containerd (which asks the snapshotter about each one) until a listing
// succeeds.
func (e *Env) waitContainerdReachesDaemon(ctx context.Context) error {
	if e.Client == nil {
		return nil
	}
	sn := e.Client.SnapshotService(Snapshotter)
	deadline := time.Now().Add(readyTimeout)
	for {
		err := sn.Walk(e.Context(ctx), func(context.Context, snapshots.Info) error { return nil })
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd does not reach lazycas after %s: %w", readyTimeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
