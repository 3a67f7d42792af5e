package testimages

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// busyboxBinary is the static busybox of Debian's busybox-static package.
const busyboxBinary = "/bin/busybox"

// Busybox is a one-layer image: a static busybox, a symlink per applet in
// /bin and a minimal /etc. Small and quick: the smoke-test image.
var Busybox = &Image{
	Name:    "busybox",
	Version: "v1",
	Env:     []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
	Cmd:     []string{"sh"},
	build:   buildBusybox,
}

// Pause is busybox whose command sleeps for good: the sandbox ("pause")
// image of the CRI tests, which keeps a pod's namespaces.
var Pause = &Image{
	Name:    "pause",
	Version: "v1",
	Env:     []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
	Cmd:     []string{"sleep", "2147483647"},
	build:   buildBusybox,
}

func buildBusybox(ctx context.Context, work string, logf Logf) ([]string, error) {
	list, err := exec.CommandContext(ctx, busyboxBinary, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list (is busybox-static installed?): %w", busyboxBinary, err)
	}
	bin, err := os.ReadFile(busyboxBinary)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(work, "busybox.tar.gz")
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zw := gzip.NewWriter(f)
	tw := tar.NewWriter(zw)

	dirs := map[string]int64{"bin/": 0o755, "dev/": 0o755, "etc/": 0o755, "proc/": 0o755,
		"root/": 0o700, "sys/": 0o755, "tmp/": 0o1777, "usr/": 0o755, "var/": 0o755}
	for _, d := range []string{"bin/", "dev/", "etc/", "proc/", "root/", "sys/", "tmp/", "usr/", "var/"} {
		if err := tw.WriteHeader(header(d, tar.TypeDir, dirs[d], 0)); err != nil {
			return nil, err
		}
	}
	files := []struct {
		name string
		mode int64
		data []byte
	}{
		{"bin/busybox", 0o755, bin},
		{"etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{"etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n")},
	}
	for _, fl := range files {
		if err := tw.WriteHeader(header(fl.name, tar.TypeReg, fl.mode, int64(len(fl.data)))); err != nil {
			return nil, err
		}
		if _, err := io.Copy(tw, bytes.NewReader(fl.data)); err != nil {
			return nil, err
		}
	}
	n := 0
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		h := header("bin/"+applet, tar.TypeSymlink, 0o777, 0)
		h.Linkname = "busybox"
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		n++
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	logf("busybox layer: %d applets", n)
	return []string{path}, nil
}

// header is a root-owned tar header with the images' fixed time stamp.
func header(name string, typ byte, mode, size int64) *tar.Header {
	return &tar.Header{
		Name: name, Typeflag: typ, Mode: mode, Size: size,
		Uname: "root", Gname: "root", ModTime: created, Format: tar.FormatPAX,
	}
}
