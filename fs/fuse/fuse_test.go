package fuse

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
	"github.com/lazycas/lazycas/store"
)

// These tests mount layers straight from metadata, with file contents from
// a store filled from an in-memory blob: no registry, no fs.FileSystem.
// They need root and skip without.

func TestMain(m *testing.M) {
	os.Exit(testlayer.Main(m))
}

// storeFiles serves contents from a store, filling it from an in-memory
// blob, or fails every Open as told.
type storeFiles struct {
	st     *store.Store
	blob   []byte
	format layer.Format
	err    atomic.Pointer[error]
	fills  atomic.Int64
}

// fail makes every later Open fail with err; nil serves again.
func (f *storeFiles) fail(err error) {
	if err == nil {
		f.err.Store(nil)
		return
	}
	f.err.Store(&err)
}

func (f *storeFiles) Open(ctx context.Context, n *metadata.Node) (File, error) {
	if err := f.err.Load(); err != nil {
		return nil, *err
	}
	d := digest.Digest(n.Digest)
	_, err := f.st.Ensure(ctx, d, n.Size, func(ctx context.Context, w io.Writer) error {
		f.fills.Add(1)
		return layer.WriteFile(ctx, memRanges(f.blob), f.format, n, w)
	})
	if err != nil {
		return nil, err
	}
	return f.st.Open(d)
}

type memRanges []byte

func (m memRanges) ReadRanges(_ context.Context, ranges []layer.Range) error {
	for _, r := range ranges {
		if r.Off < 0 || r.Off+int64(len(r.Buf)) > int64(len(m)) {
			return fmt.Errorf("range %d+%d outside the blob", r.Off, len(r.Buf))
		}
		copy(r.Buf, m[r.Off:])
	}
	return nil
}

// mounted is a layer served for one test.
type mounted struct {
	dir   string // the mountpoint
	layer *Layer
	meta  *metadata.Layer
	files *storeFiles
}

// putLayer records blob's layer as "layer" in the metadata database in
// dir, closed again, and returns its tree.
func putLayer(t testing.TB, dir string, blob *testlayer.Blob) *layer.Tree {
	t.Helper()
	toc := blob.TOC(t)
	tree, err := layer.Build(toc)
	if err != nil {
		t.Fatal(err)
	}
	db, err := metadata.Open(filepath.Join(dir, "metadata.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	info := metadata.LayerInfo{Ref: "test", Digest: blob.Digest.String(), Size: int64(len(blob.Data)), TOCDigest: toc.Digest.String(), Format: string(toc.Format)}
	if err := db.Put("layer", info, tree.Nodes, tree.Dirents); err != nil {
		t.Fatal(err)
	}
	return tree
}

// openLayer opens the layer putLayer recorded in dir, and a store in dir
// filled from blob; both close when the test ends.
func openLayer(t testing.TB, dir string, blob []byte, f layer.Format) (*metadata.Layer, *storeFiles) {
	t.Helper()
	db, err := metadata.Open(filepath.Join(dir, "metadata.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ml, err := db.Layer("layer")
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return ml, &storeFiles{st: st, blob: blob, format: f}
}

// mountEntries builds a layer of entries and mounts it under a new test
// directory; it is unmounted when the test ends.
func mountEntries(t testing.TB, entries []testlayer.Entry, opts Options) *mounted {
	t.Helper()
	testlayer.Root(t)
	dir := testlayer.TestDir(t)
	blob := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{ChunkSize: 4 << 20})
	putLayer(t, dir, blob)
	ml, files := openLayer(t, dir, blob.Data, layer.FormatEStargz)
	mp := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	if opts.FsName == "" {
		opts.FsName = "lazycas:" + blob.Digest.String()
	}
	l, err := Mount(context.Background(), mp, ml, files, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	return &mounted{dir: mp, layer: l, meta: ml, files: files}
}

func TestOpaqueDirectoriesAnswerOneXattr(t *testing.T) {
	entries := []testlayer.Entry{
		testlayer.Dir("opq/", 0o755).Xattr("user.keep", "kept"),
		testlayer.Opaque("opq"),
		testlayer.File("opq/f", []byte("f\n"), 0o644),
		testlayer.Dir("plain/", 0o755),
	}
	for _, tc := range []struct {
		name        string
		opt         string
		want, other string
	}{
		{"default", "", OpaqueXattrTrusted, OpaqueXattrUser},
		{"trusted", OpaqueXattrTrusted, OpaqueXattrTrusted, OpaqueXattrUser},
		{"user", OpaqueXattrUser, OpaqueXattrUser, OpaqueXattrTrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := mountEntries(t, entries, Options{OpaqueXattr: tc.opt})
			opq, plain := filepath.Join(m.dir, "opq"), filepath.Join(m.dir, "plain")
			if v, err := testlayer.Getxattr(opq, tc.want); err != nil || v != "y" {
				t.Errorf("%s of an opaque dir: %q, %v; want y", tc.want, v, err)
			}
			if _, err := testlayer.Getxattr(opq, tc.other); !errors.Is(err, unix.ENODATA) {
				t.Errorf("%s of an opaque dir: %v, want ENODATA", tc.other, err)
			}
			if got, err := testlayer.Xattrs(opq); err != nil || len(got) != 2 || got[tc.want] != "y" || got["user.keep"] != "kept" {
				t.Errorf("xattrs of an opaque dir: %v, %v; want %s and user.keep", got, err, tc.want)
			}
			for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser} {
				if _, err := testlayer.Getxattr(plain, x); !errors.Is(err, unix.ENODATA) {
					t.Errorf("%s of a plain dir: %v, want ENODATA", x, err)
				}
			}
			if got, err := testlayer.Xattrs(plain); err != nil || len(got) != 0 {
				t.Errorf("xattrs of a plain dir: %v, %v", got, err)
			}
			// A short buffer gets ERANGE, not a cut list.
			if _, err := unix.Llistxattr(opq, make([]byte, len(tc.want))); !errors.Is(err, unix.ERANGE) {
				t.Errorf("listxattr into a short buffer: %v, want ERANGE", err)
			}
		})
	}
}

func TestContentErrorsAreEIO(t *testing.T) {
	entries := []testlayer.Entry{
		testlayer.File("f", []byte("content\n"), 0o644),
		testlayer.File("empty", nil, 0o644),
	}
	m := mountEntries(t, entries, Options{})
	m.files.fail(errors.New("registry unreachable"))
	if _, err := os.ReadFile(filepath.Join(m.dir, "f")); !errors.Is(err, syscall.EIO) {
		t.Errorf("open with a failing content provider: %v, want EIO", err)
	}
	if n := m.layer.Stats().OpenErrors.Load(); n != 1 {
		t.Errorf("OpenErrors = %d, want 1", n)
	}
	// An empty file needs no content.
	if got, err := os.ReadFile(filepath.Join(m.dir, "empty")); err != nil || len(got) != 0 {
		t.Errorf("read empty file: %q, %v", got, err)
	}
	// A failure is not remembered.
	m.files.fail(nil)
	if got, err := os.ReadFile(filepath.Join(m.dir, "f")); err != nil || string(got) != "content\n" {
		t.Errorf("read after the provider recovered: %q, %v", got, err)
	}
}

// bigDir is a layer with one directory of n small files.
func bigDir(n int) []testlayer.Entry {
	entries := []testlayer.Entry{testlayer.Dir("d/", 0o755)}
	for i := range n {
		entries = append(entries, testlayer.File(fmt.Sprintf("d/file-%05d", i), []byte(fmt.Sprintf("%d\n", i)), 0o644))
	}
	return entries
}

func TestLargeDirectoryListsEveryEntryOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a layer of 10k files")
	}
	entries := bigDir(10000)
	m := mountEntries(t, entries, Options{})
	got, problems, err := testlayer.WalkMeta(m.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Error(p)
	}
	for _, d := range testlayer.Compare(testlayer.Expect(entries, OpaqueXattrTrusted).WithoutContent(), got) {
		t.Error(d)
	}
	ents, err := testlayer.ReadDirents(filepath.Join(m.dir, "d"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 10002 {
		t.Errorf("getdents gave %d entries, want 10000 and . and ..", len(ents))
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		names = append(names, e.Name)
	}
	if !sort.StringsAreSorted(names[2:]) || names[0] != "." || names[1] != ".." {
		t.Errorf("entries not listed as . .. then by name: %q ...", names[:min(5, len(names))])
	}
}

func TestExecAndMmapServeTheContent(t *testing.T) {
	trueBin, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Skip("no /bin/true to run from a layer")
	}
	data := testlayer.Random(1, 3<<20+17)
	entries := []testlayer.Entry{
		testlayer.Dir("bin/", 0o755),
		testlayer.File("bin/true", trueBin, 0o755),
		testlayer.File("data", data, 0o644),
	}
	for _, passthrough := range []bool{false, true} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			m := mountEntries(t, entries, Options{Passthrough: passthrough})
			// Exec through a shell: while this process execs, its forking
			// thread holds the Go runtime in a state where a GC cannot stop
			// it, and the runtime stops the goroutines that would serve an
			// exec from this mount.
			if out, err := exec.Command("/bin/sh", "-c", `exec "$0"`, filepath.Join(m.dir, "bin/true")).CombinedOutput(); err != nil {
				t.Errorf("run a binary from the layer: %v: %s", err, out)
			}
			// A page fault on the mount must not happen in this process: it
			// blocks a thread the Go runtime cannot stop for GC, while the
			// runtime stops the goroutines that would serve the fault.
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperMmap$")
			cmd.Env = append(os.Environ(), mmapEnv+"="+filepath.Join(m.dir, "data"), testlayer.ChildEnv+"=1")
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("mmap in a child: %v", err)
			}
			if got := strings.Fields(string(out)); len(got) == 0 || got[0] != testlayer.SHA256(data) {
				t.Errorf("mmap of a file shows other bytes than the layer holds: %s", out)
			}
			f, err := os.Open(filepath.Join(m.dir, "data"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			// pread at odd offsets, across the end.
			buf := make([]byte, 1000)
			for _, off := range []int64{0, 1, 4095, 1 << 20, int64(len(data)) - 10} {
				n, err := f.ReadAt(buf, off)
				want := data[off:min(off+int64(len(buf)), int64(len(data)))]
				if n != len(want) || string(buf[:n]) != string(want) || (err != nil && err != io.EOF) {
					t.Errorf("pread at %d: %d bytes, %v", off, n, err)
				}
			}
			if n := m.files.fills.Load(); n != 2 {
				t.Errorf("%d fills for 2 files", n)
			}
			if passthrough && !m.layer.Passthrough() {
				t.Log("this kernel offers no FUSE passthrough")
				passthrough = false
			}
			reads := m.layer.Stats().Reads.Load()
			if passthrough && reads != 0 {
				t.Errorf("with passthrough, FUSE served %d reads", reads)
			}
			if !passthrough && reads == 0 {
				t.Error("without passthrough, FUSE served no read")
			}
		})
	}
}

const mmapEnv = "LAZYCAS_FUSE_TEST_MMAP"

// TestHelperMmap is not a test: TestExecAndMmapServeTheContent runs it in
// a child process to print the sha256 of a file read through mmap.
func TestHelperMmap(t *testing.T) {
	p := os.Getenv(mmapEnv)
	if p == "" {
		t.Skip("helper process of TestExecAndMmapServeTheContent")
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	fmt.Println(testlayer.SHA256(mem))
}

func TestStatfsAndMountEntry(t *testing.T) {
	entries := []testlayer.Entry{testlayer.File("a", []byte("a"), 0o644), testlayer.File("b/c", []byte("c"), 0o644)}
	m := mountEntries(t, entries, Options{FsName: "lazycas:sha256:test"})
	var st unix.Statfs_t
	if err := unix.Statfs(m.dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.FUSE_SUPER_MAGIC || st.Files != uint64(m.meta.Info.Nodes) || st.Bsize != 4096 {
		t.Errorf("statfs: type %#x files %d bsize %d; want FUSE, %d inodes, 4096", st.Type, st.Files, st.Bsize, m.meta.Info.Nodes)
	}
	mi, ok, err := testlayer.MountAt(m.dir)
	if err != nil || !ok {
		t.Fatalf("%s not mounted: %v", m.dir, err)
	}
	if mi.Source != "lazycas:sha256:test" || mi.FSType != "fuse.lazycas" {
		t.Errorf("mount entry %+v", mi)
	}
	for _, o := range []string{"ro", "default_permissions", "allow_other"} {
		if !strings.Contains(","+mi.Options+",", ","+o+",") {
			t.Errorf("mount options %q lack %s", mi.Options, o)
		}
	}
}

func TestUnmountLeavesNoMount(t *testing.T) {
	m := mountEntries(t, []testlayer.Entry{testlayer.File("a", []byte("a"), 0o644)}, Options{})
	if _, err := os.ReadFile(filepath.Join(m.dir, "a")); err != nil {
		t.Fatal(err)
	}
	if err := testlayer.Within(t, 20*time.Second, "Unmount", m.layer.Unmount); err != nil {
		t.Fatal(err)
	}
	if mi, ok, _ := testlayer.MountAt(m.dir); ok {
		t.Errorf("Unmount left %+v", mi)
	}
	// The test's cleanup unmounts again: a second Unmount is harmless.
}

// TestUnmountWhileAFileIsOpen: the mount is busy, so Unmount detaches it
// lazily; the connection would live as long as the open file, so Unmount
// aborts it and returns in bounded time.
func TestUnmountWhileAFileIsOpen(t *testing.T) {
	m := mountEntries(t, []testlayer.Entry{testlayer.File("a", []byte("a"), 0o644)}, Options{})
	f, err := os.Open(filepath.Join(m.dir, "a"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	testlayer.Within(t, 20*time.Second, "Unmount with an open file", m.layer.Unmount)
	if mi, ok, _ := testlayer.MountAt(m.dir); ok {
		t.Errorf("Unmount left %+v", mi)
	}
}

// BenchmarkReadCachedFile reads a 64 MiB file whose content is in the
// store (and in the host's page cache) through the mount. "cold" drops
// the FUSE inode's own page cache before each read, as a first read
// through a new mount sees it; "warm" reads what the kernel cached.
func BenchmarkReadCachedFile(b *testing.B) {
	data := testlayer.Random(64, 64<<20)
	entries := []testlayer.Entry{testlayer.File("big", data, 0o644)}
	readAll := func(b *testing.B, p string, buf []byte) {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		var n int64
		for {
			k, err := f.Read(buf)
			n += int64(k)
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		if n != int64(len(data)) {
			b.Fatalf("read %d bytes", n)
		}
	}
	for _, passthrough := range []bool{false, true} {
		m := mountEntries(b, entries, Options{Passthrough: passthrough})
		p := filepath.Join(m.dir, "big")
		if _, err := os.ReadFile(p); err != nil { // fills the store
			b.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			b.Fatal(err)
		}
		for _, cold := range []bool{true, false} {
			name := fmt.Sprintf("passthrough=%v/cold=%v", passthrough, cold)
			b.Run(name, func(b *testing.B) {
				buf := make([]byte, 1<<20)
				b.SetBytes(int64(len(data)))
				for b.Loop() {
					if cold {
						b.StopTimer()
						if st := m.layer.server.InodeNotify(st.Ino, 0, -1); !st.Ok() && !passthrough {
							b.Fatalf("invalidate page cache: %v", st)
						}
						b.StartTimer()
					}
					readAll(b, p, buf)
				}
			})
		}
		if !passthrough {
			// For reference: the store's object itself, on the host's disk.
			obj := filepath.Join(m.files.st.Dir(), "objects", "sha256", testlayer.SHA256(data)[:2], testlayer.SHA256(data))
			b.Run("native", func(b *testing.B) {
				buf := make([]byte, 1<<20)
				b.SetBytes(int64(len(data)))
				for b.Loop() {
					readAll(b, obj, buf)
				}
			})
		}
	}
}

// BenchmarkLookupGetattr stats every file of a 10k-file directory by
// name: "cold" on a fresh mount (every name is a FUSE lookup answered
// from metadata), "warm" on one whose entries the kernel cached.
func BenchmarkLookupGetattr(b *testing.B) {
	const n = 10000
	entries := bigDir(n)
	names := make([]string, 0, n)
	for _, e := range entries[1:] {
		names = append(names, e.Hdr.Name)
	}
	statAll := func(b *testing.B, dir string) {
		var st unix.Stat_t
		for _, name := range names {
			if err := unix.Lstat(filepath.Join(dir, name), &st); err != nil {
				b.Fatal(err)
			}
		}
	}
	m := mountEntries(b, entries, Options{})
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			// Forget every cached entry of the directory.
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(m.dir, "d"), &st); err != nil {
				b.Fatal(err)
			}
			for _, name := range names {
				m.layer.server.EntryNotify(st.Ino, filepath.Base(name))
			}
			b.StartTimer()
			statAll(b, m.dir)
		}
		b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "lookups/s")
	})
	b.Run("warm", func(b *testing.B) {
		statAll(b, m.dir)
		for b.Loop() {
			statAll(b, m.dir)
		}
		b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "lookups/s")
	})
	// For reference: the same files on the host's disk, in its dcache.
	native := b.TempDir()
	if err := os.Mkdir(filepath.Join(native, "d"), 0o755); err != nil {
		b.Fatal(err)
	}
	for _, name := range names {
		if err := os.WriteFile(filepath.Join(native, name), nil, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("native", func(b *testing.B) {
		statAll(b, native)
		for b.Loop() {
			statAll(b, native)
		}
		b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "lookups/s")
	})
}

// TestClosingFilesCostsOneFlush: closing a file of a layer sends the
// daemon a FLUSH once; after its ENOSYS the kernel sends no more for the
// mount, so opening and closing many files costs no round trip per close.
func TestClosingFilesCostsOneFlush(t *testing.T) {
	var entries []testlayer.Entry
	for i := range 20 {
		entries = append(entries, testlayer.File(fmt.Sprintf("f%02d", i), []byte(fmt.Sprintf("file %d", i)), 0o644))
	}
	m := mountEntries(t, entries, Options{})
	for _, e := range entries {
		for range 2 {
			data, err := os.ReadFile(filepath.Join(m.dir, e.Hdr.Name))
			if err != nil || !bytes.Equal(data, e.Data) {
				t.Fatalf("read %s: %q, %v", e.Hdr.Name, data, err)
			}
		}
	}
	if n := m.layer.Stats().Flushes.Load(); n != 1 {
		t.Errorf("%d FLUSH requests for 40 closes, want 1", n)
	}
}
