package metadata

import (
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Writer stores a layer record by record as its builder makes them, in
// transactions of up to batch records, so that a layer of hundreds of
// thousands of entries is never all in memory; a layer of up to batch
// records (most) is one transaction, one fsync. It replaces an earlier
// layer under the key, and the layer looks cut off (Layers deletes it at
// the next start, unless this process is writing it) until Commit marks
// it complete.
type Writer struct {
	d     *DB
	key   string
	first bool
	nodes int
	recs  []record
	links map[uint64]uint32
	done  bool
}

type record struct {
	dirent bool
	k, v   []byte
}

// NewWriter starts writing the layer under key.
func (d *DB) NewWriter(key string) *Writer {
	d.mu.Lock()
	d.writing[key]++
	d.mu.Unlock()
	return &Writer{d: d, key: key, first: true, links: map[uint64]uint32{}}
}

// Node stores n (encoded now: the caller may drop it).
func (w *Writer) Node(n *Node) error {
	w.nodes++
	w.recs = append(w.recs, record{k: u64(n.ID), v: encodeNode(nil, n)})
	return w.maybeFlush()
}

// Dirent stores e.
func (w *Writer) Dirent(e Dirent) error {
	w.recs = append(w.recs, record{dirent: true, k: direntKey(e.Parent, e.Name), v: append(u64(e.ID), byte(e.Type))})
	return w.maybeFlush()
}

// Relink sets the link count of node id, stored already or not.
func (w *Writer) Relink(id uint64, nlink uint32) error {
	w.links[id] = nlink
	return nil
}

func (w *Writer) maybeFlush() error {
	if len(w.recs) < batch {
		return nil
	}
	return w.flush(nil)
}

// flush writes the buffered records, and with info the link counts and
// the layer's info, in one transaction.
func (w *Writer) flush(info *LayerInfo) error {
	err := w.d.db.Update(func(tx *bolt.Tx) error {
		layers := tx.Bucket(bucketLayers)
		lb := layers.Bucket([]byte(w.key))
		if w.first {
			if err := layers.DeleteBucket([]byte(w.key)); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
				return err
			}
			var err error
			if lb, err = layers.CreateBucket([]byte(w.key)); err != nil {
				return err
			}
			for _, b := range [][]byte{bucketNodes, bucketDirents} {
				if _, err := lb.CreateBucket(b); err != nil {
					return err
				}
			}
		} else if lb == nil {
			return ErrNotFound
		}
		nb, db := lb.Bucket(bucketNodes), lb.Bucket(bucketDirents)
		// Keys mostly arrive in order (nodes by inode, dirents sorted):
		// full pages, half as many to write and sync.
		nb.FillPercent, db.FillPercent = 0.95, 0.95
		for _, r := range w.recs {
			b := nb
			if r.dirent {
				b = db
			}
			if err := b.Put(r.k, r.v); err != nil {
				return err
			}
		}
		if info == nil {
			return putInfo(lb, LayerInfo{Created: time.Now()})
		}
		for id, nlink := range w.links {
			var n Node
			v := nb.Get(u64(id))
			if v == nil {
				return fmt.Errorf("link count of inode %d, which was never stored", id)
			}
			if err := decodeNode(v, &n); err != nil {
				return fmt.Errorf("inode %d: %w", id, err)
			}
			n.Nlink = nlink
			if err := nb.Put(u64(id), encodeNode(nil, &n)); err != nil {
				return err
			}
		}
		return putInfo(lb, *info)
	})
	if err != nil {
		return fmt.Errorf("metadata: layer %s: %w", w.key, err)
	}
	w.first = false
	w.recs = w.recs[:0]
	return nil
}

// Commit writes what is left and marks the layer complete under info
// (its Nodes set to the nodes stored).
func (w *Writer) Commit(info LayerInfo) error {
	if w.done {
		return errors.New("metadata: writer already finished")
	}
	info.Nodes, info.Complete = w.nodes, true
	if info.Created.IsZero() {
		info.Created = time.Now()
	}
	err := w.flush(&info)
	w.finish()
	return err
}

// Abort forgets what was written; it does nothing after Commit.
func (w *Writer) Abort() error {
	if w.done {
		return nil
	}
	w.finish()
	if w.first {
		return nil // nothing written
	}
	return w.d.Delete(w.key)
}

func (w *Writer) finish() {
	w.done = true
	w.recs = nil
	w.d.mu.Lock()
	if w.d.writing[w.key]--; w.d.writing[w.key] == 0 {
		delete(w.d.writing, w.key)
	}
	w.d.mu.Unlock()
}
