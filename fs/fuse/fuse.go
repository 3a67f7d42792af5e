// Package fuse serves one lazily pulled layer as a read-only FUSE
// filesystem that overlayfs can stack as a lower layer.
//
// Everything but file content is answered from metadata/ without the
// network. Content comes from a Files provider (the shared store), which
// fetches and verifies a file before the first byte of it is served.
// Whiteouts are 0:0 character devices and opaque directories carry exactly
// one opaque xattr, the one the overlay mount reads (trusted.* or, with
// userxattr, user.*).
package fuse

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/lazycas/lazycas/metadata"
)

// Opaque xattrs overlayfs reads from a lower layer.
const (
	OpaqueXattrTrusted = "trusted.overlay.opaque"
	OpaqueXattrUser    = "user.overlay.opaque"
)

// Files provides the content of regular files.
type Files interface {
	// Open returns a file holding n's complete, verified content.
	Open(ctx context.Context, n *metadata.Node) (File, error)
}

// File is an open file with n's content: a store object, or a large file
// still being filled (which also implements PieceReader).
type File interface {
	Fd() uintptr
	Close() error
}

// PieceReader is a File whose bytes may not all be present yet: each read
// makes the bytes it covers present first. Such files are never passed
// through to the kernel.
type PieceReader interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// Options configure a mount.
type Options struct {
	// FsName is shown as the mount's source in /proc/mounts.
	FsName string
	// OpaqueXattr is the one xattr name an opaque directory answers to.
	OpaqueXattr string
	// NoXattrs says no inode has an xattr (nor is an opaque directory):
	// the first getxattr is answered ENOSYS, after which the kernel answers
	// every getxattr of the mount itself (EOPNOTSUPP, which overlayfs and
	// the capability check on exec take as "none"). overlayfs asks each
	// lower file and directory for several of its xattrs: without this, a
	// walk of a tree costs a round trip to the daemon per entry more.
	// listxattr still answers (an empty list).
	NoXattrs bool
	// Passthrough lets the kernel read opened files directly from the
	// store's object files (FUSE passthrough) where it can.
	Passthrough bool
	// Debug logs every FUSE request.
	Debug bool
}

// Layer is a mounted layer.
type Layer struct {
	dir         string
	dev         uint64 // the mount's device: names its fusectl connection
	server      *fuse.Server
	stats       *Stats
	passthrough bool
}

// Stats counts FUSE operations, for profiling and tests.
type Stats struct {
	Lookups, Getattrs, Readdirs, Opens, Reads, OpenErrors, ReadErrors, Flushes atomic.Int64
}

// cacheTimeout is how long the kernel may cache entries and attributes:
// a layer never changes while mounted.
const cacheTimeout = 24 * time.Hour

// Mount serves layer l on dir.
func Mount(ctx context.Context, dir string, l *metadata.Layer, files Files, opts Options) (*Layer, error) {
	rootMeta, err := l.Node(metadata.RootID)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	if opts.OpaqueXattr == "" {
		opts.OpaqueXattr = OpaqueXattrTrusted
	}
	st := &Stats{}
	m := &mount{layer: l, files: files, opts: opts, stats: st, log: log.G(ctx).WithField("layer", l.Info.Digest)}
	root := &node{m: m, meta: rootMeta}
	timeout := cacheTimeout
	server, err := fs.Mount(dir, root, &fs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:  true,
			FsName:      opts.FsName,
			Name:        "lazycas",
			DirectMount: true,
			// The kernel checks permissions from the modes we report, as
			// for any other read-only filesystem.
			Options:       []string{"ro", "default_permissions"},
			MaxReadAhead:  1 << 20,
			Debug:         opts.Debug,
			MaxStackDepth: 1,
		},
		// Report modes as the layer has them: without this, go-fuse shows
		// a file of mode 0000 (/etc/shadow on RHEL) as 0644.
		NullPermissions: true,
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		RootStableAttr:  &fs.StableAttr{Ino: metadata.RootID},
	})
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	pt := opts.Passthrough && server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH != 0
	m.passthrough.Store(pt)
	var stat unix.Stat_t
	if err := unix.Stat(dir, &stat); err != nil {
		server.Unmount()
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	return &Layer{dir: dir, dev: stat.Dev, server: server, stats: st, passthrough: pt}, nil
}

// Passthrough reports whether the kernel reads this layer's open files
// directly from their backing objects.
func (l *Layer) Passthrough() bool { return l.passthrough }

// Stats returns the mount's operation counters.
func (l *Layer) Stats() *Stats { return l.stats }

// unmountWait bounds how long Unmount waits for the kernel to let go of
// the mount before it aborts the FUSE connection.
const unmountWait = 3 * time.Second

