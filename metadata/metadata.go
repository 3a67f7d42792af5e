// Package metadata keeps the table of contents of every lazily mounted layer
// in bbolt: its inodes, directory entries and per-file chunk tables. FUSE
// answers lookup, getattr and readdir from here without the network, and a
// restarted daemon remounts its layers without fetching a TOC again.
//
// Layout of the database:
//
//	layers/<key>/info       JSON LayerInfo; Complete is set by the last write
//	layers/<key>/nodes      inode (8 bytes BE) -> Node record (codec.go; JSON when
//	                        written before that encoding, still read)
//	layers/<key>/dirents    parent inode (8 bytes BE) + name -> inode (8) + type (1)
//
// A layer is written in one transaction, or in several when its TOC is
// large (100k entries); a layer whose info is not Complete was cut off
// mid-write and is deleted by whoever finds it.
package metadata

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// ErrNotFound is returned for a layer, inode or name that does not exist.
var ErrNotFound = errors.New("not found")

// RootID is the inode of a layer's root directory (FUSE's root node id).
const RootID uint64 = 1

// Type is a node's file type.
type Type uint8

// File types a layer can hold.
const (
	TypeDir Type = iota + 1
	TypeReg
	TypeSymlink
	TypeChar
	TypeBlock
	TypeFifo
)

// Chunk is one independently compressed piece of a regular file.
type Chunk struct {
	// Offset and End delimit the compressed bytes to fetch from the blob.
	Offset int64 `json:"o"`
	End    int64 `json:"e"`
	// InnerOffset is where the chunk starts in its decompressed stream
	// (non-zero when several small files share one stream).
	InnerOffset int64 `json:"io,omitempty"`
	// FileOffset and Size place the chunk in the file.
	FileOffset int64 `json:"fo"`
	Size       int64 `json:"s"`
	// Digest of the uncompressed chunk; may be empty (the whole file's
	// digest is checked regardless).
	Digest string `json:"d,omitempty"`
}

// Node is one inode of a layer. Hard links share one node.
type Node struct {
	ID       uint64            `json:"id"`
	Type     Type              `json:"t"`
	Mode     uint32            `json:"m"` // permission and setuid/setgid/sticky bits
	UID      uint32            `json:"u,omitempty"`
	GID      uint32            `json:"g,omitempty"`
	Size     int64             `json:"s,omitempty"`
	ModTime  int64             `json:"mt,omitempty"` // unix nanoseconds
	Link     string            `json:"l,omitempty"`  // symlink target
	DevMajor uint32            `json:"dma,omitempty"`
	DevMinor uint32            `json:"dmi,omitempty"`
	Nlink    uint32            `json:"n"`
	Xattrs   map[string][]byte `json:"x,omitempty"`
	// Digest is the sha256 of a regular file's content: its store key.
	Digest string `json:"d,omitempty"`
	// Opaque marks a directory that hides the lower layers' contents.
	Opaque bool    `json:"op,omitempty"`
	Chunks []Chunk `json:"c,omitempty"`
}

// Dirent is one name in a directory.
type Dirent struct {
	Parent uint64
	Name   string
	ID     uint64
	Type   Type
}

