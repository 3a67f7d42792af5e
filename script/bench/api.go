package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"time"

	lazyfs "github.com/lazycas/lazycas/fs"
	"github.com/lazycas/lazycas/integration/testenv"
)

// daemonStats asks the lazycas daemon's API for its store, fetch and
// image figures.
func daemonStats(ctx context.Context, env *testenv.Env) (lazyfs.Stats, error) {
	return env.DaemonStats(ctx)
}

// fetchWait bounds the wait for a background fetch to finish; fetchStall
// ends it early when nothing arrives any more (background fetch disabled
// in the daemon's config).
const (
	fetchWait  = 4 * time.Minute
	fetchStall = 15 * time.Second
)

// errNoBackground says the store stopped filling before it held the image.
var errNoBackground = errors.New("the store stopped filling: no background fetch")

// waitFetched waits until the store holds every file of the layers mounted
// for ref, and returns the daemon's figures then. It returns
// errNoBackground when nothing has been fetched for fetchStall.
func waitFetched(ctx context.Context, env *testenv.Env, ref string) (lazyfs.Stats, error) {
	deadline := time.Now().Add(fetchWait)
	var last int64 = -1
	lastChange := time.Now()
	for {
		st, err := daemonStats(ctx, env)
		if err != nil {
			return st, err
		}
		for _, im := range st.Images {
			if im.Ref == ref && im.Files > 0 && im.PresentFiles == im.Files {
				return st, nil
			}
		}
		if st.Fetch.BytesFetched != last {
			last, lastChange = st.Fetch.BytesFetched, time.Now()
		} else if time.Since(lastChange) > fetchStall {
			return st, errNoBackground
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("background fetch of %s not done after %s: %+v", ref, fetchWait, st.Images)
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// fuseOp matches a FUSE request in go-fuse's debug log ("rx 12: LOOKUP ...").
var fuseOp = regexp.MustCompile(`\brx \d+: ([A-Z_0-9]+)`)

// countFuseOps counts the FUSE requests the daemon logged at fs.debug in
// its log file after offset.
func countFuseOps(path string, offset int64) (map[string]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		return nil, err
	}
	ops := map[string]int64{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		if m := fuseOp.FindSubmatch(sc.Bytes()); m != nil {
			ops[string(m[1])]++
		}
	}
	return ops, sc.Err()
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}
