package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	lazyfs "github.com/lazycas/lazycas/fs"
	"github.com/lazycas/lazycas/fs/remote"
	"github.com/lazycas/lazycas/service/cri"
	"github.com/lazycas/lazycas/snapshot"
)

// metricsTimeout bounds the figures one scrape gathers.
const metricsTimeout = 10 * time.Second

// newRegistry returns the daemon's own registry (no global one): the Go
// runtime and process, and, with lazy layers, lazycas's figures, read
// from the same counters `lazycas store stats` shows at each scrape.
func newRegistry(sn *snapshot.Snapshotter, lz *lazy, cp *cri.Proxy) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		unpackedCollector{sn})
	if lz != nil {
		reg.MustRegister(&lazyCollector{lz: lz})
	}
	if cp != nil {
		reg.MustRegister(criCollector{cp})
	}
	return reg
}

var descUnpacked = desc("layers_unpacked_total", "Layers pulled into lazycas that containerd unpacked instead of lazycas mounting them, by reason (the daemon's log and `lazycas image pull` say more).", "reason")

// unpackedCollector counts the layers unpacked rather than mounted lazily.
type unpackedCollector struct{ sn *snapshot.Snapshotter }

func (c unpackedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descUnpacked }

func (c unpackedCollector) Collect(ch chan<- prometheus.Metric) {
	counts := c.sn.UnpackedCounts()
	for _, r := range snapshot.Reasons() {
		ch <- prometheus.MustNewConstMetric(descUnpacked, prometheus.CounterValue, float64(counts[r]), r)
	}
}

// ServeMetrics serves Prometheus metrics on l, at /metrics, until Shutdown.
func (s *Service) ServeMetrics(l net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(newRegistry(s.sn, s.lazy, s.cri), promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	s.metrics = srv
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics on %s: %w", l.Addr(), err)
	}
	return nil
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("lazycas_"+name, help, labels, nil)
}

var (
	descFetchRequests  = desc("fetch_requests_total", "HTTP requests to registries for layer contents and TOCs, redirects included.")
	descFetchBytes     = desc("fetch_bytes_total", "Response body bytes read from registries.")
	descFetchRetries   = desc("fetch_retries_total", "Registry requests repeated after a transient failure.")
	descFetchedFiles   = desc("fetched_files_total", "Files fetched, verified and stored.")
	descFetchedContent = desc("fetched_content_bytes_total", "Content bytes of the files fetched and stored.")
	descLinkRTT        = desc("link_rtt_seconds", "Measured round trip to a registry host (shortest recent wait for response headers).", "host")
	descLinkBandwidth  = desc("link_bandwidth_bytes_per_second", "Measured throughput of a registry host while bodies flow.", "host")
	descMounted        = desc("layers_mounted", "Lazy layers mounted over FUSE.")
	descStoreObjects   = desc("store_objects", "Objects (whole verified files) in the shared store.")
	descStoreBytes     = desc("store_bytes", "Content bytes of the store's objects.")
	descStoreDisk      = desc("store_disk_bytes", "Disk the store's objects take.")
	descStoreLogical   = desc("store_logical_bytes", "What the mounted layers' present files would take without sharing.")
	descStoreDedup     = desc("store_dedup_ratio", "store_logical_bytes / store_bytes: how many times over the layers would hold what the store holds once.")
	descStorePartial   = desc("store_partial_objects", "Large files being filled piece by piece.")
	descStoreOpen      = desc("store_open_objects", "Objects with open handles.")
	descStoreUnref     = desc("store_unreferenced_objects", "Objects no current layer refers to (collected first).")
	descImagePresent   = desc("image_present_bytes", "Bytes of an image's files present in the store.", "ref")
	descImageFiles     = desc("image_file_bytes", "Bytes of all an image's files.", "ref")
	descFUSE           = desc("fuse_request_duration_seconds", "FUSE requests answered, by operation, and how long they took.", "op")
	descFUSEErrors     = desc("fuse_errors_total", "Opens and reads failed with EIO: a file's content could not be had (the log says why).", "op")
	descResent         = desc("fuse_resent_requests_total", "Requests a previous daemon read and never answered, answered by this one.")
	descResumed        = desc("handover_resumed_layers", "Layers this daemon took over, mounted, from the previous one at start.")
	descResumeFailed   = desc("handover_failed_layers", "Layers the previous daemon left that this one could not take over (mounted anew; their readers got errors).")
	descHandoverWait   = desc("handover_wait_seconds", "Longest a read of a taken-over layer waited for a daemon at this daemon's start.")

	// Per layer: the label is the digest of a layer mounted now, so the
	// series are bounded by the mounted layers; an unmounted layer's
	// series go at the next scrape. outcome is one of remote.Outcomes.
	descLayerRequests = desc("layer_fetch_requests_total", "Attempts at registry requests for a mounted layer's blob (TOC, reads, prefetch), by outcome: ok, retried (another attempt followed), error (the read failed), canceled (its caller stopped waiting).", "layer", "outcome")
	descLayerBytes    = desc("layer_fetch_bytes_total", "Response body bytes read for a mounted layer's blob, by the outcome of the attempt that read them (bytes of failed attempts were read for nothing).", "layer", "outcome")
	descFetchHeaders  = desc("fetch_response_seconds", "Registry requests, from sending each to its response headers (redirects followed included).")
	descFetchAttempt  = desc("fetch_request_duration_seconds", "Successful registry range requests, from the start of the attempt (auth and redirect rounds included) to the last byte of its body.")
	descGCRuns        = desc("store_gc_runs_total", "Collections of the store, asked for (lazycas store gc) or started by a store over store.max_size.")
	descGCRemoved     = desc("store_gc_removed_objects_total", "Objects the store's collections removed.")
	descGCFreed       = desc("store_gc_freed_bytes_total", "Content bytes of the objects the store's collections removed.")
	descBgLayers      = desc("background_fetch_layers", "Mounted layers by where their prefetch and background fetch are: off, prefetch, waiting (background_delay), fetching, done, incomplete (the rest is fetched when read).", "phase")
	descBgPendFiles   = desc("background_fetch_pending_files", "Files a mounted layer's prefetch or background fetch has still to fetch in its current pass; 0 when none runs.", "layer")
	descBgPendBytes   = desc("background_fetch_pending_bytes", "Bytes of the files a mounted layer's prefetch or background fetch has still to fetch in its current pass; 0 when none runs.", "layer")
	descBgFiles       = desc("background_fetched_files_total", "Files a mounted layer's prefetch and background fetch put into the store.", "layer")
	descBgBytes       = desc("background_fetched_bytes_total", "Bytes of the files a mounted layer's prefetch and background fetch put into the store.", "layer")
)

