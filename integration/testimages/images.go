// Package testimages builds the container images that lazycas's end-to-end
// tests and demo run, from files on this machine and Debian's archive, never
// from a public registry, and caches each finished image as an OCI image
// layout outside the repository.
//
// Contract: an entry in the cache directory is named <name>-<version> and is
// complete whenever it exists: it is built in a temporary sibling directory
// and renamed into place. Builders of the same image serialise on a flock'd
// <name>.lock file, so concurrent test processes build an image once. Bump an
// image's Version whenever its recipe changes; the next Load rebuilds it.
package testimages

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// DefaultCacheDir holds the built images unless $LAZYCAS_TEST_CACHE names
// another directory.
const DefaultCacheDir = "/var/cache/lazycas-test"

// buildTimeout bounds one image build (debootstrap plus apt-get).
const buildTimeout = 20 * time.Minute

// Logf receives progress messages; nil discards them.
type Logf func(format string, args ...any)

// CacheDir is $LAZYCAS_TEST_CACHE, or DefaultCacheDir when unset.
func CacheDir() string {
	if d := os.Getenv("LAZYCAS_TEST_CACHE"); d != "" {
		return d
	}
	return DefaultCacheDir
}

// Image is the recipe of one test image.
type Image struct {
	// Name is the repository name the image is pushed under.
	Name string
	// Version keys the cache entry; change it when the recipe changes.
	Version string
	// Env and Cmd go into the image config.
	Env []string
	Cmd []string
	// build writes the image's gzip layers, bottom first, under work and
	// returns their paths.
	build func(ctx context.Context, work string, logf Logf) ([]string, error)
}

// Loaded is a cached image ready to push.
type Loaded struct {
	Image v1.Image
	// Dir is the OCI image layout in the cache.
	Dir string
	// Built tells whether this Load built the image (false: cache hit).
	Built bool
	// BuildTime is how long building took (zero on a cache hit).
	BuildTime time.Duration
}

// Load returns the image from the cache in cacheDir, building it first when
// the cache does not hold this Version.
func (im *Image) Load(ctx context.Context, cacheDir string, logf Logf) (*Loaded, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	entry := filepath.Join(cacheDir, im.Name+"-"+im.Version)
	if img, err := openLayout(entry); err == nil {
		return &Loaded{Image: img, Dir: entry}, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	unlock, err := LockFile(ctx, filepath.Join(cacheDir, im.Name+".lock"))
	if err != nil {
		return nil, fmt.Errorf("lock image cache for %s: %w", im.Name, err)
	}
	defer unlock()
	// Another process may have built it while we waited for the lock.
	if img, err := openLayout(entry); err == nil {
		return &Loaded{Image: img, Dir: entry}, nil
	}
	start := time.Now()
	logf("building image %s (%s) into %s", im.Name, im.Version, cacheDir)
	if err := im.buildEntry(ctx, cacheDir, entry, logf); err != nil {
		return nil, fmt.Errorf("build image %s: %w", im.Name, err)
	}
	img, err := openLayout(entry)
	if err != nil {
		return nil, fmt.Errorf("open freshly built image %s: %w", im.Name, err)
	}
	took := time.Since(start)
	logf("built image %s in %s", im.Name, took.Round(100*time.Millisecond))
	return &Loaded{Image: img, Dir: entry, Built: true, BuildTime: took}, nil
}

// buildEntry builds in a temporary directory and renames the finished
// layout to entry. The caller holds the image's lock.
func (im *Image) buildEntry(ctx context.Context, cacheDir, entry string, logf Logf) error {
	ctx, cancel := context.WithTimeout(ctx, buildTimeout)
	defer cancel()
	// Leftovers of a builder that died: nobody else builds this image now.
	stale, _ := filepath.Glob(filepath.Join(cacheDir, im.Name+".build-*"))
	for _, d := range stale {
		if err := removeTree(d); err != nil {
			return fmt.Errorf("remove stale build dir: %w", err)
		}
	}
	tmp, err := os.MkdirTemp(cacheDir, im.Name+".build-")
	if err != nil {
		return err
	}
	defer func() {
		if err := removeTree(tmp); err != nil {
			logf("leaving build dir %s: %v", tmp, err)
		}
	}()
	work := filepath.Join(tmp, "work")
	if err := os.Mkdir(work, 0o755); err != nil {
		return err
	}
	layers, err := im.build(ctx, work, logf)
	if err != nil {
		return err
	}
	out := filepath.Join(tmp, "layout")
	if err := writeLayout(out, layers, im.Env, im.Cmd); err != nil {
		return fmt.Errorf("write OCI layout: %w", err)
	}
	if err := os.Rename(out, entry); err != nil {
		return fmt.Errorf("publish cache entry: %w", err)
	}
	return nil
}

// created is the fixed creation time of every test image.
var created = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// writeLayout assembles an OCI image (OCI manifest and config, gzip layers,
// linux/amd64) from gzip layer files and writes it as an image layout at dir.
func writeLayout(dir string, layerFiles []string, env, cmd []string) error {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var adds []mutate.Addendum
	for _, f := range layerFiles {
		l, err := tarball.LayerFromFile(f, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return fmt.Errorf("layer %s: %w", f, err)
		}
		adds = append(adds, mutate.Addendum{
			Layer:     l,
			MediaType: types.OCILayer,
			History:   v1.History{Created: v1.Time{Time: created}, CreatedBy: "lazycas testimages"},
		})
	}
	img, err := mutate.Append(img, adds...)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: created}
	cf.Config.Env = env
	cf.Config.Cmd = cmd
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := p.AppendImage(img, layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		return err
	}
	// Blobs are written 0600; let unprivileged readers use the cache too.
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		return os.Chmod(path, 0o644)
	})
}

// openLayout opens the single image of the layout at dir.
func openLayout(dir string) (v1.Image, error) {
	p, err := layout.FromPath(dir)
	if err != nil {
		return nil, err
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return nil, err
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	if len(m.Manifests) != 1 {
		return nil, fmt.Errorf("layout %s holds %d manifests, want 1", dir, len(m.Manifests))
	}
	return p.Image(m.Manifests[0].Digest)
}

// LockFile takes an exclusive flock on path, polling until ctx ends. The
// returned function releases it. Test caches shared by concurrent test
// processes (images, built binaries) are filled under it.
func LockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
