package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	bolt "go.etcd.io/bbolt"

	lazyfs "github.com/lazycas/lazycas/fs"
	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/service"
	"github.com/lazycas/lazycas/store"
)

// hashPythonLib prints a digest of every path and file content under
// /usr/lib/python3.11, in a fixed order, with a progress line every 100
// files. Any error (a directory that cannot be listed included) fails it.
const hashPythonLib = `import hashlib, os
def fail(e):
    raise e
total = hashlib.sha256()
n = 0
for d, dirs, files in os.walk("/usr/lib/python3.11", onerror=fail):
    dirs.sort()
    for f in sorted(files):
        p = os.path.join(d, f)
        if os.path.islink(p):
            total.update(("L %s %s\n" % (p, os.readlink(p))).encode())
            continue
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while True:
                b = fh.read(1 << 20)
                if not b:
                    break
                h.update(b)
        total.update(("F %s %s\n" % (p, h.hexdigest())).encode())
        n += 1
        if n % 100 == 0:
            print("progress", n, flush=True)
print("files", n)
print("total", total.hexdigest())`

// TestCrashSafety kills the daemon with SIGKILL while it fetches in the
// background, while a container's reads fetch and seal files, and while it
// collects its store, and restarts it each time: the remote snapshots
// remount from metadata, every object in the store is named by the digest
// of its content, no temporary file of the dead daemon survives, the
// container reading when the daemon died finishes, and the image runs and
// reads exactly what it holds (DESIGN.md, invariant 4).
func TestCrashSafety(t *testing.T) {
	var env *testenv.Env
	holder := 0
	// Registered first, so it runs after the environment's Close: no
	// FUSE mount, dead or alive, and no FUSE holder may outlive the
	// environment.
	t.Cleanup(func() {
		if env == nil {
			return
		}
		if left := fuseMountsUnder(t, env.Dir, env.RunDir); len(left) > 0 {
			t.Errorf("lazycas FUSE mounts left after the environment closed: %v", left)
		}
		checkHoldersGone(t, env, holder)
	})
	env = newEnv(t)
	// Runs before Close, while the pid file still names the holder.
	t.Cleanup(func() { holder = env.HolderPID() })
	ctx := testContext(t)
	ref := convertPython(ctx, t, env, convert.EStargz, testenv.PythonStartupFiles)
	img, err := env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
	if err != nil {
		t.Fatal(err)
	}
	checkRemote(ctx, t, env, img)

	// Each step starts from the daemon the step before restarted.
	if !t.Run("kill during background fetch", func(t *testing.T) {
		before := daemonStats(ctx, t, env)
		st := waitStats(ctx, t, env, time.Minute, "bytes flowing", func(st lazyfs.Stats) bool {
			return st.Fetch.BytesFetched > before.Fetch.BytesFetched && st.Store.FetchedFiles >= 5
		})
		for _, im := range st.Images {
			if im.Ref == ref && im.PresentFiles == im.Files {
				t.Fatalf("background fetch finished before the kill: %+v", im)
			}
		}
		// Asking for figures commits the sealed objects to the index:
		// let some wait for their group commit (every 250 ms).
		time.Sleep(150 * time.Millisecond)
		if err := env.KillDaemon(); err != nil {
			t.Fatal(err)
		}
		restartAfterKill(ctx, t, env, fmt.Sprintf("%d files sealed, %d bytes fetched", st.Store.FetchedFiles, st.Fetch.BytesFetched))
		checkRemote(ctx, t, env, img)
		checkPythonOutput(t, runPython(ctx, t, env, img, lazyPythonCheck))
		checkIndexed(ctx, t, env, ref)
	}) {
		return
	}

	if !t.Run("kill during a container's reads", func(t *testing.T) {
		// An empty store: the container's reads fetch and seal.
		if res, err := postGC(ctx, env, 0); err != nil {
			t.Fatal(err)
		} else {
			t.Logf("store emptied: %+v", res)
		}
		killed := killDuringHashing(ctx, t, env, img)
		checkRemote(ctx, t, env, img)

		first := runHash(ctx, t, env, testenv.Snapshotter, img)
		if again := runHash(ctx, t, env, testenv.Snapshotter, img); again != first {
			t.Errorf("a second run printed %q, the first %q", again, first)
		}
		overlay, err := env.PullOn(ctx, "overlayfs", ref)
		if err != nil {
			t.Fatal(err)
		}
		want := runHash(ctx, t, env, "overlayfs", overlay)
		if killed != want {
			t.Errorf("the container that lived through the crash read %q, python on overlayfs %q", killed, want)
		}
		if first != want {
			t.Errorf("on lazycas after the crash python read %q, on overlayfs %q", first, want)
		}
		t.Logf("python read the same from lazycas, across the crash and after it, and from overlayfs: %s", first)
	}) {
		return
	}

	if !t.Run("kill during store gc", func(t *testing.T) {
		interrupted := 0
		for _, delay := range []time.Duration{30 * time.Millisecond, 200 * time.Millisecond, 800 * time.Millisecond} {
			waitObjects(ctx, t, env, 300)
			before := objectsOnDisk(t, env)
			type outcome struct {
				res store.GCResult
				err error
			}
			done := make(chan outcome, 1)
			start := time.Now()
			go func() {
				res, err := postGC(ctx, env, 0)
				done <- outcome{res, err}
			}()
			time.Sleep(delay)
			if err := env.KillDaemon(); err != nil {
				t.Fatal(err)
			}
			var out outcome
			select {
			case out = <-done:
			case <-time.After(time.Minute):
				t.Fatal("the gc call did not return after the daemon died")
			}
			// Background fetch adds objects meanwhile; it removes none.
			removed := removedObjects(t, env, before)
			what := fmt.Sprintf("gc killed after %s, having removed %d of %d objects (call: %v)", delay, removed, len(before), out.err)
			switch {
			case out.err == nil:
				what = fmt.Sprintf("gc finished before the kill, after %s (%+v)", time.Since(start).Round(time.Millisecond), out.res)
			case removed > 0:
				interrupted++
			}
			restartAfterKill(ctx, t, env, what)
			checkRemote(ctx, t, env, img)
			checkPythonOutput(t, runPython(ctx, t, env, img, lazyPythonCheck))
		}
		if interrupted == 0 {
			t.Error("no kill landed while a collection was removing objects")
		}
		checkIndexed(ctx, t, env, ref)
	}) {
		return
	}

	// Leave the daemon dead: Close must end the FUSE holder that keeps
	// its mounts (or cope with dead mounts, without a holder).
	if err := env.KillDaemon(); err != nil {
		t.Fatal(err)
	}
	t.Logf("left %d lazycas FUSE mounts of a dead daemon (FUSE holder pid %d) for the environment's Close",
		len(fuseMountsUnder(t, env.Dir)), env.HolderPID())
}

