package store

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// reopen opens the store in dir, closing it when the test ends.
func reopen(t *testing.T, dir string, opts ...Opt) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func seal(t *testing.T, s *Store, content []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(content)
	if _, err := s.Ensure(context.Background(), d, int64(len(content)), func(_ context.Context, w io.Writer) error {
		_, err := w.Write(content)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return d
}

// flipByte corrupts the file at p in place, keeping its size, as bit rot
// or a stray write would.
func flipByte(t *testing.T, p string, off int64) {
	t.Helper()
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o444); err != nil {
		t.Fatal(err)
	}
}

func readObject(t *testing.T, s *Store, d digest.Digest) []byte {
	t.Helper()
	h, err := s.Open(d)
	if err != nil {
		t.Fatalf("open %s: %v", d, err)
	}
	defer h.Close()
	b, err := io.ReadAll(h)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCorruptObjectFromEarlierProcessIsRemovedAndFetchedAgain(t *testing.T) {
	dir := t.TempDir()
	content := []byte("an object that rots on disk while the daemon is down")
	s := reopen(t, dir, WithVerity(false))
	d := seal(t, s, content)
	other := seal(t, s, []byte("a neighbour that stays intact"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	flipByte(t, s.path(d), 7)

	s2 := reopen(t, dir, WithVerity(false))
	if !s2.Has(d) || s2.rehashed.Load() != 0 {
		t.Fatalf("after reopen: has %v, rehashed %d; want present and nothing hashed yet", s2.Has(d), s2.rehashed.Load())
	}
	_, err := s2.Open(d)
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("first open of the corrupt object = %v; want ErrNotFound and ErrDigestMismatch", err)
	}
	if s2.Has(d) {
		t.Fatal("corrupt object still in the store")
	}
	st, err := s2.Stats()
	otherSize := int64(len("a neighbour that stays intact"))
	if err != nil || st.Objects != 1 || st.Bytes != otherSize || s2.Bytes() != otherSize {
		t.Errorf("after removal: stats %+v, total %d, %v; want only the neighbour", st, s2.Bytes(), err)
	}
	// The caller's fetch: a fresh seal of the right content.
	fetched, err := s2.Ensure(context.Background(), d, int64(len(content)), writeString(string(content)))
	if err != nil || !fetched {
		t.Fatalf("Ensure after removal = %v, %v; want fetched", fetched, err)
	}
	if got := readObject(t, s2, d); !bytes.Equal(got, content) {
		t.Fatalf("refetched object holds %q", got)
	}
	if got := readObject(t, s2, other); string(got) != "a neighbour that stays intact" {
		t.Fatalf("neighbour holds %q", got)
	}
	if n := s2.rehashed.Load(); n != 2 {
		t.Errorf("rehashed %d objects; want 2 (the corrupt one and the neighbour, not the refetched one)", n)
	}
	if st, _ := s2.Stats(); st.Objects != 2 || s2.Bytes() != st.Bytes {
		t.Errorf("after refetch: stats %+v, total %d", st, s2.Bytes())
	}
}

func TestObjectsAreHashedOnceAfterRestartAndNeverWhenSealedNow(t *testing.T) {
	dir := t.TempDir()
	s := reopen(t, dir, WithVerity(false))
	old := seal(t, s, []byte("sealed before the restart"))
	s.Close()

	s2 := reopen(t, dir, WithVerity(false))
	fresh := seal(t, s2, []byte("sealed after the restart"))
	for i := 0; i < 3; i++ {
		if got := readObject(t, s2, old); string(got) != "sealed before the restart" {
			t.Fatalf("open %d: %q", i, got)
		}
		readObject(t, s2, fresh)
	}
	if n := s2.rehashed.Load(); n != 1 {
		t.Errorf("rehashed %d objects; want 1: the earlier one, on its first open only", n)
	}
}

// Eight readers opening a large object at once after a restart wait for
// one hash of it, whatever its verdict.
func TestConcurrentFirstOpensHashALargeObjectOnce(t *testing.T) {
	content := make([]byte, 64<<20)
	for i := range content {
		content[i] = byte(i*7 + i>>12)
	}
	for _, corrupt := range []bool{false, true} {
		name := "intact"
		if corrupt {
			name = "corrupt"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s := reopen(t, dir, WithVerity(false))
			d := seal(t, s, content)
			s.Close()
			if corrupt {
				flipByte(t, s.path(d), int64(len(content))-1)
			}
			s2 := reopen(t, dir, WithVerity(false))
			start := make(chan struct{})
			errs := make([]error, 8)
			var wg sync.WaitGroup
			for i := range errs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					h, err := s2.Open(d)
					if err == nil {
						b := make([]byte, 4096)
						_, err = h.ReadAt(b, 0)
						if err == nil && !bytes.Equal(b, content[:4096]) {
							err = errors.New("wrong bytes")
						}
						h.Close()
					}
					errs[i] = err
				}()
			}
			close(start)
			wg.Wait()
			for i, err := range errs {
				if corrupt && !errors.Is(err, ErrNotFound) {
					t.Errorf("reader %d: %v; want ErrNotFound", i, err)
				}
				if !corrupt && err != nil {
					t.Errorf("reader %d: %v", i, err)
				}
			}
			if n := s2.rehashed.Load(); n != 1 {
				t.Errorf("hashed %d times; want once", n)
			}
			if s2.Has(d) == corrupt || (corrupt && s2.Bytes() != 0) {
				t.Errorf("has %v, total %d after the check", s2.Has(d), s2.Bytes())
			}
		})
	}
}

// fakeVerity stands in for the kernel's fs-verity, by path.
type fakeVerity struct {
	unsupported bool

	mu      sync.Mutex
	on      map[string]bool
	enabled int
}

func (v *fakeVerity) enable(f *os.File) error {
	if v.unsupported {
		return unix.EOPNOTSUPP
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.on[f.Name()] {
		return unix.EEXIST
	}
	if v.on == nil {
		v.on = map[string]bool{}
	}
	v.on[f.Name()] = true
	v.enabled++
	return nil
}

func (v *fakeVerity) measure(f *os.File) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.on[f.Name()] {
		return unix.ENODATA
	}
	return nil
}

func (v *fakeVerity) has(p string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.on[p]
}

func withOps(ops verityOps) Opt {
	return func(o *options) error {
		o.ops = ops
		return nil
	}
}

func TestObjectsWithVerityAreNotHashedAgain(t *testing.T) {
	dir := t.TempDir()
	v := &fakeVerity{}
	s := reopen(t, dir, WithVerity(false))
	before := seal(t, s, []byte("sealed while verity was off"))
	s.Close()

	s2 := reopen(t, dir, withOps(v))
	if !s2.verity {
		t.Fatal("probe with a working fs-verity says unsupported")
	}
	sealed := seal(t, s2, []byte("sealed with verity"))
	readObject(t, s2, before) // hashed, then given verity at the next commit
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if !v.has(s2.path(sealed)) || !v.has(s2.path(before)) {
		t.Fatalf("verity on the object sealed %v, on the checked one %v; want both", v.has(s2.path(sealed)), v.has(s2.path(before)))
	}
	if n := s2.rehashed.Load(); n != 1 {
		t.Errorf("rehashed %d; want 1 (the object without verity)", n)
	}

	s3 := reopen(t, dir, withOps(v))
	readObject(t, s3, sealed)
	readObject(t, s3, before)
	if n := s3.rehashed.Load(); n != 0 {
		t.Errorf("rehashed %d objects that have verity; want 0", n)
	}
	if tmps, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmps) != 0 {
		t.Errorf("probe left %d files in tmp/", len(tmps))
	}
}

func TestWithoutVerityObjectsAreHashedAfterRestart(t *testing.T) {
	for name, tc := range map[string]struct {
		opts []Opt
		v    *fakeVerity
	}{
		"filesystem without verity": {v: &fakeVerity{unsupported: true}},
		"verity off in config":      {opts: []Opt{WithVerity(false)}, v: &fakeVerity{}},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s := reopen(t, dir, append(tc.opts, withOps(tc.v))...)
			if s.verity {
				t.Fatal("verity mode on")
			}
			d := seal(t, s, []byte("no verity for me"))
			s.Close()
			if tc.v.enabled != 0 {
				t.Errorf("verity enabled on %d files", tc.v.enabled)
			}
			s2 := reopen(t, dir, append(tc.opts, withOps(tc.v))...)
			readObject(t, s2, d)
			if n := s2.rehashed.Load(); n != 1 {
				t.Errorf("rehashed %d; want 1", n)
			}
		})
	}
}

// The kernel's fs-verity, probed on the test's own filesystem: either mode
// is right, as long as the probe leaves nothing behind.
func TestProbeVerityOnThisFilesystem(t *testing.T) {
	dir := t.TempDir()
	s := reopen(t, dir)
	mode := modeRehash
	if s.verity {
		mode = modeVerity
	}
	t.Logf("integrity on %s: %s", dir, mode)
	if tmps, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmps) != 0 {
		t.Errorf("probe left %d files in tmp/", len(tmps))
	}
	readObject(t, s, seal(t, s, []byte("works in either mode")))
}

// TestVerityOnExt4 runs the store on an ext4 image made with the verity
// feature, so the kernel's ioctls are exercised where the kernel has them.
func TestVerityOnExt4(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices and mounts")
	}
	for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	run := func(name string, args ...string) (string, error) {
		out, err := exec.Command(name, args...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	tmp := t.TempDir()
	img, mnt := filepath.Join(tmp, "ext4.img"), filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := run("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "verity", img, "32M"); err != nil {
		t.Skipf("mkfs.ext4 -O verity: %v: %s", err, out)
	}
	dev, err := run("losetup", "--find", "--show", img)
	if err != nil {
		t.Skipf("no loop device: %v: %s", err, dev)
	}
	t.Cleanup(func() {
		if out, err := run("losetup", "-d", dev); err != nil {
			t.Errorf("detach %s: %v: %s", dev, err, out)
		}
	})
	if out, err := run("mount", "-t", "ext4", dev, mnt); err != nil {
		// ext4 refuses a verity filesystem read-write on a kernel
		// without CONFIG_FS_VERITY.
		t.Skipf("mount ext4 with the verity feature (kernel without CONFIG_FS_VERITY?): %v: %s", err, out)
	}
	// Registered after the detach, so it runs before it.
	t.Cleanup(func() {
		if out, err := run("umount", mnt); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	// Stores are closed by their cleanups before the unmount.
	dir := filepath.Join(mnt, "store")
	s := reopen(t, dir)
	if !s.verity {
		t.Skip("the kernel has no fs-verity on ext4")
	}
	d := seal(t, s, bytes.Repeat([]byte("verity "), 100000))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(s.path(d))
	if err != nil {
		t.Fatal(err)
	}
	err = kernelVerity{}.measure(f)
	f.Close()
	if err != nil {
		t.Fatalf("sealed object has no fs-verity: %v", err)
	}
	s2 := reopen(t, dir)
	if got := readObject(t, s2, d); len(got) != 700000 {
		t.Fatalf("object holds %d bytes", len(got))
	}
	if n := s2.rehashed.Load(); n != 0 {
		t.Errorf("rehashed %d objects with fs-verity; want 0", n)
	}
}
