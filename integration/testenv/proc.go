package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// process is a daemon the environment started, with its output in a log
// file. Each runs in its own process group so that a Ctrl-C at the terminal
// reaches only the caller, which then stops everything in order; if the
// caller dies, the kernel kills the daemon (Pdeathsig).
type process struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{} // closed when the process has exited
	err  error         // Wait's result, valid after done
}

// startProcess starts bin with args, writing stdout and stderr to logPath
// (appending, so a restarted daemon keeps its earlier log).
func startProcess(name, logPath, bin string, args ...string) (*process, error) {
	return startProcessEnv(name, logPath, bin, daemonEnv(), args...)
}

// startProcessEnv is startProcess with the environment env.
func startProcessEnv(name, logPath, bin string, env []string, args ...string) (*process, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	fmt.Fprintf(lf, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: lf, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// daemonEnv is the caller's environment with the sbin directories on PATH
// (runc lives in /usr/sbin on Debian).
func daemonEnv() []string {
	env := os.Environ()
	path := os.Getenv("PATH")
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if !strings.Contains(":"+path+":", ":"+d+":") {
			path += ":" + d
		}
	}
	return append(env, "PATH="+strings.TrimPrefix(path, ":"))
}

// exited reports whether the process has ended, with its exit error.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// stop sends SIGTERM and waits up to grace, then kills the process group.
// It returns an error when the process had to be killed or exited badly.
func (p *process) stop(grace time.Duration) error {
	if p == nil {
		return nil
	}
	if done, _ := p.exited(); done {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		var ee *exec.ExitError
		if p.err != nil && !(errors.As(p.err, &ee) && ee.ExitCode() == -1) {
			return fmt.Errorf("%s exited after SIGTERM: %w", p.name, p.err)
		}
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s (pid %d) survived SIGKILL for 10s", p.name, p.cmd.Process.Pid)
	}
	return fmt.Errorf("%s ignored SIGTERM for %s and was killed", p.name, grace)
}

// waitFor polls ready every 50 ms until it returns nil, the process exits,
// or timeout passes; the last error explains a failure.
func (p *process) waitFor(timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if done, werr := p.exited(); done {
			return fmt.Errorf("%s exited before it was ready (%v): %w", p.name, werr, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %w", p.name, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
