package metadata

import (
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
)

func sampleNodes() []*Node {
	return []*Node{
		{ID: RootID, Type: TypeDir, Mode: 0o755, Nlink: 3, Opaque: true},
		{ID: 2, Type: TypeReg, Mode: 0o4755, UID: 1000, GID: math.MaxUint32, Size: 1 << 40, ModTime: -1, Nlink: 2,
			Xattrs: map[string][]byte{"security.capability": {1, 0, 0, 2}, "user.empty": {}, "user.z": []byte("z")},
			Digest: "sha256:" + string(make([]byte, 64)),
			Chunks: []Chunk{
				{Offset: 0, End: 100, InnerOffset: 0, FileOffset: 0, Size: 1 << 22, Digest: "sha256:aa"},
				{Offset: math.MaxInt64 - 10, End: math.MaxInt64, InnerOffset: 7, FileOffset: 1 << 22, Size: 1, Digest: ""},
			}},
		{ID: math.MaxUint64, Type: TypeSymlink, Mode: 0o777, Link: "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", Nlink: 1},
		{ID: 4, Type: TypeChar, DevMajor: 4095, DevMinor: 1 << 20, Nlink: 1},
		{ID: 5, Type: TypeFifo},
	}
}

func TestNodeRecordsRoundTrip(t *testing.T) {
	for _, n := range sampleNodes() {
		var got Node
		if err := decodeNode(encodeNode(nil, n), &got); err != nil {
			t.Fatalf("inode %d: %v", n.ID, err)
		}
		want := *n
		if len(want.Xattrs) == 0 {
			want.Xattrs = nil
		}
		if !reflect.DeepEqual(&got, &want) {
			t.Errorf("inode %d: got %+v, want %+v", n.ID, got, want)
		}
	}
}

// TestJSONNodeRecordsStillRead reads records the way earlier versions
// wrote them.
func TestJSONNodeRecordsStillRead(t *testing.T) {
	for _, n := range sampleNodes() {
		v, err := json.Marshal(n)
		if err != nil {
			t.Fatal(err)
		}
		var got Node
		if err := decodeNode(v, &got); err != nil {
			t.Fatalf("inode %d: %v", n.ID, err)
		}
		if !reflect.DeepEqual(&got, n) {
			t.Errorf("inode %d: got %+v, want %+v", n.ID, got, *n)
		}
	}
}

// TestCorruptNodeRecordsFail cuts and flips records: every damaged record
// either decodes to some node or fails with errCorrupt; none panics or
// allocates beyond its size.
func TestCorruptNodeRecordsFail(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range sampleNodes() {
		v := encodeNode(nil, n)
		for i := range len(v) {
			var got Node
			if err := decodeNode(v[:i], &got); !errors.Is(err, errCorrupt) {
				t.Errorf("inode %d cut at %d of %d bytes: %v, want a corrupt record", n.ID, i, len(v), err)
			}
		}
		if err := decodeNode(append(v, 0), new(Node)); !errors.Is(err, errCorrupt) {
			t.Errorf("inode %d with a byte more: %v", n.ID, err)
		}
		for range 2000 {
			w := append([]byte(nil), v...)
			w[rng.IntN(len(w))] ^= byte(1 + rng.IntN(255))
			_ = decodeNode(w, new(Node))
		}
	}
}

func FuzzDecodeNode(f *testing.F) {
	for _, n := range sampleNodes() {
		f.Add(encodeNode(nil, n))
		// Records as earlier versions wrote them.
		v, err := json.Marshal(n)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v []byte) {
		var n Node
		if decodeNode(v, &n) != nil {
			return
		}
		// What decodes encodes back to an equal node; a JSON record too,
		// up to empty maps and slices, which the binary form keeps as nil.
		if v[0] != nodeV1 {
			normalize(&n)
		}
		var again Node
		if err := decodeNode(encodeNode(nil, &n), &again); err != nil || !reflect.DeepEqual(&n, &again) {
			t.Fatalf("re-encoding %+v: %v", n, err)
		}
	})
}

// normalize makes n's empty xattrs and chunks nil and its xattr values
// non-nil, as a binary record decodes them.
func normalize(n *Node) {
	if len(n.Xattrs) == 0 {
		n.Xattrs = nil
	}
	for k, v := range n.Xattrs {
		if v == nil {
			n.Xattrs[k] = []byte{}
		}
	}
	if len(n.Chunks) == 0 {
		n.Chunks = nil
	}
}
