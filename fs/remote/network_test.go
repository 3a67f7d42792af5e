package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/service/resolver"
)

func TestRetriesTransientFailures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		faults []fault
	}{
		{"503 twice then success", repeat(2, status(http.StatusServiceUnavailable))},
		{"500, 502, 504 and 429", []fault{status(500), status(502), status(504), status(429)}},
		{"a short body", []fault{truncate}},
		{"a reset connection mid-body", []fault{reset, reset}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			reg := newTestRegistry(t, 2<<20)
			srv := newFaulty(t, reg.handler, tc.faults...)
			f, b := openBlob(t, reg, serve(t, srv), testOptions(t, resolver.Options{}))
			checkRange(t, b, reg.data, 1000, 1<<20)
			n := int64(len(tc.faults))
			if got := f.Stats().Retries; got != n {
				t.Errorf("%d retries, want %d", got, n)
			}
			if got := srv.gets.Load(); got != n+1 {
				t.Errorf("%d GETs, want %d", got, n+1)
			}
		})
	}

	t.Run("gives up after Retries and says why", func(t *testing.T) {
		checkLeaks(t)
		reg := newTestRegistry(t, 1<<20)
		srv := newFaulty(t, reg.handler, repeat(10, status(http.StatusServiceUnavailable))...)
		opts := testOptions(t, resolver.Options{})
		opts.Retries = 2
		f, b := openBlob(t, reg, serve(t, srv), opts)
		err := b.ReadRanges(context.Background(), ranges(10, 0, 1, 20))
		if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), reg.digest.String()+" range 10-29") {
			t.Fatalf("got %v, want unavailable naming blob and range", err)
		}
		if srv.gets.Load() != 3 || f.Stats().Retries != 2 {
			t.Fatalf("%d GETs, %d retries", srv.gets.Load(), f.Stats().Retries)
		}
	})

	t.Run("does not retry a client error", func(t *testing.T) {
		checkLeaks(t)
		reg := newTestRegistry(t, 1<<20)
		srv := newFaulty(t, reg.handler, status(http.StatusForbidden))
		f, b := openBlob(t, reg, serve(t, srv), testOptions(t, resolver.Options{}))
		err := b.ReadRanges(context.Background(), ranges(0, 0, 1, 20))
		if !errdefs.IsPermissionDenied(err) || srv.gets.Load() != 1 || f.Stats().Retries != 0 {
			t.Fatalf("got %v after %d GETs", err, srv.gets.Load())
		}
	})
}

func TestRedirectIsCachedAndRenewed(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 4<<20)
	store := &storage{data: reg.data, revoked: map[string]bool{}}
	storeHost := serve(t, store)
	var resolves atomic.Int64
	host := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			sig := resolves.Add(1)
			http.Redirect(w, r, fmt.Sprintf("http://%s/blob?sig=%d", storeHost, sig), http.StatusTemporaryRedirect)
			return
		}
		reg.handler.ServeHTTP(w, r)
	}))
	f, b := openBlob(t, reg, host, testOptions(t, resolver.Options{}))

	step := func(name string, wantResolves, wantStore int64) {
		t.Helper()
		checkRange(t, b, reg.data, rand.Int64N(3<<20), 4096)
		if resolves.Load() != wantResolves || store.gets.Load() != wantStore {
			t.Fatalf("%s: %d redirects and %d storage GETs, want %d and %d",
				name, resolves.Load(), store.gets.Load(), wantResolves, wantStore)
		}
	}
	step("first read follows the redirect", 1, 1)
	step("second read uses the cached URL", 1, 2)
	store.revoke("1")
	step("an expired URL is resolved again", 2, 4)
	step("and the new URL is cached", 2, 5)
	if got := f.Stats().Requests; got != 2+1+3+1 {
		t.Fatalf("%d requests, want 7", got)
	}

	t.Run("gives up when the fresh URL is refused too", func(t *testing.T) {
		store.revoke("2")
		store.revoke("3")
		err := b.ReadRanges(context.Background(), ranges(0, 0, 1, 10))
		if !errdefs.IsPermissionDenied(err) || resolves.Load() != 3 {
			t.Fatalf("got %v after %d redirects", err, resolves.Load())
		}
	})
}

// tokenServer is a registry front that demands bearer tokens from its own
// token endpoint, the way Docker Hub does.
type tokenServer struct {
	mu         sync.Mutex
	valid      string
	issued     int
	challenges int
	badScope   string
}

func (ts *tokenServer) token(w http.ResponseWriter, r *http.Request) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if s := r.URL.Query().Get("scope"); s != "repository:"+testRepo+":pull" || r.URL.Query().Get("service") != "test-registry" {
		ts.badScope = r.URL.RawQuery
	}
	ts.issued++
	ts.valid = fmt.Sprintf("tok-%d", ts.issued)
	_ = json.NewEncoder(w).Encode(map[string]any{"token": ts.valid, "expires_in": 300})
}

