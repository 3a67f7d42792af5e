package integration

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
	"github.com/lazycas/lazycas/snapshot"
)

// TestCompatContainerd2 serves containerd 2.x (testenv.Containerd2Version)
// instead of Debian's 1.6, in one environment: containerd must unpack
// ordinary images into lazycas and run them, and lazily pulled layers must
// be committed remote snapshots with FUSE mounts, whether the pull passes
// the CRI labels, none, or goes through 2.x's transfer service. Closing the
// environment must leave no process and no mount behind.
func TestCompatContainerd2(t *testing.T) {
	var running []int // container processes Close must stop
	env := newContainerd2Env(t, &running)
	ctx := testContext(t)

	t.Run("containerd is 2.x", func(t *testing.T) {
		v, err := env.Client.Version(env.Context(ctx))
		if err != nil {
			t.Fatal(err)
		}
		// go install sets no version ldflags: the daemon says "2.4.2+unknown".
		if !strings.HasPrefix(v.Version, strings.TrimPrefix(testenv.Containerd2Version, "v")) {
			t.Errorf("containerd reports version %q, want %s", v.Version, testenv.Containerd2Version)
		}
	})

	t.Run("busybox runs shell commands", func(t *testing.T) {
		pushed, err := env.PushImage(ctx, testimages.Busybox)
		if err != nil {
			t.Fatal(err)
		}
		img, err := env.Pull(ctx, pushed.Ref)
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			args   []string
			stdout string
			code   uint32
		}{
			{[]string{"sh", "-c", "echo hi"}, "hi\n", 0},
			{[]string{"sh", "-c", "echo bye; exit 3"}, "bye\n", 3},
			{[]string{"sh", "-c", "grep -c root /etc/passwd"}, "1\n", 0},
		} {
			res, err := env.Run(ctx, img, testenv.UniqueID("busybox"), tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if res.Stdout != tc.stdout || res.ExitCode != tc.code {
				t.Errorf("%q: got stdout %q exit %d (stderr %q), want %q exit %d",
					tc.args, res.Stdout, res.ExitCode, res.Stderr, tc.stdout, tc.code)
			}
		}
	})

	t.Run("python image runs", func(t *testing.T) {
		img := pullPython(ctx, t, env)
		out := runPython(ctx, t, env, img, `import os, sys
print("hello from", sys.version.split()[0])
print("bootstrap.log visible:", os.path.exists("/var/log/bootstrap.log"))
print("dpkg status present:", os.path.exists("/var/lib/dpkg/status"))`)
		for _, want := range []string{"hello from 3.11", "bootstrap.log visible: False", "dpkg status present: True"} {
			if !strings.Contains(out, want) {
				t.Errorf("output %q lacks %q", out, want)
			}
		}
	})

	t.Run("lazy pull", func(t *testing.T) {
		ref := convertPython(ctx, t, env, convert.EStargz, []string{"usr/bin/python3.11"})
		for _, tc := range []struct {
			name string
			pull func() (client.Image, error)
			// criLabels: whether lazycas must see the CRI labels.
			criLabels bool
		}{
			{"with CRI labels", func() (client.Image, error) {
				return env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
			}, true},
			{"without labels", func() (client.Image, error) { return env.Pull(ctx, ref) }, false},
			// containerd itself adds the labels, because the proxy plugin
			// exports enable_remote_snapshot_annotations.
			{"through the transfer service", func() (client.Image, error) { return env.PullWithTransfer(ctx, ref) }, true},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := len(snapshotCalls(t, env))
				start := time.Now()
				img, err := tc.pull()
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("lazy pull took %s; %s", time.Since(start).Round(time.Millisecond), fetchedLayers(ctx, t, env, img))
				layers := checkRemote(ctx, t, env, img)
				checkExtractLabels(t, snapshotCalls(t, env)[before:], layers, ref, tc.criLabels)
				checkPythonOutput(t, runPython(ctx, t, env, img, lazyPythonCheck))
				deleteImage(ctx, t, env, ref)
			})
		}

		// Left running on its FUSE lowers for Close to stop and unmount.
		t.Run("a container still runs when the environment closes", func(t *testing.T) {
			img, err := env.PullWithTransfer(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			c, err := env.NewContainer(ctx, img, testenv.UniqueID("sleeper"), "python3", "-c", "import time; time.sleep(600)")
			if err != nil {
				t.Fatal(err)
			}
			task, err := c.NewTask(env.Context(ctx), cio.NullIO)
			if err != nil {
				t.Fatal(err)
			}
			if err := task.Start(env.Context(ctx)); err != nil {
				t.Fatal(err)
			}
			running = append(running, int(task.Pid()))
			if len(lazyMounts(t, env)) == 0 {
				t.Error("no lazy mount under a running lazily pulled container")
			}
		})
	})
}

