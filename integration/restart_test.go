package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// survivalConfig turns background fetch off: a file stays unfetched until
// a reader reads it, so that every round of the readers fetches files and
// a restart or a kill can land in the middle of a fetch.
const survivalConfig = "[fs]\nbackground_fetch = false\n"

// The schedule of TestContainersSurviveDaemonRestarts.
const (
	survivalRestarts = 10
	survivalKills    = 10
	// Each round a reader reads this many files it never read (a fetch
	// each), and this many it read before, evicted from the page cache.
	readerNewPerRound = 3
	readerOldPerRound = 3
	readerPause       = "0.1" // seconds between rounds
	// Bounds of a reader's own loop, should the test never tell it to
	// stop; the test's context ends well before.
	readerMaxSeconds = 900
	readerMaxRounds  = 100000
	// resumeTimeout bounds how long after the daemon is back every reader
	// must have completed a round begun after that.
	resumeTimeout = time.Minute
	// upgradedVersion is the version the upgraded daemon is built with.
	upgradedVersion = "upgraded"
)

// survivalWalks are the directories the readers list, one a round, and
// compare with the image: every regular file and its size.
var survivalWalks = []string{"/etc", "/usr/bin", "/usr/lib/python3.11/email", "/usr/lib/x86_64-linux-gnu",
	"/usr/share/doc", "/var/lib/dpkg/info", "/usr/lib/python3.11"}

// survivalMmap is the shared library the python reader keeps mapped: over
// 4 MiB, so that its first fetch is served piece by piece.
const survivalMmap = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"

// pythonReader is the reader of the python container. Arguments: the check
// directory, new and old files a round, the pause between rounds, the
// limits in seconds and rounds, the file to keep mapped. The directory
// holds "manifest" ("sha256 size path" lines: the files to read, in the
// order to read them first), "walks" ("sha256 count dir" lines: the digest
// of the sorted "size path" lines of the regular files under dir) and,
// when the test wants it to end, "stop". Every operation is timed; a round
// prints one line with the slowest. Times are µs since the epoch.
const pythonReader = `import errno, hashlib, mmap, os, random, stat, sys, time

d = sys.argv[1]
new_per, old_per, pause = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
max_secs, max_rounds, mpath = float(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
files, want_of = [], {}
for line in open(os.path.join(d, "manifest"), encoding="utf-8"):
    want, size, p = line.rstrip("\n").split(" ", 2)
    files.append(p)
    want_of[p] = (int(size), want)
walks = []
for line in open(os.path.join(d, "walks"), encoding="utf-8"):
    want, count, w = line.rstrip("\n").split(" ", 2)
    walks.append((w, int(count), want))
stop = os.path.join(d, "stop")

def now():
    return int(time.time() * 1e6)

class Wrong(Exception):
    pass

problems = 0
def problem(kind, op, p, detail):
    global problems
    print(kind, now(), op, p, "::", detail, flush=True)
    problems += 1
    if problems >= 100:
        print("giveup", now(), "too many problems", flush=True)
        sys.exit(3)

slowest = [0, "-", "-"]
def timed(op, p, fn):
    t = time.monotonic()
    try:
        fn()
    except Wrong as e:
        problem("WRONG", op, p, e)
    except OSError as e:
        problem("ERROR", op, p, "%s %s" % (errno.errorcode.get(e.errno, e.errno), e.strerror))
    dt = int((time.monotonic() - t) * 1e6)
    if dt > slowest[0]:
        slowest[:] = [dt, op, p]

def read_check(p, evict):
    size, want = want_of[p]
    h, n = hashlib.sha256(), 0
    with open(p, "rb", buffering=0) as f:
        if evict:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    if n != size or h.hexdigest() != want:
        raise Wrong("read %d bytes of sha256 %s, want %d of %s" % (n, h.hexdigest(), size, want))

# Mapped once, before any restart: its pages fault in again every round.
mfile = open(mpath, "rb")
mm = mmap.mmap(mfile.fileno(), 0, prot=mmap.PROT_READ)
def mmap_check():
    mm.madvise(mmap.MADV_DONTNEED)
    os.posix_fadvise(mfile.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    size, want = want_of[mpath]
    got = hashlib.sha256(mm).hexdigest()
    if len(mm) != size or got != want:
        raise Wrong("mapped %d bytes of sha256 %s, want %d of %s" % (len(mm), got, size, want))

def walk_check(w, count, want):
    lines = []
    def fail(e):
        raise e
    for root, _, names in os.walk(os.fsencode(w), onerror=fail):
        for name in names:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                lines.append(b"%d %s\n" % (st.st_size, p))
    got = hashlib.sha256(b"".join(sorted(lines))).hexdigest()
    if got != want:
        raise Wrong("%d regular files listed as sha256 %s, want %d as %s" % (len(lines), got, count, want))

print("start", now(), len(files), flush=True)
rounds, pos = 0, 0
deadline = time.monotonic() + max_secs
while rounds < max_rounds and time.monotonic() < deadline and not os.path.exists(stop):
    rounds += 1
    slowest[:] = [0, "-", "-"]
    t0 = now()
    print("batch", rounds, t0, flush=True)
    for _ in range(new_per):
        p = files[pos % len(files)]
        pos += 1
        timed("read", p, lambda: read_check(p, False))
    tnew = now()
    seen = min(pos, len(files))
    for _ in range(old_per):
        p = files[random.randrange(seen)]
        timed("reread", p, lambda: read_check(p, True))
    timed("mmap", mpath, mmap_check)
    w, count, want = walks[rounds % len(walks)]
    timed("walk", w, lambda: walk_check(w, count, want))
    print("ok", rounds, t0, tnew, now(), "new=%d" % seen, "slowest_us=%d" % slowest[0], slowest[1], slowest[2], flush=True)
    time.sleep(pause)
print("done", rounds, now(), flush=True)
`

