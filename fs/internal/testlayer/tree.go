package testlayer

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Node is what one path of a layer looks like through lstat, readlink,
// the xattr calls and read.
type Node struct {
	Mode         uint32 // st_mode: type and permission bits
	UID, GID     uint32
	Size         int64
	MTime        int64 // seconds
	Link         string
	Major, Minor uint32
	Nlink        uint32
	Xattrs       map[string]string
	SHA256       string // of a regular file's content
	// Ino is the inode number of a walked path; 0 in an expected tree,
	// where hard links share one *Node instead.
	Ino uint64
}

func (n *Node) String() string {
	s := fmt.Sprintf("mode=%#o uid=%d gid=%d size=%d mtime=%d nlink=%d", n.Mode, n.UID, n.GID, n.Size, n.MTime, n.Nlink)
	if n.Link != "" {
		s += " link=" + n.Link
	}
	if n.Mode&unix.S_IFMT == unix.S_IFCHR || n.Mode&unix.S_IFMT == unix.S_IFBLK {
		s += fmt.Sprintf(" dev=%d:%d", n.Major, n.Minor)
	}
	if n.SHA256 != "" {
		s += " sha256=" + n.SHA256[:12]
	}
	if len(n.Xattrs) > 0 {
		keys := make([]string, 0, len(n.Xattrs))
		for k := range n.Xattrs {
			keys = append(keys, k+"="+n.Xattrs[k])
		}
		sort.Strings(keys)
		s += " xattrs=" + strings.Join(keys, ",")
	}
	return s
}

// Tree maps paths relative to a layer's root ("" is the root) to nodes.
type Tree map[string]*Node

// Expect returns the tree a lower layer made of entries must show to
// overlayfs: whiteouts as 0:0 character devices, opaque directories with
// the one xattr opaqueXattr, no whiteout, opaque or landmark names, no
// overlay xattrs from the tar, undeclared parents as 0755 root directories.
func Expect(entries []Entry, opaqueXattr string) Tree {
	tr := Tree{"": {Mode: unix.S_IFDIR | 0o755}}
	implicit := map[string]bool{"": true}
	var ensure func(p string) *Node
	ensure = func(p string) *Node {
		if n, ok := tr[p]; ok {
			return n
		}
		ensure(parent(p))
		n := &Node{Mode: unix.S_IFDIR | 0o755}
		tr[p], implicit[p] = n, true
		return n
	}
	for _, e := range entries {
		h := e.Hdr
		name := clean(h.Name)
		if name == "" {
			setAttrs(tr[""], e)
			implicit[""] = false
			continue
		}
		dir, base := parent(name), path.Base(name)
		d := ensure(dir)
		switch {
		case dir == "" && (base == ".prefetch.landmark" || base == ".no.prefetch.landmark"):
			continue
		case base == ".wh..wh..opq":
			if d.Xattrs == nil {
				d.Xattrs = map[string]string{}
			}
			d.Xattrs[opaqueXattr] = "y"
			continue
		case strings.HasPrefix(base, ".wh."):
			tr[path.Join(dir, strings.TrimPrefix(base, ".wh."))] = &Node{Mode: unix.S_IFCHR, MTime: h.ModTime.Unix()}
			continue
		}
		if n, ok := tr[name]; ok && h.Typeflag == tar.TypeDir && implicit[name] {
			setAttrs(n, e)
			implicit[name] = false
			continue
		}
		if h.Typeflag == tar.TypeLink {
			tr[name] = tr[clean(h.Linkname)]
			continue
		}
		n := &Node{}
		setAttrs(n, e)
		tr[name] = n
	}
	// Link counts: a directory has its "." and its subdirectories' "..".
	for p, n := range tr {
		if n.Mode&unix.S_IFMT == unix.S_IFDIR {
			n.Nlink += 2
		}
		if p == "" {
			continue
		}
		if n.Mode&unix.S_IFMT == unix.S_IFDIR {
			tr[parent(p)].Nlink++
		} else {
			n.Nlink++
		}
	}
	return tr
}

func clean(name string) string {
	return strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(name, "./"), "/"), "/")
}

