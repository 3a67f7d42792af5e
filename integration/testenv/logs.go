package testenv

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// logFiles are the environment's logs and configs, in reading order.
var logFiles = []string{registryLog, daemonLog, containerdLog,
	"registry.yml", "lazycas.toml", "containerd.toml"}

// LogPaths returns the paths of the registry, lazycas and containerd logs.
// They live in the work directory and go away with Close: use SaveLogs to
// keep them.
func (e *Env) LogPaths() []string {
	return []string{
		filepath.Join(e.Dir, registryLog),
		filepath.Join(e.Dir, daemonLog),
		filepath.Join(e.Dir, containerdLog),
	}
}

// LogTail returns the last n lines of each daemon's log, each headed by
// its path.
func (e *Env) LogTail(n int) string {
	var b strings.Builder
	for _, p := range e.LogPaths() {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		fmt.Fprintf(&b, "--- last %d lines of %s\n%s\n", len(lines), p, strings.Join(lines, "\n"))
	}
	return b.String()
}

// SaveLogs copies the logs and configs into dst, which it creates.
func (e *Env) SaveLogs(dst string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	for _, name := range logFiles {
		if err := copyFile(filepath.Join(e.Dir, name), filepath.Join(dst, name)); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("save %s: %w", name, err)
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
