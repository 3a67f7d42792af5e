package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
)

// TestMetricsScrape runs python from a lazily pulled image on a daemon
// serving metrics, scrapes them as Prometheus would, and checks the scrape
// with promtool and by its figures: what the container did shows.
func TestMetricsScrape(t *testing.T) {
	requireIntegration(t)
	addr := freeAddress(t)
	env := newEnvWith(t, testenv.Options{DaemonConfig: fmt.Sprintf("metrics_address = %q\n", addr)})
	ctx := testContext(t)
	ref := convertPython(ctx, t, env, convert.EStargz, nil)
	img, err := env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
	if err != nil {
		t.Fatal(err)
	}
	res, err := env.Run(ctx, img, testenv.UniqueID("metrics"), "python3", "-c", "import json; print(1)")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("python on lazycas: %v, %+v", err, res)
	}

	// A collection, for the GC series: to nothing, so that it frees
	// what python's run brought (open objects stay).
	gc, err := postGC(ctx, env, 0)
	if err != nil {
		t.Fatal(err)
	}

	body, fams := scrapeMetrics(ctx, t, addr)

	value := func(name string, labels map[string]string) (float64, bool) {
		f := fams[name]
		if f == nil {
			return 0, false
		}
	next:
		for _, m := range f.Metric {
			for k, v := range labels {
				if !hasLabel(m, k, v) {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue(), true
			case m.Gauge != nil:
				return m.Gauge.GetValue(), true
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount()), true
			}
		}
		return 0, false
	}
	for _, want := range []struct {
		name   string
		labels map[string]string
		why    string
	}{
		{"lazycas_layers_mounted", nil, "the image's layers are mounted lazily"},
		{"lazycas_fetch_bytes_total", nil, "python's files came from the registry"},
		{"lazycas_fetch_requests_total", nil, "python's files came from the registry"},
		{"lazycas_store_objects", nil, "the fetched files are in the store"},
		{"lazycas_fuse_request_duration_seconds", map[string]string{"op": "lookup"}, "python looked its files up"},
		{"lazycas_fuse_request_duration_seconds", map[string]string{"op": "open"}, "python opened its files"},
		{"lazycas_image_file_bytes", map[string]string{"ref": ref}, "the image is mounted"},
		{"process_resident_memory_bytes", nil, "the daemon's memory is reported"},
		{"lazycas_fetch_response_seconds", nil, "requests to the registry were timed to their headers"},
		{"lazycas_fetch_request_duration_seconds", nil, "successful range requests were timed"},
		{"lazycas_layer_fetch_requests_total", map[string]string{"outcome": "ok"}, "each mounted layer read its TOC at least"},
		{"lazycas_layer_fetch_bytes_total", map[string]string{"outcome": "ok"}, "each mounted layer read its TOC at least"},
		{"lazycas_store_gc_runs_total", nil, "the test asked for a collection"},
	} {
		v, ok := value(want.name, want.labels)
		if !ok || v <= 0 {
			t.Errorf("%s%v = %v (present %v), want > 0: %s", want.name, want.labels, v, ok, want.why)
		}
	}
	// Counters of a collection are exact: no store budget, so the test's
	// was the only one.
	if v, _ := value("lazycas_store_gc_freed_bytes_total", nil); v != float64(gc.Freed) {
		t.Errorf("lazycas_store_gc_freed_bytes_total = %v, the collection freed %d", v, gc.Freed)
	}
	if v, _ := value("lazycas_store_gc_removed_objects_total", nil); v != float64(gc.Removed) {
		t.Errorf("lazycas_store_gc_removed_objects_total = %v, the collection removed %d", v, gc.Removed)
	}
	// Per-layer series name only mounted layers (that bounds them), each
	// with every outcome; every mounted layer is in one background phase.
	mounted, _ := value("lazycas_layers_mounted", nil)
	for _, name := range []string{"lazycas_layer_fetch_requests_total", "lazycas_layer_fetch_bytes_total",
		"lazycas_background_fetch_pending_files", "lazycas_background_fetch_pending_bytes",
		"lazycas_background_fetched_files_total", "lazycas_background_fetched_bytes_total"} {
		layers := map[string]bool{}
		if f := fams[name]; f != nil {
			for _, m := range f.Metric {
				for _, l := range m.Label {
					if l.GetName() == "layer" {
						layers[l.GetValue()] = true
					}
				}
			}
		}
		if len(layers) == 0 || float64(len(layers)) > mounted {
			t.Errorf("%s has series of %d layers, want 1 to %v (the mounted ones)", name, len(layers), mounted)
		}
	}
	var phases float64
	if f := fams["lazycas_background_fetch_layers"]; f != nil {
		for _, m := range f.Metric {
			phases += m.Gauge.GetValue()
		}
	}
	if phases != mounted {
		t.Errorf("lazycas_background_fetch_layers sums to %v over its phases, %v layers are mounted", phases, mounted)
	}
	t.Logf("scraped %d bytes, %d metric families; promtool and the figures agree with what the container did", len(body), len(fams))
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.Label {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

// scrapeMetrics scrapes the daemon's metrics at addr, checks the scrape
// with promtool, and parses it.
func scrapeMetrics(ctx context.Context, t *testing.T, addr string) ([]byte, map[string]*dto.MetricFamily) {
	t.Helper()
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s, %v", resp.Status, err)
	}

	if promtool, err := exec.LookPath("promtool"); err != nil {
		t.Errorf("no promtool to check the scrape with (script/install-deps.sh installs Debian's prometheus): %v", err)
	} else {
		cmd := exec.CommandContext(ctx, promtool, "check", "metrics")
		cmd.Stdin = bytes.NewReader(body)
		if out, err := cmd.CombinedOutput(); err != nil {
			p := filepath.Join(t.TempDir(), "scrape.txt")
			_ = os.WriteFile(p, body, 0o644)
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	}

	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse the scrape: %v", err)
	}
	return body, fams
}

// freeAddress is a loopback address nothing listens on, for the daemon's
// metrics.
func freeAddress(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
