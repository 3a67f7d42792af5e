package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// summary is the median, minimum and maximum of a metric's runs.
type summary struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

func summarize(xs []float64) summary {
	if len(xs) == 0 {
		return summary{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return summary{Median: med, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// metricDef says how a metric is shown.
type metricDef struct {
	key, label string
	scale      float64 // shown value = raw / scale
	format     string
}

// shown lists, per workload, the metrics of the table, in order.
var shown = map[string][]metricDef{}

func init() {
	cold := []metricDef{
		{mPull, "pull (s)", 1, "%.2f"},
		{mFirst, "pull start to first output (s)", 1, "%.2f"},
		{mDone, "pull start to exit (s)", 1, "%.2f"},
		{mCreate, "  of which: pull done to task started (s)", 1, "%.2f"},
		{mToOut, "  of which: task started to first output (s)", 1, "%.2f"},
		{mBytes, "registry bytes to exit (MB)", 1e6, "%.1f"},
		{mReqs, "registry HTTP requests", 1, "%.0f"},
		{mLazyRSS, "lazycas peak RSS (MB)", 1e6, "%.0f"},
		{mCtrdRSS, "containerd peak RSS (MB)", 1e6, "%.0f"},
		{mPeerRSS, "peer daemon peak RSS since it started (MB)", 1e6, "%.0f"},
	}
	for _, wl := range coldOrder {
		shown[wl] = cold
	}
	second := slices.Clone(cold)
	second = slices.Insert(second, 6,
		metricDef{mBytesAll, "registry bytes incl. background fetch (MB)", 1e6, "%.1f"},
		metricDef{mNewBytes, "new file bytes in the image (MB)", 1e6, "%.1f"},
	)
	second = append(second, metricDef{mStore, "store content after both (MB)", 1e6, "%.1f"},
		metricDef{mDedup, "store dedup ratio", 1, "%.2f"},
		metricDef{mPageCache, "page cache of " + sharedFile + " (in both images) after a container of each read it (MB)", 1e6, "%.1f"},
		metricDef{mPageCopies, "  that is, copies of the file", 1, "%.2f"})
	shown[wlSecond] = second
	shown[wlWarm] = []metricDef{
		{mColdRead, "first read of the 128 MiB file after the pull (MB/s)", 1, "%.0f"},
		{mWarmRead, "warm sequential read, page cache dropped (MB/s)", 1, "%.0f"},
		{mHotRead, "hot sequential read (MB/s)", 1, "%.0f"},
		{mFind, "find / -xdev, caches dropped (s)", 1, "%.3f"},
		{mStatWalk, "lstat every entry, caches dropped (s)", 1, "%.3f"},
		{mWalkCount, "entries found", 1, "%.0f"},
		{mLazyRSS, "lazycas peak RSS (MB)", 1e6, "%.0f"},
		{mCtrdRSS, "containerd peak RSS (MB)", 1e6, "%.0f"},
		{mPeerRSS, "peer daemon peak RSS since it started (MB)", 1e6, "%.0f"},
	}
}

// ratio is a snapshotter's median over another's (Base: overlayfs or a
// peer), same link and workload.
type ratio struct {
	Link        string  `json:"link"`
	Workload    string  `json:"workload"`
	Metric      string  `json:"metric"`
	Snapshotter string  `json:"snapshotter"`
	Base        string  `json:"base"`
	BaseValue   float64 `json:"baseValue"`
	Value       float64 `json:"value"`
	Ratio       float64 `json:"ratio"`
}

// ratioPair is one ratio column: Of's median over Base's.
type ratioPair struct{ Of, Base string }

// target is one of issue 7's goals, checked against this run.
type target struct {
	Name   string  `json:"name"`
	Link   string  `json:"link"`
	Value  float64 `json:"value"`
	Limit  float64 `json:"limit"`
	AtMost bool    `json:"atMost"` // value ≤ limit, else value ≥ limit
	Met    bool    `json:"met"`
	Known  bool    `json:"measured"`
}

// machine describes where the benchmark ran.
type machine struct {
	Kernel      string `json:"kernel"`
	OS          string `json:"os"`
	CPUs        int    `json:"cpus"`
	CPUModel    string `json:"cpuModel"`
	MemBytes    int64  `json:"memBytes"`
	Containerd  string `json:"containerd"`
	Go          string `json:"go"`
	Lazycas     string `json:"lazycas"`
	Passthrough *bool  `json:"fusePassthrough,omitempty"`
}

func readMachine() machine {
	m := machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.OS = grepValue("/etc/os-release", "PRETTY_NAME=", "")
	m.OS = strings.Trim(m.OS, `"`)
	m.CPUModel = grepValue("/proc/cpuinfo", "model name", ":")
	if v := grepValue("/proc/meminfo", "MemTotal:", ""); v != "" {
		var kb int64
		fmt.Sscanf(v, "%d", &kb)
		m.MemBytes = kb * 1024
	}
	if out, err := exec.Command("/usr/bin/containerd", "--version").Output(); err == nil {
		m.Containerd = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		m.Lazycas = strings.TrimSpace(string(out))
	}
	return m
}

// grepValue returns what follows prefix (and sep, if given) on the first
// line of path starting with prefix.
func grepValue(path, prefix, sep string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, prefix); ok {
			if sep != "" {
				_, rest, _ = strings.Cut(rest, sep)
			}
			return strings.TrimSpace(rest)
		}
	}
	return ""
}

// report is the JSON file of a run.
type report struct {
	Started       time.Time `json:"started"`
	Seconds       float64   `json:"seconds"`
	SetupSeconds  float64   `json:"setupSeconds"`
	Command       string    `json:"command"`
	LazycasConfig string    `json:"lazycasConfig,omitempty"`
	// Load is the machine's 1-minute load average at the end of each run:
	// anything far above 1 means other work shared the two cores.
	Load       summary               `json:"loadAverage"`
	Complete   bool                  `json:"complete"`
	Error      string                `json:"error,omitempty"`
	Machine    machine               `json:"machine"`
	Runs       int                   `json:"runs"`
	Links      []linkSpec            `json:"links"`
	LinkChecks []linkCheck           `json:"linkChecks"`
	WarmLink   string                `json:"warmLink,omitempty"`
	Workloads  map[string]string     `json:"workloads"`
	Images     map[string]*imageInfo `json:"images"`
	Cells      []*cell               `json:"cells"`
	Ratios     []ratio               `json:"ratios"`
	Targets    []target              `json:"targets"`
	Profile    []profileRun          `json:"profile,omitempty"`
	// Peers are the other snapshotters measured (-peer); Notes say what
	// their figures mean.
	Peers []peerSpec `json:"peers,omitempty"`
	Notes []string   `json:"notes,omitempty"`
}

// columns are the series of the tables and plots: overlayfs, lazycas's
// (on its own images, on the stargz-converted ones, with a learned
// profile), then the peers (stargz-snapshotter with a recorded profile
// last); once results are in, those that have any.
func (r *report) columns() []string {
	cols := slices.Clone(snapshotters)
	cols = append(cols, snLearned)
	for _, p := range r.Peers {
		cols = append(cols, p.Name)
	}
	cols = append(cols, snStargzOpt)
	if len(r.Cells) == 0 {
		return slices.DeleteFunc(cols, func(s string) bool {
			return s == snLazycasPeer || slices.Contains(learnedSeries, s)
		})
	}
	return slices.DeleteFunc(cols, func(s string) bool {
		return !slices.ContainsFunc(r.Cells, func(c *cell) bool { return c.Snapshotter == s })
	})
}

// isLazycas tells whether a series is lazycas's.
func isLazycas(sn string) bool { return snapshotterOf(sn) == snLazycas }

// ratioPairs are the ratio columns: each lazycas series over overlayfs
// and over each peer (lazycas+profile over stargz+profile alone: both
// learned), then each peer over overlayfs.
func (r *report) ratioPairs() []ratioPair {
	var lazy, peers []string
	for _, c := range r.columns() {
		switch {
		case c == snOverlay:
		case isLazycas(c):
			lazy = append(lazy, c)
		default:
			peers = append(peers, c)
		}
	}
	var out []ratioPair
	for _, l := range lazy {
		out = append(out, ratioPair{l, snOverlay})
		for _, p := range peers {
			if (l == snLearned) == (p == snStargzOpt) {
				out = append(out, ratioPair{l, p})
			}
		}
	}
	for _, p := range peers {
		out = append(out, ratioPair{p, snOverlay})
	}
	return out
}

// ratioHeaders are the ratio columns' headers: "ratio" alone when
// lazycas/overlayfs is the only one, as in every run without peers.
func (r *report) ratioHeaders() []string {
	ps := r.ratioPairs()
	if len(ps) == 1 && ps[0] == (ratioPair{snLazycas, snOverlay}) {
		return []string{"ratio"}
	}
	var hs []string
	for _, p := range ps {
		hs = append(hs, p.Of+"/"+p.Base)
	}
	return hs
}

// finish computes the summaries, ratios and targets.
func (r *report) finish(res *results) {
	r.Cells = res.cells
	var loads []float64
	for _, c := range res.cells {
		loads = append(loads, c.Samples[mLoad]...)
	}
	r.Load = summarize(loads)
	for _, c := range res.cells {
		c.Summary = map[string]summary{}
		for k, xs := range c.Samples {
			c.Summary[k] = summarize(xs)
		}
	}
	r.Ratios = nil
	for _, l := range r.Links {
		for _, wl := range allWorkloads {
			for _, pr := range r.ratioPairs() {
				o, z := res.find(l.Name, wl, pr.Base), res.find(l.Name, wl, pr.Of)
				if o == nil || z == nil {
					continue
				}
				for _, md := range shown[wl] {
					so, ok1 := o.Summary[md.key]
					sz, ok2 := z.Summary[md.key]
					if !ok1 || !ok2 || so.Median == 0 || md.key == mNewBytes {
						continue
					}
					r.Ratios = append(r.Ratios, ratio{l.Name, wl, md.key, pr.Of, pr.Base, so.Median, sz.Median, sz.Median / so.Median})
				}
			}
		}
	}
	r.Targets = r.targets(res)
}

// ratioOf is sn's median of metric over base's.
func (r *report) ratioOf(link, wl, sn, base, metric string) (float64, bool) {
	for _, x := range r.Ratios {
		if x.Link == link && x.Workload == wl && x.Snapshotter == sn && x.Base == base && x.Metric == metric {
			return x.Ratio, true
		}
	}
	return 0, false
}

// targetLink is the link issue 7's targets are set for, or the slowest
// link measured when it was not.
func (r *report) targetLink() string {
	name := ""
	for _, l := range r.Links {
		if l.Name == "100mbit-20ms" {
			return l.Name
		}
		name = l.Name
	}
	return name
}

func (r *report) targets(res *results) []target {
	tl := r.targetLink()
	var ts []target
	add := func(name, link string, v float64, ok bool, limit float64, atMost bool) {
		t := target{Name: name, Link: link, Value: v, Limit: limit, AtMost: atMost, Known: ok}
		if ok {
			t.Met = (atMost && v <= limit) || (!atMost && v >= limit)
		}
		ts = append(ts, t)
	}
	v, ok := r.ratioOf(tl, wlPrint, snLazycas, snOverlay, mFirst)
	add("cold start to first output, lazycas/overlayfs (print)", tl, v, ok, 0.10, true)
	v, ok = r.ratioOf(tl, wlSecond, snLazycas, snOverlay, mFirst)
	add("second image sharing base files, to first output, lazycas/overlayfs", tl, v, ok, 0.05, true)
	if c := res.find(tl, wlSecond, snLazycas); c != nil {
		all, nw := summarize(c.Samples[mBytesAll]), summarize(c.Samples[mNewBytes])
		ok := all.N > 0 && nw.Median > 0
		v := 0.0
		if ok {
			v = all.Median / nw.Median
		}
		add("second image: lazycas registry bytes / its new file bytes", tl, v, ok, 1.05, true)
	} else {
		add("second image: lazycas registry bytes / its new file bytes", tl, 0, false, 1.05, true)
	}
	v, ok = r.ratioOf(r.WarmLink, wlWarm, snLazycas, snOverlay, mWarmRead)
	add("warm sequential read MB/s, lazycas/overlayfs", r.WarmLink, v, ok, 0.95, false)
	v, ok = r.ratioOf(r.WarmLink, wlWarm, snLazycas, snOverlay, mFind)
	add("find / -xdev time, lazycas/overlayfs", r.WarmLink, v, ok, 1.5, true)
	return append(ts, r.peerTargets()...)
}

// peerTargets are issue 12's: against stargz-snapshotter on the same
// image (lazycas on the stargz-converted one), in every link and cold
// workload cell; the median over those cells; and readall never slower
// than a full pull.
func (r *report) peerTargets() []target {
	var ts []target
	add := func(name, link string, v float64, ok bool, limit float64) {
		t := target{Name: name, Link: link, Value: v, Limit: limit, AtMost: true, Known: ok}
		t.Met = ok && v <= limit
		ts = append(ts, t)
	}
	lazy := snLazycasPeer
	if !slices.Contains(r.columns(), lazy) {
		lazy = snLazycas
	}
	var times []float64
	if slices.Contains(r.columns(), stargzName) {
		for _, l := range r.Links {
			for _, wl := range coldOrder {
				v, ok := r.ratioOf(l.Name, wl, lazy, stargzName, mFirst)
				if !ok {
					continue
				}
				times = append(times, v)
				add(fmt.Sprintf("%s: first output, %s/%s", wl, lazy, stargzName), l.Name, v, ok, 1.0)
				b, ok := r.ratioOf(l.Name, wl, lazy, stargzName, mBytes)
				add(fmt.Sprintf("%s: registry bytes to exit, %s/%s", wl, lazy, stargzName), l.Name, b, ok, 1.2)
			}
		}
		m := summarize(times)
		add(fmt.Sprintf("median over %d cells of first output, %s/%s", m.N, lazy, stargzName), "all", m.Median, m.N > 0, 0.75)
	}
	for _, l := range r.Links {
		for _, wl := range coldOrder {
			if v, ok := r.ratioOf(l.Name, wl, snLearned, snStargzOpt, mFirst); ok {
				add(fmt.Sprintf("%s: first output, %s/%s", wl, snLearned, snStargzOpt), l.Name, v, ok, 1.0)
			}
		}
	}
	for _, l := range r.Links {
		if v, ok := r.ratioOf(l.Name, wlRead, lazy, snOverlay, mFirst); ok {
			add(fmt.Sprintf("readall: first output, %s/overlayfs", lazy), l.Name, v, ok, 1.0)
		}
	}
	return ts
}

func (r *report) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func fmtSummary(s summary, md metricDef) string {
	if s.N == 0 {
		return "—"
	}
	f := func(x float64) string { return fmt.Sprintf(md.format, x/md.scale) }
	if s.N == 1 {
		return f(s.Median)
	}
	return fmt.Sprintf("%s [%s–%s]", f(s.Median), f(s.Min), f(s.Max))
}

func fmtRatio(v float64, ok bool) string {
	if !ok || math.IsInf(v, 0) || math.IsNaN(v) {
		return "—"
	}
	if v < 0.1 {
		return fmt.Sprintf("%.3f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// tableRows lists the rows of one link's table: workload, metric, each
// snapshotter's summary, and each ratio to overlayfs.
func (r *report) tableRows(link string, res *results) [][]string {
	cols := r.columns()
	pairs := r.ratioPairs()
	var rows [][]string
	for _, wl := range allWorkloads {
		cells := make([]*cell, len(cols))
		found := false
		for i, sn := range cols {
			cells[i] = res.find(link, wl, sn)
			found = found || cells[i] != nil
		}
		if !found {
			continue
		}
		first := true
		for _, md := range shown[wl] {
			row := []string{"", md.label}
			n := 0
			for _, c := range cells {
				var sm summary
				if c != nil {
					sm = c.Summary[md.key]
				}
				n += sm.N
				row = append(row, fmtSummary(sm, md))
			}
			if n == 0 {
				continue
			}
			if first {
				row[0], first = wl, false
			}
			for _, pr := range pairs {
				v, ok := r.ratioOf(link, wl, pr.Of, pr.Base, md.key)
				row = append(row, fmtRatio(v, ok))
			}
			rows = append(rows, row)
		}
		for _, c := range cells {
			if c != nil && len(c.Errors) > 0 {
				row := make([]string, len(r.header()))
				row[1] = fmt.Sprintf("%s: %d failed run(s)", c.Snapshotter, len(c.Errors))
				rows = append(rows, row)
			}
		}
	}
	return rows
}

// header is the tables' header row.
func (r *report) header() []string {
	return append(append([]string{"workload", "metric"}, r.columns()...), r.ratioHeaders()...)
}

// ratioNote says what the ratio columns divide.
func (r *report) ratioNote() string {
	if len(r.ratioHeaders()) == 1 {
		return "ratio = lazycas / overlayfs"
	}
	return "X/Y = X's median / Y's"
}

// writeText writes the tables for the terminal.
func (r *report) writeText(w io.Writer, res *results) {
	fmt.Fprintf(w, "\nlazycas benchmark, %s; %d cold run(s) each, %d warm samples: median [min–max]; %s\n",
		r.Started.Format("2006-01-02 15:04"), r.Runs, warmSamples(r.Runs), r.ratioNote())
	fmt.Fprintf(w, "machine: %s, %d CPUs (%s), kernel %s, %s\n", r.Machine.OS, r.Machine.CPUs, r.Machine.CPUModel,
		r.Machine.Kernel, r.Machine.Containerd)
	fmt.Fprintf(w, "%s\n", r.loadNote())
	if r.LazycasConfig != "" {
		fmt.Fprintf(w, "lazycas config added: %q\n", r.LazycasConfig)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	header := r.header()
	for _, l := range r.Links {
		rows := r.tableRows(l.Name, res)
		if len(rows) == 0 {
			continue
		}
		fmt.Fprintf(w, "\nlink %s%s\n", l.Name, r.checkNote(l.Name))
		widths := make([]int, len(header))
		for _, row := range append([][]string{header}, rows...) {
			for i, c := range row {
				widths[i] = max(widths[i], len([]rune(c)))
			}
		}
		line := func(row []string) {
			var b strings.Builder
			for i, c := range row {
				pad := widths[i] - len([]rune(c))
				if i >= 2 {
					b.WriteString(strings.Repeat(" ", pad) + c)
				} else {
					b.WriteString(c + strings.Repeat(" ", pad))
				}
				b.WriteString("  ")
			}
			fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
		}
		line(header)
		for _, row := range rows {
			line(row)
		}
	}
	if len(r.Profile) > 0 {
		fmt.Fprintf(w, "\nlazycas profile runs (every FUSE request logged; counts, not timings)\n")
		for _, p := range r.Profile {
			fmt.Fprintf(w, "  %s %s: %s\n", p.Link, p.Workload, p.describe())
		}
	}
	fmt.Fprintf(w, "\ntargets (issues 7 and 12)\n")
	for _, t := range r.Targets {
		fmt.Fprintf(w, "  %-4s %s at %s: %s (target %s %.2f)\n", mark(t), t.Name, t.Link, fmtRatio(t.Value, t.Known), cmp(t), t.Limit)
	}
}

func mark(t target) string {
	switch {
	case !t.Known:
		return "n/a"
	case t.Met:
		return "met"
	}
	return "MISS"
}

func cmp(t target) string {
	if t.AtMost {
		return "≤"
	}
	return "≥"
}

func (r *report) loadNote() string {
	return fmt.Sprintf("machine load (1-min load average after each run): median %.1f, max %.1f", r.Load.Median, r.Load.Max)
}

func (r *report) checkNote(link string) string {
	for _, c := range r.LinkChecks {
		if c.Link == link {
			return fmt.Sprintf(" (measured: %.1f ms HTTP round trip, %.1f MB/s)", c.RoundTripMs, c.ThroughputMBps)
		}
	}
	return ""
}

// writeMarkdown writes the tables as Markdown, for the README.
func (r *report) writeMarkdown(w io.Writer, res *results) {
	fmt.Fprintf(w, "%d cold run(s) each, %d warm samples; median [min–max]; %s in the same run. %s, %d CPUs, kernel %s, %s.\n",
		r.Runs, warmSamples(r.Runs), r.ratioNote(), r.Machine.OS, r.Machine.CPUs, r.Machine.Kernel, r.Machine.Containerd)
	fmt.Fprintf(w, "%s.\n", strings.ToUpper(r.loadNote()[:1])+r.loadNote()[1:])
	for _, n := range r.Notes {
		fmt.Fprintf(w, "\nNote: %s.\n", n)
	}
	r.writeMatrix(w, res)
	header := r.header()
	align := "|---|---|" + strings.Repeat("--:|", len(header)-2)
	for _, l := range r.Links {
		rows := r.tableRows(l.Name, res)
		if len(rows) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n**%s**%s\n\n| %s |\n%s\n", l.Name, r.checkNote(l.Name), strings.Join(header, " | "), align)
		for _, row := range rows {
			fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
		}
	}
	if len(r.Profile) > 0 {
		fmt.Fprintf(w, "\nProfile runs of lazycas (every FUSE request logged; counts, not timings):\n\n")
		for _, p := range r.Profile {
			fmt.Fprintf(w, "- %s %s: %s\n", p.Link, p.Workload, p.describe())
		}
	}
	fmt.Fprintf(w, "\n| target (issues 7 and 12) | link | measured | target | |\n|---|---|--:|--:|---|\n")
	for _, t := range r.Targets {
		fmt.Fprintf(w, "| %s | %s | %s | %s %.2f | %s |\n", t.Name, t.Link, fmtRatio(t.Value, t.Known), cmp(t), t.Limit, mark(t))
	}
}

func (p profileRun) describe() string {
	d := fmtOps(p.FuseOps)
	if p.Proxy.Requests > 0 {
		d += fmt.Sprintf("; registry: %d requests (%d with a Range header, %d ranges), %.1f MB; lazycas counted %d requests; %d files sealed",
			p.Proxy.Requests, p.Proxy.Ranged, p.Proxy.Ranges, float64(p.Proxy.Down)/1e6, p.FetchRequests, p.StoreFiles)
	}
	return d + errNote(p.Error)
}

// writeMatrix writes the cold start-ups at a glance: per workload and
// link, each series' median time to first output, then lazycas's ratios
// to overlayfs and to stargz-snapshotter on the same image, and the
// registry bytes of both.
func (r *report) writeMatrix(w io.Writer, res *results) {
	cols := slices.DeleteFunc(r.columns(), func(s string) bool { return s == snLazycas })
	lazy := snLazycasPeer
	if !slices.Contains(cols, lazy) {
		lazy = snLazycas
		cols = r.columns()
	}
	hasStargz := slices.Contains(cols, stargzName)
	var rows []string
	for _, wl := range coldOrder {
		for _, l := range r.Links {
			if res.find(l.Name, wl, lazy) == nil {
				continue
			}
			row := []string{wl, l.Name}
			for _, sn := range cols {
				sm := summary{}
				if c := res.find(l.Name, wl, sn); c != nil {
					sm = c.Summary[mFirst]
				}
				row = append(row, fmtSummary(sm, metricDef{format: "%.2f", scale: 1}))
			}
			v, ok := r.ratioOf(l.Name, wl, lazy, snOverlay, mFirst)
			row = append(row, fmtRatio(v, ok))
			if hasStargz {
				v, ok = r.ratioOf(l.Name, wl, lazy, stargzName, mFirst)
				row = append(row, fmtRatio(v, ok))
				mbOf := func(sn string) string {
					if c := res.find(l.Name, wl, sn); c != nil && c.Summary[mBytes].N > 0 {
						return fmt.Sprintf("%.1f", c.Summary[mBytes].Median/1e6)
					}
					return "—"
				}
				v, ok = r.ratioOf(l.Name, wl, lazy, stargzName, mBytes)
				row = append(row, mbOf(lazy)+" / "+mbOf(stargzName)+" ("+fmtRatio(v, ok)+")")
			}
			rows = append(rows, "| "+strings.Join(row, " | ")+" |")
		}
	}
	if len(rows) == 0 {
		return
	}
	header := append([]string{"workload", "link"}, cols...)
	header = append(header, lazy+"/overlayfs")
	if hasStargz {
		header = append(header, lazy+"/stargz", "registry MB, "+lazy+" / stargz")
	}
	fmt.Fprintf(w, "\nCold start, pull start to first output (s), median [min–max]:\n\n| %s |\n|---|---|%s\n%s\n",
		strings.Join(header, " | "), strings.Repeat("--:|", len(header)-2), strings.Join(rows, "\n"))
}
