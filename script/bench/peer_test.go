package main

import (
	"flag"
	"io"
	"math"
	"slices"
	"strings"
	"testing"
)

func TestPeerFlag(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want []peerSpec
		err  string // a substring of the error; "" for none
	}{
		{"takes the labels CRI sends by default",
			[]string{"-peer", "stargz=/run/stargz.sock"},
			[]peerSpec{{"stargz", "/run/stargz.sock", labelsCRI}}, ""},
		{"takes a labels mode after a comma",
			[]string{"-peer", "soci=/run/soci.sock,none"},
			[]peerSpec{{"soci", "/run/soci.sock", labelsNone}}, ""},
		{"repeats, in order",
			[]string{"--peer", "b=/b.sock,cri", "--peer=a=/a.sock,none"},
			[]peerSpec{{"b", "/b.sock", labelsCRI}, {"a", "/a.sock", labelsNone}}, ""},
		{"keeps dots, dashes and underscores in a name",
			[]string{"-peer", "lazy-2.peer_x=/tmp/x.sock"},
			[]peerSpec{{"lazy-2.peer_x", "/tmp/x.sock", labelsCRI}}, ""},
		{"rejects a missing socket", []string{"-peer", "stargz"}, nil, "want NAME=SOCKET"},
		{"rejects an empty socket", []string{"-peer", "stargz="}, nil, "want NAME=SOCKET"},
		{"rejects an empty name", []string{"-peer", "=/run/x.sock"}, nil, "want NAME=SOCKET"},
		{"rejects a relative socket", []string{"-peer", "stargz=run/x.sock"}, nil, "absolute"},
		{"rejects an unknown labels mode", []string{"-peer", "stargz=/x.sock,nerdctl"}, nil, `labels "nerdctl"`},
		{"rejects a name containerd has", []string{"-peer", "overlayfs=/x.sock"}, nil, "already has"},
		{"rejects lazycas's name", []string{"-peer", "lazycas=/x.sock"}, nil, "already has"},
		{"rejects a name that is no TOML bare key", []string{"-peer", "my peer=/x.sock"}, nil, "letters, digits"},
		{"rejects a name given twice", []string{"-peer", "p=/a.sock", "-peer", "p=/b.sock"}, nil, "given twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("bench", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			var peers peerFlags
			fs.Var(&peers, "peer", "")
			err := fs.Parse(tc.args)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(peers, tc.want) {
				t.Errorf("parsed %+v, want %+v", peers, tc.want)
			}
		})
	}
}

func TestMeasuredSnapshottersAddsPeers(t *testing.T) {
	peers := []peerSpec{{"stargz", "/s.sock", labelsCRI}, {"soci", "/t.sock", labelsNone}}
	for _, tc := range []struct {
		list string
		want []string
		err  bool
	}{
		{"overlayfs,lazycas", []string{"overlayfs", "lazycas", "stargz", "soci"}, false},
		{"overlayfs,soci", []string{"overlayfs", "soci", "stargz"}, false},
		{"lazycas, lazycas", []string{"lazycas", "stargz", "soci"}, false},
		{"overlayfs,nydus", nil, true},
	} {
		got, err := measuredSnapshotters(tc.list, peers)
		if (err != nil) != tc.err || !slices.Equal(got, tc.want) {
			t.Errorf("measuredSnapshotters(%q) = %v, %v; want %v (error %v)", tc.list, got, err, tc.want, tc.err)
		}
	}
}

