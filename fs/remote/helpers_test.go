package remote

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/registry"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/service/resolver"
)

// testRepo is where every test blob lives.
const testRepo = "library/python"

// checkLeaks fails the test if goroutines started during it outlive it.
// Call it first, so that its cleanup runs after every other cleanup.
func checkLeaks(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(3 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				var buf bytes.Buffer
				_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
				t.Errorf("%d goroutines before the test, %d after:\n%s", before, runtime.NumGoroutine(), buf.String())
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// testRegistry is go-containerregistry's in-memory registry holding one
// random blob. Servers started on it share its storage.
type testRegistry struct {
	handler http.Handler
	data    []byte
	digest  digest.Digest
}

func newTestRegistry(t testing.TB, size int) *testRegistry {
	t.Helper()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	r := &testRegistry{
		handler: registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		data:    data,
		digest:  digest.FromBytes(data),
	}
	r.push(t, testRepo, data)
	return r
}

// push uploads a blob monolithically, straight into the handler.
func (r *testRegistry) push(t testing.TB, repo string, data []byte) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost,
		"/v2/"+repo+"/blobs/uploads/?digest="+digest.FromBytes(data).String(), bytes.NewReader(data))
	rec := httptest.NewRecorder()
	r.handler.ServeHTTP(rec, req)
	if rec.Code != http.StatusCreated {
		t.Fatalf("push blob: %d %s", rec.Code, rec.Body)
	}
}

func (r *testRegistry) desc() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: r.digest, Size: int64(len(r.data))}
}

// serve runs h on loopback until the test ends and returns its host:port.
func serve(t testing.TB, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// deadHost is a loopback address that refuses connections.
func deadHost(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// anonymous is a keychain without credentials, so tests never read the
// machine's docker config.
type anonymous struct{}

func (anonymous) Resolve(authn.Resource) (authn.Authenticator, error) { return authn.Anonymous, nil }

// staticKeychain hands out one user's credentials for every registry.
type staticKeychain struct{ user, pass string }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return &authn.Basic{Username: k.user, Password: k.pass}, nil
}

// testOptions are fast-failing fetcher options over containerd's host
// configuration for plain-HTTP loopback registries.
func testOptions(t testing.TB, ro resolver.Options) Options {
	t.Helper()
	ro.PlainHTTP = true
	if ro.Keychain == nil {
		ro.Keychain = anonymous{}
	}
	return Options{
		Hosts:          resolver.Hosts(context.Background(), ro),
		RequestTimeout: 5 * time.Second,
		RetryBackoff:   5 * time.Millisecond,
	}
}

// openBlob opens the registry's blob at host with opts; the fetcher is
// closed when the test ends.
func openBlob(t testing.TB, r *testRegistry, host string, opts Options) (*Fetcher, *Blob) {
	t.Helper()
	f := New(opts)
	t.Cleanup(f.Close)
	b, err := f.Open(context.Background(), host+"/"+testRepo+":lazy", r.desc())
	if err != nil {
		t.Fatal(err)
	}
	return f, b
}

// fault handles one request instead of the registry, given the registry.
type fault func(w http.ResponseWriter, r *http.Request, next http.Handler)

// faulty passes requests to a registry, except that blob GETs take their
// turn through a scripted list of faults first. It counts what it sees.
type faulty struct {
	next http.Handler

	mu     sync.Mutex
	faults []fault
	ranges []string // Range header of every blob GET

	gets, heads, other atomic.Int64
	inFlight, maxIn    atomic.Int64
	delay              time.Duration // added to every blob GET
	done               chan struct{} // closed when the test ends, to free stalled handlers
}

func newFaulty(t testing.TB, next http.Handler, faults ...fault) *faulty {
	f := &faulty{next: next, faults: faults, done: make(chan struct{})}
	t.Cleanup(func() { close(f.done) })
	return f
}

// add scripts more faults for the next blob GETs.
func (f *faulty) add(faults ...fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = append(f.faults, faults...)
}

func (f *faulty) rangesSeen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.ranges...)
}

