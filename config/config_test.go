package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseOverDefaults(t *testing.T) {
	cfg, err := Parse([]byte(`
root = "/srv/lazycas"
log_format = "json"
[snapshotter]
async_remove = true
mount_options = ["volatile"]
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Root = "/srv/lazycas"
	want.LogFormat = "json"
	want.Snapshotter = Snapshotter{AsyncRemove: true, MountOptions: []string{"volatile"}}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got %+v\nwant %+v", cfg, want)
	}
}

func TestParseLazySections(t *testing.T) {
	cfg, err := Parse([]byte(`
[fs]
passthrough = false
background_bandwidth = "20MiB"
fetch_concurrency = 8
[remote]
config_path = "/etc/containerd/certs.d"
request_timeout = "5s"
retries = 2
[containerd]
address = ""
[store]
verity = false
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.FS.Passthrough || !cfg.FS.Lazy || cfg.FS.BackgroundBandwidth.Bytes != 20<<20 || cfg.FS.FetchConcurrency != 8 {
		t.Errorf("fs = %+v", cfg.FS)
	}
	if cfg.Remote.ConfigPath != "/etc/containerd/certs.d" || cfg.Remote.RequestTimeout.Seconds() != 5 || cfg.Remote.Retries != 2 || cfg.Remote.MaxInFlight != 4 {
		t.Errorf("remote = %+v", cfg.Remote)
	}
	if cfg.Containerd.Address != "" {
		t.Errorf("containerd = %+v", cfg.Containerd)
	}
	if cfg.Store.Verity || !Default().Store.Verity {
		t.Errorf("store.verity = %v, default %v; want false, default true", cfg.Store.Verity, Default().Store.Verity)
	}
}

func TestEmptyFileMeansDefaults(t *testing.T) {
	cfg, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, Default()) {
		t.Errorf("got %+v, want defaults", cfg)
	}
}

func TestRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name, toml, want string
	}{
		{"an unknown top-level key", "roots = \"/x\"\n", `unknown key "roots" (line 1)`},
		{"an unknown nested key", "[snapshotter]\nasync = true\n", `unknown key "snapshotter.async" (line 2)`},
		{"a value of the wrong type", "log_level = 3\n", `key "log_level"`},
		{"a newer schema version", "version = 2\n", `key "version": unsupported version 2`},
		{"a relative root", "root = \"var/lib\"\n", `key "root": "var/lib" is not an absolute path`},
		{"an empty address", "address = \"\"\n", `key "address": must not be empty`},
		{"a socket path too long for sun_path", "address = \"/" + strings.Repeat("a", 120) + "\"\n", `key "address": socket path is 121 bytes`},
		{"an unknown log level", "log_level = \"loud\"\n", `key "log_level"`},
		{"an unknown log format", "log_format = \"xml\"\n", `key "log_format"`},
		{"a mount option the snapshotter owns", "[snapshotter]\nmount_options = [\"upperdir=/x\"]\n", "set by the snapshotter itself"},
		{"two mount options in one string", "[snapshotter]\nmount_options = [\"ro,volatile\"]\n", "without commas"},
		{"malformed TOML", "root = \n", "line 1"},
		{"a bad duration", "[remote]\nrequest_timeout = \"soon\"\n", `key "remote.request_timeout"`},
		{"a too short timeout", "[remote]\nrequest_timeout = \"1ms\"\n", `key "remote.request_timeout"`},
		{"negative retries", "[remote]\nretries = -1\n", `key "remote.retries"`},
		{"a relative hosts dir", "[remote]\nconfig_path = \"certs.d\"\n", `key "remote.config_path"`},
		{"no fetch concurrency", "[fs]\nfetch_concurrency = 0\n", `key "fs.fetch_concurrency"`},
		{"a bad bandwidth", "[fs]\nbackground_bandwidth = \"fast\"\n", `key "fs.background_bandwidth"`},
		{"a relative containerd socket", "[containerd]\naddress = \"c.sock\"\n", `key "containerd.address"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.toml))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "config.toml")
	cfg, err := Load(missing, false)
	if err != nil || !reflect.DeepEqual(cfg, Default()) {
		t.Errorf("missing optional file: got %+v, %v; want defaults", cfg, err)
	}
	if _, err := Load(missing, true); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing explicit file: got %v, want a not-found error", err)
	}
	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("nope = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(bad, false); err == nil || !strings.Contains(err.Error(), bad) {
		t.Errorf("bad file: error %v does not name the file", err)
	}
}
