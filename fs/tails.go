package fs

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/snapshot"
)

// tailSize is how much of a layer's end a mount reads in its first
// request: the footer, and the whole TOC of a layer of up to about 10,000
// files. A bigger TOC costs one more request for the rest.
const tailSize = 512 << 10

// aheadTailSize is the first request of a tail read ahead: the TOC of a
// small layer, or the footer that tells where a bigger TOC starts, which a
// second request then completes; both before containerd asks for the
// layer. Smaller than tailSize because an image's layers are read ahead
// all at once, sharing the link, and most are small.
const aheadTailSize = 64 << 10

// aheadTreeMax is the largest tail (about the compressed TOC) whose tree
// is built ahead, in memory: some 100,000 entries.
const aheadTreeMax = 1 << 20

// Read-ahead tails of the layers an image will prepare next are kept this
// long and this many at most; a pull prepares them within seconds.
const (
	tailTTL  = 2 * time.Minute
	maxTails = 64
)

// tail is the end of a layer blob, being read or read. When the manifest
// pinned its TOC, the TOC is also checked and its tree built ahead, so the
// mount only records and serves it: an image's layers are decoded in
// parallel, not one Prepare after the other.
type tail struct {
	done    chan struct{}
	repo    string // ref without tag or digest: only a mount of this repository takes it
	started time.Time
	blob    *remote.Blob
	buf     []byte
	err     error

	pin  layer.Pin // zero when the manifest was not at hand
	toc  *layer.TOC
	tree *layer.Tree // nil when not built ahead (no pin, or a bad TOC: the mount says why)
}

