package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// criConfig2Bootstrap is criConfig2 with the runtime handler of
// script/deploy/README.md: pods under the RuntimeClass "overlayfs" get
// their images and snapshots from containerd's overlayfs snapshotter;
// every other pod from lazycas.
const criConfig2Bootstrap = criConfig2 + `
[plugins."io.containerd.cri.v1.images".runtime_platforms.overlayfs]
  snapshotter = "overlayfs"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.overlayfs]
  runtime_type = "io.containerd.runc.v2"
  snapshotter = "overlayfs"
`

// TestDeploy runs the image `make image` builds, with the mounts,
// privileges, devices, args and environment script/deploy declares, as the
// snapshotter of a containerd whose CRI snapshotter is lazycas, and drives
// that containerd with crictl: a lazy pull (layers mounted on the host
// through the Bidirectional root), a pod, logs, exec. Then the daemon's pod
// is replaced, as a rollout replaces it, while a container reads files it
// never read before: the reads go on, the new daemon takes the mounts over
// from the holder, the snapshots stay served.
//
// On containerd 2.x the DaemonSets' pods run through CRI itself, as
// kubelet would run them, under the RuntimeClass of the manifests: the
// bootstrap is under test too (lazycas's image is pulled and its pods
// start, the second one included, while no lazycas serves). containerd 1.6
// has no per-runtime snapshotter (the manifests are not for it): there the
// pods' containers are made with containerd's client, on overlayfs.
func TestDeploy(t *testing.T) {
	t.Run("containerd 1.6", func(t *testing.T) { testDeploy(t, false) })
	t.Run("containerd 2.x", func(t *testing.T) { testDeploy(t, true) })
}

