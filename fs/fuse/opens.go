package fuse

import (
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// openTable counts a mount's open files per inode, in memory shared with
// the holder (a memfd), so that the process serving the mount next knows
// what the kernel still has open. The kernel insists on two things a new
// process could not know otherwise: an inode with a passthrough open takes
// only passthrough opens with the same backing id, and one with a cached
// (non-passthrough) open takes no passthrough open.
//
// Each inode has a slot of three int32: its registered backing id (0: none),
// its passthrough opens and its cached opens. Every update is made before
// the kernel is answered and undone only after it let go, so a process
// killed between the two leaves counts too high, never too low: the cost is
// a backing id kept registered or passthrough not offered for that inode
// until the mount goes, never a failed open.
type openTable struct {
	fd    int     // the memfd, handed to the holder
	slots []int32 // mapped from fd
	mem   []byte  // the mapping
	locks [64]sync.Mutex
}

const slotInts = 3

// newOpenTable makes a table for inodes 0..maxIno.
func newOpenTable(maxIno uint64) (*openTable, error) {
	fd, err := unix.MemfdCreate("lazycas-opens", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("open table: %w", err)
	}
	size := int64(maxIno+1) * slotInts * 4
	if err := unix.Ftruncate(fd, size); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("open table: %w", err)
	}
	t, err := mapOpenTable(fd)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return t, nil
}

// mapOpenTable maps the table of a memfd a previous process made.
func mapOpenTable(fd int) (*openTable, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("open table: %w", err)
	}
	if st.Size == 0 || st.Size%(slotInts*4) != 0 {
		return nil, fmt.Errorf("open table of %d bytes: not a table", st.Size)
	}
	mem, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map open table: %w", err)
	}
	return &openTable{fd: fd, mem: mem, slots: unsafe.Slice((*int32)(unsafe.Pointer(&mem[0])), len(mem)/4)}, nil
}

func (t *openTable) close() {
	unix.Munmap(t.mem)
	unix.Close(t.fd)
}

// lock serializes the opens and releases of one inode.
func (t *openTable) lock(ino uint64) func() {
	mu := &t.locks[ino%uint64(len(t.locks))]
	mu.Lock()
	return mu.Unlock
}

// has reports whether ino has a slot.
func (t *openTable) has(ino uint64) bool { return ino < uint64(len(t.slots)/slotInts) }

func (t *openTable) slot(ino uint64) []int32 { return t.slots[ino*slotInts : ino*slotInts+slotInts] }

func (t *openTable) backing(ino uint64) int32 { return atomic.LoadInt32(&t.slot(ino)[0]) }
func (t *openTable) setBacking(ino uint64, id int32) {
	atomic.StoreInt32(&t.slot(ino)[0], id)
}
func (t *openTable) passthrough(ino uint64) int32 { return atomic.LoadInt32(&t.slot(ino)[1]) }
func (t *openTable) cached(ino uint64) int32      { return atomic.LoadInt32(&t.slot(ino)[2]) }

// add changes ino's passthrough or cached count by d and returns the new
// count, never below zero (a release the table did not count).
func (t *openTable) add(ino uint64, passthrough bool, d int32) int32 {
	p := &t.slot(ino)[2]
	if passthrough {
		p = &t.slot(ino)[1]
	}
	n := atomic.AddInt32(p, d)
	if n < 0 {
		atomic.StoreInt32(p, 0)
		n = 0
	}
	return n
}
