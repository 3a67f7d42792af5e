package fs

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/plan"
	"github.com/lazycas/lazycas/fs/remote"
)

// TestMissesInsideAFetchInFlightWaitForIt reads, on a slow registry, many
// neighbouring small files at once: the first miss fetches a window of
// files after it, and the misses of files inside that window, arriving
// while it is still in flight, wait for it instead of fetching their own.
func TestMissesInsideAFetchInFlightWaitForIt(t *testing.T) {
	e, entries, blob, mp := neighbours(t)
	before := e.reg.Counts(blob.Digest).Ranges
	e.reg.DelayRanges(300 * time.Millisecond)

	var wg sync.WaitGroup
	for i, en := range entries[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The first read leads; the others arrive while its window
			// is in flight.
			if i > 0 {
				time.Sleep(50 * time.Millisecond)
			}
			mustRead(t, filepath.Join(mp, en.Hdr.Name), en.Data)
		}()
	}
	wg.Wait()
	if got := e.reg.Counts(blob.Digest).Ranges - before; got != 1 {
		t.Errorf("%d range requests for 16 neighbouring files read at once, want 1", got)
	}
}

// TestReadaheadFollowsBackwardReads reads neighbouring small files one
// after the other from the last to the first, as a walk that pops a stack
// does: after the first two misses, the window holds the files before
// them, so the rest are read without a request.
func TestReadaheadFollowsBackwardReads(t *testing.T) {
	e, entries, blob, mp := neighbours(t)
	before := e.reg.Counts(blob.Digest).Ranges
	for i := len(entries) - 1; i >= 1; i-- {
		mustRead(t, filepath.Join(mp, entries[i].Hdr.Name), entries[i].Data)
	}
	if got := e.reg.Counts(blob.Digest).Ranges - before; got != 2 {
		t.Errorf("%d range requests for 16 neighbouring files read backwards, want 2", got)
	}
}

// neighbours mounts a layer of a directory of 16 small files, adjacent in
// the blob; entries[0] is the directory.
func neighbours(t *testing.T) (*env, []testlayer.Entry, *testlayer.Blob, string) {
	e := newEnv(t, Options{}, remote.Options{})
	entries := []testlayer.Entry{testlayer.Dir("d", 0o755)}
	for i := range 16 {
		entries = append(entries, testlayer.File(fmt.Sprintf("d/f%02d", i), []byte(fmt.Sprintf("file %d %0800d", i, i)), 0o644))
	}
	blob := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{})
	return e, entries, blob, e.mount("small", blob)
}

// TestSequentialMissesGrowTheWindow: a miss where the previous window
// ended (a copy, a scan) doubles the window, up to the limit; a miss
// elsewhere starts again from the base; a skipped small file still counts
// as in order.
func TestSequentialMissesGrowTheWindow(t *testing.T) {
	const base, limit = 64 << 10, 1 << 20
	var s seqReads
	off := int64(1000)
	want := []int64{base, 2 * base, 4 * base, 8 * base, limit, limit}
	for i, w := range want {
		if i == 3 {
			off += 10 << 10 // a skipped file
		}
		got := s.span(off, base, limit)
		if got != w {
			t.Fatalf("miss %d in order: window %d, want %d", i, got, w)
		}
		off += got
		s.ended(off)
	}
	if got := s.span(off+10<<20, base, limit); got != base {
		t.Errorf("a miss elsewhere: window %d, want %d", got, base)
	}
	if got := s.span(off-100<<10, base, limit); got != base {
		t.Errorf("a miss behind the last window: window %d, want %d", got, base)
	}
}

// TestMissCostRaisesTheRoundTrip: readahead sizes its windows from what a
// miss costs when that is more than the link's round trip (the work
// around the request), never less; failed misses do not count.
func TestMissCostRaisesTheRoundTrip(t *testing.T) {
	var c missCost
	l := plan.Link{RTT: 3 * time.Millisecond, Bandwidth: 12e6}
	if got := c.link(l); got != l {
		t.Fatalf("before any miss: %+v, want the link as measured %+v", got, l)
	}
	for range 40 {
		if err := c.timed(time.Now().Add(-10*time.Millisecond), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.timed(time.Now().Add(-time.Hour), errors.New("failed")); err == nil {
		t.Fatal("the miss's error was lost")
	}
	if got := c.link(l).RTT; got < 9*time.Millisecond || got > 11*time.Millisecond {
		t.Errorf("after misses of 10 ms: round trip %v, want about 10 ms", got)
	}
	slow := plan.Link{RTT: 40 * time.Millisecond, Bandwidth: 12e6}
	if got := c.link(slow); got != slow {
		t.Errorf("a link slower than its misses: %+v, want %+v", got, slow)
	}
}

// TestReadaheadGoesPastFilesTheStoreHas: a neighbour whose content the
// store already has (another file brought it) is not fetched again for
// itself, but the window goes on past it: the files after it come in the
// same request, instead of one request per file between stored ones.
func TestReadaheadGoesPastFilesTheStoreHas(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	shared := []byte(fmt.Sprintf("shared %01000d", 7))
	// x first, then a file too big for any window, so that reading x
	// fetches x alone and d/f00 is not a backward read.
	entries := []testlayer.Entry{
		testlayer.File("a-x", shared, 0o644),
		testlayer.File("b-pad", testlayer.Random(99, 3<<20), 0o644),
		testlayer.Dir("d", 0o755),
		testlayer.File("d/f00", []byte(fmt.Sprintf("first %01000d", 0)), 0o644),
		testlayer.File("d/f01", shared, 0o644),
		testlayer.File("d/f02", []byte(fmt.Sprintf("third %01000d", 2)), 0o644),
	}
	blob := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{})
	mp := e.mount("past", blob)
	mustRead(t, filepath.Join(mp, "a-x"), shared)
	before := e.reg.Counts(blob.Digest).Ranges
	for _, i := range []int{3, 5} {
		mustRead(t, filepath.Join(mp, entries[i].Hdr.Name), entries[i].Data)
	}
	if got := e.reg.Counts(blob.Digest).Ranges - before; got != 1 {
		t.Errorf("%d range requests for d/f00 and d/f02 around a stored d/f01, want 1", got)
	}
}
