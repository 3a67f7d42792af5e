package fuse

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/fuse/holder"
	"github.com/lazycas/lazycas/fs/internal/testlayer"
	"github.com/lazycas/lazycas/fs/layer"
	"github.com/lazycas/lazycas/metadata"
)

// serveEnv, set for a child test binary, makes TestHelperServe mount a
// layer as a daemon would; its value is a serveSpec in JSON.
const serveEnv = "LAZYCAS_FUSE_TEST_SERVE"

type serveSpec struct {
	Dir, Mountpoint, Socket string
	Passthrough             bool
	// Stall is the digest of a file whose content the child never
	// produces: a read of it stays unanswered until another process
	// serves the mount.
	Stall string
}

// stallingFiles never produces the content of the file whose digest it
// names: a read of it stays unanswered until another process serves.
type stallingFiles struct {
	*storeFiles
	digest string
}

func (f stallingFiles) Open(ctx context.Context, n *metadata.Node) (File, error) {
	if n.Digest == f.digest {
		select {}
	}
	return f.storeFiles.Open(ctx, n)
}

// TestHelperServe is not a test: TestResumeServesOnWhatAnotherProcessLeft
// runs it in a child process, to serve a mount as a daemon does until it
// is killed, or, on SIGTERM, detached.
func TestHelperServe(t *testing.T) {
	v := os.Getenv(serveEnv)
	if v == "" {
		t.Skip("helper process of TestResumeServesOnWhatAnotherProcessLeft")
	}
	var spec serveSpec
	if err := json.Unmarshal([]byte(v), &spec); err != nil {
		t.Fatal(err)
	}
	blob, err := os.ReadFile(filepath.Join(spec.Dir, "blob"))
	if err != nil {
		t.Fatal(err)
	}
	ml, files := openLayer(t, spec.Dir, blob, layer.FormatEStargz)
	ctx := context.Background()
	keeper, err := holder.Connect(ctx, holder.ClientOptions{Socket: spec.Socket})
	if err != nil {
		t.Fatal(err)
	}
	l, err := Mount(ctx, spec.Mountpoint, ml, stallingFiles{files, spec.Stall}, Options{Passthrough: spec.Passthrough, Keeper: keeper})
	if err != nil {
		t.Fatal(err)
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	fmt.Println("serving")
	<-term
	l.Detach(time.Second)
	if err := keeper.Close(); err != nil {
		t.Fatal(err)
	}
	fmt.Println("detached")
	os.Exit(0)
}

// TestResumeServesOnWhatAnotherProcessLeft serves a mount from a child
// process, opens files through it, leaves a read unanswered in it, and
// stops it, by SIGKILL or by SIGTERM; this process then takes the mount
// from a holder and serves on. Nothing a reader holds may notice: the
// unanswered read completes, open files read on, and new opens of files
// open since before the handover work, passthrough or not.
func TestResumeServesOnWhatAnotherProcessLeft(t *testing.T) {
	testlayer.Root(t)
	for _, passthrough := range []bool{false, true} {
		for _, stop := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
			t.Run(fmt.Sprintf("passthrough=%v/%s", passthrough, stop), func(t *testing.T) {
				testResume(t, passthrough, stop)
			})
		}
	}
}

