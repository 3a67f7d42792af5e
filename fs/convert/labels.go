package convert

import (
	"maps"
	"sync"

	"github.com/opencontainers/go-digest"
)

// memoryLabels is a content label store for the private, per-conversion
// content store: containerd's converter records and reads each layer's
// diffID as a label, which saves decompressing the layer again.
type memoryLabels struct {
	mu     sync.Mutex
	labels map[digest.Digest]map[string]string
}

func newMemoryLabels() *memoryLabels {
	return &memoryLabels{labels: map[digest.Digest]map[string]string{}}
}

func (m *memoryLabels) Get(d digest.Digest) (map[string]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.labels[d]), nil
}

func (m *memoryLabels) Set(d digest.Digest, labels map[string]string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.labels[d] = maps.Clone(labels)
	return nil
}

func (m *memoryLabels) Update(d digest.Digest, update map[string]string) (map[string]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur := m.labels[d]
	if cur == nil {
		cur = map[string]string{}
	}
	for k, v := range update {
		if v == "" {
			delete(cur, k)
		} else {
			cur[k] = v
		}
	}
	m.labels[d] = cur
	return maps.Clone(cur), nil
}
