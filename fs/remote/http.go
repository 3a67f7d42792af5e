package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

var (
	// errShortBody is a response body that ended before the bytes its
	// headers promised; worth a retry.
	errShortBody = errors.New("short response body")
	// errRequestTimeout is a request that ran out of RequestTimeout while
	// the caller's context was still alive; worth a retry.
	errRequestTimeout = errors.New("request timed out")
	// errNoMultiRange is a server that did not answer a multi-range request
	// with every range; the caller asks for the rest one by one.
	errNoMultiRange = errors.New("multi-range request not honoured")
)

// statusError is an HTTP response with an unexpected status. It unwraps to
// the errdefs class of the status, so callers can tell "not found" from
// "denied" from "unavailable".
type statusError struct {
	method, url string
	code        int
	status      string
	body        string
}

func newStatusError(resp *http.Response) *statusError {
	// A registry explains errors in a short JSON body; keep its start.
	buf := make([]byte, 256)
	n, _ := io.ReadFull(resp.Body, buf)
	return &statusError{
		method: resp.Request.Method,
		url:    redact(resp.Request.URL),
		code:   resp.StatusCode,
		status: resp.Status,
		body:   strings.TrimSpace(string(buf[:n])),
	}
}

func (e *statusError) Error() string {
	msg := fmt.Sprintf("%s %s: %s", e.method, e.url, e.status)
	if e.body != "" {
		msg += ": " + e.body
	}
	return msg
}

func (e *statusError) Unwrap() error {
	switch {
	case e.code == http.StatusNotFound:
		return errdefs.ErrNotFound
	case e.code == http.StatusUnauthorized:
		return errdefs.ErrUnauthenticated
	case e.code == http.StatusForbidden:
		return errdefs.ErrPermissionDenied
	case e.code == http.StatusTooManyRequests || e.code >= 500:
		return errdefs.ErrUnavailable
	}
	return nil
}

// retryable reports whether another attempt on the same host may succeed.
// A refused connection counts only on the last host: with mirrors left, the
// next one is a better bet than waiting.
func retryable(err error, lastHost bool) bool {
	if se, ok := errors.AsType[*statusError](err); ok {
		switch se.code {
		case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
			http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true
		}
		return false
	}
	if errors.Is(err, errShortBody) || errors.Is(err, errRequestTimeout) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return true
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return lastHost
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return true
	}
	return false
}

// hostErrors lists why each host failed.
type hostErrors []error

func (e hostErrors) Error() string {
	msgs := make([]string, len(e))
	for i, err := range e {
		msgs[i] = err.Error()
	}
	return strings.Join(msgs, "; ")
}

func (e hostErrors) Unwrap() []error { return e }

// run calls attempt against each pull host, the last one that served first,
// then the others in configuration order; each host gets Retries extra
// attempts on transient failures. It stops at the first success, when ctx
// ends, or on errNoMultiRange, which no other host would change.
func (b *Blob) run(ctx context.Context, what string, attempt func(ctx context.Context, host int) error) error {
	b.mu.Lock()
	first := b.loc.host
	b.mu.Unlock()
	order := make([]int, 0, len(b.hosts))
	order = append(order, first)
	for i := range b.hosts {
		if i != first {
			order = append(order, i)
		}
	}

	var errs hostErrors
	for i, host := range order {
		last := i == len(order)-1
		failed, err := b.retry(ctx, host, last, what, attempt)
		if err == nil {
			b.mu.Lock()
			if b.loc.host != host {
				b.loc = location{host: host}
			}
			b.mu.Unlock()
			return nil
		}
		// retry left the outcome of a failed last attempt to this loop,
		// which knows whether another host, or the caller, asks again.
		count := func(o Outcome) {
			if failed != nil {
				b.counts.add(o, failed.bytes)
			}
		}
		if ctx.Err() != nil {
			count(OutcomeCanceled)
			return context.Cause(ctx)
		}
		switch {
		case errors.Is(err, errNoMultiRange):
			// Asked again range by range: not a failure.
			count(OutcomeRetried)
			return err
		case errors.Is(err, errNoSuffixRange) || !last:
			// Asked again size first, or of the next host.
			count(OutcomeRetried)
		default:
			count(OutcomeError)
		}
		errs = append(errs, fmt.Errorf("%s: %w", b.hosts[host].Host, err))
		if !last {
			log.G(ctx).WithError(err).WithFields(log.Fields{
				"digest": b.digest, "host": b.hosts[host].Host, "range": what,
			}).Warn("registry host failed, trying the next one")
		}
	}
	if len(errs) == 1 {
		return errs[0]
	}
	return errs
}

