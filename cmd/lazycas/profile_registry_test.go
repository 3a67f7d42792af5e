package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/service"
)

// profileDaemon answers the profile API: an export of every profile it
// holds, and imports that it keeps.
func profileDaemon(t *testing.T, e profile.Export) (sock string, imports *[][]byte) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	imports = new([][]byte)
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+service.APIProfiles, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(e)
	})
	mux.HandleFunc("POST "+service.APIProfiles, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		*imports = append(*imports, b)
		json.NewEncoder(w).Encode(service.ProfileImport{Imported: 1})
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock, imports
}

// TestProfilePushThenPull attaches the profiles of an image's layers to
// the image in a registry, with the referrers API and without it (the
// referrers tag), and pulls them into another node's daemon.
func TestProfilePushThenPull(t *testing.T) {
	for _, referrers := range []bool{true, false} {
		t.Run(fmt.Sprintf("referrers API %v", referrers), func(t *testing.T) {
			var opts []registry.Option
			if referrers {
				opts = append(opts, registry.WithReferrersSupport(true))
			}
			srv := httptest.NewServer(registry.New(append(opts, registry.Logger(log.New(io.Discard, "", 0)))...))
			defer srv.Close()
			host := strings.TrimPrefix(srv.URL, "http://")
			img, err := random.Image(512, 2)
			if err != nil {
				t.Fatal(err)
			}
			ref := host + "/app:1"
			r, err := name.ParseReference(ref, name.Insecure)
			if err != nil {
				t.Fatal(err)
			}
			if err := remote.Write(r, img); err != nil {
				t.Fatal(err)
			}
			m, _ := img.Manifest()
			layer := digest.Digest(m.Layers[1].Digest.String())
			other := digest.FromString("another image's layer")
			e := profile.Export{Version: profile.FormatVersion, Profiles: []profile.Profile{
				{Layer: layer, Files: []profile.Access{{Digest: digest.FromString("f"), AtUs: 5}}},
				{Layer: other, Files: []profile.Access{{Digest: digest.FromString("g"), AtUs: 7}}},
			}}
			sock, _ := profileDaemon(t, e)
			var out, errb bytes.Buffer
			ctx := context.Background()
			if err := run(ctx, []string{"image", "profile", "push", "--api-address", sock, "--plain-http", ref}, &out, &errb); err != nil {
				t.Fatalf("push: %v (%s)", err, errb.String())
			}
			if !strings.Contains(out.String(), "pushed 1 profiles") {
				t.Errorf("push said %q", out.String())
			}

			sock2, imports := profileDaemon(t, profile.Export{Version: profile.FormatVersion})
			out.Reset()
			if err := run(ctx, []string{"image", "profile", "pull", "--api-address", sock2, "--plain-http", ref}, &out, &errb); err != nil {
				t.Fatalf("pull: %v (%s)", err, errb.String())
			}
			if len(*imports) != 1 {
				t.Fatalf("%d imports, want 1", len(*imports))
			}
			var got profile.Export
			if err := json.Unmarshal((*imports)[0], &got); err != nil {
				t.Fatal(err)
			}
			if len(got.Profiles) != 1 || got.Profiles[0].Layer != layer || got.Profiles[0].Files[0].Digest != digest.FromString("f") {
				t.Errorf("imported %+v, want the profile of %s alone", got, layer)
			}
			if !strings.Contains(out.String(), "imported 1 profiles") {
				t.Errorf("pull said %q", out.String())
			}
		})
	}
}

// TestProfilePushAndPullSayWhatIsMissing: pushing with no profile of the
// image's layers, or pulling where nothing is attached, is an error that
// says so.
func TestProfilePushAndPullSayWhatIsMissing(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	ref := strings.TrimPrefix(srv.URL, "http://") + "/app:1"
	img, _ := random.Image(256, 1)
	r, _ := name.ParseReference(ref, name.Insecure)
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	sock, _ := profileDaemon(t, profile.Export{Version: profile.FormatVersion, Profiles: []profile.Profile{
		{Layer: digest.FromString("x"), Files: []profile.Access{{Digest: digest.FromString("f")}}}}})
	var out, errb bytes.Buffer
	err := run(context.Background(), []string{"image", "profile", "push", "--api-address", sock, "--plain-http", ref}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "no profile of any layer") {
		t.Errorf("push without a profile: %v", err)
	}
	err = run(context.Background(), []string{"image", "profile", "pull", "--api-address", sock, "--plain-http", ref}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "no start-up profile is attached") {
		t.Errorf("pull with nothing attached: %v", err)
	}
}
