// Package remote reads pieces of registry blobs with HTTP range requests, so
// a lazily pulled layer can read its footer, TOC and file chunks without
// downloading the blob.
//
// It reuses containerd's registry host configuration (hosts.toml mirrors,
// TLS, per-host HTTP clients) and its Authorizer (bearer and basic auth), and
// owns only what containerd's fetcher lacks: exact byte ranges, a cached
// redirect URL per blob, coalesced, split and multi-range requests, bounded
// retries and mirror fallback.
//
// Contract: a read either fills every requested byte with exactly the bytes
// at those offsets of the blob, as the server's Content-Range vouches, or
// fails with an error naming the blob and the range. It does not verify
// digests; callers check chunk and file digests against the TOC.
package remote

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Options configures a Fetcher. Zero values take the defaults.
type Options struct {
	// Hosts is containerd's registry host configuration, e.g. from
	// service/resolver.Hosts. Required.
	Hosts docker.RegistryHosts
	// RepoHosts, when set, is asked instead of Hosts, by repository: for
	// credentials that differ by repository (see
	// service/resolver.RepoHosts). Hosts are then kept per repository.
	RepoHosts func(registry, repository string) ([]docker.RegistryHost, error)
	// RequestTimeout bounds one HTTP request, body included. Default 30s.
	RequestTimeout time.Duration
	// Retries is the number of extra attempts per host on a 5xx, a reset
	// connection, a short body or a timeout. Default 4; negative means none.
	Retries int
	// RetryBackoff is the delay before the first retry; it doubles with
	// jitter on each further retry, capped at maxBackoff. Default 100ms.
	RetryBackoff time.Duration
	// MaxInFlight bounds concurrent requests per Blob. Default 4.
	MaxInFlight int
	// MaxRequestSize splits bigger reads into parallel requests. Default 8 MiB.
	MaxRequestSize int64
	// MergeGap fetches ranges closer than this in one request, discarding
	// the gap, because a round trip costs more than a few KiB. Default 64 KiB;
	// negative means merge only touching ranges.
	MergeGap int64
	// MaxRanges bounds the ranges of one multi-range request
	// (`Range: bytes=a-b,c-d`). Default 32; 1 disables multi-range requests.
	MaxRanges int
}

// maxBackoff caps one retry delay, so that Retries bounds the time spent on a
// failing host.
const maxBackoff = 2 * time.Second

func (o Options) withDefaults() Options {
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	switch {
	case o.Retries == 0:
		o.Retries = 4
	case o.Retries < 0:
		o.Retries = 0
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = 100 * time.Millisecond
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 4
	}
	if o.MaxRequestSize <= 0 {
		o.MaxRequestSize = 8 << 20
	}
	switch {
	case o.MergeGap == 0:
		o.MergeGap = 64 << 10
	case o.MergeGap < 0:
		o.MergeGap = 0
	}
	if o.MaxRanges <= 0 {
		o.MaxRanges = 32
	}
	return o
}

// Fetcher opens blobs. It is safe for concurrent use; one per daemon is
// enough, so that registry connections and auth tokens are shared.
type Fetcher struct {
	opts Options

	// mu guards hosts. containerd's RegistryHosts builds new HTTP clients
	// and authorizers on every call, so the result is kept per registry
	// name for connection reuse and token caching.
	mu    sync.Mutex
	hosts map[string][]docker.RegistryHost

	requests, bytes, retries atomic.Int64
	// headers times each HTTP request to its response headers; attempts
	// times each successful attempt to its last body byte (see Stats).
	headers, attempts histogram

	linkMu sync.Mutex
	links  map[string]*linkMeter // by registry host, see Links
}

// Stats counts what went over the wire.
type Stats struct {
	// Requests is the number of HTTP round trips, redirects included.
	Requests int64
	// BytesFetched is the number of response body bytes read, including
	// gaps between coalesced ranges and multipart framing.
	BytesFetched int64
	// Retries is the number of attempts repeated after a transient failure.
	Retries int64
	// Links is what the requests measured of each registry host.
	Links map[string]Link `json:",omitempty"`
	// Headers times every HTTP request from sending it to its response
	// headers (redirects it followed included; an auth challenge and
	// its answer are two requests).
	Headers Histogram `json:"-"`
	// Attempts times every successful attempt (see Outcome) from its
	// start to the last byte of its body: what a read waited for one
	// request, auth and redirect rounds included, retries not.
	Attempts Histogram `json:"-"`
}

// New returns a Fetcher for opts.
func New(opts Options) *Fetcher {
	return &Fetcher{opts: opts.withDefaults(), hosts: map[string][]docker.RegistryHost{}, links: map[string]*linkMeter{}}
}

// Stats returns the counters since New.
func (f *Fetcher) Stats() Stats {
	return Stats{Requests: f.requests.Load(), BytesFetched: f.bytes.Load(), Retries: f.retries.Load(), Links: f.Links(),
		Headers: f.headers.snapshot(), Attempts: f.attempts.snapshot()}
}

// Close releases idle registry connections. Blobs stay usable; they reconnect
// when read again.
func (f *Fetcher) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for name, hosts := range f.hosts {
		for _, h := range hosts {
			if h.Client != nil {
				h.Client.CloseIdleConnections()
			}
		}
		delete(f.hosts, name)
	}
}

// pullHosts returns the hosts that can pull repo from registry name,
// mirrors first, in configuration order.
func (f *Fetcher) pullHosts(name, repo string) ([]docker.RegistryHost, error) {
	key := name
	if f.opts.RepoHosts != nil {
		key = name + "/" + repo
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if hosts, ok := f.hosts[key]; ok {
		return hosts, nil
	}
	var all []docker.RegistryHost
	var err error
	switch {
	case f.opts.RepoHosts != nil:
		all, err = f.opts.RepoHosts(name, repo)
	case f.opts.Hosts != nil:
		all, err = f.opts.Hosts(name)
	default:
		return nil, fmt.Errorf("remote: no registry hosts configured: %w", errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return nil, fmt.Errorf("registry hosts for %s: %w", name, err)
	}
	var hosts []docker.RegistryHost
	for _, h := range all {
		if h.Capabilities.Has(docker.HostCapabilityPull) {
			hosts = append(hosts, h)
		}
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("no pull hosts for %s: %w", name, errdefs.ErrNotFound)
	}
	f.hosts[key] = hosts
	return hosts, nil
}

// Open returns a Blob reading desc.Digest from the repository of ref, a
// normalized reference such as "127.0.0.1:5000/library/python:lazy" whose tag
// or digest is ignored. If desc.Size is 0 the size comes from a HEAD request;
// otherwise Open sends nothing and the first read finds a host. It never
// downloads the blob.
func (f *Fetcher) Open(ctx context.Context, ref string, desc ocispec.Descriptor) (*Blob, error) {
	b, err := f.open(ref, desc)
	if err != nil {
		return nil, err
	}
	if b.size == 0 {
		size, err := b.stat(ctx)
		if err != nil {
			return nil, fmt.Errorf("open blob %s in %s/%s: %w", desc.Digest, b.registry, b.repo, err)
		}
		b.size = size
		log.G(ctx).WithFields(log.Fields{"digest": b.digest, "size": size}).Debug("blob size from registry")
	}
	return b, nil
}

// open returns a Blob for desc without asking the registry anything; its
// size is desc.Size, 0 when unknown.
func (f *Fetcher) open(ref string, desc ocispec.Descriptor) (*Blob, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("open blob %q: %w: %w", desc.Digest, errdefs.ErrInvalidArgument, err)
	}
	if desc.Size < 0 {
		return nil, fmt.Errorf("open blob %s: negative size %d: %w", desc.Digest, desc.Size, errdefs.ErrInvalidArgument)
	}
	spec, err := reference.Parse(ref)
	if err != nil {
		return nil, fmt.Errorf("open blob %s: reference %q: %w: %w", desc.Digest, ref, errdefs.ErrInvalidArgument, err)
	}
	name := spec.Hostname()
	repo := strings.TrimPrefix(spec.Locator, name+"/")
	hosts, err := f.pullHosts(name, repo)
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", desc.Digest, err)
	}
	scope, err := docker.RepositoryScope(spec, false)
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", desc.Digest, err)
	}
	return &Blob{
		f:        f,
		digest:   desc.Digest,
		size:     desc.Size,
		registry: name,
		repo:     repo,
		scope:    scope,
		hosts:    hosts,
		slots:    make(chan struct{}, f.opts.MaxInFlight),
		counts:   &blobCounters{},
	}, nil
}

// stat asks the registry for the blob's size with a HEAD request.
func (b *Blob) stat(ctx context.Context) (int64, error) {
	var size int64
	err := b.run(ctx, "HEAD", func(ctx context.Context, host int) error {
		resp, err := b.send(ctx, host, http.MethodHead, "")
		if err != nil {
			return err
		}
		defer b.finish(resp, resp.Body)
		if resp.StatusCode != http.StatusOK {
			return newStatusError(resp)
		}
		if resp.ContentLength < 0 {
			return fmt.Errorf("HEAD %s: no Content-Length", redact(resp.Request.URL))
		}
		if d := resp.Header.Get("Docker-Content-Digest"); d != "" && d != b.digest.String() {
			return fmt.Errorf("HEAD %s: registry answered for digest %s", redact(resp.Request.URL), d)
		}
		size = resp.ContentLength
		return nil
	})
	return size, err
}

// Blob reads byte ranges of one registry blob. It is safe for concurrent use.
type Blob struct {
	f        *Fetcher
	digest   digest.Digest
	size     int64
	registry string // host name of the reference, for mirror namespaces
	repo     string // repository path inside the registry
	scope    string // token scope for the repository
	hosts    []docker.RegistryHost
	slots    chan struct{} // MaxInFlight request slots
	counts   *blobCounters // attempts by outcome; see Stats

	// mu guards loc and noMulti.
	mu sync.Mutex
	// loc is where the last read succeeded; later reads go there first.
	loc location
	// noMulti is set once a server answered a multi-range request with
	// something else than all the ranges, so later reads ask singly.
	noMulti bool
}

// location is a host that served the blob, and the final URL its blob URL
// redirected to ("" if none), cached so that reads skip the redirect.
type location struct {
	host int
	url  string
}

// Size returns the blob's size in bytes.
func (b *Blob) Size() int64 { return b.size }

// Digest returns the blob's digest.
func (b *Blob) Digest() digest.Digest { return b.digest }
