package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/containerd/containerd/v2/client"

	"github.com/lazycas/lazycas/integration/testenv"
)

// The page-cache figure of the second workload: how much memory one file
// that both images hold takes after a container of each read it (issue 6).
// overlayfs unpacked each image's layers into its own snapshots, so the
// file is there twice; lazycas keeps one store object that both images'
// layers pass through to.

// sharedFile is the python interpreter (6.8 MB), in the base layers of
// python:estargz and python:app-zstd alike.
const sharedFile = testenv.SharedFile

// pageCacheFigures drops the page cache, reads sharedFile in a container
// of each of imgs, and records the bytes of the file's pages then cached
// in every copy of it on the node (mPageCache), its size (mSharedSize)
// and their quotient (mPageCopies). Only overlayfs and lazycas have copies the benchmark
// can find; for a peer it records nothing.
func (b *bench) pageCacheFigures(ctx context.Context, sn string, s sample, imgs ...client.Image) error {
	var measure func() (cached, size int64, err error)
	switch sn {
	case snOverlay:
		// One file per image: each unpacked its own layer snapshot.
		pattern := filepath.Join(b.env.ContainerdRoot(), "io.containerd.snapshotter.v1.overlayfs", "snapshots", "*", "fs", sharedFile)
		measure = func() (int64, int64, error) {
			files, err := filepath.Glob(pattern)
			if err != nil || len(files) == 0 {
				return 0, 0, fmt.Errorf("no %s in overlayfs's snapshots (%s): %w", sharedFile, pattern, err)
			}
			return residentSum(files, nil)
		}
	case snLazycas:
		layers, err := testenv.LayerFilesAt(b.env.DaemonRoot, sharedFile)
		if err != nil {
			return err
		}
		if len(layers) == 0 {
			return fmt.Errorf("no lazycas layer mount holds %s", sharedFile)
		}
		// Hashing reads through a layer: before the caches are dropped.
		d, err := testenv.FileDigest(layers[0])
		if err != nil {
			return err
		}
		obj := testenv.StoreObject(b.env.DaemonRoot, d)
		// A mapping of a passthrough file is the object's, so mincore
		// through a layer would count the object again: the layers' FUSE
		// inodes are counted by their own cache (cachestat).
		measure = func() (int64, int64, error) { return residentSum([]string{obj}, layers) }
	default:
		return nil
	}
	b.prog.step("page cache of a shared file")
	if err := dropCaches(); err != nil {
		return err
	}
	for _, img := range imgs {
		if _, err := runContainer(ctx, b.env, sn, img, "read ", "python3", "-c", testenv.ReadSharedFile); err != nil {
			return fmt.Errorf("read %s: %w", sharedFile, err)
		}
	}
	cached, size, err := measure()
	if err != nil {
		return err
	}
	if size == 0 {
		return fmt.Errorf("%s is empty", sharedFile)
	}
	s[mPageCache], s[mSharedSize] = float64(cached), float64(size)
	s[mPageCopies] = float64(cached) / float64(size)
	return nil
}

// residentSum adds up the cached bytes of files (by mincore) and of the
// own inodes of inodes (by cachestat); size is the size of files[0].
func residentSum(files, inodes []string) (cached, size int64, err error) {
	for i, f := range files {
		r, err := testenv.Mincore(f)
		if err != nil {
			return 0, 0, err
		}
		cached += r.Bytes()
		if i == 0 {
			size = fileSize(f)
		}
	}
	for _, f := range inodes {
		r, err := testenv.InodeCache(f)
		if err != nil {
			return 0, 0, err
		}
		cached += r.Bytes()
	}
	return cached, size, nil
}
