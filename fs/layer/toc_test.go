package layer_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"runtime"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
)

// smallBlob is a converted two-file layer of the given format.
func smallBlob(t *testing.T, f layer.Format) ([]byte, layer.Pin) {
	t.Helper()
	tarball := writeTar(t, []tarEntry{
		tDir("a/", 0o755, 0, 0, mtime(0)),
		tReg("a/b", []byte("hello"), 0o644, 0, 0, mtime(1)),
		tReg("a/c", randomBytes(3, 5000), 0o644, 0, 0, mtime(2)),
	})
	for _, v := range variants {
		if v.format == f && v.minChunk == 0 {
			return convert(t, tarball, v, 1024, nil)
		}
	}
	t.Fatalf("no variant for %s", f)
	return nil, layer.Pin{}
}

// gzipFooter is an eStargz footer pointing at tocOff.
func gzipFooter(tocOff int64) []byte {
	extra := append([]byte{'S', 'G', 0, 0}, fmt.Sprintf("%016xSTARGZ", tocOff)...)
	binary.LittleEndian.PutUint16(extra[2:4], uint16(len(extra)-4))
	return estargz.CreateGzipFooter(extra)
}

// zstdFooter is a zstd:chunked footer (a skippable frame) pointing at a
// compressed TOC of tocLen bytes at tocOff.
func zstdFooter(tocOff, tocLen uint64) []byte {
	f := make([]byte, 8, 8+zstdchunked.FooterSize)
	copy(f, []byte{0x50, 0x2a, 0x4d, 0x18})
	binary.LittleEndian.PutUint32(f[4:], zstdchunked.FooterSize)
	body := make([]byte, zstdchunked.FooterSize)
	binary.LittleEndian.PutUint64(body, tocOff)
	binary.LittleEndian.PutUint64(body[8:], tocLen)
	binary.LittleEndian.PutUint64(body[16:], tocLen)
	binary.LittleEndian.PutUint64(body[24:], 1)
	copy(body[32:], "GnUlInUx")
	return append(f, body...)
}

// estargzWithTOCJSON is an eStargz blob whose TOC is the given bytes, with
// the pin that matches them: a well-pinned but malformed TOC.
func estargzWithTOCJSON(t *testing.T, tocJSON []byte) ([]byte, layer.Pin) {
	t.Helper()
	var blob bytes.Buffer
	blob.Write(bytes.Repeat([]byte{0}, 100)) // stands for file data
	tocOff := int64(blob.Len())
	zw := gzip.NewWriter(&blob)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Size: int64(len(tocJSON))}); err != nil {
		t.Fatal(err)
	}
	tw.Write(tocJSON)
	tw.Close()
	zw.Close()
	blob.Write(gzipFooter(tocOff))
	return blob.Bytes(), layer.Pin{TOCDigest: digest.FromBytes(tocJSON)}
}

type errReaderAt struct{ err error }

func (r errReaderAt) ReadAt([]byte, int64) (int, error) { return 0, r.err }

// failAfter serves the first n reads and fails the rest.
type failAfter struct {
	r   io.ReaderAt
	n   int
	err error
}

func (r *failAfter) ReadAt(p []byte, off int64) (int, error) {
	if r.n == 0 {
		return 0, r.err
	}
	r.n--
	return r.r.ReadAt(p, off)
}

// eofAtEnd returns io.EOF with a full read that reaches the end of the
// data, as io.ReaderAt allows.
type eofAtEnd struct{ b []byte }

func (r eofAtEnd) ReadAt(p []byte, off int64) (int, error) {
	n, err := bytes.NewReader(r.b).ReadAt(p, off)
	if err == nil && off+int64(n) == int64(len(r.b)) {
		err = io.EOF
	}
	return n, err
}

// sparseTail is a blob of a claimed size whose only readable bytes are its
// tail; reading elsewhere fails the test.
type sparseTail struct {
	t    *testing.T
	size int64
	tail []byte
}

