package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/lazycas/lazycas/integration/testenv"
)

// Metrics, in base units (seconds, bytes, MB/s). A run records those that
// apply to it.
const (
	mPull      = "pull_s"               // pull start to pull done
	mFirst     = "first_output_s"       // pull start to the container's first output line
	mDone      = "done_s"               // pull start to the container's exit
	mBytes     = "registry_bytes"       // bytes the registry sent, pull start to exit
	mBytesAll  = "registry_bytes_all"   // the same, until lazycas's background fetch ended
	mReqs      = "registry_requests"    // HTTP requests the registry received
	mRanged    = "range_requests"       // of which with a Range header
	mFetchReqs = "lazycas_requests"     // HTTP requests lazycas's fetcher made (its own count)
	mLazyRSS   = "lazycas_rss_bytes"    // lazycas daemon's peak RSS (VmHWM)
	mPeerRSS   = "peer_rss_bytes"       // a peer daemon's peak RSS since it started
	mCtrdRSS   = "containerd_rss_bytes" // containerd's peak RSS
	mCreate    = "container_create_s"   // pull done to task started (container created, runc ran)
	mToOut     = "start_to_output_s"    // task started to first output line
	mLoad      = "loadavg"              // the machine's 1-minute load average at the end of the run
	mFirstA    = "first_image_first_output_s"
	// 1 when the first image was not whole on the node before the second
	// was pulled (lazycas without background fetch).
	mFirstIncomplete = "first_image_incomplete"
	mNewBytes        = "new_file_bytes"  // content of the files the second image adds
	mStore           = "store_bytes"     // lazycas store content after both images
	mDedup           = "store_dedup"     // lazycas store dedup ratio after both images
	mColdRead        = "cold_read_MBps"  // first read of the big file, image just pulled
	mWarmRead        = "warm_read_MBps"  // image local, page cache dropped
	mHotRead         = "hot_read_MBps"   // read again, page cache warm
	mFind            = "find_s"          // find / -xdev, caches dropped
	mStatWalk        = "stat_walk_s"     // lstat of every entry, caches dropped
	mWalkCount       = "walk_entries"    // entries find printed
	mReadBytes       = "read_file_bytes" // size of the file read
	// Page cache of a file both images hold, after a container of each
	// read it (every copy on the node), and the file's size.
	mPageCache  = "shared_file_page_cache_bytes"
	mPageCopies = "shared_file_page_cache_copies" // mPageCache / mSharedSize
	mSharedSize = "shared_file_bytes"
)

type sample map[string]float64

// cell holds the runs of one snapshotter on one workload and link.
type cell struct {
	Link        string               `json:"link"`
	Workload    string               `json:"workload"`
	Snapshotter string               `json:"snapshotter"`
	Samples     map[string][]float64 `json:"samples"`
	Summary     map[string]summary   `json:"summary"`
	Errors      []string             `json:"errors,omitempty"`
}

type results struct {
	cells []*cell
}

func (r *results) cell(link, wl, sn string) *cell {
	for _, c := range r.cells {
		if c.Link == link && c.Workload == wl && c.Snapshotter == sn {
			return c
		}
	}
	c := &cell{Link: link, Workload: wl, Snapshotter: sn, Samples: map[string][]float64{}}
	r.cells = append(r.cells, c)
	return c
}

func (r *results) find(link, wl, sn string) *cell {
	for _, c := range r.cells {
		if c.Link == link && c.Workload == wl && c.Snapshotter == sn {
			return c
		}
	}
	return nil
}

func (c *cell) add(s sample) {
	keys := make([]string, 0, len(s))
	for k := range s {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		c.Samples[k] = append(c.Samples[k], s[k])
	}
}

// profileRun is a lazycas run with every FUSE request logged (fs.debug):
// its timings are not comparable, its counts are the point.
type profileRun struct {
	Link     string           `json:"link"`
	Workload string           `json:"workload"`
	FuseOps  map[string]int64 `json:"fuseOps"`
	Proxy    proxyCounters    `json:"registry"`
	// Fetcher is lazycas's own count of requests and bytes.
	FetchRequests int64  `json:"lazycasRequests"`
	FetchBytes    int64  `json:"lazycasBytes"`
	StoreFiles    int64  `json:"storeFilesSealed"`
	StoreBytes    int64  `json:"storeBytesSealed"`
	Error         string `json:"error,omitempty"`
}

