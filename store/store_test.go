package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func open(t *testing.T) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dir
}

func writeString(s string) FillFunc {
	return func(_ context.Context, w io.Writer) error {
		_, err := io.WriteString(w, s)
		return err
	}
}

func TestEnsureSealsVerifiedContent(t *testing.T) {
	s, _ := open(t)
	ctx := context.Background()
	content := "hello, store"
	d := digest.FromString(content)
	fetched, err := s.Ensure(ctx, d, int64(len(content)), writeString(content))
	if err != nil || !fetched {
		t.Fatalf("Ensure = %v, %v; want fetched", fetched, err)
	}
	fetched, err = s.Ensure(ctx, d, int64(len(content)), func(context.Context, io.Writer) error {
		t.Error("fill ran for an object the store has")
		return nil
	})
	if err != nil || fetched {
		t.Fatalf("second Ensure = %v, %v", fetched, err)
	}
	f, err := s.Open(d)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, _ := io.ReadAll(f)
	if string(got) != content {
		t.Fatalf("object holds %q", got)
	}
	fi, _ := f.Stat()
	if fi.Mode().Perm() != 0o444 {
		t.Errorf("object mode %v, want read-only", fi.Mode())
	}
	st, err := s.Stats()
	if err != nil || st.Objects != 1 || st.Bytes != int64(len(content)) || st.FetchedFiles != 1 {
		t.Errorf("stats = %+v, %v", st, err)
	}
}

func TestEnsureRejectsWrongContentAndLeavesNothing(t *testing.T) {
	s, dir := open(t)
	ctx := context.Background()
	d := digest.FromString("right")
	for name, tc := range map[string]struct {
		size int64
		fill FillFunc
		want error
	}{
		"other bytes":   {5, writeString("wrong"), ErrDigestMismatch},
		"short":         {5, writeString("rig"), ErrDigestMismatch},
		"long":          {5, writeString("rightt"), ErrDigestMismatch},
		"fill fails":    {5, func(context.Context, io.Writer) error { return io.ErrUnexpectedEOF }, io.ErrUnexpectedEOF},
		"right, size 4": {4, writeString("right"), ErrDigestMismatch},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := s.Ensure(ctx, d, tc.size, tc.fill)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), d.String()) {
				t.Errorf("error %q does not name the object", err)
			}
			if s.Has(d) {
				t.Fatal("a bad fill became visible")
			}
			if tmps, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmps) != 0 {
				t.Errorf("%d temporary files left", len(tmps))
			}
		})
	}
	if _, err := s.Ensure(ctx, "sha512:abc", 1, writeString("x")); err == nil {
		t.Error("a non-sha256 digest was accepted")
	}
	if _, err := s.Open(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("Open of a missing object = %v", err)
	}
}

func TestConcurrentEnsureFillsOnce(t *testing.T) {
	s, _ := open(t)
	ctx := context.Background()
	content := strings.Repeat("shared file ", 100000)
	d := digest.FromString(content)
	var fills atomic.Int32
	release := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Ensure(ctx, d, int64(len(content)), func(_ context.Context, w io.Writer) error {
				fills.Add(1)
				<-release
				_, err := io.WriteString(w, content)
				return err
			})
			errs <- err
		}()
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := fills.Load(); n != 1 {
		t.Fatalf("content filled %d times, want once", n)
	}
}

// A waiter whose leader failed retries once itself instead of inheriting a
// failure that may only have been the leader's cancelled context.
func TestWaiterRetriesAfterFailedLeader(t *testing.T) {
	s, _ := open(t)
	ctx := context.Background()
	content := "retry me"
	d := digest.FromString(content)
	leaderIn := make(chan struct{})
	leaderGo := make(chan struct{})
	go func() {
		_, _ = s.Ensure(ctx, d, int64(len(content)), func(context.Context, io.Writer) error {
			close(leaderIn)
			<-leaderGo
			return fmt.Errorf("leader cancelled")
		})
	}()
	<-leaderIn
	done := make(chan error)
	go func() {
		_, err := s.Ensure(ctx, d, int64(len(content)), writeString(content))
		done <- err
	}()
	close(leaderGo)
	if err := <-done; err != nil {
		t.Fatalf("waiter: %v", err)
	}
	if !s.Has(d) {
		t.Fatal("object missing after the waiter's own fill")
	}
}

