package remote

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/service/resolver"
)

func TestReadRangesReturnsExactBytes(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 3<<20+17)
	host := serve(t, reg.handler)
	_, b := openBlob(t, reg, host, testOptions(t, resolver.Options{}))
	size := b.Size()
	if size != int64(len(reg.data)) || b.Digest() != reg.digest {
		t.Fatalf("blob %s of %d bytes, want %s of %d", b.Digest(), size, reg.digest, len(reg.data))
	}

	for _, tc := range []struct {
		name   string
		ranges []Range
	}{
		{"one byte at the start", ranges(0, 0, 1, 1)},
		{"the last byte", ranges(size-1, 0, 1, 1)},
		{"a footer", ranges(size-51, 0, 1, 51)},
		{"the whole blob", ranges(0, 0, 1, int(size))},
		{"ranges out of order", []Range{{Off: 2 << 20, Buf: make([]byte, 100)}, {Off: 5, Buf: make([]byte, 10)}, {Off: 1 << 20, Buf: make([]byte, 4096)}}},
		{"overlapping ranges", []Range{{Off: 100, Buf: make([]byte, 1000)}, {Off: 500, Buf: make([]byte, 2000)}, {Off: 600, Buf: make([]byte, 10)}}},
		{"empty ranges among others", []Range{{Off: size, Buf: nil}, {Off: 7, Buf: make([]byte, 3)}, {Off: 0, Buf: []byte{}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkRanges(t, b, reg.data, tc.ranges)
		})
	}

	t.Run("ReadAt reads to the end with io.EOF", func(t *testing.T) {
		buf := make([]byte, 100)
		n, err := b.ReadAt(buf, size-40)
		if n != 40 || err != io.EOF || !bytes.Equal(buf[:n], reg.data[size-40:]) {
			t.Fatalf("ReadAt at end: n=%d err=%v", n, err)
		}
		if n, err := b.ReadAt(buf, size); n != 0 || err != io.EOF {
			t.Fatalf("ReadAt past end: n=%d err=%v", n, err)
		}
		got, err := io.ReadAll(io.NewSectionReader(b, 1000, 70000))
		if err != nil || !bytes.Equal(got, reg.data[1000:71000]) {
			t.Fatalf("SectionReader: %d bytes, %v", len(got), err)
		}
	})

	t.Run("rejects ranges outside the blob", func(t *testing.T) {
		for _, r := range []Range{{Off: -1, Buf: make([]byte, 1)}, {Off: size - 1, Buf: make([]byte, 2)}, {Off: size + 1}} {
			err := b.ReadRanges(context.Background(), []Range{r})
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), reg.digest.String()) {
				t.Errorf("range %d+%d: got %v, want an invalid argument naming the blob", r.Off, len(r.Buf), err)
			}
		}
	})
}

func TestOpen(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	srv := newFaulty(t, reg.handler)
	host := serve(t, srv)
	opts := testOptions(t, resolver.Options{})
	f := New(opts)
	t.Cleanup(f.Close)
	ctx := context.Background()

	t.Run("takes the size from a HEAD without fetching the blob", func(t *testing.T) {
		b, err := f.Open(ctx, host+"/"+testRepo+"@"+reg.digest.String(), ocispec.Descriptor{Digest: reg.digest})
		if err != nil {
			t.Fatal(err)
		}
		if b.Size() != int64(len(reg.data)) || srv.heads.Load() != 1 || srv.gets.Load() != 0 {
			t.Fatalf("size %d after %d HEADs and %d GETs", b.Size(), srv.heads.Load(), srv.gets.Load())
		}
		checkRange(t, b, reg.data, 12345, 678)
	})
	t.Run("sends nothing when the size is known", func(t *testing.T) {
		before := f.Stats().Requests
		if _, err := f.Open(ctx, host+"/"+testRepo+":lazy", reg.desc()); err != nil {
			t.Fatal(err)
		}
		if n := f.Stats().Requests - before; n != 0 {
			t.Fatalf("%d requests", n)
		}
	})
	t.Run("reports an unknown blob as not found", func(t *testing.T) {
		missing := digest.FromString("missing")
		_, err := f.Open(ctx, host+"/"+testRepo+":lazy", ocispec.Descriptor{Digest: missing})
		if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), missing.String()) {
			t.Fatalf("got %v, want not found naming the blob", err)
		}
	})
	t.Run("rejects bad input", func(t *testing.T) {
		for _, tc := range []struct {
			ref  string
			desc ocispec.Descriptor
		}{
			{"not a reference", reg.desc()},
			{host + "/" + testRepo, ocispec.Descriptor{Digest: "sha256:short", Size: 1}},
			{host + "/" + testRepo, ocispec.Descriptor{Digest: reg.digest, Size: -1}},
		} {
			if _, err := f.Open(ctx, tc.ref, tc.desc); !errdefs.IsInvalidArgument(err) {
				t.Errorf("Open(%q, %v): got %v, want invalid argument", tc.ref, tc.desc, err)
			}
		}
		if _, err := New(Options{}).Open(ctx, host+"/"+testRepo, reg.desc()); !errdefs.IsInvalidArgument(err) {
			t.Errorf("no hosts: got %v", err)
		}
	})
}

