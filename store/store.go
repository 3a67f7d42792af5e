// Package store is lazycas's shared content-addressed object store: every
// regular file any lazily mounted layer serves lives here once, named by the
// sha256 of its content, whichever layers and images hold it.
//
// Layout under the store directory:
//
//	objects/sha256/<2 hex>/<64 hex>   sealed objects, read-only (0444)
//	tmp/                              objects being filled; swept at Open
//	index.db                          bbolt: per object size, last use, referencing layers
//
// Contract: an object is visible under objects/ only after its content was
// checked against its name; it got there by one atomic rename, so readers
// never see a partial object. Objects become durable in groups (one syncfs,
// then one index transaction, every 250 ms) instead of an fsync each; an
// object on disk that the index does not know (its group was cut off by a
// crash or power loss) is hashed again when the store is opened, and kept
// only if it still matches its name. An object an earlier process sealed is
// checked again on its first open, unless fs-verity guards it (verify.go).
package store

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// ErrNotFound is returned for an object the store does not hold.
var ErrNotFound = errors.New("object not in store")

// ErrDigestMismatch is returned when filled content is not what its name says.
var ErrDigestMismatch = errors.New("content does not match digest")

var (
	bucketObjects = []byte("objects") // digest -> record
	bucketLayers  = []byte("layers")  // layer key -> bucket of digest -> nil
)

// Store is the object store. It is safe for concurrent use.
type Store struct {
	dir string
	db  *bolt.DB

	mu       sync.Mutex
	inflight map[digest.Digest]*fill
	open     map[digest.Digest]int // handles not closed yet
	partials map[digest.Digest]*Partial
	used     map[digest.Digest]time.Time // last opens not yet in the index

	fetchedBytes atomic.Int64
	fetchedFiles atomic.Int64

	// Collections since Open (by GC, asked for or started by a seal over
	// budget), and the objects and content bytes they removed.
	gcRuns, gcRemoved, gcFreed atomic.Int64

	// total is the content size of the sealed objects; maxBytes the budget
	// beyond which a seal starts a collection (0: none).
	total      atomic.Int64
	maxBytes   atomic.Int64
	collecting atomic.Bool

	pendingMu     sync.Mutex
	pending       []pendingObject
	stop          chan struct{}
	committerDone chan struct{}
	closeOnce     sync.Once

	integrity // verify.go
}

// fill is one fetch of an object that concurrent callers wait for.
type fill struct {
	done chan struct{}
	err  error
}

// Open opens (creating if needed) the store in dir. It probes once whether
// dir's filesystem has fs-verity (see WithVerity) and logs the integrity
// mode.
func Open(ctx context.Context, dir string, opts ...Opt) (*Store, error) {
	o := options{verity: true}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
	}
	for _, d := range []string{filepath.Join(dir, "objects", "sha256"), filepath.Join(dir, "tmp"), filepath.Join(dir, "partial")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
	}
	// Temporary and partial files belong to fills of a previous process:
	// not one of them was sealed, so none of them is trusted.
	for _, sub := range []string{"tmp", "partial"} {
		if tmps, err := os.ReadDir(filepath.Join(dir, sub)); err == nil {
			for _, t := range tmps {
				_ = os.Remove(filepath.Join(dir, sub, t.Name()))
			}
		}
	}
	db, err := bolt.Open(filepath.Join(dir, "index.db"), 0o600, &bolt.Options{Timeout: 3 * time.Second})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("store: %s is locked by another process (another daemon on this root?): %w", filepath.Join(dir, "index.db"), err)
	}
	if err != nil {
		return nil, fmt.Errorf("store: open index: %w", err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketObjects, bucketLayers} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: init index: %w", err)
	}
	s := &Store{
		dir: dir, db: db, inflight: map[digest.Digest]*fill{},
		open: map[digest.Digest]int{}, used: map[digest.Digest]time.Time{},
		partials: map[digest.Digest]*Partial{},
	}
	s.log = log.G(ctx)
	s.setupIntegrity(o)
	if err := s.recover(ctx); err != nil {
		db.Close()
		return nil, err
	}
	s.stop, s.committerDone = make(chan struct{}), make(chan struct{})
	go s.committer()
	log.G(ctx).WithFields(log.Fields{"dir": dir, "bytes": s.total.Load()}).Debug("store opened")
	return s, nil
}

