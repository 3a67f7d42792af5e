// Package fuse serves one lazily pulled layer as a read-only FUSE
// filesystem that overlayfs can stack as a lower layer, and keeps serving
// it across daemon restarts, upgrades and crashes.
//
// Everything but file content is answered from metadata/ without the
// network. Content comes from a Files provider (the shared store), which
// fetches and verifies a file before the first byte of it is served.
// Whiteouts are 0:0 character devices and opaque directories carry exactly
// one opaque xattr, the one the overlay mount reads (trusted.* or, with
// userxattr, user.*).
//
// # Surviving the daemon
//
// A mount lives as long as its FUSE connection, and the connection as long
// as some process has its /dev/fuse fd open. Each mount's fd goes to a
// Keeper (a holder process, see fs/fuse/holder) along with a record of the
// connection (the kernel's INIT request and the answer it accepted) and a
// shared table of what the kernel holds open (opens.go). Requests carry
// nothing only one process knows: node ids are the layer's inode numbers,
// a file handle is its inode and open mode. A later process takes the fd
// back, lets a new go-fuse server answer the recorded INIT (conn.go), asks
// the kernel to send again the requests the last process read but never
// answered, and serves on.
//
// The states of a mount:
//
//	mounting  — Mount: connection opened, mount(2), INIT read and answered
//	            through go-fuse, fds handed to the Keeper.
//	serving   — this process answers every request.
//	detached  — Detach (the daemon stops): requests already being answered
//	            finish, later ones are left unanswered; the Keeper holds the
//	            connection and the kernel queues requests (readers wait).
//	held      — no process serves: after a Detach or a crash. A crashed
//	            process's unanswered requests wait on the connection too.
//	resumed   — Resume: a new process takes the fds, answers the recorded
//	            INIT, asks for the unanswered requests again (Linux 6.9's
//	            FUSE_NOTIFY_RESEND) and is serving.
//	unmounted — Unmount (the snapshot is removed): umount, the Keeper lets
//	            go, the connection ends.
//	abandoned — no process resumed it in the Keeper's time: the Keeper lets
//	            go, the kernel aborts the connection and readers get
//	            ENOTCONN instead of waiting for good.
package fuse

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/lazycas/lazycas/fs/fuse/holder"
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

// Keeper holds mounts' connections while no process serves them.
type Keeper interface {
	// Put keeps copies of fds and record under key, replacing any.
	Put(key string, record []byte, fds ...int) error
	// Delete lets go of key.
	Delete(key string) error
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
	// Keeper, if set, holds the mount's connection between processes.
	Keeper Keeper
	// Metrics, if set, counts the mount's requests with those of others.
	Metrics *OpMetrics
	// Debug logs every FUSE request.
	Debug bool
}

// Layer is a mounted layer.
type Layer struct {
	dir         string
	dev         uint64 // the mount's device: names its fusectl connection
	fd          int    // this process's copy of the connection
	server      *fuse.Server
	served      chan struct{} // closed when the server stops
	fs          *layerFS
	opens       *openTable
	stats       *Stats
	keeper      Keeper
	passthrough bool
}

// Stats counts FUSE operations, for profiling and tests.
type Stats struct {
	Lookups, Getattrs, Readdirs, Opens, Reads, OpenErrors, ReadErrors, Flushes atomic.Int64
}

// cacheTimeout is how long the kernel may cache entries and attributes:
// a layer never changes while mounted.
const cacheTimeout = 24 * time.Hour

// recordVersion is the version of the record a Keeper holds per mount.
const recordVersion = 1

// record is what a later process needs to serve a held connection; fds
// travel beside it: the connection, then the open table.
type record struct {
	Version int    `json:"version"`
	Dir     string `json:"dir"`
	Dev     uint64 `json:"dev"`
	Layer   string `json:"layer"`
	Init    []byte `json:"init"`   // the kernel's INIT request
	Answer  []byte `json:"answer"` // the INIT answer the kernel accepted
}

func mountOptions(opts Options) fuse.MountOptions {
	return fuse.MountOptions{
		AllowOther:    true,
		FsName:        opts.FsName,
		Name:          "lazycas",
		MaxReadAhead:  1 << 20,
		MaxWrite:      maxWrite,
		Debug:         opts.Debug,
		MaxStackDepth: 1,
	}
}

type mount struct {
	layer       *metadata.Layer
	files       Files
	opts        Options
	stats       *Stats
	log         *log.Entry
	passthrough atomic.Bool // known once INIT is answered
}

