package profile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func file(i int) digest.Digest  { return digest.FromString(fmt.Sprintf("file %d", i)) }
func layer(i int) digest.Digest { return digest.FromString(fmt.Sprintf("layer %d", i)) }

func open(t *testing.T, path string) *DB {
	t.Helper()
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func accesses(files ...int) []Access {
	out := make([]Access, len(files))
	for i, f := range files {
		out[i] = Access{Digest: file(f), AtUs: int64(i) * 1000}
	}
	return out
}

func TestRanks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		record map[digest.Digest][]Access
		ask    []int
		order  []int // files ranked, best first
	}{
		{"a layer's files are ranked in the order they were read",
			map[digest.Digest][]Access{layer(1): accesses(3, 1, 2)}, []int{1, 2, 3}, []int{3, 1, 2}},
		{"files never recorded have no rank",
			map[digest.Digest][]Access{layer(1): accesses(1)}, []int{1, 7}, []int{1}},
		{"a file in two profiles keeps its earliest time",
			map[digest.Digest][]Access{
				layer(1): {{Digest: file(5), AtUs: 100}, {Digest: file(6), AtUs: 200}, {Digest: file(1), AtUs: 300}},
				layer(2): {{Digest: file(1), AtUs: 50}, {Digest: file(9), AtUs: 60}},
			}, []int{1, 5, 6}, []int{1, 5, 6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := open(t, filepath.Join(t.TempDir(), "p.db"))
			for l, a := range tc.record {
				if err := db.Record(l, a); err != nil {
					t.Fatal(err)
				}
			}
			var ask []digest.Digest
			for _, f := range tc.ask {
				ask = append(ask, file(f))
			}
			ranks, err := db.Rank(ask)
			if err != nil {
				t.Fatal(err)
			}
			if got := rankedOrder(ranks); fmt.Sprint(got) != fmt.Sprint(digestsOf(tc.order)) {
				t.Errorf("order %v, want %v", got, digestsOf(tc.order))
			}
		})
	}
}

func digestsOf(files []int) []digest.Digest {
	out := []digest.Digest{}
	for _, f := range files {
		out = append(out, file(f))
	}
	return out
}

func rankedOrder(ranks map[digest.Digest]Rank) []digest.Digest {
	out := []digest.Digest{}
	for d := range ranks {
		out = append(out, d)
	}
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if ranks[out[j]].Less(ranks[out[i]]) {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// A second image whose blobs differ but hold the same files is ranked by
// the first image's profile, and ranks survive a restart.
func TestRankSurvivesReopenAndCrossesImages(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.db")
	db := open(t, path)
	if err := db.Record(layer(1), accesses(2, 1)); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db = open(t, path)
	ranks, err := db.Rank([]digest.Digest{file(1), file(2), file(3)}) // another layer's files
	if err != nil {
		t.Fatal(err)
	}
	if len(ranks) != 2 || !ranks[file(2)].Less(ranks[file(1)]) {
		t.Errorf("ranks after reopen: %v", ranks)
	}
}

func TestCaps(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "p.db"))
	t.Run("a profile keeps its MaxFiles earliest files", func(t *testing.T) {
		many := make([]int, MaxFiles+10)
		for i := range many {
			many[i] = i
		}
		if err := db.Record(layer(0), accesses(many...)); err != nil {
			t.Fatal(err)
		}
		p, ok, err := db.Profile(layer(0))
		if err != nil || !ok || len(p.Files) != MaxFiles || p.Files[0].Digest != file(0) {
			t.Fatalf("profile: %d files, %v, %v", len(p.Files), ok, err)
		}
		if r, _ := db.Rank([]digest.Digest{file(MaxFiles + 5)}); len(r) != 0 {
			t.Errorf("a file beyond the cap is ranked")
		}
	})
	t.Run("beyond MaxLayers the oldest profile goes, with its ranks", func(t *testing.T) {
		for i := 1; i <= MaxLayers; i++ {
			if err := db.Record(layer(i), []Access{{Digest: file(-i)}}); err != nil {
				t.Fatal(err)
			}
		}
		if _, ok, _ := db.Profile(layer(0)); ok {
			t.Error("oldest profile kept")
		}
		if r, _ := db.Rank([]digest.Digest{file(0), file(-1)}); len(r) != 1 {
			t.Errorf("ranks after dropping the oldest: %v", r)
		}
	})
}

