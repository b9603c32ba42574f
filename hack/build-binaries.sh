#!/usr/bin/env bash
# Builds the real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler),
# kubectl and helm from source through the Go module proxy, cached by version under
# ~/.cache/residency/bin/<versions>/ so only the first build is slow.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"   # k8s.io/kubernetes release; staging modules are v0.34.4
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"   # helm 3.19 is built against k8s.io/* v0.34, matching the server
CACHE="${RESIDENCY_CACHE:-$HOME/.cache/residency}"
BIN="$CACHE/bin/k8s-${KUBE_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}"
SRC="$CACHE/src"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export GOPATH="${GOPATH:-$CACHE/gopath}"
export GOCACHE="${GOCACHE:-$CACHE/gocache}"
mkdir -p "$BIN" "$SRC"

log() { printf '[build-binaries] %s\n' "$*" >&2; }

staging_version="v0${KUBE_VERSION#v1}"   # v1.34.4 -> v0.34.4

build_kube() {
  local mod="$SRC/kube-$KUBE_VERSION"
  mkdir -p "$mod"
  if [ ! -f "$mod/go.sum" ]; then
    log "preparing wrapper module for k8s.io/kubernetes $KUBE_VERSION"
    local kgomod
    (cd "$mod" && [ -f go.mod ] || go mod init residency.dev/kube-binaries >/dev/null 2>&1)
    kgomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module residency.dev/kube-binaries"
      echo
      echo "go 1.24.0"
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      echo "replace ("
      # every k8s.io/<staging> that kubernetes replaces by ./staging/src/... -> its published v0.X.Y
      grep -E '^\s*k8s.io/[a-z0-9-]+ => \./staging/src/' "$kgomod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
      echo ")"
    } >"$mod/go.mod"
    cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    (cd "$mod" && go mod tidy)
  fi
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    if [ ! -x "$BIN/$cmd" ]; then
      log "building $cmd $KUBE_VERSION"
      (cd "$mod" && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging_version#v0.}" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
      mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    fi
  done
}

build_etcd() {
  [ -x "$BIN/etcd" ] && return
  local mod="$SRC/etcd-$ETCD_VERSION"
  mkdir -p "$mod"
  log "building etcd $ETCD_VERSION"
  cat >"$mod/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  if [ ! -f "$mod/go.sum" ]; then
    (cd "$mod" && rm -f go.mod && go mod init residency.dev/etcd >/dev/null 2>&1 && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy)
  fi
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" . && mv "$BIN/etcd.tmp" "$BIN/etcd")
}

build_helm() {
  # helm's release build stamps its version and the Kubernetes version it was built against (k8s.io/*
  # v0.34 -> 1.34); without the latter `helm template` assumes Kubernetes v1.20 and refuses charts that
  # need newer. A stamp file beside the binary records the flags, so a helm built without them (an older
  # cache) is rebuilt once.
  local k8s_minor="${staging_version#v0.}"; k8s_minor="${k8s_minor%%.*}"
  local flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  [ -x "$BIN/helm" ] && [ "$(cat "$BIN/helm.ldflags" 2>/dev/null)" = "$flags" ] && return
  local mod="$SRC/helm-$HELM_VERSION"
  mkdir -p "$mod"
  log "building helm $HELM_VERSION"
  if [ ! -f "$mod/go.sum" ]; then
    cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import _ "helm.sh/helm/v3/cmd/helm"
GO
    (cd "$mod" && rm -f go.mod && go mod init residency.dev/helm >/dev/null 2>&1 && go get "helm.sh/helm/v3@$HELM_VERSION" && go mod tidy)
  fi
  (cd "$mod" && go build -trimpath -ldflags "$flags" -o "$BIN/helm.tmp" helm.sh/helm/v3/cmd/helm && mv "$BIN/helm.tmp" "$BIN/helm")
  echo "$flags" >"$BIN/helm.ldflags"
}

case "${1:-all}" in
  path) echo "$BIN"; exit 0 ;;
  kube) build_kube ;;
  etcd) build_etcd ;;
  helm) build_helm ;;
  all) build_etcd; build_helm; build_kube ;;
  *) echo "usage: $0 [all|kube|etcd|helm|path]" >&2; exit 2 ;;
esac
ls -la "$BIN" >&2
echo "$BIN"