// Unmount unmounts the layer and stops serving it. When the mount is busy
// (an overlay still stacks it, a file on it is open), the kernel keeps the
// connection alive after the unmount and the server would wait for it for
// as long as that lasts: after unmountWait the connection is aborted
// through fusectl, and the remaining users get ENOTCONN, as they would
// from a dead daemon. Unmount never leaves a mount behind or blocks for good.
func (l *Layer) Unmount() error {
	done := make(chan error, 1)
	go func() {
		err := l.server.Unmount()
		if err != nil {
			if derr := syscall.Unmount(l.dir, syscall.MNT_DETACH); derr != nil && !errors.Is(derr, syscall.EINVAL) {
				err = fmt.Errorf("unmount %s: %w (detach: %v)", l.dir, err, derr)
			} else {
				err = nil
			}
		}
		if err == nil {
			l.server.Wait()
		}
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(unmountWait):
	}
	// Detach, in case the unmount itself is what waits, then abort.
	_ = syscall.Unmount(l.dir, syscall.MNT_DETACH)
	if err := abortConnection(l.dev); err != nil {
		return fmt.Errorf("unmount %s: still in use after %s and cannot abort it: %w", l.dir, unmountWait, err)
	}
	select {
	case err := <-done:
		return err
	case <-time.After(unmountWait):
		return fmt.Errorf("unmount %s: the server did not stop after its connection was aborted", l.dir)
	}
}

// abortConnection aborts the FUSE connection of the filesystem with
// device number dev, mounting fusectl if needed.
func abortConnection(dev uint64) error {
	const ctl = "/sys/fs/fuse/connections"
	p := fmt.Sprintf("%s/%d/abort", ctl, unix.Minor(dev))
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		if err := unix.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount fusectl: %w", err)
		}
	}
	return os.WriteFile(p, []byte("1"), 0o200)
}

type mount struct {
	layer       *metadata.Layer
	files       Files
	opts        Options
	stats       *Stats
	log         *log.Entry
	passthrough atomic.Bool // known once the kernel answered INIT
}

type node struct {
	fs.Inode
	m    *mount
	meta *metadata.Node
	// cachedOpens counts this inode's open handles not offered for
	// passthrough (files still being fetched, or passthrough off): while
	// one is open, the kernel fails a passthrough open of the inode with
	// EIO, so none is offered.
	cachedOpens atomic.Int32
}

var (
	_ fs.NodeLookuper    = (*node)(nil)
	_ fs.NodeGetattrer   = (*node)(nil)
	_ fs.NodeReaddirer   = (*node)(nil)
	_ fs.NodeReadlinker  = (*node)(nil)
	_ fs.NodeGetxattrer  = (*node)(nil)
	_ fs.NodeListxattrer = (*node)(nil)
	_ fs.NodeOpener      = (*node)(nil)
	_ fs.NodeStatfser    = (*node)(nil)
	_ fs.NodeFlusher     = (*node)(nil)
)

func typeBits(t metadata.Type) uint32 {
	switch t {
	case metadata.TypeDir:
		return syscall.S_IFDIR
	case metadata.TypeReg:
		return syscall.S_IFREG
	case metadata.TypeSymlink:
		return syscall.S_IFLNK
	case metadata.TypeChar:
		return syscall.S_IFCHR
	case metadata.TypeBlock:
		return syscall.S_IFBLK
	case metadata.TypeFifo:
		return syscall.S_IFIFO
	}
	return 0
}

func fillAttr(n *metadata.Node, a *fuse.Attr) {
	a.Ino = n.ID
	a.Mode = typeBits(n.Type) | n.Mode
	a.Nlink = n.Nlink
	a.Owner = fuse.Owner{Uid: n.UID, Gid: n.GID}
	a.Size = uint64(n.Size)
	a.Blksize = 4096
	a.Blocks = (uint64(n.Size) + 511) / 512
	if n.Type == metadata.TypeChar || n.Type == metadata.TypeBlock {
		a.Rdev = uint32(devNumber(n.DevMajor, n.DevMinor))
	}
	sec, nsec := uint64(n.ModTime/1e9), uint32(n.ModTime%1e9)
	if n.ModTime < 0 {
		sec, nsec = 0, 0
	}
	a.Mtime, a.Mtimensec = sec, nsec
	a.Atime, a.Atimensec = sec, nsec
	a.Ctime, a.Ctimensec = sec, nsec
}

// devNumber encodes a device number the way Linux's new_encode_dev does.
func devNumber(major, minor uint32) uint64 {
	return uint64(minor&0xff) | uint64(major&0xfff)<<8 | uint64(minor&^0xff)<<12
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.m.stats.Lookups.Add(1)
	child, err := n.m.layer.Lookup(n.meta.ID, name)
	if errors.Is(err, metadata.ErrNotFound) {
		return nil, syscall.ENOENT
	}
	if err != nil {
		n.m.log.WithError(err).WithField("name", name).Error("lookup")
		return nil, syscall.EIO
	}
	fillAttr(child, &out.Attr)
	return n.NewInode(ctx, &node{m: n.m, meta: child}, fs.StableAttr{Mode: typeBits(child.Type), Ino: child.ID}), 0
}

