package store

import (
	"encoding/binary"
	"fmt"
	"os"
	"syscall"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// Stats describes the store.
type Stats struct {
	Objects int64 `json:"objects"`
	// Bytes is the content size of the sealed objects.
	Bytes int64 `json:"bytes"`
	// DiskBytes is what the objects take on disk (allocated blocks).
	DiskBytes int64 `json:"diskBytes"`
	// Layers is the number of layers holding references.
	Layers int64 `json:"layers"`
	// LogicalBytes sums, over every layer, the sizes of its files the
	// store holds: what the layers would take without sharing.
	LogicalBytes int64 `json:"logicalBytes"`
	// LayerFileBytes sums the sizes of all files of all layers, present
	// or not.
	LayerFileBytes int64 `json:"layerFileBytes"`
	// Unreferenced objects belong to no current layer.
	Unreferenced int64 `json:"unreferenced"`
	// Open objects have handles open.
	Open int64 `json:"open"`
	// Partial objects are large files being filled piece by piece.
	Partial int64 `json:"partial"`
	// FetchedFiles and FetchedBytes count objects sealed since Open.
	FetchedFiles int64 `json:"fetchedFiles"`
	FetchedBytes int64 `json:"fetchedBytes"`
	// GCRuns counts collections since Open; GCRemoved and GCFreed the
	// objects they removed and those objects' content bytes.
	GCRuns    int64 `json:"gcRuns"`
	GCRemoved int64 `json:"gcRemovedObjects"`
	GCFreed   int64 `json:"gcFreedBytes"`
}

// DedupRatio is LogicalBytes / Bytes: how many times over the layers
// would hold what the store holds once.
func (st Stats) DedupRatio() float64 {
	if st.Bytes == 0 {
		return 1
	}
	return float64(st.LogicalBytes) / float64(st.Bytes)
}

// Stats returns the store's figures from its index.
func (s *Store) Stats() (Stats, error) {
	if err := s.commit(); err != nil {
		return Stats{}, fmt.Errorf("store: commit: %w", err)
	}
	st := Stats{FetchedFiles: s.fetchedFiles.Load(), FetchedBytes: s.fetchedBytes.Load(),
		GCRuns: s.gcRuns.Load(), GCRemoved: s.gcRemoved.Load(), GCFreed: s.gcFreed.Load()}
	s.mu.Lock()
	st.Open = int64(len(s.open))
	st.Partial = int64(len(s.partials))
	s.mu.Unlock()
	sizes := map[string]int64{}
	referenced := map[string]bool{}
	err := s.db.View(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketObjects).ForEach(func(k, v []byte) error {
			size, _ := decodeRecord(v)
			sizes[string(k)] = size
			st.Objects++
			st.Bytes += size
			return nil
		}); err != nil {
			return err
		}
		layers := tx.Bucket(bucketLayers)
		return layers.ForEach(func(name, v []byte) error {
			if v != nil {
				return nil
			}
			st.Layers++
			return layers.Bucket(name).ForEach(func(d, v []byte) error {
				referenced[string(d)] = true
				if len(v) == 8 {
					st.LayerFileBytes += int64(binary.BigEndian.Uint64(v))
				}
				st.LogicalBytes += sizes[string(d)]
				return nil
			})
		})
	})
	if err != nil {
		return st, err
	}
	for d := range sizes {
		if !referenced[d] {
			st.Unreferenced++
		}
		if fi, err := os.Stat(s.path(digest.Digest(d))); err == nil {
			if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
				st.DiskBytes += sys.Blocks * 512
			}
		}
	}
	return st, nil
}

// LayerStat is what one layer holds and how much of it the store has.
type LayerStat struct {
	Files        int64 `json:"files"`
	Bytes        int64 `json:"bytes"`
	PresentFiles int64 `json:"presentFiles"`
	PresentBytes int64 `json:"presentBytes"`
}

// LayerStats returns, per layer key, its files and how many are present.
func (s *Store) LayerStats() (map[string]LayerStat, error) {
	if err := s.commit(); err != nil {
		return nil, fmt.Errorf("store: commit: %w", err)
	}
	out := map[string]LayerStat{}
	err := s.db.View(func(tx *bolt.Tx) error {
		objects := tx.Bucket(bucketObjects)
		layers := tx.Bucket(bucketLayers)
		return layers.ForEach(func(name, v []byte) error {
			if v != nil {
				return nil
			}
			var st LayerStat
			err := layers.Bucket(name).ForEach(func(d, v []byte) error {
				var size int64
				if len(v) == 8 {
					size = int64(binary.BigEndian.Uint64(v))
				}
				st.Files++
				st.Bytes += size
				if objects.Get(d) != nil {
					st.PresentFiles++
					st.PresentBytes += size
				}
				return nil
			})
			out[string(name)] = st
			return err
		})
	})
	return out, err
}
