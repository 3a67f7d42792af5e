package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/integration/testimages"
	"github.com/lazycas/lazycas/service"
)

// Learned start-up (issue 12): before the measured runs, each cold
// workload runs once on lazycas with learning on ([fs] learn), on the
// stargz-converted image. The profile the daemon then exports is what
// lazycas+profile imports into a node whose store is empty; the files it
// lists, found by digest in the image's layers, are what stargz+profile's
// image places first (stargz-snapshotter's optimizer records the files a
// run opens and does the same). Both series pull an image made by the
// same converter, so only what each learned differs.

// tagOptimized is the tag of workload wl's optimized stargz image.
func tagOptimized(wl string) string { return "stargz-opt-" + wl }

// learns tells whether workload wl has learned series: not readall (its
// profile would be the whole image) nor the phases of their own.
func learns(wl string) bool { return wl != wlRead && wl != wlSecond && wl != wlWarm }

// learnedConfig is the daemon's config with learning on.
func (b *bench) learnedConfig() string { return withFS(b.config, "learn = true") }

// withFS adds line to the [fs] table of the TOML config cfg.
func withFS(cfg, line string) string {
	if strings.Contains(cfg, "[fs]\n") {
		return strings.Replace(cfg, "[fs]\n", "[fs]\n"+line+"\n", 1)
	}
	return cfg + "\n[fs]\n" + line + "\n"
}

// learn records workload wl's profile with one run over link and builds
// its optimized stargz image.
func (b *bench) learn(ctx context.Context, link, wl string) error {
	w := coldWorkloads[wl]
	b.env.SetDaemonConfig(b.learnedConfig())
	defer b.env.SetDaemonConfig(b.config)
	if err := b.reset(ctx, snLazycas); err != nil {
		return err
	}
	img, err := b.pull(ctx, snLazycas, b.ref(link, w.repo, tagStargz))
	if err != nil {
		return err
	}
	if _, err := runContainer(ctx, b.env, snLazycas, img, w.want, w.args...); err != nil {
		return err
	}
	data, err := b.env.DaemonAPI(ctx, http.MethodGet, service.APIProfiles, nil)
	if err != nil {
		return fmt.Errorf("export the profile: %w", err)
	}
	var exp profile.Export
	if err := json.Unmarshal(data, &exp); err != nil {
		return fmt.Errorf("exported profile: %w", err)
	}
	b.profiles[wl] = data

	info := b.images[imageKey(w.repo, tagStargz)]
	loaded, err := baseImages[w.repo].Load(ctx, testimages.CacheDir(), nil)
	if err != nil {
		return err
	}
	prio, n, err := profilePaths(loaded.Image, info.LayerDigests, exp)
	if err != nil {
		return err
	}
	start := time.Now()
	tag := tagOptimized(wl)
	size, _, err := convertLikeStargz(ctx, loaded.Image, b.env.RegistryHost+"/"+w.repo+":"+tag, b.work, prio)
	if err != nil {
		return fmt.Errorf("optimized stargz image for %s: %w", wl, err)
	}
	b.images[imageKey(w.repo, tag)] = &imageInfo{Repo: w.repo, Tag: tag, Format: string(convert.EStargz), Converter: "stargz",
		Layers: len(prio), CompressedBytes: size, ConvertSecs: time.Since(start).Seconds(), Prioritized: n}
	b.prog.logf("  %s: learned %d files; %s:%s places them first (%s, converted in %s)", wl, n, w.repo, tag, mb(size),
		time.Since(start).Round(time.Millisecond))
	return nil
}

// importProfile gives the daemon workload wl's learned profile.
func (b *bench) importProfile(ctx context.Context, wl string) error {
	data, ok := b.profiles[wl]
	if !ok {
		return fmt.Errorf("no profile learned for %s", wl)
	}
	if _, err := b.env.DaemonAPI(ctx, http.MethodPost, service.APIProfiles, bytes.NewReader(data)); err != nil {
		return fmt.Errorf("import the profile: %w", err)
	}
	return nil
}

// profilePaths lists, per layer of img, the paths of the files exp's
// profile of that layer (layers[i] is layer i's digest in the image the
// profile was recorded on) names by content digest, in profile order. It
// also returns how many there are.
func profilePaths(img v1.Image, layers []string, exp profile.Export) ([][]string, int, error) {
	byLayer := map[digest.Digest]profile.Profile{}
	for _, p := range exp.Profiles {
		byLayer[p.Layer] = p
	}
	ls, err := img.Layers()
	if err != nil {
		return nil, 0, err
	}
	var tars []func() (io.ReadCloser, error)
	for _, l := range ls {
		tars = append(tars, l.Uncompressed)
	}
	if len(tars) != len(layers) {
		return nil, 0, fmt.Errorf("the image has %d layers, the profiled one %d", len(tars), len(layers))
	}
	out := make([][]string, len(tars))
	total := 0
	for i, open := range tars {
		p, ok := byLayer[digest.Digest(layers[i])]
		if !ok || len(p.Files) == 0 {
			continue
		}
		paths, err := pathsByDigest(open)
		if err != nil {
			return nil, 0, fmt.Errorf("layer %d: %w", i, err)
		}
		for _, a := range p.Files {
			if pth, ok := paths[a.Digest]; ok {
				out[i] = append(out[i], pth)
			}
		}
		total += len(out[i])
	}
	return out, total, nil
}

// pathsByDigest maps the content digest of each regular file of a layer
// tar to its path (the first, for files of the same content).
func pathsByDigest(open func() (io.ReadCloser, error)) (map[digest.Digest]string, error) {
	rc, err := open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	out := map[digest.Digest]string{}
	tr := tar.NewReader(rc)
	h := sha256.New()
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		h.Reset()
		if _, err := io.Copy(h, tr); err != nil {
			return nil, err
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h.Sum(nil)))
		if _, ok := out[d]; !ok {
			out[d] = path.Clean("/" + hdr.Name)
		}
	}
}
