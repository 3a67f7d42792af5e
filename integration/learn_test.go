package integration

import (
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
)

// TestLearnedStartupOnAnotherNode runs python importing a few modules on a
// node that learns, exports the profile with the CLI, empties the node (its
// store and profile database go), imports the profile and pulls again: the
// learned files are fetched right after the mounts, before the container
// runs, and python's run then makes fewer registry requests than the first.
func TestLearnedStartupOnAnotherNode(t *testing.T) {
	env := newEnvWith(t, testenv.Options{DaemonConfig: testenv.JSONLogConfig + "\n[fs]\nlearn = true\nbackground_fetch = false\n"})
	ctx := testContext(t)
	const code = "import json, email.parser, http.client, decimal; print(1)"
	ref := convertPython(ctx, t, env, convert.EStargz, nil)
	run := func(n int) int {
		img, err := env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
		if err != nil {
			t.Fatal(err)
		}
		waitLog(t, env, "start-up files fetched", n)
		if n == 2 {
			waitLog(t, env, "learned files fetched", 1)
			time.Sleep(time.Second) // the other layers' learned fetches
		}
		before := daemonStats(ctx, t, env).Fetch.Requests
		if out := runPython(ctx, t, env, img, code); out != "1\n" {
			t.Fatalf("python printed %q", out)
		}
		return int(daemonStats(ctx, t, env).Fetch.Requests - before)
	}
	first := run(1)
	file := filepath.Join(t.TempDir(), "profile.json")
	if _, stderr, err := env.RunCLI(ctx, cliBin, "image", "profile", "export", "--api-address", env.APISocket(), file); err != nil {
		t.Fatalf("export: %v: %s", err, stderr)
	}
	if err := env.ResetNode(ctx); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := env.RunCLI(ctx, cliBin, "image", "profile", "import", "--api-address", env.APISocket(), file); err != nil {
		t.Fatalf("import: %v: %s (%s)", err, stderr, out)
	}
	second := run(2)
	fetched := waitLog(t, env, "learned files fetched", 1)
	t.Logf("python's run made %d registry requests, %d with the imported profile; learned fetch: %s", first, second, fetched)
	if second >= first {
		t.Errorf("with the profile python's run made %d registry requests, without %d", second, first)
	}
}

// waitLog waits until the daemon logged msg n times (over its restarts)
// and returns the last such line.
func waitLog(t *testing.T, env *testenv.Env, msg string, n int) string {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var last string
		count := 0
		err := env.DaemonLog(func(line []byte, m string) error {
			if m == msg {
				var ent map[string]any
				if err := json.Unmarshal(line, &ent); err != nil {
					return err
				}
				last, count = string(line), count+1
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if count >= n {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon did not log %q %d times within a minute", msg, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
