package fuse

import (
	"sync/atomic"
	"time"
)

// OpMetrics counts the requests every mount given it answered, by
// operation, with their latency. A daemon keeps one for all its mounts,
// so that its counts only grow, as a monitoring system expects.
type OpMetrics struct {
	ops [len(opNames)]opStat
	// Resent counts requests an earlier process read and never answered.
	Resent atomic.Int64
	// OpenErrors and ReadErrors count opens and reads failed with EIO
	// because a file's content could not be had.
	OpenErrors, ReadErrors atomic.Int64
}

// LatencyBuckets are the upper bounds, in seconds, of the latency
// histograms' buckets.
var LatencyBuckets = [...]float64{0.00001, 0.0001, 0.001, 0.01, 0.1, 1, 10}

type opStat struct {
	count   atomic.Uint64
	sumNs   atomic.Int64
	buckets [len(LatencyBuckets)]atomic.Uint64
}

// opNames names the operations a layer answers, by FUSE opcode.
var opNames = [...]string{
	1: "lookup", 3: "getattr", 5: "readlink", 14: "open", 15: "read", 18: "release",
	22: "getxattr", 23: "listxattr", 27: "opendir", 28: "readdir", 44: "readdirplus",
}

func (m *OpMetrics) observe(opcode uint32, d time.Duration) {
	if int(opcode) >= len(opNames) || opNames[opcode] == "" {
		return
	}
	s := &m.ops[opcode]
	s.count.Add(1)
	s.sumNs.Add(int64(d))
	secs := d.Seconds()
	for i, le := range LatencyBuckets {
		if secs <= le {
			s.buckets[i].Add(1)
		}
	}
}

// OpLatency is one operation's counts: Buckets[i] counts the requests
// that took at most LatencyBuckets[i] (cumulative, as Prometheus has it).
type OpLatency struct {
	Op      string
	Count   uint64
	Sum     time.Duration
	Buckets [len(LatencyBuckets)]uint64
}

// Ops returns the counts of every operation answered at least once.
func (m *OpMetrics) Ops() []OpLatency {
	var out []OpLatency
	for code, name := range opNames {
		s := &m.ops[code]
		if name == "" || s.count.Load() == 0 {
			continue
		}
		l := OpLatency{Op: name}
		for i := range l.Buckets {
			l.Buckets[i] = s.buckets[i].Load()
		}
		// Read after the buckets: observe counts first, so the total is
		// never below a bucket.
		l.Count, l.Sum = s.count.Load(), time.Duration(s.sumNs.Load())
		out = append(out, l)
	}
	return out
}
