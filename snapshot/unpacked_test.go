package snapshot

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
)

func TestUnpackedWarnsOncePerLayerAndReason(t *testing.T) {
	logger, hook := test.NewNullLogger()
	logger.SetLevel(logrus.DebugLevel)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(logger))
	u := newUnpackedLog()
	layerLabels := func(layer string) map[string]string {
		return map[string]string{LabelLayerDigest: layer, LabelImageRef: "registry.local/app:1"}
	}
	warns := func() []*logrus.Entry {
		var out []*logrus.Entry
		for _, e := range hook.AllEntries() {
			if e.Level == logrus.WarnLevel {
				out = append(out, e)
			}
		}
		return out
	}

	plain := NotLazy(ReasonNotLazyFormat, "no TOC digest annotation (convert the image with `lazycas image convert`)")
	// The same layer pulled twice (two namespaces, two chain IDs): one warning.
	u.add(ctx, "chain-1", layerLabels("sha256:a"), plain)
	u.add(ctx, "chain-2", layerLabels("sha256:a"), plain)
	// Another layer, and the same layer for another reason: warned of too.
	u.add(ctx, "chain-3", layerLabels("sha256:b"), plain)
	u.add(ctx, "chain-4", layerLabels("sha256:a"), errors.New("metadata: disk full"))
	// A layer the filesystem found for a label-less pull: its digest and
	// image come from the error.
	u.add(ctx, "chain-5", nil, &NotLazyError{Reason: ReasonUnreachable, Detail: "the registry could not be reached",
		Layer: "sha256:c", Image: "127.0.0.1/app:1"})

	w := warns()
	if len(w) != 4 {
		t.Fatalf("%d warnings, want 4 (one per layer and reason): %v", len(w), hook.AllEntries())
	}
	for i, want := range []struct{ layer, reason, says string }{
		{"sha256:a", ReasonNotLazyFormat, "lazycas image convert"},
		{"sha256:b", ReasonNotLazyFormat, "lazycas image convert"},
		{"sha256:a", ReasonMountFailed, "disk full"},
		{"sha256:c", ReasonUnreachable, "could not be reached"},
	} {
		if w[i].Data["layer"] != want.layer || w[i].Data["reason"] != want.reason || !strings.Contains(w[i].Message, want.says) {
			t.Errorf("warning %d: %v %q, want layer %s, reason %s, saying %q", i, w[i].Data, w[i].Message, want.layer, want.reason, want.says)
		}
	}
	if w[3].Data["image"] != "127.0.0.1/app:1" {
		t.Errorf("warning of a found layer names image %v", w[3].Data["image"])
	}
	counts := u.counts
	if counts[ReasonNotLazyFormat] != 3 || counts[ReasonMountFailed] != 1 || counts[ReasonUnreachable] != 1 {
		t.Errorf("counts %v: every unpacked layer counts, warned of or not", counts)
	}

	// What it remembers of warnings is bounded: the oldest is forgotten,
	// and warned of again.
	for i := range maxUnpacked {
		u.add(ctx, fmt.Sprintf("fill-%d", i), layerLabels(fmt.Sprintf("sha256:fill%d", i)), plain)
	}
	if len(u.warned) > maxUnpacked || len(u.warnedOrder) > maxUnpacked || len(u.byChain) > maxUnpacked {
		t.Errorf("remembers %d warnings (%d in order), %d layers; want at most %d", len(u.warned), len(u.warnedOrder), len(u.byChain), maxUnpacked)
	}
	before := len(warns())
	u.add(ctx, "chain-6", layerLabels("sha256:a"), plain)
	if len(warns()) != before+1 {
		t.Error("a layer forgotten since its warning was not warned of again")
	}
}
