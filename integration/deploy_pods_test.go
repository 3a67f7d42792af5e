package integration

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/lazycas/lazycas/integration/testenv"
)

// deployNamespace is the containerd namespace of the DaemonSets' containers
// when they are made with containerd's client: apart from CRI's k8s.io, as
// a node's own services would be.
const deployNamespace = "lazycas-system"

// podRunner runs the pods of the manifests' DaemonSets on the test's node,
// one container each; a pod is named by its container's id.
type podRunner interface {
	// start runs ds's pod anew, as name.
	start(ctx context.Context, ds *k8sObject, name string) string
	// exec runs args in the pod's container: exit code and output.
	exec(ctx context.Context, id string, args []string) (int, string)
	// stop deletes the pod as kubelet does: SIGTERM, SIGKILL after the
	// grace period; returns the container's exit code.
	stop(ctx context.Context, id string, ds *k8sObject) int
	// pid is the container's process on the host.
	pid(ctx context.Context, id string) int
	// log is the container's output.
	log(ctx context.Context, id string) string
}

// deployNode is the test's node: the environment, the manifests, and the
// place of each of their host paths in the environment.
type deployNode struct {
	t         *testing.T
	env       *testenv.Env
	manifests *deployManifests
	hostPaths map[string]string
	dir       string
}

// relocate maps a path under one of the manifests' host paths to its place
// in the environment. The manifests mount every host path at its own path
// (TestDeployManifests checks): that is what lets containerd on the host
// and the daemon in its pod name the same files. The test keeps it true in
// the environment's private directories by mounting host path P at
// relocate(P), and by applying the same relocation to the paths in the
// args, the probes and the config; everything else is as declared.
func (n *deployNode) relocate(path string) string {
	for from, to := range n.hostPaths {
		if path == from {
			return to
		}
		if rest, ok := strings.CutPrefix(path, from+"/"); ok {
			return filepath.Join(to, rest)
		}
	}
	return path
}

func (n *deployNode) relocateAll(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = n.relocate(a)
	}
	return out
}

// hostPath is where volume v of ds lives in the environment, created if
// its type asks for it.
func (n *deployNode) hostPath(ds *k8sObject, v k8sVolume) string {
	n.t.Helper()
	switch {
	case v.HostPath != nil:
		to, ok := n.hostPaths[v.HostPath.Path]
		if !ok {
			n.t.Fatalf("%s: host path %s has no place in the test environment", ds.Metadata.Name, v.HostPath.Path)
		}
		if v.HostPath.Type == "DirectoryOrCreate" {
			if err := os.MkdirAll(to, 0o755); err != nil {
				n.t.Fatal(err)
			}
		}
		return to
	case v.ConfigMap != nil:
		return n.configMapDir(v.ConfigMap.Name)
	}
	n.t.Fatalf("%s: volume %s is neither a host path nor a ConfigMap", ds.Metadata.Name, v.Name)
	return ""
}

// configMapDir writes the ConfigMap's files (as kubelet does), with the
// host paths in the config relocated.
func (n *deployNode) configMapDir(name string) string {
	n.t.Helper()
	if name != "lazycas-config" {
		n.t.Fatalf("unknown ConfigMap %s", name)
	}
	dir := filepath.Join(n.dir, "configmap-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		n.t.Fatal(err)
	}
	content := n.manifests.configTOML
	for from, to := range n.hostPaths {
		content = strings.ReplaceAll(content, `"`+from+`"`, `"`+to+`"`)
		content = strings.ReplaceAll(content, `"`+from+`/`, `"`+to+`/`)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(content), 0o644); err != nil {
		n.t.Fatal(err)
	}
	return dir
}

