package layer_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
)

// tarEntry is one member of a test tar: a header and, for regular files,
// its content.
type tarEntry struct {
	hdr  *tar.Header
	data []byte
}

var baseTime = time.Unix(1_700_000_000, 0)

func mtime(i int) time.Time { return baseTime.Add(time.Duration(i) * time.Hour) }

func xattrRecords(kv ...string) map[string]string {
	if len(kv) == 0 {
		return nil
	}
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return m
}

func tDir(name string, mode int64, uid, gid int, mt time.Time, xattrs ...string) tarEntry {
	return tarEntry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: gid, ModTime: mt, PAXRecords: xattrRecords(xattrs...)}}
}

func tReg(name string, data []byte, mode int64, uid, gid int, mt time.Time, xattrs ...string) tarEntry {
	return tarEntry{hdr: &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: int64(len(data)), Mode: mode, Uid: uid, Gid: gid, ModTime: mt, PAXRecords: xattrRecords(xattrs...)}, data: data}
}

func tSymlink(name, target string, mt time.Time) tarEntry {
	return tarEntry{hdr: &tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: mt}}
}

func tHardlink(name, target string) tarEntry {
	return tarEntry{hdr: &tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, ModTime: baseTime}}
}

func tDev(typ byte, name string, major, minor int64, mode int64, mt time.Time) tarEntry {
	return tarEntry{hdr: &tar.Header{Typeflag: typ, Name: name, Devmajor: major, Devminor: minor, Mode: mode, ModTime: mt}}
}

func writeTar(t testing.TB, ents []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		if err := tw.WriteHeader(e.hdr); err != nil {
			t.Fatalf("tar header %q: %v", e.hdr.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatalf("tar data %q: %v", e.hdr.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// variant is one way to convert a tar into a lazy blob.
type variant struct {
	name     string
	format   layer.Format
	minChunk int // estargz.WithMinChunkSize; 0 means every chunk its own stream
	level    int // gzip level (eStargz only)
}

var variants = []variant{
	{name: "estargz", format: layer.FormatEStargz, level: gzip.BestSpeed},
	{name: "estargz-minchunk", format: layer.FormatEStargz, minChunk: 16 << 10, level: gzip.BestSpeed},
	{name: "zstdchunked", format: layer.FormatZstdChunked},
	{name: "zstdchunked-minchunk", format: layer.FormatZstdChunked, minChunk: 16 << 10},
}

// convert turns a tar into a lazy blob the way fs/convert does, and returns
// the blob with the pin its manifest annotations would carry.
func convert(t testing.TB, tarball []byte, v variant, chunkSize int, prioritized []string) ([]byte, layer.Pin) {
	t.Helper()
	opts := []estargz.Option{estargz.WithChunkSize(chunkSize)}
	if len(prioritized) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prioritized))
	}
	if v.minChunk > 0 {
		opts = append(opts, estargz.WithMinChunkSize(v.minChunk))
	}
	var zc *zstdchunked.Compressor
	switch v.format {
	case layer.FormatEStargz:
		opts = append(opts, estargz.WithCompressionLevel(v.level))
	case layer.FormatZstdChunked:
		zc = &zstdchunked.Compressor{CompressionLevel: zstd.SpeedFastest, Metadata: map[string]string{}}
		opts = append(opts, estargz.WithCompression(struct {
			*zstdchunked.Compressor
			*zstdchunked.Decompressor
		}{zc, &zstdchunked.Decompressor{}}))
	}
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarball), 0, int64(len(tarball))), opts...)
	if err != nil {
		t.Fatalf("estargz.Build: %v", err)
	}
	data, err := io.ReadAll(blob)
	if err != nil {
		t.Fatalf("read built blob: %v", err)
	}
	if err := blob.Close(); err != nil {
		t.Fatal(err)
	}
	pin := layer.Pin{TOCDigest: blob.TOCDigest()}
	if zc != nil {
		pin.CompressedTOCDesc = digestOf(t, zc.Metadata[zstdchunked.ManifestChecksumAnnotation])
	}
	return data, pin
}

// memRanges is a RangeReader over an in-memory blob that records what it
// was asked for and can corrupt or fail reads.
type memRanges struct {
	blob []byte
	// corrupt, if set, may change the bytes of each range returned.
	corrupt func(off int64, buf []byte)
	// err, if set, is returned instead of data.
	err error

	mu    sync.Mutex
	calls int
	reads []layer.Range // Buf holds only the length asked for
}

func (m *memRanges) ReadRanges(ctx context.Context, ranges []layer.Range) error {
	m.mu.Lock()
	m.calls++
	for _, r := range ranges {
		m.reads = append(m.reads, layer.Range{Off: r.Off, Buf: make([]byte, 0, len(r.Buf))})
	}
	m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	if m.err != nil {
		return m.err
	}
	for _, r := range ranges {
		if r.Off < 0 || r.Off+int64(len(r.Buf)) > int64(len(m.blob)) {
			return fmt.Errorf("range %d+%d outside the %d-byte blob", r.Off, len(r.Buf), len(m.blob))
		}
		copy(r.Buf, m.blob[r.Off:])
		if m.corrupt != nil {
			m.corrupt(r.Off, r.Buf)
		}
	}
	return nil
}

func (m *memRanges) reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls, m.reads = 0, nil
}

func digestOf(t testing.TB, s string) digest.Digest {
	t.Helper()
	d, err := digest.Parse(s)
	if err != nil {
		t.Fatalf("digest %q: %v", s, err)
	}
	return d
}
