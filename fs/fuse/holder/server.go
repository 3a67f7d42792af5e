package holder

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// ServerOptions configure a holder.
type ServerOptions struct {
	// Socket is where daemons reach the holder; Socket+".lock" keeps a
	// second holder from starting on it.
	Socket string
	// PIDFile, if set, gets the holder's pid.
	PIDFile string
	// AbortAfter is how long the holder keeps connections no daemon has
	// talked to; then it closes them and exits. 0 means forever.
	AbortAfter time.Duration
	// IdleExit is how long a holder with nothing to hold waits for a
	// daemon before it exits. 0 means forever.
	IdleExit time.Duration
	// Orphaned, if set, is called (in a goroutine of its own) each time
	// the last connected daemon goes away: to take over what a daemon
	// that died cannot put right itself.
	Orphaned func()
}

type entry struct {
	record []byte
	fds    []int
}

type server struct {
	opts ServerOptions
	log  *log.Entry

	mu       sync.Mutex
	entries  map[string]entry
	conns    map[*net.UnixConn]struct{}
	clients  int
	orphaned time.Time // when the last daemon went away; zero while one is connected
}

// ErrRunning is returned by Serve when another holder owns the socket.
var ErrRunning = errors.New("a fuse holder is already running on this socket")

// Serve runs a holder until ctx ends or it gives up (AbortAfter, IdleExit).
// On return every fd it held is closed.
func Serve(ctx context.Context, opts ServerOptions) error {
	if err := os.MkdirAll(filepath.Dir(opts.Socket), 0o700); err != nil {
		return err
	}
	lock, err := os.OpenFile(opts.Socket+".lock", os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("fuse holder lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return ErrRunning
		}
		return fmt.Errorf("fuse holder lock: %w", err)
	}
	// The lock is ours: a socket file left there is a dead holder's.
	if err := os.Remove(opts.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: opts.Socket, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("fuse holder: %w", err)
	}
	defer l.Close()
	if err := os.Chmod(opts.Socket, 0o600); err != nil {
		return err
	}
	if opts.PIDFile != "" {
		if err := os.WriteFile(opts.PIDFile, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644); err != nil {
			return err
		}
		defer os.Remove(opts.PIDFile)
	}
	s := &server{opts: opts, log: log.G(ctx).WithField("socket", opts.Socket),
		entries: map[string]entry{}, conns: map[*net.UnixConn]struct{}{}, orphaned: time.Now()}
	defer s.closeAll()
	s.log.WithField("pid", os.Getpid()).Info("fuse holder started")

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	go s.watch(ctx, cancel)
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("fuse holder accept: %w", err)
		}
		go s.handle(ctx, c)
	}
}

// closeAll closes every connection and lets go of every fd: a holder that
// returns holds nothing and answers no one.
func (s *server) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
	for k, e := range s.entries {
		closeAll(e.fds)
		delete(s.entries, k)
	}
}

// watch drops entries whose connection is gone and gives up when no
// daemon came back in time.
func (s *server) watch(ctx context.Context, stop func()) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		for k, e := range s.entries {
			if len(e.fds) > 0 && Dead(e.fds[0]) {
				s.log.WithField("key", k).Info("connection gone: dropping it")
				closeAll(e.fds)
				delete(s.entries, k)
			}
		}
		n, orphaned := len(s.entries), s.orphaned
		s.mu.Unlock()
		if orphaned.IsZero() {
			continue
		}
		alone := time.Since(orphaned)
		switch {
		case n > 0 && s.opts.AbortAfter > 0 && alone > s.opts.AbortAfter:
			s.log.WithFields(log.Fields{"mounts": n, "after": alone.Round(time.Second)}).
				Error("no daemon came back: giving up the mounts' connections (their readers get ENOTCONN)")
			stop()
			return
		case n == 0 && s.opts.IdleExit > 0 && alone > s.opts.IdleExit:
			s.log.Info("nothing to hold and no daemon: exiting")
			stop()
			return
		}
	}
}

func (s *server) handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	s.mu.Lock()
	if ctx.Err() != nil {
		s.mu.Unlock()
		return
	}
	s.conns[c] = struct{}{}
	s.clients++
	orphan := time.Duration(0)
	if !s.orphaned.IsZero() {
		orphan = time.Since(s.orphaned)
	}
	s.orphaned = time.Time{}
	n := len(s.entries)
	s.mu.Unlock()
	if orphan > 0 && n > 0 {
		s.log.WithFields(log.Fields{"mounts": n, "unserved_for": orphan.Round(time.Millisecond)}).Info("a daemon is back")
	}
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.clients--
		alone := s.clients == 0
		if alone {
			s.orphaned = time.Now()
		}
		n := len(s.entries)
		s.mu.Unlock()
		if alone && s.opts.Orphaned != nil {
			go s.opts.Orphaned()
		}
		if n > 0 {
			s.log.WithField("mounts", n).Info("daemon went away: holding its mounts")
		}
	}()
	for {
		m, fds, err := recv(c)
		if err != nil {
			if !errors.Is(err, errEOF) && ctx.Err() == nil {
				s.log.WithError(err).Warn("daemon connection")
			}
			return
		}
		if err := s.answer(c, m, fds, orphan); err != nil {
			s.log.WithError(err).Warn("answer daemon")
			return
		}
	}
}

func (s *server) answer(c *net.UnixConn, m message, fds []int, orphan time.Duration) error {
	switch m.Op {
	case "hello":
		closeAll(fds)
		s.mu.Lock()
		n := len(s.entries)
		s.mu.Unlock()
		return send(c, message{Op: "hello", PID: os.Getpid(), Version: Version, Entries: n, Orphan: int64(orphan)}, nil)
	case "put":
		if m.Key == "" || len(fds) == 0 {
			closeAll(fds)
			return send(c, message{Op: "error", Error: "put needs a key and fds"}, nil)
		}
		s.mu.Lock()
		if old, ok := s.entries[m.Key]; ok {
			closeAll(old.fds)
		}
		s.entries[m.Key] = entry{record: m.Record, fds: fds}
		s.mu.Unlock()
		return send(c, message{Op: "ok"}, nil)
	case "del":
		closeAll(fds)
		s.mu.Lock()
		if old, ok := s.entries[m.Key]; ok {
			closeAll(old.fds)
			delete(s.entries, m.Key)
		}
		s.mu.Unlock()
		return send(c, message{Op: "ok"}, nil)
	case "list":
		closeAll(fds)
		s.mu.Lock()
		defer s.mu.Unlock()
		for k, e := range s.entries {
			if err := send(c, message{Op: "entry", Key: k, Record: e.record}, e.fds); err != nil {
				return err
			}
		}
		return send(c, message{Op: "end"}, nil)
	}
	closeAll(fds)
	return send(c, message{Op: "error", Error: fmt.Sprintf("unknown op %q", m.Op)}, nil)
}
