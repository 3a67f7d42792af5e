package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// GCResult says what a collection did.
type GCResult struct {
	Removed int64 `json:"removed"`
	Freed   int64 `json:"freed"`
	// Bytes is the content size left in the store.
	Bytes int64 `json:"bytes"`
	// Skipped counts objects that had to stay although over budget: open,
	// or being filled.
	Skipped int64 `json:"skipped"`
}

// GC removes objects until the store holds at most maxBytes of content:
// objects no layer references first, least recently used first, then
// objects of mounted layers (they are fetched again when read). Objects
// that are open are never removed. Reads and fills go on meanwhile.
func (s *Store) GC(ctx context.Context, maxBytes int64) (res GCResult, err error) {
	// Every run counts, failed or with nothing to remove: an operator
	// sees collections happen, and what even a failed one removed.
	s.gcRuns.Add(1)
	defer func() {
		s.gcRemoved.Add(res.Removed)
		s.gcFreed.Add(res.Freed)
	}()
	if err := s.commit(); err != nil {
		return res, fmt.Errorf("store gc: %w", err)
	}
	if err := s.flushUses(); err != nil {
		return res, fmt.Errorf("store gc: %w", err)
	}
	type candidate struct {
		d          digest.Digest
		size       int64
		used       time.Time
		referenced bool
	}
	var cands []candidate
	err = s.db.View(func(tx *bolt.Tx) error {
		refs := map[string]bool{}
		layers := tx.Bucket(bucketLayers)
		if err := layers.ForEach(func(name, v []byte) error {
			if v != nil {
				return nil
			}
			return layers.Bucket(name).ForEach(func(d, _ []byte) error {
				refs[string(d)] = true
				return nil
			})
		}); err != nil {
			return err
		}
		return tx.Bucket(bucketObjects).ForEach(func(k, v []byte) error {
			size, used := decodeRecord(v)
			res.Bytes += size
			cands = append(cands, candidate{digest.Digest(k), size, used, refs[string(k)]})
			return nil
		})
	})
	if err != nil {
		return res, fmt.Errorf("store gc: %w", err)
	}
	if res.Bytes <= maxBytes {
		return res, nil
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].referenced != cands[j].referenced {
			return !cands[i].referenced
		}
		return cands[i].used.Before(cands[j].used)
	})
	for _, c := range cands {
		if res.Bytes <= maxBytes {
			break
		}
		if err := ctx.Err(); err != nil {
			return res, err
		}
		removed, err := s.remove(c.d)
		if err != nil {
			return res, fmt.Errorf("store gc: %w", err)
		}
		if !removed {
			res.Skipped++
			continue
		}
		res.Removed++
		res.Freed += c.size
		res.Bytes -= c.size
	}
	log.G(ctx).WithFields(log.Fields{
		"removed": res.Removed, "freed": res.Freed, "bytes": res.Bytes, "skipped": res.Skipped, "max": maxBytes,
	}).Info("store collected")
	return res, nil
}

// remove deletes object d unless it is open or being filled.
func (s *Store) remove(d digest.Digest) (bool, error) {
	return s.drop(d, func() bool { return s.open[d] > 0 || s.inflight[d] != nil })
}

// drop deletes object d unless keep, called with s.mu held, says not to.
// The file goes before its index entry: a crash in between leaves an entry
// whose file is missing, which only makes the next read fetch it again.
func (s *Store) drop(d digest.Digest, keep func() bool) (bool, error) {
	s.mu.Lock()
	if keep() {
		s.mu.Unlock()
		return false, nil
	}
	var size int64
	if fi, err := os.Stat(s.path(d)); err == nil {
		size = fi.Size()
	}
	err := os.Remove(s.path(d))
	delete(s.used, d)
	delete(s.verified, keyOf(d))
	s.mu.Unlock()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, err
	}
	if err == nil {
		s.total.Add(-size)
	}
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketObjects).Delete([]byte(d))
	}); err != nil {
		return true, err
	}
	return true, nil
}
