package cri

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/registry"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/service/resolver"
)

func userPass(u, p string) *runtime.AuthConfig { return &runtime.AuthConfig{Username: u, Password: p} }

func TestKeyringKeepsCredentialsByRepository(t *testing.T) {
	k := NewKeyring(time.Hour)
	mustPut(t, k, "registry.example:5000/team-a/app:1", userPass("a", "pa"))
	mustPut(t, k, "registry.example:5000/team-b/app@sha256:"+strings.Repeat("0", 64), userPass("b", "pb"))
	mustPut(t, k, "python:3", &runtime.AuthConfig{Auth: base64.StdEncoding.EncodeToString([]byte("hub:ph"))})
	mustPut(t, k, "ghcr.io/org/tool", &runtime.AuthConfig{Username: "ignored", IdentityToken: "refresh"})

	for _, tc := range []struct {
		host, registry, repo string
		user, secret         string
		ok                   bool
	}{
		{"registry.example:5000", "registry.example:5000", "team-a/app", "a", "pa", true},
		{"registry.example:5000", "registry.example:5000", "team-b/app", "b", "pb", true},
		{"registry.example:5000", "registry.example:5000", "team-c/app", "", "", false},
		// A mirror is another party: it gets none of the registry's.
		{"mirror.example", "registry.example:5000", "team-a/app", "", "", false},
		// Docker Hub: kubelet says "python", containerd asks registry-1.
		{"registry-1.docker.io", "docker.io", "library/python", "hub", "ph", true},
		// An identity token goes with an empty user: containerd's
		// authorizer then exchanges it as a refresh token.
		{"ghcr.io", "ghcr.io", "org/tool", "", "refresh", true},
	} {
		user, secret, ok := k.Credentials(tc.host, tc.registry, tc.repo)
		if ok != tc.ok || user != tc.user || secret != tc.secret {
			t.Errorf("Credentials(%s, %s, %s) = %q, %q, %v; want %q, %q, %v", tc.host, tc.registry, tc.repo, user, secret, ok, tc.user, tc.secret, tc.ok)
		}
	}
	if n := k.Len(); n != 4 {
		t.Errorf("Len = %d, want 4", n)
	}
}

func TestKeyringServerAddress(t *testing.T) {
	k := NewKeyring(time.Hour)
	// Kubelet's docker config entry for Docker Hub.
	mustPut(t, k, "docker.io/library/busybox", &runtime.AuthConfig{Username: "u", Password: "p", ServerAddress: "https://index.docker.io/v1/"})
	if _, _, ok := k.Credentials("registry-1.docker.io", "docker.io", "library/busybox"); !ok {
		t.Error("Docker Hub credentials not used for registry-1.docker.io")
	}
	// Credentials naming one server are not sent to another.
	mustPut(t, k, "registry.example/app", &runtime.AuthConfig{Username: "u", Password: "p", ServerAddress: "other.example"})
	if _, _, ok := k.Credentials("registry.example", "registry.example", "app"); ok {
		t.Error("credentials for other.example sent to registry.example")
	}
	if _, _, ok := k.Credentials("other.example", "registry.example", "app"); !ok {
		t.Error("credentials not sent to the server they name")
	}
}

func TestKeyringExpiry(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	k := NewKeyring(time.Hour)
	k.now = func() time.Time { return now }
	mustPut(t, k, "registry.example/app", userPass("u", "p"))
	// A JWT that expires in ten minutes outlives neither itself nor the TTL.
	claims := base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, `{"exp":%d}`, now.Add(10*time.Minute).Unix()))
	mustPut(t, k, "registry.example/jwt", &runtime.AuthConfig{IdentityToken: "e30." + claims + ".sig"})

	now = now.Add(9 * time.Minute)
	if _, _, ok := k.Credentials("registry.example", "registry.example", "jwt"); !ok {
		t.Error("token gone before its exp")
	}
	now = now.Add(2 * time.Minute)
	if _, _, ok := k.Credentials("registry.example", "registry.example", "jwt"); ok {
		t.Error("token still served after its exp")
	}
	if _, _, ok := k.Credentials("registry.example", "registry.example", "app"); !ok {
		t.Error("password gone before the TTL")
	}
	now = now.Add(time.Hour)
	if _, _, ok := k.Credentials("registry.example", "registry.example", "app"); ok {
		t.Error("password still served after the TTL")
	}
	if n := k.Len(); n != 0 {
		t.Errorf("Len = %d after everything expired", n)
	}
}

func TestKeyringUndo(t *testing.T) {
	k := NewKeyring(time.Hour)
	mustPut(t, k, "registry.example/app", userPass("u", "good"))
	undo, err := k.Put("registry.example/app", userPass("u", "wrong"))
	if err != nil {
		t.Fatal(err)
	}
	undo() // the pull with the wrong password failed
	if _, secret, _ := k.Credentials("registry.example", "registry.example", "app"); secret != "good" {
		t.Errorf("after a failed pull the secret is %q, want the one that worked", secret)
	}

	undo, _ = k.Put("registry.example/new", userPass("u", "p"))
	undo()
	if _, _, ok := k.Credentials("registry.example", "registry.example", "new"); ok {
		t.Error("credentials of a failed first pull kept")
	}

	// A later pull's credentials stay when an earlier one fails after it.
	undo, _ = k.Put("registry.example/app", userPass("u", "first"))
	mustPut(t, k, "registry.example/app", userPass("u", "second"))
	undo()
	if _, secret, _ := k.Credentials("registry.example", "registry.example", "app"); secret != "second" {
		t.Errorf("secret %q, want the later pull's", secret)
	}
}

