package main

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// The benchmark's images. Each base image (testimages: python, debian,
// gcc) is pushed to the registry under its own repository and converted
// twice:
//
//	REPO:estargz         by lazycas's converter, without a prefetch list
//	REPO:stargz-estargz  as stargz-snapshotter's converter makes it (the
//	                     estargz module's defaults, no landmark): the
//	                     image the peers pull, and lazycas too in its
//	                     lazycas@stargz-image series
//
// and, in the python repository, two derived images:
//
//	python:app-zstd      the same two layers plus an application layer (100
//	                     python modules and 16 MiB of data files), all
//	                     converted to zstd:chunked: other blobs, same base
//	                     files
//	python:big-estargz   the python image plus a layer holding one 128 MiB
//	                     file, eStargz: the warm read and walk workloads
const (
	tagPython = "estargz"
	tagStargz = "stargz-estargz"
	tagApp    = "app-zstd"
	tagBig    = "big-estargz"

	repoPython = "python"
	repoDebian = "debian"
	repoGCC    = "gcc"
)

// baseImages are the recipes of the repositories.
var baseImages = map[string]*testimages.Image{
	repoPython: testimages.Python,
	repoDebian: testimages.Debian,
	repoGCC:    testimages.GCC,
}

// imageKey names an image in the report: REPO:TAG.
func imageKey(repo, tag string) string { return repo + ":" + tag }

// App layer contents.
const (
	appModules  = 100
	appDataSize = 1 << 20
	appDataN    = 16
	bigFileSize = 128 << 20
	bigFilePath = "/data/big.bin"
)

// appMain is the application of python:app-zstd: it imports its modules
// and looks at its data files without reading them (assets it would read
// later), then prints one line. Starting it needs the base files, which
// the node has, and about 0.3 MB of new ones.
const appMain = `import os, sys
sys.path.insert(0, "/app/lib")
import importlib
mods = [importlib.import_module("mod_%%03d" %% i) for i in range(%d)]
data = sum(os.stat(os.path.join("/app/data", n)).st_size for n in os.listdir("/app/data"))
print("app ready:", len(mods), "modules,", data, "bytes of data")
`

// imageInfo describes one benchmark image in the registry.
type imageInfo struct {
	Repo   string `json:"repo"`
	Tag    string `json:"tag"`
	Format string `json:"format"`
	// Converter is lazycas or stargz (the estargz module's defaults).
	Converter string `json:"converter"`
	// Layers and CompressedBytes of the converted image.
	Layers          int   `json:"layers"`
	CompressedBytes int64 `json:"compressedBytes"`
	// NewFileBytes is the content size of the files of the layer(s) this
	// image adds to python:estargz (0 for it).
	NewFileBytes int64   `json:"newFileBytes,omitempty"`
	ConvertSecs  float64 `json:"convertSeconds"`
	// LayerDigests of the stargz-converted images, for mapping a learned
	// profile (by layer) to the source image's layers.
	LayerDigests []string `json:"layerDigests,omitempty"`
	// Prioritized counts the files placed first (stargz+profile images).
	Prioritized int `json:"prioritized,omitempty"`
}

// imageNeeds says which images the workloads need.
type imageNeeds struct {
	repos    []string // base images, both conversions
	app, big bool
}

