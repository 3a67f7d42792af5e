package fs

import (
	"context"
	"errors"
	"sync"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/plan"
	"github.com/lazycas/lazycas/fs/remote"
)

// errTrimmed ends the fetch of a window whose speculative rest was given
// up for a reader's fetch (see FileSystem.trimSpeculation).
var errTrimmed = errors.New("speculative fetch given up for a reader")

// window is a span of the blob fetched, or being fetched, for a group of
// files: a reader missing a file inside it waits for these bytes instead of
// fetching them again. Its bytes arrive in order and are usable as they
// arrive: a reader of the first file goes on before the last one is in.
//
// The bytes up to demandEnd are what a reader asked for; those after it
// are speculation, which a later reader's miss may cut short (the window
// then holds only what arrived). Bytes below filled are final and never
// written again; buf is read only below filled.
type window struct {
	off       int64
	buf       []byte
	demandEnd int64 // blob offset; off for all-speculative background groups

	mu      sync.Mutex
	filled  int64         // bytes of buf arrived, from its start
	changed chan struct{} // closed and replaced whenever filled grows or the fill ends
	done    bool
	err     error
	cancel  context.CancelFunc // ends the fill; set while it runs
}

func newWindow(off, n, demandEnd int64) *window {
	return &window{off: off, buf: make([]byte, n), demandEnd: demandEnd, changed: make(chan struct{})}
}

// fill reads the window's bytes from b and publishes them as they arrive.
// With f set, its speculation may be trimmed for readers.
func (w *window) fill(ctx context.Context, b *remote.Blob, f *FileSystem) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	w.mu.Lock()
	w.cancel = func() { cancel(errTrimmed) }
	w.mu.Unlock()
	if f != nil && w.demandEnd < w.off+int64(len(w.buf)) {
		f.speculating(w, true)
		defer f.speculating(w, false)
	}
	err := b.ReadStream(ctx, w.off, w.buf, w.progress)
	if err != nil && errors.Is(context.Cause(ctx), errTrimmed) {
		err = errTrimmed
	}
	w.mu.Lock()
	w.done, w.err, w.cancel = true, err, nil
	close(w.changed)
	w.mu.Unlock()
	return err
}

func (w *window) progress(filled int64) {
	w.mu.Lock()
	if filled > w.filled {
		w.filled = filled
		close(w.changed)
		w.changed = make(chan struct{})
	}
	w.mu.Unlock()
}

// waitFor waits until the window holds [off, end) and reports whether it
// does (false: the fill failed or was trimmed before those bytes came).
func (w *window) waitFor(ctx context.Context, off, end int64) (bool, error) {
	for {
		w.mu.Lock()
		have, done, ch := w.off+w.filled >= end, w.done, w.changed
		w.mu.Unlock()
		switch {
		case have:
			return true, nil
		case done:
			return false, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}

// covers reports whether [off, end) lies inside the window's span.
func (w *window) covers(off, end int64) bool {
	return off >= w.off && end <= w.off+int64(len(w.buf))
}

// overlaps reports whether the window has, or may still get, any byte of
// [off, end).
func (w *window) overlaps(off, end int64) bool {
	if end <= w.off || off >= w.off+int64(len(w.buf)) {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.done || off < w.off+w.filled
}

// holds reports whether the window has, or may still get, [off, end).
func (w *window) holds(off, end int64) bool {
	if !w.covers(off, end) {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.done || w.off+w.filled >= end
}

// trim gives up the window's speculative rest if a reader already has its
// bytes and finishing would cost more than asking again later.
func (w *window) trim(l plan.Link) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done || w.cancel == nil || w.off+w.filled < w.demandEnd {
		return
	}
	if plan.Worth(l, int64(len(w.buf))-w.filled) {
		return
	}
	w.cancel()
}

// speculating registers or forgets a window whose fill holds speculation.
func (f *FileSystem) speculating(w *window, on bool) {
	f.specMu.Lock()
	defer f.specMu.Unlock()
	if on {
		f.spec[w] = struct{}{}
	} else {
		delete(f.spec, w)
	}
}

// trimSpeculation makes room on the link for a reader's fetch: speculative
// bytes in flight that would take longer than a round trip to finish are
// given up (readahead past what its reader needed, background groups).
func (f *FileSystem) trimSpeculation(l plan.Link) {
	f.specMu.Lock()
	defer f.specMu.Unlock()
	for w := range f.spec {
		w.trim(l)
	}
}

// linkOf is the fetch planner's model of the link b is read over.
func linkOf(b *remote.Blob) plan.Link {
	l := b.Link()
	return plan.Link{RTT: l.RTT, Bandwidth: l.Bandwidth}
}

// prefetched serves ranges from a window where it holds them, and anything
// else from next.
type prefetched struct {
	win  *window // nil: nothing prefetched
	next layer.RangeReader
	// reader marks bytes fetched for a reader (readahead, start-up
	// files): filling from them never yields to readers.
	reader bool
}

func (p *prefetched) ReadRanges(ctx context.Context, ranges []layer.Range) error {
	rest := ranges
	if p.win != nil {
		rest = nil
		for _, r := range ranges {
			end := r.Off + int64(len(r.Buf))
			if p.win.covers(r.Off, end) {
				ok, err := p.win.waitFor(ctx, r.Off, end)
				if err != nil {
					return err
				}
				if ok {
					copy(r.Buf, p.win.buf[r.Off-p.win.off:])
					continue
				}
			}
			rest = append(rest, r)
		}
	}
	if len(rest) == 0 {
		return nil
	}
	return p.next.ReadRanges(ctx, rest)
}
