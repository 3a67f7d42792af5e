package snapshot

import (
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay/overlayutils"
)

// hostProbe is what New learned about the kernel and the root's filesystem.
type hostProbe struct {
	// userxattr: overlay must keep its xattrs in user.overlay.* (a user
	// namespace on kernel >= 5.11), not trusted.overlay.*.
	userxattr bool
	// indexOff: the kernel has overlay's inode index feature, which must be
	// off because lower layers are shared between many overlay mounts.
	indexOff bool
}

func probeHost(root string) (hostProbe, error) {
	var p hostProbe
	if err := overlayutils.Supported(root); err != nil {
		return p, fmt.Errorf("root %s cannot hold overlayfs layers (it needs a filesystem such as ext4 or xfs with d_type, and a kernel with overlayfs): %w", root, err)
	}
	userxattr, err := overlayutils.NeedsUserXAttr(root)
	if err != nil {
		return p, fmt.Errorf("probe userxattr on %s: %w", root, err)
	}
	p.userxattr = userxattr
	if _, err := os.Stat("/sys/module/overlay/parameters/index"); err == nil {
		p.indexOff = true
	}
	return p, nil
}

func (p hostProbe) mountOptions() []string {
	var o []string
	if p.indexOff {
		o = append(o, "index=off")
	}
	if p.userxattr {
		o = append(o, "userxattr")
	}
	return o
}

// mounts returns how to mount snap. Without parents it is the snapshot's own
// directory; a view of one layer is that layer, read-only; anything else is
// overlayfs, with the nearest parent first in lowerdir (overlay's top-most
// lower layer comes first).
func (s *Snapshotter) mounts(snap storage.Snapshot) []mount.Mount {
	if len(snap.ParentIDs) == 0 {
		mode := "rw"
		if snap.Kind == snapshots.KindView {
			mode = "ro"
		}
		return []mount.Mount{bindMount(s.upperPath(snap.ID), mode)}
	}
	if snap.Kind == snapshots.KindView && len(snap.ParentIDs) == 1 {
		return []mount.Mount{bindMount(s.upperPath(snap.ParentIDs[0]), "ro")}
	}

	var options []string
	if snap.Kind == snapshots.KindActive {
		options = append(options,
			"workdir="+s.workPath(snap.ID),
			"upperdir="+s.upperPath(snap.ID),
		)
	}
	lowers := make([]string, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		lowers[i] = s.upperPath(id)
	}
	options = append(options, "lowerdir="+strings.Join(lowers, ":"))
	options = append(options, s.mountOptions...)
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}
}

func bindMount(dir, mode string) mount.Mount {
	return mount.Mount{Type: "bind", Source: dir, Options: []string{mode, "rbind"}}
}
