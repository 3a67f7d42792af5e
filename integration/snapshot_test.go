package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

func TestContainerWritesLandInItsUpperDirOnly(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	pushed, err := env.PushImage(ctx, testimages.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	img, err := env.Pull(ctx, pushed.Ref)
	if err != nil {
		t.Fatal(err)
	}

	writer := testenv.UniqueID("writer")
	c, err := env.NewContainer(ctx, img, writer, "sh", "-c", "echo written-by-writer > /hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.DeleteContainer(ctx, c) })
	res, err := env.RunTask(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("writer exited %d: %s", res.ExitCode, res.Stderr)
	}

	// The container's snapshot key is its ID (testenv.NewContainer).
	mounts, err := env.Client.SnapshotService(testenv.Snapshotter).Mounts(env.Context(ctx), writer)
	if err != nil {
		t.Fatalf("mounts of the writer's snapshot: %v", err)
	}
	if len(mounts) != 1 || mounts[0].Type != "overlay" {
		t.Fatalf("writer's snapshot mounts %+v, want one overlay mount", mounts)
	}
	var upper string
	var lowers []string
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			upper = v
		}
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			lowers = strings.Split(v, ":")
		}
	}
	if upper == "" || len(lowers) == 0 {
		t.Fatalf("overlay options %q lack upperdir or lowerdir", mounts[0].Options)
	}
	if rel, err := filepath.Rel(filepath.Join(env.DaemonRoot, "snapshots"), upper); err != nil || strings.HasPrefix(rel, "..") {
		t.Errorf("upperdir %s is not under %s/snapshots", upper, env.DaemonRoot)
	}
	got, err := os.ReadFile(filepath.Join(upper, "hello.txt"))
	if err != nil {
		t.Fatalf("the container's file is not in its upper dir: %v", err)
	}
	if string(got) != "written-by-writer\n" {
		t.Errorf("upper dir holds %q", got)
	}
	for _, l := range lowers {
		if _, err := os.Stat(filepath.Join(l, "hello.txt")); err == nil {
			t.Errorf("the container's write reached image layer %s", l)
		}
	}

	res, err = env.Run(ctx, img, testenv.UniqueID("reader"), "sh", "-c",
		"if [ -e /hello.txt ]; then echo present; else echo absent; fi")
	if err != nil {
		t.Fatal(err)
	}
	if res.Stdout != "absent\n" {
		t.Errorf("a second container of the image sees the first one's file: %q", res.Stdout)
	}
}
