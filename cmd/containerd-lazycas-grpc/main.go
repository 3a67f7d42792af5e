// Command containerd-lazycas-grpc is the lazycas daemon: a containerd
// snapshotter served over gRPC on a unix socket, for containerd's
// proxy_plugins.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/fs/fuse/holder"
	"github.com/lazycas/lazycas/service"
	"github.com/lazycas/lazycas/service/cri"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// shutdownGrace bounds how long in-flight calls may run after a signal.
const shutdownGrace = 10 * time.Second

func main() {
	err := run(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return // the usage is printed: asking for it is no error
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "containerd-lazycas-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stderr io.Writer) error {
	if len(args) > 0 && args[0] == service.HolderCommand {
		return runHolder(args[1:], stderr)
	}
	flags := flag.NewFlagSet("containerd-lazycas-grpc", flag.ContinueOnError)
	flags.SetOutput(stderr)
	var (
		configPath  = flags.String("config", config.DefaultPath, "config file (TOML); a missing default file means all defaults")
		root        = flags.String("root", config.DefaultRoot, "directory for the daemon's state")
		address     = flags.String("address", config.DefaultAddress, "unix socket serving containerd's snapshots API")
		logLevel    = flags.String("log-level", config.DefaultLogLevel, "trace, debug, info, warn, error, fatal or panic")
		showVersion = flags.Bool("version", false, "print the version and exit")
	)
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: the daemon takes only flags (see --help)", flags.Args())
	}
	if *showVersion {
		fmt.Fprintf(os.Stdout, "containerd-lazycas-grpc %s\n", version)
		return nil
	}

	set := map[string]bool{}
	flags.Visit(func(f *flag.Flag) { set[f.Name] = true })
	cfg, err := config.Load(*configPath, set["config"])
	if err != nil {
		return err
	}
	// A flag given on the command line wins over the file.
	if set["root"] {
		cfg.Root = *root
	}
	if set["address"] {
		cfg.Address = *address
	}
	if set["log-level"] {
		cfg.LogLevel = *logLevel
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("flags: %w", err)
	}
	if err := setupLogging(cfg); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return serve(ctx, cfg)
}

func setupLogging(cfg config.Config) error {
	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	format := log.TextFormat
	if cfg.LogFormat == "json" {
		format = log.JSONFormat
	}
	return log.SetFormat(format)
}

func serve(ctx context.Context, cfg config.Config) error {
	logger := log.G(ctx).WithFields(log.Fields{"root": cfg.Root, "address": cfg.Address})
	// Claim the socket first: a second daemon must fail before it touches
	// any root. Clients that connect meanwhile wait in the backlog until
	// the snapshotter is ready and Serve runs.
	l, err := service.Listen(ctx, cfg.Address)
	if err != nil {
		return err
	}
	svc, err := service.New(ctx, cfg)
	if err != nil {
		l.Close()
		return err
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- svc.Serve(l) }()
	apiL, err := service.Listen(ctx, cfg.APISocket())
	if err != nil {
		// Without its API the daemon still serves containerd.
		logger.WithError(err).Warn("lazycas API not served")
	} else {
		go func() {
			if err := svc.ServeAPI(apiL); err != nil {
				logger.WithError(err).Error("lazycas API stopped")
			}
		}()
	}
	if cfg.CRI.ImageServiceAddress != "" {
		cl, err := cri.Listen(ctx, cfg.CRI.ImageServiceAddress)
		if err != nil {
			// The path stays what it was (at best the fallback to
			// containerd): kubelet pulls on, without lazy credentials.
			logger.WithError(err).Error("CRI image service not served: kubelet's pulls keep no credentials for lazy reads")
		} else {
			go func() {
				if err := svc.ServeCRI(cl); err != nil {
					logger.WithError(err).Error("CRI image service stopped")
				}
			}()
			logger.WithFields(log.Fields{"cri": cfg.CRI.ImageServiceAddress, "containerd": cfg.Containerd.Address}).Info("serving the CRI image service (kubelet --image-service-endpoint)")
		}
	}
	if cfg.MetricsAddress != "" {
		ml, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			// Without metrics the daemon still serves containerd.
			logger.WithError(err).Error("metrics not served")
		} else {
			go func() {
				if err := svc.ServeMetrics(ml); err != nil {
					logger.WithError(err).Error("metrics stopped")
				}
			}()
			logger.WithField("metrics", ml.Addr().String()).Info("serving Prometheus metrics at /metrics")
		}
	}
	logger.WithField("version", version).Info("lazycas serving")

	select {
	case err = <-serveErr:
		logger.WithError(err).Error("server stopped")
	case <-ctx.Done():
		logger.Info("signal received, shutting down")
	}
	// A fresh context: the signal one is already cancelled.
	if serr := svc.Shutdown(context.WithoutCancel(ctx), shutdownGrace); serr != nil {
		err = errors.Join(err, serr)
	}
	if err == nil {
		logger.Info("lazycas stopped")
	}
	return err
}

