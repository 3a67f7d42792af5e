// Package profile learns which files a container reads first, so that the
// next cold mount of any layer holding those files fetches them first.
//
// A Recorder notes, per mounted layer, the first open of each regular file
// by content digest, in order, with its time since the recording began (the
// layer's first open: a pull may precede the container's start by hours).
// It records for a bounded window and a bounded number of files; past that
// an access costs one atomic load. The DB keeps the recordings by layer
// digest and, merged over all of them, the earliest rank of each file
// digest: a layer never recorded (another image's blob holding the same
// files) is ranked by its files' digests alone.
//
// Layout of the database:
//
//	meta/version            "1"
//	layers/<layer digest>   JSON Profile: the layer's accesses, earliest first
//	files/<file digest>     earliest rank in any profile: at (µs, 8 bytes BE) + pos (4 bytes BE)
//
// files is derived from layers: it is rebuilt from them whenever a profile
// is dropped (beyond MaxLayers). Between rebuilds a file pushed out of a
// full profile by earlier ones keeps its (late) rank.
package profile

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// Caps of what the DB keeps.
const (
	// MaxFiles bounds one layer's profile; its latest accesses go first.
	MaxFiles = 4096
	// MaxLayers bounds the profiles kept; the least recently recorded go.
	MaxLayers = 1024
)

const schemaVersion = "1"

var (
	bucketLayers  = []byte("layers")
	bucketFiles   = []byte("files")
	keyVersion    = []byte("version")
	errBadVersion = errors.New("profile database has an unknown schema version")
)

// Access is the first open of one file during a recording.
type Access struct {
	Digest digest.Digest `json:"digest"`
	// At is the time since the recording began, in microseconds.
	AtUs int64 `json:"atUs"`
}

// Rank places a file in start-up order: earlier At first, then lower Pos
// (its place in the profile that gave At).
type Rank struct {
	At  time.Duration
	Pos int
}

// Less reports whether r comes before o.
func (r Rank) Less(o Rank) bool {
	if r.At != o.At {
		return r.At < o.At
	}
	return r.Pos < o.Pos
}

// Profile is one layer's recording, as stored and exported.
type Profile struct {
	Layer   digest.Digest `json:"layer"`
	Updated time.Time     `json:"updated"`
	Files   []Access      `json:"files"`
}

// DB keeps profiles in bbolt. It is safe for concurrent use.
type DB struct {
	db *bolt.DB
}

// Open opens or creates the profile database at path.
func Open(path string) (*DB, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 3 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open profiles %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketLayers, bucketFiles} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta, err := tx.CreateBucketIfNotExists([]byte("meta"))
		if err != nil {
			return err
		}
		switch v := meta.Get(keyVersion); {
		case v == nil:
			return meta.Put(keyVersion, []byte(schemaVersion))
		case string(v) != schemaVersion:
			return fmt.Errorf("%w: %q", errBadVersion, v)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open profiles %s: %w", path, err)
	}
	return &DB{db: db}, nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// Record merges accesses into layer's profile: each file keeps its
// earliest time, the profile its MaxFiles earliest files.
func (d *DB) Record(layer digest.Digest, accesses []Access) error {
	if err := layer.Validate(); err != nil {
		return fmt.Errorf("record profile: layer %q: %w", layer, err)
	}
	if len(accesses) == 0 {
		return nil
	}
	err := d.db.Update(func(tx *bolt.Tx) error {
		return merge(tx, Profile{Layer: layer, Updated: time.Now().UTC(), Files: accesses})
	})
	if err != nil {
		return fmt.Errorf("record profile of layer %s: %w", layer, err)
	}
	return nil
}

// merge folds p into the stored profile of p.Layer and the files index,
// and drops the oldest profiles beyond MaxLayers.
func merge(tx *bolt.Tx, p Profile) error {
	layers, files := tx.Bucket(bucketLayers), tx.Bucket(bucketFiles)
	key := []byte(p.Layer)
	var old Profile
	if v := layers.Get(key); v != nil {
		if err := json.Unmarshal(v, &old); err != nil {
			return fmt.Errorf("stored profile of %s: %w", p.Layer, err)
		}
	}
	merged := Profile{Layer: p.Layer, Updated: p.Updated, Files: mergeAccesses(old.Files, p.Files)}
	v, err := json.Marshal(merged)
	if err != nil {
		return err
	}
	if err := layers.Put(key, v); err != nil {
		return err
	}
	if countKeys(layers) > MaxLayers {
		return dropOldest(tx)
	}
	for i, a := range merged.Files {
		r := Rank{At: time.Duration(a.AtUs) * time.Microsecond, Pos: i}
		if cur, ok := decodeRank(files.Get([]byte(a.Digest))); ok && !r.Less(cur) {
			continue
		}
		if err := files.Put([]byte(a.Digest), encodeRank(r)); err != nil {
			return err
		}
	}
	return nil
}

