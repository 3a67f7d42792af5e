package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/service"
)

// fakeDaemon answers the profile API from one export and keeps what it
// was sent.
func fakeDaemon(t *testing.T, e profile.Export) (sock string, got *[]byte) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got = new([]byte)
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+service.APIProfiles, func(w http.ResponseWriter, r *http.Request) {
		if q := r.URL.Query()["layer"]; len(q) != 1 || q[0] != string(e.Profiles[0].Layer) {
			t.Errorf("export asked for layers %v", q)
		}
		json.NewEncoder(w).Encode(e)
	})
	mux.HandleFunc("POST "+service.APIProfiles, func(w http.ResponseWriter, r *http.Request) {
		*got, _ = io.ReadAll(r.Body)
		json.NewEncoder(w).Encode(service.ProfileImport{Imported: 1})
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock, got
}

func TestProfileExportThenImport(t *testing.T) {
	layer := digest.FromString("layer")
	e := profile.Export{Version: profile.FormatVersion, Profiles: []profile.Profile{{
		Layer: layer, Files: []profile.Access{{Digest: digest.FromString("f"), AtUs: 5}},
	}}}
	sock, got := fakeDaemon(t, e)
	file := filepath.Join(t.TempDir(), "profile.json")
	var out, errb bytes.Buffer
	ctx := context.Background()
	if err := run(ctx, []string{"image", "profile", "export", "--api-address", sock, "--layer", string(layer), file}, &out, &errb); err != nil {
		t.Fatalf("export: %v (%s)", err, errb.String())
	}
	if !strings.Contains(out.String(), "exported 1 profiles") {
		t.Errorf("export said %q", out.String())
	}
	data, err := os.ReadFile(file)
	if err != nil || !strings.Contains(string(data), string(layer)) {
		t.Fatalf("exported file: %v %s", err, data)
	}
	out.Reset()
	if err := run(ctx, []string{"image", "profile", "import", "--api-address", sock, file}, &out, &errb); err != nil {
		t.Fatalf("import: %v", err)
	}
	if !bytes.Equal(*got, data) || !strings.Contains(out.String(), "imported 1 profiles") {
		t.Errorf("import sent %q, said %q", *got, out.String())
	}
}

func TestProfileImportRejectsAMalformedFileBeforeAnyRequest(t *testing.T) {
	sock, got := fakeDaemon(t, profile.Export{})
	file := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(file, []byte(`{"version":3,"profiles":[]}`), 0o644)
	var out, errb bytes.Buffer
	err := run(context.Background(), []string{"image", "profile", "import", "--api-address", sock, file}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "bad.json") || !strings.Contains(err.Error(), "version 3") {
		t.Errorf("error %v", err)
	}
	if *got != nil {
		t.Error("a malformed file was sent to the daemon")
	}
	if err := run(context.Background(), []string{"image", "profile"}, &out, &errb); err != errUsage {
		t.Errorf("no subcommand: %v", err)
	}
}
