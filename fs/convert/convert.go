// Package convert rewrites an image's layers into a lazy format (eStargz or
// zstd:chunked) and pushes the result.
//
// The image is fetched into a private content store, converted with
// containerd's image converter (which rewrites manifests, indexes and config
// diffIDs) using the estargz module for each layer, and pushed. Layers that
// are already in the target format are kept as they are. Conversion is
// deterministic: the same input layer always becomes the same blob, so the
// same content is the same blob across conversions.
package convert

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Format is a lazy layer format.
type Format string

const (
	EStargz     Format = "estargz"
	ZstdChunked Format = "zstdchunked"
)

// ParseFormat accepts the names the CLI takes.
func ParseFormat(s string) (Format, error) {
	switch Format(s) {
	case EStargz, ZstdChunked:
		return Format(s), nil
	case "zstd:chunked":
		return ZstdChunked, nil
	}
	return "", fmt.Errorf("unknown format %q (want estargz or zstdchunked)", s)
}

// buildParallelism fixes how the estargz builder splits a layer. The split
// decides the compressed stream boundaries, so it must not depend on the
// machine's CPU count: that is what makes conversion reproducible.
const buildParallelism = 4

// labelUncompressed is containerd's content label holding a blob's diffID;
// its image converter reads it to rewrite the config's rootfs.
const labelUncompressed = "containerd.io/uncompressed"

// Options configures Convert.
type Options struct {
	Format Format
	// Prefetch lists paths to place first in each layer, marked with the
	// prefetch landmark; empty marks layers with the no-prefetch landmark.
	Prefetch []string
	// Platforms selects the platforms to convert; nil means this host's.
	Platforms platforms.MatchComparer
	// AllPlatforms keeps every platform of an index.
	AllPlatforms bool
	Resolver     remotes.Resolver
	// Progress, if set, receives events from concurrent layer conversions.
	Progress func(LayerEvent)
	// TempDir holds the private content store; "" means os.TempDir().
	TempDir string
}

// LayerEvent reports one layer's progress or result.
type LayerEvent struct {
	Source ocispec.Descriptor
	// Result is set when the layer is done; nil while in progress.
	Result *LayerResult
	// BytesRead of the source while converting.
	BytesRead int64
}

// LayerResult is what became of a layer.
type LayerResult struct {
	Source    ocispec.Descriptor `json:"source"`
	Converted ocispec.Descriptor `json:"converted"`
	// Kept is true when the layer already was in the target format.
	Kept     bool          `json:"kept"`
	Duration time.Duration `json:"duration"`
}

// Result describes a converted image.
type Result struct {
	Source ocispec.Descriptor `json:"source"`
	Target ocispec.Descriptor `json:"target"`
	Layers []LayerResult      `json:"layers"`
}

// Convert converts the image src and pushes it as dst.
func Convert(ctx context.Context, src, dst string, opts Options) (*Result, error) {
	if _, err := ParseFormat(string(opts.Format)); err != nil {
		return nil, err
	}
	platMC := opts.Platforms
	if opts.AllPlatforms {
		platMC = platforms.All
	} else if platMC == nil {
		platMC = platforms.Default()
	}
	dir, err := os.MkdirTemp(opts.TempDir, "lazycas-convert-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	cs, err := local.NewLabeledStore(dir, newMemoryLabels())
	if err != nil {
		return nil, fmt.Errorf("content store: %w", err)
	}

	name, root, err := opts.Resolver.Resolve(ctx, src)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", src, err)
	}
	fetcher, err := opts.Resolver.Fetcher(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", src, err)
	}
	children := images.FilterPlatforms(images.ChildrenHandler(cs), platMC)
	if !opts.AllPlatforms {
		children = images.LimitManifests(children, platMC, 1)
	}
	if err := images.Dispatch(ctx, images.Handlers(remotes.FetchHandler(cs, fetcher), children), nil, root); err != nil {
		return nil, fmt.Errorf("fetch %s: %w", src, err)
	}

	lc := &layerConverter{opts: opts}
	newRoot, err := converter.DefaultIndexConvertFunc(lc.convert, true, platMC)(ctx, cs, root)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", src, err)
	}
	if newRoot == nil {
		newRoot = &root
	}

	pusher, err := opts.Resolver.Pusher(ctx, dst)
	if err != nil {
		return nil, fmt.Errorf("push %s: %w", dst, err)
	}
	if err := remotes.PushContent(ctx, pusher, *newRoot, cs, nil, platMC, nil); err != nil {
		return nil, fmt.Errorf("push %s: %w", dst, err)
	}
	layers := lc.results()
	// Layers finish in any order; report them in the manifest's.
	if m, err := images.Manifest(ctx, cs, root, platMC); err == nil {
		pos := map[digest.Digest]int{}
		for i, l := range m.Layers {
			pos[l.Digest] = i
		}
		sort.SliceStable(layers, func(i, j int) bool { return pos[layers[i].Source.Digest] < pos[layers[j].Source.Digest] })
	}
	return &Result{Source: root, Target: *newRoot, Layers: layers}, nil
}

type layerConverter struct {
	opts Options
	mu   sync.Mutex
	done []LayerResult
}

func (c *layerConverter) results() []LayerResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]LayerResult(nil), c.done...)
}

func (c *layerConverter) report(ev LayerEvent) {
	if ev.Result != nil {
		c.mu.Lock()
		c.done = append(c.done, *ev.Result)
		c.mu.Unlock()
	}
	if c.opts.Progress != nil {
		c.opts.Progress(ev)
	}
}

