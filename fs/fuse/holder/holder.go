// Package holder keeps file descriptors alive between daemon processes.
//
// A FUSE connection lives as long as one open file refers to its
// /dev/fuse device: a daemon that exits takes its mounts' connections with
// it unless another process holds them. The holder is that process: small,
// long-lived, and with no job but custody. The daemon hands it, for each
// mount, the connection's fd, the fd of the mount's shared open table
// (see fs/fuse) and an opaque record; the next daemon takes them back and
// serves the same connections, so containers reading the mounts see their
// reads wait, never fail.
//
// Custody is mutual: the daemon keeps its own copies of every fd it hands
// over, so a holder killed while a daemon runs loses nothing (the daemon
// starts a new one and hands everything over again), and a daemon killed
// while a holder runs loses nothing either. Only both dying at once lets
// the kernel abort the connections (readers then get ENOTCONN).
//
// A holder that no daemon has talked to for AbortAfter gives its
// connections up on purpose: reads blocked on a daemon that never comes
// back fail instead of hanging forever. One with nothing to hold and no
// daemon exits after IdleExit.
//
// Protocol: a SOCK_SEQPACKET unix socket; each message is one JSON
// object, with fds in SCM_RIGHTS. Requests are answered in order:
//
//	hello          -> hello {pid, version, orphaned_ns}
//	put key rec fds -> ok | error   (replaces an entry of the same key)
//	del key        -> ok | error
//	list           -> entry key rec fds ... end
package holder

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Version is the protocol version; a daemon refuses a holder of another.
const Version = 1

// maxMessage bounds one message; records are a few hundred bytes.
const maxMessage = 64 << 10

// maxFds bounds the fds one entry carries.
const maxFds = 8

type message struct {
	Op     string `json:"op"`
	Key    string `json:"key,omitempty"`
	Record []byte `json:"record,omitempty"`
	Error  string `json:"error,omitempty"`
	// hello
	PID     int   `json:"pid,omitempty"`
	Version int   `json:"version,omitempty"`
	Entries int   `json:"entries,omitempty"`
	Orphan  int64 `json:"orphaned_ns,omitempty"` // how long no daemon was connected, when one connects
}

func send(c *net.UnixConn, m message, fds []int) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("holder message of %d bytes exceeds %d", len(b), maxMessage)
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n != len(b) || oobn != len(oob) {
		return errors.New("holder message written short")
	}
	return nil
}

// recv reads one message and the fds it carries, which the caller owns.
func recv(c *net.UnixConn) (message, []int, error) {
	b := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(maxFds*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(b, oob)
	if err != nil {
		return message{}, nil, err
	}
	var fds []int
	if oobn > 0 {
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return message{}, nil, fmt.Errorf("holder message control data: %w", err)
		}
		for _, cm := range cmsgs {
			got, err := unix.ParseUnixRights(&cm)
			if err != nil {
				closeAll(fds)
				return message{}, nil, fmt.Errorf("holder message fds: %w", err)
			}
			fds = append(fds, got...)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeAll(fds)
		return message{}, nil, errors.New("holder message truncated")
	}
	if n == 0 {
		closeAll(fds)
		return message{}, nil, errEOF
	}
	var m message
	if err := json.Unmarshal(b[:n], &m); err != nil {
		closeAll(fds)
		return message{}, nil, fmt.Errorf("holder message: %w", err)
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd)
	}
	return m, fds, nil
}

// errEOF is a peer that closed the connection: SOCK_SEQPACKET reads 0
// bytes at its end.
var errEOF = errors.New("holder connection closed")

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// dupAll duplicates fds (close-on-exec); on error none is left open.
func dupAll(fds []int) ([]int, error) {
	out := make([]int, 0, len(fds))
	for _, fd := range fds {
		d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			closeAll(out)
			return nil, fmt.Errorf("dup fd %d: %w", fd, err)
		}
		out = append(out, d)
	}
	return out, nil
}

func dialTimeout(path string, timeout time.Duration) (*net.UnixConn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.Dial("unixpacket", path)
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}

// Dead reports whether the FUSE connection fd refers to is gone: its
// mount was unmounted, or it was aborted. The device then polls as an
// error.
func Dead(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd)}}
	n, err := unix.Poll(p, 0)
	if err != nil {
		return errors.Is(err, syscall.EBADF)
	}
	return n > 0 && p[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0
}
