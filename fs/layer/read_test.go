package layer_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

const readChunk = 256

var readContent = randomBytes(5, 3*readChunk-100) // three chunks

// oneFileLayer converts a layer holding "f" (readContent) and "g" and
// returns the blob, its format and f's node.
func oneFileLayer(t *testing.T, v variant) ([]byte, *metadata.Node) {
	t.Helper()
	tarball := writeTar(t, []tarEntry{
		tReg("f", readContent, 0o644, 0, 0, mtime(0)),
		tReg("g", []byte("after f"), 0o644, 0, 0, mtime(0)),
	})
	blob, pin := convert(t, tarball, v, readChunk, nil)
	toc, err := layer.ReadTOC(context.Background(), bytes.NewReader(blob), int64(len(blob)), pin)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := layer.Build(toc)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range tree.Nodes {
		if n.Type == metadata.TypeReg && n.Size == int64(len(readContent)) {
			if len(n.Chunks) != 3 {
				t.Fatalf("f has %d chunks, want 3", len(n.Chunks))
			}
			return blob, n
		}
	}
	t.Fatal("f not found")
	return nil, nil
}

// verifiedPrefix reports whether out is the start of want cut at a chunk
// boundary: bytes of a chunk reach the writer only once verified.
func verifiedPrefix(out, want []byte, n *metadata.Node) bool {
	if !bytes.HasPrefix(want, out) {
		return false
	}
	for _, c := range n.Chunks {
		if int64(len(out)) == c.FileOffset {
			return true
		}
	}
	return len(out) == len(want)
}

// TestWriteFileNeverServesUnverifiedBytes flips each byte of a file's
// compressed chunks in turn: WriteFile either returns the exact content or
// fails having written only whole verified chunks.
func TestWriteFileNeverServesUnverifiedBytes(t *testing.T) {
	for _, v := range []variant{
		{name: "estargz-stored", format: layer.FormatEStargz, level: gzip.NoCompression},
		{name: "estargz", format: layer.FormatEStargz, level: gzip.BestCompression},
		{name: "zstdchunked", format: layer.FormatZstdChunked},
	} {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			blob, n := oneFileLayer(t, v)
			ctx := context.Background()
			var digestErrs, otherErrs, clean int
			for at := n.Chunks[0].Offset; at < n.Chunks[len(n.Chunks)-1].End; at++ {
				rr := &memRanges{blob: blob, corrupt: func(off int64, buf []byte) {
					if at >= off && at < off+int64(len(buf)) {
						buf[at-off] ^= 0x01
					}
				}}
				var out bytes.Buffer
				err := layer.WriteFile(ctx, rr, v.format, n, &out)
				switch {
				case err == nil:
					clean++
					if !bytes.Equal(out.Bytes(), readContent) {
						t.Fatalf("flipping blob byte %d: WriteFile succeeded with wrong content", at)
					}
				case errors.Is(err, layer.ErrChunkDigest):
					digestErrs++
				default:
					otherErrs++
				}
				if err != nil && !verifiedPrefix(out.Bytes(), readContent, n) {
					t.Fatalf("flipping blob byte %d: %d unverified bytes written before %v", at, out.Len(), err)
				}
			}
			t.Logf("%d flips: %d chunk digest errors, %d decompression errors, %d harmless", digestErrs+otherErrs+clean, digestErrs, otherErrs, clean)
			if v.format == layer.FormatEStargz && v.level == gzip.NoCompression && digestErrs < len(readContent) {
				// Stored data: every content byte flipped is a content byte
				// changed, which only the chunk digest can catch.
				t.Errorf("only %d of %d content flips gave ErrChunkDigest", digestErrs, len(readContent))
			}
			if digestErrs+otherErrs == 0 {
				t.Error("no flip was detected")
			}
		})
	}
}

