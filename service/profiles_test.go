package service

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/profile"
)

// apiFor serves the API of a daemon whose only state is a profile DB.
func apiFor(t *testing.T, db *profile.DB) *http.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := &Service{}
	if db != nil {
		s.lazy = &lazy{prof: db}
	}
	go s.ServeAPI(l)
	t.Cleanup(func() { l.Close() })
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
}

func TestProfilesAPI(t *testing.T) {
	db, err := profile.Open(filepath.Join(t.TempDir(), "p.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	layer, file := digest.FromString("layer"), digest.FromString("file")
	if err := db.Record(layer, []profile.Access{{Digest: file}}); err != nil {
		t.Fatal(err)
	}
	c := apiFor(t, db)
	for _, tc := range []struct {
		name, method, query, body string
		code                      int
		want                      string
	}{
		{"exports every profile", "GET", "", "", 200, string(layer)},
		{"exports a named layer", "GET", "?layer=" + string(layer), "", 200, string(file)},
		{"a layer without a profile is not found", "GET", "?layer=" + string(digest.FromString("x")), "", 404, "no profile"},
		{"a bad layer digest is a bad request", "GET", "?layer=nope", "", 400, "nope"},
		{"imports an export", "POST", "", fmt.Sprintf(`{"version":1,"profiles":[{"layer":%q,"files":[{"digest":%q}]}]}`,
			digest.FromString("other"), file), 200, `"imported":1`},
		{"a malformed import is a bad request", "POST", "", `{"version":9}`, 400, "version 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, "http://lazycas"+APIProfiles+tc.query, strings.NewReader(tc.body))
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var buf bytes.Buffer
			buf.ReadFrom(resp.Body)
			if resp.StatusCode != tc.code || !strings.Contains(buf.String(), tc.want) {
				t.Errorf("%d %s; want %d and %q", resp.StatusCode, buf.String(), tc.code, tc.want)
			}
		})
	}
	e, _ := db.Export()
	if len(e.Profiles) != 2 {
		t.Errorf("%d profiles after the import, want 2", len(e.Profiles))
	}
}

func TestProfilesAPIWhenLearningIsOff(t *testing.T) {
	resp, err := apiFor(t, nil).Get("http://lazycas" + APIProfiles)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e APIError
	json.NewDecoder(resp.Body).Decode(&e)
	if resp.StatusCode != 404 || !strings.Contains(e.Error, "fs.learn") {
		t.Errorf("%d %q", resp.StatusCode, e.Error)
	}
}
