// Package layer reads lazily pullable layers: it finds and verifies the
// table of contents of an eStargz or zstd:chunked blob, turns it into a
// validated inode tree for metadata/, and fetches, decompresses and checks
// the chunks of single files.
//
// The estargz module parses the formats; it does not validate them (it
// cleans traversal names, lets duplicates win, accepts overlapping chunk
// tables), so everything a TOC says is checked here before anything is
// mounted.
package layer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Format is a lazy layer format.
type Format string

// The formats lazycas mounts.
const (
	FormatEStargz     Format = "estargz"
	FormatZstdChunked Format = "zstdchunked"
)

// Annotations on a layer descriptor that pin its TOC.
const (
	// AnnotationTOCDigest is the sha256 of the TOC JSON (eStargz, and the
	// zstd:chunked layers that the estargz module writes).
	AnnotationTOCDigest = estargz.TOCJSONDigestAnnotation
	// AnnotationZstdChunkedManifest is the sha256 of the compressed TOC of
	// a zstd:chunked layer (as containers/storage writes it).
	AnnotationZstdChunkedManifest = zstdchunked.ManifestChecksumAnnotation
)

// Limits on what a TOC may claim; beyond them a layer is not mounted lazily.
const (
	maxTOCCompressed = 256 << 20
	maxTOCJSON       = 1 << 30
)

// ErrNotLazy means the blob has no footer and TOC of a known format.
var ErrNotLazy = errors.New("not a lazy layer")

// ErrTOCMismatch means the blob's TOC is not the one its manifest pins.
var ErrTOCMismatch = errors.New("TOC does not match the manifest")

// Pin is what the manifest says the TOC must hash to. At least one field
// is required: a TOC that nothing pins is never trusted.
type Pin struct {
	TOCDigest         digest.Digest // of the TOC JSON
	CompressedTOCDesc digest.Digest // of the compressed TOC bytes (zstd:chunked)
}

// PinFromAnnotations returns the pin a layer descriptor's annotations give.
func PinFromAnnotations(a map[string]string) (Pin, bool) {
	var p Pin
	if v := a[AnnotationTOCDigest]; v != "" {
		p.TOCDigest = digest.Digest(v)
	}
	if v := a[AnnotationZstdChunkedManifest]; v != "" {
		p.CompressedTOCDesc = digest.Digest(v)
	}
	return p, p.TOCDigest != "" || p.CompressedTOCDesc != ""
}

// TOC is a verified table of contents.
type TOC struct {
	Format Format
	// Offset is where the TOC starts in the blob: the end of file data.
	Offset int64
	// Digest is the sha256 of the TOC JSON.
	Digest  digest.Digest
	Entries []*estargz.TOCEntry
}

// decompressor is what lazycas needs of a format: the estargz module's
// implementations have DecompressTOC, its interface does not.
type decompressor interface {
	estargz.Decompressor
	DecompressTOC(io.Reader) (io.ReadCloser, error)
}

// maxZstdWindow bounds the window a zstd frame of a layer may make the
// daemon allocate: a 10-byte frame header can ask for 512 MiB and more.
// 128 MiB is what the zstd command line decodes without --long.
const maxZstdWindow = 128 << 20

// zstdOptions are the decoder options of every zstd frame lazycas reads
// from a layer, its TOC and its chunks.
var zstdOptions = []zstd.DOption{
	zstd.WithDecoderMaxWindow(maxZstdWindow), zstd.WithDecoderMaxMemory(maxZstdWindow),
	zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
}

// zstdDecompressor is the estargz module's zstd:chunked decompressor whose
// TOC decoder has zstdOptions: the module's own takes zstd's defaults.
type zstdDecompressor struct{ *zstdchunked.Decompressor }

func (zstdDecompressor) DecompressTOC(r io.Reader) (io.ReadCloser, error) {
	d, err := zstd.NewReader(r, zstdOptions...)
	if err != nil {
		return nil, err
	}
	return d.IOReadCloser(), nil
}

// Decompressor returns the chunk decompressor of a format.
func Decompressor(f Format) (estargz.Decompressor, error) {
	return decompressorOf(f)
}

func decompressorOf(f Format) (decompressor, error) {
	switch f {
	case FormatEStargz:
		return new(estargz.GzipDecompressor), nil
	case FormatZstdChunked:
		return zstdDecompressor{new(zstdchunked.Decompressor)}, nil
	}
	return nil, fmt.Errorf("unknown layer format %q", f)
}

// ReadTOC reads the footer and TOC of a blob of the given size through r
// and checks the TOC against pin. It reads only the blob's tail.
func ReadTOC(ctx context.Context, r io.ReaderAt, size int64, pin Pin) (*TOC, error) {
	var entries []*estargz.TOCEntry
	toc, err := readTOC(ctx, r, size, pin, func(Format, int64) entrySink {
		return func(_ int, e *estargz.TOCEntry) error {
			entries = append(entries, e)
			return nil
		}
	})
	if err != nil {
		return nil, err
	}
	toc.Entries = entries
	return toc, nil
}