func TestRangeIgnoringServer(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 2<<20)
	srv := newFaulty(t, reg.handler, repeat(10, ignoreRange)...)
	f, b := openBlob(t, reg, serve(t, srv), testOptions(t, resolver.Options{}))

	t.Run("serves a read at offset 0 from the start of the body", func(t *testing.T) {
		checkRange(t, b, reg.data, 0, 1000)
		// Only a little of the 2 MiB body is read before the connection is dropped.
		if got := f.Stats().BytesFetched; got > 1<<20 {
			t.Fatalf("read %d bytes of the body", got)
		}
	})
	t.Run("refuses any other offset", func(t *testing.T) {
		err := b.ReadRanges(context.Background(), ranges(1000, 0, 1, 10))
		if err == nil || !strings.Contains(err.Error(), "ignored Range") {
			t.Fatalf("got %v", err)
		}
	})
}

func TestRefusesBytesItDidNotAskFor(t *testing.T) {
	shift := func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		var a, z int64
		fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &a, &z)
		r.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", a+1, z+1))
		next.ServeHTTP(w, r)
	}
	wrongSize := func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		rec := record(r, next)
		w.Header().Set("Content-Range", strings.Replace(rec.Header().Get("Content-Range"), "/", "/1", 1))
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	}
	for _, tc := range []struct {
		name  string
		fault fault
		want  string
	}{
		{"a shifted Content-Range", shift, "Content-Range"},
		{"a Content-Range of another size", wrongSize, "blob has"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			reg := newTestRegistry(t, 1<<20)
			srv := newFaulty(t, reg.handler, tc.fault)
			_, b := openBlob(t, reg, serve(t, srv), testOptions(t, resolver.Options{}))
			err := b.ReadRanges(context.Background(), ranges(100, 0, 1, 100))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error about %q", err, tc.want)
			}
		})
	}
}

func TestCoalescesNearRanges(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ranges   []Range
		mergeGap int64
		want     int64
	}{
		{"100 adjacent ranges, shuffled", shuffled(ranges(4096, 1024, 100, 1024)), 0, 1},
		{"100 ranges 3 KiB apart", ranges(4096, 4096, 100, 1024), 0, 1},
		{"touching only, 100 ranges 3 KiB apart", ranges(4096, 4096, 100, 1024), -1, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			reg := newTestRegistry(t, 1<<20)
			srv := newFaulty(t, reg.handler)
			opts := testOptions(t, resolver.Options{})
			opts.MergeGap = tc.mergeGap
			opts.MaxRanges = 1
			f, b := openBlob(t, reg, serve(t, srv), opts)
			checkRanges(t, b, reg.data, tc.ranges)
			if srv.gets.Load() != tc.want || f.Stats().Requests != tc.want {
				t.Fatalf("%d GETs (%d counted), want %d", srv.gets.Load(), f.Stats().Requests, tc.want)
			}
		})
	}
}

func shuffled(rs []Range) []Range {
	rand.Shuffle(len(rs), func(i, j int) { rs[i], rs[j] = rs[j], rs[i] })
	return rs
}

