package remote

import (
	"context"
	"testing"

	"github.com/lazycas/lazycas/service/resolver"
)

// BenchmarkReadRanges measures ReadRanges throughput against loopback
// servers: go-containerregistry's registry (single ranges only) and an
// object-store-like server that answers multi-range requests.
func BenchmarkReadRanges(b *testing.B) {
	const size = 64 << 20
	reg := newTestRegistry(b, size)
	regHost := serve(b, reg.handler)
	storeHost := serve(b, &storage{data: reg.data, revoked: map[string]bool{}})

	for _, bc := range []struct {
		name   string
		host   string
		ranges func() []Range
	}{
		{"whole-64MiB-split", regHost, func() []Range { return ranges(0, 0, 1, size) }},
		{"sequential-1MiB", regHost, func() []Range { return ranges(0, 1<<20, 64, 1<<20) }},
		{"scattered-4KiB-single", regHost, func() []Range { return ranges(0, 256<<10, 256, 4<<10) }},
		{"scattered-4KiB-multi", storeHost, func() []Range { return ranges(0, 256<<10, 256, 4<<10) }},
		{"adjacent-4KiB-coalesced", regHost, func() []Range { return ranges(0, 4<<10, 1024, 4<<10) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			f, blob := openBlob(b, reg, bc.host, testOptions(b, resolver.Options{}))
			rs := bc.ranges()
			var n int64
			for _, r := range rs {
				n += int64(len(r.Buf))
			}
			b.SetBytes(n)
			start := f.Stats()
			b.ResetTimer()
			for b.Loop() {
				if err := blob.ReadRanges(context.Background(), rs); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			end := f.Stats()
			b.ReportMetric(float64(end.Requests-start.Requests)/float64(b.N), "requests/op")
		})
	}
}
