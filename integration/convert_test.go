package integration

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
	"github.com/lazycas/lazycas/snapshot"
)

// convertFormat is a format `lazycas image convert` writes.
type convertFormat struct {
	name      string // the --format value
	mediaType string // of every converted layer
	// annotations every converted layer carries besides the TOC digest
	// and the uncompressed size.
	annotations []string
}

var convertFormats = []convertFormat{
	{name: "estargz", mediaType: ocispec.MediaTypeImageLayerGzip},
	{name: "zstdchunked", mediaType: ocispec.MediaTypeImageLayerZstd,
		annotations: []string{zstdchunked.ManifestChecksumAnnotation, zstdchunked.ManifestPositionAnnotation}},
}

// convertedPythonCheck prints what a converted image must hold: python
// runs, its libraries load, and the python3 layer's whiteout still hides
// the base layer's bootstrap log.
const convertedPythonCheck = `import hashlib, os, sys, zlib
print("python", sys.version.split()[0])
print("sha256", hashlib.sha256(b"lazycas").hexdigest())
print("crc32", zlib.crc32(b"lazycas"))
print("bootstrap.log visible:", os.path.exists("/var/log/bootstrap.log"))`

func wantConvertedPythonCheck() []string {
	sum := sha256.Sum256([]byte("lazycas"))
	return []string{
		"python 3.11.",
		"sha256 " + hex.EncodeToString(sum[:]),
		"crc32 " + strconv.FormatUint(uint64(crc32.ChecksumIEEE([]byte("lazycas"))), 10),
		"bootstrap.log visible: False",
	}
}

// TestConvertedPythonImage converts the python image with the lazycas CLI
// to each lazy format, once, and checks the result in the registry, on
// containerd's own overlayfs snapshotter, and pulled into lazycas by
// `lazycas image pull`. One environment serves every subtest.
func TestConvertedPythonImage(t *testing.T) {
	env := newEnvWith(t, testenv.Options{DaemonConfig: testenv.JSONLogConfig})
	ctx := testContext(t)
	pushed, err := env.PushImage(ctx, testimages.Python)
	if err != nil {
		t.Fatal(err)
	}
	src := fetchFromRegistry(ctx, t, pushed.Ref, false)
	prefetch := filepath.Join(t.TempDir(), "prefetch")
	list := "# what python3 reads first\n\n" + strings.Join(testenv.PythonStartupFiles, "\n") + "\n"
	if err := os.WriteFile(prefetch, []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}

	// Each format converts in the background while the one before it is
	// checked; a format whose turn comes without that converts first.
	var next <-chan conversion
	for i, f := range convertFormats {
		pending := next
		next = nil
		t.Run(f.name, func(st *testing.T) {
			if pending == nil {
				pending = startConversion(ctx, t, env, pushed.Ref, prefetch, f)
			}
			start := time.Now()
			c := <-pending
			if i+1 < len(convertFormats) {
				next = startConversion(ctx, t, env, pushed.Ref, prefetch, convertFormats[i+1])
			}
			if c.err != nil {
				st.Fatal(c.err)
			}
			st.Logf("lazycas image convert --format %s took %s (waited %s for it)", f.name,
				c.took.Round(time.Millisecond), elapsedSince(start))
			dst := convertedRef(env, f)
			img := fetchFromRegistry(ctx, st, dst, true)
			checkConvertReport(st, c.res, src, img)

			st.Run("registry holds verifiable lazy layers", func(t *testing.T) {
				checkLazyImage(t, f, img)
			})
			// lazycas before overlayfs: lazycas then starts from an empty
			// content store, as a node that never saw the image does.
			st.Run("lazycas image pull passes the remote-snapshot labels", func(t *testing.T) {
				checkPullIntoLazycas(ctx, t, env, dst, img)
			})
			st.Run("runs on containerd's overlayfs", func(t *testing.T) {
				checkRunOnOverlayfs(ctx, t, env, dst)
			})
		})
	}
}

