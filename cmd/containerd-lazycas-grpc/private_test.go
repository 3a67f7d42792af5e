package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestSocketsAndRootArePrivate: only root (containerd, kubelet) may reach
// the daemon's sockets, and nobody else may read its root: it holds every
// image's files and the layers' metadata. The image service endpoint falls
// back to containerd's socket (a symlink) when the daemon stops.
func TestSocketsAndRootArePrivate(t *testing.T) {
	requireRoot(t)
	dir, err := os.MkdirTemp("", "lzp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	root := filepath.Join(dir, "root") // made by the daemon
	address := filepath.Join(dir, "run", "lazycas.sock")
	criAddress := filepath.Join(dir, "run", "cri.sock")
	containerd := filepath.Join(dir, "containerd.sock") // never dialled here
	cfg := filepath.Join(dir, "config.toml")
	content := fmt.Sprintf("[fs]\nholder = false\n\n[containerd]\naddress = %q\n\n[cri]\nimage_service_address = %q\n", containerd, criAddress)
	if err := os.WriteFile(cfg, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := startDaemon(t, root, address, "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	// The API and image service listen just after the snapshots socket.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, e1 := os.Stat(filepath.Join(dir, "run", "lazycas-api.sock"))
		_, e2 := os.Stat(criAddress)
		if e1 == nil && e2 == nil {
			break
		}
		if time.Now().After(deadline) {
			d.kill()
			t.Fatalf("API or image service socket missing after 10 s: %v, %v", e1, e2)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, c := range []struct {
		path string
		want os.FileMode
	}{
		{address, 0o600},
		{filepath.Join(dir, "run", "lazycas-api.sock"), 0o600},
		{criAddress, 0o600},
		{root, 0o700},
	} {
		fi, err := os.Lstat(c.path)
		if err != nil {
			t.Errorf("%s: %v", c.path, err)
			continue
		}
		if got := fi.Mode().Perm(); got != c.want {
			t.Errorf("%s has mode %o, want %o", c.path, got, c.want)
		}
	}
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	if target, err := os.Readlink(criAddress); err != nil || target != containerd {
		t.Errorf("after the daemon stopped, %s is %q (%v), want a symlink to %s", criAddress, target, err, containerd)
	}
}
