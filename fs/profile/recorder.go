package profile

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// Window bounds a recording by default: a container's start-up, not its
// life.
const Window = 30 * time.Second

// Recorder records the first open of each file of one layer, from the
// first open on, for a window of time or MaxFiles files, whichever ends
// first. It is safe for concurrent use; once closed, Record is one atomic
// load.
type Recorder struct {
	layer  digest.Digest
	window time.Duration
	now    func() time.Time

	closed atomic.Bool
	mu     sync.Mutex
	start  time.Time // first Record; zero before
	seen   map[digest.Digest]bool
	order  []Access
}

// NewRecorder returns a recorder of layer whose window is window (Window
// when 0).
func NewRecorder(layer digest.Digest, window time.Duration) *Recorder {
	if window <= 0 {
		window = Window
	}
	return &Recorder{layer: layer, window: window, now: time.Now, seen: map[digest.Digest]bool{}}
}

// Record notes an open of the file with digest d. It reports whether this
// was the recording's first access, when the caller arms the window's end.
func (r *Recorder) Record(d digest.Digest) (first bool) {
	if r.closed.Load() {
		return false
	}
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed.Load() || r.seen[d] {
		return false
	}
	if r.start.IsZero() {
		r.start, first = now, true
	}
	at := now.Sub(r.start)
	if at > r.window {
		r.closed.Store(true)
		return false
	}
	r.seen[d] = true
	r.order = append(r.order, Access{Digest: d, AtUs: at.Microseconds()})
	if len(r.order) >= MaxFiles {
		r.closed.Store(true)
	}
	return first
}

// Layer is the digest of the layer recorded.
func (r *Recorder) Layer() digest.Digest { return r.layer }

// Window is the recording's window.
func (r *Recorder) Window() time.Duration { return r.window }

// Snapshot returns the accesses recorded so far, recording on.
func (r *Recorder) Snapshot() []Access {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Access(nil), r.order...)
}

// Close ends the recording and returns its accesses in order; later calls
// return nil, so that a recording is stored once.
func (r *Recorder) Close() []Access {
	r.closed.Store(true)
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.order
	r.order = nil
	return out
}
