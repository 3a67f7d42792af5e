package layer_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

// The fuzz targets of this file state what ReadTOC, TOCOffset and Build
// promise for any input, not only for the inputs the table tests chose:
//
//	go test -run '^$' -fuzz '^FuzzTOC$' -fuzztime 60s ./fs/layer/
//
// Inputs that once failed live in testdata/fuzz/<target>/ and run with
// every `go test`.

// The validator's limits, as build.go states them; a tree that exceeds one
// was accepted by mistake.
const (
	fuzzMaxNameLen   = 255
	fuzzMaxPathLen   = 4096
	fuzzMaxFileSize  = 1 << 40
	fuzzMaxChunkSize = 64 << 20
	fuzzMaxChunkSpan = fuzzMaxChunkSize + 8<<20
	fuzzMaxXattrs    = 128
	fuzzMaxXattrVal  = 64 << 10
)

// Flags of FuzzTOC's blob.
const (
	fuzzZstd      = 1 << iota // a zstd:chunked blob, not eStargz
	fuzzPinZstdTC             // pin the compressed TOC too (zstd:chunked only)
)

// fuzzSeedLayer is a small layer with every entry type, chunked files,
// whiteouts, an opaque directory and a prefetch landmark: the seeds of
// FuzzTOC are its TOCs as the estargz module writes them.
func fuzzSeedLayer() (ents []tarEntry, prioritized []string) {
	return []tarEntry{
		tDir("./", 0o755, 0, 0, mtime(1)),
		tDir("etc/", 0o755, 0, 0, mtime(2)),
		tReg("etc/hostname", []byte("lazycas\n"), 0o644, 0, 0, mtime(3), "user.comment", "hi"),
		tReg("etc/empty", nil, 0o600, 1000, 1001, mtime(4)),
		tReg(".wh.gone", nil, 0o600, 0, 0, mtime(5)),
		tDir("opq/", 0o700, 7, 8, mtime(6), "trusted.overlay.opaque", "y"),
		tReg("opq/.wh..wh..opq", nil, 0o600, 0, 0, mtime(6)),
		tReg("usr/lib/deep/libx.so", randomBytes(7, 5000), 0o755, 0, 0, mtime(7)),
		tSymlink("usr/lib/libx.so.1", "deep/libx.so", mtime(8)),
		tHardlink("usr/lib/libx.hard", "usr/lib/deep/libx.so"),
		tDev(tar.TypeChar, "dev/null", 1, 3, 0o666, mtime(9)),
		tDev(tar.TypeBlock, "dev/sda", 8, 0, 0o660, mtime(10)),
		tDev(tar.TypeFifo, "run/fifo", 0, 0, 0o600, mtime(11)),
		tDir("bin/", 0o755, 0, 0, mtime(12)),
		tReg("bin/tool", randomBytes(8, 3000), 0o4755, 0, 0, mtime(12)),
		tReg("small/a", []byte(strings.Repeat("a", 300)), 0o644, 0, 0, mtime(13)),
		tReg("small/b", []byte(strings.Repeat("b", 300)), 0o644, 0, 0, mtime(14)),
	}, []string{"bin/tool"}
}

// fuzzHostileTOCs are hand-written TOCs of the kinds the validator refuses
// or must handle with care; as seeds they point the fuzzer at the edges.
var fuzzHostileTOCs = []string{
	`{"version":1,"entries":[{"name":"../x","type":"reg","size":1,"digest":"sha256:` + strings.Repeat("a", 64) + `","offset":10}]}`,
	`{"version":1,"entries":[{"name":"lnk","type":"symlink","linkName":"/etc"},{"name":"lnk/x","type":"dir"}]}`,
	`{"version":1,"entries":[{"name":"a","type":"hardlink","linkName":"../../etc/shadow"}]}`,
	`{"version":1,"entries":[{"name":"f","type":"reg","size":300,"digest":"sha256:` + strings.Repeat("b", 64) + `","offset":10,"chunkSize":100},` +
		`{"name":"f","type":"chunk","offset":20,"chunkOffset":50,"chunkSize":100},{"name":"f","type":"chunk","offset":30,"chunkOffset":150}]}`,
	`{"version":1,"entries":[{"name":"d/.wh..wh..opq","type":"reg"},{"name":"d/.wh.x","type":"reg"},{"name":".prefetch.landmark","type":"reg","size":1,"digest":"sha256:` + strings.Repeat("c", 64) + `","offset":5}]}`,
	`{"version":1,"entries":[{"name":"./","type":"dir","xattrs":{"user.overlay.opaque":"eQ=="}},{"name":"a\u0000b","type":"fifo"}]}`,
	`{"version":1,"entries":[{"name":"f","type":"reg","size":4611686018427387904,"digest":"sha256:` + strings.Repeat("d", 64) + `","offset":1}]}`,
	`{"version":1,"entries":null} trailing`,
	`null`,
}