func testDeploy(t *testing.T, containerd2 bool) {
	requireIntegration(t)
	ctx := testContext(t)
	d := loadDeployManifests(t)
	crictlBin := criTools(ctx, t, containerd2)
	imageTar := buildDeployImage(ctx, t, d.daemon.Spec.Template.Spec.Containers[0].Image)

	criHosts := filepath.Join(t.TempDir(), "cri-hosts.d")
	env := newEnvWith(t, testenv.Options{NoDaemon: true, Containerd2: containerd2, CRIConfig: func(e *testenv.Env) string {
		if containerd2 {
			return fmt.Sprintf(criConfig2Bootstrap, e.RegistryHost+"/pause:latest", criHosts)
		}
		return fmt.Sprintf(criConfig, e.RegistryHost+"/pause:latest", criHosts)
	}})
	writeHostsToml(t, criHosts, env.RegistryHost, env.RegistryHost)
	// Before the environment's Close (cleanups run last first): the
	// containers on lazycas go while it still serves their snapshots.
	t.Cleanup(func() { removeDeployContainers(t, env) })
	if _, err := env.PushImage(ctx, testimages.Pause); err != nil {
		t.Fatal(err)
	}
	cri := crictl{t: t, bin: crictlBin, sock: env.ContainerdAddress}
	node := &deployNode{t: t, env: env, manifests: d, dir: t.TempDir(), hostPaths: map[string]string{
		// The host paths of the manifests, in the environment's private
		// directories; nothing of the host's own /var/lib or /run is touched.
		d.config.Root:                             env.DaemonRoot,
		filepath.Dir(d.config.Address):            env.DaemonSocketDir(),
		filepath.Dir(d.config.Containerd.Address): env.RunDir,
		d.config.Remote.ConfigPath:                env.HostsDir,
		"/dev/fuse":                               "/dev/fuse",
	}}
	// Every image call goes where kubelet's do: the image service
	// endpoint of the ConfigMap's [cri]. At boot it is the node's
	// tmpfiles.d symlink to containerd (script/systemd/lazycas.tmpfiles);
	// lazycas takes it over while it runs.
	criSock := node.relocate(d.config.CRI.ImageServiceAddress)
	if err := os.MkdirAll(filepath.Dir(criSock), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(env.ContainerdAddress, criSock); err != nil {
		t.Fatal(err)
	}
	cri.image = criSock
	var pods podRunner
	if containerd2 {
		pods = newCRIPods(ctx, node, cri, imageTar, criHosts)
	} else {
		pods = newClientPods(ctx, node, imageTar)
	}
	holder := pods.start(ctx, d.holder, "lazycas-fuse-holder")
	daemon := pods.start(ctx, d.daemon, "lazycas")
	node.waitHealthy(ctx, pods, daemon)
	t.Logf("holder and daemon pods up; the daemon's liveness probe passes")

	ref := convertPython(ctx, t, env, convert.EStargz, testenv.PythonStartupFiles)
	start := time.Now()
	checkServedBy(t, criSock, "lazycas")
	cri.run(ctx, "pull", ref)
	mounts := lazyMounts(t, env)
	t.Logf("crictl pull took %s; %d layers mounted lazily, seen on the host", time.Since(start).Round(time.Millisecond), len(mounts))
	if len(mounts) == 0 {
		t.Fatal("crictl pull mounted no layer lazily on the host: the daemon's mounts did not propagate")
	}

	// A reader: every file under python's library, one at a time, most
	// never fetched yet, across the daemon's replacement.
	dir := t.TempDir()
	podCfg := writeJSON(t, dir, "pod.json", map[string]any{
		"metadata":      map[string]any{"name": "lazy", "namespace": "default", "uid": testenv.UniqueID("uid")},
		"log_directory": filepath.Join(dir, "logs"),
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
	})
	ctrCfg := writeJSON(t, dir, "container.json", map[string]any{
		"metadata": map[string]any{"name": "reader"},
		"image":    map[string]any{"image": ref},
		"command":  []string{"python3", "-c", deployReader},
		"log_path": "reader.log",
		"linux":    map[string]any{},
	})
	podID := cri.run(ctx, "runp", podCfg)
	ctrID := cri.run(ctx, "create", podID, ctrCfg, podCfg)
	cri.run(ctx, "start", ctrID)
	waitCRILog(ctx, t, cri, ctrID, "read 50", 2*time.Minute)
	if out := cri.run(ctx, "exec", ctrID, "python3", "-c", "import email; print(len(open('/usr/lib/python3.11/os.py').read()) > 0)"); out != "True" {
		t.Errorf("crictl exec in the lazy container printed %q", out)
	}
	node.logRSS(ctx, pods, holder, daemon)

	// A rollout of the daemon: the old pod stops (SIGTERM, its grace
	// period), then the new one starts and takes the mounts over from the
	// holder.
	before := lastLine(cri.run(ctx, "logs", ctrID))
	if strings.HasPrefix(before, "done") {
		t.Fatalf("the reader finished before the daemon was replaced (%q): the test proves nothing", before)
	}
	start = time.Now()
	if code := pods.stop(ctx, daemon, d.daemon); code != 0 {
		t.Errorf("the daemon exited %d on SIGTERM:\n%s", code, pods.log(ctx, daemon))
	}
	t.Logf("the daemon's pod stopped in %s", time.Since(start).Round(time.Millisecond))
	// Kubelet asks the image service before it makes the new pod: with
	// no daemon, the endpoint is containerd's again.
	if !isSymlink(criSock) {
		t.Errorf("with the daemon stopped, %s is not the fallback to containerd", criSock)
	}
	cri.run(ctx, "images")
	// Through CRI, the new pod's sandbox and container are made while no
	// daemon runs: they come from overlayfs (the RuntimeClass), or runp
	// and create would fail here.
	daemon = pods.start(ctx, d.daemon, "lazycas-2")
	node.waitHealthy(ctx, pods, daemon)
	t.Logf("a new daemon pod serves %s after the old one was stopped", time.Since(start).Round(time.Millisecond))
	checkServedBy(t, criSock, "lazycas")
	// The new daemon took the old one's mounts from the holder, across
	// pods (and pid namespaces), rather than mounting anew.
	if log := pods.log(ctx, daemon); !strings.Contains(log, "took over the mounts of the last daemon") {
		t.Errorf("the new daemon did not take the mounts over from the holder:\n%s", tail(log, 8000))
	}
	logs := waitCRILog(ctx, t, cri, ctrID, "done", 3*time.Minute)
	if strings.Contains(logs, "ERROR") {
		t.Errorf("the reader failed across the daemon's replacement:\n%s", logs)
	}
	t.Logf("reader: %q when the daemon was stopped, %q at the end", before, lastLine(logs))
	if out := cri.run(ctx, "exec", ctrID, "python3", "-c", "import json, http.client; print('served')"); out != "served" {
		t.Errorf("crictl exec after the replacement printed %q", out)
	}
	if n := len(lazyMounts(t, env)); n != len(mounts) {
		t.Errorf("%d lazy mounts after the replacement, %d before", n, len(mounts))
	}
	node.logRSS(ctx, pods, holder, daemon)

	cri.run(ctx, "stop", ctrID)
	cri.run(ctx, "rm", ctrID)
	cri.run(ctx, "stopp", podID)
	cri.run(ctx, "rmp", podID)
	cri.run(ctx, "rmi", ref)
	deadline := time.Now().Add(time.Minute)
	for len(lazyMounts(t, env)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("a minute after crictl rmi, lazy mounts remain: %v", lazyMounts(t, env))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Log("pod removed, image removed: every lazy mount gone, unmounted by the second daemon")
}

// deployReader reads every file under python's library once, in order,
// slowly enough to span the daemon's replacement, and reports errors.
const deployReader = `
import os, sys, time
files = sorted(os.path.join(d, f) for d, _, fs in os.walk('/usr/lib/python3.11') for f in fs)
n = 0
for p in files:
    try:
        with open(p, 'rb') as fh:
            fh.read()
        n += 1
    except Exception as e:
        print('ERROR', p, e, flush=True)
    if n % 50 == 0:
        print('read', n, 'of', len(files), flush=True)
    time.sleep(0.02)
print('done', n, 'of', len(files), flush=True)
time.sleep(600)
`

// waitCRILog waits until the container's log contains want, and returns it.
func waitCRILog(ctx context.Context, t *testing.T, cri crictl, id, want string, limit time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		logs := cri.run(ctx, "logs", id)
		if strings.Contains(logs, want) {
			return logs
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the container's log after %s:\n%s", want, limit, logs)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func writeJSON(t *testing.T, dir, name string, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// buildDeployImage builds the daemon's image as `make image` does (static
// binaries, script/image) with the manifests' image name, and returns the
// archive.
func buildDeployImage(ctx context.Context, t *testing.T, tag string) string {
	t.Helper()
	dir := t.TempDir()
	start := time.Now()
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-X main.version=deploy-test",
		"-o", dir+"/", "./cmd/containerd-lazycas-grpc", "./cmd/lazycas")
	build.Dir = ".."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build static binaries: %v\n%s", err, out)
	}
	archive := filepath.Join(dir, "lazycas-image.tar")
	img := exec.CommandContext(ctx, "go", "run", "./script/image", "-version", "deploy-test", "-tag", tag,
		"-daemon", filepath.Join(dir, "containerd-lazycas-grpc"), "-cli", filepath.Join(dir, "lazycas"), "-out", archive)
	img.Dir = ".."
	out, err := img.CombinedOutput()
	if err != nil {
		t.Fatalf("script/image: %v\n%s", err, out)
	}
	t.Logf("built the image in %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(string(out)))
	return archive
}

// removeDeployContainers deletes every container of the test's
// namespaces, those on lazycas first, while lazycas's own still run.
func removeDeployContainers(t *testing.T, env *testenv.Env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	type entry struct {
		ctx  context.Context
		c    client.Container
		lazy bool
	}
	var all []entry
	for _, ns := range []string{"k8s.io", deployNamespace} {
		nctx := namespaces.WithNamespace(ctx, ns)
		cs, err := env.Client.Containers(nctx)
		if err != nil {
			t.Errorf("list containers in %s: %v", ns, err)
			continue
		}
		for _, c := range cs {
			info, err := c.Info(nctx)
			all = append(all, entry{nctx, c, err == nil && info.Snapshotter == testenv.Snapshotter})
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].lazy && !all[j].lazy })
	for _, e := range all {
		// A shim that exits while its task is deleted closes the
		// connection under the call ("ttrpc: closed"): ask again, a
		// bounded number of times, until the task is gone.
		for attempt := 0; ; attempt++ {
			task, err := e.c.Task(e.ctx, nil)
			if err != nil {
				break
			}
			_, err = task.Delete(e.ctx, client.WithProcessKill)
			if err == nil || errdefs.IsNotFound(err) {
				break
			}
			if attempt == 4 {
				t.Errorf("delete task %s: %v", e.c.ID(), err)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err := e.c.Delete(e.ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("delete container %s: %v", e.c.ID(), err)
		}
	}
}

// rssOf is the VmRSS and VmHWM lines of pid's status.
func rssOf(pid int) string {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") || strings.HasPrefix(line, "VmHWM:") {
			out = append(out, strings.Join(strings.Fields(line), " "))
		}
	}
	return strings.Join(out, ", ")
}
