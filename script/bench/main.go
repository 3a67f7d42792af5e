// Command bench measures lazycas against containerd's overlayfs
// snapshotter (full pull and unpack) and against stargz-snapshotter, on
// this machine, in one run, and writes a table, a JSON file and PNG charts
// (issues 7 and 12, `make bench`).
//
// It starts the integration test environment (a registry, a private
// containerd 1.6 and the lazycas daemon), builds stargz-snapshotter's
// daemon from its Go module (script/bench/stargz), pushes the cached test
// images (Debian+python3, Debian minbase, Debian+gcc) and converts each
// twice: with lazycas's converter, and as stargz-snapshotter's converter
// does (no landmark); plus two derived images (an application image in
// zstd:chunked on the same base files, and an image with a 128 MiB file).
// Every puller reaches the registry through a proxy of this program that
// counts the bytes served; on a shaped link ("100mbit-20ms") the registry
// runs in a network namespace behind a veth pair with TBF on both ends,
// and the proxy adds the latency. Each cold run starts from empty
// containerd, lazycas and stargz-snapshotter roots and a dropped page
// cache.
//
// Run it as root from the repository root:
//
//	go run ./script/bench [-runs 3] [-link 100mbit-0ms,100mbit-20ms | -matrix] [-workloads print,import-few,...] [-out bench-results] [-quick]
//	    [-stargz=true] [-peer NAME=SOCKET[,cri|none]]...
//
// Everything it starts (daemons, network namespace, veths, mounts) is
// removed at the end, on Ctrl-C or SIGTERM too, and what a killed run left
// is removed by the next one.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/lazycas/lazycas/integration/testenv"
)

type options struct {
	runs         int
	links        []linkSpec
	workloads    []string
	out          string
	daemon       string
	timeout      time.Duration
	profile      bool
	saveLogs     bool
	publish      string
	extraConf    string   // more lazycas daemon config (TOML)
	snapshotters []string // measured, peers included
	peers        []peerSpec
	runTimeout   time.Duration
	stargz       bool // build and measure stargz-snapshotter
}

