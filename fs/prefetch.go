package fs

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

// Grouping of small files into one range request while prefetching. A
// group is also what background fetch has in flight per worker when a
// reader's request arrives: on a 100 Mbit/s link 1 MiB is 85 ms of queue.
const (
	groupSpan = 1 << 20  // compressed bytes one group may span
	groupGap  = 64 << 10 // a larger hole between files starts a new group
)

// Phase is where a layer's prefetch and background fetch are.
type Phase int32

const (
	// PhaseOff is a layer with neither prefetch nor background fetch.
	PhaseOff Phase = iota
	// PhasePrefetch fetches the files before the prefetch landmark.
	PhasePrefetch
	// PhaseWaiting waits BackgroundDelay before background fetch.
	PhaseWaiting
	// PhaseFetching fetches the rest of the layer in the background.
	PhaseFetching
	// PhaseDone fetched all it was to fetch: the prefetch list without
	// background fetch, else every file (or left the rest to a stream).
	PhaseDone
	// PhaseIncomplete ended with files not fetched, after an error or
	// maxFetchPasses passes trimmed for readers: those are fetched
	// when read.
	PhaseIncomplete
	numPhases
)

var phaseNames = [numPhases]string{"off", "prefetch", "waiting", "fetching", "done", "incomplete"}

// String is the phase's metric label value.
func (p Phase) String() string { return phaseNames[p] }

// Phases lists every phase, for exporting all of them.
func Phases() []Phase {
	return []Phase{PhaseOff, PhasePrefetch, PhaseWaiting, PhaseFetching, PhaseDone, PhaseIncomplete}
}

// startFetch starts fetching the layer's files in the background: the
// prefetch list first, then (with Background) the rest. Files the store
// has are skipped; a read by a container never waits behind this queue,
// it fetches its file itself (or joins this fetch of the same file).
func (m *mounted) startFetch() {
	ctx := m.bg // set by serve, cancelled by stop
	go func() {
		defer close(m.done)
		if !m.fs.opts.Prefetch && !m.fs.opts.Background {
			return
		}
		start := time.Now()
		var files int
		var bytes int64
		var err error
		if m.fs.opts.Prefetch {
			m.bgPhase.Store(int32(PhasePrefetch))
			files, bytes, err = m.fetchAll(ctx, true)
		}
		if err == nil && m.fs.opts.Background {
			// A container usually starts right after its layers are
			// mounted: its first reads get the link to themselves.
			m.bgPhase.Store(int32(PhaseWaiting))
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-time.After(m.fs.opts.BackgroundDelay):
			}
			if err == nil {
				m.bgPhase.Store(int32(PhaseFetching))
				var f int
				var b int64
				f, b, err = m.fetchAll(ctx, false)
				files, bytes = files+f, bytes+b
			}
		}
		if err == nil {
			m.bgPhase.Store(int32(PhaseDone))
		} else {
			m.bgPhase.Store(int32(PhaseIncomplete))
		}
		l := log.G(ctx).WithFields(log.Fields{
			"key": m.key, "layer": m.meta.Info.Digest, "files": files, "bytes": bytes,
			"took": time.Since(start).Round(time.Millisecond),
		})
		switch {
		case errors.Is(err, context.Canceled):
			l.Debug("layer fetch stopped")
		case err != nil:
			l.WithError(err).Warn("layer fetch incomplete: the rest is fetched when read")
		default:
			l.Info("layer fetched")
		}
	}()
}

// fetchAll fetches the prefetch list, or all files, and returns how many
// files and bytes it put into the store.
func (m *mounted) fetchAll(ctx context.Context, prefetchList bool) (files int, bytes int64, err error) {
	var order []*metadata.Node
	seen := map[string]bool{}
	add := func(n *metadata.Node) {
		if n.Type == metadata.TypeReg && n.Size > 0 && !seen[n.Digest] && len(n.Chunks) > 0 {
			seen[n.Digest] = true
			order = append(order, n)
		}
	}
	if prefetchList {
		for _, id := range m.meta.Info.Prefetch {
			n, err := m.meta.Node(id)
			if err != nil {
				return 0, 0, err
			}
			add(n)
		}
	}
	if !prefetchList {
		if err := m.meta.Walk(func(n *metadata.Node) error { add(n); return nil }); err != nil {
			return 0, 0, err
		}
	}

	// Groups trimmed for readers are fetched again in a later pass; the
	// passes are bounded so that a reader that never pauses cannot keep
	// background fetch going for ever (what is left is fetched when read).
	for pass := 0; pass < maxFetchPasses; pass++ {
		f, b, trimmed, err := m.fetchPass(ctx, order)
		files, bytes = files+f, bytes+b
		if err != nil || !trimmed {
			return files, bytes, err
		}
	}
	return files, bytes, nil
}

// maxFetchPasses bounds the passes of one fetchAll.
const maxFetchPasses = 8

