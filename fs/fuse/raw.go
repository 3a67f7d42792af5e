package fuse

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/lazycas/lazycas/metadata"
)

// layerFS answers the kernel's requests for one layer. It keeps no state a
// request depends on that another process could not rebuild: node ids
// are the layer's inode numbers, a file handle names its inode and open
// mode, and what the kernel holds open is counted in the shared open
// table. So a process that takes over a live connection answers requests
// about nodes and handles an earlier process gave out.
type layerFS struct {
	fuse.RawFileSystem // ENOSYS for everything a read-only layer lacks

	m      *mount
	server atomic.Pointer[fuse.Server]
	opens  *openTable

	nodes sync.Map // uint64 -> *metadata.Node: a cache, lost with the process

	filesMu sync.Mutex
	files   map[uint64]File // by inode: the open content the counts in opens keep

	dirsMu  sync.Mutex
	dirs    map[uint64][]metadata.Dirent // listings of open directories, a cache
	parents map[uint64]uint64            // directory -> parent, as far as seen

	// gate holds back requests once the process hands the mount over
	// (see mount.detach): they stay unanswered, and the kernel gives
	// them to the next process.
	gate     sync.RWMutex
	detached atomic.Bool
}

func newLayerFS(m *mount, opens *openTable) *layerFS {
	return &layerFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		m:             m, opens: opens,
		files: map[uint64]File{}, dirs: map[uint64][]metadata.Dirent{}, parents: map[uint64]uint64{},
	}
}

// Handle bits: a file handle is its inode shifted left by two, with its
// open mode in the low bits.
const (
	fhEmpty       = 0
	fhPassthrough = 1
	fhCached      = 2
)

func (fs *layerFS) String() string { return "lazycas" }

func (fs *layerFS) Init(s *fuse.Server) { fs.server.Store(s) }

// enter admits a request; its request's done ends it. Once the mount is
// detached, no request is answered: one that arrives waits at the door,
// and one that ends waits instead of answering (its answer may come from
// a store or metadata closing under it), until the process exits. The
// kernel then gives them to the next process.
func (fs *layerFS) enter(h *fuse.InHeader) request {
	met := fs.m.opts.Metrics
	if h.Unique&resent != 0 && met != nil {
		met.Resent.Add(1)
	}
	fs.gate.RLock()
	if fs.detached.Load() {
		fs.gate.RUnlock()
		select {}
	}
	r := request{fs: fs, met: met, op: h.Opcode}
	if met != nil {
		r.start = time.Now()
	}
	return r
}

// request is one admitted request: a value, so that timing every request
// costs no allocation.
type request struct {
	fs    *layerFS
	met   *OpMetrics
	op    uint32
	start time.Time
}

func (r request) done() {
	if r.met != nil {
		r.met.observe(r.op, time.Since(r.start))
	}
	r.fs.gate.RUnlock()
	if r.fs.detached.Load() {
		select {}
	}
}

// resent marks a request the kernel sends again (FUSE_UNIQUE_RESEND): an
// earlier process read it and never answered.
const resent = 1 << 63

const maxCachedNodes = 1 << 16

func (fs *layerFS) node(id uint64) (*metadata.Node, fuse.Status) {
	if v, ok := fs.nodes.Load(id); ok {
		return v.(*metadata.Node), fuse.OK
	}
	n, err := fs.m.layer.Node(id)
	if errors.Is(err, metadata.ErrNotFound) {
		return nil, fuse.ENOENT
	}
	if err != nil {
		fs.m.log.WithError(err).WithField("inode", id).Error("read inode")
		return nil, fuse.EIO
	}
	fs.remember(n)
	return n, fuse.OK
}

func (fs *layerFS) remember(n *metadata.Node) {
	if n.ID%maxCachedNodes == 0 { // rarely, and cheaply, bound the cache
		fs.nodes.Clear()
	}
	fs.nodes.Store(n.ID, n)
}

func (fs *layerFS) fillEntry(n *metadata.Node, out *fuse.EntryOut) {
	out.NodeId = n.ID
	out.Generation = 1
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(cacheTimeout)
	fillAttr(n, &out.Attr)
}

