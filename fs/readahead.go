package fs

import (
	"context"
	"errors"
	"slices"
	"sort"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/plan"
	"github.com/lazycas/lazycas/metadata"
)

// fileSpan is where a regular file's compressed bytes lie in the blob.
type fileSpan struct {
	off, end int64
	id       uint64
}

// spans lists the layer's files in blob order, once: from metadata after
// a restore (Mount hands them over from the TOC it just read).
func (m *mounted) spans() []fileSpan {
	m.spansOnce.Do(func() {
		var spans []fileSpan
		err := m.meta.Walk(func(n *metadata.Node) error {
			spans = appendSpan(spans, n)
			return nil
		})
		if err != nil {
			log.L.WithError(err).WithField("layer", m.meta.Info.Digest).Warn("list files for readahead")
			return
		}
		m.fileSpans = sortSpans(spans)
	})
	return m.fileSpans
}

// fileSpans returns where the regular files of nodes lie, in blob order.
func fileSpans(nodes []*metadata.Node) []fileSpan {
	spans := []fileSpan{}
	for _, n := range nodes {
		spans = appendSpan(spans, n)
	}
	return sortSpans(spans)
}

func appendSpan(spans []fileSpan, n *metadata.Node) []fileSpan {
	if n.Type == metadata.TypeReg && n.Size > 0 && len(n.Chunks) > 0 {
		off, end := blobSpan(n)
		spans = append(spans, fileSpan{off, end, n.ID})
	}
	return spans
}

// blobSpan is where n's compressed bytes lie in the blob; n has chunks.
func blobSpan(n *metadata.Node) (off, end int64) {
	return n.Chunks[0].Offset, n.Chunks[len(n.Chunks)-1].End
}

func sortSpans(spans []fileSpan) []fileSpan {
	sort.Slice(spans, func(i, j int) bool { return spans[i].off < spans[j].off })
	return spans
}

// fetchAround fills the store with n, fetching the files next to it in
// the blob in the same request (those after it, or before it when reads go
// backwards); n is sealed when it returns, the others in the background.
//
// How far around is the link's bandwidth-delay product (fs/plan): the
// neighbours cost at most the round trip they may save. n's bytes come
// first in their request and n is served as soon as they are in; the rest
// arrives behind them, and is given up if another reader needs the link
// before it is worth finishing.
func (m *mounted) fetchAround(ctx context.Context, n *metadata.Node) error {
	start, end := blobSpan(n)
	fileStart, fileEnd := start, end
	b, err := m.remoteBlob(ctx)
	if err != nil {
		return err
	}
	next := blobRanges{b}
	// A window fetched or being fetched for an earlier miss, a group of
	// background fetch, the start-up files or a stream may hold this
	// file: read it from there, not again.
	if w := m.window(start, end); w != nil {
		return m.ensure(ctx, n, &prefetched{win: w, next: next, reader: true})
	}
	t0 := time.Now()
	link := linkOf(b)
	m.fs.trimSpeculation(link)
	// A neighbour read later saves a whole miss: the round trip, and the
	// work on both ends around it that the link model does not see.
	span := plan.Readahead(m.fs.misses.link(link), plan.Useful(m.specBytes.Load(), m.specRead.Load()))
	// A reader going through the blob in order (a copy, a scan) misses
	// right where the previous window ended: each such miss doubles the
	// window, up to a stream request, so a scan soon moves long requests
	// whose round trips hardly count instead of paying one per window.
	span = m.seq.span(start, span, plan.StreamRequest(link))
	if end-start >= span {
		m.seq.ended(end)
		return m.ensure(ctx, n, nil)
	}
	// Programs read a directory's files in either order (a walk popping
	// a stack reads them backwards): a miss just before the previous one
	// fetches the files before it, else those after it.
	prev := m.lastMiss.Swap(start)
	backward := prev > start && prev-start <= 2*span
	spans := m.spans()
	var more []uint64
	if backward {
		i := sort.Search(len(spans), func(i int) bool { return spans[i].off >= start })
		for i--; i >= 0; i-- {
			sp := spans[i]
			if fileEnd-sp.off > span || start-sp.end > groupGap || sp.end > start {
				break
			}
			if !m.worthFetching(sp.id, n) {
				continue // a gap: see below
			}
			more = append(more, sp.id)
			start = sp.off
		}
	} else {
		i := sort.Search(len(spans), func(i int) bool { return spans[i].off > start })
		for ; i < len(spans); i++ {
			sp := spans[i]
			if sp.end-start > span || sp.off-end > groupGap || sp.off < end {
				break
			}
			if !m.worthFetching(sp.id, n) {
				// The store has it (the same content came with another
				// file): not sealed again, but the window goes on past
				// it as past a gap, so that files after it still come
				// in this request.
				continue
			}
			more = append(more, sp.id)
			end = sp.end
		}
	}
	if !backward {
		m.seq.ended(end)
	}
	if len(more) == 0 {
		return m.fs.misses.timed(t0, m.ensure(ctx, n, nil))
	}
	// Backwards, the file is the window's last bytes: all of it is
	// demand. Forwards only the file is, and the rest may be trimmed.
	demandEnd := fileEnd
	if backward {
		demandEnd = end
	}
	w, fresh := m.claimWindow(fileStart, fileEnd, start, end, demandEnd)
	pre := &prefetched{win: w, next: next, reader: true}
	if !fresh {
		// Another miss claimed a window holding this file meanwhile.
		return m.ensure(ctx, n, pre)
	}
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		if err := w.fill(m.bg, b, m.fs); err != nil && !errors.Is(err, errTrimmed) && m.bg.Err() == nil {
			log.L.WithError(err).WithField("layer", m.meta.Info.Digest).Debug("readahead window")
		}
	}()
	go func() {
		defer m.wg.Done()
		m.sealFrom(w, more, true)
	}()
	return m.fs.misses.timed(t0, m.ensure(ctx, n, pre))
}

