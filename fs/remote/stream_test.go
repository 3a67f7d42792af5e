package remote

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/lazycas/lazycas/service/resolver"
)

// A streamed read reports its bytes as they arrive, never goes backwards,
// and after a body cut short asks only for the rest: bytes a caller was
// told about are never written again.
func TestReadStreamReportsProgressAndResumes(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	for _, tc := range []struct {
		name   string
		faults []fault
		gets   int64
	}{
		{"whole body", nil, 1},
		{"resumed after a short body", []fault{truncate}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fy := newFaulty(t, reg.handler, tc.faults...)
			_, b := openBlob(t, reg, serve(t, fy), testOptions(t, resolver.Options{}))
			off, n := int64(1000), 600<<10
			buf := make([]byte, n)
			var mu sync.Mutex
			var reports []int64
			err := b.ReadStream(context.Background(), off, buf, func(filled int64) {
				mu.Lock()
				defer mu.Unlock()
				if k := len(reports); k > 0 && filled <= reports[k-1] {
					t.Errorf("progress went from %d to %d", reports[k-1], filled)
				}
				// What was reported is final: check it now.
				if !bytes.Equal(buf[:filled], reg.data[off:off+filled]) {
					t.Errorf("bytes reported at %d differ from the blob", filled)
				}
				reports = append(reports, filled)
			})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, reg.data[off:off+int64(n)]) {
				t.Fatal("streamed bytes differ from the blob")
			}
			if len(reports) < 2 || reports[len(reports)-1] != int64(n) {
				t.Errorf("reports %v: want several, ending at %d", reports, n)
			}
			if got := fy.gets.Load(); got != tc.gets {
				t.Errorf("%d GETs, want %d", got, tc.gets)
			}
			if tc.gets > 1 {
				rs := fy.rangesSeen()
				if last := rs[len(rs)-1]; last == fmt.Sprintf("bytes=%d-%d", off, off+int64(n)-1) {
					t.Errorf("the retry asked for the whole range again (%s)", last)
				}
			}
		})
	}
}

// The link meter keeps the shortest recent answer as the round trip and
// measures bandwidth over busy periods, however many bodies overlap.
func TestLinkMeter(t *testing.T) {
	now := time.Unix(0, 0)
	m := newLinkMeter(func() time.Time { return now })
	if m.link().Known() {
		t.Fatal("a new meter knows nothing")
	}
	for _, d := range []time.Duration{30, 20, 50} {
		m.answered(d * time.Millisecond)
	}
	// Two bodies overlapping: 1 MB each over one second in all.
	m.bodyStart()
	m.bodyStart()
	m.bodyBytes(1e6)
	now = now.Add(500 * time.Millisecond)
	m.bodyEnd()
	m.bodyBytes(1e6)
	now = now.Add(500 * time.Millisecond)
	m.bodyEnd()
	// A tiny period says nothing about bandwidth.
	m.bodyStart()
	m.bodyBytes(1000)
	now = now.Add(time.Microsecond)
	m.bodyEnd()
	l := m.link()
	if l.RTT != 20*time.Millisecond {
		t.Errorf("RTT %v, want the shortest answer, 20ms", l.RTT)
	}
	if l.Bandwidth < 1.99e6 || l.Bandwidth > 2.01e6 {
		t.Errorf("bandwidth %.0f B/s, want 2e6", l.Bandwidth)
	}
	// The round trip follows a change within rttWindow answers.
	for range rttWindow {
		m.answered(40 * time.Millisecond)
	}
	if got := m.link().RTT; got != 40*time.Millisecond {
		t.Errorf("RTT %v after the path changed, want 40ms", got)
	}
}

// A real fetch measures the host it talks to.
func TestFetcherMeasuresTheLink(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<20)
	f, b := openBlob(t, reg, serve(t, reg.handler), testOptions(t, resolver.Options{}))
	checkRange(t, b, reg.data, 0, 512<<10)
	l := b.Link()
	if !l.Known() {
		t.Fatalf("after a 512 KiB read the link is %+v", l)
	}
	if len(f.Stats().Links) != 1 {
		t.Errorf("stats list links %v, want the one host", f.Stats().Links)
	}
}
