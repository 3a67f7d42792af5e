package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/image-spec/identity"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/service"
	"github.com/lazycas/lazycas/service/resolver"
	"github.com/lazycas/lazycas/snapshot"
)

// pullResult is what `image pull --json` prints.
type pullResult struct {
	Image       string        `json:"image"`
	Digest      string        `json:"digest"`
	Snapshotter string        `json:"snapshotter"`
	Seconds     float64       `json:"seconds"`
	Layers      []layerResult `json:"layers"`
	// Note says why unpacked layers have no reason: the daemon's API did
	// not answer.
	Note string `json:"note,omitempty"`
}

type layerResult struct {
	Digest    string `json:"digest"`
	MediaType string `json:"mediaType"`
	Size      int64  `json:"size"`
	ChainID   string `json:"chainID"`
	// Mode is "lazy" (mounted from the registry) or "unpacked".
	Mode string `json:"mode"`
	// Why, for an unpacked layer, is what the daemon said of it, and
	// Reason its class: the reason label of the daemon's
	// lazycas_layers_unpacked_total and of GET /v1/layers/unpacked.
	Why    string `json:"why,omitempty"`
	Reason string `json:"reason,omitempty"`
	// DiskUsage is what the snapshot holds on the node's disk.
	DiskUsage int64 `json:"diskUsage"`
}

func imagePull(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas image pull", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintln(stderr, "usage: lazycas image pull [flags] REF")
		flags.PrintDefaults()
	}
	ns := os.Getenv(namespaces.NamespaceEnvVar)
	if ns == "" {
		ns = namespaces.Default
	}
	var (
		address     = flags.String("address", "/run/containerd/containerd.sock", "containerd's socket")
		namespace   = flags.String("namespace", ns, "containerd namespace (default from $CONTAINERD_NAMESPACE)")
		snapshotter = flags.String("snapshotter", "lazycas", "snapshotter to unpack into")
		hostsDir    = flags.String("hosts-dir", "", "containerd hosts directory (hosts.toml per registry)")
		plainHTTP   = flags.Bool("plain-http", false, "use plain HTTP for registries hosts.toml does not configure")
		platform    = flags.String("platform", "", "platform to pull (default: this host's)")
		asJSON      = flags.Bool("json", false, "print the result as JSON")
		apiAddress  = flags.String("api-address", config.DefaultAPIAddress, "the lazycas daemon's API socket, asked why a layer was unpacked")
	)
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		flags.Usage()
		return errUsage
	}
	ref, err := normalizeRef(flags.Arg(0))
	if err != nil {
		return err
	}
	platMatcher := platforms.Default()
	if *platform != "" {
		p, err := platforms.Parse(*platform)
		if err != nil {
			return fmt.Errorf("--platform: %w", err)
		}
		platMatcher = platforms.Only(p)
	}

	// containerd.New waits out its whole timeout on a socket that is not there.
	if _, err := os.Stat(*address); err != nil {
		return fmt.Errorf("containerd socket: %w: is containerd running? Pass its socket with --address", err)
	}
	client, err := containerd.New(*address, containerd.WithDefaultNamespace(*namespace), containerd.WithTimeout(10*time.Second))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w: is containerd running? Pass its socket with --address", *address, err)
	}
	defer client.Close()

	start := time.Now()
	img, err := client.Pull(ctx, ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(*snapshotter),
		containerd.WithPlatformMatcher(platMatcher),
		containerd.WithResolver(resolver.New(ctx, resolver.Options{HostsDir: *hostsDir, PlainHTTP: *plainHTTP})),
		// The labels CRI and nerdctl give remote snapshotters: image ref,
		// layer digest, manifest digest and the image's layer list.
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		return fmt.Errorf("pull %s: %w%s", ref, err, pullHint(err, *snapshotter))
	}
	res, err := describePull(ctx, client, img, *snapshotter, platMatcher)
	if err != nil {
		return err
	}
	res.Note = explainUnpacked(ctx, *apiAddress, &res)
	res.Seconds = time.Since(start).Seconds()
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	printPull(stdout, res)
	return nil
}

