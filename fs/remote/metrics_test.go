package remote

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	"github.com/lazycas/lazycas/service/resolver"
)

func TestBlobCountsAttemptsByOutcome(t *testing.T) {
	const n = 100 << 10
	for _, tc := range []struct {
		name    string
		faults  []fault
		retries int
		fails   bool
		want    [numOutcomes]int64 // requests by outcome
	}{
		{name: "a first try that works", want: [numOutcomes]int64{OutcomeOK: 1}},
		{name: "two 503s, then the bytes", faults: repeat(2, status(http.StatusServiceUnavailable)),
			want: [numOutcomes]int64{OutcomeOK: 1, OutcomeRetried: 2}},
		{name: "a short body, then the bytes", faults: []fault{truncate},
			want: [numOutcomes]int64{OutcomeOK: 1, OutcomeRetried: 1}},
		{name: "503s until the retries run out", faults: repeat(5, status(http.StatusServiceUnavailable)), retries: 2, fails: true,
			want: [numOutcomes]int64{OutcomeRetried: 2, OutcomeError: 1}},
		{name: "a refusal, not retried", faults: []fault{status(http.StatusForbidden)}, fails: true,
			want: [numOutcomes]int64{OutcomeError: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			reg := newTestRegistry(t, 1<<20)
			srv := newFaulty(t, reg.handler, tc.faults...)
			opts := testOptions(t, resolver.Options{})
			if tc.retries > 0 {
				opts.Retries = tc.retries
			}
			f, b := openBlob(t, reg, serve(t, srv), opts)
			before := f.Stats()
			err := b.ReadRanges(context.Background(), ranges(4096, 0, 1, n))
			if (err != nil) != tc.fails {
				t.Fatalf("read: %v", err)
			}
			st := b.Stats()
			if st.Requests != tc.want {
				t.Errorf("requests by outcome %v, want %v", st.Requests, tc.want)
			}
			if !tc.fails && st.Bytes[OutcomeOK] != n {
				t.Errorf("%d body bytes of the successful attempt, want %d", st.Bytes[OutcomeOK], n)
			}
			var total int64
			for _, v := range st.Bytes {
				total += v
			}
			if wire := f.Stats().BytesFetched - before.BytesFetched; total != wire {
				t.Errorf("bytes by outcome sum to %d, the fetcher read %d", total, wire)
			}
			// Every GET answered is timed to its headers; every attempt
			// that worked, to its end.
			after := f.Stats()
			if got, want := after.Headers.Count-before.Headers.Count, uint64(srv.gets.Load()); got != want {
				t.Errorf("%d requests timed to their headers, %d GETs", got, want)
			}
			if got := after.Attempts.Count - before.Attempts.Count; got != uint64(tc.want[OutcomeOK]) {
				t.Errorf("%d attempts timed, want %d", got, tc.want[OutcomeOK])
			}
			last := after.Attempts.Buckets[len(LatencyBuckets)-1]
			if last > after.Attempts.Count || after.Attempts.Sum <= 0 && after.Attempts.Count > 0 {
				t.Errorf("histogram inconsistent: %+v", after.Attempts)
			}
		})
	}

	t.Run("a caller giving up during a backoff counts the failed attempt once", func(t *testing.T) {
		checkLeaks(t)
		reg := newTestRegistry(t, 1<<20)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// retry logs the failure after counting it and before backing
		// off: the caller gives up right then.
		logger := logrus.New()
		logger.SetOutput(io.Discard)
		logger.SetLevel(logrus.DebugLevel)
		logger.AddHook(hookFunc(func(e *logrus.Entry) {
			if e.Message == "registry request failed, retrying" {
				cancel()
			}
		}))
		ctx = log.WithLogger(ctx, logrus.NewEntry(logger))
		srv := newFaulty(t, reg.handler, status(http.StatusServiceUnavailable))
		opts := testOptions(t, resolver.Options{})
		opts.RetryBackoff = time.Minute
		_, b := openBlob(t, reg, serve(t, srv), opts)
		if err := b.ReadRanges(ctx, ranges(0, 0, 1, 10)); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want canceled", err)
		}
		if got := b.Stats().Requests; got != [numOutcomes]int64{OutcomeRetried: 1} {
			t.Errorf("requests by outcome %v, want the one attempt, retried", got)
		}
	})

	t.Run("an attempt its caller gave up on is canceled", func(t *testing.T) {
		checkLeaks(t)
		reg := newTestRegistry(t, 1<<20)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// The server sees the request, then the caller stops waiting.
		srv := newFaulty(t, reg.handler, func(w http.ResponseWriter, r *http.Request, _ http.Handler) {
			cancel()
			<-r.Context().Done()
		})
		_, b := openBlob(t, reg, serve(t, srv), testOptions(t, resolver.Options{}))
		if err := b.ReadRanges(ctx, ranges(0, 0, 1, 10)); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want canceled", err)
		}
		if got := b.Stats().Requests; got != [numOutcomes]int64{OutcomeCanceled: 1} {
			t.Errorf("requests by outcome %v, want one canceled", got)
		}
	})
}

func TestUnreachable(t *testing.T) {
	checkLeaks(t)
	reg := newTestRegistry(t, 1<<10)
	for _, tc := range []struct {
		name   string
		host   string
		faults []fault
		want   bool
	}{
		{name: "a refused connection", host: deadHost(t), want: true},
		{name: "503 until the retries run out", faults: repeat(10, status(http.StatusServiceUnavailable)), want: true},
		{name: "a blob the registry does not have", faults: []fault{status(http.StatusNotFound)}, want: false},
		{name: "access denied", faults: []fault{status(http.StatusForbidden)}, want: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host := tc.host
			if host == "" {
				host = serve(t, newFaulty(t, reg.handler, tc.faults...))
			}
			opts := testOptions(t, resolver.Options{})
			opts.Retries = 1
			f := New(opts)
			defer f.Close()
			_, _, err := f.OpenTail(context.Background(), host+"/"+testRepo+":lazy", reg.desc(), 512)
			if err == nil {
				t.Fatal("opened")
			}
			if got := Unreachable(err); got != tc.want {
				t.Errorf("Unreachable(%v) = %v, want %v", err, got, tc.want)
			}
		})
	}
}

// hookFunc is a logrus hook calling itself on every entry.
type hookFunc func(*logrus.Entry)

func (hookFunc) Levels() []logrus.Level       { return logrus.AllLevels }
func (h hookFunc) Fire(e *logrus.Entry) error { h(e); return nil }

func TestBlobStatsJSONNamesOutcomes(t *testing.T) {
	in := BlobStats{}
	in.Requests[OutcomeOK], in.Requests[OutcomeRetried], in.Bytes[OutcomeOK] = 3, 1, 4096
	data, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := `"requests":{"canceled":0,"error":0,"ok":3,"retried":1}`; !strings.Contains(string(data), want) {
		t.Errorf("JSON %s lacks %s", data, want)
	}
	var out BlobStats
	if err := json.Unmarshal(data, &out); err != nil || out != in {
		t.Errorf("round trip: %+v, %v; want %+v", out, err, in)
	}
}
