package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// measure runs the plan: the warm phase on the first link, the cold
// workloads round by round (every link, workload and snapshotter once per
// round), then the profile runs on the last link.
func (b *bench) measure(ctx context.Context, o options, rep *report, prefix string) error {
	var cold []string
	for _, w := range o.workloads {
		if w != wlWarm {
			cold = append(cold, w)
		}
	}
	warm := slices.Contains(o.workloads, wlWarm)
	// second runs on one link, the one its targets are set for: it
	// takes two pulls and five containers a run.
	// The learned series too, on that link: what they show does not
	// depend on it, and each adds two series to every cold workload.
	secondLink := rep.targetLink()
	onLink := func(wl, sn, link string) bool {
		return (wl != wlSecond && !slices.Contains(learnedSeries, sn)) || link == secondLink
	}
	total := 0
	var learn []string // workloads whose profiles are recorded first
	for _, wl := range cold {
		for _, sn := range o.snapshotters {
			if slices.Contains(learnedSeries, sn) && learns(wl) && !slices.Contains(learn, wl) {
				learn = append(learn, wl)
			}
			for _, l := range o.links {
				if measures(wl, sn) && onLink(wl, sn, l.Name) {
					total += o.runs
				}
			}
		}
	}
	total += len(learn)
	if warm {
		for _, sn := range o.snapshotters {
			if measures(wlWarm, sn) {
				total++
			}
		}
		rep.WarmLink = o.links[0].Name
	}
	if o.profile {
		total += len(cold)
		if warm {
			total++
		}
	}
	b.prog.setTotal(total)
	failures, logsSaved := 0, false
	fail := func(c *cell, what string, err error) error {
		b.prog.logf("  FAILED %s: %v", what, err)
		if c != nil {
			c.Errors = append(c.Errors, err.Error())
		}
		if !logsSaved {
			if serr := b.env.SaveLogs(prefix + "-logs"); serr == nil {
				b.prog.logf("  daemon logs saved in %s-logs", prefix)
				logsSaved = true
			}
		}
		failures++
		if failures >= 3 {
			return fmt.Errorf("giving up after %d failed runs; last: %w", failures, err)
		}
		return nil
	}
	// The warm phase first: it is short. Then the cold runs round by
	// round, so that a run cut short by -timeout still has every
	// combination, with fewer runs.
	if warm {
		for _, sn := range o.snapshotters {
			if !measures(wlWarm, sn) {
				continue
			}
			what := fmt.Sprintf("%s warm %s", rep.WarmLink, sn)
			b.prog.begin(what)
			c := b.res.cell(rep.WarmLink, wlWarm, sn)
			rctx, cancel := context.WithTimeout(ctx, o.runTimeout)
			err := b.warmPhase(rctx, rep.WarmLink, sn, warmSamples(o.runs), c)
			cancel()
			b.prog.end()
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if ferr := fail(c, what, err); ferr != nil {
					return ferr
				}
			}
		}
	}
	// Profiles are recorded over the first link: the files a start-up
	// opens do not depend on it.
	for _, wl := range learn {
		if err := ctx.Err(); err != nil {
			return err
		}
		what := fmt.Sprintf("%s %s: learn a profile on lazycas", o.links[0].Name, wl)
		b.prog.begin(what)
		rctx, cancel := context.WithTimeout(ctx, o.runTimeout)
		err := b.learn(rctx, o.links[0].Name, wl)
		cancel()
		b.prog.end()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if ferr := fail(b.res.cell(secondLink, wl, snLearned), what, err); ferr != nil {
				return ferr
			}
		}
	}
	for i := 0; i < o.runs; i++ {
		for _, l := range o.links {
			for _, wl := range cold {
				for _, sn := range o.snapshotters {
					if !measures(wl, sn) || !onLink(wl, sn, l.Name) {
						continue
					}
					if slices.Contains(learnedSeries, sn) && b.profiles[wl] == nil {
						continue // learning failed, and said so
					}
					if err := ctx.Err(); err != nil {
						return err
					}
					what := fmt.Sprintf("%s %s %s #%d", l.Name, wl, sn, i+1)
					b.prog.begin(what)
					rctx, cancel := context.WithTimeout(ctx, o.runTimeout)
					s, err := b.coldRun(rctx, l.Name, wl, sn)
					cancel()
					b.prog.end()
					c := b.res.cell(l.Name, wl, sn)
					if err != nil {
						if ctx.Err() != nil {
							return ctx.Err()
						}
						if ferr := fail(c, what, err); ferr != nil {
							return ferr
						}
						continue
					}
					failures = 0
					c.add(s)
					b.prog.logf("  %s: pull %.2f s, first output %.2f s, exit %.2f s, registry %.1f MB in %.0f requests",
						what, s[mPull], s[mFirst], s[mDone], s[mBytes]/1e6, s[mReqs])
				}
			}
		}
	}
	if o.profile {
		b.config = b.debugConfig()
		b.env.SetDaemonConfig(b.config)
	}
	if o.profile && len(cold) > 0 {
		link := o.links[len(o.links)-1].Name
		for _, wl := range cold {
			if err := ctx.Err(); err != nil {
				return err
			}
			b.prog.begin(fmt.Sprintf("profile %s %s lazycas (FUSE debug log)", link, wl))
			rctx, cancel := context.WithTimeout(ctx, o.runTimeout)
			pr := b.profileRunOnce(rctx, link, wl)
			cancel()
			b.prog.end()
			rep.Profile = append(rep.Profile, pr)
			b.prog.logf("  profile %s %s: %s", link, wl, pr.describe())
		}
	}
	if o.profile && warm {
		if err := ctx.Err(); err != nil {
			return err
		}
		b.prog.begin(fmt.Sprintf("profile %s warm walks lazycas (FUSE debug log)", rep.WarmLink))
		rctx, cancel := context.WithTimeout(ctx, o.runTimeout)
		prs := b.profileWalks(rctx, rep.WarmLink)
		cancel()
		b.prog.end()
		for _, pr := range prs {
			b.prog.logf("  profile %s %s: %s", pr.Link, pr.Workload, pr.describe())
		}
		rep.Profile = append(rep.Profile, prs...)
	}
	return nil
}

