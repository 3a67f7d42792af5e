// Package snapshot is lazycas's containerd Snapshotter: overlayfs semantics on
// containerd's bbolt metastore.
//
// Layout under the root (the snapshotter alone owns it):
//
//	metadata.db          containerd's snapshot metastore (bbolt)
//	snapshots/<id>/fs    a snapshot's contents (an active snapshot's upperdir)
//	snapshots/<id>/work  overlayfs workdir of an active snapshot
//	snapshots/new-*      a snapshot being created (staged, renamed to <id> in
//	                     the creating transaction; a leftover is swept by Cleanup)
//
// Contract: every change of snapshot state happens inside one metastore write
// transaction, and a directory becomes <id> only inside the transaction that
// records <id>. Directories are deleted only after the transaction that
// forgot them committed, so a crash leaves at worst an orphan directory,
// which Cleanup removes; never a snapshot without its directory.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// metastoreLockTimeout bounds the wait for another process's lock on metadata.db.
const metastoreLockTimeout = 3 * time.Second

// Snapshotter implements snapshots.Snapshotter with overlayfs.
type Snapshotter struct {
	root        string
	ms          *storage.MetaStore
	asyncRemove bool
	// mountOptions are added to every overlay mount: host probes
	// (index=off, userxattr) and configured options.
	mountOptions []string
	// fs mounts remote layers; nil makes this a plain overlay snapshotter.
	fs FileSystem
	// unpacked says why layers pulled into this snapshotter were unpacked
	// rather than mounted lazily.
	unpacked *unpackedLog
}

// FileSystem mounts lazily pulled layers on snapshot directories. The key
// of a layer is the ID of the snapshot it is mounted for.
type FileSystem interface {
	// Lazy returns nil when Prepare's labels describe a layer it can
	// mount, else why not (a *NotLazyError, ideally).
	Lazy(labels map[string]string) error
	// Mount mounts the layer the labels describe on mountpoint.
	Mount(ctx context.Context, key, mountpoint string, labels map[string]string) error
	// Restore mounts again, after a restart, a layer mounted before.
	Restore(ctx context.Context, key, mountpoint string) error
	// Unmount unmounts the layer and forgets it.
	Unmount(ctx context.Context, key, mountpoint string) error
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

type options struct {
	asyncRemove  bool
	mountOptions []string
	fs           FileSystem
}

// WithFileSystem makes Prepare mount lazy layers with fs instead of having
// containerd unpack them.
func WithFileSystem(fs FileSystem) Opt {
	return func(o *options) error {
		o.fs = fs
		return nil
	}
}

// Opt configures New.
type Opt func(*options) error

// WithAsyncRemove defers deleting removed snapshots' directories to Cleanup.
func WithAsyncRemove(o *options) error {
	o.asyncRemove = true
	return nil
}

// WithMountOptions adds options to every overlay mount.
func WithMountOptions(opts ...string) Opt {
	return func(o *options) error {
		o.mountOptions = append(o.mountOptions, opts...)
		return nil
	}
}

// New opens (or creates) a snapshotter rooted at root. It probes the host once:
// root must be a filesystem overlayfs can use as upper and lower layers.
func New(ctx context.Context, root string, opts ...Opt) (*Snapshotter, error) {
	var o options
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create root: %w", err)
	}
	probe, err := probeHost(root)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(root, "snapshots"), 0o700); err != nil {
		return nil, fmt.Errorf("create snapshots dir: %w", err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"), func(o *bolt.Options) error {
		// bbolt waits forever for its file lock by default.
		o.Timeout = metastoreLockTimeout
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open metastore: %w", err)
	}
	// The metastore opens its file on first use: open it now, so a locked or
	// corrupt metadata.db fails start-up rather than the first request.
	if err := ms.WithTransaction(ctx, false, func(context.Context) error { return nil }); err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open metastore: %s is locked by another process (another daemon on this root?): %w", filepath.Join(root, "metadata.db"), err)
		}
		return nil, fmt.Errorf("open metastore: %w", err)
	}
	s := &Snapshotter{
		root:         root,
		ms:           ms,
		asyncRemove:  o.asyncRemove,
		mountOptions: append(probe.mountOptions(), o.mountOptions...),
		fs:           o.fs,
		unpacked:     newUnpackedLog(),
	}
	if s.fs != nil {
		s.restoreRemote(ctx)
	}
	log.G(ctx).WithFields(log.Fields{
		"root":          root,
		"userxattr":     probe.userxattr,
		"index_off":     probe.indexOff,
		"async_remove":  o.asyncRemove,
		"mount_options": s.mountOptions,
	}).Info("overlay snapshotter ready")
	return s, nil
}

