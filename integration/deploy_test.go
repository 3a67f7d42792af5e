package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// deployNamespace is the containerd namespace the DaemonSets' containers
// run in: apart from CRI's k8s.io, as a node's own services would be.
const deployNamespace = "lazycas-system"

// TestDeploy runs the image `make image` builds, with the mounts,
// privileges, devices, args and environment script/deploy declares, as the
// daemon of a containerd whose CRI snapshotter is lazycas, and drives that
// containerd with crictl: a lazy pull (layers mounted on the host through
// the Bidirectional root), a pod, logs, exec. Then the daemon's container
// is replaced, as a rollout replaces its pod, while a container reads files
// it never read before: the reads go on and the snapshots stay served.
func TestDeploy(t *testing.T) {
	t.Run("containerd 1.6", func(t *testing.T) { testDeploy(t, false) })
	t.Run("containerd 2.x", func(t *testing.T) { testDeploy(t, true) })
}

func testDeploy(t *testing.T, containerd2 bool) {
	requireIntegration(t)
	ctx := testContext(t)
	d := loadDeployManifests(t)
	crictlBin, err := testenv.BuildCrictl(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if containerd2 {
		if _, err := testenv.BuildContainerd2(ctx, t.Logf); errors.Is(err, testenv.ErrContainerd2Offline) {
			t.Skip(err)
		}
	}
	imageTar := buildDeployImage(ctx, t, d.daemon.Spec.Template.Spec.Containers[0].Image)

	criHosts := filepath.Join(t.TempDir(), "cri-hosts.d")
	env := newEnvWith(t, testenv.Options{NoDaemon: true, Containerd2: containerd2, CRIConfig: func(e *testenv.Env) string {
		if containerd2 {
			return fmt.Sprintf(criConfig2, e.RegistryHost+"/pause:latest", criHosts)
		}
		return fmt.Sprintf(criConfig, e.RegistryHost+"/pause:latest", criHosts)
	}})
	writeCRIHosts(t, criHosts, env.RegistryHost)
	dctx := namespaces.WithNamespace(ctx, deployNamespace)
	// Before the environment's Close (cleanups run last first): CRI's
	// containers go while lazycas still serves their snapshots, then
	// lazycas's own.
	t.Cleanup(func() { removeDeployContainers(t, env) })

	// The operator's path: ctr imports the archive, unpacking it into
	// overlayfs (the snapshotter the manifests' RuntimeClass names).
	start := time.Now()
	if out, err := exec.CommandContext(ctx, "ctr", "--address", env.ContainerdAddress, "--namespace", deployNamespace,
		"images", "import", "--snapshotter", "overlayfs", imageTar).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import %s: %v\n%s", imageTar, err, out)
	}
	named, err := reference.ParseNormalizedNamed(d.daemon.Spec.Template.Spec.Containers[0].Image)
	if err != nil {
		t.Fatal(err)
	}
	img, err := env.Client.GetImage(dctx, named.String())
	if err != nil {
		t.Fatalf("the imported image is not %s: %v", named, err)
	}
	t.Logf("ctr imported %s in %s", named, time.Since(start).Round(time.Millisecond))

	// The host paths of the manifests, in the environment's private
	// directories; nothing of the host's own /var/lib or /run is touched.
	hostPaths := map[string]string{
		d.config.Root:                             env.DaemonRoot,
		filepath.Dir(d.config.Address):            env.DaemonSocketDir(),
		filepath.Dir(d.config.Containerd.Address): env.RunDir,
		d.config.Remote.ConfigPath:                env.HostsDir,
		"/dev/fuse":                               "/dev/fuse",
	}
	pods := &deployPods{t: t, env: env, img: img, manifests: d, hostPaths: hostPaths, logDir: t.TempDir()}
	holder := pods.start(dctx, d.holder, "lazycas-fuse-holder")
	daemon := pods.start(dctx, d.daemon, "lazycas")
	pods.waitHealthy(dctx, daemon)
	t.Logf("holder and daemon containers up; the daemon's liveness probe passes")

	if _, err := env.PushImage(ctx, testimages.Pause); err != nil {
		t.Fatal(err)
	}
	ref := convertPython(ctx, t, env, convert.EStargz, testenv.PythonStartupFiles)
	cri := crictl{t: t, bin: crictlBin, sock: env.ContainerdAddress}
	start = time.Now()
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
	pods.logRSS(holder, daemon)

	// A rollout of the daemon: the old pod stops (SIGTERM, the grace
	// period), then the new one starts and takes the mounts over from the
	// holder.
	before := lastLine(cri.run(ctx, "logs", ctrID))
	if strings.HasPrefix(before, "done") {
		t.Fatalf("the reader finished before the daemon was replaced (%q): the test proves nothing", before)
	}
	start = time.Now()
	pods.stop(dctx, daemon, d.daemon)
	t.Logf("the daemon's container stopped in %s", time.Since(start).Round(time.Millisecond))
	daemon = pods.start(dctx, d.daemon, "lazycas-2")
	pods.waitHealthy(dctx, daemon)
	t.Logf("a new daemon container serves %s after the old one stopped", time.Since(start).Round(time.Millisecond))
	// The new daemon took the old one's mounts from the holder, across
	// containers (and pid namespaces), rather than mounting anew.
	if log := pods.fullLog("lazycas-2"); !strings.Contains(log, "took over the mounts of the last daemon") {
		t.Errorf("the new daemon did not take the mounts over from the holder:\n%s", pods.log("lazycas-2"))
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
	pods.logRSS(holder, daemon)

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

// writeCRIHosts gives containerd's CRI a hosts.toml for the plain-HTTP
// registry at host.
func writeCRIHosts(t *testing.T, dir, host string) {
	t.Helper()
	hostDir := filepath.Join(dir, host)
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	hostsToml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n",
		"http://"+host, "http://"+host)
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// removeDeployContainers deletes CRI's containers, then the DaemonSets'.
func removeDeployContainers(t *testing.T, env *testenv.Env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, ns := range []string{"k8s.io", deployNamespace} {
		nctx := namespaces.WithNamespace(ctx, ns)
		cs, err := env.Client.Containers(nctx)
		if err != nil {
			t.Errorf("list containers in %s: %v", ns, err)
			continue
		}
		for _, c := range cs {
			if task, err := c.Task(nctx, nil); err == nil {
				if _, err := task.Delete(nctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
					t.Errorf("delete task %s: %v", c.ID(), err)
				}
			}
			if err := c.Delete(nctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
				t.Errorf("delete container %s: %v", c.ID(), err)
			}
		}
	}
}

// deployPods runs the manifests' pods as containerd containers.
type deployPods struct {
	t         *testing.T
	env       *testenv.Env
	img       client.Image
	manifests *deployManifests
	// hostPaths maps each host path the manifests name to its place in
	// the environment.
	hostPaths map[string]string
	logDir    string
}

// relocate maps a path under one of the manifests' host paths to its place
// in the environment.
func (p *deployPods) relocate(path string) string {
	for from, to := range p.hostPaths {
		if path == from {
			return to
		}
		if rest, ok := strings.CutPrefix(path, from+"/"); ok {
			return filepath.Join(to, rest)
		}
	}
	return path
}

// spec is the OCI spec of ds's container, as a kubelet and CRI would make
// it from the manifest: the image's config, the command and env, the
// security context, host namespaces, and the volumes as rbind mounts with
// the declared propagation. Every host path P is mounted at
// relocate(P) rather than at P: the manifests mount each host path at its
// own path (TestDeployManifests checks), which is what lets containerd on
// the host and the daemon in its container name the same files, and the
// environment keeps that true in its private directories. The same
// relocation applies to the paths in the args and in the config.
func (p *deployPods) spec(ds *k8sObject) []oci.SpecOpts {
	t := p.t
	pod := ds.Spec.Template.Spec
	c := pod.Containers[0]
	args := append(slices.Clone(c.Command), c.Args...)
	for i := range args {
		args[i] = p.relocate(args[i])
	}
	opts := []oci.SpecOpts{oci.WithImageConfig(p.img), oci.WithProcessArgs(args...)}
	var env []string
	for _, e := range c.Env {
		env = append(env, e.Name+"="+e.Value)
	}
	if len(env) > 0 {
		opts = append(opts, oci.WithEnv(env))
	}
	sc := c.SecurityContext
	if sc.Privileged != nil && *sc.Privileged {
		opts = append(opts, oci.WithPrivileged, oci.WithAllDevicesAllowed, oci.WithHostDevices)
	} else if slices.Contains(sc.Capabilities.Drop, "ALL") {
		opts = append(opts, oci.WithCapabilities(sc.Capabilities.Add))
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		opts = append(opts, oci.WithNoNewPrivileges)
	}
	if sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		opts = append(opts, oci.WithRootFSReadonly())
	}
	if pod.HostNetwork {
		opts = append(opts, oci.WithHostNamespace(specs.NetworkNamespace), oci.WithHostHostsFile, oci.WithHostResolvconf)
	}
	if pod.HostPID {
		opts = append(opts, oci.WithHostNamespace(specs.PIDNamespace))
	}
	var mounts []specs.Mount
	rootfsPropagation := ""
	for _, m := range c.VolumeMounts {
		v, ok := pod.volume(m.Name)
		if !ok {
			t.Fatalf("%s: no volume %s", ds.Metadata.Name, m.Name)
		}
		var src, dst string
		switch {
		case v.HostPath != nil:
			to, ok := p.hostPaths[v.HostPath.Path]
			if !ok {
				t.Fatalf("%s: host path %s has no place in the test environment", ds.Metadata.Name, v.HostPath.Path)
			}
			src, dst = to, p.relocate(m.MountPath)
			if v.HostPath.Type == "DirectoryOrCreate" {
				if err := os.MkdirAll(src, 0o755); err != nil {
					t.Fatal(err)
				}
			}
		case v.ConfigMap != nil:
			src, dst = p.configMapDir(v.ConfigMap.Name), m.MountPath
		default:
			t.Fatalf("%s: volume %s is neither a host path nor a ConfigMap", ds.Metadata.Name, m.Name)
		}
		options := []string{"rbind"}
		switch m.MountPropagation {
		case "Bidirectional":
			options = append(options, "rshared")
			rootfsPropagation = "rshared"
		case "HostToContainer":
			options = append(options, "rslave")
			if rootfsPropagation == "" {
				rootfsPropagation = "rslave"
			}
		case "", "None":
			options = append(options, "rprivate")
		default:
			t.Fatalf("%s: mount propagation %q", ds.Metadata.Name, m.MountPropagation)
		}
		if m.ReadOnly {
			options = append(options, "ro")
		}
		mounts = append(mounts, specs.Mount{Type: "bind", Source: src, Destination: dst, Options: options})
	}
	// Parents before children, as the kubelet orders them.
	slices.SortStableFunc(mounts, func(a, b specs.Mount) int {
		return strings.Count(a.Destination, "/") - strings.Count(b.Destination, "/")
	})
	opts = append(opts, oci.WithMounts(mounts))
	if rootfsPropagation != "" {
		opts = append(opts, func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.RootfsPropagation = rootfsPropagation
			return nil
		})
	}
	return opts
}

