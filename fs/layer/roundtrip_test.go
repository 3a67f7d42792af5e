package layer_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

const testChunkSize = 64 << 10

var (
	longName    = strings.Repeat("L", 251) + ".txt"   // 255 bytes
	longUnicode = strings.Repeat("é", 127) + "x"      // 255 bytes, 128 runes
	bigFile     = randomBytes(1, 9<<20+12345)         // more than one read batch
	midFile     = randomBytes(2, 3*testChunkSize+777) // four chunks
)

// testLayer is a layer exercising every entry type and the odd corners of
// real tars; prioritized are the files the converter places first.
func testLayer() (ents []tarEntry, prioritized []string) {
	ents = []tarEntry{
		tDir("./", 0o750, 0, 0, mtime(1)),
		tDir("etc/", 0o755, 0, 0, mtime(2)),
		tReg("etc/hostname", []byte("lazycas\n"), 0o644, 0, 0, mtime(3), "user.comment", "hi", "security.selinux", "system_u:object_r:etc_t:s0\x00"),
		tReg("etc/empty", nil, 0o600, 1000, 1001, mtime(4)),
		tReg(".wh.gone", nil, 0o600, 0, 0, mtime(5)),
		tReg("etc/.wh.passwd", nil, 0o600, 0, 0, mtime(5)),
		tDir("opq/", 0o700, 7, 8, mtime(6), "trusted.overlay.opaque", "y", "user.keep", "1"),
		tReg("opq/.wh..wh..opq", nil, 0o600, 0, 0, mtime(6)),
		tReg("opq/kept", []byte("still here"), 0o640, 7, 8, mtime(7)),
		// overlay's own xattrs from the tar never reach overlayfs
		tDir("xdir/", 0o755, 0, 0, mtime(8), "trusted.overlay.opaque", "y", "user.overlay.redirect", "/elsewhere", "user.other", "kept"),
		// parents usr/, usr/lib/deep/, usr/lib/deep/nested/ are never declared
		tReg("usr/lib/deep/nested/libbig.so", bigFile, 0o755, 0, 0, mtime(9)),
		// usr/lib/ is declared after its child implied it
		tDir("usr/lib/", 0o711, 2, 3, mtime(10)),
		tSymlink("usr/lib/libbig.so.1", "deep/nested/libbig.so", mtime(11)),
		tSymlink("abs", "/etc/hostname", mtime(12)),
		tHardlink("usr/lib/libbig.hard", "usr/lib/deep/nested/libbig.so"),
		tHardlink("etc/hostname.hard", "./etc/hostname"),
		tDev(tar.TypeChar, "dev/null", 1, 3, 0o666, mtime(13)),
		tDev(tar.TypeBlock, "dev/sda", 8, 0, 0o660, mtime(14)),
		tDev(tar.TypeFifo, "run/fifo", 0, 0, 0o600, mtime(15)),
		tDir("bin/", 0o755, 0, 0, mtime(16)),
		tReg("bin/tool", midFile, 0o4755, 0, 0, mtime(17)),
		tReg(longName, []byte("a long name"), 0o644, 0, 0, mtime(18)),
		tReg("long/"+longUnicode, []byte("a long unicode name"), 0o644, 0, 0, mtime(19)),
	}
	// Small files that a minimum chunk size packs into shared streams.
	for i := range 20 {
		data := []byte(strings.Repeat(fmt.Sprintf("small file %d\n", i), 40))
		ents = append(ents, tReg(fmt.Sprintf("small/f%02d", i), data, 0o644, 0, 0, mtime(20+i)))
	}
	return ents, []string{"bin/tool", "etc/hostname"}
}

// want is what one path of the mounted layer must look like.
type want struct {
	typ          metadata.Type
	mode         uint32
	uid, gid     uint32
	mtime        int64
	data         []byte
	link         string
	major, minor uint32
	xattrs       map[string][]byte
	opaque       bool
}

func cleanTarName(name string) string {
	return strings.TrimSuffix(strings.TrimPrefix(name, "./"), "/")
}

