package remote

import (
	"io"
	"sync"
	"time"
)

// Link is what the requests to one registry host measured of the path to
// it: how long a request waits for its answer, and how fast a body flows.
// Fetch planning sizes its requests from these instead of from constants
// tuned for one link.
type Link struct {
	// RTT is the shortest recent wait from sending a request to its
	// response headers: the round trip plus the server's own time, without
	// the queueing behind other bodies on the link that longer waits hold.
	RTT time.Duration `json:"rtt"`
	// Bandwidth is the body bytes per second the host delivered while at
	// least one body was flowing, however many were; 0 until measured.
	Bandwidth float64 `json:"bandwidth"`
	// Samples counts the requests and busy periods measured.
	Samples int `json:"samples"`
}

// Known reports whether both figures have been measured.
func (l Link) Known() bool { return l.RTT > 0 && l.Bandwidth > 0 }

// Measurement windows. A minimum over the last rttWindow answers follows a
// route change within that many requests; bandwidth is smoothed over busy
// periods, each weighted by its bytes, so a burst of tiny bodies does not
// outvote one long transfer.
const (
	rttWindow = 16
	// minBusyBytes is the smallest busy period that says anything about
	// bandwidth: shorter ones fit in a shaper's burst or a socket buffer
	// and would report line rate.
	minBusyBytes = 128 << 10
	// bwMemory is how many bytes of recent busy periods the bandwidth
	// estimate averages over.
	bwMemory = 16 << 20
)

// linkMeter measures one host. Its methods are safe for concurrent use.
type linkMeter struct {
	now func() time.Time

	mu      sync.Mutex
	rtts    [rttWindow]time.Duration
	nrtt    int // answers seen; rtts is a ring of the last rttWindow
	active  int // bodies flowing now
	busyAt  time.Time
	busyN   int64 // bytes of the current busy period
	bw      float64
	bwBytes float64 // weight behind bw, capped at bwMemory
	periods int
}

func newLinkMeter(now func() time.Time) *linkMeter {
	if now == nil {
		now = time.Now
	}
	return &linkMeter{now: now}
}

// answered records the wait from a request to its response headers.
func (m *linkMeter) answered(d time.Duration) {
	if d <= 0 {
		d = time.Microsecond
	}
	m.mu.Lock()
	m.rtts[m.nrtt%rttWindow] = d
	m.nrtt++
	m.mu.Unlock()
}

// bodyStart marks a body starting to flow.
func (m *linkMeter) bodyStart() {
	m.mu.Lock()
	if m.active == 0 {
		m.busyAt, m.busyN = m.now(), 0
	}
	m.active++
	m.mu.Unlock()
}

// bodyBytes adds n bytes read from a flowing body.
func (m *linkMeter) bodyBytes(n int) {
	m.mu.Lock()
	m.busyN += int64(n)
	m.mu.Unlock()
}

// bodyEnd marks a body done; the last one ends a busy period, which
// updates the bandwidth if it moved enough bytes.
func (m *linkMeter) bodyEnd() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.active--
	if m.active > 0 {
		return
	}
	d := m.now().Sub(m.busyAt)
	if m.busyN < minBusyBytes || d <= 0 {
		return
	}
	sample := float64(m.busyN) / d.Seconds()
	w := float64(m.busyN)
	m.bw = (m.bw*m.bwBytes + sample*w) / (m.bwBytes + w)
	m.bwBytes = min(m.bwBytes+w, bwMemory)
	m.periods++
}

// link returns the current estimates.
func (m *linkMeter) link() Link {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := Link{Bandwidth: m.bw, Samples: m.nrtt + m.periods}
	for i := range min(m.nrtt, rttWindow) {
		if r := m.rtts[i]; l.RTT == 0 || r < l.RTT {
			l.RTT = r
		}
	}
	return l
}

// meteredBody feeds a response body's flow into a link meter. A body counts
// as flowing from its first read to its close.
type meteredBody struct {
	io.ReadCloser
	m       *linkMeter
	started bool
	closed  bool
}

func (b *meteredBody) Read(p []byte) (int, error) {
	if !b.started {
		b.started = true
		b.m.bodyStart()
	}
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.m.bodyBytes(n)
	}
	return n, err
}

func (b *meteredBody) Close() error {
	if b.started && !b.closed {
		b.closed = true
		b.m.bodyEnd()
	}
	return b.ReadCloser.Close()
}

// meter returns the meter of a registry host, made on first use.
func (f *Fetcher) meter(host string) *linkMeter {
	f.linkMu.Lock()
	defer f.linkMu.Unlock()
	m := f.links[host]
	if m == nil {
		m = newLinkMeter(nil)
		f.links[host] = m
	}
	return m
}

// Links returns what was measured of each registry host, by host name.
func (f *Fetcher) Links() map[string]Link {
	f.linkMu.Lock()
	defer f.linkMu.Unlock()
	out := make(map[string]Link, len(f.links))
	for h, m := range f.links {
		out[h] = m.link()
	}
	return out
}

// Link returns what was measured of the host that last served the blob
// (its first host before any read).
func (b *Blob) Link() Link {
	b.mu.Lock()
	host := b.loc.host
	b.mu.Unlock()
	return b.f.meter(b.hosts[host].Host).link()
}
