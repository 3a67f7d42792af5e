package fuse

import (
	"sync/atomic"
	"time"

	"github.com/lazycas/lazycas/fs/internal/latency"
)

// OpMetrics counts the requests every mount given it answered, by
// operation, with their latency. A daemon keeps one for all its mounts,
// so that its counts only grow, as a monitoring system expects.
type OpMetrics struct {
	ops [len(opNames)]latency.Histogram
	// Resent counts requests an earlier process read and never answered.
	Resent atomic.Int64
	// OpenErrors and ReadErrors count opens and reads failed with EIO
	// because a file's content could not be had.
	OpenErrors, ReadErrors atomic.Int64
}

// LatencyBuckets are the upper bounds, in seconds, of the latency
// histograms' buckets.
var LatencyBuckets = []float64{0.00001, 0.0001, 0.001, 0.01, 0.1, 1, 10}

// opNames names the operations a layer answers, by FUSE opcode.
var opNames = [...]string{
	1: "lookup", 3: "getattr", 5: "readlink", 14: "open", 15: "read", 18: "release",
	22: "getxattr", 23: "listxattr", 27: "opendir", 28: "readdir", 44: "readdirplus",
}

func (m *OpMetrics) observe(opcode uint32, d time.Duration) {
	if int(opcode) >= len(opNames) || opNames[opcode] == "" {
		return
	}
	m.ops[opcode].Observe(LatencyBuckets, d)
}

// OpLatency is one operation's counts, in LatencyBuckets.
type OpLatency struct {
	Op string
	latency.Snapshot
}

// Ops returns the counts of every operation answered at least once.
func (m *OpMetrics) Ops() []OpLatency {
	var out []OpLatency
	for code, name := range opNames {
		h := &m.ops[code]
		if name == "" || h.Count() == 0 {
			continue
		}
		out = append(out, OpLatency{Op: name, Snapshot: h.Snapshot(LatencyBuckets)})
	}
	return out
}