// restartAfterKill follows a KillDaemon: it checks the store the dead
// daemon left, starts the daemon again, and checks that its start swept
// the dead daemon's temporary files and that every object is still sound.
func restartAfterKill(ctx context.Context, t *testing.T, env *testenv.Env, what string) {
	t.Helper()
	// The dead daemon wrote nothing after this; the new one writes later.
	killed := time.Now()
	sealed := objectsOnDisk(t, env)
	tmps := fillFiles(t, env)
	missing, unindexed := checkIndex(t, env)
	t.Logf("killed: %s; left %d files being filled, %d index entries without their object, %d objects not indexed yet",
		what, len(tmps), missing, unindexed)
	if err := env.StartDaemonAgain(ctx); err != nil {
		t.Fatal(err)
	}
	waitAPI(ctx, t, env)
	t.Logf("lazycas started again in %s", time.Since(killed).Round(time.Millisecond))
	// The new daemon fills files of its own at once: a file of the dead
	// one is a name from before the kill, not written since.
	for path := range tmps {
		if fi, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) && (err != nil || fi.ModTime().Before(killed)) {
			t.Errorf("%s of the killed daemon survived the restart (%v)", path, err)
		}
	}
	valid, size := checkObjects(t, env)
	t.Logf("after the restart %d objects (%d bytes) hash to their names", len(valid), size)
	// Nothing collects while the test restarts: every object sealed
	// before the kill must still be there.
	lost := 0
	for d := range sealed {
		if !valid[d] {
			lost++
		}
	}
	if lost > 0 {
		t.Errorf("%d of the %d objects sealed before the kill are gone after the restart", lost, len(sealed))
	}
}

