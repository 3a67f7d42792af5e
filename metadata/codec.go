package metadata

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
)

// Node records are binary: FUSE decodes one per lookup and per entry of a
// READDIRPLUS, and JSON cost most of a directory walk's time in the daemon.
// Records written before this encoding are JSON objects and still read.
//
//	version byte (nodeV1)
//	uvarint ID, type byte, uvarint Mode, UID, GID
//	varint Size, ModTime
//	string Link
//	uvarint DevMajor, DevMinor, Nlink
//	uvarint len(Xattrs), then sorted: string name, bytes value
//	string Digest
//	byte Opaque (0 or 1)
//	uvarint len(Chunks), then: varint Offset, End, InnerOffset, FileOffset, Size; string Digest
//
// A string or bytes is a uvarint length and that many bytes.
const nodeV1 = 1

// errCorrupt is a node record that does not decode.
var errCorrupt = errors.New("corrupt node record")

// encodeNode appends n's record to b.
func encodeNode(b []byte, n *Node) []byte {
	b = append(b, nodeV1)
	b = binary.AppendUvarint(b, n.ID)
	b = append(b, byte(n.Type))
	b = binary.AppendUvarint(b, uint64(n.Mode))
	b = binary.AppendUvarint(b, uint64(n.UID))
	b = binary.AppendUvarint(b, uint64(n.GID))
	b = binary.AppendVarint(b, n.Size)
	b = binary.AppendVarint(b, n.ModTime)
	b = appendString(b, n.Link)
	b = binary.AppendUvarint(b, uint64(n.DevMajor))
	b = binary.AppendUvarint(b, uint64(n.DevMinor))
	b = binary.AppendUvarint(b, uint64(n.Nlink))
	b = binary.AppendUvarint(b, uint64(len(n.Xattrs)))
	for _, k := range slices.Sorted(maps.Keys(n.Xattrs)) {
		b = appendString(b, k)
		b = appendString(b, string(n.Xattrs[k]))
	}
	b = appendString(b, n.Digest)
	if n.Opaque {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.AppendUvarint(b, uint64(len(n.Chunks)))
	for _, c := range n.Chunks {
		b = binary.AppendVarint(b, c.Offset)
		b = binary.AppendVarint(b, c.End)
		b = binary.AppendVarint(b, c.InnerOffset)
		b = binary.AppendVarint(b, c.FileOffset)
		b = binary.AppendVarint(b, c.Size)
		b = appendString(b, c.Digest)
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// decodeNode reads a record written by encodeNode, or an older JSON one.
// The result shares no memory with v (bbolt's values live only as long as
// their transaction).
func decodeNode(v []byte, n *Node) error {
	if len(v) > 0 && v[0] == '{' {
		return json.Unmarshal(v, n)
	}
	if len(v) == 0 || v[0] != nodeV1 {
		return fmt.Errorf("%w: unknown version", errCorrupt)
	}
	r := reader{b: v[1:]}
	n.ID = r.uvarint()
	n.Type = Type(r.byte())
	n.Mode = r.uint32()
	n.UID = r.uint32()
	n.GID = r.uint32()
	n.Size = r.varint()
	n.ModTime = r.varint()
	n.Link = r.string()
	n.DevMajor = r.uint32()
	n.DevMinor = r.uint32()
	n.Nlink = r.uint32()
	if k := r.count(); k > 0 {
		n.Xattrs = make(map[string][]byte, k)
		for range k {
			name := r.string()
			n.Xattrs[name] = []byte(r.string())
		}
	}
	n.Digest = r.string()
	n.Opaque = r.byte() == 1
	if k := r.count(); k > 0 {
		n.Chunks = make([]Chunk, k)
		for i := range n.Chunks {
			c := &n.Chunks[i]
			c.Offset, c.End, c.InnerOffset = r.varint(), r.varint(), r.varint()
			c.FileOffset, c.Size = r.varint(), r.varint()
			c.Digest = r.string()
		}
	}
	if r.err != nil {
		return r.err
	}
	if len(r.b) != 0 {
		return fmt.Errorf("%w: %d bytes left over", errCorrupt, len(r.b))
	}
	return nil
}

// reader decodes a record; the first error sticks and zeroes what follows.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(what string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: bad %s", errCorrupt, what)
	}
	r.b = nil
}

func (r *reader) uvarint() uint64 {
	v, k := binary.Uvarint(r.b)
	if k <= 0 {
		r.fail("number")
		return 0
	}
	r.b = r.b[k:]
	return v
}

func (r *reader) varint() int64 {
	v, k := binary.Varint(r.b)
	if k <= 0 {
		r.fail("number")
		return 0
	}
	r.b = r.b[k:]
	return v
}

func (r *reader) uint32() uint32 {
	v := r.uvarint()
	if v > 1<<32-1 {
		r.fail("32-bit number")
		return 0
	}
	return uint32(v)
}

func (r *reader) byte() byte {
	if len(r.b) == 0 {
		r.fail("byte")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

// count reads a length of items that each take at least one byte, so a
// corrupt length cannot make the decoder allocate more than the record.
func (r *reader) count() int {
	v := r.uvarint()
	if v > uint64(len(r.b)) {
		r.fail("count")
		return 0
	}
	return int(v)
}

func (r *reader) string() string {
	k := r.count()
	s := string(r.b[:k])
	r.b = r.b[k:]
	return s
}