func main() {
	var o options
	runs := flag.Int("runs", 3, "cold runs per snapshotter, workload and link")
	links := flag.String("link", strings.Join(defaultLinks, ","), "links to the registry, comma-separated: loopback or RATE-LATENCY (e.g. 100mbit-20ms: TBF rate, one-way latency)")
	wls := flag.String("workloads", strings.Join(defaultWorkloads, ","), "workloads, comma-separated: "+strings.Join(allWorkloads, ", "))
	flag.StringVar(&o.out, "out", "bench-results", "directory for the JSON, Markdown and PNG results")
	flag.StringVar(&o.daemon, "daemon", "", "containerd-lazycas-grpc binary (default: build ./cmd/containerd-lazycas-grpc)")
	flag.DurationVar(&o.timeout, "timeout", 90*time.Minute, "stop measuring after this long and report what was measured")
	flag.DurationVar(&o.runTimeout, "run-timeout", 5*time.Minute, "give up on one run after this long")
	flag.BoolVar(&o.profile, "profile", true, "after the measured runs, run each cold workload once more on lazycas with FUSE debug logging and report FUSE operation and request counts")
	flag.BoolVar(&o.saveLogs, "logs", false, "keep the registry, containerd and lazycas logs, and a line per registry request, in OUT/<time>-logs")
	sns := flag.String("snapshotters", strings.Join(snapshotters, ","), "series to measure (ratios need overlayfs): "+strings.Join(append(slices.Clone(snapshotters), learnedSeries...), ", ")+"; the peers are added")
	confFile := flag.String("lazycas-config", "", "a TOML file added to the lazycas daemon's config, e.g. to measure with [fs] background_fetch = false")
	replot := flag.String("report", "", "only redo the table, Markdown and PNGs of an earlier results `FILE.json`, next to it")
	flag.StringVar(&o.publish, "publish", "", "also copy the results to `DIR` under fixed names (results.json, results.md, <chart>.png), e.g. docs/bench")
	flag.BoolVar(&o.stargz, "stargz", true, "build stargz-snapshotter's daemon from its Go module ("+stargzModule+") and measure it in the same run, as snapshotter "+stargzName)
	matrix := flag.Bool("matrix", false, "the full matrix: links "+strings.Join(matrixLinks, ",")+" (overrides -link), and the learned series "+strings.Join(learnedSeries, ", "))
	quick := flag.Bool("quick", false, "development: 1 run, loopback only, no profile run (overrides -runs and -link)")
	var peers peerFlags
	flag.Var(&peers, "peer", "also measure the snapshotter serving containerd's snapshots API on `NAME=SOCKET[,LABELS]` (repeatable): "+
		"a daemon you run for the benchmark alone, registered with the benchmark's containerd as proxy plugin NAME; "+
		"LABELS is cri (pull with the labels CRI and nerdctl send, the default) or none (containerd's client's own)")
	flag.Parse()
	if *replot != "" {
		if err := redoReport(*replot, o.publish); err != nil {
			fatal(err)
		}
		return
	}
	o.runs = *runs
	if *matrix {
		*links = strings.Join(matrixLinks, ",")
	}
	if *quick {
		o.runs, *links, o.profile = 1, "loopback", false
	}
	for _, s := range strings.Split(*links, ",") {
		l, err := parseLink(strings.TrimSpace(s))
		if err != nil {
			fatal(err)
		}
		o.links = append(o.links, l)
	}
	for _, w := range strings.Split(*wls, ",") {
		w = strings.TrimSpace(w)
		if !slices.Contains(allWorkloads, w) {
			fatal(fmt.Errorf("unknown workload %q (have %s)", w, strings.Join(allWorkloads, ", ")))
		}
		o.workloads = append(o.workloads, w)
	}
	var err error
	if *matrix && !flagSet("snapshotters") {
		*sns += "," + strings.Join(learnedSeries, ",")
	}
	if !o.stargz && strings.Contains(*sns, snStargzOpt) {
		fatal(errors.New(snStargzOpt + " needs the built-in stargz peer (-stargz)"))
	}
	if o.stargz {
		// A socket in the run's directory, known once it exists: the spec
		// is completed in run.
		peers = append(peerFlags{{Name: stargzName, Labels: labelsCRI}}, peers...)
	}
	if o.snapshotters, err = measuredSnapshotters(*sns, peers); err != nil {
		fatal(err)
	}
	o.peers = peers
	if *confFile != "" {
		b, err := os.ReadFile(*confFile)
		if err != nil {
			fatal(err)
		}
		o.extraConf = string(b)
	}
	if o.runs < 1 {
		fatal(errors.New("-runs must be at least 1"))
	}

	// The converter's content store logs warnings (no fs-verity here)
	// that would break the progress line.
	_ = log.SetLevel("error")
	// A closed stdout (bench | head) must not kill us before cleanup.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err = run(ctx, o)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		fmt.Fprintf(os.Stderr, "\nbench interrupted; everything it started was stopped and removed\n")
		os.Exit(130)
	default:
		fmt.Fprintf(os.Stderr, "\nbench FAILED: %v\n", err)
		os.Exit(1)
	}
}

// flagSet tells whether the command line set flag name.
func flagSet(name string) bool {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "bench: %v\n", err)
	os.Exit(2)
}

// Where runs keep their private directories; a leftover one names the
// containerd state directory (RunDir) in its rundir file.
const (
	workParent = "/var/tmp"
	workPrefix = "lzbench-"
	lockPath   = "/run/lzbench.lock"
)

