package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The daemon's FUSE holder: the daemon binary re-executed as
// "containerd-lazycas-grpc fuse-holder ...", in a session of its own, which
// keeps the /dev/fuse connections of the lazy layers while no daemon runs so
// that containers on them survive a restart, an upgrade or a crash. Neither
// stopping the daemon nor killing its process group ends it, and the
// kernel does not kill it when the environment's owner dies (it is not the
// owner's child): the environment must find it and kill it itself, before
// it unmounts what the holder keeps alive.

// HolderPIDFile is the file, in the daemon's root, holding the holder's
// process id.
const HolderPIDFile = "fuse-holder.pid"

// holderArg is the argument that tells a holder from any other process.
const holderArg = "fuse-holder"

// holderKillWait bounds how long a SIGKILLed holder may take to be gone.
const holderKillWait = 10 * time.Second

// HolderPID is the process id of the daemon's FUSE holder, 0 when none
// runs (no pid file, or its process is gone or is no holder).
func (e *Env) HolderPID() int { return holderPID(e.DaemonRoot) }

// holderPID reads root's pid file and returns its pid if that process is
// a live holder: a pid read from a stale file may name any process by now.
func holderPID(root string) int {
	data, err := os.ReadFile(filepath.Join(root, HolderPIDFile))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 || !isHolder(pid) {
		return 0
	}
	return pid
}

// isHolder reports whether pid is a live process whose command line names
// the holder.
func isHolder(pid int) bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(cmdline, []byte(holderArg)) && alive(pid)
}

// HolderProcesses lists the live holder processes whose command line
// mentions any of dirs (e.g. the daemon's root); a holder whose arguments
// name none of them is found only through its pid file (HolderPID).
func HolderProcesses(dirs ...string) ([]int, error) {
	procs, err := listProcs()
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	var out []int
	for _, p := range procs {
		if !hasHolderArg(p.argv) || !alive(p.pid) {
			continue
		}
		if mentionsAny(p.argv, dirs) {
			out = append(out, p.pid)
		}
	}
	return out, nil
}

// hasHolderArg reports whether argv is a holder's: "fuse-holder" as an
// argument (the daemon re-executed) or in the program's name.
func hasHolderArg(argv []string) bool {
	if len(argv) > 0 && strings.Contains(filepath.Base(argv[0]), holderArg) {
		return true
	}
	for _, a := range argv {
		if a == holderArg {
			return true
		}
	}
	return false
}

func mentionsAny(argv, dirs []string) bool {
	for _, a := range argv {
		for _, d := range dirs {
			if d != "" && strings.Contains(a, d) {
				return true
			}
		}
	}
	return false
}

// killHolders SIGKILLs the holder named by root's pid file and every
// holder whose command line mentions one of dirs, and waits until they are
// gone. Killing a holder while no daemon runs aborts its FUSE connections:
// the caller unmounts next.
func killHolders(root string, dirs ...string) error {
	victims := map[int]bool{}
	if pid := holderPID(root); pid != 0 {
		victims[pid] = true
	}
	found, err := HolderProcesses(append([]string{root}, dirs...)...)
	for _, pid := range found {
		victims[pid] = true
	}
	var errs []error
	if err != nil {
		errs = append(errs, fmt.Errorf("find FUSE holders: %w", err))
	}
	for pid := range victims {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill FUSE holder %d: %w", pid, err))
		}
	}
	// A holder whose daemon died is reaped by whoever adopted it; a zombie
	// holds no FUSE connection, so alive treats it as gone.
	deadline := time.Now().Add(holderKillWait)
	for pid := range victims {
		for alive(pid) {
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("FUSE holder %d survived SIGKILL for %s", pid, holderKillWait))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}
