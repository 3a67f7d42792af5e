package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"golang.org/x/crypto/bcrypt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// registryBinary is Debian's docker-registry (distribution 2.8).
const registryBinary = "/usr/bin/docker-registry"

// containerdBinary is Debian's containerd 1.6.
const containerdBinary = "/usr/bin/containerd"

// registryConfig logs at the registry's quietest level, "error" (which
// still includes the 404s of a push's existence checks), without access logs.
const registryConfig = `version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`

// registryAuthConfig is the registry's htpasswd section.
const registryAuthConfig = `auth:
  htpasswd:
    realm: lazycas-test
    path: %s
`

// startRegistry starts the registry on a free loopback port. The port is
// found by binding and releasing it, so a lost race is retried.
func (e *Env) startRegistry(ctx context.Context) error {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			return err
		}
		host := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		cfg := filepath.Join(e.Dir, "registry.yml")
		storage := filepath.Join(e.Dir, "registry")
		content := fmt.Appendf(nil, registryConfig, storage, host)
		if a := e.opts.RegistryAuth; a != nil {
			htpasswd := filepath.Join(e.Dir, "registry.htpasswd")
			hash, err := bcrypt.GenerateFromPassword([]byte(a.Password), bcrypt.MinCost)
			if err != nil {
				return err
			}
			if err := os.WriteFile(htpasswd, fmt.Appendf(nil, "%s:%s\n", a.User, hash), 0o600); err != nil {
				return err
			}
			content = fmt.Appendf(content, registryAuthConfig, htpasswd)
		}
		if err := os.WriteFile(cfg, content, 0o644); err != nil {
			return err
		}
		p, err := startProcess("registry", filepath.Join(e.Dir, registryLog), registryBinary, "serve", cfg)
		if err != nil {
			return err
		}
		hc := &http.Client{Timeout: 2 * time.Second}
		lastErr = p.waitFor(readyTimeout, func() error {
			if err := ctx.Err(); err != nil {
				return err
			}
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/v2/", nil)
			if err != nil {
				return err
			}
			if a := e.opts.RegistryAuth; a != nil {
				req.SetBasicAuth(a.User, a.Password)
			}
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("GET /v2/: %s", resp.Status)
			}
			return nil
		})
		if lastErr == nil {
			e.registry, e.RegistryHost = p, host
			return nil
		}
		_ = p.stop(stopGrace)
	}
	return lastErr
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startDaemon starts lazycas on DaemonRoot and DaemonAddress and waits
// until a snapshots List through containerd's proxy client succeeds.
func (e *Env) startDaemon(ctx context.Context) error {
	cfg := filepath.Join(e.Dir, "lazycas.toml")
	content := e.opts.DaemonConfig
	if !strings.Contains(content, "[containerd]") {
		// The daemon asks the environment's containerd, not the host's,
		// which image a label-less Prepare belongs to.
		content += fmt.Sprintf("\n[containerd]\naddress = %q\n", e.ContainerdAddress)
	}
	if !strings.Contains(content, "[remote]") {
		hostsDir, err := e.writeHostsDir()
		if err != nil {
			return err
		}
		content += fmt.Sprintf("\n[remote]\nconfig_path = %q\n", hostsDir)
	}
	if err := os.WriteFile(cfg, []byte(content), 0o644); err != nil {
		return err
	}
	// The daemon gets no registry credentials from the host's docker
	// config: only what a test gives it.
	dockerConfig := filepath.Join(e.Dir, "daemon-docker-config")
	if err := os.MkdirAll(dockerConfig, 0o700); err != nil {
		return err
	}
	p, err := startProcessEnv("lazycas", filepath.Join(e.Dir, daemonLog), e.opts.DaemonPath,
		append(daemonEnv(), "DOCKER_CONFIG="+dockerConfig),
		"--root", e.DaemonRoot, "--address", e.DaemonAddress, "--log-level", "debug", "--config", cfg)
	if err != nil {
		return err
	}
	e.daemon = p
	return p.waitFor(readyTimeout, func() error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := e.pingDaemon(ctx); err != nil {
			return err
		}
		// The API listens just after the snapshots socket: tests read
		// figures from it right after a (re)start.
		c, err := net.DialTimeout("unix", e.APISocket(), time.Second)
		if err != nil {
			return fmt.Errorf("lazycas API: %w", err)
		}
		return c.Close()
	})
}

// writeHostsDir writes the registry's hosts.toml into HostsDir and
// returns HostsDir. containerd records where a blob came from without the
// registry's port (containerd.io/distribution.source.127.0.0.1=python), so
// a label-less lazy pull reaches a registry on another port only through a
// hosts.toml for the bare host name, as on a real node.
func (e *Env) writeHostsDir() (string, error) {
	hostsDir := filepath.Join(e.Dir, "hosts.d")
	host, _, _ := strings.Cut(e.RegistryHost, ":")
	if err := os.MkdirAll(filepath.Join(hostsDir, host), 0o755); err != nil {
		return "", err
	}
	hosts := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n",
		"http://"+e.RegistryHost, "http://"+e.RegistryHost)
	if err := os.WriteFile(filepath.Join(hostsDir, host, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		return "", err
	}
	e.HostsDir = hostsDir
	return hostsDir, nil
}