func run(sigCtx context.Context, o options) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the benchmark starts containerd, mounts filesystems, creates network namespaces and drops the page cache")
	}
	prog := newProgress(os.Stderr)
	defer prog.close()
	unlock, err := lock()
	if err != nil {
		return err
	}
	defer unlock()
	cleanLeftovers(prog.logf)

	started := time.Now()
	rep := &report{Started: started, Command: strings.Join(append([]string{"script/bench"}, os.Args[1:]...), " "), Runs: o.runs, Links: o.links,
		Workloads: map[string]string{}, Machine: readMachine(), Peers: o.peers}
	for _, w := range o.workloads {
		rep.Workloads[w] = workloadDesc[w]
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	stamp := started.Format("20060102-150405")
	prefix := filepath.Join(o.out, stamp)

	work, err := os.MkdirTemp(workParent, workPrefix)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := testenv.RemoveLeftovers(work, ""); cerr != nil {
			err = errors.Join(err, fmt.Errorf("remove %s: %w", work, cerr))
		}
	}()

	// Measuring stops at the timeout; setup and cleanup get their own
	// bounds so that a report is always written.
	ctx, cancel := context.WithTimeout(sigCtx, o.timeout)
	defer cancel()

	// Peers join containerd's config, so they are checked before it
	// starts (and before the build, to fail early). A killed run's peers
	// are emptied by the next run's cleanLeftovers, through peersFile,
	// written once they passed the check.
	var proxies []testenv.ProxySnapshotter
	peers := map[string]peerSpec{}
	var sg *stargzPeer
	if o.stargz {
		prog.logf("building stargz-snapshotter's daemon (%s, %s)", stargzModule, stargzVersion())
		bin, err := buildStargz(ctx, filepath.Join(work, "bin"))
		if err != nil {
			return err
		}
		if sg, err = newStargzPeer(bin, filepath.Join(work, stargzName)); err != nil {
			return err
		}
		defer func() {
			if cerr := sg.close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}()
		o.peers[0].Socket = sg.socket()
		rep.Notes = append(rep.Notes, stargzNote())
	}
	for _, p := range o.peers {
		if p.Name == stargzName && sg != nil {
			// Ours: it runs only for its own runs, on an empty root.
			proxies = append(proxies, testenv.ProxySnapshotter{Name: p.Name, Address: p.Socket})
			peers[p.Name] = p
			continue
		}
		if err := checkPeer(ctx, p); err != nil {
			return err
		}
		proxies = append(proxies, testenv.ProxySnapshotter{Name: p.Name, Address: p.Socket})
		peers[p.Name] = p
		rep.Notes = append(rep.Notes, peerNote(p))
	}
	if len(o.peers) > 0 {
		data, err := json.Marshal(o.peers)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(work, peersFile), data, 0o644); err != nil {
			return err
		}
		defer func() {
			// After containerd stopped (deferred earlier, runs later):
			// the peers are left with no snapshot of the benchmark's.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(sigCtx), time.Minute)
			defer cancel()
			for _, p := range o.peers {
				if _, cerr := removePeerSnapshots(cctx, p); cerr != nil {
					err = errors.Join(err, cerr)
				}
			}
		}()
	}

	daemon := o.daemon
	if daemon == "" {
		prog.logf("building containerd-lazycas-grpc")
		daemon = filepath.Join(work, "bin", "containerd-lazycas-grpc")
		cmd := exec.CommandContext(ctx, goBinary(), "build", "-o", daemon, "./cmd/containerd-lazycas-grpc")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build the daemon (run from the repository root): %w\n%s", err, out)
		}
	}
	hostsDir := filepath.Join(work, "hosts.d")
	baseConfig := fmt.Sprintf("[remote]\nconfig_path = %q\n", hostsDir) + o.extraConf
	rep.LazycasConfig = o.extraConf
	envDir := filepath.Join(work, "env")
	if err := os.Mkdir(envDir, 0o755); err != nil {
		return err
	}
	env, err := testenv.Start(ctx, testenv.Options{WorkDir: envDir, DaemonPath: daemon, DaemonConfig: baseConfig,
		ProxySnapshotters: proxies, Logf: func(f string, a ...any) { prog.logf(f, a...) }})
	if err != nil {
		return err
	}
	// The daemons die with us (Pdeathsig); a killed run leaves mounts and
	// shims, which the next run finds through this file.
	if err := os.WriteFile(filepath.Join(work, "rundir"), []byte(env.RunDir), 0o644); err != nil {
		env.Close()
		return err
	}
	defer func() {
		if o.saveLogs {
			if err := env.SaveLogs(prefix + "-logs"); err != nil {
				prog.logf("save logs: %v", err)
			}
		}
		prog.logf("stopping the environment")
		if cerr := env.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("stop the environment: %w", cerr))
		}
	}()

	need := imageNeeds{app: slices.Contains(o.workloads, wlSecond), big: slices.Contains(o.workloads, wlWarm)}
	for _, r := range []string{repoPython, repoDebian, repoGCC} {
		use := r == repoPython && (need.app || need.big)
		for _, w := range o.workloads {
			if cw, ok := coldWorkloads[w]; ok && cw.repo == r {
				use = true
			}
		}
		if use {
			need.repos = append(need.repos, r)
		}
	}
	images, err := prepareImages(ctx, env, work, need, prog.logf)
	if err != nil {
		return err
	}
	rep.Images = images

	b := &bench{env: env, proxies: map[string]*proxy{}, images: images, res: &results{}, prog: prog, config: baseConfig, peers: peers, stargz: sg,
		work: work, profiles: map[string][]byte{}}
	var registries []string
	for i, l := range o.links {
		upstream := env.RegistryHost
		if l.Rate != "" {
			sl, err := setUpShaped(ctx, l, i, work, env.RegistryStorage(), prog.logf)
			if err != nil {
				return err
			}
			defer func() {
				if cerr := sl.Close(); cerr != nil {
					err = errors.Join(err, cerr)
				}
			}()
			upstream = sl.Upstream()
		}
		var trace io.Writer
		if o.saveLogs {
			if err := os.MkdirAll(prefix+"-logs", 0o755); err != nil {
				return err
			}
			tf, err := os.Create(prefix + "-logs/requests-" + l.Name + ".log")
			if err != nil {
				return err
			}
			defer tf.Close()
			trace = tf
		}
		px, err := startProxy(upstream, l.Latency, trace)
		if err != nil {
			return err
		}
		defer px.Close()
		b.proxies[l.Name] = px
		registries = append(registries, px.Addr())
		// A node configures a plain-HTTP registry in hosts.toml; lazycas
		// reads this directory (its [remote] config_path).
		dir := filepath.Join(hostsDir, px.Addr())
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		hosts := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", "http://"+px.Addr(), "http://"+px.Addr())
		if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(hosts), 0o644); err != nil {
			return err
		}
		lc, err := checkLink(ctx, l.Name, px)
		if err != nil {
			return fmt.Errorf("check link %s: %w", l.Name, err)
		}
		rep.LinkChecks = append(rep.LinkChecks, lc)
		prog.logf("link %s: registry at %s through proxy %s; measured: HTTP round trip %.1f ms, %.1f MB/s for a %s blob",
			l.Name, upstream, px.Addr(), lc.RoundTripMs, lc.ThroughputMBps, mb(lc.BlobBytes))
	}
	if sg != nil {
		sg.setRegistries(registries)
	}
	rep.SetupSeconds = time.Since(started).Seconds()

	measureErr := b.measure(ctx, o, rep, prefix)
	if measureErr != nil && sigCtx.Err() == nil {
		prog.logf("measuring stopped: %v", measureErr)
		rep.Error = measureErr.Error()
	}
	rep.Complete = measureErr == nil
	rep.Machine.Passthrough = b.passthrough
	rep.Seconds = time.Since(started).Seconds()
	rep.finish(b.res)
	if werr := writeReport(rep, b.res, prefix, o.publish, prog); werr != nil {
		return errors.Join(measureErr, werr)
	}
	return measureErr
}

