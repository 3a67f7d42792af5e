// Package latency counts durations into histogram buckets without a lock,
// for the daemon's metrics: FUSE requests (fs/fuse) and registry requests
// (fs/remote) keep theirs with it, each with its own bucket bounds.
package latency

import (
	"sync/atomic"
	"time"
)

// maxBuckets bounds the buckets of a histogram, so that its zero value is
// ready to use (an array, no allocation).
const maxBuckets = 16

// Histogram counts observations. Its owner passes the same bounds, at most
// maxBuckets ascending upper bounds in seconds, to every call.
type Histogram struct {
	count   atomic.Uint64
	sumNs   atomic.Int64
	buckets [maxBuckets]atomic.Uint64
}

// Observe counts d.
func (h *Histogram) Observe(bounds []float64, d time.Duration) {
	// The count before the buckets, and read after them (Snapshot): the
	// total a scrape sees is never below a bucket.
	h.count.Add(1)
	h.sumNs.Add(int64(d))
	secs := d.Seconds()
	for i, le := range bounds {
		if secs <= le {
			h.buckets[i].Add(1)
		}
	}
}

// Count is how many durations were observed.
func (h *Histogram) Count() uint64 { return h.count.Load() }

// Snapshot returns the counts so far.
func (h *Histogram) Snapshot(bounds []float64) Snapshot {
	s := Snapshot{Bounds: bounds, Buckets: make([]uint64, len(bounds))}
	for i := range bounds {
		s.Buckets[i] = h.buckets[i].Load()
	}
	s.Count, s.Sum = h.count.Load(), time.Duration(h.sumNs.Load())
	return s
}

// Snapshot is a histogram's counts: Buckets[i] counts the observations of
// at most Bounds[i] seconds (cumulative, as Prometheus has it).
type Snapshot struct {
	Count   uint64
	Sum     time.Duration
	Bounds  []float64
	Buckets []uint64
}

// Cumulative is the buckets by upper bound, as Prometheus's constant
// histograms take them.
func (s Snapshot) Cumulative() map[float64]uint64 {
	m := make(map[float64]uint64, len(s.Bounds))
	for i, le := range s.Bounds {
		m[le] = s.Buckets[i]
	}
	return m
}
