package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"text/tabwriter"
	"time"

	units "github.com/docker/go-units"

	"github.com/lazycas/lazycas/config"
	lazyfs "github.com/lazycas/lazycas/fs"
	"github.com/lazycas/lazycas/service"
	"github.com/lazycas/lazycas/store"
)

// apiClient talks to the daemon's API socket.
type apiClient struct {
	address string
	http    *http.Client
}

func newAPIClient(address string) *apiClient {
	return &apiClient{address: address, http: &http.Client{
		Timeout: 10 * time.Minute, // a collection of a large store takes a while
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, "unix", address)
		}},
	}}
}

// unreachable says that the daemon did not answer, and what to check.
func (c *apiClient) unreachable(err error) error {
	return fmt.Errorf("cannot reach the lazycas daemon's API at %s: %w: is containerd-lazycas-grpc running? "+
		"Its API socket is api_address in its config (by default next to its --address socket: %s); pass that socket with --api-address",
		c.address, err, config.DefaultAPIAddress)
}

// call sends a request and decodes the JSON answer into out.
func (c *apiClient) call(ctx context.Context, method, path string, query url.Values, out any) error {
	u := url.URL{Scheme: "http", Host: "lazycas", Path: path, RawQuery: query.Encode()}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e service.APIError
		if json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e) == nil && e.Error != "" {
			return fmt.Errorf("lazycas daemon: %s", e.Error)
		}
		return fmt.Errorf("lazycas daemon: %s", resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func storeStats(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas store stats", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintln(stderr, "usage: lazycas store stats [flags]")
		flags.PrintDefaults()
	}
	var (
		address = flags.String("api-address", config.DefaultAPIAddress, "the lazycas daemon's API socket")
		asJSON  = flags.Bool("json", false, "print the figures as JSON")
	)
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() != 0 {
		flags.Usage()
		return errUsage
	}
	var st lazyfs.Stats
	if err := newAPIClient(*address).call(ctx, http.MethodGet, service.APIStats, nil, &st); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			lazyfs.Stats
			DedupRatio float64 `json:"dedupRatio"`
		}{st, st.Store.DedupRatio()})
	}
	s := st.Store
	mode := "fuse reads"
	if st.Passthrough {
		mode = "passthrough"
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "objects\t%d (%d open, %d unreferenced), %d partial\n", s.Objects, s.Open, s.Unreferenced, s.Partial)
	fmt.Fprintf(tw, "stored\t%s content, %s on disk\n", size(s.Bytes), size(s.DiskBytes))
	fmt.Fprintf(tw, "referenced by layers\t%s of %s of files (%d layers mounted, %s)\n", size(s.LogicalBytes), size(s.LayerFileBytes), st.Mounted, mode)
	fmt.Fprintf(tw, "dedup ratio\t%.2f\n", s.DedupRatio())
	fmt.Fprintf(tw, "fetched since start\t%d files, %s of content; %s over %d requests (%d retried)\n",
		s.FetchedFiles, size(s.FetchedBytes), size(st.Fetch.BytesFetched), st.Fetch.Requests, st.Fetch.Retries)
	if s.GCRuns > 0 {
		fmt.Fprintf(tw, "collected since start\t%d times: %d objects, %s removed\n", s.GCRuns, s.GCRemoved, size(s.GCFreed))
	}
	var pendingFiles, pendingBytes int64
	for _, l := range st.Layers {
		pendingFiles, pendingBytes = pendingFiles+l.PendingFiles, pendingBytes+l.PendingBytes
	}
	if busy := st.Phases[lazyfs.PhasePrefetch.String()] + st.Phases[lazyfs.PhaseWaiting.String()] + st.Phases[lazyfs.PhaseFetching.String()]; busy > 0 {
		fmt.Fprintf(tw, "background fetch\t%d layers fetching or about to; %d files (%s) pending in their current passes\n", busy, pendingFiles, size(pendingBytes))
	}
	if h := st.Handover; h.Resumed > 0 || h.Failed > 0 {
		fmt.Fprintf(tw, "taken over at start	%d layers still mounted by the last daemon (%d could not be, mounted anew); their reads waited at most %s; %d requests it left unanswered answered\n",
			h.Resumed, h.Failed, h.Waited.Round(time.Millisecond), h.Resent)
	}
	tw.Flush()
	if len(st.Images) > 0 {
		fmt.Fprintln(stdout)
		tw = tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "IMAGE\tLAYERS\tFILES\tPRESENT")
		for _, im := range st.Images {
			fmt.Fprintf(tw, "%s\t%d\t%d (%s)\t%d (%s)\n", im.Ref, im.Layers, im.Files, size(im.Bytes), im.PresentFiles, size(im.PresentBytes))
		}
		tw.Flush()
	}
	return nil
}

func storeGC(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas store gc", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintln(stderr, "usage: lazycas store gc [flags]")
		flags.PrintDefaults()
	}
	var (
		address = flags.String("api-address", config.DefaultAPIAddress, "the lazycas daemon's API socket")
		maxSize = flags.String("max-size", "0", "trim the store to this much content, e.g. 10GiB (0: remove every object not in use)")
		asJSON  = flags.Bool("json", false, "print the result as JSON")
	)
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() != 0 {
		flags.Usage()
		return errUsage
	}
	max, err := units.RAMInBytes(*maxSize)
	if err != nil || max < 0 {
		return fmt.Errorf("--max-size %q: want a size such as 10GiB or 500MB", *maxSize)
	}
	var res store.GCResult
	q := url.Values{"max_bytes": {fmt.Sprint(max)}}
	if err := newAPIClient(*address).call(ctx, http.MethodPost, service.APIGC, q, &res); err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(res)
	}
	fmt.Fprintf(stdout, "removed %d objects (%s); %s left", res.Removed, size(res.Freed), size(res.Bytes))
	if res.Skipped > 0 {
		fmt.Fprintf(stdout, "; %d in use kept", res.Skipped)
	}
	fmt.Fprintln(stdout)
	return nil
}

func size(n int64) string { return units.BytesSize(float64(n)) }