// lazyCollector turns lazycas's counters into metrics at each scrape.
type lazyCollector struct {
	lz *lazy
}

func (c *lazyCollector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *lazyCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), metricsTimeout)
	defer cancel()
	st, err := c.lz.fs.Stats(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descStoreObjects, err)
		return
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(descFetchRequests, float64(st.Fetch.Requests))
	counter(descFetchBytes, float64(st.Fetch.BytesFetched))
	counter(descFetchRetries, float64(st.Fetch.Retries))
	counter(descFetchedFiles, float64(st.Store.FetchedFiles))
	counter(descFetchedContent, float64(st.Store.FetchedBytes))
	for host, l := range st.Fetch.Links {
		if l.RTT > 0 {
			gauge(descLinkRTT, l.RTT.Seconds(), host)
		}
		if l.Bandwidth > 0 {
			gauge(descLinkBandwidth, l.Bandwidth, host)
		}
	}
	gauge(descMounted, float64(st.Mounted))
	gauge(descStoreObjects, float64(st.Store.Objects))
	gauge(descStoreBytes, float64(st.Store.Bytes))
	gauge(descStoreDisk, float64(st.Store.DiskBytes))
	gauge(descStoreLogical, float64(st.Store.LogicalBytes))
	gauge(descStoreDedup, st.Store.DedupRatio())
	gauge(descStorePartial, float64(st.Store.Partial))
	gauge(descStoreOpen, float64(st.Store.Open))
	gauge(descStoreUnref, float64(st.Store.Unreferenced))
	for _, im := range st.Images {
		gauge(descImagePresent, float64(im.PresentBytes), im.Ref)
		gauge(descImageFiles, float64(im.Bytes), im.Ref)
	}
	histogram(ch, descFetchHeaders, st.Fetch.Headers)
	histogram(ch, descFetchAttempt, st.Fetch.Attempts)
	for _, l := range st.Layers {
		for _, o := range remote.Outcomes() {
			counter(descLayerRequests, float64(l.Fetch.Requests[o]), l.Digest, o.String())
			counter(descLayerBytes, float64(l.Fetch.Bytes[o]), l.Digest, o.String())
		}
		gauge(descBgPendFiles, float64(l.PendingFiles), l.Digest)
		gauge(descBgPendBytes, float64(l.PendingBytes), l.Digest)
		counter(descBgFiles, float64(l.FetchedFiles), l.Digest)
		counter(descBgBytes, float64(l.FetchedBytes), l.Digest)
	}
	for _, p := range lazyfs.Phases() {
		gauge(descBgLayers, float64(st.Phases[p.String()]), p.String())
	}
	counter(descGCRuns, float64(st.Store.GCRuns))
	counter(descGCRemoved, float64(st.Store.GCRemoved))
	counter(descGCFreed, float64(st.Store.GCFreed))
	gauge(descResumed, float64(st.Handover.Resumed))
	gauge(descResumeFailed, float64(st.Handover.Failed))
	gauge(descHandoverWait, st.Handover.Waited.Seconds())
	if m := c.lz.fuseMetrics; m != nil {
		counter(descResent, float64(m.Resent.Load()))
		counter(descFUSEErrors, float64(m.OpenErrors.Load()), "open")
		counter(descFUSEErrors, float64(m.ReadErrors.Load()), "read")
		for _, op := range m.Ops() {
			histogram(ch, descFUSE, op.Snapshot, op.Op)
		}
	}
}

// histogram sends a latency histogram (remote's, or a FUSE operation's)
// as a Prometheus histogram.
func histogram(ch chan<- prometheus.Metric, d *prometheus.Desc, h remote.Histogram, labels ...string) {
	ch <- prometheus.MustNewConstHistogram(d, h.Count, h.Sum.Seconds(), h.Cumulative(), labels...)
}
