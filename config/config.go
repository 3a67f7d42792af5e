// Package config is the TOML configuration of the lazycas daemon.
//
// Every key has a documented default (see Default and the README's config
// reference). Unknown keys and invalid values are rejected with an error that
// names the key, so a typo never silently falls back to a default.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	units "github.com/docker/go-units"
	"github.com/pelletier/go-toml/v2"
)

// Defaults used when neither the config file nor a flag sets a value.
const (
	DefaultPath    = "/etc/lazycas/config.toml"
	DefaultRoot    = "/var/lib/lazycas"
	DefaultAddress = "/run/lazycas/lazycas.sock"
	// DefaultAPIAddress is the socket of lazycas's own API.
	DefaultAPIAddress = "/run/lazycas/lazycas-api.sock"
	DefaultLogLevel   = "info"
	DefaultLogFormat  = "text"
	// DefaultContainerdAddress is containerd's default socket.
	DefaultContainerdAddress = "/run/containerd/containerd.sock"
)

// CurrentVersion is the only config schema version this build understands.
const CurrentVersion = 1

// Config is the daemon configuration. The toml tags are the file's keys.
type Config struct {
	// Version of the config schema; 0 (absent) means CurrentVersion.
	Version int `toml:"version"`
	// Root holds all of the daemon's state: metadata.db and snapshots/.
	// It must be on a filesystem overlayfs can use as upper (ext4, xfs, ...).
	Root string `toml:"root"`
	// Address is the unix socket serving containerd's snapshots API.
	Address string `toml:"address"`
	// APIAddress is the unix socket of lazycas's own HTTP API, which
	// `lazycas store stats` and `lazycas store gc` use; "" means next to
	// Address: /run/lazycas/lazycas.sock gives /run/lazycas/lazycas-api.sock.
	APIAddress string `toml:"api_address"`
	// LogLevel is one of trace, debug, info, warn, error, fatal, panic.
	LogLevel string `toml:"log_level"`
	// MetricsAddress is a TCP address ("127.0.0.1:9464") to serve
	// Prometheus metrics on, at /metrics; "" serves none.
	MetricsAddress string `toml:"metrics_address"`
	// LogFormat is "text" or "json".
	LogFormat string `toml:"log_format"`

	Snapshotter Snapshotter `toml:"snapshotter"`
	FS          FS          `toml:"fs"`
	Containerd  Containerd  `toml:"containerd"`
	Store       Store       `toml:"store"`
	Remote      Remote      `toml:"remote"`
	CRI         CRI         `toml:"cri"`
}

// CRI configures the CRI image service lazycas serves in front of
// containerd's, so that kubelet's pull secrets serve lazy reads too.
type CRI struct {
	// ImageServiceAddress is the unix socket kubelet's
	// --image-service-endpoint names, e.g. "/run/lazycas/cri.sock"; ""
	// serves none. Calls go on to containerd at containerd.address.
	ImageServiceAddress string `toml:"image_service_address"`
	// CredentialTTL is how long the credentials of a pull serve lazy reads
	// of its layers (less when they carry an earlier expiry), e.g. "12h".
	// Each pull of the image renews them.
	CredentialTTL Duration `toml:"credential_ttl"`
}