// waitHealthy runs the daemon's liveness probe in its pod until it passes:
// the probe itself is under test.
func (n *deployNode) waitHealthy(ctx context.Context, pods podRunner, id string) {
	t := n.t
	t.Helper()
	probe := n.relocateAll(n.manifests.daemon.Spec.Template.Spec.Containers[0].LivenessProbe.Exec.Command)
	deadline := time.Now().Add(time.Minute)
	for {
		code, out := pods.exec(ctx, id, probe)
		if code == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the liveness probe %q never passed in a minute; last: exit %d: %s\n%s", probe, code, out, tail(pods.log(ctx, id), 8000))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// logRSS logs the resident memory of the holder's and the daemon's
// processes, the figures the manifests' memory requests come from.
func (n *deployNode) logRSS(ctx context.Context, pods podRunner, holder, daemon string) {
	for _, c := range []struct{ what, id string }{{"holder", holder}, {"daemon", daemon}} {
		pid := pods.pid(ctx, c.id)
		n.t.Logf("%s (pid %d): %s", c.what, pid, rssOf(pid))
	}
}

// clientPods makes the pods' containers with containerd's client, in
// deployNamespace, on overlayfs: each container's OCI spec is what kubelet
// and CRI would make of the manifest.
type clientPods struct {
	*deployNode
	img   client.Image
	tasks map[string]client.Task
}

// newClientPods imports the image archive with ctr, the operator's path,
// unpacking it into overlayfs.
func newClientPods(ctx context.Context, n *deployNode, archive string) *clientPods {
	t := n.t
	t.Helper()
	start := time.Now()
	if out, err := exec.CommandContext(ctx, "ctr", "--address", n.env.ContainerdAddress, "--namespace", deployNamespace,
		"images", "import", "--snapshotter", "overlayfs", archive).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import %s: %v\n%s", archive, err, out)
	}
	named, err := reference.ParseNormalizedNamed(n.manifests.daemon.Spec.Template.Spec.Containers[0].Image)
	if err != nil {
		t.Fatal(err)
	}
	img, err := n.env.Client.GetImage(namespaces.WithNamespace(ctx, deployNamespace), named.String())
	if err != nil {
		t.Fatalf("the imported image is not %s: %v", named, err)
	}
	t.Logf("ctr imported %s in %s", named, time.Since(start).Round(time.Millisecond))
	return &clientPods{deployNode: n, img: img, tasks: map[string]client.Task{}}
}

func (p *clientPods) nsCtx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, deployNamespace)
}

// spec is the OCI spec of ds's container: the image's config, the command
// and env, the security context, host namespaces, and the volumes as rbind
// mounts with the declared propagation (and the rootfs propagation CRI
// sets for them).
func (p *clientPods) spec(ds *k8sObject) []oci.SpecOpts {
	t := p.t
	pod := ds.Spec.Template.Spec
	c := pod.Containers[0]
	opts := []oci.SpecOpts{oci.WithImageConfig(p.img), oci.WithProcessArgs(p.relocateAll(append(slices.Clone(c.Command), c.Args...))...)}
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
		mounts = append(mounts, specs.Mount{Type: "bind", Source: p.hostPath(ds, v), Destination: p.relocate(m.MountPath), Options: options})
	}
	// Parents before children, as kubelet orders them.
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

func (p *clientPods) start(ctx context.Context, ds *k8sObject, id string) string {
	t := p.t
	t.Helper()
	ctx = p.nsCtx(ctx)
	c, err := p.env.Client.NewContainer(ctx, id,
		client.WithImage(p.img),
		client.WithSnapshotter("overlayfs"),
		client.WithNewSnapshot(id+"-rootfs", p.img),
		client.WithRuntime(testenv.Runtime, nil),
		client.WithNewSpec(p.spec(ds)...))
	if err != nil {
		t.Fatalf("create container %s for %s: %v", id, ds.Metadata.Name, err)
	}
	task, err := c.NewTask(ctx, cio.LogFile(p.logPath(id)))
	if err != nil {
		t.Fatalf("create task %s: %v", id, err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatalf("start %s: %v\n%s", id, err, p.log(ctx, id))
	}
	p.tasks[id] = task
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s's log:\n%s", id, tail(p.log(ctx, id), 8000))
		}
	})
	return id
}

func (p *clientPods) logPath(id string) string { return filepath.Join(p.dir, id+".log") }

func (p *clientPods) log(_ context.Context, id string) string {
	b, _ := os.ReadFile(p.logPath(id))
	return string(b)
}

func (p *clientPods) pid(_ context.Context, id string) int { return int(p.tasks[id].Pid()) }

func (p *clientPods) exec(ctx context.Context, id string, args []string) (int, string) {
	t := p.t
	t.Helper()
	ctx = p.nsCtx(ctx)
	task := p.tasks[id]
	spec, err := task.Spec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pspec := *spec.Process
	pspec.Args = args
	pspec.Terminal = false
	execID := testenv.UniqueID("probe")
	out := filepath.Join(p.dir, execID+".out")
	proc, err := task.Exec(ctx, execID, &pspec, cio.LogFile(out))
	if err != nil {
		t.Fatalf("exec %q: %v", args, err)
	}
	defer proc.Delete(ctx) //nolint:errcheck // the task's end deletes it too
	wait, err := proc.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Start(ctx); err != nil {
		t.Fatalf("exec %q: %v", args, err)
	}
	var code uint32
	select {
	case st := <-wait:
		code = st.ExitCode()
	case <-time.After(30 * time.Second):
		_ = proc.Kill(ctx, syscall.SIGKILL)
		code = (<-wait).ExitCode()
	}
	b, _ := os.ReadFile(out)
	return int(code), strings.TrimSpace(string(b))
}

func (p *clientPods) stop(ctx context.Context, id string, ds *k8sObject) int {
	t := p.t
	t.Helper()
	ctx = p.nsCtx(ctx)
	task := p.tasks[id]
	wait, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Kill(ctx, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var code uint32
	select {
	case st := <-wait:
		code = st.ExitCode()
	case <-time.After(gracePeriod(ds)):
		t.Errorf("%s did not stop within its grace period of %s: SIGKILL", id, gracePeriod(ds))
		_ = task.Kill(ctx, syscall.SIGKILL)
		code = (<-wait).ExitCode()
	}
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := p.env.Client.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	return int(code)
}

func gracePeriod(ds *k8sObject) time.Duration {
	if g := ds.Spec.Template.Spec.TerminationGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	return 30 * time.Second // Kubernetes' default
}

// criPods runs the pods through containerd's CRI with crictl, making of
// the manifest what kubelet makes of it: a sandbox under the pod's runtime
// handler with its annotations, labels and host namespaces, and a
// container with its command, env, security context and mounts.
type criPods struct {
	*deployNode
	cri crictl
	// sandboxes maps a container id to its pod sandbox's; logs to its log
	// file (CRI's format: both streams, each line tagged).
	sandboxes, logs map[string]string
}

// newCRIPods pushes the image to the environment's registry as the
// docker.io repository its name means (a mirror for docker.io in CRI's
// hosts directory serves it), and pulls it through CRI with the holder's
// pod config, as kubelet pulls it: into overlayfs, while no lazycas runs.
func newCRIPods(ctx context.Context, n *deployNode, cri crictl, archive, criHosts string) *criPods {
	t := n.t
	t.Helper()
	image := n.manifests.daemon.Spec.Template.Spec.Containers[0].Image
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		t.Fatal(err)
	}
	domain := reference.Domain(named)
	pushRef := n.env.RegistryHost + strings.TrimPrefix(named.String(), domain)
	pushArchive(ctx, t, archive, pushRef)
	writeHostsToml(t, criHosts, domain, n.env.RegistryHost)

	p := &criPods{deployNode: n, cri: cri, sandboxes: map[string]string{}, logs: map[string]string{}}
	podCfg := p.podConfig(n.manifests.holder, "pull")
	start := time.Now()
	cri.run(ctx, "pull", "--pod-config", podCfg, image)
	img, err := n.env.Client.GetImage(namespaces.WithNamespace(ctx, "k8s.io"), named.String())
	if err != nil {
		t.Fatalf("crictl pull %s: the image is not in CRI's namespace: %v", image, err)
	}
	for _, sn := range []string{"overlayfs", testenv.Snapshotter} {
		unpacked, err := img.IsUnpacked(namespaces.WithNamespace(ctx, "k8s.io"), sn)
		if err != nil {
			t.Fatal(err)
		}
		if unpacked != (sn == "overlayfs") {
			t.Fatalf("lazycas's own image unpacked into %s: %v; want overlayfs only", sn, unpacked)
		}
	}
	t.Logf("crictl pulled %s into overlayfs through the RuntimeClass's annotation in %s", named, time.Since(start).Round(time.Millisecond))
	return p
}

// pushArchive pushes the OCI archive's one image to ref.
func pushArchive(ctx context.Context, t *testing.T, archive, ref string) {
	t.Helper()
	dir := t.TempDir()
	if err := untar(archive, dir); err != nil {
		t.Fatalf("unpack %s: %v", archive, err)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("%s: want one image, got %v (%v)", archive, im, err)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// untar extracts the regular files and directories of a tar into dir.
func untar(archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			return fmt.Errorf("entry %q escapes the archive", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, 0o755)
		case tar.TypeReg:
			var out *os.File
			if out, err = os.Create(p); err == nil {
				_, err = io.Copy(out, tr)
				err = errors.Join(err, out.Close())
			}
		}
		if err != nil {
			return err
		}
	}
}

// podConfig writes ds's pod sandbox config as kubelet makes it.
func (p *criPods) podConfig(ds *k8sObject, name string) string {
	pod := ds.Spec.Template.Spec
	privileged := false
	for _, c := range pod.Containers {
		privileged = privileged || (c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged)
	}
	return writeJSON(p.t, p.dir, name+"-pod.json", map[string]any{
		"metadata": map[string]any{"name": name, "namespace": ds.Metadata.Namespace,
			"uid": testenv.UniqueID("uid"), "attempt": 0},
		"labels":        ds.Spec.Template.Metadata.Labels,
		"annotations":   ds.Spec.Template.Metadata.Annotations,
		"log_directory": filepath.Join(p.dir, "pods", name),
		"linux": map[string]any{"security_context": map[string]any{
			"privileged":        privileged,
			"namespace_options": namespaceOptions(pod),
		}},
	})
}

