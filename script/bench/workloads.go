package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"

	"github.com/lazycas/lazycas/integration/testenv"
)

// Series compared: containerd's own overlayfs (full pull, unpack),
// lazycas on the images it converted, and lazycas on the images converted
// the way stargz-snapshotter's tools convert them (an eStargz made by
// another tool is the common case). The peers follow (stargz, built in,
// and -peer ones); a peer pulls the stargz-converted images.
//
// Two more series measure learned start-up, on request (-snapshotters, or
// -matrix): lazycas with a profile recorded on an earlier run of the same
// workload (store emptied, profile kept), and stargz-snapshotter on the
// image its optimizer makes from the files the same run opened.
const (
	snOverlay     = "overlayfs"
	snLazycas     = testenv.Snapshotter
	snLazycasPeer = snLazycas + "@stargz-image"
	snLearned     = snLazycas + "+profile"
	snStargzOpt   = stargzName + "+profile"
)

// snapshotters are measured by default; learnedSeries on request.
var (
	snapshotters  = []string{snOverlay, snLazycas, snLazycasPeer}
	learnedSeries = []string{snLearned, snStargzOpt}
)

// snapshotterOf is the containerd snapshotter a series runs on.
func snapshotterOf(series string) string {
	switch series {
	case snLazycasPeer, snLearned:
		return snLazycas
	case snStargzOpt:
		return stargzName
	}
	return series
}

// imageTag is the tag of workload wl's image that series pulls.
func imageTag(series, wl string) string {
	switch series {
	case snOverlay, snLazycas:
		return tagPython
	case snStargzOpt:
		return tagOptimized(wl)
	}
	return tagStargz
}

// Workloads. The cold ones run on a node that has never pulled anything;
// "warm" runs after the image is local.
const (
	wlPrint     = "print"
	wlImportFew = "import-few"
	wlImport    = "import-many"
	wlGCC       = "gcc"
	wlShell     = "shell"
	wlServer    = "server"
	wlRead      = "readall"
	wlSecond    = "second"
	wlWarm      = "warm"
	oldWlImport = "import" // the name of import-many in results before issue 12
)

// coldWorkload is a container started on a node that never pulled its
// image: the time to its first output line is the figure.
type coldWorkload struct {
	repo string // the image: python, debian or gcc
	desc string
	args []string
	want string // the first output line's prefix
}

var coldWorkloads = map[string]coldWorkload{
	wlPrint: {repoPython, "python3 -c 'print(1)'", []string{"python3", "-c", "print(1)"}, "1"},
	wlImportFew: {repoPython, "python3 importing " + strings.Join(fewModules, ", "),
		[]string{"python3", "-c", "import " + strings.Join(fewModules, ", ") + "; print('imported', " + fmt.Sprint(len(fewModules)) + ")"},
		"imported " + fmt.Sprint(len(fewModules))},
	wlImport: {repoPython, fmt.Sprintf("python3 importing %d stdlib modules", len(importModules)),
		append([]string{"python3", "-c", importScript}, importModules...),
		fmt.Sprintf("imported %d of %d", len(importModules), len(importModules))},
	wlGCC: {repoGCC, "gcc -O2 compiles and links hello-world (Debian gcc + libc6-dev), which then runs",
		[]string{"sh", "-c", gccScript}, "hello, world"},
	wlShell: {repoDebian, "a sh script (Debian minbase) running coreutils, grep and du over the image's own files",
		[]string{"sh", "-c", shellScript}, "shell: "},
	wlServer: {repoPython, "python3 -m http.server starts; first line of its answer to a client in the container (bash /dev/tcp)",
		[]string{"bash", "-c", serverScript}, "HTTP/1.0 200"},
	wlRead: {repoPython, "read every file of the rootfs (python os.scandir + read)",
		[]string{"python3", "-c", readAllScript}, "read "},
}

// coldOrder is the order of the cold workloads in tables and plots.
var coldOrder = []string{wlPrint, wlImportFew, wlImport, wlGCC, wlShell, wlServer, wlRead}

var allWorkloads = append(slices.Clone(coldOrder), wlSecond, wlWarm)

// defaultWorkloads are make bench's: every cold workload, then second and
// warm.
var defaultWorkloads = allWorkloads

var workloadDesc = map[string]string{
	wlSecond: "python:app-zstd (zstd:chunked: the same base files in other blobs, plus an app layer of 100 modules and 16 MiB of data) after python:estargz ran and is local; the app imports its modules and lists its data; then, page cache dropped, a container of each image reads /usr/bin/python3.11 and the page cache of every copy of it is measured",
	wlWarm:   "image local: sequential read of a 128 MiB file (page cache dropped, then hot), find / -xdev, stat of every entry",
}

func init() {
	for n, w := range coldWorkloads {
		workloadDesc[n] = w.desc
	}
}

// fewModules are the handful of modules of import-few: what a small
// command-line tool imports.
var fewModules = strings.Fields("argparse json logging subprocess urllib.request datetime pathlib socket")

