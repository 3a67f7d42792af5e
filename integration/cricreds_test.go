package integration

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// TestCRIPullWithKubeletCredentials pulls from a registry that wants a
// password, as kubelet does with a pull secret: through lazycas's CRI
// image service, with crictl pull --creds. The daemon has no docker config
// of its own, so the lazy reads a container makes after the pull can only
// authenticate with the credentials the proxy kept from the pull; and
// those must appear in no log and no file of the daemon's.
func TestCRIPullWithKubeletCredentials(t *testing.T) {
	t.Run("containerd 1.6", func(t *testing.T) { testCRICredentials(t, false) })
	t.Run("containerd 2.x", func(t *testing.T) { testCRICredentials(t, true) })
}

func testCRICredentials(t *testing.T, containerd2 bool) {
	requireIntegration(t)
	ctx := testContext(t)
	bin := criTools(ctx, t, containerd2)
	// Unix socket paths must stay short: not under t.TempDir().
	sockDir, err := os.MkdirTemp("", "cri")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	proxySock := filepath.Join(sockDir, "cri.sock")
	metrics := freeAddress(t)
	auth := &testenv.BasicAuth{User: "kubelet", Password: "pull-" + testenv.UniqueID("secret")}
	hosts := filepath.Join(t.TempDir(), "cri-hosts.d")
	env := newEnvWith(t, testenv.Options{
		RegistryAuth: auth,
		// Nothing fetched ahead: every file the container reads is read
		// lazily, after the pull, with the pull's credentials.
		DaemonConfig: fmt.Sprintf("metrics_address = %q\n\n[fs]\nprefetch = false\nstartup_fetch = false\nbackground_fetch = false\nlearn = false\n\n[cri]\nimage_service_address = %q\n", metrics, proxySock),
		Containerd2:  containerd2,
		CRIConfig:    criConfigFor(containerd2, hosts),
	})
	writeHostsToml(t, hosts, env.RegistryHost, env.RegistryHost)
	if _, err := env.PushImage(ctx, testimages.Pause); err != nil {
		t.Fatal(err)
	}
	ref := convertPython(ctx, t, env, convert.EStargz, nil)
	cri := crictl{t: t, bin: bin, sock: env.ContainerdAddress, image: proxySock}
	creds := auth.User + ":" + auth.Password

	if _, err := cri.try(ctx, "pull", ref); err == nil {
		t.Fatal("crictl pull without credentials succeeded: the registry does not ask for them")
	} else if msg := strings.ToLower(err.Error()); !strings.Contains(msg, "unauthorized") && !strings.Contains(msg, "authorization") {
		t.Errorf("pull without credentials failed for another reason than authorization: %v", err)
	}
	// The sandbox image too is private: pulled ahead, as on a node whose
	// pause image lives in a private registry.
	cri.run(ctx, "pull", "--creds", creds, env.RegistryHost+"/pause:latest")
	cri.run(ctx, "pull", "--creds", creds, ref)
	if n := len(lazyMounts(t, env)); n == 0 {
		t.Fatal("the credentialed crictl pull mounted no layer lazily")
	}
	before, err := env.DaemonStats(ctx)
	if err != nil {
		t.Fatal(err)
	}

	podID, ctrID := startPod(ctx, t, cri, ref, "python3", "-c",
		"import email.parser, json, http.client, sqlite3, xml.dom.minidom; print('imported', flush=True); import time; time.sleep(600)")
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(cri.run(ctx, "logs", ctrID), "imported") {
		if time.Now().After(deadline) {
			t.Fatalf("the container printed nothing in a minute: %q\n%s", cri.run(ctx, "logs", ctrID), env.LogTail(30))
		}
		time.Sleep(200 * time.Millisecond)
	}
	after, err := env.DaemonStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	fetched := after.Store.FetchedFiles - before.Store.FetchedFiles
	t.Logf("after the pull, the container's start fetched %d files in %d registry requests with the pull's credentials",
		fetched, after.Fetch.Requests-before.Fetch.Requests)
	if fetched == 0 {
		t.Error("the container started without a lazy read: the test proves nothing about the credentials")
	}

	// The daemon goes away twice, once politely and once killed; the
	// credentials go with the fuse holder's memory to the next, and the
	// container's later imports read on with them. Kubelet does not pull
	// an image it has again, so nothing else would bring them back.
	if err := env.RestartDaemon(ctx); err != nil {
		t.Fatal(err)
	}
	checkServedBy(t, proxySock, "lazycas")
	// Python's start read /usr/lib and /etc, not /usr/share.
	lazyRead(ctx, t, env, cri, ctrID, "/usr/share/zoneinfo")
	if err := env.KillDaemon(); err != nil {
		t.Fatal(err)
	}
	// Kubelet must reach an image service while no daemon runs (it asks
	// one before it starts any container, the daemon's own included): the
	// holder points the endpoint at containerd once the daemon is gone.
	deadline = time.Now().Add(15 * time.Second)
	for !isSymlink(proxySock) {
		if time.Now().After(deadline) {
			t.Fatalf("15 s after the daemon was killed, %s is still not the fallback to containerd", proxySock)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := cri.try(ctx, "images", "-q"); err != nil || !strings.Contains(out, "sha256:") {
		t.Errorf("kubelet's image service endpoint does not answer while the daemon is down: %v %q", err, out)
	}
	if err := env.StartDaemonAgain(ctx); err != nil {
		t.Fatal(err)
	}
	checkServedBy(t, proxySock, "lazycas")
	lazyRead(ctx, t, env, cri, ctrID, "/usr /etc /var")
	// The third daemon pulled nothing: what it has came from the holder.
	_, fams := scrapeMetrics(ctx, t, metrics)
	if f := fams["lazycas_cri_credential_repositories"]; f == nil || len(f.Metric) != 1 || f.Metric[0].GetGauge().GetValue() != 2 {
		t.Errorf("lazycas_cri_credential_repositories after two restarts: %v, want 2 (python and pause)", f)
	}
	if f := fams["lazycas_cri_pulls_total"]; f == nil {
		t.Error("no lazycas_cri_pulls_total in the scrape")
	}

	cri.run(ctx, "stop", ctrID)
	cri.run(ctx, "rm", ctrID)
	cri.run(ctx, "stopp", podID)
	cri.run(ctx, "rmp", podID)

	// Never logged, never on disk: the daemon's log and every file under
	// its root (databases, store, snapshots) are searched for the password.
	// The password as such, and as it travels in a basic Authorization
	// header (a logged request would show that form).
	secrets := [][]byte{[]byte(auth.Password), []byte(base64.StdEncoding.EncodeToString([]byte(auth.User + ":" + auth.Password)))}
	holds := func(data []byte) bool {
		return slices.ContainsFunc(secrets, func(s []byte) bool { return bytes.Contains(data, s) })
	}
	logs, err := os.ReadFile(filepath.Join(env.Dir, "lazycas.log"))
	if err != nil {
		t.Fatal(err)
	}
	if holds(logs) {
		t.Error("the daemon's log holds the registry password")
	}
	var files int
	err = filepath.WalkDir(env.DaemonRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil // mounts and sockets of a live daemon come and go
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		files++
		if holds(data) {
			t.Errorf("%s holds the registry password", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("searched the daemon's log and %d files under its root for the password", files)
}

// lazyRead reads every file under dir (directories, separated by spaces)
// in the container and checks that
// some were fetched, that is, read lazily from the registry.
func lazyRead(ctx context.Context, t *testing.T, env *testenv.Env, cri crictl, ctrID, dir string) {
	t.Helper()
	before, err := env.DaemonStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cri.try(ctx, "exec", ctrID, "sh", "-c", "find "+dir+" -type f -exec cat {} + >/dev/null"); err != nil {
		t.Fatalf("%v\n%s", err, env.LogTail(30))
	}
	after, err := env.DaemonStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	fetched := after.Store.FetchedFiles - before.Store.FetchedFiles
	t.Logf("reading every file under %s fetched %d files", dir, fetched)
	if fetched == 0 {
		t.Errorf("reading %s read nothing lazily: the credentials were not needed", dir)
	}
}

func isSymlink(p string) bool {
	fi, err := os.Lstat(p)
	return err == nil && fi.Mode()&os.ModeSymlink != 0
}

// checkServedBy checks that the image service endpoint is lazycas's own
// socket, not the fallback to containerd.
func checkServedBy(t *testing.T, sock, who string) {
	t.Helper()
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("%s is %s, not %s's socket", sock, fi.Mode(), who)
	}
}