// killDuringHashing starts hashPythonLib in a container on img, kills the
// daemon once the container has hashed files, and restarts it while the
// container's reads wait: the daemon's FUSE holder kept the container's
// lazy layers, and the new daemon serves them, so the container must
// finish its hashing and exit 0. It returns what the container printed
// but its progress lines, for the caller to compare with overlayfs.
func killDuringHashing(ctx context.Context, t *testing.T, env *testenv.Env, img client.Image) string {
	t.Helper()
	nctx := env.Context(ctx)
	c, err := env.NewContainer(ctx, img, testenv.UniqueID("hash-killed"), "python3", "-B", "-c", hashPythonLib)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := env.DeleteContainer(context.WithoutCancel(ctx), c); err != nil {
			t.Errorf("delete the container hashing across the kill: %v", err)
		}
	}()
	var stdout, stderr lockedBuffer
	task, err := c.NewTask(nctx, cio.NewCreator(cio.WithStreams(nil, &stdout, &stderr),
		cio.WithFIFODir(filepath.Join(env.RunDir, "fifo"))))
	if err != nil {
		t.Fatal(err)
	}
	statusC, err := task.Wait(nctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(nctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(stdout.String(), "progress") {
		select {
		case st := <-statusC:
			t.Fatalf("the container exited (%d) before the kill: %q %q", st.ExitCode(), stdout.String(), stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container hashed no files in 2 minutes: %q %q", stdout.String(), stderr.String())
		}
	}
	if err := env.KillDaemon(); err != nil {
		t.Fatal(err)
	}
	atKill := lastLine(stdout.String())
	restartAfterKill(ctx, t, env, "the container was hashing files, at "+atKill)
	var exit client.ExitStatus
	select {
	case exit = <-statusC:
	case <-time.After(3 * time.Minute):
		_ = task.Kill(nctx, syscall.SIGKILL)
		t.Fatalf("the container did not finish hashing 3 minutes after the daemon came back; stdout ends %q, stderr %q",
			lastLine(stdout.String()), lastLine(stderr.String()))
	}
	// Delete waits until the output is copied.
	if _, err := task.Delete(nctx); err != nil {
		t.Errorf("delete the task hashing across the kill: %v", err)
	}
	if exit.ExitCode() != 0 {
		t.Fatalf("the container hashing when the daemon was killed exited %d once it came back (killed at %q); stdout ends %q, stderr: %s",
			exit.ExitCode(), atKill, lastLine(stdout.String()), stderr.String())
	}
	t.Logf("the container hashing when the daemon was killed (at %q) finished after the restart", atKill)
	return hashSummary(t, "lazycas, across the kill", stdout.String())
}

// runHash runs hashPythonLib to completion on snapshotter sn and returns
// what it printed but its progress lines.
func runHash(ctx context.Context, t *testing.T, env *testenv.Env, sn string, img client.Image) string {
	t.Helper()
	start := time.Now()
	res, err := env.RunOn(ctx, sn, img, testenv.UniqueID("hash"), "python3", "-B", "-c", hashPythonLib)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("hashing on %s exited %d\nstderr: %s", sn, res.ExitCode, res.Stderr)
	}
	out := hashSummary(t, sn, res.Stdout)
	t.Logf("hashed /usr/lib/python3.11 on %s in %s", sn, time.Since(start).Round(time.Millisecond))
	return out
}

// hashSummary is hashPythonLib's output (of a run on where) but its
// progress lines, which depend on timing.
func hashSummary(t *testing.T, where, stdout string) string {
	t.Helper()
	var keep []string
	for _, l := range strings.Split(strings.TrimSpace(stdout), "\n") {
		if !strings.HasPrefix(l, "progress ") {
			keep = append(keep, l)
		}
	}
	out := strings.Join(keep, "; ")
	if !strings.Contains(out, "total ") {
		t.Fatalf("hashing on %s printed %q", where, stdout)
	}
	return out
}

// removedObjects counts the objects of before (an objectsOnDisk) that are
// no longer on disk: only a collection removes objects.
func removedObjects(t *testing.T, env *testenv.Env, before map[string]string) int {
	t.Helper()
	after := objectsOnDisk(t, env)
	removed := 0
	for d := range before {
		if after[d] == "" {
			removed++
		}
	}
	return removed
}

// objectsOnDisk lists the store's objects by name (64 hex digits).
func objectsOnDisk(t *testing.T, env *testenv.Env) map[string]string {
	t.Helper()
	root := filepath.Join(env.DaemonRoot, "store", "objects", "sha256")
	out := map[string]string{}
	dirs, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		ents, err := os.ReadDir(filepath.Join(root, d.Name()))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			t.Fatal(err)
		}
		for _, e := range ents {
			out[e.Name()] = filepath.Join(root, d.Name(), e.Name())
		}
	}
	return out
}

