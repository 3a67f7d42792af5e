package fs

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/plan"
	"github.com/lazycas/lazycas/fs/remote"
)

// manyFiles builds a layer of n small incompressible files in 10
// directories, in blob order, and mounts it; entries holds the files only.
func manyFiles(t *testing.T, n int) (*env, []testlayer.Entry, *testlayer.Blob, string) {
	e := newEnv(t, Options{}, remote.Options{})
	r := rand.New(rand.NewPCG(uint64(n), 2))
	all := []testlayer.Entry{}
	var files []testlayer.Entry
	for d := range 10 {
		all = append(all, testlayer.Dir(fmt.Sprintf("d%d", d), 0o755))
		for i := range n / 10 {
			data := make([]byte, 1024+r.IntN(2048))
			for k := range data {
				data[k] = byte(r.Uint32())
			}
			f := testlayer.File(fmt.Sprintf("d%d/f%04d", d, i), data, 0o644)
			all = append(all, f)
			files = append(files, f)
		}
	}
	blob := testlayer.Build(t, testlayer.Tar(t, all), layer.FormatEStargz, testlayer.BuildOptions{})
	return e, files, blob, e.mount("many", blob)
}

// A program reading a layer through file by file gets the rest of it
// streamed once its reads are dense: far fewer requests than files, no
// byte fetched twice, every byte right.
func TestReadingALayerThroughStreamsTheRest(t *testing.T) {
	e, files, blob, mp := manyFiles(t, 1500)
	before := e.reg.Counts(blob.Digest)
	for _, f := range files {
		mustRead(t, filepath.Join(mp, f.Hdr.Name), f.Data)
	}
	m := e.layer("many")
	if !m.streaming.Load() {
		t.Fatalf("reading all %d files did not start streaming the layer (%d opened)", len(files), m.demandN.Load())
	}
	got := e.reg.Counts(blob.Digest)
	reqs, bytes := got.Ranges-before.Ranges, got.Bytes-before.Bytes
	t.Logf("%d files of a %d-byte blob: %d range requests, %d bytes", len(files), len(blob.Data), reqs, bytes)
	if limit := int64(float64(len(files)) * plan.DenseFileFraction); reqs > limit {
		t.Errorf("%d range requests for %d files read through, want at most %d", reqs, len(files), limit)
	}
	if bytes > int64(len(blob.Data))*5/4 {
		t.Errorf("fetched %d bytes of a %d-byte blob: bytes fetched twice", bytes, int64(len(blob.Data)))
	}
	e.checkStore()
}

// Reading a small part of a layer, however many files that is, does not
// stream the rest.
func TestSparseReadsDoNotStream(t *testing.T) {
	e, files, _, mp := manyFiles(t, 1500)
	for i := 0; i < len(files); i += 20 {
		mustRead(t, filepath.Join(mp, files[i].Hdr.Name), files[i].Data)
	}
	if m := e.layer("many"); m.streaming.Load() {
		t.Errorf("reading a twentieth of the files (%d opened) streamed the layer", m.demandN.Load())
	}
}

// Speculation is given up only past the bytes its reader asked for, and
// only when finishing it would cost more than a round trip.
func TestTrimGivesUpOnlySpeculation(t *testing.T) {
	l := plan.Link{RTT: 10 * time.Millisecond, Bandwidth: 10e6} // 100 kB a round trip
	for _, tc := range []struct {
		name              string
		size, demand, got int64
		trimmed           bool
	}{
		{"reader still waiting for its bytes", 1 << 20, 100 << 10, 50 << 10, false},
		{"reader served, much left", 1 << 20, 100 << 10, 200 << 10, true},
		{"reader served, little left", 1 << 20, 100 << 10, 1<<20 - 50<<10, false},
		{"background group, much left", 1 << 20, 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWindow(0, tc.size, tc.demand)
			var cancelled bool
			w.cancel = func() { cancelled = true }
			w.progress(tc.got)
			w.trim(l)
			if cancelled != tc.trimmed {
				t.Errorf("trimmed %v, want %v", cancelled, tc.trimmed)
			}
		})
	}
}

// A reader waiting on a window goes on as soon as its own bytes are in,
// not when the whole window is.
func TestWindowServesBytesAsTheyArrive(t *testing.T) {
	w := newWindow(1000, 3000, 2000)
	done := make(chan bool)
	go func() {
		ok, _ := w.waitFor(context.Background(), 1000, 2000)
		done <- ok
	}()
	w.progress(500)
	select {
	case <-done:
		t.Fatal("served before its bytes arrived")
	case <-time.After(20 * time.Millisecond):
	}
	w.progress(1000)
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("not served from the window")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("still waiting after its bytes arrived")
	}
	if !w.holds(2500, 3000) {
		t.Error("a window still filling should promise its later bytes")
	}
}
