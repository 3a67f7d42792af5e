package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazycas/lazycas/fs/convert"
	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

// criConfig is the CRI plugin's table for containerd 1.6: lazycas is the
// snapshotter, with the annotations a remote snapshotter needs; the
// environment's plain-HTTP registry is reached through a hosts directory;
// the sandbox image is the pause image the test pushes there. This
// machine's root may not lower an OOM score (no CAP_SYS_RESOURCE), which a
// pod's sandbox asks for: restrict_oom_score_adj keeps it at containerd's.
const criConfig = `[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazycas"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %q
`

// criConfig2 is criConfig for containerd 2.x, whose CRI is several
// plugins.
const criConfig2 = `[plugins."io.containerd.cri.v1.images"]
  snapshotter = "lazycas"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %q
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %[2]q
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`

// crictl runs crictl against the environment's containerd.
type crictl struct {
	t    *testing.T
	bin  string
	sock string
	// image is the image service's socket when it is not containerd's
	// (lazycas's CRI proxy).
	image string
}

func (c crictl) run(ctx context.Context, args ...string) string {
	c.t.Helper()
	out, err := c.try(ctx, args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// try runs crictl and returns its output, or an error with its stderr.
func (c crictl) try(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	image := c.image
	if image == "" {
		image = c.sock
	}
	all := append([]string{"--config", "/dev/null", "--runtime-endpoint", "unix://" + c.sock, "--image-endpoint", "unix://" + image, "--timeout", "2m"}, args...)
	cmd := exec.CommandContext(ctx, c.bin, all...)
	var stderr strings.Builder
	cmd.Stderr = &stderr // warnings, apart from the answer
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("crictl %s: %w\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

// TestCRIRunsALazyImage drives containerd's CRI plugin with crictl, as
// kubelet does: a lazy image is pulled (its layers mounted, not
// downloaded), runs in a pod, answers logs and exec, and goes away with
// its snapshots when the pod and the image are removed.
func TestCRIRunsALazyImage(t *testing.T) {
	t.Run("containerd 1.6", func(t *testing.T) { testCRI(t, false) })
	t.Run("containerd 2.x", func(t *testing.T) { testCRI(t, true) })
}

func testCRI(t *testing.T, containerd2 bool) {
	requireIntegration(t)
	ctx := testContext(t)
	bin := criTools(ctx, t, containerd2)
	hosts := filepath.Join(t.TempDir(), "cri-hosts.d")
	env := newEnvWith(t, testenv.Options{Containerd2: containerd2, CRIConfig: criConfigFor(containerd2, hosts)})
	writeHostsToml(t, hosts, env.RegistryHost, env.RegistryHost)
	if _, err := env.PushImage(ctx, testimages.Pause); err != nil {
		t.Fatal(err)
	}
	ref := convertPython(ctx, t, env, convert.EStargz, testenv.PythonStartupFiles)
	cri := crictl{t: t, bin: bin, sock: env.ContainerdAddress}

	start := time.Now()
	cri.run(ctx, "pull", ref)
	mounts := lazyMounts(t, env)
	t.Logf("crictl pull took %s; %d layers mounted lazily", time.Since(start).Round(time.Millisecond), len(mounts))
	if len(mounts) == 0 {
		t.Fatal("crictl pull mounted no layer lazily")
	}

	podID, ctrID := startPod(ctx, t, cri, ref, "python3", "-c", "import json, sys, time; print('ready', sys.version_info[0], flush=True); time.sleep(600)")
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(cri.run(ctx, "logs", ctrID), "ready 3") {
		if time.Now().After(deadline) {
			t.Fatalf("the container printed no ready line in a minute: %q", cri.run(ctx, "logs", ctrID))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out := cri.run(ctx, "exec", ctrID, "python3", "-c", "import email; print(len(open('/usr/lib/python3.11/os.py').read()) > 0)"); out != "True" {
		t.Errorf("crictl exec in the lazy container printed %q", out)
	}
	cri.run(ctx, "stop", ctrID)
	cri.run(ctx, "rm", ctrID)
	cri.run(ctx, "stopp", podID)
	cri.run(ctx, "rmp", podID)
	cri.run(ctx, "rmi", ref)
	// containerd's garbage collector removes the image's snapshots after
	// the image; lazycas unmounts each as it goes.
	deadline = time.Now().Add(time.Minute)
	for len(lazyMounts(t, env)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("a minute after crictl rmi, lazy mounts remain: %v", lazyMounts(t, env))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("pod run, logs, exec, stop, rmp and rmi through CRI; every lazy mount gone after rmi")
}

// criTools builds (once, into the test cache) crictl, and containerd 2.x
// when the test runs on it, skipping the test where 2.x cannot be had;
// it returns crictl's path.
func criTools(ctx context.Context, t *testing.T, containerd2 bool) string {
	t.Helper()
	bin, err := testenv.BuildCrictl(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if containerd2 {
		if _, err := testenv.BuildContainerd2(ctx, t.Logf); errors.Is(err, testenv.ErrContainerd2Offline) {
			t.Skip(err)
		}
	}
	return bin
}

// criConfigFor is the CRI configuration of the containerd the test runs
// (criConfig or criConfig2), with the environment's pause image and the
// hosts directory hosts.
func criConfigFor(containerd2 bool, hosts string) func(e *testenv.Env) string {
	return func(e *testenv.Env) string {
		if containerd2 {
			return fmt.Sprintf(criConfig2, e.RegistryHost+"/pause:latest", hosts)
		}
		return fmt.Sprintf(criConfig, e.RegistryHost+"/pause:latest", hosts)
	}
}

// writeHostsToml makes registry host served by the plain-HTTP registry
// at server, in the containerd hosts directory dir.
func writeHostsToml(t *testing.T, dir, host, server string) {
	t.Helper()
	hostDir := filepath.Join(dir, host)
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	hostsToml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n",
		"http://"+server, "http://"+server)
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startPod runs a pod on the node's network with one container of image
// ref running command, through CRI, as kubelet does.
func startPod(ctx context.Context, t *testing.T, cri crictl, ref string, command ...string) (podID, ctrID string) {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, v any) string {
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
	pod := write("pod.json", map[string]any{
		"metadata":      map[string]any{"name": "lazy", "namespace": "default", "uid": testenv.UniqueID("uid")},
		"log_directory": filepath.Join(dir, "logs"),
		// The node's network: no CNI here.
		"linux": map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
	})
	ctr := write("container.json", map[string]any{
		"metadata": map[string]any{"name": "app"},
		"image":    map[string]any{"image": ref},
		"command":  command,
		"log_path": "app.log",
		"linux":    map[string]any{},
	})
	podID = cri.run(ctx, "runp", pod)
	ctrID = cri.run(ctx, "create", podID, ctr, pod)
	cri.run(ctx, "start", ctrID)
	return podID, ctrID
}
