// Command demo shows lazycas end to end on this machine: it starts a
// private registry, containerd and the lazycas daemon, builds (or takes from
// the cache) a Debian + python3 image, pushes it, pulls it into the lazycas
// snapshotter through containerd's client and runs python in a container;
// then it converts the image to eStargz with `lazycas image convert`, pulls
// that with `lazycas image pull`, runs python from it, and removes
// everything again, also after a failure or Ctrl-C.
//
// Run it as root from the repository root:
//
//	go run ./script/demo [-daemon bin/containerd-lazycas-grpc] [-cli bin/lazycas]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/opencontainers/image-spec/identity"

	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
	"github.com/lazycas/lazycas/snapshot"
)

const pythonCode = `import sys; print('hello from', sys.version.split()[0], 'on lazycas')`

func main() {
	daemon := flag.String("daemon", "", "containerd-lazycas-grpc binary (default: build it from ./cmd/containerd-lazycas-grpc)")
	cli := flag.String("cli", "", "lazycas CLI binary (default: lazycas next to -daemon, else build it from ./cmd/lazycas)")
	timeout := flag.Duration("timeout", 20*time.Minute, "give up after this long")
	flag.Parse()

	// A closed stdout (demo | head) must not kill the demo before cleanup.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	start := time.Now()
	err := run(ctx, *daemon, *cli)
	switch {
	case err == nil:
		fmt.Printf("\nDemo finished successfully in %s.\n", since(start))
	case ctx.Err() != nil && errors.Is(ctx.Err(), context.Canceled):
		fmt.Fprintf(os.Stderr, "\nDemo interrupted; everything it started was stopped and removed.\n")
		os.Exit(130)
	default:
		fmt.Fprintf(os.Stderr, "\nDemo FAILED: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, daemon, cli string) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("run the demo as root: it starts containerd and mounts overlay filesystems")
	}
	tmp, err := os.MkdirTemp("", "lazycas-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	if daemon == "" {
		daemon, err = buildCommand(ctx, tmp, "containerd-lazycas-grpc", "no -daemon given")
		if err != nil {
			return err
		}
	} else if daemon, err = filepath.Abs(daemon); err != nil {
		return err
	}
	if cli == "" {
		if next := filepath.Join(filepath.Dir(daemon), "lazycas"); isFile(next) {
			cli = next
		} else if cli, err = buildCommand(ctx, tmp, "lazycas", "no -cli given"); err != nil {
			return err
		}
	} else if cli, err = filepath.Abs(cli); err != nil {
		return err
	}

	work := filepath.Join(tmp, "env")
	if err := os.Mkdir(work, 0o755); err != nil {
		return err
	}
	step("Starting a private registry, the lazycas daemon and containerd 1.6 in %s", work)
	t := time.Now()
	env, err := testenv.Start(ctx, testenv.Options{
		WorkDir:    work,
		DaemonPath: daemon,
		Logf:       func(format string, args ...any) { detail(format, args...) },
	})
	if err != nil {
		return err
	}
	detail("all three answering after %s; lazycas serves %s, its root is %s", since(t), env.DaemonAddress, env.DaemonRoot)
	defer func() {
		step("Cleaning up")
		t := time.Now()
		if cerr := env.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
			return
		}
		detail("stopped containerd, lazycas and the registry, unmounted everything, removed the work directory (%s)", since(t))
	}()
	if err := demo(ctx, env, cli, tmp); err != nil {
		if ctx.Err() != nil {
			return err // interrupted or timed out: the logs say nothing new
		}
		fmt.Fprintf(os.Stderr, "\nThe daemons' last log lines:\n%s\n", env.LogTail(15))
		return err
	}
	return nil
}

