package testenv

import (
	"context"
	"path/filepath"
)

// CrictlVersion is the cri-tools release BuildCrictl installs: the CRI
// client kubelet's behaviour is tested with.
const CrictlVersion = "v1.37.0"

// BuildCrictl returns the path of crictl CrictlVersion, installed once
// into the test cache with `go install`.
func BuildCrictl(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	dir, err := goInstallCached(ctx, logf, "crictl-"+CrictlVersion, []string{"crictl"},
		"sigs.k8s.io/cri-tools/cmd/crictl@"+CrictlVersion)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "crictl"), nil
}