// configMapDir writes the ConfigMap's files, relocated like the args.
func (p *deployPods) configMapDir(name string) string {
	p.t.Helper()
	if name != "lazycas-config" {
		p.t.Fatalf("unknown ConfigMap %s", name)
	}
	dir := filepath.Join(p.logDir, "configmap-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		p.t.Fatal(err)
	}
	content := p.manifests.configTOML
	for from, to := range p.hostPaths {
		content = strings.ReplaceAll(content, `"`+from+`"`, `"`+to+`"`)
		content = strings.ReplaceAll(content, `"`+from+`/`, `"`+to+`/`)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(content), 0o644); err != nil {
		p.t.Fatal(err)
	}
	return dir
}

// start creates and starts ds's container as id, logging to a file.
func (p *deployPods) start(ctx context.Context, ds *k8sObject, id string) client.Task {
	t := p.t
	t.Helper()
	c, err := p.env.Client.NewContainer(ctx, id,
		client.WithImage(p.img),
		client.WithSnapshotter("overlayfs"),
		client.WithNewSnapshot(id+"-rootfs", p.img),
		client.WithRuntime(testenv.Runtime, nil),
		client.WithNewSpec(p.spec(ds)...))
	if err != nil {
		t.Fatalf("create container %s for %s: %v", id, ds.Metadata.Name, err)
	}
	task, err := c.NewTask(ctx, cio.LogFile(filepath.Join(p.logDir, id+".log")))
	if err != nil {
		t.Fatalf("create task %s: %v", id, err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatalf("start %s: %v\n%s", id, err, p.log(id))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s's log:\n%s", id, p.log(id))
		}
	})
	return task
}

