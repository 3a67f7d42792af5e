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

// Sink takes what a builder makes, as it makes it: each node once it is
// final, then the directory entries (sorted by parent and name), then the
// link count of each node that hard links reached after it was taken.
// The nodes of a large layer need never be all in memory at once.
type Sink interface {
	Node(n *metadata.Node) error
	Dirent(d metadata.Dirent) error
	Relink(id uint64, nlink uint32) error
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
	t := &memTree{}
	b := newBuilder(toc.Offset, t)
	for i, e := range toc.Entries {
		if err := b.add(i, e); err != nil {
			return nil, err
		}
	}
	return t.finish(b)
}

// memTree is the Sink that keeps everything, as a Tree.
type memTree struct {
	nodes   []*metadata.Node // by ID - RootID
	dirents []metadata.Dirent
}

func (m *memTree) Node(n *metadata.Node) error {
	i := int(n.ID - metadata.RootID)
	for len(m.nodes) <= i {
		m.nodes = append(m.nodes, nil)
	}
	m.nodes[i] = n
	return nil
}

func (m *memTree) Dirent(d metadata.Dirent) error {
	m.dirents = append(m.dirents, d)
	return nil
}

func (m *memTree) Relink(id uint64, nlink uint32) error {
	m.nodes[id-metadata.RootID].Nlink = nlink
	return nil
}

func (m *memTree) finish(b *builder) (*Tree, error) {
	sum, err := b.finish()
	if err != nil {
		return nil, err
	}
	return &Tree{Nodes: m.nodes, Dirents: m.dirents, Prefetch: sum.Prefetch, Files: sum.Files}, nil
}

// Summary is what a builder tells besides its nodes.
type Summary struct {
	// Prefetch and Files are as in Tree.
	Prefetch []uint64
	Files    int
	// Nodes is how many nodes the sink took.
	Nodes int
}

// dirNode is a directory being built: directories stay in memory until
// the end (later entries change their link counts and opaque flags), the
// other nodes go to the sink as soon as they are final.
type dirNode struct {
	n        *metadata.Node
	path     string // cleaned, "" for the root
	children map[string]child
	implicit bool // a parent directory the TOC never declared
}

// child is a name in a directory: its inode, type and whether it is a
// whiteout, in one word (inode numbers stay far below 2^55), because a
// layer may have millions of names and each costs a map slot.
type child uint64

func newChild(id uint64, t metadata.Type, whiteout bool) child {
	c := child(id) | child(t)<<55
	if whiteout {
		c |= 1 << 63
	}
	return c
}

func (c child) id() uint64         { return uint64(c) & (1<<55 - 1) }
func (c child) typ() metadata.Type { return metadata.Type(uint64(c) >> 55 & 0xff) }
func (c child) whiteout() bool     { return c&(1<<63) != 0 }

// runChunk is a chunk whose compressed end is not known yet, and the TOC
// entry it came from.
type runChunk struct {
	c    *metadata.Chunk
	at   int
	name string
}

// pendingFile is a regular file waiting for the end of its last chunk.
type pendingFile struct {
	n *metadata.Node
}

type builder struct {
	tocOffset int64
	out       Sink
	nodes     int // nodes made so far; the next ID is RootID + nodes
	root      *dirNode
	dirs      map[string]*dirNode // by cleaned path, "" the root
	dirList   []*dirNode          // in ID order
	links     map[uint64]uint32   // link counts of non-directories linked more than once
	regIDs    []uint64            // the regular files so far, until a landmark
	prefetch  []uint64
	landmark  bool
	files     int

	last     *metadata.Node // the regular file that "chunk" entries continue
	lastAt   int            // its TOC entry
	lastName string

	// Chunks in blob order: run shares one compressed stream (its ends are
	// the next stream's start); pending files wait for theirs.
	prev    *metadata.Chunk
	run     []runChunk
	pending []pendingFile
}