func parentPath(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

func joinPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// expectLayer states, from the tar alone, what the layer must look like
// to overlayfs: paths map to shared *want values for hard links.
func expectLayer(ents []tarEntry) map[string]*want {
	w := map[string]*want{"": {typ: metadata.TypeDir, mode: 0o755}}
	var ensureDir func(p string)
	ensureDir = func(p string) {
		if _, ok := w[p]; ok {
			return
		}
		ensureDir(parentPath(p))
		w[p] = &want{typ: metadata.TypeDir, mode: 0o755}
	}
	for _, e := range ents {
		h := e.hdr
		name := cleanTarName(h.Name)
		parent, base := parentPath(name), path.Base(name)
		if name != "" {
			ensureDir(parent)
		}
		switch {
		case base == ".wh..wh..opq":
			w[parent].opaque = true
			continue
		case strings.HasPrefix(base, ".wh."):
			w[joinPath(parent, strings.TrimPrefix(base, ".wh."))] = &want{typ: metadata.TypeChar, mtime: h.ModTime.UnixNano()}
			continue
		case h.Typeflag == tar.TypeLink:
			w[name] = w[cleanTarName(h.Linkname)]
			continue
		}
		x := &want{mode: uint32(h.Mode) & 0o7777, uid: uint32(h.Uid), gid: uint32(h.Gid), mtime: h.ModTime.UnixNano()}
		for k, v := range h.PAXRecords {
			k = strings.TrimPrefix(k, "SCHILY.xattr.")
			if strings.HasPrefix(k, "trusted.overlay.") || strings.HasPrefix(k, "user.overlay.") {
				continue
			}
			if x.xattrs == nil {
				x.xattrs = map[string][]byte{}
			}
			x.xattrs[k] = []byte(v)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			x.typ = metadata.TypeDir
		case tar.TypeReg:
			x.typ, x.data = metadata.TypeReg, e.data
		case tar.TypeSymlink:
			x.typ, x.link = metadata.TypeSymlink, h.Linkname
		case tar.TypeChar:
			x.typ, x.major, x.minor = metadata.TypeChar, uint32(h.Devmajor), uint32(h.Devminor)
		case tar.TypeBlock:
			x.typ, x.major, x.minor = metadata.TypeBlock, uint32(h.Devmajor), uint32(h.Devminor)
		case tar.TypeFifo:
			x.typ = metadata.TypeFifo
		}
		w[name] = x
	}
	return w
}

// mounted is a layer read back from the metadata store by path.
type mounted struct {
	layer   *metadata.Layer
	byPath  map[string]*metadata.Node
	dirents map[string]metadata.Dirent
}

// readBack walks a stored layer from its root through ReadDir and Lookup,
// as FUSE would.
func readBack(t *testing.T, l *metadata.Layer) *mounted {
	t.Helper()
	m := &mounted{layer: l, byPath: map[string]*metadata.Node{}, dirents: map[string]metadata.Dirent{}}
	root, err := l.Node(metadata.RootID)
	if err != nil {
		t.Fatalf("root: %v", err)
	}
	m.byPath[""] = root
	var walk func(dir string, id uint64)
	walk = func(dir string, id uint64) {
		ents, err := l.ReadDir(id)
		if err != nil {
			t.Fatalf("ReadDir(%q): %v", dir, err)
		}
		if !slices.IsSortedFunc(ents, func(a, b metadata.Dirent) int { return strings.Compare(a.Name, b.Name) }) {
			t.Errorf("ReadDir(%q) is not sorted by name", dir)
		}
		for _, e := range ents {
			p := joinPath(dir, e.Name)
			if e.Parent != id {
				t.Errorf("%s: dirent parent %d, want %d", p, e.Parent, id)
			}
			n, err := l.Lookup(id, e.Name)
			if err != nil {
				t.Fatalf("Lookup(%q): %v", p, err)
			}
			if n.ID != e.ID || n.Type != e.Type {
				t.Errorf("%s: dirent says inode %d type %d, lookup gives %d type %d", p, e.ID, e.Type, n.ID, n.Type)
			}
			m.byPath[p], m.dirents[p] = n, e
			if n.Type == metadata.TypeDir {
				walk(p, n.ID)
			}
		}
	}
	walk("", metadata.RootID)
	return m
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// TestRoundTrip converts one tar with every kind of entry into each lazy
// format, reads the TOC back, stores the tree and checks that what FUSE
// would serve is exactly the tar: metadata and every file's bytes.
func TestRoundTrip(t *testing.T) {
	ents, prioritized := testLayer()
	tarball := writeTar(t, ents)
	expect := expectLayer(ents)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			blob, pin := convert(t, tarball, v, testChunkSize, prioritized)

			toc, err := layer.ReadTOC(ctx, bytes.NewReader(blob), int64(len(blob)), pin)
			if err != nil {
				t.Fatalf("ReadTOC: %v", err)
			}
			if toc.Format != v.format {
				t.Errorf("format %q, want %q", toc.Format, v.format)
			}
			if toc.Digest != pin.TOCDigest {
				t.Errorf("TOC digest %s, want %s", toc.Digest, pin.TOCDigest)
			}
			tree, err := layer.Build(toc)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			// What the mount uses: the same TOC and tree in one pass.
			streamed, streamedTree, err := layer.ReadTree(ctx, bytes.NewReader(blob), int64(len(blob)), pin)
			if err != nil {
				t.Fatalf("ReadTree: %v", err)
			}
			if streamed.Digest != toc.Digest || streamed.Format != toc.Format || streamed.Offset != toc.Offset || streamed.Entries != nil {
				t.Errorf("ReadTree's TOC %+v, ReadTOC's digest %s format %s offset %d", streamed, toc.Digest, toc.Format, toc.Offset)
			}
			if !reflect.DeepEqual(streamedTree, tree) {
				t.Error("ReadTree built another tree than ReadTOC and Build")
			}

			db, err := metadata.Open(t.TempDir() + "/meta.db")
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			info := metadata.LayerInfo{Ref: "example.com/x:1", Digest: "sha256:" + strings.Repeat("0", 64), Size: int64(len(blob)),
				TOCDigest: toc.Digest.String(), Format: string(toc.Format), Prefetch: tree.Prefetch}
			if err := db.Put("layer", info, tree.Nodes, tree.Dirents); err != nil {
				t.Fatalf("Put: %v", err)
			}
			l, err := db.Layer("layer")
			if err != nil {
				t.Fatalf("Layer: %v", err)
			}
			if l.Info.Nodes != len(tree.Nodes) || !l.Info.Complete || l.Info.Format != string(v.format) {
				t.Errorf("layer info %+v", l.Info)
			}

			got := readBack(t, l)
			checkTree(t, expect, got)

			t.Run("prefetch lists the prioritized files in order", func(t *testing.T) {
				var want []uint64
				for _, p := range prioritized {
					want = append(want, got.byPath[p].ID)
				}
				if !slices.Equal(l.Info.Prefetch, want) {
					t.Errorf("prefetch %v, want %v", l.Info.Prefetch, want)
				}
			})

			t.Run("walk visits every inode once in inode order", func(t *testing.T) {
				var ids []uint64
				if err := l.Walk(func(n *metadata.Node) error { ids = append(ids, n.ID); return nil }); err != nil {
					t.Fatal(err)
				}
				if len(ids) != len(tree.Nodes) || !slices.IsSorted(ids) || ids[0] != metadata.RootID {
					t.Errorf("walk gave %d inodes (sorted %v), tree has %d", len(ids), slices.IsSorted(ids), len(tree.Nodes))
				}
				reachable := map[uint64]bool{}
				for _, n := range got.byPath {
					reachable[n.ID] = true
				}
				if len(reachable) != len(ids) {
					t.Errorf("%d inodes reachable by name, %d stored", len(reachable), len(ids))
				}
			})

			files := map[uint64]bool{}
			for _, n := range got.byPath {
				if n.Type == metadata.TypeReg && n.Size > 0 {
					files[n.ID] = true
				}
			}
			if tree.Files != len(files) {
				t.Errorf("tree counts %d files, %d distinct non-empty regular files stored", tree.Files, len(files))
			}

			t.Run("chunks", func(t *testing.T) {
				big := got.byPath["usr/lib/deep/nested/libbig.so"]
				if n := len(big.Chunks); n != (len(bigFile)+testChunkSize-1)/testChunkSize {
					t.Errorf("big file has %d chunks", n)
				}
				shared := false
				for _, n := range got.byPath {
					for _, c := range n.Chunks {
						if c.Digest == "" {
							t.Errorf("inode %d: chunk at %d has no digest", n.ID, c.FileOffset)
						}
						if c.End <= c.Offset || c.End > toc.Offset {
							t.Errorf("inode %d: chunk at %d spans blob %d..%d, TOC at %d", n.ID, c.FileOffset, c.Offset, c.End, toc.Offset)
						}
						shared = shared || c.InnerOffset > 0
					}
				}
				if shared != (v.minChunk > 0) {
					t.Errorf("chunks share streams: %v; min chunk size %d", shared, v.minChunk)
				}
			})

			t.Run("every file reads back verbatim", func(t *testing.T) {
				rr := &memRanges{blob: blob}
				done := map[uint64]bool{}
				for p, n := range got.byPath {
					if n.Type != metadata.TypeReg || done[n.ID] {
						continue
					}
					done[n.ID] = true
					rr.reset()
					var out bytes.Buffer
					if err := layer.WriteFile(ctx, rr, toc.Format, n, &out); err != nil {
						t.Errorf("WriteFile(%q): %v", p, err)
						continue
					}
					if !bytes.Equal(out.Bytes(), expect[p].data) {
						t.Errorf("%s: read %d bytes that differ from the tar's %d", p, out.Len(), len(expect[p].data))
					}
					if d := sha256Hex(out.Bytes()); d != n.Digest {
						t.Errorf("%s: content hashes to %s, node digest %s", p, d, n.Digest)
					}
					checkReads(t, p, n, rr)
				}
			})
		})
	}
}

