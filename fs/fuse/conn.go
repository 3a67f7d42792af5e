package fuse

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// The kernel side of a mount, below go-fuse: go-fuse serves a connection
// only from its INIT request, which the kernel sends once per connection.
// So lazycas mounts the connection itself, reads INIT itself, and gives
// go-fuse a socket holding that INIT (a recorded copy, on a takeover);
// once go-fuse has answered it there, the socket's fd number is made to
// refer to the connection (dup3), and go-fuse serves the connection none
// the wiser.

const (
	opInit        = 26
	inHeaderSize  = 40
	outHeaderSize = 16
	// readBufSize is what a read of /dev/fuse needs at least (the
	// kernel's FUSE_MIN_READ_BUFFER) with room for the largest request.
	readBufSize = maxWrite + 8192
	// maxWrite is the largest request the kernel may send (a read-only
	// layer gets none of writes), and the max_read mount option.
	maxWrite = 128 << 10
)

// mountConn opens a FUSE connection and mounts it on dir. The returned fd
// is the connection; its INIT request waits on it.
func mountConn(dir string, opts Options) (int, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return -1, err
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := strings.Join([]string{
		fmt.Sprintf("fd=%d", fd),
		fmt.Sprintf("rootmode=%o", st.Mode&unix.S_IFMT),
		"user_id=0", "group_id=0",
		fmt.Sprintf("max_read=%d", maxWrite),
		"allow_other",
		// The kernel checks permissions from the modes we report, as
		// for any other read-only filesystem.
		"default_permissions",
	}, ",")
	source := opts.FsName
	if source == "" {
		source = "lazycas"
	}
	if err := unix.Mount(source, dir, "fuse.lazycas", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("mount fuse on %s: %w", dir, err)
	}
	return fd, nil
}

// readInit reads the connection's INIT request.
func readInit(fd int) ([]byte, error) {
	buf := make([]byte, readBufSize)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read INIT: %w", err)
		}
		if n < inHeaderSize || binary.LittleEndian.Uint32(buf[4:8]) != opInit {
			return nil, fmt.Errorf("first FUSE request is not INIT (%d bytes)", n)
		}
		return bytes.Clone(buf[:n]), nil
	}
}

// serveConn starts go-fuse on connection fd from the INIT request init,
// and returns go-fuse's answer to it, which the caller sends to the kernel
// (a new connection) or checks against the one the kernel has (a takeover).
// fd stays the caller's: go-fuse serves a duplicate of it.
func serveConn(raw fuse.RawFileSystem, fd int, init []byte, mo fuse.MountOptions) (*fuse.Server, []byte, error) {
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	defer unix.Close(sp[1])
	if _, err := unix.Write(sp[1], init); err != nil {
		unix.Close(sp[0])
		return nil, nil, fmt.Errorf("hand INIT to the server: %w", err)
	}
	mo.DirectMount = false
	srv, err := fuse.NewServer(raw, fmt.Sprintf("/dev/fd/%d", sp[0]), &mo)
	if err != nil {
		// go-fuse owns sp[0] from here and closes it on every error: it is
		// not closed again (its number may already name another file).
		return nil, nil, fmt.Errorf("fuse server: %w", err)
	}
	reply := make([]byte, 4096)
	n, err := unix.Read(sp[1], reply)
	if err != nil || n < outHeaderSize {
		return nil, nil, fmt.Errorf("read the server's INIT answer (%d bytes): %v", n, err)
	}
	reply = reply[:n]
	if errno := int32(binary.LittleEndian.Uint32(reply[4:8])); errno != 0 {
		return nil, nil, fmt.Errorf("the server refused INIT: %w", unix.Errno(-errno))
	}
	// From here, go-fuse's fd is the connection.
	if err := unix.Dup3(fd, sp[0], unix.O_CLOEXEC); err != nil {
		return nil, nil, fmt.Errorf("give the connection to the server: %w", err)
	}
	return srv, reply, nil
}

// writeAll writes one message to the connection.
func writeAll(fd int, b []byte) error {
	n, err := unix.Write(fd, b)
	if err != nil {
		return err
	}
	if n != len(b) {
		return fmt.Errorf("short write to /dev/fuse: %d of %d bytes", n, len(b))
	}
	return nil
}

// notifyResend asks the kernel to send again every request a server read
// and did not answer: a process that died with requests in hand left them
// on the connection, and their callers wait for them (Linux 6.9).
func notifyResend(fd int) error {
	var b [outHeaderSize]byte
	binary.LittleEndian.PutUint32(b[0:4], outHeaderSize)
	// A notification's code goes in the error field, positive (go-fuse's
	// constants are negated).
	binary.LittleEndian.PutUint32(b[4:8], uint32(-fuse.NOTIFY_RESEND))
	return writeAll(fd, b[:])
}

// initFlags returns the capability flags of an INIT answer (struct
// fuse_init_out: flags at byte 12, flags2 at byte 32).
func initFlags(reply []byte) uint64 {
	body := reply[outHeaderSize:]
	if len(body) < 16 {
		return 0
	}
	flags := uint64(binary.LittleEndian.Uint32(body[12:16]))
	if len(body) >= 36 {
		flags |= uint64(binary.LittleEndian.Uint32(body[32:36])) << 32
	}
	return flags
}
