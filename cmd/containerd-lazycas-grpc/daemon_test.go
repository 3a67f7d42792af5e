package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// daemonBin is the daemon built once by TestMain.
var daemonBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "lazycas-daemon-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		daemonBin = filepath.Join(dir, "containerd-lazycas-grpc")
		out, err := exec.Command("go", "build", "-o", daemonBin, ".").CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build daemon: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}())
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root: the daemon makes real overlay mounts")
	}
}

// daemon is a running containerd-lazycas-grpc process.
type daemon struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan error
}

// startDaemon runs the daemon on root and waits until its socket answers.
func startDaemon(t testing.TB, root, address string, extraArgs ...string) (*daemon, error) {
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, nil, 0o600); err != nil {
		return nil, err
	}
	args := append([]string{"--config", cfg, "--root", root, "--address", address, "--log-level", "debug"}, extraArgs...)
	d := &daemon{cmd: exec.Command(daemonBin, args...), stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	d.cmd.Stderr = d.stderr
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { d.done <- d.cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		conn, err := net.DialTimeout("unix", address, time.Second)
		if err == nil {
			conn.Close()
			return d, nil
		}
		select {
		case werr := <-d.done:
			return nil, fmt.Errorf("daemon exited before serving: %v\n%s", werr, d.stderr)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.kill()
			return nil, fmt.Errorf("daemon did not serve %s within 20s\n%s", address, d.stderr)
		}
	}
}

// stop sends SIGTERM and expects a clean exit within 15 s.
func (d *daemon) stop() error {
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case err := <-d.done:
		if err != nil {
			return fmt.Errorf("daemon exit: %w\n%s", err, d.stderr)
		}
		return nil
	case <-time.After(15 * time.Second):
		d.kill()
		return fmt.Errorf("daemon ignored SIGTERM for 15s\n%s", d.stderr)
	}
}

func (d *daemon) kill() {
	_ = d.cmd.Process.Kill()
	<-d.done
}

func dialSnapshotter(address string) (snapshots.Snapshotter, *grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazycas"), conn, nil
}

// TestConformanceOverGRPC runs containerd's snapshotter conformance suite
// against a running daemon through its socket, as containerd's proxy
// plugin sees it.
func TestConformanceOverGRPC(t *testing.T) {
	requireRoot(t)
	// "overlayfs": see snapshot.suiteName for the one rename overlayfs cannot do.
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		address := filepath.Join(filepath.Dir(root), "lazycas.sock")
		d, err := startDaemon(t, root, address)
		if err != nil {
			return nil, nil, err
		}
		sn, conn, err := dialSnapshotter(address)
		if err != nil {
			d.kill()
			return nil, nil, err
		}
		return sn, func() error {
			conn.Close()
			return d.stop()
		}, nil
	})
}

func TestSnapshotsSurviveRestart(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dir := t.TempDir()
	root, address := filepath.Join(dir, "root"), filepath.Join(dir, "s.sock")

	d, err := startDaemon(t, root, address)
	if err != nil {
		t.Fatal(err)
	}
	sn, conn, err := dialSnapshotter(address)
	if err != nil {
		t.Fatal(err)
	}
	mounts, err := sn.Prepare(ctx, "layer-active", "")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "hello"), []byte("kept"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "layer", "layer-active"); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	// A crash, not a clean stop: the socket file stays behind.
	d.kill()

	d, err = startDaemon(t, root, address)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d.stop(); err != nil {
			t.Error(err)
		}
	}()
	sn, conn, err = dialSnapshotter(address)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	view, err := sn.View(ctx, "view", "layer")
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(view, target); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(target, 0)
	got, err := os.ReadFile(filepath.Join(target, "hello"))
	if err != nil || string(got) != "kept" {
		t.Fatalf("after restart read %q, %v; want %q", got, err, "kept")
	}
}

func TestRejectsBadStart(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root, address := filepath.Join(dir, "root"), filepath.Join(dir, "busy.sock")
	running, err := startDaemon(t, root, address)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := running.stop(); err != nil {
			t.Error(err)
		}
	}()
	notSocket := write("plain-file", "")
	otherRoot := filepath.Join(dir, "other-root")

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"an explicit config file that does not exist", []string{"--config", filepath.Join(dir, "missing.toml")}, "no such file"},
		{"an unknown config key", []string{"--config", write("typo.toml", "log_levl = \"debug\"\n")}, `unknown key "log_levl"`},
		{"a config value of the wrong type", []string{"--config", write("type.toml", "[snapshotter]\nasync_remove = \"yes\"\n")}, `"snapshotter.async_remove"`},
		{"an invalid log level", []string{"--config", write("level.toml", "log_level = \"loud\"\n")}, `key "log_level"`},
		{"a relative root", []string{"--config", write("ok.toml", ""), "--root", "relative/root"}, `key "root"`},
		{"a socket path in use", []string{"--config", write("ok2.toml", ""), "--root", otherRoot, "--address", address}, "in use by another process"},
		{"a socket path that is a regular file", []string{"--config", write("ok3.toml", ""), "--root", otherRoot, "--address", notSocket}, "not a socket"},
		{"a root another daemon holds", []string{"--config", write("ok4.toml", ""), "--root", root, "--address", filepath.Join(dir, "other.sock")}, "locked by another process"},
		{"a stray argument", []string{"serve"}, "unexpected arguments"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, daemonBin, tc.args...).CombinedOutput()
			if err == nil {
				t.Fatalf("daemon started; output:\n%s", out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("error does not say %q:\n%s", tc.want, out)
			}
			if strings.Contains(string(out), "goroutine ") {
				t.Errorf("daemon panicked:\n%s", out)
			}
		})
	}
	if _, err := os.Stat(otherRoot); err == nil {
		t.Errorf("a daemon that could not take its socket created its root %s", otherRoot)
	}
}

func TestHelpExitsZero(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"fuse-holder", "--help"}} {
		out, err := exec.Command(daemonBin, args...).CombinedOutput()
		if err != nil {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
		if !strings.Contains(string(out), "Usage") {
			t.Errorf("%v printed no usage: %s", args, out)
		}
	}
}
