package service

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/containerd/log"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/fuse/holder"
	"github.com/lazycas/lazycas/service/cri"
	"golang.org/x/sys/unix"
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
	if cfg.CRI.ImageServiceAddress != "" {
		cmd.Args = append(cmd.Args, "--cri-address", cfg.CRI.ImageServiceAddress, "--containerd-address", cfg.Containerd.Address)
	}
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

// keyringKey is the holder's entry for the CRI keyring: a memfd with
// kubelet's pull credentials, handed from daemon to daemon in memory.
const keyringKey = "cri-keyring"

// takeHeld lists the mounts the holder kept from an earlier daemon, by
// mountpoint, and gives keys (when not nil) the credentials it kept.
func takeHeld(ctx context.Context, c *holder.Client, keys *cri.Keyring) (map[string]fuse.Held, error) {
	entries, err := c.Take()
	if err != nil {
		return nil, err
	}
	held := make(map[string]fuse.Held, len(entries))
	for _, e := range entries {
		if e.Key == keyringKey {
			takeKeyring(ctx, c, keys, e.Fds)
			continue
		}
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

// takeKeyring imports the credentials an earlier daemon left with the
// holder (nothing when this daemon serves no CRI image service: they are
// forgotten) and keeps handing the keyring over from now on.
func takeKeyring(ctx context.Context, c *holder.Client, keys *cri.Keyring, fds []int) {
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	if keys == nil {
		return
	}
	if len(fds) != 1 {
		log.G(ctx).WithField("fds", len(fds)).Warn("fuse holder kept credentials this daemon cannot read: images pulled before it need pulling again for lazy reads")
		return
	}
	data, err := readMemfd(fds[0])
	if err == nil {
		var n int
		if n, err = keys.Import(data); err == nil {
			log.G(ctx).WithField("repositories", n).Info("took over the credentials of the last daemon's CRI pulls")
		}
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot take over the credentials of the last daemon's CRI pulls: images pulled before it need pulling again for lazy reads")
	}
}

// keepKeyring hands keys to the holder after every change, so that the
// next daemon (after a restart, an upgrade or a crash) reads lazy layers
// with the credentials they were pulled with. The holder keeps them in a
// memfd: memory, never a file.
func keepKeyring(ctx context.Context, c *holder.Client, keys *cri.Keyring) {
	var mu sync.Mutex // one hand-over at a time, each of the latest state
	save := func() {
		mu.Lock()
		defer mu.Unlock()
		if err := putKeyring(c, keys.Export()); err != nil {
			log.G(ctx).WithError(err).Warn("cannot hand the CRI pulls' credentials to the fuse holder: after a restart, images need pulling again for lazy reads")
		}
	}
	keys.OnChange(save)
	save()
}

// readMemfd reads the whole of a sealed memfd. No os.File: its finalizer
// would close an fd number the caller closes too.
func readMemfd(fd int) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat memfd: %w", err)
	}
	if st.Size > 16<<20 {
		return nil, fmt.Errorf("memfd of %d bytes is no keyring", st.Size)
	}
	data := make([]byte, st.Size)
	for off := 0; off < len(data); {
		n, err := unix.Pread(fd, data[off:], int64(off))
		if err != nil {
			return nil, fmt.Errorf("read memfd: %w", err)
		}
		if n == 0 {
			return nil, io.ErrUnexpectedEOF
		}
		off += n
	}
	return data, nil
}

func putKeyring(c *holder.Client, data []byte) error {
	fd, err := unix.MemfdCreate(keyringKey, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	defer unix.Close(fd)
	for off := 0; off < len(data); {
		n, err := unix.Pwrite(fd, data[off:], int64(off))
		if err != nil {
			return fmt.Errorf("write memfd: %w", err)
		}
		off += n
	}
	// Nobody who gets the fd may change what the next daemon reads.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
		return fmt.Errorf("seal memfd: %w", err)
	}
	return c.Put(keyringKey, nil, fd)
}
