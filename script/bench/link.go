package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lazycas/lazycas/integration/testenv"
)

// A link is the path between the pullers and the registry. "loopback" is
// the environment's registry on 127.0.0.1 behind a proxy that only counts;
// "<rate>-<latency>" (e.g. 100mbit-20ms) is a second registry process,
// serving the same storage, inside a network namespace reached through a
// veth pair whose two ends are shaped to rate by TBF, behind a proxy that
// adds latency in each direction.
type linkSpec struct {
	Name    string        `json:"name"`
	Rate    string        `json:"rate,omitempty"` // tc rate, e.g. 100mbit; "" for loopback
	Latency time.Duration `json:"latency"`        // one way
}

// defaultLinks are make bench's; matrixLinks are -matrix's (issue 12): a
// link where bandwidth is the cost, one where round trips are, a fast
// datacenter one and a slow far one.
var (
	defaultLinks = []string{"100mbit-0ms", "100mbit-20ms"}
	matrixLinks  = []string{"loopback", "100mbit-0ms", "100mbit-20ms", "1gbit-2ms", "20mbit-50ms"}
)

var linkRE = regexp.MustCompile(`^([0-9]+(?:kbit|mbit|gbit))-([0-9.]+(?:ms|us|s))$`)

func parseLink(s string) (linkSpec, error) {
	if s == "loopback" {
		return linkSpec{Name: s}, nil
	}
	m := linkRE.FindStringSubmatch(s)
	if m == nil {
		return linkSpec{}, fmt.Errorf("link %q: want loopback or RATE-LATENCY, e.g. 100mbit-20ms", s)
	}
	lat, err := time.ParseDuration(m[2])
	if err != nil {
		return linkSpec{}, fmt.Errorf("link %q: %w", s, err)
	}
	return linkSpec{Name: s, Rate: m[1], Latency: lat}, nil
}

// Names of everything the shaped link creates start with these, so a
// later run can find and remove what a killed one left.
const (
	netnsPrefix = "lzbench-"
	vethPrefix  = "lzbh"
	// Link i has the /30 at 10.213.77.4i on its veth pair: host end
	// .4i+1, namespace end .4i+2.
	netPrefix = "10.213.77."
	regPort   = "5000"
)

// shapedLink is a registry in a network namespace behind TBF-shaped veths.
type shapedLink struct {
	spec     linkSpec
	index    int
	netns    string
	hostVeth string
	nsVeth   string
	registry *exec.Cmd
	regDone  chan struct{}
	once     sync.Once
}

