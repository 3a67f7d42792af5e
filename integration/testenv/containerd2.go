package testenv

// containerd 2.x in place of Debian's 1.6 (Options.Containerd2): built once
// from source into the test cache, since Debian ships only 1.6.
//
// Contract: the cache entry <CacheDir>/containerd-<Containerd2Version>
// holds the containerd and containerd-shim-runc-v2 binaries and is complete
// whenever it exists: it is built in a temporary sibling directory and
// renamed into place. Builders serialise on a flock'd
// containerd-<Containerd2Version>.lock, so concurrent test processes build
// it once. A 2.x daemon cannot start Debian's 1.6 shim, so the entry comes
// first in the daemon's PATH; the shim runs Debian's runc.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/transfer/image"
	"github.com/containerd/containerd/v2/core/transfer/registry"
	"github.com/containerd/platforms"

	"github.com/lazycas/lazycas/integration/testimages"
)

// Containerd2Version is the containerd 2.x release Options.Containerd2 runs.
const Containerd2Version = "v2.4.2"

// containerd2Module is the module both binaries are installed from.
const containerd2Module = "github.com/containerd/containerd/v2"

// containerd2BuildTimeout bounds one cold build (~1.5 min on 2 cores).
const containerd2BuildTimeout = 15 * time.Minute

// ErrContainerd2Offline marks a build of a test tool (containerd 2.x,
// crictl) that failed because the Go module proxy could not be reached;
// callers may skip on it.
var ErrContainerd2Offline = errors.New("test tool sources unreachable (no network to the Go module proxy)")

// BuildContainerd2 returns the cache directory holding containerd
// Containerd2Version's containerd and containerd-shim-runc-v2, building
// them with `go install` when the cache lacks them. A failure to reach the
// module proxy wraps ErrContainerd2Offline.
func BuildContainerd2(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	return goInstallCached(ctx, logf, "containerd-"+Containerd2Version, []string{"containerd", "containerd-shim-runc-v2"},
		containerd2Module+"/cmd/containerd@"+Containerd2Version,
		containerd2Module+"/cmd/containerd-shim-runc-v2@"+Containerd2Version)
}

// goInstallBuildTimeout bounds one cold `go install` of a test tool.
const goInstallBuildTimeout = containerd2BuildTimeout

// goInstallCached returns the cache directory <CacheDir>/name holding
// bins, installing pkgs into it with `go install` when the cache lacks
// them: built in a temporary sibling and renamed into place, under a
// flock'd name.lock, so concurrent test processes build it once.
func goInstallCached(ctx context.Context, logf func(format string, args ...any), name string, bins []string, pkgs ...string) (string, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	cacheDir := testimages.CacheDir()
	entry := filepath.Join(cacheDir, name)
	if complete(entry, bins) {
		return entry, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", err
	}
	unlock, err := testimages.LockFile(ctx, filepath.Join(cacheDir, name+".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if complete(entry, bins) { // built by another process while we waited
		return entry, nil
	}
	start := time.Now()
	logf("building %s (go install, once into %s)", name, entry)
	if err := goInstall(ctx, cacheDir, name, entry, bins, pkgs); err != nil {
		return "", err
	}
	logf("built %s in %s", name, time.Since(start).Round(100*time.Millisecond))
	return entry, nil
}

// complete reports whether dir holds every one of bins.
func complete(dir string, bins []string) bool {
	for _, b := range bins {
		if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || !fi.Mode().IsRegular() {
			return false
		}
	}
	return true
}

// goInstall installs pkgs into a temporary directory and renames it to
// entry. The caller holds the lock.
func goInstall(ctx context.Context, cacheDir, name, entry string, bins, pkgs []string) error {
	ctx, cancel := context.WithTimeout(ctx, goInstallBuildTimeout)
	defer cancel()
	// Leftovers of a builder that died: nobody else builds now.
	stale, _ := filepath.Glob(filepath.Join(cacheDir, name+".build-*"))
	for _, d := range stale {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("remove stale build dir: %w", err)
		}
	}
	tmp, err := os.MkdirTemp(cacheDir, name+".build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		return err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.CommandContext(ctx, goBin, append([]string{"install"}, pkgs...)...)
	cmd.Dir = tmp // outside any module: the release's own go.mod decides
	// Independent of the caller's module settings and toolchain.
	cmd.Env = append(os.Environ(), "GOBIN="+bin, "GOFLAGS=", "GOWORK=off", "GOTOOLCHAIN=local")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if offline(msg) {
			return fmt.Errorf("%w: go install %s: %v\n%s", ErrContainerd2Offline, name, err, msg)
		}
		return fmt.Errorf("go install %s: %w\n%s", name, err, msg)
	}
	if !complete(bin, bins) {
		return fmt.Errorf("go install %s left no binaries in %s\n%s", name, bin, out.String())
	}
	if err := os.Rename(bin, entry); err != nil {
		return fmt.Errorf("publish %s: %w", entry, err)
	}
	return nil
}

