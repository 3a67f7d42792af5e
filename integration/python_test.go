package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// pullPython pushes the python image into env's registry and pulls it into
// lazycas, passing the labels CRI and nerdctl pass.
func pullPython(ctx context.Context, t *testing.T, env *testenv.Env) client.Image {
	t.Helper()
	pushed, err := env.PushImage(ctx, testimages.Python)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	img, err := env.Pull(ctx, pushed.Ref, testenv.WithSnapshotLabels(pushed.Ref))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pulled %s (%d layers, %d bytes; built=%v, push %s) in %s", pushed.Ref, pushed.Layers,
		pushed.Bytes, pushed.Built, pushed.PushTime.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	return img
}

// runPython runs python3 -c code in a fresh container and expects exit 0.
func runPython(ctx context.Context, t *testing.T, env *testenv.Env, img client.Image, code string) string {
	t.Helper()
	res, err := env.Run(ctx, img, testenv.UniqueID("py"), "python3", "-c", code)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("python3 exited %d\nstdout: %s\nstderr: %s", res.ExitCode, res.Stdout, res.Stderr)
	}
	return res.Stdout
}

func TestPythonImageRuns(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	img := pullPython(ctx, t, env)
	out := runPython(ctx, t, env, img, `import os, sys
print("hello from", sys.version.split()[0])
# The python3 layer deleted the base layer's bootstrap log: the whiteout hides it.
print("bootstrap.log visible:", os.path.exists("/var/log/bootstrap.log"))
print("dpkg status present:", os.path.exists("/var/lib/dpkg/status"))`)
	want := "hello from 3.11"
	if !strings.HasPrefix(out, want) {
		t.Errorf("output %q does not start with %q", out, want)
	}
	for _, line := range []string{"bootstrap.log visible: False", "dpkg status present: True"} {
		if !strings.Contains(out, line) {
			t.Errorf("output %q lacks %q", out, line)
		}
	}
}

func TestTwoContainersOfOneImageRunAtOnce(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	img := pullPython(ctx, t, env)
	// Each writes its name to the same path, waits until both have, and
	// reads it back: a shared rootfs would show the other's name.
	code := `import sys, time
open("/who", "w").write(sys.argv[1])
time.sleep(2)
print(open("/who").read())`
	names := []string{"first", "second"}
	outs := make([]string, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := env.Run(ctx, img, testenv.UniqueID(n), "python3", "-c", code, n)
			if err == nil && res.ExitCode != 0 {
				err = fmt.Errorf("exit %d: %s", res.ExitCode, res.Stderr)
			}
			if res != nil {
				outs[i] = res.Stdout
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, n := range names {
		if errs[i] != nil {
			t.Errorf("container %s: %v", n, errs[i])
		} else if outs[i] != n+"\n" {
			t.Errorf("container %s read %q from its own rootfs", n, outs[i])
		}
	}
}

func TestDaemonRestartBetweenPullAndRun(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	img := pullPython(ctx, t, env)
	before := countSnapshots(ctx, t, env)
	start := time.Now()
	if err := env.RestartDaemon(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("lazycas restarted in %s", time.Since(start).Round(time.Millisecond))
	if after := countSnapshots(ctx, t, env); after != before {
		t.Errorf("%d snapshots after the restart, %d before", after, before)
	}
	if out := runPython(ctx, t, env, img, `print(6 * 7)`); out != "42\n" {
		t.Errorf("python printed %q after a daemon restart, want 42", out)
	}
}

// countSnapshots counts the snapshots lazycas itself reports.
func countSnapshots(ctx context.Context, t *testing.T, env *testenv.Env) int {
	t.Helper()
	sn, closeFn, err := env.DaemonSnapshotter()
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	n := 0
	if err := sn.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil }); err != nil {
		t.Fatalf("list lazycas snapshots: %v", err)
	}
	return n
}

func TestRemovingContainersAndImageLeavesNothing(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	img := pullPython(ctx, t, env)
	runPython(ctx, t, env, img, `open("/tmp/scratch", "w").write("x" * 4096)`)
	// One container that never ran keeps its snapshot until deleted.
	c, err := env.NewContainer(ctx, img, testenv.UniqueID("idle"), "true")
	if err != nil {
		t.Fatal(err)
	}
	// containerd's view: the finished container's snapshot is gone from
	// its metadata at once, but lazycas removes it only at the next GC.
	n := 0
	if err := env.Client.SnapshotService(testenv.Snapshotter).Walk(env.Context(ctx),
		func(context.Context, snapshots.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("containerd lists %d lazycas snapshots with two layers and one container, want 3", n)
	}
	if err := env.DeleteContainer(ctx, c); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.ImageService().Delete(env.Context(ctx), img.Name(), images.SynchronousDelete()); err != nil {
		t.Fatalf("delete image: %v", err)
	}

	snapDir := filepath.Join(env.DaemonRoot, "snapshots")
	var left []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		left = nil
		ents, err := os.ReadDir(snapDir)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		for _, e := range ents {
			left = append(left, e.Name())
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Errorf("snapshot directories left in %s after garbage collection: %v", snapDir, left)
	}
	if n := countSnapshots(ctx, t, env); n != 0 {
		t.Errorf("lazycas still lists %d snapshots", n)
	}
	mounts, err := env.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) > 0 {
		t.Errorf("mounts left under the environment: %v", mounts)
	}
}
