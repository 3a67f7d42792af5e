package holder

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketPath returns a short socket path (a unix socket's is bounded).
func socketPath(t *testing.T) string {
	dir, err := os.MkdirTemp("/tmp", "lzh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "h.sock")
}

// serve runs a holder until the test ends or stop is called; done is
// closed when it returned, and *err is what it returned.
func serve(t *testing.T, opts ServerOptions) (stop func(), done chan struct{}, err *error) {
	ctx, cancel := context.WithCancel(context.Background())
	done, err = make(chan struct{}), new(error)
	go func() {
		*err = Serve(ctx, opts)
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err := dialTimeout(opts.Socket, time.Second); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the holder does not listen 5s after it started")
		}
	}
	return cancel, done, err
}

// pipe returns a pipe whose write end only the holder will keep: the read
// end sees EOF once the holder lets go of it.
func pipe(t *testing.T) (r *os.File, w int) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	r = os.NewFile(uintptr(p[0]), "pipe")
	t.Cleanup(func() { r.Close() })
	return r, p[1]
}

// released reports whether the holder let go of a pipe's write end within d.
func released(t *testing.T, r *os.File, d time.Duration) bool {
	t.Helper()
	_ = r.SetReadDeadline(time.Now().Add(d))
	defer r.SetReadDeadline(time.Time{})
	var b [1]byte
	_, err := r.Read(b[:])
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

func TestHolderKeepsWhatADaemonPutsAfterItGoes(t *testing.T) {
	sock := socketPath(t)
	serve(t, ServerOptions{Socket: sock})
	c, err := Connect(context.Background(), ClientOptions{Socket: sock, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r, w := pipe(t)
	if err := c.Put("/mnt/a", []byte("record a"), w); err != nil {
		t.Fatal(err)
	}
	unix.Close(w) // the client and the holder have copies
	_, w2 := pipe(t)
	if err := c.Put("/mnt/b", []byte("record b"), w2); err != nil {
		t.Fatal(err)
	}
	unix.Close(w2)
	if err := c.Delete("/mnt/b"); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if released(t, r, 200*time.Millisecond) {
		t.Fatal("the holder let go of a connection after its daemon went")
	}

	next, err := Connect(context.Background(), ClientOptions{Socket: sock, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if next.Orphaned() <= 0 {
		t.Errorf("the next daemon is told no daemon was gone (%s)", next.Orphaned())
	}
	taken, err := next.Take()
	if err != nil {
		t.Fatal(err)
	}
	if len(taken) != 1 || taken[0].Key != "/mnt/a" || string(taken[0].Record) != "record a" || len(taken[0].Fds) != 1 {
		t.Fatalf("the holder kept %+v, want /mnt/a alone", taken)
	}
	// The fd handed back is the same pipe.
	if _, err := unix.Write(taken[0].Fds[0], []byte("x")); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if n, err := r.Read(b[:]); n != 1 || err != nil || b[0] != 'x' {
		t.Errorf("the fd handed back is not the one put: %d %v", n, err)
	}
	unix.Close(taken[0].Fds[0])
}

func TestANewHolderGetsEverythingWhenTheOneHoldingDies(t *testing.T) {
	sock := socketPath(t)
	stopFirst, firstDone, _ := serve(t, ServerOptions{Socket: sock})
	spawned := make(chan struct{}, 4)
	c, err := Connect(context.Background(), ClientOptions{Socket: sock, Timeout: 2 * time.Second,
		Spawn: func(context.Context) error {
			serve(t, ServerOptions{Socket: sock})
			spawned <- struct{}{}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, w := pipe(t)
	if err := c.Put("/mnt/a", []byte("record"), w); err != nil {
		t.Fatal(err)
	}
	unix.Close(w)
	stopFirst()
	<-firstDone
	select {
	case <-spawned:
	case <-time.After(5 * time.Second):
		t.Fatal("no new holder was started within 5s of the first one's end")
	}
	// The client still has its copy: the connection never closed.
	if released(t, r, 100*time.Millisecond) {
		t.Fatal("the connection closed when its holder died while the daemon ran")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		other, err := Connect(context.Background(), ClientOptions{Socket: sock, Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		taken, err := other.Take()
		other.Close()
		if err == nil && len(taken) == 1 && taken[0].Key == "/mnt/a" {
			unix.Close(taken[0].Fds[0])
			return
		}
		for _, e := range taken {
			unix.Close(e.Fds[0])
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new holder keeps %d entries (%v), want /mnt/a", len(taken), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestHolderGivesUpWhenNoDaemonComesBack(t *testing.T) {
	sock := socketPath(t)
	_, done, serr := serve(t, ServerOptions{Socket: sock, AbortAfter: time.Second})
	c, err := Connect(context.Background(), ClientOptions{Socket: sock, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r, w := pipe(t)
	if err := c.Put("/mnt/a", nil, w); err != nil {
		t.Fatal(err)
	}
	unix.Close(w)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if !released(t, r, 5*time.Second) {
		t.Fatal("the holder kept a connection 5s after no daemon came back for its 1s")
	}
	select {
	case <-done:
		if *serr != nil {
			t.Errorf("the holder that gave up returned %v", *serr)
		}
	case <-time.After(5 * time.Second):
		t.Error("the holder that gave up still runs")
	}
}

func TestOneHolderPerSocket(t *testing.T) {
	sock := socketPath(t)
	serve(t, ServerOptions{Socket: sock})
	c, err := Connect(context.Background(), ClientOptions{Socket: sock, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := Serve(context.Background(), ServerOptions{Socket: sock}); !errors.Is(err, ErrRunning) {
		t.Fatalf("a second holder on the socket: %v, want ErrRunning", err)
	}
	if _, err := c.Take(); err != nil {
		t.Errorf("the first holder stopped answering after a second one tried: %v", err)
	}
}
