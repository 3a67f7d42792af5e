package plan

import (
	"fmt"
	"math/rand/v2"
	"sort"
	"testing"
	"time"
)

// The simulation replays an access trace over a modelled link: one reader,
// each access after its think time; a file not yet arrived is a miss,
// fetched with one request for the file and the readahead after it. The
// link carries one body at a time at its bandwidth, after a round trip;
// the reader goes on once its own file has arrived (the demand's bytes come
// first in their request), the rest of the window arrives behind it.

type simFile struct{ off, size int64 }

type access struct {
	file  int
	think time.Duration
}

type simResult struct {
	time     time.Duration
	bytes    int64
	requests int
}

func (r simResult) String() string {
	return fmt.Sprintf("%v %.2f MB %d requests", r.time.Round(time.Millisecond), float64(r.bytes)/1e6, r.requests)
}

func simulate(l Link, files []simFile, trace []access, window func(Link) int64) simResult {
	arrives := make([]time.Duration, len(files)) // 0: not requested
	var t, linkFree time.Duration
	var res simResult
	for _, a := range trace {
		t += a.think
		if at := arrives[a.file]; at > 0 {
			t = max(t, at)
			continue
		}
		f := files[a.file]
		off, end := f.off, f.off+f.size
		last := a.file
		if w := window(l); w > 0 {
			for i := a.file + 1; i < len(files) && files[i].off+files[i].size-end <= w; i++ {
				if arrives[i] > 0 {
					break
				}
				last = i
			}
		}
		end = files[last].off + files[last].size
		start := max(t+l.RTT, linkFree)
		for i := a.file; i <= last; i++ {
			arrives[i] = start + l.Transfer(files[i].off+files[i].size-off)
		}
		linkFree = start + l.Transfer(end-off)
		res.bytes += end - off
		res.requests++
		t = arrives[a.file]
	}
	res.time = t
	return res
}

// pythonLike is a deterministic layer and trace shaped like a program
// importing its modules: mostly small files, read in runs of neighbours
// (a package's modules) with gaps, short thinking between files and longer
// between runs.
func pythonLike(seed uint64) ([]simFile, []access) {
	r := rand.New(rand.NewPCG(seed, 1))
	files := make([]simFile, 3000)
	var off int64
	for i := range files {
		var size int64
		switch p := r.Float64(); {
		case p < 0.70:
			size = 1<<10 + r.Int64N(15<<10)
		case p < 0.95:
			size = 16<<10 + r.Int64N(112<<10)
		default:
			size = 128<<10 + r.Int64N(896<<10)
		}
		files[i] = simFile{off: off, size: size}
		off += size + 512 // tar headers between files
	}
	var trace []access
	seen := map[int]bool{}
	for len(trace) < 300 {
		i := r.IntN(len(files))
		think := 5 * time.Millisecond
		for run := 1 + r.IntN(8); run > 0 && i < len(files); i++ {
			if r.Float64() < 0.3 || seen[i] {
				continue
			}
			seen[i] = true
			trace = append(trace, access{file: i, think: think})
			think = 500 * time.Microsecond
			run--
		}
	}
	return files, trace
}

var simLinks = map[string]Link{
	"loopback":     {RTT: 300 * time.Microsecond, Bandwidth: 1e9},
	"100mbit-0ms":  {RTT: 400 * time.Microsecond, Bandwidth: 12.5e6},
	"100mbit-20ms": {RTT: 40 * time.Millisecond, Bandwidth: 12.5e6},
	"1gbit-2ms":    {RTT: 4 * time.Millisecond, Bandwidth: 125e6},
	"20mbit-50ms":  {RTT: 100 * time.Millisecond, Bandwidth: 2.5e6},
}

func fixed(n int64) func(Link) int64 { return func(Link) int64 { return n } }

// The planner's window is never much worse than the better of "exactly the
// files read" and the old fixed 512 KiB window on any link, and each of
// those loses clearly somewhere: a constant is a guess about one link.
func TestReadaheadAdaptsToTheLink(t *testing.T) {
	files, trace := pythonLike(7)
	names := make([]string, 0, len(simLinks))
	for n := range simLinks {
		names = append(names, n)
	}
	sort.Strings(names)
	var exactLoses, fixedLoses bool
	for _, name := range names {
		l := simLinks[name]
		exact := simulate(l, files, trace, fixed(0))
		old := simulate(l, files, trace, fixed(512<<10))
		// The trace reads about two thirds of a run's neighbours.
		window := func(l Link) int64 { return Readahead(l, 2.0/3) }
		got := simulate(l, files, trace, window)
		t.Logf("%-13s window %4d KiB: adaptive %s; exact %s; fixed 512 KiB %s", name, window(l)>>10, got, exact, old)
		best := min(exact.time, old.time)
		if got.time > best+best/10 {
			t.Errorf("%s: adaptive readahead takes %v, more than 1.1 x the best fixed choice's %v", name, got.time, best)
		}
		if got.bytes > old.bytes {
			t.Errorf("%s: adaptive readahead fetches %d bytes, more than the fixed window's %d", name, got.bytes, old.bytes)
		}
		exactLoses = exactLoses || exact.time > got.time*3/2
		fixedLoses = fixedLoses || old.time > got.time*3/2
	}
	if !exactLoses || !fixedLoses {
		t.Errorf("the trace does not tell the policies apart (exact loses somewhere: %v, fixed 512 KiB: %v)", exactLoses, fixedLoses)
	}
}

