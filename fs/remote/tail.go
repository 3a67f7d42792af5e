package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// errNoSuffixRange is a server that did not answer `Range: bytes=-N` with
// the blob's last bytes and its size; the caller asks the usual way.
var errNoSuffixRange = errors.New("suffix range request not honoured")

// OpenTail opens a blob and reads its last n bytes (all of it if it is
// smaller) in one round trip: a suffix range request, whose Content-Range
// also gives the blob's size. A lazy layer keeps its footer and TOC at the
// end, so this is often all a mount needs, where Open and two reads cost
// three round trips. A server that does not honour suffix ranges gets a HEAD
// and an ordinary range request instead.
func (f *Fetcher) OpenTail(ctx context.Context, ref string, desc ocispec.Descriptor, n int64) (*Blob, []byte, error) {
	if n <= 0 {
		return nil, nil, fmt.Errorf("read the tail of %s: %d bytes: %w", desc.Digest, n, errdefs.ErrInvalidArgument)
	}
	b, err := f.open(ref, desc)
	if err != nil {
		return nil, nil, err
	}
	var tail []byte
	err = b.run(ctx, "tail", func(ctx context.Context, host int) error {
		var err error
		tail, err = b.fetchTail(ctx, host, n)
		return err
	})
	if err == nil {
		return b, tail, nil
	}
	if !errors.Is(err, errNoSuffixRange) {
		return nil, nil, fmt.Errorf("open blob %s in %s/%s: %w", desc.Digest, b.registry, b.repo, err)
	}
	log.G(ctx).WithError(err).WithField("digest", desc.Digest).Debug("no suffix range: asking for the size first")
	if b.size == 0 {
		size, err := b.stat(ctx)
		if err != nil {
			return nil, nil, fmt.Errorf("open blob %s in %s/%s: %w", desc.Digest, b.registry, b.repo, err)
		}
		b.size = size
	}
	tail = make([]byte, min(n, b.size))
	if err := b.ReadRanges(ctx, []Range{{Off: b.size - int64(len(tail)), Buf: tail}}); err != nil {
		return nil, nil, err
	}
	return b, tail, nil
}

// fetchTail makes one attempt at the last n bytes of the blob, setting its
// size if it was unknown.
func (b *Blob) fetchTail(ctx context.Context, host int, n int64) ([]byte, error) {
	resp, err := b.send(ctx, host, http.MethodGet, "bytes=-"+strconv.FormatInt(n, 10))
	if err != nil {
		return nil, err
	}
	defer b.finish(resp, resp.Body)
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && ce != "identity" {
		return nil, fmt.Errorf("GET %s: unexpected Content-Encoding %q", redact(resp.Request.URL), ce)
	}
	var off, size int64
	switch resp.StatusCode {
	case http.StatusPartialContent:
		var end int64
		off, end, size, err = parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || size < 0 || end != size || off != max(0, size-n) {
			return nil, fmt.Errorf("%w: %s answered Content-Range %q", errNoSuffixRange,
				redact(resp.Request.URL), resp.Header.Get("Content-Range"))
		}
	case http.StatusOK:
		// The whole blob: fine if it is no bigger than the tail asked for.
		if resp.ContentLength < 0 || resp.ContentLength > n {
			return nil, fmt.Errorf("%w: %s sent the whole blob", errNoSuffixRange, redact(resp.Request.URL))
		}
		size = resp.ContentLength
	case http.StatusRequestedRangeNotSatisfiable, http.StatusBadRequest, http.StatusNotImplemented:
		return nil, fmt.Errorf("%w: %s answered %s", errNoSuffixRange, redact(resp.Request.URL), resp.Status)
	default:
		return nil, newStatusError(resp)
	}
	if b.size != 0 && size != b.size {
		return nil, fmt.Errorf("GET %s: blob has %d bytes, the manifest says %d", redact(resp.Request.URL), size, b.size)
	}
	tail := make([]byte, size-off)
	if _, err := io.ReadFull(resp.Body, tail); err != nil {
		return nil, bodyError(err)
	}
	b.size = size
	return tail, nil
}

// parseContentRange parses "bytes first-last/size" into [first, last+1)
// and size, -1 if the server wrote "*".
func parseContentRange(s string) (off, end, size int64, err error) {
	spec, ok := strings.CutPrefix(s, "bytes ")
	rng, total, ok2 := strings.Cut(spec, "/")
	first, last, ok3 := strings.Cut(rng, "-")
	if !ok || !ok2 || !ok3 {
		return 0, 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	off, err1 := strconv.ParseInt(first, 10, 64)
	lastN, err2 := strconv.ParseInt(last, 10, 64)
	// The range ends at last+1, which must not overflow (a "*" size does
	// not bound last; FuzzContentRange).
	if err1 != nil || err2 != nil || off < 0 || lastN < off || lastN == 1<<63-1 {
		return 0, 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	size = -1
	if total != "*" {
		if size, err = strconv.ParseInt(total, 10, 64); err != nil || size <= lastN {
			return 0, 0, 0, fmt.Errorf("bad Content-Range %q", s)
		}
	}
	return off, lastN + 1, size, nil
}
