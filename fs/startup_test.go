package fs

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/metadata"
	"github.com/lazycas/lazycas/snapshot"
)

// images serves one image's manifest and config to startup.
type images struct {
	manifest digest.Digest
	layers   []ocispec.Descriptor
	img      ocispec.Image
}

func (i *images) Image(_ context.Context, m digest.Digest) ([]ocispec.Descriptor, ocispec.Image, error) {
	if m != i.manifest {
		return nil, ocispec.Image{}, os.ErrNotExist
	}
	return i.layers, i.img, nil
}

// startupImage is a merged-/usr Debian-like image in two layers: a base
// with the C library, locale and unrelated files, and an app layer with
// a real dynamic ELF program (the host's /bin/true) started through a #!
// script. The base has a whiteout'd and a hidden file to test resolution.
func startupImage(t *testing.T) (base, app []testlayer.Entry) {
	prog, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Skipf("no /bin/true to use as a dynamic ELF program: %v", err)
	}
	data := func(s string, n int) []byte { return []byte(strings.Repeat(s, n)) }
	base = []testlayer.Entry{
		testlayer.Symlink("lib", "usr/lib"),
		testlayer.Symlink("lib64", "usr/lib64"),
		testlayer.Dir("etc", 0o755),
		testlayer.File("etc/ld.so.cache", data("cache", 100), 0o644),
		testlayer.File("etc/passwd", data("root:x:0:0\n", 3), 0o644),
		testlayer.File("etc/unrelated", data("etc", 100), 0o644),
		testlayer.Dir("usr", 0o755),
		testlayer.Dir("usr/lib", 0o755),
		testlayer.Dir("usr/lib/x86_64-linux-gnu", 0o755),
		testlayer.File("usr/lib/x86_64-linux-gnu/libc.so.6", data("libc", 5000), 0o755),
		testlayer.File("usr/lib/x86_64-linux-gnu/libgone.so", data("gone", 100), 0o755),
		testlayer.Dir("usr/lib64", 0o755),
		testlayer.Symlink("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
		testlayer.File("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", data("ld", 3000), 0o755),
		testlayer.Dir("usr/lib/locale", 0o755),
		testlayer.Dir("usr/lib/locale/C.utf8", 0o755),
		testlayer.File("usr/lib/locale/C.utf8/LC_CTYPE", data("ctype", 1000), 0o644),
		testlayer.Dir("usr/lib/locale/C.utf8/LC_MESSAGES", 0o755),
		testlayer.File("usr/lib/locale/C.utf8/LC_MESSAGES/SYS_LC_MESSAGES", data("msg", 10), 0o644),
		testlayer.Dir("usr/share", 0o755),
		testlayer.File("usr/share/big", data("never read at start ", 200000), 0o644),
		testlayer.Dir("opt", 0o755),
		testlayer.File("opt/hidden", data("hidden", 10), 0o644),
	}
	app = []testlayer.Entry{
		testlayer.Dir("usr", 0o755),
		testlayer.Dir("usr/bin", 0o755),
		testlayer.File("usr/bin/prog", prog, 0o755),
		testlayer.File("usr/bin/start", []byte("#!/usr/bin/prog --flag\nexit 0\n"), 0o755),
		testlayer.Dir("usr/lib", 0o755),
		testlayer.Dir("usr/lib/x86_64-linux-gnu", 0o755),
		testlayer.Whiteout("usr/lib/x86_64-linux-gnu/libgone.so"),
		testlayer.Opaque("opt"),
	}
	return base, app
}

func mountImage(t *testing.T, e *env, im *images, blobs ...*testlayer.Blob) []string {
	var mps []string
	for i, b := range blobs {
		e.reg.Push(t, b)
		im.layers = append(im.layers, ocispec.Descriptor{Digest: b.Digest, Size: int64(len(b.Data))})
		_ = i
	}
	for i, b := range blobs {
		labels := e.reg.Labels(b)
		labels[snapshot.LabelManifestDigest] = im.manifest.String()
		key := []string{"base", "app"}[i]
		mp := e.mountpoint(key)
		if err := e.fs.Mount(e.ctx, key, mp, labels); err != nil {
			t.Fatalf("mount %s: %v", key, err)
		}
		mps = append(mps, mp)
	}
	return mps
}

// TestStartupFetchesWhatTheEntrypointLoads mounts an image whose config
// starts a #! script: once the top layer is mounted, the script, its
// interpreter, the interpreter's ELF loader and libraries, and glibc's
// start-up files are in the store before anything reads them, and no
// other file is.
func TestStartupFetchesWhatTheEntrypointLoads(t *testing.T) {
	base, app := startupImage(t)
	im := &images{manifest: digest.FromString("manifest"), img: ocispec.Image{
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config: ocispec.ImageConfig{
			Entrypoint: []string{"start"},
			Cmd:        []string{"arg"},
			Env:        []string{"PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8"},
		},
	}}
	// The program and the C library are large files: fetched piece by
	// piece, in parallel.
	e := newEnv(t, Options{StartupFetch: true, Images: im, PartialMinSize: 8 << 10}, remote.Options{})
	bb := testlayer.Build(t, testlayer.Tar(t, base), layer.FormatEStargz, testlayer.BuildOptions{ChunkSize: 4 << 10})
	ab := testlayer.Build(t, testlayer.Tar(t, app), layer.FormatEStargz, testlayer.BuildOptions{ChunkSize: 4 << 10})
	mountImage(t, e, im, bb, ab)

	want := map[string][]byte{}
	for _, en := range append(base, app...) {
		if en.Hdr.Typeflag == '0' {
			want[en.Hdr.Name] = en.Data
		}
	}
	fetched := []string{
		"usr/bin/start", "usr/bin/prog", "usr/lib/x86_64-linux-gnu/libc.so.6",
		"usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "etc/ld.so.cache", "etc/passwd",
		"usr/lib/locale/C.utf8/LC_CTYPE", "usr/lib/locale/C.utf8/LC_MESSAGES/SYS_LC_MESSAGES",
	}
	has := func(name string) bool { return e.st.Has(digest.FromBytes(want[name])) }
	if !testlayer.Eventually(e.ctx, 20*time.Second, func() bool {
		for _, name := range fetched {
			if !has(name) {
				return false
			}
		}
		return true
	}) {
		for _, name := range fetched {
			if !has(name) {
				t.Errorf("%s was not fetched at start", name)
			}
		}
	}
	for _, name := range []string{"usr/share/big", "etc/unrelated", "usr/lib/x86_64-linux-gnu/libgone.so", "opt/hidden"} {
		if has(name) {
			t.Errorf("%s was fetched at start", name)
		}
	}
}

// TestStackResolvesLikeOverlayfs checks path resolution through the
// merged layers: symlinks (relative, absolute, in directories), whiteouts,
// opaque directories, and a top layer's file hiding a lower directory.
func TestStackResolvesLikeOverlayfs(t *testing.T) {
	base, app := startupImage(t)
	app = append(app, testlayer.File("etc/ld.so.cache", []byte("newer"), 0o644))
	im := &images{manifest: digest.FromString("manifest")}
	e := newEnv(t, Options{}, remote.Options{})
	bb := testlayer.Build(t, testlayer.Tar(t, base), layer.FormatEStargz, testlayer.BuildOptions{})
	ab := testlayer.Build(t, testlayer.Tar(t, append([]testlayer.Entry{testlayer.Dir("etc", 0o755)}, app...)), layer.FormatEStargz, testlayer.BuildOptions{})
	mountImage(t, e, im, bb, ab)
	s := e.fs.stack(im.layers)
	if len(s) != 2 || s[0].key != "app" {
		t.Fatalf("stack of %d layers, top %q", len(s), s[0].key)
	}
	for p, want := range map[string]string{
		"/lib64/ld-linux-x86-64.so.2":          "base",
		"/lib/x86_64-linux-gnu/libc.so.6":      "base",
		"/usr/lib64/../lib/x86_64-linux-gnu":   "app", // a directory in both: the top one
		"/usr/bin/prog":                        "app",
		"/etc/ld.so.cache":                     "app",
		"/usr/lib/x86_64-linux-gnu/libgone.so": "",
		"/opt/hidden":                          "",
		"/nope":                                "",
		"/usr/bin/prog/x":                      "",
		"/":                                    "",
	} {
		m, n := s.resolve(p)
		got := ""
		if n != nil {
			got = m.key
		}
		if got != want {
			t.Errorf("resolve %s: layer %q, want %q", p, got, want)
		}
		if n != nil && n.Type == metadata.TypeSymlink {
			t.Errorf("resolve %s: a symlink", p)
		}
	}
}

func TestLocaleDirs(t *testing.T) {
	for in, want := range map[string]string{
		"C.UTF-8":          "/usr/lib/locale/C.UTF-8 /usr/lib/locale/C.utf8",
		"en_US.ISO-8859-1": "/usr/lib/locale/en_US.ISO-8859-1 /usr/lib/locale/en_US.iso88591",
		"de_DE.UTF-8@euro": "/usr/lib/locale/de_DE.UTF-8@euro /usr/lib/locale/de_DE.utf8@euro",
		"en_US":            "/usr/lib/locale/en_US",
	} {
		if got := strings.Join(localeDirs(in), " "); got != want {
			t.Errorf("%s: %s, want %s", in, got, want)
		}
	}
}

// TestStartupSurvivesBrokenPrograms starts images whose entrypoint is a
// truncated ELF file or ELF-looking garbage: the start-up set stops at the
// program, which is still fetched, and nothing panics.
func TestStartupSurvivesBrokenPrograms(t *testing.T) {
	prog, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Skipf("no /bin/true: %v", err)
	}
	for name, data := range map[string][]byte{
		"truncated": prog[:min(len(prog), 3000)],
		"garbage":   append([]byte("\x7fELF\x02\x01\x01\x00"), []byte(strings.Repeat("\xff\x00\x10", 700))...),
		"loop":      []byte("#!/usr/bin/loop\n"),
	} {
		t.Run(name, func(t *testing.T) {
			im := &images{manifest: digest.FromString(name), img: ocispec.Image{
				Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
				Config:   ocispec.ImageConfig{Cmd: []string{"/usr/bin/loop"}},
			}}
			e := newEnv(t, Options{StartupFetch: true, Images: im}, remote.Options{})
			base := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
				testlayer.File("etc/ld.so.cache", []byte("cache"), 0o644),
			}), layer.FormatEStargz, testlayer.BuildOptions{})
			app := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
				testlayer.Dir("usr", 0o755), testlayer.Dir("usr/bin", 0o755),
				testlayer.File("usr/bin/loop", data, 0o755),
			}), layer.FormatEStargz, testlayer.BuildOptions{})
			mountImage(t, e, im, base, app)
			if !testlayer.Eventually(e.ctx, 20*time.Second, func() bool {
				return e.st.Has(digest.FromBytes(data)) && e.st.Has(digest.FromBytes([]byte("cache")))
			}) {
				t.Error("the program and ld.so.cache were not fetched")
			}
		})
	}
}

// TestMountFetchesWhatRuncReads: a layer holding /etc/passwd and
// /etc/group fetches them as soon as it is mounted, before any image is
// known and before anything reads them: runc reads them while it creates
// the container.
func TestMountFetchesWhatRuncReads(t *testing.T) {
	e := newEnv(t, Options{StartupFetch: true}, remote.Options{})
	passwd := []byte("root:x:0:0:root:/root:/bin/sh\n")
	group := []byte("root:x:0:\n")
	blob := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
		testlayer.Dir("etc", 0o755),
		testlayer.File("etc/group", group, 0o644),
		testlayer.File("etc/hostname", []byte("x\n"), 0o644),
		testlayer.File("etc/passwd", passwd, 0o644),
		testlayer.File("big", testlayer.Random(3, 1<<20), 0o644),
	}), layer.FormatEStargz, testlayer.BuildOptions{})
	e.mount("etc", blob)
	for _, c := range [][]byte{passwd, group} {
		d := digest.FromBytes(c)
		if !testlayer.Eventually(e.ctx, 10*time.Second, func() bool { return e.fs.store.Has(d) }) {
			t.Errorf("%q not fetched after the mount", c)
		}
	}
	if e.fs.store.Has(digest.FromBytes(testlayer.Random(3, 1<<20))) {
		t.Error("the mount fetched more than passwd and group")
	}
}