// bench runs the workloads against one environment.
type bench struct {
	env     *testenv.Env
	proxies map[string]*proxy // by link name
	images  map[string]*imageInfo
	res     *results
	prog    *progress
	config  string // the daemon's TOML config
	logOff  int64  // lazycas.log size when the daemon last started
	// passthrough as the daemon reported it.
	passthrough *bool
	peers       map[string]peerSpec // by name
	// stargz is the built-in peer, nil when not measured.
	stargz *stargzPeer
	work   string // the run's directory
	// profiles are the learned profiles by workload, as the daemon's API
	// exports them (snLearned).
	profiles map[string][]byte
}

func (b *bench) ref(link, repo, tag string) string {
	return b.proxies[link].Addr() + "/" + repo + ":" + tag
}

// reset gives a node that has never pulled anything, with cold caches,
// for a run on snapshotter sn.
func (b *bench) reset(ctx context.Context, sn string) error {
	b.prog.step("fresh containerd and lazycas roots")
	if err := b.env.ResetNode(ctx); err != nil {
		return err
	}
	// The built-in peer is stopped after every run (its background fetch
	// would use the link during the next one) and starts on an empty root
	// for its own runs.
	if b.stargz != nil {
		if err := b.stargz.stopAndEmpty(); err != nil {
			return err
		}
		if sn == stargzName {
			b.prog.step("stargz-snapshotter on an empty root")
			if err := b.stargz.start(ctx); err != nil {
				return err
			}
		}
	}
	// The new containerd knows nothing of the snapshots the last one made
	// on a peer; left there, a pull would find them. The peer's own
	// caches stay: the benchmark cannot reach them.
	for name, p := range b.peers {
		if b.stargz != nil && name == stargzName {
			continue
		}
		if _, err := removePeerSnapshots(ctx, p); err != nil {
			return err
		}
	}
	b.logOff = fileSize(b.env.LogPaths()[1])
	return dropCaches()
}

// breakdown splits the time after the pull.
func (s sample) breakdown(pulled time.Time, r *ranContainer) {
	s[mCreate] = r.Started.Sub(pulled).Seconds()
	s[mToOut] = r.FirstOut.Sub(r.Started).Seconds()
}

// rss records the daemons' peak RSS after a run on sn. A peer's is its
// own since it started; lazycas's, idle in a peer's run, is left out there.
func (b *bench) rss(s sample, sn string) {
	s[mLoad] = loadAvg()
	s[mCtrdRSS] = peakRSS(b.env.ContainerdPID())
	p, ok := b.peers[sn]
	if !ok {
		s[mLazyRSS] = peakRSS(b.env.DaemonPID())
	} else if rss := peakRSS(socketPID(p.Socket)); rss > 0 {
		s[mPeerRSS] = rss
	}
}

func (b *bench) net(s sample, px *proxy, since proxyCounters) {
	d := px.counters().sub(since)
	s[mBytes] = float64(d.Down)
	s[mReqs] = float64(d.Requests)
	s[mRanged] = float64(d.Ranged)
}

// lazyFigures adds lazycas's own request count.
func (b *bench) lazyFigures(ctx context.Context, s sample) error {
	st, err := daemonStats(ctx, b.env)
	if err != nil {
		return err
	}
	s[mFetchReqs] = float64(st.Fetch.Requests)
	if b.passthrough == nil && st.Mounted > 0 {
		pt := st.Passthrough
		b.passthrough = &pt
	}
	return nil
}

