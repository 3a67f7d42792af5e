package remote

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

// The fuzz targets of this file state what the parsers of a registry's
// answers promise for any answer, not only for the ones the tests chose:
//
//	go test -run '^$' -fuzz '^FuzzReadResponse$' -fuzztime 60s ./fs/remote/
//
// Inputs that once failed live in testdata/fuzz/<target>/ and run with
// every `go test`.

// FuzzContentRange checks parseContentRange and Blob.contentRange on any
// header value: what they accept is a non-empty range [off, end) with
// 0 <= off < end, inside the total size the header states and, for
// contentRange, inside the blob; it formats back to a header that parses
// to the same values. A header formatted from numbers parses back to them
// exactly when they describe such a range.
func FuzzContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-0/1", "bytes 0-1023/1024", "bytes 100-199/1000", "bytes 990-999/1000", "bytes 0-99/*",
		"bytes 5-4/10", "bytes 0-9/10 ", "bytes=0-9/10", "bytes -5/10", "bytes 0-9223372036854775806/9223372036854775807",
		"bytes 0-9223372036854775807/*", "bytes +1-+2/+3", "bytes */1000", "",
	} {
		f.Add(s, int64(1000), int64(0), int64(9), int64(10))
	}
	f.Add("bytes 0-1/2", int64(2), int64(math.MaxInt64-1), int64(math.MaxInt64), int64(-1))
	f.Fuzz(func(t *testing.T, s string, blobSize, first, last, total int64) {
		off, end, size, err := parseContentRange(s)
		if err == nil {
			if off < 0 || end <= off || size < -1 || (size >= 0 && end > size) {
				t.Fatalf("parseContentRange(%q) = [%d, %d) of %d", s, off, end, size)
			}
			again := header(off, end-1, size)
			if o, e, sz, err := parseContentRange(again); err != nil || o != off || e != end || sz != size {
				t.Fatalf("%q parsed to [%d, %d) of %d; formatted again, %q parses to [%d, %d) of %d, %v", s, off, end, size, again, o, e, sz, err)
			}
		}
		b := &Blob{size: blobSize}
		boff, bend, berr := b.contentRange(s)
		switch {
		case berr == nil && err != nil:
			t.Fatalf("contentRange(%q) accepted what parseContentRange refuses: %v", s, err)
		case berr == nil && (boff != off || bend != end || bend > blobSize || (size >= 0 && size != blobSize)):
			t.Fatalf("contentRange(%q) = [%d, %d) for a %d-byte blob", s, boff, bend, blobSize)
		case berr != nil && err == nil && (size < 0 || size == blobSize) && end <= blobSize:
			t.Fatalf("contentRange(%q) refused [%d, %d) of %d for a %d-byte blob: %v", s, off, end, size, blobSize, berr)
		}

		// From numbers: accepted exactly when they make a range whose end
		// is representable.
		h := header(first, last, total)
		o, e, sz, err := parseContentRange(h)
		valid := first >= 0 && first <= last && last < math.MaxInt64 && (total < 0 || total > last)
		if valid != (err == nil) {
			t.Fatalf("parseContentRange(%q): %v, want it accepted: %v", h, err, valid)
		}
		if err == nil && (o != first || e != last+1 || sz != max(total, -1)) {
			t.Fatalf("parseContentRange(%q) = [%d, %d) of %d", h, o, e, sz)
		}
	})
}

// header formats a Content-Range for bytes first-last of total ("*" for a
// negative total).
func header(first, last, total int64) string {
	t := "*"
	if total >= 0 {
		t = strconv.FormatInt(total, 10)
	}
	return fmt.Sprintf("bytes %d-%d/%s", first, last, t)
}

// The blob FuzzReadResponse reads from, and a byte to mark what nothing
// wrote.
const (
	fuzzBlobSize = 1 << 12
	untouched    = 0xa5
	// fuzzSignature stands for the signature of a pre-signed blob URL,
	// which no error may show.
	fuzzSignature = "c2lnbmF0dXJl7f3a"
)

// blobByte is the byte an honest server sends at offset i.
func blobByte(i int64) byte { return byte(i*7 + i>>8 + 1) }

// fuzzParts turns spec into the parts of one request, as plan makes them:
// ordered, disjoint, each with one target covering it exactly (spec byte 0)
// or two possibly overlapping ones; 3 bytes a part, at most 8 parts.
func fuzzParts(spec []byte) []*part {
	var parts []*part
	pos := int64(0)
	for i := 0; i+3 <= len(spec) && len(parts) < 8; i += 3 {
		gap, n, split := int64(spec[i]), 1+int64(spec[i+1]), spec[i+2]
		off := pos + gap
		if off+n > fuzzBlobSize {
			break
		}
		p := &part{off: off, end: off + n}
		if split == 0 {
			p.targets = []target{{off: off, buf: make([]byte, n)}}
		} else {
			a, b := 1+int64(split)%n, int64(split>>4)%n
			p.targets = []target{{off: off, buf: make([]byte, a)}, {off: off + b, buf: make([]byte, n-b)}}
		}
		for _, t := range p.targets {
			for j := range t.buf {
				t.buf[j] = untouched
			}
		}
		parts = append(parts, p)
		pos = p.end
	}
	return parts
}

