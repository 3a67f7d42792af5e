package testimages

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func TestImagesBuildAndCache(t *testing.T) {
	if testing.Short() {
		t.Skip("builds images: not with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("requires root: debootstrap and chroot")
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout+time.Minute)
	defer cancel()
	for _, tc := range []struct {
		im       *Image
		layers   int
		mustHave string // a path in the top layer
	}{
		{Busybox, 1, "bin/sh"},
		{Python, 2, "usr/bin/python3"},
	} {
		t.Run(tc.im.Name, func(t *testing.T) {
			l, err := tc.im.Load(ctx, CacheDir(), t.Logf)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("image %s: built=%v in %s, cache %s", tc.im.Name, l.Built, l.BuildTime, l.Dir)
			layers, err := l.Image.Layers()
			if err != nil {
				t.Fatal(err)
			}
			if len(layers) != tc.layers {
				t.Fatalf("%d layers, want %d", len(layers), tc.layers)
			}
			mt, _ := l.Image.MediaType()
			if !strings.Contains(string(mt), "oci") {
				t.Errorf("manifest media type %s, want OCI", mt)
			}
			cf, err := l.Image.ConfigFile()
			if err != nil {
				t.Fatal(err)
			}
			if cf.OS != "linux" || cf.Architecture != "amd64" || len(cf.Config.Cmd) == 0 {
				t.Errorf("config: os %q arch %q cmd %q", cf.OS, cf.Architecture, cf.Config.Cmd)
			}
			rc, err := layers[len(layers)-1].Compressed()
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			zr, err := gzip.NewReader(rc)
			if err != nil {
				t.Fatalf("top layer is not gzip: %v", err)
			}
			tr := tar.NewReader(zr)
			found := false
			for {
				h, err := tr.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if strings.TrimPrefix(h.Name, "./") == tc.mustHave {
					found = true
				}
			}
			if !found {
				t.Errorf("top layer lacks %s", tc.mustHave)
			}
			// A second Load is a cache hit.
			again, err := tc.im.Load(ctx, CacheDir(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if again.Built {
				t.Error("second Load rebuilt the image")
			}
		})
	}
}
