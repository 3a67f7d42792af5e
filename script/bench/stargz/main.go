// Command stargz-grpc serves stargz-snapshotter's remote snapshotter over
// containerd's snapshots gRPC API on a unix socket: the peer that
// script/bench measures lazycas against.
//
// It is a module of its own because upstream's daemon
// (cmd/containerd-stargz-grpc) cannot be installed with `go install` (its
// module uses replace directives), while the library it is built from,
// github.com/containerd/stargz-snapshotter, is an ordinary module. It does
// what upstream's daemon does by default: the filesystem with its default
// config (prefetch of the landmarked files, background fetch on), sources
// from CRI labels then from containerd's default labels, asynchronous
// remove; no IPFS, no keychains, no metrics, no fuse manager.
//
//	stargz-grpc -root DIR -address SOCKET [-config FILE.toml] [-log-level info]
//
// The config file is upstream's (service.Config): e.g. a plain-HTTP
// registry is
//
//	[[resolver.host."127.0.0.1:5000".mirrors]]
//	host = "127.0.0.1:5000"
//	insecure = true
//
// SIGINT and SIGTERM close the snapshotter, which unmounts its layers.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/stargz-grpc/stargz-grpc.sock", "unix socket serving containerd's snapshots API")
	root := flag.String("root", "/var/lib/stargz-grpc", "the snapshotter's state directory")
	configPath := flag.String("config", "", "TOML config (stargz-snapshotter's service.Config); empty: all defaults")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn, error, fatal, panic")
	flag.Parse()
	if err := run(*address, *root, *configPath, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

// loadConfig reads path strictly: a misspelt key would otherwise measure
// a peer configured differently than intended.
func loadConfig(path string) (service.Config, error) {
	var cfg service.Config
	if path == "" {
		return cfg, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return cfg, err
	}
	defer f.Close()
	dec := toml.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

func run(address, root, configPath, logLevel string) error {
	lvl, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	ctx := log.WithLogger(context.Background(), log.L)

	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	if err := service.Supported(root); err != nil {
		return fmt.Errorf("overlayfs on %s: %w", root, err)
	}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg)
	if err != nil {
		return fmt.Errorf("start the snapshotter: %w", err)
	}
	defer func() {
		if cerr := sn.Close(); cerr != nil {
			log.G(ctx).WithError(cerr).Warn("close the snapshotter")
		}
	}()

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	// A socket left by a killed daemon would make Listen fail.
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, listErrors{snapshotservice.FromSnapshotter(sn)})
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	log.G(ctx).WithField("address", address).WithField("root", root).Info("serving")

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sigc:
		log.G(ctx).Infof("got %v, stopping", s)
		srv.Stop()
		return nil
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", address, err)
	}
}

// listErrors returns List's errors with their gRPC codes: containerd's
// snapshotservice passes them on as they are, so a client could not tell
// "no snapshots bucket yet" (an empty root: not found) from a failure.
type listErrors struct {
	snapshotsapi.SnapshotsServer
}

func (l listErrors) List(r *snapshotsapi.ListSnapshotsRequest, ss snapshotsapi.Snapshots_ListServer) error {
	return errgrpc.ToGRPC(l.SnapshotsServer.List(r, ss))
}
