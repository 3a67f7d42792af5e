package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync/atomic"
	"unsafe"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Integrity at rest. An object sealed by this process was checked against
// its name at seal, so it is trusted. An object sealed by an earlier process
// is not: the disk may have rotted it, or someone may have written to it,
// since. Its first open therefore checks it, once, lazily (a store may hold
// many GB, and most objects are never read again):
//
//   - with fs-verity (enabled on every object shortly after its seal, where
//     the store's filesystem supports it), the kernel checks each page as it
//     is read (a corrupt page fails with EIO), so an object with verity
//     enabled is trusted as it is. That guards against rot and stray
//     writes, which cannot touch a verity file unnoticed; not against
//     someone who swaps in another verity file, which would take the
//     measured digest recorded at seal;
//   - otherwise the object is hashed again. One that does not match its name
//     is deleted with its index entry and reported missing, so the reader's
//     fetch brings it again; a container never sees its bytes.
//
// Lock order: Store.mu, then nothing; a check runs without locks held and
// concurrent first opens of one object wait for a single check.

// Integrity modes, as logged at Open.
const (
	modeVerity = "fs-verity"
	modeRehash = "sha256 re-check on first open after restart"
)

// Opt configures Open.
type Opt func(*options) error

type options struct {
	verity bool
	ops    verityOps // nil: the kernel's
}

// WithVerity says whether to enable fs-verity on sealed objects where the
// store's filesystem supports it (the default) and rely on it instead of
// hashing objects again after a restart.
func WithVerity(on bool) Opt {
	return func(o *options) error {
		o.verity = on
		return nil
	}
}

// verityOps is fs-verity on one open file: FS_IOC_ENABLE_VERITY and
// FS_IOC_MEASURE_VERITY. Tests substitute it to cover the verity paths on
// kernels without it.
type verityOps interface {
	// enable turns verity on for f, opened read-only with no writer left.
	enable(f *os.File) error
	// measure succeeds when f has verity enabled.
	measure(f *os.File) error
}

// integrity is the Store's state for checking objects at rest.
type integrity struct {
	verity bool // objects get fs-verity, and objects with it are trusted
	ops    verityOps
	log    *log.Entry

	// verified holds the objects known sound: sealed by this process or
	// checked since Open; it grows with the objects used, so its keys are
	// the raw 32 bytes. verifying holds the checks running. Both under
	// Store.mu.
	verified  map[objectKey]struct{}
	verifying map[digest.Digest]*verification

	// unprotected are objects checked since the last commit that still
	// need fs-verity (under Store.pendingMu).
	unprotected []digest.Digest

	// rehashed counts objects hashed again on a first open.
	rehashed atomic.Int64
}

// objectKey is an object's sha256, raw.
type objectKey [sha256.Size]byte

// keyOf returns d's key; d is a validated sha256 digest.
func keyOf(d digest.Digest) (k objectKey) {
	_, _ = hex.Decode(k[:], []byte(d.Encoded()))
	return k
}

// verification is one check of an object that concurrent openers wait for.
type verification struct {
	done chan struct{}
	err  error
}

// setupIntegrity probes fs-verity once (when wanted) and logs the mode.
func (s *Store) setupIntegrity(o options) {
	s.verified = map[objectKey]struct{}{}
	s.verifying = map[digest.Digest]*verification{}
	s.ops = o.ops
	if s.ops == nil {
		s.ops = kernelVerity{blockSize: verityBlockSize(s.dir)}
	}
	fields := log.Fields{"dir": s.dir}
	if o.verity {
		err := probeVerity(filepath.Join(s.dir, "tmp"), s.ops)
		s.verity = err == nil
		if err != nil {
			fields["verity"] = err.Error()
		}
	} else {
		fields["verity"] = "off in config"
	}
	fields["integrity"] = modeRehash
	if s.verity {
		fields["integrity"] = modeVerity
	}
	s.log.WithFields(fields).Info("store integrity")
}

// probeVerity tries fs-verity on a throwaway file in dir, the way objects
// get it: read-only mode, no writer left.
func probeVerity(dir string, ops verityOps) error {
	f, err := os.CreateTemp(dir, "verity-probe-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString("lazycas fs-verity probe")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o444)
	}
	if err != nil {
		return err
	}
	r, err := os.Open(f.Name())
	if err != nil {
		return err
	}
	defer r.Close()
	if err := ops.enable(r); err != nil {
		return fmt.Errorf("enable fs-verity: %w", err)
	}
	if err := ops.measure(r); err != nil {
		return fmt.Errorf("measure fs-verity: %w", err)
	}
	return nil
}