func TestSplitsLargeReads(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 20<<20+3)
	srv := newFaulty(t, reg.handler)
	srv.delay = 20 * time.Millisecond // so that parallel requests overlap
	opts := testOptions(t, resolver.Options{})
	opts.MaxRequestSize = 1 << 20
	f, b := openBlob(t, reg, serve(t, srv), opts)

	checkRange(t, b, reg.data, 0, len(reg.data))
	if srv.gets.Load() != 21 {
		t.Fatalf("%d GETs, want 21", srv.gets.Load())
	}
	if m := srv.maxIn.Load(); m < 2 || m > 4 {
		t.Fatalf("%d requests in flight at most, want 2 to 4", m)
	}
	for _, r := range srv.rangesSeen() {
		var a, z int64
		if _, err := fmt.Sscanf(r, "bytes=%d-%d", &a, &z); err != nil || z-a+1 > 1<<20 {
			t.Fatalf("range %q", r)
		}
	}
	if got := f.Stats().BytesFetched; got != int64(len(reg.data)) {
		t.Fatalf("fetched %d bytes, want %d", got, len(reg.data))
	}
}

func TestMultiRangeRequests(t *testing.T) {
	// 50 ranges of 4 KiB, 100 KiB apart: too far to coalesce.
	want := func() []Range { return ranges(1000, 100<<10, 50, 4096) }

	t.Run("a server with multipart/byteranges gets few requests", func(t *testing.T) {
		checkLeaks(t)
		reg := newTestRegistry(t, 8<<20)
		store := &storage{data: reg.data, revoked: map[string]bool{}}
		f, b := openBlob(t, reg, serve(t, store), testOptions(t, resolver.Options{}))
		checkRanges(t, b, reg.data, want())
		if store.gets.Load() != 2 || f.Stats().Requests != 2 {
			t.Fatalf("%d GETs, want 2 (32 + 18 ranges)", store.gets.Load())
		}
		if got := f.Stats().BytesFetched; got < 50*4096 || got > 60*4096 {
			t.Fatalf("fetched %d bytes for 50 ranges of 4 KiB", got)
		}
	})
	t.Run("a body cut short is resumed with the missing ranges only", func(t *testing.T) {
		checkLeaks(t)
		reg := newTestRegistry(t, 8<<20)
		store := &storage{data: reg.data, revoked: map[string]bool{}}
		srv := newFaulty(t, store, reset)
		opts := testOptions(t, resolver.Options{})
		opts.MaxInFlight = 1
		_, b := openBlob(t, reg, serve(t, srv), opts)
		checkRanges(t, b, reg.data, want())
		seen := srv.rangesSeen()
		if len(seen) != 3 || strings.Count(seen[1], ",") >= strings.Count(seen[0], ",") {
			t.Fatalf("ranges asked: %q", seen)
		}
	})
	for _, tc := range []struct {
		name    string
		handler func(reg *testRegistry) http.Handler
	}{
		// go-containerregistry's registry answers the first range only.
		{"a server that answers one range", func(reg *testRegistry) http.Handler { return reg.handler }},
		{"a server that answers 416", func(reg *testRegistry) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.Contains(r.Header.Get("Range"), ",") {
					http.Error(w, "no", http.StatusRequestedRangeNotSatisfiable)
					return
				}
				reg.handler.ServeHTTP(w, r)
			})
		}},
		{"a server that answers 200", func(reg *testRegistry) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.Contains(r.Header.Get("Range"), ",") {
					r.Header.Del("Range")
				}
				reg.handler.ServeHTTP(w, r)
			})
		}},
	} {
		t.Run(tc.name+" gets single ranges", func(t *testing.T) {
			checkLeaks(t)
			reg := newTestRegistry(t, 8<<20)
			srv := newFaulty(t, tc.handler(reg))
			_, b := openBlob(t, reg, serve(t, srv), testOptions(t, resolver.Options{}))
			checkRanges(t, b, reg.data, want())
			before := srv.gets.Load()
			checkRanges(t, b, reg.data, want())
			if n := srv.gets.Load() - before; n != 50 {
				t.Fatalf("second read: %d GETs, want 50", n)
			}
			for _, r := range srv.rangesSeen()[before:] {
				if strings.Contains(r, ",") {
					t.Fatalf("asked for several ranges after the server refused: %q", r)
				}
			}
		})
	}
}