// measures tells whether series sn runs workload wl: lazycas on the
// stargz-converted image is a series of the cold start-ups only (second
// and warm use the images lazycas converted, on every snapshotter), the
// learned series of the workloads that learn.
func measures(wl, sn string) bool {
	if slices.Contains(learnedSeries, sn) {
		return learns(wl)
	}
	return sn != snLazycasPeer || (wl != wlSecond && wl != wlWarm)
}

// debugConfig is the daemon's config with every FUSE request logged.
func (b *bench) debugConfig() string {
	if strings.Contains(b.config, "[fs]\n") {
		return strings.Replace(b.config, "[fs]\n", "[fs]\ndebug = true\n", 1)
	}
	return b.config + "\n[fs]\ndebug = true\n"
}

func errNote(s string) string {
	if s == "" {
		return ""
	}
	return " (error: " + s + ")"
}

// fmtOps lists FUSE operation counts, most frequent first.
func fmtOps(ops map[string]int64) string {
	type kv struct {
		k string
		v int64
	}
	var all []kv
	var total int64
	for k, v := range ops {
		all = append(all, kv{k, v})
		total += v
	}
	// Ties by name: a report redone from its JSON reads the same.
	slices.SortFunc(all, func(a, b kv) int {
		if a.v != b.v {
			return int(b.v - a.v)
		}
		return strings.Compare(a.k, b.k)
	})
	parts := []string{fmt.Sprintf("%d FUSE ops", total)}
	for i, x := range all {
		if i == 6 {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %d", x.k, x.v))
	}
	return strings.Join(parts, ", ")
}
