package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lazycas/lazycas/integration/testenv"
)

// The built-in peer: stargz-snapshotter's daemon, built from its published
// Go module by script/bench/stargz (a module of its own, so that lazycas's
// go.mod does not carry it), run by the benchmark on a root of its own and
// restarted on an empty root before every cold run, as lazycas is. It pulls
// with the labels CRI sends, like lazycas, and reaches the registry
// through the same proxies (its resolver config lists them all).
const (
	stargzName   = "stargz"
	stargzModule = "script/bench/stargz"
)

// stargzPeer is the running peer daemon.
type stargzPeer struct {
	bin    string
	dir    string // holds root/, the socket, the config and the log
	config string // TOML, stargz-snapshotter's service.Config
	proc   *exec.Cmd
	done   chan struct{}
}

func (p *stargzPeer) root() string   { return filepath.Join(p.dir, "root") }
func (p *stargzPeer) socket() string { return filepath.Join(p.dir, "stargz.sock") }
func (p *stargzPeer) logPath() string {
	return filepath.Join(p.dir, "stargz.log")
}

func (p *stargzPeer) spec() peerSpec {
	return peerSpec{Name: stargzName, Socket: p.socket(), Labels: labelsCRI}
}

// buildStargz builds the peer's daemon into dir. The module's
// dependencies come from the Go module proxy (GOFLAGS=-mod=mod is not
// needed: its go.sum is committed).
func buildStargz(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "stargz-grpc")
	abs, err := filepath.Abs(stargzModule)
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, goBinary(), "build", "-o", bin, ".")
	cmd.Dir = abs
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build stargz-snapshotter's daemon (%s): %w\n%s", stargzModule, err, out)
	}
	return bin, nil
}

// newStargzPeer prepares the peer in dir; start runs it.
func newStargzPeer(bin, dir string) (*stargzPeer, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return &stargzPeer{bin: bin, dir: dir}, nil
}

// setRegistries writes the resolver config: each address is a plain-HTTP
// registry. The peer reads it at its next start.
func (p *stargzPeer) setRegistries(addrs []string) {
	var b strings.Builder
	for _, a := range addrs {
		fmt.Fprintf(&b, "[[resolver.host.%q.mirrors]]\nhost = %q\ninsecure = true\n\n", a, a)
	}
	p.config = b.String()
}

// stopAndEmpty stops the daemon (it unmounts its layers) and removes its
// root, so that its next start is on a node that never pulled anything.
func (p *stargzPeer) stopAndEmpty() error {
	if err := p.stop(); err != nil {
		return err
	}
	// A layer the daemon failed to unmount is unmounted here;
	// RemoveLeftovers never removes through a mount.
	if err := testenv.RemoveLeftovers(p.root(), ""); err != nil {
		return fmt.Errorf("stargz peer: empty its root: %w", err)
	}
	return nil
}

func (p *stargzPeer) start(ctx context.Context) error {
	cfgPath := filepath.Join(p.dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(p.config), 0o644); err != nil {
		return err
	}
	lf, err := os.OpenFile(p.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(lf, "=== %s: start\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.bin, "-root", p.root(), "-address", p.socket(), "-config", cfgPath, "-log-level", "warn")
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return fmt.Errorf("start the stargz peer: %w", err)
	}
	p.proc, p.done = cmd, make(chan struct{})
	done := p.done
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(done)
	}()
	// Ready when it answers a Walk.
	deadline := time.Now().Add(30 * time.Second)
	for {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		sn, closeFn, err := peerSnapshotter(p.spec())
		if err == nil {
			_, err = walkPeer(wctx, sn)
			closeFn()
		}
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("the stargz peer exited at start (log %s): %v", p.logPath(), err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the stargz peer not ready after 30s: %w", err)
		}
	}
}

// stop sends SIGTERM (the daemon closes its snapshotter, unmounting its
// layers) and kills it after 30 s.
func (p *stargzPeer) stop() error {
	if p.proc == nil {
		return nil
	}
	defer func() { p.proc = nil }()
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.proc.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(30 * time.Second):
	}
	_ = syscall.Kill(-p.proc.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
		return errors.New("the stargz peer ignored SIGTERM for 30s and was killed")
	case <-time.After(10 * time.Second):
		return fmt.Errorf("the stargz peer (pid %d) survived SIGKILL", p.proc.Process.Pid)
	}
}

func (p *stargzPeer) pid() int {
	if p.proc == nil || p.proc.Process == nil {
		return 0
	}
	return p.proc.Process.Pid
}

// close stops the daemon and removes its directory.
func (p *stargzPeer) close() error {
	return errors.Join(p.stop(), testenv.RemoveLeftovers(p.dir, ""))
}

// stargzNote is the report's note on the built-in peer.
func stargzNote() string {
	return "stargz is stargz-snapshotter " + stargzVersion() + " (its service, snapshot and fs packages, default config: " +
		"prefetch of landmarked files, background fetch on), built from its Go module by " + stargzModule +
		", restarted on an empty root before each cold run and pulling with the labels CRI sends; " +
		"its peak RSS is its own since that restart"
}

// stargzVersion is the stargz-snapshotter version script/bench/stargz
// requires.
func stargzVersion() string {
	b, err := os.ReadFile(filepath.Join(stargzModule, "go.mod"))
	if err != nil {
		return "(version unknown)"
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == "github.com/containerd/stargz-snapshotter" {
			return f[1]
		}
	}
	return "(version unknown)"
}