func (fs *layerFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	defer fs.enter(h).done()
	fs.m.stats.Lookups.Add(1)
	child, err := fs.m.layer.Lookup(h.NodeId, name)
	if errors.Is(err, metadata.ErrNotFound) {
		// Remembered as absent for as long as an entry: nothing appears.
		out.NodeId = 0
		out.SetEntryTimeout(cacheTimeout)
		return fuse.OK
	}
	if err != nil {
		fs.m.log.WithError(err).WithField("name", name).Error("lookup")
		return fuse.EIO
	}
	fs.remember(child)
	if child.Type == metadata.TypeDir {
		fs.dirsMu.Lock()
		fs.parents[child.ID] = h.NodeId
		fs.dirsMu.Unlock()
	}
	fs.fillEntry(child, out)
	return fuse.OK
}

// Forget needs nothing: no node state is kept per lookup.
func (fs *layerFS) Forget(nodeid, nlookup uint64) {}

func (fs *layerFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	defer fs.enter(&in.InHeader).done()
	fs.m.stats.Getattrs.Add(1)
	n, st := fs.node(in.NodeId)
	if !st.Ok() {
		return st
	}
	out.SetTimeout(cacheTimeout)
	fillAttr(n, &out.Attr)
	return fuse.OK
}

func (fs *layerFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	defer fs.enter(h).done()
	n, st := fs.node(h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	if n.Type != metadata.TypeSymlink {
		return nil, fuse.EINVAL
	}
	return []byte(n.Link), fuse.OK
}

func (fs *layerFS) xattr(n *metadata.Node, name string) ([]byte, bool) {
	if name == fs.m.opts.OpaqueXattr {
		return []byte("y"), n.Opaque
	}
	v, ok := n.Xattrs[name]
	return v, ok
}

func (fs *layerFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	if fs.m.opts.NoXattrs {
		return 0, fuse.ENOSYS
	}
	defer fs.enter(h).done()
	n, st := fs.node(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	v, ok := fs.xattr(n, attr)
	if !ok {
		return 0, fuse.ENOATTR
	}
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

func (fs *layerFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	defer fs.enter(h).done()
	n, st := fs.node(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	names := make([]string, 0, len(n.Xattrs)+1)
	for k := range n.Xattrs {
		names = append(names, k)
	}
	if n.Opaque {
		names = append(names, fs.m.opts.OpaqueXattr)
	}
	sort.Strings(names)
	var buf []byte
	for _, k := range names {
		buf = append(append(buf, k...), 0)
	}
	if len(dest) < len(buf) {
		return uint32(len(buf)), fuse.ERANGE
	}
	return uint32(copy(dest, buf)), fuse.OK
}

func (fs *layerFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = 4096
	out.Frsize = 4096
	out.NameLen = 255
	out.Files = uint64(fs.m.layer.Info.Nodes)
	return fuse.OK
}

// Flush answers ENOSYS: a read-only layer has nothing to write back when
// a file is closed, and after that answer the kernel sends no FLUSH to the
// mount again (without it, every close() cost a round trip to us).
func (fs *layerFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	fs.m.stats.Flushes.Add(1)
	return fuse.ENOSYS
}

// Directories.

func (fs *layerFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	defer fs.enter(&in.InHeader).done()
	n, st := fs.node(in.NodeId)
	if !st.Ok() {
		return st
	}
	if n.Type != metadata.TypeDir {
		return fuse.ENOTDIR
	}
	out.Fh = in.NodeId
	// Listings never change: the kernel may keep them.
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR
	return fuse.OK
}

const maxCachedDirs = 4096

// listing returns dir's entries, "." and ".." first, as from any disk
// filesystem: programs that count a directory's entries expect them.
func (fs *layerFS) listing(dir uint64) ([]metadata.Dirent, fuse.Status) {
	fs.dirsMu.Lock()
	l, ok := fs.dirs[dir]
	fs.dirsMu.Unlock()
	if ok {
		return l, fuse.OK
	}
	fs.m.stats.Readdirs.Add(1)
	ents, err := fs.m.layer.ReadDir(dir)
	if err != nil {
		fs.m.log.WithError(err).WithField("inode", dir).Error("readdir")
		return nil, fuse.EIO
	}
	fs.dirsMu.Lock()
	defer fs.dirsMu.Unlock()
	parent, ok := fs.parents[dir]
	if dir == metadata.RootID {
		parent, ok = dir, true
	}
	if !ok {
		parent = 0 // shown as unknown; nothing reads ".."'s inode
	}
	l = make([]metadata.Dirent, 0, len(ents)+2)
	l = append(l, metadata.Dirent{Name: ".", ID: dir, Type: metadata.TypeDir},
		metadata.Dirent{Name: "..", ID: parent, Type: metadata.TypeDir})
	l = append(l, ents...)
	for _, e := range ents {
		if e.Type == metadata.TypeDir {
			fs.parents[e.ID] = dir
		}
	}
	if len(fs.dirs) >= maxCachedDirs {
		clear(fs.dirs)
	}
	fs.dirs[dir] = l
	return l, fuse.OK
}

func (fs *layerFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

func (fs *layerFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

// readDir lists from the offset the kernel asks for: entry i has offset
// i+1, so any process can continue any listing.
func (fs *layerFS) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	defer fs.enter(&in.InHeader).done()
	l, st := fs.listing(in.NodeId)
	if !st.Ok() {
		return st
	}
	for i := int(in.Offset); i < len(l); i++ {
		e := l[i]
		de := fuse.DirEntry{Name: e.Name, Ino: e.ID, Mode: typeBits(e.Type), Off: uint64(i + 1)}
		if !plus {
			if !out.AddDirEntry(de) {
				break
			}
			continue
		}
		if i < 2 { // "." and "..": the kernel ignores their entries
			if out.AddDirLookupEntry(de) == nil {
				break
			}
			continue
		}
		child, st := fs.node(e.ID)
		if !st.Ok() {
			return st
		}
		eo := out.AddDirLookupEntry(de)
		if eo == nil {
			break
		}
		fs.fillEntry(child, eo)
	}
	return fuse.OK
}

func (fs *layerFS) ReleaseDir(in *fuse.ReleaseIn) {}

// Files.

func (fs *layerFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	defer fs.enter(&in.InHeader).done()
	if in.Flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return fuse.EROFS
	}
	n, st := fs.node(in.NodeId)
	if !st.Ok() {
		return st
	}
	if n.Type != metadata.TypeReg {
		return fuse.EINVAL
	}
	fs.m.stats.Opens.Add(1)
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	if n.Size == 0 {
		out.Fh = n.ID<<2 | fhEmpty
		return fuse.OK
	}
	ctx := context.Background()
	unlock := fs.opens.lock(n.ID)
	defer unlock()
	f, err := fs.content(ctx, n)
	if err != nil {
		fs.m.stats.OpenErrors.Add(1)
		if met := fs.m.opts.Metrics; met != nil {
			met.OpenErrors.Add(1)
		}
		fs.m.log.WithError(err).WithFields(log.Fields{"inode": n.ID, "digest": n.Digest}).
			Error("cannot serve file content: reads fail with EIO")
		return fuse.EIO
	}
	if id := fs.backingFor(n.ID, f); id != 0 {
		fs.opens.add(n.ID, true, 1)
		out.Fh = n.ID<<2 | fhPassthrough
		out.BackingID = id
		out.OpenFlags = fuse.FOPEN_PASSTHROUGH
		return fuse.OK
	}
	if fs.opens.has(n.ID) {
		fs.opens.add(n.ID, false, 1)
	}
	out.Fh = n.ID<<2 | fhCached
	return fuse.OK
}

// content returns the open content of n, opening it when no open of the
// inode holds it. Called with n's open lock.
func (fs *layerFS) content(ctx context.Context, n *metadata.Node) (File, error) {
	fs.filesMu.Lock()
	f := fs.files[n.ID]
	fs.filesMu.Unlock()
	if f != nil {
		if _, partial := f.(PieceReader); !partial {
			return f, nil
		}
	}
	nf, err := fs.m.files.Open(ctx, n)
	if err != nil {
		return nil, err
	}
	fs.filesMu.Lock()
	fs.files[n.ID] = nf
	fs.filesMu.Unlock()
	if f != nil {
		// A partial file sealed since: later reads use the object.
		f.Close()
	}
	return nf, nil
}

// backingFor returns the backing id an open of ino passes through, or 0
// for a cached open: passthrough is off, f is still being fetched, the
// inode has cached opens (the kernel refuses passthrough then), or the
// kernel refused to register f. Called with ino's open lock.
func (fs *layerFS) backingFor(ino uint64, f File) int32 {
	if !fs.m.passthrough.Load() || !fs.opens.has(ino) || fs.opens.cached(ino) > 0 {
		return 0
	}
	if _, partial := f.(PieceReader); partial {
		return 0
	}
	if id := fs.opens.backing(ino); id != 0 {
		return id
	}
	srv := fs.server.Load()
	if srv == nil {
		return 0
	}
	id, errno := srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(f.Fd())})
	if errno != 0 {
		fs.m.log.WithError(errno).WithField("inode", ino).Warn("register passthrough file: passthrough off for this mount")
		fs.m.passthrough.Store(false)
		return 0
	}
	fs.opens.setBacking(ino, id)
	return id
}

func (fs *layerFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	defer fs.enter(&in.InHeader).done()
	fs.m.stats.Reads.Add(1)
	ino := in.Fh >> 2
	if in.Fh&3 == fhEmpty {
		return fuse.ReadResultData(nil), fuse.OK
	}
	f, err := fs.readable(ino)
	if err == nil {
		if pr, ok := f.(PieceReader); ok {
			// The kernel interrupts a request when the reader gets any
			// signal and still waits for the answer: the fetch goes on.
			n, rerr := pr.ReadAt(context.Background(), buf, int64(in.Offset))
			if rerr == nil {
				return fuse.ReadResultData(buf[:n]), fuse.OK
			}
			err = rerr
		} else {
			return fuse.ReadResultFd(f.Fd(), int64(in.Offset), len(buf)), fuse.OK
		}
	}
	fs.m.stats.ReadErrors.Add(1)
	if met := fs.m.opts.Metrics; met != nil {
		met.ReadErrors.Add(1)
	}
	fs.m.log.WithError(err).WithField("inode", ino).Error("cannot serve file content: read fails with EIO")
	return nil, fuse.EIO
}

// readable returns the content a read of ino's handle reads: the one its
// open made, or, for a handle an earlier process gave out, opened now.
func (fs *layerFS) readable(ino uint64) (File, error) {
	fs.filesMu.Lock()
	f := fs.files[ino]
	fs.filesMu.Unlock()
	if f != nil {
		return f, nil
	}
	unlock := fs.opens.lock(ino)
	defer unlock()
	n, st := fs.node(ino)
	if !st.Ok() {
		return nil, fmt.Errorf("inode %d: %v", ino, st)
	}
	return fs.content(context.Background(), n)
}

func (fs *layerFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	defer fs.enter(&in.InHeader).done()
	ino, mode := in.Fh>>2, in.Fh&3
	if mode == fhEmpty {
		return
	}
	unlock := fs.opens.lock(ino)
	defer unlock()
	if !fs.opens.has(ino) {
		return
	}
	if left := fs.opens.add(ino, mode == fhPassthrough, -1); mode == fhPassthrough && left == 0 {
		if id := fs.opens.backing(ino); id != 0 {
			fs.opens.setBacking(ino, 0)
			if srv := fs.server.Load(); srv != nil {
				if errno := srv.UnregisterBackingFd(id); errno != 0 {
					fs.m.log.WithError(errno).WithField("inode", ino).Warn("unregister passthrough file")
				}
			}
		}
	}
	if fs.opens.passthrough(ino) == 0 && fs.opens.cached(ino) == 0 {
		fs.filesMu.Lock()
		f := fs.files[ino]
		delete(fs.files, ino)
		fs.filesMu.Unlock()
		if f != nil {
			f.Close()
		}
	}
}

// closeFiles closes every open content (the mount is gone).
func (fs *layerFS) closeFiles() {
	fs.filesMu.Lock()
	defer fs.filesMu.Unlock()
	for ino, f := range fs.files {
		f.Close()
		delete(fs.files, ino)
	}
}