// convertedRef is where format f of the python image is pushed.
func convertedRef(env *testenv.Env, f convertFormat) string {
	return fmt.Sprintf("%s/python:%s", env.RegistryHost, f.name)
}

// conversion is the outcome of a `lazycas image convert` run.
type conversion struct {
	res  *convert.Result
	err  error
	took time.Duration
}

// startConversion converts src to format f with the lazycas CLI in the
// background. The run is stopped and waited for when t ends, before t's
// environment closes.
func startConversion(ctx context.Context, t *testing.T, env *testenv.Env, src, prefetch string, f convertFormat) <-chan conversion {
	ctx, cancel := context.WithCancel(ctx)
	ch, done := make(chan conversion, 1), make(chan struct{})
	go func() {
		defer close(done)
		start := time.Now()
		res, err := env.ConvertWithCLI(ctx, cliBin, src, convertedRef(env, f), "--format", f.name, "--prefetch", prefetch)
		ch <- conversion{res: res, err: err, took: time.Since(start)}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return ch
}

// registryImage is an image as the registry serves it.
type registryImage struct {
	ref      string
	digest   v1.Hash
	manifest *v1.Manifest
	diffIDs  []v1.Hash
	// blobs are the layers' files, downloaded (and digest-checked) when
	// fetchFromRegistry was asked to.
	blobs []string
}

// fetchFromRegistry reads ref's manifest and config from the registry
// and, with blobs, downloads its layers into a temporary directory of t.
func fetchFromRegistry(ctx context.Context, t *testing.T, ref string, blobs bool) *registryImage {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r, remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("read %s from the registry: %v", ref, err)
	}
	ri := &registryImage{ref: ref}
	if ri.digest, err = img.Digest(); err != nil {
		t.Fatal(err)
	}
	if ri.manifest, err = img.Manifest(); err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatalf("config of %s: %v", ref, err)
	}
	ri.diffIDs = cf.RootFS.DiffIDs
	if len(ri.diffIDs) != len(ri.manifest.Layers) {
		t.Fatalf("%s: %d layers but %d diffIDs", ref, len(ri.manifest.Layers), len(ri.diffIDs))
	}
	if !blobs {
		return ri
	}
	dir := t.TempDir()
	for _, l := range ri.manifest.Layers {
		layer, err := img.LayerByDigest(l.Digest)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := layer.Compressed() // checks the digest at EOF
		if err != nil {
			t.Fatalf("fetch layer %s: %v", l.Digest, err)
		}
		p := filepath.Join(dir, l.Digest.Hex)
		err = saveBlob(p, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("fetch layer %s: %v", l.Digest, err)
		}
		ri.blobs = append(ri.blobs, p)
	}
	return ri
}

func saveBlob(p string, r io.Reader) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// checkConvertReport compares what `lazycas image convert --json` reported
// with what the registry holds.
func checkConvertReport(t *testing.T, res *convert.Result, src, dst *registryImage) {
	t.Helper()
	if res.Source.Digest.String() != src.digest.String() {
		t.Errorf("report: source %s, the registry's source manifest is %s", res.Source.Digest, src.digest)
	}
	if res.Target.Digest.String() != dst.digest.String() {
		t.Errorf("report: target %s, the registry serves %s as %s", res.Target.Digest, dst.digest, dst.ref)
	}
	if len(res.Layers) != len(src.manifest.Layers) {
		t.Fatalf("report: %d layers, the source has %d", len(res.Layers), len(src.manifest.Layers))
	}
	for i, l := range src.manifest.Layers {
		j := slices.IndexFunc(res.Layers, func(r convert.LayerResult) bool { return r.Source.Digest.String() == l.Digest.String() })
		if j < 0 {
			t.Errorf("report: no result for source layer %s", l.Digest)
			continue
		}
		r, want := res.Layers[j], dst.manifest.Layers[i]
		if r.Kept {
			t.Errorf("report: gzip layer %s was kept, not converted", l.Digest)
		}
		if r.Converted.Digest.String() != want.Digest.String() || r.Converted.Size != want.Size ||
			r.Converted.MediaType != string(want.MediaType) {
			t.Errorf("report: layer %d became %s (%d bytes, %s); the manifest has %s (%d bytes, %s)", i,
				r.Converted.Digest, r.Converted.Size, r.Converted.MediaType, want.Digest, want.Size, want.MediaType)
		}
	}
}