// describePull reads back, per layer, how the snapshotter holds it.
func describePull(ctx context.Context, client *containerd.Client, img containerd.Image, snapshotter string, platMatcher platforms.MatchComparer) (pullResult, error) {
	res := pullResult{Image: img.Name(), Digest: img.Target().Digest.String(), Snapshotter: snapshotter}
	manifest, err := images.Manifest(ctx, client.ContentStore(), img.Target(), platMatcher)
	if err != nil {
		return res, fmt.Errorf("read manifest of %s: %w", img.Name(), err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return res, fmt.Errorf("read rootfs of %s: %w", img.Name(), err)
	}
	if len(diffIDs) != len(manifest.Layers) {
		return res, fmt.Errorf("image %s: %d layers but %d diff IDs", img.Name(), len(manifest.Layers), len(diffIDs))
	}
	sn := client.SnapshotService(snapshotter)
	for i, chainID := range identity.ChainIDs(slices.Clone(diffIDs)) {
		l := manifest.Layers[i]
		lr := layerResult{Digest: l.Digest.String(), MediaType: l.MediaType, Size: l.Size, ChainID: chainID.String(), Mode: "unpacked"}
		info, err := sn.Stat(ctx, chainID.String())
		if err != nil {
			return res, fmt.Errorf("layer %s: snapshot %s: %w", l.Digest, chainID, err)
		}
		if info.Labels[snapshot.LabelRemote] != "" {
			lr.Mode = "lazy"
		}
		usage, err := sn.Usage(ctx, chainID.String())
		if err != nil {
			return res, fmt.Errorf("layer %s: usage of snapshot %s: %w", l.Digest, chainID, err)
		}
		lr.DiskUsage = usage.Size
		res.Layers = append(res.Layers, lr)
	}
	return res, nil
}

// pullHint says what to do about a failed pull, for the failures whose
// fix is not in containerd's words.
func pullHint(err error, snapshotter string) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "server gave HTTP response to HTTPS client"):
		return " (a plain-HTTP registry: pass --plain-http, or --hosts-dir with a hosts.toml for it)"
	case strings.Contains(msg, "certificate"):
		return " (the registry's TLS certificate was not accepted: configure its CA in a hosts.toml and pass --hosts-dir)"
	case errdefs.IsUnauthorized(err) || strings.Contains(msg, "401 Unauthorized"):
		return " (the registry wants credentials: log in with `docker login`, whose config.json lazycas reads, or configure them for the registry)"
	case strings.Contains(msg, "snapshotter not loaded"):
		return fmt.Sprintf(" (containerd has no snapshotter %q: add lazycas to containerd's proxy_plugins, see README, and restart containerd, or pass --snapshotter)", snapshotter)
	}
	return ""
}

// explainUnpacked asks the daemon why the unpacked layers of res were not
// mounted lazily. A daemon it cannot reach leaves them unexplained, and
// the note it returns says so.
func explainUnpacked(ctx context.Context, apiAddress string, res *pullResult) string {
	if !slices.ContainsFunc(res.Layers, func(l layerResult) bool { return l.Mode == "unpacked" }) {
		return ""
	}
	var unpacked []snapshot.Unpacked
	if err := newAPIClient(apiAddress).call(ctx, http.MethodGet, service.APIUnpacked, nil, &unpacked); err != nil {
		return "why layers were unpacked is unknown: " + err.Error()
	}
	why := map[string]snapshot.Unpacked{}
	for _, u := range unpacked {
		why[u.ChainID] = u
	}
	for i := range res.Layers {
		if res.Layers[i].Mode == "unpacked" {
			u := why[res.Layers[i].ChainID]
			res.Layers[i].Why, res.Layers[i].Reason = u.Detail, u.Reason
		}
	}
	return ""
}

func printPull(w io.Writer, res pullResult) {
	fmt.Fprintf(w, "pulled %s (%s) with %s in %.1fs\n", res.Image, res.Digest, res.Snapshotter, res.Seconds)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  LAYER\tSIZE\tMODE\tON DISK")
	for _, l := range res.Layers {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", shortDigest(l.Digest), humanBytes(l.Size), l.Mode, humanBytes(l.DiskUsage))
	}
	tw.Flush()
	for _, l := range res.Layers {
		if l.Why != "" {
			fmt.Fprintf(w, "  %s unpacked (%s): %s\n", shortDigest(l.Digest), l.Reason, l.Why)
		}
	}
	if res.Note != "" {
		fmt.Fprintf(w, "  %s\n", res.Note)
	}
}

func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func humanBytes(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}