// claims are the bytes a response states for each blob offset: what any
// part of it, read the way the response says, puts there.
type claims map[int64][]byte

func (c claims) add(off int64, data []byte) {
	for i, v := range data {
		c[off+int64(i)] = append(c[off+int64(i)], v)
	}
}

func (c claims) has(off int64, v byte) bool {
	return bytes.IndexByte(c[off], v) >= 0
}

// responseClaims reads a response the way a client that trusts only the
// positions a response states would: a 200 from the blob's start, a 206's
// Content-Range, or each multipart/byteranges part's.
func responseClaims(status int, header http.Header, body []byte, size int64) claims {
	c := claims{}
	b := &Blob{size: size}
	switch status {
	case http.StatusOK:
		c.add(0, body)
	case http.StatusPartialContent:
		mt, params, _ := mime.ParseMediaType(header.Get("Content-Type"))
		if mt != "multipart/byteranges" {
			if off, end, err := b.contentRange(header.Get("Content-Range")); err == nil {
				c.add(off, body[:min(int64(len(body)), end-off)])
			}
			return c
		}
		mr := multipart.NewReader(bytes.NewReader(body), params["boundary"])
		for {
			mp, err := mr.NextPart()
			if err != nil {
				return c
			}
			off, end, err := b.contentRange(mp.Header.Get("Content-Range"))
			if err != nil {
				return c
			}
			data, _ := io.ReadAll(io.LimitReader(mp, end-off))
			c.add(off, data)
		}
	}
	return c
}

// multipartBody is a multipart/byteranges body with boundary holding the
// given ranges ({first, last}) of the honest blob.
func multipartBody(boundary string, ranges ...[2]int64) []byte {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	if err := mw.SetBoundary(boundary); err != nil {
		panic(err)
	}
	for _, r := range ranges {
		h := textproto.MIMEHeader{}
		h.Set("Content-Type", "application/octet-stream")
		h.Set("Content-Range", header(r[0], r[1], fuzzBlobSize))
		w, err := mw.CreatePart(h)
		if err != nil {
			panic(err)
		}
		for i := r[0]; i <= r[1]; i++ {
			w.Write([]byte{blobByte(i)})
		}
	}
	mw.Close()
	return buf.Bytes()
}

func honest(first, last int64) []byte {
	b := make([]byte, 0, last-first+1)
	for i := first; i <= last; i++ {
		b = append(b, blobByte(i))
	}
	return b
}

