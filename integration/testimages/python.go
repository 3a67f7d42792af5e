package testimages

import (
	"compress/gzip"
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/pkg/archive"
)

// debianMirror is the only network source of the image builds.
const debianMirror = "http://deb.debian.org/debian"

// Python is a realistic two-layer image: Debian bookworm minbase from
// debootstrap, then python3 installed with apt-get on top. Its second layer
// is a real diff of the two trees; it deletes /var/log/bootstrap.log of
// the base, so it carries an OCI whiteout (.wh.bootstrap.log) as well.
var Python = &Image{
	Name:    "python",
	Version: "bookworm-v2",
	Env: []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8",
	},
	Cmd:   []string{"python3"},
	build: buildPython,
}

// chrootEnv is the environment of commands run inside the image's tree.
var chrootEnv = []string{
	"DEBIAN_FRONTEND=noninteractive",
	"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	"LANG=C",
}

func buildPython(ctx context.Context, work string, logf Logf) ([]string, error) {
	base := filepath.Join(work, "base")
	upper := filepath.Join(work, "upper")
	empty := filepath.Join(work, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		return nil, err
	}

	// Every mount debootstrap and apt-get need (/proc, /sys, resolv.conf)
	// is made in a private mount namespace that dies with the command, so
	// no failure can leave a mount behind on the host.
	logf("debootstrap --variant=minbase bookworm (about 30 s)")
	if err := run(ctx, nil, "unshare", "--mount", "--propagation", "private",
		"debootstrap", "--variant=minbase", "bookworm", base, debianMirror); err != nil {
		return nil, fmt.Errorf("debootstrap: %w", err)
	}
	// The host's DNS settings and name do not belong in the image.
	for name, data := range map[string]string{"etc/resolv.conf": "", "etc/hostname": "localhost\n"} {
		if err := os.WriteFile(filepath.Join(base, name), []byte(data), 0o644); err != nil {
			return nil, err
		}
	}
	if err := run(ctx, nil, "sh", "-euc",
		`rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb`,
		"sh", base); err != nil {
		return nil, fmt.Errorf("tidy base: %w", err)
	}

	logf("installing python3 on a copy of the base tree")
	if err := run(ctx, nil, "cp", "-a", base, upper); err != nil {
		return nil, err
	}
	install := `apt-get update -q && apt-get install -y -q --no-install-recommends python3 && ` +
		`apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/bootstrap.log`
	if err := run(ctx, chrootEnv, "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
		"--mount-proc="+filepath.Join(upper, "proc"),
		"sh", "-euc", `mount --bind /etc/resolv.conf "$1/etc/resolv.conf"; exec chroot "$1" /bin/sh -euc "$2"`,
		"sh", upper, install); err != nil {
		return nil, fmt.Errorf("install python3: %w", err)
	}
	if _, err := os.Stat(filepath.Join(upper, "usr/bin/python3")); err != nil {
		return nil, fmt.Errorf("python3 missing after install: %w", err)
	}

	logf("writing layers (tar+gzip)")
	l1 := filepath.Join(work, "base.tar.gz")
	if err := writeDiffLayer(ctx, l1, empty, base); err != nil {
		return nil, fmt.Errorf("base layer: %w", err)
	}
	l2 := filepath.Join(work, "python3.tar.gz")
	if err := writeDiffLayer(ctx, l2, base, upper); err != nil {
		return nil, fmt.Errorf("python3 layer: %w", err)
	}
	return []string{l1, l2}, nil
}

// writeDiffLayer writes the changes from tree lower to tree upper as a
// gzip-compressed OCI layer at path.
func writeDiffLayer(ctx context.Context, path, lower, upper string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := gzip.NewWriter(f)
	if err := archive.WriteDiff(ctx, zw, lower, upper); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Close()
}
