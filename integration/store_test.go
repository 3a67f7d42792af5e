package integration

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	lazyfs "github.com/lazycas/lazycas/fs"
	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
)

// apiSocket is the daemon's API socket.
func apiSocket(env *testenv.Env) string { return env.APISocket() }

// daemonStats asks the daemon's API for its figures.
func daemonStats(ctx context.Context, t *testing.T, env *testenv.Env) lazyfs.Stats {
	t.Helper()
	st, err := env.DaemonStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waitFetched waits until the store holds every file of ref's layers.
func waitFetched(ctx context.Context, t *testing.T, env *testenv.Env, ref string) lazyfs.ImageStats {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := daemonStats(ctx, t, env)
		for _, im := range st.Images {
			if im.Ref == ref && im.Files > 0 && im.PresentFiles == im.Files {
				return im
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("background fetch of %s did not finish in time: %+v", ref, st.Images)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestSharedStoreDedupsAcrossImages runs the python image in eStargz, then
// the same files through other blobs (zstd:chunked): the second image's
// files all come from the store, which holds each file once.
func TestSharedStoreDedupsAcrossImages(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	first := convertPython(ctx, t, env, convert.EStargz, nil)
	second := convertPython(ctx, t, env, convert.ZstdChunked, nil)

	img, err := env.Pull(ctx, first, testenv.WithSnapshotLabels(first))
	if err != nil {
		t.Fatal(err)
	}
	checkRemote(ctx, t, env, img)
	out := runPython(ctx, t, env, img, lazyPythonCheck)
	checkPythonOutput(t, out)
	im1 := waitFetched(ctx, t, env, first)
	before := daemonStats(ctx, t, env)
	t.Logf("first image: %d files, %d bytes; store %d objects, %d bytes; %d bytes over the wire in %d requests",
		im1.Files, im1.Bytes, before.Store.Objects, before.Store.Bytes, before.Fetch.BytesFetched, before.Fetch.Requests)

	img2, err := env.Pull(ctx, second, testenv.WithSnapshotLabels(second))
	if err != nil {
		t.Fatal(err)
	}
	checkRemote(ctx, t, env, img2)
	if again := runPython(ctx, t, env, img2, lazyPythonCheck); again != out {
		t.Errorf("second image printed %q, first %q", again, out)
	}
	im2 := waitFetched(ctx, t, env, second)
	after := daemonStats(ctx, t, env)
	wire := after.Fetch.BytesFetched - before.Fetch.BytesFetched
	t.Logf("second image: %d files, %d bytes; %d bytes over the wire in %d requests; store %d objects, %d bytes, dedup %.2f",
		im2.Files, im2.Bytes, wire, after.Fetch.Requests-before.Fetch.Requests, after.Store.Objects, after.Store.Bytes, after.Store.DedupRatio())

	if sealed := after.Store.FetchedBytes - before.Store.FetchedBytes; sealed != 0 {
		t.Errorf("the second image sealed %d bytes of files the store already had", sealed)
	}
	// What the second image may fetch: its footers and TOCs only. A TOC
	// of this image is well under 1 MiB per layer.
	if limit := int64(2 << 20); wire > limit {
		t.Errorf("the second image fetched %d bytes, more than its TOCs (limit %d)", wire, limit)
	}
	if after.Store.Bytes != before.Store.Bytes || after.Store.Objects != before.Store.Objects {
		t.Errorf("store grew from %d objects/%d bytes to %d/%d", before.Store.Objects, before.Store.Bytes, after.Store.Objects, after.Store.Bytes)
	}
	// Each distinct file once: the store holds exactly the first image's
	// distinct contents, which the second image's files all are.
	if after.Store.DedupRatio() < 1.9 {
		t.Errorf("dedup ratio %.2f, want about 2 for two images of the same files", after.Store.DedupRatio())
	}
	// Here, while both images are whole in the store: the GC below
	// removes the objects.
	t.Run("page cache holds a shared file once", func(t *testing.T) {
		checkSharedPageCache(ctx, t, env, img, img2)
	})

	// The CLI shows the same figures.
	cmd := exec.CommandContext(ctx, cliBin, "store", "stats", "--api-address", apiSocket(env))
	text, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("lazycas store stats: %v\n%s", err, text)
	}
	t.Logf("lazycas store stats:\n%s", text)
	for _, want := range []string{"dedup ratio", first, second, fmt.Sprintf("%d", after.Store.Objects)} {
		if !strings.Contains(string(text), want) {
			t.Errorf("store stats output lacks %q:\n%s", want, text)
		}
	}

	// Collecting down to nothing keeps what is open and the images run on:
	// what is gone is fetched again.
	gc := exec.CommandContext(ctx, cliBin, "store", "gc", "--max-size", "0", "--api-address", apiSocket(env))
	if text, err := gc.CombinedOutput(); err != nil || !strings.Contains(string(text), "removed") {
		t.Fatalf("lazycas store gc: %v\n%s", err, text)
	}
	if st := daemonStats(ctx, t, env); st.Store.Objects >= after.Store.Objects {
		t.Errorf("gc to 0 left %d of %d objects", st.Store.Objects, after.Store.Objects)
	}
	// The kernel may still cache pages of removed objects; a new
	// container's reads go through new opens, so some must fetch again.
	if again := runPython(ctx, t, env, img2, lazyPythonCheck); again != out {
		t.Errorf("after gc the second image printed %q, want %q", again, out)
	}
}