// bashReader is the reader of the Debian container, which has no python:
// the same protocol, arguments (but the mapped file) and check directory
// as pythonReader. Its operations are programs (sha256sum, find), so
// each also maps a program and its libraries from the lazy layers.
const bashReader = `set -u -o pipefail
d=$1 newper=$2 oldper=$3 pause=$4 maxsecs=$5 maxrounds=$6
mapfile -t man < "$d/manifest"
mapfile -t walks < "$d/walks"
n=${#man[@]}
errf=/tmp/reader.err
problems=0
now() { t=${EPOCHREALTIME/./}; }
problem() {
  now
  echo "$1 $t $2 $3 :: $4"
  problems=$((problems + 1))
  if ((problems >= 100)); then echo "giveup $t too many problems"; exit 3; fi
}
slowest=0 slowwhat="- -"
track() {
  now
  local dt=$((t - $1))
  if ((dt > slowest)); then slowest=$dt slowwhat="$2 $3"; fi
}
hashfile() {
  local line=${man[$2]} want rest p out rc t0
  want=${line%% *} rest=${line#* }
  p=${rest#* }
  if [[ $1 == reread ]]; then dd if="$p" iflag=nocache count=0 status=none 2>/dev/null; fi
  now; t0=$t
  out=$(sha256sum -- "$p" 2>"$errf"); rc=$?
  track "$t0" "$1" "$p"
  if ((rc != 0)); then problem ERROR "$1" "$p" "$(head -c 300 "$errf" | tr '\n' ' ')"; return; fi
  [[ ${out%% *} == "$want" ]] || problem WRONG "$1" "$p" "sha256 ${out%% *}, want $want"
}
walk() {
  local line=${walks[$1]} want rest count dir out rc t0
  want=${line%% *} rest=${line#* }
  count=${rest%% *} dir=${rest#* }
  now; t0=$t
  out=$(find "$dir" -type f -printf '%s %p\n' 2>"$errf" | LC_ALL=C sort | sha256sum); rc=$?
  track "$t0" walk "$dir"
  if ((rc != 0)); then problem ERROR walk "$dir" "$(head -c 300 "$errf" | tr '\n' ' ')"; return; fi
  [[ ${out%% *} == "$want" ]] || problem WRONG walk "$dir" "listing sha256 ${out%% *}, want $count files as $want"
}
now; echo "start $t $n"
round=0 pos=0
while ((round < maxrounds && SECONDS < maxsecs)) && [[ ! -e $d/stop ]]; do
  round=$((round + 1)) slowest=0 slowwhat="- -"
  now; t0=$t
  echo "batch $round $t0"
  for ((k = 0; k < newper; k++)); do hashfile read $((pos % n)); pos=$((pos + 1)); done
  now; tnew=$t
  seen=$((pos < n ? pos : n))
  for ((k = 0; k < oldper; k++)); do hashfile reread $(((RANDOM * 32768 + RANDOM) % seen)); done
  walk $((round % ${#walks[@]}))
  now
  echo "ok $round $t0 $tnew $t new=$seen slowest_us=$slowest $slowwhat"
  sleep "$pause"
done
now; echo "done $round $t"
`

// TestContainersSurviveDaemonRestarts runs two containers on lazily pulled
// images (python in eStargz, Debian in zstd:chunked), each reading files
// of its image in a loop and checking every byte against the image's
// layers: files fetched before, files never read yet, a mapped shared
// library, directory listings. Meanwhile the daemon is restarted ten
// times, upgraded to another binary, and killed with SIGKILL ten times
// (while readers fetch, while it collects its store, at random). The
// daemon's FUSE holder keeps the layers' FUSE connections while no daemon
// runs: reads wait, then go on with the right bytes. No read may fail or
// return a wrong byte, the containers must still run at the end, and the
// longest wait any read saw is logged per phase.
func TestContainersSurviveDaemonRestarts(t *testing.T) {
	survive(t, survivalSchedule{restarts: survivalRestarts, kills: survivalKills})
}

// TestContainersSurviveDaemonRestartsContainerd2 runs a shorter schedule
// under containerd 2.x, whose client reconnects to a restarted snapshotter
// in its own way.
func TestContainersSurviveDaemonRestartsContainerd2(t *testing.T) {
	requireIntegration(t)
	if _, err := testenv.BuildContainerd2(testContext(t), t.Logf); errors.Is(err, testenv.ErrContainerd2Offline) {
		t.Skip(err)
	}
	survive(t, survivalSchedule{containerd2: true, restarts: 3, kills: 3, short: true})
}

