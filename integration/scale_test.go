package integration

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"archive/tar"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazycas/lazycas/integration/testenv"
)

// TestLayerOfManyFiles mounts, as a user would pull it, a lazy layer of
// 200,000 empty files (a TOC of about 40 MB): every name must be there,
// and the daemon's memory must follow what it holds, not the TOC. The
// figure (peak RSS) is logged; the bound only catches a return to holding
// the decoded TOC whole (335 MB before the import streamed).
func TestLayerOfManyFiles(t *testing.T) {
	requireIntegration(t)
	if testing.Short() {
		t.Skip("builds and pulls a 200,000-file layer")
	}
	const dirs, perDir = 400, 500
	env := newEnvWith(t, testenv.Options{})
	ctx := testContext(t)

	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	for d := range dirs {
		dir := fmt.Sprintf("many/d%04d/", d)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755}); err != nil {
			t.Fatal(err)
		}
		for f := range perDir {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sempty-file-%06d.txt", dir, d*perDir+f), Mode: 0o644}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var blob bytes.Buffer
	w := estargz.NewWriterLevel(&blob, gzip.BestSpeed)
	if err := w.AppendTar(&tarBuf); err != nil {
		t.Fatal(err)
	}
	tocDigest, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	data := blob.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.Append(mutate.MediaType(empty.Image, types.OCIManifestSchema1), mutate.Addendum{
		Layer: layer, MediaType: types.OCILayer, Annotations: map[string]string{estargz.TOCJSONDigestAnnotation: tocDigest.String()},
	})
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	ref := env.RegistryHost + "/many:estargz"
	nref, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(nref, img, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}

	pid := env.DaemonPID()
	before := vmStatus(t, pid, "VmRSS")
	// VmHWM has the peak; sampling tells what it is made of: the Go heap
	// and the rest (anonymous), or pages of mapped files (metadata's
	// bbolt file, which the kernel can reclaim).
	stop, sampled := make(chan struct{}), make(chan [2]int64)
	go func() {
		var anon, file int64
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			anon, file = max(anon, vmStatus(t, pid, "RssAnon")), max(file, vmStatus(t, pid, "RssFile"))
			select {
			case <-stop:
				sampled <- [2]int64{anon, file}
				return
			case <-tick.C:
			}
		}
	}()
	start := time.Now()
	_, err = env.Pull(ctx, ref, testenv.WithSnapshotLabels(ref))
	took := time.Since(start)
	close(stop)
	peaks := <-sampled
	if err != nil {
		t.Fatal(err)
	}
	mounts := lazyMounts(t, env)
	if len(mounts) != 1 {
		t.Fatalf("%d lazy mounts, want the layer's one", len(mounts))
	}
	peak := vmStatus(t, pid, "VmHWM")
	// The mount gives what the import took back to the kernel.
	time.Sleep(2 * time.Second)
	after := vmStatus(t, pid, "VmRSS")

	root := strings.Fields(mounts[0])[1]
	files := 0
	for d := range dirs {
		ents, err := os.ReadDir(filepath.Join(root, fmt.Sprintf("many/d%04d", d)))
		if err != nil {
			t.Fatal(err)
		}
		files += len(ents)
	}
	if files != dirs*perDir {
		t.Errorf("%d files under the mount, want %d", files, dirs*perDir)
	}
	t.Logf("a layer of %d empty files (blob %d KiB): pulled lazily in %s; daemon RSS %d MiB before, peak %d MiB (sampled peaks: %d MiB anonymous, %d MiB of mapped files), %d MiB after",
		files, len(data)>>10, took.Round(time.Millisecond), before>>10, peak>>10, peaks[0]>>10, peaks[1]>>10, after>>10)
	if peak > 150<<10 {
		t.Errorf("the daemon's RSS peaked at %d MiB importing the layer", peak>>10)
	}
}

// vmStatus is a kB figure of pid's /proc status (VmRSS, VmHWM).
func vmStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}
