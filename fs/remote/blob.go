package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Range asks for len(Buf) bytes of the blob at Off.
type Range struct {
	Off int64
	Buf []byte
}

var _ io.ReaderAt = (*Blob)(nil)

// ReadAt implements io.ReaderAt, for readers such as estargz's that take
// one. Each request is bounded by RequestTimeout, not by a caller's context.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s at %d: negative offset: %w", b.digest, off, errdefs.ErrInvalidArgument)
	}
	if off >= b.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), b.size-off))
	if err := b.ReadRanges(context.Background(), []Range{{Off: off, Buf: p[:n]}}); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// ReadRanges fills every range's buffer with the blob's bytes at its offset.
// Ranges closer than MergeGap share a request, reads bigger than
// MaxRequestSize are split into parallel requests, far apart ranges share
// multi-range requests where the server honours them, and at most
// MaxInFlight requests of this blob are in flight. Ranges may overlap and
// come in any order; the buffers must not alias each other.
func (b *Blob) ReadRanges(ctx context.Context, ranges []Range) error {
	for _, r := range ranges {
		if r.Off < 0 || r.Off > b.size || int64(len(r.Buf)) > b.size-r.Off {
			return fmt.Errorf("read %s range %d+%d: outside the blob's %d bytes: %w",
				b.digest, r.Off, len(r.Buf), b.size, errdefs.ErrInvalidArgument)
		}
	}
	reqs := b.plan(ranges)
	switch len(reqs) {
	case 0:
		return nil
	case 1:
		if len(reqs[0]) == 1 {
			return b.request(ctx, reqs[0], nil)
		}
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// A multi-range request that falls back queues its parts again, one
	// request each, so the queue holds at most every request and every part.
	nparts := 0
	for _, r := range reqs {
		nparts += len(r)
	}
	queue := make(chan []*part, len(reqs)+nparts)
	var pending sync.WaitGroup
	pending.Add(len(reqs))
	for _, r := range reqs {
		queue <- r
	}
	requeue := func(parts []*part) {
		pending.Add(len(parts))
		for _, p := range parts {
			queue <- []*part{p}
		}
	}
	go func() {
		pending.Wait()
		close(queue)
	}()

	var (
		once     sync.Once
		firstErr error
		workers  sync.WaitGroup
	)
	// As many workers as parts may be in flight: a fallback from one
	// multi-range request fans out too.
	for range min(b.f.opts.MaxInFlight, nparts) {
		workers.Go(func() {
			for parts := range queue {
				if ctx.Err() == nil {
					if err := b.request(ctx, parts, requeue); err != nil {
						// The first failure stops the others.
						once.Do(func() { firstErr = err; cancel(err) })
					}
				}
				pending.Done()
			}
		})
	}
	workers.Wait()
	if firstErr != nil {
		return firstErr
	}
	if ctx.Err() != nil {
		return fmt.Errorf("read %s: %w", b.digest, context.Cause(ctx))
	}
	return nil
}

// ReadStream fills buf with the blob's bytes at off in one request (or in
// ReadRanges' pieces when buf is bigger than MaxRequestSize), telling
// progress how many bytes from buf's start are filled as they arrive, so a
// caller can use the first bytes of a long read before its end. Bytes
// reported are final: a retry asks only for the rest.
func (b *Blob) ReadStream(ctx context.Context, off int64, buf []byte, progress func(filled int64)) error {
	if off < 0 || off > b.size || int64(len(buf)) > b.size-off {
		return fmt.Errorf("read %s range %d+%d: outside the blob's %d bytes: %w",
			b.digest, off, len(buf), b.size, errdefs.ErrInvalidArgument)
	}
	if len(buf) == 0 {
		return nil
	}
	if int64(len(buf)) > b.f.opts.MaxRequestSize {
		if err := b.ReadRanges(ctx, []Range{{Off: off, Buf: buf}}); err != nil {
			return err
		}
		progress(int64(len(buf)))
		return nil
	}
	p := &part{off: off, end: off + int64(len(buf)), targets: []target{{off: off, buf: buf}}, progress: progress}
	return b.request(ctx, []*part{p}, nil)
}

// request fetches parts in one request slot. With several parts it tries a
// multi-range request; if the server does not honour it, it marks the blob so
// later reads ask singly and hands the parts still missing to requeue.
func (b *Blob) request(ctx context.Context, parts []*part, requeue func([]*part)) error {
	what := fmt.Sprintf("%d-%d", parts[0].off, parts[len(parts)-1].end-1)
	err := b.requestSlot(ctx, what, parts)
	if errors.Is(err, errNoMultiRange) && requeue != nil {
		b.mu.Lock()
		first := !b.noMulti
		b.noMulti = true
		b.mu.Unlock()
		if first {
			log.G(ctx).WithError(err).WithField("digest", b.digest).Debug("asking for ranges one by one")
		}
		var todo []*part
		for _, p := range parts {
			if !p.done {
				todo = append(todo, p)
			}
		}
		requeue(todo)
		return nil
	}
	switch {
	case err == nil:
		return nil
	case len(parts) == 1:
		return fmt.Errorf("read %s range %s: %w", b.digest, what, err)
	default:
		return fmt.Errorf("read %s ranges %s: %w", b.digest, rangeHeader(parts), err)
	}
}

// requestSlot waits for one of the blob's MaxInFlight slots and fetches
// parts in one request, across hosts and retries.
func (b *Blob) requestSlot(ctx context.Context, what string, parts []*part) error {
	select {
	case b.slots <- struct{}{}:
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	defer func() { <-b.slots }()
	return b.run(ctx, what, func(ctx context.Context, host int) error {
		return b.fetch(ctx, host, parts)
	})
}

// plan turns ranges into requests: ranges sorted by offset and merged into
// spans when less than MergeGap apart, spans cut into parts of at most
// MaxRequestSize, and neighbouring parts grouped into multi-range requests
// of at most MaxRanges parts and MaxRequestSize bytes.
func (b *Blob) plan(ranges []Range) [][]*part {
	targets := make([]target, 0, len(ranges))
	for _, r := range ranges {
		if len(r.Buf) > 0 {
			targets = append(targets, target{off: r.Off, buf: r.Buf})
		}
	}
	slices.SortFunc(targets, func(x, y target) int {
		switch {
		case x.off < y.off:
			return -1
		case x.off > y.off:
			return 1
		}
		return 0
	})

	opts := b.f.opts
	var parts []*part
	for i := 0; i < len(targets); {
		// A span: targets[i:j] covering [off, end).
		off, end := targets[i].off, targets[i].off+int64(len(targets[i].buf))
		j := i + 1
		for ; j < len(targets) && targets[j].off <= end+opts.MergeGap; j++ {
			end = max(end, targets[j].off+int64(len(targets[j].buf)))
		}
		parts = append(parts, split(off, end, targets[i:j], opts.MaxRequestSize)...)
		i = j
	}

	b.mu.Lock()
	maxRanges := opts.MaxRanges
	if b.noMulti {
		maxRanges = 1
	}
	b.mu.Unlock()
	var reqs [][]*part
	for i := 0; i < len(parts); {
		size := parts[i].end - parts[i].off
		j := i + 1
		for ; j < len(parts) && j-i < maxRanges && size+parts[j].end-parts[j].off <= opts.MaxRequestSize; j++ {
			size += parts[j].end - parts[j].off
		}
		reqs = append(reqs, parts[i:j])
		i = j
	}
	return reqs
}

// split cuts the span [off, end) holding targets into parts of at most max
// bytes, each with the pieces of the targets it covers.
func split(off, end int64, targets []target, limit int64) []*part {
	parts := make([]*part, 0, (end-off+limit-1)/limit)
	first := 0
	for lo := off; lo < end; lo += limit {
		hi := min(lo+limit, end)
		p := &part{off: lo, end: hi}
		for first < len(targets) && targets[first].off+int64(len(targets[first].buf)) <= lo {
			first++
		}
		for _, t := range targets[first:] {
			if t.off >= hi {
				break
			}
			a, z := max(t.off, lo), min(t.off+int64(len(t.buf)), hi)
			if a < z {
				p.targets = append(p.targets, target{off: a, buf: t.buf[a-t.off : z-t.off]})
			}
		}
		parts = append(parts, p)
	}
	return parts
}
