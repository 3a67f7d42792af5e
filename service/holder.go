package service

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/containerd/log"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/fuse/holder"
)

// HolderCommand is the daemon's command that runs the fuse holder.
const HolderCommand = "fuse-holder"

// HolderPIDFile is where the fuse holder writes its pid.
func HolderPIDFile(root string) string { return filepath.Join(root, "fuse-holder.pid") }

// spawnHolder starts this binary's fuse holder for cfg, in a session of
// its own: whatever stops or kills the daemon's process group (a terminal,
// systemd with KillMode=process, a test) leaves it running. Under a
// DaemonSet it runs in a pod of its own instead (see README).
func spawnHolder(ctx context.Context, cfg config.Config) error {
	logf, err := os.OpenFile(filepath.Join(cfg.Root, "fuse-holder.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("/proc/self/exe", HolderCommand,
		"--socket", cfg.HolderSocket(), "--pid-file", HolderPIDFile(cfg.Root),
		"--abort-after", cfg.FS.HolderAbortAfter.Duration.String(), "--log-level", cfg.LogLevel)
	cmd.Args[0] = filepath.Base(os.Args[0])
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", HolderCommand, err)
	}
	log.G(ctx).WithField("pid", cmd.Process.Pid).Info("fuse holder started")
	// Reaped if it exits while this process runs.
	go func() { _ = cmd.Wait() }()
	return nil
}

// takeHeld lists the mounts the holder kept from an earlier daemon, by
// mountpoint.
func takeHeld(ctx context.Context, c *holder.Client) (map[string]fuse.Held, error) {
	entries, err := c.Take()
	if err != nil {
		return nil, err
	}
	held := make(map[string]fuse.Held, len(entries))
	for _, e := range entries {
		dir, err := fuse.HeldDir(e.Record)
		if err != nil {
			log.G(ctx).WithError(err).WithField("key", e.Key).Warn("fuse holder kept a mount this daemon cannot read: dropping it")
			for _, fd := range e.Fds {
				syscall.Close(fd)
			}
			continue
		}
		held[dir] = fuse.Held{Record: e.Record, Fds: e.Fds}
	}
	if len(held) > 0 {
		log.G(ctx).WithFields(log.Fields{"mounts": len(held), "unserved_for": c.Orphaned().String()}).
			Info("the fuse holder kept mounts of an earlier daemon: serving them on")
	}
	return held, nil
}