// runHolder runs the fuse holder: the process that keeps lazy layers'
// FUSE connections while no daemon serves them (see fs/fuse/holder). The
// daemon starts it; under a DaemonSet it may run in a pod of its own.
func runHolder(args []string, stderr io.Writer) error {
	flags := flag.NewFlagSet("containerd-lazycas-grpc "+service.HolderCommand, flag.ContinueOnError)
	flags.SetOutput(stderr)
	var (
		root       = flags.String("root", config.DefaultRoot, "the daemon's root: the socket and pid file go there unless given")
		socket     = flags.String("socket", "", "unix socket daemons reach the holder on (default <root>/fuse-holder.sock)")
		pidFile    = flags.String("pid-file", "", "file to write the holder's pid to (default <root>/fuse-holder.pid)")
		abortAfter = flags.Duration("abort-after", 5*time.Minute, "give the mounts up when no daemon came back for this long (0: never)")
		idleExit   = flags.Duration("idle-exit", 30*time.Second, "exit when holding nothing and no daemon connected for this long (0: never)")
		logLevel   = flags.String("log-level", config.DefaultLogLevel, "trace, debug, info, warn, error, fatal or panic")
		criAddress = flags.String("cri-address", "", "the daemon's CRI image service socket ([cri] image_service_address): when a daemon dies, point it at containerd's")
		containerd = flags.String("containerd-address", config.DefaultContainerdAddress, "containerd's socket, which --cri-address falls back to")
	)
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: the fuse holder takes only flags (see fuse-holder --help)", flags.Args())
	}
	if *socket == "" {
		c := config.Config{Root: *root}
		*socket = c.HolderSocket()
	}
	if *pidFile == "" {
		*pidFile = service.HolderPIDFile(*root)
	}
	if err := log.SetLevel(*logLevel); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	// SIGHUP from a closing terminal is no reason to drop mounts.
	signal.Ignore(syscall.SIGHUP)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var orphaned func()
	if *criAddress != "" {
		// A daemon that was killed could not give kubelet's image service
		// endpoint back to containerd: kubelet could then start no
		// container, the daemon's own included.
		orphaned = func() {
			switched, err := cri.FallbackIfDead(ctx, *criAddress, *containerd)
			switch {
			case err != nil:
				log.G(ctx).WithError(err).Error("cannot point kubelet's image service endpoint at containerd")
			case switched:
				log.G(ctx).WithFields(log.Fields{"cri": *criAddress, "containerd": *containerd}).Warn("daemon gone: kubelet's image service endpoint now reaches containerd directly")
			}
		}
	}
	err := holder.Serve(ctx, holder.ServerOptions{
		Socket: *socket, PIDFile: *pidFile, AbortAfter: *abortAfter, IdleExit: *idleExit, Orphaned: orphaned,
	})
	if errors.Is(err, holder.ErrRunning) {
		log.G(ctx).WithField("socket", *socket).Info("a fuse holder already runs here")
		return nil
	}
	return err
}