// checkLazyImage checks every layer of a converted image: annotations,
// diffIDs, TOC and file digests, and the prefetch landmark.
func checkLazyImage(t *testing.T, f convertFormat, img *registryImage) {
	start := time.Now()
	found := map[string]int{} // prefetch path -> layers holding it
	for i, l := range img.manifest.Layers {
		t.Run(fmt.Sprintf("layer %d", i), func(t *testing.T) {
			for _, p := range checkLazyLayer(t, f, l, img.diffIDs[i], img.blobs[i]) {
				found[p]++
			}
		})
	}
	for _, p := range testenv.PythonStartupFiles {
		if found[p] == 0 {
			t.Errorf("no layer holds prefetch path %s: the list does not fit the image", p)
		}
	}
	if n := found["etc/ld.so.cache"]; n != 2 {
		t.Errorf("etc/ld.so.cache is prioritised in %d layers, want both", n)
	}
	t.Logf("verified %d layers in %s", len(img.manifest.Layers), elapsedSince(start))
}

// checkLazyLayer checks one layer and returns the prefetch paths it holds.
func checkLazyLayer(t *testing.T, f convertFormat, desc v1.Descriptor, diffID v1.Hash, blob string) []string {
	if string(desc.MediaType) != f.mediaType {
		t.Errorf("media type %s, want %s", desc.MediaType, f.mediaType)
	}
	for _, k := range append([]string{estargz.TOCJSONDigestAnnotation, estargz.StoreUncompressedSizeAnnotation}, f.annotations...) {
		if desc.Annotations[k] == "" {
			t.Errorf("annotation %s missing (annotations: %v)", k, desc.Annotations)
		}
	}
	tocDigest, err := digest.Parse(desc.Annotations[estargz.TOCJSONDigestAnnotation])
	if err != nil {
		t.Fatalf("TOC digest annotation: %v", err)
	}
	size, err := strconv.ParseInt(desc.Annotations[estargz.StoreUncompressedSizeAnnotation], 10, 64)
	if err != nil {
		t.Fatalf("uncompressed size annotation: %v", err)
	}
	fh, err := os.Open(blob)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if f.name == "zstdchunked" {
		checkZstdManifestAnnotations(t, desc, fh)
	}

	// The blob as any tar consumer sees it: decompressed front to back.
	tr := readTar(t, f, fh)
	if tr.diffID != diffID.String() {
		t.Errorf("decompressed blob has sha256 %s, the config's diffID is %s", tr.diffID, diffID)
	}
	if tr.size != size {
		t.Errorf("decompressed blob has %d bytes, the annotation says %d", tr.size, size)
	}

	// The blob as a lazy reader sees it: the TOC, pinned by the annotation.
	r, err := estargz.Open(io.NewSectionReader(fh, 0, desc.Size), estargz.WithDecompressors(new(reusingZstdDecompressor)))
	if err != nil {
		t.Fatalf("open as %s: %v", f.name, err)
	}
	verifier, err := r.VerifyTOC(tocDigest)
	if err != nil {
		t.Fatalf("verify TOC against the annotation: %v", err)
	}
	tocFiles, chunks := checkTOCFiles(t, r, verifier, tr.files)
	var missing []string
	for name := range tr.files {
		if _, ok := tocFiles[name]; !ok && name != estargz.TOCTarName {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		t.Errorf("%d regular files of the tar stream are not in the TOC, e.g. %q", len(missing), missing[0])
	}
	t.Logf("%s: %d regular files (%d chunks) verified, %d bytes uncompressed, TOC %s",
		desc.Digest.String()[:19], len(tocFiles), chunks, tr.size, tocDigest.String()[:19])
	return checkPrefetchOrder(t, r, tr.order)
}

// checkZstdManifestAnnotations checks that the zstd:chunked annotations
// point at the blob's compressed TOC ("offset:compressed:raw:type").
func checkZstdManifestAnnotations(t *testing.T, desc v1.Descriptor, blob io.ReaderAt) {
	t.Helper()
	pos := strings.Split(desc.Annotations[zstdchunked.ManifestPositionAnnotation], ":")
	if len(pos) != 4 {
		t.Errorf("manifest position %q is not offset:size:raw-size:type", desc.Annotations[zstdchunked.ManifestPositionAnnotation])
		return
	}
	off, err1 := strconv.ParseInt(pos[0], 10, 64)
	n, err2 := strconv.ParseInt(pos[1], 10, 64)
	if err1 != nil || err2 != nil || off < 0 || n <= 0 || off+n > desc.Size {
		t.Errorf("manifest position %q is outside the %d-byte blob", desc.Annotations[zstdchunked.ManifestPositionAnnotation], desc.Size)
		return
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(blob, off, n)); err != nil {
		t.Fatal(err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != desc.Annotations[zstdchunked.ManifestChecksumAnnotation] {
		t.Errorf("the compressed TOC at %s has digest %s, the manifest checksum annotation says %s",
			desc.Annotations[zstdchunked.ManifestPositionAnnotation], got, desc.Annotations[zstdchunked.ManifestChecksumAnnotation])
	}
}

// tarStream is a layer read as a plain tar.
type tarStream struct {
	diffID string
	size   int64
	files  map[string]string // regular file -> sha256 digest of its content
	order  []string          // every entry's name, in stream order
}

func readTar(t *testing.T, f convertFormat, blob io.ReaderAt) tarStream {
	t.Helper()
	br := bufio.NewReaderSize(io.NewSectionReader(blob, 0, 1<<62), 1<<20)
	var dec io.Reader
	switch f.name {
	case "estargz":
		zr, err := gzip.NewReader(br) // eStargz is a multi-member gzip stream
		if err != nil {
			t.Fatalf("gzip: %v", err)
		}
		defer zr.Close()
		dec = zr
	default:
		zr, err := zstd.NewReader(br) // skips the TOC's skippable frame
		if err != nil {
			t.Fatalf("zstd: %v", err)
		}
		defer zr.Close()
		dec = zr
	}
	h := sha256.New()
	cr := &byteCounter{r: io.TeeReader(dec, h)}
	ts := tarStream{files: map[string]string{}}
	tr := tar.NewReader(cr)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read the decompressed layer as tar: %v", err)
		}
		name := tocEntryName(hdr.Name)
		ts.order = append(ts.order, name)
		if hdr.Typeflag == tar.TypeReg {
			fh := sha256.New()
			if _, err := io.Copy(fh, tr); err != nil {
				t.Fatalf("read %s from the tar stream: %v", name, err)
			}
			ts.files[name] = "sha256:" + hex.EncodeToString(fh.Sum(nil))
		}
	}
	// The diffID covers everything after the end-of-archive marker too.
	if _, err := io.Copy(io.Discard, cr); err != nil {
		t.Fatalf("decompress the layer: %v", err)
	}
	ts.diffID, ts.size = "sha256:"+hex.EncodeToString(h.Sum(nil)), cr.n
	return ts
}

type byteCounter struct {
	r io.Reader
	n int64
}

func (c *byteCounter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// tocEntryName is a tar name as the TOC spells it: relative, cleaned.
func tocEntryName(n string) string {
	return strings.TrimPrefix(path.Clean("/"+n), "/")
}

// checkTOCFiles reads every regular file of the TOC through the estargz
// reader and checks its content against the entry's digest, every chunk
// against its chunk digest, and the digest against the plain tar read. It
// returns the TOC's regular files and how many chunks it checked.
func checkTOCFiles(t *testing.T, r *estargz.Reader, verifier estargz.TOCEntryVerifier, tarFiles map[string]string) (map[string]bool, int) {
	t.Helper()
	root, ok := r.Lookup("")
	if !ok {
		t.Fatal("the TOC has no root")
	}
	files := map[string]bool{}
	var buf []byte
	bad, chunks := 0, 0
	fail := func(format string, args ...any) {
		if bad++; bad <= 10 {
			t.Errorf(format, args...)
		}
	}
	var walk func(dir *estargz.TOCEntry)
	walk = func(dir *estargz.TOCEntry) {
		dir.ForeachChild(func(_ string, e *estargz.TOCEntry) bool {
			switch {
			case e.Type == "dir":
				walk(e)
			case e.Type == "reg" && !files[e.Name]: // a hard link shows its target again
				files[e.Name] = true
				if e.Digest == "" {
					fail("%s: no digest in the TOC", e.Name)
					return true
				}
				if cap(buf) < int(e.Size) {
					buf = make([]byte, e.Size)
				}
				content := buf[:e.Size]
				if e.Size > 0 {
					sr, err := r.OpenFile(e.Name)
					if err != nil {
						fail("%s: open: %v", e.Name, err)
						return true
					}
					if _, err := sr.ReadAt(content, 0); err != nil && err != io.EOF {
						fail("%s: read: %v", e.Name, err)
						return true
					}
				}
				if got := digest.FromBytes(content).String(); got != e.Digest {
					fail("%s: content read through the TOC has digest %s, its entry says %s", e.Name, got, e.Digest)
				}
				if want, ok := tarFiles[e.Name]; !ok {
					fail("%s: in the TOC but not a regular file of the tar stream", e.Name)
				} else if want != e.Digest {
					fail("%s: the tar stream's content has digest %s, the TOC says %s", e.Name, want, e.Digest)
				}
				chunks += checkChunks(r, verifier, e, content, fail)
			}
			return true
		})
	}
	walk(root)
	if bad > 10 {
		t.Errorf("... and %d more file errors", bad-10)
	}
	return files, chunks
}

// checkChunks verifies each chunk of a file against its chunk digest and
// returns how many it checked.
func checkChunks(r *estargz.Reader, verifier estargz.TOCEntryVerifier, e *estargz.TOCEntry, content []byte, fail func(string, ...any)) (n int) {
	for off := int64(0); off < e.Size; n++ {
		ce, ok := r.ChunkEntryForOffset(e.Name, off)
		if !ok || ce.ChunkOffset != off || ce.ChunkSize <= 0 || ce.ChunkOffset+ce.ChunkSize > e.Size {
			fail("%s: the chunks do not tile the file at offset %d", e.Name, off)
			return n
		}
		v, err := verifier.Verifier(ce)
		if err != nil {
			fail("%s: chunk at %d: %v", e.Name, off, err)
			return n
		}
		_, _ = v.Write(content[off : off+ce.ChunkSize])
		if !v.Verified() {
			fail("%s: chunk at %d does not match its digest", e.Name, off)
		}
		off += ce.ChunkSize
	}
	return n
}

// reusingZstdDecompressor is estargz's zstd:chunked decompressor (footer
// and TOC parsing are upstream's) with one change for speed: payload
// readers reuse decoders. zstdchunked.Decompressor.Reader makes a new
// zstd.Decoder per call, which costs ~4 ms for a file of this image's
// layers (its history buffer is allocated and cleared each time): 20 s
// for reading every file of the python image, 0.3 s reusing decoders.
type reusingZstdDecompressor struct {
	zstdchunked.Decompressor
	pool sync.Pool
}

func (z *reusingZstdDecompressor) Reader(r io.Reader) (io.ReadCloser, error) {
	dec, _ := z.pool.Get().(*zstd.Decoder)
	if dec == nil {
		var err error
		if dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1)); err != nil {
			return nil, err
		}
	}
	if err := dec.Reset(r); err != nil {
		z.pool.Put(dec)
		return nil, err
	}
	return &pooledZstdReader{Decoder: dec, pool: &z.pool}, nil
}