func TestWriteFileChecksChunkDigests(t *testing.T) {
	for _, v := range []variant{variants[0], variants[2]} {
		t.Run(v.name, func(t *testing.T) {
			blob, n := oneFileLayer(t, v)
			ctx := context.Background()

			t.Run("a chunk that does not match its digest fails after the verified ones", func(t *testing.T) {
				m := *n
				m.Chunks = append([]metadata.Chunk(nil), n.Chunks...)
				m.Chunks[1].Digest = digest.FromString("other").String()
				var out bytes.Buffer
				err := layer.WriteFile(ctx, &memRanges{blob: blob}, v.format, &m, &out)
				if !errors.Is(err, layer.ErrChunkDigest) {
					t.Fatalf("error %v, want ErrChunkDigest", err)
				}
				if !strings.Contains(err.Error(), fmt.Sprintf("file offset %d", readChunk)) {
					t.Errorf("error %q does not say which chunk", err)
				}
				if !bytes.Equal(out.Bytes(), readContent[:readChunk]) {
					t.Errorf("wrote %d bytes, want only the first, verified chunk", out.Len())
				}
			})

			t.Run("without chunk digests only the file digest catches corruption", func(t *testing.T) {
				m := *n
				m.Chunks = append([]metadata.Chunk(nil), n.Chunks...)
				for i := range m.Chunks {
					m.Chunks[i].Digest = ""
				}
				// Change what the TOC says the chunk holds: a different
				// range of the same stream decompresses fine.
				m.Chunks[0].InnerOffset, m.Chunks[0].Size, m.Chunks[1].FileOffset = 1, m.Chunks[0].Size-1, m.Chunks[1].FileOffset-1
				var out bytes.Buffer
				if err := layer.WriteFile(ctx, &memRanges{blob: blob}, v.format, &m, &out); err != nil {
					t.Fatalf("WriteFile: %v", err)
				}
				if sha256Hex(out.Bytes()) == n.Digest {
					t.Error("shifted content hashes to the file digest")
				}
			})
		})
	}
}

func TestWriteFileErrors(t *testing.T) {
	blob, n := oneFileLayer(t, variants[0])
	errBoom := errors.New("boom")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	withChunks := func(edit func([]metadata.Chunk)) *metadata.Node {
		m := *n
		m.Chunks = append([]metadata.Chunk(nil), n.Chunks...)
		edit(m.Chunks)
		return &m
	}
	cases := []struct {
		name   string
		ctx    context.Context
		rr     *memRanges
		format layer.Format
		node   *metadata.Node
		is     error
		msg    string
	}{
		{name: "a reader error is returned wrapped", rr: &memRanges{blob: blob, err: errBoom}, is: errBoom},
		{name: "a cancelled context", ctx: cancelled, rr: &memRanges{blob: blob}, is: context.Canceled},
		{name: "zeros instead of data", rr: &memRanges{blob: blob, corrupt: func(_ int64, b []byte) { clear(b) }}, msg: "decompress"},
		{name: "the other format's decompressor", rr: &memRanges{blob: blob}, format: layer.FormatZstdChunked, msg: "decompress"},
		{name: "an unknown format", rr: &memRanges{blob: blob}, format: "squashfs", msg: "unknown layer format"},
		{name: "not a regular file", rr: &memRanges{blob: blob}, node: &metadata.Node{ID: 7, Type: metadata.TypeDir}, msg: "inode 7 is not a regular file"},
		{name: "an inner offset past the stream", rr: &memRanges{blob: blob}, node: withChunks(func(c []metadata.Chunk) { c[2].InnerOffset = 1 << 20 }), msg: "decompress"},
		{name: "a chunk larger than its stream", rr: &memRanges{blob: blob}, node: withChunks(func(c []metadata.Chunk) { c[2].Size = 1 << 20 }), msg: "decompress"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, format, node := c.ctx, c.format, c.node
			if ctx == nil {
				ctx = context.Background()
			}
			if format == "" {
				format = layer.FormatEStargz
			}
			if node == nil {
				node = n
			}
			var out bytes.Buffer
			err := layer.WriteFile(ctx, c.rr, format, node, &out)
			if err == nil {
				t.Fatalf("no error; wrote %d bytes", out.Len())
			}
			if c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("error %q is not %q", err, c.is)
			}
			if !strings.Contains(err.Error(), c.msg) {
				t.Errorf("error %q does not say %q", err, c.msg)
			}
			if !verifiedPrefix(out.Bytes(), readContent, n) {
				t.Errorf("%d unverified bytes written", out.Len())
			}
		})
	}
}
