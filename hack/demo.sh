#!/usr/bin/env bash
# `make demo`: a real local control plane, the operator, the router, three worker processes posing as
# three GPU nodes of different (emulated) sizes, four models applied with `kubectl apply -f examples/`,
# and a real completion through the router. `hack/demo.sh down` stops what it started.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="$ROOT/.demo"
MODELS=/tmp/residency-demo/models          # the examples/ manifests name this root
VENV_BIN="$ROOT/.venv/bin"
BIN="$("$ROOT/hack/build-binaries.sh" path)"
export PATH="$VENV_BIN:$BIN:$PATH"
ROUTER_PORT="${RESIDENCY_DEMO_ROUTER_PORT:-18000}"
WORKER_PORT_BASE="${RESIDENCY_DEMO_WORKER_PORT_BASE:-18100}"  # several demos on one machine: set both ports
NODES=("gpu-a:24MiB:$((WORKER_PORT_BASE + 1))" "gpu-b:20MiB:$((WORKER_PORT_BASE + 2))" "gpu-c:8MiB:$((WORKER_PORT_BASE + 3))")

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

start() { # name cmd...
  local name=$1; shift
  stop_pid "$DEMO/pids/$name"
  setsid "$@" >"$DEMO/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DEMO/pids/$name"
}

down() {
  if [ -f "${RESIDENCY_CLUSTER_DIR:-$ROOT/.cluster}/kubeconfig" ] && "$ROOT/hack/cluster.sh" status 2>/dev/null; then
    export KUBECONFIG="${RESIDENCY_CLUSTER_DIR:-$ROOT/.cluster}/kubeconfig"
    kubectl delete -f "$ROOT/examples" --ignore-not-found --timeout=60s >/dev/null 2>&1 || true
    kubectl delete rolebinding demo-client-inference -n default --ignore-not-found >/dev/null 2>&1 || true
    kubectl delete serviceaccount demo-client -n default --ignore-not-found >/dev/null 2>&1 || true
    kubectl delete clusterrole residency-inference --ignore-not-found >/dev/null 2>&1 || true
  fi
  local spec
  for spec in "${NODES[@]}"; do
    [ -n "${KUBECONFIG:-}" ] && kubectl delete node "${spec%%:*}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  done
  for f in "$DEMO"/pids/*; do [ -e "$f" ] && stop_pid "$f"; done
  rm -rf "$DEMO"
}

wait_settled() { # until every model is Ready or in a phase that will not change by itself
  local deadline=$((SECONDS + ${1:-300}))
  while [ $SECONDS -lt $deadline ]; do
    local phases; phases=$(kubectl get llm -A -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}')
    local total; total=$(echo "$phases" | grep -c . || true)
    local settled; settled=$(echo "$phases" | grep -c -E '^(Ready|Preempted|Unschedulable|Failed)$' || true)
    [ "$total" -gt 0 ] && [ "$settled" -eq "$total" ] && return 0
    sleep 1
  done
  echo "models did not settle in time:"; kubectl get llm -A; return 1
}

up() {
  say "Control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built from source, cached)"
  eval "$("$ROOT/hack/cluster.sh" up)"
  kubectl version 2>/dev/null | sed 's/^/  /'
  kubectl apply --server-side --force-conflicts -f "$ROOT/crds" | sed 's/^/  /'
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

  mkdir -p "$DEMO/pids" "$DEMO/logs" "$MODELS"
  say "Four models made locally (random weights, real Llama/Qwen2 configs, safetensors, local tokenizers)"
  for spec in chat-small:llama:tiny:1 assistant:qwen2:tiny:2 coder:llama:small:3 summarizer:qwen2:small:4; do
    IFS=: read -r name arch preset seed <<<"$spec"
    [ -f "$MODELS/$name/config.json" ] || residency make-model "$MODELS/$name" --arch "$arch" --preset "$preset" --seed "$seed" >/dev/null
    printf '  %-11s %-6s %-6s %s\n' "$name" "$arch" "$preset" "$(du -sh "$MODELS/$name" | cut -f1)"
  done
  head -c 32 /dev/urandom | base64 >"$DEMO/admin.token"
  head -c 32 /dev/urandom | base64 >"$DEMO/inference.token"  # workers serve only the router, which holds it
  chmod 600 "$DEMO/admin.token" "$DEMO/inference.token"

  say "Three GPU nodes: a Node object each and a real worker process (torch; EMULATED GPU tier, no GPU here)"
  for spec in "${NODES[@]}"; do
    IFS=: read -r node memory port <<<"$spec"
    printf '{"apiVersion":"v1","kind":"Node","metadata":{"name":"%s","labels":{"residency.dev/gpu":"true"}}}' "$node" \
      | kubectl apply -f - >/dev/null
    start "worker-$node" residency worker --node "$node" --gpu-memory "$memory" --models-root "$MODELS" \
      --port "$port" --admin-token-file "$DEMO/admin.token" --inference-token-file "$DEMO/inference.token" \
      --join --node-heartbeat --calibration-mib 32
  done
  start operator residency operator --models-root "$MODELS"
  # Kubernetes auth (the default): a client's token is checked with TokenReview, its right to a model with
  # SubjectAccessReview (verb `infer` on llmmodels/<name> in the model's namespace)
  start router residency router --port "$ROUTER_PORT" --worker-token-file "$DEMO/inference.token"

  say "A client identity: ServiceAccount demo-client in namespace default, allowed to call its models"
  kubectl apply -f - <<'YAML' | sed 's/^/  /'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: residency-inference}
rules: [{apiGroups: [residency.dev], resources: [llmmodels], verbs: [infer]}]
YAML
  kubectl create serviceaccount demo-client -n default --dry-run=client -o yaml | kubectl apply -f - | sed 's/^/  /'
  kubectl create rolebinding demo-client-inference -n default --clusterrole=residency-inference \
    --serviceaccount=default:demo-client --dry-run=client -o yaml | kubectl apply -f - | sed 's/^/  /'
  kubectl create token demo-client -n default --duration=24h >"$DEMO/client.token"
  chmod 600 "$DEMO/client.token"
  for _ in $(seq 1 120); do
    [ "$(kubectl get nodeprofiles -o name 2>/dev/null | wc -l)" -ge 3 ] && break
    sleep 1
  done
  kubectl get nodeprofiles | sed 's/^/  /'

  say "kubectl apply -f examples/"
  kubectl apply -f "$ROOT/examples" | sed 's/^/  /'
  wait_settled 300

  say "A completion through the router (residency chat chat-small ...)"
  residency chat chat-small "Where does the scheduler place each model?" --router "http://127.0.0.1:$ROUTER_PORT" \
    --token-file "$DEMO/client.token" --max-tokens 24 | sed 's/^/  answer (random weights, so random words): /'
  printf '  without a token: HTTP %s\n' "$(curl -s -o /dev/null -w '%{http_code}' \
    "http://127.0.0.1:$ROUTER_PORT/v1/models")"
  sleep 2

  say "kubectl get llm -A -o wide"
  kubectl get llm -A -o wide
  cat <<TXT

What this shows: each model was validated, planned and placed by the operator, and loaded by the worker
of the node it was given. RESIDENT% is the share of its weight bytes the planner chose to keep in (here
emulated) GPU memory; the rest stays in pinned host memory and is streamed to the device or computed on
the CPU (the execution mode the planner chose: kubectl get modelplacements -o wide). TOK/S is the
decode rate the worker measured.
Nodes have different memory (gpu-a 24 MiB, gpu-b 20 MiB, gpu-c 8 MiB, emulated). Where the models do not
all fit whole, larger, less sensitive models get partial residency instead of being refused; the
RESIDENT% column above shows what the planner chose this time. Timings in status are measured
(kubectl get llm coder -o yaml) and say emulated: true because this machine has no GPU.

Calling the router needs a token the API server accepts, whose subject may \`infer\` on the model
(docs/serving.md). The demo's ServiceAccount default/demo-client has one in $DEMO/client.token:

  export KUBECONFIG=$KUBECONFIG
  residency chat assistant "hello" --router http://127.0.0.1:$ROUTER_PORT --token-file $DEMO/client.token
  curl -H "Authorization: Bearer \$(cat $DEMO/client.token)" http://127.0.0.1:$ROUTER_PORT/v1/models
  OPENAI_BASE_URL=http://127.0.0.1:$ROUTER_PORT/v1 OPENAI_API_KEY=\$(kubectl create token demo-client) python -c \\
    'import openai; print(openai.OpenAI().chat.completions.create(model="chat-small", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content)'
  kubectl get llm,modelplacements,nodeprofiles -A
  make cluster-down          # stop everything (demo processes and control plane) and remove the cluster
TXT
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
