package metadata_test

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lazycas/lazycas/metadata"
)

func open(t testing.TB, path string) *metadata.DB {
	t.Helper()
	db, err := metadata.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// fixture is a small layer whose directories have inode numbers that
// differ only in their low bytes (1, 256, 257, 65536, 1<<32, 1<<56), so
// that a prefix scan over the wrong key width would mix their entries.
type fixture struct {
	info    metadata.LayerInfo
	nodes   []*metadata.Node
	dirents []metadata.Dirent
	// children maps each directory to its names, sorted.
	children map[uint64][]string
}

func newFixture() fixture {
	f := fixture{
		info: metadata.LayerInfo{Ref: "registry.test/img:1", Digest: "sha256:" + strings.Repeat("a", 64), Size: 12345,
			MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", TOCDigest: "sha256:" + strings.Repeat("b", 64),
			Format: "estargz", Prefetch: []uint64{3, 2}, Created: time.Unix(1_700_000_000, 0).UTC()},
		children: map[uint64][]string{},
	}
	dirs := []uint64{metadata.RootID, 256, 257, 65536, 1 << 32, 1 << 56, 2 << 56}
	for _, id := range dirs {
		f.nodes = append(f.nodes, &metadata.Node{ID: id, Type: metadata.TypeDir, Mode: 0o755, Nlink: 2})
	}
	add := func(parent uint64, name string, n *metadata.Node) {
		if !slices.ContainsFunc(f.nodes, func(m *metadata.Node) bool { return m.ID == n.ID }) {
			f.nodes = append(f.nodes, n)
		}
		f.dirents = append(f.dirents, metadata.Dirent{Parent: parent, Name: name, ID: n.ID, Type: n.Type})
		f.children[parent] = append(f.children[parent], name)
	}
	reg := &metadata.Node{ID: 2, Type: metadata.TypeReg, Mode: 0o4755, UID: 1000, GID: 1001, Size: 300, ModTime: 1_700_000_000_123_456_789,
		Nlink: 2, Digest: "sha256:" + strings.Repeat("c", 64), Xattrs: map[string][]byte{"user.bin": {0, 1, 255}, "security.capability": []byte("cap")},
		Chunks: []metadata.Chunk{
			{Offset: 0, End: 100, InnerOffset: 512, FileOffset: 0, Size: 200, Digest: "sha256:" + strings.Repeat("d", 64)},
			{Offset: 100, End: 180, FileOffset: 200, Size: 100},
		}}
	add(metadata.RootID, "bin", f.nodes[1])
	add(metadata.RootID, "lib", f.nodes[2])
	add(metadata.RootID, "f", reg)
	add(metadata.RootID, "hardlink", reg)
	add(metadata.RootID, "link", &metadata.Node{ID: 3, Type: metadata.TypeSymlink, Mode: 0o777, Size: 4, Link: "/bin", Nlink: 1})
	add(metadata.RootID, "null", &metadata.Node{ID: 4, Type: metadata.TypeChar, Mode: 0o666, DevMajor: 1, DevMinor: 3, Nlink: 1})
	add(metadata.RootID, "gone", &metadata.Node{ID: 5, Type: metadata.TypeChar, Nlink: 1})
	add(metadata.RootID, "sda", &metadata.Node{ID: 6, Type: metadata.TypeBlock, Mode: 0o660, DevMajor: 8, Nlink: 1})
	add(metadata.RootID, "fifo", &metadata.Node{ID: 7, Type: metadata.TypeFifo, Mode: 0o600, Nlink: 1})
	add(metadata.RootID, "opaque", f.nodes[3])
	f.nodes[3].Opaque = true
	// Names whose bytes sort differently from their letters.
	add(256, "Zed", &metadata.Node{ID: 300, Type: metadata.TypeReg, Nlink: 1})
	add(256, "a", &metadata.Node{ID: 301, Type: metadata.TypeReg, Nlink: 1})
	add(256, "aa", &metadata.Node{ID: 302, Type: metadata.TypeReg, Nlink: 1})
	add(256, "é", &metadata.Node{ID: 303, Type: metadata.TypeReg, Nlink: 1})
	add(256, "\x01ctl", &metadata.Node{ID: 304, Type: metadata.TypeReg, Nlink: 1})
	add(256, strings.Repeat("n", 255), &metadata.Node{ID: 305, Type: metadata.TypeReg, Nlink: 1})
	add(257, "only-in-257", &metadata.Node{ID: 306, Type: metadata.TypeReg, Nlink: 1})
	add(65536, "deep", f.nodes[4])
	add(1<<32, "x", &metadata.Node{ID: 307, Type: metadata.TypeReg, Nlink: 1})
	add(1<<56, "y", &metadata.Node{ID: 308, Type: metadata.TypeReg, Nlink: 1})
	// 2<<56 stays empty.
	for _, names := range f.children {
		slices.Sort(names)
	}
	return f
}

func (f fixture) node(id uint64) *metadata.Node {
	for _, n := range f.nodes {
		if n.ID == id {
			return n
		}
	}
	return nil
}

// checkLayer reads every node, name and directory of the fixture back.
func checkLayer(t *testing.T, l *metadata.Layer, f fixture) {
	t.Helper()
	for _, want := range f.nodes {
		got, err := l.Node(want.ID)
		if err != nil {
			t.Errorf("Node(%d): %v", want.ID, err)
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Node(%d) = %+v, want %+v", want.ID, got, want)
		}
	}
	for _, d := range f.dirents {
		got, err := l.Lookup(d.Parent, d.Name)
		if err != nil {
			t.Errorf("Lookup(%d, %q): %v", d.Parent, d.Name, err)
			continue
		}
		if !reflect.DeepEqual(got, f.node(d.ID)) {
			t.Errorf("Lookup(%d, %q) = inode %d, want %d", d.Parent, d.Name, got.ID, d.ID)
		}
	}
	for _, dir := range f.nodes {
		if dir.Type != metadata.TypeDir {
			continue
		}
		ents, err := l.ReadDir(dir.ID)
		if err != nil {
			t.Errorf("ReadDir(%d): %v", dir.ID, err)
			continue
		}
		var names []string
		for _, e := range ents {
			names = append(names, e.Name)
			if e.Parent != dir.ID {
				t.Errorf("ReadDir(%d) returned an entry of %d", dir.ID, e.Parent)
			}
			if n := f.node(e.ID); n == nil || n.Type != e.Type {
				t.Errorf("ReadDir(%d): %q has inode %d type %d", dir.ID, e.Name, e.ID, e.Type)
			}
		}
		if !slices.Equal(names, f.children[dir.ID]) {
			t.Errorf("ReadDir(%d) = %q, want %q", dir.ID, names, f.children[dir.ID])
		}
	}
}

func TestPutAndRead(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	f := newFixture()
	if err := db.Put("sha256:layer", f.info, f.nodes, f.dirents); err != nil {
		t.Fatal(err)
	}
	l, err := db.Layer("sha256:layer")
	if err != nil {
		t.Fatal(err)
	}
	want := f.info
	want.Nodes, want.Complete = len(f.nodes), true
	if !reflect.DeepEqual(l.Info, want) {
		t.Errorf("info %+v, want %+v", l.Info, want)
	}
	checkLayer(t, l, f)

	t.Run("misses are ErrNotFound", func(t *testing.T) {
		for name, fn := range map[string]func() error{
			"Node of a missing inode":           func() error { _, err := l.Node(9999); return err },
			"Lookup of a missing name":          func() error { _, err := l.Lookup(metadata.RootID, "nope"); return err },
			"Lookup in a missing directory":     func() error { _, err := l.Lookup(9999, "f"); return err },
			"Lookup of a name's prefix":         func() error { _, err := l.Lookup(256, "Ze"); return err },
			"Lookup of the name in another dir": func() error { _, err := l.Lookup(256, "only-in-257"); return err },
			"Layer of a missing key":            func() error { _, err := db.Layer("nope"); return err },
		} {
			if err := fn(); !errors.Is(err, metadata.ErrNotFound) {
				t.Errorf("%s: %v, want ErrNotFound", name, err)
			}
		}
		if ents, err := l.ReadDir(9999); err != nil || len(ents) != 0 {
			t.Errorf("ReadDir of an inode without entries: %v %v", ents, err)
		}
	})

	t.Run("walk visits every node in inode order", func(t *testing.T) {
		var got []*metadata.Node
		if err := l.Walk(func(n *metadata.Node) error { got = append(got, n); return nil }); err != nil {
			t.Fatal(err)
		}
		want := slices.Clone(f.nodes)
		slices.SortFunc(want, func(a, b *metadata.Node) int { return cmp.Compare(a.ID, b.ID) })
		if !reflect.DeepEqual(got, want) {
			t.Errorf("walk gave %d nodes, want %d in order", len(got), len(want))
		}
	})

	t.Run("walk stops at the first error", func(t *testing.T) {
		errStop := errors.New("stop")
		calls := 0
		err := l.Walk(func(*metadata.Node) error { calls++; return errStop })
		if !errors.Is(err, errStop) || calls != 1 {
			t.Errorf("walk returned %v after %d calls", err, calls)
		}
	})

	t.Run("Layers lists it", func(t *testing.T) {
		all, err := db.Layers()
		if err != nil {
			t.Fatal(err)
		}
		if len(all) != 1 || !reflect.DeepEqual(all["sha256:layer"], want) {
			t.Errorf("layers %+v", all)
		}
	})
}

func TestPutSetsCreatedAndComplete(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	before := time.Now()
	if err := db.Put("k", metadata.LayerInfo{Complete: false, Nodes: 99}, []*metadata.Node{{ID: metadata.RootID, Type: metadata.TypeDir}}, nil); err != nil {
		t.Fatal(err)
	}
	l, err := db.Layer("k")
	if err != nil {
		t.Fatal(err)
	}
	if !l.Info.Complete || l.Info.Nodes != 1 || l.Info.Created.Before(before.Add(-time.Second)) {
		t.Errorf("info %+v", l.Info)
	}
}

func TestPutReplacesAndDeleteForgets(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	f := newFixture()
	if err := db.Put("k", f.info, f.nodes, f.dirents); err != nil {
		t.Fatal(err)
	}
	if err := db.Put("other", f.info, f.nodes, f.dirents); err != nil {
		t.Fatal(err)
	}
	old, err := db.Layer("k")
	if err != nil {
		t.Fatal(err)
	}

	small := []*metadata.Node{{ID: metadata.RootID, Type: metadata.TypeDir, Nlink: 2}, {ID: 2, Type: metadata.TypeReg, Nlink: 1, Size: 1}}
	if err := db.Put("k", metadata.LayerInfo{Format: "zstdchunked"}, small, []metadata.Dirent{{Parent: 1, Name: "new", ID: 2, Type: metadata.TypeReg}}); err != nil {
		t.Fatal(err)
	}
	l, err := db.Layer("k")
	if err != nil {
		t.Fatal(err)
	}
	if l.Info.Nodes != 2 || l.Info.Format != "zstdchunked" {
		t.Errorf("info after replace %+v", l.Info)
	}
	if _, err := l.Node(256); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("inode of the replaced layer: %v", err)
	}
	if ents, _ := l.ReadDir(metadata.RootID); len(ents) != 1 || ents[0].Name != "new" {
		t.Errorf("root after replace: %v", ents)
	}
	// A handle opened before the replace reads the current layer.
	if _, err := old.Lookup(metadata.RootID, "new"); err != nil {
		t.Errorf("old handle: %v", err)
	}

	if err := db.Delete("k"); err != nil {
		t.Fatal(err)
	}
	if err := db.Delete("k"); err != nil {
		t.Errorf("deleting twice: %v", err)
	}
	if _, err := db.Layer("k"); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("Layer after Delete: %v", err)
	}
	if _, err := l.Node(metadata.RootID); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("Node through a handle of a deleted layer: %v", err)
	}
	if _, err := l.ReadDir(metadata.RootID); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("ReadDir through a handle of a deleted layer: %v", err)
	}
	if err := l.Walk(func(*metadata.Node) error { return nil }); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("Walk through a handle of a deleted layer: %v", err)
	}
	all, err := db.Layers()
	if err != nil || len(all) != 1 || all["other"].Nodes != len(f.nodes) {
		t.Errorf("layers after delete: %v %v", all, err)
	}
	o, err := db.Layer("other")
	if err != nil {
		t.Fatal(err)
	}
	checkLayer(t, o, f)
}

