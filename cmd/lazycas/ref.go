package main

import (
	"fmt"

	"github.com/distribution/reference"
)

// normalizeRef turns what a user types (busybox, ghcr.io/x/y) into the fully
// qualified reference containerd's resolver needs, as docker and nerdctl do.
func normalizeRef(ref string) (string, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "", fmt.Errorf("invalid image reference %q: %w", ref, err)
	}
	return named.String(), nil
}