// readTOC opens the layer blob and reads its verified TOC, from a tail
// read ahead for it if there is one. When the tail's tree was built ahead
// against the same pin, that tree is returned (ahead); otherwise the TOC
// is imported into sink as it is decoded, and tree is nil.
func (f *FileSystem) readTOC(ctx context.Context, ref string, desc ocispec.Descriptor, pin layer.Pin, sink layer.Sink) (_ *remote.Blob, _ *layer.TOC, tree *layer.Tree, sum layer.Summary, ahead bool, _ error) {
	t, err := f.openTail(ctx, ref, desc)
	if err != nil {
		return nil, nil, nil, sum, false, fmt.Errorf("resolve layer %s of %s: %w", desc.Digest, ref, err)
	}
	if t.tree != nil && t.pin == pin {
		return t.blob, t.toc, t.tree, layer.Summary{Prefetch: t.tree.Prefetch, Files: t.tree.Files, Nodes: len(t.tree.Nodes)}, true, nil
	}
	toc, sum, err := layer.Import(ctx, t.reader(), t.blob.Size(), pin, sink)
	if err != nil {
		return nil, nil, nil, sum, false, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	return t.blob, toc, nil, sum, false, nil
}

// reader reads the blob, from the tail in memory where it has the bytes.
func (t *tail) reader() tailReader {
	return tailReader{t.blob, t.buf, t.blob.Size() - int64(len(t.buf))}
}

// openTail returns the tail read ahead for desc, or reads it now.
func (f *FileSystem) openTail(ctx context.Context, ref string, desc ocispec.Descriptor) (*tail, error) {
	f.tailMu.Lock()
	t := f.tails[desc.Digest]
	if t != nil && t.repo == repoOf(ref) {
		delete(f.tails, desc.Digest)
	} else {
		t = nil
	}
	f.tailMu.Unlock()
	if t != nil {
		select {
		case <-t.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if t.err == nil && (desc.Size == 0 || desc.Size == t.blob.Size()) {
			return t, nil
		}
	}
	b, buf, err := f.fetcher.OpenTail(ctx, ref, desc, tailSize)
	if err != nil {
		return nil, err
	}
	return &tail{blob: b, buf: buf}, nil
}

// layersAbove lists the layers of the image above the one being mounted:
// from the image's manifest in containerd, whose annotations pin their
// TOCs, or else from CRI's and nerdctl's image-layers label (a layer and
// those above it; digests only).
func (f *FileSystem) layersAbove(ctx context.Context, labels map[string]string, layer, manifest digest.Digest) []ocispec.Descriptor {
	if f.opts.Images != nil && manifest.Validate() == nil {
		if layers, _, err := f.opts.Images.Image(ctx, manifest); err == nil {
			for i, l := range layers {
				if l.Digest == layer {
					return layers[i+1:]
				}
			}
		}
	}
	var above []ocispec.Descriptor
	if v := labels[snapshot.LabelImageLayers]; v != "" {
		for _, s := range strings.Split(v, ",")[1:] {
			if d, err := digest.Parse(strings.TrimSpace(s)); err == nil {
				above = append(above, ocispec.Descriptor{Digest: d})
			}
		}
	}
	return above
}

// readAheadTails starts reading the tails of the layers above the one
// being mounted, and decoding their TOCs where the manifest pins them:
// containerd prepares them one after the other, and each then finds its
// TOC fetched and its tree built, so an image's TOCs cost about one round
// trip and one layer's decoding instead of one of each per layer.
func (f *FileSystem) readAheadTails(ctx context.Context, ref string, above []ocispec.Descriptor) {
	if len(above) == 0 {
		return
	}
	f.mu.Lock()
	mounted := map[digest.Digest]bool{}
	for _, m := range f.layers {
		mounted[digest.Digest(m.meta.Info.Digest)] = true
	}
	f.mu.Unlock()

	f.tailMu.Lock()
	defer f.tailMu.Unlock()
	for d, t := range f.tails {
		if time.Since(t.started) > tailTTL {
			delete(f.tails, d)
		}
	}
	for _, desc := range above {
		d := desc.Digest
		if mounted[d] || f.tails[d] != nil || len(f.tails) >= maxTails {
			continue
		}
		t := &tail{done: make(chan struct{}), repo: repoOf(ref), started: time.Now()}
		pin, pinned := layer.PinFromAnnotations(desc.Annotations)
		f.tails[d] = t
		go func() {
			defer close(t.done)
			// Not the Prepare call's context: it ends before the next
			// layer's Prepare comes.
			tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			t.blob, t.buf, t.err = readWholeTOC(tctx, f.fetcher, ref, d)
			if t.err != nil {
				log.G(ctx).WithError(t.err).WithField("layer", d).Debug("read ahead a layer's tail")
				return
			}
			if !pinned || len(t.buf) > aheadTreeMax {
				// A large TOC is imported by its mount straight into
				// metadata rather than held here as a tree.
				return
			}
			toc, tree, err := layer.ReadTree(tctx, t.reader(), t.blob.Size(), pin)
			if err != nil {
				// The mount reads it again and fails with the reason.
				t.tree = nil
				log.G(ctx).WithError(err).WithField("layer", d).Debug("decode a layer's TOC ahead")
				return
			}
			t.toc, t.tree, t.pin = toc, tree, pin
		}()
	}
}

// readWholeTOC reads a layer's tail from where its footer says the TOC
// starts: aheadTailSize first, then what is missing.
func readWholeTOC(ctx context.Context, fetcher *remote.Fetcher, ref string, d digest.Digest) (*remote.Blob, []byte, error) {
	b, buf, err := fetcher.OpenTail(ctx, ref, ocispec.Descriptor{Digest: d}, aheadTailSize)
	if err != nil {
		return nil, nil, err
	}
	have := b.Size() - int64(len(buf))
	off, ok := layer.TOCOffset(buf, b.Size())
	if !ok || off >= have || have-off > tailSize<<4 {
		return b, buf, nil // not lazy, all there, or left to the mount
	}
	head := make([]byte, have-off, b.Size()-off)
	if err := b.ReadRanges(ctx, []remote.Range{{Off: off, Buf: head}}); err != nil {
		return nil, nil, err
	}
	return b, append(head, buf...), nil
}

// repoOf is ref without its tag or digest ("" if ref does not parse).
func repoOf(ref string) string {
	spec, err := reference.Parse(ref)
	if err != nil {
		return ""
	}
	return spec.Locator
}

// tailReader reads a blob, from its tail in memory where that holds the bytes.
type tailReader struct {
	blob *remote.Blob
	buf  []byte
	off  int64 // where buf starts in the blob
}

func (r tailReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.off && off+int64(len(p)) <= r.off+int64(len(r.buf)) {
		return copy(p, r.buf[off-r.off:]), nil
	}
	return r.blob.ReadAt(p, off)
}
