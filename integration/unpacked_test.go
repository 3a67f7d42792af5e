package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
	"github.com/lazycas/lazycas/service"
	"github.com/lazycas/lazycas/snapshot"
)

// TestPullSaysWhyALayerIsNotLazy pulls a plain (gzip) image into lazycas
// with the CLI: containerd unpacks its layer, and the CLI says why lazycas
// did not mount it, with what would make it lazy.
func TestPullSaysWhyALayerIsNotLazy(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	pushed, err := env.PushImage(ctx, testimages.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	res, err := env.PullWithCLI(ctx, cliBin, pushed.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Layers) == 0 {
		t.Fatal("the pull reports no layer")
	}
	for _, l := range res.Layers {
		if l.Mode != "unpacked" || !strings.Contains(l.Why, "no TOC digest annotation") || !strings.Contains(l.Why, "lazycas image convert") {
			t.Errorf("layer %s: mode %q, why %q; want unpacked, with the missing TOC and the fix", l.Digest, l.Mode, l.Why)
		}
		// The reason label of lazycas_layers_unpacked_total and of the API.
		if l.Reason != snapshot.ReasonNotLazyFormat {
			t.Errorf("layer %s: reason %q, want %s", l.Digest, l.Reason, snapshot.ReasonNotLazyFormat)
		}
	}
	t.Logf("lazycas image pull says: %s", res.Layers[0].Why)
}

// TestLabellessPullWithoutHostsTomlSaysWhy pulls a lazy image without
// image labels (as `ctr images pull` does) from a registry on a port, on a
// daemon with no hosts.toml for the registry's bare host: containerd's
// content labels name the host without its port, so lazycas cannot reach
// the registry and containerd unpacks the layers. The daemon's API, log
// and metric must agree on why (registry-unreachable) and say what to do.
func TestLabellessPullWithoutHostsTomlSaysWhy(t *testing.T) {
	requireIntegration(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	// A [remote] table of its own: the environment then writes no
	// hosts.toml for the bare host. No retries: a refused connection
	// fails at once.
	env := newEnvWith(t, testenv.Options{DaemonConfig: testenv.JSONLogConfig + fmt.Sprintf("metrics_address = %q\n[remote]\nretries = 0\n", addr)})
	ctx := testContext(t)
	ref := convertImage(ctx, t, env, testimages.Busybox, convert.EStargz)
	img, err := env.Pull(ctx, ref)
	if err != nil {
		t.Fatalf("containerd unpacks what lazycas cannot mount, so the pull succeeds: %v", err)
	}
	res, err := env.Run(ctx, img, testenv.UniqueID("unpacked"), "sh", "-c", "echo hi")
	if err != nil || res.Stdout != "hi\n" {
		t.Fatalf("busybox from unpacked layers: %v, %+v", err, res)
	}

	body, err := env.DaemonAPI(ctx, http.MethodGet, service.APIUnpacked, nil)
	if err != nil {
		t.Fatal(err)
	}
	var unpacked []snapshot.Unpacked
	if err := json.Unmarshal(body, &unpacked); err != nil {
		t.Fatal(err)
	}
	if len(unpacked) == 0 {
		t.Fatal("the daemon lists no unpacked layer")
	}
	host, _, _ := strings.Cut(env.RegistryHost, ":")
	for _, u := range unpacked {
		if u.Reason != snapshot.ReasonUnreachable || !strings.Contains(u.Detail, "hosts.toml for the bare host "+host) ||
			u.Layer == "" || !strings.HasPrefix(u.Image, host+"/") {
			t.Errorf("unpacked layer %+v: want reason %s, the hosts.toml fix, and the layer and image the daemon found", u, snapshot.ReasonUnreachable)
		}
	}
	t.Logf("the daemon says: %s", unpacked[0].Detail)

	// The log warns once per layer, with the reason and the layer.
	warned := map[string]int{}
	if err := env.DaemonLog(func(line []byte, msg string) error {
		if strings.Contains(msg, "layer not mounted lazily") && strings.Contains(string(line), `"level":"warning"`) {
			for _, u := range unpacked {
				if strings.Contains(string(line), u.Layer) && strings.Contains(string(line), snapshot.ReasonUnreachable) {
					warned[u.Layer]++
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, u := range unpacked {
		if warned[u.Layer] != 1 {
			t.Errorf("layer %s: %d warnings in the daemon's log, want 1", u.Layer, warned[u.Layer])
		}
	}

	// The metric counts the same reason.
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	scrape, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("lazycas_layers_unpacked_total{reason=%q} %d", snapshot.ReasonUnreachable, len(unpacked))
	if !strings.Contains(string(scrape), want+"\n") {
		t.Errorf("the scrape lacks %q", want)
	}
}