func newBuilder(tocOffset int64, out Sink) *builder {
	b := &builder{tocOffset: tocOffset, out: out, dirs: map[string]*dirNode{}, links: map[uint64]uint32{}}
	root := b.newNode(metadata.TypeDir, 0o755)
	root.Nlink = 2
	b.root = &dirNode{n: root, children: map[string]child{}, implicit: true}
	b.dirs[""] = b.root
	b.dirList = append(b.dirList, b.root)
	return b
}

func (b *builder) newNode(t metadata.Type, mode uint32) *metadata.Node {
	n := &metadata.Node{ID: uint64(b.nodes) + metadata.RootID, Type: t, Mode: mode}
	b.nodes++
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
	if err := b.settle(); err != nil {
		return err
	}
	n, err := b.entry(e)
	if err != nil {
		return entryErr(i, e.Name, err)
	}
	if n == nil || n.Type == metadata.TypeDir {
		return nil
	}
	if n.Type == metadata.TypeReg && n.Size > 0 {
		if err := addChunk(n, e); err != nil {
			return fmt.Errorf("TOC entry %d (%q): %w", i, e.Name, err)
		}
		b.last, b.lastAt, b.lastName = n, i, e.Name
		return nil
	}
	// Empty files, symlinks, devices, whiteouts: final already.
	return b.out.Node(n)
}

// settle ends the regular file that chunk entries continued: its chunks
// must tile it, come in blob order, and it goes to the sink once the end
// of its last chunk is known.
func (b *builder) settle() error {
	n := b.last
	if n == nil {
		return nil
	}
	b.last = nil
	if err := checkTiling(n); err != nil {
		return entryErr(b.lastAt, b.lastName, err)
	}
	for j := range n.Chunks {
		c := &n.Chunks[j]
		if c.Offset >= b.tocOffset {
			return entryErr(b.lastAt, b.lastName, fmt.Errorf("chunk data at %d is not before the TOC at %d", c.Offset, b.tocOffset))
		}
		if p := b.prev; p != nil && (c.Offset < p.Offset || (c.Offset == p.Offset && c.InnerOffset < p.InnerOffset+p.Size)) {
			return entryErr(b.lastAt, b.lastName, fmt.Errorf("chunk data at %d+%d overlaps or precedes the previous chunk at %d+%d",
				c.Offset, c.InnerOffset, p.Offset, p.InnerOffset))
		}
		if len(b.run) > 0 && b.run[0].c.Offset != c.Offset {
			if err := b.endRun(c.Offset); err != nil {
				return err
			}
		}
		b.run = append(b.run, runChunk{c, b.lastAt, b.lastName})
		b.prev = c
	}
	b.pending = append(b.pending, pendingFile{n})
	return b.flush()
}

// endRun gives the chunks of the current stream their end: where the
// next stream (or the TOC) starts.
func (b *builder) endRun(end int64) error {
	for _, r := range b.run {
		r.c.End = end
		if r.c.End-r.c.Offset > maxChunkSpan {
			return entryErr(r.at, r.name, fmt.Errorf("chunk data at %d spans %d compressed bytes, more than %d", r.c.Offset, r.c.End-r.c.Offset, maxChunkSpan))
		}
	}
	b.run = b.run[:0]
	return nil
}

// flush hands the sink the pending files whose chunks all have their end.
func (b *builder) flush() error {
	i := 0
	for ; i < len(b.pending); i++ {
		n := b.pending[i].n
		if n.Chunks[len(n.Chunks)-1].End == 0 {
			break
		}
		if err := b.out.Node(n); err != nil {
			return err
		}
	}
	b.pending = append(b.pending[:0], b.pending[i:]...)
	return nil
}