// survivalSchedule is what survive does to the daemon.
type survivalSchedule struct {
	containerd2     bool
	restarts, kills int
	// short skips the checks that a kill landed in a fetch and in a
	// collection: a few kills may all miss them.
	short bool
}

func survive(t *testing.T, sched survivalSchedule) {
	requireIntegration(t)
	begin := time.Now()
	ctx := testContext(t)
	binDir := t.TempDir() // removed after the environment closes
	upgraded := make(chan upgradeBuild, 1)
	go func() {
		p, err := buildUpgradedDaemon(ctx, binDir)
		upgraded <- upgradeBuild{p, err}
	}()

	env := newEnvWith(t, testenv.Options{DaemonConfig: survivalConfig, Containerd2: sched.containerd2})
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	s := &survival{t: t, ctx: ctx, env: env, rng: rand.New(rand.NewPCG(seed, seed>>1))}

	pyRef := convertPython(ctx, t, env, convert.EStargz, nil)
	debRef := convertImage(ctx, t, env, testimages.Debian, convert.ZstdChunked)
	pyFiles := imageFiles(ctx, t, testimages.Python)
	debFiles := imageFiles(ctx, t, testimages.Debian)
	if _, ok := pyFiles[survivalMmap]; !ok {
		t.Fatalf("the python image has no %s to map", survivalMmap)
	}
	var imgs []client.Image
	for _, ref := range []string{pyRef, debRef} {
		img, err := env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
		if err != nil {
			t.Fatal(err)
		}
		checkRemote(ctx, t, env, img)
		imgs = append(imgs, img)
	}
	s.readers = []*liveReader{
		s.startReader("python", imgs[0], pyFiles, []string{"python3", "-B", "/check/reader.py", "/check",
			strconv.Itoa(readerNewPerRound), strconv.Itoa(readerOldPerRound), readerPause,
			strconv.Itoa(readerMaxSeconds), strconv.Itoa(readerMaxRounds), survivalMmap}, "reader.py", pythonReader),
		s.startReader("debian", imgs[1], debFiles, []string{"bash", "/check/reader.sh", "/check",
			strconv.Itoa(readerNewPerRound), strconv.Itoa(readerOldPerRound), readerPause,
			strconv.Itoa(readerMaxSeconds), strconv.Itoa(readerMaxRounds)}, "reader.sh", bashReader),
	}
	t.Logf("setup took %s", time.Since(begin).Round(time.Millisecond))
	// Registered after the readers' cleanups, so it runs before them,
	// while their output is complete: what happened up to the failure.
	t.Cleanup(func() {
		if t.Failed() {
			s.report()
		}
	})

	// Every listing checked once before anything happens to the daemon: a
	// problem from here on is the daemon's, not the test's expectations.
	s.beginPhase("warm-up")
	s.waitRounds(time.Time{}, len(survivalWalks)+1, 2*time.Minute)
	s.endPhase()
	t.Logf("FUSE holder pid %d before the first restart", env.HolderPID())

	s.beginPhase("restarts")
	for i := 0; i < sched.restarts; i++ {
		ev := s.beginEvent("restart")
		if err := env.RestartDaemon(ctx); err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		s.daemonBack(ev)
		s.watch(s.between(300*time.Millisecond, 1500*time.Millisecond))
	}
	s.endPhase()
	holder := env.HolderPID()
	t.Logf("FUSE holder pid %d after %d restarts", holder, sched.restarts)
	if holder == 0 {
		t.Errorf("no live FUSE holder named by %s while containers run on lazy layers",
			filepath.Join(env.DaemonRoot, testenv.HolderPIDFile))
	}

	s.beginPhase("upgrade")
	var up upgradeBuild
	select {
	case up = <-upgraded:
	case <-time.After(5 * time.Minute):
		t.Fatal("building the upgraded daemon took over 5 minutes")
	}
	if up.err != nil {
		t.Fatal(up.err)
	}
	env.SetDaemonPath(up.path)
	ev := s.beginEvent("upgrade")
	if err := env.RestartDaemon(ctx); err != nil {
		t.Fatalf("restart on the upgraded binary: %v", err)
	}
	s.daemonBack(ev)
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", env.DaemonPID())); err != nil || exe != up.path {
		t.Fatalf("after the upgrade the daemon runs %q (%v), want %s", exe, err, up.path)
	}
	s.watch(2 * time.Second)
	s.endPhase()
	t.Logf("FUSE holder pid %d after the upgrade", env.HolderPID())

	s.beginPhase("kills")
	kinds := []string{"fetch", "gc", "random", "fetch", "gc", "random", "fetch", "gc", "fetch", "random"}
	// A collection of a store the readers refill takes milliseconds: the
	// kills come sooner and sooner after the call.
	gcDelays := []time.Duration{20 * time.Millisecond, 8 * time.Millisecond, 2 * time.Millisecond}
	// gcCut counts collections a kill cut short, gcInterrupted those of
	// them that had already removed objects (a matter of milliseconds,
	// logged, not required: it depends on the machine's load).
	gcCut, gcInterrupted, gcs := 0, 0, 0
	for i := 0; i < sched.kills; i++ {
		kind := kinds[i%len(kinds)]
		var gcDone chan error
		var beforeGC map[string]string
		switch kind {
		case "fetch":
			// A reader prints its batch line, then opens files it never
			// read: the kill lands while the daemon fetches them.
			r := s.readers[i%len(s.readers)]
			r.out.waitBatch(t, r.out.batchCount()+1, 30*time.Second)
			time.Sleep(time.Duration(s.rng.IntN(3000)) * time.Microsecond)
		case "gc":
			beforeGC = objectsOnDisk(t, env)
			gcDone = make(chan error, 1)
			go func() {
				_, err := postGC(ctx, env, 0)
				gcDone <- err
			}()
			time.Sleep(gcDelays[gcs%len(gcDelays)])
			gcs++
		default:
			time.Sleep(s.between(0, time.Second))
		}
		ev := s.beginEvent("kill:" + kind)
		if err := env.KillDaemon(); err != nil {
			t.Fatalf("kill %d: %v", i+1, err)
		}
		if gcDone != nil {
			var err error
			select {
			case err = <-gcDone:
			case <-time.After(time.Minute):
				t.Fatal("the gc call did not return a minute after the daemon died")
			}
			// The readers add objects meanwhile; they remove none.
			removed := removedObjects(t, env, beforeGC)
			if err != nil {
				gcCut++
			}
			switch {
			case err == nil:
				ev.note = "gc finished before the kill"
			case removed > 0:
				gcInterrupted++
				ev.note = fmt.Sprintf("gc killed having removed %d of %d objects", removed, len(beforeGC))
			default:
				ev.note = fmt.Sprintf("gc killed before it removed any of %d objects", len(beforeGC))
			}
		}
		if err := env.StartDaemonAgain(ctx); err != nil {
			t.Fatalf("start after kill %d: %v", i+1, err)
		}
		waitAPI(ctx, t, env)
		s.daemonBack(ev)
		s.watch(s.between(200*time.Millisecond, 800*time.Millisecond))
	}
	s.endPhase()
	t.Logf("FUSE holder pid %d after %d kills", env.HolderPID(), sched.kills)

	// The holder's own death, while the daemon runs, costs nothing: the
	// daemon starts another and hands it every mount, which the next
	// restart then finds there.
	s.beginPhase("holder")
	old := env.HolderPID()
	ev = s.beginEvent("kill:holder")
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatalf("kill the FUSE holder (pid %d): %v", old, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for pid := env.HolderPID(); pid == 0 || pid == old; pid = env.HolderPID() {
		if time.Now().After(deadline) {
			t.Fatal("no new FUSE holder 10s after the last one was killed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.daemonBack(ev)
	t.Logf("FUSE holder pid %d replaced the killed %d", env.HolderPID(), old)
	s.watch(time.Second)
	ev = s.beginEvent("restart after the holder's death")
	if err := env.RestartDaemon(ctx); err != nil {
		t.Fatalf("restart after the holder's death: %v", err)
	}
	s.daemonBack(ev)
	s.watch(time.Second)
	s.endPhase()

	s.beginPhase("after")
	s.waitRounds(time.Now(), 2, resumeTimeout)
	s.endPhase()
	for _, r := range s.readers {
		st, err := r.task.Status(env.Context(ctx))
		if err != nil {
			t.Fatalf("%s reader: status: %v", r.name, err)
		}
		if st.Status != client.Running {
			t.Fatalf("%s reader is %s at the end, want running", r.name, st.Status)
		}
	}
	s.stopReaders()

	s.report()
	landed := 0
	for _, ev := range s.events {
		if strings.HasPrefix(ev.kind, "kill:fetch") && s.duringFetch(ev.start) {
			landed++
		}
	}
	t.Logf("%d of the kills while readers fetched landed inside a round's reads of new files; %d of %d collections were cut short by a kill, %d of them after removing objects",
		landed, gcCut, gcs, gcInterrupted)
	if landed == 0 && !sched.short {
		t.Error("no kill landed while a reader read files it had not read before")
	}
	if gcCut == 0 && !sched.short {
		t.Error("no kill landed during a store collection")
	}
	valid, size := checkObjects(t, env)
	t.Logf("after it all the store holds %d objects (%d bytes), each named by the digest of its content; the test took %s",
		len(valid), size, time.Since(begin).Round(time.Millisecond))
}

type upgradeBuild struct {
	path string
	err  error
}

// buildUpgradedDaemon builds the daemon again into dir with another
// version, as a node's upgrade would bring.
func buildUpgradedDaemon(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "containerd-lazycas-grpc")
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags", "-X main.version="+upgradedVersion,
		"-o", bin, "./cmd/containerd-lazycas-grpc")
	cmd.Dir = ".." // the repository root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the upgraded daemon: %w\n%s", err, out)
	}
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("upgraded daemon --version: %w", err)
	}
	if !strings.Contains(string(out), upgradedVersion) {
		return "", fmt.Errorf("the upgraded daemon says %q", out)
	}
	return bin, nil
}

