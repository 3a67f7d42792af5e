package fs

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazycas/lazycas/metadata"
)

// ImageReader reads the manifest and config of an image being pulled from
// where the pull keeps them (containerd's content store).
type ImageReader interface {
	Image(ctx context.Context, manifest digest.Digest) (layers []ocispec.Descriptor, img ocispec.Image, err error)
}

// Bounds of a start-up set: what a program's exec and dynamic loading
// read, not what it may read later.
const (
	maxStartupFiles   = 96
	maxStartupFile    = 64 << 20 // a bigger file is left to piecewise reads
	maxStartupDepth   = 4        // levels of shared libraries followed
	startupTimeout    = time.Minute
	defaultPATH       = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	maxSymlinkHops    = 40
	maxStartupLocales = 64 // files of one locale directory
)

// startup fetches, once the top layer of an image is mounted, the files its
// entrypoint needs to start, before the container asks for them one after
// the other: the program (through its #! interpreter), its ELF interpreter
// and shared libraries, what glibc reads at start (ld.so.cache, the image's
// locale, gconv-modules.cache, localtime) and what runc reads (passwd,
// group). These come from the image's config and file metadata alone: no
// recorded profile. The fetch runs while containerd creates the container,
// in parallel requests; a container read of a file in flight joins its
// fetch.
func (f *FileSystem) startup(ctx context.Context, manifest digest.Digest, top digest.Digest) {
	ctx, cancel := context.WithTimeout(ctx, startupTimeout)
	defer cancel()
	l := log.G(ctx).WithFields(log.Fields{"manifest": manifest})
	layers, img, err := f.opts.Images.Image(ctx, manifest)
	if err != nil {
		l.WithError(err).Debug("start-up set: no image config")
		return
	}
	if len(layers) == 0 || layers[len(layers)-1].Digest != top {
		return // not the image's top layer: the others are not mounted yet
	}
	s := f.stack(layers)
	if len(s) == 0 {
		return
	}
	start := time.Now()
	p := &startupSet{fs: f, stack: s, seen: map[digest.Digest]bool{}, triplet: triplet(img.Architecture), log: l}
	files, bytes := p.run(ctx, img)
	l.WithFields(log.Fields{
		"files": files, "bytes": bytes, "took": time.Since(start).Round(time.Millisecond),
	}).Info("start-up files fetched")
}

// stack returns the mounted lazy layers of an image, top layer first.
// Layers not mounted by this daemon (unpacked ones) are left out: their
// files are local anyway.
func (f *FileSystem) stack(layers []ocispec.Descriptor) stack {
	f.mu.Lock()
	defer f.mu.Unlock()
	byDigest := map[digest.Digest]*mounted{}
	for _, m := range f.layers {
		byDigest[digest.Digest(m.meta.Info.Digest)] = m
	}
	var s stack
	for i := len(layers) - 1; i >= 0; i-- {
		if m := byDigest[layers[i].Digest]; m != nil {
			s = append(s, m)
		}
	}
	return s
}

// stack is an image's layers, top first, seen the way overlayfs merges them.
type stack []*mounted

// find returns the node at p, a clean absolute path whose directories are
// not symlinks, in the topmost layer holding it; nil if none does or a
// whiteout or opaque directory hides it.
func (s stack) find(p string) (*mounted, *metadata.Node) {
	comps := strings.Split(strings.Trim(p, "/"), "/")
	for _, m := range s {
		id := metadata.RootID
		hidden := false
		for i, c := range comps {
			n, err := m.meta.Lookup(id, c)
			if err != nil {
				break
			}
			if n.Type == metadata.TypeChar && n.DevMajor == 0 && n.DevMinor == 0 {
				return nil, nil // a whiteout
			}
			if i == len(comps)-1 {
				return m, n
			}
			if n.Type != metadata.TypeDir {
				return nil, nil // a file hides the directories below
			}
			hidden = hidden || n.Opaque
			id = n.ID
		}
		if hidden {
			return nil, nil
		}
	}
	return nil, nil
}