type pooledZstdReader struct {
	*zstd.Decoder
	pool *sync.Pool
}

// Close returns the decoder to the pool, unbound from its input.
func (p *pooledZstdReader) Close() error {
	if p.Decoder != nil {
		_ = p.Decoder.Reset(nil)
		p.pool.Put(p.Decoder)
		p.Decoder = nil
	}
	return nil
}

// checkPrefetchOrder checks that the layer carries the prefetch landmark,
// and that each listed path it holds comes before the landmark both in the
// stream and in the blob (the TOC's offsets). It returns those paths.
func checkPrefetchOrder(t *testing.T, r *estargz.Reader, order []string) []string {
	t.Helper()
	if _, ok := r.Lookup(estargz.NoPrefetchLandmark); ok {
		t.Errorf("the layer has the no-prefetch landmark although a prefetch list was given")
	}
	landmark, ok := r.Lookup(estargz.PrefetchLandmark)
	if !ok {
		t.Fatalf("no prefetch landmark %s", estargz.PrefetchLandmark)
	}
	at := slices.Index(order, estargz.PrefetchLandmark)
	if at < 0 {
		t.Fatalf("the landmark is in the TOC but not in the tar stream")
	}
	var held []string
	for _, p := range testenv.PythonStartupFiles {
		i := slices.Index(order, p)
		if i < 0 {
			continue
		}
		held = append(held, p)
		if i > at {
			t.Errorf("%s is entry %d of the stream, after the landmark (entry %d)", p, i, at)
		}
		if e, ok := r.Lookup(p); !ok || e.Offset >= landmark.Offset {
			t.Errorf("%s is not stored before the landmark (offset %d, landmark at %d)", p, e.Offset, landmark.Offset)
		}
	}
	if len(held) == 0 {
		t.Errorf("the layer holds none of the prefetch paths")
	}
	if at == len(order)-1 {
		t.Errorf("nothing follows the landmark: everything was prioritised")
	}
	return held
}