func demo(ctx context.Context, env *testenv.Env, cli, tmp string) error {
	step("Preparing the python image (Debian bookworm minbase + python3), cache %s", testimages.CacheDir())
	t := time.Now()
	pushed, err := env.PushImage(ctx, testimages.Python)
	if err != nil {
		return err
	}
	if pushed.Built {
		detail("built it in %s (debootstrap and apt-get install python3) and cached it", pushed.BuildTime.Round(time.Second))
	} else {
		detail("taken from the cache")
	}
	detail("pushed %s: %d layers, %s compressed, in %s (step took %s)", pushed.Ref, pushed.Layers,
		mb(pushed.Bytes), pushed.PushTime.Round(time.Millisecond), since(t))

	step("Pulling %s into the lazycas snapshotter (containerd client, unpack)", pushed.Ref)
	t = time.Now()
	img, err := env.Pull(ctx, pushed.Ref, testenv.WithSnapshotLabels(pushed.Ref))
	if err != nil {
		return err
	}
	n := 0
	if err := env.Client.SnapshotService(testenv.Snapshotter).Walk(env.Context(ctx),
		func(context.Context, snapshots.Info) error { n++; return nil }); err != nil {
		return fmt.Errorf("list snapshots: %w", err)
	}
	detail("pulled and unpacked in %s: %d layers, %s; lazycas now holds %d committed snapshots",
		since(t), pushed.Layers, mb(pushed.Bytes), n)

	step("Running python3 in a container on a lazycas snapshot (runc)")
	if err := runPython(ctx, env, img, "demo"); err != nil {
		return err
	}

	step("Deleting the image; containerd's garbage collector removes its snapshots from lazycas")
	t = time.Now()
	if err := env.Client.ImageService().Delete(env.Context(ctx), img.Name(), images.SynchronousDelete()); err != nil {
		return fmt.Errorf("delete image: %w", err)
	}
	left, _ := os.ReadDir(filepath.Join(env.DaemonRoot, "snapshots"))
	detail("deleted in %s; snapshot directories left in lazycas: %d", since(t), len(left))

	return demoLazy(ctx, env, cli, tmp, pushed)
}

