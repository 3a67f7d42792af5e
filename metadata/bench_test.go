package metadata_test

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/lazycas/lazycas/metadata"
)

// synthetic is a layer of n inodes: directories of 100 entries under the
// root, each holding regular files of two chunks.
func synthetic(n int) ([]*metadata.Node, []metadata.Dirent) {
	nodes := []*metadata.Node{{ID: metadata.RootID, Type: metadata.TypeDir, Mode: 0o755, Nlink: 2}}
	var dirents []metadata.Dirent
	dir := nodes[0]
	digest := "sha256:" + strings.Repeat("5", 64)
	for id := metadata.RootID + 1; len(nodes) < n; id++ {
		if (id-2)%100 == 0 {
			d := &metadata.Node{ID: id, Type: metadata.TypeDir, Mode: 0o755, Nlink: 2, ModTime: 1_700_000_000_000_000_000}
			nodes[0].Nlink++
			nodes = append(nodes, d)
			dirents = append(dirents, metadata.Dirent{Parent: metadata.RootID, Name: fmt.Sprintf("dir%07d", id), ID: id, Type: metadata.TypeDir})
			dir = d
			continue
		}
		off := int64(id) * 40_000
		nodes = append(nodes, &metadata.Node{ID: id, Type: metadata.TypeReg, Mode: 0o644, Size: 100_000, Nlink: 1,
			ModTime: 1_700_000_000_000_000_000, Digest: digest, Chunks: []metadata.Chunk{
				{Offset: off, End: off + 20_000, Size: 65536, Digest: digest},
				{Offset: off + 20_000, End: off + 40_000, FileOffset: 65536, Size: 100_000 - 65536, Digest: digest},
			}})
		dirents = append(dirents, metadata.Dirent{Parent: dir.ID, Name: "lib" + strconv.FormatUint(id, 10) + ".so", ID: id, Type: metadata.TypeReg})
	}
	return nodes, dirents
}

const benchEntries = 100_000

// BenchmarkPut100k stores a 100k-inode layer into a fresh database.
func BenchmarkPut100k(b *testing.B) {
	nodes, dirents := synthetic(benchEntries)
	dir := b.TempDir()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		db := open(b, filepath.Join(dir, fmt.Sprintf("put-%d.db", i)))
		b.StartTimer()
		if err := db.Put("layer", metadata.LayerInfo{}, nodes, dirents); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		db.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(benchEntries*b.N)/b.Elapsed().Seconds(), "entries/s")
}

func benchLayer(b *testing.B) (*metadata.Layer, []*metadata.Node, []metadata.Dirent) {
	b.Helper()
	nodes, dirents := synthetic(benchEntries)
	db := open(b, filepath.Join(b.TempDir(), "meta.db"))
	b.Cleanup(func() { db.Close() })
	if err := db.Put("layer", metadata.LayerInfo{}, nodes, dirents); err != nil {
		b.Fatal(err)
	}
	l, err := db.Layer("layer")
	if err != nil {
		b.Fatal(err)
	}
	return l, nodes, dirents
}

func BenchmarkLookup100k(b *testing.B) {
	l, _, dirents := benchLayer(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		d := dirents[(i*7919)%len(dirents)]
		if _, err := l.Lookup(d.Parent, d.Name); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkNode100k(b *testing.B) {
	l, nodes, _ := benchLayer(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := l.Node(nodes[(i*7919)%len(nodes)].ID); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkReadDir100k lists a directory of 99 files.
func BenchmarkReadDir100k(b *testing.B) {
	l, _, _ := benchLayer(b)
	b.ReportAllocs()
	for b.Loop() {
		ents, err := l.ReadDir(2)
		if err != nil || len(ents) != 99 {
			b.Fatal(len(ents), err)
		}
	}
}