func parent(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

func setAttrs(n *Node, e Entry) {
	h := e.Hdr
	var typ uint32
	switch h.Typeflag {
	case tar.TypeDir:
		typ = unix.S_IFDIR
	case tar.TypeReg:
		typ = unix.S_IFREG
		n.Size = int64(len(e.Data))
		n.SHA256 = SHA256(e.Data)
	case tar.TypeSymlink:
		typ = unix.S_IFLNK
		n.Link = h.Linkname
		n.Size = int64(len(h.Linkname))
	case tar.TypeChar, tar.TypeBlock:
		typ = unix.S_IFCHR
		if h.Typeflag == tar.TypeBlock {
			typ = unix.S_IFBLK
		}
		n.Major, n.Minor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeFifo:
		typ = unix.S_IFIFO
	}
	n.Mode = typ | uint32(h.Mode)&0o7777
	n.UID, n.GID = uint32(h.Uid), uint32(h.Gid)
	n.MTime = h.ModTime.Unix()
	for k, v := range h.PAXRecords {
		x, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || strings.HasPrefix(x, "trusted.overlay.") || strings.HasPrefix(x, "user.overlay.") {
			continue
		}
		if n.Xattrs == nil {
			n.Xattrs = map[string]string{}
		}
		n.Xattrs[x] = v
	}
}

// Walk reads the tree under root back with lstat, getdents64, readlink,
// llistxattr/lgetxattr and read. Besides the tree it returns the problems
// a directory listing showed on its own: a missing "." or "..", an entry
// whose dirent inode or type disagrees with lstat, a name listed twice.
func Walk(root string) (Tree, []string, error) {
	return walk(root, true)
}

// WalkMeta is Walk without reading file contents: what a layer shows
// without fetching anything.
func WalkMeta(root string) (Tree, []string, error) {
	return walk(root, false)
}

// WithoutContent returns a copy of tr without content digests, to compare
// with what WalkMeta read. Hard links still share one node.
func (tr Tree) WithoutContent() Tree {
	out := Tree{}
	copies := map[*Node]*Node{}
	for p, n := range tr {
		c, ok := copies[n]
		if !ok {
			cp := *n
			cp.SHA256 = ""
			c = &cp
			copies[n] = c
		}
		out[p] = c
	}
	return out
}

func walk(root string, contents bool) (Tree, []string, error) {
	w := &walker{root: root, tree: Tree{}, contents: contents}
	if err := w.walk(""); err != nil {
		return nil, nil, err
	}
	return w.tree, w.problems, nil
}

type walker struct {
	root     string
	contents bool
	tree     Tree
	problems []string
}

func (w *walker) walk(rel string) error {
	p := filepath.Join(w.root, rel)
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return fmt.Errorf("lstat %q: %w", rel, err)
	}
	n := &Node{Mode: st.Mode, UID: st.Uid, GID: st.Gid, Size: st.Size, MTime: st.Mtim.Sec, Nlink: uint32(st.Nlink), Ino: st.Ino}
	w.tree[rel] = n
	xattrs, err := Xattrs(p)
	if err != nil {
		return fmt.Errorf("xattrs of %q: %w", rel, err)
	}
	if len(xattrs) > 0 {
		n.Xattrs = xattrs
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFCHR, unix.S_IFBLK:
		n.Major, n.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
	case unix.S_IFLNK:
		buf := make([]byte, 4097)
		k, err := unix.Readlink(p, buf)
		if err != nil {
			return fmt.Errorf("readlink %q: %w", rel, err)
		}
		n.Link = string(buf[:k])
	case unix.S_IFREG:
		if !w.contents {
			break
		}
		sum, size, err := hashFile(p)
		if err != nil {
			return fmt.Errorf("read %q: %w", rel, err)
		}
		if size != st.Size {
			w.problems = append(w.problems, fmt.Sprintf("%q: read %d bytes, stat says %d", rel, size, st.Size))
		}
		n.SHA256 = sum
	case unix.S_IFDIR:
		ents, err := ReadDirents(p)
		if err != nil {
			return fmt.Errorf("getdents %q: %w", rel, err)
		}
		seen := map[string]bool{}
		for _, e := range ents {
			if seen[e.Name] {
				w.problems = append(w.problems, fmt.Sprintf("%q lists %q twice", rel, e.Name))
			}
			seen[e.Name] = true
		}
		for _, dot := range []string{".", ".."} {
			if !seen[dot] {
				w.problems = append(w.problems, fmt.Sprintf("%q: readdir lists no %q", rel, dot))
			}
		}
		for _, e := range ents {
			switch e.Name {
			case ".":
				if e.Ino != st.Ino {
					w.problems = append(w.problems, fmt.Sprintf("%q: readdir gives \".\" inode %d, stat %d", rel, e.Ino, st.Ino))
				}
				continue
			case "..":
				continue
			}
			child := path.Join(rel, e.Name)
			if err := w.walk(child); err != nil {
				return err
			}
			c := w.tree[child]
			if e.Ino != c.Ino {
				w.problems = append(w.problems, fmt.Sprintf("%q: dirent inode %d, stat inode %d", child, e.Ino, c.Ino))
			}
			if e.Type != unix.DT_UNKNOWN && uint32(e.Type)<<12 != c.Mode&unix.S_IFMT {
				w.problems = append(w.problems, fmt.Sprintf("%q: dirent type %d, stat mode %#o", child, e.Type, c.Mode))
			}
		}
	}
	return nil
}