// offline recognises go's messages for an unreachable (or, with
// GOPROXY=off, forbidden) module proxy.
func offline(goOutput string) bool {
	for _, s := range []string{"dial tcp", "no such host", "i/o timeout", "connection refused",
		"network is unreachable", "TLS handshake timeout", "connection reset by peer",
		"module lookup disabled by GOPROXY=off"} {
		if strings.Contains(goOutput, s) {
			return true
		}
	}
	return false
}

// containerd2Config mirrors containerdConfig in the 2.x schema (version 3,
// which every 2.x reads; 2.4 migrates it to its version 4 with a warning).
// CRI (split into several plugins in 2.x) and NRI, whose socket is a host
// path, are disabled. The proxy plugin exports
// enable_remote_snapshot_annotations so that the transfer service passes
// the remote-snapshot labels, and the transfer service may unpack into
// lazycas as well as into overlayfs.
const containerd2Config = `version = 3
root = %q
state = %q
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = %q
  [plugins."io.containerd.transfer.v1.local"]
    [[plugins."io.containerd.transfer.v1.local".unpack_config]]
      platform = %q
      snapshotter = "overlayfs"
    [[plugins."io.containerd.transfer.v1.local".unpack_config]]
      platform = %q
      snapshotter = %q

[proxy_plugins]
  [proxy_plugins.%s]
    type = "snapshot"
    address = %q
    exports = { enable_remote_snapshot_annotations = "true" }
`

// criPlugins2 are the plugins CRI is made of in 2.x, enabled by
// Options.CRIConfig.
var criPlugins2 = []string{"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
	"io.containerd.podsandbox.controller.v1.podsandbox"}

// startContainerd2 builds (or finds) containerd 2.x, writes its config to
// cfg and starts it with the build directory first on its PATH.
func (e *Env) startContainerd2(ctx context.Context, cfg, root string) (*process, error) {
	dir, err := BuildContainerd2(ctx, e.logf)
	if err != nil {
		return nil, err
	}
	platform := "linux/" + runtime.GOARCH
	body := fmt.Sprintf(containerd2Config, root, filepath.Join(e.RunDir, "state"), e.ContainerdAddress,
		e.ContainerdAddress+".ttrpc", filepath.Join(root, "opt"), platform, platform, Snapshotter,
		Snapshotter, e.DaemonAddress)
	for _, p := range e.opts.ProxySnapshotters {
		body += fmt.Sprintf("  [proxy_plugins.%q]\n    type = \"snapshot\"\n    address = %q\n"+
			"    exports = { enable_remote_snapshot_annotations = \"true\" }\n", p.Name, p.Address)
	}
	if e.opts.CRIConfig != nil {
		for _, p := range criPlugins2 {
			body = strings.Replace(body, fmt.Sprintf("  %q,\n", p), "", 1)
		}
		body += "\n" + e.opts.CRIConfig(e)
	}
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		return nil, err
	}
	env := daemonEnv()
	path := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v // the last one wins, as in exec
		}
	}
	env = append(env, "PATH="+dir+":"+path)
	return startProcessEnv("containerd", filepath.Join(e.Dir, containerdLog), filepath.Join(dir, "containerd"),
		env, "--config", cfg)
}

// PullWithTransfer pulls ref into lazycas through containerd 2.x's transfer
// service, as a 2.x `ctr image pull` and nerdctl do: containerd itself
// resolves, fetches and unpacks, and passes the remote-snapshot labels only
// because the proxy plugin exports enable_remote_snapshot_annotations. Not
// available on containerd 1.6.
func (e *Env) PullWithTransfer(ctx context.Context, ref string) (client.Image, error) {
	ctx = e.Context(ctx)
	src, err := registry.NewOCIRegistry(ctx, ref, registry.WithDefaultScheme("http"))
	if err != nil {
		return nil, err
	}
	dst := image.NewStore(ref, image.WithUnpack(platforms.DefaultSpec(), Snapshotter))
	if err := e.Client.Transfer(ctx, src, dst); err != nil {
		return nil, fmt.Errorf("transfer %s: %w", ref, err)
	}
	img, err := e.Client.GetImage(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("get image %s after transfer: %w", ref, err)
	}
	return img, nil
}
