package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
)

func TestNormalizeRef(t *testing.T) {
	for in, want := range map[string]string{
		"busybox":             "docker.io/library/busybox:latest",
		"127.0.0.1:5000/py:3": "127.0.0.1:5000/py:3",
		"ghcr.io/org/app@sha256:" + strings.Repeat("a", 64): "ghcr.io/org/app@sha256:" + strings.Repeat("a", 64),
	} {
		got, err := normalizeRef(in)
		if err != nil || got != want {
			t.Errorf("normalizeRef(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := normalizeRef("UPPER"); err == nil || !strings.Contains(err.Error(), `invalid image reference "UPPER"`) {
		t.Errorf("bad reference: %v", err)
	}
}

// The CLI's errors are one line each, and command-line mistakes are usage errors.
func TestCommandLineErrors(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		args      []string
		wantUsage bool
		want      string
	}{
		{"no command", nil, true, ""},
		{"an unknown command", []string{"frobnicate"}, true, ""},
		{"health without a daemon", []string{"health", "--address", "/nonexistent/lazycas.sock", "--timeout", "2s"}, false, "/nonexistent/lazycas.sock"},
		{"health with an argument", []string{"health", "extra"}, false, "no arguments"},
		{"convert without DST", []string{"image", "convert", "a"}, true, ""},
		{"an unknown format", []string{"image", "convert", "--format", "squashfs", "a", "b"}, false, `unknown format "squashfs"`},
		{"a bad source reference", []string{"image", "convert", "UPPER", "b"}, false, `invalid image reference "UPPER"`},
		{"both platform flags", []string{"image", "convert", "--platform", "linux/arm64", "--all-platforms", "a", "b"}, false, "exclude each other"},
		{"a missing prefetch list", []string{"image", "convert", "--prefetch", "/nonexistent/list", "a", "b"}, false, "--prefetch"},
		{"pull without containerd", []string{"image", "pull", "--address", "/nonexistent/containerd.sock", "busybox"}, false, "/nonexistent/containerd.sock"},
		{"pull without containerd says what to do", []string{"image", "pull", "--address", "/nonexistent/containerd.sock", "busybox"}, false, "is containerd running? Pass its socket with --address"},
		{"stats without the daemon", []string{"store", "stats", "--api-address", "/nonexistent/api.sock"}, false, "/nonexistent/api.sock"},
		{"stats without the daemon says what to do", []string{"store", "stats", "--api-address", "/nonexistent/api.sock"}, false, "is containerd-lazycas-grpc running?"},
		{"gc without the daemon says what to do", []string{"store", "gc", "--api-address", "/nonexistent/api.sock", "--max-size", "1GiB"}, false, "pass that socket with --api-address"},
		{"a bad gc size", []string{"store", "gc", "--max-size", "lots"}, false, "want a size such as"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(ctx, tc.args, &stdout, &stderr)
			if err == nil {
				t.Fatal("succeeded")
			}
			if got := errors.Is(err, errUsage); got != tc.wantUsage {
				t.Fatalf("usage error = %v, want %v (%v)", got, tc.wantUsage, err)
			}
			if tc.want != "" && !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}

func TestPullHintSaysWhatToDo(t *testing.T) {
	for _, tc := range []struct {
		err  string
		want string
	}{
		{`failed to do request: Head "https://127.0.0.1:5000/v2/x/manifests/1": http: server gave HTTP response to HTTPS client`, "--plain-http"},
		{`tls: failed to verify certificate: x509: certificate signed by unknown authority`, "hosts.toml"},
		{`unexpected status from HEAD request to https://r/v2/x/manifests/1: 401 Unauthorized`, "docker login"},
		{`failed to prepare extraction snapshot: snapshotter not loaded: lazycas: invalid argument`, "proxy_plugins"},
		{`some other failure`, ""},
	} {
		got := pullHint(errors.New(tc.err), "lazycas")
		if tc.want == "" && got != "" || !strings.Contains(got, tc.want) {
			t.Errorf("pullHint(%q) = %q, want it to say %q", tc.err, got, tc.want)
		}
	}
}