// coldRun pulls workload wl's image onto a new node and runs it; series is
// a snapshotter, or lazycas@stargz-image.
func (b *bench) coldRun(ctx context.Context, link, wl, series string) (sample, error) {
	if wl == wlSecond {
		return b.secondRun(ctx, link, series)
	}
	sn := snapshotterOf(series)
	if series == snLearned {
		b.env.SetDaemonConfig(b.learnedConfig())
		defer b.env.SetDaemonConfig(b.config)
	}
	if err := b.reset(ctx, sn); err != nil {
		return nil, err
	}
	if series == snLearned {
		// The node has the profile before the pull, as after `lazycas
		// image profile import`; its store is empty.
		if err := b.importProfile(ctx, wl); err != nil {
			return nil, err
		}
	}
	w := coldWorkloads[wl]
	px := b.proxies[link]
	ref := b.ref(link, w.repo, imageTag(series, wl))
	c0 := px.counters()
	b.prog.step("pull")
	t0 := time.Now()
	img, err := b.pull(ctx, sn, ref)
	if err != nil {
		return nil, err
	}
	pulled := time.Now()
	b.prog.step("run")
	r, err := runContainer(ctx, b.env, sn, img, w.want, w.args...)
	if err != nil {
		return nil, err
	}
	s := sample{mPull: pulled.Sub(t0).Seconds(), mFirst: r.FirstOut.Sub(t0).Seconds(), mDone: r.Exited.Sub(t0).Seconds()}
	s.breakdown(pulled, r)
	b.net(s, px, c0)
	b.rss(s, sn)
	if sn == snLazycas {
		if err := b.lazyFigures(ctx, s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// secondRun runs python:estargz, waits until the node holds it whole, and
// then measures python:app-zstd, which shares its base files.
func (b *bench) secondRun(ctx context.Context, link, sn string) (sample, error) {
	if err := b.reset(ctx, sn); err != nil {
		return nil, err
	}
	px := b.proxies[link]
	refA, refB := b.ref(link, repoPython, tagPython), b.ref(link, repoPython, tagApp)
	s := sample{}
	b.prog.step("pull and run the first image")
	t0 := time.Now()
	imgA, err := b.pull(ctx, sn, refA)
	if err != nil {
		return nil, err
	}
	args, want := coldArgs(wlPrint)
	r, err := runContainer(ctx, b.env, sn, imgA, want, args...)
	if err != nil {
		return nil, err
	}
	s[mFirstA] = r.FirstOut.Sub(t0).Seconds()
	if sn == snLazycas {
		b.prog.step("wait for the first image's background fetch")
		if _, err := waitFetched(ctx, b.env, refA); errors.Is(err, errNoBackground) {
			s[mFirstIncomplete] = 1 // the second image then fetches base files too
		} else if err != nil {
			return nil, err
		}
	} else if b.isPeer(sn) {
		b.prog.step("wait for the registry link to fall quiet")
		if err := waitQuiet(ctx, px); err != nil {
			return nil, err
		}
	}
	if err := dropCaches(); err != nil {
		return nil, err
	}
	c0 := px.counters()
	b.prog.step("pull the second image")
	t1 := time.Now()
	imgB, err := b.pull(ctx, sn, refB)
	if err != nil {
		return nil, err
	}
	pulled := time.Now()
	b.prog.step("run the second image")
	r, err = runContainer(ctx, b.env, sn, imgB, appWant, appArgs...)
	if err != nil {
		return nil, err
	}
	s[mPull] = pulled.Sub(t1).Seconds()
	s[mFirst] = r.FirstOut.Sub(t1).Seconds()
	s[mDone] = r.Exited.Sub(t1).Seconds()
	s.breakdown(pulled, r)
	b.net(s, px, c0)
	s[mBytesAll] = s[mBytes]
	s[mNewBytes] = float64(b.images[imageKey(repoPython, tagApp)].NewFileBytes)
	if sn == snLazycas {
		b.prog.step("wait for the second image's background fetch")
		st, err := waitFetched(ctx, b.env, refB)
		if err != nil && !errors.Is(err, errNoBackground) {
			return nil, err
		}
		s[mBytesAll] = float64(px.counters().sub(c0).Down)
		s[mStore] = float64(st.Store.Bytes)
		s[mDedup] = st.Store.DedupRatio()
		if err := b.lazyFigures(ctx, s); err != nil {
			return nil, err
		}
	} else if b.isPeer(sn) {
		b.prog.step("wait for the registry link to fall quiet")
		if err := waitQuiet(ctx, px); err != nil {
			return nil, err
		}
		s[mBytesAll] = float64(px.counters().sub(c0).Down)
	}
	b.rss(s, sn)
	// Last: it drops the caches and runs two more containers.
	if err := b.pageCacheFigures(ctx, sn, s, imgA, imgB); err != nil {
		return nil, fmt.Errorf("page cache: %w", err)
	}
	return s, nil
}

// warmPhase pulls python:big-estargz, makes it local (lazycas: waits for
// the background fetch), then takes runs samples of the warm figures.
func (b *bench) warmPhase(ctx context.Context, link, sn string, runs int, c *cell) error {
	if err := b.reset(ctx, sn); err != nil {
		return err
	}
	ref := b.ref(link, repoPython, tagBig)
	b.prog.step("pull")
	img, err := b.pull(ctx, sn, ref)
	if err != nil {
		return err
	}
	b.prog.step("first read")
	first, err := runContainer(ctx, b.env, sn, img, "RESULT", "python3", "-c", readBigScript)
	if err != nil {
		return err
	}
	n, secs, err := first.result()
	if err != nil {
		return err
	}
	coldRead := n / secs / 1e6
	if sn == snLazycas {
		b.prog.step("wait for the background fetch")
		if _, err := waitFetched(ctx, b.env, ref); err != nil && !errors.Is(err, errNoBackground) {
			return err
		}
	} else if b.isPeer(sn) {
		b.prog.step("wait for the registry link to fall quiet")
		if err := waitQuiet(ctx, b.proxies[link]); err != nil {
			return err
		}
	}
	for i := 0; i < runs; i++ {
		s := sample{mReadBytes: n}
		if i == 0 {
			s[mColdRead] = coldRead
		}
		steps := []struct {
			what, script string
			drop         bool
			record       func(count, secs float64)
		}{
			{"warm read", readBigScript, true, func(n, t float64) { s[mWarmRead] = n / t / 1e6 }},
			{"hot read", readBigScript, false, func(n, t float64) { s[mHotRead] = n / t / 1e6 }},
			{"find / -xdev", findScript, true, func(n, t float64) { s[mFind], s[mWalkCount] = t, n }},
			{"stat walk", statWalkScript, true, func(_, t float64) { s[mStatWalk] = t }},
		}
		for _, st := range steps {
			b.prog.step(fmt.Sprintf("%s (%d/%d)", st.what, i+1, runs))
			if st.drop {
				if err := dropCaches(); err != nil {
					return err
				}
			}
			r, err := runContainer(ctx, b.env, sn, img, "RESULT", "python3", "-c", st.script)
			if err != nil {
				return fmt.Errorf("%s: %w", st.what, err)
			}
			cnt, t, err := r.result()
			if err != nil {
				return fmt.Errorf("%s: %w", st.what, err)
			}
			st.record(cnt, t)
		}
		if i == runs-1 {
			b.rss(s, sn)
		}
		c.add(s)
		b.prog.logf("  %s %s warm #%d: read %.0f MB/s (hot %.0f), find %.2f s, stat walk %.2f s",
			link, sn, i+1, s[mWarmRead], s[mHotRead], s[mFind], s[mStatWalk])
	}
	return nil
}

func (b *bench) isPeer(sn string) bool {
	_, ok := b.peers[sn]
	return ok
}

// profileRunOnce runs wl on lazycas with FUSE debug logging and counts
// what happened.
func (b *bench) profileRunOnce(ctx context.Context, link, wl string) profileRun {
	pr := profileRun{Link: link, Workload: wl}
	px := b.proxies[link]
	c0 := px.counters()
	_, err := b.coldRun(ctx, link, wl, snLazycas)
	pr.Proxy = px.counters().sub(c0)
	if err != nil {
		pr.Error = err.Error()
		return pr
	}
	if st, err := daemonStats(ctx, b.env); err == nil {
		pr.FetchRequests, pr.FetchBytes = st.Fetch.Requests, st.Fetch.BytesFetched
		pr.StoreFiles, pr.StoreBytes = st.Store.FetchedFiles, st.Store.FetchedBytes
	}
	ops, err := countFuseOps(b.env.LogPaths()[1], b.logOff)
	if err != nil {
		pr.Error = err.Error()
	}
	pr.FuseOps = ops
	return pr
}

// profileWalks counts the FUSE requests of the warm tree walks on lazycas:
// python:estargz pulled and fetched whole, caches dropped before each
// container, and a container that only starts python for comparison.
func (b *bench) profileWalks(ctx context.Context, link string) []profileRun {
	fail := func(wl string, err error) []profileRun {
		return []profileRun{{Link: link, Workload: wl, Error: err.Error()}}
	}
	if err := b.reset(ctx, snLazycas); err != nil {
		return fail("walks", err)
	}
	ref := b.ref(link, repoPython, tagPython)
	img, err := b.pull(ctx, snLazycas, ref)
	if err != nil {
		return fail("walks", err)
	}
	if _, err := waitFetched(ctx, b.env, ref); err != nil && !errors.Is(err, errNoBackground) {
		return fail("walks", err)
	}
	var out []profileRun
	for _, w := range []struct{ name, script string }{
		{"warm python start only", "print('RESULT 0 0')"},
		{"warm find / -xdev", findScript},
		{"warm lstat walk", statWalkScript},
	} {
		pr := profileRun{Link: link, Workload: w.name}
		if err := dropCaches(); err != nil {
			pr.Error = err.Error()
			out = append(out, pr)
			continue
		}
		off := fileSize(b.env.LogPaths()[1])
		if _, err := runContainer(ctx, b.env, snLazycas, img, "RESULT", "python3", "-c", w.script); err != nil {
			pr.Error = err.Error()
		}
		pr.FuseOps, err = countFuseOps(b.env.LogPaths()[1], off)
		if err != nil && pr.Error == "" {
			pr.Error = err.Error()
		}
		out = append(out, pr)
	}
	return out
}
