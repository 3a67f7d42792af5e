package fs

import (
	"strings"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/snapshot"
)

// TestImageLayersShareTheirTOCRoundTrip mounts the layers of an image the
// way containerd prepares them, one after the other, with the labels CRI
// sends: the first mount reads every layer's tail, and each later mount
// uses what was read for it instead of asking the registry again.
func TestImageLayersShareTheirTOCRoundTrip(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	var blobs []*testlayer.Blob
	var digests []string
	for i, name := range []string{"a", "b", "c"} {
		b := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
			testlayer.File(name, []byte(strings.Repeat(name, 1000+i)), 0o644),
		}), layer.FormatEStargz, testlayer.BuildOptions{})
		e.reg.Push(t, b)
		blobs = append(blobs, b)
		digests = append(digests, b.Digest.String())
	}
	for i, b := range blobs {
		labels := e.reg.Labels(b)
		labels[snapshot.LabelImageLayers] = strings.Join(digests[i:], ",")
		mp := e.mountpoint(digests[i][7:19])
		if err := e.fs.Mount(e.ctx, digests[i][7:19], mp, labels); err != nil {
			t.Fatalf("mount layer %d: %v", i, err)
		}
		mustRead(t, mp+"/"+[]string{"a", "b", "c"}[i], []byte(strings.Repeat([]string{"a", "b", "c"}[i], 1000+i)))
		if i == 0 {
			// The layers above are read ahead before containerd asks.
			if !testlayer.Eventually(e.ctx, 10*time.Second, func() bool {
				return e.reg.Counts(blobs[1].Digest).Ranges == 1 && e.reg.Counts(blobs[2].Digest).Ranges == 1
			}) {
				t.Fatalf("tails not read ahead: %+v, %+v", e.reg.Counts(blobs[1].Digest), e.reg.Counts(blobs[2].Digest))
			}
		}
	}
	for i, b := range blobs {
		// One suffix range request per blob (the files are read from the
		// store's first fetch, also one request): no HEAD, no second read.
		if c := e.reg.Counts(b.Digest); c.Requests != 2 || c.Ranges != 2 {
			t.Errorf("layer %d: %+v, want 2 range requests (tail, file)", i, c)
		}
	}
}