func (r sparseTail) ReadAt(p []byte, off int64) (int, error) {
	start := r.size - int64(len(r.tail))
	if off < start {
		r.t.Errorf("read at %d+%d of a %d-byte blob: only the footer should be read", off, len(p), r.size)
		return 0, io.ErrUnexpectedEOF
	}
	return copy(p, r.tail[off-start:]), nil
}

func TestReadTOCAcceptsEitherPin(t *testing.T) {
	ctx := context.Background()
	for _, f := range []layer.Format{layer.FormatEStargz, layer.FormatZstdChunked} {
		blob, pin := smallBlob(t, f)
		pins := map[string]layer.Pin{"both": pin, "TOC digest only": {TOCDigest: pin.TOCDigest}}
		if f == layer.FormatZstdChunked {
			pins["compressed TOC digest only"] = layer.Pin{CompressedTOCDesc: pin.CompressedTOCDesc}
		}
		for name, p := range pins {
			toc, err := layer.ReadTOC(ctx, bytes.NewReader(blob), int64(len(blob)), p)
			if err != nil {
				t.Errorf("%s, %s: %v", f, name, err)
				continue
			}
			if toc.Format != f || toc.Digest != pin.TOCDigest || len(toc.Entries) == 0 || toc.Offset <= 0 || toc.Offset >= int64(len(blob)) {
				t.Errorf("%s, %s: TOC %s at %d with %d entries", f, name, toc.Format, toc.Offset, len(toc.Entries))
			}
		}
		// io.ReaderAt may return io.EOF with a full read at the end.
		if _, err := layer.ReadTOC(ctx, eofAtEnd{blob}, int64(len(blob)), pin); err != nil {
			t.Errorf("%s through a ReaderAt that reports EOF at the end: %v", f, err)
		}
	}
}

func TestPinFromAnnotations(t *testing.T) {
	if _, ok := layer.PinFromAnnotations(map[string]string{"other": "x"}); ok {
		t.Error("annotations without a TOC digest gave a pin")
	}
	d := digest.FromString("toc")
	p, ok := layer.PinFromAnnotations(map[string]string{estargz.TOCJSONDigestAnnotation: d.String()})
	if !ok || p.TOCDigest != d || p.CompressedTOCDesc != "" {
		t.Errorf("eStargz pin %+v %v", p, ok)
	}
	p, ok = layer.PinFromAnnotations(map[string]string{zstdchunked.ManifestChecksumAnnotation: d.String()})
	if !ok || p.CompressedTOCDesc != d || p.TOCDigest != "" {
		t.Errorf("zstd:chunked pin %+v %v", p, ok)
	}
}