// checkPullIntoLazycas pulls ref with `lazycas image pull`, checks its
// report, runs python from it on lazycas, and checks in the daemon's log
// that each layer's Prepare carried the labels a remote snapshotter needs.
func checkPullIntoLazycas(ctx context.Context, t *testing.T, env *testenv.Env, ref string, img *registryImage) {
	start := time.Now()
	res, err := env.PullWithCLI(ctx, cliBin, ref)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lazycas image pull took %s (it reports %.1fs)", elapsedSince(start), res.Seconds)
	t.Cleanup(func() { deleteConvertedImage(ctx, t, env, ref) })

	if res.Image != ref || res.Digest != img.digest.String() || res.Snapshotter != testenv.Snapshotter {
		t.Errorf("report: image %s (%s) on %s, want %s (%s) on %s", res.Image, res.Digest, res.Snapshotter,
			ref, img.digest, testenv.Snapshotter)
	}
	chainIDs := identity.ChainIDs(hashesToDigests(img.diffIDs))
	if len(res.Layers) != len(img.manifest.Layers) {
		t.Fatalf("report: %d layers, the image has %d", len(res.Layers), len(img.manifest.Layers))
	}
	for i, l := range res.Layers {
		want := img.manifest.Layers[i]
		if l.Digest != want.Digest.String() || l.MediaType != string(want.MediaType) || l.Size != want.Size {
			t.Errorf("report: layer %d is %s (%s, %d bytes), the manifest has %s (%s, %d bytes)", i,
				l.Digest, l.MediaType, l.Size, want.Digest, want.MediaType, want.Size)
		}
		if l.ChainID != chainIDs[i].String() {
			t.Errorf("report: layer %d has chain ID %s, want %s", i, l.ChainID, chainIDs[i])
		}
		switch l.Mode {
		case "lazy":
			if l.DiskUsage < 0 {
				t.Errorf("report: lazy layer %d uses %d bytes", i, l.DiskUsage)
			}
		case "unpacked":
			if l.DiskUsage <= 0 {
				t.Errorf("report: unpacked layer %d uses %d bytes of disk", i, l.DiskUsage)
			}
		default:
			t.Errorf("report: layer %d has mode %q, want lazy or unpacked", i, l.Mode)
		}
		t.Logf("layer %d: %s, %d bytes, %s, %d bytes on disk", i, l.Digest[:19], l.Size, l.Mode, l.DiskUsage)
	}

	image, err := env.Client.GetImage(env.Context(ctx), ref)
	if err != nil {
		t.Fatalf("the pulled image: %v", err)
	}
	runConvertedPythonCheck(ctx, t, env, testenv.Snapshotter, image)
	checkPrepareLabels(t, env, ref, img, chainIDs)
}

