package integration

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/cio"

	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// The environment itself: Close must leave nothing behind even when a
// container is still running.
func TestEnvCloseStopsRunningContainersAndRemovesEverything(t *testing.T) {
	requireIntegration(t)
	for _, tc := range []struct {
		name           string
		killContainerd bool
	}{
		{"after a clean run", false},
		{"after containerd died", true},
	} {
		t.Run(tc.name, func(t *testing.T) { testEnvClose(t, tc.killContainerd) })
	}
}

func testEnvClose(t *testing.T, killContainerd bool) {
	requireIntegration(t)
	ctx := testContext(t)
	env, err := testenv.Start(ctx, testenv.Options{WorkDir: t.TempDir(), DaemonPath: daemonBin, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = env.Close()
		}
	})
	pushed, err := env.PushImage(ctx, testimages.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	img, err := env.Pull(ctx, pushed.Ref)
	if err != nil {
		t.Fatal(err)
	}
	c, err := env.NewContainer(ctx, img, testenv.UniqueID("sleeper"), "sleep", "600")
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
	pid := int(task.Pid())
	mounts, err := env.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) == 0 {
		t.Error("a running container has no rootfs mount under the environment")
	}

	if killContainerd {
		// Shims and mounts outlive containerd: Close must find them itself.
		killProcessesWith(t, env.Dir+"/containerd.toml")
	}
	closed = true
	start := time.Now()
	err = env.Close()
	t.Logf("Close took %s (error: %v)", time.Since(start).Round(time.Millisecond), err)
	if err != nil && !killContainerd {
		t.Fatalf("close: %v", err)
	}
	if cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); err == nil &&
		strings.Contains(string(cmdline), "sleep") {
		t.Errorf("the container's process %d survived Close", pid)
	}
	for _, d := range []string{env.Dir, env.RunDir} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still exists after Close (%v)", d, err)
		}
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(string(cmdline), env.ContainerdAddress) {
			t.Errorf("process %s still runs for this environment: %q", e.Name(), cmdline)
		}
	}
}

// killProcessesWith SIGKILLs the processes whose command line contains s.
func killProcessesWith(t *testing.T, s string) {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(string(cmdline), s) {
			if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
				n++
			}
		}
	}
	if n == 0 {
		t.Fatalf("no process with %q to kill", s)
	}
	time.Sleep(100 * time.Millisecond)
}
