package layer_test

import (
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

// tocAt is where the TOC of the hand-made TOCs below starts.
const tocAt = 1 << 20

func dirE(name string) *estargz.TOCEntry {
	return &estargz.TOCEntry{Name: name, Type: "dir", Mode: 0o755}
}

func symlinkE(name, target string) *estargz.TOCEntry {
	return &estargz.TOCEntry{Name: name, Type: "symlink", LinkName: target, Mode: 0o777}
}

func hardlinkE(name, target string) *estargz.TOCEntry {
	return &estargz.TOCEntry{Name: name, Type: "hardlink", LinkName: target}
}

// regE is a one-chunk regular file of size bytes whose stream is at off.
func regE(name string, size, off int64) *estargz.TOCEntry {
	d := digest.FromString(name).String()
	return &estargz.TOCEntry{Name: name, Type: "reg", Mode: 0o644, Size: size, Digest: d, Offset: off, ChunkDigest: d}
}

// chunkedE is a regular file of size bytes split as chunks says: each is
// {file offset, chunk size (0: to the end), blob offset}.
func chunkedE(name string, size int64, chunks ...[3]int64) []*estargz.TOCEntry {
	first := regE(name, size, chunks[0][2])
	first.ChunkOffset, first.ChunkSize = chunks[0][0], chunks[0][1]
	out := []*estargz.TOCEntry{first}
	for _, c := range chunks[1:] {
		out = append(out, &estargz.TOCEntry{Name: name, Type: "chunk", ChunkOffset: c[0], ChunkSize: c[1], Offset: c[2],
			ChunkDigest: digest.FromString(name + strconv.FormatInt(c[0], 10)).String()})
	}
	return out
}

func with(e *estargz.TOCEntry, edit func(*estargz.TOCEntry)) *estargz.TOCEntry {
	edit(e)
	return e
}

func entries(parts ...any) []*estargz.TOCEntry {
	var out []*estargz.TOCEntry
	for _, p := range parts {
		switch p := p.(type) {
		case *estargz.TOCEntry:
			out = append(out, p)
		case []*estargz.TOCEntry:
			out = append(out, p...)
		default:
			panic(p)
		}
	}
	return out
}

func TestBuildRejectsHostileTOCs(t *testing.T) {
	manyXattrs := map[string][]byte{}
	for i := range 129 {
		manyXattrs["user.x"+strconv.Itoa(i)] = []byte("v")
	}
	cases := []struct {
		name    string
		entries []*estargz.TOCEntry
		// culprit is the name of the offending entry, which the error must
		// quote.
		culprit string
		message string
	}{
		{"rejects a parent-directory name", entries(regE("../x", 1, 100)), "../x", "escapes"},
		{"rejects a traversal deep in a name", entries(regE("a/../../x", 1, 100)), "a/../../x", "escapes"},
		{"rejects a traversal inside a name that stays in the layer", entries(regE("a/../b", 1, 100)), "a/../b", "escapes"},
		{"rejects an absolute name", entries(regE("/x", 1, 100)), "/x", "absolute"},
		{"rejects an absolute directory", entries(dirE("/etc/")), "/etc/", "absolute"},
		{"rejects an empty component", entries(regE("a//b", 1, 100)), "a//b", "empty"},
		{"rejects a dot component", entries(regE("a/./b", 1, 100)), "a/./b", `"."`},
		{"rejects a NUL in a name", entries(regE("a\x00b", 1, 100)), "a\x00b", "NUL"},
		{"rejects a name over 255 bytes", entries(regE(strings.Repeat("n", 256), 1, 100)), strings.Repeat("n", 256), "longer than 255"},
		{"rejects a path over 4096 bytes", entries(regE(strings.Repeat("d/", 2049)+"f", 1, 100)), strings.Repeat("d/", 2049) + "f", "longer than 4096"},
		{"rejects an entry under a symlinked parent", entries(symlinkE("lnk", "/etc"), regE("lnk/x", 1, 100)), "lnk/x", "not a directory"},
		{"rejects an entry deep under a symlinked parent", entries(symlinkE("lnk", "/"), regE("lnk/a/b/x", 1, 100)), "lnk/a/b/x", "not a directory"},
		{"rejects a directory over a symlink", entries(symlinkE("lnk", "/etc"), dirE("lnk/")), "lnk/", "duplicate"},
		{"rejects an entry under a regular file", entries(regE("f", 1, 100), regE("f/x", 1, 200)), "f/x", "not a directory"},
		{"rejects an entry under a whiteout", entries(regE(".wh.d", 0, 0), regE("d/x", 1, 100)), "d/x", "not a directory"},
		{"rejects a duplicate file", entries(regE("a", 1, 100), regE("a", 1, 200)), "a", "duplicate"},
		{"rejects a duplicate file spelled differently", entries(regE("a", 1, 100), regE("./a", 1, 200)), "./a", "duplicate"},
		{"rejects a directory declared twice", entries(dirE("d/"), dirE("d")), "d", "duplicate"},
		{"rejects a file replacing a directory", entries(regE("d/x", 1, 100), regE("d", 1, 200)), "d", "duplicate"},
		{"rejects a directory replacing a file", entries(regE("d", 1, 100), dirE("d/")), "d/", "duplicate"},
		{"rejects the root declared twice", entries(dirE("./"), dirE(".")), ".", "root"},
		{"rejects a root that is not a directory", entries(regE("./", 1, 100)), "./", "root"},
		{"rejects a whiteout of a file in the same layer", entries(regE("a", 1, 100), regE(".wh.a", 0, 0)), ".wh.a", "whiteout"},
		{"rejects a file whiteout-ed earlier in the layer", entries(regE(".wh.a", 0, 0), regE("a", 1, 100)), "a", "duplicate"},
		{"rejects an empty whiteout", entries(regE(".wh.", 0, 0)), ".wh.", "whiteout"},
		{"rejects a whiteout of ..", entries(regE("d/.wh...", 0, 0)), "d/.wh...", "whiteout"},
		{"rejects a whiteout of a whiteout", entries(regE(".wh..wh.x", 0, 0)), ".wh..wh.x", "whiteout"},
		{"rejects a hard link to a later entry", entries(hardlinkE("h", "a"), regE("a", 1, 100)), "h", "hard link"},
		{"rejects a hard link to a missing entry", entries(hardlinkE("h", "nowhere")), "h", "hard link"},
		{"rejects a hard link to a directory", entries(dirE("d/"), hardlinkE("h", "d")), "h", "directory"},
		{"rejects a hard link to the root", entries(hardlinkE("h", "./")), "h", "invalid target"},
		{"rejects a hard link out of the layer", entries(hardlinkE("h", "../etc/shadow")), "h", "invalid target"},
		{"rejects a hard link through a symlink", entries(dirE("d/"), regE("d/f", 1, 100), symlinkE("l", "d"), hardlinkE("h", "l/f")), "h", "hard link"},
		{"rejects a hard link to a whiteout", entries(regE(".wh.a", 0, 0), hardlinkE("h", "a")), "h", "whiteout"},
		{"rejects a regular file without a digest", entries(with(regE("f", 10, 100), func(e *estargz.TOCEntry) { e.Digest = "" })), "f", "digest"},
		{"rejects a malformed digest", entries(with(regE("f", 10, 100), func(e *estargz.TOCEntry) { e.Digest = "sha256:xyz" })), "f", "digest"},
		{"rejects a digest of another algorithm", entries(with(regE("f", 10, 100), func(e *estargz.TOCEntry) { e.Digest = "sha512:" + strings.Repeat("ab", 64) })), "f", "sha256"},
		{"rejects a malformed chunk digest", entries(with(regE("f", 10, 100), func(e *estargz.TOCEntry) { e.ChunkDigest = "md5:abc" })), "f", "chunk digest"},
		{"rejects a negative size", entries(regE("f", -1, 100)), "f", "size"},
		{"rejects an absurd size", entries(regE("f", 1<<50, 100)), "f", "size"},
		{"rejects a negative mode", entries(with(regE("f", 1, 100), func(e *estargz.TOCEntry) { e.Mode = -1 })), "f", "mode"},
		{"rejects a uid out of range", entries(with(regE("f", 1, 100), func(e *estargz.TOCEntry) { e.UID = 1 << 32 })), "f", "uid"},
		{"rejects a negative gid", entries(with(dirE("d/"), func(e *estargz.TOCEntry) { e.GID = -1 })), "d/", "gid"},
		{"rejects device numbers out of range", entries(&estargz.TOCEntry{Name: "dev/x", Type: "char", DevMajor: 1 << 32}), "dev/x", "device"},
		{"rejects a negative device number", entries(&estargz.TOCEntry{Name: "dev/x", Type: "block", DevMinor: -1}), "dev/x", "device"},
		{"rejects a symlink without a target", entries(symlinkE("l", "")), "l", "symlink"},
		{"rejects a symlink target with a NUL", entries(symlinkE("l", "a\x00b")), "l", "symlink"},
		{"rejects too many xattrs", entries(with(regE("f", 1, 100), func(e *estargz.TOCEntry) { e.Xattrs = manyXattrs })), "f", "xattrs"},
		{"rejects a huge xattr", entries(with(dirE("d/"), func(e *estargz.TOCEntry) { e.Xattrs = map[string][]byte{"user.x": make([]byte, 65<<10)} })), "d/", "xattr"},
		{"rejects an unnamed xattr", entries(with(dirE("d/"), func(e *estargz.TOCEntry) { e.Xattrs = map[string][]byte{"": []byte("x")} })), "d/", "xattr"},
		{"rejects an unknown type", entries(&estargz.TOCEntry{Name: "s", Type: "socket"}), "s", "unsupported"},
		{"rejects an entry without a type", entries(&estargz.TOCEntry{Name: "s"}), "s", "unsupported"},
		{"rejects a second landmark", entries(regE(estargz.PrefetchLandmark, 1, 100), regE(estargz.NoPrefetchLandmark, 1, 200)), estargz.NoPrefetchLandmark, "landmark"},
		{"rejects a chunk with no file before it", entries(&estargz.TOCEntry{Name: "f", Type: "chunk", Offset: 100, ChunkSize: 10}), "f", "follows no regular file"},
		{"rejects a chunk after a directory", entries(regE("f", 10, 100), dirE("d/"), &estargz.TOCEntry{Name: "f", Type: "chunk", Offset: 200, ChunkOffset: 10, ChunkSize: 10}), "f", "follows no regular file"},
		{"rejects a chunk after an empty file", entries(regE("f", 0, 0), &estargz.TOCEntry{Name: "f", Type: "chunk", Offset: 200, ChunkSize: 10}), "f", "follows no regular file"},
		{"rejects chunks with a gap", entries(chunkedE("f", 300, [3]int64{0, 100, 100}, [3]int64{150, 0, 200})), "f", "offset 150, expected 100"},
		{"rejects overlapping chunks", entries(chunkedE("f", 300, [3]int64{0, 100, 100}, [3]int64{50, 100, 200}, [3]int64{150, 0, 300})), "f", "offset 50, expected 100"},
		{"rejects chunks that stop short, mid-TOC", entries(chunkedE("f", 300, [3]int64{0, 100, 100}, [3]int64{100, 100, 200}), regE("g", 1, 300)), "f", "cover 200 of 300"},
		{"rejects chunks that stop short, at the end", entries(chunkedE("f", 300, [3]int64{0, 100, 100}, [3]int64{100, 100, 200})), "f", "cover 200 of 300"},
		{"rejects chunks that run past the file", entries(chunkedE("f", 300, [3]int64{0, 100, 100}, [3]int64{100, 300, 200})), "f", "cover 400 of 300"},
		{"rejects a chunk of negative size", entries(chunkedE("f", 300, [3]int64{0, 100, 100}, [3]int64{100, -100, 200})), "f", "malformed"},
		{"rejects a chunk past the file's end", entries(chunkedE("f", 100, [3]int64{0, 100, 100}, [3]int64{100, 0, 200})), "f", "malformed"},
		{"rejects a negative blob offset", entries(regE("f", 10, -5)), "f", "malformed"},
		{"rejects a negative inner offset", entries(with(regE("f", 10, 100), func(e *estargz.TOCEntry) { e.InnerOffset = -1 })), "f", "malformed"},
		{"rejects chunk data at the TOC", entries(regE("f", 10, tocAt)), "f", "not before the TOC"},
		{"rejects chunk data after the TOC", entries(regE("f", 10, tocAt+100)), "f", "not before the TOC"},
		{"rejects chunk data after the TOC, mid-file", entries(chunkedE("f", 20, [3]int64{0, 10, 100}, [3]int64{10, 0, tocAt + 1})), "f", "not before the TOC"},
		{"rejects files out of blob order", entries(regE("a", 10, 500), regE("b", 10, 100)), "b", "precedes"},
		{"rejects chunks out of blob order", entries(chunkedE("f", 20, [3]int64{0, 10, 500}, [3]int64{10, 0, 100})), "f", "precedes"},
		{"rejects files overlapping in a shared stream", entries(regE("a", 10, 100), with(regE("b", 10, 100), func(e *estargz.TOCEntry) { e.InnerOffset = 5 })), "b", "overlaps"},
		{"rejects a null entry", []*estargz.TOCEntry{dirE("d/"), nil}, "", "entry 1 is null"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tree, err := layer.Build(&layer.TOC{Format: layer.FormatEStargz, Offset: tocAt, Entries: c.entries})
			if err == nil {
				t.Fatalf("accepted: %d nodes", len(tree.Nodes))
			}
			if !strings.Contains(err.Error(), c.message) {
				t.Errorf("error %q does not say %q", err, c.message)
			}
			if c.culprit != "" && !strings.Contains(err.Error(), strconv.Quote(c.culprit)) {
				t.Errorf("error %q does not name the entry %q", err, c.culprit)
			}
		})
	}
}

