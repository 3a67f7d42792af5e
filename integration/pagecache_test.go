package integration

import (
	"context"
	"os"
	"strconv"
	"testing"

	"github.com/containerd/containerd/v2/client"

	"github.com/lazycas/lazycas/integration/testenv"
)

// sharedFile is the file the page-cache check reads in both images.
const sharedFile = testenv.SharedFile

// Thresholds of the page-cache check. The object must be nearly all
// cached right after a read (a page or two may be reclaimed on a busy
// machine); a FUSE inode under passthrough caches nothing, so any page
// there is a second copy.
const (
	minObjectCached = 0.95
	maxLayerCached  = 0.01
)

// checkSharedPageCache reads sharedFile in a container of each of imgs,
// whose layers all hold it, and checks that its pages are cached once: in
// the store object, and not in any layer's FUSE inode. The object is
// evicted before each container, so each image's reads must fill that one
// object's cache again: an image reading its own copy leaves it empty.
func checkSharedPageCache(ctx context.Context, t *testing.T, env *testenv.Env, imgs ...client.Image) {
	views, err := testenv.LayerFilesAt(env.DaemonRoot, sharedFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(views) != len(imgs) {
		t.Fatalf("%d layer mounts hold %s, want one per image (%d): %v", len(views), sharedFile, len(imgs), views)
	}
	// Hashing reads through a layer, before anything is measured.
	d, err := testenv.FileDigest(views[0])
	if err != nil {
		t.Fatal(err)
	}
	obj := testenv.StoreObject(env.DaemonRoot, d)
	fi, err := os.Stat(obj)
	if err != nil {
		t.Fatalf("the store has no object for %s (%s): %v", sharedFile, d, err)
	}
	t.Logf("%s: %d bytes, object %s", sharedFile, fi.Size(), obj)
	passthrough := daemonStats(ctx, t, env).Passthrough
	for _, v := range views {
		// Reads while the file was still being fetched went through the
		// FUSE inode's cache (no passthrough for a partial object), and
		// FOPEN_KEEP_CACHE keeps them there until evicted.
		if r, err := testenv.InodeCache(v); err == nil {
			t.Logf("before: %s caches %s in its FUSE inode", v, r)
		}
	}

	evict := func(paths ...string) {
		t.Helper()
		for _, p := range paths {
			if err := testenv.Evict(p); err != nil {
				t.Fatal(err)
			}
		}
		r := objectCache(t, obj)
		if r.Fraction() > 0.05 {
			// Pages someone maps stay after DONTNEED; a page-cache drop
			// is the last resort.
			t.Logf("object still caches %s after DONTNEED; dropping the page cache", r)
			if err := testenv.DropPageCache(); err != nil {
				t.Fatal(err)
			}
			if r = objectCache(t, obj); r.Fraction() > 0.05 {
				t.Fatalf("cannot evict the object: %s still cached", r)
			}
		}
	}
	evict(append([]string{obj}, views...)...)

	for i, img := range imgs {
		if i > 0 {
			evict(obj)
		}
		cached0, _ := testenv.MeminfoCached()
		if out := runPython(ctx, t, env, img, testenv.ReadSharedFile); out != "read "+strconv.FormatInt(fi.Size(), 10)+"\n" {
			t.Fatalf("image %d: reading %s printed %q", i+1, sharedFile, out)
		}
		cached1, _ := testenv.MeminfoCached()
		r := objectCache(t, obj)
		t.Logf("image %d read %s: object caches %s; the machine's Cached rose by %.1f MB (other work moves it too)",
			i+1, sharedFile, r, float64(cached1-cached0)/1e6)
		if r.Fraction() < minObjectCached {
			t.Errorf("after image %d read %s, its store object caches only %s: the reads went elsewhere",
				i+1, sharedFile, r)
		}
	}

	var layerPages int64
	for _, v := range views {
		own, err := testenv.InodeCache(v)
		if err != nil {
			t.Fatal(err)
		}
		mapped, err := testenv.Mincore(v)
		if err != nil {
			t.Fatal(err)
		}
		layerPages += own.Cached
		t.Logf("%s: FUSE inode caches %s; a mapping of it reaches %s in memory", v, own, mapped)
		if passthrough && own.Fraction() > maxLayerCached {
			t.Errorf("%s caches %s in its FUSE inode: a second copy besides the object", v, own)
		}
	}
	r := objectCache(t, obj)
	t.Logf("after both images read it: %d bytes cached for a %d-byte file (object %d, layers %d)",
		r.Bytes()+layerPages*int64(os.Getpagesize()), fi.Size(), r.Bytes(), layerPages*int64(os.Getpagesize()))

	if !passthrough {
		// Without passthrough each layer's FUSE inode caches what its
		// containers read, by design: the check is for passthrough only.
		t.Skip("FUSE passthrough is off (the daemon reports fuse reads): FUSE inodes hold their own copies")
	}
}

// objectCache is the page-cache residency of a store object file.
func objectCache(t *testing.T, obj string) testenv.Residency {
	t.Helper()
	r, err := testenv.Mincore(obj)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
