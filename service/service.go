// Package service wires a validated config into a running lazycas daemon:
// the snapshotter under the configured root, served over containerd's
// snapshots gRPC API on a unix socket.
//
// Shutdown order: stop accepting, let in-flight calls finish (bounded), then
// close the snapshotter; the metastore is never closed under a live call.
package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay/overlayutils"
	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/lazycas/lazycas/config"
	lazyfs "github.com/lazycas/lazycas/fs"
	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/fuse/holder"
	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/metadata"
	"github.com/lazycas/lazycas/service/cri"
	"github.com/lazycas/lazycas/service/finder"
	"github.com/lazycas/lazycas/service/resolver"
	"github.com/lazycas/lazycas/snapshot"
	"github.com/lazycas/lazycas/store"
)

// Service is a configured snapshotter and its gRPC server.
type Service struct {
	sn      *snapshot.Snapshotter
	grpc    *grpc.Server
	lazy    *lazy // nil when lazy layers are off
	api     *http.Server
	metrics *http.Server
	// cri is the image service kubelet may pull through; nil unless
	// cri.image_service_address is set.
	cri    *cri.Proxy
	criSrv *grpc.Server
	// criAddress and containerd are where the image service is served
	// and where it falls back to when lazycas stops.
	criAddress, containerd string
}

// lazy is what mounting lazy layers takes.
type lazy struct {
	fs      *lazyfs.FileSystem
	meta    *metadata.DB
	store   *store.Store
	fetcher *remote.Fetcher
	finder  *finder.Finder
	prof    *profile.DB // nil unless fs.learn
	learn   *lazyfs.Profiles
	holder  *holder.Client // nil unless fs.holder
	keys    *cri.Keyring   // nil unless the CRI image service is served
	// fuseMetrics counts every mount's FUSE requests, for /metrics.
	fuseMetrics *fuse.OpMetrics
}

