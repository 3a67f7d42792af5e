package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/service/resolver"
)

// tarEntry is one member of a test layer.
type tarEntry struct {
	hdr  tar.Header
	body []byte
}

var mtime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

func reg(name string, body []byte) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(body)), ModTime: mtime, Uid: 1000, Gid: 100}, body: body}
}

func dir(name string) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: mtime}}
}

// oddLayer holds what layers in the wild hold and converters get wrong.
func oddLayer(bigFile bool) []tarEntry {
	long := strings.Repeat("long-directory-name/", 8) + strings.Repeat("x", 120)
	sparse := make([]byte, 3<<20)
	copy(sparse[1<<20:], "data in the middle of zeros")
	xattrDir := dir("etc/")
	xattrDir.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.comment": "dir xattr"}
	capFile := reg("usr/bin/ping", []byte("\x7fELF pretend"))
	capFile.hdr.Mode = 0o4755
	capFile.hdr.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"}
	entries := []tarEntry{
		dir("etc/"), xattrDir, // a duplicate directory header, as tar appends do
		reg("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n")),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "etc/passwd.hard", Linkname: "etc/passwd", ModTime: mtime, Mode: 0o644}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/link", Linkname: "../etc/passwd", ModTime: mtime, Mode: 0o777}},
		dir("usr/"), dir("usr/bin/"), capFile,
		reg("empty", nil),
		reg("sparse.img", sparse),
		dir(long[:strings.LastIndex(long, "/")+1]), reg(long, []byte("long name")),
		reg("etc/.wh.removed", nil),
		dir("var/"), dir("var/opaque/"), reg("var/opaque/.wh..wh..opq", nil),
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "var/fifo", Mode: 0o600, ModTime: mtime}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "var/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime}},
	}
	if bigFile {
		big := bytes.Repeat([]byte("0123456789abcdef"), (101<<20)/16)
		entries = append(entries, reg("big.bin", big))
	}
	return entries
}

