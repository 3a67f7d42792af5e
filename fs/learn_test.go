package fs

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/fs/remote"
)

// What a container opened on one layer is fetched, with no read, right
// after another image's layer holding the same files in another blob
// (another format even) is mounted on a node whose store was emptied; what
// it did not open is not.
func TestLearnedFilesAreFetchedAtTheNextMount(t *testing.T) {
	db, err := profile.Open(filepath.Join(t.TempDir(), "profiles.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	e := newEnv(t, Options{Profiles: NewProfiles(db, time.Minute)}, remote.Options{})
	read1, read2, unread := testlayer.Random(21, 200<<10), testlayer.Random(22, 300<<10), testlayer.Random(23, 200<<10)
	b1 := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
		testlayer.File("app/main.py", read1, 0o644),
		testlayer.File("app/unread.py", unread, 0o644),
		testlayer.File("lib/mod.so", read2, 0o755),
	}), layer.FormatEStargz, testlayer.BuildOptions{})
	m1 := e.mount("one", b1)
	mustRead(t, filepath.Join(m1, "lib/mod.so"), read2)
	mustRead(t, filepath.Join(m1, "app/main.py"), read1)
	if err := e.fs.Unmount(e.ctx, "one", m1); err != nil {
		t.Fatal(err)
	}
	if p, ok, err := db.Profile(b1.Digest); err != nil || !ok || len(p.Files) != 2 || p.Files[0].Digest != digestOf(read2) {
		t.Fatalf("profile after unmount: %+v, %v, %v", p, ok, err)
	}
	if _, err := e.st.GC(e.ctx, 0); err != nil {
		t.Fatal(err)
	}
	if e.st.Has(digestOf(read1)) {
		t.Fatal("the store kept a file after a collection to 0 bytes")
	}

	b2 := testlayer.Build(t, testlayer.Tar(t, []testlayer.Entry{
		testlayer.File("srv/unread.py", unread, 0o644),
		testlayer.File("srv/main.py", read1, 0o644),
		testlayer.File("usr/lib/mod.so", read2, 0o755),
	}), layer.FormatZstdChunked, testlayer.BuildOptions{})
	e.mount("two", b2)
	fetched := testlayer.Eventually(e.ctx, 30*time.Second, func() bool {
		return e.st.Has(digestOf(read1)) && e.st.Has(digestOf(read2))
	})
	if !fetched {
		t.Fatal("the learned files were not fetched after the mount")
	}
	time.Sleep(200 * time.Millisecond)
	if e.st.Has(digest.Digest(digestOf(unread))) {
		t.Error("a file no container opened was fetched")
	}
}