// checkReads asserts WriteFile asked only for the file's own chunk span, in
// batches of at most 8 MiB, and in one call when the file fits one batch.
func checkReads(t *testing.T, p string, n *metadata.Node, rr *memRanges) {
	t.Helper()
	if len(n.Chunks) == 0 {
		if rr.calls != 0 {
			t.Errorf("%s: empty file made %d reads", p, rr.calls)
		}
		return
	}
	lo, hi := n.Chunks[0].Offset, n.Chunks[len(n.Chunks)-1].End
	for _, r := range rr.reads {
		if r.Off < lo || r.Off+int64(cap(r.Buf)) > hi {
			t.Errorf("%s: read %d+%d outside its chunks' span %d..%d", p, r.Off, cap(r.Buf), lo, hi)
		}
		if cap(r.Buf) > 8<<20 {
			t.Errorf("%s: one read of %d bytes, more than a batch", p, cap(r.Buf))
		}
	}
	switch {
	case hi-lo <= 8<<20 && rr.calls != 1:
		t.Errorf("%s: %d bytes of chunks read in %d calls, want 1", p, hi-lo, rr.calls)
	case hi-lo > 8<<20 && rr.calls < 2:
		t.Errorf("%s: %d bytes of chunks read in %d call", p, hi-lo, rr.calls)
	}
}