// checkPrepareLabels finds each layer's Prepare in the daemon's log by the
// chain ID it commits to, and checks its labels.
func checkPrepareLabels(t *testing.T, env *testenv.Env, ref string, img *registryImage, chainIDs []digest.Digest) {
	t.Helper()
	calls, err := env.SnapshotCalls()
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range img.manifest.Layers {
		var layers []string
		for _, above := range img.manifest.Layers[i:] {
			layers = append(layers, above.Digest.String())
		}
		want := map[string]string{
			snapshot.LabelSnapshotRef:    chainIDs[i].String(),
			snapshot.LabelImageRef:       ref,
			snapshot.LabelLayerDigest:    l.Digest.String(),
			snapshot.LabelManifestDigest: img.digest.String(),
			snapshot.LabelImageLayers:    strings.Join(layers, ","),
			snapshot.LabelTOCDigest:      l.Annotations[estargz.TOCJSONDigestAnnotation],
		}
		n := 0
		for _, c := range calls {
			if c.Kind != "prepare" || c.Labels[snapshot.LabelSnapshotRef] != chainIDs[i].String() {
				continue
			}
			n++
			for k, v := range want {
				if c.Labels[k] != v {
					t.Errorf("layer %d: Prepare %q has label %s = %q, want %q", i, c.Key, k, c.Labels[k], v)
				}
			}
		}
		if n == 0 {
			t.Errorf("layer %d: the lazycas log shows no Prepare with %s = %s", i, snapshot.LabelSnapshotRef, chainIDs[i])
		}
	}
}

