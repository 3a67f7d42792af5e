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
	"os"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/snapshot"
)

// Service is a configured snapshotter and its gRPC server.
type Service struct {
	sn   *snapshot.Snapshotter
	grpc *grpc.Server
}

// New opens the snapshotter under cfg.Root and prepares the gRPC server.
func New(ctx context.Context, cfg config.Config) (*Service, error) {
	var opts []snapshot.Opt
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
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	return &Service{sn: sn, grpc: srv}, nil
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
	if err := s.sn.Close(); err != nil {
		return fmt.Errorf("close snapshotter: %w", err)
	}
	return nil
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
		return nil, fmt.Errorf("socket %s: path exists and is not a socket", address)
	default:
		conn, derr := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "unix", address)
		if derr == nil {
			conn.Close()
			return nil, fmt.Errorf("socket %s is in use by another process (is a lazycas daemon already running?)", address)
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