// failedAttempt is an attempt whose outcome retry left to its caller to
// count, and the body bytes it read.
type failedAttempt struct{ bytes int64 }

// retry calls attempt on one host with a RequestTimeout each time, and
// retries transient failures with exponential backoff and jitter. It
// counts the outcome of every attempt but a failed last one, which it
// returns with the error for run to count (nil when there is none: the
// caller gave up during a backoff).
func (b *Blob) retry(ctx context.Context, host int, lastHost bool, what string, attempt func(ctx context.Context, host int) error) (*failedAttempt, error) {
	timeout := b.f.opts.RequestTimeout
	delay := b.f.opts.RetryBackoff
	for n := 0; ; n++ {
		var got atomic.Int64
		actx, cancel := context.WithTimeout(withAttemptBytes(ctx, &got), timeout)
		start := time.Now()
		err := attempt(actx, host)
		timedOut := actx.Err() != nil
		cancel()
		if err == nil {
			b.counts.add(OutcomeOK, got.Load())
			b.f.attempts.observe(time.Since(start))
			return nil, nil
		}
		if ctx.Err() != nil {
			return &failedAttempt{got.Load()}, context.Cause(ctx)
		}
		if timedOut {
			err = fmt.Errorf("%w after %v: %w", errRequestTimeout, timeout, err)
		}
		if n >= b.f.opts.Retries || !retryable(err, lastHost) {
			return &failedAttempt{got.Load()}, err
		}
		b.counts.add(OutcomeRetried, got.Load())
		b.f.retries.Add(1)
		wait := delay/2 + rand.N(delay)
		log.G(ctx).WithError(err).WithFields(log.Fields{
			"digest": b.digest, "host": b.hosts[host].Host, "range": what, "attempt": n + 1, "delay": wait,
		}).Debug("registry request failed, retrying")
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			// The failed attempt was counted as retried: nothing more
			// to count.
			return nil, context.Cause(ctx)
		case <-t.C:
		}
		delay = min(2*delay, maxBackoff)
	}
}

// blobURL is the registry's URL of the blob on host.
func (b *Blob) blobURL(host int) string {
	h := b.hosts[host]
	u := url.URL{Scheme: h.Scheme, Host: h.Host, Path: path.Join("/", h.Path, b.repo, "blobs", b.digest.String())}
	// A mirror learns the upstream registry from the ns parameter, as
	// containerd sends it.
	if b.registry != h.Host && (b.registry != "docker.io" || h.Host != "registry-1.docker.io") {
		u.RawQuery = url.Values{"ns": {b.registry}}.Encode()
	}
	return u.String()
}

// target is the URL to ask host for the blob: the cached redirect if there
// is one, and whether it is.
func (b *Blob) target(host int) (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.loc.host == host && b.loc.url != "" {
		return b.loc.url, true
	}
	return b.blobURL(host), false
}

// forget drops the cached redirect u of host, unless another read already
// replaced it.
func (b *Blob) forget(host int, u string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.loc.host == host && b.loc.url == u {
		b.loc.url = ""
	}
}

// send sends one request to host and returns a response for the caller to
// read and finish. It answers an auth challenge once, through the host's
// Authorizer, and drops a cached redirect URL that answers 400, 401, 403, 404
// or 410 (signed storage URLs expire) to ask the registry again, once. A GET
// that the registry redirected leaves its final URL cached.
func (b *Blob) send(ctx context.Context, host int, method, ranges string) (*http.Response, error) {
	h := b.hosts[host]
	ctx = docker.WithScope(ctx, b.scope)
	authTried, resolved := false, false
	// At most three rounds: one auth refresh and one re-resolution.
	for range 3 {
		u, cached := b.target(host)
		resp, err := b.do(ctx, h, method, u, ranges)
		if err != nil {
			if cached {
				// The registry may redirect elsewhere on the retry.
				b.forget(host, u)
			}
			return nil, err
		}
		switch code := resp.StatusCode; {
		case cached && !resolved && (code == http.StatusBadRequest || code == http.StatusUnauthorized ||
			code == http.StatusForbidden || code == http.StatusNotFound || code == http.StatusGone):
			b.finish(resp, resp.Body)
			b.forget(host, u)
			resolved = true
			log.G(ctx).WithFields(log.Fields{"digest": b.digest, "host": h.Host, "status": resp.Status}).
				Debug("cached blob URL refused, asking the registry again")
			continue
		case code == http.StatusUnauthorized && !authTried && h.Authorizer != nil:
			err := h.Authorizer.AddResponses(ctx, []*http.Response{resp})
			if errdefs.IsNotImplemented(err) {
				// No scheme the authorizer can answer: report the 401.
				defer b.finish(resp, resp.Body)
				return nil, newStatusError(resp)
			}
			b.finish(resp, resp.Body)
			if err != nil {
				return nil, fmt.Errorf("authorize %s %s: %w", method, redact(resp.Request.URL), err)
			}
			authTried = true
			log.G(ctx).WithFields(log.Fields{"digest": b.digest, "host": h.Host}).Debug("registry asked for authorization")
			continue
		}
		if cached && resp.StatusCode >= 300 {
			// Let a retry ask the registry, which may send it elsewhere.
			b.forget(host, u)
		}
		// Request.Response is set only on a request made to follow a redirect.
		if method == http.MethodGet && resp.StatusCode < 300 && resp.Request.Response != nil {
			b.mu.Lock()
			b.loc = location{host: host, url: resp.Request.URL.String()}
			b.mu.Unlock()
		}
		return resp, nil
	}
	return nil, fmt.Errorf("%s %s: too many authorization and redirect rounds", method, b.blobURL(host))
}