func TestReadaheadBounds(t *testing.T) {
	for _, tc := range []struct {
		name string
		l    Link
		want int64
	}{
		{"unknown link", Link{}, UnknownReadahead},
		{"bandwidth unknown", Link{RTT: time.Millisecond}, UnknownReadahead},
		{"tiny BDP is floored", Link{RTT: 100 * time.Microsecond, Bandwidth: 12.5e6}, MinReadahead},
		{"BDP in range", Link{RTT: 40 * time.Millisecond, Bandwidth: 12.5e6}, 500000},
		{"huge BDP is capped", Link{RTT: 200 * time.Millisecond, Bandwidth: 125e6}, MaxReadahead},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Readahead(tc.l, 1); got != tc.want {
				t.Errorf("Readahead(%+v) = %d, want %d", tc.l, got, tc.want)
			}
		})
	}
}

func TestWorthKeepsOnlyWhatFinishesWithinARoundTrip(t *testing.T) {
	l := Link{RTT: 40 * time.Millisecond, Bandwidth: 12.5e6} // 500 kB a round trip
	if !Worth(l, 400<<10) {
		t.Error("400 KiB left on a 500 kB-per-round-trip link should be finished")
	}
	if Worth(l, 1<<20) {
		t.Error("1 MiB left on a 500 kB-per-round-trip link should be cancelled")
	}
}

func TestDensity(t *testing.T) {
	for _, tc := range []struct {
		name          string
		misses, files int
		missed, size  int64
		want          bool
	}{
		{"a few hundred imports of a big layer", 300, 6000, 4 << 20, 60 << 20, false},
		{"too few misses however small the layer", 100, 120, 1 << 20, 2 << 20, false},
		{"a quarter of the files", 1500, 6000, 10 << 20, 60 << 20, true},
		{"most of the bytes", 300, 6000, 30 << 20, 60 << 20, true},
	} {
		if got := Density(tc.misses, tc.missed, tc.files, tc.size); got != tc.want {
			t.Errorf("%s: Density = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func BenchmarkReadahead(b *testing.B) {
	l := simLinks["100mbit-20ms"]
	for b.Loop() {
		_ = Readahead(l, Useful(3<<20, 1<<20))
	}
}

func BenchmarkSimulatePythonTrace(b *testing.B) {
	files, trace := pythonLike(7)
	for _, name := range []string{"100mbit-0ms", "100mbit-20ms", "20mbit-50ms"} {
		l := simLinks[name]
		b.Run(name, func(b *testing.B) {
			var r simResult
			for b.Loop() {
				r = simulate(l, files, trace, func(l Link) int64 { return Readahead(l, 2.0/3) })
			}
			b.ReportMetric(r.time.Seconds(), "model-s")
			b.ReportMetric(float64(r.bytes)/1e6, "model-MB")
		})
	}
}

// Useful starts at the prior, follows what readers did once they did
// enough, and never leaves [MinUseful, 1]; the window follows it.
func TestUsefulFollowsReads(t *testing.T) {
	for _, tc := range []struct {
		name           string
		spec, read     int64
		atLeast, below float64
	}{
		{"nothing speculated yet", 0, 0, PriorUseful, PriorUseful + 1e-9},
		{"all of 16 MiB read", 16 << 20, 16 << 20, 0.95, 1 + 1e-9},
		{"none of 16 MiB read", 16 << 20, 0, MinUseful, MinUseful + 1e-9},
		{"a quarter of 64 MiB read", 64 << 20, 16 << 20, MinUseful, 0.26},
		{"a little data barely moves it", 64 << 10, 0, 0.45, PriorUseful},
	} {
		if u := Useful(tc.spec, tc.read); u < tc.atLeast || u >= tc.below {
			t.Errorf("%s: Useful(%d, %d) = %.3f, want [%.3f, %.3f)", tc.name, tc.spec, tc.read, u, tc.atLeast, tc.below)
		}
	}
	l := simLinks["100mbit-20ms"]
	if lo, hi := Readahead(l, Useful(16<<20, 0)), Readahead(l, Useful(16<<20, 16<<20)); lo*3 > hi {
		t.Errorf("window when nothing speculated was read %d, when all was %d: want about a quarter", lo, hi)
	}
}
