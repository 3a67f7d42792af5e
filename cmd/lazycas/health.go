package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazycas/lazycas/config"
)

// healthProbeKey names no snapshot: a Stat of it walks the daemon's whole
// containerd-facing path (socket, gRPC server, snapshot metastore) and
// costs one read transaction, whatever the node holds. That is why the
// liveness probe uses it rather than `store stats`, which reads every
// object of the store.
const healthProbeKey = "lazycas-health-probe"

// health answers whether the daemon serves containerd: exit 0 when a
// snapshots Stat comes back (NotFound is the expected answer), 1 when the
// socket is dead or the call fails or times out. Meant for a Kubernetes
// exec liveness probe.
func health(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas health", flag.ContinueOnError)
	flags.SetOutput(stderr)
	address := flags.String("address", config.DefaultAddress, "the daemon's snapshots API socket (its --address)")
	timeout := flags.Duration("timeout", 5*time.Second, "fail when the daemon has not answered within this long")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() > 0 {
		return fmt.Errorf("health takes no arguments, got %q (see lazycas health -h)", flags.Args())
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+*address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("dial lazycas at %s: %w", *address, err)
	}
	defer conn.Close()
	_, err = snapshotsapi.NewSnapshotsClient(conn).Stat(ctx,
		&snapshotsapi.StatSnapshotRequest{Snapshotter: "lazycas", Key: healthProbeKey})
	if err != nil && !errors.Is(errgrpc.ToNative(err), errdefs.ErrNotFound) {
		return fmt.Errorf("lazycas at %s does not answer: %w (is the daemon running? see --address)", *address, err)
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}