// missCost follows how long a reader's miss of a small file takes, from
// the miss to the file served: a moving average over the recent ones.
type missCost struct {
	avg atomic.Int64 // nanoseconds; 0 until the first miss
}

// timed records the miss that started at t0 if it succeeded, and returns
// its error.
func (c *missCost) timed(t0 time.Time, err error) error {
	if err != nil {
		return err
	}
	d := int64(time.Since(t0))
	// Updates racing each other may lose one: an average, not a count.
	if old := c.avg.Load(); old == 0 {
		c.avg.Store(d)
	} else {
		c.avg.Store(old + (d-old)/8)
	}
	return nil
}

// link is l with its round trip raised to the measured cost of a miss,
// where that is longer: the time a neighbour fetched ahead saves.
func (c *missCost) link(l plan.Link) plan.Link {
	l.RTT = max(l.RTT, time.Duration(c.avg.Load()))
	return l
}

// seqReads follows whether a layer's misses come one after the other in
// the blob. Concurrent misses may interleave their updates: the run is a
// heuristic, never a correctness matter.
type seqReads struct {
	end atomic.Int64 // where the last forward window ended; 0: none yet
	run atomic.Int64 // misses in a row at end
}

// span is the window for a miss at blob offset start: base, doubled for
// each miss in a row that came where the previous window ended (a gap of
// up to groupGap allowed: a file the reader skipped), up to limit.
func (s *seqReads) span(start, base, limit int64) int64 {
	if prev := s.end.Load(); prev > 0 && start >= prev && start-prev <= groupGap {
		run := min(s.run.Add(1), 16)
		return max(base, min(base<<run, limit))
	}
	s.run.Store(0)
	return base
}

// ended records where the window fetched for a forward miss ends.
func (s *seqReads) ended(end int64) { s.end.Store(end) }

// worthFetching reports whether the file id, a neighbour of the missed
// file n, is worth fetching along with it: not when the store has its
// content (from any layer) or n is the same content.
func (m *mounted) worthFetching(id uint64, n *metadata.Node) bool {
	o, err := m.meta.Node(id)
	return err == nil && o.Digest != n.Digest && !m.fs.store.Has(digest.Digest(o.Digest))
}