// checkObjects hashes every object in the store: each must be a read-only
// regular file under the directory of its first two hex digits, named by
// the sha256 of its content. Objects the running daemon removes meanwhile
// are skipped. It returns the names of the sound objects.
func checkObjects(t *testing.T, env *testenv.Env) (valid map[string]bool, size int64) {
	t.Helper()
	valid = map[string]bool{}
	for name, path := range objectsOnDisk(t, env) {
		if len(name) != 64 || strings.Trim(name, "0123456789abcdef") != "" || filepath.Base(filepath.Dir(path)) != name[:2] {
			t.Errorf("store object %s: not named by a sha256 digest in its directory", path)
			continue
		}
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Errorf("store object %s: %v", path, err)
			continue
		}
		fi, err := f.Stat()
		if err == nil && (!fi.Mode().IsRegular() || fi.Mode().Perm() != 0o444) {
			err = fmt.Errorf("mode %s, want a regular file 0444", fi.Mode())
		}
		h := sha256.New()
		if err == nil {
			_, err = io.Copy(h, f)
		}
		f.Close()
		if err != nil {
			t.Errorf("store object %s: %v", path, err)
			continue
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != name {
			t.Errorf("store object %s holds content of digest sha256:%s", path, got)
			continue
		}
		valid[name] = true
		size += fi.Size()
	}
	return valid, size
}

// checkIndex reads the index of the dead daemon's store (read-only, as
// the daemon is not running) and compares it with the objects on disk.
// Both kinds of difference are allowed: an entry without its object (a
// collection removes the file first), and an object without entry (the
// store indexes sealed objects in groups, every 250 ms); the next start
// reconciles them, which checkIndexed checks.
func checkIndex(t *testing.T, env *testenv.Env) (missing, unindexed int) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(env.DaemonRoot, "store", "index.db"), 0o600,
		&bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("open the dead daemon's store index: %v", err)
	}
	defer db.Close()
	indexed := map[string]bool{}
	if err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("objects"))
		if b == nil {
			return errors.New("no objects bucket")
		}
		return b.ForEach(func(k, _ []byte) error {
			indexed[strings.TrimPrefix(string(k), "sha256:")] = true
			return nil
		})
	}); err != nil {
		t.Fatalf("read the store index: %v", err)
	}
	onDisk := objectsOnDisk(t, env)
	for d := range indexed {
		if onDisk[d] == "" {
			missing++
		}
	}
	for d := range onDisk {
		if !indexed[d] {
			unindexed++
		}
	}
	return missing, unindexed
}