// finish checks what only the whole TOC tells and hands the sink the rest:
// the last files, the directories, every directory entry, the link counts.
func (b *builder) finish() (Summary, error) {
	if err := b.settle(); err != nil {
		return Summary{}, err
	}
	if err := b.endRun(b.tocOffset); err != nil {
		return Summary{}, err
	}
	if err := b.flush(); err != nil {
		return Summary{}, err
	}
	for _, d := range b.dirList {
		if err := b.out.Node(d.n); err != nil {
			return Summary{}, err
		}
	}
	for _, d := range b.dirList {
		names := make([]string, 0, len(d.children))
		for name := range d.children {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			c := d.children[name]
			if err := b.out.Dirent(metadata.Dirent{Parent: d.n.ID, Name: name, ID: c.id(), Type: c.typ()}); err != nil {
				return Summary{}, err
			}
		}
	}
	ids := make([]uint64, 0, len(b.links))
	for id := range b.links {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		if err := b.out.Relink(id, b.links[id]); err != nil {
			return Summary{}, err
		}
	}
	sum := Summary{Files: b.files, Nodes: b.nodes}
	if b.landmark {
		sum.Prefetch = b.prefetch
	}
	return sum, nil
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
func (b *builder) dir(p string) (*dirNode, error) {
	if d, ok := b.dirs[p]; ok {
		return d, nil
	}
	parent, err := b.dir(parentOf(p))
	if err != nil {
		return nil, err
	}
	base := path.Base(p)
	if _, exists := parent.children[base]; exists {
		return nil, fmt.Errorf("parent %q is not a directory", p)
	}
	d := &dirNode{n: b.newNode(metadata.TypeDir, 0o755), path: p, children: map[string]child{}, implicit: true}
	b.linkDir(parent, base, d)
	return d, nil
}

func parentOf(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// linkDir puts directory d (its path set) in parent under name.
func (b *builder) linkDir(parent *dirNode, name string, d *dirNode) {
	parent.children[strings.Clone(name)] = newChild(d.n.ID, metadata.TypeDir, false)
	d.n.Nlink += 2   // its name and its "."
	parent.n.Nlink++ // its ".."
	b.dirs[d.path] = d
	b.dirList = append(b.dirList, d)
}

// linkNode puts non-directory n in parent under name.
func (b *builder) linkNode(parent *dirNode, name string, n *metadata.Node, whiteout bool) {
	parent.children[strings.Clone(name)] = newChild(n.ID, n.Type, whiteout)
	n.Nlink++
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
			b.prefetch = b.regIDs
		}
		b.regIDs = nil
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
		b.linkNode(parent, target, n, true)
		return n, nil
	}
	if _, dup := parent.children[base]; dup {
		// A directory may be declared after a child implied it, once.
		if d := b.dirs[name]; e.Type == "dir" && d != nil && d.implicit {
			d.implicit = false
			return d.n, setAttrs(d.n, e)
		}
		return nil, fmt.Errorf("duplicate entry")
	}
	if e.Type == "hardlink" {
		target, err := cleanName(e.LinkName)
		if err != nil || target == "" {
			return nil, fmt.Errorf("hard link to %q: invalid target", e.LinkName)
		}
		t, ok := b.lookup(target)
		if !ok {
			return nil, fmt.Errorf("hard link to %q, which precedes it nowhere in the layer", target)
		}
		if t.typ() == metadata.TypeDir {
			return nil, fmt.Errorf("hard link to directory %q", target)
		}
		if t.whiteout() {
			return nil, fmt.Errorf("hard link to whiteout %q", target)
		}
		parent.children[strings.Clone(base)] = t
		nlink, ok := b.links[t.id()]
		if !ok {
			nlink = 1
		}
		b.links[t.id()] = nlink + 1
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
	if err := setAttrs(n, e); err != nil {
		return nil, err
	}
	if t == metadata.TypeDir {
		b.linkDir(parent, base, &dirNode{n: n, path: name, children: map[string]child{}})
		return n, nil
	}
	b.linkNode(parent, base, n, false)
	if t == metadata.TypeReg {
		if !b.landmark { // after it, no list is needed
			b.regIDs = append(b.regIDs, n.ID)
		}
		if n.Size > 0 {
			b.files++
		}
	}
	return n, nil
}

// lookup finds what the layer has at p so far.
func (b *builder) lookup(p string) (child, bool) {
	if d, ok := b.dirs[p]; ok {
		return newChild(d.n.ID, metadata.TypeDir, false), true
	}
	parent, ok := b.dirs[parentOf(p)]
	if !ok {
		return 0, false
	}
	c, ok := parent.children[path.Base(p)]
	return c, ok
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
