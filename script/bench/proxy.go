package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// proxy is the registry's front door in the benchmark: a TCP proxy on the
// loopback that every puller (containerd's client, the lazycas daemon)
// connects to. It delays each direction by a fixed latency, counts the
// bytes the registry sends, and reads the HTTP requests going the other
// way to count them (it never changes a byte).
//
// The delay is applied to data as the proxy forwards it, after the shaped
// link: the sending TCP stack does not see the round trip, so the latency
// costs what it costs a request/response exchange, not TCP slow start.
type proxy struct {
	ln       net.Listener
	upstream string
	latency  time.Duration

	down     atomic.Int64 // bytes from the registry to the clients
	up       atomic.Int64 // bytes from the clients to the registry
	conns    atomic.Int64
	requests atomic.Int64 // HTTP requests seen
	blobGets atomic.Int64 // GET /v2/.../blobs/...
	ranged   atomic.Int64 // requests with a Range header
	ranges   atomic.Int64 // byte ranges in those headers
	rangeLen atomic.Int64 // bytes those ranges ask for (where bounded)

	// trace, when set, gets one line per request: when it was sent (after
	// the latency), method, path and range; for reading a run's timeline.
	trace   io.Writer
	traceMu sync.Mutex
	started time.Time

	mu     sync.Mutex
	open   map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// proxyCounters is a snapshot of a proxy's counters.
type proxyCounters struct {
	Down, Up, Conns, Requests, BlobGets, Ranged, Ranges, RangeBytes int64
}

func (c proxyCounters) sub(o proxyCounters) proxyCounters {
	return proxyCounters{c.Down - o.Down, c.Up - o.Up, c.Conns - o.Conns, c.Requests - o.Requests,
		c.BlobGets - o.BlobGets, c.Ranged - o.Ranged, c.Ranges - o.Ranges, c.RangeBytes - o.RangeBytes}
}

// startProxy listens on a free loopback port and forwards to upstream.
// trace, if not nil, gets a line per request.
func startProxy(upstream string, latency time.Duration, trace io.Writer) (*proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &proxy{ln: ln, upstream: upstream, latency: latency, open: map[net.Conn]struct{}{}, trace: trace, started: time.Now()}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Addr is the proxy's host:port.
func (p *proxy) Addr() string { return p.ln.Addr().String() }

func (p *proxy) counters() proxyCounters {
	return proxyCounters{p.down.Load(), p.up.Load(), p.conns.Load(), p.requests.Load(),
		p.blobGets.Load(), p.ranged.Load(), p.ranges.Load(), p.rangeLen.Load()}
}

// Close stops accepting, cuts every open connection and waits for the
// forwarding goroutines. It is idempotent.
func (p *proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.ln.Close()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.open[c] = struct{}{}
	return true
}

func (p *proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.open, c)
	p.mu.Unlock()
	c.Close()
}

func (p *proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			continue
		}
		p.conns.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			p.handle(c)
		}()
	}
}

func (p *proxy) handle(client net.Conn) {
	// A new connection costs a round trip (the TCP handshake) on a real
	// link.
	if p.latency > 0 {
		time.Sleep(2 * p.latency)
	}
	server, err := net.DialTimeout("tcp", p.upstream, 10*time.Second)
	if err != nil {
		return
	}
	if !p.track(server) {
		return
	}
	defer p.untrack(server)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		sn := &sniffer{p: p, conn: p.conns.Load()}
		p.pipe(server, client, &p.up, sn.feed)
	}()
	go func() {
		defer wg.Done()
		p.pipe(client, server, &p.down, nil)
	}()
	wg.Wait()
}

// chunk is data read at some time, to be written latency later.
type chunk struct {
	data []byte
	due  time.Time
}

