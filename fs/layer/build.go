package layer

import (
	"fmt"
	"math"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/metadata"
)

// Limits on a single entry; a TOC beyond them is refused as hostile.
const (
	maxEntries  = 4 << 20
	maxNameLen  = 255
	maxPathLen  = 4096
	maxFileSize = 1 << 40
	// maxChunkSize and maxChunkSpan bound what one chunk makes the daemon
	// hold in memory (estargz cuts 4 MiB chunks by default); a layer with
	// larger chunks is unpacked instead.
	maxChunkSize  = 64 << 20
	maxChunkSpan  = maxChunkSize + 8<<20
	maxXattrs     = 128
	maxXattrValue = 64 << 10
	whiteoutPre   = ".wh."
	opaqueMarker  = ".wh..wh..opq"
)

// emptyDigest is every empty file's digest: one string, not one per file.
var emptyDigest = digest.SHA256.FromString("").String()

// Tree is a validated layer, ready for metadata.DB.Put.
type Tree struct {
	Nodes   []*metadata.Node
	Dirents []metadata.Dirent
	// Prefetch lists the regular files before the prefetch landmark, in
	// layer order; nil without a landmark or with the no-prefetch one.
	Prefetch []uint64
	// Files is the number of non-empty regular files (distinct inodes).
	Files int
}

type buildNode struct {
	n        *metadata.Node
	children map[string]*buildNode
	implicit bool // a parent directory the TOC never declared
	whiteout bool
}

// Build validates toc and turns it into an inode tree. Whiteouts become
// 0:0 character devices and opaque markers an opaque flag, the way
// overlayfs expects them in a lower layer; landmarks and the markers
// themselves are not part of the tree. ReadTree does the same while it
// decodes the TOC.
func Build(toc *TOC) (*Tree, error) {
	if len(toc.Entries) > maxEntries {
		return nil, fmt.Errorf("TOC has %d entries, more than %d", len(toc.Entries), maxEntries)
	}
	b := newBuilder(toc.Offset)
	for i, e := range toc.Entries {
		if err := b.add(i, e); err != nil {
			return nil, err
		}
	}
	return b.finish()
}

type builder struct {
	tocOffset int64
	root      *buildNode
	byPath    map[string]*buildNode
	nodes     []*metadata.Node
	regs      []*metadata.Node // in layer order
	regAt     []int            // the TOC entry of each of regs, for errors
	regName   []string         // and its name
	prefetch  []uint64
	landmark  bool

	last     *metadata.Node // the regular file that "chunk" entries continue
	lastAt   int            // its TOC entry
	lastName string
}

func newBuilder(tocOffset int64) *builder {
	b := &builder{tocOffset: tocOffset, byPath: map[string]*buildNode{}}
	root := b.newNode(metadata.TypeDir, 0o755)
	root.Nlink = 2
	b.root = &buildNode{n: root, children: map[string]*buildNode{}, implicit: true}
	b.byPath[""] = b.root
	return b
}

func (b *builder) newNode(t metadata.Type, mode uint32) *metadata.Node {
	n := &metadata.Node{ID: uint64(len(b.nodes)) + metadata.RootID, Type: t, Mode: mode}
	b.nodes = append(b.nodes, n)
	return n
}

// add takes TOC entry i, in TOC order.
func (b *builder) add(i int, e *estargz.TOCEntry) error {
	if i >= maxEntries {
		return fmt.Errorf("TOC has more than %d entries", maxEntries)
	}
	if e == nil {
		return fmt.Errorf("TOC entry %d is null", i)
	}
	if e.Type == "chunk" {
		if b.last == nil {
			return fmt.Errorf("TOC entry %d: chunk of %q follows no regular file", i, e.Name)
		}
		if err := addChunk(b.last, e); err != nil {
			return fmt.Errorf("TOC entry %d (%q): %w", i, e.Name, err)
		}
		return nil
	}
	if b.last != nil {
		if err := checkTiling(b.last); err != nil {
			return entryErr(b.lastAt, b.lastName, err)
		}
	}
	b.last = nil
	n, err := b.entry(e)
	if err != nil {
		return entryErr(i, e.Name, err)
	}
	if len(b.regAt) < len(b.regs) {
		b.regAt = append(b.regAt, i)
		b.regName = append(b.regName, e.Name)
	}
	if n != nil && n.Type == metadata.TypeReg && e.Type == "reg" && n.Size > 0 {
		if err := addChunk(n, e); err != nil {
			return fmt.Errorf("TOC entry %d (%q): %w", i, e.Name, err)
		}
		b.last, b.lastAt, b.lastName = n, i, e.Name
	}
	return nil
}

