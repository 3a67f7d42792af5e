package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
)

// removeAllContainers kills and deletes every task and container in every
// namespace, so that the shims exit before containerd does.
func (e *Env) removeAllContainers(ctx context.Context) error {
	nss, err := e.Client.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("list namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		cs, err := e.Client.Containers(nctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("list containers in %s: %w", ns, err))
			continue
		}
		for _, c := range cs {
			if err := deleteContainer(nctx, c); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// deleteContainer kills the container's task if it has one, then deletes
// the container and its snapshot.
func deleteContainer(ctx context.Context, c client.Container) error {
	if task, err := c.Task(ctx, nil); err == nil {
		if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("delete task %s: %w", c.ID(), err)
		}
	} else if !errdefs.IsNotFound(err) {
		return fmt.Errorf("task of %s: %w", c.ID(), err)
	}
	if err := c.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("delete container %s: %w", c.ID(), err)
	}
	return nil
}

// killShims kills the containerd-shim processes serving the containerd at
// address, and the container processes under them. Shims outlive
// containerd by design, so they are found through /proc.
func killShims(address string) error {
	procs, err := listProcs()
	if err != nil {
		return err
	}
	var victims []int
	for _, p := range procs {
		if !strings.HasPrefix(filepath.Base(p.argv[0]), "containerd-shim") {
			continue
		}
		for i := 0; i+1 < len(p.argv); i++ {
			if p.argv[i] == "-address" && p.argv[i+1] == address {
				victims = append(victims, p.pid)
				// The container's init: killing it ends its pid namespace.
				for _, c := range procs {
					if c.ppid == p.pid {
						victims = append(victims, c.pid)
					}
				}
			}
		}
	}
	for _, pid := range victims {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range victims {
		for alive(pid) {
			if time.Now().After(deadline) {
				return fmt.Errorf("shim process %d survived SIGKILL", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

type procInfo struct {
	pid, ppid int
	argv      []string
}

func listProcs() ([]procInfo, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []procInfo
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 {
			continue // gone, or a kernel thread
		}
		stat, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "stat"))
		if err != nil {
			continue
		}
		// stat: pid (comm) state ppid ...; comm may hold spaces.
		rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
		f := strings.Fields(rest)
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		out = append(out, procInfo{pid: pid, ppid: ppid,
			argv: strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")})
	}
	return out, nil
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

// MountsUnder lists the mount points at or below dir, deepest last-mounted
// first (the order to unmount them in).
func MountsUnder(dir string) ([]string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(abs))
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	// mountinfo lists older mounts first: newest first, then deepest first.
	sort.SliceStable(infos, func(i, j int) bool { return infos[i].ID > infos[j].ID })
	mps := make([]string, len(infos))
	for i, m := range infos {
		mps[i] = m.Mountpoint
	}
	sort.SliceStable(mps, func(i, j int) bool {
		return strings.Count(mps[i], "/") > strings.Count(mps[j], "/")
	})
	return mps, nil
}

// Mounts lists the mount points under the environment's directories.
func (e *Env) Mounts() ([]string, error) {
	var all []string
	for _, d := range []string{e.Dir, e.RunDir} {
		mps, err := MountsUnder(d)
		if err != nil {
			return nil, err
		}
		all = append(all, mps...)
	}
	return all, nil
}

// unmountUnder unmounts everything at or below dir: a plain unmount
// first, a lazy (MNT_DETACH) one when that fails.
func unmountUnder(dir string) error {
	for round := 0; round < 10; round++ {
		mps, err := MountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := syscall.Unmount(mp, 0); err != nil {
				_ = syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
	}
	mps, err := MountsUnder(dir)
	if err == nil && len(mps) > 0 {
		err = fmt.Errorf("still mounted under %s: %s", dir, strings.Join(mps, ", "))
	}
	return err
}