// prepareImages pushes and converts the images the workloads need into the
// environment's registry.
func prepareImages(ctx context.Context, env *testenv.Env, work string, need imageNeeds, logf func(string, ...any)) (map[string]*imageInfo, error) {
	infos := map[string]*imageInfo{}
	conv := func(src, repo, tag string, format convert.Format, newBytes int64) error {
		start := time.Now()
		dst := env.RegistryHost + "/" + repo + ":" + tag
		res, err := convert.Convert(ctx, src, dst, convert.Options{Format: format, Resolver: env.Resolver(), TempDir: work})
		if err != nil {
			return fmt.Errorf("convert %s to %s: %w", src, format, err)
		}
		info := &imageInfo{Repo: repo, Tag: tag, Format: string(format), Converter: "lazycas", Layers: len(res.Layers),
			NewFileBytes: newBytes, ConvertSecs: time.Since(start).Seconds()}
		for _, l := range res.Layers {
			info.CompressedBytes += l.Converted.Size
		}
		infos[imageKey(repo, tag)] = info
		logf("converted %s to %s (%s) in %s", src, dst, mb(info.CompressedBytes), time.Since(start).Round(time.Millisecond))
		return nil
	}
	var python v1.Image
	for _, repo := range need.repos {
		im := baseImages[repo]
		pushed, err := env.PushImage(ctx, im)
		if err != nil {
			return nil, err
		}
		logf("pushed %s (%d layers, %s) in %s", im.Name, pushed.Layers, mb(pushed.Bytes), pushed.PushTime.Round(time.Millisecond))
		if err := conv(pushed.Ref, repo, tagPython, convert.EStargz, 0); err != nil {
			return nil, err
		}
		loaded, err := im.Load(ctx, testimages.CacheDir(), logf)
		if err != nil {
			return nil, err
		}
		if repo == repoPython {
			python = loaded.Image
		}
		start := time.Now()
		dst := env.RegistryHost + "/" + repo + ":" + tagStargz
		n, digests, err := convertLikeStargz(ctx, loaded.Image, dst, work, nil)
		if err != nil {
			return nil, fmt.Errorf("convert %s as stargz-snapshotter does: %w", im.Name, err)
		}
		infos[imageKey(repo, tagStargz)] = &imageInfo{Repo: repo, Tag: tagStargz, Format: string(convert.EStargz), Converter: "stargz",
			Layers: pushed.Layers, CompressedBytes: n, ConvertSecs: time.Since(start).Seconds(), LayerDigests: digests}
		logf("converted %s as stargz-snapshotter does to %s (%s) in %s", im.Name, dst, mb(n), time.Since(start).Round(time.Millisecond))
	}
	if (need.app || need.big) && python == nil {
		return nil, errors.New("the app and big images derive from python: it must be among the repositories")
	}
	if need.app {
		layer, n, err := appLayer(work)
		if err != nil {
			return nil, err
		}
		src, err := pushWith(ctx, env, python, layer, "app-src")
		if err != nil {
			return nil, err
		}
		if err := conv(src, repoPython, tagApp, convert.ZstdChunked, n); err != nil {
			return nil, err
		}
	}
	if need.big {
		layer, n, err := bigLayer(work)
		if err != nil {
			return nil, err
		}
		// On top of python:estargz, whose layers the converter keeps as
		// they are: only the new layer is converted.
		baseRef, err := name.ParseReference(env.RegistryHost+"/"+repoPython+":"+tagPython, name.Insecure)
		if err != nil {
			return nil, err
		}
		base, err := remote.Image(baseRef, remote.WithContext(ctx))
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", baseRef, err)
		}
		src, err := pushWith(ctx, env, base, layer, "big-src")
		if err != nil {
			return nil, err
		}
		if err := conv(src, repoPython, tagBig, convert.EStargz, n); err != nil {
			return nil, err
		}
	}
	return infos, nil
}

// pushWith pushes base plus layer to the registry as python:tag.
func pushWith(ctx context.Context, env *testenv.Env, base v1.Image, layer v1.Layer, tag string) (string, error) {
	img, err := mutate.Append(base, mutate.Addendum{Layer: layer, MediaType: types.OCILayer,
		History: v1.History{CreatedBy: "lazycas bench"}})
	if err != nil {
		return "", err
	}
	refStr := env.RegistryHost + "/" + repoPython + ":" + tag
	ref, err := name.ParseReference(refStr, name.Insecure)
	if err != nil {
		return "", err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("push %s: %w", refStr, err)
	}
	return refStr, nil
}