var (
	fuzzGzip = sync.Pool{New: func() any {
		zw, _ := gzip.NewWriterLevel(nil, gzip.BestSpeed)
		return zw
	}}
	fuzzZstdEnc = sync.OnceValue(func() *zstd.Encoder {
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			panic(err)
		}
		return enc
	})
)

// tocTail is the end of a lazy blob whose TOC JSON is tocJSON and whose
// file data, before it, is dataLen bytes: the compressed TOC and the footer.
// It returns the tail and the pin that the manifest of such a blob carries.
func tocTail(t testing.TB, tocJSON []byte, dataLen int64, flags uint8) ([]byte, layer.Pin) {
	pin := layer.Pin{TOCDigest: digest.FromBytes(tocJSON)}
	var tail bytes.Buffer
	if flags&fuzzZstd != 0 {
		compressed := fuzzZstdEnc().EncodeAll(tocJSON, nil)
		if flags&fuzzPinZstdTC != 0 {
			pin.CompressedTOCDesc = digest.FromBytes(compressed)
		}
		tail.Write(compressed)
		tail.Write(zstdFooter(uint64(dataLen), uint64(len(compressed))))
		return tail.Bytes(), pin
	}
	zw := fuzzGzip.Get().(*gzip.Writer)
	defer fuzzGzip.Put(zw)
	zw.Reset(&tail)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Size: int64(len(tocJSON))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(tocJSON); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	tail.Write(gzipFooter(dataLen))
	return tail.Bytes(), pin
}

// virtualBlob is a blob of size bytes of which only the tail, its last
// bytes, exists; a read before the tail is recorded and fails.
type virtualBlob struct {
	size    int64
	tail    []byte
	mu      sync.Mutex
	lowest  int64 // the lowest offset read
	outside error // the first read outside the blob or before the tail
}

func newVirtualBlob(size int64, tail []byte) *virtualBlob {
	return &virtualBlob{size: size, tail: tail, lowest: size}
}

func (b *virtualBlob) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lowest = min(b.lowest, off)
	start := b.size - int64(len(b.tail))
	if off < start || off > b.size || int64(len(p)) > b.size-off {
		if b.outside == nil {
			b.outside = fmt.Errorf("read of %d bytes at %d in a %d-byte blob whose tail starts at %d", len(p), off, b.size, start)
		}
		return 0, io.ErrUnexpectedEOF
	}
	return copy(p, b.tail[off-start:]), nil
}