// redoReport rewrites the outputs of a results file.
func redoReport(path, publish string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var rep report
	if err := json.Unmarshal(data, &rep); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	for _, c := range rep.Cells {
		if c.Workload == oldWlImport {
			c.Workload = wlImport
		}
	}
	res := &results{cells: rep.Cells}
	rep.finish(res)
	return writeReport(&rep, res, strings.TrimSuffix(path, ".json"), publish, nil)
}

func writeReport(rep *report, res *results, prefix, publish string, prog *progress) error {
	if prog != nil {
		prog.close()
	}
	rep.writeText(os.Stdout, res)
	var errs []error
	if err := rep.writeJSON(prefix + ".json"); err != nil {
		errs = append(errs, err)
	}
	md, err := os.Create(prefix + ".md")
	if err == nil {
		rep.writeMarkdown(md, res)
		errs = append(errs, md.Close())
	} else {
		errs = append(errs, err)
	}
	files, err := writePlots(prefix, rep, res)
	errs = append(errs, err)
	fmt.Printf("\nresults: %s.json, %s.md", prefix, prefix)
	for _, f := range files {
		fmt.Printf(", %s", filepath.Base(f))
	}
	fmt.Printf("\ntook %s (setup %s)\n", time.Duration(rep.Seconds*float64(time.Second)).Round(time.Second),
		time.Duration(rep.SetupSeconds*float64(time.Second)).Round(time.Second))
	if publish != "" {
		if err := publishResults(prefix, files, publish); err != nil {
			errs = append(errs, err)
		} else {
			fmt.Printf("copied to %s\n", publish)
		}
	}
	return errors.Join(errs...)
}