// Stat returns the info of the snapshot key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Info{}, fmt.Errorf("stat %q: %w", key, err)
	}
	return info, nil
}

// Update changes the mutable fields (labels) of a snapshot's info.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		info, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	if err != nil {
		return snapshots.Info{}, fmt.Errorf("update %q: %w", info.Name, err)
	}
	return info, nil
}

// Usage returns the disk usage of a snapshot: recorded at commit for a
// committed one, measured now for an active one.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage %q: %w", key, err)
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage %q: measure %s: %w", key, s.upperPath(id), err)
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Mounts returns the mounts of an active or view snapshot.
func (s *Snapshotter) Mounts(ctx context.Context, key string) (_ []mount.Mount, err error) {
	var snap storage.Snapshot
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("mounts %q: %w", key, err)
	}
	return s.mounts(snap), nil
}

// Prepare creates an active (writable) snapshot on top of parent. When the
// labels describe a lazy layer, it mounts that layer instead, commits it as
// the snapshot containerd would have committed after unpacking, and says so
// with ErrAlreadyExists; if mounting fails, containerd unpacks as usual.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var info snapshots.Info
	for _, o := range opts {
		if err := o(&info); err != nil {
			return nil, err
		}
	}
	target := info.Labels[LabelSnapshotRef]
	if target == "" {
		// Not a layer being pulled: a container's or a build's snapshot.
		return s.create(ctx, snapshots.KindActive, key, parent, opts)
	}
	if s.fs == nil {
		s.unpacked.add(ctx, target, info.Labels, NotLazy(ReasonLazyOff,
			"lazy layers are off (fs.lazy = false): set fs.lazy = true in the daemon's config to mount eStargz and zstd:chunked layers lazily"))
		return s.create(ctx, snapshots.KindActive, key, parent, opts)
	}
	if err := s.fs.Lazy(info.Labels); err != nil {
		s.unpacked.add(ctx, target, info.Labels, err)
		return s.create(ctx, snapshots.KindActive, key, parent, opts)
	}
	if _, err := s.Stat(ctx, target); err == nil {
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	}
	mounts, err := s.create(ctx, snapshots.KindActive, key, parent, opts)
	if err != nil {
		return nil, err
	}
	if err := s.prepareRemote(withKeyNamespace(ctx, key), key, target, info.Labels); err != nil {
		if errdefs.IsAlreadyExists(err) {
			return nil, err
		}
		// A *NotLazyError from the filesystem keeps its reason; any
		// other failure counts as mount-failed.
		s.unpacked.add(ctx, target, info.Labels, err)
		return mounts, nil
	}
	return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// withKeyNamespace returns ctx in the containerd namespace a key belongs
// to, unless ctx has one. containerd does not send the namespace to proxy
// snapshotters, but its metadata layer names every key
// "<namespace>/<counter>/<client's key>".
func withKeyNamespace(ctx context.Context, key string) context.Context {
	if _, ok := namespaces.Namespace(ctx); ok {
		return ctx
	}
	ns, _, ok := strings.Cut(key, "/")
	if !ok || identifiers.Validate(ns) != nil {
		return ctx
	}
	return namespaces.WithNamespace(ctx, ns)
}

// prepareRemote mounts the lazy layer on the active snapshot key and
// commits it as target. On error the snapshot is as create left it, or
// gone when target appeared meanwhile.
func (s *Snapshotter) prepareRemote(ctx context.Context, key, target string, labels map[string]string) error {
	var id string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return err
	}
	mountpoint := s.upperPath(id)
	if err := s.fs.Mount(ctx, id, mountpoint, labels); err != nil {
		return err
	}
	committed := make(map[string]string, len(labels)+1)
	for k, v := range labels {
		committed[k] = v
	}
	committed[LabelRemote] = "true"
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		// The files live in the registry and the store, not in this
		// snapshot's directory: it uses no disk of its own.
		_, err := storage.CommitActive(ctx, key, target, snapshots.Usage{}, snapshots.WithLabels(committed))
		return err
	})
	if err == nil {
		return nil
	}
	if uerr := s.fs.Unmount(ctx, id, mountpoint); uerr != nil {
		log.G(ctx).WithError(uerr).WithField("key", key).Warn("unmount layer after failed commit")
	}
	if errdefs.IsAlreadyExists(err) {
		// Another pull committed the same layer first.
		if rerr := s.Remove(ctx, key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove duplicate snapshot")
		}
		return fmt.Errorf("target snapshot %q: %w", target, err)
	}
	return fmt.Errorf("commit lazy layer as %q: %w", target, err)
}

// restoreRemote mounts the remote snapshots again after a restart, before
// the daemon serves requests.
func (s *Snapshotter) restoreRemote(ctx context.Context) {
	var remotes []string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted && info.Labels[LabelRemote] != "" {
				remotes = append(remotes, info.Name)
			}
			return nil
		})
	})
	if err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).Error("list remote snapshots to restore")
		return
	}
	for _, name := range remotes {
		var id string
		if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
			id, _, _, err = storage.GetInfo(ctx, name)
			return err
		}); err != nil {
			log.G(ctx).WithError(err).WithField("snapshot", name).Error("restore remote snapshot")
			continue
		}
		if err := s.fs.Restore(ctx, id, s.upperPath(id)); err != nil {
			log.G(ctx).WithError(err).WithFields(log.Fields{"snapshot": name, "id": id}).
				Error("cannot restore remote snapshot: it stays listed, its files are not readable")
			continue
		}
		log.G(ctx).WithFields(log.Fields{"snapshot": name, "id": id}).Debug("remote snapshot restored")
	}
	if len(remotes) > 0 {
		log.G(ctx).WithField("count", len(remotes)).Info("remote snapshots restored")
	}
	// Layers recorded for snapshots that no longer exist (a crash between
	// mounting and committing, or during Remove) are forgotten.
	if p, ok := s.fs.(Pruner); ok {
		keep := map[string]bool{}
		_ = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			ids, err := storage.IDMap(ctx)
			for id := range ids {
				keep[id] = true
			}
			return err
		})
		if err := p.Prune(ctx, keep); err != nil {
			log.G(ctx).WithError(err).Warn("forget layers of vanished snapshots")
		}
	}
}

// Pruner is a FileSystem that can forget the layers of snapshots that no
// longer exist.
type Pruner interface {
	// Prune forgets every layer whose key is not in keep.
	Prune(ctx context.Context, keep map[string]bool) error
}

// View creates a read-only snapshot of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

// Commit turns the active snapshot key into the committed snapshot name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return fmt.Errorf("measure %s: %w", s.upperPath(id), err)
		}
		_, err = storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...)
		return err
	})
	if err != nil {
		return fmt.Errorf("commit %q as %q: %w", key, name, err)
	}
	return nil
}

// Remove forgets a snapshot and, unless removal is asynchronous, deletes its
// directory once the metastore no longer knows it.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var (
		id     string
		remote bool
	)
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		remote = info.Labels[LabelRemote] != ""
		id, _, err = storage.Remove(ctx, key)
		return err
	})
	if err != nil {
		return fmt.Errorf("remove %q: %w", key, err)
	}
	if remote && s.fs != nil {
		// Never delete through a mount; and the layer's metadata and store
		// references go with its snapshot.
		if err := s.fs.Unmount(ctx, id, s.upperPath(id)); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).Warn("unmount remote layer; its directory stays for Cleanup")
			return nil
		}
	}
	if !s.asyncRemove {
		dir := filepath.Join(s.root, "snapshots", id)
		if err := os.RemoveAll(dir); err != nil {
			// The snapshot is gone from the metastore; Cleanup retries the directory.
			log.G(ctx).WithError(err).WithField("path", dir).Warn("remove snapshot directory")
		}
	}
	return nil
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	called := false
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			called = true
			return fn(ctx, info)
		}, filters...)
	})
	// A metastore that never held a snapshot has no buckets yet, and the
	// storage package reports that as not found; to a caller it is an empty list.
	if err != nil && !called && errdefs.IsNotFound(err) {
		return nil
	}
	return err
}

// Cleanup deletes directories that no snapshot owns: those of asynchronously
// removed snapshots and leftovers of a crash.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var orphans []string
	// A write transaction, so no creation can be between staging and commit
	// while the directory is listed.
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		orphans, err = s.orphanDirs(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	for _, dir := range orphans {
		if err := s.unmountOrphan(ctx, dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("cleanup: orphan directory is still mounted")
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("cleanup: remove orphan directory")
		}
	}
	return nil
}

// Close releases the metastore. Mounts made by containerd stay as they are.
func (s *Snapshotter) Close() error {
	return s.ms.Close()
}

// unmountOrphan unmounts a lazy layer still mounted in an orphan directory
// (a crash between mounting and committing it), so that removing the
// directory never reaches through a mount.
func (s *Snapshotter) unmountOrphan(ctx context.Context, dir string) error {
	mp := filepath.Join(dir, "fs")
	mounted, err := mountinfo.Mounted(mp)
	if err != nil || !mounted {
		return nil
	}
	if s.fs != nil {
		return s.fs.Unmount(ctx, filepath.Base(dir), mp)
	}
	return unix.Unmount(mp, unix.MNT_DETACH)
}

func (s *Snapshotter) orphanDirs(ctx context.Context) ([]string, error) {
	ids, err := storage.IDMap(ctx)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(s.root, "snapshots")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var orphans []string
	for _, e := range entries {
		if _, ok := ids[e.Name()]; !ok {
			orphans = append(orphans, filepath.Join(dir, e.Name()))
		}
	}
	return orphans, nil
}

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	var (
		snap      storage.Snapshot
		published string
	)
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		staged, err := s.stageDir(kind)
		if err != nil {
			return err
		}
		// Until the rename below succeeds the staged directory is ours to delete.
		defer func() {
			if staged != "" {
				if rerr := os.RemoveAll(staged); rerr != nil {
					log.G(ctx).WithError(rerr).WithField("path", staged).Warn("remove staged snapshot directory")
				}
			}
		}()
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		if len(snap.ParentIDs) > 0 {
			// The upper dir's root shadows the parent's root: keep its owner.
			if err := copyOwner(s.upperPath(snap.ParentIDs[0]), filepath.Join(staged, "fs")); err != nil {
				return err
			}
		}
		dir := filepath.Join(s.root, "snapshots", snap.ID)
		if err := os.Rename(staged, dir); err != nil {
			return fmt.Errorf("publish snapshot directory: %w", err)
		}
		staged, published = "", dir
		return nil
	})
	if err != nil {
		// The commit failed after the rename: bbolt will hand out the same id
		// again, so its directory must not outlive this attempt.
		if published != "" {
			if rerr := os.RemoveAll(published); rerr != nil {
				log.G(ctx).WithError(rerr).WithField("path", published).Warn("remove directory of uncommitted snapshot")
			}
		}
		return nil, fmt.Errorf("%s %q on %q: %w", kindVerb(kind), key, parent, err)
	}
	if l := log.G(ctx); l.Logger.IsLevelEnabled(log.DebugLevel) {
		var info snapshots.Info
		for _, o := range opts {
			_ = o(&info)
		}
		l.WithFields(log.Fields{"key": key, "parent": parent, "id": snap.ID, "labels": info.Labels}).Debug(kindVerb(kind))
	}
	return s.mounts(snap), nil
}

func (s *Snapshotter) stageDir(kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
	if err != nil {
		return "", fmt.Errorf("stage snapshot directory: %w", err)
	}
	// MkdirTemp makes 0700; the rootfs root must be 0755 whatever the umask.
	if err := mkdirMode(filepath.Join(td, "fs"), 0o755); err != nil {
		return td, err
	}
	if kind == snapshots.KindActive {
		if err := mkdirMode(filepath.Join(td, "work"), 0o711); err != nil {
			return td, err
		}
	}
	return td, nil
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}

func (s *Snapshotter) workPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "work")
}

func mkdirMode(dir string, mode os.FileMode) error {
	if err := os.Mkdir(dir, mode); err != nil {
		return err
	}
	return os.Chmod(dir, mode)
}

func copyOwner(from, to string) error {
	fi, err := os.Stat(from)
	if err != nil {
		return fmt.Errorf("stat parent: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return errors.New("stat parent: no owner information")
	}
	if err := os.Lchown(to, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("chown upper dir: %w", err)
	}
	return nil
}

func kindVerb(k snapshots.Kind) string {
	if k == snapshots.KindView {
		return "view"
	}
	return "prepare"
}