// TestManyBatches stores more records than one write transaction takes.
func TestManyBatches(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	nodes, dirents := synthetic(12_345)
	if err := db.Put("big", metadata.LayerInfo{}, nodes, dirents); err != nil {
		t.Fatal(err)
	}
	checkStored(t, db, "big", nodes, dirents)
}

// checkStored reads a layer of several transactions back: every node, as
// many dirents as stored, the last of them by name.
func checkStored(t *testing.T, db *metadata.DB, key string, nodes []*metadata.Node, dirents []metadata.Dirent) {
	t.Helper()
	l, err := db.Layer(key)
	if err != nil {
		t.Fatal(err)
	}
	count := 0
	if err := l.Walk(func(*metadata.Node) error { count++; return nil }); err != nil {
		t.Fatal(err)
	}
	if count != len(nodes) || l.Info.Nodes != len(nodes) {
		t.Errorf("walked %d nodes, info says %d, stored %d", count, l.Info.Nodes, len(nodes))
	}
	total := 0
	for _, n := range nodes {
		if n.Type == metadata.TypeDir {
			ents, err := l.ReadDir(n.ID)
			if err != nil {
				t.Fatal(err)
			}
			total += len(ents)
		}
	}
	if total != len(dirents) {
		t.Errorf("%d dirents read back, %d stored", total, len(dirents))
	}
	last := dirents[len(dirents)-1]
	if n, err := l.Lookup(last.Parent, last.Name); err != nil || n.ID != last.ID {
		t.Errorf("last dirent: %v %v", n, err)
	}
}

