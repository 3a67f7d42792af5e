// Package finder finds which image and layer blob a lazy Prepare is for
// when the client sent no image labels: `ctr`, nerdctl with a snapshotter
// name it does not know, containerd 2.x's transfer service without its
// opt-in export. containerd still passes the layer's own annotations, and
// the TOC digest among them names the layer; the manifest listing it is in
// containerd's content store (fetched before any layer is prepared), and
// its distribution-source label names the repository.
package finder

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazycas/lazycas/fs/layer"
)

// labelSourcePrefix is containerd's content label naming where a blob came
// from: containerd.io/distribution.source.<host>=<repository>[,<repository>].
const labelSourcePrefix = "containerd.io/distribution.source."

// maxManifest bounds the blobs read as candidate manifests.
const maxManifest = 4 << 20

// lookupTimeout bounds one search of containerd's content store.
const lookupTimeout = 20 * time.Second

// Finder searches a containerd's content store.
type Finder struct {
	address string

	mu   sync.Mutex
	conn *grpc.ClientConn
	// seen caches what each blob is: digests never change their content.
	seen map[digest.Digest]*manifest
}

// manifest is what a blob holds; nil layers for a blob that is no manifest.
type manifest struct {
	config ocispec.Descriptor
	layers []ocispec.Descriptor
	image  *ocispec.Image // the config, once read; guarded by Finder.mu
}

// New returns a Finder asking the containerd at address.
func New(address string) *Finder {
	return &Finder{address: address, seen: map[digest.Digest]*manifest{}}
}

// Close closes the connection to containerd.
func (f *Finder) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conn != nil {
		return f.conn.Close()
	}
	return nil
}

func (f *Finder) store() (content.Store, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conn == nil {
		conn, err := grpc.NewClient("unix://"+f.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("connect to containerd at %s: %w", f.address, err)
		}
		f.conn = conn
	}
	return proxy.NewContentStore(f.conn), nil
}

// FindLayer returns the image repository and layer descriptor of the lazy
// layer whose TOC digest the labels carry, searching the content store of
// the namespace ctx's request came from.
func (f *Finder) FindLayer(ctx context.Context, labels map[string]string) (string, ocispec.Descriptor, digest.Digest, error) {
	toc := labels[layer.AnnotationTOCDigest]
	if toc == "" {
		return "", ocispec.Descriptor{}, "", errors.New("no TOC digest label to find the layer by")
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return "", ocispec.Descriptor{}, "", fmt.Errorf("find layer: %w", err)
	}
	cs, err := f.store()
	if err != nil {
		return "", ocispec.Descriptor{}, "", err
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), lookupTimeout)
	defer cancel()

	var (
		ref      string
		found    ocispec.Descriptor
		manifest digest.Digest
	)
	errFound := errors.New("found")
	err = cs.Walk(ctx, func(info content.Info) error {
		repo := sourceRef(info.Labels)
		if repo == "" || info.Size > maxManifest {
			return nil
		}
		m, err := f.manifest(ctx, cs, info)
		if err != nil || m == nil {
			return nil // not a manifest, or gone meanwhile
		}
		for _, l := range m.layers {
			if l.Annotations[layer.AnnotationTOCDigest] == toc {
				ref, found, manifest = repo, l, info.Digest
				return errFound
			}
		}
		return nil
	})
	if errors.Is(err, errFound) {
		return ref, found, manifest, nil
	}
	if err != nil {
		return "", ocispec.Descriptor{}, "", fmt.Errorf("search containerd's content store (namespace %s): %w", ns, err)
	}
	return "", ocispec.Descriptor{}, "", fmt.Errorf("no manifest in namespace %s lists a layer with TOC %s", ns, toc)
}

// maxConfig bounds an image config read for its entrypoint.
const maxConfig = 1 << 20

// Image returns the layers of a manifest in containerd's content store
// and the image config it names, from the namespace of ctx's request.
func (f *Finder) Image(ctx context.Context, manifest digest.Digest) ([]ocispec.Descriptor, ocispec.Image, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, ocispec.Image{}, fmt.Errorf("read image: %w", err)
	}
	cs, err := f.store()
	if err != nil {
		return nil, ocispec.Image{}, err
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), lookupTimeout)
	defer cancel()
	info, err := cs.Info(ctx, manifest)
	if err != nil {
		return nil, ocispec.Image{}, fmt.Errorf("manifest %s: %w", manifest, err)
	}
	if info.Size > maxManifest {
		return nil, ocispec.Image{}, fmt.Errorf("manifest %s: %d bytes is too big", manifest, info.Size)
	}
	m, err := f.manifest(ctx, cs, info)
	if err != nil {
		return nil, ocispec.Image{}, fmt.Errorf("manifest %s: %w", manifest, err)
	}
	if m == nil {
		return nil, ocispec.Image{}, fmt.Errorf("%s is not an image manifest", manifest)
	}
	f.mu.Lock()
	img := m.image
	f.mu.Unlock()
	if img != nil {
		return m.layers, *img, nil
	}
	if m.config.Size > maxConfig {
		return nil, ocispec.Image{}, fmt.Errorf("config %s: %d bytes is too big", m.config.Digest, m.config.Size)
	}
	data, err := content.ReadBlob(ctx, cs, m.config)
	if err != nil {
		return nil, ocispec.Image{}, fmt.Errorf("config %s: %w", m.config.Digest, err)
	}
	img = new(ocispec.Image)
	if err := json.Unmarshal(data, img); err != nil {
		return nil, ocispec.Image{}, fmt.Errorf("config %s: %w", m.config.Digest, err)
	}
	// Every layer of a pull asks (for the layers above it), the top one
	// twice: the config is read once.
	f.mu.Lock()
	m.image = img
	f.mu.Unlock()
	return m.layers, *img, nil
}

// manifest reads and caches the blob of info if it is an image manifest.
func (f *Finder) manifest(ctx context.Context, cs content.Store, info content.Info) (*manifest, error) {
	f.mu.Lock()
	m, ok := f.seen[info.Digest]
	f.mu.Unlock()
	if ok {
		return m, nil
	}
	data, err := content.ReadBlob(ctx, cs, ocispec.Descriptor{Digest: info.Digest, Size: info.Size})
	if err != nil {
		return nil, err
	}
	var parsed struct {
		Config ocispec.Descriptor   `json:"config"`
		Layers []ocispec.Descriptor `json:"layers"`
	}
	if json.Unmarshal(data, &parsed) == nil && parsed.Config.Digest != "" && len(parsed.Layers) > 0 {
		m = &manifest{config: parsed.Config, layers: parsed.Layers}
	}
	f.mu.Lock()
	f.seen[info.Digest] = m
	f.mu.Unlock()
	return m, nil
}

// sourceRef returns "<host>/<repository>" from a distribution-source label.
func sourceRef(labels map[string]string) string {
	for k, v := range labels {
		host, ok := strings.CutPrefix(k, labelSourcePrefix)
		if !ok || host == "" || v == "" {
			continue
		}
		repo, _, _ := strings.Cut(v, ",")
		return host + "/" + repo
	}
	return ""
}