func TestReadTOCErrors(t *testing.T) {
	gz, gzPin := smallBlob(t, layer.FormatEStargz)
	zs, zsPin := smallBlob(t, layer.FormatZstdChunked)
	errBoom := errors.New("boom")
	wrong := digest.FromString("something else")

	flip := func(b []byte, at int) []byte {
		c := bytes.Clone(b)
		c[at] ^= 0xff
		return c
	}
	// tocOffset finds where each blob's TOC starts.
	tocOffset := func(blob []byte, pin layer.Pin) int64 {
		toc, err := layer.ReadTOC(context.Background(), bytes.NewReader(blob), int64(len(blob)), pin)
		if err != nil {
			t.Fatal(err)
		}
		return toc.Offset
	}
	gzTOC, zsTOC := tocOffset(gz, gzPin), tocOffset(zs, zsPin)

	plainGzip := func() []byte {
		var b bytes.Buffer
		zw := gzip.NewWriter(&b)
		zw.Write(writeTar(t, []tarEntry{tReg("x", randomBytes(4, 1000), 0o644, 0, 0, mtime(0))}))
		zw.Close()
		return b.Bytes()
	}()
	notJSON, notJSONPin := estargzWithTOCJSON(t, []byte(`{"version": 1, "entries": [`))

	type tc struct {
		name    string
		r       io.ReaderAt
		size    int64
		pin     layer.Pin
		ctx     context.Context
		is      error  // errors.Is target, if any
		message string // substring of the error
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	cases := []tc{
		{name: "no pin", r: bytes.NewReader(gz), size: int64(len(gz)), message: "no TOC digest"},
		{name: "pin of another algorithm", r: bytes.NewReader(gz), size: int64(len(gz)), pin: layer.Pin{TOCDigest: digest.Digest("sha512:" + strings.Repeat("ab", 64))}, message: "invalid TOC digest"},
		{name: "malformed pin", r: bytes.NewReader(gz), size: int64(len(gz)), pin: layer.Pin{TOCDigest: "sha256:xyz"}, message: "invalid TOC digest"},
		{name: "eStargz: wrong TOC digest", r: bytes.NewReader(gz), size: int64(len(gz)), pin: layer.Pin{TOCDigest: wrong}, is: layer.ErrTOCMismatch, message: "TOC hashes to " + gzPin.TOCDigest.String()},
		{name: "zstd:chunked: wrong TOC digest", r: bytes.NewReader(zs), size: int64(len(zs)), pin: layer.Pin{TOCDigest: wrong}, is: layer.ErrTOCMismatch, message: "TOC hashes to " + zsPin.TOCDigest.String()},
		{name: "zstd:chunked: wrong compressed TOC digest", r: bytes.NewReader(zs), size: int64(len(zs)), pin: layer.Pin{CompressedTOCDesc: wrong}, is: layer.ErrTOCMismatch, message: "compressed TOC hashes to"},
		{name: "zstd:chunked: right TOC digest, wrong compressed one", r: bytes.NewReader(zs), size: int64(len(zs)), pin: layer.Pin{TOCDigest: zsPin.TOCDigest, CompressedTOCDesc: wrong}, is: layer.ErrTOCMismatch, message: "compressed TOC hashes to"},
		{name: "eStargz: wrong compressed TOC digest", r: bytes.NewReader(gz), size: int64(len(gz)), pin: layer.Pin{TOCDigest: gzPin.TOCDigest, CompressedTOCDesc: wrong}, is: layer.ErrTOCMismatch, message: "compressed TOC hashes to"},
		{name: "plain gzip tar", r: bytes.NewReader(plainGzip), size: int64(len(plainGzip)), pin: gzPin, is: layer.ErrNotLazy},
		{name: "plain tar", r: bytes.NewReader(writeTar(t, nil)), size: 1024, pin: gzPin, is: layer.ErrNotLazy},
		{name: "empty blob", r: bytes.NewReader(nil), size: 0, pin: gzPin, is: layer.ErrNotLazy},
		{name: "blob smaller than a footer", r: bytes.NewReader(gz[:30]), size: 30, pin: gzPin, is: layer.ErrNotLazy},
		{name: "eStargz: truncated blob", r: bytes.NewReader(gz[:len(gz)-7]), size: int64(len(gz) - 7), pin: gzPin, is: layer.ErrNotLazy},
		{name: "zstd:chunked: truncated blob", r: bytes.NewReader(zs[:len(zs)-7]), size: int64(len(zs) - 7), pin: zsPin, is: layer.ErrNotLazy},
		{name: "eStargz: blob cut at the TOC", r: bytes.NewReader(append(bytes.Clone(gz[:gzTOC]), gz[len(gz)-estargz.FooterSize:]...)), size: gzTOC + estargz.FooterSize, pin: gzPin, message: "outside"},
		{name: "zstd:chunked: head cut off", r: bytes.NewReader(zs[100:]), size: int64(len(zs) - 100), pin: zsPin, message: "outside"},
		{name: "size larger than the blob", r: bytes.NewReader(gz), size: int64(len(gz)) + 10, pin: gzPin, message: "footer"},
		{name: "eStargz: footer beyond the blob", r: bytes.NewReader(append(bytes.Clone(gz[:gzTOC]), gzipFooter(1<<40)...)), size: gzTOC + estargz.FooterSize, pin: gzPin, message: "outside"},
		{name: "eStargz: footer at offset 0", r: bytes.NewReader(append(bytes.Clone(gz[:gzTOC]), gzipFooter(0)...)), size: gzTOC + estargz.FooterSize, pin: gzPin, message: "outside"},
		{name: "zstd:chunked: footer beyond the blob", r: bytes.NewReader(append(bytes.Clone(zs[:zsTOC]), zstdFooter(1<<40, 100)...)), size: zsTOC + 48, pin: zsPin, message: "outside"},
		{name: "zstd:chunked: TOC length beyond the blob", r: bytes.NewReader(append(bytes.Clone(zs[:zsTOC]), zstdFooter(uint64(zsTOC), 1<<40)...)), size: zsTOC + 48, pin: zsPin, message: "outside"},
		{name: "zstd:chunked: offset and length that overflow", r: bytes.NewReader(append(bytes.Clone(zs[:zsTOC]), zstdFooter(math.MaxInt64-10, 100)...)), size: zsTOC + 48, pin: zsPin, message: "outside"},
		{name: "zstd:chunked: negative offset", r: bytes.NewReader(append(bytes.Clone(zs[:zsTOC]), zstdFooter(math.MaxUint64-10, 100)...)), size: zsTOC + 48, pin: zsPin, message: "outside"},
		{name: "zstd:chunked: TOC larger than the limit", r: sparseTail{t: t, size: 1 << 40, tail: append(make([]byte, 64), zstdFooter(1<<30, 300<<20)...)}, size: 1 << 40, pin: zsPin, message: "limit"},
		{name: "eStargz: corrupt compressed TOC", r: bytes.NewReader(flip(gz, int(gzTOC)+30)), size: int64(len(gz)), pin: gzPin, message: "TOC"},
		{name: "eStargz: TOC not gzip at all", r: bytes.NewReader(append(append(bytes.Clone(gz[:gzTOC]), bytes.Repeat([]byte("x"), 200)...), gz[len(gz)-estargz.FooterSize:]...)), size: gzTOC + 200 + estargz.FooterSize, pin: gzPin, message: "decompress"},
		{name: "zstd:chunked: corrupt compressed TOC", r: bytes.NewReader(flip(zs, int(zsTOC)+30)), size: int64(len(zs)), pin: layer.Pin{TOCDigest: zsPin.TOCDigest}, message: "TOC"},
		{name: "zstd:chunked: corrupt compressed TOC, compressed pin", r: bytes.NewReader(flip(zs, int(zsTOC)+30)), size: int64(len(zs)), pin: zsPin, is: layer.ErrTOCMismatch, message: "compressed TOC hashes to"},
		{name: "pinned TOC that is not JSON", r: bytes.NewReader(notJSON), size: int64(len(notJSON)), pin: notJSONPin, message: "decode JSON"},
		{name: "reader fails", r: errReaderAt{errBoom}, size: int64(len(gz)), pin: gzPin, is: errBoom},
		{name: "reader fails on the TOC", r: &failAfter{r: bytes.NewReader(gz), n: 1, err: errBoom}, size: int64(len(gz)), pin: gzPin, is: errBoom},
		{name: "cancelled context", r: bytes.NewReader(gz), size: int64(len(gz)), pin: gzPin, ctx: cancelled, is: context.Canceled},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := c.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			toc, err := layer.ReadTOC(ctx, c.r, c.size, c.pin)
			if err == nil {
				t.Fatalf("accepted: %s TOC with %d entries", toc.Format, len(toc.Entries))
			}
			if c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("error %q is not %q", err, c.is)
			}
			if !strings.Contains(err.Error(), c.message) {
				t.Errorf("error %q does not say %q", err, c.message)
			}
			t.Log(err)
		})
	}
}