// FuzzTOC wraps arbitrary TOC JSON in a well-formed blob of either format,
// pinned by its manifest as a registry would serve it, and takes it
// through ReadTOC and Build, the way a mount does. ReadTOC must read only
// the blob's tail and accept every JSON document it can decode; what
// Build accepts must be a tree whose every path stays inside the layer and
// whose chunk tables can only address the file data (checkBuilt).
func FuzzTOC(f *testing.F) {
	ents, prioritized := fuzzSeedLayer()
	tarball := writeTar(f, ents)
	for _, v := range variants {
		blob, pin := convert(f, tarball, v, 1024, prioritized)
		toc, err := layer.ReadTOC(context.Background(), bytes.NewReader(blob), int64(len(blob)), pin)
		if err != nil {
			f.Fatalf("%s: %v", v.name, err)
		}
		j, err := json.Marshal(estargz.JTOC{Version: 1, Entries: toc.Entries})
		if err != nil {
			f.Fatal(err)
		}
		var flags uint8
		if v.format == layer.FormatZstdChunked {
			flags = fuzzZstd | fuzzPinZstdTC
		}
		f.Add(j, toc.Offset, flags)
	}
	for i, s := range fuzzHostileTOCs {
		f.Add([]byte(s), int64(1000), uint8(i%4))
	}
	db := fuzzMetadataDB(f)
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, tocJSON []byte, dataLen int64, flags uint8) {
		// Any amount of file data fits: only the tail is ever held.
		if dataLen <= 0 || dataLen > 1<<50 {
			dataLen = 1 + dataLen&(1<<20-1)
		}
		tail, pin := tocTail(t, tocJSON, dataLen, flags)
		size := dataLen + int64(len(tail))
		blob := newVirtualBlob(size, tail)
		toc, err := layer.ReadTOC(ctx, blob, size, pin)
		if blob.outside != nil {
			t.Fatalf("ReadTOC reads outside the TOC and footer: %v", blob.outside)
		}
		// The mount's path: decoded and built in one pass, which must
		// agree with ReadTOC and Build in every case.
		streamed, streamedTree, streamErr := layer.ReadTree(ctx, blob, size, pin)
		var jtoc estargz.JTOC
		if err != nil {
			if json.Unmarshal(tocJSON, &jtoc) == nil && !twoEntryLists(tocJSON) {
				t.Fatalf("ReadTOC refused a well-formed, pinned TOC: %v", err)
			}
			if streamErr == nil {
				t.Fatalf("ReadTree accepted what ReadTOC refused (%v)", err)
			}
			return
		}
		want := layer.FormatEStargz
		if flags&fuzzZstd != 0 {
			want = layer.FormatZstdChunked
		}
		if toc.Format != want || toc.Offset != dataLen || toc.Digest != pin.TOCDigest {
			t.Fatalf("ReadTOC: %s TOC at %d hashing to %s, want %s at %d hashing to %s",
				toc.Format, toc.Offset, toc.Digest, want, dataLen, pin.TOCDigest)
		}
		tree, err := layer.Build(toc)
		if (err == nil) != (streamErr == nil) {
			t.Fatalf("ReadTOC and Build: %v; ReadTree: %v", err, streamErr)
		}
		if err != nil {
			return
		}
		if streamed.Digest != toc.Digest || streamed.Format != toc.Format || streamed.Offset != toc.Offset {
			t.Fatalf("ReadTree's TOC %+v differs from ReadTOC's", streamed)
		}
		if !reflect.DeepEqual(streamedTree, tree) {
			t.Fatal("ReadTree built another tree than ReadTOC and Build")
		}
		if err := checkBuilt(toc, tree); err != nil {
			t.Fatalf("Build accepted a TOC into a bad tree: %v", err)
		}
		if err := checkImport(db, toc, tree); err != nil {
			t.Fatalf("metadata: %v", err)
		}
	})
}

// fuzzMetadataDB is a metadata database for the fuzz worker's process.
// bbolt syncs every commit: on a tmpfs that costs nothing.
func fuzzMetadataDB(f *testing.F) *metadata.DB {
	dir := f.TempDir()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "lazycas-fuzz-"); err == nil {
			dir = d
			f.Cleanup(func() { os.RemoveAll(d) })
		}
	}
	db, err := metadata.Open(filepath.Join(dir, "metadata.db"))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { db.Close() })
	return db
}