func TestReopenKeepsLayers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	db := open(t, path)
	f := newFixture()
	if err := db.Put("k", f.info, f.nodes, f.dirents); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = open(t, path)
	defer db.Close()
	all, err := db.Layers()
	if err != nil || len(all) != 1 || !all["k"].Complete {
		t.Fatalf("layers after reopen: %v %v", all, err)
	}
	l, err := db.Layer("k")
	if err != nil {
		t.Fatal(err)
	}
	checkLayer(t, l, f)
}

// editInfo rewrites the info record of layer key with raw bolt, as a
// daemon killed in the middle of Put would have left it.
func editInfo(t *testing.T, path, key string, edit func(b *bolt.Bucket) error) {
	t.Helper()
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	if err := bdb.Update(func(tx *bolt.Tx) error {
		lb, err := tx.Bucket([]byte("layers")).CreateBucketIfNotExists([]byte(key))
		if err != nil {
			return err
		}
		return edit(lb)
	}); err != nil {
		t.Fatal(err)
	}
}

func layerBuckets(t *testing.T, path string) []string {
	t.Helper()
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	var keys []string
	bdb.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("layers")).ForEach(func(k, _ []byte) error { keys = append(keys, string(k)); return nil })
	})
	return keys
}

func TestIncompleteLayersAreDropped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	db := open(t, path)
	f := newFixture()
	for _, k := range []string{"complete", "cut-off", "corrupt-info"} {
		if err := db.Put(k, f.info, f.nodes, f.dirents); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	editInfo(t, path, "cut-off", func(lb *bolt.Bucket) error {
		var info map[string]any
		if err := json.Unmarshal(lb.Get([]byte("info")), &info); err != nil {
			return err
		}
		if info["complete"] != true {
			return fmt.Errorf("stored info has no complete=true: %v", info)
		}
		info["complete"] = false
		v, _ := json.Marshal(info)
		return lb.Put([]byte("info"), v)
	})
	editInfo(t, path, "corrupt-info", func(lb *bolt.Bucket) error { return lb.Put([]byte("info"), []byte("{not json")) })
	editInfo(t, path, "no-info", func(lb *bolt.Bucket) error { _, err := lb.CreateBucket([]byte("nodes")); return err })

	db = open(t, path)
	for _, k := range []string{"cut-off", "no-info"} {
		if _, err := db.Layer(k); !errors.Is(err, metadata.ErrNotFound) {
			t.Errorf("Layer(%q) of an incomplete layer: %v", k, err)
		}
	}
	if _, err := db.Layer("corrupt-info"); err == nil {
		t.Error("Layer of a layer with a corrupt info record succeeded")
	}
	all, err := db.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || !all["complete"].Complete {
		t.Errorf("layers %v, want only the complete one", all)
	}
	db.Close()
	if got := layerBuckets(t, path); !slices.Equal(got, []string{"complete"}) {
		t.Errorf("buckets left after Layers: %q", got)
	}
	db = open(t, path)
	defer db.Close()
	l, err := db.Layer("complete")
	if err != nil {
		t.Fatal(err)
	}
	checkLayer(t, l, f)
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := metadata.Open(filepath.Join(dir, "missing", "meta.db")); err == nil {
		t.Error("opened a database in a missing directory")
	}
	junk := filepath.Join(dir, "junk.db")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not a bolt file ", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := metadata.Open(junk); err == nil || !strings.Contains(err.Error(), junk) {
		t.Errorf("opening a non-database: %v", err)
	}
}