func (f *faulty) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.Contains(r.URL.Path, "/blobs/sha256:") {
		f.other.Add(1)
		f.next.ServeHTTP(w, r)
		return
	}
	if r.Method == http.MethodHead {
		f.heads.Add(1)
		f.next.ServeHTTP(w, r)
		return
	}
	f.gets.Add(1)
	n := f.inFlight.Add(1)
	defer f.inFlight.Add(-1)
	for {
		m := f.maxIn.Load()
		if n <= m || f.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	f.mu.Lock()
	f.ranges = append(f.ranges, r.Header.Get("Range"))
	var fl fault
	if len(f.faults) > 0 {
		fl, f.faults = f.faults[0], f.faults[1:]
	}
	f.mu.Unlock()
	if f.delay > 0 {
		time.Sleep(f.delay)
	}
	if fl != nil {
		fl(w, r, f.next)
		return
	}
	f.next.ServeHTTP(w, r)
}

// status answers with code.
func status(code int) fault {
	return func(w http.ResponseWriter, _ *http.Request, _ http.Handler) {
		http.Error(w, http.StatusText(code), code)
	}
}

// record runs the registry and returns its full response.
func record(r *http.Request, next http.Handler) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	return rec
}

// truncate sends the registry's headers but only half its body, then aborts
// the connection: the client sees a short body.
func truncate(w http.ResponseWriter, r *http.Request, next http.Handler) {
	rec := record(r, next)
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	body := rec.Body.Bytes()
	_, _ = w.Write(body[:len(body)/2])
	w.(http.Flusher).Flush()
	panic(http.ErrAbortHandler)
}

// reset sends the registry's headers and half its body, then resets the
// TCP connection.
func reset(w http.ResponseWriter, r *http.Request, next http.Handler) {
	rec := record(r, next)
	conn, rw, err := w.(http.Hijacker).Hijack()
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(rw, "HTTP/1.1 %d %s\r\n", rec.Code, http.StatusText(rec.Code))
	_ = rec.Header().Write(rw)
	fmt.Fprintf(rw, "\r\n")
	body := rec.Body.Bytes()
	_, _ = rw.Write(body[:len(body)/2])
	_ = rw.Flush()
	_ = conn.(*net.TCPConn).SetLinger(0)
	conn.Close()
}

// ignoreRange answers as a server without range support: 200, whole body.
func ignoreRange(w http.ResponseWriter, r *http.Request, next http.Handler) {
	r.Header.Del("Range")
	next.ServeHTTP(w, r)
}

// stall answers nothing until the client gives up or the test ends.
func (f *faulty) stall(w http.ResponseWriter, r *http.Request, _ http.Handler) {
	select {
	case <-r.Context().Done():
	case <-f.done:
	}
}

// repeat returns n copies of fl.
func repeat(n int, fl fault) []fault {
	out := make([]fault, n)
	for i := range out {
		out[i] = fl
	}
	return out
}

// storage serves a blob the way object stores do behind a registry
// redirect: by name, with single and multi-range support from
// http.ServeContent, and signed URLs that it can revoke.
type storage struct {
	data    []byte
	mu      sync.Mutex
	revoked map[string]bool
	gets    atomic.Int64
}

func (s *storage) revoke(sig string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.revoked[sig] = true
}

func (s *storage) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.gets.Add(1)
	s.mu.Lock()
	bad := s.revoked[r.URL.Query().Get("sig")]
	s.mu.Unlock()
	if bad {
		http.Error(w, "Request has expired", http.StatusForbidden)
		return
	}
	http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(s.data))
}

// checkRanges reads ranges and compares them with want.
func checkRanges(t testing.TB, b *Blob, want []byte, ranges []Range) {
	t.Helper()
	if err := b.ReadRanges(context.Background(), ranges); err != nil {
		t.Fatal(err)
	}
	for _, r := range ranges {
		if !bytes.Equal(r.Buf, want[r.Off:r.Off+int64(len(r.Buf))]) {
			t.Fatalf("range %d+%d: wrong bytes", r.Off, len(r.Buf))
		}
	}
}

// ranges returns n ranges of size bytes, step bytes apart from off.
func ranges(off, step int64, n, size int) []Range {
	out := make([]Range, n)
	for i := range out {
		out[i] = Range{Off: off + int64(i)*step, Buf: make([]byte, size)}
	}
	return out
}

// checkRange reads n bytes at off and compares them with want.
func checkRange(t testing.TB, b *Blob, want []byte, off int64, n int) {
	t.Helper()
	checkRanges(t, b, want, []Range{{Off: off, Buf: make([]byte, n)}})
}