// resolve follows symlinks through the merged view to the node at p.
func (s stack) resolve(p string) (*mounted, *metadata.Node) {
	p = path.Clean("/" + p)
	for range maxSymlinkHops {
		if p == "/" {
			return nil, nil
		}
		comps := strings.Split(strings.Trim(p, "/"), "/")
		cur, next := "/", ""
		for i, c := range comps {
			here := path.Join(cur, c)
			m, n := s.find(here)
			if n == nil {
				return nil, nil
			}
			if n.Type == metadata.TypeSymlink {
				t := n.Link
				if !path.IsAbs(t) {
					t = path.Join(cur, t)
				}
				next = path.Join(append([]string{t}, comps[i+1:]...)...)
				break
			}
			if i == len(comps)-1 {
				return m, n
			}
			cur = here
		}
		if next == "" {
			return nil, nil
		}
		p = path.Clean("/" + next)
	}
	return nil, nil
}

// startupSet gathers and fetches the files of one image's start.
type startupSet struct {
	fs      *FileSystem
	stack   stack
	triplet string // multiarch directory, e.g. x86_64-linux-gnu
	log     *log.Entry

	sealing sync.WaitGroup // large files being sealed after their pieces came

	mu    sync.Mutex
	seen  map[digest.Digest]bool
	files int
	bytes int64
}

// startupFile is a regular file of the set, the layer serving it and the
// path it was looked up by.
type startupFile struct {
	m    *mounted
	n    *metadata.Node
	path string
}

func (p *startupSet) run(ctx context.Context, img ocispec.Image) (int, int64) {
	prog := p.program(img.Config)
	// runc reads passwd and group while it creates the container, before
	// the program runs: they come first, alone on the link. Behind the
	// set's large files (the program, libc) their few kilobytes waited for
	// the queue those fill on a shaped link, a round trip at a time: on a
	// 100 Mbit/s link with 20 ms each way, creating the container took
	// 0.42 s with them in the crowd and 0.19 s with no start-up fetch.
	// Each layer holding them also fetched them as it mounted
	// (fetchRuncFiles): usually they are in the store or on their way.
	p.fetch(ctx, p.lookup(runcFiles))
	first := []string{"/etc/ld.so.cache", "/etc/localtime"}
	if p.triplet != "" {
		// Almost every dynamic program of a glibc image needs these; asking
		// now saves waiting for the program's ELF header.
		first = append(first, interpFor(p.triplet), "/lib/"+p.triplet+"/libc.so.6",
			"/usr/lib/"+p.triplet+"/gconv/gconv-modules.cache")
	}
	first = append(first, p.localeFiles(img.Config.Env)...)

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.fetch(ctx, p.lookup(first))
	}()
	if prog != "" {
		p.followProgram(ctx, prog)
	}
	wg.Wait()
	p.sealing.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.files, p.bytes
}

// runcFiles are what runc reads of a container's root filesystem while it
// creates the container.
var runcFiles = []string{"/etc/passwd", "/etc/group"}

// fetchRuncFiles fetches, in the background, the layer's own runcFiles as
// soon as it is mounted: a few kilobytes, needed before the program runs,
// while the link is still quiet. Another layer may override them: the
// start-up set fetches what the merged stack shows.
func (m *mounted) fetchRuncFiles() {
	var nodes []*metadata.Node
	for _, p := range runcFiles {
		_, n := stack{m}.resolve(p)
		if n != nil && n.Type == metadata.TypeReg && n.Size > 0 && len(n.Chunks) > 0 && n.Size <= groupSpan &&
			!m.fs.store.Has(digest.Digest(n.Digest)) {
			nodes = append(nodes, n)
		}
	}
	if len(nodes) == 0 {
		return
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Chunks[0].Offset < nodes[j].Chunks[0].Offset })
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		for _, g := range groupNodes(nodes) {
			if _, _, err := m.fetchGroup(m.bg, g, true); err != nil && m.bg.Err() == nil {
				log.G(m.bg).WithError(err).WithField("layer", m.meta.Info.Digest).Debug("fetch passwd and group")
			}
		}
	}()
}