// convertImage pushes im and converts it in the registry to format,
// returning the converted reference.
func convertImage(ctx context.Context, t *testing.T, env *testenv.Env, im *testimages.Image, format convert.Format) string {
	t.Helper()
	pushed, err := env.PushImage(ctx, im)
	if err != nil {
		t.Fatal(err)
	}
	dst := env.RegistryHost + "/" + im.Name + ":" + string(format)
	start := time.Now()
	if _, err := convert.Convert(ctx, pushed.Ref, dst, convert.Options{
		Format: format, Resolver: env.Resolver(), TempDir: env.Dir,
	}); err != nil {
		t.Fatalf("convert %s to %s: %v", im.Name, format, err)
	}
	t.Logf("converted %s to %s in %s", pushed.Ref, format, time.Since(start).Round(time.Millisecond))
	return dst
}

// imageFile is a regular file of an image as its layers make it.
type imageFile struct {
	size   int64
	digest string // sha256 of the content, hex
	layer  int    // the layer that wrote it last
}

// imageFiles applies im's layers, bottom first, as overlayfs shows them
// (whiteouts, opaque directories, hard links), and returns the regular
// files of the result by absolute path: what a container must read. It
// reads the cached image, not anything lazycas serves.
func imageFiles(ctx context.Context, t *testing.T, im *testimages.Image) map[string]imageFile {
	t.Helper()
	start := time.Now()
	loaded, err := im.Load(ctx, testimages.CacheDir(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := loaded.Image.Layers()
	if err != nil {
		t.Fatalf("image %s: %v", im.Name, err)
	}
	files := map[string]imageFile{}
	var total int64
	for i, l := range layers {
		if err := applyLayer(files, i, l); err != nil {
			t.Fatalf("image %s, layer %d: %v", im.Name, i, err)
		}
	}
	for _, f := range files {
		total += f.size
	}
	t.Logf("image %s: %d regular files, %d bytes, hashed from its layers in %s", im.Name, len(files), total,
		time.Since(start).Round(time.Millisecond))
	return files
}

func applyLayer(files map[string]imageFile, layer int, l v1.Layer) error {
	rc, err := l.Uncompressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read layer: %w", err)
		}
		p := path.Join("/", h.Name)
		dir, base := path.Split(p)
		dir = path.Clean(dir)
		if base == ".wh..wh..opq" {
			removeBelow(files, dir, layer)
			continue
		}
		if victim, ok := strings.CutPrefix(base, ".wh."); ok {
			victim = path.Join(dir, victim)
			delete(files, victim)
			removeBelow(files, victim, layer)
			continue
		}
		// An entry replaces what lower layers had at its path; anything
		// but a directory also hides what they had below it.
		delete(files, p)
		if h.Typeflag != tar.TypeDir && layer > 0 {
			removeBelow(files, p, layer)
		}
		switch h.Typeflag {
		case tar.TypeReg:
			sum := sha256.New()
			n, err := io.Copy(sum, tr)
			if err != nil {
				return fmt.Errorf("read %s: %w", p, err)
			}
			files[p] = imageFile{size: n, digest: hex.EncodeToString(sum.Sum(nil)), layer: layer}
		case tar.TypeLink:
			target := path.Join("/", h.Linkname)
			f, ok := files[target]
			if !ok {
				return fmt.Errorf("hard link %s to %s, which is no regular file", p, target)
			}
			f.layer = layer
			files[p] = f
		}
	}
}