// layerWriter writes a gzip'd tar layer file whose entries have fixed
// owners and times; file contents come from a seeded generator, so the
// layer is the same on every run.
type layerWriter struct {
	f     *os.File
	zw    *gzip.Writer
	tw    *tar.Writer
	rng   *rand.ChaCha8
	bytes int64 // file content written
}

func newLayerWriter(path, seed string) (*layerWriter, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	// No compression: the converter recompresses every layer anyway.
	zw, _ := gzip.NewWriterLevel(f, gzip.NoCompression)
	var s [32]byte
	copy(s[:], seed)
	return &layerWriter{f: f, zw: zw, tw: tar.NewWriter(zw), rng: rand.NewChaCha8(s)}, nil
}

var layerTime = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

func (w *layerWriter) dir(name string) error {
	return w.tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: layerTime,
		Uname: "root", Gname: "root", Format: tar.FormatPAX})
}

func (w *layerWriter) file(name string, size int64, content io.Reader) error {
	if err := w.tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size,
		ModTime: layerTime, Uname: "root", Gname: "root", Format: tar.FormatPAX}); err != nil {
		return err
	}
	if content == nil {
		content = w.rng
	}
	if _, err := io.CopyN(w.tw, content, size); err != nil {
		return err
	}
	w.bytes += size
	return nil
}

func (w *layerWriter) close() (v1.Layer, error) {
	if err := w.tw.Close(); err != nil {
		return nil, err
	}
	if err := w.zw.Close(); err != nil {
		return nil, err
	}
	if err := w.f.Close(); err != nil {
		return nil, err
	}
	return tarball.LayerFromFile(w.f.Name(), tarball.WithMediaType(types.OCILayer))
}

// appLayer writes the application layer: /app/main.py, appModules small
// python modules and appDataN random files of appDataSize bytes.
func appLayer(work string) (v1.Layer, int64, error) {
	w, err := newLayerWriter(filepath.Join(work, "app-layer.tar.gz"), "lazycas bench app layer")
	if err != nil {
		return nil, 0, err
	}
	for _, d := range []string{"app/", "app/lib/", "app/data/"} {
		if err := w.dir(d); err != nil {
			return nil, 0, err
		}
	}
	main := fmt.Sprintf(appMain, appModules)
	if err := w.file("app/main.py", int64(len(main)), strings.NewReader(main)); err != nil {
		return nil, 0, err
	}
	for i := 0; i < appModules; i++ {
		var b strings.Builder
		fmt.Fprintf(&b, "\"\"\"Module %d of the benchmark application.\"\"\"\n\n", i)
		for j := 0; j < 40; j++ {
			fmt.Fprintf(&b, "def f_%d_%d(x):\n    return x * %d + %d\n\n", i, j, i+1, j)
		}
		src := b.String()
		if err := w.file(fmt.Sprintf("app/lib/mod_%03d.py", i), int64(len(src)), strings.NewReader(src)); err != nil {
			return nil, 0, err
		}
	}
	for i := 0; i < appDataN; i++ {
		if err := w.file(fmt.Sprintf("app/data/part-%02d.bin", i), appDataSize, nil); err != nil {
			return nil, 0, err
		}
	}
	n := w.bytes
	l, err := w.close()
	return l, n, err
}

// bigLayer writes a layer holding one bigFileSize random file.
func bigLayer(work string) (v1.Layer, int64, error) {
	w, err := newLayerWriter(filepath.Join(work, "big-layer.tar.gz"), "lazycas bench big file")
	if err != nil {
		return nil, 0, err
	}
	if err := w.dir("data/"); err != nil {
		return nil, 0, err
	}
	if err := w.file(strings.TrimPrefix(bigFilePath, "/"), bigFileSize, nil); err != nil {
		return nil, 0, err
	}
	n := w.bytes
	l, err := w.close()
	return l, n, err
}

func mb(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }
