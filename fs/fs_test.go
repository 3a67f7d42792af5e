package fs

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/metadata"
	"github.com/lazycas/lazycas/service/resolver"
	"github.com/lazycas/lazycas/snapshot"
	"github.com/lazycas/lazycas/store"
)

// These tests mount real FUSE filesystems and overlays over layers served
// by an in-process registry on loopback; they need root and skip without.

func TestMain(m *testing.M) {
	os.Exit(testlayer.Main(m))
}

// env is one daemon's worth of lazycas state: metadata, store, fetcher and
// FileSystem in a test directory, against one test registry.
type env struct {
	t     *testing.T
	ctx   context.Context
	dir   string
	reg   *testlayer.Registry
	opts  Options
	ropts remote.Options

	meta    *metadata.DB
	st      *store.Store
	fetcher *remote.Fetcher
	fs      *FileSystem
}

func newEnv(t *testing.T, opts Options, ropts remote.Options) *env {
	t.Helper()
	testlayer.Root(t)
	e := &env{t: t, dir: testlayer.TestDir(t), ctx: testContext(t), opts: opts, ropts: ropts}
	e.reg = testlayer.NewRegistry(t)
	e.open()
	t.Cleanup(e.close)
	return e
}

// testContext carries a logger that writes to t.Log while the test runs.
func testContext(t *testing.T) context.Context {
	var done atomic.Bool
	t.Cleanup(func() { done.Store(true) })
	l := logrus.New()
	l.SetLevel(logrus.InfoLevel)
	l.SetOutput(writerFunc(func(p []byte) (int, error) {
		if !done.Load() {
			t.Log(strings.TrimSpace(string(p)))
		}
		return len(p), nil
	}))
	return log.WithLogger(context.Background(), logrus.NewEntry(l))
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// open starts the daemon's state, as a restarted daemon would.
func (e *env) open() {
	e.t.Helper()
	var err error
	if e.meta, err = metadata.Open(filepath.Join(e.dir, "metadata.db")); err != nil {
		e.t.Fatal(err)
	}
	if e.st, err = store.Open(e.ctx, filepath.Join(e.dir, "store")); err != nil {
		e.t.Fatal(err)
	}
	ropts := e.ropts
	ropts.Hosts = resolver.Hosts(e.ctx, resolver.Options{PlainHTTP: true})
	e.fetcher = remote.New(ropts)
	e.fs = New(e.meta, e.st, e.fetcher, e.opts)
}

// close stops it: every layer is unmounted, metadata and store stay.
func (e *env) close() {
	if e.fs == nil {
		return
	}
	if err := e.fs.Close(); err != nil {
		e.t.Errorf("close filesystem: %v", err)
	}
	e.fetcher.Close()
	if err := e.meta.Close(); err != nil {
		e.t.Errorf("close metadata: %v", err)
	}
	if err := e.st.Close(); err != nil {
		e.t.Errorf("close store: %v", err)
	}
	e.fs = nil
}

func (e *env) mountpoint(key string) string {
	p := filepath.Join(e.dir, "mnt", key)
	if err := os.MkdirAll(p, 0o755); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// mount pushes b and mounts it under key.
func (e *env) mount(key string, b *testlayer.Blob) string {
	e.t.Helper()
	e.reg.Push(e.t, b)
	mp := e.mountpoint(key)
	if err := e.fs.Mount(e.ctx, key, mp, e.reg.Labels(b)); err != nil {
		e.t.Fatalf("mount %s: %v", key, err)
	}
	return mp
}

// layer returns the served layer under key.
func (e *env) layer(key string) *mounted {
	e.fs.mu.Lock()
	defer e.fs.mu.Unlock()
	m := e.fs.layers[key]
	if m == nil {
		e.t.Fatalf("layer %s is not served", key)
	}
	return m
}

// fetchDone waits for the layer's prefetch and background fetch to end.
func (e *env) fetchDone(key string) {
	e.t.Helper()
	select {
	case <-e.layer(key).done:
	case <-time.After(30 * time.Second):
		e.t.Fatalf("layer %s: fetching did not end within 30s", key)
	}
}

// checkStore fails the test unless every object in the store hashes to its
// name and no fill left a temporary file.
func (e *env) checkStore() {
	e.t.Helper()
	objects := filepath.Join(e.st.Dir(), "objects", "sha256")
	err := filepath.WalkDir(objects, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if got := testlayer.SHA256(data); got != d.Name() {
			e.t.Errorf("store object %s holds content hashing to %s", d.Name(), got)
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	tmps, err := os.ReadDir(filepath.Join(e.st.Dir(), "tmp"))
	if err != nil {
		e.t.Fatal(err)
	}
	for _, tmp := range tmps {
		e.t.Errorf("store holds a temporary file %s", tmp.Name())
	}
}

func digestOf(data []byte) digest.Digest { return digest.FromBytes(data) }

func readFile(t *testing.T, p string) ([]byte, error) {
	t.Helper()
	var data []byte
	err := testlayer.Within(t, 30*time.Second, "read "+p, func() (err error) {
		data, err = os.ReadFile(p)
		return err
	})
	return data, err
}

func mustRead(t *testing.T, p string, want []byte) {
	t.Helper()
	got, err := readFile(t, p)
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %s: %d bytes (sha256 %s), want %d bytes (sha256 %s)", p, len(got), testlayer.SHA256(got), len(want), testlayer.SHA256(want))
	}
}

// richLayer holds every kind of entry a layer can hold.
func richLayer() []testlayer.Entry {
	tl := testlayer.Dir
	long := strings.Repeat("n", 255)
	return []testlayer.Entry{
		tl("etc/", 0o755).Xattr("user.comment", "dir xattr"),
		testlayer.File("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644),
		testlayer.Hardlink("etc/passwd.hard", "etc/passwd"),
		testlayer.File("etc/shadow", []byte("root:*:19000:0:99999:7:::\n"), 0o000), // as on RHEL
		tl("private/", 0o000), testlayer.File("private/key", []byte("secret\n"), 0o400),
		testlayer.Symlink("etc/link", "../etc/passwd"),
		testlayer.Symlink("etc/abs", "/etc/passwd"),
		testlayer.Whiteout("etc/removed"),
		tl("usr/", 0o755), tl("usr/bin/", 0o755),
		testlayer.File("usr/bin/ping", []byte("\x7fELF pretend"), 0o4755).Xattr("security.capability", vfsCapV2NetRaw),
		testlayer.File("usr/bin/sgid", []byte("#!/bin/sh\n"), 0o2711).Owner(0, 5),
		testlayer.File("empty", nil, 0o600).Owner(1000, 100),
		testlayer.File("big.bin", testlayer.Random(1, 5<<20+123), 0o640).Owner(1000, 1000),
		testlayer.File("dup/one", []byte("same content, two inodes\n"), 0o644),
		testlayer.File("dup/two", []byte("same content, two inodes\n"), 0o600),
		testlayer.File("implicit/parents/deep.txt", []byte("deep\n"), 0o644).Time(testlayer.MTime.Add(-48 * time.Hour)),
		tl("tmp/", 0o1777),
		tl("names/", 0o755),
		testlayer.File("names/with space ünïcödé.txt", []byte("name\n"), 0o644),
		testlayer.File("names/"+long, []byte("long name\n"), 0o644),
		tl("var/", 0o755), tl("var/opaque/", 0o750).Owner(1, 2),
		testlayer.Opaque("var/opaque"),
		testlayer.File("var/opaque/kept", []byte("kept\n"), 0o644),
		// overlay xattrs from a tar must not speak to overlayfs
		tl("var/fake/", 0o755).Xattr("trusted.overlay.opaque", "y").Xattr("user.overlay.redirect", "/x"),
		testlayer.Fifo("var/fifo"),
		testlayer.Device(tar.TypeChar, "var/null", 1, 3),
		testlayer.Device(tar.TypeBlock, "var/sda", 8, 0),
		testlayer.Device(tar.TypeChar, "var/bigdev", 259, 65537),
		// Far from the small files above, and larger than a readahead
		// window: a read of those does not fetch these along.
		testlayer.File("var/lib/far1", testlayer.Random(2, 3<<20), 0o644),
		testlayer.File("var/lib/far2", testlayer.Random(3, 64<<10), 0o644),
	}
}

func TestMountShowsTheLayer(t *testing.T) {
	for _, f := range testlayer.Formats {
		for _, passthrough := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/passthrough=%v", f, passthrough), func(t *testing.T) {
				e := newEnv(t, Options{OpaqueXattr: fuse.OpaqueXattrTrusted, Passthrough: passthrough}, remote.Options{})
				entries := richLayer()
				blob := testlayer.Build(t, testlayer.Tar(t, entries), f, testlayer.BuildOptions{ChunkSize: 1 << 20})
				mp := e.mount("rich", blob)

				got, problems, err := testlayer.Walk(mp)
				if err != nil {
					t.Fatal(err)
				}
				for _, p := range problems {
					t.Errorf("readdir: %s", p)
				}
				for _, d := range testlayer.Compare(testlayer.Expect(entries, fuse.OpaqueXattrTrusted), got) {
					t.Error(d)
				}

				// The one opaque xattr is the trusted one.
				if _, err := testlayer.Getxattr(filepath.Join(mp, "var/opaque"), fuse.OpaqueXattrUser); !errors.Is(err, unix.ENODATA) {
					t.Errorf("%s of an opaque dir: %v, want ENODATA", fuse.OpaqueXattrUser, err)
				}
				if _, err := testlayer.Getxattr(filepath.Join(mp, "var/fake"), fuse.OpaqueXattrTrusted); !errors.Is(err, unix.ENODATA) {
					t.Errorf("%s of a dir whose tar entry carried it: %v, want ENODATA", fuse.OpaqueXattrTrusted, err)
				}
				// Nothing of the layer format shows.
				for _, name := range []string{".prefetch.landmark", ".no.prefetch.landmark", "etc/.wh.removed", "var/opaque/.wh..wh..opq"} {
					if _, err := os.Lstat(filepath.Join(mp, name)); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("lstat %s: %v, want ENOENT", name, err)
					}
				}

				checkReadOnly(t, mp)

				mi, ok, err := testlayer.MountAt(mp)
				if err != nil || !ok {
					t.Fatalf("%s not in /proc/self/mounts (%v)", mp, err)
				}
				if mi.FSType != "fuse.lazycas" || !strings.Contains(mi.Source, blob.Digest.String()) {
					t.Errorf("mount %+v: want type fuse.lazycas and a source naming %s", mi, blob.Digest)
				}
				if !strings.Contains(","+mi.Options+",", ",ro,") {
					t.Errorf("mount options %q, want ro", mi.Options)
				}
				// Passthrough: the kernel reads the store's objects itself.
				fl := e.layer("rich").fuse
				if passthrough && !fl.Passthrough() {
					t.Log("this kernel offers no FUSE passthrough")
					passthrough = false
				}
				reads := fl.Stats().Reads.Load()
				if passthrough && reads != 0 {
					t.Errorf("with passthrough, FUSE served %d reads", reads)
				}
				if !passthrough && reads == 0 {
					t.Error("without passthrough, FUSE served no read")
				}
				e.checkStore()
			})
		}
	}
}

func checkReadOnly(t *testing.T, mp string) {
	t.Helper()
	p := func(name string) string { return filepath.Join(mp, name) }
	writes := map[string]func() error{
		"create": func() error { return os.WriteFile(p("new"), nil, 0o644) },
		"open for write": func() error {
			f, err := os.OpenFile(p("etc/passwd"), os.O_WRONLY, 0)
			if err == nil {
				f.Close()
			}
			return err
		},
		"truncate": func() error { return os.Truncate(p("etc/passwd"), 0) },
		"mkdir":    func() error { return os.Mkdir(p("etc/dir"), 0o755) },
		"unlink":   func() error { return os.Remove(p("etc/passwd")) },
		"rmdir":    func() error { return os.Remove(p("tmp")) },
		"rename":   func() error { return os.Rename(p("etc/passwd"), p("etc/shadow")) },
		"chmod":    func() error { return os.Chmod(p("etc/passwd"), 0o600) },
		"chown":    func() error { return os.Lchown(p("etc/passwd"), 1, 1) },
		"symlink":  func() error { return os.Symlink("x", p("etc/new-link")) },
		"link":     func() error { return os.Link(p("etc/passwd"), p("etc/new-hard")) },
		"setxattr": func() error { return unix.Lsetxattr(p("etc"), "user.x", []byte("y"), 0) },
		"mknod":    func() error { return unix.Mknod(p("etc/fifo"), unix.S_IFIFO|0o600, 0) },
		"utimes":   func() error { return os.Chtimes(p("etc/passwd"), time.Now(), time.Now()) },
	}
	for name, fn := range writes {
		if err := fn(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", name, err)
		}
	}
}

// overlayLayers are a lower layer and an upper one that deletes from it.
func overlayLayers() (lower, upper []testlayer.Entry) {
	lower = []testlayer.Entry{
		testlayer.Dir("etc/", 0o755),
		testlayer.File("etc/a", []byte("a from lower\n"), 0o644),
		testlayer.File("etc/b", []byte("b from lower\n"), 0o644),
		testlayer.Dir("opq/", 0o755),
		testlayer.File("opq/x", []byte("x from lower\n"), 0o644),
		testlayer.Dir("gone/", 0o755),
		testlayer.File("gone/f", []byte("in a removed dir\n"), 0o644),
	}
	upper = []testlayer.Entry{
		testlayer.Dir("etc/", 0o755),
		testlayer.Whiteout("etc/a"),
		testlayer.Dir("opq/", 0o755),
		testlayer.Opaque("opq"),
		testlayer.File("opq/y", []byte("y from upper\n"), 0o644),
		testlayer.Whiteout("gone"),
		testlayer.File("etc/c", []byte("c from upper\n"), 0o644),
	}
	return lower, upper
}

func TestOverlayStacksLazyLayers(t *testing.T) {
	for _, tc := range []struct {
		name, xattr, option string
	}{
		{"trusted xattrs", fuse.OpaqueXattrTrusted, ""},
		{"userxattr", fuse.OpaqueXattrUser, ",userxattr"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Options{OpaqueXattr: tc.xattr, Passthrough: true}, remote.Options{})
			lower, upper := overlayLayers()
			lowerMnt := e.mount("lower", testlayer.Build(t, testlayer.Tar(t, lower), layer.FormatEStargz, testlayer.BuildOptions{}))
			upperMnt := e.mount("upper", testlayer.Build(t, testlayer.Tar(t, upper), layer.FormatZstdChunked, testlayer.BuildOptions{}))

			target := mountOverlay(t, e.dir, tc.option, upperMnt, lowerMnt)
			rw := filepath.Join(e.dir, "rw")
			p := func(name string) string { return filepath.Join(target, name) }

			if _, err := os.Lstat(p("etc/a")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("whited-out etc/a: %v, want ENOENT", err)
			}
			if _, err := os.Lstat(p("gone")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("whited-out dir gone: %v, want ENOENT", err)
			}
			mustRead(t, p("etc/b"), []byte("b from lower\n"))
			mustRead(t, p("etc/c"), []byte("c from upper\n"))
			for dir, want := range map[string]string{"etc": "b c", "opq": "y", "": "etc opq"} {
				if got := names(t, p(dir)); got != want {
					t.Errorf("ls %q: %q, want %q", dir, got, want)
				}
			}
			mustRead(t, p("opq/y"), []byte("y from upper\n"))

			if err := os.WriteFile(p("etc/new"), []byte("written\n"), 0o644); err != nil {
				t.Fatalf("write through overlay: %v", err)
			}
			mustRead(t, filepath.Join(rw, "etc/new"), []byte("written\n"))
			// Copy-up of a lazy file, and a delete that whites it out.
			if err := os.WriteFile(p("etc/b"), []byte("b changed\n"), 0o644); err != nil {
				t.Fatalf("rewrite a lower file: %v", err)
			}
			mustRead(t, filepath.Join(rw, "etc/b"), []byte("b changed\n"))
			mustRead(t, filepath.Join(lowerMnt, "etc/b"), []byte("b from lower\n"))
			if err := os.Remove(p("opq/y")); err != nil {
				t.Fatalf("remove a lazy file: %v", err)
			}
			if got := names(t, p("opq")); got != "" {
				t.Errorf("ls opq after removing y: %q", got)
			}
		})
	}
}

// mountOverlay mounts an overlay of lowers (topmost first) with upper and
// work dirs under dir, and unmounts it when the test ends, before the
// layers (cleanups registered earlier run later).
func mountOverlay(t *testing.T, dir, extraOpts string, lowers ...string) string {
	t.Helper()
	target, rw, work := filepath.Join(dir, "rootfs"), filepath.Join(dir, "rw"), filepath.Join(dir, "work")
	for _, d := range []string{target, rw, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,index=off%s", strings.Join(lowers, ":"), rw, work, extraOpts)
	if err := unix.Mount("overlay", target, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(target, 0); err != nil {
			t.Errorf("unmount overlay: %v", err)
		}
	})
	return target
}

// names lists a directory's names, sorted, space-separated.
func names(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return strings.Join(out, " ")
}

func TestStoreFetchesSharedContentOnce(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	shared, both := testlayer.Random(7, 300<<10), testlayer.Random(8, 2<<20)
	one := []testlayer.Entry{
		testlayer.File("lib/both.so", both, 0o755),
		testlayer.File("lib/shared.so", shared, 0o755),
		testlayer.File("lib/copy.so", shared, 0o644), // same content, second inode
		testlayer.File("only1", []byte("only in layer 1\n"), 0o644),
	}
	two := []testlayer.Entry{
		testlayer.File("usr/lib/both.so", both, 0o755),
		testlayer.File("usr/lib/other-name.so", shared, 0o755),
		testlayer.File("only2", []byte("only in layer 2\n"), 0o644),
	}
	b1 := testlayer.Build(t, testlayer.Tar(t, one), layer.FormatEStargz, testlayer.BuildOptions{})
	b2 := testlayer.Build(t, testlayer.Tar(t, two), layer.FormatZstdChunked, testlayer.BuildOptions{})
	m1, m2 := e.mount("one", b1), e.mount("two", b2)
	if e.st.Has(digestOf(shared)) {
		t.Fatal("the store holds the shared file before anyone read it")
	}

	before1, before2 := e.reg.Counts(b1.Digest), e.reg.Counts(b2.Digest)
	mustRead(t, filepath.Join(m1, "lib/shared.so"), shared)
	after1 := e.reg.Counts(b1.Digest)
	if after1.Ranges == before1.Ranges {
		t.Fatal("reading a file no one had fetched sent no range request")
	}
	if fetched := after1.Bytes - before1.Bytes; fetched < int64(len(shared))/2 || fetched > 2*int64(len(shared)) {
		t.Errorf("reading a %d-byte incompressible file fetched %d bytes", len(shared), fetched)
	}
	if !e.st.Has(digestOf(shared)) {
		t.Fatal("a file read through layer 1 is not in the store")
	}

	mustRead(t, filepath.Join(m1, "lib/copy.so"), shared)
	mustRead(t, filepath.Join(m2, "usr/lib/other-name.so"), shared)
	if c := e.reg.Counts(b1.Digest); c != after1 {
		t.Errorf("reading a second name of fetched content sent requests: %+v, then %+v", after1, c)
	}
	if c := e.reg.Counts(b2.Digest); c != before2 {
		t.Errorf("reading through layer 2 what layer 1 fetched sent requests: %+v, then %+v", before2, c)
	}
	// The counter works: a file only layer 2 holds is fetched from it.
	mustRead(t, filepath.Join(m2, "only2"), []byte("only in layer 2\n"))
	if c := e.reg.Counts(b2.Digest); c.Ranges == before2.Ranges {
		t.Errorf("reading only2 sent no request to layer 2's blob")
	}

	// Concurrent first reads of one content, through both layers, fetch
	// it once.
	beforeBoth := e.reg.Total()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			p := filepath.Join(m1, "lib/both.so")
			if i%2 == 1 {
				p = filepath.Join(m2, "usr/lib/both.so")
			}
			if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, both) {
				t.Errorf("concurrent read of %s: %d bytes, %v", p, len(got), err)
			}
		})
	}
	wg.Wait()
	if fetched := e.reg.Total().Bytes - beforeBoth.Bytes; fetched > int64(len(both))*3/2 {
		t.Errorf("8 concurrent reads of one %d-byte content fetched %d bytes", len(both), fetched)
	}

	st, err := e.st.Stats()
	if err != nil {
		t.Fatal(err)
	}
	// Three distinct contents were read; readahead may have brought more,
	// but each object was sealed once.
	if st.FetchedFiles != st.Objects || st.Objects < 3 || st.Layers != 2 {
		t.Errorf("store stats %+v, want every object fetched once, 3 or more, and 2 layers", st)
	}
	e.checkStore()
}

func TestPrefetch(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for background fetches")
	}
	entries := []testlayer.Entry{testlayer.Dir("files/", 0o755), testlayer.Dir("app/", 0o755)}
	for i := range 40 {
		entries = append(entries, testlayer.File(fmt.Sprintf("files/f%02d", i), testlayer.Random(uint64(i), 1000+i*997), 0o644))
	}
	entries = append(entries,
		testlayer.File("app/main.py", []byte("print('hi')\n"), 0o644),
		testlayer.File("app/big.so", testlayer.Random(99, 3<<20), 0o755),
		testlayer.File("empty", nil, 0o644),
	)
	prioritized := []string{"app/main.py", "app/big.so"}
	isPrioritized := func(name string) bool { return name == "app/main.py" || name == "app/big.so" }

	for _, tc := range []struct {
		name               string
		opts               Options
		prioritized, other bool // what must end up in the store before any read
	}{
		{"prefetch and background", Options{Prefetch: true, Background: true}, true, true},
		{"prefetch only", Options{Prefetch: true}, true, false},
		{"background only", Options{Background: true}, true, true},
		{"off", Options{}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, f := range testlayer.Formats {
				t.Run(string(f), func(t *testing.T) {
					e := newEnv(t, tc.opts, remote.Options{})
					blob := testlayer.Build(t, testlayer.Tar(t, entries), f, testlayer.BuildOptions{Prioritized: prioritized, ChunkSize: 1 << 20})
					mp := e.mount("layer", blob)
					afterMount := e.reg.Counts(blob.Digest)

					want := func(name string) bool {
						if isPrioritized(name) {
							return tc.prioritized
						}
						return tc.other
					}
					inStore := func(en testlayer.Entry) bool { return e.st.Has(digestOf(en.Data)) }
					complete := func() bool {
						for _, en := range entries {
							if len(en.Data) > 0 && want(en.Hdr.Name) && !inStore(en) {
								return false
							}
						}
						return true
					}
					if !testlayer.Eventually(e.ctx, 10*time.Second, complete) {
						for _, en := range entries {
							if len(en.Data) > 0 && want(en.Hdr.Name) && !inStore(en) {
								t.Errorf("%s not in the store 10s after mount", en.Hdr.Name)
							}
						}
						t.FailNow()
					}
					e.fetchDone("layer")
					// What metrics show: the layer's phase, nothing left
					// pending, what it fetched, its requests by outcome.
					st, err := e.fs.Stats(e.ctx)
					if err != nil {
						t.Fatal(err)
					}
					wantPhase, wantFiles := PhaseDone, int64(0)
					switch {
					case tc.other:
						wantFiles = 42 // every non-empty file
					case tc.prioritized:
						wantFiles = int64(len(prioritized))
					default:
						wantPhase = PhaseOff
					}
					if st.Phases[wantPhase.String()] != 1 {
						t.Errorf("layers by phase %v, want the layer %s", st.Phases, wantPhase)
					}
					if len(st.Layers) != 1 || st.Layers[0].Digest != blob.Digest.String() {
						t.Fatalf("layer stats %+v, want one of layer %s", st.Layers, blob.Digest)
					}
					l := st.Layers[0]
					if l.PendingFiles != 0 || l.PendingBytes != 0 || l.FetchedFiles != wantFiles {
						t.Errorf("background fetch: %d files (%d bytes) pending, %d fetched; want 0, 0, %d",
							l.PendingFiles, l.PendingBytes, l.FetchedFiles, wantFiles)
					}
					if l.Fetch.Requests[remote.OutcomeOK] == 0 || l.Fetch.Requests[remote.OutcomeError] != 0 {
						t.Errorf("layer requests by outcome %v, want some ok and no error", l.Fetch.Requests)
					}
					if fetched := e.reg.Counts(blob.Digest).Bytes - afterMount.Bytes; fetched > int64(len(blob.Data)) {
						t.Errorf("fetching the layer's files took %d bytes of a %d-byte blob", fetched, len(blob.Data))
					}
					for _, en := range entries {
						if len(en.Data) > 0 && !want(en.Hdr.Name) && inStore(en) {
							t.Errorf("%s was fetched before anyone read it", en.Hdr.Name)
						}
					}
					if !tc.prioritized && !tc.other {
						if c := e.reg.Counts(blob.Digest); c != afterMount {
							t.Errorf("with prefetch off, the blob got requests after mount: %+v, then %+v", afterMount, c)
						}
					}
					// Whatever was fetched, every file reads; what the store
					// had costs no request.
					for _, en := range entries {
						if en.Hdr.Typeflag != tar.TypeReg || !inStore(en) {
							continue
						}
						before := e.reg.Counts(blob.Digest)
						mustRead(t, filepath.Join(mp, en.Hdr.Name), en.Data)
						if c := e.reg.Counts(blob.Digest); c != before {
							t.Errorf("reading prefetched %s sent requests", en.Hdr.Name)
						}
					}
					for _, en := range entries {
						if en.Hdr.Typeflag == tar.TypeReg {
							mustRead(t, filepath.Join(mp, en.Hdr.Name), en.Data)
						}
					}
					e.checkStore()
				})
			}
		})
	}
}

func TestLargeFileIsFetchedOnceInPieces(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and fetches a 40 MiB layer")
	}
	for _, f := range testlayer.Formats {
		t.Run(string(f), func(t *testing.T) {
			e := newEnv(t, Options{Passthrough: true}, remote.Options{})
			data := testlayer.Random(40, 40<<20+4097)
			blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("big", data, 0o644)}), f, testlayer.BuildOptions{})
			mp := e.mount("big", blob)
			before := e.reg.Counts(blob.Digest)
			mustRead(t, filepath.Join(mp, "big"), data)
			c := e.reg.Counts(blob.Digest)
			if fetched := c.Bytes - before.Bytes; fetched > int64(len(blob.Data)) {
				t.Errorf("reading a 40 MiB file fetched %d bytes of a %d-byte blob", fetched, len(blob.Data))
			}
			if c.Ranges-before.Ranges < 2 {
				t.Errorf("a 40 MiB file came in %d range requests, want it split", c.Ranges-before.Ranges)
			}
			mustRead(t, filepath.Join(mp, "big"), data)
			if e.reg.Counts(blob.Digest) != c {
				t.Error("a second read fetched again")
			}
		})
	}
}

func TestLargeFileIsServedPieceByPiece(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and fetches a 24 MiB layer")
	}
	for _, f := range testlayer.Formats {
		for _, passthrough := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/passthrough=%v", f, passthrough), func(t *testing.T) {
				e := newEnv(t, Options{Passthrough: passthrough, PartialMinSize: 1 << 20}, remote.Options{})
				data := testlayer.Random(24, 24<<20+999)
				blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("big", data, 0o644)}), f, testlayer.BuildOptions{ChunkSize: 1 << 20})
				mp := e.mount("big", blob)
				p := filepath.Join(mp, "big")

				first, err := os.Open(p)
				if err != nil {
					t.Fatal(err)
				}
				defer first.Close()
				buf := make([]byte, 4096)
				off := int64(13<<20 + 5)
				if n, err := first.ReadAt(buf, off); err != nil || !bytes.Equal(buf[:n], data[off:off+4096]) {
					t.Fatalf("pread of a file being fetched: %d bytes, %v", n, err)
				}
				if !testlayer.Eventually(e.ctx, 20*time.Second, func() bool { return e.st.Has(digestOf(data)) }) {
					t.Fatal("the file was not sealed in the store within 20s of its open")
				}
				// A second open, while the first (opened before the seal)
				// is still open, reads the sealed object.
				mustRead(t, p, data)
				if _, err := first.Seek(0, io.SeekStart); err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(first)
				if err != nil || !bytes.Equal(got, data) {
					t.Errorf("reading on through the first open: %d bytes, %v", len(got), err)
				}
				// Once every earlier open is closed (the kernel tells FUSE
				// so asynchronously), opens pass through.
				first.Close()
				fl := e.layer("big").fuse
				passedThrough := func() bool {
					reads := fl.Stats().Reads.Load()
					mustRead(t, p, data)
					return fl.Stats().Reads.Load() == reads
				}
				if fl.Passthrough() && !testlayer.Eventually(e.ctx, 5*time.Second, passedThrough) {
					t.Error("opens after the file was sealed and every earlier open closed do not pass through")
				}
				e.checkStore()
			})
		}
	}
}

func TestCorruptChunkOfALargeFileFailsOnlyItsRange(t *testing.T) {
	e := newEnv(t, Options{PartialMinSize: 1 << 20}, remote.Options{})
	data := testlayer.Random(25, 6<<20)
	blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("big", data, 0o644)}), layer.FormatEStargz, testlayer.BuildOptions{ChunkSize: 1 << 20})
	// Corrupt the first chunk: the file's first compressed range.
	blob = blob.Corrupt(t, "big")
	mp := e.mount("big", blob)
	f, err := os.Open(filepath.Join(mp, "big"))
	if err != nil {
		t.Fatalf("open of a large file with one bad chunk: %v", err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, 100); !errors.Is(err, syscall.EIO) {
		t.Errorf("read inside the corrupted chunk: %v, want EIO", err)
	}
	off := int64(3<<20 + 7)
	if n, err := f.ReadAt(buf, off); err != nil || !bytes.Equal(buf[:n], data[off:off+4096]) {
		t.Errorf("read of a good chunk: %d bytes, %v", n, err)
	}
	time.Sleep(500 * time.Millisecond) // let the background completion fail
	if e.st.Has(digestOf(data)) {
		t.Error("the store sealed a file with a corrupted chunk")
	}
	e.checkStore()
}

func TestCorruptChunkFailsTheFileOnly(t *testing.T) {
	for _, f := range testlayer.Formats {
		t.Run(string(f), func(t *testing.T) {
			// Background fetch runs into the bad file too and must not seal it.
			e := newEnv(t, Options{Prefetch: true, Background: true}, remote.Options{})
			good1, bad, good2 := []byte("good one\n"), testlayer.Random(3, 200<<10), testlayer.Random(4, 100<<10)
			entries := []testlayer.Entry{
				testlayer.File("good1", good1, 0o644),
				testlayer.File("bad", bad, 0o644),
				testlayer.File("good2", good2, 0o644),
			}
			blob := testlayer.Build(t, testlayer.Tar(t, entries), f, testlayer.BuildOptions{}).Corrupt(t, "bad")
			mp := e.mount("corrupt", blob)
			e.fetchDone("corrupt")

			for range 2 { // a failure is not remembered as content
				if _, err := readFile(t, filepath.Join(mp, "bad")); !errors.Is(err, syscall.EIO) {
					t.Errorf("read corrupted file: %v, want EIO", err)
				}
			}
			mustRead(t, filepath.Join(mp, "good1"), good1)
			mustRead(t, filepath.Join(mp, "good2"), good2)
			if e.st.Has(digestOf(bad)) {
				t.Error("the store holds the corrupted file")
			}
			e.checkStore()
		})
	}
}

func TestRegistryFailuresFailReadsInBoundedTime(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(*testlayer.Registry)
	}{
		{"500 for every range", func(r *testlayer.Registry) { r.FailRanges(500) }},
		{"404 for every range", func(r *testlayer.Registry) { r.FailRanges(404) }},
		{"ranges that never answer", func(r *testlayer.Registry) { r.FailRanges(testlayer.Stall) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Options{}, remote.Options{RequestTimeout: time.Second, Retries: 1, RetryBackoff: 50 * time.Millisecond})
			data := testlayer.Random(5, 64<<10)
			blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("f", data, 0o644)}), layer.FormatEStargz, testlayer.BuildOptions{})
			mp := e.mount("flaky", blob)

			tc.break_(e.reg)
			start := time.Now()
			_, err := readFile(t, filepath.Join(mp, "f"))
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("read while the registry fails: %v, want EIO", err)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("the failing read took %v", took)
			}
			if e.st.Has(digestOf(data)) {
				t.Error("the store holds a file the registry never served")
			}
			// The failure is not sticky.
			e.reg.FailRanges(0)
			mustRead(t, filepath.Join(mp, "f"), data)
			e.checkStore()
		})
	}
}

func TestMountRefusesAndLeavesNothing(t *testing.T) {
	e := newEnv(t, Options{Prefetch: true, Background: true}, remote.Options{RequestTimeout: time.Second, Retries: 1})
	entries := []testlayer.Entry{testlayer.File("f", []byte("content\n"), 0o644)}
	good := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{})
	e.reg.Push(t, good)
	plain := &testlayer.Blob{Data: testlayer.Tar(t, entries)}
	plain.Digest, plain.TOCDigest = digestOf(plain.Data), good.TOCDigest
	e.reg.Push(t, plain)
	other := digestOf([]byte("another TOC"))

	with := func(b *testlayer.Blob, change func(map[string]string)) map[string]string {
		l := e.reg.Labels(b)
		change(l)
		return l
	}
	// A registry that refuses connections: a port nothing listens on.
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadRef := dead.Addr().String() + "/library/python:lazy"
	dead.Close()
	for _, tc := range []struct {
		name   string
		labels map[string]string
		want   []string // in the error
		reason string   // the error's NotLazyError reason, for metrics and `lazycas image pull`
	}{
		{"a TOC digest that does not match", with(good, func(l map[string]string) { l[snapshot.LabelTOCDigest] = other.String() }),
			[]string{"TOC hashes to " + good.TOCDigest.String(), other.String(), "lazycas image convert"}, snapshot.ReasonTOCMismatch},
		{"no TOC digest", with(good, func(l map[string]string) { delete(l, snapshot.LabelTOCDigest) }), []string{"TOC digest"}, snapshot.ReasonMountFailed},
		{"an invalid TOC digest", with(good, func(l map[string]string) { l[snapshot.LabelTOCDigest] = "sha256:1234" }), []string{"sha256:1234"}, snapshot.ReasonMountFailed},
		{"a blob the registry does not have", with(good, func(l map[string]string) { l[snapshot.LabelLayerDigest] = other.String() }), []string{other.String()}, snapshot.ReasonMountFailed},
		{"an image reference that does not parse", with(good, func(l map[string]string) { l[snapshot.LabelImageRef] = "UPPER CASE" }), []string{"UPPER CASE"}, snapshot.ReasonMountFailed},
		{"a layer that is not lazy", e.reg.Labels(plain), []string{layer.ErrNotLazy.Error(), "lazycas image convert"}, snapshot.ReasonNotLazyFormat},
		{"a registry that refuses connections", with(good, func(l map[string]string) { l[snapshot.LabelImageRef] = deadRef }),
			[]string{"connection refused", "hosts.toml"}, snapshot.ReasonUnreachable},
		{"no image labels and nothing to find the image in", with(good, func(l map[string]string) { delete(l, snapshot.LabelImageRef) }),
			[]string{"no image labels", "lazycas image pull"}, snapshot.ReasonNoImage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := strings.ReplaceAll(tc.name, " ", "-")
			mp := e.mountpoint(key)
			err := e.fs.Mount(e.ctx, key, mp, tc.labels)
			if err == nil {
				t.Fatal("Mount succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
			if nl, ok := errors.AsType[*snapshot.NotLazyError](err); !ok || nl.Reason != tc.reason {
				t.Errorf("error %q: reason %v, want %s", err, nl, tc.reason)
			}
			if mi, ok, _ := testlayer.MountAt(mp); ok {
				t.Errorf("a failed Mount left a mount: %+v", mi)
			}
			if _, err := e.meta.Layer(key); !errors.Is(err, metadata.ErrNotFound) {
				t.Errorf("a failed Mount left metadata: %v", err)
			}
			e.fs.mu.Lock()
			_, served := e.fs.layers[key]
			e.fs.mu.Unlock()
			if served {
				t.Error("a failed Mount left a served layer")
			}
		})
	}
	layers, err := e.meta.Layers()
	if err != nil || len(layers) != 0 {
		t.Errorf("metadata after failed mounts: %v, %v", layers, err)
	}
	if st, err := e.st.Stats(); err != nil || st.Layers != 0 || st.Objects != 0 {
		t.Errorf("store after failed mounts: %+v, %v", st, err)
	}
}

func TestNotLazySaysWhatToDo(t *testing.T) {
	refused := fmt.Errorf("open blob: %w", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
	for _, tc := range []struct {
		name   string
		err    error
		where  where
		reason string
		want   []string
		not    []string
	}{
		{"a label-less pull's registry without a port is unreachable", refused,
			where{ref: "127.0.0.1/library/python:lazy", layer: digest.Digest("sha256:" + strings.Repeat("a", 64)), found: true},
			snapshot.ReasonUnreachable, []string{"hosts.toml for the bare host 127.0.0.1", "lazycas image pull"}, nil},
		{"a labelled pull's registry is unreachable", refused,
			where{ref: "127.0.0.1:5000/library/python:lazy"},
			snapshot.ReasonUnreachable, []string{"connection refused", "hosts.toml"}, []string{"bare host"}},
		{"a TOC that does not match", fmt.Errorf("layer x: %w: TOC hashes to a", layer.ErrTOCMismatch), where{},
			snapshot.ReasonTOCMismatch, []string{"lazycas image convert"}, nil},
		{"anything else", errors.New("metadata: disk full"), where{},
			snapshot.ReasonMountFailed, []string{"disk full"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := notLazy(tc.err, tc.where)
			nl, ok := errors.AsType[*snapshot.NotLazyError](err)
			if !ok || nl.Reason != tc.reason || !errors.Is(err, tc.err) {
				t.Fatalf("got %#v, want reason %s wrapping the cause", err, tc.reason)
			}
			if nl.Image != tc.where.ref || nl.Layer != tc.where.layer.String() {
				t.Errorf("image %q layer %q, want %q %q", nl.Image, nl.Layer, tc.where.ref, tc.where.layer)
			}
			for _, w := range tc.want {
				if !strings.Contains(nl.Detail, w) {
					t.Errorf("detail %q does not say %q", nl.Detail, w)
				}
			}
			for _, w := range tc.not {
				if strings.Contains(nl.Detail, w) {
					t.Errorf("detail %q says %q", nl.Detail, w)
				}
			}
		})
	}
}

// mountRichAndRead mounts richLayer under "rich", in 1 MiB chunks, and
// reads three of its files through the mount: a small one, a large one and
// one of two names of the same content. It returns the mountpoint, the
// layer's entries and what the three hold, by path.
func mountRichAndRead(t *testing.T, e *env) (string, []testlayer.Entry, map[string][]byte) {
	t.Helper()
	entries := richLayer()
	blob := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{ChunkSize: 1 << 20})
	mp := e.mount("rich", blob)
	// Not in blob order: a read where the previous one ended would be a
	// scan, whose windows grow to fetch the rest of the layer.
	read := map[string][]byte{}
	for _, name := range []string{"big.bin", "etc/passwd", "dup/one"} {
		for _, en := range entries {
			if en.Hdr.Name == name {
				read[name] = en.Data
				mustRead(t, filepath.Join(mp, name), en.Data)
			}
		}
	}
	return mp, entries, read
}

func TestRestoreServesWithoutTheRegistry(t *testing.T) {
	for _, passthrough := range []bool{false, true} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			e := newEnv(t, Options{OpaqueXattr: fuse.OpaqueXattrTrusted, Passthrough: passthrough}, remote.Options{RequestTimeout: time.Second, Retries: 1})
			mp, entries, read := mountRichAndRead(t, e)

			e.close() // the daemon stops
			if mi, ok, _ := testlayer.MountAt(mp); ok {
				t.Fatalf("Close left a mount: %+v", mi)
			}
			e.reg.Close() // and the registry is gone
			e.open()
			// What the store holds now is what the three reads (and the
			// readahead they started) fetched.
			var unfetched []testlayer.Entry
			for _, en := range entries {
				if len(en.Data) > 0 && !e.st.Has(digestOf(en.Data)) {
					unfetched = append(unfetched, en)
				}
			}
			if len(unfetched) == 0 {
				t.Fatal("reading three files fetched every file of the layer: the test needs one left")
			}
			if err := e.fs.Restore(e.ctx, "rich", mp); err != nil {
				t.Fatalf("restore: %v", err)
			}
			if mi, ok, _ := testlayer.MountAt(mp); !ok || mi.FSType != "fuse.lazycas" {
				t.Fatalf("restored mount: %+v, %v", mi, ok)
			}

			got, problems, err := testlayer.WalkMeta(mp)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range problems {
				t.Errorf("readdir: %s", p)
			}
			for _, d := range testlayer.Compare(testlayer.Expect(entries, fuse.OpaqueXattrTrusted).WithoutContent(), got) {
				t.Error(d)
			}
			for name, data := range read {
				mustRead(t, filepath.Join(mp, name), data)
			}
			mustRead(t, filepath.Join(mp, "dup/two"), []byte("same content, two inodes\n")) // dup/one's content
			mustRead(t, filepath.Join(mp, "etc/passwd.hard"), read["etc/passwd"])
			mustRead(t, filepath.Join(mp, "empty"), nil)
			for _, en := range unfetched {
				if _, err := readFile(t, filepath.Join(mp, en.Hdr.Name)); !errors.Is(err, syscall.EIO) {
					t.Errorf("read %s, never fetched, without a registry: %v, want EIO", en.Hdr.Name, err)
				}
			}
			e.checkStore()
		})
	}
}

func TestRestoreOfUnknownLayerFails(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	mp := e.mountpoint("unknown")
	if err := e.fs.Restore(e.ctx, "unknown", mp); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("restore of an unknown layer: %v, want ErrNotFound", err)
	}
	if mi, ok, _ := testlayer.MountAt(mp); ok {
		t.Errorf("a failed Restore left a mount: %+v", mi)
	}
}

func TestUnmountForgetsTheLayer(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	data := []byte("content\n")
	blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("f", data, 0o644)}), layer.FormatEStargz, testlayer.BuildOptions{})
	mp := e.mount("gone", blob)
	mustRead(t, filepath.Join(mp, "f"), data)
	if err := e.fs.Unmount(e.ctx, "gone", mp); err != nil {
		t.Fatal(err)
	}
	if mi, ok, _ := testlayer.MountAt(mp); ok {
		t.Errorf("Unmount left a mount: %+v", mi)
	}
	if _, err := e.meta.Layer("gone"); !errors.Is(err, metadata.ErrNotFound) {
		t.Errorf("Unmount left metadata: %v", err)
	}
	if st, _ := e.st.Stats(); st.Layers != 0 || st.Objects != 1 {
		t.Errorf("store after Unmount: %+v, want the object kept and no layer references", st)
	}
	// Unmounting again, or a key never mounted, is not an error.
	if err := e.fs.Unmount(e.ctx, "gone", mp); err != nil {
		t.Errorf("second Unmount: %v", err)
	}
}

// vfsCapV2NetRaw is a valid security.capability value (struct
// vfs_cap_data, revision 2, effective): cap_net_raw. The kernel refuses to
// return malformed ones (EINVAL), as it would from any filesystem.
const vfsCapV2NetRaw = "\x01\x00\x00\x02" + "\x00\x20\x00\x00" + "\x00\x00\x00\x00" + "\x00\x00\x00\x00" + "\x00\x00\x00\x00"

// TestCloseWhileAnOverlayStacksTheLayer: the kernel lets go of the FUSE
// mountpoint, but the connection lives on as long as the overlay stacking
// the layer: Close must still return in bounded time (it aborts the
// connection), as a daemon stopping under running containers does.
func TestCloseWhileAnOverlayStacksTheLayer(t *testing.T) {
	e := newEnv(t, Options{}, remote.Options{})
	lower, _ := overlayLayers()
	mp := e.mount("lower", testlayer.Build(t, testlayer.Tar(t, lower), layer.FormatEStargz, testlayer.BuildOptions{}))
	target := mountOverlay(t, e.dir, "", mp)
	mustRead(t, filepath.Join(target, "etc/b"), []byte("b from lower\n"))
	testlayer.Within(t, 20*time.Second, "Close with a stacked overlay", func() error {
		e.close()
		return nil
	})
}

// daemonEnv carries the configuration of TestHelperDaemon.
const daemonEnv = "LAZYCAS_FS_TEST_DAEMON"

type daemonConfig struct {
	Dir, Key, Mountpoint, Read string
	Labels                     map[string]string
}

// TestHelperDaemon is not a test: TestRestoreAfterTheDaemonWasKilled runs
// the test binary as a daemon that mounts a layer, reads a file and waits
// to be killed.
func TestHelperDaemon(t *testing.T) {
	var c daemonConfig
	if err := json.Unmarshal([]byte(os.Getenv(daemonEnv)), &c); err != nil {
		t.Skip("helper process of TestRestoreAfterTheDaemonWasKilled")
	}
	e := &env{t: t, dir: c.Dir, ctx: context.Background()}
	e.open()
	if err := e.fs.Mount(e.ctx, c.Key, c.Mountpoint, c.Labels); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(filepath.Join(c.Mountpoint, c.Read)); err != nil {
		t.Fatal(err)
	}
	fmt.Println("READY")
	time.Sleep(time.Hour)
}

// startDaemon runs TestHelperDaemon and returns once it has mounted.
func startDaemon(t *testing.T, c daemonConfig) *exec.Cmd {
	t.Helper()
	cfg, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperDaemon$", "-test.v")
	cmd.Env = append(os.Environ(), daemonEnv+"="+string(cfg), testlayer.ChildEnv+"=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	ready := make(chan error, 1)
	go func() {
		var lines []string
		s := bufio.NewScanner(out)
		for s.Scan() {
			if s.Text() == "READY" {
				ready <- nil
				io.Copy(io.Discard, out)
				return
			}
			lines = append(lines, s.Text())
		}
		ready <- fmt.Errorf("daemon exited: %s", strings.Join(lines, "\n"))
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon not ready within 30s")
	}
	return cmd
}

func TestRestoreAfterTheDaemonWasKilled(t *testing.T) {
	entries := []testlayer.Entry{
		testlayer.File("read", []byte("read before the crash\n"), 0o644),
		testlayer.File("unread", []byte("never read before the crash\n"), 0o644),
	}
	for _, tc := range []struct {
		name  string
		after func(t *testing.T, e *env, mp string)
	}{
		{"Restore replaces the dead mount", func(t *testing.T, e *env, mp string) {
			if err := e.fs.Restore(e.ctx, "layer", mp); err != nil {
				t.Fatalf("restore: %v", err)
			}
			var ms []testlayer.MountInfo
			all, _ := testlayer.Mounts(mp)
			for _, m := range all {
				if m.Target == mp {
					ms = append(ms, m)
				}
			}
			if len(ms) != 1 {
				t.Errorf("mounts on %s after Restore: %+v, want one", mp, ms)
			}
			before := e.reg.Total()
			mustRead(t, filepath.Join(mp, "read"), entries[0].Data)
			if c := e.reg.Total(); c != before {
				t.Errorf("reading what the dead daemon had fetched sent requests")
			}
			mustRead(t, filepath.Join(mp, "unread"), entries[1].Data)
		}},
		{"Unmount removes the dead mount", func(t *testing.T, e *env, mp string) {
			if err := e.fs.Unmount(e.ctx, "layer", mp); err != nil {
				t.Fatalf("unmount: %v", err)
			}
			if mi, ok, _ := testlayer.MountAt(mp); ok {
				t.Errorf("Unmount left %+v", mi)
			}
			if _, err := e.meta.Layer("layer"); !errors.Is(err, metadata.ErrNotFound) {
				t.Errorf("Unmount left metadata: %v", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Options{}, remote.Options{})
			blob := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{})
			e.reg.Push(t, blob)
			mp := e.mountpoint("layer")
			e.close() // the daemon below owns the state now
			daemon := startDaemon(t, daemonConfig{Dir: e.dir, Key: "layer", Mountpoint: mp, Read: "read", Labels: e.reg.Labels(blob)})
			if err := daemon.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			daemon.Wait()
			var sfs unix.Statfs_t
			if err := unix.Statfs(mp, &sfs); !errors.Is(err, unix.ENOTCONN) {
				t.Fatalf("the killed daemon's mount answers %v, want ENOTCONN", err)
			}
			e.open()
			tc.after(t, e, mp)
		})
	}
}

// A reader that gets a signal while its file is being fetched makes the
// kernel send FUSE an interrupt. The read must still succeed: programs
// handle signals (SIGCHLD, Go's preemption SIGURG, timers) all the time,
// and they expect a read from a disk to be restarted, not to fail.
func TestSignalDuringAFetchDoesNotFailTheRead(t *testing.T) {
	perl, err := exec.LookPath("perl")
	if err != nil {
		t.Skip("needs perl as a reader that handles signals")
	}
	e := newEnv(t, Options{}, remote.Options{})
	data := testlayer.Random(11, 256<<10)
	blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{testlayer.File("f", data, 0o644)}), layer.FormatEStargz, testlayer.BuildOptions{})
	mp := e.mount("layer", blob)
	e.reg.DelayRanges(time.Second)

	// The reader handles SIGUSR1 and prints how many bytes it read.
	script := `$SIG{USR1} = sub {}; print "started\n"; $| = 1;` +
		`open(my $f, "<", $ARGV[0]) or die "open: $!\n"; binmode $f; local $/; my $d = <$f>;` +
		`defined $d or die "read: $!\n"; print length($d), "\n";`
	cmd := exec.Command(perl, "-e", script, filepath.Join(mp, "f"))
	var out, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	testlayer.Eventually(e.ctx, 5*time.Second, func() bool { return strings.Contains(out.String(), "started") })
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil || strings.TrimSpace(strings.TrimPrefix(out.String(), "started\n")) != fmt.Sprint(len(data)) {
				t.Fatalf("reader interrupted by signals: %v: %s%s", err, out.String(), stderr.String())
			}
			return
		case <-tick.C:
			_ = cmd.Process.Signal(syscall.SIGUSR1)
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatal("reader did not finish within 20s")
		}
	}
}

// syncBuffer is a bytes.Buffer a child process writes while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