func tarBytes(t testing.TB, entries []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// testRegistry runs go-containerregistry's registry on loopback.
func testRegistry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(nopLogger())))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// pushImage pushes an image of gzip layers made from the given tars.
func pushImage(t testing.TB, ref string, layers ...[]byte) {
	t.Helper()
	img := empty.Image
	for _, l := range layers {
		layer := static.NewLayer(gzipBytes(t, l), types.OCILayer)
		var err error
		if img, err = mutate.Append(img, mutate.Addendum{Layer: layer}); err != nil {
			t.Fatal(err)
		}
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Cmd = []string{"/bin/sh"}
	// diffIDs must be the digests of the uncompressed tars.
	cf.RootFS.DiffIDs = nil
	for _, l := range layers {
		h, _, _ := v1.SHA256(bytes.NewReader(l))
		cf.RootFS.DiffIDs = append(cf.RootFS.DiffIDs, h)
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

func testOptions(f Format) Options {
	return Options{Format: f, Resolver: resolver.New(context.Background(), resolver.Options{PlainHTTP: true})}
}

// converted fetches an image and returns its manifest, config and layer blobs.
func converted(t testing.TB, ref string) (*v1.Manifest, *v1.ConfigFile, [][]byte) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	var blobs [][]byte
	for _, l := range m.Layers {
		layer, err := img.LayerByDigest(l.Digest)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := layer.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, b)
	}
	return m, cf, blobs
}

func TestConvertWritesVerifiableLazyLayers(t *testing.T) {
	for _, f := range []Format{EStargz, ZstdChunked} {
		t.Run(string(f), func(t *testing.T) {
			ctx := context.Background()
			host := testRegistry(t)
			base := tarBytes(t, oddLayer(false))
			app := tarBytes(t, []tarEntry{dir("app/"), reg("app/main.py", []byte("print('hi')\n"))})
			pushImage(t, host+"/src:v1", base, app)

			opts := testOptions(f)
			opts.Prefetch = []string{"app/main.py"}
			res, err := Convert(ctx, host+"/src:v1", host+"/dst:v1", opts)
			if err != nil {
				t.Fatal(err)
			}
			m, cf, blobs := converted(t, host+"/dst:v1")
			if m.Config.Digest.String() == "" || len(m.Layers) != 2 || len(res.Layers) != 2 {
				t.Fatalf("manifest has %d layers, result %d", len(m.Layers), len(res.Layers))
			}
			wantMT := types.OCILayer
			if f == ZstdChunked {
				wantMT = types.OCILayerZStd
			}
			for i, l := range m.Layers {
				if l.MediaType != wantMT {
					t.Errorf("layer %d media type %s, want %s", i, l.MediaType, wantMT)
				}
				tocDigest, err := digest.Parse(l.Annotations[estargz.TOCJSONDigestAnnotation])
				if err != nil {
					t.Fatalf("layer %d: TOC digest annotation: %v", i, err)
				}
				if l.Annotations[estargz.StoreUncompressedSizeAnnotation] == "" {
					t.Errorf("layer %d: no uncompressed-size annotation", i)
				}
				if f == ZstdChunked && l.Annotations[zstdchunked.ManifestChecksumAnnotation] == "" {
					t.Errorf("layer %d: no zstd:chunked manifest checksum annotation", i)
				}
				diffID := verifyLayer(t, blobs[i], f, tocDigest)
				if cf.RootFS.DiffIDs[i].String() != diffID {
					t.Errorf("layer %d: config diffID %s, uncompressed digest %s", i, cf.RootFS.DiffIDs[i], diffID)
				}
			}
			// The prefetch list puts app/main.py (with its parent) before the landmark.
			names := tarNames(t, blobs[1], f)
			if want := []string{"app/", "app/main.py", estargz.PrefetchLandmark}; len(names) < 3 || !slices.Equal(names[:3], want) {
				t.Errorf("prefetch order of layer 1: %q, want it to start with %q", names, want)
			}
			if names := tarNames(t, blobs[0], f); names[0] != estargz.PrefetchLandmark {
				t.Errorf("a layer without prefetched files should start with the landmark: %q", names[:3])
			}
		})
	}
}

func TestConvertRoundTripsOddContent(t *testing.T) {
	if testing.Short() {
		t.Skip("converts a 100 MB file")
	}
	for _, f := range []Format{EStargz, ZstdChunked} {
		t.Run(string(f), func(t *testing.T) {
			host := testRegistry(t)
			entries := oddLayer(true)
			orig := tarBytes(t, entries)
			pushImage(t, host+"/odd:v1", orig)
			if _, err := Convert(context.Background(), host+"/odd:v1", host+"/odd:lazy", testOptions(f)); err != nil {
				t.Fatal(err)
			}
			_, _, blobs := converted(t, host+"/odd:lazy")
			want := readTree(t, bytes.NewReader(orig))
			got := readTree(t, decompress(t, blobs[0], f))
			for name, w := range want {
				g, ok := got[name]
				if !ok {
					t.Errorf("%s: missing after conversion", name)
					continue
				}
				if g != w {
					t.Errorf("%s:\n got  %+v\n want %+v", name, g, w)
				}
			}
			for name := range got {
				if _, ok := want[name]; !ok && name != estargz.NoPrefetchLandmark && name != "stargz.index.json" {
					t.Errorf("%s: appeared in conversion", name)
				}
			}
		})
	}
}

func TestConvertIsDeterministicAndKeepsLazyLayers(t *testing.T) {
	ctx := context.Background()
	host := testRegistry(t)
	pushImage(t, host+"/src:v1", tarBytes(t, oddLayer(false)))
	first, err := Convert(ctx, host+"/src:v1", host+"/a:v1", testOptions(EStargz))
	if err != nil {
		t.Fatal(err)
	}
	second, err := Convert(ctx, host+"/src:v1", host+"/b:v1", testOptions(EStargz))
	if err != nil {
		t.Fatal(err)
	}
	if first.Target.Digest != second.Target.Digest {
		t.Errorf("two conversions differ: %s vs %s", first.Target.Digest, second.Target.Digest)
	}
	again, err := Convert(ctx, host+"/a:v1", host+"/c:v1", testOptions(EStargz))
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Layers) != 1 || !again.Layers[0].Kept {
		t.Errorf("an eStargz layer was converted again: %+v", again.Layers)
	}
	if again.Target.Digest != first.Target.Digest {
		t.Errorf("reconverting changed the image: %s vs %s", again.Target.Digest, first.Target.Digest)
	}
}