func (ts *tokenServer) revoke() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ts.valid = "revoked"
}

func (ts *tokenServer) counts() (issued, challenges int) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.issued, ts.challenges
}

func (ts *tokenServer) guard(tokenHost string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ts.mu.Lock()
		ok := ts.valid != "" && r.Header.Get("Authorization") == "Bearer "+ts.valid
		errParam := ""
		if !ok {
			ts.challenges++
			if ts.valid != "" && r.Header.Get("Authorization") != "" {
				errParam = `,error="invalid_token"`
			}
		}
		ts.mu.Unlock()
		if !ok {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(
				`Bearer realm="http://%s/token",service="test-registry",scope="repository:%s:pull"%s`, tokenHost, testRepo, errParam))
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func TestTokenAuth(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 2<<20)
	ts := &tokenServer{}
	tokenHost := serve(t, http.HandlerFunc(ts.token))
	host := serve(t, ts.guard(tokenHost, reg.handler))
	_, b := openBlob(t, reg, host, testOptions(t, resolver.Options{}))

	checkRange(t, b, reg.data, 0, 100)
	checkRanges(t, b, reg.data, ranges(0, 200<<10, 10, 1000)) // ten parallel requests
	for range 5 {
		checkRange(t, b, reg.data, 1<<20, 10)
	}
	if issued, challenges := ts.counts(); issued != 1 || challenges != 1 {
		t.Fatalf("%d tokens issued after %d challenges, want 1 and 1", issued, challenges)
	}
	if ts.badScope != "" {
		t.Fatalf("token request %q", ts.badScope)
	}

	ts.revoke()
	checkRange(t, b, reg.data, 5, 10)
	if issued, challenges := ts.counts(); issued != 2 || challenges != 2 {
		t.Fatalf("after revocation: %d tokens issued after %d challenges, want 2 and 2", issued, challenges)
	}
}

func TestBasicAuth(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	var challenges atomic.Int64
	srv := newFaulty(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != "s3cret" {
			challenges.Add(1)
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		reg.handler.ServeHTTP(w, r)
	}))
	host := serve(t, srv)

	t.Run("with the right password", func(t *testing.T) {
		_, b := openBlob(t, reg, host, testOptions(t, resolver.Options{Keychain: staticKeychain{"alice", "s3cret"}}))
		for i := range 5 {
			checkRange(t, b, reg.data, int64(i)*1000, 10)
		}
		if challenges.Load() != 1 {
			t.Fatalf("%d challenges, want 1", challenges.Load())
		}
	})
	t.Run("with a wrong password, one retry then a clear error", func(t *testing.T) {
		challenges.Store(0)
		gets := srv.gets.Load()
		_, b := openBlob(t, reg, host, testOptions(t, resolver.Options{Keychain: staticKeychain{"alice", "wrong"}}))
		err := b.ReadRanges(context.Background(), ranges(0, 0, 1, 10))
		if !errdefs.IsUnauthorized(err) || !strings.Contains(err.Error(), "401") {
			t.Fatalf("got %v, want a 401", err)
		}
		if n := srv.gets.Load() - gets; n != 2 {
			t.Fatalf("%d GETs, want 2", n)
		}
	})
}