// finish checks what only the whole TOC tells and returns the tree.
func (b *builder) finish() (*Tree, error) {
	if b.last != nil {
		if err := checkTiling(b.last); err != nil {
			return nil, entryErr(b.lastAt, b.lastName, err)
		}
	}
	if err := b.offsets(); err != nil {
		return nil, err
	}
	return b.tree(), nil
}

// entryErr names TOC entry i in err.
func entryErr(i int, name string, err error) error {
	return fmt.Errorf("TOC entry %d (%q): %w", i, name, err)
}

// cleanName checks a TOC path and returns it without "./" prefix or "/" suffix.
func cleanName(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("absolute path")
	}
	if len(name) > maxPathLen {
		return "", fmt.Errorf("path longer than %d bytes", maxPathLen)
	}
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("path contains NUL")
	}
	name = strings.TrimPrefix(name, "./")
	name = strings.TrimSuffix(name, "/")
	if name == "" || name == "." {
		return "", nil
	}
	for _, c := range strings.Split(name, "/") {
		switch {
		case c == "" || c == ".":
			return "", fmt.Errorf("path has an empty or %q component", c)
		case c == "..":
			return "", fmt.Errorf("path escapes the layer")
		case len(c) > maxNameLen:
			return "", fmt.Errorf("name longer than %d bytes", maxNameLen)
		}
	}
	return name, nil
}

// dir returns the directory at p, creating undeclared parents; it refuses
// a parent that exists as anything but a directory (a symlinked parent
// would let later entries land outside the layer's tree).
func (b *builder) dir(p string) (*buildNode, error) {
	if d, ok := b.byPath[p]; ok {
		if d.n.Type != metadata.TypeDir {
			return nil, fmt.Errorf("parent %q is not a directory", p)
		}
		return d, nil
	}
	parent, err := b.dir(parentOf(p))
	if err != nil {
		return nil, err
	}
	n := b.newNode(metadata.TypeDir, 0o755)
	d := &buildNode{n: n, children: map[string]*buildNode{}, implicit: true}
	b.link(parent, path.Base(p), d)
	b.byPath[p] = d
	return d, nil
}