// FuzzReadResponse gives Blob.read any response to a request for any parts:
// status, Content-Type (multipart/byteranges with any boundary, or not),
// Content-Range, Content-Length and body. Whatever it returns, every byte
// it wrote into a caller's buffer is one the response placed at that
// offset of the blob, and no part is marked done that a response did not
// fill; a nil error means every part is done and every byte of every
// buffer came from the response. A part that streams its progress reports
// only bytes it keeps, and after a failure covers just what is missing. No
// error shows the signature of a pre-signed blob URL.
func FuzzReadResponse(f *testing.F) {
	const bnd = "3d6b6a416f9b5"
	mpType := "multipart/byteranges; boundary=" + bnd
	// Two parts [10, 110) and [300, 302), the second with two targets.
	twoParts := []byte{10, 99, 0, 190, 1, 0x12}
	f.Add(uint8(0), mpType, "", multipartBody(bnd, [2]int64{10, 109}, [2]int64{300, 301}), twoParts, false, false)
	f.Add(uint8(0), mpType, "", multipartBody(bnd, [2]int64{300, 301}, [2]int64{10, 109}), twoParts, false, false)
	f.Add(uint8(0), mpType, "", multipartBody(bnd, [2]int64{0, 200}, [2]int64{290, 310}), twoParts, false, false)
	f.Add(uint8(0), mpType, "", multipartBody(bnd, [2]int64{10, 109}), twoParts, false, false)
	f.Add(uint8(0), mpType, "", multipartBody(bnd, [2]int64{10, 109}, [2]int64{10, 109}, [2]int64{300, 301})[:150], twoParts, true, false)
	f.Add(uint8(0), mpType, "", multipartBody("x", [2]int64{10, 109}, [2]int64{300, 301}), twoParts, false, false)
	f.Add(uint8(0), "application/octet-stream", "bytes 10-301/4096", honest(10, 301), twoParts, true, false)
	f.Add(uint8(0), "", "bytes 10-109/4096", honest(10, 109), []byte{10, 99, 0}, true, true)
	f.Add(uint8(0), "", "bytes 10-109/4096", honest(10, 60), []byte{10, 99, 0}, false, true)
	f.Add(uint8(0), "", "bytes 10-109/*", honest(10, 109), []byte{10, 99, 0xf3}, false, false)
	f.Add(uint8(1), "", "", honest(0, 99), []byte{0, 99, 0}, true, true)
	f.Add(uint8(1), "", "", honest(0, 4095), []byte{0, 99, 0}, true, false)
	f.Add(uint8(2), "", "", []byte(`{"errors":[{"code":"RANGE_INVALID"}]}`), twoParts, false, false)
	f.Add(uint8(3), mpType, "bytes 0-1/4096", []byte("--"+bnd+"--\r\n"), twoParts, false, false)
	f.Fuzz(func(t *testing.T, status uint8, contentType, contentRange string, body, spec []byte, withLength, stream bool) {
		parts := fuzzParts(spec)
		if len(parts) == 0 {
			return
		}
		code := []int{http.StatusPartialContent, http.StatusOK, http.StatusRequestedRangeNotSatisfiable,
			http.StatusBadRequest, http.StatusInternalServerError}[int(status)%5]
		h := http.Header{}
		if contentType != "" {
			h.Set("Content-Type", contentType)
		}
		if contentRange != "" {
			h.Set("Content-Range", contentRange)
		}
		u, _ := url.Parse("https://registry.test/v2/repo/blobs/sha256:0?X-Amz-Signature=" + fuzzSignature)
		resp := &http.Response{
			StatusCode: code, Status: http.StatusText(code), Header: h, ContentLength: -1,
			Body:    io.NopCloser(bytes.NewReader(body)),
			Request: &http.Request{Method: http.MethodGet, URL: u},
		}
		if withLength {
			resp.ContentLength = int64(len(body))
		}
		// The streaming part, as ReadStream makes it: one part, one target.
		type report struct{ filled, off int64 }
		var reports []report
		var streamed *part
		var streamBuf []byte
		origOff := parts[0].off
		if stream && len(parts) == 1 && len(parts[0].targets) == 1 {
			streamed, streamBuf = parts[0], parts[0].targets[0].buf
			streamed.progress = func(filled int64) { reports = append(reports, report{filled, streamed.off}) }
		}
		targets := map[*part][]target{}
		for _, p := range parts {
			targets[p] = append([]target(nil), p.targets...)
		}

		b := &Blob{size: fuzzBlobSize}
		err := b.read(resp, parts)

		if err != nil && strings.Contains(err.Error(), fuzzSignature) &&
			!strings.Contains(string(body)+contentType+contentRange, fuzzSignature) {
			t.Fatalf("the error shows the URL's signature: %v", err)
		}

		c := responseClaims(code, h, body, fuzzBlobSize)
		for i, p := range parts {
			for _, tg := range targets[p] {
				for j, v := range tg.buf {
					pos := tg.off + int64(j)
					if (err == nil || v != untouched) && !c.has(pos, v) {
						t.Fatalf("part %d: byte %d is %#x, which the response does not place there (it says %v); read: %v", i, pos, v, c[pos], err)
					}
				}
			}
			if !p.done {
				if err == nil {
					t.Fatalf("read returned nil with part %d [%d, %d) not done", i, p.off, p.end)
				}
				continue
			}
			for pos := p.off; pos < p.end; pos++ {
				if len(c[pos]) == 0 {
					t.Fatalf("part %d [%d, %d) done, but the response has no byte %d", i, p.off, p.end, pos)
				}
			}
		}
		if streamed == nil {
			return
		}
		var last int64
		for _, r := range reports {
			if r.filled < last || r.filled > int64(len(streamBuf)) {
				t.Fatalf("progress reports %v of a %d-byte buffer", reports, len(streamBuf))
			}
			last = r.filled
		}
		for j := range last {
			if !c.has(origOff+j, streamBuf[j]) {
				t.Fatalf("progress reported %d bytes, but byte %d is not the response's", last, origOff+j)
			}
		}
		if !streamed.done {
			// What a retry asks for is exactly what was not reported.
			tg := streamed.targets
			if streamed.off != origOff+last || len(tg) != 1 || tg[0].off != streamed.off ||
				int64(len(tg[0].buf)) != streamed.end-streamed.off || (len(tg[0].buf) > 0 && &tg[0].buf[0] != &streamBuf[last]) {
				t.Fatalf("after reporting %d bytes of [%d, %d), the part covers [%d, %d)", last, origOff, streamed.end, streamed.off, streamed.end)
			}
		}
	})
}