func newMount(ctx context.Context, l *metadata.Layer, files Files, opts Options) *mount {
	if opts.OpaqueXattr == "" {
		opts.OpaqueXattr = OpaqueXattrTrusted
	}
	return &mount{layer: l, files: files, opts: opts, stats: &Stats{}, log: log.G(ctx).WithField("layer", l.Info.Digest)}
}

// Mount serves layer l on dir.
func Mount(ctx context.Context, dir string, l *metadata.Layer, files Files, opts Options) (_ *Layer, retErr error) {
	if _, err := l.Node(metadata.RootID); err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	opens, err := newOpenTable(uint64(l.Info.Nodes) + metadata.RootID)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	fd, err := mountConn(dir, opts)
	if err != nil {
		opens.close()
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	defer func() {
		if retErr != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
			unix.Close(fd)
			opens.close()
		}
	}()
	init, err := readInit(fd)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	m := newMount(ctx, l, files, opts)
	raw := newLayerFS(m, opens)
	srv, answer, err := serveConn(raw, fd, init, mountOptions(opts))
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	if err := writeAll(fd, answer); err != nil {
		return nil, fmt.Errorf("mount %s: answer INIT: %w", dir, err)
	}
	rec := record{Version: recordVersion, Dir: dir, Layer: l.Info.Digest, Init: init, Answer: answer}
	fl, err := start(ctx, srv, raw, fd, rec, opens)
	if err != nil {
		return nil, err
	}
	disablePoll(dir)
	return fl, nil
}

// disablePoll makes the kernel stop sending POLL to the mount, for good
// (a connection's setting: resumed mounts keep it). Go registers every
// file it opens with epoll, and the kernel asks a FUSE server about each;
// the runtime does that without leaving its scheduler, so a FUSE file
// opened by a process serving it can stall that process's garbage
// collector for good. go-fuse answers POLL on its own with ENOSYS for a
// name it reserves, here asked with a real system call.
func disablePoll(dir string) {
	fd, err := unix.Open(dir+"/.go-fuse-epoll-hack", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
	unix.Close(fd)
}

// start serves a connection whose INIT is answered and hands it to the
// Keeper.
func start(ctx context.Context, srv *fuse.Server, raw *layerFS, fd int, rec record, opens *openTable) (*Layer, error) {
	m := raw.m
	pt := m.opts.Passthrough && initFlags(rec.Answer)&fuse.CAP_PASSTHROUGH != 0
	m.passthrough.Store(pt)
	fl := &Layer{dir: rec.Dir, fd: fd, server: srv, served: make(chan struct{}), fs: raw, opens: opens,
		stats: m.stats, keeper: m.opts.Keeper, passthrough: pt}
	go func() {
		defer close(fl.served)
		srv.Serve()
	}()
	var st unix.Stat_t
	if err := unix.Stat(rec.Dir, &st); err != nil {
		_ = fl.Unmount()
		return nil, fmt.Errorf("mount %s: %w", rec.Dir, err)
	}
	fl.dev = st.Dev
	rec.Dev = st.Dev
	if fl.keeper != nil {
		b, err := json.Marshal(rec)
		if err == nil {
			err = fl.keeper.Put(rec.Dir, b, fd, opens.fd)
		}
		if err != nil {
			// The mount works; it just dies with this process.
			m.log.WithError(err).Warn("the fuse holder does not keep this mount: it will not survive a restart of the daemon")
		}
	}
	return fl, nil
}

// Held is a connection a Keeper kept: what Resume takes.
type Held struct {
	Record []byte
	// Fds are the connection and the open table; Resume owns them.
	Fds []int
}

// HeldDir returns the mountpoint a held record names.
func HeldDir(b []byte) (string, error) {
	var rec record
	if err := json.Unmarshal(b, &rec); err != nil {
		return "", fmt.Errorf("held mount record: %w", err)
	}
	return rec.Dir, nil
}

// ErrGone is returned by Resume for a held connection whose mount is gone.
var ErrGone = errors.New("the held mount is gone")

// Resume serves again, on dir, the connection of layer l that h holds.
// The kernel's requests waiting on it are answered; requests a dead
// process read and never answered are sent again.
func Resume(ctx context.Context, dir string, l *metadata.Layer, files Files, opts Options, h Held) (_ *Layer, retErr error) {
	var rec record
	fail := func(err error) (*Layer, error) {
		for _, fd := range h.Fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("resume %s: %w", dir, err)
	}
	if err := json.Unmarshal(h.Record, &rec); err != nil {
		return fail(err)
	}
	if rec.Version != recordVersion {
		return fail(fmt.Errorf("held record version %d, this daemon reads %d", rec.Version, recordVersion))
	}
	if len(h.Fds) != 2 {
		return fail(fmt.Errorf("held with %d fds, want 2", len(h.Fds)))
	}
	if rec.Dir != dir || rec.Layer != l.Info.Digest {
		return fail(fmt.Errorf("held record is of %s on %s", rec.Layer, rec.Dir))
	}
	fd := h.Fds[0]
	// Not a stat of dir: until this process serves it, a request to the
	// mount waits for good.
	if dev, ok := mountedDev(dir); holder.Dead(fd) || !ok || dev != rec.Dev {
		return fail(ErrGone)
	}
	opens, err := mapOpenTable(h.Fds[1])
	if err != nil {
		return fail(err)
	}
	m := newMount(ctx, l, files, opts)
	raw := newLayerFS(m, opens)
	srv, answer, err := serveConn(raw, fd, rec.Init, mountOptions(opts))
	if err != nil {
		unix.Close(fd)
		opens.close()
		return nil, fmt.Errorf("resume %s: %w", dir, err)
	}
	if now, then := initFlags(answer), initFlags(rec.Answer); now != then {
		// The kernel keeps what it agreed to with the first process.
		m.log.WithFields(log.Fields{"kernel": fmt.Sprintf("%#x", then), "server": fmt.Sprintf("%#x", now)}).
			Warn("this daemon would have agreed to other FUSE capabilities: the connection keeps the first ones")
	}
	if err := notifyResend(fd); err != nil {
		m.log.WithError(err).Warn("cannot ask the kernel to resend unanswered requests (it takes Linux 6.9): their readers wait until the mount goes")
	}
	return start(ctx, srv, raw, fd, rec, opens)
}

// mountedDev returns the device of the lazycas FUSE mount on top of dir,
// from the mount table: asking the mount itself would wait for a server.
func mountedDev(dir string) (uint64, bool) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0, false
	}
	var dev uint64
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		// id parent major:minor root mountpoint options... - fstype source super
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		if sep < 5 || sep+1 >= len(f) || unescapeMountPath(f[4]) != dir {
			continue
		}
		var major, minor uint32
		if _, err := fmt.Sscanf(f[2], "%d:%d", &major, &minor); err != nil {
			continue
		}
		// The last entry for dir is the one on top.
		dev, found = unix.Mkdev(major, minor), f[sep+1] == "fuse.lazycas"
	}
	return dev, found
}