const gccScript = `printf '#include <stdio.h>\nint main(void) { puts("hello, world"); return 0; }\n' > /tmp/hello.c &&
gcc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello`

// shellScript runs a dozen programs, reads small text files, hashes a few
// binaries and walks /usr/lib's metadata.
const shellScript = `set -e
n=$(ls /usr/share/doc | wc -l)
c=$(cat /usr/share/doc/*/copyright 2>/dev/null | wc -l)
s=$(md5sum /bin/ls /bin/cp /usr/bin/sort /usr/bin/find | cut -c1-8 | sort | tr '\n' ' ')
d=$(du -sk /usr/lib | cut -f1)
u=$(grep -c . /etc/passwd)
h=$(head -c 64 /etc/services | tr -d '\n' | wc -c)
echo "shell: $n packages, $c copyright lines, /usr/lib $d KiB, $u users, $h, $s"
`

// serverScript starts python's http.server and, as a client inside the
// container (it has a network namespace of its own), asks it for / once it
// accepts connections (polled every 20 ms, for at most 60 s); the first
// line of the answer is the first output.
const serverScript = `python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
i=0
until (: </dev/tcp/127.0.0.1/8000) 2>/dev/null; do
  i=$((i+1)); [ $i -lt 3000 ] || { echo "http.server never accepted" >&2; exit 1; }
  sleep 0.02
done
exec 3<>/dev/tcp/127.0.0.1/8000
printf 'GET / HTTP/1.0\r\n\r\n' >&3
IFS= read -r line <&3
echo "$line"
kill $!
`

// importModules are the modules of the import workload; all are in
// Debian's python3.11 stdlib packages.
var importModules = strings.Fields(`abc argparse array ast asyncio base64 binascii bisect bz2 calendar
cmath codecs collections colorsys concurrent.futures configparser contextlib copy cProfile csv ctypes
dataclasses datetime dbm decimal difflib dis doctest email email.mime.text enum filecmp fnmatch
fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html html.parser http.client
http.cookies http.server imaplib importlib.metadata inspect io ipaddress itertools json locale
logging logging.handlers lzma mailbox math mimetypes mmap multiprocessing netrc numbers operator
optparse pathlib pdb pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random
re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl
statistics string stringprep struct subprocess symtable sysconfig tarfile tempfile textwrap threading
timeit tokenize trace traceback typing unicodedata unittest urllib.parse urllib.request uuid wave
weakref xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client zipfile zipimport zlib zoneinfo`)

const importScript = `import importlib, sys
ok = 0
for n in sys.argv[1:]:
    try:
        importlib.import_module(n)
        ok += 1
    except Exception as e:
        print("import", n, "failed:", e, file=sys.stderr)
print("imported", ok, "of", len(sys.argv) - 1, "modules")
`

// readAllScript reads every regular file of the root filesystem, staying
// on it (no /proc, /sys, /dev).
const readAllScript = `import os
dev = os.lstat("/").st_dev
files = total = 0
stack = ["/"]
while stack:
    d = stack.pop()
    try:
        it = os.scandir(d)
    except OSError:
        continue
    with it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                if e.stat(follow_symlinks=False).st_dev == dev:
                    stack.append(e.path)
            elif e.is_file(follow_symlinks=False):
                try:
                    with open(e.path, "rb", buffering=0) as f:
                        while True:
                            b = f.read(1 << 20)
                            if not b:
                                break
                            total += len(b)
                    files += 1
                except OSError:
                    pass
print("read", files, "files,", total, "bytes")
`

// The warm scripts time themselves and print "RESULT <count> <seconds>".
const readBigScript = `import os, time
fd = os.open("` + bigFilePath + `", os.O_RDONLY)
buf = bytearray(1 << 20)
n = 0
t = time.perf_counter()
while True:
    k = os.readv(fd, [buf])
    if k == 0:
        break
    n += k
print("RESULT", n, time.perf_counter() - t)
`

const findScript = `import subprocess, time
t = time.perf_counter()
p = subprocess.run(["find", "/", "-xdev"], stdout=subprocess.PIPE, check=True)
print("RESULT", p.stdout.count(b"\n"), time.perf_counter() - t)
`

const statWalkScript = `import os, time
t = time.perf_counter()
dev = os.lstat("/").st_dev
n = 0
stack = ["/"]
while stack:
    d = stack.pop()
    try:
        it = os.scandir(d)
    except OSError:
        continue
    with it:
        for e in it:
            st = os.lstat(e.path)
            n += 1
            if e.is_dir(follow_symlinks=False) and st.st_dev == dev:
                stack.append(e.path)
print("RESULT", n, time.perf_counter() - t)
`

// coldArgs are the container's command and the prefix its first output
// line must have.
func coldArgs(wl string) (args []string, want string) {
	w, ok := coldWorkloads[wl]
	if !ok {
		panic("no cold command for " + wl)
	}
	return w.args, w.want
}

