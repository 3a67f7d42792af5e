package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	snproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// A peer is another remote snapshotter measured alongside lazycas
// (-peer NAME=SOCKET[,LABELS]): a daemon the user runs, serving containerd's
// snapshots API on SOCKET, which the benchmark's containerd reaches as the
// proxy plugin NAME. The benchmark cannot restart it or empty its caches;
// it removes every snapshot the peer holds before each cold run, since a
// remote snapshot is committed under its bare chain ID and a new
// containerd's pull would find the last run's. So the peer must serve the
// benchmark alone: containerd's own garbage collector would remove another
// client's snapshots too (it removes whatever its metadata does not list).

// Label modes: which labels a pull into the peer passes.
const (
	// labelsCRI adds the image and layer labels CRI and nerdctl send
	// (containerd.io/snapshot/cri.*), as lazycas's pulls do.
	labelsCRI = "cri"
	// labelsNone pulls as containerd's client does: only the labels
	// containerd's unpacker adds itself.
	labelsNone = "none"
)

var labelModes = []string{labelsCRI, labelsNone}

// peerSpec is one -peer flag.
type peerSpec struct {
	Name   string `json:"name"`
	Socket string `json:"socket"`
	Labels string `json:"labels"`
}

// peerName keeps a name usable as a containerd plugin ID and TOML key.
var peerName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// builtinSnapshotters are names containerd 1.6 and 2.x give their own
// snapshotters; a proxy plugin of the same name would clash.
var builtinSnapshotters = []string{"overlayfs", "native", "btrfs", "zfs", "devmapper", "aufs", "blockfile", "erofs"}

// parsePeer parses NAME=SOCKET[,LABELS].
func parsePeer(s string) (peerSpec, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok || name == "" || rest == "" {
		return peerSpec{}, fmt.Errorf("peer %q: want NAME=SOCKET[,LABELS], e.g. stargz=/run/containerd-stargz-grpc/containerd-stargz-grpc.sock,cri", s)
	}
	sock, mode, hasMode := strings.Cut(rest, ",")
	if !hasMode {
		mode = labelsCRI
	}
	p := peerSpec{Name: name, Socket: sock, Labels: mode}
	switch {
	case !peerName.MatchString(name):
		return p, fmt.Errorf("peer %q: the name must be letters, digits, '.', '_' or '-'", s)
	case name == snLazycas || slices.Contains(builtinSnapshotters, name):
		return p, fmt.Errorf("peer %q: %s is the name of a snapshotter containerd already has", s, name)
	case !filepath.IsAbs(sock):
		return p, fmt.Errorf("peer %q: the socket must be an absolute path", s)
	case !slices.Contains(labelModes, mode):
		return p, fmt.Errorf("peer %q: labels %q: want one of %s", s, mode, strings.Join(labelModes, ", "))
	}
	return p, nil
}

// peerFlags is the repeatable -peer flag.
type peerFlags []peerSpec

func (f *peerFlags) String() string {
	var parts []string
	for _, p := range *f {
		parts = append(parts, p.Name+"="+p.Socket+","+p.Labels)
	}
	return strings.Join(parts, " ")
}

func (f *peerFlags) Set(s string) error {
	p, err := parsePeer(s)
	if err != nil {
		return err
	}
	for _, q := range *f {
		if q.Name == p.Name {
			return fmt.Errorf("peer %s given twice", p.Name)
		}
	}
	*f = append(*f, p)
	return nil
}

// peerTimeout bounds one call to a peer's API.
const peerTimeout = 30 * time.Second

// peerSnapshotter connects to p's socket directly, bypassing containerd.
func peerSnapshotter(p peerSpec) (snapshots.Snapshotter, func(), error) {
	conn, err := grpc.NewClient("unix://"+p.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("peer %s: dial %s: %w", p.Name, p.Socket, err)
	}
	// The snapshotter name in each request is the one containerd sends:
	// its proxy plugin's name.
	return snproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), p.Name), func() { conn.Close() }, nil
}

