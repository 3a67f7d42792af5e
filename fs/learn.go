package fs

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/metadata"
)

// Bounds of a learned fetch: what start-up read, not the whole layer.
const (
	learnTimeout    = 2 * time.Minute
	learnMaxBytes   = 512 << 20
	learnWorkers    = 4
	learnMaxFileLen = maxStartupFile // bigger files are left to piecewise reads
)

// Profiles learns start-up profiles (Options.Profiles): it records what
// containers open on each mounted layer and, when a layer is mounted, fetches
// first the files recordings ranked, by digest, from any layer.
type Profiles struct {
	db     *profile.DB
	window time.Duration
	recs   sync.Map // mount key -> *profile.Recorder
}

// NewProfiles returns Profiles keeping recordings in db; each recording
// lasts window from a layer's first open (profile.Window when 0).
func NewProfiles(db *profile.DB, window time.Duration) *Profiles {
	return &Profiles{db: db, window: window}
}

// learnOpen records that a container opened n, whether or not the store
// had it: a profile is about what start-up reads, not what it fetched.
func (m *mounted) learnOpen(n *metadata.Node) {
	p := m.fs.opts.Profiles
	if p == nil || n.Digest == "" {
		return
	}
	v, ok := p.recs.Load(m.key)
	if !ok {
		v, _ = p.recs.LoadOrStore(m.key, profile.NewRecorder(digest.Digest(m.meta.Info.Digest), p.window))
	}
	rec := v.(*profile.Recorder)
	if rec.Record(digest.Digest(n.Digest)) {
		// The window's end stores the recording; a later stop finds it
		// stored already (Close returns a recording once).
		layer := digest.Digest(m.meta.Info.Digest)
		time.AfterFunc(rec.Window(), func() { p.store(m.bg, m.key, layer, rec) })
	}
}

// learnFlush stores the layer's recording, if any, when it is unmounted.
func (m *mounted) learnFlush() {
	p := m.fs.opts.Profiles
	if p == nil {
		return
	}
	if v, ok := p.recs.LoadAndDelete(m.key); ok {
		p.store(m.bg, m.key, digest.Digest(m.meta.Info.Digest), v.(*profile.Recorder))
	}
}

// Flush stores what the recordings still open hold so far, so that an
// export right after a container's start has it; they go on recording
// (storing again merges: each file keeps its earliest time).
func (p *Profiles) Flush(ctx context.Context) error {
	var errs []error
	p.recs.Range(func(k, v any) bool {
		rec := v.(*profile.Recorder)
		if acc := rec.Snapshot(); len(acc) > 0 {
			if err := p.db.Record(rec.Layer(), acc); err != nil {
				errs = append(errs, err)
			}
		}
		return true
	})
	return errors.Join(errs...)
}

func (p *Profiles) store(ctx context.Context, key string, layer digest.Digest, rec *profile.Recorder) {
	acc := rec.Close()
	if len(acc) == 0 {
		return
	}
	l := log.G(ctx).WithFields(log.Fields{"key": key, "layer": layer, "files": len(acc)})
	if err := p.db.Record(layer, acc); err != nil {
		l.WithError(err).Warn("store start-up profile")
		return
	}
	l.Info("start-up profile recorded")
}

// learnFetch starts fetching, under the layer's fetch context, the files
// of the layer that profiles rank and the store lacks, best ranked first,
// as reader-priority groups: neighbours in the blob share a request.
func (m *mounted) learnFetch() {
	if m.fs.opts.Profiles == nil {
		return
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		ctx, cancel := context.WithTimeout(m.bg, learnTimeout)
		defer cancel()
		m.fetchLearned(ctx)
	}()
}

// learnedFile is a file of the layer and its rank.
type learnedFile struct {
	n    *metadata.Node
	rank profile.Rank
}