func (n *node) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.m.stats.Getattrs.Add(1)
	fillAttr(n.meta, &out.Attr)
	return 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	n.m.stats.Readdirs.Add(1)
	ents, err := n.m.layer.ReadDir(n.meta.ID)
	if err != nil {
		n.m.log.WithError(err).WithField("inode", n.meta.ID).Error("readdir")
		return nil, syscall.EIO
	}
	// "." and ".." come first, as from any disk filesystem: programs that
	// count a directory's entries expect them (the root's ".." is itself).
	parent := n.meta.ID
	if _, p := n.Parent(); p != nil {
		parent = p.StableAttr().Ino
	}
	list := make([]fuse.DirEntry, 0, len(ents)+2)
	list = append(list,
		fuse.DirEntry{Name: ".", Ino: n.meta.ID, Mode: syscall.S_IFDIR},
		fuse.DirEntry{Name: "..", Ino: parent, Mode: syscall.S_IFDIR})
	for _, e := range ents {
		list = append(list, fuse.DirEntry{Name: e.Name, Ino: e.ID, Mode: typeBits(e.Type)})
	}
	return fs.NewListDirStream(list), 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if n.meta.Type != metadata.TypeSymlink {
		return nil, syscall.EINVAL
	}
	return []byte(n.meta.Link), 0
}

func (n *node) xattr(name string) ([]byte, bool) {
	if name == n.m.opts.OpaqueXattr {
		return []byte("y"), n.meta.Opaque
	}
	v, ok := n.meta.Xattrs[name]
	return v, ok
}

// Flush answers ENOSYS: a read-only layer has nothing to write back when
// a file is closed, and after that answer the kernel sends no FLUSH to the
// mount again (without it, every close() cost a round trip to us).
func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	n.m.stats.Flushes.Add(1)
	return syscall.ENOSYS
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if n.m.opts.NoXattrs {
		return 0, syscall.ENOSYS
	}
	v, ok := n.xattr(attr)
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	names := make([]string, 0, len(n.meta.Xattrs)+1)
	for k := range n.meta.Xattrs {
		names = append(names, k)
	}
	if n.meta.Opaque {
		names = append(names, n.m.opts.OpaqueXattr)
	}
	sort.Strings(names)
	var buf []byte
	for _, k := range names {
		buf = append(append(buf, k...), 0)
	}
	if len(dest) < len(buf) {
		return uint32(len(buf)), syscall.ERANGE
	}
	return uint32(copy(dest, buf)), 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = 4096
	out.Frsize = 4096
	out.NameLen = 255
	out.Files = uint64(n.m.layer.Info.Nodes)
	return 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.meta.Type != metadata.TypeReg {
		return nil, 0, syscall.EINVAL
	}
	n.m.stats.Opens.Add(1)
	if n.meta.Size == 0 {
		return emptyFile{}, fuse.FOPEN_KEEP_CACHE, 0
	}
	f, err := n.m.files.Open(ctx, n.meta)
	if err != nil {
		n.m.stats.OpenErrors.Add(1)
		n.m.log.WithError(err).WithField("inode", n.meta.ID).WithField("digest", n.meta.Digest).
			Error("cannot serve file content: reads fail with EIO")
		return nil, 0, syscall.EIO
	}
	h := &file{
		f: f, stats: n.m.stats,
		log: n.m.log.WithFields(log.Fields{"inode": n.meta.ID, "digest": n.meta.Digest}),
	}
	_, partial := f.(PieceReader)
	h.passthrough = n.m.passthrough.Load() && !partial && n.cachedOpens.Load() == 0
	if !h.passthrough {
		h.cached = &n.cachedOpens
		h.cached.Add(1)
	}
	return h, fuse.FOPEN_KEEP_CACHE, 0
}

// file serves a regular file from its verified object.
type file struct {
	f           File
	passthrough bool          // offered for passthrough
	cached      *atomic.Int32 // its node's cachedOpens when not offered
	stats       *Stats
	log         *log.Entry
}

var (
	_ fs.FileReader          = (*file)(nil)
	_ fs.FileReleaser        = (*file)(nil)
	_ fs.FilePassthroughFder = (*file)(nil)
)

func (f *file) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f.stats.Reads.Add(1)
	if pr, ok := f.f.(PieceReader); ok {
		n, err := pr.ReadAt(ctx, dest, off)
		if err != nil {
			f.stats.ReadErrors.Add(1)
			f.log.WithError(err).Error("cannot serve file content: read fails with EIO")
			return nil, syscall.EIO
		}
		return fuse.ReadResultData(dest[:n]), 0
	}
	return fuse.ReadResultFd(f.f.Fd(), off, len(dest)), 0
}

func (f *file) PassthroughFd() (int, bool) {
	if !f.passthrough {
		return 0, false
	}
	return int(f.f.Fd()), true
}

func (f *file) Release(ctx context.Context) syscall.Errno {
	if f.cached != nil {
		f.cached.Add(-1)
	}
	f.f.Close()
	return 0
}

type emptyFile struct{}

func (emptyFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return fuse.ReadResultData(nil), 0
}