// TestReadTOCNeverPanicsOnCorruptTail flips every byte of each format's
// footer and TOC: each flip either still yields the pinned TOC or fails
// with an error.
func TestReadTOCNeverPanicsOnCorruptTail(t *testing.T) {
	ctx := context.Background()
	for _, f := range []layer.Format{layer.FormatEStargz, layer.FormatZstdChunked} {
		blob, pin := smallBlob(t, f)
		toc, err := layer.ReadTOC(ctx, bytes.NewReader(blob), int64(len(blob)), pin)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []layer.Pin{pin, {TOCDigest: pin.TOCDigest}} {
			for i := toc.Offset - 8; i < int64(len(blob)); i++ {
				c := bytes.Clone(blob)
				c[i] ^= 0x5a
				got, err := layer.ReadTOC(ctx, bytes.NewReader(c), int64(len(c)), p)
				if err == nil && got.Digest != pin.TOCDigest {
					t.Fatalf("%s: flipping byte %d gave an unpinned TOC %s", f, i, got.Digest)
				}
			}
		}
	}
}

// TestReadTreeDecodesTheTOCObject checks the token-by-token decoding the
// streaming read uses against what encoding/json accepts, and that a TOC
// the manifest does not pin is reported as a mismatch whatever else is
// wrong with it.
func TestReadTreeDecodesTheTOCObject(t *testing.T) {
	entry := `{"name":"a","type":"reg","size":0,"mode":420}`
	for _, tc := range []struct {
		name, json string
		files      int    // nodes besides the root, when accepted
		message    string // in the error, when refused
	}{
		{name: "plain", json: `{"version":1,"entries":[` + entry + `]}`, files: 1},
		{name: "unknown keys skipped", json: `{"x":{"y":[1,2,{}]},"entries":[` + entry + `],"z":null}`, files: 1},
		{name: "key case as encoding/json", json: `{"Entries":[` + entry + `]}`, files: 1},
		{name: "no entries", json: `{"version":1}`},
		{name: "null entries", json: `{"entries":null}`},
		{name: "two entries lists", json: `{"entries":[` + entry + `],"entries":[]}`, message: "two"},
		{name: "entries not a list", json: `{"entries":{"name":"a"}}`, message: "not a list"},
		{name: "null entry", json: `{"entries":[null]}`, message: "null"},
		{name: "not an object", json: `[` + entry + `]`, message: "decode JSON"},
		{name: "truncated", json: `{"entries":[` + entry, message: "decode JSON"},
		{name: "entry of the wrong shape", json: `{"entries":[{"name":7}]}`, message: "entry 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob, pin := estargzWithTOCJSON(t, []byte(tc.json))
			_, tree, err := layer.ReadTree(context.Background(), bytes.NewReader(blob), int64(len(blob)), pin)
			if tc.message != "" {
				if err == nil || !strings.Contains(err.Error(), tc.message) {
					t.Fatalf("error %v, want one saying %q", err, tc.message)
				}
				if errors.Is(err, layer.ErrTOCMismatch) {
					t.Errorf("a pinned TOC reported as a mismatch: %v", err)
				}
				// Unpinned, the same bytes are a mismatch before anything else.
				_, _, err = layer.ReadTree(context.Background(), bytes.NewReader(blob), int64(len(blob)), layer.Pin{TOCDigest: digest.FromString("other")})
				if !errors.Is(err, layer.ErrTOCMismatch) {
					t.Errorf("unpinned malformed TOC: %v, want a mismatch", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := len(tree.Nodes) - 1; got != tc.files {
				t.Errorf("%d nodes besides the root, want %d", got, tc.files)
			}
		})
	}
}

// TestReadTOCBoundsZstdWindows: a zstd:chunked TOC of ten bytes whose frame
// header asks for a 512 MiB window, well pinned, must fail without the
// daemon allocating what it asks for.
func TestReadTOCBoundsZstdWindows(t *testing.T) {
	frame := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x98, 0x09, 0x00, 0x00, 0x7b}
	blob := append(bytes.Repeat([]byte{0}, 100), frame...)
	blob = append(blob, zstdFooter(100, uint64(len(frame)))...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := layer.ReadTOC(context.Background(), bytes.NewReader(blob), int64(len(blob)), layer.Pin{CompressedTOCDesc: digest.FromBytes(frame)})
	runtime.ReadMemStats(&after)
	if err == nil {
		t.Fatal("a TOC frame asking for a 512 MiB window was read")
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Errorf("reading it allocated %d MiB", grew>>20)
	}
}