func TestBuildRejectsTooManyEntries(t *testing.T) {
	_, err := layer.Build(&layer.TOC{Offset: tocAt, Entries: make([]*estargz.TOCEntry, 4<<20+1)})
	if err == nil || !strings.Contains(err.Error(), "entries") {
		t.Fatalf("error %v", err)
	}
}

// built is a Build result indexed by path.
type built struct {
	tree   *layer.Tree
	byPath map[string]*metadata.Node
}

func buildTree(t *testing.T, ents ...*estargz.TOCEntry) built {
	t.Helper()
	tree, err := layer.Build(&layer.TOC{Format: layer.FormatEStargz, Offset: tocAt, Entries: ents})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	byID := map[uint64]*metadata.Node{}
	for _, n := range tree.Nodes {
		if byID[n.ID] != nil {
			t.Fatalf("inode %d twice", n.ID)
		}
		byID[n.ID] = n
	}
	children := map[uint64]map[string]uint64{}
	for _, d := range tree.Dirents {
		if children[d.Parent] == nil {
			children[d.Parent] = map[string]uint64{}
		}
		if _, dup := children[d.Parent][d.Name]; dup {
			t.Fatalf("name %q twice in inode %d", d.Name, d.Parent)
		}
		if byID[d.ID] == nil || byID[d.ID].Type != d.Type {
			t.Fatalf("dirent %q points at inode %d of another type", d.Name, d.ID)
		}
		children[d.Parent][d.Name] = d.ID
	}
	b := built{tree: tree, byPath: map[string]*metadata.Node{"": byID[metadata.RootID]}}
	var walk func(string, uint64)
	walk = func(dir string, id uint64) {
		for name, c := range children[id] {
			p := joinPath(dir, name)
			b.byPath[p] = byID[c]
			if byID[c].Type == metadata.TypeDir {
				walk(p, c)
			}
		}
	}
	walk("", metadata.RootID)
	return b
}

