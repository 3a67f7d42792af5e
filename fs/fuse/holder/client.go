package holder

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/containerd/log"
)

// Entry is what a holder keeps for one key.
type Entry struct {
	Key    string
	Record []byte
	// Fds are the caller's to close.
	Fds []int
}

// ClientOptions configure a Client.
type ClientOptions struct {
	Socket string
	// Spawn starts a holder on Socket; nil means one must already run.
	Spawn func(ctx context.Context) error
	// Timeout bounds one exchange with the holder and the wait for a
	// spawned holder to listen.
	Timeout time.Duration
}

// Client is a daemon's side of the holder. It keeps a copy of every fd it
// puts, so that it can hand everything to a new holder when the one it
// talks to dies (see the package comment).
type Client struct {
	opts ClientOptions
	log  *log.Entry

	mu     sync.Mutex // one exchange at a time; guards conn and held
	conn   *net.UnixConn
	held   map[string]Entry
	hello  message
	stop   chan struct{}
	closed sync.WaitGroup
}

// Connect reaches the holder on opts.Socket, starting one if none runs.
// A holder it cannot reach yet (one run apart, say by a DaemonSet, that
// is not up) is an error, and still a Client: it keeps trying, every
// second, and hands over what it was given meanwhile once it gets there.
func Connect(ctx context.Context, opts ClientOptions) (*Client, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	c := &Client{opts: opts, log: log.G(ctx).WithField("holder", opts.Socket), held: map[string]Entry{}, stop: make(chan struct{})}
	err := c.connect(ctx)
	c.closed.Add(1)
	go c.watch(context.WithoutCancel(ctx))
	return c, err
}

// Orphaned is how long no daemon was connected to the holder when this
// client connected first: how long the mounts it held went unserved.
func (c *Client) Orphaned() time.Duration { return time.Duration(c.hello.Orphan) }

// connect dials the holder, spawning one if none answers. c.mu held or
// not yet shared.
func (c *Client) connect(ctx context.Context) error {
	conn, err := dialTimeout(c.opts.Socket, c.opts.Timeout)
	if err != nil && c.opts.Spawn != nil {
		if serr := c.opts.Spawn(ctx); serr != nil {
			return fmt.Errorf("start fuse holder: %w", serr)
		}
		deadline := time.Now().Add(c.opts.Timeout)
		for {
			if conn, err = dialTimeout(c.opts.Socket, c.opts.Timeout); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err != nil {
		return fmt.Errorf("reach fuse holder: %w", err)
	}
	old := c.conn
	c.conn = conn
	h, _, err := c.exchange(message{Op: "hello", PID: 0})
	if err != nil {
		c.conn = old
		conn.Close()
		return fmt.Errorf("fuse holder hello: %w", err)
	}
	if h.Version != Version {
		c.conn = old
		conn.Close()
		return fmt.Errorf("fuse holder speaks protocol %d, this daemon %d", h.Version, Version)
	}
	if old != nil {
		old.Close()
	}
	c.hello = h
	return nil
}

// exchange sends m and reads one answer. c.mu held.
func (c *Client) exchange(m message, fds ...int) (message, []int, error) {
	if c.conn == nil {
		return message{}, nil, errors.New("not connected to the fuse holder")
	}
	_ = c.conn.SetDeadline(time.Now().Add(c.opts.Timeout))
	defer c.conn.SetDeadline(time.Time{})
	if err := send(c.conn, m, fds); err != nil {
		return message{}, nil, err
	}
	a, afds, err := recv(c.conn)
	if err != nil {
		return message{}, nil, err
	}
	if a.Op == "error" {
		closeAll(afds)
		return a, nil, errors.New(a.Error)
	}
	return a, afds, nil
}

// Take lists what the holder keeps. The fds are the caller's; an entry the
// caller wants kept must be Put again.
func (c *Client) Take() ([]Entry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m, fds, err := c.exchange(message{Op: "list"})
	var out []Entry
	for err == nil && m.Op == "entry" {
		out = append(out, Entry{Key: m.Key, Record: m.Record, Fds: fds})
		m, fds, err = recv(c.conn)
	}
	if err == nil && m.Op != "end" {
		err = fmt.Errorf("fuse holder answered list with %q", m.Op)
	}
	if err != nil {
		for _, e := range out {
			closeAll(e.Fds)
		}
		closeAll(fds)
		return nil, fmt.Errorf("list fuse holder: %w", err)
	}
	return out, nil
}

// Put hands the holder copies of fds under key, replacing what it kept
// there. The caller keeps its fds.
func (c *Client) Put(key string, record []byte, fds ...int) error {
	mine, err := dupAll(fds)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.held[key]; ok {
		closeAll(old.Fds)
	}
	c.held[key] = Entry{Key: key, Record: record, Fds: mine}
	if _, _, err := c.exchange(message{Op: "put", Key: key, Record: record}, mine...); err != nil {
		// Kept in held: the watcher hands it over once a holder answers.
		return fmt.Errorf("hand %s to the fuse holder: %w", key, err)
	}
	return nil
}

// Delete makes the holder let go of key.
func (c *Client) Delete(key string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.held[key]; ok {
		closeAll(old.Fds)
		delete(c.held, key)
	}
	if _, _, err := c.exchange(message{Op: "del", Key: key}); err != nil {
		return fmt.Errorf("take %s from the fuse holder: %w", key, err)
	}
	return nil
}

// watch checks the holder every second; when it is gone, a new one gets
// everything this client holds.
func (c *Client) watch(ctx context.Context) {
	defer c.closed.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		if err := c.ensure(ctx); err != nil {
			c.log.WithError(err).Error("fuse holder unreachable: mounts survive this daemon only while it runs")
		}
	}
}

// ensure pings the holder and, when it does not answer, connects to (or
// starts) a new one and hands it every held entry.
func (c *Client) ensure(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, _, err := c.exchange(message{Op: "hello"}); err == nil {
		return nil
	}
	if err := c.connect(ctx); err != nil {
		return err
	}
	for key, e := range c.held {
		if _, _, err := c.exchange(message{Op: "put", Key: key, Record: e.Record}, e.Fds...); err != nil {
			return fmt.Errorf("hand %s to the new fuse holder: %w", key, err)
		}
	}
	c.log.WithFields(log.Fields{"mounts": len(c.held), "pid": c.hello.PID}).Warn("fuse holder was gone: a new one holds the mounts")
	return nil
}

// Close stops watching and lets go of this client's copies, after making
// sure a holder has them all. The holder keeps running.
func (c *Client) Close() error {
	close(c.stop)
	c.closed.Wait()
	err := c.ensure(context.Background())
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		for k, e := range c.held {
			closeAll(e.Fds)
			delete(c.held, k)
		}
	}
	// On error the copies stay open: this process exiting closes them,
	// and until then the mounts live.
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
	return err
}