func countKeys(b *bolt.Bucket) int {
	n := 0
	_ = b.ForEach(func(_, _ []byte) error { n++; return nil })
	return n
}

// mergeAccesses keeps each digest once at its earliest time, earliest
// first, at most MaxFiles.
func mergeAccesses(a, b []Access) []Access {
	best := make(map[digest.Digest]int64, len(a)+len(b))
	for _, l := range [][]Access{a, b} {
		for _, x := range l {
			if t, ok := best[x.Digest]; !ok || x.AtUs < t {
				best[x.Digest] = x.AtUs
			}
		}
	}
	out := make([]Access, 0, len(best))
	for d, t := range best {
		out = append(out, Access{Digest: d, AtUs: t})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].AtUs != out[j].AtUs {
			return out[i].AtUs < out[j].AtUs
		}
		return out[i].Digest < out[j].Digest
	})
	if len(out) > MaxFiles {
		out = out[:MaxFiles]
	}
	return out
}

// dropOldest removes the least recently updated profiles beyond MaxLayers
// and rebuilds the files index from those left.
func dropOldest(tx *bolt.Tx) error {
	layers := tx.Bucket(bucketLayers)
	var all []Profile
	if err := layers.ForEach(func(_, v []byte) error {
		var p Profile
		if err := json.Unmarshal(v, &p); err != nil {
			return err
		}
		all = append(all, p)
		return nil
	}); err != nil {
		return err
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Updated.After(all[j].Updated) })
	for _, p := range all[min(len(all), MaxLayers):] {
		if err := layers.Delete([]byte(p.Layer)); err != nil {
			return err
		}
	}
	all = all[:min(len(all), MaxLayers)]
	if err := tx.DeleteBucket(bucketFiles); err != nil {
		return err
	}
	files, err := tx.CreateBucket(bucketFiles)
	if err != nil {
		return err
	}
	best := map[digest.Digest]Rank{}
	for _, p := range all {
		for i, a := range p.Files {
			r := Rank{At: time.Duration(a.AtUs) * time.Microsecond, Pos: i}
			if cur, ok := best[a.Digest]; !ok || r.Less(cur) {
				best[a.Digest] = r
			}
		}
	}
	for d, r := range best {
		if err := files.Put([]byte(d), encodeRank(r)); err != nil {
			return err
		}
	}
	return nil
}

// Rank returns the rank of each of digests that some profile holds, in one
// read transaction.
func (d *DB) Rank(digests []digest.Digest) (map[digest.Digest]Rank, error) {
	out := map[digest.Digest]Rank{}
	err := d.db.View(func(tx *bolt.Tx) error {
		files := tx.Bucket(bucketFiles)
		for _, dg := range digests {
			if r, ok := decodeRank(files.Get([]byte(dg))); ok {
				out[dg] = r
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("rank files: %w", err)
	}
	return out, nil
}

// Profile returns the stored profile of layer, and whether there is one.
func (d *DB) Profile(layer digest.Digest) (Profile, bool, error) {
	var p Profile
	var found bool
	err := d.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketLayers).Get([]byte(layer))
		if v == nil {
			return nil
		}
		found = true
		return json.Unmarshal(v, &p)
	})
	if err != nil {
		return Profile{}, false, fmt.Errorf("profile of layer %s: %w", layer, err)
	}
	return p, found, nil
}

func encodeRank(r Rank) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint64(b, uint64(r.At/time.Microsecond))
	binary.BigEndian.PutUint32(b[8:], uint32(r.Pos))
	return b
}

// decodeRank reads a files value; v is valid only inside its transaction.
func decodeRank(v []byte) (Rank, bool) {
	if len(v) != 12 {
		return Rank{}, false
	}
	return Rank{
		At:  time.Duration(binary.BigEndian.Uint64(v)) * time.Microsecond,
		Pos: int(binary.BigEndian.Uint32(v[8:])),
	}, true
}
