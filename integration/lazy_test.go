package integration

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/opencontainers/image-spec/identity"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
	"github.com/lazycas/lazycas/snapshot"
)

// convertPython pushes the python image and converts it in the registry to
// format, returning the converted reference.
func convertPython(ctx context.Context, t *testing.T, env *testenv.Env, format convert.Format, prefetch []string) string {
	t.Helper()
	pushed, err := env.PushImage(ctx, testimages.Python)
	if err != nil {
		t.Fatal(err)
	}
	dst := env.RegistryHost + "/python:" + string(format)
	start := time.Now()
	if _, err := convert.Convert(ctx, pushed.Ref, dst, convert.Options{
		Format: format, Prefetch: prefetch, Resolver: env.Resolver(), TempDir: env.Dir,
	}); err != nil {
		t.Fatalf("convert to %s: %v", format, err)
	}
	t.Logf("converted %s to %s in %s", pushed.Ref, format, time.Since(start).Round(time.Millisecond))
	return dst
}

// lazyMounts lists the lazycas FUSE mounts under the daemon's root.
func lazyMounts(t *testing.T, env *testenv.Env) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && f[2] == "fuse.lazycas" && strings.HasPrefix(f[1], env.DaemonRoot) {
			out = append(out, f[0]+" "+f[1])
		}
	}
	return out
}

// checkRemote asserts every layer of img is a committed remote snapshot
// with its own lazycas FUSE mount.
func checkRemote(ctx context.Context, t *testing.T, env *testenv.Env, img client.Image) int {
	t.Helper()
	diffIDs, err := img.RootFS(env.Context(ctx))
	if err != nil {
		t.Fatal(err)
	}
	sn := env.Client.SnapshotService(testenv.Snapshotter)
	for i := range diffIDs {
		chain := identity.ChainID(diffIDs[:i+1]).String()
		info, err := sn.Stat(env.Context(ctx), chain)
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		if info.Kind != snapshots.KindCommitted || info.Labels[snapshot.LabelRemote] == "" {
			t.Errorf("layer %d (%s) is not a remote snapshot: %+v", i, chain, info)
		}
	}
	if n := len(lazyMounts(t, env)); n < len(diffIDs) {
		t.Errorf("%d lazycas FUSE mounts for %d layers", n, len(diffIDs))
	}
	return len(diffIDs)
}

// deleteImage removes the image; containerd's garbage collector then
// removes its snapshots, which must unmount every lazy layer.
func deleteImage(ctx context.Context, t *testing.T, env *testenv.Env, ref string) {
	t.Helper()
	if err := env.Client.ImageService().Delete(env.Context(ctx), ref, images.SynchronousDelete()); err != nil {
		t.Fatal(err)
	}
	if m := lazyMounts(t, env); len(m) != 0 {
		t.Errorf("lazy mounts left after the image was deleted: %v", m)
	}
}

const lazyPythonCheck = `import hashlib, os, sys
h = hashlib.sha256(open(sys.executable, "rb").read()).hexdigest()
print("python", sys.version.split()[0], h[:12])
print("bootstrap.log visible:", os.path.exists("/var/log/bootstrap.log"))`

func checkPythonOutput(t *testing.T, out string) {
	t.Helper()
	if !strings.HasPrefix(out, "python 3.11") || !strings.Contains(out, "bootstrap.log visible: False") {
		t.Fatalf("unexpected output %q", out)
	}
}

// TestLazyPullRunsPython pulls converted images with the labels CRI sends,
// and without any (as ctr or an unknown client): every layer must be
// mounted lazily (committed remote, a FUSE mount per layer, nothing
// unpacked), python must run from them, a restarted daemon must serve them
// again from its metadata, and deleting the image must unmount them.
func TestLazyPullRunsPython(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	for _, format := range []convert.Format{convert.EStargz, convert.ZstdChunked} {
		t.Run(string(format), func(t *testing.T) {
			ref := convertPython(ctx, t, env, format, []string{"usr/bin/python3.11"})
			start := time.Now()
			img, err := env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("lazy pull took %s", time.Since(start).Round(time.Millisecond))
			checkRemote(ctx, t, env, img)
			out := runPython(ctx, t, env, img, lazyPythonCheck)
			checkPythonOutput(t, out)

			if err := env.RestartDaemon(ctx); err != nil {
				t.Fatal(err)
			}
			checkRemote(ctx, t, env, img)
			if again := runPython(ctx, t, env, img, lazyPythonCheck); again != out {
				t.Errorf("after restart python printed %q, before %q", again, out)
			}
			deleteImage(ctx, t, env, ref)

			t.Run("without labels", func(t *testing.T) {
				img, err := env.Pull(ctx, ref)
				if err != nil {
					t.Fatal(err)
				}
				checkRemote(ctx, t, env, img)
				if again := runPython(ctx, t, env, img, lazyPythonCheck); again != out {
					t.Errorf("python printed %q, with labels %q", again, out)
				}
				deleteImage(ctx, t, env, ref)
			})
		})
	}
}