// TestConcurrentReadersAndWriters runs lookups on one layer while others
// are written and deleted (meaningful under -race).
func TestConcurrentReadersAndWriters(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	f := newFixture()
	if err := db.Put("stable", f.info, f.nodes, f.dirents); err != nil {
		t.Fatal(err)
	}
	l, err := db.Layer("stable")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for j := range 50 {
				if _, err := l.Lookup(256, "aa"); err != nil {
					t.Errorf("reader %d: %v", i, err)
					return
				}
				if ents, err := l.ReadDir(metadata.RootID); err != nil || len(ents) != len(f.children[metadata.RootID]) {
					t.Errorf("reader %d, round %d: %d entries, %v", i, j, len(ents), err)
					return
				}
			}
		})
	}
	for i := range 2 {
		wg.Go(func() {
			key := fmt.Sprintf("churn-%d", i)
			for range 10 {
				if err := db.Put(key, f.info, f.nodes, f.dirents); err != nil {
					t.Errorf("writer %d: %v", i, err)
					return
				}
				if err := db.Delete(key); err != nil {
					t.Errorf("writer %d: %v", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestLayersDuringPut lists layers while a large one is being written: the
// layer being written is not a cut-off one and must survive.
func TestLayersDuringPut(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	nodes, dirents := synthetic(12_000) // several write transactions
	done := make(chan error)
	go func() { done <- db.Put("big", metadata.LayerInfo{}, nodes, dirents) }()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Put while listing layers: %v", err)
			}
			l, err := db.Layer("big")
			if err != nil || l.Info.Nodes != len(nodes) {
				t.Fatalf("layer after Put: %v", err)
			}
			return
		default:
			if _, err := db.Layers(); err != nil {
				t.Fatalf("Layers: %v", err)
			}
			time.Sleep(time.Millisecond)
		}
	}
}
