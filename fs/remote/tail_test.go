package remote

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/service/resolver"
)

func TestOpenTail(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 100<<10)
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		faults []fault
		n      int64
		size   int64 // in the descriptor; 0: unknown
		heads  int64 // HEAD requests expected
		gets   int64 // blob GETs expected
	}{
		{name: "size unknown", n: 16 << 10, gets: 1},
		{name: "size known", n: 16 << 10, size: 100 << 10, gets: 1},
		{name: "whole blob", n: 1 << 20, gets: 1},
		{name: "retried after a short body", n: 16 << 10, faults: []fault{truncate}, gets: 2},
		{name: "server without ranges, small blob", n: 1 << 20, faults: []fault{ignoreRange}, gets: 1},
		{name: "server without ranges", n: 16 << 10, faults: []fault{ignoreRange}, heads: 1, gets: 2},
		{name: "server refusing suffixes", n: 16 << 10, faults: []fault{status(http.StatusRequestedRangeNotSatisfiable)}, heads: 1, gets: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFaulty(t, suffixRanges(reg), tc.faults...)
			host := serve(t, srv)
			f := New(testOptions(t, resolver.Options{}))
			defer f.Close()
			desc := ocispec.Descriptor{Digest: reg.digest, Size: tc.size}
			b, tail, err := f.OpenTail(ctx, host+"/"+testRepo+":lazy", desc, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			want := reg.data[max(0, int64(len(reg.data))-tc.n):]
			if !bytes.Equal(tail, want) {
				t.Errorf("tail: %d bytes, want the blob's last %d", len(tail), len(want))
			}
			if b.Size() != int64(len(reg.data)) {
				t.Errorf("size %d, want %d", b.Size(), len(reg.data))
			}
			if h, g := srv.heads.Load(), srv.gets.Load(); h != tc.heads || g != tc.gets {
				t.Errorf("%d HEAD and %d GET requests, want %d and %d (ranges %q)", h, g, tc.heads, tc.gets, srv.rangesSeen())
			}
			// The blob reads on as one opened with its size.
			buf := make([]byte, 100)
			if _, err := b.ReadAt(buf, 1000); err != nil || !bytes.Equal(buf, reg.data[1000:1100]) {
				t.Errorf("read after the tail: %v", err)
			}
		})
	}
}

func TestOpenTailRefusesAWrongSize(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 10<<10)
	host := serve(t, suffixRanges(reg))
	f := New(testOptions(t, resolver.Options{}))
	defer f.Close()
	desc := ocispec.Descriptor{Digest: reg.digest, Size: 20 << 10}
	if _, _, err := f.OpenTail(context.Background(), host+"/"+testRepo+":lazy", desc, 4096); err == nil ||
		!strings.Contains(err.Error(), "the manifest says") {
		t.Errorf("got %v, want a size mismatch", err)
	}
	if _, _, err := f.OpenTail(context.Background(), host+"/"+testRepo+":lazy", desc, 0); err == nil {
		t.Error("a tail of 0 bytes was accepted")
	}
}

// suffixRanges answers suffix ranges (`bytes=-N`) for the registry's blob,
// which go-containerregistry's registry refuses and distribution's (through
// http.ServeContent) serves.
func suffixRanges(reg *testRegistry) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n, ok := strings.CutPrefix(r.Header.Get("Range"), "bytes=-"); ok {
			if k, err := strconv.Atoi(n); err == nil {
				size := len(reg.data)
				r.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", max(0, size-k), size-1))
			}
		}
		reg.handler.ServeHTTP(w, r)
	})
}

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		in             string
		off, end, size int64
		ok             bool
	}{
		{"bytes 0-9/10", 0, 10, 10, true},
		{"bytes 5-9/*", 5, 10, -1, true},
		{"bytes 5-9/9", 0, 0, 0, false},
		{"bytes 9-5/10", 0, 0, 0, false},
		{"bytes -5/10", 0, 0, 0, false},
		{"items 0-9/10", 0, 0, 0, false},
		{"bytes 0-9", 0, 0, 0, false},
	} {
		off, end, size, err := parseContentRange(tc.in)
		if (err == nil) != tc.ok || off != tc.off || end != tc.end || size != tc.size {
			t.Errorf("%q: %d %d %d %v", tc.in, off, end, size, err)
		}
	}
}