func TestMirrorsInOrder(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	upstream := newFaulty(t, reg.handler)
	empty := newFaulty(t, newTestRegistry(t, 10).handler) // has no such blob: 404
	flaky := newFaulty(t, reg.handler, repeat(100, status(http.StatusBadGateway))...)
	resolveOnly := newFaulty(t, reg.handler) // may not serve blobs
	good := newFaulty(t, reg.handler)

	dir := t.TempDir()
	const name = "registry.test"
	hostsToml := fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull"]
[host."http://%s"]
  capabilities = ["pull", "resolve"]
[host."http://%s"]
  capabilities = ["pull"]
[host."http://%s"]
  capabilities = ["resolve"]
[host."http://%s"]
  capabilities = ["pull"]
`, serve(t, upstream), deadHost(t), serve(t, empty), serve(t, flaky), serve(t, resolveOnly), serve(t, good))
	if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, resolver.Options{HostsDir: dir})
	opts.Retries = 2
	f, b := openBlob(t, reg, name, opts)

	checkRange(t, b, reg.data, 100, 1000)
	if empty.gets.Load() != 1 || flaky.gets.Load() != 3 || resolveOnly.gets.Load() != 0 || good.gets.Load() != 1 || upstream.gets.Load() != 0 {
		t.Fatalf("first read: GETs empty %d flaky %d resolve-only %d good %d upstream %d, want 1 3 0 1 0",
			empty.gets.Load(), flaky.gets.Load(), resolveOnly.gets.Load(), good.gets.Load(), upstream.gets.Load())
	}
	if f.Stats().Retries != 2 {
		t.Fatalf("%d retries, want 2 (the refused mirror is not retried)", f.Stats().Retries)
	}
	checkRange(t, b, reg.data, 5000, 1000)
	if empty.gets.Load() != 1 || flaky.gets.Load() != 3 || good.gets.Load() != 2 {
		t.Fatalf("second read went elsewhere than the mirror that served the first")
	}
	if !strings.Contains(good.rangesSeen()[0], "bytes=100-1099") {
		t.Fatalf("ranges %q", good.rangesSeen())
	}

	t.Run("all hosts failing lists every host", func(t *testing.T) {
		b2, err := f.Open(context.Background(), name+"/"+testRepo, ocispec.Descriptor{Digest: digest.FromString("nope"), Size: 10})
		if err != nil {
			t.Fatal(err)
		}
		err = b2.ReadRanges(context.Background(), ranges(0, 0, 1, 10))
		if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("got %v", err)
		}
		// dead, empty, flaky, good, then upstream: each once.
		if n := strings.Count(err.Error(), "; ") + 1; n != 5 {
			t.Fatalf("%d host errors, want 5: %v", n, err)
		}
	})
}

func TestRequestTimeout(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	srv := newFaulty(t, reg.handler)
	opts := testOptions(t, resolver.Options{})
	opts.RequestTimeout = 200 * time.Millisecond
	opts.Retries = 2
	f, b := openBlob(t, reg, serve(t, srv), opts)

	t.Run("a stalled request is retried", func(t *testing.T) {
		srv.add(srv.stall)
		start := time.Now()
		checkRange(t, b, reg.data, 10, 100)
		if d := time.Since(start); d < 200*time.Millisecond || d > 2*time.Second {
			t.Fatalf("took %v", d)
		}
		if f.Stats().Retries != 1 {
			t.Fatalf("%d retries", f.Stats().Retries)
		}
	})
	t.Run("a server that always stalls fails in bounded time", func(t *testing.T) {
		srv.add(repeat(3, srv.stall)...)
		start := time.Now()
		err := b.ReadRanges(context.Background(), ranges(10, 0, 1, 100))
		if !errors.Is(err, errRequestTimeout) || !strings.Contains(err.Error(), "timed out") {
			t.Fatalf("got %v", err)
		}
		if d := time.Since(start); d < 600*time.Millisecond || d > 3*time.Second {
			t.Fatalf("took %v", d)
		}
	})
}

func TestContextCancellation(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	srv := newFaulty(t, reg.handler)
	opts := testOptions(t, resolver.Options{})
	opts.RequestTimeout = 10 * time.Second
	opts.RetryBackoff = 10 * time.Second
	_, b := openBlob(t, reg, serve(t, srv), opts)

	for _, tc := range []struct {
		name   string
		faults []fault
	}{
		{"while the server stalls", []fault{srv.stall}},
		{"while backing off", []fault{status(503), status(503)}},
		{"across parallel requests", repeat(4, srv.stall)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv.add(tc.faults...)
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(100*time.Millisecond, cancel)
			start := time.Now()
			err := b.ReadRanges(ctx, ranges(0, 200<<10, len(tc.faults), 10))
			if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), reg.digest.String()) {
				t.Fatalf("got %v", err)
			}
			if d := time.Since(start); d > time.Second {
				t.Fatalf("took %v", d)
			}
			srv.mu.Lock()
			srv.faults = nil
			srv.mu.Unlock()
		})
	}
	t.Run("an already cancelled context sends nothing", func(t *testing.T) {
		gets := srv.gets.Load()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := b.ReadRanges(ctx, ranges(0, 1<<10, 3, 10)); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v", err)
		}
		if srv.gets.Load() != gets {
			t.Fatal("sent a request")
		}
	})
}

func TestReusesConnections(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	guarded := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != "s3cret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		reg.handler.ServeHTTP(w, r)
	})
	// A 401, a 503 and a 404 on the way: their bodies are drained too.
	srv := httptest.NewUnstartedServer(newFaulty(t, guarded, status(http.StatusServiceUnavailable)))
	var conns atomic.Int64
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	f, b := openBlob(t, reg, host, testOptions(t, resolver.Options{Keychain: staticKeychain{"alice", "s3cret"}}))
	for i := range 20 {
		checkRange(t, b, reg.data, int64(i)*30000, 10000)
	}
	if _, err := f.Open(context.Background(), host+"/"+testRepo, ocispec.Descriptor{Digest: digest.FromString("x")}); !errdefs.IsNotFound(err) {
		t.Fatalf("got %v", err)
	}
	checkRange(t, b, reg.data, 0, 10)
	if conns.Load() != 1 {
		t.Fatalf("%d connections for sequential reads, want 1", conns.Load())
	}
}
