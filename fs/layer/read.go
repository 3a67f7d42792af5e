package layer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/zstd"

	"github.com/lazycas/lazycas/metadata"
)

// ErrChunkDigest means fetched bytes did not match the TOC.
var ErrChunkDigest = errors.New("chunk digest mismatch")

// Range is a piece of the blob to read into Buf.
type Range struct {
	Off int64
	Buf []byte
}

// RangeReader reads pieces of a blob; several ranges in one call let the
// reader coalesce them into few requests.
type RangeReader interface {
	ReadRanges(ctx context.Context, ranges []Range) error
}

// maxBatch bounds the compressed bytes held in memory for one file at once.
const maxBatch = 8 << 20

// WriteFile fetches the chunks of regular file n, decompresses them, checks
// each against its chunk digest and writes the file's content to w in
// order. The caller checks the whole file against n.Digest.
func WriteFile(ctx context.Context, r RangeReader, f Format, n *metadata.Node, w io.Writer) error {
	if n.Type != metadata.TypeReg {
		return fmt.Errorf("inode %d is not a regular file", n.ID)
	}
	dec, err := Decompressor(f)
	if err != nil {
		return err
	}
	chunks := n.Chunks
	for len(chunks) > 0 {
		// Chunks of a file are adjacent in the blob: read a batch of them
		// as one range.
		k := 1
		for k < len(chunks) && chunks[k].End-chunks[0].Offset <= maxBatch && chunks[k].Offset >= chunks[k-1].Offset {
			k++
		}
		batch := chunks[:k]
		chunks = chunks[k:]
		base := batch[0].Offset
		buf := make([]byte, batch[k-1].End-base)
		if err := r.ReadRanges(ctx, []Range{{Off: base, Buf: buf}}); err != nil {
			return err
		}
		for _, c := range batch {
			if err := writeChunk(f, dec, buf[c.Offset-base:c.End-base], c, w); err != nil {
				return fmt.Errorf("chunk at file offset %d: %w", c.FileOffset, err)
			}
		}
	}
	return nil
}

// ReadChunk fetches, decompresses and checks one chunk of a file: what a
// read of part of a large file needs. The chunk must have a digest: an
// unverifiable piece is never served on its own.
func ReadChunk(ctx context.Context, r RangeReader, f Format, c metadata.Chunk) ([]byte, error) {
	if c.Digest == "" {
		return nil, fmt.Errorf("chunk at file offset %d has no digest to verify it alone", c.FileOffset)
	}
	dec, err := Decompressor(f)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, c.End-c.Offset)
	if err := r.ReadRanges(ctx, []Range{{Off: c.Offset, Buf: buf}}); err != nil {
		return nil, err
	}
	var out bytes.Buffer
	out.Grow(int(c.Size))
	if err := writeChunk(f, dec, buf, c, &out); err != nil {
		return nil, fmt.Errorf("chunk at file offset %d: %w", c.FileOffset, err)
	}
	return out.Bytes(), nil
}

func writeChunk(f Format, dec estargz.Decompressor, compressed []byte, c metadata.Chunk, w io.Writer) error {
	var zr io.Reader
	switch f {
	case FormatZstdChunked:
		// A zstd decoder is costly to make (megabytes of tables): reuse them.
		d := zstdDecoders.Get().(*zstd.Decoder)
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(compressed)); err != nil {
			return fmt.Errorf("decompress: %w", err)
		}
		zr = d
	default:
		rc, err := dec.Reader(bytes.NewReader(compressed))
		if err != nil {
			return fmt.Errorf("decompress: %w", err)
		}
		defer rc.Close()
		zr = rc
	}
	if c.InnerOffset > 0 {
		if _, err := io.CopyN(io.Discard, zr, c.InnerOffset); err != nil {
			return fmt.Errorf("decompress: %w", err)
		}
	}
	data := make([]byte, c.Size)
	if _, err := io.ReadFull(zr, data); err != nil {
		return fmt.Errorf("decompress: %w", err)
	}
	if c.Digest != "" {
		sum := sha256.Sum256(data)
		if got := "sha256:" + hex.EncodeToString(sum[:]); got != c.Digest {
			return fmt.Errorf("%w: got %s, want %s", ErrChunkDigest, got, c.Digest)
		}
	}
	_, err := w.Write(data)
	return err
}

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstdOptions...)
	if err != nil {
		panic(fmt.Sprintf("zstd decoder with static options: %v", err))
	}
	return d
}}
