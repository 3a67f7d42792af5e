package integration

import (
	"strings"
	"testing"

	"github.com/lazycas/lazycas/integration/testimages"
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
	}
	t.Logf("lazycas image pull says: %s", res.Layers[0].Why)
}
