package cri

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// Kubelet must reach an image service whether or not lazycas runs: it asks
// one (ImageStatus) before it starts any container, lazycas's own pods
// included, so an endpoint that only the daemon serves would keep a
// stopped daemon from ever being started again by kubelet. The endpoint's
// path is therefore never left dead: while lazycas serves it, it is
// lazycas's socket; otherwise it is a symlink to containerd's socket,
// which answers the same API (pulls made meanwhile keep no credentials for
// lazy reads: their layers read with the node's own). The daemon puts the
// symlink back when it stops, the fuse holder when a daemon dies, and a
// tmpfiles.d line at boot (see script/systemd).

// Listen serves the image service at address: it listens on a new socket
// beside it and renames that over address, so that kubelet, reconnecting
// by path, finds either the fallback or lazycas, never nothing. A live
// socket at address that is not the fallback belongs to another daemon
// and is an error.
func Listen(ctx context.Context, address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o711); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if fi, err := os.Lstat(address); err == nil && fi.Mode()&os.ModeSymlink == 0 {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("socket %s: path exists and is not a socket", address)
		}
		if answering(ctx, address) {
			return nil, fmt.Errorf("socket %s is in use by another process (is a lazycas daemon already running?)", address)
		}
	}
	tmp := address + ".new-" + strconv.Itoa(os.Getpid())
	_ = os.Remove(tmp)
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", tmp, err)
	}
	// Only root (kubelet) may pull with the node's credentials.
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, address); err != nil {
		l.Close()
		return nil, fmt.Errorf("serve on %s: %w", address, err)
	}
	// Closing the listener must not remove address (the fallback goes
	// there): it removes the name it was made with, gone since.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	return l, nil
}

// Fallback makes address a symlink to containerd's socket, atomically, so
// that kubelet reaches containerd's image service while lazycas does not
// serve.
func Fallback(address, containerd string) error {
	tmp := address + ".fallback-" + strconv.Itoa(os.Getpid())
	_ = os.Remove(tmp)
	if err := os.Symlink(containerd, tmp); err != nil {
		return fmt.Errorf("image service fallback: %w", err)
	}
	if err := os.Rename(tmp, address); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("image service fallback: %w", err)
	}
	return nil
}

// FallbackIfDead puts the fallback at address unless a process answers
// there: a daemon that started meanwhile keeps its socket.
func FallbackIfDead(ctx context.Context, address, containerd string) (bool, error) {
	if fi, err := os.Lstat(address); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		return false, nil // the fallback already
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("image service fallback: %w", err)
	}
	if answering(ctx, address) {
		return false, nil
	}
	return true, Fallback(address, containerd)
}

// answering tells whether a process accepts connections on the socket.
func answering(ctx context.Context, address string) bool {
	c, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "unix", address)
	if err != nil {
		return false
	}
	c.Close()
	return true
}