// checkImport stores a built tree the way a mount does and reads it back:
// the same inodes, and in each directory the same names.
func checkImport(db *metadata.DB, toc *layer.TOC, tree *layer.Tree) error {
	const key = "fuzz"
	info := metadata.LayerInfo{Digest: "sha256:" + strings.Repeat("0", 64), TOCDigest: toc.Digest.String(), Format: string(toc.Format), Prefetch: tree.Prefetch}
	if err := db.Put(key, info, tree.Nodes, tree.Dirents); err != nil {
		return err
	}
	l, err := db.Layer(key)
	if err != nil {
		return err
	}
	if l.Info.Nodes != len(tree.Nodes) || !l.Info.Complete {
		return fmt.Errorf("layer of %d nodes stored as %d, complete %v", len(tree.Nodes), l.Info.Nodes, l.Info.Complete)
	}
	i := 0
	err = l.Walk(func(n *metadata.Node) error {
		if i >= len(tree.Nodes) {
			return fmt.Errorf("inode %d stored beyond the tree's %d", n.ID, len(tree.Nodes))
		}
		want := *tree.Nodes[i]
		i++
		// A null xattr value in the TOC reads back empty.
		for k, v := range want.Xattrs {
			if v == nil {
				want.Xattrs = maps.Clone(want.Xattrs)
				want.Xattrs[k] = []byte{}
			}
		}
		if !reflect.DeepEqual(n, &want) {
			return fmt.Errorf("inode %d reads back as %+v, stored %+v", want.ID, *n, want)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if i != len(tree.Nodes) {
		return fmt.Errorf("%d of %d inodes read back", i, len(tree.Nodes))
	}
	var got []metadata.Dirent
	for _, n := range tree.Nodes {
		if n.Type == metadata.TypeDir {
			ents, err := l.ReadDir(n.ID)
			if err != nil {
				return err
			}
			got = append(got, ents...)
		}
	}
	if !slices.Equal(got, tree.Dirents) {
		return fmt.Errorf("directories read back as %v, stored %v", got, tree.Dirents)
	}
	return nil
}

// checkBuilt checks what Build promises of an accepted TOC: inodes with
// valid attributes, one directory tree from the root in which every name is
// a single in-layer path component, whiteouts as 0:0 character devices and
// no marker or landmark left, and chunk tables that tile each file and
// address only the blob's file data, streams in blob order.
func checkBuilt(toc *layer.TOC, tree *layer.Tree) error {
	if len(tree.Nodes) == 0 || tree.Nodes[0].ID != metadata.RootID || tree.Nodes[0].Type != metadata.TypeDir {
		return errors.New("no root directory first")
	}
	byID := map[uint64]*metadata.Node{}
	for i, n := range tree.Nodes {
		if n.ID != metadata.RootID+uint64(i) {
			return fmt.Errorf("node %d has inode %d", i, n.ID)
		}
		byID[n.ID] = n
		if err := checkNode(toc, n); err != nil {
			return fmt.Errorf("inode %d: %w", n.ID, err)
		}
	}
	// The dirents: sorted, unique, valid names, dirs as parents.
	children := map[uint64][]metadata.Dirent{}
	refs := map[uint64]uint32{}
	for i, d := range tree.Dirents {
		if i > 0 {
			p := tree.Dirents[i-1]
			if p.Parent > d.Parent || (p.Parent == d.Parent && p.Name >= d.Name) {
				return fmt.Errorf("dirents %d/%q and %d/%q out of order or twice", p.Parent, p.Name, d.Parent, d.Name)
			}
		}
		parent, child := byID[d.Parent], byID[d.ID]
		if parent == nil || parent.Type != metadata.TypeDir {
			return fmt.Errorf("dirent %q in inode %d, not a directory", d.Name, d.Parent)
		}
		if child == nil || child.Type != d.Type {
			return fmt.Errorf("dirent %q names inode %d of another type", d.Name, d.ID)
		}
		if err := checkName(d.Name); err != nil {
			return fmt.Errorf("dirent %q in inode %d: %w", d.Name, d.Parent, err)
		}
		// A marker or landmark is never an entry of the tree; a directory
		// of such a name, implied by a path through it ("a/.wh.b/c"), is
		// an ordinary directory, as an unpacked tar would hold it.
		if d.Type != metadata.TypeDir && (strings.HasPrefix(d.Name, ".wh.") ||
			d.Parent == metadata.RootID && (d.Name == estargz.PrefetchLandmark || d.Name == estargz.NoPrefetchLandmark)) {
			return fmt.Errorf("whiteout, opaque marker or landmark %q in the tree", d.Name)
		}
		children[d.Parent] = append(children[d.Parent], d)
		refs[d.ID]++
	}
	// One tree: every directory is reached once, from the root, every
	// inode is reached, and no path is longer than the limit.
	reached := map[uint64]bool{metadata.RootID: true}
	byPath := map[string]*metadata.Node{"": byID[metadata.RootID]}
	var walk func(id uint64, p string) error
	walk = func(id uint64, p string) error {
		subdirs := uint32(0)
		for _, d := range children[id] {
			cp := d.Name
			if p != "" {
				cp = p + "/" + d.Name
			}
			if len(cp) > fuzzMaxPathLen {
				return fmt.Errorf("path of %d bytes", len(cp))
			}
			byPath[cp] = byID[d.ID]
			if d.Type != metadata.TypeDir {
				reached[d.ID] = true
				continue
			}
			if reached[d.ID] {
				return fmt.Errorf("directory %q reached twice", cp)
			}
			reached[d.ID] = true
			subdirs++
			if err := walk(d.ID, cp); err != nil {
				return err
			}
		}
		if n := byID[id]; n.Nlink != 2+subdirs {
			return fmt.Errorf("directory %q has nlink %d and %d subdirectories", p, n.Nlink, subdirs)
		}
		return nil
	}
	if err := walk(metadata.RootID, ""); err != nil {
		return err
	}
	for _, n := range tree.Nodes {
		if !reached[n.ID] {
			return fmt.Errorf("inode %d is in no directory", n.ID)
		}
		if n.Type != metadata.TypeDir && n.Nlink != refs[n.ID] {
			return fmt.Errorf("inode %d has nlink %d and %d names", n.ID, n.Nlink, refs[n.ID])
		}
	}
	// Chunks, across files in layer order: streams in blob order, chunks
	// sharing a stream do not overlap in it and end where it ends.
	var prev *metadata.Chunk
	files := 0
	for _, n := range tree.Nodes {
		if n.Type != metadata.TypeReg {
			continue
		}
		if n.Size > 0 {
			files++
		}
		for i := range n.Chunks {
			c := &n.Chunks[i]
			if prev != nil {
				switch {
				case c.Offset < prev.Offset:
					return fmt.Errorf("chunk at %d after one at %d", c.Offset, prev.Offset)
				case c.Offset == prev.Offset && (c.InnerOffset < prev.InnerOffset+prev.Size || c.End != prev.End):
					return fmt.Errorf("chunks share stream %d but overlap or end apart", c.Offset)
				case c.Offset > prev.Offset && prev.End > c.Offset:
					return fmt.Errorf("stream at %d ends at %d, past the next one at %d", prev.Offset, prev.End, c.Offset)
				}
			}
			prev = c
		}
	}
	if files != tree.Files {
		return fmt.Errorf("Files is %d, the tree has %d non-empty regular files", tree.Files, files)
	}
	seen := map[uint64]bool{}
	for _, id := range tree.Prefetch {
		if n := byID[id]; n == nil || n.Type != metadata.TypeReg || seen[id] {
			return fmt.Errorf("prefetch lists inode %d", id)
		}
		seen[id] = true
	}
	return checkEntries(toc, byPath)
}

// checkEntries checks an accepted TOC against the tree built from it:
// every name the TOC holds is a path inside the layer as written (nothing
// was cleaned into one), and every entry is where its name says, with its
// type: a whiteout as a 0:0 character device of its target's name, an
// opaque marker as its directory's flag, a hard link as its target's inode.
func checkEntries(toc *layer.TOC, byPath map[string]*metadata.Node) error {
	types := map[string]metadata.Type{"dir": metadata.TypeDir, "reg": metadata.TypeReg, "symlink": metadata.TypeSymlink,
		"char": metadata.TypeChar, "block": metadata.TypeBlock, "fifo": metadata.TypeFifo}
	for i, e := range toc.Entries {
		if e.Type == "chunk" {
			continue
		}
		p, err := inLayer(e.Name)
		if err != nil {
			return fmt.Errorf("entry %d %q accepted: %v", i, e.Name, err)
		}
		dir, base := "", p
		if j := strings.LastIndexByte(p, '/'); j >= 0 {
			dir, base = p[:j], p[j+1:]
		}
		var n *metadata.Node
		switch {
		case p == "":
			n = byPath[""]
		case dir == "" && (base == estargz.PrefetchLandmark || base == estargz.NoPrefetchLandmark):
			continue
		case base == ".wh..wh..opq":
			if d := byPath[dir]; d == nil || !d.Opaque {
				return fmt.Errorf("entry %d %q: directory not opaque", i, e.Name)
			}
			continue
		case strings.HasPrefix(base, ".wh."):
			target := strings.TrimPrefix(base, ".wh.")
			if dir != "" {
				target = dir + "/" + target
			}
			if w := byPath[target]; w == nil || w.Type != metadata.TypeChar || w.DevMajor != 0 || w.DevMinor != 0 {
				return fmt.Errorf("entry %d %q: no whiteout at %q", i, e.Name, target)
			}
			continue
		default:
			n = byPath[p]
		}
		if n == nil {
			return fmt.Errorf("entry %d %q is not in the tree", i, e.Name)
		}
		if e.Type == "hardlink" {
			t, err := inLayer(e.LinkName)
			if err != nil {
				return fmt.Errorf("entry %d %q: hard link to %q accepted: %v", i, e.Name, e.LinkName, err)
			}
			if byPath[t] != n {
				return fmt.Errorf("entry %d %q: not the inode of %q", i, e.Name, e.LinkName)
			}
			continue
		}
		if types[e.Type] != n.Type {
			return fmt.Errorf("entry %d %q: a %q is inode type %d", i, e.Name, e.Type, n.Type)
		}
	}
	return nil
}

// inLayer is a TOC name as the layer's path, checked on its own terms: a
// relative path of at most 4096 bytes, with an optional "./" before and
// "/" after, of non-empty components that are neither "." nor ".." and
// at most 255 bytes, without NUL.
func inLayer(name string) (string, error) {
	if len(name) > fuzzMaxPathLen || strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0) {
		return "", errors.New("absolute, too long or with a NUL")
	}
	p := strings.TrimSuffix(strings.TrimPrefix(name, "./"), "/")
	if p == "" || p == "." {
		return "", nil
	}
	for _, c := range strings.Split(p, "/") {
		if c == "" || c == "." || c == ".." || len(c) > fuzzMaxNameLen {
			return "", fmt.Errorf("component %q", c)
		}
	}
	return p, nil
}

// checkName requires a single path component that stays where it is.
func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return errors.New("not a name")
	case strings.ContainsAny(name, "/\x00"):
		return errors.New("slash or NUL in a name")
	case len(name) > fuzzMaxNameLen:
		return fmt.Errorf("name of %d bytes", len(name))
	}
	return nil
}