// convert is a containerd converter.ConvertFunc for one layer: nil means keep.
func (c *layerConverter) convert(ctx context.Context, cs content.Store, desc ocispec.Descriptor) (*ocispec.Descriptor, error) {
	if !images.IsLayerType(desc.MediaType) {
		return nil, nil
	}
	start := time.Now()
	compression, err := layerCompression(desc.MediaType)
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	if isFormat(desc, compression, c.opts.Format) {
		c.report(LayerEvent{Source: desc, Result: &LayerResult{Source: desc, Converted: desc, Kept: true, Duration: time.Since(start)}})
		return nil, nil
	}

	ra, err := cs.ReaderAt(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	defer ra.Close()
	counted := &countingReaderAt{r: ra, onRead: func(n int64) {
		c.report(LayerEvent{Source: desc, BytesRead: n})
	}}

	buildOpts := []estargz.Option{
		estargz.WithContext(ctx),
		estargz.WithParallelism(buildParallelism),
		// The module's default is gzip's best compression: twice the time
		// for 0.2% smaller layers of the test image.
		estargz.WithCompressionLevel(gzip.DefaultCompression),
	}
	if len(c.opts.Prefetch) > 0 {
		// A path lives in one layer of many: missing ones are expected.
		var missed []string
		buildOpts = append(buildOpts, estargz.WithPrioritizedFiles(c.opts.Prefetch), estargz.WithAllowPrioritizeNotFound(&missed))
	}
	mediaType := ocispec.MediaTypeImageLayerGzip
	var zc *zstdchunked.Compressor
	if c.opts.Format == ZstdChunked {
		mediaType = ocispec.MediaTypeImageLayerZstd
		zc = &zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault, Metadata: map[string]string{}}
		buildOpts = append(buildOpts, estargz.WithCompression(struct {
			*zstdchunked.Compressor
			*zstdchunked.Decompressor
		}{zc, &zstdchunked.Decompressor{}}))
	}
	blob, err := estargz.Build(io.NewSectionReader(counted, 0, desc.Size), buildOpts...)
	if err != nil {
		return nil, fmt.Errorf("layer %s: build %s: %w", desc.Digest, c.opts.Format, err)
	}
	defer blob.Close()

	w, err := content.OpenWriter(ctx, cs, content.WithRef(fmt.Sprintf("convert-%s-%s", c.opts.Format, desc.Digest)))
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	defer w.Close()
	n, err := io.Copy(w, blob)
	if err != nil {
		return nil, fmt.Errorf("layer %s: write %s: %w", desc.Digest, c.opts.Format, err)
	}
	if err := blob.Close(); err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	size, err := blob.UncompressedSize()
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	labels := map[string]string{labelUncompressed: blob.DiffID().String()}
	if err := w.Commit(ctx, n, "", content.WithLabels(labels)); err != nil && !errdefs.IsAlreadyExists(err) {
		return nil, fmt.Errorf("layer %s: commit: %w", desc.Digest, err)
	}

	annotations := map[string]string{}
	for k, v := range desc.Annotations {
		annotations[k] = v
	}
	annotations[estargz.TOCJSONDigestAnnotation] = blob.TOCDigest().String()
	annotations[estargz.StoreUncompressedSizeAnnotation] = strconv.FormatInt(size, 10)
	if zc != nil {
		for k, v := range zc.Metadata {
			annotations[k] = v
		}
	}
	out := ocispec.Descriptor{MediaType: mediaType, Digest: w.Digest(), Size: n, Annotations: annotations}
	c.report(LayerEvent{Source: desc, Result: &LayerResult{Source: desc, Converted: out, Duration: time.Since(start)}})
	return &out, nil
}

// layerCompression names a layer media type's compression, or fails for
// layers the estargz builder cannot read (foreign, encrypted, unknown).
func layerCompression(mediaType string) (string, error) {
	switch mediaType {
	case ocispec.MediaTypeImageLayerGzip, images.MediaTypeDockerSchema2LayerGzip:
		return "gzip", nil
	case ocispec.MediaTypeImageLayerZstd, images.MediaTypeDockerSchema2LayerZstd:
		return "zstd", nil
	case ocispec.MediaTypeImageLayer, images.MediaTypeDockerSchema2Layer:
		return "", nil
	}
	return "", fmt.Errorf("unsupported layer media type %q", mediaType)
}

// isFormat reports whether a layer already is in format f: the right
// compression and a TOC digest annotation to verify its TOC against.
func isFormat(desc ocispec.Descriptor, compression string, f Format) bool {
	if desc.Annotations[estargz.TOCJSONDigestAnnotation] == "" {
		return false
	}
	if f == ZstdChunked {
		return compression == "zstd" && desc.Annotations[zstdchunked.ManifestChecksumAnnotation] != ""
	}
	return compression == "gzip"
}

// countingReaderAt reports the highest offset read, as progress.
type countingReaderAt struct {
	r      io.ReaderAt
	mu     sync.Mutex
	high   int64
	last   time.Time
	onRead func(int64)
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.mu.Lock()
	if end := off + int64(n); end > c.high {
		c.high = end
	}
	high, report := c.high, time.Since(c.last) > 200*time.Millisecond || errors.Is(err, io.EOF)
	if report {
		c.last = time.Now()
	}
	c.mu.Unlock()
	if report {
		c.onRead(high)
	}
	return n, err
}
