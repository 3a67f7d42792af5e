package layer_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"sync"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

// manyEmptyFiles is a layer of 200,000 empty files in 400 directories:
// its TOC is about 40 MB of JSON, nearly all of it names and attributes.
func manyEmptyFiles(b *testing.B) *testlayer.Blob {
	manyOnce.Do(func() { manyBlob = buildManyEmptyFiles(b) })
	if manyBlob == nil {
		b.Fatal("no layer")
	}
	return manyBlob
}

var (
	manyOnce sync.Once
	manyBlob *testlayer.Blob
)

// buildManyEmptyFiles streams the tar through estargz's writer: its Build
// fails on this tar with "too many open files" (RLIMIT_NOFILE 20,000 here).
func buildManyEmptyFiles(b *testing.B) *testlayer.Blob {
	const dirs, perDir = 400, 500
	entries := make([]testlayer.Entry, 0, dirs*(perDir+1))
	for d := range dirs {
		dir := fmt.Sprintf("usr/share/many/d%04d/", d)
		entries = append(entries, testlayer.Dir(dir, 0o755))
		for f := range perDir {
			entries = append(entries, testlayer.File(fmt.Sprintf("%sempty-file-%06d.txt", dir, d*perDir+f), nil, 0o644))
		}
	}
	var buf bytes.Buffer
	w := estargz.NewWriterLevel(&buf, gzip.BestSpeed)
	if err := w.AppendTar(bytes.NewReader(testlayer.Tar(b, entries))); err != nil {
		b.Fatal(err)
	}
	tocDigest, err := w.Close()
	if err != nil {
		b.Fatal(err)
	}
	return &testlayer.Blob{Format: layer.FormatEStargz, Data: buf.Bytes(), Digest: digest.FromBytes(buf.Bytes()), TOCDigest: tocDigest}
}

// peakHeap runs fn and returns the most heap its objects took meanwhile
// above what they took before, sampled every millisecond.
func peakHeap(fn func()) uint64 {
	runtime.GC()
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	read := func() uint64 { metrics.Read(sample); return sample[0].Value.Uint64() }
	base := read()
	var peak uint64
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			peak = max(peak, read())
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	fn()
	close(stop)
	<-done
	peak = max(peak, read())
	return peak - min(base, peak)
}

// BenchmarkImportManyEmptyFiles is the mount-time import of a layer of
// 200,000 empty files: its TOC read and verified, validated entry by
// entry, and stored in metadata as it goes. peak-heap-MB is the most heap the
// import took at once; the daemon's RSS follows it.
func BenchmarkImportManyEmptyFiles(b *testing.B) {
	blob := manyEmptyFiles(b)
	dir := b.TempDir()
	var peak uint64
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		db, err := metadata.Open(filepath.Join(dir, fmt.Sprintf("%d.db", i)))
		if err != nil {
			b.Fatal(err)
		}
		peak = max(peak, peakHeap(func() {
			// As a mount imports it: straight into metadata.
			w := db.NewWriter("layer")
			_, sum, err := layer.Import(context.Background(), bytes.NewReader(blob.Data), int64(len(blob.Data)), layer.Pin{TOCDigest: blob.TOCDigest}, w)
			if err != nil {
				b.Fatal(err)
			}
			if err := w.Commit(metadata.LayerInfo{Prefetch: sum.Prefetch}); err != nil {
				b.Fatal(err)
			}
		}))
		db.Close()
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MB")
}
