package testenv

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Page-cache figures of single files, for the test and the benchmark that
// check that a file several images hold is cached once (issue 6).
//
// Two measures, because they answer different questions on FUSE
// passthrough: mincore of a mapping says which pages of the file the
// mapping reaches are in memory, and a passthrough file's mapping is its
// backing file's (the kernel swaps the backing file into the mapping), so
// through a lazycas mount it reports the store object's pages. cachestat
// reads the page cache of the opened inode itself, which for a FUSE file
// is the FUSE inode's own cache: what a layer holds besides the object.

// SharedFile is the file of the test image that the page-cache figures
// read in two images: the interpreter, 6.8 MB, the largest file (Debian's
// python3 has no large libpython), in the python layer of each image.
const SharedFile = "usr/bin/python3.11"

// ReadSharedFile is a python script reading SharedFile whole.
const ReadSharedFile = `n = len(open("/` + SharedFile + `", "rb").read())
print("read", n)`

// Residency is how much of one file is in the page cache.
type Residency struct {
	Path string
	// Pages is the file's size in pages, Cached how many are in memory.
	Pages, Cached int64
}

// Bytes is the cached size in bytes.
func (r Residency) Bytes() int64 { return r.Cached * int64(os.Getpagesize()) }

// Fraction is the cached share of the file's pages, 0 for an empty file.
func (r Residency) Fraction() float64 {
	if r.Pages == 0 {
		return 0
	}
	return float64(r.Cached) / float64(r.Pages)
}

func (r Residency) String() string {
	return fmt.Sprintf("%d of %d pages (%.0f%%)", r.Cached, r.Pages, 100*r.Fraction())
}

// openPages opens path and sizes it in pages; the caller closes f.
func openPages(path string) (f *os.File, size int64, r Residency, err error) {
	r = Residency{Path: path}
	if f, err = os.Open(path); err != nil {
		return nil, 0, r, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, r, err
	}
	ps := int64(os.Getpagesize())
	r.Pages = (fi.Size() + ps - 1) / ps
	return f, fi.Size(), r, nil
}

// Mincore maps path read-only and counts its pages in memory (mincore(2)).
// As root every cached page counts, not only those this process touched.
func Mincore(path string) (Residency, error) {
	f, size, r, err := openPages(path)
	if err != nil {
		return r, err
	}
	defer f.Close()
	if size == 0 {
		return r, nil
	}
	data, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return r, fmt.Errorf("mmap %s: %w", path, err)
	}
	defer unix.Munmap(data)
	vec := make([]byte, r.Pages)
	// x/sys/unix has no mincore wrapper for Linux.
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&data[0])), uintptr(len(data)),
		uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		return r, fmt.Errorf("mincore %s: %w", path, errno)
	}
	for _, v := range vec {
		r.Cached += int64(v & 1)
	}
	return r, nil
}

// InodeCache counts the pages cached in path's own inode (cachestat(2),
// Linux 6.5+), without mapping it.
func InodeCache(path string) (Residency, error) {
	f, _, r, err := openPages(path)
	if err != nil {
		return r, err
	}
	defer f.Close()
	var st unix.Cachestat_t
	// Len 0 means to the end of the file.
	if err := unix.Cachestat(uint(f.Fd()), &unix.CachestatRange{}, &st, 0); err != nil {
		return r, fmt.Errorf("cachestat %s: %w", path, err)
	}
	r.Cached = int64(st.Cache)
	return r, nil
}

// Evict drops path's clean cached pages (POSIX_FADV_DONTNEED), those of
// its own inode: other work on the machine keeps its caches, unlike with
// drop_caches. Pages mapped by a running process stay.
func Evict(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("fadvise %s: %w", path, err)
	}
	return nil
}

// DropPageCache writes dirty pages back and drops the whole clean page
// cache (not dentries and inodes), for when Evict cannot.
func DropPageCache() error {
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("1\n"), 0o200); err != nil {
		return fmt.Errorf("drop page cache: %w", err)
	}
	return nil
}

// MeminfoCached is the Cached line of /proc/meminfo in bytes: the page
// cache of the whole machine, so other work moves it too.
func MeminfoCached() (int64, error) {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "Cached:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo: %w", err)
			}
			return kb * 1024, nil
		}
	}
	return 0, errors.New("/proc/meminfo has no Cached line")
}

// StoreObject is the path of the store object of content d under a
// lazycas daemon root: <root>/store/objects/sha256/<2 hex>/<64 hex>, the
// layout store/store.go documents.
func StoreObject(daemonRoot string, d digest.Digest) string {
	return filepath.Join(daemonRoot, "store", "objects", d.Algorithm().String(), d.Encoded()[:2], d.Encoded())
}

// LayerFilesAt lists rel (a path relative to a layer's root) in every
// lazycas layer mount under daemonRoot that holds it as a regular file:
// the same file as each image's layer shows it.
func LayerFilesAt(daemonRoot, rel string) ([]string, error) {
	mounts, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("fuse.lazycas"))
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	root := filepath.Clean(daemonRoot) + string(filepath.Separator)
	var out []string
	for _, m := range mounts {
		if !strings.HasPrefix(m.Mountpoint, root) {
			continue
		}
		p := filepath.Join(m.Mountpoint, rel)
		if fi, err := os.Lstat(p); err == nil && fi.Mode().IsRegular() {
			out = append(out, p)
		}
	}
	return out, nil
}

// FileDigest is the sha256 digest of path's content, the store's key.
func FileDigest(path string) (digest.Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return digest.NewDigest(digest.SHA256, h), nil
}
