package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// convertLikeStargz converts src to eStargz the way stargz-snapshotter's
// converter (ctr-remote image convert --estargz, its nativeconverter) does
// by default: estargz.Build with the module's defaults (best gzip
// compression, 4 MiB chunks, no prioritized files, so every layer carries
// the no-prefetch landmark) and the TOC digest and uncompressed size
// annotations on each layer. No lazycas code takes part: this is the
// common case of an image made by another tool. prio, when set, lists per
// layer the paths to place first, behind the prefetch landmark: what
// stargz-snapshotter's optimizer (ctr-remote image optimize) does with
// the files a recorded run opened. The result is pushed as ref; it
// returns the converted layers' total size and digests.
func convertLikeStargz(ctx context.Context, src v1.Image, ref, work string, prio [][]string) (int64, []string, error) {
	srcLayers, err := src.Layers()
	if err != nil {
		return 0, nil, err
	}
	cfg, err := src.ConfigFile()
	if err != nil {
		return 0, nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.RootFS.DiffIDs = nil // mutate.Append adds the new layers' own
	img, err := mutate.ConfigFile(mutate.MediaType(empty.Image, types.OCIManifestSchema1), cfg)
	if err != nil {
		return 0, nil, err
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	dir, err := os.MkdirTemp(work, "stargz-convert-")
	if err != nil {
		return 0, nil, err
	}
	defer os.RemoveAll(dir)
	var total int64
	var digests []string
	for i, l := range srcLayers {
		var paths []string
		if i < len(prio) {
			paths = prio[i]
		}
		add, size, err := stargzLayer(ctx, l, filepath.Join(dir, strconv.Itoa(i)), paths)
		if err != nil {
			return 0, nil, fmt.Errorf("layer %d: %w", i, err)
		}
		total += size
		d, err := add.Layer.Digest()
		if err != nil {
			return 0, nil, err
		}
		digests = append(digests, d.String())
		if img, err = mutate.Append(img, add); err != nil {
			return 0, nil, err
		}
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return 0, nil, err
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return 0, nil, fmt.Errorf("push %s: %w", ref, err)
	}
	return total, digests, nil
}

// stargzLayer writes l's tar to base+".tar", builds the eStargz blob into
// base+".gz", paths first, and returns it as a layer to append, with its
// size.
func stargzLayer(ctx context.Context, l v1.Layer, base string, paths []string) (mutate.Addendum, int64, error) {
	rc, err := l.Uncompressed()
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	tf, err := os.Create(base + ".tar")
	if err != nil {
		rc.Close()
		return mutate.Addendum{}, 0, err
	}
	defer tf.Close()
	n, err := io.Copy(tf, rc)
	rc.Close()
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	opts := []estargz.Option{estargz.WithContext(ctx)}
	if len(paths) > 0 {
		var missed []string
		opts = append(opts, estargz.WithPrioritizedFiles(paths), estargz.WithAllowPrioritizeNotFound(&missed))
	}
	blob, err := estargz.Build(io.NewSectionReader(tf, 0, n), opts...)
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	defer blob.Close()
	out := base + ".gz"
	of, err := os.Create(out)
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	size, err := io.Copy(of, blob)
	if cerr := of.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	usize, err := blob.UncompressedSize()
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	layer, err := tarball.LayerFromFile(out, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return mutate.Addendum{}, 0, err
	}
	return mutate.Addendum{Layer: layer, MediaType: types.OCILayer, Annotations: map[string]string{
		estargz.TOCJSONDigestAnnotation:         blob.TOCDigest().String(),
		estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(usize, 10),
	}}, size, nil
}
