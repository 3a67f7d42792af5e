// Package fs mounts lazily pulled layers: for each one it reads and checks
// the TOC from the registry, keeps it in metadata/, serves it over FUSE and
// fills the shared store with its files, on first read and then by
// prefetch.
//
// The snapshotter drives it through three calls: Mount a new layer, Restore
// a layer mounted before a restart (from metadata, without the network), and
// Unmount one whose snapshot is removed.
package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/time/rate"

	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/metadata"
	"github.com/lazycas/lazycas/snapshot"
	"github.com/lazycas/lazycas/store"
)

// Options configure a FileSystem.
type Options struct {
	// OpaqueXattr is the xattr overlayfs reads opaque directories by
	// (trusted.overlay.opaque, or user.overlay.opaque with userxattr).
	OpaqueXattr string
	// Passthrough serves opened files through FUSE passthrough.
	Passthrough bool
	// Prefetch fetches the files before a layer's prefetch landmark right
	// after mounting it; Background then fetches the rest of the layer.
	Prefetch, Background bool
	// FetchConcurrency bounds the files one layer prefetches at once.
	FetchConcurrency int
	// BackgroundDelay is how long after mounting a layer background
	// fetch (not prefetch) waits before it starts.
	BackgroundDelay time.Duration
	// BackgroundBandwidth caps prefetch and background fetch, in bytes per
	// second over all layers; 0 means no cap. Reads are never capped.
	BackgroundBandwidth int64
	// Debug logs FUSE requests.
	Debug bool
	// PartialMinSize is the size from which a file is served piece by
	// piece while it is fetched, instead of after the whole of it; 0
	// turns piecewise reads off.
	PartialMinSize int64
	// Finder locates a layer whose Prepare carried no image labels; nil
	// leaves such layers to be unpacked.
	Finder LayerFinder
	// StartupFetch fetches, when an image's top layer is mounted, the
	// files its entrypoint loads to start (see startup). It needs Images.
	StartupFetch bool
	// Images reads image manifests and configs; nil turns StartupFetch off.
	Images ImageReader
	// Profiles records what containers open and fetches it first on the
	// next mount of a layer holding those files; nil turns learning off.
	Profiles *Profiles
	// Keeper holds the mounts' FUSE connections across daemon processes;
	// nil unmounts every layer when the FileSystem closes.
	Keeper fuse.Keeper
	// Held are connections a Keeper kept from an earlier process, by
	// mountpoint: Restore serves them on.
	Held map[string]fuse.Held
	// HeldSince is when the last process stopped serving Held.
	HeldSince time.Time
	// FUSEMetrics, if set, counts every mount's FUSE requests.
	FUSEMetrics *fuse.OpMetrics
}

// LayerFinder finds the image repository and blob of a lazy layer from
// the labels containerd always passes (the layer's TOC digest annotation).
type LayerFinder interface {
	FindLayer(ctx context.Context, labels map[string]string) (ref string, layer ocispec.Descriptor, manifest digest.Digest, err error)
}

// FileSystem mounts and serves lazy layers.
type FileSystem struct {
	meta    *metadata.DB
	store   *store.Store
	fetcher *remote.Fetcher
	opts    Options

	mu     sync.Mutex
	layers map[string]*mounted

	tailMu sync.Mutex
	tails  map[digest.Digest]*tail // by layer digest, read ahead for mounts to come

	logModeOnce sync.Once
	// foreground counts fetches for readers; background fetch waits for
	// them, so a container's read never queues behind prefetch.
	fgActive atomic.Int64
	fgLast   atomic.Int64 // unix nanoseconds of a reader's last fetch
	// limiter caps background fetch bandwidth; nil means no cap.
	limiter *rate.Limiter

	misses missCost // what a reader's miss costs, for readahead's windows

	specMu sync.Mutex
	spec   map[*window]struct{} // fills in flight holding speculation

	heldMu     sync.Mutex
	held       map[string]fuse.Held // connections not resumed yet, by mountpoint
	resumed    atomic.Int64         // layers served on from an earlier process
	resumeFail atomic.Int64         // held mounts mounted anew instead
	lastResume atomic.Int64         // unix nanoseconds the last one was served on
}

// New returns a FileSystem keeping TOCs in meta and file contents in st.
func New(meta *metadata.DB, st *store.Store, fetcher *remote.Fetcher, opts Options) *FileSystem {
	if opts.FetchConcurrency <= 0 {
		opts.FetchConcurrency = 4
	}
	f := &FileSystem{meta: meta, store: st, fetcher: fetcher, opts: opts, layers: map[string]*mounted{},
		tails: map[digest.Digest]*tail{}, spec: map[*window]struct{}{}, held: opts.Held}
	if f.held == nil {
		f.held = map[string]fuse.Held{}
	}
	if opts.BackgroundBandwidth > 0 {
		// A burst of one group: a group is fetched as one request.
		f.limiter = rate.NewLimiter(rate.Limit(opts.BackgroundBandwidth), limiterBurst)
	}
	return f
}

// mounted is one served layer.
type mounted struct {
	key    string
	fs     *FileSystem
	meta   *metadata.Layer
	format layer.Format
	fuse   *fuse.Layer
	bg     context.Context // background fetches; done when unmounted
	wg     sync.WaitGroup  // background completions of large files, readahead

	lastMiss  atomic.Int64 // blob offset of the last file readahead fetched for
	seq       seqReads     // a reader going through the blob in order
	openedIDs sync.Map     // inodes readers opened, once each
	demandN   atomic.Int64 // files readers opened, and their compressed bytes:
	demandB   atomic.Int64 // dense reads start streaming the layer (stream.go)
	streaming atomic.Bool
	// Readahead's guesses: neighbour files it brought (specIDs: inode ->
	// compressed size, until a reader opens one) and their bytes, and the
	// bytes of those readers then opened; their ratio sizes its windows.
	specIDs   sync.Map
	specBytes atomic.Int64
	specRead  atomic.Int64
	winMu     sync.Mutex
	windows   []*window // recent readahead and group windows, newest last
	spansOnce sync.Once
	fileSpans []fileSpan         // regular files in blob order, for readahead
	cancel    context.CancelFunc // stops prefetch
	done      chan struct{}      // closed when prefetch ended

	blobMu sync.Mutex
	blob   *remote.Blob

	// Prefetch and background fetch progress (prefetch.go): the phase,
	// what the current pass has still to fetch, and what they fetched.
	bgPhase                        atomic.Int32
	bgPendingFiles, bgPendingBytes atomic.Int64
	bgFetchedFiles, bgFetchedBytes atomic.Int64
}

// Lazy returns nil when labels describe a layer f can mount: one whose
// TOC is pinned, and whose image is either named or can be looked for;
// otherwise why not, and what would make it lazy.
func (f *FileSystem) Lazy(labels map[string]string) error {
	if _, pinned := layer.PinFromAnnotations(labels); !pinned {
		return snapshot.NotLazy(snapshot.ReasonNotLazyFormat,
			"the layer has no TOC digest annotation: not an eStargz or zstd:chunked layer (convert the image with `lazycas image convert`)")
	}
	named := labels[snapshot.LabelImageRef] != "" && labels[snapshot.LabelLayerDigest] != ""
	if !named && f.opts.Finder == nil {
		return snapshot.NotLazy(snapshot.ReasonNoImage,
			"the pull sent no image labels and [containerd] address is unset, so the image cannot be looked up (pull with `lazycas image pull`, CRI or nerdctl, or set it)")
	}
	return nil
}

// Mount fetches and checks the TOC of the layer the labels name, records
// it under key and serves it on mountpoint. Its errors are
// *snapshot.NotLazyError, whose reason and detail say why the layer is
// not lazy and what would make it so.
func (f *FileSystem) Mount(ctx context.Context, key, mountpoint string, labels map[string]string) error {
	var w where
	err := f.mount(ctx, key, mountpoint, labels, &w)
	if err == nil {
		return nil
	}
	return notLazy(err, w)
}

// where is which image and layer a mount is of, as far as it got.
type where struct {
	ref   string
	layer digest.Digest
	found bool // learnt from containerd's content store, not from labels
}

// errNotFound is a layer whose image the Finder could not find.
type errNotFound struct{ err error }

func (e errNotFound) Error() string { return e.err.Error() }
func (e errNotFound) Unwrap() error { return e.err }

// notLazy classifies a mount's failure for the snapshotter's metric, log
// and `lazycas image pull`, and says what would make the layer lazy.
func notLazy(err error, w where) error {
	nl := &snapshot.NotLazyError{Reason: snapshot.ReasonMountFailed, Layer: w.layer.String(), Image: w.ref, Err: err}
	if _, ok := errors.AsType[errNotFound](err); ok {
		nl.Reason = snapshot.ReasonNoImage
		nl.Detail = "the pull sent no image labels and its image was not found in containerd (" + err.Error() +
			"): pull with `lazycas image pull`, CRI (disable_snapshot_annotations = false) or nerdctl, which send them"
		return nl
	}
	switch {
	case errors.Is(err, layer.ErrTOCMismatch):
		nl.Reason = snapshot.ReasonTOCMismatch
		nl.Detail = "the layer's TOC is not the one its manifest pins (" + err.Error() +
			"): the blob was changed after conversion, or the registry serves another; convert the image again with `lazycas image convert`"
	case errors.Is(err, layer.ErrNotLazy):
		nl.Reason = snapshot.ReasonNotLazyFormat
		nl.Detail = "the manifest pins a TOC but the blob has none (" + err.Error() +
			"): convert the image again with `lazycas image convert`"
	case remote.Unreachable(err):
		nl.Reason = snapshot.ReasonUnreachable
		nl.Detail = "the registry could not be reached (" + err.Error() + "): check the network, the registry and its hosts.toml"
		if w.found {
			if host := hostOf(w.ref); !strings.Contains(host, ":") {
				// containerd's distribution-source label drops a port.
				nl.Detail += "; this pull sent no image labels, so the registry host " + host +
					" came from containerd's content labels, which drop a port: if the registry listens on one, add a hosts.toml for the bare host " +
					host + " naming it, or pull with `lazycas image pull` or CRI, which send the full reference"
			}
		}
	default:
		nl.Detail = "mounting it lazily failed: " + err.Error() + " (fix what the error names; the layer is lazy at its next pull)"
	}
	return nl
}

// hostOf returns the registry host of ref, "" if it does not parse.
func hostOf(ref string) string {
	spec, err := reference.Parse(ref)
	if err != nil {
		return ""
	}
	return spec.Hostname()
}

func (f *FileSystem) mount(ctx context.Context, key, mountpoint string, labels map[string]string, w *where) error {
	pin, ok := layer.PinFromAnnotations(labels)
	if !ok {
		return errors.New("layer has no TOC digest annotation")
	}
	start := time.Now()
	ref, desc := labels[snapshot.LabelImageRef], ocispec.Descriptor{Digest: digest.Digest(labels[snapshot.LabelLayerDigest])}
	manifest := digest.Digest(labels[snapshot.LabelManifestDigest])
	if ref == "" || desc.Digest == "" {
		if f.opts.Finder == nil {
			return errNotFound{errors.New("labels name no image and layer")}
		}
		var err error
		if ref, desc, manifest, err = f.opts.Finder.FindLayer(ctx, labels); err != nil {
			return errNotFound{fmt.Errorf("labels name no image and layer: %w", err)}
		}
		w.found = true
		log.G(ctx).WithFields(log.Fields{"ref": ref, "layer": desc.Digest}).Debug("found the layer's image in containerd")
	}
	w.ref, w.layer = ref, desc.Digest
	dgst := desc.Digest
	if err := dgst.Validate(); err != nil {
		return fmt.Errorf("layer digest %q: %w", dgst, err)
	}
	f.readAheadTails(ctx, ref, f.layersAbove(ctx, labels, dgst, manifest))
	// The layer's nodes go to metadata as the TOC is decoded (a layer of
	// 200,000 files is never all in memory), unless its tree was built
	// ahead; either way sink keeps what the mount needs of them.
	sink := &layerSink{w: f.meta.NewWriter(key), noXattrs: true}
	blob, toc, tree, sum, ahead, err := f.readTOC(ctx, ref, ocispec.Descriptor{Digest: dgst, Size: desc.Size}, pin, sink)
	if err != nil {
		sink.w.Abort()
		return err
	}
	built := time.Now()
	info := metadata.LayerInfo{
		Ref: ref, Digest: dgst.String(), Size: blob.Size(), TOCDigest: toc.Digest.String(),
		Format: string(toc.Format), Prefetch: sum.Prefetch,
	}
	if ahead {
		sink.w.Abort() // nothing written through it
		for _, n := range tree.Nodes {
			sink.note(n)
		}
		info.NoXattrs = sink.noXattrs
		err = f.meta.Put(key, info, tree.Nodes, tree.Dirents)
	} else {
		info.NoXattrs = sink.noXattrs
		err = sink.w.Commit(info)
	}
	if err != nil {
		return err
	}
	stored := time.Now()
	if err := f.store.AddRefs(key, sink.refs); err != nil {
		f.forget(ctx, key)
		return fmt.Errorf("layer %s: %w", dgst, err)
	}
	m, err := f.serve(ctx, key, mountpoint, blob, sortSpans(sink.spans), nil)
	if err != nil {
		f.forget(ctx, key)
		return err
	}
	m.learnFetch()
	if f.opts.StartupFetch {
		m.fetchRuncFiles()
	}
	if f.opts.StartupFetch && f.opts.Images != nil && manifest.Validate() == nil {
		// Under the layer's fetch context: unmounting it stops this.
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			f.startup(m.bg, manifest, dgst)
		}()
	}
	log.G(ctx).WithFields(log.Fields{
		"key": key, "layer": dgst, "format": toc.Format, "entries": sum.Nodes, "files": sum.Files,
		"prefetch": len(sum.Prefetch), "took": time.Since(start).Round(time.Millisecond),
		"toc":      built.Sub(start).Round(time.Millisecond),
		"metadata": stored.Sub(built).Round(time.Millisecond), "decoded_ahead": ahead,
	}).Info("layer mounted lazily")
	if sum.Nodes >= bigTree {
		// What the import took is garbage once this returns: give it back
		// to the node now rather than over the next minutes, so the
		// daemon's RSS follows what it holds, not the largest TOC it read.
		go debug.FreeOSMemory()
	}
	return nil
}

