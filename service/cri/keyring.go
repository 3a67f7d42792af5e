package cri

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// ErrNothingKept is Put's answer to a pull without credentials it can use
// (none, or a bare registry token).
var ErrNothingKept = errors.New("no credentials to keep")

// DefaultTTL is how long a pull's credentials serve lazy reads when the
// credentials themselves say nothing about their expiry.
const DefaultTTL = 12 * time.Hour

// dockerHubHost is where containerd sends requests for docker.io images.
const dockerHubHost = "registry-1.docker.io"

// Keyring keeps the credentials kubelet passed with each image pull, by
// registry and repository, in memory only: lazy layers read from the
// registry long after the pull, with the pull's credentials. They are
// never logged and never written anywhere; a daemon restart forgets them
// (the next pull of the image brings them again).
//
// Keyring is safe for concurrent use.
type Keyring struct {
	ttl time.Duration
	now func() time.Time

	mu       sync.Mutex
	keys     map[repoKey]Credential
	onChange func()
}

type repoKey struct{ registry, repository string }

// Credential is what a pull authenticated with.
type Credential struct {
	// Username and Secret are what containerd's authorizer takes: a user
	// name and password, or an empty user name and an identity (refresh)
	// token.
	Username string `json:"username"`
	Secret   string `json:"secret"`
	// Server is the host the credentials name (kubelet's server_address);
	// empty when they did not say.
	Server string `json:"server,omitempty"`
	// Expires is when the credentials stop serving.
	Expires time.Time `json:"expires"`
}

// NewKeyring returns an empty keyring whose entries expire after ttl (or
// earlier, when the credentials carry their own expiry); 0 means DefaultTTL.
func NewKeyring(ttl time.Duration) *Keyring {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	return &Keyring{ttl: ttl, now: time.Now, keys: map[repoKey]Credential{}}
}

// Put keeps auth for the repository of image, a reference as kubelet
// sends it ("python:3", "docker.io/library/python@sha256:…"). It returns a
// function that puts back what the repository had before, for a pull that
// fails: a wrong password must not replace one that works for the layers
// already mounted. A nil or empty auth keeps nothing, and so does
// ErrNothingKept.
func (k *Keyring) Put(image string, auth *runtime.AuthConfig) (undo func(), err error) {
	cred, ok, err := credentialOf(auth)
	if err != nil {
		return func() {}, err
	}
	if !ok {
		return func() {}, ErrNothingKept
	}
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return func() {}, fmt.Errorf("image %q: %w", image, err)
	}
	key := repoKey{reference.Domain(named), reference.Path(named)}
	now := k.now()
	cred.Expires = now.Add(k.ttl)
	if exp, ok := tokenExpiry(cred.Secret); ok && exp.Before(cred.Expires) {
		cred.Expires = exp
	}
	k.mu.Lock()
	k.sweep(now)
	prev, had := k.keys[key]
	k.keys[key] = cred
	changed := k.onChange
	k.mu.Unlock()
	if changed != nil {
		changed()
	}
	return func() {
		k.mu.Lock()
		if cur, ok := k.keys[key]; !ok || cur != cred {
			k.mu.Unlock()
			return // replaced since: the later pull's are newer
		}
		if had {
			k.keys[key] = prev
		} else {
			delete(k.keys, key)
		}
		changed := k.onChange
		k.mu.Unlock()
		if changed != nil {
			changed()
		}
	}, nil
}

// OnChange has fn called after each change Put (or its undo) makes, e.g.
// to hand the keyring to the next daemon (see Export).
func (k *Keyring) OnChange(fn func()) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.onChange = fn
}

// exported is the keyring as Export writes it.
type exported struct {
	Version int             `json:"version"`
	Entries []exportedEntry `json:"entries"`
}

type exportedEntry struct {
	Registry   string     `json:"registry"`
	Repository string     `json:"repository"`
	Credential Credential `json:"credential"`
}

// exportVersion is the version of Export's format this build reads.
const exportVersion = 1

// Export returns the unexpired credentials, for the next daemon to Import:
// kept in memory by the fuse holder (in a memfd), never on disk, so that
// lazy layers mounted before a restart read on with their pull's
// credentials.
func (k *Keyring) Export() []byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.sweep(k.now())
	out := exported{Version: exportVersion, Entries: make([]exportedEntry, 0, len(k.keys))}
	for key, c := range k.keys {
		out.Entries = append(out.Entries, exportedEntry{Registry: key.registry, Repository: key.repository, Credential: c})
	}
	b, _ := json.Marshal(out) // strings and times only: cannot fail
	return b
}

