package snapshot

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/containerd/log"
)

// Why a layer was unpacked rather than mounted lazily: a few classes, for
// metrics, for `lazycas image pull` and for warning once per layer.
const (
	ReasonLazyOff       = "lazy-off"             // fs.lazy = false
	ReasonNotLazyFormat = "not-lazy-format"      // no TOC digest, or no TOC in the blob: plain gzip, zstd, ...
	ReasonNoImage       = "no-image"             // no image labels, and the image could not be looked up
	ReasonTOCMismatch   = "toc-mismatch"         // the blob's TOC is not the one the manifest pins
	ReasonUnreachable   = "registry-unreachable" // no answer from the registry (refused, no route, timeouts, 5xx)
	ReasonMountFailed   = "mount-failed"         // anything else: the error says what
)

// Reasons lists every reason, for exporting a count of each.
func Reasons() []string {
	return []string{ReasonLazyOff, ReasonNotLazyFormat, ReasonNoImage, ReasonTOCMismatch, ReasonUnreachable, ReasonMountFailed}
}

// NotLazyError says why a layer is not mounted lazily.
type NotLazyError struct {
	// Reason is one of the Reason constants.
	Reason string
	// Detail says what happened and what would make the layer lazy.
	Detail string
	// Layer and Image are the layer digest and image reference, when
	// the filesystem learnt them (a pull without image labels).
	Layer, Image string
	// Err is the cause, if any.
	Err error
}

func (e *NotLazyError) Error() string { return e.Detail }

func (e *NotLazyError) Unwrap() error { return e.Err }

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

// maxUnpacked bounds what an unpackedLog remembers: the layers it lists,
// and the layers it warned of.
const maxUnpacked = 4096

// unpackedLog remembers recent unpacked layers and counts them by reason.
type unpackedLog struct {
	mu      sync.Mutex
	byChain map[string]Unpacked
	order   []string
	counts  map[string]int64
	// warned holds reason+layer of the warnings given, oldest first in
	// warnedOrder: a layer pulled again (another namespace, a retried
	// pull) is logged at debug, and a daemon pulling many images forgets
	// the oldest rather than grow.
	warned      map[string]bool
	warnedOrder []string
}

func newUnpackedLog() *unpackedLog {
	return &unpackedLog{byChain: map[string]Unpacked{}, counts: map[string]int64{}, warned: map[string]bool{}}
}

// add records that the layer pulled as chainID is unpacked because of err,
// and warns, once per layer and reason, with what would make it lazy.
func (u *unpackedLog) add(ctx context.Context, chainID string, labels map[string]string, err error) {
	var nl *NotLazyError
	if !errors.As(err, &nl) {
		nl = &NotLazyError{Reason: ReasonMountFailed, Err: err,
			Detail: "mounting it lazily failed: " + err.Error() + " (fix what the error names; the layer is lazy at its next pull)"}
	}
	e := Unpacked{ChainID: chainID, Layer: labels[LabelLayerDigest], Image: labels[LabelImageRef],
		Reason: nl.Reason, Detail: nl.Detail, Time: time.Now()}
	if e.Layer == "" {
		e.Layer = nl.Layer
	}
	if e.Image == "" {
		e.Image = nl.Image
	}
	// A layer without a digest (a label-less pull whose image was not
	// found) is known by its chain ID.
	id := e.Layer
	if id == "" {
		id = chainID
	}
	key := e.Reason + " " + id
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
	first := !u.warned[key]
	if first {
		u.warned[key] = true
		u.warnedOrder = append(u.warnedOrder, key)
		for len(u.warnedOrder) > maxUnpacked {
			delete(u.warned, u.warnedOrder[0])
			u.warnedOrder = u.warnedOrder[1:]
		}
	}
	u.mu.Unlock()
	entry := log.G(ctx).WithFields(log.Fields{"layer": e.Layer, "image": e.Image, "reason": e.Reason, "chainID": chainID})
	if first {
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