func TestConvertFailsClearly(t *testing.T) {
	ctx := context.Background()
	host := testRegistry(t)
	pushImage(t, host+"/src:v1", tarBytes(t, oddLayer(false)))
	// A listener closed at once: connection refused.
	dead := httptest.NewServer(nil)
	deadHost := strings.TrimPrefix(dead.URL, "http://")
	dead.Close()

	for _, tc := range []struct {
		name, src, dst, want string
	}{
		{"an unknown image", host + "/nope:v1", host + "/dst:v1", "not found"},
		{"an unreachable registry", deadHost + "/src:v1", host + "/dst:v1", "connection refused"},
		{"a destination that refuses pushes", host + "/src:v1", deadHost + "/dst:v1", "push " + deadHost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Convert(ctx, tc.src, tc.dst, testOptions(EStargz))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
	t.Run("an unsupported layer media type", func(t *testing.T) {
		img, err := mutate.Append(empty.Image, mutate.Addendum{
			Layer: static.NewLayer([]byte("sealed"), "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
		})
		if err != nil {
			t.Fatal(err)
		}
		r, _ := name.ParseReference(host+"/sealed:v1", name.Insecure)
		if err := remote.Write(r, mutate.MediaType(img, types.OCIManifestSchema1)); err != nil {
			t.Fatal(err)
		}
		_, err = Convert(ctx, host+"/sealed:v1", host+"/dst:v1", testOptions(EStargz))
		if err == nil || !strings.Contains(err.Error(), `unsupported layer media type "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"`) {
			t.Fatalf("got %v", err)
		}
	})
}

// staticKeychain hands out one user's credentials for every registry.
type staticKeychain struct{ user, pass string }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return &authn.Basic{Username: k.user, Password: k.pass}, nil
}

func TestConvertAuthenticates(t *testing.T) {
	ctx := context.Background()
	inner := registry.New(registry.Logger(nopLogger()))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != "s3cret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	open := testRegistry(t)
	pushImage(t, open+"/src:v1", tarBytes(t, oddLayer(false)))

	withKeys := func(k authn.Keychain) Options {
		return Options{Format: EStargz, Resolver: resolver.New(ctx, resolver.Options{PlainHTTP: true, Keychain: k})}
	}
	_, err := Convert(ctx, open+"/src:v1", host+"/dst:v1", withKeys(staticKeychain{"alice", "wrong"}))
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("wrong password: got %v, want a 401 error", err)
	}
	if _, err := Convert(ctx, open+"/src:v1", host+"/dst:v1", withKeys(staticKeychain{"alice", "s3cret"})); err != nil {
		t.Fatalf("right password: %v", err)
	}
}

// verifyLayer opens a converted blob as the snapshotter will, checks its TOC
// against the annotation, and every file's content against its TOC digest.
// It returns the digest of the uncompressed blob.
func verifyLayer(t *testing.T, blob []byte, f Format, tocDigest digest.Digest) string {
	t.Helper()
	var opts []estargz.OpenOption
	if f == ZstdChunked {
		opts = append(opts, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	}
	r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.VerifyTOC(tocDigest); err != nil {
		t.Fatalf("TOC does not match its annotation: %v", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		t.Fatal("no root in TOC")
	}
	files := 0
	var walk func(string, *estargz.TOCEntry)
	walk = func(dir string, e *estargz.TOCEntry) {
		e.ForeachChild(func(base string, c *estargz.TOCEntry) bool {
			p := strings.TrimPrefix(dir+"/"+base, "/")
			switch c.Type {
			case "dir":
				walk(p, c)
			case "reg":
				sr, err := r.OpenFile(p)
				if err != nil {
					t.Fatalf("%s: %v", p, err)
				}
				h := sha256.New()
				if _, err := io.Copy(h, sr); err != nil {
					t.Fatal(err)
				}
				if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != c.Digest {
					t.Errorf("%s: content %s, TOC digest %s", p, got, c.Digest)
				}
				files++
			}
			return true
		})
	}
	walk("", root)
	if files == 0 {
		t.Fatal("no regular files in TOC")
	}
	h := sha256.New()
	if _, err := io.Copy(h, decompress(t, blob, f)); err != nil {
		t.Fatal(err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

func decompress(t testing.TB, blob []byte, f Format) io.Reader {
	t.Helper()
	if f == ZstdChunked {
		zr, err := zstd.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(zr.Close)
		return zr
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	return zr
}

func tarNames(t testing.TB, blob []byte, f Format) []string {
	t.Helper()
	var names []string
	tr := tar.NewReader(decompress(t, blob, f))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, strings.TrimPrefix(h.Name, "./"))
	}
}

// node is what a tree walk compares of one entry.
type node struct {
	Type            byte
	Mode            int64
	UID, GID        int
	ModTime         int64
	Linkname        string
	Xattrs          string
	Devmajor, Minor int64
	Size            int64
	Digest          string
}

// readTree reads a tar stream into name -> node. The last header for a name
// wins, as when unpacking.
func readTree(t testing.TB, r io.Reader) map[string]node {
	t.Helper()
	out := map[string]node{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		hash := sha256.New()
		if _, err := io.Copy(hash, tr); err != nil {
			t.Fatal(err)
		}
		var xattrs []string
		for k, v := range h.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") {
				xattrs = append(xattrs, k+"="+v)
			}
		}
		typ := h.Typeflag
		if typ == tar.TypeRegA {
			typ = tar.TypeReg
		}
		name := strings.TrimSuffix(strings.TrimPrefix(h.Name, "./"), "/")
		out[name] = node{
			Type: typ, Mode: h.Mode & 0o7777, UID: h.Uid, GID: h.Gid, ModTime: h.ModTime.Unix(),
			Linkname: strings.TrimPrefix(h.Linkname, "./"), Xattrs: fmt.Sprint(sortStrings(xattrs)),
			Devmajor: h.Devmajor, Minor: h.Devminor, Size: h.Size, Digest: hex.EncodeToString(hash.Sum(nil)),
		}
	}
}

func sortStrings(s []string) []string {
	slices.Sort(s)
	return s
}

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }
