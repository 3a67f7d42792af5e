package fs

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/fuse"
	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/remote"
)

// TestCorruptObjectAfterRestartIsFetchedAgain damages sealed objects (a
// small file, a large one served piece by piece, one shared by two names)
// while the daemon is down: after a restore, reads through the mount get
// the right bytes, fetched again, never the damaged ones.
func TestCorruptObjectAfterRestartIsFetchedAgain(t *testing.T) {
	for _, passthrough := range []bool{false, true} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			e := newEnv(t, Options{OpaqueXattr: fuse.OpaqueXattrTrusted, Passthrough: passthrough, PartialMinSize: 1 << 20},
				remote.Options{RequestTimeout: time.Second, Retries: 1})
			mp, _, read := mountRichAndRead(t, e)
			object := func(data []byte) string {
				d := digestOf(data)
				return filepath.Join(e.dir, "store", "objects", "sha256", d.Encoded()[:2], d.Encoded())
			}
			if !testlayer.Eventually(e.ctx, 10*time.Second, func() bool { return e.st.Has(digestOf(read["big.bin"])) }) {
				t.Fatal("big.bin was not sealed")
			}
			e.close()
			for name, data := range read {
				p := object(data)
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatalf("%s not sealed: %v", name, err)
				}
				b[len(b)/2] ^= 0xff
				if err := os.Chmod(p, 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, b, 0o444); err != nil {
					t.Fatal(err)
				}
			}
			e.open()
			if err := e.fs.Restore(e.ctx, "rich", mp); err != nil {
				t.Fatalf("restore: %v", err)
			}
			for name, data := range read {
				mustRead(t, filepath.Join(mp, name), data)
			}
			mustRead(t, filepath.Join(mp, "dup/two"), read["dup/one"])
			for name, data := range read {
				if !testlayer.Eventually(e.ctx, 10*time.Second, func() bool {
					b, err := os.ReadFile(object(data))
					return err == nil && digestOf(b) == digestOf(data)
				}) {
					t.Errorf("%s: the object was not fetched again intact", name)
				}
			}
		})
	}
}
