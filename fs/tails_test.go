package fs

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/snapshot"
)

// TestImageLayersShareTheirTOCRoundTrip mounts the layers of an image the
// way containerd prepares them, one after the other, with the labels CRI
// sends, and with none but the manifest found in containerd: the first
// mount reads every layer's tail, and each later mount uses what was read
// for it instead of asking the registry again.
func TestImageLayersShareTheirTOCRoundTrip(t *testing.T) {
	for _, withLabel := range []bool{true, false} {
		t.Run(fmt.Sprintf("image-layers label %v", withLabel), func(t *testing.T) {
			im := &images{manifest: digest.FromString("manifest")}
			e := newEnv(t, Options{Images: im}, remote.Options{})
			var blobs []*testlayer.Blob
			var digests []string
			for i, name := range []string{"a", "b", "c"} {
				b := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
					testlayer.File(name, []byte(strings.Repeat(name, 1000+i)), 0o644),
				}), layer.FormatEStargz, testlayer.BuildOptions{})
				e.reg.Push(t, b)
				blobs = append(blobs, b)
				digests = append(digests, b.Digest.String())
				im.layers = append(im.layers, ocispec.Descriptor{Digest: b.Digest, Size: int64(len(b.Data))})
			}
			for i, b := range blobs {
				labels := e.reg.Labels(b)
				if withLabel {
					labels[snapshot.LabelImageLayers] = strings.Join(digests[i:], ",")
				} else {
					labels[snapshot.LabelManifestDigest] = im.manifest.String()
				}
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
				// One suffix range request per blob (the files are read from
				// the store's first fetch, also one request): no HEAD, no
				// second read.
				if c := e.reg.Counts(b.Digest); c.Requests != 2 || c.Ranges != 2 {
					t.Errorf("layer %d: %+v, want 2 range requests (tail, file)", i, c)
				}
			}
		})
	}
}

// TestReadAheadCompletesALargeTOC reads ahead a layer whose TOC is larger
// than the first request of a tail read ahead: a second request completes
// it, and the layer's mount then asks the registry nothing.
func TestReadAheadCompletesALargeTOC(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	small := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("a", []byte("a"), 0o644)}),
		layer.FormatEStargz, testlayer.BuildOptions{})
	var many []testlayer.Entry
	for i := range 4000 {
		many = append(many, testlayer.File(fmt.Sprintf("file-%x-%d", digest.FromString(fmt.Sprint(i)).Encoded()[:24], i),
			[]byte(fmt.Sprint(i)), 0o644))
	}
	big := testlayer.Build(t, testlayer.Tar(t, many), layer.FormatEStargz, testlayer.BuildOptions{})
	toc, ok := layer.TOCOffset(big.Data, int64(len(big.Data)))
	if !ok || int64(len(big.Data))-toc <= aheadTailSize {
		t.Fatalf("the big layer's TOC (at %d of %d bytes) fits the first read ahead", toc, len(big.Data))
	}
	e.reg.Push(t, small)
	e.reg.Push(t, big)
	layers := small.Digest.String() + "," + big.Digest.String()
	labels := e.reg.Labels(small)
	labels[snapshot.LabelImageLayers] = layers
	if err := e.fs.Mount(e.ctx, "small", e.mountpoint("small"), labels); err != nil {
		t.Fatal(err)
	}
	if !testlayer.Eventually(e.ctx, 10*time.Second, func() bool { return e.reg.Counts(big.Digest).Ranges == 2 }) {
		t.Fatalf("big layer read ahead: %+v, want 2 range requests", e.reg.Counts(big.Digest))
	}
	labels = e.reg.Labels(big)
	labels[snapshot.LabelImageLayers] = big.Digest.String()
	mp := e.mountpoint("big")
	if err := e.fs.Mount(e.ctx, "big", mp, labels); err != nil {
		t.Fatal(err)
	}
	if c := e.reg.Counts(big.Digest); c.Requests != 2 {
		t.Errorf("mounting the big layer after its read ahead: %+v, want no more requests", c)
	}
	mustRead(t, filepath.Join(mp, many[1234].Hdr.Name), many[1234].Data)
}

// TestUpperLayersAreDecodedAhead: when the manifest in containerd pins the
// TOCs of the layers above the one being mounted, their TOCs are checked
// and their trees built before containerd prepares them; a mount uses a
// tree built ahead only for the pin its own labels give.
func TestUpperLayersAreDecodedAhead(t *testing.T) {
	for _, tc := range []struct {
		name         string
		manifestPin  func(right digest.Digest) digest.Digest
		labelPin     func(right digest.Digest) digest.Digest
		decodedAhead bool
		mounts       bool
	}{
		{"pinned by the manifest", func(d digest.Digest) digest.Digest { return d }, func(d digest.Digest) digest.Digest { return d }, true, true},
		{"the manifest's pin is wrong", func(digest.Digest) digest.Digest { return digest.FromString("other") }, func(d digest.Digest) digest.Digest { return d }, false, true},
		{"the labels pin another TOC", func(d digest.Digest) digest.Digest { return d }, func(digest.Digest) digest.Digest { return digest.FromString("other") }, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := &images{manifest: digest.FromString("manifest")}
			e := newEnv(t, Options{Images: im}, remote.Options{})
			var blobs []*testlayer.Blob
			for i, name := range []string{"a", "b"} {
				b := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
					testlayer.File(name, []byte(strings.Repeat(name, 1000+i)), 0o644),
				}), layer.FormatEStargz, testlayer.BuildOptions{})
				e.reg.Push(t, b)
				blobs = append(blobs, b)
				right := digest.Digest(e.reg.Labels(b)[layer.AnnotationTOCDigest])
				im.layers = append(im.layers, ocispec.Descriptor{Digest: b.Digest, Size: int64(len(b.Data)),
					Annotations: map[string]string{layer.AnnotationTOCDigest: tc.manifestPin(right).String()}})
			}
			labels := e.reg.Labels(blobs[0])
			labels[snapshot.LabelManifestDigest] = im.manifest.String()
			if err := e.fs.Mount(e.ctx, "a", e.mountpoint("a"), labels); err != nil {
				t.Fatal(err)
			}
			e.fs.tailMu.Lock()
			ahead := e.fs.tails[blobs[1].Digest]
			e.fs.tailMu.Unlock()
			if ahead == nil {
				t.Fatal("the layer above was not read ahead")
			}
			<-ahead.done
			if got := ahead.tree != nil; got != tc.decodedAhead {
				t.Fatalf("decoded ahead: %v, want %v", got, tc.decodedAhead)
			}
			labels = e.reg.Labels(blobs[1])
			labels[layer.AnnotationTOCDigest] = tc.labelPin(digest.Digest(labels[layer.AnnotationTOCDigest])).String()
			labels[snapshot.LabelManifestDigest] = im.manifest.String()
			mp := e.mountpoint("b")
			err := e.fs.Mount(e.ctx, "b", mp, labels)
			if (err == nil) != tc.mounts {
				t.Fatalf("mount: %v, want it to succeed: %v", err, tc.mounts)
			}
			if err == nil {
				mustRead(t, mp+"/b", []byte(strings.Repeat("b", 1001)))
			}
		})
	}
}
