package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// linkCheck is what the benchmark measured of a link before using it.
type linkCheck struct {
	Link string `json:"link"`
	// RoundTripMs is the time of a small request on an open connection.
	RoundTripMs float64 `json:"httpRoundTripMs"`
	// ThroughputMBps is one blob's download rate over one connection.
	ThroughputMBps float64 `json:"throughputMBps"`
	BlobBytes      int64   `json:"blobBytes"`
}

// checkLink measures a link through its proxy: a small request's round
// trip, and the download rate of the largest layer of python:estargz.
func checkLink(ctx context.Context, link string, px *proxy) (linkCheck, error) {
	lc := linkCheck{Link: link}
	ref, err := name.ParseReference(px.Addr()+"/"+repoPython+":"+tagPython, name.Insecure)
	if err != nil {
		return lc, err
	}
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		return lc, err
	}
	layers, err := img.Layers()
	if err != nil {
		return lc, err
	}
	var digest string
	for _, l := range layers {
		size, _ := l.Size()
		if size > lc.BlobBytes {
			d, _ := l.Digest()
			digest, lc.BlobBytes = d.String(), size
		}
	}
	hc := &http.Client{Timeout: 5 * time.Minute}
	get := func(path string) (time.Duration, int64, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+px.Addr()+path, nil)
		if err != nil {
			return 0, 0, err
		}
		start := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			return 0, 0, err
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("GET %s: %s", path, resp.Status)
		}
		return time.Since(start), n, err
	}
	if _, _, err := get("/v2/"); err != nil { // opens the connection
		return lc, err
	}
	rtt, _, err := get("/v2/")
	if err != nil {
		return lc, err
	}
	lc.RoundTripMs = float64(rtt.Microseconds()) / 1000
	took, n, err := get("/v2/" + repoPython + "/blobs/" + digest)
	if err != nil {
		return lc, err
	}
	lc.ThroughputMBps = float64(n) / took.Seconds() / 1e6
	return lc, nil
}