// DaemonSocketDir is the directory of the daemon's sockets (its snapshots
// and API sockets), with Options.NoDaemon one of its own in RunDir.
func (e *Env) DaemonSocketDir() string { return filepath.Dir(e.DaemonAddress) }

// prepareNoDaemon readies the environment for a daemon the caller runs
// (Options.NoDaemon): the hosts directory, the socket directory, and
// DaemonRoot and RunDir as shared mounts. Close unmounts them with
// everything else under the environment's directories.
func (e *Env) prepareNoDaemon(context.Context) error {
	if _, err := e.writeHostsDir(); err != nil {
		return err
	}
	if err := os.MkdirAll(e.DaemonSocketDir(), 0o711); err != nil {
		return err
	}
	if err := os.MkdirAll(e.DaemonRoot, 0o700); err != nil {
		return err
	}
	for _, d := range []string{e.DaemonRoot, e.RunDir} {
		if err := makeShared(d); err != nil {
			return err
		}
	}
	return nil
}

// makeShared bind-mounts dir onto itself and makes the mount shared: a
// peer group of its own, whatever the propagation of the mount it is on
// (this machine's / is private).
func makeShared(dir string) error {
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s onto itself: %w", dir, err)
	}
	if err := syscall.Mount("", dir, "", syscall.MS_SHARED, ""); err != nil {
		return fmt.Errorf("make %s a shared mount: %w", dir, err)
	}
	return nil
}

// pingDaemon lists the daemon's snapshots directly over its socket; the
// daemon is ready when a whole List succeeds (an empty root lists as empty).
func (e *Env) pingDaemon(ctx context.Context) error {
	conn, err := grpc.NewClient("unix://"+e.DaemonAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("dial lazycas: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	stream, err := snapshotsapi.NewSnapshotsClient(conn).List(ctx, &snapshotsapi.ListSnapshotsRequest{Snapshotter: Snapshotter})
	for err == nil {
		_, err = stream.Recv()
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return fmt.Errorf("list snapshots: %w", err)
}

// DaemonSnapshotter connects to the lazycas socket directly, bypassing
// containerd. Call the returned function to close the connection.
func (e *Env) DaemonSnapshotter() (snapshots.Snapshotter, func(), error) {
	conn, err := grpc.NewClient("unix://"+e.DaemonAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("dial lazycas: %w", err)
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), Snapshotter), func() { conn.Close() }, nil
}

// SetDaemonPath replaces the containerd-lazycas-grpc binary
// (Options.DaemonPath) for the daemon's next start: RestartDaemon after it
// is an upgrade in place.
func (e *Env) SetDaemonPath(path string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.opts.DaemonPath = path
}

// RestartDaemon stops the lazycas daemon (SIGTERM, SIGKILL after a grace
// period) and starts it again on the same root and socket. The FUSE
// holder, when the daemon has one, outlives the stop; the new daemon takes
// its connections over.
func (e *Env) RestartDaemon(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.opts.NoDaemon {
		return errors.New("testenv: the environment runs no daemon (Options.NoDaemon): restart the caller's")
	}
	if err := e.daemon.stop(stopGrace); err != nil {
		return fmt.Errorf("stop lazycas: %w", err)
	}
	if err := e.startDaemon(ctx); err != nil {
		return fmt.Errorf("restart lazycas: %w\n%s", err, e.LogTail(20))
	}
	return nil
}

const containerdConfig = `version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = %q

[proxy_plugins]
  [proxy_plugins.lazycas]
    type = "snapshot"
    address = %q
`

// startContainerd starts a private containerd whose proxy snapshotter
// "lazycas" is the daemon, and connects Client to it.
func (e *Env) startContainerd(ctx context.Context) error {
	cfg := filepath.Join(e.Dir, "containerd.toml")
	root := filepath.Join(e.Dir, "containerd")
	var p *process
	var err error
	if e.opts.Containerd2 {
		p, err = e.startContainerd2(ctx, cfg, root)
	} else {
		body := fmt.Sprintf(containerdConfig, root, filepath.Join(e.RunDir, "state"), e.ContainerdAddress,
			e.ContainerdAddress+".ttrpc", filepath.Join(root, "opt"), e.DaemonAddress)
		for _, p := range e.opts.ProxySnapshotters {
			body += fmt.Sprintf("  [proxy_plugins.%q]\n    type = \"snapshot\"\n    address = %q\n", p.Name, p.Address)
		}
		if e.opts.CRIConfig != nil {
			body = strings.Replace(body, `disabled_plugins = ["io.containerd.grpc.v1.cri"]`, `disabled_plugins = []`, 1)
			body += "\n" + e.opts.CRIConfig(e)
		}
		if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
			return err
		}
		p, err = startProcess("containerd", filepath.Join(e.Dir, containerdLog), containerdBinary, "--config", cfg)
	}
	if err != nil {
		return err
	}
	e.ctrd = p
	return p.waitFor(readyTimeout, func() error {
		if err := ctx.Err(); err != nil {
			return err
		}
		c, err := client.New(e.ContainerdAddress, client.WithDefaultNamespace(e.Namespace),
			client.WithTimeout(2*time.Second))
		if err != nil {
			return err
		}
		vctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if _, err := c.Version(vctx); err != nil {
			c.Close()
			return err
		}
		e.Client = c
		return nil
	})
}