func TestOpenSweepsTemporaryFilesAndKeepsObjects(t *testing.T) {
	s, dir := open(t)
	ctx := context.Background()
	d := digest.FromString("kept")
	if _, err := s.Ensure(ctx, d, 4, writeString("kept")); err != nil {
		t.Fatal(err)
	}
	if err := s.AddRefs("layer-a", []Ref{{Digest: d, Size: 4}}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// What a crash during a fill leaves behind.
	if err := os.WriteFile(filepath.Join(dir, "tmp", "partial"), []byte("ke"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if tmps, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmps) != 0 {
		t.Errorf("temporary files survived reopening: %d", len(tmps))
	}
	if !s2.Has(d) {
		t.Fatal("sealed object lost across reopen")
	}
	st, err := s2.Stats()
	if err != nil || st.Objects != 1 || st.Layers != 1 {
		t.Errorf("stats after reopen = %+v, %v", st, err)
	}
	if err := s2.ReleaseLayer("layer-a"); err != nil {
		t.Fatal(err)
	}
	if err := s2.ReleaseLayer("layer-a"); err != nil {
		t.Fatalf("releasing twice: %v", err)
	}
	if st, _ := s2.Stats(); st.Layers != 0 {
		t.Errorf("layers after release = %d", st.Layers)
	}
}

func TestGCUnreferencedFirstLeastRecentlyUsedFirstNeverOpen(t *testing.T) {
	s, _ := open(t)
	ctx := context.Background()
	put := func(content string) digest.Digest {
		d := digest.FromString(content)
		if _, err := s.Ensure(ctx, d, int64(len(content)), writeString(content)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	use := func(d digest.Digest) {
		h, err := s.Open(d)
		if err != nil {
			t.Fatal(err)
		}
		h.Close()
	}
	oldFree := put("unreferenced, used long ago") // 27 bytes
	newFree := put("unreferenced, used recently")
	held := put("referenced by a layer......")
	opened := put("open, unreferenced.........")
	// opened is the least recently used: only being open keeps it.
	h, err := s.Open(opened)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []digest.Digest{oldFree, newFree, held} {
		time.Sleep(time.Millisecond)
		use(d)
	}
	time.Sleep(time.Millisecond)
	use(newFree) // newer than oldFree
	if err := s.AddRefs("layer", []Ref{{Digest: held, Size: 27}}); err != nil {
		t.Fatal(err)
	}

	// A budget for two objects: oldFree goes, then newFree; opened is
	// skipped although unreferenced; held stays.
	res, err := s.GC(ctx, 2*27)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 2 || res.Freed != 54 || res.Bytes != 54 || res.Skipped != 1 {
		t.Errorf("gc = %+v", res)
	}
	for d, want := range map[digest.Digest]bool{oldFree: false, newFree: false, held: true, opened: true} {
		if s.Has(d) != want {
			t.Errorf("after gc Has(%s) = %v, want %v", d, !want, want)
		}
	}
	// An open object reads on, and goes once closed, before the
	// referenced one.
	buf := make([]byte, 4)
	if _, err := h.ReadAt(buf, 0); err != nil || string(buf) != "open" {
		t.Fatalf("read of open object: %q, %v", buf, err)
	}
	h.Close()
	if res, err := s.GC(ctx, 27); err != nil || res.Removed != 1 || !s.Has(held) || s.Has(opened) {
		t.Fatalf("second gc = %+v, %v; held %v opened %v", res, err, s.Has(held), s.Has(opened))
	}
	// Objects of layers go too when the budget demands it.
	if res, err := s.GC(ctx, 0); err != nil || res.Removed != 1 || s.Has(held) {
		t.Fatalf("gc to zero = %+v, %v", res, err)
	}
	st, err := s.Stats()
	if err != nil || st.Objects != 0 || st.Bytes != 0 || st.Layers != 1 || st.LayerFileBytes != 27 {
		t.Errorf("stats after gc = %+v, %v", st, err)
	}
	// The three collections, what they removed, and the bytes freed, for
	// metrics; a run with nothing to remove counts as a run.
	if st.GCRuns != 3 || st.GCRemoved != 4 || st.GCFreed != 4*27 {
		t.Errorf("gc counters: %d runs, %d removed, %d freed; want 3, 4, %d", st.GCRuns, st.GCRemoved, st.GCFreed, 4*27)
	}
	if _, err := s.GC(ctx, 1<<20); err != nil {
		t.Fatal(err)
	}
	if st, err := s.Stats(); err != nil || st.GCRuns != 4 || st.GCRemoved != 4 {
		t.Errorf("after a collection under budget: %d runs, %d removed, %v; want 4, 4", st.GCRuns, st.GCRemoved, err)
	}
}

func TestStatsDedup(t *testing.T) {
	s, _ := open(t)
	ctx := context.Background()
	content := "shared by two layers"
	d := digest.FromString(content)
	if _, err := s.Ensure(ctx, d, int64(len(content)), writeString(content)); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"a", "b"} {
		if err := s.AddRefs(l, []Ref{{Digest: d, Size: int64(len(content))}}); err != nil {
			t.Fatal(err)
		}
	}
	st, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Bytes != int64(len(content)) || st.LogicalBytes != 2*int64(len(content)) || st.DedupRatio() != 2 || st.DiskBytes <= 0 {
		t.Errorf("stats = %+v (ratio %v)", st, st.DedupRatio())
	}
}

func TestPartialFillsPiecesOnceAndSealsThroughEnsure(t *testing.T) {
	s, dir := open(t)
	ctx := context.Background()
	content := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
	d := digest.FromString(content)
	size := int64(len(content))
	p, err := s.Partial(d, size)
	if err != nil {
		t.Fatal(err)
	}
	piece := int64(256 << 10)
	var fetches atomic.Int32
	fetch := func(off int64) func(context.Context) ([]byte, error) {
		return func(context.Context) ([]byte, error) {
			fetches.Add(1)
			return []byte(content[off : off+piece]), nil
		}
	}
	// Concurrent readers of one piece fetch it once.
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Fill(ctx, piece, piece, fetch(piece)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := fetches.Load(); n != 1 {
		t.Fatalf("piece fetched %d times", n)
	}
	buf := make([]byte, 10)
	if _, err := p.ReadAt(buf, piece+3); err != nil || string(buf) != content[piece+3:piece+13] {
		t.Fatalf("read %q, %v", buf, err)
	}
	if _, err := p.ReadAt(buf, 0); err == nil {
		t.Fatal("read of an unfilled piece succeeded")
	}
	if err := p.Fill(ctx, 0, piece, func(context.Context) ([]byte, error) { return []byte("short"), nil }); err == nil {
		t.Fatal("a piece of the wrong size was accepted")
	}
	if err := p.Fill(ctx, size-1, piece, fetch(0)); err == nil {
		t.Fatal("a piece beyond the end was accepted")
	}
	// Sealing copies the pieces out, fetching only the missing ones.
	if _, err := s.Ensure(ctx, d, size, func(ctx context.Context, w io.Writer) error {
		for off := int64(0); off < size; off += piece {
			if err := p.Fill(ctx, off, piece, fetch(off)); err != nil {
				return err
			}
			b := make([]byte, piece)
			if _, err := p.ReadAt(b, off); err != nil {
				return err
			}
			if _, err := w.Write(b); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n := fetches.Load(); n != 4 {
		t.Errorf("%d piece fetches for 4 pieces", n)
	}
	if p.Filled() != size {
		t.Errorf("filled %d of %d", p.Filled(), size)
	}
	p.Release()
	if entries, _ := os.ReadDir(filepath.Join(dir, "partial")); len(entries) != 0 {
		t.Errorf("%d partial files left after release", len(entries))
	}
	if !s.Has(d) {
		t.Fatal("object not sealed")
	}
}

// A crash may leave sealed objects whose group commit never happened, and
// index entries whose objects a collection already removed: opening the
// store checks the former and drops the latter.
func TestOpenRecoversUncommittedObjects(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	kept := digest.FromString("committed, then its file vanished")
	if _, err := s.Ensure(ctx, kept, 33, writeString("committed, then its file vanished")); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	os.Remove(s.path(kept))
	// Objects renamed into place whose commit a crash prevented: one good,
	// one whose content is not what its name says.
	good, bad := digest.FromString("uncommitted"), digest.FromString("claimed")
	for d, content := range map[digest.Digest]string{good: "uncommitted", bad: "corrupt"} {
		p := s.path(d)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if !s2.Has(good) || s2.Has(bad) || s2.Has(kept) {
		t.Fatalf("after recovery: good %v, bad %v, vanished %v", s2.Has(good), s2.Has(bad), s2.Has(kept))
	}
	st, err := s2.Stats()
	if err != nil || st.Objects != 1 || st.Bytes != int64(len("uncommitted")) || s2.Bytes() != st.Bytes {
		t.Errorf("stats after recovery = %+v (total %d), %v", st, s2.Bytes(), err)
	}
}