func (l *lazy) close() error {
	var errs []error
	if l.fs != nil {
		if err := l.fs.Close(); err != nil {
			errs = append(errs, fmt.Errorf("unmount lazy layers: %w", err))
		}
	}
	if l.holder != nil {
		// After the layers detached: the holder must have every mount
		// before this process lets go of its copies.
		if err := l.holder.Close(); err != nil {
			errs = append(errs, fmt.Errorf("fuse holder: %w", err))
		}
	}
	l.fetcher.Close()
	if l.finder != nil {
		l.finder.Close()
	}
	if l.prof != nil {
		if err := l.prof.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := l.meta.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := l.store.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// retries maps the config's retry count to remote.Options, where 0 means
// the default and a negative count none.
func retries(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

func openLazy(ctx context.Context, cfg config.Config) (_ *lazy, err error) {
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, fmt.Errorf("create root: %w", err)
	}
	st, err := store.Open(ctx, filepath.Join(cfg.Root, "store"), store.WithVerity(cfg.Store.Verity))
	if err != nil {
		return nil, err
	}
	meta, err := metadata.Open(filepath.Join(cfg.Root, "layers.db"))
	if err != nil {
		st.Close()
		return nil, err
	}
	l := &lazy{meta: meta, store: st, fuseMetrics: &fuse.OpMetrics{}}
	ro := remote.Options{
		Hosts:          resolver.Hosts(ctx, resolver.Options{HostsDir: cfg.Remote.ConfigPath}),
		RequestTimeout: cfg.Remote.RequestTimeout.Duration,
		Retries:        retries(cfg.Remote.Retries),
		MaxInFlight:    cfg.Remote.MaxInFlight,
	}
	if cfg.CRI.ImageServiceAddress != "" {
		// Kubelet's pull secrets, by repository, before the node's docker
		// config.
		l.keys = cri.NewKeyring(cfg.CRI.CredentialTTL.Duration)
		ro.RepoHosts = resolver.RepoHosts(ctx, resolver.Options{HostsDir: cfg.Remote.ConfigPath, RepoCredentials: l.keys})
	}
	l.fetcher = remote.New(ro)
	defer func() {
		if err != nil {
			l.close()
		}
	}()
	userxattr, err := overlayutils.NeedsUserXAttr(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("probe userxattr on %s: %w", cfg.Root, err)
	}
	opaque := fuse.OpaqueXattrTrusted
	if userxattr {
		opaque = fuse.OpaqueXattrUser
	}
	fo := lazyfs.Options{
		OpaqueXattr:         opaque,
		Passthrough:         cfg.FS.Passthrough,
		Prefetch:            cfg.FS.Prefetch,
		Background:          cfg.FS.BackgroundFetch,
		FetchConcurrency:    cfg.FS.FetchConcurrency,
		BackgroundDelay:     cfg.FS.BackgroundDelay.Duration,
		BackgroundBandwidth: cfg.FS.BackgroundBandwidth.Bytes,
		PartialMinSize:      cfg.Store.PartialMinSize.Bytes,
		Debug:               cfg.FS.Debug,
		FUSEMetrics:         l.fuseMetrics,
	}
	if cfg.Containerd.Address != "" {
		l.finder = finder.New(cfg.Containerd.Address)
		fo.Finder = l.finder
		fo.Images = l.finder
		fo.StartupFetch = cfg.FS.StartupFetch
	}
	if cfg.FS.Learn {
		if l.prof, err = profile.Open(filepath.Join(cfg.Root, "profiles.db")); err != nil {
			return nil, err
		}
		l.learn = lazyfs.NewProfiles(l.prof, 0)
		fo.Profiles = l.learn
	}
	if cfg.FS.Holder {
		var spawn func(context.Context) error
		if cfg.FS.HolderSpawn {
			spawn = func(ctx context.Context) error { return spawnHolder(ctx, cfg) }
		}
		l.holder, err = holder.Connect(ctx, holder.ClientOptions{Socket: cfg.HolderSocket(), Spawn: spawn})
		if err != nil {
			// Serving without is better than not serving: the holder gets
			// the mounts once it answers.
			log.G(ctx).WithError(err).Error("no fuse holder: until one answers, lazy layers do not survive a restart of the daemon")
		}
		fo.Keeper = l.holder
		fo.HeldSince = time.Now().Add(-l.holder.Orphaned())
		if fo.Held, err = takeHeld(ctx, l.holder, l.keys); err != nil {
			log.G(ctx).WithError(err).Error("cannot take the mounts the fuse holder kept: they are mounted anew, and their readers get errors")
		}
		if l.keys != nil {
			keepKeyring(ctx, l.holder, l.keys)
		}
	}
	l.fs = lazyfs.New(meta, st, l.fetcher, fo)
	st.SetMaxBytes(cfg.Store.MaxSize.Bytes)
	log.G(ctx).WithFields(log.Fields{
		"store": st.Dir(), "passthrough": cfg.FS.Passthrough, "prefetch": cfg.FS.Prefetch,
		"background_fetch": cfg.FS.BackgroundFetch, "max_size": cfg.Store.MaxSize.Bytes, "learn": cfg.FS.Learn, "opaque_xattr": opaque, "containerd": cfg.Containerd.Address,
	}).Info("lazy layers enabled")
	return l, nil
}

// New opens the snapshotter under cfg.Root and prepares the gRPC server.
func New(ctx context.Context, cfg config.Config) (_ *Service, err error) {
	var opts []snapshot.Opt
	var lz *lazy
	if cfg.FS.Lazy {
		if lz, err = openLazy(ctx, cfg); err != nil {
			return nil, fmt.Errorf("lazy layers: %w", err)
		}
		defer func() {
			if err != nil {
				lz.close()
			}
		}()
		opts = append(opts, snapshot.WithFileSystem(lz.fs))
	}
	if cfg.Snapshotter.AsyncRemove {
		opts = append(opts, snapshot.WithAsyncRemove)
	}
	if len(cfg.Snapshotter.MountOptions) > 0 {
		opts = append(opts, snapshot.WithMountOptions(cfg.Snapshotter.MountOptions...))
	}
	sn, err := snapshot.New(ctx, cfg.Root, opts...)
	if err != nil {
		return nil, fmt.Errorf("snapshotter: %w", err)
	}
	if lz != nil {
		// The snapshotter served on every held mount of a snapshot it has.
		lz.fs.DropUnclaimed(ctx)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	s := &Service{sn: sn, grpc: srv, lazy: lz}
	if cfg.CRI.ImageServiceAddress != "" {
		if s.cri, err = cri.NewProxy(cfg.Containerd.Address, lz.keys); err != nil {
			sn.Close()
			return nil, err
		}
		s.criSrv = grpc.NewServer()
		s.cri.Register(s.criSrv)
		s.criAddress, s.containerd = cfg.CRI.ImageServiceAddress, cfg.Containerd.Address
	}
	return s, nil
}

// ServeCRI answers CRI image service calls on l until Shutdown, passing
// them on to containerd (see service/cri).
func (s *Service) ServeCRI(l net.Listener) error {
	if s.criSrv == nil {
		l.Close()
		return errors.New("cri.image_service_address is not set")
	}
	if err := s.criSrv.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve CRI image service on %s: %w", l.Addr(), err)
	}
	return nil
}

// Serve answers requests on l until Shutdown.
func (s *Service) Serve(l net.Listener) error {
	if err := s.grpc.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve %s: %w", l.Addr(), err)
	}
	return nil
}

// Shutdown stops serving, waits up to grace for in-flight calls, and closes
// the snapshotter. Mounts that containerd made stay: containers keep running.
func (s *Service) Shutdown(ctx context.Context, grace time.Duration) error {
	s.shutdownAPI(ctx)
	if s.criSrv != nil {
		// Kubelet reaches containerd directly until the next daemon
		// serves (see service/cri); a pull in flight is cancelled, and
		// kubelet retries it.
		if err := cri.Fallback(s.criAddress, s.containerd); err != nil {
			log.G(ctx).WithError(err).Error("kubelet's image service endpoint left dead: kubelet cannot start containers until lazycas serves it again")
		}
		s.criSrv.Stop()
		s.cri.Close()
	}
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(grace):
		log.G(ctx).WithField("grace", grace).Warn("in-flight calls did not finish; stopping them")
		s.grpc.Stop()
		<-done
	}
	var errs []error
	if err := s.sn.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close snapshotter: %w", err))
	}
	// Lazy layers stay mounted with the fuse holder (readers wait for the
	// next daemon), or, without one, are unmounted (and mounted again from
	// metadata at the next start).
	if s.lazy != nil {
		if err := s.lazy.close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Listen opens the unix socket at address. A socket file nobody answers on
// (left by a crashed daemon) is replaced; a live one is an error, so two
// daemons never share a root by accident.
func Listen(ctx context.Context, address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o711); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	fi, err := os.Lstat(address)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("socket %s: %w", address, err)
	case fi.Mode()&os.ModeSocket == 0:
		return nil, fmt.Errorf("socket %s: path exists and is not a socket: remove it, or pass another --address", address)
	default:
		conn, derr := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "unix", address)
		if derr == nil {
			conn.Close()
			return nil, fmt.Errorf("socket %s is in use by another process (is a lazycas daemon already running?): stop it, or pass another --address and root", address)
		}
		if !errors.Is(derr, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("socket %s: probe existing socket: %w", address, derr)
		}
		log.G(ctx).WithField("address", address).Info("replacing stale socket")
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", address, err)
		}
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", address, err)
	}
	// containerd runs as root; nobody else needs the snapshotter.
	if err := os.Chmod(address, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", address, err)
	}
	return l, nil
}
