package layer_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

const benchEntries = 100_000

// syntheticTOC is a TOC of n entries shaped like a distribution image:
// directories three deep holding ~50 entries each, regular files (every
// fourth of two chunks, with a "chunk" entry), symlinks and hard links,
// in blob order.
func syntheticTOC(n int) *layer.TOC {
	toc := &layer.TOC{Format: layer.FormatEStargz}
	digest := "sha256:" + strings.Repeat("7", 64)
	var off int64 = 100
	dir := ""
	var lastFile string
	for i := 0; len(toc.Entries) < n; i++ {
		switch {
		case i%50 == 0:
			dir = fmt.Sprintf("usr/share/d%04d/s%03d/", i/5000, i/50)
			toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: dir, Type: "dir", Mode: 0o755, ModTime3339: "2024-01-02T03:04:05Z"})
		case i%50 == 17:
			toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: dir + "link", Type: "symlink", LinkName: "../target", Mode: 0o777})
		case i%50 == 33 && lastFile != "":
			toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: dir + "hard", Type: "hardlink", LinkName: lastFile})
		default:
			name := fmt.Sprintf("%sfile-%07d.py", dir, i)
			e := &estargz.TOCEntry{Name: name, Type: "reg", Mode: 0o644, Size: 4096, Digest: digest, ChunkDigest: digest,
				Offset: off, ModTime3339: "2024-01-02T03:04:05Z", Xattrs: map[string][]byte{"user.x": []byte("1")}}
			off += 1000
			toc.Entries = append(toc.Entries, e)
			if i%4 == 0 {
				e.ChunkSize = 2048
				toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: name, Type: "chunk", ChunkOffset: 2048, Offset: off, ChunkDigest: digest})
				off += 1000
			}
			lastFile = name
		}
	}
	toc.Offset = off
	return toc
}

func BenchmarkBuild100k(b *testing.B) {
	toc := syntheticTOC(benchEntries)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := layer.Build(toc); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(benchEntries*b.N)/b.Elapsed().Seconds(), "entries/s")
}

// BenchmarkBuildPut100k is the import of a 100k-entry TOC: validation and
// the tree, then the metadata store, into a fresh database each time.
func BenchmarkBuildPut100k(b *testing.B) {
	toc := syntheticTOC(benchEntries)
	dir := b.TempDir()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		db, err := metadata.Open(filepath.Join(dir, fmt.Sprintf("%d.db", i)))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		tree, err := layer.Build(toc)
		if err != nil {
			b.Fatal(err)
		}
		if err := db.Put("layer", metadata.LayerInfo{Prefetch: tree.Prefetch}, tree.Nodes, tree.Dirents); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		db.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(benchEntries*b.N)/b.Elapsed().Seconds(), "entries/s")
}

// importedLayer builds and stores the synthetic TOC once.
func importedLayer(b *testing.B) (*metadata.Layer, *layer.Tree) {
	b.Helper()
	tree, err := layer.Build(syntheticTOC(benchEntries))
	if err != nil {
		b.Fatal(err)
	}
	db, err := metadata.Open(filepath.Join(b.TempDir(), "meta.db"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	if err := db.Put("layer", metadata.LayerInfo{}, tree.Nodes, tree.Dirents); err != nil {
		b.Fatal(err)
	}
	l, err := db.Layer("layer")
	if err != nil {
		b.Fatal(err)
	}
	return l, tree
}

func BenchmarkImportedLookup(b *testing.B) {
	l, tree := importedLayer(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		d := tree.Dirents[(i*7919)%len(tree.Dirents)]
		if _, err := l.Lookup(d.Parent, d.Name); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkImportedNode(b *testing.B) {
	l, tree := importedLayer(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := l.Node(tree.Nodes[(i*7919)%len(tree.Nodes)].ID); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkImportedLookupPath resolves a three-level path, as a FUSE
// lookup of usr/share/dNNNN/sNNN/file would, one component at a time.
func BenchmarkImportedLookupPath(b *testing.B) {
	l, _ := importedLayer(b)
	paths := [][]string{
		{"usr", "share", "d0000", "s000", "file-0000001.py"},
		{"usr", "share", "d0009", "s999", "file-0049999.py"},
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		id := metadata.RootID
		for _, c := range paths[i%len(paths)] {
			n, err := l.Lookup(id, c)
			if err != nil {
				b.Fatalf("%s: %v", c, err)
			}
			id = n.ID
		}
		i++
	}
}

// BenchmarkWriteFile reads a 4 MiB file of 64 KiB chunks from memory:
// decompression and verification without the network.
func BenchmarkWriteFile(b *testing.B) {
	content := randomBytes(9, 4<<20)
	tarball := writeTar(b, []tarEntry{tReg("f", content, 0o644, 0, 0, mtime(0))})
	for _, v := range []variant{variants[0], variants[2]} {
		b.Run(v.name, func(b *testing.B) {
			blob, pin := convert(b, tarball, v, testChunkSize, nil)
			toc, err := layer.ReadTOC(context.Background(), bytes.NewReader(blob), int64(len(blob)), pin)
			if err != nil {
				b.Fatal(err)
			}
			tree, err := layer.Build(toc)
			if err != nil {
				b.Fatal(err)
			}
			var n *metadata.Node
			for _, m := range tree.Nodes {
				if m.Type == metadata.TypeReg && m.Size == int64(len(content)) {
					n = m
				}
			}
			rr := &memRanges{blob: blob}
			b.SetBytes(int64(len(content)))
			b.ReportAllocs()
			for b.Loop() {
				if err := layer.WriteFile(context.Background(), rr, toc.Format, n, io.Discard); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
