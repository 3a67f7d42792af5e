package integration

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/lazycas/lazycas/config"
)

// deployDir holds the Kubernetes manifests, relative to this package.
const deployDir = "../script/deploy"

// The few fields of Kubernetes objects the deploy tests read: the
// manifests' meaning for a node (privileges, mounts, propagation, update
// strategies), not their whole schema.
type k8sObject struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name        string            `yaml:"name"`
		Namespace   string            `yaml:"namespace"`
		Labels      map[string]string `yaml:"labels"`
		Annotations map[string]string `yaml:"annotations"`
	} `yaml:"metadata"`
	Data    map[string]string `yaml:"data"`    // ConfigMap
	Handler string            `yaml:"handler"` // RuntimeClass
	Spec    struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		UpdateStrategy struct {
			Type          string `yaml:"type"`
			RollingUpdate *struct {
				MaxUnavailable any `yaml:"maxUnavailable"`
				MaxSurge       any `yaml:"maxSurge"`
			} `yaml:"rollingUpdate"`
		} `yaml:"updateStrategy"`
		Template struct {
			Metadata struct {
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec podSpec `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type podSpec struct {
	RuntimeClassName              string          `yaml:"runtimeClassName"`
	HostNetwork                   bool            `yaml:"hostNetwork"`
	HostPID                       bool            `yaml:"hostPID"`
	DNSPolicy                     string          `yaml:"dnsPolicy"`
	TerminationGracePeriodSeconds *int            `yaml:"terminationGracePeriodSeconds"`
	Tolerations                   []k8sToleration `yaml:"tolerations"`
	Containers                    []k8sContainer  `yaml:"containers"`
	InitContainers                []k8sContainer  `yaml:"initContainers"`
	Volumes                       []k8sVolume     `yaml:"volumes"`
}

type k8sToleration struct {
	Key      string `yaml:"key"`
	Operator string `yaml:"operator"`
	Effect   string `yaml:"effect"`
}

type k8sContainer struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	} `yaml:"env"`
	SecurityContext struct {
		Privileged               *bool `yaml:"privileged"`
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
		Capabilities             struct {
			Add  []string `yaml:"add"`
			Drop []string `yaml:"drop"`
		} `yaml:"capabilities"`
	} `yaml:"securityContext"`
	Resources struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	LivenessProbe  *k8sProbe        `yaml:"livenessProbe"`
	ReadinessProbe *k8sProbe        `yaml:"readinessProbe"`
	StartupProbe   *k8sProbe        `yaml:"startupProbe"`
	VolumeMounts   []k8sVolumeMount `yaml:"volumeMounts"`
}

type k8sProbe struct {
	Exec *struct {
		Command []string `yaml:"command"`
	} `yaml:"exec"`
	PeriodSeconds    int `yaml:"periodSeconds"`
	TimeoutSeconds   int `yaml:"timeoutSeconds"`
	FailureThreshold int `yaml:"failureThreshold"`
}

type k8sVolumeMount struct {
	Name             string `yaml:"name"`
	MountPath        string `yaml:"mountPath"`
	MountPropagation string `yaml:"mountPropagation"`
	ReadOnly         bool   `yaml:"readOnly"`
}

type k8sVolume struct {
	Name     string `yaml:"name"`
	HostPath *struct {
		Path string `yaml:"path"`
		Type string `yaml:"type"`
	} `yaml:"hostPath"`
	ConfigMap *struct {
		Name string `yaml:"name"`
	} `yaml:"configMap"`
}

// volume returns the pod's volume called name.
func (p podSpec) volume(name string) (k8sVolume, bool) {
	for _, v := range p.Volumes {
		if v.Name == name {
			return v, true
		}
	}
	return k8sVolume{}, false
}

// mountAt returns c's volume mount at path.
func (c k8sContainer) mountAt(path string) (k8sVolumeMount, bool) {
	for _, m := range c.VolumeMounts {
		if m.MountPath == path {
			return m, true
		}
	}
	return k8sVolumeMount{}, false
}

// deployManifests is what script/deploy declares.
type deployManifests struct {
	objects []k8sObject
	// Holder and Daemon are the two DaemonSets; Config the daemon's
	// config.toml, parsed as the daemon parses it.
	holder, daemon *k8sObject
	configTOML     string
	config         config.Config
}

// loadDeployManifests parses every YAML document of the files the
// Kustomize base lists, and checks that the base lists every YAML file of
// the directory.
func loadDeployManifests(t *testing.T) *deployManifests {
	t.Helper()
	var kust struct {
		Resources []string `yaml:"resources"`
	}
	data, err := os.ReadFile(filepath.Join(deployDir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &kust); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	files, err := filepath.Glob(filepath.Join(deployDir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" && !slices.Contains(kust.Resources, b) {
			t.Errorf("%s is not among kustomization.yaml's resources %v", b, kust.Resources)
		}
	}
	d := &deployManifests{}
	for _, r := range kust.Resources {
		data, err := os.ReadFile(filepath.Join(deployDir, r))
		if err != nil {
			t.Fatalf("kustomization.yaml lists %s: %v", r, err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for i := 0; ; i++ {
			var o k8sObject
			if err := dec.Decode(&o); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s, document %d: %v", r, i, err)
			}
			if o.Kind == "" || o.APIVersion == "" || o.Metadata.Name == "" {
				t.Fatalf("%s, document %d: no kind, apiVersion or name", r, i)
			}
			d.objects = append(d.objects, o)
		}
	}
	for i := range d.objects {
		o := &d.objects[i]
		switch {
		case o.Kind == "DaemonSet" && o.Metadata.Name == "lazycas":
			d.daemon = o
		case o.Kind == "DaemonSet" && o.Metadata.Name == "lazycas-fuse-holder":
			d.holder = o
		case o.Kind == "ConfigMap" && o.Metadata.Name == "lazycas-config":
			d.configTOML = o.Data["config.toml"]
		}
	}
	if d.daemon == nil || d.holder == nil || d.configTOML == "" {
		t.Fatal("script/deploy lacks the lazycas DaemonSet, the lazycas-fuse-holder DaemonSet or the lazycas-config ConfigMap's config.toml")
	}
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(d.configTOML), 0o644); err != nil {
		t.Fatal(err)
	}
	if d.config, err = config.Load(path, true); err != nil {
		t.Fatalf("the ConfigMap's config.toml: %v", err)
	}
	if err := d.config.Validate(); err != nil {
		t.Fatalf("the ConfigMap's config.toml: %v", err)
	}
	return d
}

// TestDeployManifests checks, offline, what the DaemonSets must get right
// for a node: the daemon privileged with /dev/fuse and its root shared
// both ways with the host at the path the config names, the holder apart
// and never replaced by a rollout, the daemon replaced one at a time with
// no two running, both outside lazycas's own snapshots, and every host
// path mounted at its own path (so that containerd on the host and the
// daemon in its pod name the same files).
func TestDeployManifests(t *testing.T) {
	d := loadDeployManifests(t)
	cfg := d.config
	if cfg.FS.HolderSpawn || !cfg.FS.Holder {
		t.Errorf("config.toml: fs.holder = %v, fs.holder_spawn = %v; want true, false (the holder runs in its own DaemonSet)",
			cfg.FS.Holder, cfg.FS.HolderSpawn)
	}
	var runtimeClasses []string
	for _, o := range d.objects {
		if o.Kind == "RuntimeClass" {
			runtimeClasses = append(runtimeClasses, o.Metadata.Name)
		}
		if o.Kind != "Namespace" && o.Kind != "RuntimeClass" && o.Metadata.Namespace != "lazycas-system" {
			t.Errorf("%s %s is in namespace %q, not lazycas-system", o.Kind, o.Metadata.Name, o.Metadata.Namespace)
		}
	}

	for _, ds := range []*k8sObject{d.daemon, d.holder} {
		name, pod := ds.Metadata.Name, ds.Spec.Template.Spec
		for k, v := range ds.Spec.Selector.MatchLabels {
			if ds.Spec.Template.Metadata.Labels[k] != v {
				t.Errorf("%s: the selector's %s=%s is not among the pod's labels", name, k, v)
			}
		}
		if !slices.Contains(runtimeClasses, pod.RuntimeClassName) || pod.RuntimeClassName == "" {
			t.Errorf("%s: runtimeClassName %q is none of the RuntimeClasses declared %v: its pods' snapshots would come from lazycas itself",
				name, pod.RuntimeClassName, runtimeClasses)
		}
		if pod.HostPID {
			t.Errorf("%s: hostPID is not needed (see the comment in lazycas.yaml)", name)
		}
		if !slices.ContainsFunc(pod.Tolerations, func(tl k8sToleration) bool { return tl.Operator == "Exists" && tl.Key == "" }) {
			t.Errorf("%s: no toleration of every taint: a tainted node would run containers on lazycas with no daemon", name)
		}
		if len(pod.Containers) != 1 {
			t.Fatalf("%s: %d containers, want 1", name, len(pod.Containers))
		}
		c := pod.Containers[0]
		if c.Image != d.daemon.Spec.Template.Spec.Containers[0].Image {
			t.Errorf("%s runs image %s, the daemon %s: the holder is the daemon's binary", name, c.Image, d.daemon.Spec.Template.Spec.Containers[0].Image)
		}
		if len(c.Command) == 0 || c.Command[0] != "/usr/local/bin/containerd-lazycas-grpc" {
			t.Errorf("%s: command %q does not run the image's daemon binary", name, c.Command)
		}
		if c.Resources.Requests["memory"] == "" || c.Resources.Requests["cpu"] == "" {
			t.Errorf("%s: no cpu and memory requests", name)
		}
		for _, m := range c.VolumeMounts {
			v, ok := pod.volume(m.Name)
			if !ok {
				t.Errorf("%s: mount of unknown volume %s", name, m.Name)
				continue
			}
			if v.HostPath != nil && v.HostPath.Path != m.MountPath {
				t.Errorf("%s: host path %s mounted at %s: the daemon and containerd would name different files",
					name, v.HostPath.Path, m.MountPath)
			}
		}
		root, ok := c.mountAt(cfg.Root)
		if !ok {
			t.Errorf("%s: the root %s is not mounted", name, cfg.Root)
		} else if v, _ := pod.volume(root.Name); v.HostPath == nil {
			t.Errorf("%s: the root %s is no host path", name, cfg.Root)
		}
	}

	daemon, holder := d.daemon.Spec.Template.Spec, d.holder.Spec.Template.Spec
	dc, hc := daemon.Containers[0], holder.Containers[0]
	if s := d.daemon.Spec.UpdateStrategy; s.Type != "RollingUpdate" || s.RollingUpdate == nil ||
		fmt.Sprint(s.RollingUpdate.MaxSurge) != "0" {
		t.Errorf("lazycas: updateStrategy %+v; want RollingUpdate with maxSurge 0 (two daemons never share a root)", s)
	}
	if s := d.holder.Spec.UpdateStrategy; s.Type != "OnDelete" {
		t.Errorf("lazycas-fuse-holder: updateStrategy %s; want OnDelete (a rollout must not replace it)", s.Type)
	}
	if p := dc.SecurityContext.Privileged; p == nil || !*p {
		t.Error("lazycas: not privileged: it mounts FUSE and overlay filesystems for the host")
	}
	if m, _ := dc.mountAt(cfg.Root); m.MountPropagation != "Bidirectional" {
		t.Errorf("lazycas: the root is mounted with propagation %q; want Bidirectional (its mounts must reach the host)", m.MountPropagation)
	}
	if m, _ := hc.mountAt(cfg.Root); m.MountPropagation != "HostToContainer" {
		t.Errorf("lazycas-fuse-holder: the root is mounted with propagation %q; want HostToContainer (unmounts must reach it)", m.MountPropagation)
	}
	for _, p := range []string{filepath.Dir(cfg.Address), "/dev/fuse", filepath.Dir(cfg.Containerd.Address), cfg.Remote.ConfigPath} {
		if m, ok := dc.mountAt(p); !ok {
			t.Errorf("lazycas: %s is not mounted", p)
		} else if v, _ := daemon.volume(m.Name); v.HostPath == nil {
			t.Errorf("lazycas: %s is no host path", p)
		}
	}
	if v, _ := daemon.volume("dev-fuse"); v.HostPath == nil || v.HostPath.Type != "CharDevice" {
		t.Error("lazycas: /dev/fuse is not the host's character device")
	}
	if i := slices.Index(dc.Command, "--config"); i < 0 || i+1 >= len(dc.Command) {
		t.Errorf("lazycas: command %q names no --config", dc.Command)
	} else if m, ok := dc.mountAt(filepath.Dir(dc.Command[i+1])); !ok {
		t.Errorf("lazycas: the config %s is not mounted", dc.Command[i+1])
	} else if v, _ := daemon.volume(m.Name); v.ConfigMap == nil || v.ConfigMap.Name != "lazycas-config" {
		t.Errorf("lazycas: %s is not the lazycas-config ConfigMap", m.MountPath)
	}
	for _, p := range []*k8sProbe{dc.LivenessProbe, dc.ReadinessProbe, dc.StartupProbe} {
		if p == nil || p.Exec == nil || !slices.Contains(p.Exec.Command, "health") || !slices.Contains(p.Exec.Command, cfg.Address) {
			t.Errorf("lazycas: a liveness, readiness or startup probe does not run `lazycas health` on %s", cfg.Address)
		}
	}
	if g := daemon.TerminationGracePeriodSeconds; g == nil || *g < 15 {
		t.Error("lazycas: terminationGracePeriodSeconds under 15 s: the daemon's shutdown takes up to 10 s for calls and 5 s for its servers")
	}
	if !strings.Contains(strings.Join(hc.Command, " "), "fuse-holder --root "+cfg.Root) ||
		!strings.Contains(strings.Join(hc.Command, " "), "--idle-exit 0") {
		t.Errorf("lazycas-fuse-holder: command %q; want the fuse-holder command on %s that never exits idle", hc.Command, cfg.Root)
	}
	if p := hc.SecurityContext.Privileged; p != nil && *p {
		t.Error("lazycas-fuse-holder: privileged, and it needs no privilege")
	}

	// kubectl, where there is one (Debian's kubernetes-client, or any):
	// the Kustomize base builds, offline.
	if kubectl, err := exec.LookPath("kubectl"); err == nil {
		out, err := exec.Command(kubectl, "kustomize", deployDir).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v\n%s", deployDir, err, out)
		}
		n := 0
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "kind: ") {
				n++
			}
		}
		if n != len(d.objects) {
			t.Errorf("kubectl kustomize built %d objects; the files hold %d", n, len(d.objects))
		}
		t.Logf("kubectl kustomize built the base: %d objects", n)
	} else {
		t.Log("no kubectl on PATH: the Kustomize base is not built")
	}
}