// program is the path of the executable the image's config starts.
func (p *startupSet) program(c ocispec.ImageConfig) string {
	argv := append(slices.Clone(c.Entrypoint), c.Cmd...)
	if len(argv) == 0 || argv[0] == "" {
		return ""
	}
	if strings.Contains(argv[0], "/") {
		if path.IsAbs(argv[0]) {
			return argv[0]
		}
		return path.Join("/", c.WorkingDir, argv[0])
	}
	search := defaultPATH
	for _, e := range c.Env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			search = v
		}
	}
	for _, dir := range strings.Split(search, ":") {
		if !path.IsAbs(dir) {
			continue
		}
		cand := path.Join(dir, argv[0])
		if _, n := p.stack.resolve(cand); n != nil && n.Type == metadata.TypeReg {
			return cand
		}
	}
	return ""
}

// followProgram fetches the program, then what its #! line or ELF headers
// say it loads, level by level.
func (p *startupSet) followProgram(ctx context.Context, prog string) {
	level := []string{prog}
	for depth := 0; depth <= maxStartupDepth && len(level) > 0; depth++ {
		files := p.lookup(level)
		p.fetch(ctx, files)
		var next []string
		for _, sf := range files {
			next = append(next, p.dependencies(sf)...)
		}
		level = next
	}
}

// dependencies reads a fetched file's #! interpreter or its ELF
// interpreter and the shared libraries it needs, as paths in the image.
func (p *startupSet) dependencies(sf startupFile) (deps []string) {
	h, release, err := p.open(sf)
	if err != nil {
		return nil
	}
	defer release()
	// The file comes from an image, whoever made it, and debug/elf is not
	// hardened against hostile input: a panic must not take the daemon
	// down, it only ends the start-up set here.
	defer func() {
		if r := recover(); r != nil {
			p.log.WithFields(log.Fields{"path": sf.path, "layer": sf.m.meta.Info.Digest, "panic": r}).
				Warn("start-up files: cannot read the ELF headers")
			deps = nil
		}
	}()
	head := make([]byte, 256)
	n, _ := h.ReadAt(head, 0)
	head = head[:n]
	if interp, ok := strings.CutPrefix(string(head), "#!"); ok {
		line, _, _ := strings.Cut(interp, "\n")
		if f := strings.Fields(line); len(f) > 0 && path.IsAbs(f[0]) {
			return []string{f[0]}
		}
		return nil
	}
	ef, err := elf.NewFile(h)
	if err != nil {
		return nil
	}
	for _, prog := range ef.Progs {
		if prog.Type == elf.PT_INTERP && prog.Filesz < 4096 {
			b := make([]byte, prog.Filesz)
			if _, err := prog.ReadAt(b, 0); err == nil {
				deps = append(deps, strings.TrimRight(string(b), "\x00"))
			}
		}
	}
	libs, _ := ef.ImportedLibraries()
	var dirs []string
	for _, tag := range []elf.DynTag{elf.DT_RUNPATH, elf.DT_RPATH} {
		vals, _ := ef.DynString(tag)
		for _, v := range vals {
			for _, d := range strings.Split(v, ":") {
				d = strings.ReplaceAll(strings.ReplaceAll(d, "${ORIGIN}", "$ORIGIN"), "$ORIGIN", path.Dir(sf.path))
				if path.IsAbs(d) {
					dirs = append(dirs, d)
				}
			}
		}
	}
	if p.triplet != "" {
		dirs = append(dirs, "/lib/"+p.triplet, "/usr/lib/"+p.triplet)
	}
	if ef.Class == elf.ELFCLASS64 {
		dirs = append(dirs, "/lib64", "/usr/lib64")
	}
	dirs = append(dirs, "/lib", "/usr/lib", "/usr/local/lib")
	for _, lib := range libs {
		if strings.Contains(lib, "/") {
			deps = append(deps, lib)
			continue
		}
		for _, d := range dirs {
			cand := path.Join(d, lib)
			if _, n := p.stack.resolve(cand); n != nil && n.Type == metadata.TypeReg {
				deps = append(deps, cand)
				break
			}
		}
	}
	return deps
}