// ReadTree is ReadTOC and Build in one pass: each entry goes into the tree
// as it is decoded, so the decoded TOC is never held whole and memory
// grows with the tree, not with the TOC's JSON (a layer of 200,000 files
// has a TOC of 40 MB). The tree is returned only once the whole TOC
// matched pin. The TOC it returns has no Entries.
func ReadTree(ctx context.Context, r io.ReaderAt, size int64, pin Pin) (*TOC, *Tree, error) {
	t := &memTree{}
	var b *builder
	toc, err := readTOC(ctx, r, size, pin, func(_ Format, off int64) entrySink {
		b = newBuilder(off, t)
		return b.add
	})
	if err != nil {
		return nil, nil, err
	}
	tree, err := t.finish(b)
	if err != nil {
		return nil, nil, err
	}
	return toc, tree, nil
}

// Import is ReadTree into sink: the nodes go to it as they are final and
// only the layer's directories stay in memory until the end. What sink
// took is good only once Import returned without an error (the TOC is
// verified against pin at its end).
func Import(ctx context.Context, r io.ReaderAt, size int64, pin Pin, sink Sink) (*TOC, Summary, error) {
	var b *builder
	toc, err := readTOC(ctx, r, size, pin, func(_ Format, off int64) entrySink {
		b = newBuilder(off, sink)
		return b.add
	})
	if err != nil {
		return nil, Summary{}, err
	}
	sum, err := b.finish()
	if err != nil {
		return nil, Summary{}, err
	}
	return toc, sum, nil
}

// entrySink takes the TOC's entries in order as they are decoded.
type entrySink func(i int, e *estargz.TOCEntry) error

// readTOC finds, reads and verifies the TOC, handing its entries to the
// sink newSink returns for the format and TOC offset the footer gives.
func readTOC(ctx context.Context, r io.ReaderAt, size int64, pin Pin, newSink func(f Format, tocOff int64) entrySink) (*TOC, error) {
	if pin.TOCDigest == "" && pin.CompressedTOCDesc == "" {
		return nil, errors.New("no TOC digest annotation to verify the TOC against")
	}
	for _, d := range []digest.Digest{pin.TOCDigest, pin.CompressedTOCDesc} {
		if d != "" && (d.Algorithm() != digest.SHA256 || d.Validate() != nil) {
			return nil, fmt.Errorf("invalid TOC digest annotation %q", d)
		}
	}
	formats := []Format{FormatEStargz, FormatZstdChunked}
	var footerLen int64
	for _, f := range formats {
		d, _ := decompressorOf(f)
		footerLen = max(footerLen, d.FooterSize())
	}
	if size < footerLen {
		return nil, fmt.Errorf("blob of %d bytes is too small for a footer: %w", size, ErrNotLazy)
	}
	footer := make([]byte, footerLen)
	if err := readAt(r, footer, size-footerLen); err != nil {
		return nil, fmt.Errorf("read footer: %w", err)
	}
	var errs []error
	for _, f := range formats {
		d, _ := decompressorOf(f)
		fs := d.FooterSize()
		tocOff, tocSize, err := parseFooter(d, footer[footerLen-fs:])
		if err != nil {
			errs = append(errs, fmt.Errorf("%s footer: %w", f, err))
			continue
		}
		if tocSize <= 0 {
			tocSize = size - tocOff - fs
		}
		// Compared without adding: the footer's numbers are untrusted and
		// their sum may overflow.
		if tocOff <= 0 || tocSize <= 0 || tocOff > size-fs || tocSize > size-fs-tocOff {
			return nil, fmt.Errorf("%s footer points at bytes %d+%d outside a %d-byte blob", f, tocOff, tocSize, size)
		}
		if tocSize > maxTOCCompressed {
			return nil, fmt.Errorf("%s TOC of %d bytes exceeds the limit of %d", f, tocSize, maxTOCCompressed)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		raw := make([]byte, tocSize)
		if err := readAt(r, raw, tocOff); err != nil {
			return nil, fmt.Errorf("read %s TOC: %w", f, err)
		}
		if pin.CompressedTOCDesc != "" {
			if got := digest.FromBytes(raw); got != pin.CompressedTOCDesc {
				return nil, fmt.Errorf("%w: compressed TOC hashes to %s, the manifest says %s", ErrTOCMismatch, got, pin.CompressedTOCDesc)
			}
		}
		toc, err := decodeTOC(d, raw, newSink(f, tocOff))
		if toc != nil && pin.TOCDigest != "" && toc.Digest != pin.TOCDigest {
			return nil, fmt.Errorf("%w: TOC hashes to %s, the manifest says %s", ErrTOCMismatch, toc.Digest, pin.TOCDigest)
		}
		if err != nil {
			return nil, fmt.Errorf("%s TOC: %w", f, err)
		}
		toc.Format, toc.Offset = f, tocOff
		return toc, nil
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	return nil, fmt.Errorf("%w: %s", ErrNotLazy, strings.Join(msgs, "; "))
}

// TOCOffset returns where the TOC of a blob of the given size starts, from
// tail, the blob's last bytes, if they hold a footer of a known format.
// Nothing is verified: it only tells how much of the blob's end a mount
// will read (ReadTOC checks everything).
func TOCOffset(tail []byte, size int64) (int64, bool) {
	for _, f := range []Format{FormatEStargz, FormatZstdChunked} {
		d, _ := decompressorOf(f)
		fs := d.FooterSize()
		if int64(len(tail)) < fs || size < fs {
			continue
		}
		off, _, err := parseFooter(d, tail[int64(len(tail))-fs:])
		if err == nil && off > 0 && off <= size-fs {
			return off, true
		}
	}
	return 0, false
}

// parseFooter parses a footer of d's format: the last d.FooterSize() bytes
// of a blob, untrusted. The estargz module's gzip footer parser (v0.19.1)
// trusts the subfield length in the gzip header's extra field and slices
// past the end of a shorter extra field (FuzzTOCOffset found a 51-byte tail
// that panics it), which would take the daemon down from a registry's
// bytes: a panic in a parser is a malformed footer here.
func parseFooter(d decompressor, footer []byte) (tocOff, tocSize int64, err error) {
	defer func() {
		if r := recover(); r != nil {
			tocOff, tocSize, err = 0, 0, fmt.Errorf("malformed footer: %v", r)
		}
	}()
	_, tocOff, tocSize, err = d.ParseFooter(footer)
	return tocOff, tocSize, err
}

// readAt fills p from offset off of r. An io.ReaderAt may return io.EOF
// with a full read that ends at the end of its data.
func readAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) && (err == nil || errors.Is(err, io.EOF)) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// decodeTOC decompresses and decodes a TOC, bounding the JSON it inflates
// to, and hands each entry to add as soon as it is decoded. Whether or not
// decoding fails, the TOC it returns has the digest of the whole JSON
// document when that could be read: a TOC that is not the one the manifest
// pins is reported as such, not as whatever is wrong inside it.
func decodeTOC(d decompressor, raw []byte, add entrySink) (*TOC, error) {
	rc, err := d.DecompressTOC(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("decompress: %w", err)
	}
	defer rc.Close()
	h := sha256.New()
	lr := &io.LimitedReader{R: rc, N: maxTOCJSON + 1}
	dec := json.NewDecoder(io.TeeReader(lr, h))
	decodeErr := decodeEntries(dec, add)
	// The digest covers the whole JSON document, including what the
	// decoder had not consumed yet (trailing whitespace).
	if _, err := io.Copy(h, lr); err != nil {
		return nil, errors.Join(decodeErr, fmt.Errorf("read: %w", err))
	}
	if lr.N <= 0 {
		return nil, fmt.Errorf("TOC JSON exceeds %d bytes", maxTOCJSON)
	}
	return &TOC{Digest: digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h.Sum(nil)))}, decodeErr
}

