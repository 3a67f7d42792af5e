package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strconv"
	"strings"
)

// part is one contiguous byte range [off, end) on the wire, and the
// destinations it fills: pieces of the callers' buffers, sorted by offset,
// possibly overlapping, possibly leaving gaps whose bytes are dropped.
type part struct {
	off, end int64
	targets  []target
	// done is set once every byte was read; a part belongs to one request
	// at a time, so it needs no lock.
	done bool
	// progress, when set, is told how many bytes of the part's single
	// target are filled, from its start, as they arrive; a retry then asks
	// only for the rest, so bytes reported are never written again.
	progress func(filled int64)
	reported int64 // bytes before off already reported
}

// progressStep is how often a streamed part reports: small enough that a
// reader waiting for the first files of a window goes on early, big enough
// that the reports cost nothing next to the bytes.
const progressStep = 64 << 10

// target receives the blob's bytes [off, off+len(buf)).
type target struct {
	off int64
	buf []byte
}

// fill reads the part's bytes from r, which must be positioned at p.off.
func (p *part) fill(r io.Reader) error {
	if len(p.targets) == 1 && p.targets[0].off == p.off && int64(len(p.targets[0].buf)) == p.end-p.off {
		// The common case reads straight into the caller's buffer.
		if p.progress == nil {
			if _, err := io.ReadFull(r, p.targets[0].buf); err != nil {
				return bodyError(err)
			}
			p.done = true
			return nil
		}
		return p.stream(r)
	}
	var tmp [32 << 10]byte
	for pos := p.off; pos < p.end; {
		n := min(int64(len(tmp)), p.end-pos)
		if _, err := io.ReadFull(r, tmp[:n]); err != nil {
			return bodyError(err)
		}
		for _, t := range p.targets {
			if t.off >= pos+n {
				break
			}
			lo, hi := max(t.off, pos), min(t.off+int64(len(t.buf)), pos+n)
			if lo < hi {
				copy(t.buf[lo-t.off:hi-t.off], tmp[lo-pos:hi-pos])
			}
		}
		pos += n
	}
	p.done = true
	return nil
}

// stream fills the part's single target in steps, reporting each, and
// leaves the part covering only what is still missing if the body ends
// early.
func (p *part) stream(r io.Reader) error {
	buf := p.targets[0].buf
	var got int
	for got < len(buf) {
		n, err := io.ReadFull(r, buf[got:min(got+progressStep, len(buf))])
		got += n
		if n > 0 {
			p.progress(p.reported + int64(got))
		}
		if err != nil {
			p.off += int64(got)
			p.reported += int64(got)
			p.targets[0] = target{off: p.off, buf: buf[got:]}
			return bodyError(err)
		}
	}
	p.done = true
	return nil
}

// bodyError marks a body that ended early as short, hence retryable.
func bodyError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %w", errShortBody, err)
	}
	return fmt.Errorf("read body: %w", err)
}

// rangeHeader is the Range header value asking for parts.
func rangeHeader(parts []*part) string {
	var sb strings.Builder
	sb.WriteString("bytes=")
	for i, p := range parts {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(strconv.FormatInt(p.off, 10))
		sb.WriteByte('-')
		sb.WriteString(strconv.FormatInt(p.end-1, 10))
	}
	return sb.String()
}

