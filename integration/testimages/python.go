package testimages

import (
	"compress/gzip"
	"context"
	"os"

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
	build: debianWith([]string{"python3"}, "usr/bin/python3"),
}

// chrootEnv is the environment of commands run inside the image's tree.
var chrootEnv = []string{
	"DEBIAN_FRONTEND=noninteractive",
	"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	"LANG=C",
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
