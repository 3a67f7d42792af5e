package profile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// FormatVersion is the version of the export format.
const FormatVersion = 1

// maxExportSize bounds an import: MaxLayers full profiles fit.
const maxExportSize = 256 << 20

// Export is the file `lazycas image profile export` writes: profiles that
// travel between nodes (a layer digest names the same bytes everywhere).
type Export struct {
	Version  int       `json:"version"`
	Profiles []Profile `json:"profiles"`
}

// Export returns the profiles of layers, or of every layer when none is
// named. A named layer without a profile is an error.
func (d *DB) Export(layers ...digest.Digest) (Export, error) {
	out := Export{Version: FormatVersion, Profiles: []Profile{}}
	err := d.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLayers)
		add := func(v []byte) error {
			var p Profile
			if err := json.Unmarshal(v, &p); err != nil {
				return err
			}
			out.Profiles = append(out.Profiles, p)
			return nil
		}
		if len(layers) == 0 {
			return b.ForEach(func(_, v []byte) error { return add(v) })
		}
		for _, l := range layers {
			v := b.Get([]byte(l))
			if v == nil {
				return fmt.Errorf("layer %s: %w", l, ErrNoProfile)
			}
			if err := add(v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return Export{}, fmt.Errorf("export profiles: %w", err)
	}
	return out, nil
}

// ErrNoProfile is returned for a layer the DB holds no profile of.
var ErrNoProfile = errors.New("no profile recorded")

// ErrInvalid is wrapped by every error about a malformed import.
var ErrInvalid = errors.New("invalid profile export")

// Import checks an export read from r as a whole, then merges every
// profile in it in one transaction: a malformed export changes nothing.
// It returns how many profiles it merged.
func (d *DB) Import(r io.Reader) (int, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxExportSize+1))
	if err != nil {
		return 0, fmt.Errorf("import profiles: %w", err)
	}
	if len(data) > maxExportSize {
		return 0, fmt.Errorf("%w: larger than %d bytes", ErrInvalid, maxExportSize)
	}
	var e Export
	if err := json.Unmarshal(data, &e); err != nil {
		return 0, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := e.Validate(); err != nil {
		return 0, err
	}
	now := time.Now().UTC()
	err = d.db.Update(func(tx *bolt.Tx) error {
		for _, p := range e.Profiles {
			p.Updated = now
			if err := merge(tx, p); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("import profiles: %w", err)
	}
	return len(e.Profiles), nil
}

// Validate checks an export: known version, sha256 digests, no repeated
// layer or file, times not negative, within the caps.
func (e Export) Validate() error {
	if e.Version != FormatVersion {
		return fmt.Errorf("%w: version %d, want %d", ErrInvalid, e.Version, FormatVersion)
	}
	if len(e.Profiles) > MaxLayers {
		return fmt.Errorf("%w: %d profiles, at most %d", ErrInvalid, len(e.Profiles), MaxLayers)
	}
	layers := map[digest.Digest]bool{}
	for i, p := range e.Profiles {
		if err := checkDigest(p.Layer); err != nil {
			return fmt.Errorf("%w: profile %d: layer: %w", ErrInvalid, i, err)
		}
		if layers[p.Layer] {
			return fmt.Errorf("%w: layer %s appears twice", ErrInvalid, p.Layer)
		}
		layers[p.Layer] = true
		if len(p.Files) > MaxFiles {
			return fmt.Errorf("%w: layer %s: %d files, at most %d", ErrInvalid, p.Layer, len(p.Files), MaxFiles)
		}
		files := make(map[digest.Digest]bool, len(p.Files))
		for j, a := range p.Files {
			if err := checkDigest(a.Digest); err != nil {
				return fmt.Errorf("%w: layer %s: file %d: %w", ErrInvalid, p.Layer, j, err)
			}
			if a.AtUs < 0 {
				return fmt.Errorf("%w: layer %s: file %s: negative time %d", ErrInvalid, p.Layer, a.Digest, a.AtUs)
			}
			if files[a.Digest] {
				return fmt.Errorf("%w: layer %s: file %s appears twice", ErrInvalid, p.Layer, a.Digest)
			}
			files[a.Digest] = true
		}
	}
	return nil
}

func checkDigest(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("digest %q: %w", d, err)
	}
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("digest %q: not sha256", d)
	}
	return nil
}