// LayerInfo describes a stored layer and where its blob lives.
type LayerInfo struct {
	// Ref is the image reference the blob is fetched through.
	Ref       string `json:"ref"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	MediaType string `json:"mediaType,omitempty"`
	TOCDigest string `json:"tocDigest"`
	// Format is "estargz" or "zstdchunked".
	Format string `json:"format"`
	// Prefetch lists, in order, the regular files placed before the
	// prefetch landmark.
	Prefetch []uint64 `json:"prefetch,omitempty"`
	// NoXattrs is set when no inode of the layer has an xattr and no
	// directory is opaque; false (as in records older than the field)
	// makes no such promise.
	NoXattrs bool `json:"noXattrs,omitempty"`
	// Nodes counts the layer's inodes.
	Nodes    int       `json:"nodes"`
	Created  time.Time `json:"created"`
	Complete bool      `json:"complete"`
}

var (
	bucketLayers  = []byte("layers")
	bucketNodes   = []byte("nodes")
	bucketDirents = []byte("dirents")
	keyInfo       = []byte("info")
)

// batch is how many records (nodes and dirents) one write transaction
// takes: one transaction per entry is far too slow for large TOCs, one for
// all of a 100k-entry TOC holds too much in memory.
const batch = 20000

// DB is the metadata database.
type DB struct {
	db *bolt.DB
	// mu guards writing: the keys this process's Put calls are writing,
	// which look cut off until their last transaction commits.
	mu      sync.Mutex
	writing map[string]int
}

// Open opens (creating if needed) the database at path.
func Open(path string) (*DB, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 3 * time.Second, NoFreelistSync: true})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("metadata: %s is locked by another process (another daemon on this root?): %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("metadata: open %s: %w", path, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketLayers)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("metadata: init: %w", err)
	}
	return &DB{db: db, writing: map[string]int{}}, nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func direntKey(parent uint64, name string) []byte {
	k := make([]byte, 8+len(name))
	binary.BigEndian.PutUint64(k, parent)
	copy(k[8:], name)
	return k
}

// Put stores a layer under key, replacing any earlier one: a Writer given
// the layer's nodes and directory entries in one go.
func (d *DB) Put(key string, info LayerInfo, nodes []*Node, dirents []Dirent) error {
	w := d.NewWriter(key)
	for _, n := range nodes {
		if err := w.Node(n); err != nil {
			w.Abort()
			return err
		}
	}
	for _, e := range dirents {
		if err := w.Dirent(e); err != nil {
			w.Abort()
			return err
		}
	}
	return w.Commit(info)
}

func putInfo(lb *bolt.Bucket, info LayerInfo) error {
	v, err := json.Marshal(info)
	if err != nil {
		return err
	}
	return lb.Put(keyInfo, v)
}

func (d *DB) update(key string, fn func(*bolt.Bucket) error) error {
	err := d.db.Update(func(tx *bolt.Tx) error {
		lb := tx.Bucket(bucketLayers).Bucket([]byte(key))
		if lb == nil {
			return ErrNotFound
		}
		return fn(lb)
	})
	if err != nil {
		return fmt.Errorf("metadata: layer %s: %w", key, err)
	}
	return nil
}

// Delete forgets a layer; deleting one that does not exist is not an error.
func (d *DB) Delete(key string) error {
	err := d.db.Update(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketLayers).DeleteBucket([]byte(key))
		if errors.Is(err, bolt.ErrBucketNotFound) {
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("metadata: delete layer %s: %w", key, err)
	}
	return nil
}

func (d *DB) isWriting(key string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.writing[key] > 0
}

// Layers lists the complete layers by key and deletes incomplete ones,
// except those a Put of this process is still writing.
func (d *DB) Layers() (map[string]LayerInfo, error) {
	out := map[string]LayerInfo{}
	var broken []string
	err := d.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketLayers).ForEach(func(k, v []byte) error {
			info, err := readInfo(tx.Bucket(bucketLayers).Bucket(k))
			if err != nil || !info.Complete {
				broken = append(broken, string(k))
				return nil
			}
			out[string(k)] = info
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("metadata: list layers: %w", err)
	}
	for _, k := range broken {
		if err := d.deleteBroken(k); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// deleteBroken deletes layer key if it still is incomplete and no Put is
// writing it: checked in the deleting transaction, since a Put may have
// completed it since it was found incomplete.
func (d *DB) deleteBroken(key string) error {
	err := d.db.Update(func(tx *bolt.Tx) error {
		layers := tx.Bucket(bucketLayers)
		lb := layers.Bucket([]byte(key))
		if lb == nil || d.isWriting(key) {
			return nil
		}
		if info, err := readInfo(lb); err == nil && info.Complete {
			return nil
		}
		return layers.DeleteBucket([]byte(key))
	})
	if err != nil {
		return fmt.Errorf("metadata: delete layer %s: %w", key, err)
	}
	return nil
}

func readInfo(lb *bolt.Bucket) (LayerInfo, error) {
	var info LayerInfo
	if lb == nil {
		return info, ErrNotFound
	}
	v := lb.Get(keyInfo)
	if v == nil {
		return info, ErrNotFound
	}
	err := json.Unmarshal(v, &info)
	return info, err
}

// Layer returns a reader of the complete layer key.
func (d *DB) Layer(key string) (*Layer, error) {
	var info LayerInfo
	err := d.db.View(func(tx *bolt.Tx) (err error) {
		info, err = readInfo(tx.Bucket(bucketLayers).Bucket([]byte(key)))
		return err
	})
	if err == nil && !info.Complete {
		err = ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("metadata: layer %s: %w", key, err)
	}
	return &Layer{db: d.db, key: []byte(key), Info: info}, nil
}

// Layer reads one stored layer.
type Layer struct {
	db   *bolt.DB
	key  []byte
	Info LayerInfo
}

func (l *Layer) view(fn func(lb *bolt.Bucket) error) error {
	return l.db.View(func(tx *bolt.Tx) error {
		lb := tx.Bucket(bucketLayers).Bucket(l.key)
		if lb == nil {
			return fmt.Errorf("layer %s: %w", l.key, ErrNotFound)
		}
		return fn(lb)
	})
}

// Node returns inode id.
func (l *Layer) Node(id uint64) (*Node, error) {
	var n Node
	err := l.view(func(lb *bolt.Bucket) error {
		v := lb.Bucket(bucketNodes).Get(u64(id))
		if v == nil {
			return fmt.Errorf("inode %d: %w", id, ErrNotFound)
		}
		return decodeNode(v, &n)
	})
	if err != nil {
		return nil, fmt.Errorf("inode %d: %w", id, err)
	}
	return &n, nil
}

// Lookup returns the inode of name in directory parent.
func (l *Layer) Lookup(parent uint64, name string) (*Node, error) {
	var n Node
	err := l.view(func(lb *bolt.Bucket) error {
		v := lb.Bucket(bucketDirents).Get(direntKey(parent, name))
		if len(v) < 8 {
			return ErrNotFound
		}
		nv := lb.Bucket(bucketNodes).Get(v[:8])
		if nv == nil {
			return fmt.Errorf("inode %d: %w", binary.BigEndian.Uint64(v), ErrNotFound)
		}
		if err := decodeNode(nv, &n); err != nil {
			return fmt.Errorf("inode %d: %w", binary.BigEndian.Uint64(v), err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &n, nil
}

// ReadDir lists directory parent's entries, sorted by name.
func (l *Layer) ReadDir(parent uint64) ([]Dirent, error) {
	var out []Dirent
	prefix := u64(parent)
	err := l.view(func(lb *bolt.Bucket) error {
		c := lb.Bucket(bucketDirents).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			if len(v) < 9 {
				return fmt.Errorf("dirent %q of inode %d: corrupt", k[8:], parent)
			}
			out = append(out, Dirent{Parent: parent, Name: string(k[8:]), ID: binary.BigEndian.Uint64(v), Type: Type(v[8])})
		}
		return nil
	})
	return out, err
}

// Walk calls fn for every node, in inode order.
func (l *Layer) Walk(fn func(*Node) error) error {
	return l.view(func(lb *bolt.Bucket) error {
		return lb.Bucket(bucketNodes).ForEach(func(_, v []byte) error {
			var n Node
			if err := decodeNode(v, &n); err != nil {
				return err
			}
			return fn(&n)
		})
	})
}