// layerSink stores a layer's nodes and directory entries in metadata as
// the TOC's builder makes them, and keeps what the mount needs of them:
// the store objects its files refer to, where their bytes lie in the blob,
// whether any inode has xattrs.
type layerSink struct {
	w        *metadata.Writer
	refs     []store.Ref
	spans    []fileSpan
	noXattrs bool
}

func (s *layerSink) Node(n *metadata.Node) error {
	s.note(n)
	return s.w.Node(n)
}

func (s *layerSink) Dirent(d metadata.Dirent) error { return s.w.Dirent(d) }

func (s *layerSink) Relink(id uint64, nlink uint32) error { return s.w.Relink(id, nlink) }

func (s *layerSink) note(n *metadata.Node) {
	if len(n.Xattrs) > 0 || n.Opaque {
		s.noXattrs = false
	}
	if n.Type == metadata.TypeReg && n.Size > 0 {
		s.refs = append(s.refs, store.Ref{Digest: digest.Digest(n.Digest), Size: n.Size})
	}
	s.spans = appendSpan(s.spans, n)
}

// bigTree is the number of entries from which a mount returns the memory
// its import took to the kernel at once (about 30 MB per 100,000).
const bigTree = 100_000

// Restore serves the layer recorded under key again, from metadata only:
// file contents are fetched when read. A mount a Keeper held since the
// last process is served on, as it is: its readers never see it go.
func (f *FileSystem) Restore(ctx context.Context, key, mountpoint string) error {
	f.heldMu.Lock()
	h, ok := f.held[mountpoint]
	delete(f.held, mountpoint)
	f.heldMu.Unlock()
	if ok {
		_, err := f.serve(ctx, key, mountpoint, nil, nil, &h)
		if err == nil {
			f.resumed.Add(1)
			f.lastResume.Store(time.Now().UnixNano())
			return nil
		}
		f.resumeFail.Add(1)
		if errors.Is(err, fuse.ErrGone) {
			log.G(ctx).WithField("mountpoint", mountpoint).Info("the held mount is gone: mounting the layer anew")
		} else {
			log.G(ctx).WithError(err).WithField("mountpoint", mountpoint).
				Error("cannot serve the held mount on: mounting the layer anew (readers of the old mount get errors)")
		}
	}
	// A daemon that died left its FUSE mount dead ("transport endpoint is
	// not connected"): detach it before mounting anew.
	if err := detach(mountpoint); err != nil {
		log.G(ctx).WithError(err).WithField("mountpoint", mountpoint).Warn("detach stale mount")
	}
	_, err := f.serve(ctx, key, mountpoint, nil, nil, nil)
	return err
}

// detach lazily unmounts whatever is mounted on dir; nothing mounted
// there, or no dir, is no error.
func detach(dir string) error {
	if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
		return err
	}
	return nil
}

// DropUnclaimed unmounts the held mounts no Restore took (their snapshot
// is gone: a crash between mounting and committing, or during Remove),
// and logs the handover.
func (f *FileSystem) DropUnclaimed(ctx context.Context) {
	f.heldMu.Lock()
	held := f.held
	f.held = map[string]fuse.Held{}
	f.heldMu.Unlock()
	if h := f.handover(); h.Resumed > 0 || h.Failed > 0 {
		log.G(ctx).WithFields(log.Fields{
			"resumed": h.Resumed, "failed": h.Failed, "unclaimed": len(held),
			"unserved": h.Waited.Round(time.Millisecond),
		}).Info("took over the mounts of the last daemon: their readers waited at most this long")
	}
	for dir, h := range held {
		for _, fd := range h.Fds {
			syscall.Close(fd)
		}
		if err := detach(dir); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", dir).Warn("unmount a held mount of no snapshot")
		}
		if f.opts.Keeper != nil {
			if err := f.opts.Keeper.Delete(dir); err != nil {
				log.G(ctx).WithError(err).WithField("mountpoint", dir).Warn("drop a held mount of no snapshot")
			}
		}
		log.G(ctx).WithField("mountpoint", dir).Info("unmounted a held mount of no snapshot")
	}
}

// serve mounts the layer recorded under key, or serves on the connection
// held, when given. spans, when the caller has the layer's nodes at hand,
// spares the first read listing them again.
func (f *FileSystem) serve(ctx context.Context, key, mountpoint string, blob *remote.Blob, spans []fileSpan, held *fuse.Held) (*mounted, error) {
	ml, err := f.meta.Layer(key)
	if err != nil {
		return nil, err
	}
	m := &mounted{key: key, fs: f, meta: ml, format: layer.Format(ml.Info.Format), blob: blob, done: make(chan struct{})}
	if spans != nil {
		m.spansOnce.Do(func() { m.fileSpans = spans })
	}
	// Set before the mount serves: FUSE handlers start background fetches
	// under it as soon as the mountpoint is visible.
	m.bg, m.cancel = context.WithCancel(context.WithoutCancel(ctx))
	fo := fuse.Options{
		FsName:      "lazycas:" + ml.Info.Digest,
		OpaqueXattr: f.opts.OpaqueXattr,
		NoXattrs:    ml.Info.NoXattrs,
		Passthrough: f.opts.Passthrough,
		Keeper:      f.opts.Keeper,
		Metrics:     f.opts.FUSEMetrics,
		Debug:       f.opts.Debug,
	}
	var fl *fuse.Layer
	if held != nil {
		fl, err = fuse.Resume(ctx, mountpoint, ml, m, fo, *held)
	} else {
		fl, err = fuse.Mount(ctx, mountpoint, ml, m, fo)
	}
	if err != nil {
		m.cancel()
		return nil, err
	}
	m.fuse = fl
	f.logModeOnce.Do(func() {
		mode := "fuse reads (kernel page cache per layer)"
		if fl.Passthrough() {
			mode = "passthrough (the kernel reads store objects directly)"
		} else if f.opts.Passthrough {
			mode = "fuse reads: this kernel offers no FUSE passthrough"
		}
		log.G(ctx).WithField("mode", mode).Info("file reads")
	})
	m.startFetch()
	f.mu.Lock()
	f.layers[key] = m
	f.mu.Unlock()
	return m, nil
}

// Unmount stops serving the layer under key and forgets its metadata and
// store references. The mountpoint is unmounted even when key is unknown to
// this process (a mount left by a dead daemon).
func (f *FileSystem) Unmount(ctx context.Context, key, mountpoint string) error {
	f.mu.Lock()
	m := f.layers[key]
	delete(f.layers, key)
	f.mu.Unlock()
	var errs []error
	if m != nil {
		if err := m.stop(); err != nil {
			errs = append(errs, err)
		}
	} else if err := detach(mountpoint); err != nil {
		errs = append(errs, fmt.Errorf("unmount %s: %w", mountpoint, err))
	}
	f.forget(ctx, key)
	return errors.Join(errs...)
}

func (f *FileSystem) forget(ctx context.Context, key string) {
	if err := f.meta.Delete(key); err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("forget layer metadata")
	}
	if err := f.store.ReleaseLayer(key); err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("release layer's store references")
	}
}

// Prune forgets the metadata and store references of every layer whose
// key is not in keep and that is not mounted.
func (f *FileSystem) Prune(ctx context.Context, keep map[string]bool) error {
	infos, err := f.meta.Layers()
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for key := range infos {
		if keep[key] || f.layers[key] != nil {
			continue
		}
		log.G(ctx).WithField("key", key).Info("forgetting the layer of a vanished snapshot")
		f.forget(ctx, key)
	}
	// References may outlive their metadata (a crash inside forget).
	refs, err := f.store.LayerStats()
	if err != nil {
		return err
	}
	for key := range refs {
		if _, ok := infos[key]; !ok && !keep[key] && f.layers[key] == nil {
			if err := f.store.ReleaseLayer(key); err != nil {
				return err
			}
		}
	}
	return nil
}

// detachWait bounds how long Close lets requests being answered finish.
const detachWait = 5 * time.Second

