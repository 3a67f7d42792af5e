package testlayer

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// MountInfo is one line of /proc/self/mounts.
type MountInfo struct {
	Source, Target, FSType, Options string
}

// Mounts returns the mounts at or below dir, deepest last as listed.
func Mounts(dir string) ([]MountInfo, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []MountInfo
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 4 {
			continue
		}
		m := MountInfo{Source: unescape(fields[0]), Target: unescape(fields[1]), FSType: fields[2], Options: fields[3]}
		if m.Target == dir || strings.HasPrefix(m.Target, dir+"/") {
			out = append(out, m)
		}
	}
	return out, s.Err()
}

// MountAt returns the topmost mount on target.
func MountAt(target string) (MountInfo, bool, error) {
	ms, err := Mounts(target)
	if err != nil {
		return MountInfo{}, false, err
	}
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].Target == target {
			return ms[i], true, nil
		}
	}
	return MountInfo{}, false, nil
}

// unescape undoes the octal escapes of /proc/self/mounts (\040 for space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// detachAll lazily unmounts every mount at or below dir, deepest first,
// and returns what it found.
func detachAll(dir string) []MountInfo {
	ms, _ := Mounts(dir)
	for i := len(ms) - 1; i >= 0; i-- {
		_ = syscall.Unmount(ms[i].Target, syscall.MNT_DETACH)
	}
	return ms
}

// Root skips t unless it runs as root on a host with /dev/fuse.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts FUSE and overlayfs")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("needs /dev/fuse: %v", err)
	}
}

// TestDir returns a new directory for the test's mounts and state, and makes
// the test fail if any mount at or below it is still there when the
// test's later cleanups (its unmounts) have run. It detaches such a mount
// so that the directory can be removed.
func TestDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	// Registered after TempDir's removal, so it runs before it and after
	// every cleanup registered later.
	t.Cleanup(func() {
		if left := detachAll(dir); len(left) > 0 {
			t.Errorf("mounts outlived the test: %+v", left)
		}
	})
	return dir
}

// ChildEnv, set in the environment of a test binary that a test runs as a
// helper process, makes Main run the tests without guarding a directory.
const ChildEnv = "LAZYCAS_TESTLAYER_CHILD"

// Main runs a package's tests with TMPDIR set to a fresh directory, and
// fails the run if any mount below it outlives the tests. Shortly before
// the test binary's -timeout would kill it (and leave dead FUSE mounts
// behind) it detaches them all. Call it from TestMain.
func Main(m *testing.M) int {
	flag.Parse()
	if os.Getenv(ChildEnv) != "" {
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "lazycas-fs-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if dir, err = filepath.EvalSymlinks(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	os.Setenv("TMPDIR", dir)
	if f := flag.Lookup("test.timeout"); f != nil {
		if d, ok := f.Value.(flag.Getter).Get().(time.Duration); ok && d > 0 {
			margin := min(10*time.Second, d/4)
			timer := time.AfterFunc(d-margin, func() {
				if left := detachAll(dir); len(left) > 0 {
					fmt.Fprintf(os.Stderr, "testlayer: test timeout near: detached %d mounts: %+v\n", len(left), left)
				}
			})
			defer timer.Stop()
		}
	}
	code := m.Run()
	if left := detachAll(dir); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: %d mounts outlived the tests: %+v\n", len(left), left)
		code = 1
	}
	if err := os.RemoveAll(dir); err != nil && code == 0 {
		fmt.Fprintln(os.Stderr, "remove test dir:", err)
	}
	return code
}

// Within runs fn and fails t if it does not return within d: a read from
// a broken FUSE mount must fail, not hang. fn keeps running if it hangs.
func Within(t testing.TB, d time.Duration, what string, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
		return nil
	}
}

// Eventually polls cond every 20ms until it is true or d has passed.
func Eventually(ctx context.Context, d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
