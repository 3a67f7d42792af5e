package integration

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/lazycas/lazycas/integration/testenv"
)

// daemonBin is the lazycas daemon and cliBin the lazycas CLI that TestMain
// builds once.
var daemonBin, cliBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() || os.Geteuid() != 0 {
		os.Exit(m.Run()) // every test skips
	}
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "lazycas-integration-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/containerd-lazycas-grpc", "./cmd/lazycas")
		cmd.Dir = ".." // the repository root
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build lazycas daemon and CLI: %v\n%s", err, out)
			return 1
		}
		daemonBin = filepath.Join(dir, "containerd-lazycas-grpc")
		cliBin = filepath.Join(dir, "lazycas")
		return m.Run()
	}())
}

// requireIntegration skips unless the test may start real daemons.
func requireIntegration(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: starts containerd, a registry and lazycas; not with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("requires root")
	}
}

// testContext is a context bounded well inside go test's own timeout.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newEnv starts an environment for t and stops it when t ends. When t
// failed, the logs are kept in a directory whose path is logged, and their
// tails are printed.
func newEnv(t *testing.T) *testenv.Env {
	t.Helper()
	return newEnvWith(t, testenv.Options{})
}

// newEnvWith is newEnv with opts; their WorkDir, DaemonPath and Logf are
// filled in.
func newEnvWith(t *testing.T, opts testenv.Options) *testenv.Env {
	t.Helper()
	requireIntegration(t)
	start := time.Now()
	opts.WorkDir, opts.DaemonPath, opts.Logf = t.TempDir(), daemonBin, t.Logf
	env, err := testenv.Start(testContext(t), opts)
	if err != nil {
		t.Fatalf("start test environment: %v", err)
	}
	t.Logf("environment up in %s: registry %s, containerd %s, lazycas %s (root %s)",
		time.Since(start).Round(time.Millisecond), env.RegistryHost, env.ContainerdAddress,
		env.DaemonAddress, env.DaemonRoot)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon logs:\n%s", env.LogTail(40))
			if keep, err := os.MkdirTemp("", "lazycas-integration-logs-"); err == nil {
				if err := env.SaveLogs(keep); err == nil {
					t.Logf("full logs kept in %s", keep)
				}
			}
		}
		if err := env.Close(); err != nil {
			t.Errorf("close test environment: %v", err)
		}
	})
	return env
}