// publishResults copies a run's files into dir under names without the
// run's time, replacing an earlier run's.
func publishResults(prefix string, plots []string, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	copies := map[string]string{prefix + ".json": "results.json", prefix + ".md": "results.md"}
	for _, p := range plots {
		copies[p] = strings.TrimPrefix(filepath.Base(p), filepath.Base(prefix)+"-")
	}
	for src, name := range copies {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// warmSamples is how many samples the warm phase takes: at least 5, since
// they are cheap (one image, seconds each) and page-cache-dropped reads
// vary a lot from one to the next.
func warmSamples(runs int) int { return max(runs, 5) }

// goBinary is the go command on PATH, else the one of the toolchain that
// built this program.
func goBinary() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// lock makes sure one benchmark runs at a time on this machine, so that
// leftovers found at start belong to a dead run.
func lock() (func(), error) {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another benchmark holds %s: %w", lockPath, err)
	}
	return func() { f.Close() }, nil
}

// peersFile, in a run's directory, lists the peers it measures.
const peersFile = "peers.json"

// cleanLeftovers removes what a killed run left: its network namespace and
// veths, its containerd shims, mounts and directories, and its peers'
// snapshots.
func cleanLeftovers(logf func(string, ...any)) {
	if err := removeStaleLinks(logf); err != nil {
		logf("removing leftover links: %v", err)
	}
	dirs, _ := filepath.Glob(filepath.Join(workParent, workPrefix+"*"))
	for _, d := range dirs {
		if fi, err := os.Lstat(d); err != nil || !fi.IsDir() {
			continue // a run's directory, never someone's file of that name
		}
		var peers []peerSpec
		if b, err := os.ReadFile(filepath.Join(d, peersFile)); err == nil && json.Unmarshal(b, &peers) == nil {
			for _, p := range peers {
				if _, err := os.Stat(p.Socket); err != nil {
					continue // the peer is gone, and its snapshots with it
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				if n, err := removePeerSnapshots(ctx, p); err != nil {
					logf("removing the snapshots of peer %s an earlier run left: %v", p.Name, err)
				} else if n > 0 {
					logf("removed %d snapshots of peer %s an earlier run left", n, p.Name)
				}
				cancel()
			}
		}
		runDir := ""
		if b, err := os.ReadFile(filepath.Join(d, "rundir")); err == nil {
			runDir = strings.TrimSpace(string(b))
			if !strings.HasPrefix(runDir, "/run/lzc-") {
				runDir = ""
			}
		}
		logf("removing %s left by an earlier run", d)
		if err := testenv.RemoveLeftovers(d, runDir); err != nil {
			logf("removing %s: %v", d, err)
		}
	}
}