// removeBelow removes the files under dir that layers below layer wrote.
func removeBelow(files map[string]imageFile, dir string, layer int) {
	prefix := strings.TrimSuffix(dir, "/") + "/"
	for p, f := range files {
		if f.layer < layer && strings.HasPrefix(p, prefix) {
			delete(files, p)
		}
	}
}

// walkDigest is what a reader's listing of dir must hash to: the sorted
// "size path" lines of the regular files under it.
func walkDigest(files map[string]imageFile, dir string) (string, int) {
	var lines []string
	for p, f := range files {
		if strings.HasPrefix(p, dir+"/") {
			lines = append(lines, fmt.Sprintf("%d %s\n", f.size, p))
		}
	}
	sort.Strings(lines)
	h := sha256.New()
	for _, l := range lines {
		io.WriteString(h, l)
	}
	return hex.EncodeToString(h.Sum(nil)), len(lines)
}

// survival is the state of one TestContainersSurviveDaemonRestarts.
type survival struct {
	t       *testing.T
	ctx     context.Context
	env     *testenv.Env
	rng     *rand.Rand
	readers []*liveReader
	phases  []*survivalPhase
	events  []*daemonEvent
	// reported: the figures were logged (report runs once).
	reported bool
}

// survivalPhase is a span of the test: its daemon events and the reads
// that overlapped it.
type survivalPhase struct {
	name       string
	start, end time.Time
	events     []*daemonEvent
}

// daemonEvent is one restart, upgrade or kill: from the moment the daemon
// was asked to stop (or killed), to when it answered again (up), to when
// every reader had completed a round begun after that (resumed).
type daemonEvent struct {
	kind                 string
	start, up, resumed   time.Time
	note                 string
	slowest              time.Duration
	slowReader, slowWhat string
}

// liveReader is a container running a reader.
type liveReader struct {
	name    string
	dir     string // the check directory, /check inside
	c       client.Container
	task    client.Task
	out     *readerOut
	stderr  lockedBuffer
	stopped bool
}

