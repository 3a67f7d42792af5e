package store

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/opencontainers/go-digest"
)

// Partial is a large object being filled piece by piece as readers need
// them, so that the first page of a big file does not wait for all of it.
// Its pieces are verified by the caller (chunk digests) before Write;
// the whole object is verified when Ensure seals it. Partial files live
// under partial/ and are discarded when the store is opened: a restart
// costs the pieces already fetched, never correctness.
type Partial struct {
	s    *Store
	d    digest.Digest
	size int64
	f    *os.File

	mu       sync.Mutex
	refs     int
	filled   []span             // sorted, non-overlapping
	inflight map[int64]*pending // by piece offset
}

type span struct{ off, end int64 }

type pending struct {
	done chan struct{}
	err  error
}

// Partial returns the partial object d of the given size, creating it if
// needed. Call Release when done with it.
func (s *Store) Partial(d digest.Digest, size int64) (*Partial, error) {
	if err := validate(d); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.partials[d]; p != nil {
		p.mu.Lock()
		p.refs++
		p.mu.Unlock()
		return p, nil
	}
	f, err := os.OpenFile(filepath.Join(s.dir, "partial", d.Encoded()), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("store: partial %s: %w", d, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("store: partial %s: %w", d, err)
	}
	p := &Partial{s: s, d: d, size: size, f: f, refs: 1, inflight: map[int64]*pending{}}
	s.partials[d] = p
	return p, nil
}

// Release drops a reference; the last one discards the partial file.
func (p *Partial) Release() {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	p.mu.Lock()
	p.refs--
	last := p.refs == 0
	p.mu.Unlock()
	if !last {
		return
	}
	delete(p.s.partials, p.d)
	p.f.Close()
	os.Remove(p.f.Name())
}

// Has reports whether [off, off+n) is filled.
func (p *Partial) Has(off, n int64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.has(off, off+n)
}

func (p *Partial) has(off, end int64) bool {
	i := sort.Search(len(p.filled), func(i int) bool { return p.filled[i].end > off })
	return i < len(p.filled) && p.filled[i].off <= off && p.filled[i].end >= end
}

// ReadAt reads filled bytes.
func (p *Partial) ReadAt(b []byte, off int64) (int, error) {
	if !p.Has(off, int64(len(b))) {
		return 0, fmt.Errorf("store: partial %s: bytes %d+%d not filled", p.d, off, len(b))
	}
	return p.f.ReadAt(b, off)
}

// Fill makes the piece [off, off+n) present: if it is not, fetch returns
// its verified bytes, once for concurrent callers of the same piece.
func (p *Partial) Fill(ctx context.Context, off, n int64, fetch func(ctx context.Context) ([]byte, error)) error {
	if off < 0 || n <= 0 || off+n > p.size {
		return fmt.Errorf("store: partial %s: piece %d+%d outside %d bytes", p.d, off, n, p.size)
	}
	for {
		p.mu.Lock()
		if p.has(off, off+n) {
			p.mu.Unlock()
			return nil
		}
		w, waiting := p.inflight[off]
		if !waiting {
			w = &pending{done: make(chan struct{})}
			p.inflight[off] = w
		}
		p.mu.Unlock()
		if waiting {
			select {
			case <-w.done:
			case <-ctx.Done():
				return ctx.Err()
			}
			if w.err != nil {
				return w.err
			}
			continue
		}
		w.err = p.fetch(ctx, off, n, fetch)
		p.mu.Lock()
		delete(p.inflight, off)
		p.mu.Unlock()
		close(w.done)
		return w.err
	}
}

func (p *Partial) fetch(ctx context.Context, off, n int64, fetch func(ctx context.Context) ([]byte, error)) error {
	data, err := fetch(ctx)
	if err != nil {
		return err
	}
	if int64(len(data)) != n {
		return fmt.Errorf("store: partial %s: piece %d+%d got %d bytes", p.d, off, n, len(data))
	}
	if _, err := p.f.WriteAt(data, off); err != nil {
		return fmt.Errorf("store: partial %s: %w", p.d, err)
	}
	p.mu.Lock()
	p.add(span{off, off + n})
	p.mu.Unlock()
	return nil
}

// add merges s into the filled spans.
func (p *Partial) add(s span) {
	out := p.filled[:0:0]
	for _, f := range p.filled {
		if f.end < s.off || f.off > s.end {
			out = append(out, f)
			continue
		}
		s = span{min(s.off, f.off), max(s.end, f.end)}
	}
	out = append(out, s)
	sort.Slice(out, func(i, j int) bool { return out[i].off < out[j].off })
	p.filled = out
}

// Filled returns how many bytes are present.
func (p *Partial) Filled() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var n int64
	for _, f := range p.filled {
		n += f.end - f.off
	}
	return n
}