func testResume(t *testing.T, passthrough bool, stop syscall.Signal) {
	dir := testlayer.TestDir(t)
	big := testlayer.Random(7, 3<<20+5)
	small, stalled := []byte("small file\n"), []byte("read across the handover\n")
	entries := []testlayer.Entry{
		testlayer.Dir("d/", 0o755),
		testlayer.File("d/big", big, 0o644),
		testlayer.File("d/small", small, 0o644),
		testlayer.File("stalled", stalled, 0o644),
	}
	blob := testlayer.Build(t, testlayer.Tar(t, entries), layer.FormatEStargz, testlayer.BuildOptions{ChunkSize: 1 << 20})
	tree := putLayer(t, dir, blob)
	var stallDigest string
	for _, n := range tree.Nodes {
		if n.Size == int64(len(stalled)) {
			stallDigest = n.Digest
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "blob"), blob.Data, 0o600); err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	// A unix socket's path is short: not under the test's directory.
	sockDir, err := os.MkdirTemp("/tmp", "lzh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "holder.sock")
	held := make(chan error, 1)
	go func() { held <- holder.Serve(ctx, holder.ServerOptions{Socket: socket}) }()
	t.Cleanup(func() {
		cancel()
		<-held
	})

	// The first server: a child process.
	spec, _ := json.Marshal(serveSpec{Dir: dir, Mountpoint: mp, Socket: socket, Passthrough: passthrough, Stall: stallDigest})
	child := exec.Command(os.Args[0], "-test.run=^TestHelperServe$")
	child.Env = append(os.Environ(), serveEnv+"="+string(spec), testlayer.ChildEnv+"=1")
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = child.Process.Kill(); _ = child.Wait() })
	lines := bufio.NewScanner(out)
	if !lines.Scan() || lines.Text() != "serving" {
		said := []string{lines.Text()}
		for lines.Scan() {
			said = append(said, lines.Text())
		}
		t.Fatalf("the serving child did not serve: %q", said)
	}

	// What readers hold when the server goes: an open file part read, a
	// read the server never answers.
	f, err := os.Open(filepath.Join(mp, "d/big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := make([]byte, 1<<20)
	if _, err := io.ReadFull(f, head); err != nil || string(head) != string(big[:len(head)]) {
		t.Fatalf("read through the first server: %v", err)
	}
	stalledRead := make(chan string, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(mp, "stalled"))
		if err != nil {
			stalledRead <- err.Error()
		}
		stalledRead <- string(b)
	}()
	time.Sleep(300 * time.Millisecond) // the read reaches the child and waits there
	select {
	case got := <-stalledRead:
		t.Fatalf("the stalled read returned %q before the handover", got)
	default:
	}

	if err := child.Process.Signal(stop); err != nil {
		t.Fatal(err)
	}
	if stop == syscall.SIGTERM {
		if !lines.Scan() || lines.Text() != "detached" {
			t.Fatalf("the child said %q on SIGTERM", lines.Text())
		}
	}
	_ = child.Wait()

	// The second server: this process.
	ml, files := openLayer(t, dir, blob.Data, layer.FormatEStargz)
	keeper, err := holder.Connect(ctx, holder.ClientOptions{Socket: socket})
	if err != nil {
		t.Fatal(err)
	}
	defer keeper.Close()
	taken, err := keeper.Take()
	if err != nil || len(taken) != 1 {
		t.Fatalf("the holder kept %d mounts (%v), want 1", len(taken), err)
	}
	l, err := Resume(ctx, mp, ml, files, Options{Passthrough: passthrough, Keeper: keeper}, Held{Record: taken[0].Record, Fds: taken[0].Fds})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})

	select {
	case got := <-stalledRead:
		if got != string(stalled) {
			t.Errorf("the read left unanswered by the first server returned %q", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the read left unanswered by the first server still waits 10s after the handover")
	}
	rest, err := io.ReadAll(f)
	if err != nil || string(rest) != string(big[len(head):]) {
		t.Errorf("a file opened before the handover reads on wrong: %d bytes, %v", len(rest), err)
	}
	for _, p := range []string{"d/big", "d/small"} {
		b, err := os.ReadFile(filepath.Join(mp, p))
		want := map[string][]byte{"d/big": big, "d/small": small}[p]
		if err != nil || string(b) != string(want) {
			t.Errorf("open %s after the handover: %d bytes, %v", p, len(b), err)
		}
	}
	names, err := os.ReadDir(filepath.Join(mp, "d"))
	if err != nil || len(names) != 2 {
		t.Errorf("list a directory after the handover: %v, %v", names, err)
	}
	if l.Passthrough() && l.Stats().Reads.Load() != 0 {
		t.Errorf("with passthrough, the second server served %d reads", l.Stats().Reads.Load())
	}
}
