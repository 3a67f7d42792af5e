package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// buildWithVersion builds the command in pkg (relative to this one) as
// name, the way the Makefile does, with version set, and returns its path.
func buildWithVersion(t *testing.T, pkg, name, version string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	out, err := exec.Command("go", "build", "-ldflags", "-X main.version="+version, "-o", bin, pkg).CombinedOutput()
	if err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

func TestBothBinariesPrintTheVersionTheyWereBuiltWith(t *testing.T) {
	if testing.Short() {
		t.Skip("builds both binaries")
	}
	const version = "v1.2.3-4-gabcdef0-dirty"
	cli := buildWithVersion(t, ".", "lazycas", version)
	daemon := buildWithVersion(t, "../containerd-lazycas-grpc", "containerd-lazycas-grpc", version)
	for _, tc := range []struct {
		bin  string
		args []string
		name string // what the line starts with
	}{
		{cli, []string{"version"}, "lazycas"},
		{cli, []string{"--version"}, "lazycas"},
		{daemon, []string{"--version"}, "containerd-lazycas-grpc"},
		{daemon, []string{"-version"}, "containerd-lazycas-grpc"},
	} {
		out, err := exec.Command(tc.bin, tc.args...).Output()
		if err != nil {
			t.Errorf("%s %v: %v", tc.name, tc.args, err)
			continue
		}
		if got, want := strings.TrimSpace(string(out)), tc.name+" "+version; got != want {
			t.Errorf("%s %v printed %q, want %q", tc.name, tc.args, got, want)
		}
	}
}

func TestHelpExitsZero(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	cli := buildWithVersion(t, ".", "lazycas", "test")
	for _, args := range [][]string{
		{"--help"}, {"-h"}, {"help"},
		{"image", "pull", "--help"}, {"image", "convert", "-h"},
		{"image", "profile", "export", "-h"}, {"image", "profile", "import", "-h"},
		{"image", "profile", "push", "-h"}, {"image", "profile", "pull", "-h"},
		{"store", "stats", "-h"}, {"store", "gc", "-h"},
	} {
		out, err := exec.Command(cli, args...).CombinedOutput()
		if err != nil {
			t.Errorf("lazycas %v: %v\n%s", args, err, out)
		}
		if !strings.Contains(strings.ToLower(string(out)), "usage") {
			t.Errorf("lazycas %v printed no usage:\n%s", args, out)
		}
	}
}