// open returns a reader of a fetched file's content: its sealed object,
// or its partial object while that is being sealed.
func (p *startupSet) open(sf startupFile) (io.ReaderAt, func(), error) {
	d := digest.Digest(sf.n.Digest)
	if h, err := p.fs.store.Open(d); err == nil {
		return h, func() { h.Close() }, nil
	}
	part, err := p.fs.store.Partial(d, sf.n.Size)
	if err != nil {
		return nil, nil, err
	}
	if !part.Has(0, sf.n.Size) {
		part.Release()
		// Sealed between the two looks?
		if h, err := p.fs.store.Open(d); err == nil {
			return h, func() { h.Close() }, nil
		}
		return nil, nil, fmt.Errorf("%s: not fetched", sf.path)
	}
	return part, part.Release, nil
}

// localeFiles lists the files of the locale the image's environment
// selects, which glibc's setlocale reads at start.
func (p *startupSet) localeFiles(env []string) []string {
	var name string
	for _, k := range []string{"LC_ALL=", "LC_CTYPE=", "LANG="} {
		for _, e := range env {
			if v, ok := strings.CutPrefix(e, k); ok && v != "" && name == "" {
				name = v
			}
		}
	}
	if name == "" || name == "C" || name == "POSIX" {
		return nil
	}
	var out []string
	for _, dir := range localeDirs(name) {
		m, n := p.stack.resolve(dir)
		if n == nil || n.Type != metadata.TypeDir {
			continue
		}
		p.walkDir(m, n.ID, dir, &out)
		break
	}
	return out
}

// walkDir lists the regular files under directory id of one layer.
func (p *startupSet) walkDir(m *mounted, id uint64, dir string, out *[]string) {
	ents, err := m.meta.ReadDir(id)
	if err != nil {
		return
	}
	for _, e := range ents {
		if len(*out) >= maxStartupLocales {
			return
		}
		switch e.Type {
		case metadata.TypeReg:
			*out = append(*out, path.Join(dir, e.Name))
		case metadata.TypeDir:
			p.walkDir(m, e.ID, path.Join(dir, e.Name), out)
		}
	}
}

// localeDirs are where glibc looks for a locale's files: the name as
// given, then with its codeset normalized (C.UTF-8 becomes C.utf8).
func localeDirs(name string) []string {
	dirs := []string{path.Join("/usr/lib/locale", name)}
	lang, rest, ok := strings.Cut(name, ".")
	if !ok {
		return dirs
	}
	codeset, mod, _ := strings.Cut(rest, "@")
	var norm strings.Builder
	for _, r := range strings.ToLower(codeset) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			norm.WriteRune(r)
		}
	}
	n := lang + "." + norm.String()
	if mod != "" {
		n += "@" + mod
	}
	return append(dirs, path.Join("/usr/lib/locale", n))
}

// triplet is the Debian multiarch directory of an OCI architecture.
func triplet(arch string) string {
	switch arch {
	case "amd64":
		return "x86_64-linux-gnu"
	case "arm64":
		return "aarch64-linux-gnu"
	case "arm":
		return "arm-linux-gnueabihf"
	case "386":
		return "i386-linux-gnu"
	case "ppc64le":
		return "powerpc64le-linux-gnu"
	case "s390x":
		return "s390x-linux-gnu"
	case "riscv64":
		return "riscv64-linux-gnu"
	}
	return ""
}

// interpFor is glibc's dynamic loader path for a multiarch triplet.
func interpFor(t string) string {
	switch t {
	case "x86_64-linux-gnu":
		return "/lib64/ld-linux-x86-64.so.2"
	case "aarch64-linux-gnu":
		return "/lib/ld-linux-aarch64.so.1"
	case "arm-linux-gnueabihf":
		return "/lib/ld-linux-armhf.so.3"
	case "i386-linux-gnu":
		return "/lib/ld-linux.so.2"
	case "powerpc64le-linux-gnu":
		return "/lib64/ld64.so.2"
	case "s390x-linux-gnu":
		return "/lib/ld64.so.1"
	case "riscv64-linux-gnu":
		return "/lib/ld-linux-riscv64-lp64d.so.1"
	}
	return ""
}