// FS configures lazy layers: FUSE mounts, prefetch and background fetch.
type FS struct {
	// Lazy mounts eStargz and zstd:chunked layers from the registry instead
	// of letting containerd download and unpack them.
	Lazy bool `toml:"lazy"`
	// Passthrough lets the kernel read fetched files straight from the
	// store (FUSE passthrough), one page cache for every image; falls back
	// to ordinary FUSE reads where the kernel cannot.
	Passthrough bool `toml:"passthrough"`
	// Prefetch fetches a layer's prioritised files (before its prefetch
	// landmark) right after mounting it.
	Prefetch bool `toml:"prefetch"`
	// StartupFetch fetches, once an image's top layer is mounted, the files
	// its entrypoint needs to start: the program, its ELF interpreter and
	// shared libraries, and glibc's start-up files (needs the containerd
	// address, to read the image config).
	StartupFetch bool `toml:"startup_fetch"`
	// Learn records which files containers open in the first seconds on
	// each layer (by file digest, in <root>/profiles.db) and, when a layer
	// holding any of them is mounted, fetches those first.
	Learn bool `toml:"learn"`
	// BackgroundFetch then fetches the rest of the layer.
	BackgroundFetch bool `toml:"background_fetch"`
	// BackgroundDelay is how long after a layer is mounted background
	// fetch waits, so that the container that usually starts right then
	// has the link to itself, e.g. "2s".
	BackgroundDelay Duration `toml:"background_delay"`
	// FetchConcurrency bounds the files one layer fetches at once.
	FetchConcurrency int `toml:"fetch_concurrency"`
	// BackgroundBandwidth caps prefetch and background fetch over all
	// layers, per second, e.g. "20MiB"; "" or "0" means no cap. Reads by
	// containers are never capped and go first.
	BackgroundBandwidth Size `toml:"background_bandwidth"`
	// Debug logs every FUSE request (very verbose).
	Debug bool `toml:"debug"`
	// Holder keeps lazy layers mounted while the daemon restarts, is
	// upgraded or crashes: a small process (this binary's fuse-holder
	// command, started by the daemon) holds their FUSE connections, and
	// the next daemon serves them on; containers' reads wait meanwhile.
	// Off, stopping the daemon unmounts its lazy layers.
	Holder bool `toml:"holder"`
	// HolderSpawn lets the daemon start the holder when none answers on
	// <root>/fuse-holder.sock. Turn it off where the holder runs apart
	// (a DaemonSet of its own), so the daemon waits for that one.
	HolderSpawn bool `toml:"holder_spawn"`
	// HolderAbortAfter is how long the holder waits for a daemon to come
	// back before it gives the mounts up, so that readers get an error
	// rather than wait for good, e.g. "5m"; "0" waits for good.
	HolderAbortAfter Duration `toml:"holder_abort_after"`
}

// Store configures the shared object store.
type Store struct {
	// MaxSize bounds the store's content, e.g. "20GiB"; beyond it the
	// least recently used objects go, unreferenced ones first, never open
	// ones. "" or "0" means no bound.
	MaxSize Size `toml:"max_size"`
	// PartialMinSize is the file size from which reads are served piece
	// by piece (each chunk verified on its own) while the file is
	// fetched, instead of after all of it; "0" turns that off.
	PartialMinSize Size `toml:"partial_min_size"`
	// Verity enables fs-verity on sealed objects where the store's
	// filesystem supports it: the kernel then checks every page read, and
	// objects need no re-hash after a restart. Without it (or where it is
	// unsupported) an object sealed before a restart is hashed again on
	// its first open, and fetched again if it no longer matches.
	Verity bool `toml:"verity"`
}

// Containerd says where the containerd this daemon serves listens. lazycas
// asks it, when a client pulls without image labels, which image a lazy
// layer belongs to.
type Containerd struct {
	// Address is containerd's gRPC socket; empty disables the lookup
	// (such layers are then unpacked).
	Address string `toml:"address"`
}

// Remote configures registry access for lazy layers.
type Remote struct {
	// ConfigPath is a containerd hosts directory (<dir>/<host>/hosts.toml:
	// mirrors, TLS, plain HTTP), as containerd's config_path.
	ConfigPath string `toml:"config_path"`
	// RequestTimeout bounds one HTTP request, e.g. "30s".
	RequestTimeout Duration `toml:"request_timeout"`
	// Retries is how often a failed request is retried.
	Retries int `toml:"retries"`
	// MaxInFlight bounds concurrent requests per layer blob.
	MaxInFlight int `toml:"max_in_flight"`
}

// Size is a byte count written as a string such as "20MiB" or "1.5G"
// (binary units).
type Size struct{ Bytes int64 }

// UnmarshalText parses a size.
func (s *Size) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		s.Bytes = 0
		return nil
	}
	v, err := units.RAMInBytes(string(b))
	if err != nil {
		return err
	}
	if v < 0 {
		return fmt.Errorf("negative size %q", b)
	}
	s.Bytes = v
	return nil
}

// MarshalText writes the size in binary units.
func (s Size) MarshalText() ([]byte, error) { return []byte(units.BytesSize(float64(s.Bytes))), nil }

