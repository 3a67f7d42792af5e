// Command lazycas is the lazycas command-line tool: converting images to
// lazy formats, pulling them into containerd with the labels a remote
// snapshotter needs, and (to come) inspecting the shared store.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/log"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage: lazycas [--debug] COMMAND [flags] [args]

commands:
  image convert [flags] SRC DST   convert an image's layers to eStargz or zstd:chunked
  image pull [flags] REF          pull REF into containerd through the lazycas snapshotter
  image profile export [--layer DIGEST ...] FILE
                                  write learned start-up profiles to FILE (JSON)
  image profile import FILE       merge the profiles in FILE into the daemon's
  image profile push REF          attach the daemon's profiles of REF's layers to REF
                                  in its registry (an OCI artifact referring to it)
  image profile pull REF          merge the profiles attached to REF into the daemon's
  health [--address SOCK]         exit 0 if the daemon answers containerd's snapshots API
  store stats [flags]             show the shared store: objects, bytes, dedup, per image
  store gc [flags]                trim the shared store to a size
  version                         print the version (also --version)

Run "lazycas image convert -h" or "lazycas image pull -h" for their flags.
`

// errUsage means the command line was wrong; usage was already printed.
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "lazycas: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	// containerd's libraries log warnings a CLI user cannot act on (content
	// store probes); --debug shows everything.
	level := "error"
	if len(args) > 0 && args[0] == "--debug" {
		level, args = "debug", args[1:]
	}
	if err := log.SetLevel(level); err != nil {
		return err
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	switch {
	case args[0] == "version" || args[0] == "--version":
		// The same string as containerd-lazycas-grpc --version prints
		// after its name: both come from the Makefile's -X main.version.
		fmt.Fprintf(stdout, "lazycas %s\n", version)
		return nil
	case args[0] == "image" && len(args) > 1 && args[1] == "pull":
		return imagePull(ctx, args[2:], stdout, stderr)
	case args[0] == "image" && len(args) > 1 && args[1] == "convert":
		return imageConvert(ctx, args[2:], stdout, stderr)
	case args[0] == "image" && len(args) > 1 && args[1] == "profile":
		return imageProfile(ctx, args[2:], stdout, stderr)
	case args[0] == "store" && len(args) > 1 && args[1] == "stats":
		return storeStats(ctx, args[2:], stdout, stderr)
	case args[0] == "store" && len(args) > 1 && args[1] == "gc":
		return storeGC(ctx, args[2:], stdout, stderr)
	case args[0] == "health":
		return health(ctx, args[1:], stdout, stderr)
	case args[0] == "-h" || args[0] == "--help" || args[0] == "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprintf(stderr, "lazycas: unknown command %q\n\n%s", args, usage)
	return errUsage
}