// checkPeer makes sure p answers on its socket and holds no snapshot: one
// it holds belongs to someone else (cleanLeftovers has removed what a
// killed benchmark left), and would be removed.
func checkPeer(ctx context.Context, p peerSpec) error {
	fi, err := os.Stat(p.Socket)
	if err != nil {
		return fmt.Errorf("peer %s: %w", p.Name, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("peer %s: %s is not a socket", p.Name, p.Socket)
	}
	sn, closeFn, err := peerSnapshotter(p)
	if err != nil {
		return err
	}
	defer closeFn()
	infos, err := walkPeer(ctx, sn)
	if err != nil {
		return fmt.Errorf("peer %s: list snapshots on %s: %w", p.Name, p.Socket, err)
	}
	if len(infos) > 0 {
		return fmt.Errorf("peer %s holds %d snapshot(s) (e.g. %q): the benchmark would remove them, before every cold run; "+
			"run a peer of its own for the benchmark, on an empty root", p.Name, len(infos), infos[0].Name)
	}
	return nil
}

func walkPeer(ctx context.Context, sn snapshots.Snapshotter) ([]snapshots.Info, error) {
	ctx, cancel := context.WithTimeout(ctx, peerTimeout)
	defer cancel()
	var infos []snapshots.Info
	err := sn.Walk(ctx, func(_ context.Context, in snapshots.Info) error {
		infos = append(infos, in)
		return nil
	})
	if errdefs.IsNotFound(err) {
		// A snapshotter on an empty root has no snapshots bucket yet
		// (containerd's metastore says "bucket does not exist").
		return nil, nil
	}
	return infos, err
}

// removePeerSnapshots removes every snapshot p holds, children first, so
// that the next cold pull creates them again. It returns how many it
// removed.
func removePeerSnapshots(ctx context.Context, p peerSpec) (int, error) {
	sn, closeFn, err := peerSnapshotter(p)
	if err != nil {
		return 0, err
	}
	defer closeFn()
	removed := 0
	// Each round removes the snapshots that are no other's parent.
	for round := 0; round < 1000; round++ {
		infos, err := walkPeer(ctx, sn)
		if err != nil {
			return removed, fmt.Errorf("peer %s: list snapshots: %w", p.Name, err)
		}
		if len(infos) == 0 {
			return removed, nil
		}
		parents := map[string]bool{}
		for _, in := range infos {
			parents[in.Parent] = true
		}
		progress := false
		for _, in := range infos {
			name := in.Name
			if parents[name] {
				continue
			}
			rctx, cancel := context.WithTimeout(ctx, peerTimeout)
			err := sn.Remove(rctx, name)
			cancel()
			if err != nil {
				return removed, fmt.Errorf("peer %s: remove snapshot %s: %w", p.Name, name, err)
			}
			removed++
			progress = true
		}
		if !progress {
			return removed, fmt.Errorf("peer %s: every snapshot is another's parent (a cycle?)", p.Name)
		}
	}
	return removed, errors.New("peer " + p.Name + ": too many snapshots to remove")
}

// socketPID finds the process listening on the unix socket path: the
// socket's inode from /proc/net/unix, then the process holding an fd on
// it. 0 when none is found (another PID namespace, no permission).
func socketPID(path string) int {
	data, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return 0
	}
	inodes := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n")[1:] {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(line)
		if len(f) == 8 && f[7] == path && f[3] == "00010000" { // __SO_ACCEPTCON: listening
			inodes["socket:["+f[6]+"]"] = true
		}
	}
	if len(inodes) == 0 {
		return 0
	}
	procs, _ := os.ReadDir("/proc")
	for _, pe := range procs {
		pid, err := strconv.Atoi(pe.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir("/proc/" + pe.Name() + "/fd")
		for _, fd := range fds {
			if l, err := os.Readlink("/proc/" + pe.Name() + "/fd/" + fd.Name()); err == nil && inodes[l] {
				return pid
			}
		}
	}
	return 0
}

// quietFor is how long the registry link must carry nothing before a
// peer's background fetch, if it has one, counts as finished.
const quietFor = 5 * time.Second

// waitQuiet waits until px has sent nothing for quietFor (at most
// fetchWait): all the benchmark can tell of a peer's background fetch.
func waitQuiet(ctx context.Context, px *proxy) error {
	deadline := time.Now().Add(fetchWait)
	last, lastChange := px.counters().Down, time.Now()
	for time.Since(lastChange) < quietFor {
		if time.Now().After(deadline) {
			return fmt.Errorf("the registry link still busy after %s", fetchWait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		if d := px.counters().Down; d != last {
			last, lastChange = d, time.Now()
		}
	}
	return nil
}

// measuredSnapshotters is the -snapshotters list, checked, followed by the
// peers it does not name.
func measuredSnapshotters(list string, peers []peerSpec) ([]string, error) {
	var names []string
	for _, p := range peers {
		names = append(names, p.Name)
	}
	var out []string
	for _, sn := range strings.Split(list, ",") {
		sn = strings.TrimSpace(sn)
		known := append(append(slices.Clone(snapshotters), learnedSeries...), names...)
		if !slices.Contains(known, sn) {
			return nil, fmt.Errorf("unknown snapshotter %q (have %s)", sn, strings.Join(known, ", "))
		}
		if !slices.Contains(out, sn) {
			out = append(out, sn)
		}
	}
	for _, n := range names {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out, nil
}

// peerNote is the report's note on what a peer's figures mean.
func peerNote(p peerSpec) string {
	rss := "no process found listening on its socket, so no RSS"
	if pid := socketPID(p.Socket); pid != 0 {
		rss = fmt.Sprintf("its RSS is the peak (VmHWM) of pid %d since that started, not per run", pid)
	}
	return fmt.Sprintf("peer %s (%s, labels %s) is a daemon the benchmark does not run: before each cold run the benchmark "+
		"removes its snapshots, but it cannot restart it or empty its caches, so cold runs after "+
		"the first may find data already on the node; %s; store, page-cache and FUSE profile figures are lazycas's and overlayfs's only",
		p.Name, p.Socket, p.Labels, rss)
}
