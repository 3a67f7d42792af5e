package main

import (
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

var seriesColor = map[string]color.Color{
	snOverlay:     color.RGBA{R: 0x8c, G: 0x8c, B: 0x8c, A: 0xff},
	snLazycas:     color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	snLazycasPeer: color.RGBA{R: 0x9e, G: 0xc6, B: 0xe8, A: 0xff},
	snLearned:     color.RGBA{R: 0x17, G: 0xbe, B: 0xcf, A: 0xff},
	snStargzOpt:   color.RGBA{R: 0xff, G: 0xbb, B: 0x78, A: 0xff},
}

// peerColors colour the peers' bars, in -peer order.
var peerColors = []color.Color{
	color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff},
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
}

func colorOf(series []string, s string) color.Color {
	if c, ok := seriesColor[s]; ok {
		return c
	}
	n := 0
	for _, x := range series {
		if x == s {
			break
		}
		if _, builtin := seriesColor[x]; !builtin {
			n++
		}
	}
	return peerColors[n%len(peerColors)]
}

// bar is one bar's figures, already scaled for display.
type bar struct {
	ok            bool
	med, min, max float64
}

// barChart draws grouped bars (one group per label, one bar per series)
// with min–max error bars and the median written above each bar.
func barChart(path, title, ylabel string, groups, series []string, format string, get func(group, series string) bar) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	// A series with no bar at all (a peer without the figure) takes no
	// place and no legend entry.
	all := series // colours stay the same from chart to chart
	series = slices.DeleteFunc(slices.Clone(series), func(s string) bool {
		return !slices.ContainsFunc(groups, func(g string) bool { return get(g, s).ok })
	})
	const width = 24 * vg.Centimeter
	barW := vg.Length(float64(width) * 0.7 / float64(len(groups)*len(series)+1))
	barW = min(barW, 2*vg.Centimeter)
	ymax := 0.0
	for si, s := range series {
		vals := make(plotter.Values, len(groups))
		eb := &errBars{offset: barW * (vg.Length(si) - vg.Length(len(series)-1)/2), format: format}
		for gi, g := range groups {
			b := get(g, s)
			if !b.ok {
				continue
			}
			vals[gi] = b.med
			eb.xs = append(eb.xs, float64(gi))
			eb.med = append(eb.med, b.med)
			eb.lo = append(eb.lo, b.min)
			eb.hi = append(eb.hi, b.max)
			ymax = max(ymax, b.max)
		}
		bc, err := plotter.NewBarChart(vals, barW)
		if err != nil {
			return err
		}
		bc.Color = colorOf(all, s)
		bc.LineStyle.Width = 0
		bc.Offset = eb.offset
		p.Add(bc, eb)
		p.Legend.Add(s, bc)
	}
	p.Y.Max = ymax * 1.3
	if ymax == 0 {
		p.Y.Max = 1
	}
	p.X.Min, p.X.Max = -0.5, float64(len(groups))-0.5
	p.Legend.Top = true
	p.NominalX(groups...)
	return p.Save(width, 12*vg.Centimeter, path)
}

// errBars draws min–max bars and the median at bars shifted by offset.
type errBars struct {
	xs, med, lo, hi []float64
	offset          vg.Length
	format          string
}

func (e *errBars) Plot(c draw.Canvas, p *plot.Plot) {
	trX, trY := p.Transforms(&c)
	ls := draw.LineStyle{Color: color.Black, Width: vg.Points(1)}
	ts := draw.TextStyle{Color: color.Black, Font: font.From(plot.DefaultFont, vg.Points(8)),
		Handler: plot.DefaultTextHandler, XAlign: draw.XCenter}
	capW := vg.Points(4)
	for i := range e.xs {
		x := trX(e.xs[i]) + e.offset
		y0, y1 := trY(e.lo[i]), trY(e.hi[i])
		if e.hi[i] > e.lo[i] {
			c.StrokeLine2(ls, x, y0, x, y1)
			c.StrokeLine2(ls, x-capW, y0, x+capW, y0)
			c.StrokeLine2(ls, x-capW, y1, x+capW, y1)
		}
		c.FillText(ts, vg.Point{X: x, Y: y1 + vg.Points(3)}, fmt.Sprintf(e.format, e.med[i]))
	}
}

