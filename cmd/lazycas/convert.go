package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/containerd/platforms"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/service/resolver"
)

func imageConvert(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas image convert", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintln(stderr, "usage: lazycas image convert [flags] SRC DST")
		flags.PrintDefaults()
	}
	var (
		format       = flags.String("format", string(convert.EStargz), "lazy format: estargz or zstdchunked")
		prefetch     = flags.String("prefetch", "", "file listing paths (one a line) to place first and prefetch")
		platform     = flags.String("platform", "", "platform to convert (default: this host's)")
		allPlatforms = flags.Bool("all-platforms", false, "convert every platform of an index")
		hostsDir     = flags.String("hosts-dir", "", "containerd hosts directory (hosts.toml per registry)")
		plainHTTP    = flags.Bool("plain-http", false, "use plain HTTP for registries hosts.toml does not configure")
		asJSON       = flags.Bool("json", false, "print the result as JSON")
	)
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() != 2 {
		flags.Usage()
		return errUsage
	}
	src, err := normalizeRef(flags.Arg(0))
	if err != nil {
		return err
	}
	dst, err := normalizeRef(flags.Arg(1))
	if err != nil {
		return err
	}
	f, err := convert.ParseFormat(*format)
	if err != nil {
		return fmt.Errorf("--format: %w", err)
	}
	opts := convert.Options{
		Format:       f,
		AllPlatforms: *allPlatforms,
		Resolver:     resolver.New(ctx, resolver.Options{HostsDir: *hostsDir, PlainHTTP: *plainHTTP}),
	}
	if *platform != "" {
		if *allPlatforms {
			return fmt.Errorf("--platform and --all-platforms exclude each other")
		}
		p, err := platforms.Parse(*platform)
		if err != nil {
			return fmt.Errorf("--platform: %w", err)
		}
		opts.Platforms = platforms.Only(p)
	}
	if *prefetch != "" {
		if opts.Prefetch, err = readPathList(*prefetch); err != nil {
			return fmt.Errorf("--prefetch: %w", err)
		}
	}
	p := newConvertProgress(stderr, f)
	if !*asJSON {
		opts.Progress = p.event
	}
	res, err := convert.Convert(ctx, src, dst, opts)
	p.finish()
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(stdout, "converted %s to %s as %s (%s)\n", src, f, dst, res.Target.Digest)
	return nil
}

// readPathList reads one path a line; blank lines and #-comments are skipped.
func readPathList(file string) ([]string, error) {
	fh, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	var paths []string
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		paths = append(paths, line)
	}
	return paths, sc.Err()
}

// convertProgress prints a line per finished layer and, on a terminal, a
// live status line of the layers still converting.
type convertProgress struct {
	w        io.Writer
	format   convert.Format
	terminal bool
	mu       sync.Mutex
	active   map[string]int64 // source digest -> bytes read
	drawn    bool
}

func newConvertProgress(w io.Writer, f convert.Format) *convertProgress {
	terminal := false
	if fh, ok := w.(*os.File); ok {
		if fi, err := fh.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			terminal = true
		}
	}
	return &convertProgress{w: w, format: f, terminal: terminal, active: map[string]int64{}}
}

func (p *convertProgress) event(ev convert.LayerEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	src := ev.Source.Digest.String()
	p.clear()
	if r := ev.Result; r != nil {
		delete(p.active, src)
		if r.Kept {
			fmt.Fprintf(p.w, "layer %s %s: already %s, kept\n", shortDigest(src), humanBytes(r.Source.Size), p.format)
		} else {
			fmt.Fprintf(p.w, "layer %s %s -> %s %s %s (%.1fs)\n", shortDigest(src), humanBytes(r.Source.Size),
				p.format, shortDigest(r.Converted.Digest.String()), humanBytes(r.Converted.Size), r.Duration.Seconds())
		}
	} else {
		p.active[src] = ev.BytesRead
	}
	p.draw()
}

func (p *convertProgress) clear() {
	if p.terminal && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}

func (p *convertProgress) draw() {
	if !p.terminal || len(p.active) == 0 {
		return
	}
	var parts []string
	for d, n := range p.active {
		parts = append(parts, fmt.Sprintf("%s %s", shortDigest(d), humanBytes(n)))
	}
	fmt.Fprintf(p.w, "converting: %s", strings.Join(parts, ", "))
	p.drawn = true
}

func (p *convertProgress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clear()
}