func (s *survival) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(s.rng.Int64N(int64(hi-lo)+1))
}

// startReader writes the check directory for files (a shuffled list of
// the non-empty ones to read, the walks' expected listings, the script)
// and starts args in a container on img with it bind-mounted at /check.
func (s *survival) startReader(name string, img client.Image, files map[string]imageFile, args []string, script, body string) *liveReader {
	t, env := s.t, s.env
	t.Helper()
	dir := filepath.Join(env.Dir, "check-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var order []string
	for p, f := range files {
		if f.size > 0 && !strings.ContainsAny(p, "\n") {
			order = append(order, p)
		}
	}
	sort.Strings(order)
	// Shuffled, so that a read rarely finds its file fetched already as a
	// neighbour of the one before.
	s.rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	var manifest, walks strings.Builder
	for _, p := range order {
		fmt.Fprintf(&manifest, "%s %d %s\n", files[p].digest, files[p].size, p)
	}
	for _, w := range survivalWalks {
		if sum, n := walkDigest(files, w); n > 0 {
			fmt.Fprintf(&walks, "%s %d %s\n", sum, n, w)
		}
	}
	for file, content := range map[string]string{"manifest": manifest.String(), "walks": walks.String(), script: body} {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := &liveReader{name: name, dir: dir, out: newReaderOut()}
	c, err := env.NewContainerWith(s.ctx, testenv.Snapshotter, img, testenv.UniqueID("survivor-"+name), args,
		oci.WithMounts([]specs.Mount{{Destination: "/check", Type: "bind", Source: dir, Options: []string{"rbind", "rw"}}}))
	if err != nil {
		t.Fatal(err)
	}
	r.c = c
	t.Cleanup(func() {
		if r.stopped {
			return
		}
		if err := env.DeleteContainer(context.WithoutCancel(s.ctx), c); err != nil {
			t.Errorf("delete the %s reader's container: %v", name, err)
		}
	})
	nctx := env.Context(s.ctx)
	task, err := c.NewTask(nctx, cio.NewCreator(cio.WithStreams(nil, r.out, &r.stderr),
		cio.WithFIFODir(filepath.Join(env.RunDir, "fifo"))))
	if err != nil {
		t.Fatalf("%s reader: %v", name, err)
	}
	r.task = task
	statusC, err := task.Wait(nctx)
	if err != nil {
		t.Fatalf("%s reader: %v", name, err)
	}
	if err := task.Start(nctx); err != nil {
		t.Fatalf("%s reader: %v", name, err)
	}
	go func() {
		if st, ok := <-statusC; ok {
			r.out.exited(st)
		}
	}()
	t.Logf("%s reader started: %d files to read, %d directories to list", name, len(order), strings.Count(walks.String(), "\n"))
	return r
}

func (s *survival) beginPhase(name string) {
	s.phases = append(s.phases, &survivalPhase{name: name, start: time.Now()})
}

func (s *survival) endPhase() {
	s.phases[len(s.phases)-1].end = time.Now()
}

func (s *survival) beginEvent(kind string) *daemonEvent {
	ev := &daemonEvent{kind: kind, start: time.Now()}
	s.events = append(s.events, ev)
	ph := s.phases[len(s.phases)-1]
	ph.events = append(ph.events, ev)
	return ev
}

// daemonBack records that the daemon of ev answers again and waits until
// every reader has completed a round begun after that: reads go on.
func (s *survival) daemonBack(ev *daemonEvent) {
	s.t.Helper()
	ev.up = time.Now()
	s.waitRounds(ev.up, 1, resumeTimeout)
	ev.resumed = time.Now()
}

// waitRounds waits until every reader has completed n rounds begun after
// since, failing at once when a reader reports a problem or exits.
func (s *survival) waitRounds(since time.Time, n int, timeout time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for _, r := range s.readers {
		for {
			s.check()
			if r.out.roundsSince(since) >= n {
				break
			}
			left := time.Until(deadline)
			if left <= 0 {
				s.t.Fatalf("%s reader: not %d rounds in %s after %s; its output ends:\n%s\nstderr: %s", r.name, n, timeout,
					since.Format("15:04:05.000"), r.out.tail(10), r.stderr.String())
			}
			r.out.waitChange(min(left, 100*time.Millisecond))
		}
	}
}

// watch lets the readers run for d, failing at once on a problem.
func (s *survival) watch(d time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		s.check()
		time.Sleep(min(time.Until(deadline), 50*time.Millisecond))
	}
	s.check()
}

// check fails the test at the first wrong byte, failed read, or exit of
// a reader: once reads fail the rest of the schedule shows nothing more.
func (s *survival) check() {
	s.t.Helper()
	for _, r := range s.readers {
		problems, exit := r.out.state()
		if len(problems) > 0 {
			ph := s.phases[len(s.phases)-1]
			s.t.Fatalf("%s reader, during %s (after %d daemon events in it): %d problems, the first:\n%s\nstderr: %s",
				r.name, ph.name, len(ph.events), len(problems), strings.Join(problems[:min(len(problems), 10)], "\n"), r.stderr.String())
		}
		if exit != "" && !r.stopped {
			s.t.Fatalf("%s reader exited (%s) before it was told to stop; its output ends:\n%s\nstderr: %s",
				r.name, exit, r.out.tail(10), r.stderr.String())
		}
	}
}

// stopReaders tells the readers to stop, and expects them to finish
// their round and exit 0; then it deletes their containers.
func (s *survival) stopReaders() {
	t := s.t
	t.Helper()
	for _, r := range s.readers {
		if err := os.WriteFile(filepath.Join(r.dir, "stop"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	nctx := s.env.Context(s.ctx)
	for _, r := range s.readers {
		code, ok := r.out.waitExit(time.Minute)
		if !ok {
			t.Fatalf("%s reader did not stop within a minute of being told; its output ends:\n%s", r.name, r.out.tail(10))
		}
		r.stopped = true
		if _, err := r.task.Delete(nctx); err != nil {
			t.Errorf("%s reader: delete its task: %v", r.name, err)
		}
		if err := s.env.DeleteContainer(s.ctx, r.c); err != nil {
			t.Errorf("%s reader: %v", r.name, err)
		}
		if code != 0 || !r.out.finished() {
			t.Errorf("%s reader exited %d when told to stop (done line: %v); its output ends:\n%s\nstderr: %s",
				r.name, code, r.out.finished(), r.out.tail(10), r.stderr.String())
		}
	}
	s.check()
}

// duringFetch reports whether at moment at some reader was inside its
// reads of files it had never read.
func (s *survival) duringFetch(at time.Time) bool {
	us := at.UnixMicro()
	for _, r := range s.readers {
		for _, rd := range r.out.allRounds() {
			if rd.start <= us && us <= rd.newEnd {
				return true
			}
		}
	}
	return false
}

// slowest is the slowest single operation of any round that overlapped
// [from, to].
func (s *survival) slowest(from, to time.Time) (time.Duration, string, string) {
	var d time.Duration
	var who, what string
	for _, r := range s.readers {
		for _, rd := range r.out.allRounds() {
			if rd.end >= from.UnixMicro() && rd.start <= to.UnixMicro() && rd.slowest > d {
				d, who, what = rd.slowest, r.name, rd.what
			}
		}
	}
	return d, who, what
}

// report logs each event and phase: how long the daemon was away, how
// soon reads went on, and the longest a single read waited.
func (s *survival) report() {
	t := s.t
	now := time.Now()
	orNow := func(at time.Time) time.Time {
		if at.IsZero() {
			return now
		}
		return at
	}
	if s.reported {
		return
	}
	s.reported = true
	for _, ph := range s.phases {
		ph.end = orNow(ph.end)
		for i, ev := range ph.events {
			unfinished := ev.resumed.IsZero()
			ev.up, ev.resumed = orNow(ev.up), orNow(ev.resumed)
			ev.slowest, ev.slowReader, ev.slowWhat = s.slowest(ev.start, ev.resumed)
			var notes []string
			if ev.note != "" {
				notes = append(notes, ev.note)
			}
			if unfinished {
				notes = append(notes, "readers never resumed: times up to the report")
			}
			note := ""
			if len(notes) > 0 {
				note = " (" + strings.Join(notes, "; ") + ")"
			}
			t.Logf("%s %d%s: daemon away %s, every reader through a new round %s later; slowest operation meanwhile %s (%s %s)",
				ev.kind, i+1, note, ev.up.Sub(ev.start).Round(time.Millisecond), ev.resumed.Sub(ev.up).Round(time.Millisecond),
				ev.slowest.Round(time.Millisecond), ev.slowReader, ev.slowWhat)
		}
	}
	var longest time.Duration
	var longestAt string
	for _, ph := range s.phases {
		d, who, what := s.slowest(ph.start, ph.end)
		var rounds []string
		for _, r := range s.readers {
			n, newFiles := r.out.roundsBetween(ph.start, ph.end)
			rounds = append(rounds, fmt.Sprintf("%s %d rounds, %d files read first", r.name, n, newFiles))
		}
		t.Logf("phase %s (%d daemon events, %s): max stall %s (%s %s); %s", ph.name, len(ph.events),
			ph.end.Sub(ph.start).Round(time.Millisecond), d.Round(time.Millisecond), who, what, strings.Join(rounds, ", "))
		if len(ph.events) > 0 {
			// The stall distribution README and `make bench-restart` report.
			stalls := make([]time.Duration, 0, len(ph.events))
			for _, ev := range ph.events {
				stalls = append(stalls, ev.slowest)
			}
			sort.Slice(stalls, func(i, j int) bool { return stalls[i] < stalls[j] })
			pct := func(p float64) time.Duration {
				return stalls[int(p*float64(len(stalls)-1)+0.5)].Round(time.Millisecond)
			}
			t.Logf("stall distribution, %s: n=%d min %s p50 %s p90 %s max %s (per event, the slowest single read or walk step of any reader)",
				ph.name, len(stalls), pct(0), pct(0.5), pct(0.9), pct(1))
		}
		if d > longest {
			longest, longestAt = d, fmt.Sprintf("%s, %s %s", ph.name, who, what)
		}
	}
	t.Logf("longest stall any reader saw: %s (%s)", longest.Round(time.Millisecond), longestAt)
}

// readerRound is one "ok" line of a reader: a round's times (µs since
// the epoch, on the host's clock, which containers share) and its slowest
// operation.
type readerRound struct {
	n                  int
	start, newEnd, end int64
	newFiles           int
	slowest            time.Duration
	what               string
}

// readerOut parses a reader's output as it arrives.
type readerOut struct {
	mu       sync.Mutex
	partial  []byte
	last     []string // the latest lines, for failure messages
	rounds   []readerRound
	batches  int
	problems []string
	done     bool
	exit     string // set when the task exited
	code     uint32
	changed  chan struct{} // closed and replaced on every line and at exit
}

func newReaderOut() *readerOut { return &readerOut{changed: make(chan struct{})} }

func (o *readerOut) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.partial = append(o.partial, p...)
	for {
		i := bytes.IndexByte(o.partial, '\n')
		if i < 0 {
			break
		}
		line := string(o.partial[:i])
		o.partial = o.partial[i+1:]
		o.parse(line)
	}
	return len(p), nil
}

// parse takes one line; o.mu is held.
func (o *readerOut) parse(line string) {
	o.last = append(o.last, line)
	if len(o.last) > 50 {
		o.last = o.last[len(o.last)-50:]
	}
	f := strings.SplitN(line, " ", 9)
	switch f[0] {
	case "start":
	case "batch":
		o.batches++
	case "ok":
		rd, err := parseRound(f)
		if err != nil {
			o.problems = append(o.problems, fmt.Sprintf("unparsable line %q: %v", line, err))
			break
		}
		o.rounds = append(o.rounds, rd)
	case "done":
		o.done = true
	default: // WRONG, ERROR, giveup, or anything unforeseen
		o.problems = append(o.problems, line)
	}
	close(o.changed)
	o.changed = make(chan struct{})
}

// parseRound parses "ok N T0 TNEW T1 new=K slowest_us=D OP PATH".
func parseRound(f []string) (readerRound, error) {
	var rd readerRound
	if len(f) != 9 {
		return rd, errors.New("not 9 fields")
	}
	var err error
	ints := []*int64{&rd.start, &rd.newEnd, &rd.end}
	for i, p := range ints {
		if *p, err = strconv.ParseInt(f[2+i], 10, 64); err != nil {
			return rd, err
		}
	}
	if rd.n, err = strconv.Atoi(f[1]); err != nil {
		return rd, err
	}
	if rd.newFiles, err = strconv.Atoi(strings.TrimPrefix(f[5], "new=")); err != nil {
		return rd, err
	}
	us, err := strconv.ParseInt(strings.TrimPrefix(f[6], "slowest_us="), 10, 64)
	if err != nil {
		return rd, err
	}
	rd.slowest = time.Duration(us) * time.Microsecond
	rd.what = f[7] + " " + f[8]
	return rd, nil
}

func (o *readerOut) exited(st client.ExitStatus) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.code = st.ExitCode()
	o.exit = fmt.Sprintf("exit %d", o.code)
	if err := st.Error(); err != nil {
		o.exit += ": " + err.Error()
	}
	close(o.changed)
	o.changed = make(chan struct{})
}

// waitChange waits at most d for a line or the exit.
func (o *readerOut) waitChange(d time.Duration) {
	o.mu.Lock()
	ch := o.changed
	o.mu.Unlock()
	select {
	case <-ch:
	case <-time.After(d):
	}
}

func (o *readerOut) state() (problems []string, exit string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.problems...), o.exit
}

func (o *readerOut) batchCount() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.batches
}