func (b built) paths() []string { return slices.Sorted(maps.Keys(b.byPath)) }

func TestBuildAcceptsLegitimateOddities(t *testing.T) {
	t.Run("a ./ root entry sets the root's attributes", func(t *testing.T) {
		b := buildTree(t, with(dirE("./"), func(e *estargz.TOCEntry) { e.Mode, e.UID = 0o700, 5 }), regE("./f", 1, 100))
		if r := b.byPath[""]; r.Mode != 0o700 || r.UID != 5 || r.Nlink != 2 {
			t.Errorf("root %+v", r)
		}
		if got := b.paths(); !slices.Equal(got, []string{"", "f"}) {
			t.Errorf("paths %q", got)
		}
	})
	t.Run("names with and without ./ and trailing slashes", func(t *testing.T) {
		b := buildTree(t, dirE("./a/"), dirE("a/b"), regE("./a/b/c", 1, 100), hardlinkE("a/h", "./a/b/c"), symlinkE("./s", "a/b/c"))
		if got := b.paths(); !slices.Equal(got, []string{"", "a", "a/b", "a/b/c", "a/h", "s"}) {
			t.Errorf("paths %q", got)
		}
		if b.byPath["a/h"].ID != b.byPath["a/b/c"].ID || b.byPath["a/h"].Nlink != 2 {
			t.Error("hard link with a ./ target does not share its inode")
		}
	})
	t.Run("a directory declared after its child", func(t *testing.T) {
		b := buildTree(t, regE("a/b/f", 1, 100), with(dirE("a/b/"), func(e *estargz.TOCEntry) { e.Mode = 0o701; e.ModTime3339 = "2020-01-02T03:04:05Z" }), dirE("a"))
		d := b.byPath["a/b"]
		if d.Mode != 0o701 || d.ModTime == 0 || d.Nlink != 2 {
			t.Errorf("a/b %+v", d)
		}
		if a := b.byPath["a"]; a.Nlink != 3 {
			t.Errorf("a has nlink %d, want 3", a.Nlink)
		}
		if r := b.byPath[""]; r.Nlink != 3 {
			t.Errorf("root has nlink %d, want 3", r.Nlink)
		}
	})
	t.Run("whiteouts and opaque markers", func(t *testing.T) {
		b := buildTree(t, regE("d/.wh..wh..opq", 0, 0), regE("d/.wh.x", 0, 0), regE(".wh.top", 0, 0), regE("d/kept", 1, 100))
		if got := b.paths(); !slices.Equal(got, []string{"", "d", "d/kept", "d/x", "top"}) {
			t.Errorf("paths %q", got)
		}
		if !b.byPath["d"].Opaque || b.byPath[""].Opaque {
			t.Error("the opaque marker must mark its own directory only")
		}
		for _, p := range []string{"d/x", "top"} {
			if n := b.byPath[p]; n.Type != metadata.TypeChar || n.DevMajor != 0 || n.DevMinor != 0 || n.Mode != 0 {
				t.Errorf("whiteout %s: %+v", p, n)
			}
		}
	})
	t.Run("an empty file needs no digest and no chunks", func(t *testing.T) {
		b := buildTree(t, &estargz.TOCEntry{Name: "e", Type: "reg"})
		if n := b.byPath["e"]; n.Digest != digest.FromString("").String() || len(n.Chunks) != 0 {
			t.Errorf("empty file %+v", n)
		}
		if b.tree.Files != 0 {
			t.Errorf("%d files counted", b.tree.Files)
		}
	})
	t.Run("chunks without chunk digests", func(t *testing.T) {
		b := buildTree(t, with(regE("f", 10, 100), func(e *estargz.TOCEntry) { e.ChunkDigest = "" }))
		if c := b.byPath["f"].Chunks; len(c) != 1 || c[0].Digest != "" || c[0].Size != 10 {
			t.Errorf("chunks %+v", c)
		}
	})
	t.Run("the first file at blob offset 0, sharing a stream", func(t *testing.T) {
		b := buildTree(t, with(regE("a", 10, 0), func(e *estargz.TOCEntry) { e.InnerOffset = 512 }),
			with(regE("b", 10, 0), func(e *estargz.TOCEntry) { e.InnerOffset = 1536 }), regE("c", 10, 300))
		a, bb, c := b.byPath["a"].Chunks[0], b.byPath["b"].Chunks[0], b.byPath["c"].Chunks[0]
		if a.End != 300 || bb.End != 300 || c.End != tocAt || bb.InnerOffset != 1536 {
			t.Errorf("chunk ends %d %d %d", a.End, bb.End, c.End)
		}
	})
	t.Run("chunk ends skip non-file streams", func(t *testing.T) {
		b := buildTree(t, entries(chunkedE("f", 30, [3]int64{0, 10, 100}, [3]int64{10, 10, 200}, [3]int64{20, 0, 300}), dirE("d/"), regE("g", 5, 900))...)
		var ends []int64
		for _, c := range b.byPath["f"].Chunks {
			ends = append(ends, c.End)
		}
		if !slices.Equal(ends, []int64{200, 300, 900}) || b.byPath["g"].Chunks[0].End != tocAt {
			t.Errorf("ends %v, g ends at %d", ends, b.byPath["g"].Chunks[0].End)
		}
	})
	t.Run("overlay xattrs are dropped, others kept", func(t *testing.T) {
		b := buildTree(t, with(dirE("d/"), func(e *estargz.TOCEntry) {
			e.Xattrs = map[string][]byte{"trusted.overlay.opaque": []byte("y"), "user.overlay.opaque": []byte("y"), "trusted.overlay.redirect": []byte("/x"), "security.capability": {1, 2}}
		}))
		if x := b.byPath["d"].Xattrs; len(x) != 1 || x["security.capability"] == nil || b.byPath["d"].Opaque {
			t.Errorf("xattrs %q, opaque %v", x, b.byPath["d"].Opaque)
		}
	})
	t.Run("no prefetch landmark: nothing to prefetch, landmark hidden", func(t *testing.T) {
		b := buildTree(t, regE(estargz.NoPrefetchLandmark, 1, 50), regE("f", 1, 100))
		if b.tree.Prefetch != nil || b.byPath[estargz.NoPrefetchLandmark] != nil {
			t.Errorf("prefetch %v", b.tree.Prefetch)
		}
	})
	t.Run("prefetch landmark: the files before it, in order", func(t *testing.T) {
		b := buildTree(t, regE("z", 1, 10), dirE("d/"), regE("d/a", 1, 20), regE(estargz.PrefetchLandmark, 1, 50), regE("f", 1, 100))
		want := []uint64{b.byPath["z"].ID, b.byPath["d/a"].ID}
		if !slices.Equal(b.tree.Prefetch, want) || b.byPath[estargz.PrefetchLandmark] != nil {
			t.Errorf("prefetch %v, want %v", b.tree.Prefetch, want)
		}
	})
	t.Run("a landmark in a subdirectory is an ordinary file", func(t *testing.T) {
		b := buildTree(t, regE("d/"+estargz.PrefetchLandmark, 1, 50))
		if b.byPath["d/"+estargz.PrefetchLandmark] == nil || b.tree.Prefetch != nil {
			t.Error("d/.prefetch.landmark was taken for a landmark")
		}
	})
	t.Run("names of 255 bytes, spaces and unicode", func(t *testing.T) {
		names := []string{strings.Repeat("x", 255), "with space", "日本語", "new\nline"}
		var ents []*estargz.TOCEntry
		for i, n := range names {
			ents = append(ents, regE("d/"+n, 1, int64(100*(i+1))))
		}
		b := buildTree(t, ents...)
		for _, n := range names {
			if b.byPath["d/"+n] == nil {
				t.Errorf("%q missing", n)
			}
		}
	})
	t.Run("modes keep setuid, setgid and sticky, drop type bits", func(t *testing.T) {
		b := buildTree(t, with(regE("f", 1, 100), func(e *estargz.TOCEntry) { e.Mode = 0o100000 | 0o7755 }))
		if m := b.byPath["f"].Mode; m != 0o7755 {
			t.Errorf("mode %o", m)
		}
	})
}
