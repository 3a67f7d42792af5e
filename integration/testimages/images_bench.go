package testimages

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The benchmark's images besides Python (script/bench, issue 12): programs
// that start from other kinds of files than a python interpreter's.

// Debian is Debian bookworm minbase from debootstrap, one layer: a shell
// and coreutils working over the image's own files.
var Debian = &Image{
	Name:    "debian",
	Version: "bookworm-v1",
	Env:     []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"},
	Cmd:     []string{"sh"},
	build:   debianWith(nil, "usr/bin/md5sum"),
}

// GCC is Debian bookworm minbase, then gcc and libc6-dev installed with
// apt-get on top (two layers, like Python): a compiler whose start loads
// many shared libraries and helper programs (cc1, as, collect2, ld).
var GCC = &Image{
	Name:    "gcc",
	Version: "bookworm-v1",
	Env:     []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"},
	Cmd:     []string{"gcc", "--version"},
	build:   debianWith([]string{"gcc", "libc6-dev"}, "usr/bin/gcc"),
}

// debianWith builds a Debian bookworm minbase layer and, when pkgs is not
// empty, a second layer with pkgs installed by apt-get (the diff of the
// two trees). mustHave, relative to the root, must exist in the result.
func debianWith(pkgs []string, mustHave string) func(context.Context, string, Logf) ([]string, error) {
	return func(ctx context.Context, work string, logf Logf) ([]string, error) {
		base := filepath.Join(work, "base")
		empty := filepath.Join(work, "empty")
		if err := os.Mkdir(empty, 0o755); err != nil {
			return nil, err
		}
		if err := debootstrapBase(ctx, base, logf); err != nil {
			return nil, err
		}
		l1 := filepath.Join(work, "base.tar.gz")
		if len(pkgs) == 0 {
			if _, err := os.Stat(filepath.Join(base, mustHave)); err != nil {
				return nil, fmt.Errorf("%s missing from the base: %w", mustHave, err)
			}
			logf("writing the layer (tar+gzip)")
			if err := writeDiffLayer(ctx, l1, empty, base); err != nil {
				return nil, fmt.Errorf("base layer: %w", err)
			}
			return []string{l1}, nil
		}
		upper := filepath.Join(work, "upper")
		logf("installing %s on a copy of the base tree", strings.Join(pkgs, " "))
		if err := run(ctx, nil, "cp", "-a", base, upper); err != nil {
			return nil, err
		}
		install := `apt-get update -q && apt-get install -y -q --no-install-recommends ` + strings.Join(pkgs, " ") +
			` && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/bootstrap.log`
		if err := inChroot(ctx, upper, install); err != nil {
			return nil, fmt.Errorf("install %s: %w", strings.Join(pkgs, " "), err)
		}
		if _, err := os.Stat(filepath.Join(upper, mustHave)); err != nil {
			return nil, fmt.Errorf("%s missing after install: %w", mustHave, err)
		}
		logf("writing layers (tar+gzip)")
		if err := writeDiffLayer(ctx, l1, empty, base); err != nil {
			return nil, fmt.Errorf("base layer: %w", err)
		}
		l2 := filepath.Join(work, "packages.tar.gz")
		if err := writeDiffLayer(ctx, l2, base, upper); err != nil {
			return nil, fmt.Errorf("packages layer: %w", err)
		}
		return []string{l1, l2}, nil
	}
}

// debootstrapBase makes a bookworm minbase tree at dir, without the
// host's DNS settings and name and without apt's lists and caches.
func debootstrapBase(ctx context.Context, dir string, logf Logf) error {
	// Every mount debootstrap needs is made in a private mount namespace
	// that dies with it: no failure leaves a mount on the host.
	logf("debootstrap --variant=minbase bookworm (about 30 s)")
	if err := run(ctx, nil, "unshare", "--mount", "--propagation", "private",
		"debootstrap", "--variant=minbase", "bookworm", dir, debianMirror); err != nil {
		return fmt.Errorf("debootstrap: %w", err)
	}
	for name, data := range map[string]string{"etc/resolv.conf": "", "etc/hostname": "localhost\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	if err := run(ctx, nil, "sh", "-euc",
		`rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb`,
		"sh", dir); err != nil {
		return fmt.Errorf("tidy base: %w", err)
	}
	return nil
}

// inChroot runs script with /bin/sh in the tree root, with a private /proc
// and the host's resolv.conf bound in, in mount and PID namespaces that die
// with it.
func inChroot(ctx context.Context, root, script string) error {
	return run(ctx, chrootEnv, "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
		"--mount-proc="+filepath.Join(root, "proc"),
		"sh", "-euc", `mount --bind /etc/resolv.conf "$1/etc/resolv.conf"; exec chroot "$1" /bin/sh -euc "$2"`,
		"sh", root, script)
}