// Import adds what an earlier daemon's Export wrote, except what expired
// or what this keyring already has (a pull made since is newer), and
// returns how many entries it added.
func (k *Keyring) Import(data []byte) (int, error) {
	var in exported
	if err := json.Unmarshal(data, &in); err != nil {
		return 0, fmt.Errorf("read credentials of the last daemon: %w", err)
	}
	if in.Version != exportVersion {
		return 0, fmt.Errorf("credentials of the last daemon are version %d, this build reads %d", in.Version, exportVersion)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	now, n := k.now(), 0
	for _, e := range in.Entries {
		key := repoKey{e.Registry, e.Repository}
		if _, ok := k.keys[key]; ok || !now.Before(e.Credential.Expires) {
			continue
		}
		k.keys[key] = e.Credential
		n++
	}
	return n, nil
}

// Credentials returns the credentials of repository in registry (as in a
// normalized reference: "docker.io", "library/python") for a request to
// host. Only the registry itself (or the server the credentials name)
// gets them: a mirror configured in hosts.toml is another party.
func (k *Keyring) Credentials(host, registry, repository string) (user, secret string, ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	c, found := k.keys[repoKey{registry, repository}]
	if !found {
		return "", "", false
	}
	if !k.now().Before(c.Expires) {
		delete(k.keys, repoKey{registry, repository})
		return "", "", false
	}
	if !c.appliesTo(host, registry) {
		return "", "", false
	}
	return c.Username, c.Secret, true
}

// Len returns how many repositories have credentials that have not expired.
func (k *Keyring) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.sweep(k.now())
	return len(k.keys)
}

// sweep drops expired entries, so that a node that pulled thousands of
// images over months keeps only what still serves. k.mu is held.
func (k *Keyring) sweep(now time.Time) {
	for key, c := range k.keys {
		if !now.Before(c.Expires) {
			delete(k.keys, key)
		}
	}
}

func (c Credential) appliesTo(host, registry string) bool {
	if c.Server != "" {
		return host == c.Server || (c.Server == "docker.io" && host == dockerHubHost)
	}
	return host == registry || (registry == "docker.io" && host == dockerHubHost)
}

// credentialOf reads kubelet's AuthConfig the way containerd's CRI plugin
// does: an identity token first, then user name and password, then the
// base64 "user:password" auth. ok is false when it carries nothing.
func credentialOf(auth *runtime.AuthConfig) (c Credential, ok bool, err error) {
	if auth == nil {
		return Credential{}, false, nil
	}
	if auth.ServerAddress != "" {
		if c.Server, err = serverHost(auth.ServerAddress); err != nil {
			return Credential{}, false, err
		}
	}
	switch {
	case auth.IdentityToken != "":
		c.Secret = auth.IdentityToken
	case auth.Username != "":
		c.Username, c.Secret = auth.Username, auth.Password
	case auth.Auth != "":
		raw, err := base64.StdEncoding.DecodeString(auth.Auth)
		if err != nil {
			return Credential{}, false, errors.New("auth is not base64")
		}
		user, pass, found := strings.Cut(string(raw), ":")
		if !found {
			return Credential{}, false, errors.New("auth is not user:password")
		}
		c.Username, c.Secret = user, pass
	default:
		// A bare registry_token (a bearer token for one request) cannot
		// be refreshed for the many requests of lazy reads.
		return Credential{}, false, nil
	}
	return c, true, nil
}

// serverHost returns the host of a server address as kubelet sends it:
// "registry.example:5000", "https://registry.example/v2/", or Docker Hub's
// "https://index.docker.io/v1/".
func serverHost(addr string) (string, error) {
	host := addr
	if strings.Contains(addr, "://") {
		u, err := url.Parse(addr)
		if err != nil {
			return "", fmt.Errorf("server address: %w", err)
		}
		host = u.Host
	} else {
		host, _, _ = strings.Cut(addr, "/")
	}
	switch host {
	case "index.docker.io", dockerHubHost:
		host = "docker.io"
	}
	return host, nil
}

// tokenExpiry reads the "exp" claim of a JWT without checking its
// signature: only to forget the token once the registry would refuse it.
func tokenExpiry(s string) (time.Time, bool) {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp json.Number `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil {
		return time.Time{}, false
	}
	exp, err := claims.Exp.Int64()
	if err != nil || exp <= 0 {
		return time.Time{}, false
	}
	return time.Unix(exp, 0), true
}
