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
	// Neither stopping the daemon nor containerd's death ends the FUSE
	// holder, if the daemon runs one: Close must.
	holder := env.HolderPID()
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
	checkHoldersGone(t, env, holder)
}

// checkHoldersGone asserts that the FUSE holder env's daemon had before
// Close (pid holder, 0 for none), and any holder naming env's directories,
// are gone after it.
func checkHoldersGone(t *testing.T, env *testenv.Env, holder int) {
	t.Helper()
	if holder != 0 && processAlive(holder) {
		t.Errorf("the FUSE holder %d survived Close", holder)
	}
	left, err := testenv.HolderProcesses(env.Dir, env.RunDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, pid := range left {
		t.Errorf("FUSE holder %d of the closed environment still runs", pid)
	}
}

// killProcessesWith SIGKILLs the processes whose command line contains s.
// A FUSE holder is never among them, even when its arguments contain s: a
// test that kills one daemon means to leave the holder to Close.
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
		if strings.Contains(string(cmdline), s) && !isHolderCmdline(cmdline) {
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

// isHolderCmdline reports whether a /proc/PID/cmdline is a lazycas FUSE
// holder's ("containerd-lazycas-grpc fuse-holder ...").
func isHolderCmdline(cmdline []byte) bool {
	for _, a := range strings.Split(string(cmdline), "\x00") {
		if a == "fuse-holder" {
			return true
		}
	}
	return false
}
