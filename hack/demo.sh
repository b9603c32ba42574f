#!/usr/bin/env bash
# `make demo`: a real local control plane, the CRDs, the operator, a model made locally and applied
# with kubectl, then `kubectl get llm`. `hack/demo.sh down` stops what it started.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="$ROOT/.demo"
VENV_BIN="$ROOT/.venv/bin"
BIN="$("$ROOT/hack/build-binaries.sh" path)"
export PATH="$VENV_BIN:$BIN:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stop_pid() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  for f in "$DEMO"/pids/*; do [ -e "$f" ] && stop_pid "$f"; done
  rm -rf "$DEMO"
}

up() {
  say "Control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; built from source, cached)"
  eval "$("$ROOT/hack/cluster.sh" up)"
  kubectl version 2>/dev/null | sed 's/^/  /'

  say "CRDs generated from the typed API"
  kubectl apply --server-side --force-conflicts -f "$ROOT/crds" | sed 's/^/  /'
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

  mkdir -p "$DEMO/pids" "$DEMO/logs" "$DEMO/models"
  if [ ! -f "$DEMO/models/chat-small/config.json" ]; then
    say "A small model made locally (random-initialised Llama config, safetensors, local tokenizer)"
    residency make-model "$DEMO/models/chat-small" --arch llama --preset tiny
  fi

  say "The operator (kopf), allowed to load models under $DEMO/models"
  stop_pid "$DEMO/pids/operator"
  setsid residency operator --models-root "$DEMO/models" >"$DEMO/logs/operator.log" 2>&1 </dev/null &
  echo $! >"$DEMO/pids/operator"

  say "kubectl apply -f examples/chat-small.yaml"
  sed "s#/models/#$DEMO/models/#" "$ROOT/examples/chat-small.yaml" | kubectl apply -f - | sed 's/^/  /'

  for _ in $(seq 1 120); do
    phase=$(kubectl get llm chat-small -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [ -n "$phase" ] && break
    sleep 0.5
  done
  say "kubectl get llm"
  kubectl get llm -o wide
  echo
  kubectl get llm chat-small -o jsonpath='{range .status.conditions[*]}  {.type}={.status} ({.reason}): {.message}{"\n"}{end}'
  cat <<TXT

The model was validated by the operator (directory under an allowed root, config.json readable,
architecture supported without remote code) and waits for a GPU node: start a worker to give it one.
  export KUBECONFIG=$KUBECONFIG
  kubectl get llm -A            # phase, node, resident %, decode tok/s
  make cluster-down             # stop everything and remove the local cluster
TXT
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