// log is the tail of container id's log.
func (p *deployPods) log(id string) string {
	b := p.fullLog(id)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return b
}

func (p *deployPods) fullLog(id string) string {
	b, _ := os.ReadFile(filepath.Join(p.logDir, id+".log"))
	return string(b)
}

// waitHealthy runs the daemon's liveness probe in its container until it
// passes: the probe itself is under test.
func (p *deployPods) waitHealthy(ctx context.Context, task client.Task) {
	t := p.t
	t.Helper()
	probe := p.manifests.daemon.Spec.Template.Spec.Containers[0].LivenessProbe.Exec.Command
	for i := range probe {
		probe[i] = p.relocate(probe[i])
	}
	deadline := time.Now().Add(time.Minute)
	var last string
	for attempt := 0; ; attempt++ {
		code, out := p.exec(ctx, task, probe, fmt.Sprintf("probe-%d", attempt))
		if code == 0 {
			return
		}
		last = fmt.Sprintf("exit %d: %s", code, out)
		if time.Now().After(deadline) {
			t.Fatalf("the liveness probe %q never passed in a minute; last: %s\n%s", probe, last, p.log(task.ID()))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// exec runs args in task's container and returns the exit code and output.
func (p *deployPods) exec(ctx context.Context, task client.Task, args []string, id string) (uint32, string) {
	t := p.t
	t.Helper()
	spec, err := task.Spec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pspec := *spec.Process
	pspec.Args = args
	pspec.Terminal = false
	out := filepath.Join(p.logDir, task.ID()+"-"+id+".out")
	proc, err := task.Exec(ctx, id, &pspec, cio.LogFile(out))
	if err != nil {
		t.Fatalf("exec %q: %v", args, err)
	}
	defer proc.Delete(ctx) //nolint:errcheck
	wait, err := proc.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Start(ctx); err != nil {
		t.Fatalf("exec %q: %v", args, err)
	}
	ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var code uint32
	select {
	case st := <-wait:
		code = st.ExitCode()
	case <-ectx.Done():
		_ = proc.Kill(ctx, syscall.SIGKILL)
		st := <-wait
		code = st.ExitCode()
	}
	b, _ := os.ReadFile(out)
	return code, strings.TrimSpace(string(b))
}

// stop stops task as the kubelet stops a pod: SIGTERM, SIGKILL after the
// grace period, then deletes the container.
func (p *deployPods) stop(ctx context.Context, task client.Task, ds *k8sObject) {
	t := p.t
	t.Helper()
	grace := 30 * time.Second
	if g := ds.Spec.Template.Spec.TerminationGracePeriodSeconds; g != nil {
		grace = time.Duration(*g) * time.Second
	}
	wait, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Kill(ctx, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case st := <-wait:
		if st.ExitCode() != 0 {
			t.Errorf("%s exited %d on SIGTERM:\n%s", task.ID(), st.ExitCode(), p.log(task.ID()))
		}
	case <-time.After(grace):
		t.Errorf("%s did not stop within its grace period of %s: SIGKILL", task.ID(), grace)
		_ = task.Kill(ctx, syscall.SIGKILL)
		<-wait
	}
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := p.env.Client.LoadContainer(ctx, task.ID())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
}

// logRSS logs the resident memory of the containers' processes, the
// figure the manifests' memory requests come from.
func (p *deployPods) logRSS(tasks ...client.Task) {
	for _, task := range tasks {
		status, err := os.ReadFile("/proc/" + strconv.Itoa(int(task.Pid())) + "/status")
		if err != nil {
			p.t.Logf("RSS of %s: %v", task.ID(), err)
			continue
		}
		for _, line := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(line, "VmRSS:") || strings.HasPrefix(line, "VmHWM:") {
				p.t.Logf("%s (pid %d) %s", task.ID(), task.Pid(), strings.Join(strings.Fields(line), " "))
			}
		}
	}
}