func (m *mounted) fetchLearned(ctx context.Context) {
	start := time.Now()
	l := log.G(ctx).WithFields(log.Fields{"key": m.key, "layer": m.meta.Info.Digest})
	var nodes []*metadata.Node
	var digests []digest.Digest
	seen := map[string]bool{}
	err := m.meta.Walk(func(n *metadata.Node) error {
		if n.Type == metadata.TypeReg && n.Size > 0 && n.Size <= learnMaxFileLen && len(n.Chunks) > 0 && !seen[n.Digest] {
			seen[n.Digest] = true
			nodes = append(nodes, n)
			digests = append(digests, digest.Digest(n.Digest))
		}
		return nil
	})
	if err != nil {
		l.WithError(err).Warn("learned fetch: list the layer's files")
		return
	}
	ranks, err := m.fs.opts.Profiles.db.Rank(digests)
	if err != nil {
		l.WithError(err).Warn("learned fetch")
		return
	}
	var files []learnedFile
	for _, n := range nodes {
		if r, ok := ranks[digest.Digest(n.Digest)]; ok && !m.fs.store.Has(digest.Digest(n.Digest)) {
			files = append(files, learnedFile{n, r})
		}
	}
	if len(files) == 0 {
		return
	}
	sort.Slice(files, func(i, j int) bool { return files[i].rank.Less(files[j].rank) })
	var budget int64
	var small, large []learnedFile
	for _, f := range files {
		if budget += f.n.Size; budget > learnMaxBytes {
			break
		}
		if m.piecewise(f.n) {
			large = append(large, f)
		} else {
			small = append(small, f)
		}
	}
	groups := learnedGroups(small)
	var (
		mu      sync.Mutex
		fetched int
		bytes   int64
		errs    []error
		wg      sync.WaitGroup
	)
	note := func(n int, b int64, err error) {
		mu.Lock()
		defer mu.Unlock()
		fetched, bytes = fetched+n, bytes+b
		if err != nil && !errors.Is(err, context.Canceled) && len(errs) < 8 {
			errs = append(errs, err)
		}
	}
	// Large files piece by piece, one at a time, in rank order: each of
	// their pieces is a request of its own anyway.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, f := range large {
			if ctx.Err() != nil {
				return
			}
			err := m.ensure(ctx, f.n, nil)
			if err == nil {
				note(1, f.n.Size, nil)
			} else {
				note(0, 0, err)
			}
		}
	}()
	queue := make(chan []*metadata.Node)
	for range learnWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for g := range queue {
				s, _ := blobSpan(g[0])
				_, e := blobSpan(g[len(g)-1])
				if m.window(s, e) != nil {
					continue // being fetched for a reader or the start-up set
				}
				note(m.fetchGroup(ctx, g, true))
			}
		}()
	}
feed:
	for _, g := range groups {
		select {
		case queue <- g:
		case <-ctx.Done():
			break feed
		}
	}
	close(queue)
	wg.Wait()
	l = l.WithFields(log.Fields{"ranked": len(files), "files": fetched, "bytes": bytes,
		"took": time.Since(start).Round(time.Millisecond)})
	if err := errors.Join(errs...); err != nil {
		l = l.WithError(err)
	}
	l.Info("learned files fetched")
}

// learnedGroups groups files as one request each where they neighbour in
// the blob, and orders the groups by their best-ranked file.
func learnedGroups(files []learnedFile) [][]*metadata.Node {
	best := make(map[uint64]profile.Rank, len(files))
	nodes := make([]*metadata.Node, len(files))
	for i, f := range files {
		best[f.n.ID] = f.rank
		nodes[i] = f.n
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Chunks[0].Offset < nodes[j].Chunks[0].Offset })
	groups := groupNodes(nodes)
	rank := make([]profile.Rank, len(groups))
	for i, g := range groups {
		rank[i] = best[g[0].ID]
		for _, n := range g[1:] {
			if r := best[n.ID]; r.Less(rank[i]) {
				rank[i] = r
			}
		}
	}
	idx := make([]int, len(groups))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return rank[idx[a]].Less(rank[idx[b]]) })
	out := make([][]*metadata.Node, len(groups))
	for i, j := range idx {
		out[i] = groups[j]
	}
	return out
}