func TestReportColumnsWithPeers(t *testing.T) {
	r := &report{}
	if h := r.header(); !slices.Equal(h, []string{"workload", "metric", "overlayfs", "lazycas", "ratio"}) {
		t.Errorf("header without peers %v: the published tables have this one", h)
	}
	r.Peers = []peerSpec{{"stargz", "/s.sock", labelsCRI}}
	want := []string{"workload", "metric", "overlayfs", "lazycas", "stargz", "lazycas/overlayfs", "lazycas/stargz", "stargz/overlayfs"}
	if h := r.header(); !slices.Equal(h, want) {
		t.Errorf("header %v, want %v", h, want)
	}
	res := &results{}
	res.cell("loopback", wlPrint, snOverlay).add(sample{mFirst: 2})
	res.cell("loopback", wlPrint, snLazycas).add(sample{mFirst: 1})
	res.cell("loopback", wlPrint, "stargz").add(sample{mFirst: 0.5, mPeerRSS: 30e6})
	r.Links = []linkSpec{{Name: "loopback"}}
	r.finish(res)
	rows := r.tableRows("loopback", res)
	var first, rss []string
	for _, row := range rows {
		if len(row) != len(want) {
			t.Fatalf("row %v has %d columns, want %d", row, len(row), len(want))
		}
		switch row[1] {
		case "pull start to first output (s)":
			first = row
		case "peer daemon peak RSS since it started (MB)":
			rss = row
		}
	}
	if !slices.Equal(first, []string{"print", "pull start to first output (s)", "2.00", "1.00", "0.50", "0.50", "2.00", "0.25"}) {
		t.Errorf("first-output row %v", first)
	}
	if rss == nil || rss[4] != "30" || rss[2] != "—" || rss[7] != "—" {
		t.Errorf("peer RSS row %v: the peer's figure only, no ratio", rss)
	}
}

func TestPeerTargetsCompareTheSameImage(t *testing.T) {
	res := &results{}
	add := func(link, wl, sn string, first, bytes float64) {
		res.cell(link, wl, sn).add(sample{mFirst: first, mBytes: bytes})
	}
	for _, l := range []string{"100mbit-0ms", "100mbit-20ms"} {
		add(l, wlPrint, snOverlay, 10, 70e6)
		add(l, wlPrint, snLazycas, 0.5, 5e6) // not the image stargz pulls
		add(l, wlPrint, snLazycasPeer, 1.0, 6e6)
		add(l, wlPrint, stargzName, 2.0, 6e6)
	}
	add("100mbit-0ms", wlImportFew, snOverlay, 10, 70e6)
	add("100mbit-0ms", wlImportFew, snLazycasPeer, 3.0, 20e6)
	add("100mbit-0ms", wlImportFew, stargzName, 2.0, 10e6)
	r := &report{Links: []linkSpec{{Name: "100mbit-0ms"}, {Name: "100mbit-20ms"}}, Peers: []peerSpec{{stargzName, "/s.sock", labelsCRI}}}
	r.finish(res)
	if cols := r.columns(); !slices.Equal(cols, []string{snOverlay, snLazycas, snLazycasPeer, stargzName}) {
		t.Fatalf("columns %v", cols)
	}
	got := map[string]target{}
	for _, tg := range r.peerTargets() {
		got[tg.Link+" "+tg.Name] = tg
	}
	for _, tc := range []struct {
		key string
		v   float64
		met bool
	}{
		{"100mbit-0ms print: first output, lazycas@stargz-image/stargz", 0.5, true},
		{"100mbit-0ms print: registry bytes to exit, lazycas@stargz-image/stargz", 1.0, true},
		{"100mbit-0ms import-few: first output, lazycas@stargz-image/stargz", 1.5, false},
		{"100mbit-0ms import-few: registry bytes to exit, lazycas@stargz-image/stargz", 2.0, false},
		{"all median over 3 cells of first output, lazycas@stargz-image/stargz", 0.5, true},
	} {
		tg, ok := got[tc.key]
		if !ok {
			t.Errorf("no target %q in %v", tc.key, got)
			continue
		}
		if math.Abs(tg.Value-tc.v) > 1e-9 || tg.Met != tc.met || !tg.Known {
			t.Errorf("%s = %.3f met %v, want %.3f met %v", tc.key, tg.Value, tg.Met, tc.v, tc.met)
		}
	}
}