// sealFrom seals the files ids of window w as its bytes arrive, skipping
// those it does not get (trimmed) and those the store has. speculative
// counts them as readahead's guesses, whose reads tune its windows.
func (m *mounted) sealFrom(w *window, ids []uint64, speculative bool) {
	pre := &prefetched{win: w, next: noFetch{}, reader: true}
	for _, id := range ids {
		if m.bg.Err() != nil {
			return
		}
		o, err := m.meta.Node(id)
		if err != nil || m.fs.store.Has(digest.Digest(o.Digest)) || m.piecewise(o) {
			continue
		}
		off, end := blobSpan(o)
		if ok, err := w.waitFor(m.bg, off, end); err != nil || !ok {
			continue
		}
		if err := m.ensure(m.bg, o, pre); err != nil {
			log.L.WithError(err).WithField("inode", id).Debug("readahead")
			continue
		}
		if speculative {
			m.speculated(o, end-off)
		}
	}
}

// speculated notes that readahead brought n (size compressed bytes)
// without a reader asking; a reader's first open of it later counts it
// read (opened).
func (m *mounted) speculated(n *metadata.Node, size int64) {
	if _, opened := m.openedIDs.Load(n.ID); opened {
		return
	}
	if _, dup := m.specIDs.LoadOrStore(n.ID, size); !dup {
		m.specBytes.Add(size)
	}
}

// noFetch is the RangeReader behind a window whose files are sealed only
// if the window holds them.
type noFetch struct{}

func (noFetch) ReadRanges(context.Context, []layer.Range) error {
	return errors.New("bytes outside the window")
}

// maxWindows bounds the readahead and group windows kept in memory per
// layer.
const maxWindows = 8

// window returns a recent window holding, or fetching, [start, end).
func (m *mounted) window(start, end int64) *window {
	m.winMu.Lock()
	defer m.winMu.Unlock()
	for i := len(m.windows) - 1; i >= 0; i-- {
		if w := m.windows[i]; w.holds(start, end) {
			return w
		}
	}
	return nil
}

// claimWindow returns a window holding or fetching [fileStart, fileEnd),
// or else a new one over [start, end) for the caller to fill (fresh).
func (m *mounted) claimWindow(fileStart, fileEnd, start, end, demandEnd int64) (w *window, fresh bool) {
	m.winMu.Lock()
	defer m.winMu.Unlock()
	for i := len(m.windows) - 1; i >= 0; i-- {
		if w := m.windows[i]; w.holds(fileStart, fileEnd) {
			return w, false
		}
	}
	return m.addWindowLocked(newWindow(start, end-start, demandEnd)), true
}

// addWindow remembers a window and returns it, forgetting the oldest
// beyond maxWindows: their files are sealed by then, or fetched again if
// not.
// claimStream adds a window over the first of the picked spans that no
// window overlaps, checking and adding under the lock readers claim their
// windows with (claimWindow): a reader that took some of the files since
// the stream picked them keeps them, and no byte is fetched twice. It
// returns the window (nil when the first picked span is taken) and how
// many of the picked spans it holds.
func (m *mounted) claimStream(spans []fileSpan, picked []int) (*window, int) {
	m.winMu.Lock()
	defer m.winMu.Unlock()
	n := 0
	for _, j := range picked {
		if slices.ContainsFunc(m.windows, func(w *window) bool { return w.overlaps(spans[j].off, spans[j].end) }) {
			break
		}
		n++
	}
	if n == 0 {
		return nil, 0
	}
	first, last := spans[picked[0]], spans[picked[n-1]]
	return m.addWindowLocked(newWindow(first.off, last.end-first.off, last.end)), n
}

func (m *mounted) addWindow(w *window) *window {
	m.winMu.Lock()
	defer m.winMu.Unlock()
	return m.addWindowLocked(w)
}

func (m *mounted) addWindowLocked(w *window) *window {
	m.windows = append(m.windows, w)
	if len(m.windows) > maxWindows {
		m.windows = append(m.windows[:0:0], m.windows[len(m.windows)-maxWindows:]...)
	}
	return w
}