// lookup resolves paths to the regular files not yet in the set, and adds
// them to it.
func (p *startupSet) lookup(paths []string) []startupFile {
	var out []startupFile
	for _, q := range paths {
		m, n := p.stack.resolve(q)
		if n == nil || n.Type != metadata.TypeReg || n.Size == 0 || n.Size > maxStartupFile || len(n.Chunks) == 0 {
			continue
		}
		d := digest.Digest(n.Digest)
		p.mu.Lock()
		dup := p.seen[d] || len(p.seen) >= maxStartupFiles
		p.seen[d] = true
		p.mu.Unlock()
		if !dup {
			out = append(out, startupFile{m, n, q})
			p.log.WithFields(log.Fields{"path": q, "size": n.Size, "layer": m.meta.Info.Digest,
				"offset": n.Chunks[0].Offset}).Debug("start-up file")
		}
	}
	return out
}

// fetch brings files into the store: per layer, files close together in
// the blob share a request, and all requests go out at once. Its requests
// count as a reader's: background fetch waits for them.
func (p *startupSet) fetch(ctx context.Context, files []startupFile) {
	var todo []startupFile
	for _, sf := range files {
		if !p.fs.store.Has(digest.Digest(sf.n.Digest)) {
			todo = append(todo, sf)
		}
	}
	if len(todo) == 0 {
		return
	}
	var wg sync.WaitGroup
	// A large file is fetched piece by piece, all pieces at once: a read
	// of a piece in flight waits for it instead of fetching it again.
	todo = slices.DeleteFunc(todo, func(sf startupFile) bool {
		if !sf.m.piecewise(sf.n) {
			return false
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.fetchLarge(ctx, sf); err != nil && !errors.Is(err, context.Canceled) {
				log.G(ctx).WithError(err).WithField("layer", sf.m.meta.Info.Digest).Debug("start-up fetch")
			}
		}()
		return true
	})
	byLayer := map[*mounted][]*metadata.Node{}
	for _, sf := range todo {
		byLayer[sf.m] = append(byLayer[sf.m], sf.n)
	}
	for m, nodes := range byLayer {
		sort.Slice(nodes, func(i, j int) bool { return nodes[i].Chunks[0].Offset < nodes[j].Chunks[0].Offset })
		for _, g := range groupNodes(nodes) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				files, bytes, err := m.fetchGroup(ctx, g, true)
				p.mu.Lock()
				p.files += files
				p.bytes += bytes
				p.mu.Unlock()
				if err != nil && !errors.Is(err, context.Canceled) {
					log.G(ctx).WithError(err).WithField("layer", m.meta.Info.Digest).Debug("start-up fetch")
				}
			}()
		}
	}
	wg.Wait()
}

// fetchLarge fills every piece of a large file in parallel, then seals it.
func (p *startupSet) fetchLarge(ctx context.Context, sf startupFile) error {
	part, err := p.fs.store.Partial(digest.Digest(sf.n.Digest), sf.n.Size)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	errs := make([]error, len(sf.n.Chunks))
	done := p.fs.foreground()
	for i, c := range sf.n.Chunks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = sf.m.fillPiece(ctx, part, c, nil)
		}()
	}
	wg.Wait()
	// Not counted as a reader while sealing: the seal may wait for a
	// background completion of the same file, which waits for readers.
	done()
	if err := errors.Join(errs...); err != nil {
		part.Release()
		return err
	}
	// Sealed meanwhile: the program's libraries are looked for in its
	// pieces now, not after hashing and writing all of it.
	p.sealing.Add(1)
	go func() {
		defer p.sealing.Done()
		// Held until sealed: the last release discards the pieces.
		defer part.Release()
		if err := sf.m.ensure(ctx, sf.n, nil); err != nil {
			log.G(ctx).WithError(err).WithField("layer", sf.m.meta.Info.Digest).Debug("start-up fetch")
			return
		}
		p.mu.Lock()
		p.files++
		p.bytes += sf.n.Size
		p.mu.Unlock()
	}()
	return nil
}
