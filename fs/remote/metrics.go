package remote

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"

	"github.com/lazycas/lazycas/fs/internal/latency"
)

// Outcome is how one attempt at a registry request ended: one attempt is
// one request to one host (its auth and redirect rounds included), so a
// read that succeeded on its third try counts two "retried" and one "ok".
type Outcome int

const (
	// OutcomeOK is an attempt that brought every byte it asked for.
	OutcomeOK Outcome = iota
	// OutcomeRetried is a failed attempt that another one followed: on
	// the same host after a backoff, on the next mirror, or range by
	// range after a server refused a multi-range or suffix request.
	OutcomeRetried
	// OutcomeError is a failed attempt after which the read failed.
	OutcomeError
	// OutcomeCanceled is an attempt cut short because its caller stopped
	// waiting (an unmount, another range of the same read failing).
	OutcomeCanceled
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"ok", "retried", "error", "canceled"}

// String is the outcome's metric label value.
func (o Outcome) String() string { return outcomeNames[o] }

// Outcomes lists every outcome, for exporting all of them.
func Outcomes() []Outcome { return []Outcome{OutcomeOK, OutcomeRetried, OutcomeError, OutcomeCanceled} }

// BlobStats counts one blob's attempts by outcome, and the response body
// bytes those attempts read: the bytes of a failed attempt were read for
// nothing (the part a later attempt resumes from excepted, see
// ReadStream).
type BlobStats struct {
	Requests [numOutcomes]int64
	Bytes    [numOutcomes]int64
}

// blobStatsJSON is BlobStats in JSON, by outcome name.
type blobStatsJSON struct {
	Requests map[string]int64 `json:"requests"`
	Bytes    map[string]int64 `json:"bytes"`
}

// MarshalJSON writes the counts by outcome name, not position.
func (s BlobStats) MarshalJSON() ([]byte, error) {
	j := blobStatsJSON{Requests: map[string]int64{}, Bytes: map[string]int64{}}
	for _, o := range Outcomes() {
		j.Requests[o.String()], j.Bytes[o.String()] = s.Requests[o], s.Bytes[o]
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads what MarshalJSON wrote; unknown outcomes are
// ignored.
func (s *BlobStats) UnmarshalJSON(data []byte) error {
	var j blobStatsJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return err
	}
	*s = BlobStats{}
	for _, o := range Outcomes() {
		s.Requests[o], s.Bytes[o] = j.Requests[o.String()], j.Bytes[o.String()]
	}
	return nil
}

// Add adds o's counts to s.
func (s *BlobStats) Add(o BlobStats) {
	for i := range s.Requests {
		s.Requests[i] += o.Requests[i]
		s.Bytes[i] += o.Bytes[i]
	}
}

// blobCounters are a blob's BlobStats, counted as attempts end.
type blobCounters struct {
	requests, bytes [numOutcomes]atomic.Int64
}

func (c *blobCounters) add(o Outcome, bytes int64) {
	c.requests[o].Add(1)
	c.bytes[o].Add(bytes)
}

// Stats returns what the blob's requests did since it was opened.
func (b *Blob) Stats() BlobStats {
	var s BlobStats
	for i := range s.Requests {
		s.Requests[i] = b.counts.requests[i].Load()
		s.Bytes[i] = b.counts.bytes[i].Load()
	}
	return s
}

// attemptBytesKey carries, in an attempt's context, the counter of the
// body bytes it read: do wraps each response body with it, so that a retry
// can tell the bytes of each attempt apart from those of concurrent
// attempts at other ranges of the same blob.
type attemptBytesKey struct{}

func withAttemptBytes(ctx context.Context, n *atomic.Int64) context.Context {
	return context.WithValue(ctx, attemptBytesKey{}, n)
}

func attemptBytes(ctx context.Context) *atomic.Int64 {
	n, _ := ctx.Value(attemptBytesKey{}).(*atomic.Int64)
	return n
}

// LatencyBuckets are the upper bounds, in seconds, of the fetch latency
// histograms' buckets: from a near registry's round trip to a request
// close to the default RequestTimeout.
var LatencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// Histogram is a fetch latency histogram's counts, in LatencyBuckets.
type Histogram = latency.Snapshot

// histogram counts durations into LatencyBuckets without a lock.
type histogram struct{ h latency.Histogram }

func (h *histogram) observe(d time.Duration) { h.h.Observe(LatencyBuckets, d) }

func (h *histogram) snapshot() Histogram { return h.h.Snapshot(LatencyBuckets) }

// Unreachable reports whether err, from a read, says the registry could
// not be talked to or could not answer: no route, no name, a refused or
// reset connection, a timeout, a 5xx or 429 once retries ran out. It is
// false for answers that a registry gave (not found, denied, ...).
func Unreachable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, errRequestTimeout) || errdefs.IsUnavailable(err) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) {
		return true
	}
	if _, ok := errors.AsType[*net.DNSError](err); ok {
		return true
	}
	if _, ok := errors.AsType[*net.OpError](err); ok {
		return true
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return true
	}
	return false
}
