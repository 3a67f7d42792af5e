package fs

import (
	"context"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/plan"
	"github.com/lazycas/lazycas/metadata"
)

// A layer that readers go through file by file (a copy, a scan, a checksum
// of everything) would pay a round trip per miss and fetch in small
// windows. Once its reads are dense (plan.Density), the rest of the layer
// is streamed instead: the files the store lacks, in blob order, in
// requests long enough that their round trips hardly count, each request a
// window that readers of its files wait on. Background fetch of the layer
// stops then; the stream is reader work and does not yield.

// opened counts a reader's first open of n and starts the stream when the
// layer's reads have become dense.
func (m *mounted) opened(n *metadata.Node) {
	if len(n.Chunks) == 0 {
		return
	}
	if _, seen := m.openedIDs.LoadOrStore(n.ID, struct{}{}); seen {
		return
	}
	if size, ok := m.specIDs.LoadAndDelete(n.ID); ok {
		m.specRead.Add(size.(int64))
	}
	off, end := blobSpan(n)
	k, b := m.demandN.Add(1), m.demandB.Add(end-off)
	if m.streaming.Load() || !plan.Density(int(k), b, len(m.spans()), m.meta.Info.Size) {
		return
	}
	if m.streaming.CompareAndSwap(false, true) {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.stream(m.bg)
		}()
	}
}

// streamJob is one request of the stream and the files it brings.
type streamJob struct {
	w   *window
	ids []uint64
}

// stream fetches every file of the layer the store lacks, in blob order.
func (m *mounted) stream(ctx context.Context) {
	start := time.Now()
	l := log.G(ctx).WithField("layer", m.meta.Info.Digest)
	b, err := m.remoteBlob(ctx)
	if err != nil {
		l.WithError(err).Warn("stream layer")
		return
	}
	size := plan.StreamRequest(linkOf(b))
	l.WithFields(log.Fields{"misses": m.demandN.Load(), "request": size}).Info("reads are dense: streaming the rest of the layer")

	// The sealer follows the fetcher one request behind at most, so
	// memory holds about two requests' bytes.
	jobs := make(chan streamJob, 1)
	sealed := make(chan struct{})
	go func() {
		defer close(sealed)
		for j := range jobs {
			m.sealFrom(j.w, j.ids, false)
		}
	}()
	var bytes int64
	var requests int
	spans := m.spans()
	for i := 0; i < len(spans) && ctx.Err() == nil; {
		var picked []int // of spans
		var off, end int64
		for ; i < len(spans); i++ {
			sp := spans[i]
			if len(picked) > 0 && (sp.off-end > groupGap || sp.end-off > size) {
				break
			}
			n, err := m.meta.Node(sp.id)
			if err != nil || m.fs.store.Has(digest.Digest(n.Digest)) || m.piecewise(n) || m.window(sp.off, sp.end) != nil {
				continue
			}
			if len(picked) == 0 {
				off = sp.off
			}
			picked = append(picked, i)
			end = sp.end
		}
		if len(picked) == 0 {
			continue
		}
		w, taken := m.claimStream(spans, picked)
		if taken < len(picked) {
			// A reader took picked[taken] meanwhile: it keeps it, and the
			// stream goes on after it.
			i = picked[taken] + 1
		}
		if w == nil {
			continue
		}
		ids := make([]uint64, taken)
		for k, j := range picked[:taken] {
			ids[k] = spans[j].id
		}
		off, end = spans[picked[0]].off, spans[picked[taken-1]].end
		select {
		case jobs <- streamJob{w, ids}:
		case <-ctx.Done():
		}
		done := m.fs.foreground()
		err := w.fill(ctx, b, nil)
		done()
		if err != nil {
			if ctx.Err() == nil {
				l.WithError(err).Warn("stream layer: the rest is fetched when read")
			}
			break
		}
		bytes += end - off
		requests++
	}
	close(jobs)
	<-sealed
	l.WithFields(log.Fields{"bytes": bytes, "requests": requests, "took": time.Since(start).Round(time.Millisecond)}).Info("layer streamed")
}