// decodeEntries walks the TOC object ({"version": 1, "entries": [...]})
// token by token and decodes one entry at a time: json.Decoder.Decode of
// the whole object would buffer all of its JSON and then hold every entry
// decoded. Keys match as encoding/json matches them (case-insensitively);
// other keys are skipped; a second "entries" is refused rather than
// letting one of them win.
func decodeEntries(dec *json.Decoder, add entrySink) error {
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("decode JSON: %w", err)
	}
	if tok == nil {
		return nil // a null TOC, as encoding/json reads it: no entries
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("decode JSON: %v where '{' belongs", tok)
	}
	seen, n := false, 0
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("decode JSON: %w", err)
		}
		key, _ := tok.(string)
		if !strings.EqualFold(key, "entries") {
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return fmt.Errorf("decode JSON: %q: %w", key, err)
			}
			continue
		}
		if seen {
			return errors.New("decode JSON: two \"entries\" lists")
		}
		seen = true
		tok, err = dec.Token()
		if err != nil {
			return fmt.Errorf("decode JSON: %w", err)
		}
		if tok == nil {
			continue // "entries": null, as encoding/json reads it
		}
		if d, ok := tok.(json.Delim); !ok || d != '[' {
			return fmt.Errorf("decode JSON: \"entries\" is not a list")
		}
		for dec.More() {
			var e *estargz.TOCEntry // a null entry stays nil: Build refuses it
			if err := dec.Decode(&e); err != nil {
				return fmt.Errorf("decode JSON: entry %d: %w", n, err)
			}
			if err := add(n, e); err != nil {
				return err
			}
			n++
		}
		if err := expectDelim(dec, ']'); err != nil {
			return err
		}
	}
	return expectDelim(dec, '}')
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("decode JSON: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("decode JSON: %v where %q belongs", tok, want)
	}
	return nil
}
