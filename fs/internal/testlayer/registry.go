package testlayer

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/snapshot"
)

// Repo is the repository every test blob is pushed to.
const Repo = "test/img"

// Registry is go-containerregistry's in-memory registry on loopback, with
// a counter of the blob requests it serves and a switch that makes it fail
// range requests.
type Registry struct {
	// Host is host:port of the registry.
	Host string
	srv  *httptest.Server

	failRanges  atomic.Int32 // HTTP status range GETs get instead of data; 0 serves them
	delayRanges atomic.Int64 // how long range GETs wait before they are served

	mu     sync.Mutex
	counts map[digest.Digest]*Counts
	sizes  map[digest.Digest]int // of pushed blobs, to answer suffix ranges
}

// Counts are the requests for one blob (or all of them).
type Counts struct {
	// Requests counts GET and HEAD requests.
	Requests int64
	// Ranges counts GET requests with a Range header.
	Ranges int64
	// Bytes counts response body bytes of GET requests.
	Bytes int64
}

// NewRegistry starts a registry that stops when the test ends.
func NewRegistry(t testing.TB) *Registry {
	t.Helper()
	r := &Registry{counts: map[digest.Digest]*Counts{}, sizes: map[digest.Digest]int{}}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		d, isBlob := blobDigest(req.URL.Path)
		if !isBlob || (req.Method != http.MethodGet && req.Method != http.MethodHead) {
			inner.ServeHTTP(w, req)
			return
		}
		ranged := req.Method == http.MethodGet && req.Header.Get("Range") != ""
		r.count(d, func(c *Counts) {
			c.Requests++
			if ranged {
				c.Ranges++
			}
		})
		if d := time.Duration(r.delayRanges.Load()); ranged && d > 0 {
			select {
			case <-time.After(d):
			case <-req.Context().Done():
				return
			}
		}
		switch code := r.failRanges.Load(); {
		case !ranged || code == 0:
		case code == Stall:
			<-req.Context().Done()
			return
		default:
			http.Error(w, "injected failure", int(code))
			return
		}
		r.suffixRange(d, req)
		inner.ServeHTTP(&countingWriter{ResponseWriter: w, add: func(n int) {
			r.count(d, func(c *Counts) { c.Bytes += int64(n) })
		}}, req)
	}))
	r.Host = strings.TrimPrefix(r.srv.URL, "http://")
	t.Cleanup(r.srv.Close)
	return r
}

// suffixRange turns a request for a blob's last bytes (`bytes=-N`), which
// go-containerregistry's registry refuses and distribution's serves, into
// the equivalent range.
func (r *Registry) suffixRange(d digest.Digest, req *http.Request) {
	n, ok := strings.CutPrefix(req.Header.Get("Range"), "bytes=-")
	if !ok {
		return
	}
	r.mu.Lock()
	size, known := r.sizes[d]
	r.mu.Unlock()
	if k, err := strconv.Atoi(n); err == nil && known && k > 0 && size > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", max(0, size-k), size-1))
	}
}

// blobDigest returns the digest of a /v2/<repo>/blobs/<digest> path.
func blobDigest(p string) (digest.Digest, bool) {
	i := strings.LastIndex(p, "/blobs/")
	if !strings.HasPrefix(p, "/v2/") || i < 0 {
		return "", false
	}
	d, err := digest.Parse(p[i+len("/blobs/"):])
	return d, err == nil
}

func (r *Registry) count(d digest.Digest, fn func(*Counts)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.counts[d]
	if c == nil {
		c = &Counts{}
		r.counts[d] = c
	}
	fn(c)
}

// Counts returns the requests served so far for blob d.
func (r *Registry) Counts(d digest.Digest) Counts {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c := r.counts[d]; c != nil {
		return *c
	}
	return Counts{}
}

// Total returns the blob requests served so far.
func (r *Registry) Total() Counts {
	r.mu.Lock()
	defer r.mu.Unlock()
	var t Counts
	for _, c := range r.counts {
		t.Requests += c.Requests
		t.Ranges += c.Ranges
		t.Bytes += c.Bytes
	}
	return t
}

// Stall, given to FailRanges, makes range requests hang until the client
// gives up.
const Stall = -1

// FailRanges makes every later range request answer with HTTP status
// code, or hang with Stall; 0 serves them again.
func (r *Registry) FailRanges(code int) { r.failRanges.Store(int32(code)) }

// DelayRanges makes every later range request wait d before it is
// answered; 0 answers them at once.
func (r *Registry) DelayRanges(d time.Duration) { r.delayRanges.Store(int64(d)) }

// Close stops the server: later requests find no one listening.
func (r *Registry) Close() { r.srv.Close() }

// Push uploads b as a blob of Repo.
func (r *Registry) Push(t testing.TB, b *Blob) {
	t.Helper()
	url := fmt.Sprintf("%s/v2/%s/blobs/uploads/?digest=%s", r.srv.URL, Repo, b.Digest)
	resp, err := http.Post(url, "application/octet-stream", bytes.NewReader(b.Data))
	if err != nil {
		t.Fatalf("push blob: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		msg, _ := io.ReadAll(resp.Body)
		t.Fatalf("push blob: %s: %s", resp.Status, msg)
	}
	r.mu.Lock()
	r.sizes[b.Digest] = len(b.Data)
	r.mu.Unlock()
}

// Ref is the image reference test layers are mounted from.
func (r *Registry) Ref() string { return r.Host + "/" + Repo + ":latest" }

// Labels are the snapshot labels containerd passes for layer b of Ref.
func (r *Registry) Labels(b *Blob) map[string]string {
	return map[string]string{
		snapshot.LabelImageRef:    r.Ref(),
		snapshot.LabelLayerDigest: b.Digest.String(),
		snapshot.LabelTOCDigest:   b.TOCDigest.String(),
	}
}

type countingWriter struct {
	http.ResponseWriter
	add func(int)
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.add(n)
	return n, err
}