var appArgs = []string{"python3", "/app/main.py"}

const appWant = "app ready:"

// stampWriter keeps a task's output and the time its first line arrived.
type stampWriter struct {
	mu    sync.Mutex
	b     bytes.Buffer
	first time.Time
}

func (w *stampWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.first.IsZero() && bytes.IndexByte(p, '\n') >= 0 {
		w.first = time.Now()
	}
	return w.b.Write(p)
}

func (w *stampWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// ranContainer is one container run to its end.
type ranContainer struct {
	Stdout, Stderr string
	// Started is when the task was created and started (runc has set up
	// the container on its rootfs), FirstOut when the first line of
	// stdout arrived.
	Created, Started, FirstOut, Exited time.Time
}

// containerTimeout bounds one container's run.
const containerTimeout = 4 * time.Minute

// runContainer creates a container from img on snapshotter sn, runs args
// to completion and deletes it; a non-zero exit or a first line without
// the prefix want is an error.
func runContainer(ctx context.Context, env *testenv.Env, sn string, img client.Image, want string, args ...string) (_ *ranContainer, err error) {
	ctx, cancel := context.WithTimeout(env.Context(ctx), containerTimeout)
	defer cancel()
	c, err := env.NewContainerOn(ctx, sn, img, testenv.UniqueID("bench"), args...)
	if err != nil {
		return nil, err
	}
	defer func() {
		dctx, dcancel := context.WithTimeout(env.Context(context.WithoutCancel(ctx)), time.Minute)
		defer dcancel()
		if derr := env.DeleteContainer(dctx, c); derr != nil && err == nil {
			err = derr
		}
	}()
	created := time.Now()
	var stdout, stderr stampWriter
	task, err := c.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &stdout, &stderr),
		cio.WithFIFODir(filepath.Join(env.RunDir, "fifo"))))
	if err != nil {
		return nil, fmt.Errorf("create task: %w", err)
	}
	statusC, err := task.Wait(ctx)
	if err != nil {
		return nil, fmt.Errorf("wait task: %w", err)
	}
	if err := task.Start(ctx); err != nil {
		return nil, fmt.Errorf("start task: %w", err)
	}
	started := time.Now()
	var status client.ExitStatus
	select {
	case status = <-statusC:
	case <-ctx.Done():
		return nil, fmt.Errorf("container did not exit: %w (output so far: %.300q)", ctx.Err(), stdout.String())
	}
	exited := time.Now()
	code, _, err := status.Result()
	if err != nil {
		return nil, err
	}
	if _, err := task.Delete(ctx); err != nil {
		return nil, fmt.Errorf("delete task: %w", err)
	}
	r := &ranContainer{Stdout: stdout.String(), Stderr: stderr.String(), Created: created, Started: started,
		FirstOut: stdout.first, Exited: exited}
	if code != 0 {
		return nil, fmt.Errorf("%s exited with %d: %.500s", args[0], code, strings.TrimSpace(r.Stderr))
	}
	if !strings.HasPrefix(r.Stdout, want) {
		return nil, fmt.Errorf("output %.200q, want a first line starting %q (stderr %.300q)", r.Stdout, want, r.Stderr)
	}
	return r, nil
}

// result parses the "RESULT <count> <seconds>" line of a warm script.
func (r *ranContainer) result() (count, secs float64, err error) {
	for _, line := range strings.Split(r.Stdout, "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "RESULT" {
			count, err1 := strconv.ParseFloat(f[1], 64)
			secs, err2 := strconv.ParseFloat(f[2], 64)
			if err := errors.Join(err1, err2); err != nil {
				return 0, 0, fmt.Errorf("parse %q: %w", line, err)
			}
			return count, secs, nil
		}
	}
	return 0, 0, fmt.Errorf("no RESULT line in %q", r.Stdout)
}

// pull pulls ref into sn the way its users do: lazycas with the labels CRI
// and nerdctl send, overlayfs as containerd's client does, a peer with the
// labels its -peer flag names.
func (b *bench) pull(ctx context.Context, sn, ref string) (client.Image, error) {
	labels := sn == snLazycas
	if p, ok := b.peers[sn]; ok {
		labels = p.Labels == labelsCRI
	}
	if labels {
		return b.env.PullOn(ctx, sn, ref, testenv.WithSnapshotLabels(ref))
	}
	return b.env.PullOn(ctx, sn, ref)
}

// dropCaches writes dirty pages back and drops the page, dentry and inode
// caches.
func dropCaches() error {
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		return fmt.Errorf("drop caches: %w", err)
	}
	return nil
}

// loadAvg is the machine's 1-minute load average: other work on the
// machine shows in it.
func loadAvg() float64 {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// peakRSS is VmHWM of pid in bytes, 0 when unknown.
func peakRSS(pid int) float64 {
	if pid == 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, _ := strconv.ParseFloat(f[0], 64)
				return kb * 1024
			}
		}
	}
	return 0
}