// unescapeMountPath undoes the octal escapes of the mount table (\040 for
// a space, and so on).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Passthrough reports whether the kernel reads this layer's open files
// directly from their backing objects.
func (l *Layer) Passthrough() bool { return l.passthrough }

// Stats returns the mount's operation counters.
func (l *Layer) Stats() *Stats { return l.stats }

// Detach stops answering requests, for a process about to exit that leaves
// the mount to its Keeper: requests being answered finish (for at most
// wait), later ones are left for the next process. The mount stays.
func (l *Layer) Detach(wait time.Duration) {
	l.fs.detached.Store(true)
	done := make(chan struct{})
	go func() {
		l.fs.gate.Lock()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(wait):
		// Those still running never answer either (see layerFS.enter).
	}
}

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
	defer l.release()
	if err := unix.Unmount(l.dir, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		if derr := unix.Unmount(l.dir, unix.MNT_DETACH); derr != nil && !errors.Is(derr, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w (detach: %v)", l.dir, err, derr)
		}
	}
	select {
	case <-l.served:
		return nil
	case <-time.After(unmountWait):
	}
	if err := abortConnection(l.dev); err != nil {
		return fmt.Errorf("unmount %s: still in use after %s and cannot abort it: %w", l.dir, unmountWait, err)
	}
	select {
	case <-l.served:
		return nil
	case <-time.After(unmountWait):
		return fmt.Errorf("unmount %s: the server did not stop after its connection was aborted", l.dir)
	}
}

// release lets go of everything the mount held in this process and in
// the Keeper.
func (l *Layer) release() {
	if l.keeper != nil {
		if err := l.keeper.Delete(l.dir); err != nil {
			l.fs.m.log.WithError(err).Warn("the fuse holder keeps an unmounted mount's connection (it drops it once it sees it gone)")
		}
	}
	l.fs.closeFiles()
	unix.Close(l.fd)
	l.opens.close()
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
