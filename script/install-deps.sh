#!/usr/bin/env bash
# Installs what building and testing lazycas needs on Debian 12, as root:
# containerd + runc, fuse3, a registry, debootstrap and busybox-static for the
# test images, promtool (Debian's prometheus) to check metrics scrapes, kubectl
# (when there is none) for the deploy manifests, and a
# Go toolchain new enough for go.mod. Idempotent: it installs
# only what is missing. Prints the Go binary's directory on its last line.
set -euo pipefail

cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: run as root (lazycas mounts filesystems and runs containerd)" >&2
	exit 1
fi

pkgs=(containerd runc fuse3 docker-registry debootstrap busybox-static iproute2 prometheus
	ca-certificates curl unzip git make gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl builds the Kubernetes manifests' Kustomize base in a test: Debian's
# kubernetes-client, unless a kubectl is already installed (another package
# owning /usr/bin/kubectl, e.g. google-cloud-sdk's, would conflict with it).
if ! command -v kubectl >/dev/null; then
	dpkg-query -W -f='${Status}' kubernetes-client 2>/dev/null | grep -q "install ok installed" || missing+=(kubernetes-client)
fi
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}" >&2
	apt-get update -qq
	# policy-rc.d keeps the packages from starting system services (a system
	# containerd or registry): the tests start private ones.
	had_policy=0
	[ -e /usr/sbin/policy-rc.d ] && had_policy=1
	[ $had_policy = 1 ] || printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
	chmod +x /usr/sbin/policy-rc.d
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
	[ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d
fi

# Go: the version go.mod names, or newer.
want=$(awk '/^go /{print $2; exit}' go.mod)
version_ok() { # $1: a go binary
	local have
	have=$("$1" env GOVERSION 2>/dev/null | sed 's/^go//') || return 1
	[ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" = "$want" ]
}
for go in "$(command -v go || true)" /usr/local/go/bin/go "/usr/local/go$want/bin/go"; do
	if [ -n "$go" ] && [ -x "$go" ] && version_ok "$go"; then
		dirname "$go"
		exit 0
	fi
done
# No usable Go: take the toolchain module for go.mod's version from the Go
# module proxy (the same module the go command itself uses for GOTOOLCHAIN).
arch=$(dpkg --print-architecture)
proxy=${GOPROXY:-https://proxy.golang.org}
proxy=${proxy%%,*}
url="$proxy/golang.org/toolchain/@v/v0.0.1-go$want.linux-$arch.zip"
echo "install-deps: fetching Go $want toolchain module" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 -o "$tmp/go.zip" "$url"
unzip -q "$tmp/go.zip" -d "$tmp/x"
dest="/usr/local/go$want"
rm -rf "$dest"
mv "$tmp/x/golang.org/toolchain@v0.0.1-go$want.linux-$arch" "$dest"
chmod -R a+rX "$dest"
chmod +x "$dest"/bin/* "$dest"/pkg/tool/*/*
version_ok "$dest/bin/go"
echo "$dest/bin"