func TestKeyringRefuses(t *testing.T) {
	k := NewKeyring(time.Hour)
	for _, auth := range []*runtime.AuthConfig{nil, {}, {RegistryToken: "bearer-only"}} {
		if _, err := k.Put("registry.example/app", auth); !errors.Is(err, ErrNothingKept) {
			t.Errorf("Put(%v): %v, want ErrNothingKept", auth, err)
		}
	}
	if n := k.Len(); n != 0 {
		t.Errorf("kept %d entries from pulls without usable credentials", n)
	}
	for _, tc := range []struct {
		image string
		auth  *runtime.AuthConfig
	}{
		{"registry.example/app", &runtime.AuthConfig{Auth: "not base64!"}},
		{"registry.example/app", &runtime.AuthConfig{Auth: base64.StdEncoding.EncodeToString([]byte("no-colon"))}},
		{"registry.example/Bad Name", userPass("u", "p")},
	} {
		_, err := k.Put(tc.image, tc.auth)
		if err == nil {
			t.Errorf("Put(%q) kept malformed input", tc.image)
			continue
		}
		// The error must never carry the secret.
		if strings.Contains(err.Error(), "no-colon") || strings.Contains(err.Error(), "not base64!") {
			t.Errorf("error shows the credentials: %v", err)
		}
	}
}

// TestLazyReadsUseTheRepositorysCredentials reads blobs through the
// fetcher as the daemon wires it, from a registry whose two repositories
// take different passwords: each read authenticates with its own pull's,
// and a repository nobody pulled with credentials gets a 401.
func TestLazyReadsUseTheRepositorysCredentials(t *testing.T) {
	store := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	passwords := map[string]string{"team-a/app": "pa", "team-b/app": "pb", "team-c/app": "pc"}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		repo, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/blobs/")
		if user, pass, ok := r.BasicAuth(); !ok || user != "u" || pass != passwords[repo] {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		store.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	blobs := map[string][]byte{}
	for repo, pass := range passwords {
		data := make([]byte, 4096)
		_, _ = rand.Read(data)
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v2/"+repo+"/blobs/uploads/?digest="+digest.FromBytes(data).String(), bytes.NewReader(data))
		req.SetBasicAuth("u", pass)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("push to %s: %s", repo, resp.Status)
		}
		blobs[repo] = data
	}

	keys := NewKeyring(time.Hour)
	mustPut(t, keys, host+"/team-a/app:1", userPass("u", "pa"))
	mustPut(t, keys, host+"/team-b/app:1", userPass("u", "pb"))
	ctx := context.Background()
	f := remote.New(remote.Options{
		RepoHosts: resolver.RepoHosts(ctx, resolver.Options{PlainHTTP: true, Keychain: authn.NewMultiKeychain(), RepoCredentials: keys}),
		Retries:   -1,
	})
	defer f.Close()
	for _, repo := range []string{"team-a/app", "team-b/app", "team-c/app"} {
		data := blobs[repo]
		b, err := f.Open(ctx, host+"/"+repo+":1", ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data))})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 100)
		_, err = b.ReadAt(got, 1000)
		if repo == "team-c/app" {
			if err == nil {
				t.Errorf("%s read without credentials", repo)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", repo, err)
		} else if !bytes.Equal(got, data[1000:1100]) {
			t.Errorf("%s: wrong bytes", repo)
		}
	}
}

func mustPut(t *testing.T, k *Keyring, image string, auth *runtime.AuthConfig) {
	t.Helper()
	if _, err := k.Put(image, auth); err != nil {
		t.Fatalf("Put(%q): %v", image, err)
	}
}

func TestKeyringHandover(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	old := NewKeyring(time.Hour)
	old.now = func() time.Time { return now }
	var changes int
	old.OnChange(func() { changes++ })
	mustPut(t, old, "registry.example/a", userPass("u", "pa"))
	mustPut(t, old, "registry.example/b", userPass("u", "pb"))
	undo, _ := old.Put("registry.example/c", userPass("u", "wrong"))
	undo()
	if changes != 4 {
		t.Errorf("%d changes reported, want 4 (three puts, one undo)", changes)
	}
	data := old.Export()

	now = now.Add(30 * time.Minute)
	next := NewKeyring(time.Hour)
	next.now = func() time.Time { return now }
	// A pull made since the restart is newer than the handed-over one.
	mustPut(t, next, "registry.example/b", userPass("u", "pb2"))
	n, err := next.Import(data)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("imported %d entries, want 1", n)
	}
	for repo, want := range map[string]string{"a": "pa", "b": "pb2"} {
		if _, secret, _ := next.Credentials("registry.example", "registry.example", repo); secret != want {
			t.Errorf("%s: secret %q, want %q", repo, secret, want)
		}
	}
	// The expiry travels: the handed-over entry does not live a new TTL.
	now = now.Add(31 * time.Minute)
	if _, _, ok := next.Credentials("registry.example", "registry.example", "a"); ok {
		t.Error("handed-over credentials outlived their expiry")
	}
	if _, err := next.Import([]byte(`{"version":2,"entries":[]}`)); err == nil {
		t.Error("a keyring of an unknown version was read")
	}
	if _, err := next.Import([]byte(`not json`)); err == nil {
		t.Error("garbage was read as a keyring")
	}
}