// waitBatch waits until the reader has begun its n-th round.
func (o *readerOut) waitBatch(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for o.batchCount() < n {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("a reader began no round in %s; its output ends:\n%s", timeout, o.tail(10))
		}
		o.waitChange(left)
	}
}

func (o *readerOut) waitExit(timeout time.Duration) (uint32, bool) {
	deadline := time.Now().Add(timeout)
	for {
		o.mu.Lock()
		exit, code := o.exit, o.code
		o.mu.Unlock()
		if exit != "" {
			return code, true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return 0, false
		}
		o.waitChange(left)
	}
}

func (o *readerOut) finished() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.done
}

// roundsSince counts the rounds completed that began after since.
func (o *readerOut) roundsSince(since time.Time) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, rd := range o.rounds {
		if rd.start >= since.UnixMicro() {
			n++
		}
	}
	return n
}

// roundsBetween counts the rounds that overlapped [from, to] and the
// files they read for the first time.
func (o *readerOut) roundsBetween(from, to time.Time) (rounds, newFiles int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	first, lastNew := -1, 0
	for i, rd := range o.rounds {
		if rd.end >= from.UnixMicro() && rd.start <= to.UnixMicro() {
			if first < 0 {
				first = i
			}
			rounds++
			lastNew = rd.newFiles
		}
	}
	if first < 0 {
		return 0, 0
	}
	before := 0
	if first > 0 {
		before = o.rounds[first-1].newFiles
	}
	return rounds, lastNew - before
}

func (o *readerOut) allRounds() []readerRound {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]readerRound(nil), o.rounds...)
}

func (o *readerOut) tail(n int) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	l := o.last
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n") + "\n" + string(o.partial)
}