func (e *errBars) DataRange() (xmin, xmax, ymin, ymax float64) {
	xmin, xmax, ymin, ymax = math.Inf(1), math.Inf(-1), 0, 0
	for i := range e.xs {
		xmin, xmax = min(xmin, e.xs[i]), max(xmax, e.xs[i])
		ymax = max(ymax, e.hi[i])
	}
	if len(e.xs) == 0 {
		xmin, xmax = 0, 0
	}
	return
}

// summaryBar reads a cell's summary of metric, divided by scale.
func summaryBar(c *cell, metric string, scale float64) bar {
	if c == nil {
		return bar{}
	}
	s, ok := c.Summary[metric]
	if !ok || s.N == 0 {
		return bar{}
	}
	return bar{ok: true, med: s.Median / scale, min: s.Min / scale, max: s.Max / scale}
}

// writePlots draws the report's charts next to its JSON; it returns the
// files written.
func writePlots(prefix string, r *report, res *results) ([]string, error) {
	var files []string
	var cold []string
	for _, wl := range append(slices.Clone(coldOrder), wlSecond) {
		for _, c := range res.cells {
			if c.Workload == wl {
				cold = append(cold, wl)
				break
			}
		}
	}
	save := func(name, title, ylabel string, groups []string, format string, get func(g, s string) bar) error {
		if len(groups) == 0 {
			return nil
		}
		path := prefix + "-" + name + ".png"
		if err := barChart(path, title, ylabel, groups, r.columns(), format, get); err != nil {
			return fmt.Errorf("plot %s: %w", filepath.Base(path), err)
		}
		files = append(files, path)
		return nil
	}
	for _, l := range r.Links {
		if err := save("cold-"+l.Name, fmt.Sprintf("Cold start over %s: pull start to first output (median, min–max of %d)", l.Name, r.Runs),
			"seconds", cold, "%.2f", func(g, s string) bar { return summaryBar(res.find(l.Name, g, s), mFirst, 1) }); err != nil {
			return files, err
		}
		if err := save("bytes-"+l.Name, fmt.Sprintf("Bytes the registry served over %s (second: incl. background fetch)", l.Name),
			"MB", cold, "%.1f", func(g, s string) bar {
				m := mBytes
				if g == wlSecond {
					m = mBytesAll
				}
				return summaryBar(res.find(l.Name, g, s), m, 1e6)
			}); err != nil {
			return files, err
		}
	}
	var links []string
	for _, l := range r.Links {
		links = append(links, l.Name)
	}
	for _, wl := range cold {
		if err := save(wl, fmt.Sprintf("%s: pull start to first output", wl), "seconds", links, "%.2f",
			func(g, s string) bar { return summaryBar(res.find(g, wl, s), mFirst, 1) }); err != nil {
			return files, err
		}
	}
	var pcLinks []string
	for _, l := range links {
		for _, sn := range r.columns() {
			if summaryBar(res.find(l, wlSecond, sn), mPageCache, 1).ok {
				pcLinks = append(pcLinks, l)
				break
			}
		}
	}
	if err := save("pagecache", "Page cache of "+sharedFile+" after a container of each of two images read it (MB)", "MB",
		pcLinks, "%.1f", func(g, s string) bar { return summaryBar(res.find(g, wlSecond, s), mPageCache, 1e6) }); err != nil {
		return files, err
	}
	if r.WarmLink != "" {
		labels := map[string]string{mColdRead: "first read after pull", mWarmRead: "warm read", mHotRead: "hot read",
			mFind: "find / -xdev", mStatWalk: "lstat all"}
		metrics := map[string]string{}
		for k, v := range labels {
			metrics[v] = k
		}
		get := func(g, s string) bar { return summaryBar(res.find(r.WarmLink, wlWarm, s), metrics[g], 1) }
		if err := save("warm-read", "Sequential read of a 128 MiB file (MB/s)", "MB/s",
			[]string{labels[mColdRead], labels[mWarmRead], labels[mHotRead]}, "%.0f", get); err != nil {
			return files, err
		}
		if err := save("warm-walk", "Tree walk with cold dentry and inode caches (s)", "seconds",
			[]string{labels[mFind], labels[mStatWalk]}, "%.3f", get); err != nil {
			return files, err
		}
	}
	return files, nil
}
