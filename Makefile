# lazycas: `make demo` runs a lazily pulled container end to end;
# `make test` runs every test. Both install what they need (Debian 12, root).
SHELL := /bin/bash
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
# The Go toolchain directory that script/install-deps.sh found or installed.
WITHGO := PATH="$$(cat bin/.go-path):$$PATH"
GO := $(WITHGO) go
GOTEST_TIMEOUT ?= 45m

.PHONY: all deps build image lint test test-short demo clean bench bench-restart

all: build

deps:
	@mkdir -p bin
	@script/install-deps.sh > bin/.go-path.out
	@tail -1 bin/.go-path.out > bin/.go-path && rm -f bin/.go-path.out

build: deps
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/ ./cmd/...

# The daemon's OCI image (bin/lazycas-image.tar, tagged lazycas:$(VERSION)),
# built with no container engine from static binaries; load it with
# `ctr -n k8s.io images import bin/lazycas-image.tar` or push it with any OCI
# tool. See script/deploy/README.md.
IMAGE_TAG ?= lazycas:$(VERSION)
image: deps
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o bin/image/ ./cmd/...
	$(GO) run ./script/image -version $(VERSION) -tag $(IMAGE_TAG) \
		-daemon bin/image/containerd-lazycas-grpc -cli bin/image/lazycas -out bin/lazycas-image.tar

lint: deps
	$(GO) vet ./...
	@out=$$(git ls-files -co --exclude-standard '*.go' | $(WITHGO) xargs gofmt -l); \
	if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi

# Unit, conformance and integration tests; packages run in parallel. The
# integration tests start a private registry, containerd and lazycas, and
# build their images once into $${LAZYCAS_TEST_CACHE:-/var/cache/lazycas-test}.
test: build lint
	$(GO) test -count=1 -timeout $(GOTEST_TIMEOUT) ./...
	$(WITHGO) script/fuzz.sh 5s

# Every Go fuzz target for FUZZTIME each, one after the other on one core
# (`make test` runs them for 5s each); `make fuzz FUZZTIME=5m` searches
# longer. A failing input lands in the package's testdata/fuzz/, which every
# `go test` replays: commit it with the fix.
.PHONY: fuzz
FUZZTIME ?= 10s
fuzz: deps
	$(WITHGO) script/fuzz.sh $(FUZZTIME)

# Inner loop: skips the integration tests and the slower conformance runs.
test-short: deps
	$(GO) test -short -count=1 ./...

demo: build
	$(GO) run ./script/demo -daemon bin/containerd-lazycas-grpc

# lazycas against containerd's overlayfs snapshotter and stargz-snapshotter
# (built from its Go module), cold and warm, on shaped 100mbit-0ms and
# 100mbit-20ms links (about 30 minutes; see README, "Performance").
# BENCH_FLAGS passes flags, e.g. BENCH_FLAGS=-quick or BENCH_FLAGS=-matrix.
bench: deps
	$(GO) run ./script/bench $(BENCH_FLAGS)

# Containers reading two lazy images while the daemon is restarted 10
# times, upgraded, and SIGKILLed 10 times: prints how long reads stalled
# (the distribution per phase) and fails on any wrong byte or read error
# (about 1.5 minutes; see README, "Restarts, upgrades and crashes").
bench-restart: build
	set -o pipefail; $(GO) test -count=1 -v -timeout 20m -run '^TestContainersSurviveDaemonRestarts$$' ./integration/ | \
		grep -E 'restart_test.go.*(restart [0-9]|restart after|upgrade|kill:|holder|phase|stall|longest)|^(ok|FAIL|---)'

clean:
	rm -rf bin