// Close stops serving every layer; their metadata stays for Restore. With
// a Keeper the mounts stay, for the next process to serve on (readers
// wait meanwhile); without one they are unmounted.
func (f *FileSystem) Close() error {
	f.mu.Lock()
	layers := f.layers
	f.layers = map[string]*mounted{}
	f.mu.Unlock()
	var errs []error
	if f.opts.Keeper != nil {
		var wg sync.WaitGroup
		for _, m := range layers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				m.detach()
			}()
		}
		wg.Wait()
		return nil
	}
	for _, m := range layers {
		if err := m.stop(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// detach stops serving the layer and leaves its mount to the Keeper.
func (m *mounted) detach() {
	defer m.learnFlush()
	// First: from here no request is answered, so none is answered with
	// an error from the fetches cancelled next.
	m.fuse.Detach(detachWait)
	m.cancel()
	<-m.done
	m.wg.Wait()
}

func (m *mounted) stop() error {
	defer m.learnFlush()
	m.cancel()
	<-m.done
	err := m.fuse.Unmount()
	m.wg.Wait()
	return err
}

// remoteBlob resolves the layer's blob once, on the first fetch after a
// restore.
func (m *mounted) remoteBlob(ctx context.Context) (*remote.Blob, error) {
	m.blobMu.Lock()
	defer m.blobMu.Unlock()
	if m.blob != nil {
		return m.blob, nil
	}
	b, err := m.fs.fetcher.Open(ctx, m.meta.Info.Ref, ocispec.Descriptor{
		Digest: digest.Digest(m.meta.Info.Digest), Size: m.meta.Info.Size,
	})
	if err != nil {
		return nil, fmt.Errorf("resolve layer %s of %s: %w", m.meta.Info.Digest, m.meta.Info.Ref, err)
	}
	m.blob = b
	return b, nil
}

// Open implements fuse.Files: the content of n, from the store, fetched
// into it first when missing.
func (m *mounted) Open(ctx context.Context, n *metadata.Node) (fuse.File, error) {
	// The kernel interrupts a FUSE request when the reader gets any signal
	// (SIGCHLD, Go's preemption signal); the reader then still waits for
	// the answer. A fetch cut short by that would fail the read with EIO:
	// let it finish, bounded by the fetcher's timeouts and retries.
	ctx = context.WithoutCancel(ctx)
	m.opened(n)
	d := digest.Digest(n.Digest)
	m.learnOpen(n)
	if !m.fs.store.Has(d) && m.piecewise(n) {
		return m.openPartial(ctx, n)
	}
	// The store may collect the object between its fill and this open;
	// then it is filled again, a bounded number of times.
	for attempt := 0; ; attempt++ {
		h, err := m.fs.store.Open(d)
		if err == nil {
			return h, nil
		}
		if !errors.Is(err, store.ErrNotFound) || attempt == 3 {
			return nil, fmt.Errorf("layer %s inode %d: %w", m.meta.Info.Digest, n.ID, err)
		}
		if m.piecewise(n) && !m.fs.store.Has(d) {
			// Collected, or removed by a failed check: served piece by
			// piece again rather than after the whole file.
			return m.openPartial(ctx, n)
		}
		done := m.fs.foreground()
		err = m.fetchAround(ctx, n)
		done()
		if err != nil {
			return nil, err
		}
	}
}

// piecewise reports whether n is served piece by piece until sealed: a
// large file whose every chunk can be verified on its own.
func (m *mounted) piecewise(n *metadata.Node) bool {
	if m.fs.opts.PartialMinSize <= 0 || n.Size < m.fs.opts.PartialMinSize || len(n.Chunks) < 2 {
		return false
	}
	for _, c := range n.Chunks {
		if c.Digest == "" {
			return false
		}
	}
	return true
}

// openPartial serves a large file from its partial object, and completes
// and seals it in the background.
func (m *mounted) openPartial(ctx context.Context, n *metadata.Node) (fuse.File, error) {
	p, err := m.fs.store.Partial(digest.Digest(n.Digest), n.Size)
	if err != nil {
		return nil, err
	}
	// Completed under the layer's fetch context: unmounting stops it.
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		if err := m.ensure(m.bg, n, &prefetched{}); err != nil && m.bg.Err() == nil {
			log.G(ctx).WithError(err).WithField("inode", n.ID).Warn("complete large file in the background")
		}
	}()
	return &partialFile{m: m, n: n, p: p}, nil
}

// partialFile is an open large file still being filled.
type partialFile struct {
	m *mounted
	n *metadata.Node
	p *store.Partial
}

func (f *partialFile) Fd() uintptr { return ^uintptr(0) }

func (f *partialFile) Close() error {
	f.p.Release()
	return nil
}

// ReadAt fills the chunks [off, off+len(b)) covers, then reads them.
func (f *partialFile) ReadAt(ctx context.Context, b []byte, off int64) (int, error) {
	if off >= f.n.Size {
		return 0, nil
	}
	end := min(off+int64(len(b)), f.n.Size)
	ctx = context.WithoutCancel(ctx) // see mounted.Open
	defer f.m.fs.foreground()()
	for _, c := range f.n.Chunks {
		if c.FileOffset+c.Size <= off || c.FileOffset >= end {
			continue
		}
		if err := f.m.fillPiece(ctx, f.p, c, nil); err != nil {
			return 0, fmt.Errorf("layer %s inode %d: %w", f.m.meta.Info.Digest, f.n.ID, err)
		}
	}
	return f.p.ReadAt(b[:end-off], off)
}

// fillPiece makes chunk c present in p, reading the blob through r (the
// plain blob when nil).
func (m *mounted) fillPiece(ctx context.Context, p *store.Partial, c metadata.Chunk, r layer.RangeReader) error {
	return p.Fill(ctx, c.FileOffset, c.Size, func(ctx context.Context) ([]byte, error) {
		if r == nil {
			b, err := m.remoteBlob(ctx)
			if err != nil {
				return nil, err
			}
			r = blobRanges{b}
		}
		return layer.ReadChunk(ctx, r, m.format, c)
	})
}

// ensure fills the store with n's content, reading through pre (bytes
// already fetched) where it covers the chunks. Background fetches (pre
// non-nil, possibly empty, not marked reader) yield to readers and keep to
// the bandwidth cap.
func (m *mounted) ensure(ctx context.Context, n *metadata.Node, pre *prefetched) error {
	_, err := m.fs.store.Ensure(ctx, digest.Digest(n.Digest), n.Size, func(ctx context.Context, w io.Writer) error {
		b, err := m.remoteBlob(ctx)
		if err != nil {
			return err
		}
		var r layer.RangeReader = blobRanges{b}
		if pre != nil {
			// Without a reader of its own, pre belongs to a background
			// fetch: its misses yield to readers and keep to the cap.
			if pre.next == nil {
				pre.next = background{fs: m.fs, next: r}
			}
			r = pre
		}
		if !m.piecewise(n) {
			return layer.WriteFile(ctx, r, m.format, n, w)
		}
		// Through the partial object: pieces readers fetched are not
		// fetched again, and readers see the pieces this fetches.
		p, err := m.fs.store.Partial(digest.Digest(n.Digest), n.Size)
		if err != nil {
			return err
		}
		defer p.Release()
		var buf []byte
		for _, c := range n.Chunks {
			if pre != nil && !pre.reader && !p.Has(c.FileOffset, c.Size) {
				// Background: let readers go first, before claiming
				// the piece (a reader may then wait for it).
				if err := m.fs.yield(ctx); err != nil {
					return err
				}
			}
			if err := m.fillPiece(ctx, p, c, r); err != nil {
				return err
			}
			if int64(cap(buf)) < c.Size {
				buf = make([]byte, c.Size)
			}
			buf = buf[:c.Size]
			if _, err := p.ReadAt(buf, c.FileOffset); err != nil {
				return err
			}
			if _, err := w.Write(buf); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("layer %s inode %d: %w", m.meta.Info.Digest, n.ID, err)
	}
	return nil
}

// Stats describes the lazy layers, the store and the network.
type Stats struct {
	Store   store.Stats  `json:"store"`
	Fetch   remote.Stats `json:"fetch"`
	Mounted int          `json:"mountedLayers"`
	// Handover is how this process took over from the last one.
	Handover    Handover     `json:"handover"`
	Passthrough bool         `json:"passthrough"`
	Images      []ImageStats `json:"images"`
	// Layers are the mounted layers' fetch figures, one per layer
	// digest (a layer mounted under two parents sums both mounts).
	Layers []LayerStats `json:"layers"`
	// Phases counts the mounted layers by the Phase of their prefetch
	// and background fetch, by Phase.String().
	Phases map[string]int `json:"phases"`
}

// LayerStats is what a mounted layer's fetches did.
type LayerStats struct {
	Digest string `json:"digest"`
	// Fetch counts the requests for the layer's blob (TOC, reads,
	// prefetch) by outcome; zero until its first fetch after a restore.
	Fetch remote.BlobStats `json:"fetch"`
	// PendingFiles and PendingBytes are what the layer's current
	// prefetch or background fetch pass has still to fetch: 0 when none
	// runs.
	PendingFiles int64 `json:"pendingFiles"`
	PendingBytes int64 `json:"pendingBytes"`
	// FetchedFiles and FetchedBytes are what its prefetch and background
	// fetch put into the store.
	FetchedFiles int64 `json:"fetchedFiles"`
	FetchedBytes int64 `json:"fetchedBytes"`
}

// Handover is how a daemon took over the mounts the last one left.
type Handover struct {
	// Resumed counts layers served on from the last daemon's mounts:
	// their containers saw reads wait, never fail.
	Resumed int64 `json:"resumedLayers"`
	// Failed counts held mounts that could not be served on (mounted
	// anew: their readers got errors).
	Failed int64 `json:"failed"`
	// Waited is the longest any read of them waited for a daemon: from
	// the last daemon's end until this one served the last of them.
	Waited time.Duration `json:"waitedNs"`
	// Resent counts requests the last daemon read and never answered,
	// answered by this one (counted with FUSEMetrics; 0 without).
	Resent int64 `json:"resentRequests"`
}

func (f *FileSystem) handover() Handover {
	h := Handover{Resumed: f.resumed.Load(), Failed: f.resumeFail.Load()}
	if m := f.opts.FUSEMetrics; m != nil {
		h.Resent = m.Resent.Load()
	}
	if last := f.lastResume.Load(); last > 0 && !f.opts.HeldSince.IsZero() {
		h.Waited = time.Unix(0, last).Sub(f.opts.HeldSince)
	}
	return h
}

// ImageStats sums the layers mounted from one image reference.
type ImageStats struct {
	Ref    string `json:"ref"`
	Layers int    `json:"layers"`
	store.LayerStat
}

// Stats gathers the figures `lazycas store stats` shows.
func (f *FileSystem) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	var err error
	if st.Store, err = f.store.Stats(); err != nil {
		return st, err
	}
	st.Fetch = f.fetcher.Stats()
	f.mu.Lock()
	st.Mounted = len(f.layers)
	st.Handover = f.handover()
	byDigest := map[string]*LayerStats{}
	st.Phases = map[string]int{}
	for _, m := range f.layers {
		st.Passthrough = st.Passthrough || m.fuse.Passthrough()
		st.Phases[Phase(m.bgPhase.Load()).String()]++
		l := byDigest[m.meta.Info.Digest]
		if l == nil {
			l = &LayerStats{Digest: m.meta.Info.Digest}
			byDigest[l.Digest] = l
		}
		m.blobMu.Lock()
		if m.blob != nil {
			l.Fetch.Add(m.blob.Stats())
		}
		m.blobMu.Unlock()
		l.PendingFiles += m.bgPendingFiles.Load()
		l.PendingBytes += m.bgPendingBytes.Load()
		l.FetchedFiles += m.bgFetchedFiles.Load()
		l.FetchedBytes += m.bgFetchedBytes.Load()
	}
	f.mu.Unlock()
	for _, l := range byDigest {
		st.Layers = append(st.Layers, *l)
	}
	sort.Slice(st.Layers, func(i, j int) bool { return st.Layers[i].Digest < st.Layers[j].Digest })
	infos, err := f.meta.Layers()
	if err != nil {
		return st, err
	}
	per, err := f.store.LayerStats()
	if err != nil {
		return st, err
	}
	byRef := map[string]*ImageStats{}
	for key, info := range infos {
		im := byRef[info.Ref]
		if im == nil {
			im = &ImageStats{Ref: info.Ref}
			byRef[info.Ref] = im
		}
		l := per[key]
		im.Layers++
		im.Files += l.Files
		im.Bytes += l.Bytes
		im.PresentFiles += l.PresentFiles
		im.PresentBytes += l.PresentBytes
	}
	for _, im := range byRef {
		st.Images = append(st.Images, *im)
	}
	sort.Slice(st.Images, func(i, j int) bool { return st.Images[i].Ref < st.Images[j].Ref })
	return st, nil
}

// GC trims the store to maxBytes of content; see store.Store.GC.
func (f *FileSystem) GC(ctx context.Context, maxBytes int64) (store.GCResult, error) {
	return f.store.GC(ctx, maxBytes)
}

// blobRanges adapts a remote blob to layer.RangeReader.
type blobRanges struct{ b *remote.Blob }

func (r blobRanges) ReadRanges(ctx context.Context, ranges []layer.Range) error {
	rs := make([]remote.Range, len(ranges))
	for i, x := range ranges {
		rs[i] = remote.Range{Off: x.Off, Buf: x.Buf}
	}
	return r.b.ReadRanges(ctx, rs)
}

// limiterBurst is the most one background request takes from the
// bandwidth budget at once; bigger reads wait for it in pieces.
const limiterBurst = 16 << 20

// background is the RangeReader of prefetch and background fetch: it keeps
// to the bandwidth cap.
type background struct {
	fs   *FileSystem
	next layer.RangeReader
}

func (b background) ReadRanges(ctx context.Context, ranges []layer.Range) error {
	// No yield here: this may run inside a single-flight fetch that a
	// reader waits for. Background work yields before it claims a file
	// or a piece (fetchGroup, ensure).
	var n int
	for _, r := range ranges {
		n += len(r.Buf)
	}
	if err := b.fs.limit(ctx, n); err != nil {
		return err
	}
	return b.next.ReadRanges(ctx, ranges)
}

// limit waits until the bandwidth cap allows n more bytes of background
// fetch.
func (f *FileSystem) limit(ctx context.Context, n int) error {
	if f.limiter == nil {
		return nil
	}
	for n > 0 {
		take := min(n, limiterBurst)
		if err := f.limiter.WaitN(ctx, take); err != nil {
			return err
		}
		n -= take
	}
	return nil
}

// yield waits, boundedly, while readers are fetching: during a
// container's start-up burst of misses, prefetch should share neither the
// link nor the CPU (decompressing, hashing) with them. Bounded, so that a
// stream of reads cannot starve prefetch for good.
func (f *FileSystem) yield(ctx context.Context) error {
	for i := 0; i < 200 && f.readersBusy(); i++ {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// quietAfterRead is how long after a reader's fetch background fetch
// still holds back: a program's reads come in bursts with computing in
// between.
const quietAfterRead = 150 * time.Millisecond

func (f *FileSystem) readersBusy() bool {
	return f.fgActive.Load() > 0 || time.Since(time.Unix(0, f.fgLast.Load())) < quietAfterRead
}

// foreground marks a reader's fetch; call the returned func when it ends.
func (f *FileSystem) foreground() func() {
	f.fgActive.Add(1)
	f.fgLast.Store(time.Now().UnixNano())
	return func() {
		f.fgLast.Store(time.Now().UnixNano())
		f.fgActive.Add(-1)
	}
}