// check makes sure the object d, open as f, is sound before it is served.
// A mismatch deletes the object and returns an error that is ErrNotFound
// (the caller fetches it again) and ErrDigestMismatch.
func (s *Store) check(d digest.Digest, f *os.File) error {
	s.mu.Lock()
	if _, ok := s.verified[keyOf(d)]; ok {
		s.mu.Unlock()
		return nil
	}
	v, waiting := s.verifying[d]
	if !waiting {
		v = &verification{done: make(chan struct{})}
		s.verifying[d] = v
	}
	s.mu.Unlock()
	if waiting {
		// Every waiter's f is the inode being checked: removing it takes
		// either no open handle (collection) or a failed check.
		<-v.done
		return v.err
	}
	v.err = s.verify(d, f)
	s.mu.Lock()
	delete(s.verifying, d)
	if v.err == nil {
		s.verified[keyOf(d)] = struct{}{}
	}
	s.mu.Unlock()
	close(v.done)
	return v.err
}

func (s *Store) verify(d digest.Digest, f *os.File) error {
	if s.verity && s.ops.measure(f) == nil {
		return nil
	}
	s.rehashed.Add(1)
	v := d.Verifier()
	n, err := io.CopyBuffer(v, io.NewSectionReader(f, 0, math.MaxInt64), make([]byte, 256<<10))
	if err != nil {
		// Not a verdict on the content: the next open checks again.
		return fmt.Errorf("store: check %s: %w", d, err)
	}
	if v.Verified() {
		if s.verity {
			s.pendingMu.Lock()
			s.unprotected = append(s.unprotected, d)
			s.pendingMu.Unlock()
		}
		return nil
	}
	s.log.WithFields(log.Fields{"digest": d, "path": s.path(d), "size": n}).
		Error("store: object does not match its digest; removed, it will be fetched again")
	// Handles open on it belong to waiters of this check, which fail with
	// it; only a seal since (a fresh, checked object by this name) stays.
	if _, err := s.drop(d, func() bool {
		_, sealed := s.verified[keyOf(d)]
		return sealed
	}); err != nil {
		s.log.WithError(err).WithField("digest", d).Warn("store: remove corrupt object")
	}
	return fmt.Errorf("store: %s on disk: %w: %w", d, ErrDigestMismatch, ErrNotFound)
}

// protect enables fs-verity on the objects of batch (sealed since the last
// commit) and on those checked since, ahead of the commit's syncfs, which
// makes it durable with them. Off the read path: enabling verity writes
// the file back and hashes it.
func (s *Store) protect(batch []pendingObject) {
	s.pendingMu.Lock()
	checked := s.unprotected
	s.unprotected = nil
	s.pendingMu.Unlock()
	if !s.verity {
		return
	}
	for _, p := range batch {
		s.enableVerity(p.d)
	}
	for _, d := range checked {
		s.enableVerity(d)
	}
}

func (s *Store) enableVerity(d digest.Digest) {
	f, err := os.Open(s.path(d))
	if errors.Is(err, os.ErrNotExist) {
		return // collected meanwhile
	}
	if err == nil {
		err = s.ops.enable(f)
		f.Close()
	}
	if err != nil && !errors.Is(err, unix.EEXIST) {
		// The object stays sound; after a restart it is hashed instead.
		s.log.WithError(err).WithField("digest", d).Warn("store: enable fs-verity")
	}
}

// kernelVerity is fs-verity through the kernel's ioctls.
type kernelVerity struct{ blockSize uint32 }

// verityBlockSize is the Merkle tree block size: the filesystem's block
// size, at most a page (kernels before 6.3 accept only a page).
func verityBlockSize(dir string) uint32 {
	size := uint32(os.Getpagesize())
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) == nil && st.Bsize > 0 && uint32(st.Bsize) < size {
		size = uint32(st.Bsize)
	}
	return size
}

func (k kernelVerity) enable(f *os.File) error {
	arg := unix.FsverityEnableArg{
		Version:        1,
		Hash_algorithm: unix.FS_VERITY_HASH_ALG_SHA256,
		Block_size:     k.blockSize,
	}
	return ioctl(f, unix.FS_IOC_ENABLE_VERITY, unsafe.Pointer(&arg))
}

func (kernelVerity) measure(f *os.File) error {
	var d struct {
		unix.FsverityDigest
		digest [64]byte // room for any algorithm's digest
	}
	d.Size = uint16(len(d.digest))
	return ioctl(f, unix.FS_IOC_MEASURE_VERITY, unsafe.Pointer(&d))
}

func ioctl(f *os.File, req uint, arg unsafe.Pointer) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(arg))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}