func TestImport(t *testing.T) {
	good := Export{Version: FormatVersion, Profiles: []Profile{{Layer: layer(1), Files: accesses(1, 2)}}}
	for _, tc := range []struct {
		name string
		body string
		want string
	}{
		{"rejects JSON that does not parse", `{"version":1,`, "invalid profile export"},
		{"rejects an unknown version", `{"version":2,"profiles":[]}`, "version 2"},
		{"rejects a bad layer digest", `{"version":1,"profiles":[{"layer":"sha256:xyz","files":[]}]}`, "layer"},
		{"rejects a file digest it cannot check", fmt.Sprintf(`{"version":1,"profiles":[{"layer":%q,"files":[{"digest":"sha512:%s"}]}]}`,
			layer(1), strings.Repeat("a", 128)), "file 0"},
		{"rejects a file listed twice", fmt.Sprintf(`{"version":1,"profiles":[{"layer":%q,"files":[{"digest":%q},{"digest":%q}]}]}`,
			layer(1), file(1), file(1)), "twice"},
		{"rejects a negative time", fmt.Sprintf(`{"version":1,"profiles":[{"layer":%q,"files":[{"digest":%q,"atUs":-1}]}]}`,
			layer(1), file(1)), "negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := open(t, filepath.Join(t.TempDir(), "p.db"))
			if err := db.Record(layer(9), accesses(9)); err != nil {
				t.Fatal(err)
			}
			_, err := db.Import(strings.NewReader(tc.body))
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			e, _ := db.Export()
			if len(e.Profiles) != 1 || e.Profiles[0].Layer != layer(9) {
				t.Errorf("a rejected import changed the profiles: %+v", e)
			}
		})
	}
	t.Run("an export imports on another node", func(t *testing.T) {
		src := open(t, filepath.Join(t.TempDir(), "a.db"))
		if err := src.Record(good.Profiles[0].Layer, good.Profiles[0].Files); err != nil {
			t.Fatal(err)
		}
		e, err := src.Export(layer(1))
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		json.NewEncoder(&buf).Encode(e)
		dst := open(t, filepath.Join(t.TempDir(), "b.db"))
		if n, err := dst.Import(&buf); err != nil || n != 1 {
			t.Fatalf("import: %d, %v", n, err)
		}
		if r, _ := dst.Rank([]digest.Digest{file(1), file(2)}); len(r) != 2 || !r[file(1)].Less(r[file(2)]) {
			t.Errorf("ranks after import: %v", r)
		}
		if _, err := src.Export(layer(7)); !errors.Is(err, ErrNoProfile) {
			t.Errorf("export of an unknown layer: %v", err)
		}
	})
}

func TestRecorder(t *testing.T) {
	t.Run("records each file once, in order, concurrently", func(t *testing.T) {
		r := NewRecorder(layer(1), time.Minute)
		var wg sync.WaitGroup
		firsts := make(chan bool, 800)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 100 {
					firsts <- r.Record(file(i % (50 + g)))
				}
			}()
		}
		wg.Wait()
		close(firsts)
		n := 0
		for f := range firsts {
			if f {
				n++
			}
		}
		acc := r.Close()
		if n != 1 || len(acc) != 57 {
			t.Errorf("%d first accesses, %d files; want 1, 57", n, len(acc))
		}
		for i := 1; i < len(acc); i++ {
			if acc[i].AtUs < acc[i-1].AtUs {
				t.Errorf("out of order at %d", i)
			}
		}
		if r.Close() != nil {
			t.Error("a recording was returned twice")
		}
	})
	t.Run("stops at the end of its window", func(t *testing.T) {
		r := NewRecorder(layer(1), time.Second)
		now := time.Unix(100, 0)
		r.now = func() time.Time { return now }
		r.Record(file(1))
		now = now.Add(2 * time.Second)
		r.Record(file(2))
		if acc := r.Close(); len(acc) != 1 {
			t.Errorf("%d files recorded", len(acc))
		}
	})
	t.Run("stops at MaxFiles", func(t *testing.T) {
		r := NewRecorder(layer(1), time.Minute)
		for i := range MaxFiles + 5 {
			r.Record(file(i))
		}
		if acc := r.Close(); len(acc) != MaxFiles {
			t.Errorf("%d files recorded", len(acc))
		}
	})
}
