package testimages

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func TestBenchImagesBuildAndCache(t *testing.T) {
	if testing.Short() {
		t.Skip("builds images: not with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("requires root: debootstrap and chroot")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*buildTimeout+time.Minute)
	defer cancel()
	for _, tc := range []struct {
		im       *Image
		layers   int
		mustHave string // in the top layer
	}{
		{Debian, 1, "usr/bin/md5sum"},
		{GCC, 2, "usr/bin/gcc"},
	} {
		t.Run(tc.im.Name, func(t *testing.T) {
			l, err := tc.im.Load(ctx, CacheDir(), t.Logf)
			if err != nil {
				t.Fatal(err)
			}
			layers, err := l.Image.Layers()
			if err != nil {
				t.Fatal(err)
			}
			if len(layers) != tc.layers {
				t.Fatalf("%d layers, want %d", len(layers), tc.layers)
			}
			if ok, err := layerHas(layers[len(layers)-1].Compressed, tc.mustHave); err != nil || !ok {
				t.Errorf("top layer has %s: %v (%v)", tc.mustHave, ok, err)
			}
		})
	}
}

// layerHas tells whether the gzip tar layer open returns holds path.
func layerHas(open func() (io.ReadCloser, error), path string) (bool, error) {
	rc, err := open()
	if err != nil {
		return false, err
	}
	defer rc.Close()
	zr, err := gzip.NewReader(rc)
	if err != nil {
		return false, err
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if strings.TrimPrefix(h.Name, "./") == path {
			return true, nil
		}
	}
}