// newContainerd2Env starts an environment on containerd 2.x for t. It skips
// only when containerd 2.x cannot be built for lack of network.
// After env is closed it checks that nothing is left (checkNothingLeft) and
// that none of the processes in *running survived.
func newContainerd2Env(t *testing.T, running *[]int) *testenv.Env {
	t.Helper()
	requireIntegration(t)
	start := time.Now()
	if _, err := testenv.BuildContainerd2(testContext(t), t.Logf); errors.Is(err, testenv.ErrContainerd2Offline) {
		t.Skipf("containerd %s cannot be built without the Go module proxy: %v", testenv.Containerd2Version, err)
	} else if err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd %s ready in %s", testenv.Containerd2Version, time.Since(start).Round(time.Millisecond))
	var env *testenv.Env
	holder := 0
	// Registered first, so it runs after newEnvWith's cleanup closed env.
	t.Cleanup(func() {
		if env == nil {
			return
		}
		checkNothingLeft(t, env, holder)
		for _, pid := range *running {
			if processAlive(pid) {
				t.Errorf("container process %d survived Close", pid)
			}
		}
	})
	env = newEnvWith(t, testenv.Options{Containerd2: true, DaemonConfig: testenv.JSONLogConfig})
	// Runs before Close, while the pid file still names the holder.
	t.Cleanup(func() { holder = env.HolderPID() })
	return env
}

// fetchedLayers tells how many of img's layer blobs containerd holds in its
// content store (a 2.x unpacker skips fetching the layers a snapshotter
// reports as already there).
func fetchedLayers(ctx context.Context, t *testing.T, env *testenv.Env, img client.Image) string {
	t.Helper()
	cctx := env.Context(ctx)
	cs := env.Client.ContentStore()
	m, err := images.Manifest(cctx, cs, img.Target(), platforms.Default())
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range m.Layers {
		if _, err := cs.Info(cctx, l.Digest); err == nil {
			n++
		} else if !errdefs.IsNotFound(err) {
			t.Fatal(err)
		}
	}
	return strconv.Itoa(n) + " of " + strconv.Itoa(len(m.Layers)) + " layer blobs in containerd's content store"
}

func snapshotCalls(t *testing.T, env *testenv.Env) []testenv.SnapshotCall {
	t.Helper()
	calls, err := env.SnapshotCalls()
	if err != nil {
		t.Fatal(err)
	}
	return calls
}

// checkExtractLabels asserts that calls hold one layer Prepare ("extract-")
// per layer, each with the chain ID to commit as, and with the CRI labels
// naming ref exactly when criLabels.
func checkExtractLabels(t *testing.T, calls []testenv.SnapshotCall, layers int, ref string, criLabels bool) {
	t.Helper()
	n := 0
	for _, c := range calls {
		if c.Kind != "prepare" || !strings.Contains(c.Key, "extract-") {
			continue
		}
		n++
		if c.Labels[snapshot.LabelSnapshotRef] == "" {
			t.Errorf("Prepare %q without %s: %v", c.Key, snapshot.LabelSnapshotRef, c.Labels)
		}
		if got := c.Labels[snapshot.LabelImageRef]; criLabels && (got != ref || c.Labels[snapshot.LabelLayerDigest] == "") {
			t.Errorf("Prepare %q lacks the CRI labels for %s: %v", c.Key, ref, c.Labels)
		} else if !criLabels && got != "" {
			t.Errorf("Prepare %q has CRI labels that nobody sent: %v", c.Key, c.Labels)
		}
	}
	if n != layers {
		t.Errorf("lazycas saw %d layer Prepares for %d layers", n, layers)
	}
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

// checkNothingLeft asserts that no process of the closed env runs (its
// FUSE holder, pid holder or 0 when it had none, included) and no mount of
// it remains.
func checkNothingLeft(t *testing.T, env *testenv.Env, holder int) {
	t.Helper()
	checkHoldersGone(t, env, holder)
	marks := []string{env.Dir, env.RunDir, env.ContainerdAddress}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		for _, m := range marks {
			if strings.Contains(string(cmdline), m) {
				t.Errorf("process %s still runs for the closed environment: %q", e.Name(),
					strings.ReplaceAll(string(cmdline), "\x00", " "))
				break
			}
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, env.Dir) || strings.Contains(line, env.RunDir) {
			t.Errorf("mount left by the closed environment: %s", line)
		}
	}
}
