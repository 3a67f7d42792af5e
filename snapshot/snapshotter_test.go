package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root: the snapshotter makes real overlay mounts")
	}
}

func newSnapshotter(ctx context.Context, root string, opts ...Opt) (snapshots.Snapshotter, func() error, error) {
	s, err := New(ctx, root, opts...)
	if err != nil {
		return nil, nil, err
	}
	return s, s.Close, nil
}

// suiteName makes containerd's conformance suite treat us as what we are, an
// overlayfs snapshotter: renaming a directory of a lower layer fails with
// EXDEV on overlayfs without redirect_dir, exactly as with containerd's own
// overlayfs snapshotter, so the suite leaves that one rename out by this name.
const suiteName = "overlayfs"

// TestConformance runs containerd's snapshotter conformance suite in-process.
func TestConformance(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, suiteName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return newSnapshotter(ctx, root)
	})
}

func TestConformanceAsyncRemove(t *testing.T) {
	requireRoot(t)
	if testing.Short() {
		t.Skip("second conformance run skipped in -short")
	}
	testsuite.SnapshotterSuite(t, suiteName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return newSnapshotter(ctx, root, WithAsyncRemove)
	})
}

func TestMountsStackParentsNearestFirst(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, err := New(ctx, t.TempDir(), WithMountOptions("volatile"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	parent := ""
	var uppers []string
	for _, name := range []string{"l1", "l2", "l3"} {
		if _, err := s.Prepare(ctx, name+"-active", parent); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(ctx, name, name+"-active"); err != nil {
			t.Fatal(err)
		}
		uppers = append([]string{s.upperPath(idOf(ctx, t, s, name))}, uppers...)
		parent = name
	}
	active, err := s.Prepare(ctx, "container", "l3")
	if err != nil {
		t.Fatal(err)
	}
	if len(active) != 1 || active[0].Type != "overlay" {
		t.Fatalf("want one overlay mount, got %+v", active)
	}
	opts := optionMap(active[0])
	if want := strings.Join(uppers, ":"); opts["lowerdir"] != want {
		t.Errorf("lowerdir = %q, want nearest parent first %q", opts["lowerdir"], want)
	}
	id := idOf(ctx, t, s, "container")
	if opts["upperdir"] != s.upperPath(id) || opts["workdir"] != s.workPath(id) {
		t.Errorf("upperdir/workdir = %q/%q, want the container's own", opts["upperdir"], opts["workdir"])
	}
	if _, ok := opts["volatile"]; !ok {
		t.Errorf("configured mount option missing: %v", active[0].Options)
	}

	view, err := s.View(ctx, "view", "l3")
	if err != nil {
		t.Fatal(err)
	}
	if len(view) != 1 || view[0].Type != "overlay" {
		t.Fatalf("a view of three layers must be a read-only overlay, got %+v", view)
	}
	if vo := optionMap(view[0]); vo["upperdir"] != "" || vo["lowerdir"] != strings.Join(uppers, ":") {
		t.Errorf("view options = %v", view[0].Options)
	}
}

func TestRejectsBadInput(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, err := New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	for _, tc := range []struct {
		name string
		call func() error
		want error
	}{
		{"stat of a missing key", func() error { _, err := s.Stat(ctx, "nope"); return err }, errdefs.ErrNotFound},
		{"mounts of a missing key", func() error { _, err := s.Mounts(ctx, "nope"); return err }, errdefs.ErrNotFound},
		{"usage of a missing key", func() error { _, err := s.Usage(ctx, "nope"); return err }, errdefs.ErrNotFound},
		{"remove of a missing key", func() error { return s.Remove(ctx, "nope") }, errdefs.ErrNotFound},
		{"commit of a missing key", func() error { return s.Commit(ctx, "x", "nope") }, errdefs.ErrNotFound},
		{"prepare on a missing parent", func() error { _, err := s.Prepare(ctx, "a", "nope"); return err }, errdefs.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), "nope") {
				t.Errorf("error %q does not name the key", err)
			}
		})
	}
	// A failed prepare must leave no staged directory behind.
	entries, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("snapshots/ holds %d entries after only failed calls", len(entries))
	}
}

// A fresh root must list as empty, not as an error: containerd lists
// snapshots when it starts and would log a failing snapshotter.
func TestWalkFreshRootIsEmpty(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, err := New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n := 0
	if err := s.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil }); err != nil {
		t.Fatalf("walk of a fresh root: %v", err)
	}
	if n != 0 {
		t.Fatalf("walk of a fresh root saw %d snapshots", n)
	}
	// An error from the callback itself must still come through.
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	sentinel := fmt.Errorf("stop: %w", errdefs.ErrNotFound)
	if err := s.Walk(ctx, func(context.Context, snapshots.Info) error { return sentinel }); !errors.Is(err, sentinel) {
		t.Fatalf("walk returned %v, want the callback's error", err)
	}
}

func TestRejectsRootOverlayCannotUse(t *testing.T) {
	requireRoot(t)
	// overlayfs cannot be the upper filesystem of another overlay.
	base := t.TempDir()
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m := mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
		"lowerdir=" + filepath.Join(base, "lower"),
		"upperdir=" + filepath.Join(base, "upper"),
		"workdir=" + filepath.Join(base, "work"),
	}}
	merged := filepath.Join(base, "merged")
	if err := m.Mount(merged); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mount.UnmountAll(merged, 0) })

	_, err := New(context.Background(), filepath.Join(merged, "root"))
	if err == nil {
		t.Fatal("New on an overlayfs root succeeded")
	}
	if !strings.Contains(err.Error(), "cannot hold overlayfs layers") {
		t.Errorf("error does not say why: %v", err)
	}
}

func TestCleanupRemovesOrphansOnly(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, err := New(ctx, t.TempDir(), WithAsyncRemove)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Prepare(ctx, "keep", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "drop", ""); err != nil {
		t.Fatal(err)
	}
	dropDir := filepath.Dir(s.upperPath(idOf(ctx, t, s, "drop")))
	if err := s.Remove(ctx, "drop"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dropDir); err != nil {
		t.Fatalf("async remove deleted the directory before Cleanup: %v", err)
	}
	crashLeftover := filepath.Join(s.root, "snapshots", "new-123")
	if err := os.MkdirAll(filepath.Join(crashLeftover, "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{dropDir, crashLeftover} {
		if _, err := os.Stat(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived Cleanup: %v", gone, err)
		}
	}
	if _, err := os.Stat(s.upperPath(idOf(ctx, t, s, "keep"))); err != nil {
		t.Errorf("Cleanup removed a live snapshot: %v", err)
	}
}

func idOf(ctx context.Context, t *testing.T, s *Snapshotter, key string) string {
	t.Helper()
	var id string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

func optionMap(m mount.Mount) map[string]string {
	out := map[string]string{}
	for _, o := range m.Options {
		k, v, _ := strings.Cut(o, "=")
		out[k] = v
	}
	return out
}