// checkTree compares the stored layer with the expected one path by path.
func checkTree(t *testing.T, expect map[string]*want, got *mounted) {
	t.Helper()
	for p := range expect {
		if _, ok := got.byPath[p]; !ok {
			t.Errorf("%q is missing from the layer", p)
		}
	}
	for p := range got.byPath {
		if _, ok := expect[p]; !ok {
			t.Errorf("%q is in the layer but not in the tar", p)
		}
		base := path.Base(p)
		if strings.HasPrefix(base, ".wh.") || base == estargz.PrefetchLandmark || base == estargz.NoPrefetchLandmark {
			t.Errorf("%q must be hidden", p)
		}
	}
	// Expected link counts: a directory has 2 plus its subdirectories, a
	// file one per name.
	nlink := map[*want]uint32{}
	for p, w := range expect {
		if w.typ == metadata.TypeDir {
			nlink[w] += 2
			if p != "" {
				nlink[expect[parentPath(p)]]++
			}
		} else {
			nlink[w]++
		}
	}
	idOf := map[*want]uint64{}
	for p, w := range expect {
		n := got.byPath[p]
		if n == nil {
			continue
		}
		if id, seen := idOf[w]; seen && id != n.ID {
			t.Errorf("%s: inode %d, but its hard link has inode %d", p, n.ID, id)
		}
		idOf[w] = n.ID
		if n.Type != w.typ {
			t.Errorf("%s: type %d, want %d", p, n.Type, w.typ)
			continue
		}
		if n.Mode != w.mode || n.UID != w.uid || n.GID != w.gid {
			t.Errorf("%s: mode %o uid %d gid %d, want %o %d %d", p, n.Mode, n.UID, n.GID, w.mode, w.uid, w.gid)
		}
		if n.ModTime != w.mtime {
			t.Errorf("%s: mtime %d, want %d", p, n.ModTime, w.mtime)
		}
		if n.Nlink != nlink[w] {
			t.Errorf("%s: nlink %d, want %d", p, n.Nlink, nlink[w])
		}
		if n.Opaque != w.opaque {
			t.Errorf("%s: opaque %v, want %v", p, n.Opaque, w.opaque)
		}
		if len(n.Xattrs) != len(w.xattrs) {
			t.Errorf("%s: xattrs %q, want %q", p, n.Xattrs, w.xattrs)
		}
		for k, v := range w.xattrs {
			if !bytes.Equal(n.Xattrs[k], v) {
				t.Errorf("%s: xattr %s = %q, want %q", p, k, n.Xattrs[k], v)
			}
		}
		var size int64
		switch w.typ {
		case metadata.TypeReg:
			size = int64(len(w.data))
			if n.Digest != sha256Hex(w.data) {
				t.Errorf("%s: digest %s, want %s", p, n.Digest, sha256Hex(w.data))
			}
		case metadata.TypeSymlink:
			size = int64(len(w.link))
			if n.Link != w.link {
				t.Errorf("%s: symlink to %q, want %q", p, n.Link, w.link)
			}
		case metadata.TypeChar, metadata.TypeBlock:
			if n.DevMajor != w.major || n.DevMinor != w.minor {
				t.Errorf("%s: device %d:%d, want %d:%d", p, n.DevMajor, n.DevMinor, w.major, w.minor)
			}
		}
		if n.Size != size {
			t.Errorf("%s: size %d, want %d", p, n.Size, size)
		}
	}
	if len(idOf) != len(nlink) {
		t.Errorf("%d distinct inodes expected, %d seen", len(nlink), len(idOf))
	}

	// The overlay-facing facts, spelled out.
	if n := got.byPath["gone"]; n == nil || n.Type != metadata.TypeChar || n.DevMajor != 0 || n.DevMinor != 0 {
		t.Errorf("whiteout .wh.gone is not a 0:0 character device named gone: %+v", n)
	}
	if n := got.byPath["opq"]; n == nil || !n.Opaque || n.Xattrs["trusted.overlay.opaque"] != nil {
		t.Errorf("opq must be opaque by its marker only, not by the tar's xattr: %+v", n)
	}
	if n := got.byPath["xdir"]; n == nil || n.Opaque || len(n.Xattrs) != 1 {
		t.Errorf("xdir must keep only user.other and not be opaque: %+v", n)
	}
	if a, b := got.byPath["usr/lib/libbig.hard"], got.byPath["usr/lib/deep/nested/libbig.so"]; a == nil || b == nil || a.ID != b.ID || a.Nlink != 2 {
		t.Errorf("hard link does not share the inode of its target")
	}
	if n := got.byPath["usr/lib"]; n == nil || n.Mode != 0o711 || n.UID != 2 {
		t.Errorf("usr/lib declared after its child lost its attributes: %+v", n)
	}
	if n := got.byPath["usr"]; n == nil || n.Mode != 0o755 || n.ModTime != 0 {
		t.Errorf("implied directory usr: %+v", n)
	}
}
