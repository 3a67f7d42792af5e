package integration

import (
	"strings"
	"testing"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
)

// treeDump prints one line per path of the root filesystem: type, mode,
// owner, mtime, size, link target, hard-link group, xattrs and the sha256
// of the content. Two rootfs that print the same are the same to a
// program. The eStargz format's own files (TOC, landmark), which an
// unpacker leaves in the rootfs as plain files, are left out.
const treeDump = `import hashlib, os, stat, sys
skip = {"/proc", "/sys", "/dev", "/run", "/tmp",
        # Format files an unpacker leaves in the rootfs; a lazy mount hides them.
        "/stargz.index.json", "/.prefetch.landmark", "/.no.prefetch.landmark"}
links = {}
out = []
for root, dirs, files in os.walk("/", topdown=True):
    dirs[:] = sorted(d for d in dirs if os.path.join(root, d) not in skip)
    for name in sorted(dirs) + sorted(files):
        p = os.path.join(root, name)
        if p in skip:
            continue
        st = os.lstat(p)
        line = [p, stat.filemode(st.st_mode), str(st.st_uid), str(st.st_gid), str(st.st_mtime_ns)]
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(1 << 20), b""):
                    h.update(b)
            line += [str(st.st_size), h.hexdigest()]
            if st.st_nlink > 1:
                line.append("link:" + links.setdefault(st.st_ino, p))
        elif stat.S_ISLNK(st.st_mode):
            line.append("-> " + os.readlink(p))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            line.append("dev %d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
        try:
            for x in sorted(os.listxattr(p, follow_symlinks=False)):
                line.append("%s=%r" % (x, os.getxattr(p, x, follow_symlinks=False)))
        except OSError:
            pass
        out.append(" ".join(line))
h = hashlib.sha256("\n".join(out).encode()).hexdigest()
print(len(out), h)
sys.stderr.write("\n".join(out))
`

// writeCheck changes files of the lazy lowers from a container: a new
// file, a file rewritten in place (copied up from a FUSE lower), a file
// and a directory deleted, a file added to a lower directory. (Renaming a
// lower directory fails with EXDEV, as on containerd's overlayfs
// snapshotter without redirect_dir; programs fall back to copying.)
const writeCheck = `import os, shutil
open("/new.txt", "w").write("new")
with open("/etc/os-release", "a") as f: f.write("EXTRA=1\n")
os.remove("/usr/bin/python3")
shutil.rmtree("/usr/lib/python3.11/email")
open("/usr/lib/python3.11/json/added.py", "w").write("x = 1\n")
print(open("/new.txt").read(), "EXTRA=1" in open("/etc/os-release").read(),
      os.path.exists("/usr/bin/python3"), os.path.exists("/usr/lib/python3.11/email"),
      "added.py" in os.listdir("/usr/lib/python3.11/json"), "decoder.py" in os.listdir("/usr/lib/python3.11/json"))
`

// TestLazyRootfsEqualsUnpacked is the correctness check that matters most:
// every path of the lazily mounted image, in content and metadata, is what
// containerd's own overlayfs snapshotter unpacks from the same image; and
// a container can change files of lazy lowers.
func TestLazyRootfsEqualsUnpacked(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	ref := convertPython(ctx, t, env, convert.EStargz, nil)

	dump := func(sn string) (string, string) {
		img, err := env.PullOn(ctx, sn, ref, testenv.WithSnapshotLabels(ref))
		if err != nil {
			t.Fatal(err)
		}
		res, err := env.RunOn(ctx, sn, img, testenv.UniqueID("tree"), "python3", "-c", treeDump)
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode != 0 {
			t.Fatalf("tree dump on %s exited %d: %.2000s", sn, res.ExitCode, res.Stderr)
		}
		return strings.TrimSpace(res.Stdout), res.Stderr
	}
	wantSum, want := dump("overlayfs")
	gotSum, got := dump(testenv.Snapshotter)
	t.Logf("overlayfs: %s; lazycas: %s", wantSum, gotSum)
	if gotSum != wantSum {
		wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
		shown := 0
		for i := 0; i < len(wl) || i < len(gl); i++ {
			var w, g string
			if i < len(wl) {
				w = wl[i]
			}
			if i < len(gl) {
				g = gl[i]
			}
			if w != g {
				t.Errorf("line %d:\n  overlayfs: %s\n  lazycas:   %s", i, w, g)
				if shown++; shown == 10 {
					break
				}
			}
		}
		t.Fatalf("the lazy rootfs differs from the unpacked one")
	}

	img, err := env.PullOn(ctx, testenv.Snapshotter, ref, testenv.WithSnapshotLabels(ref))
	if err != nil {
		t.Fatal(err)
	}
	checkRemote(ctx, t, env, img)
	res, err := env.Run(ctx, img, testenv.UniqueID("write"), "python3.11", "-c", writeCheck)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 || strings.TrimSpace(res.Stdout) != "new True False False True True" {
		t.Fatalf("writes over lazy lowers: exit %d, stdout %q, stderr %s", res.ExitCode, res.Stdout, res.Stderr)
	}
	// The changes stayed in that container: the image is unchanged.
	if again, _ := dump(testenv.Snapshotter); again != wantSum {
		t.Errorf("after a container's writes the image dumps as %s, want %s", again, wantSum)
	}
}
