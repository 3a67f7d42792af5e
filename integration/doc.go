// Package integration holds lazycas's end-to-end tests: a real registry, a
// private containerd 1.6 with lazycas as its proxy snapshotter, images built
// on this machine (package testimages), and real containers run by runc,
// all set up by package testenv. The tests need root and skip with -short;
// TestMain builds the daemon once from ./cmd/containerd-lazycas-grpc.
//
//	go test -count=1 -v ./integration/...
package integration
