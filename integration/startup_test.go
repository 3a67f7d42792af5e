package integration

import (
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
)

// TestStartupFilesComeWithThePull pulls the python image, converted without
// a prefetch list, with the labels CRI sends, and background fetch off:
// before any container runs, the daemon has fetched what python3 (the
// image's Cmd) loads to start, found through the image config in
// containerd's content store; python then starts with few requests of its
// own. Pulled again without labels, the daemon finds the image config
// all the same.
func TestStartupFilesComeWithThePull(t *testing.T) {
	env := newEnvWith(t, testenv.Options{DaemonConfig: testenv.JSONLogConfig + "\n[fs]\nbackground_fetch = false\n"})
	ctx := testContext(t)
	ref := convertPython(ctx, t, env, convert.EStargz, nil)
	img, err := env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
	if err != nil {
		t.Fatal(err)
	}
	files := waitStartupFetches(t, env, 1)
	for _, want := range []string{"/usr/bin/python3", "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
		"/lib/x86_64-linux-gnu/libm.so.6", "/lib/x86_64-linux-gnu/libz.so.1", "/etc/ld.so.cache"} {
		if !slices.Contains(files, want) {
			t.Errorf("start-up files %q lack %s", files, want)
		}
	}

	before := daemonStats(ctx, t, env).Fetch.Requests
	if out := runPython(ctx, t, env, img, "print(1)"); out != "1\n" {
		t.Fatalf("python printed %q", out)
	}
	// python's own first reads of its library: a few readahead windows.
	// Without the start-up files, each of the program, the loader and
	// its five libraries is a request of its own, one after the other.
	n := daemonStats(ctx, t, env).Fetch.Requests - before
	t.Logf("start-up files: %d; python's start then made %d registry requests", len(files), n)
	if n > 6 {
		t.Errorf("python's start made %d registry requests after the start-up fetch, want at most 6", n)
	}

	// ctr, nerdctl and containerd's own client send no image labels: the
	// daemon finds the manifest in containerd, and the start-up set with it.
	deleteImage(ctx, t, env, ref)
	if _, err := env.Pull(ctx, ref); err != nil {
		t.Fatal(err)
	}
	waitStartupFetches(t, env, 2)
}

// waitStartupFetches waits until the daemon logged n start-up fetches and
// returns the files the last one looked for.
func waitStartupFetches(t *testing.T, env *testenv.Env, n int) []string {
	t.Helper()
	var files []string
	deadline := time.Now().Add(time.Minute)
	for {
		files = nil
		done := 0
		err := env.DaemonLog(func(line []byte, msg string) error {
			switch msg {
			case "start-up file":
				if done == n-1 {
					var ent struct {
						Path string `json:"path"`
					}
					if err := json.Unmarshal(line, &ent); err != nil {
						return err
					}
					files = append(files, ent.Path)
				}
			case "start-up files fetched":
				done++
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if done >= n {
			return files
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d start-up fetches logged within a minute of the pull, want %d; files looked for: %q", done, n, files)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