// pipe copies src to dst, delayed by the latency, counting bytes into n
// and showing them to see; at the end of src it half-closes dst.
func (p *proxy) pipe(dst, src net.Conn, n *atomic.Int64, see func([]byte)) {
	defer func() {
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		} else {
			dst.Close()
		}
	}()
	if p.latency == 0 {
		buf := make([]byte, 64<<10)
		for {
			k, err := src.Read(buf)
			if k > 0 {
				n.Add(int64(k))
				if see != nil {
					see(buf[:k])
				}
				if _, werr := dst.Write(buf[:k]); werr != nil {
					src.Close()
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	// Up to 4096 chunks (256 MiB at most) in flight: far more than a
	// 100 Mbit/s link carries in any plausible latency.
	q := make(chan chunk, 4096)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			k, err := src.Read(buf)
			if k > 0 {
				n.Add(int64(k))
				if see != nil {
					see(buf[:k])
				}
				q <- chunk{buf[:k], time.Now().Add(p.latency)}
			}
			if err != nil {
				return
			}
		}
	}()
	failed := false
	for c := range q {
		if failed {
			continue // drain, so the reader is never stuck
		}
		if d := time.Until(c.due); d > 0 {
			time.Sleep(d)
		}
		if _, err := dst.Write(c.data); err != nil {
			failed = true
			src.Close()
		}
	}
}

// sniffer follows the HTTP/1.1 requests of one connection and counts them.
// Pulls send requests without bodies; a body announced by Content-Length is
// skipped. Anything that does not parse as HTTP stops the sniffing of that
// connection, never the forwarding.
type sniffer struct {
	p    *proxy
	conn int64
	buf  []byte
	skip int64
	dead bool
}

func (s *sniffer) feed(b []byte) {
	if s.dead {
		return
	}
	if s.skip > 0 {
		k := min(s.skip, int64(len(b)))
		s.skip -= k
		b = b[k:]
	}
	s.buf = append(s.buf, b...)
	for !s.dead {
		end := bytes.Index(s.buf, []byte("\r\n\r\n"))
		if end < 0 {
			if len(s.buf) > 64<<10 {
				s.dead = true
			}
			return
		}
		head := s.buf[:end+4]
		s.buf = s.buf[end+4:]
		s.request(head)
		if s.skip > 0 {
			k := min(s.skip, int64(len(s.buf)))
			s.skip -= k
			s.buf = s.buf[k:]
		}
	}
}

func (s *sniffer) request(head []byte) {
	r := textproto.NewReader(bufio.NewReader(bytes.NewReader(head)))
	line, err := r.ReadLine()
	if err != nil {
		s.dead = true
		return
	}
	f := strings.Fields(line)
	if len(f) != 3 || !strings.HasPrefix(f[2], "HTTP/") {
		s.dead = true
		return
	}
	hdr, err := r.ReadMIMEHeader()
	if err != nil && !errors.Is(err, io.EOF) {
		s.dead = true
		return
	}
	s.p.requests.Add(1)
	if f[0] == "GET" && strings.Contains(f[1], "/blobs/") {
		s.p.blobGets.Add(1)
	}
	rg := hdr.Get("Range")
	if rg != "" {
		s.p.ranged.Add(1)
		n, total := parseRanges(rg)
		s.p.ranges.Add(n)
		s.p.rangeLen.Add(total)
	}
	if s.p.trace != nil {
		path := f[1]
		if i := strings.LastIndex(path, "sha256:"); i >= 0 && len(path) > i+19 {
			path = path[:i+19]
		}
		s.p.traceMu.Lock()
		fmt.Fprintf(s.p.trace, "%s +%.3fs conn %d %s %s %s\n", time.Now().Format("15:04:05.000"),
			time.Since(s.p.started).Seconds(), s.conn, f[0], path, rg)
		s.p.traceMu.Unlock()
	}
	if cl, err := strconv.ParseInt(hdr.Get("Content-Length"), 10, 64); err == nil && cl > 0 {
		s.skip = cl
	}
}

// parseRanges counts the ranges of a "bytes=a-b,c-d" header and the bytes
// the bounded ones ask for.
func parseRanges(h string) (n, total int64) {
	spec, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes=")
	if !ok {
		return 0, 0
	}
	for _, r := range strings.Split(spec, ",") {
		a, b, ok := strings.Cut(strings.TrimSpace(r), "-")
		if !ok {
			continue
		}
		n++
		x, err1 := strconv.ParseInt(a, 10, 64)
		y, err2 := strconv.ParseInt(b, 10, 64)
		if err1 == nil && err2 == nil && y >= x {
			total += y - x + 1
		}
	}
	return n, total
}