// setUpShaped creates the namespace, the veth pair with TBF on both ends,
// and starts a registry serving storage inside it. On error it removes
// what it made.
func setUpShaped(ctx context.Context, spec linkSpec, index int, workDir, storage string, logf func(string, ...any)) (_ *shapedLink, err error) {
	if index < 0 || index > 62 {
		return nil, fmt.Errorf("link %s: at most 63 shaped links", spec.Name)
	}
	id := strconv.Itoa(os.Getpid()) + "x" + strconv.Itoa(index)
	l := &shapedLink{spec: spec, index: index, netns: netnsPrefix + id, hostVeth: vethPrefix + id, nsVeth: "lzbn" + id}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	// TBF: the bucket holds a few full-size GSO segments; the queue holds
	// 50 ms of traffic at the rate.
	tbf := []string{"root", "tbf", "rate", spec.Rate, "burst", "128kb", "latency", "50ms"}
	steps := [][]string{
		{"ip", "netns", "add", l.netns},
		{"ip", "link", "add", l.hostVeth, "type", "veth", "peer", "name", l.nsVeth},
		{"ip", "link", "set", l.nsVeth, "netns", l.netns},
		{"ip", "addr", "add", l.hostIP() + "/30", "dev", l.hostVeth},
		{"ip", "link", "set", l.hostVeth, "up"},
		{"ip", "-n", l.netns, "addr", "add", l.nsIP() + "/30", "dev", l.nsVeth},
		{"ip", "-n", l.netns, "link", "set", l.nsVeth, "up"},
		{"ip", "-n", l.netns, "link", "set", "lo", "up"},
		append([]string{"tc", "qdisc", "add", "dev", l.hostVeth}, tbf...),
		append([]string{"ip", "netns", "exec", l.netns, "tc", "qdisc", "add", "dev", l.nsVeth}, tbf...),
	}
	for _, s := range steps {
		if err := runCmd(ctx, s...); err != nil {
			return nil, err
		}
	}
	cfg := filepath.Join(workDir, "registry-"+spec.Name+".yml")
	if err := os.WriteFile(cfg, []byte(testenv.RegistryConfig(storage, l.nsIP()+":"+regPort)), 0o644); err != nil {
		return nil, err
	}
	lf, err := os.Create(filepath.Join(workDir, "registry-"+spec.Name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", "netns", "exec", l.netns, "/usr/bin/docker-registry", "serve", cfg)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start registry in %s: %w", l.netns, err)
	}
	l.registry, l.regDone = cmd, make(chan struct{})
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(l.regDone)
	}()
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := hc.Get("http://" + l.Upstream() + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
			err = fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		select {
		case <-l.regDone:
			return nil, fmt.Errorf("registry in %s exited: %v", l.netns, err)
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("registry in %s not ready: %w", l.netns, err)
		}
	}
	logf("link %s: registry in netns %s at %s, TBF %s on %s and %s", spec.Name, l.netns, l.Upstream(), spec.Rate, l.hostVeth, l.nsVeth)
	return l, nil
}

// Upstream is the registry's address as seen from the host.
func (l *shapedLink) Upstream() string { return l.nsIP() + ":" + regPort }

func (l *shapedLink) hostIP() string { return netPrefix + strconv.Itoa(4*l.index+1) }
func (l *shapedLink) nsIP() string   { return netPrefix + strconv.Itoa(4*l.index+2) }

// Close stops the registry and removes the veth pair and the namespace.
// It is idempotent and safe on a half-made link.
func (l *shapedLink) Close() error {
	var err error
	l.once.Do(func() {
		if l.registry != nil && l.registry.Process != nil {
			_ = syscall.Kill(-l.registry.Process.Pid, syscall.SIGTERM)
			select {
			case <-l.regDone:
			case <-time.After(10 * time.Second):
				_ = syscall.Kill(-l.registry.Process.Pid, syscall.SIGKILL)
				<-l.regDone
			}
		}
		err = removeNetns(l.netns, l.hostVeth)
	})
	return err
}

// removeNetns kills whatever still runs in netns, deletes the host end of
// the veth pair (which deletes its peer) and the namespace. Missing pieces
// are not errors.
func removeNetns(netns, hostVeth string) error {
	var errs []error
	if out, err := exec.Command("ip", "netns", "pids", netns).Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if hostVeth != "" && linkExists(hostVeth) {
		if err := runCmd(context.Background(), "ip", "link", "del", hostVeth); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := os.Stat(filepath.Join("/run/netns", netns)); err == nil {
		// The kernel frees a namespace only when its last process is gone.
		for i := 0; i < 50; i++ {
			out, _ := exec.Command("ip", "netns", "pids", netns).Output()
			if strings.TrimSpace(string(out)) == "" {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err := runCmd(context.Background(), "ip", "netns", "del", netns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func linkExists(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// removeStaleLinks removes namespaces and veths left by a benchmark that
// was killed: every name with our prefixes. The caller holds the bench
// lock, so none of them belongs to a live run.
func removeStaleLinks(logf func(string, ...any)) error {
	var errs []error
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), netnsPrefix) {
				logf("removing network namespace %s left by an earlier run", e.Name())
				if err := removeNetns(e.Name(), ""); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if ents, err := os.ReadDir("/sys/class/net"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), vethPrefix) {
				logf("removing veth %s left by an earlier run", e.Name())
				if err := runCmd(context.Background(), "ip", "link", "del", e.Name()); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// runCmd runs a command to completion, its output in the error on failure.
func runCmd(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