// namespaceOptions are CRI's: NODE (2) for a host namespace, else POD (0)
// for the network and CONTAINER (1) for pids, as kubelet sets them.
func namespaceOptions(pod podSpec) map[string]any {
	network, pid := 0, 1
	if pod.HostNetwork {
		network = 2
	}
	if pod.HostPID {
		pid = 2
	}
	return map[string]any{"network": network, "pid": pid}
}

// containerConfig writes ds's container config as kubelet makes it.
func (p *criPods) containerConfig(ds *k8sObject, name string) string {
	t := p.t
	pod := ds.Spec.Template.Spec
	c := pod.Containers[0]
	var envs []map[string]string
	for _, e := range c.Env {
		envs = append(envs, map[string]string{"key": e.Name, "value": e.Value})
	}
	var mounts []map[string]any
	for _, m := range c.VolumeMounts {
		v, ok := pod.volume(m.Name)
		if !ok {
			t.Fatalf("%s: no volume %s", ds.Metadata.Name, m.Name)
		}
		propagation := map[string]int{"": 0, "None": 0, "HostToContainer": 1, "Bidirectional": 2}
		prop, ok := propagation[m.MountPropagation]
		if !ok {
			t.Fatalf("%s: mount propagation %q", ds.Metadata.Name, m.MountPropagation)
		}
		mounts = append(mounts, map[string]any{"container_path": p.relocate(m.MountPath), "host_path": p.hostPath(ds, v),
			"readonly": m.ReadOnly, "propagation": prop})
	}
	sc := c.SecurityContext
	security := map[string]any{
		"privileged":        sc.Privileged != nil && *sc.Privileged,
		"readonly_rootfs":   sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem,
		"no_new_privs":      sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation,
		"namespace_options": namespaceOptions(pod),
		"capabilities":      map[string]any{"add_capabilities": sc.Capabilities.Add, "drop_capabilities": sc.Capabilities.Drop},
	}
	return writeJSON(t, p.dir, name+"-container.json", map[string]any{
		"metadata": map[string]any{"name": c.Name},
		"image":    map[string]any{"image": c.Image},
		"command":  p.relocateAll(c.Command),
		"args":     p.relocateAll(c.Args),
		"envs":     envs,
		"mounts":   mounts,
		"log_path": c.Name + ".log",
		"linux":    map[string]any{"security_context": security},
	})
}

func (p *criPods) start(ctx context.Context, ds *k8sObject, name string) string {
	t := p.t
	t.Helper()
	podCfg := p.podConfig(ds, name)
	podID := p.cri.run(ctx, "runp", "--runtime", ds.Spec.Template.Spec.RuntimeClassName, podCfg)
	id := p.cri.run(ctx, "create", "--no-pull", podID, p.containerConfig(ds, name), podCfg)
	p.cri.run(ctx, "start", id)
	p.sandboxes[id] = podID
	p.logs[id] = filepath.Join(p.dir, "pods", name, ds.Spec.Template.Spec.Containers[0].Name+".log")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s's log:\n%s", name, tail(p.log(context.Background(), id), 8000))
		}
	})
	return id
}

func (p *criPods) exec(ctx context.Context, id string, args []string) (int, string) {
	out, err := p.cri.try(ctx, append([]string{"exec", id}, args...)...)
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), out
	}
	if err != nil {
		p.t.Fatal(err)
	}
	return 0, out
}

func (p *criPods) stop(ctx context.Context, id string, ds *k8sObject) int {
	grace := int(gracePeriod(ds) / time.Second)
	p.cri.run(ctx, "stop", "--timeout", fmt.Sprint(grace), id)
	var st struct {
		Status struct {
			ExitCode int `json:"exitCode"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(p.cri.run(ctx, "inspect", id)), &st); err != nil {
		p.t.Fatalf("crictl inspect %s: %v", id, err)
	}
	p.cri.run(ctx, "rm", id)
	p.cri.run(ctx, "stopp", p.sandboxes[id])
	p.cri.run(ctx, "rmp", p.sandboxes[id])
	return st.Status.ExitCode
}

func (p *criPods) pid(ctx context.Context, id string) int {
	var st struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(p.cri.run(ctx, "inspect", id)), &st); err != nil {
		p.t.Fatalf("crictl inspect %s: %v", id, err)
	}
	return st.Info.Pid
}

// log reads the container's log file: `crictl logs` splits the streams,
// and the daemon logs to stderr.
func (p *criPods) log(_ context.Context, id string) string {
	b, err := os.ReadFile(p.logs[id])
	if err != nil {
		return err.Error()
	}
	return string(b)
}
