package snapshot

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/containerd/log"
)

// Why a layer was unpacked rather than mounted lazily: a few classes, for
// metrics and for warning once per class.
const (
	ReasonLazyOff       = "lazy-off"        // fs.lazy = false
	ReasonNotLazyFormat = "not-lazy-format" // no TOC digest: plain gzip, zstd, ...
	ReasonNoImage       = "no-image"        // no image labels and nothing to look the image up in
	ReasonMountFailed   = "mount-failed"    // TOC unreadable or wrong, registry unreachable, ...
)

// NotLazyError says why a layer is not mounted lazily.
type NotLazyError struct {
	// Reason is one of the Reason constants.
	Reason string
	// Detail says what happened and what would make the layer lazy.
	Detail string
}

func (e *NotLazyError) Error() string { return e.Detail }

// NotLazy returns a NotLazyError.
func NotLazy(reason, detail string) error { return &NotLazyError{Reason: reason, Detail: detail} }

// Unpacked is a layer unpacked rather than mounted lazily, and why.
type Unpacked struct {
	// ChainID is the layer's snapshot name (containerd's chain ID).
	ChainID string    `json:"chainID"`
	Layer   string    `json:"layer,omitempty"`
	Image   string    `json:"image,omitempty"`
	Reason  string    `json:"reason"`
	Detail  string    `json:"detail"`
	Time    time.Time `json:"time"`
}

// maxUnpacked bounds what an unpackedLog remembers.
const maxUnpacked = 4096

// unpackedLog remembers recent unpacked layers and counts them by reason.
type unpackedLog struct {
	mu       sync.Mutex
	byChain  map[string]Unpacked
	order    []string
	counts   map[string]int64
	warnedOf map[string]bool
}

func newUnpackedLog() *unpackedLog {
	return &unpackedLog{byChain: map[string]Unpacked{}, counts: map[string]int64{}, warnedOf: map[string]bool{}}
}

// add records that the layer pulled as chainID is unpacked because of err,
// and warns, once per reason, with what would make such layers lazy.
func (u *unpackedLog) add(ctx context.Context, chainID string, labels map[string]string, err error) {
	var nl *NotLazyError
	if !errors.As(err, &nl) {
		nl = &NotLazyError{Reason: ReasonMountFailed, Detail: err.Error()}
	}
	e := Unpacked{ChainID: chainID, Layer: labels[LabelLayerDigest], Image: labels[LabelImageRef],
		Reason: nl.Reason, Detail: nl.Detail, Time: time.Now()}
	u.mu.Lock()
	if _, ok := u.byChain[chainID]; !ok {
		u.order = append(u.order, chainID)
	}
	u.byChain[chainID] = e
	for len(u.order) > maxUnpacked {
		delete(u.byChain, u.order[0])
		u.order = u.order[1:]
	}
	u.counts[nl.Reason]++
	first := !u.warnedOf[nl.Reason]
	u.warnedOf[nl.Reason] = true
	u.mu.Unlock()
	entry := log.G(ctx).WithFields(log.Fields{"layer": e.Layer, "image": e.Image, "reason": e.Reason})
	if first || nl.Reason == ReasonMountFailed {
		entry.Warn("layer not mounted lazily, containerd unpacks it: " + nl.Detail)
	} else {
		entry.Debug("layer not mounted lazily, containerd unpacks it: " + nl.Detail)
	}
}

// Unpacked returns the layers unpacked rather than mounted lazily that
// this process remembers, oldest first.
func (s *Snapshotter) Unpacked() []Unpacked {
	s.unpacked.mu.Lock()
	defer s.unpacked.mu.Unlock()
	out := make([]Unpacked, 0, len(s.unpacked.order))
	for _, c := range s.unpacked.order {
		out = append(out, s.unpacked.byChain[c])
	}
	return out
}

// UnpackedCounts counts, by reason, the layers unpacked rather than
// mounted lazily since the process started.
func (s *Snapshotter) UnpackedCounts() map[string]int64 {
	s.unpacked.mu.Lock()
	defer s.unpacked.mu.Unlock()
	out := make(map[string]int64, len(s.unpacked.counts))
	for k, v := range s.unpacked.counts {
		out[k] = v
	}
	return out
}