func hashFile(p string) (string, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", n, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// Dirent is one raw directory entry.
type Dirent struct {
	Name string
	Ino  uint64
	Type uint8
}

// ReadDirents lists a directory with getdents64, "." and ".." included.
func ReadDirents(dir string) ([]Dirent, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var out []Dirent
	buf := make([]byte, 64<<10)
	for {
		k, err := unix.Getdents(fd, buf)
		if err != nil {
			return nil, err
		}
		if k == 0 {
			return out, nil
		}
		for b := buf[:k]; len(b) > 0; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 20 || reclen > len(b) {
				return nil, fmt.Errorf("corrupt dirent record of %d bytes", reclen)
			}
			name := b[19:reclen]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			out = append(out, Dirent{Name: string(name), Ino: binary.NativeEndian.Uint64(b[0:8]), Type: b[18]})
			b = b[reclen:]
		}
	}
}

// Xattrs returns the extended attributes of p (not following a symlink).
func Xattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil || size == 0 {
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, name := range strings.Split(strings.TrimSuffix(string(buf[:size]), "\x00"), "\x00") {
		v, err := Getxattr(p, name)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out[name] = v
	}
	return out, nil
}

// Getxattr returns one extended attribute of p (not following a symlink).
func Getxattr(p, name string) (string, error) {
	size, err := unix.Lgetxattr(p, name, nil)
	if err != nil {
		return "", err
	}
	buf := make([]byte, size)
	size, err = unix.Lgetxattr(p, name, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:size]), nil
}

// Compare lists how got (walked) differs from want (expected): missing and
// extra paths, differing attributes, and hard links that do not share one
// inode or inodes shared by different files.
func Compare(want, got Tree) []string {
	var diffs []string
	paths := map[string]bool{}
	for p := range want {
		paths[p] = true
	}
	for p := range got {
		paths[p] = true
	}
	sorted := make([]string, 0, len(paths))
	for p := range paths {
		sorted = append(sorted, p)
	}
	sort.Strings(sorted)
	for _, p := range sorted {
		w, g := want[p], got[p]
		switch {
		case g == nil:
			diffs = append(diffs, fmt.Sprintf("missing %q (%v)", p, w))
			continue
		case w == nil:
			diffs = append(diffs, fmt.Sprintf("unexpected %q (%v)", p, g))
			continue
		}
		wc, gc := *w, *g
		gc.Ino = 0
		if wc.String() != gc.String() {
			diffs = append(diffs, fmt.Sprintf("%q:\n\twant %v\n\tgot  %v", p, &wc, &gc))
		}
	}
	// Hard links: the names sharing an inode must be exactly the names of
	// one expected node.
	byIno := map[uint64][]string{}
	for _, p := range sorted {
		if g := got[p]; g != nil {
			byIno[g.Ino] = append(byIno[g.Ino], p)
		}
	}
	names := map[*Node][]string{}
	for _, p := range sorted {
		if w := want[p]; w != nil {
			names[w] = append(names[w], p)
		}
	}
	for ino, ps := range byIno {
		if w := want[ps[0]]; w != nil && strings.Join(names[w], " ") != strings.Join(ps, " ") {
			diffs = append(diffs, fmt.Sprintf("inode %d is %q, want the names %q to share one inode", ino, ps, names[w]))
		}
	}
	return diffs
}