// demoLazy converts the pushed image to eStargz with the lazycas CLI,
// pulls it into lazycas with the CLI and runs python from it.
func demoLazy(ctx context.Context, env *testenv.Env, cli, tmp string, pushed *testenv.Pushed) error {
	lazyRef := env.RegistryHost + "/python:estargz"
	prefetch := filepath.Join(tmp, "prefetch")
	if err := os.WriteFile(prefetch, []byte(strings.Join(testenv.PythonStartupFiles, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	step("Converting the image to eStargz with the lazycas CLI")
	detail("%s lists the %d files python reads first (the interpreter, libc, ...): they go first in each layer", prefetch, len(testenv.PythonStartupFiles))
	t := time.Now()
	if err := runCLI(ctx, env, cli, env.ConvertArgs(pushed.Ref, lazyRef, "--format", "estargz", "--prefetch", prefetch)); err != nil {
		return err
	}
	detail("converted and pushed in %s: each layer now ends with a table of contents (TOC) of its files,", since(t))
	detail("and the manifest pins each TOC by its digest; to any other snapshotter it is still a plain gzip image")

	step("Pulling it into lazycas with the lazycas CLI (it passes the image and layer labels CRI and nerdctl pass)")
	before, err := env.DaemonStats(ctx)
	if err != nil {
		return err
	}
	t = time.Now()
	pullStart := t
	if err := runCLI(ctx, env, cli, env.PullArgs(lazyRef)); err != nil {
		return err
	}
	pullTime := since(t)
	img, err := env.Client.GetImage(env.Context(ctx), lazyRef)
	if err != nil {
		return fmt.Errorf("the pulled image: %w", err)
	}
	lazy, total, err := lazyLayers(ctx, env, img)
	if err != nil {
		return err
	}
	switch lazy {
	case total:
		detail("In plain words: lazycas mounted all %d layers straight from the registry in %s. containerd", total, pullTime)
		detail("downloaded and unpacked none of them; lazycas read only each layer's TOC, checked against the")
		detail("manifest. File contents follow by default: the prefetch list and the files the image's")
		detail("entrypoint loads to start (from its config) at once, a file a container reads when it reads")
		detail("it, the rest in the background.")
	case 0:
		detail("In plain words: containerd downloaded and unpacked all %d layers into lazycas in %s, as for", total, pullTime)
		detail("any image: this lazycas build mounts no layer lazily (its log says why).")
	default:
		detail("In plain words: lazycas mounted %d of %d layers straight from the registry; containerd", lazy, total)
		detail("downloaded and unpacked the other %d (the lazycas log says why).", total-lazy)
	}

	step("Running python3 from the lazily pulled image")
	if err := runPython(ctx, env, img, "demo-lazy"); err != nil {
		return err
	}
	after, err := env.DaemonStats(ctx)
	if err != nil {
		return err
	}
	fetched := after.Fetch.BytesFetched - before.Fetch.BytesFetched
	size, err := img.Size(env.Context(ctx))
	if err != nil {
		return fmt.Errorf("size of %s: %w", lazyRef, err)
	}
	detail("from the start of the pull to python's exit: %s; lazycas had fetched %s of the image's %s",
		since(pullStart), mb(fetched), mb(size))
	detail("(TOCs, what python read, and what prefetch and background fetch had brought by then)")
	if lazy > 0 {
		detail("python read its files through lazycas's FUSE mounts: fetched from the registry after the mount")
		detail("and checked against the TOC's digests before python saw a byte")
		if err := demoRestart(ctx, env, img); err != nil {
			return err
		}
	}
	if err := env.DeleteImage(ctx, lazyRef); err != nil {
		return err
	}
	return nil
}

// readAllCode reads every file under /usr, most of them not fetched yet,
// and prints how many it read.
const readAllCode = `import os
n = 0
for d, _, files in os.walk("/usr"):
    for f in files:
        p = os.path.join(d, f)
        if not os.path.islink(p):
            with open(p, "rb") as fh:
                fh.read()
            n += 1
print(n)`

// demoRestart restarts lazycas while a container reads files of a lazy
// image, most of them not fetched yet: the container never notices.
func demoRestart(ctx context.Context, env *testenv.Env, img client.Image) error {
	step("Restarting lazycas while a container reads the lazily pulled image")
	type result struct {
		res *testenv.Result
		err error
	}
	done := make(chan result, 1)
	t := time.Now()
	go func() {
		res, err := env.Run(ctx, img, testenv.UniqueID("demo-restart"), "python3", "-c", readAllCode)
		done <- result{res, err}
	}()
	time.Sleep(700 * time.Millisecond) // the container is reading by now
	select {
	case got := <-done:
		return fmt.Errorf("the container was done before the restart (%v): nothing to show", got.err)
	default:
	}
	r := time.Now()
	if err := env.RestartDaemon(ctx); err != nil {
		return err
	}
	restarted := since(r)
	got := <-done
	if got.err != nil {
		return got.err
	}
	if got.res.ExitCode != 0 {
		return fmt.Errorf("the container reading across the restart exited %d: %s", got.res.ExitCode, got.res.Stderr)
	}
	detail("the container read %s files in %s; %s after it started, lazycas was stopped (SIGTERM) and",
		strings.TrimSpace(got.res.Stdout), since(t), r.Sub(t).Round(time.Millisecond))
	detail("started again (%s): its reads waited meanwhile, then went on, with no error", restarted)
	detail("(a small fuse-holder process kept the FUSE mounts; the new daemon took them over)")
	return nil
}

// runPython runs pythonCode in a new container of img and shows what it
// printed and how long it took.
func runPython(ctx context.Context, env *testenv.Env, img client.Image, id string) error {
	t := time.Now()
	res, err := env.Run(ctx, img, testenv.UniqueID(id), "python3", "-c", pythonCode)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(strings.TrimRight(res.Stdout, "\n"), "\n") {
		detail("container says: %s", line)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("python3 exited with status %d: %s", res.ExitCode, strings.TrimSpace(res.Stderr))
	}
	detail("exit status 0 after %s (container created, run and deleted)", since(t))
	return nil
}

// runCLI runs the lazycas CLI, shows the command and prints what it says.
func runCLI(ctx context.Context, env *testenv.Env, cli string, args []string) error {
	detail("$ lazycas %s", strings.Join(args, " "))
	stdout, stderr, err := env.RunCLI(ctx, cli, args...)
	for _, out := range []string{stderr, stdout} {
		if out = strings.TrimRight(out, "\n"); out != "" {
			for _, line := range strings.Split(out, "\n") {
				detail("  %s", line)
			}
		}
	}
	return err
}

// lazyLayers counts the image's layers that lazycas holds as remote
// (lazily mounted) snapshots, and all its layers.
func lazyLayers(ctx context.Context, env *testenv.Env, img client.Image) (lazy, total int, err error) {
	diffIDs, err := img.RootFS(env.Context(ctx))
	if err != nil {
		return 0, 0, fmt.Errorf("layers of %s: %w", img.Name(), err)
	}
	sn := env.Client.SnapshotService(testenv.Snapshotter)
	// ChainIDs overwrites its argument, and the client caches diffIDs.
	for _, chainID := range identity.ChainIDs(slices.Clone(diffIDs)) {
		info, err := sn.Stat(env.Context(ctx), chainID.String())
		if err != nil {
			return 0, 0, fmt.Errorf("snapshot %s: %w", chainID, err)
		}
		if info.Labels[snapshot.LabelRemote] != "" {
			lazy++
		}
	}
	return lazy, len(diffIDs), nil
}

// buildCommand builds ./cmd/<name> from the repository in the working
// directory into dir.
func buildCommand(ctx context.Context, dir, name, why string) (string, error) {
	step("Building %s (%s)", name, why)
	t := time.Now()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "./cmd/"+name)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s (run the demo from the repository root): %w\n%s", name, err, out)
	}
	detail("built in %s", since(t))
	return filepath.Join(dir, name), nil
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

func step(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func detail(format string, args ...any) {
	fmt.Printf("    "+format+"\n", args...)
}

func since(t time.Time) time.Duration {
	return time.Since(t).Round(time.Millisecond)
}

func mb(n int64) string {
	return fmt.Sprintf("%.1f MB", float64(n)/1e6)
}