// fetchPass fetches the files of order the store lacks, in groups, and
// reports whether any group was trimmed for a reader.
func (m *mounted) fetchPass(ctx context.Context, order []*metadata.Node) (files int, bytes int64, trimmed bool, err error) {
	groups := make(chan []*metadata.Node)
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	for range m.fs.opts.FetchConcurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for g := range groups {
				n, b, err := m.fetchGroup(ctx, g, false)
				// The group is handled, fetched or not: what is left
				// of it is for a later pass or for readers.
				var gb int64
				for _, n := range g {
					gb += n.Size
				}
				m.bgPendingFiles.Add(-int64(len(g)))
				m.bgPendingBytes.Add(-gb)
				m.bgFetchedFiles.Add(int64(n))
				m.bgFetchedBytes.Add(b)
				mu.Lock()
				files += n
				bytes += b
				if errors.Is(err, errTrimmed) {
					trimmed = true
					err = errors.Join(slices.DeleteFunc(unjoin(err), func(e error) bool { return e == errTrimmed })...)
				}
				if err != nil && len(errs) < 8 {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		}()
	}
	var todo []*metadata.Node
	var todoBytes int64
	for _, n := range order {
		if !m.fs.store.Has(digest.Digest(n.Digest)) {
			todo = append(todo, n)
			todoBytes += n.Size
		}
	}
	// What this pass has to fetch, counted down as its groups are
	// handled; nothing once it ends (groups left unfed are no longer
	// its to fetch: the layer is being streamed, or unmounted).
	m.bgPendingFiles.Store(int64(len(todo)))
	m.bgPendingBytes.Store(todoBytes)
	defer func() {
		m.bgPendingFiles.Store(0)
		m.bgPendingBytes.Store(0)
	}()
feed:
	for _, g := range groupNodes(todo) {
		if m.streaming.Load() {
			// The layer is being read through: the stream brings the rest.
			break
		}
		select {
		case groups <- g:
		case <-ctx.Done():
			break feed
		}
	}
	close(groups)
	wg.Wait()
	if ctx.Err() != nil {
		return files, bytes, trimmed, ctx.Err()
	}
	return files, bytes, trimmed, errors.Join(errs...)
}

// unjoin lists the errors an errors.Join made, or err alone.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// groupNodes splits files, in blob order, into groups fetched with one
// range request each: adjacent files, no hole over groupGap, no group over
// groupSpan (a file bigger than that is a group of its own).
func groupNodes(files []*metadata.Node) [][]*metadata.Node {
	var groups [][]*metadata.Node
	for _, n := range files {
		if k := len(groups); k > 0 {
			g := groups[k-1]
			start, _ := blobSpan(g[0])
			_, end := blobSpan(g[len(g)-1])
			nStart, nEnd := blobSpan(n)
			if nStart >= end && nStart-end <= groupGap && nEnd-start <= groupSpan {
				groups[k-1] = append(g, n)
				continue
			}
		}
		groups = append(groups, []*metadata.Node{n})
	}
	return groups
}

// fetchGroup fetches files adjacent in the blob with one range read, then
// seals each into the store. For a reader (start-up files) the read counts
// as a reader's; otherwise it is background work: it waits for readers and
// keeps to the bandwidth cap.
//
// A background group whose fetch was trimmed for a reader seals the files
// that arrived and returns errTrimmed: the caller fetches the rest later.
func (m *mounted) fetchGroup(ctx context.Context, g []*metadata.Node, reader bool) (files int, bytes int64, err error) {
	var trimmed error
	// A reader may have brought some since the group was formed.
	g = slices.DeleteFunc(slices.Clone(g), func(n *metadata.Node) bool { return m.fs.store.Has(digest.Digest(n.Digest)) })
	if len(g) == 0 {
		return 0, 0, nil
	}
	var pre *prefetched
	start, _ := blobSpan(g[0])
	_, end := blobSpan(g[len(g)-1])
	switch {
	case len(g) > 1 && end-start <= groupSpan || reader:
		b, err := m.remoteBlob(ctx)
		if err != nil {
			return 0, 0, err
		}
		var r layer.RangeReader = blobRanges{b}
		if !reader {
			if err := m.fs.yield(ctx); err != nil {
				return 0, 0, err
			}
			if err := m.fs.limit(ctx, int(end-start)); err != nil {
				return 0, 0, err
			}
		}
		// A reader's group whose bytes a window is fetching already (the
		// same files asked for by a mount and by the start-up set) reads
		// them from there instead of asking again.
		w := m.window(start, end)
		if reader && w != nil {
			pre = &prefetched{win: w, next: r, reader: true}
			break
		}
		// Shown to readers only now, past the waits above: a reader
		// missing one of these files waits for this read, not for
		// readers to be done. A background group is all speculation: a
		// reader's miss may cut it short, and what arrived is sealed.
		demandEnd := start
		var done func()
		if reader {
			demandEnd = end
			done = m.fs.foreground()
		}
		w = m.addWindow(newWindow(start, end-start, demandEnd))
		err = w.fill(ctx, b, m.fs)
		if done != nil {
			done()
		}
		switch {
		case errors.Is(err, errTrimmed):
			g = slices.DeleteFunc(g, func(n *metadata.Node) bool {
				off, end := blobSpan(n)
				return !w.holds(off, end)
			})
			trimmed = errTrimmed
		case err != nil:
			return 0, 0, err
		}
		pre = &prefetched{win: w}
		if reader {
			pre.next, pre.reader = r, true
		}
	default:
		pre = &prefetched{} // covers nothing: every read goes to the blob
	}
	var errs []error
	for _, n := range g {
		if ctx.Err() != nil {
			return files, bytes, ctx.Err()
		}
		if m.fs.store.Has(digest.Digest(n.Digest)) {
			continue
		}
		// Sealing costs CPU too: readers first, file by file.
		if !reader {
			if err := m.fs.yield(ctx); err != nil {
				return files, bytes, err
			}
		}
		if err := m.ensure(ctx, n, pre); err != nil {
			errs = append(errs, err)
			continue
		}
		files++
		bytes += n.Size
	}
	return files, bytes, errors.Join(append(errs, trimmed)...)
}