// fetch makes one attempt at the parts not yet done, in one request.
func (b *Blob) fetch(ctx context.Context, host int, parts []*part) error {
	var todo []*part
	for _, p := range parts {
		if !p.done {
			todo = append(todo, p)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	resp, err := b.send(ctx, host, http.MethodGet, rangeHeader(todo))
	if err != nil {
		return err
	}
	defer b.finish(resp, resp.Body)
	return b.read(resp, todo)
}

// read fills parts from resp, trusting only bytes whose position the
// response states: a Content-Range, or a 200 whose body is the whole blob.
// It returns nil only if every part is done.
func (b *Blob) read(resp *http.Response, parts []*part) error {
	multi := len(parts) > 1
	// Ranges address the stored bytes; an encoded body would shift them.
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && ce != "identity" {
		return fmt.Errorf("GET %s: unexpected Content-Encoding %q", redact(resp.Request.URL), ce)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		// The server ignored Range and sends the blob from its start.
		if multi {
			return fmt.Errorf("%w: %s answered 200", errNoMultiRange, redact(resp.Request.URL))
		}
		if parts[0].off != 0 {
			return fmt.Errorf("GET %s: server ignored Range %s and sent the whole blob",
				redact(resp.Request.URL), rangeHeader(parts))
		}
		if resp.ContentLength >= 0 && resp.ContentLength != b.size {
			return fmt.Errorf("GET %s: whole blob of %d bytes, want %d", redact(resp.Request.URL), resp.ContentLength, b.size)
		}
		return parts[0].fill(resp.Body)
	case http.StatusBadRequest, http.StatusRequestedRangeNotSatisfiable:
		if multi {
			return fmt.Errorf("%w: %s answered %s", errNoMultiRange, redact(resp.Request.URL), resp.Status)
		}
		return newStatusError(resp)
	default:
		return newStatusError(resp)
	}

	mt, params, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if mt != "multipart/byteranges" {
		off, end, err := b.contentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return fmt.Errorf("GET %s: %w", redact(resp.Request.URL), err)
		}
		if resp.ContentLength >= 0 && resp.ContentLength != end-off {
			return fmt.Errorf("GET %s: Content-Length %d for Content-Range of %d bytes",
				redact(resp.Request.URL), resp.ContentLength, end-off)
		}
		if err := fillCovered(resp.Body, off, end, parts); err != nil {
			return err
		}
		// A server that ignores all but the first range answers this way.
		if !allDone(parts) {
			if multi {
				return fmt.Errorf("%w: %s answered one range", errNoMultiRange, redact(resp.Request.URL))
			}
			return fmt.Errorf("GET %s: Content-Range %d-%d, want %s",
				redact(resp.Request.URL), off, end-1, rangeHeader(parts))
		}
		return nil
	}

	mr := multipart.NewReader(resp.Body, params["boundary"])
	for {
		mp, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return bodyError(err)
		}
		off, end, err := b.contentRange(mp.Header.Get("Content-Range"))
		if err != nil {
			return fmt.Errorf("GET %s: multipart: %w", redact(resp.Request.URL), err)
		}
		if err := fillCovered(mp, off, end, parts); err != nil {
			return err
		}
	}
	if !allDone(parts) {
		// The response was whole but left ranges out.
		return fmt.Errorf("%w: %s left ranges out", errNoMultiRange, redact(resp.Request.URL))
	}
	return nil
}

// fillCovered reads the bytes [off, end) of the blob from r and fills every
// part they wholly contain. Parts only partly covered stay not done.
func fillCovered(r io.Reader, off, end int64, parts []*part) error {
	pos := off
	for _, p := range parts {
		if p.done || p.off < pos || p.end > end {
			continue
		}
		if p.off > pos {
			if _, err := io.CopyN(io.Discard, r, p.off-pos); err != nil {
				return bodyError(err)
			}
		}
		if err := p.fill(r); err != nil {
			return err
		}
		pos = p.end
	}
	return nil
}

func allDone(parts []*part) bool {
	for _, p := range parts {
		if !p.done {
			return false
		}
	}
	return true
}

// contentRange parses "bytes first-last/size" into [first, last+1) and
// checks it against the blob.
func (b *Blob) contentRange(s string) (off, end int64, err error) {
	off, end, size, err := parseContentRange(s)
	if err != nil {
		return 0, 0, err
	}
	if size >= 0 && size != b.size {
		return 0, 0, fmt.Errorf("Content-Range %q: blob has %d bytes", s, b.size)
	}
	if end > b.size {
		return 0, 0, fmt.Errorf("Content-Range %q beyond the blob's %d bytes", s, b.size)
	}
	return off, end, nil
}