// recover reconciles the index with the objects on disk after the last
// process: an object a crash left unindexed is checked against its name
// and indexed, or removed; an entry whose object is gone is dropped.
func (s *Store) recover(ctx context.Context) error {
	indexed := map[string]int64{}
	if err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketObjects).ForEach(func(k, v []byte) error {
			size, _ := decodeRecord(v)
			indexed[string(k)] = size
			return nil
		})
	}); err != nil {
		return fmt.Errorf("store: read index: %w", err)
	}
	var found []pendingObject
	var bad int
	root := filepath.Join(s.dir, "objects", "sha256")
	subdirs, err := os.ReadDir(root)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	for _, sd := range subdirs {
		entries, err := os.ReadDir(filepath.Join(root, sd.Name()))
		if err != nil {
			return fmt.Errorf("store: %w", err)
		}
		for _, e := range entries {
			d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
			p := filepath.Join(root, sd.Name(), e.Name())
			fi, err := e.Info()
			if err != nil {
				continue
			}
			if size, ok := indexed[string(d)]; ok && size == fi.Size() {
				delete(indexed, string(d))
				s.total.Add(size)
				continue
			}
			if d.Validate() != nil || !fileMatches(p, d) {
				bad++
				os.Remove(p)
				continue
			}
			found = append(found, pendingObject{d, fi.Size()})
			s.total.Add(fi.Size())
			s.verified[keyOf(d)] = struct{}{}
		}
	}
	if len(found)+len(indexed) > 0 || bad > 0 {
		log.G(ctx).WithFields(log.Fields{
			"checked": len(found), "removed": bad, "forgotten": len(indexed),
		}).Info("store: recovered objects a crash left unindexed")
	}
	if s.verity {
		for _, p := range found {
			s.unprotected = append(s.unprotected, p.d)
		}
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketObjects)
		for k := range indexed { // entries without (the right) object
			if err := b.Delete([]byte(k)); err != nil {
				return err
			}
		}
		for _, p := range found {
			if err := b.Put([]byte(p.d), encodeRecord(p.size, time.Now())); err != nil {
				return err
			}
		}
		return nil
	})
}

// fileMatches reports whether the file at p hashes to d.
func fileMatches(p string, d digest.Digest) bool {
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	v := d.Verifier()
	if _, err := io.Copy(v, f); err != nil {
		return false
	}
	return v.Verified()
}

// SetMaxBytes bounds the store: a seal that takes it over n bytes starts a
// collection in the background. 0 means no bound.
func (s *Store) SetMaxBytes(n int64) { s.maxBytes.Store(n) }

// Bytes is the content size of the sealed objects.
func (s *Store) Bytes() int64 { return s.total.Load() }

// maybeCollect starts one background collection when over budget.
func (s *Store) maybeCollect(ctx context.Context) {
	max := s.maxBytes.Load()
	if max <= 0 || s.total.Load() <= max || !s.collecting.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.collecting.Store(false)
		// Collect to 90% of the budget, so that the next seals do not
		// each start a collection.
		if _, err := s.GC(context.WithoutCancel(ctx), max-max/10); err != nil {
			log.G(ctx).WithError(err).Warn("store: background collection")
		}
	}()
}

// Close records last uses and closes the index. Fills still running fail
// to record themselves.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
		<-s.committerDone
	})
	if err := s.flushUses(); err != nil {
		log.L.WithError(err).Warn("store: record last uses")
	}
	return s.db.Close()
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(d digest.Digest) string {
	return filepath.Join(s.dir, "objects", "sha256", d.Encoded()[:2], d.Encoded())
}

func validate(d digest.Digest) error {
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("store: unsupported digest %q", d)
	}
	return d.Validate()
}

// Has reports whether the sealed object d is present.
func (s *Store) Has(d digest.Digest) bool {
	if validate(d) != nil {
		return false
	}
	_, err := os.Stat(s.path(d))
	return err == nil
}

// Open opens the sealed object d for reading. While the returned handle
// is open, garbage collection leaves the object alone. The first open of an
// object an earlier process sealed checks it; one that fails the check is
// removed and reported as ErrNotFound (and ErrDigestMismatch).
func (s *Store) Open(d digest.Digest) (*Handle, error) {
	if err := validate(d); err != nil {
		return nil, err
	}
	s.mu.Lock()
	f, err := os.Open(s.path(d))
	if errors.Is(err, os.ErrNotExist) {
		s.mu.Unlock()
		return nil, fmt.Errorf("%s: %w", d, ErrNotFound)
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	s.open[d]++
	s.used[d] = time.Now()
	_, verified := s.verified[keyOf(d)]
	s.mu.Unlock()
	h := &Handle{File: f, s: s, d: d}
	if !verified {
		// The handle counts as open meanwhile: collection leaves the
		// object being checked alone.
		if err := s.check(d, f); err != nil {
			h.Close()
			return nil, err
		}
	}
	return h, nil
}

// Handle is an open object.
type Handle struct {
	*os.File
	s    *Store
	d    digest.Digest
	once sync.Once
}

// Close closes the object; it may be collected again.
func (h *Handle) Close() error {
	err := h.File.Close()
	h.once.Do(func() {
		h.s.mu.Lock()
		if h.s.open[h.d]--; h.s.open[h.d] <= 0 {
			delete(h.s.open, h.d)
		}
		h.s.mu.Unlock()
	})
	return err
}

// flushUses writes the last uses gathered in memory to the index: one
// write transaction per open would slow every first read.
func (s *Store) flushUses() error {
	s.mu.Lock()
	used := s.used
	s.used = map[digest.Digest]time.Time{}
	s.mu.Unlock()
	if len(used) == 0 {
		return nil
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketObjects)
		for d, t := range used {
			v := b.Get([]byte(d))
			if v == nil {
				continue
			}
			size, _ := decodeRecord(v)
			if err := b.Put([]byte(d), encodeRecord(size, t)); err != nil {
				return err
			}
		}
		return nil
	})
}

// FillFunc writes an object's whole content to w.
type FillFunc func(ctx context.Context, w io.Writer) error

// Ensure makes object d of the given size present. When it is missing, fn
// writes its content, which is checked against d and size before it is
// sealed. Concurrent calls for one digest run fn once and share its result;
// fetched reports whether this call's fn ran.
func (s *Store) Ensure(ctx context.Context, d digest.Digest, size int64, fn FillFunc) (fetched bool, err error) {
	if err := validate(d); err != nil {
		return false, err
	}
	for attempt := 0; ; attempt++ {
		if s.Has(d) {
			return false, nil
		}
		s.mu.Lock()
		f, waiting := s.inflight[d]
		if !waiting {
			// A fill that ended between Has and here has renamed its
			// object into place (under s.mu, before leaving inflight):
			// look again before filling a second time.
			if _, err := os.Stat(s.path(d)); err == nil {
				s.mu.Unlock()
				return false, nil
			}
			f = &fill{done: make(chan struct{})}
			s.inflight[d] = f
		}
		s.mu.Unlock()
		if !waiting {
			f.err = s.fill(ctx, d, size, fn)
			s.mu.Lock()
			delete(s.inflight, d)
			s.mu.Unlock()
			close(f.done)
			return f.err == nil, f.err
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			return false, ctx.Err()
		}
		if f.err == nil {
			return false, nil
		}
		// The fill we waited for failed, perhaps only because its caller
		// gave up: try once ourselves before reporting its error.
		if attempt > 0 || ctx.Err() != nil {
			return false, f.err
		}
	}
}

func (s *Store) fill(ctx context.Context, d digest.Digest, size int64, fn FillFunc) error {
	tmp, err := os.CreateTemp(filepath.Join(s.dir, "tmp"), d.Encoded()[:12]+"-")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer func() {
		if tmp != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(tmp, h)}
	if err := fn(ctx, cw); err != nil {
		return fmt.Errorf("fill %s: %w", d, err)
	}
	if cw.n != size {
		return fmt.Errorf("fill %s: got %d bytes, want %d: %w", d, cw.n, size, ErrDigestMismatch)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != d.Encoded() {
		return fmt.Errorf("fill %s: content hashes to sha256:%s: %w", d, got, ErrDigestMismatch)
	}
	if err := tmp.Chmod(0o444); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	final := s.path(d)
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	// Readers may use the object at once: its bytes are checked and the
	// page cache holds them. Durability comes in groups (commit): one
	// syncfs for many objects instead of an fsync each, which cost ~5 ms
	// per small file. Until its group is committed, an object that a
	// crash left behind is checked again when the store is opened.
	// Renamed under s.mu so that a failed check of an older object by
	// this name (verify) never removes the new one.
	s.mu.Lock()
	err = os.Rename(tmp.Name(), final)
	if err == nil {
		s.verified[keyOf(d)] = struct{}{}
	}
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("store: seal %s: %w", d, err)
	}
	tmp = nil
	s.pendingMu.Lock()
	s.pending = append(s.pending, pendingObject{d, size})
	s.pendingMu.Unlock()
	s.total.Add(size)
	s.fetchedBytes.Add(size)
	s.fetchedFiles.Add(1)
	s.maybeCollect(ctx)
	return nil
}

// pendingObject is a sealed object whose index entry is not written yet.
type pendingObject struct {
	d    digest.Digest
	size int64
}

// commitInterval is how long a sealed object may wait for its group
// commit (syncfs + one index transaction).
const commitInterval = 250 * time.Millisecond

func (s *Store) committer() {
	defer close(s.committerDone)
	t := time.NewTicker(commitInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			if err := s.commit(); err != nil {
				log.L.WithError(err).Warn("store: commit sealed objects")
			}
			return
		case <-t.C:
			if err := s.commit(); err != nil {
				log.L.WithError(err).Warn("store: commit sealed objects")
			}
		}
	}
}

// commit makes the objects sealed since the last commit durable, then
// records them in the index.
func (s *Store) commit() error {
	s.pendingMu.Lock()
	batch := s.pending
	s.pending = nil
	s.pendingMu.Unlock()
	s.protect(batch)
	if len(batch) == 0 {
		return nil
	}
	if err := syncFS(s.dir); err != nil {
		s.pendingMu.Lock()
		s.pending = append(batch, s.pending...)
		s.pendingMu.Unlock()
		return err
	}
	now := time.Now()
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketObjects)
		for _, p := range batch {
			if err := b.Put([]byte(p.d), encodeRecord(p.size, now)); err != nil {
				return err
			}
		}
		return nil
	})
}

func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// Ref is a file a layer holds: its digest and size.
type Ref struct {
	Digest digest.Digest
	Size   int64
}

// AddRefs records that layer holds the files refs, so that their objects
// outlive unreferenced ones when the store is trimmed.
func (s *Store) AddRefs(layer string, refs []Ref) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.Bucket(bucketLayers).CreateBucketIfNotExists([]byte(layer))
		if err != nil {
			return err
		}
		for _, r := range refs {
			v := make([]byte, 8)
			binary.BigEndian.PutUint64(v, uint64(r.Size))
			if err := b.Put([]byte(r.Digest), v); err != nil {
				return err
			}
		}
		return nil
	})
}

// ReleaseLayer forgets every reference of layer.
func (s *Store) ReleaseLayer(layer string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketLayers).DeleteBucket([]byte(layer))
		if errors.Is(err, bolt.ErrBucketNotFound) {
			return nil
		}
		return err
	})
}

func encodeRecord(size int64, used time.Time) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, uint64(size))
	binary.BigEndian.PutUint64(b[8:], uint64(used.UnixNano()))
	return b
}

func decodeRecord(b []byte) (size int64, used time.Time) {
	if len(b) < 16 {
		return 0, time.Time{}
	}
	return int64(binary.BigEndian.Uint64(b)), time.Unix(0, int64(binary.BigEndian.Uint64(b[8:])))
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
