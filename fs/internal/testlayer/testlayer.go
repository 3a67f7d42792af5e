// Package testlayer builds lazy layers for the tests of fs/ and fs/fuse:
// tars in memory, eStargz and zstd:chunked blobs made from them, the tree a
// mounted layer must show, a walker that reads a mounted tree back with
// plain syscalls, an in-process registry that counts and breaks requests,
// and guards that no mount outlives a test.
//
// Only _test.go files import it; nothing here is compiled into lazycas.
package testlayer

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"path"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
)

// MTime is the modification time test entries get unless told otherwise;
// TOCs keep whole seconds only.
var MTime = time.Unix(1_700_000_000, 0)

// Entry is one member of a test tar.
type Entry struct {
	Hdr  tar.Header
	Data []byte
}

// Dir is a directory entry; name may end in "/".
func Dir(name string, mode int64) Entry {
	return Entry{Hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: MTime}}
}

// File is a regular file.
func File(name string, data []byte, mode int64) Entry {
	return Entry{Hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: MTime}, Data: data}
}

// Symlink is a symbolic link to target.
func Symlink(name, target string) Entry {
	return Entry{Hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: MTime}}
}

// Hardlink is a second name of the earlier entry target.
func Hardlink(name, target string) Entry {
	return Entry{Hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: MTime}}
}

// Device is a character (tar.TypeChar) or block (tar.TypeBlock) device.
func Device(typ byte, name string, major, minor int64) Entry {
	return Entry{Hdr: tar.Header{Typeflag: typ, Name: name, Devmajor: major, Devminor: minor, Mode: 0o660, ModTime: MTime}}
}

// Fifo is a named pipe.
func Fifo(name string) Entry {
	return Entry{Hdr: tar.Header{Typeflag: tar.TypeFifo, Name: name, Mode: 0o600, ModTime: MTime}}
}

// Whiteout is the OCI whiteout hiding p of the layers below.
func Whiteout(p string) Entry {
	return File(path.Join(path.Dir(p), ".wh."+path.Base(p)), nil, 0o644)
}

// Opaque is the OCI marker that hides what the layers below hold in dir.
func Opaque(dir string) Entry {
	return File(path.Join(dir, ".wh..wh..opq"), nil, 0o644)
}

// Owner returns e owned by uid:gid.
func (e Entry) Owner(uid, gid int) Entry {
	e.Hdr.Uid, e.Hdr.Gid = uid, gid
	return e
}

// Xattr returns e with one more extended attribute.
func (e Entry) Xattr(name, value string) Entry {
	recs := map[string]string{}
	for k, v := range e.Hdr.PAXRecords {
		recs[k] = v
	}
	recs["SCHILY.xattr."+name] = value
	e.Hdr.PAXRecords = recs
	return e
}

// Time returns e modified at t.
func (e Entry) Time(t time.Time) Entry {
	e.Hdr.ModTime = t
	return e
}

// Tar writes entries as a PAX tar.
func Tar(t testing.TB, entries []Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.Hdr
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(e.Data); err != nil {
			t.Fatalf("tar data %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Random returns n reproducible, incompressible bytes.
func Random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// Formats are the lazy formats every layer test runs for.
var Formats = []layer.Format{layer.FormatEStargz, layer.FormatZstdChunked}

// BuildOptions tune Build.
type BuildOptions struct {
	// ChunkSize splits files into chunks; 0 takes estargz's default (4 MiB).
	ChunkSize int
	// Prioritized names the files placed before the prefetch landmark.
	Prioritized []string
}

// Blob is a built lazy layer.
type Blob struct {
	Format    layer.Format
	Data      []byte
	Digest    digest.Digest
	TOCDigest digest.Digest
}

// Build converts a tar into a lazy blob of format f, the way fs/convert does.
func Build(t testing.TB, tarball []byte, f layer.Format, o BuildOptions) *Blob {
	t.Helper()
	var opts []estargz.Option
	if o.ChunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(o.ChunkSize))
	}
	if len(o.Prioritized) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(o.Prioritized))
	}
	switch f {
	case layer.FormatEStargz:
		opts = append(opts, estargz.WithCompressionLevel(gzip.BestSpeed))
	case layer.FormatZstdChunked:
		zc := &zstdchunked.Compressor{CompressionLevel: zstd.SpeedFastest, Metadata: map[string]string{}}
		opts = append(opts, estargz.WithCompression(struct {
			*zstdchunked.Compressor
			*zstdchunked.Decompressor
		}{zc, &zstdchunked.Decompressor{}}))
	default:
		t.Fatalf("unknown format %q", f)
	}
	b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarball), 0, int64(len(tarball))), opts...)
	if err != nil {
		t.Fatalf("estargz.Build: %v", err)
	}
	defer b.Close()
	data, err := io.ReadAll(b)
	if err != nil {
		t.Fatalf("read built blob: %v", err)
	}
	return &Blob{Format: f, Data: data, Digest: digest.FromBytes(data), TOCDigest: b.TOCDigest()}
}

// TOC reads the blob's verified TOC.
func (b *Blob) TOC(t testing.TB) *layer.TOC {
	t.Helper()
	toc, err := layer.ReadTOC(context.Background(), bytes.NewReader(b.Data), int64(len(b.Data)), layer.Pin{TOCDigest: b.TOCDigest})
	if err != nil {
		t.Fatalf("read TOC of test blob: %v", err)
	}
	return toc
}

// CompressedRange returns where the compressed bytes of the first chunk of
// regular file name lie in the blob.
func (b *Blob) CompressedRange(t testing.TB, name string) (off, end int64) {
	t.Helper()
	toc := b.TOC(t)
	end = toc.Offset
	found := false
	for _, e := range toc.Entries {
		switch {
		case !found && e.Type == "reg" && strings.TrimPrefix(e.Name, "./") == name:
			off, found = e.Offset, true
		case found && e.Offset > off:
			return off, min(end, e.Offset)
		}
	}
	if !found {
		t.Fatalf("no regular file %q in the test blob", name)
	}
	return off, end
}

// Corrupt returns a copy of b with one byte flipped in the middle of the
// compressed data of file name. The TOC and its digest stay as they were;
// the blob's digest changes.
func (b *Blob) Corrupt(t testing.TB, name string) *Blob {
	t.Helper()
	off, end := b.CompressedRange(t, name)
	data := bytes.Clone(b.Data)
	data[off+(end-off)/2] ^= 0x5a
	return &Blob{Format: b.Format, Data: data, Digest: digest.FromBytes(data), TOCDigest: b.TOCDigest}
}

// SHA256 is the hex sha256 of data.
func SHA256(data []byte) string {
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}
