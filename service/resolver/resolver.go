// Package resolver builds containerd registry resolvers the way containerd
// itself configures registries: hosts.toml directories (mirrors, TLS, plain
// HTTP) and docker config.json credentials (also credential helpers and
// Podman's auth.json). The daemon and the CLI share it, so a registry that
// works for `ctr --hosts-dir` works for lazycas.
package resolver

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Options selects where registry configuration comes from.
type Options struct {
	// HostsDir is a containerd hosts directory (`<dir>/<host>/hosts.toml`),
	// containerd's config_path; empty means none.
	HostsDir string
	// PlainHTTP talks plain HTTP to registries that hosts.toml does not
	// configure. Without it containerd already tries HTTPS then HTTP for
	// loopback registries on a non-443 port.
	PlainHTTP bool
	// Keychain supplies credentials; nil means the docker config.json
	// keychain (DOCKER_CONFIG, ~/.docker, credential helpers).
	Keychain authn.Keychain
	// RepoCredentials, when set, is asked first, by repository (see
	// RepoHosts): the credentials kubelet pulled the image with.
	RepoCredentials RepoCredentials
}

// RepoCredentials are credentials that differ by repository, such as
// kubelet's pull secrets.
type RepoCredentials interface {
	// Credentials returns what a request to host for repository of
	// registry authenticates with; ok false means none here.
	Credentials(host, registry, repository string) (user, secret string, ok bool)
}

// Hosts returns containerd's registry host configuration for opts.
func Hosts(ctx context.Context, opts Options) docker.RegistryHosts {
	return hosts(ctx, opts, nil)
}

// RepoHosts returns the host configuration of one repository of a
// registry: its authorizers ask opts.RepoCredentials for that repository
// before the keychain, so one registry's repositories can each read with
// the credentials they were pulled with.
func RepoHosts(ctx context.Context, opts Options) func(registry, repository string) ([]docker.RegistryHost, error) {
	return func(registry, repository string) ([]docker.RegistryHost, error) {
		var first func(host string) (string, string, bool)
		if opts.RepoCredentials != nil {
			first = func(host string) (string, string, bool) {
				return opts.RepoCredentials.Credentials(host, registry, repository)
			}
		}
		return hosts(ctx, opts, first)(registry)
	}
}

func hosts(ctx context.Context, opts Options, first func(host string) (string, string, bool)) docker.RegistryHosts {
	keychain := opts.Keychain
	if keychain == nil {
		keychain = authn.DefaultKeychain
	}
	ho := config.HostOptions{
		Credentials: func(host string) (string, string, error) {
			if first != nil {
				if user, secret, ok := first(host); ok {
					return user, secret, nil
				}
			}
			return credentials(ctx, keychain, host)
		},
		UpdateClient: keepConnections,
	}
	if opts.HostsDir != "" {
		ho.HostDir = config.HostDirFromRoot(opts.HostsDir)
	}
	if opts.PlainHTTP {
		ho.DefaultScheme = "http"
	}
	return config.ConfigureHosts(ctx, ho)
}

// keepConnections lets several range requests to one registry reuse their
// connections: containerd's default transport keeps only two idle ones per
// host, fewer than the reads a lazy layer has in flight.
func keepConnections(c *http.Client) error {
	if t, ok := c.Transport.(*http.Transport); ok {
		t = t.Clone()
		t.MaxIdleConnsPerHost = 32
		c.Transport = t
	}
	return nil
}

// New returns a resolver for opts.
func New(ctx context.Context, opts Options) remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{Hosts: Hosts(ctx, opts)})
}

// credentials answers containerd's per-host credential callback from the
// keychain. An identity token goes back with an empty user name, which is
// how containerd's authorizer recognises a refresh token.
func credentials(ctx context.Context, keychain authn.Keychain, host string) (string, string, error) {
	if host == "registry-1.docker.io" {
		host = name.DefaultRegistry
	}
	reg, err := name.NewRegistry(host, name.WeakValidation)
	if err != nil {
		return "", "", fmt.Errorf("credentials for %s: %w", host, err)
	}
	auth, err := authn.Resolve(ctx, keychain, reg)
	if err != nil {
		return "", "", fmt.Errorf("credentials for %s: %w", host, err)
	}
	cfg, err := authn.Authorization(ctx, auth)
	if err != nil {
		return "", "", fmt.Errorf("credentials for %s: %w", host, err)
	}
	switch {
	case cfg.IdentityToken != "":
		return "", cfg.IdentityToken, nil
	case cfg.Username != "" || cfg.Password != "":
		return cfg.Username, cfg.Password, nil
	case cfg.Auth != "":
		raw, err := base64.StdEncoding.DecodeString(cfg.Auth)
		if err != nil {
			return "", "", fmt.Errorf("credentials for %s: decode auth: %w", host, err)
		}
		user, pass, ok := strings.Cut(string(raw), ":")
		if !ok {
			return "", "", fmt.Errorf("credentials for %s: auth is not user:password", host)
		}
		return user, pass, nil
	}
	return "", "", nil
}