// checkNode checks one inode's attributes and, for a regular file, that its
// chunks cover it exactly, each no bigger than the limits and each with its
// compressed bytes inside the file data of the blob, before the TOC.
func checkNode(toc *layer.TOC, n *metadata.Node) error {
	if n.Mode&^0o7777 != 0 {
		return fmt.Errorf("mode %o", n.Mode)
	}
	if n.Type < metadata.TypeDir || n.Type > metadata.TypeFifo {
		return fmt.Errorf("type %d", n.Type)
	}
	if n.Opaque && n.Type != metadata.TypeDir {
		return errors.New("opaque but not a directory")
	}
	if len(n.Xattrs) > fuzzMaxXattrs {
		return fmt.Errorf("%d xattrs", len(n.Xattrs))
	}
	for k, v := range n.Xattrs {
		if k == "" || len(k) > fuzzMaxNameLen || len(v) > fuzzMaxXattrVal {
			return fmt.Errorf("xattr %q of %d bytes", k, len(v))
		}
		if strings.HasPrefix(k, "trusted.overlay.") || strings.HasPrefix(k, "user.overlay.") {
			return fmt.Errorf("overlay xattr %q from the TOC", k)
		}
	}
	if n.Type == metadata.TypeSymlink {
		if n.Link == "" || len(n.Link) > fuzzMaxPathLen || strings.ContainsRune(n.Link, 0) || n.Size != int64(len(n.Link)) {
			return fmt.Errorf("symlink to %q of size %d", n.Link, n.Size)
		}
	} else if n.Link != "" {
		return fmt.Errorf("a %d with a link target", n.Type)
	}
	if n.Type != metadata.TypeReg {
		if len(n.Chunks) > 0 || n.Digest != "" {
			return fmt.Errorf("a %d with chunks or a digest", n.Type)
		}
		return nil
	}
	if n.Size < 0 || n.Size > fuzzMaxFileSize {
		return fmt.Errorf("size %d", n.Size)
	}
	if d, err := digest.Parse(n.Digest); err != nil || d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("digest %q", n.Digest)
	}
	if n.Size == 0 && (len(n.Chunks) > 0 || n.Digest != digest.SHA256.FromString("").String()) {
		return errors.New("empty file with chunks or the digest of content")
	}
	var next int64
	for _, c := range n.Chunks {
		switch {
		case c.FileOffset != next:
			return fmt.Errorf("chunk at file offset %d, want %d", c.FileOffset, next)
		case c.Size <= 0 || c.Size > fuzzMaxChunkSize || c.Size > n.Size-next:
			return fmt.Errorf("chunk of %d bytes at %d in a %d-byte file", c.Size, next, n.Size)
		case c.InnerOffset < 0 || c.InnerOffset > fuzzMaxChunkSpan:
			return fmt.Errorf("chunk at inner offset %d", c.InnerOffset)
		case c.Offset < 0 || c.Offset >= c.End || c.End > toc.Offset || c.End-c.Offset > fuzzMaxChunkSpan:
			return fmt.Errorf("chunk data at [%d, %d) with the TOC at %d", c.Offset, c.End, toc.Offset)
		}
		if c.Digest != "" {
			if d, err := digest.Parse(c.Digest); err != nil || d.Algorithm() != digest.SHA256 {
				return fmt.Errorf("chunk digest %q", c.Digest)
			}
		}
		next += c.Size
	}
	if next != n.Size {
		return fmt.Errorf("chunks cover %d of %d bytes", next, n.Size)
	}
	return nil
}