// Duration is a time.Duration written as a string such as "30s".
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Snapshotter configures the overlay snapshotter.
type Snapshotter struct {
	// AsyncRemove defers deleting a removed snapshot's directories to
	// Cleanup (which containerd's garbage collector calls), so Remove
	// returns without waiting on a large rm -rf.
	AsyncRemove bool `toml:"async_remove"`
	// MountOptions are added to every overlay mount (e.g. "volatile").
	MountOptions []string `toml:"mount_options"`
}

// Default returns the configuration used when no file exists.
func Default() Config {
	return Config{
		Version:   CurrentVersion,
		Root:      DefaultRoot,
		Address:   DefaultAddress,
		LogLevel:  DefaultLogLevel,
		LogFormat: DefaultLogFormat,
		FS: FS{
			Lazy: true, Passthrough: true, Prefetch: true, StartupFetch: true, BackgroundFetch: true, FetchConcurrency: 2,
			BackgroundDelay: Duration{2 * time.Second}, Holder: true, HolderSpawn: true, HolderAbortAfter: Duration{5 * time.Minute},
		},
		Containerd: Containerd{Address: DefaultContainerdAddress},
		Store:      Store{PartialMinSize: Size{4 << 20}, Verity: true},
		Remote:     Remote{RequestTimeout: Duration{30 * time.Second}, Retries: 4, MaxInFlight: 4},
		CRI:        CRI{CredentialTTL: Duration{12 * time.Hour}},
	}
}

