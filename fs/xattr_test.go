package fs

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
)

// TestLayerWithoutXattrs checks what a layer that holds no xattr answers,
// directly and under overlayfs: no attribute (EOPNOTSUPP once the kernel
// stopped asking), an empty list, and a layer with xattrs still answers
// ENODATA for a missing one.
func TestLayerWithoutXattrs(t *testing.T) {
	e := newEnv(t, Options{OpaqueXattr: fuse.OpaqueXattrTrusted}, remote.Options{})
	plain := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
		testlayer.Dir("etc", 0o755),
		testlayer.File("etc/hosts", []byte("127.0.0.1 localhost\n"), 0o644),
	}), layer.FormatEStargz, testlayer.BuildOptions{})
	mp := e.mount("plain", plain)
	if !e.layer("plain").meta.Info.NoXattrs {
		t.Fatal("a layer without xattrs is not marked so")
	}
	rich := e.mount("rich", testlayer.Build(t, testlayer.Tar(t, richLayer()), layer.FormatEStargz, testlayer.BuildOptions{}))
	if e.layer("rich").meta.Info.NoXattrs {
		t.Fatal("a layer with xattrs is marked as without")
	}
	root := mountOverlay(t, t.TempDir(), "", mp)
	buf := make([]byte, 64)
	for _, p := range []string{filepath.Join(mp, "etc/hosts"), filepath.Join(mp, "etc"), filepath.Join(root, "etc/hosts")} {
		for range 2 {
			_, err := unix.Getxattr(p, "user.x", buf)
			// The mount itself stopped being asked; overlayfs may say
			// either.
			if !errors.Is(err, unix.EOPNOTSUPP) && (!errors.Is(err, unix.ENODATA) || !strings.HasPrefix(p, root)) {
				t.Errorf("getxattr %s: %v, want no attribute", p, err)
			}
		}
		if n, err := unix.Listxattr(p, buf); err != nil || n != 0 {
			t.Errorf("listxattr %s: %d, %v; want an empty list", p, n, err)
		}
	}
	mustRead(t, filepath.Join(root, "etc/hosts"), []byte("127.0.0.1 localhost\n"))
	if _, err := unix.Getxattr(filepath.Join(rich, "etc"), "user.missing", buf); !errors.Is(err, unix.ENODATA) {
		t.Errorf("getxattr of a missing xattr in a layer with xattrs: %v, want ENODATA", err)
	}
	if n, err := unix.Getxattr(filepath.Join(rich, "etc"), "user.comment", buf); err != nil || string(buf[:n]) != "dir xattr" {
		t.Errorf("getxattr user.comment: %q, %v", buf[:max(n, 0)], err)
	}
}