// do sends one request to u, authorized by the host's Authorizer and with
// the host's client, following redirects the way containerd does.
func (b *Blob) do(ctx context.Context, h docker.RegistryHost, method, u, ranges string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u, err)
	}
	req.Header = h.Header.Clone()
	if req.Header == nil {
		req.Header = http.Header{}
	}
	if req.URL.Host != h.Host {
		// A cached storage URL gets no credentials meant for the registry.
		for _, k := range []string{"Authorization", "Proxy-Authorization", "Cookie", "Cookie2"} {
			req.Header.Del(k)
		}
	}
	if req.Header.Get("User-Agent") == "" {
		req.Header.Set("User-Agent", "lazycas")
	}
	req.Header.Set("Accept", "*/*")
	// Ranges address the stored bytes; a transparently decoded body would
	// not match them.
	req.Header.Set("Accept-Encoding", "identity")
	if ranges != "" {
		req.Header.Set("Range", ranges)
	}
	if h.Authorizer != nil {
		if err := h.Authorizer.Authorize(ctx, req); err != nil {
			return nil, fmt.Errorf("authorize %s %s: %w", method, redact(req.URL), err)
		}
	}

	client := http.Client{}
	if h.Client != nil {
		client = *h.Client
	}
	check := client.CheckRedirect
	client.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= 10 {
			return errors.New("stopped after 10 redirects")
		}
		if check != nil {
			if err := check(req, via); err != nil {
				return err
			}
		}
		b.f.requests.Add(1)
		if h.Authorizer != nil {
			if err := h.Authorizer.Authorize(ctx, req); err != nil {
				return fmt.Errorf("authorize redirect: %w", err)
			}
		}
		return nil
	}
	b.f.requests.Add(1)
	meter := b.f.meter(h.Host)
	sent := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		// url.Error would print the URL with its query, which for a
		// storage URL is a signature.
		if ue, ok := errors.AsType[*url.Error](err); ok {
			err = ue.Err
		}
		return nil, fmt.Errorf("%s %s: %w", method, redact(req.URL), err)
	}
	waited := time.Since(sent)
	b.f.headers.observe(waited)
	// A redirect's answer comes from elsewhere (storage): only the
	// registry's own answers measure the path to it.
	if resp.Request.Response == nil {
		meter.answered(waited)
	}
	var body io.ReadCloser = &countingBody{ReadCloser: resp.Body, n: &b.f.bytes}
	if n := attemptBytes(ctx); n != nil {
		body = &countingBody{ReadCloser: body, n: n}
	}
	resp.Body = &meteredBody{ReadCloser: body, m: meter}
	return resp, nil
}

// finish drains a little of what is left of body, so that the connection can
// be reused for the next request, and closes it. It does not drain more: a
// server that ignored Range may be sending the whole blob.
func (b *Blob) finish(resp *http.Response, body io.Reader) {
	_, _ = io.CopyN(io.Discard, body, 4<<10)
	resp.Body.Close()
}

// countingBody adds what is read to a wire counter.
type countingBody struct {
	io.ReadCloser
	n interface{ Add(int64) int64 }
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// redact returns u without credentials or query, which for storage URLs
// holds signatures.
func redact(u *url.URL) string {
	c := *u
	c.User = nil
	c.RawQuery = ""
	c.Fragment = ""
	return c.String()
}