// checkIndexed waits until background fetch has brought every file of ref
// into the store, then checks that the index (through the daemon's
// figures) counts exactly the objects on disk: the restarted daemon
// indexed what the dead one sealed but had not committed, and forgot the
// entries whose objects were gone.
func checkIndexed(ctx context.Context, t *testing.T, env *testenv.Env, ref string) {
	t.Helper()
	start := time.Now()
	im := waitFetched(ctx, t, env, ref)
	st := daemonStats(ctx, t, env)
	if n := len(objectsOnDisk(t, env)); int64(n) != st.Store.Objects {
		t.Errorf("the index counts %d objects, the store directory holds %d", st.Store.Objects, n)
	}
	t.Logf("background fetch completed %d files (%d bytes) in %s; the index counts the %d objects on disk",
		im.Files, im.Bytes, time.Since(start).Round(time.Millisecond), st.Store.Objects)
}

// fillFiles lists the store's files being filled: whole-file fills in
// tmp/ and, when the store has them, partial objects in partial/.
func fillFiles(t *testing.T, env *testenv.Env) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, sub := range []string{"tmp", "partial"} {
		dir := filepath.Join(env.DaemonRoot, "store", sub)
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) && sub != "tmp" {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			out[filepath.Join(dir, e.Name())] = true
		}
	}
	return out
}

// waitObjects waits until the store holds at least n objects (background
// fetch refills it).
func waitObjects(ctx context.Context, t *testing.T, env *testenv.Env, n int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		have := len(objectsOnDisk(t, env))
		if have >= n {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("the store holds %d objects, want at least %d", have, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitStats polls the daemon's figures until ok accepts them.
func waitStats(ctx context.Context, t *testing.T, env *testenv.Env, timeout time.Duration, what string, ok func(lazyfs.Stats) bool) lazyfs.Stats {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := daemonStats(ctx, t, env)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %+v", what, timeout, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// apiClient talks to the daemon's API socket.
func apiClient(env *testenv.Env, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", apiSocket(env))
		},
	}}
}

// waitAPI waits until the daemon's API answers: it starts listening just
// after the snapshots socket.
func waitAPI(ctx context.Context, t *testing.T, env *testenv.Env) {
	t.Helper()
	c := apiClient(env, 2*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://lazycas"+service.APIStats, nil)
		resp, err := c.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = errors.New(resp.Status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon's API does not answer: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// postGC asks the daemon to trim its store to maxBytes.
func postGC(ctx context.Context, env *testenv.Env, maxBytes int64) (store.GCResult, error) {
	var res store.GCResult
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost,
		fmt.Sprintf("http://lazycas%s?max_bytes=%d", service.APIGC, maxBytes), nil)
	resp, err := apiClient(env, 2*time.Minute).Do(req)
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return res, err
	}
	if resp.StatusCode != http.StatusOK {
		return res, fmt.Errorf("gc: %s: %s", resp.Status, bytes.TrimSpace(body))
	}
	return res, json.Unmarshal(body, &res)
}

// fuseMountsUnder lists the lazycas FUSE mounts at or below dirs.
func fuseMountsUnder(t *testing.T, dirs ...string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[2] != "fuse.lazycas" {
			continue
		}
		for _, d := range dirs {
			if f[1] == d || strings.HasPrefix(f[1], d+"/") {
				out = append(out, f[1])
			}
		}
	}
	return out
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// lockedBuffer is a bytes.Buffer safe for a task's output copier and a
// concurrent reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