func parentOf(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

func (b *builder) link(parent *buildNode, name string, child *buildNode) {
	parent.children[name] = child
	child.n.Nlink++
	if child.n.Type == metadata.TypeDir {
		child.n.Nlink++  // its "."
		parent.n.Nlink++ // its ".."
	}
}

func (b *builder) entry(e *estargz.TOCEntry) (*metadata.Node, error) {
	name, err := cleanName(e.Name)
	if err != nil {
		return nil, err
	}
	if name == "" {
		if e.Type != "dir" {
			return nil, fmt.Errorf("the layer root is a %q, not a directory", e.Type)
		}
		if !b.root.implicit {
			return nil, fmt.Errorf("root directory declared twice")
		}
		b.root.implicit = false
		return b.root.n, setAttrs(b.root.n, e)
	}
	parentPath, base := parentOf(name), path.Base(name)
	parent, err := b.dir(parentPath)
	if err != nil {
		return nil, err
	}
	if parentPath == "" && (base == estargz.PrefetchLandmark || base == estargz.NoPrefetchLandmark) {
		if b.landmark {
			return nil, fmt.Errorf("second prefetch landmark")
		}
		b.landmark = true
		if base == estargz.PrefetchLandmark {
			for _, n := range b.regs {
				b.prefetch = append(b.prefetch, n.ID)
			}
		}
		return nil, nil
	}
	if base == opaqueMarker {
		parent.n.Opaque = true
		return nil, nil
	}
	if strings.HasPrefix(base, whiteoutPre) {
		target := strings.TrimPrefix(base, whiteoutPre)
		if target == "" || target == "." || target == ".." || strings.HasPrefix(target, whiteoutPre) {
			return nil, fmt.Errorf("malformed whiteout")
		}
		if _, dup := parent.children[target]; dup {
			return nil, fmt.Errorf("whiteout of %q in the layer that also holds it", target)
		}
		n := b.newNode(metadata.TypeChar, 0)
		n.ModTime = modTime(e)
		b.link(parent, target, &buildNode{n: n, whiteout: true})
		b.byPath[path.Join(parentPath, target)] = parent.children[target]
		return nil, nil
	}
	if existing, dup := parent.children[base]; dup {
		// A directory may be declared after a child implied it, once.
		if e.Type == "dir" && existing.n.Type == metadata.TypeDir && existing.implicit {
			existing.implicit = false
			return existing.n, setAttrs(existing.n, e)
		}
		return nil, fmt.Errorf("duplicate entry")
	}
	if e.Type == "hardlink" {
		target, err := cleanName(e.LinkName)
		if err != nil || target == "" {
			return nil, fmt.Errorf("hard link to %q: invalid target", e.LinkName)
		}
		t, ok := b.byPath[target]
		if !ok {
			return nil, fmt.Errorf("hard link to %q, which precedes it nowhere in the layer", target)
		}
		if t.n.Type == metadata.TypeDir {
			return nil, fmt.Errorf("hard link to directory %q", target)
		}
		if t.whiteout {
			return nil, fmt.Errorf("hard link to whiteout %q", target)
		}
		b.link(parent, base, t)
		b.byPath[name] = t
		return nil, nil
	}
	var t metadata.Type
	switch e.Type {
	case "dir":
		t = metadata.TypeDir
	case "reg":
		t = metadata.TypeReg
	case "symlink":
		t = metadata.TypeSymlink
	case "char":
		t = metadata.TypeChar
	case "block":
		t = metadata.TypeBlock
	case "fifo":
		t = metadata.TypeFifo
	default:
		return nil, fmt.Errorf("unsupported entry type %q", e.Type)
	}
	n := b.newNode(t, 0)
	bn := &buildNode{n: n}
	if t == metadata.TypeDir {
		bn.children = map[string]*buildNode{}
	}
	if err := setAttrs(n, e); err != nil {
		return nil, err
	}
	b.link(parent, base, bn)
	b.byPath[name] = bn
	if t == metadata.TypeReg {
		b.regs = append(b.regs, n)
	}
	return n, nil
}

func modTime(e *estargz.TOCEntry) int64 {
	if e.ModTime3339 == "" {
		return 0
	}
	t, err := time.Parse(time.RFC3339, e.ModTime3339)
	if err != nil {
		return 0
	}
	return t.UnixNano()
}

func setAttrs(n *metadata.Node, e *estargz.TOCEntry) error {
	if e.Mode < 0 || e.Mode > math.MaxUint32 {
		return fmt.Errorf("mode %o out of range", e.Mode)
	}
	n.Mode = uint32(e.Mode) & 0o7777
	if e.UID < 0 || e.UID > math.MaxUint32 || e.GID < 0 || e.GID > math.MaxUint32 {
		return fmt.Errorf("uid/gid %d/%d out of range", e.UID, e.GID)
	}
	n.UID, n.GID = uint32(e.UID), uint32(e.GID)
	n.ModTime = modTime(e)
	if len(e.Xattrs) > maxXattrs {
		return fmt.Errorf("%d xattrs, more than %d", len(e.Xattrs), maxXattrs)
	}
	for k, v := range e.Xattrs {
		if len(v) > maxXattrValue || k == "" || len(k) > maxNameLen {
			return fmt.Errorf("xattr %q too large or unnamed", k)
		}
		// overlayfs reads its own xattrs from lower layers: only the opaque
		// marker we derive from the layer may speak to it.
		if strings.HasPrefix(k, "trusted.overlay.") || strings.HasPrefix(k, "user.overlay.") {
			continue
		}
		if n.Xattrs == nil {
			n.Xattrs = map[string][]byte{}
		}
		n.Xattrs[k] = v
	}
	switch n.Type {
	case metadata.TypeSymlink:
		if e.LinkName == "" || len(e.LinkName) > maxPathLen || strings.ContainsRune(e.LinkName, 0) {
			return fmt.Errorf("invalid symlink target")
		}
		n.Link = e.LinkName
		n.Size = int64(len(e.LinkName))
	case metadata.TypeChar, metadata.TypeBlock:
		if e.DevMajor < 0 || e.DevMinor < 0 || e.DevMajor > math.MaxUint32 || e.DevMinor > math.MaxUint32 {
			return fmt.Errorf("device number %d:%d out of range", e.DevMajor, e.DevMinor)
		}
		n.DevMajor, n.DevMinor = uint32(e.DevMajor), uint32(e.DevMinor)
	case metadata.TypeReg:
		if e.Size < 0 || e.Size > maxFileSize {
			return fmt.Errorf("size %d out of range", e.Size)
		}
		n.Size = e.Size
		if e.Size > 0 {
			d, err := digest.Parse(e.Digest)
			if err != nil || d.Algorithm() != digest.SHA256 {
				return fmt.Errorf("regular file without a valid sha256 digest (%q)", e.Digest)
			}
			n.Digest = d.String()
		} else {
			n.Digest = emptyDigest
		}
	}
	return nil
}

// addChunk appends e's piece of the file to n's chunk table.
func addChunk(n *metadata.Node, e *estargz.TOCEntry) error {
	size := e.ChunkSize
	if size == 0 { // a single-chunk file, or the last chunk
		size = n.Size - e.ChunkOffset
	}
	if e.Offset < 0 || e.InnerOffset < 0 || size <= 0 || e.ChunkOffset < 0 {
		return fmt.Errorf("chunk at %d+%d (blob offset %d) is malformed", e.ChunkOffset, size, e.Offset)
	}
	if size > maxChunkSize || e.InnerOffset > maxChunkSpan {
		return fmt.Errorf("chunk at %d+%d is larger than %d bytes", e.ChunkOffset, size, maxChunkSize)
	}
	c := metadata.Chunk{Offset: e.Offset, InnerOffset: e.InnerOffset, FileOffset: e.ChunkOffset, Size: size}
	if e.ChunkDigest != "" {
		d, err := digest.Parse(e.ChunkDigest)
		if err != nil || d.Algorithm() != digest.SHA256 {
			return fmt.Errorf("invalid chunk digest %q", e.ChunkDigest)
		}
		c.Digest = d.String()
	}
	n.Chunks = append(n.Chunks, c)
	return nil
}

// checkTiling requires a file's chunks to cover it exactly, in order: with
// gaps or overlaps, chunks that each verify could still add up to bytes the
// file does not hold.
func checkTiling(n *metadata.Node) error {
	var next int64
	for _, c := range n.Chunks {
		if c.FileOffset != next {
			return fmt.Errorf("chunk at file offset %d, expected %d", c.FileOffset, next)
		}
		next += c.Size
	}
	if next != n.Size {
		return fmt.Errorf("chunks cover %d of %d bytes", next, n.Size)
	}
	return nil
}

// offsets gives every chunk the end of its compressed bytes: the start of
// the next stream in the blob, or the TOC. Streams must come in blob order,
// and chunks may share a stream only when adjacent in the TOC.
func (b *builder) offsets() error {
	type ref struct{ n, c int }
	var all []ref
	for i, n := range b.regs {
		for j := range n.Chunks {
			all = append(all, ref{i, j})
		}
	}
	chunk := func(r ref) *metadata.Chunk { return &b.regs[r.n].Chunks[r.c] }
	for i := range all {
		c := chunk(all[i])
		if c.Offset >= b.tocOffset {
			return b.regErr(all[i].n, fmt.Errorf("chunk data at %d is not before the TOC at %d", c.Offset, b.tocOffset))
		}
		if i > 0 {
			prev := chunk(all[i-1])
			if c.Offset < prev.Offset || (c.Offset == prev.Offset && c.InnerOffset < prev.InnerOffset+prev.Size) {
				return b.regErr(all[i].n, fmt.Errorf("chunk data at %d+%d overlaps or precedes the previous chunk at %d+%d",
					c.Offset, c.InnerOffset, prev.Offset, prev.InnerOffset))
			}
		}
	}
	end := b.tocOffset
	for i := len(all) - 1; i >= 0; i-- {
		c := chunk(all[i])
		c.End = end
		if c.End-c.Offset > maxChunkSpan {
			return b.regErr(all[i].n, fmt.Errorf("chunk data at %d spans %d compressed bytes, more than %d", c.Offset, c.End-c.Offset, maxChunkSpan))
		}
		if i == 0 || chunk(all[i-1]).Offset != c.Offset {
			end = c.Offset
		}
	}
	return nil
}

// regErr names the TOC entry of regular file i (of b.regs) in err.
func (b *builder) regErr(i int, err error) error {
	return entryErr(b.regAt[i], b.regName[i], err)
}

func (b *builder) tree() *Tree {
	t := &Tree{Nodes: b.nodes}
	if b.landmark {
		t.Prefetch = b.prefetch
	}
	for _, n := range b.regs {
		if n.Size > 0 {
			t.Files++
		}
	}
	seen := map[*buildNode]bool{}
	var walk func(*buildNode)
	walk = func(d *buildNode) {
		if seen[d] {
			return
		}
		seen[d] = true
		for name, c := range d.children {
			t.Dirents = append(t.Dirents, metadata.Dirent{Parent: d.n.ID, Name: name, ID: c.n.ID, Type: c.n.Type})
			if c.n.Type == metadata.TypeDir {
				walk(c)
			}
		}
	}
	walk(b.root)
	// In key order, bbolt appends instead of splitting pages at random.
	sort.Slice(t.Dirents, func(i, j int) bool {
		a, b := t.Dirents[i], t.Dirents[j]
		if a.Parent != b.Parent {
			return a.Parent < b.Parent
		}
		return a.Name < b.Name
	})
	return t
}