// checkRunOnOverlayfs pulls ref into containerd's own overlayfs
// snapshotter and runs python from it: a converted image stays an ordinary
// image for every other snapshotter.
func checkRunOnOverlayfs(ctx context.Context, t *testing.T, env *testenv.Env, ref string) {
	start := time.Now()
	img, err := env.PullOn(ctx, "overlayfs", ref)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteConvertedImage(ctx, t, env, ref) })
	t.Logf("pulled into overlayfs in %s", elapsedSince(start))
	runConvertedPythonCheck(ctx, t, env, "overlayfs", img)
}

// runConvertedPythonCheck runs convertedPythonCheck in a container of img
// on snapshotter sn.
func runConvertedPythonCheck(ctx context.Context, t *testing.T, env *testenv.Env, sn string, img client.Image) {
	t.Helper()
	start := time.Now()
	res, err := env.RunOn(ctx, sn, img, testenv.UniqueID("py-"+sn), "python3", "-c", convertedPythonCheck)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("python3 on %s exited %d\nstdout: %s\nstderr: %s", sn, res.ExitCode, res.Stdout, res.Stderr)
	}
	for _, want := range wantConvertedPythonCheck() {
		if !strings.Contains(res.Stdout, want) {
			t.Errorf("python3 on %s printed %q, which lacks %q", sn, res.Stdout, want)
		}
	}
	t.Logf("python3 ran on %s in %s", sn, elapsedSince(start))
}

// deleteConvertedImage deletes ref and waits for containerd's garbage collection,
// also when ctx has ended, for at most a minute.
func deleteConvertedImage(ctx context.Context, t *testing.T, env *testenv.Env, ref string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := env.DeleteImage(ctx, ref); err != nil {
		t.Error(err)
	}
}

func hashesToDigests(hs []v1.Hash) []digest.Digest {
	ds := make([]digest.Digest, len(hs))
	for i, h := range hs {
		ds[i] = digest.Digest(h.String())
	}
	return ds
}

func elapsedSince(t time.Time) time.Duration {
	return time.Since(t).Round(time.Millisecond)
}