// FuzzTOCOffset gives TOCOffset and ReadTOC arbitrary blob tails. TOCOffset
// must place a TOC it finds inside the blob, before the footer, and find
// one in every footer that the formats write for an offset that fits; and
// ReadTOC, which fs/tails.go reads ahead of with TOCOffset's answer, must
// read nothing before that offset (or before the footer, with no answer).
func FuzzTOCOffset(f *testing.F) {
	ents, _ := fuzzSeedLayer()
	tarball := writeTar(f, ents)
	for _, v := range variants[:3] {
		blob, _ := convert(f, tarball, v, 1024, nil)
		f.Add(blob[max(0, len(blob)-4096):], int64(len(blob)), int64(0))
		f.Add(blob[len(blob)-60:], int64(len(blob)), int64(len(blob)-60))
	}
	f.Add(gzipFooter(100), int64(151), int64(100))
	f.Add(zstdFooter(100, 10), int64(158), int64(100))
	f.Add([]byte{}, int64(0), int64(-1))
	ctx := context.Background()
	pin := layer.Pin{TOCDigest: digest.FromString("no TOC hashes to this")}
	f.Fuzz(func(t *testing.T, tail []byte, size, footerOff int64) {
		const minFooter = min(estargz.FooterSize, zstdchunked.FooterSize)
		const footerLen = max(estargz.FooterSize, zstdchunked.FooterSize)
		off, ok := layer.TOCOffset(tail, size)
		if ok && (off <= 0 || off > size-minFooter) {
			t.Fatalf("TOCOffset: TOC at %d of a %d-byte blob", off, size)
		}

		// The footers the formats write, for an offset that fits, are
		// found wherever the blob's end holds them.
		if footerOff > 0 && footerOff < 1<<62 {
			for _, footer := range [][]byte{gzipFooter(footerOff), zstdFooter(uint64(footerOff), 0)} {
				end := footerOff + int64(len(footer)) + max(0, size&0xffff)
				got, ok := layer.TOCOffset(append(bytes.Clone(tail), footer...), end)
				if !ok || got != footerOff {
					t.Fatalf("TOCOffset(%d-byte footer for %d, size %d) = %d, %v", len(footer), footerOff, end, got, ok)
				}
			}
		}

		// ReadTOC over the same blob, for a blob small enough to hold.
		if size < int64(len(tail)) || size-int64(len(tail)) > 1<<16 {
			return
		}
		blob := newVirtualBlob(size, tail)
		// Beyond the tail the blob is unknown: pretend it reads as
		// zeros, so ReadTOC goes as far as it would on a real blob.
		blob.tail = append(make([]byte, size-int64(len(tail))), tail...)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		toc, err := layer.ReadTOC(ctx, blob, size, pin)
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Fatalf("ReadTOC accepted a TOC hashing to %s under a pin nothing hashes to", toc.Digest)
		}
		// Memory grows with what the blob holds: the inflated JSON of a
		// gzip or zstd TOC, the decoder's tables, never a buffer that a
		// few bytes ask for.
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 64<<20+4096*uint64(size) {
			t.Fatalf("ReadTOC of a %d-byte blob allocated %d MiB: %v", size, alloc>>20, err)
		}
		lowest := size - footerLen
		if ok {
			lowest = min(lowest, off)
		}
		// (TOCOffset sees a footer only in a tail that holds it whole.)
		if len(tail) >= footerLen && blob.lowest < lowest {
			t.Fatalf("ReadTOC read at %d of a %d-byte blob; TOCOffset said %d, %v", blob.lowest, size, off, ok)
		}
	})
}

// twoEntryLists tells whether a TOC object has more than one "entries" key
// (as encoding/json matches keys): encoding/json lets the last win, the
// streaming decoder refuses the TOC.
func twoEntryLists(tocJSON []byte) bool {
	dec := json.NewDecoder(bytes.NewReader(tocJSON))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return false
	}
	n := 0
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return false
		}
		if k, _ := tok.(string); strings.EqualFold(k, "entries") {
			n++
		}
		var skip json.RawMessage
		if dec.Decode(&skip) != nil {
			return false
		}
	}
	return n > 1
}