// Load reads the config at path over the defaults. When mustExist is false
// and the file does not exist, the defaults are returned: the default path
// is optional, an explicitly named file is not.
func Load(path string, mustExist bool) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !mustExist {
			return Default(), nil
		}
		return Config{}, fmt.Errorf("read config: %w (pass an existing file to --config, or no --config for the defaults)", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes TOML over the defaults and validates the result.
func Parse(data []byte) (Config, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, decodeError(err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// decodeError turns go-toml's errors into one line naming the key and line,
// since its default messages omit the offending key.
func decodeError(err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		keys := make([]string, 0, len(strict.Errors))
		for _, e := range strict.Errors {
			row, _ := e.Position()
			keys = append(keys, fmt.Sprintf("%q (line %d)", strings.Join(e.Key(), "."), row))
		}
		return fmt.Errorf("unknown key %s", strings.Join(keys, ", "))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, _ := de.Position()
		if k := de.Key(); len(k) > 0 {
			return fmt.Errorf("key %q (line %d): %s", strings.Join(k, "."), row, de.Error())
		}
		return fmt.Errorf("line %d: %s", row, de.Error())
	}
	return err
}

// Validate checks values the TOML types cannot.
func (c *Config) Validate() error {
	if c.Version != CurrentVersion {
		return fmt.Errorf("key \"version\": unsupported version %d (this build reads version %d)", c.Version, CurrentVersion)
	}
	if err := absPath("root", c.Root); err != nil {
		return err
	}
	if err := absPath("address", c.Address); err != nil {
		return err
	}
	// sun_path is 108 bytes including the terminating NUL.
	if len(c.Address) > 107 {
		return fmt.Errorf("key \"address\": socket path is %d bytes, the limit is 107", len(c.Address))
	}
	if c.MetricsAddress != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddress); err != nil {
			return fmt.Errorf("key \"metrics_address\": %q is not host:port: %w", c.MetricsAddress, err)
		}
	}
	if c.FS.Holder && len(c.HolderSocket()) > 107 {
		return fmt.Errorf("key \"root\": the fuse holder's socket %s is %d bytes, the limit is 107: choose a shorter root or set fs.holder = false",
			c.HolderSocket(), len(c.HolderSocket()))
	}
	if c.APIAddress != "" {
		if err := absPath("api_address", c.APIAddress); err != nil {
			return err
		}
		if len(c.APIAddress) > 107 {
			return fmt.Errorf("key \"api_address\": socket path is %d bytes, the limit is 107", len(c.APIAddress))
		}
		if c.APIAddress == c.Address {
			return fmt.Errorf("key \"api_address\": must differ from \"address\"")
		}
	}
	if !isOneOf(c.LogLevel, "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic") {
		return fmt.Errorf("key \"log_level\": %q is not one of trace, debug, info, warn, error, fatal, panic", c.LogLevel)
	}
	if !isOneOf(c.LogFormat, "text", "json") {
		return fmt.Errorf("key \"log_format\": %q is not one of text, json", c.LogFormat)
	}
	for _, o := range c.Snapshotter.MountOptions {
		if o == "" || strings.Contains(o, ",") {
			return fmt.Errorf("key \"snapshotter.mount_options\": %q must be one non-empty option without commas", o)
		}
		if name, _, _ := strings.Cut(o, "="); isOneOf(name, "lowerdir", "upperdir", "workdir") {
			return fmt.Errorf("key \"snapshotter.mount_options\": %q is set by the snapshotter itself", o)
		}
	}
	if c.FS.FetchConcurrency < 1 || c.FS.FetchConcurrency > 64 {
		return fmt.Errorf("key \"fs.fetch_concurrency\": %d is not between 1 and 64", c.FS.FetchConcurrency)
	}
	if d := c.FS.BackgroundDelay.Duration; d < 0 || d > time.Hour {
		return fmt.Errorf("key \"fs.background_delay\": %s is not between 0 and 1h", d)
	}
	if c.Containerd.Address != "" {
		if err := absPath("containerd.address", c.Containerd.Address); err != nil {
			return err
		}
	}
	if c.CRI.ImageServiceAddress != "" {
		if err := absPath("cri.image_service_address", c.CRI.ImageServiceAddress); err != nil {
			return err
		}
		if len(c.CRI.ImageServiceAddress) > 107 {
			return fmt.Errorf("key \"cri.image_service_address\": socket path is %d bytes, the limit is 107", len(c.CRI.ImageServiceAddress))
		}
		if c.Containerd.Address == "" {
			return fmt.Errorf("key \"cri.image_service_address\": the proxy passes calls on to containerd: set containerd.address")
		}
		if !c.FS.Lazy {
			return fmt.Errorf("key \"cri.image_service_address\": the proxy keeps credentials for lazy layers: set fs.lazy = true or remove the key")
		}
		if c.CRI.ImageServiceAddress == c.Address || c.CRI.ImageServiceAddress == c.APISocket() {
			return fmt.Errorf("key \"cri.image_service_address\": must differ from \"address\" and \"api_address\"")
		}
	}
	if d := c.CRI.CredentialTTL.Duration; d < time.Minute || d > 30*24*time.Hour {
		return fmt.Errorf("key \"cri.credential_ttl\": %s is not between 1m and 720h", d)
	}
	if c.Remote.ConfigPath != "" {
		if err := absPath("remote.config_path", c.Remote.ConfigPath); err != nil {
			return err
		}
	}
	if d := c.Remote.RequestTimeout.Duration; d < 100*time.Millisecond || d > time.Hour {
		return fmt.Errorf("key \"remote.request_timeout\": %s is not between 100ms and 1h", d)
	}
	if c.Remote.Retries < 0 || c.Remote.Retries > 20 {
		return fmt.Errorf("key \"remote.retries\": %d is not between 0 and 20", c.Remote.Retries)
	}
	if c.Remote.MaxInFlight < 1 || c.Remote.MaxInFlight > 64 {
		return fmt.Errorf("key \"remote.max_in_flight\": %d is not between 1 and 64", c.Remote.MaxInFlight)
	}
	return nil
}

// HolderSocket is where the fuse holder of the daemon on Root listens.
func (c *Config) HolderSocket() string { return filepath.Join(c.Root, "fuse-holder.sock") }

// APISocket is the API's socket: APIAddress, or its default next to Address.
func (c *Config) APISocket() string {
	if c.APIAddress != "" {
		return c.APIAddress
	}
	return strings.TrimSuffix(c.Address, ".sock") + "-api.sock"
}

func absPath(key, p string) error {
	if p == "" {
		return fmt.Errorf("key %q: must not be empty", key)
	}
	if !filepath.IsAbs(p) {
		return fmt.Errorf("key %q: %q is not an absolute path", key, p)
	}
	return nil
}

func isOneOf(v string, set ...string) bool { return slices.Contains(set, v) }
