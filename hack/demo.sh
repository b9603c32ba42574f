#!/usr/bin/env bash
# `make demo`: a real local control plane, the operator, the router, three worker processes posing as
# three GPU nodes of different (emulated) sizes, four models applied with `kubectl apply -f examples/`, a
# real completion through the router, what the planner chose (read back from the cluster), a
# preemption by a model of higher priority followed by the resume, with the seconds the worker measured,
# and last a fourth node with two emulated GPUs on which a model too big for any one GPU runs split.
# `hack/demo.sh down` stops what it started.
#
# Environment: RESIDENCY_DEMO_ROUTER_PORT (18000), RESIDENCY_DEMO_WORKER_PORT (18101: the first of three),
# RESIDENCY_DEMO_MODELS (/tmp/residency-demo/models; the manifests are rewritten to match), and the
# control plane's RESIDENCY_API_PORT, RESIDENCY_ETCD_PORT, RESIDENCY_KCM_PORT, RESIDENCY_SCHED_PORT.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="$ROOT/.demo"
EXAMPLES_ROOT=/tmp/residency-demo/models       # the path the examples/ manifests name
MODELS="${RESIDENCY_DEMO_MODELS:-$EXAMPLES_ROOT}"
VENV_BIN="$ROOT/.venv/bin"
BIN="$("$ROOT/hack/build-binaries.sh" path)"
export PATH="$VENV_BIN:$BIN:$PATH"
ROUTER_PORT="${RESIDENCY_DEMO_ROUTER_PORT:-18000}"
WORKER_PORT="${RESIDENCY_DEMO_WORKER_PORT:-18101}"
# The fleet (tests/unit/test_demo_fleet.py plans it and checks that a model ends partly resident):
# name:gpu-memory per node, name:arch:preset:seed:layers per model. coder and summarizer (the small preset's
# widths at 24 layers) need about 40 MiB whole with their KV cache, more than any node has, and about 18 MiB
# at the 25 % residency their offload.maxFraction allows: each runs partly resident, whatever bandwidths
# the workers measure.
DEMO_NODES=(gpu-a:32MiB gpu-b:24MiB gpu-c:8MiB)
DEMO_MODELS=(chat-small:llama:tiny:1:4 assistant:qwen2:tiny:2:4 coder:llama:small:3:24 summarizer:qwen2:small:4:24 urgent:llama:small:5:10 wide:llama:small:6:24)
URGENT="$ROOT/examples/preemption/urgent.yaml"
# The last step's node with two emulated GPUs (name:gpu-memory of each:GPUs), and the model that fits on no
# single GPU of the fleet (tests/component/test_demo_fleet.py plans it: it runs split across gpu-d's GPUs).
SPLIT_NODE=gpu-d:24MiB:2
WIDE="$ROOT/examples/multi-gpu/wide.yaml"

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

manifests() { # the demo's manifests with the model root this run uses
  local file
  for file in "$ROOT"/examples/*.yaml "$@"; do
    echo "---"
    sed "s#$EXAMPLES_ROOT#$MODELS#g" "$file"
  done
}

down() {
  if [ -f "${RESIDENCY_CLUSTER_DIR:-$ROOT/.cluster}/kubeconfig" ] && "$ROOT/hack/cluster.sh" status 2>/dev/null; then
    export KUBECONFIG="${RESIDENCY_CLUSTER_DIR:-$ROOT/.cluster}/kubeconfig"
    manifests "$URGENT" "$WIDE" | kubectl delete -f - --ignore-not-found --timeout=60s >/dev/null 2>&1 || true
    kubectl delete rolebinding demo-client-inference -n default --ignore-not-found >/dev/null 2>&1 || true
    kubectl delete serviceaccount demo-client -n default --ignore-not-found >/dev/null 2>&1 || true
    kubectl delete clusterrole residency-inference --ignore-not-found >/dev/null 2>&1 || true
  fi
  local spec
  for spec in "${DEMO_NODES[@]}" "$SPLIT_NODE"; do
    [ -n "${KUBECONFIG:-}" ] && kubectl delete node "${spec%%:*}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    # a profile left from an earlier run would count as a registered node before its worker is back
    [ -n "${KUBECONFIG:-}" ] && kubectl delete nodeprofile "${spec%%:*}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  done
  for f in "$DEMO"/pids/*; do [ -e "$f" ] && stop_pid "$f"; done
  rm -rf "$DEMO"
}

phase_of() { kubectl get llm "$1" -o jsonpath='{.status.phase}' 2>/dev/null || true; }

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

wait_for() { # seconds description command...: until the command succeeds
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  while [ $SECONDS -lt $deadline ]; do "$@" && return 0; sleep 1; done
  echo "timed out waiting for $what"; kubectl get llm -o wide; return 1
}

preempted_models() { kubectl get llm -o jsonpath='{range .items[?(@.status.phase=="Preempted")]}{.metadata.name}{"\n"}{end}'; }

last_event() { # model reason: the message of its newest Event with that reason
  kubectl get events --field-selector "involvedObject.name=$1,reason=$2" \
    --sort-by=.lastTimestamp -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' 2>/dev/null | tail -1
}

explain_placements() { # the planner's choice, read from the models' and placements' status
  python3 - "$(kubectl get llm -o json)" "$(kubectl get modelplacements -o json)" "$(kubectl get nodeprofiles -o json)" <<'PY'
import json, sys

models, placements, profiles = (json.loads(a)["items"] for a in sys.argv[1:4])
why = {p["spec"]["model"]["name"]: p["spec"].get("reason") or "" for p in placements}
nodes = {p["spec"]["nodeName"]: p["spec"]["gpuMemoryBytes"] for p in profiles}

def mib(value):
    return f"{value / 2**20:.1f} MiB"

print("Nodes: " + ", ".join(f"{n} {mib(b)}" for n, b in sorted(nodes.items())) + " of (emulated) GPU memory.")
partial = 0
for m in sorted(models, key=lambda m: m["metadata"]["name"]):
    s, spec = m.get("status") or {}, m["spec"]
    name, fraction = m["metadata"]["name"], s.get("residentFraction")
    if s.get("phase") != "Ready" or fraction is None:
        print(f"  {name}: {s.get('phase')} ({s.get('reason')}): {s.get('message')}")
        continue
    weights = s.get("weightBytes") or 0
    rate = (s.get("observed") or {}).get("decodeTokensPerSecond")
    predicted = s.get("predictedDecodeTokensPerSecond")
    measured = f"{rate:.0f} tok/s measured" if rate is not None else "no request measured yet"
    if rate is not None and predicted:
        measured += f" (planner predicted {predicted:.0f}, for a GPU)"
    line = (f"  {name}: {fraction * 100:.0f}% of its {mib(weights)} of weights on {s['node']}'s GPU, "
            f"mode {s.get('executionMode')}, {measured}")
    if fraction < 0.999:
        partial += 1
        line += (f"\n      partly resident: {mib(weights * (1 - fraction))} stay in host memory and are "
                 + ("streamed to the GPU each step" if s.get("executionMode") == "stream" else "computed by the CPU")
                 + f" (offload.maxFraction allows {spec.get('offload', {}).get('maxFraction', 0.75) * 100:.0f}%)"
                 + (f"\n      planner: {why[name]}" if why.get(name) else ""))
    print(line)
print()
if partial:
    print(f"{partial} model(s) partly resident: rather than refuse a model that does not fit whole, the planner")
    print("kept part of it in host memory, with the split and the mode that its prediction of decode speed favours.")
    print("Measured rates are far below the predictions here: the planner predicts for a GPU and this tier is")
    print("emulated on the CPU; each such model has a DecodeBelowPrediction Warning and DecodeAsPredicted=False.")
else:
    print("DEMO CHECK FAILED: no model is partly resident (tests/unit/test_demo_fleet.py says one should be).")
    sys.exit(1)
PY
}

split_step() { # port: a node with two GPUs joins, and a model too big for any one GPU runs split across both
  local node memory gpus
  IFS=: read -r node memory gpus <<<"$SPLIT_NODE"
  say "Multi-GPU: node $node joins with $gpus (emulated) GPUs of $memory; kubectl apply -f examples/multi-gpu/wide.yaml"
  kubectl delete nodeprofile "$node" --ignore-not-found >/dev/null 2>&1 || true
  printf '{"apiVersion":"v1","kind":"Node","metadata":{"name":"%s","labels":{"residency.dev/gpu":"true"}}}' "$node" \
    | kubectl apply -f - >/dev/null
  start "worker-$node" residency worker --node "$node" --emulated-gpus "$gpus" --gpu-memory "$memory" \
    --models-root "$MODELS" --port "$1" --admin-token-file "$DEMO/admin.token" \
    --inference-token-file "$DEMO/inference.token" --join --node-heartbeat --calibration-mib 32
  wait_for 120 "the NodeProfile of $node" bash -c "kubectl get nodeprofile $node -o name >/dev/null 2>&1"
  echo "  $node: $(kubectl get nodeprofile "$node" -o jsonpath='{.spec.gpuCount} GPUs: {range .spec.gpus[*]}GPU {.index} {.memoryBytes} bytes, {end}')"
  manifests "$WIDE" | kubectl apply -f - | grep wide | sed 's/^/  /'
  wait_for 180 "wide to be Ready" bash -c '[ "$(kubectl get llm wide -o jsonpath={.status.phase})" = Ready ]'
  kubectl get llm wide -o wide
  local gpu_set; gpu_set=$(kubectl get llm wide -o jsonpath='{.status.gpuSet}')
  echo "  wide runs on $gpu_set, per GPU (the worker's measurement):"
  kubectl get llm wide -o jsonpath='{range .status.gpus[*]}    GPU {.index}: {.residentFraction} of the weights, {.residentBytes} bytes with its KV{"\n"}{end}'
  echo "  its placement's spec.gpus (the planner's split, pipeline order): $(kubectl get modelplacements -o jsonpath='{range .items[?(@.spec.model.name=="wide")]}{.spec.gpus}{end}')"
  residency chat wide "Which GPUs hold which layers?" --token-file "$DEMO/client.token" --max-tokens 16 \
    | sed 's/^/  answer through the router (random weights): /'
  case "$gpu_set" in
    "$node/0,1" | "$node/1,0") ;;
    *) echo "DEMO CHECK FAILED: wide is not split across $node's two GPUs (gpuSet '$gpu_set')"; return 1 ;;
  esac
}

up() {
  say "Control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built from source, cached)"
  eval "$("$ROOT/hack/cluster.sh" up)"
  kubectl version 2>/dev/null | sed 's/^/  /'
  kubectl apply --server-side --force-conflicts -f "$ROOT/crds" | sed 's/^/  /'
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

  mkdir -p "$DEMO/pids" "$DEMO/logs" "$MODELS"
  say "Six models made locally (random weights, real Llama/Qwen2 configs, safetensors, local tokenizers)"
  for spec in "${DEMO_MODELS[@]}"; do
    IFS=: read -r name arch preset seed layers <<<"$spec"
    if [ "$(cat "$MODELS/$name/.demo-spec" 2>/dev/null)" != "$spec" ]; then
      rm -rf "${MODELS:?}/$name"
      residency make-model "$MODELS/$name" --arch "$arch" --preset "$preset" --seed "$seed" --layers "$layers" >/dev/null
      echo "$spec" >"$MODELS/$name/.demo-spec"
    fi
    printf '  %-11s %-6s %-6s %2s layers %s\n' "$name" "$arch" "$preset" "$layers" "$(du -sh --exclude=.demo-spec "$MODELS/$name" | cut -f1)"
  done
  head -c 32 /dev/urandom | base64 >"$DEMO/admin.token"
  head -c 32 /dev/urandom | base64 >"$DEMO/inference.token"  # workers serve only the router, which holds it
  chmod 600 "$DEMO/admin.token" "$DEMO/inference.token"

  say "Three GPU nodes: a Node object each and a real worker process (torch; EMULATED GPU tier, no GPU here)"
  local port=$WORKER_PORT
  for spec in "${DEMO_NODES[@]}"; do
    IFS=: read -r node memory <<<"$spec"
    kubectl delete nodeprofile "$node" --ignore-not-found >/dev/null 2>&1 || true  # left by an earlier run
    printf '{"apiVersion":"v1","kind":"Node","metadata":{"name":"%s","labels":{"residency.dev/gpu":"true"}}}' "$node" \
      | kubectl apply -f - >/dev/null
    start "worker-$node" residency worker --node "$node" --gpu-memory "$memory" --models-root "$MODELS" \
      --port "$port" --admin-token-file "$DEMO/admin.token" --inference-token-file "$DEMO/inference.token" \
      --join --node-heartbeat --calibration-mib 32
    port=$((port + 1))
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
  export RESIDENCY_ROUTER="http://127.0.0.1:$ROUTER_PORT"
  for _ in $(seq 1 120); do
    [ "$(kubectl get nodeprofiles -o name 2>/dev/null | wc -l)" -ge 3 ] && break
    sleep 1
  done
  kubectl get nodeprofiles | sed 's/^/  /'

  say "kubectl apply -f examples/"
  manifests | kubectl apply -f - | sed 's/^/  /'
  wait_settled 300

  say "A completion through the router: residency chat chat-small ... (RESIDENCY_ROUTER=$RESIDENCY_ROUTER)"
  residency chat chat-small "Where does the scheduler place each model?" --token-file "$DEMO/client.token" \
    --max-tokens 24 | sed 's/^/  answer (random weights, so random words): /'
  printf '  without a token: HTTP %s\n' "$(curl -s -o /dev/null -w '%{http_code}' "$RESIDENCY_ROUTER/v1/models")"
  local model
  for model in assistant coder summarizer; do  # one request each, so that every model has a measured rate
    residency chat "$model" "Summarise the plan." --token-file "$DEMO/client.token" --max-tokens 16 >/dev/null
  done
  sleep 3

  say "kubectl get llm -o wide"
  kubectl get llm -o wide
  say "kubectl get modelplacements -o wide"
  kubectl get modelplacements -o wide
  say "What the planner chose (read from the status above)"
  explain_placements

  say "Preemption: kubectl apply -f examples/preemption/urgent.yaml (priority 5, above summarizer's 1; whole on one GPU)"
  local before; before=$(preempted_models)
  manifests "$URGENT" | kubectl apply -f - | grep urgent | sed 's/^/  /'
  wait_for 180 "urgent to be Ready" bash -c '[ "$(kubectl get llm urgent -o jsonpath={.status.phase})" = Ready ]'
  local victims; victims=$(comm -13 <(echo "$before" | sort) <(preempted_models | sort) | tr '\n' ' ')
  kubectl get llm -o wide
  if [ -z "${victims// }" ]; then
    echo "DEMO CHECK FAILED: urgent runs but preempted no model"; return 1
  fi
  local victim
  for victim in $victims; do
    wait_for 60 "the ModelPreempted Event of $victim" bash -c "[ -n \"\$(kubectl get events --field-selector involvedObject.name=$victim,reason=ModelPreempted -o name)\" ]"
    echo "  $victim: $(kubectl get llm "$victim" -o jsonpath='{.status.message}')"
    echo "  $victim (Event ModelPreempted): $(last_event "$victim" ModelPreempted)"
  done
  echo "  urgent (Event ModelLoaded): $(last_event urgent ModelLoaded)"

  say "Resume: kubectl delete llm urgent; the preempted model(s) come back from host memory"
  kubectl delete llm urgent --timeout=120s | sed 's/^/  /'
  for victim in $victims; do
    wait_for 180 "$victim to resume" bash -c "[ \"\$(kubectl get llm $victim -o jsonpath={.status.phase})\" = Ready ]"
    wait_for 60 "the ModelResumed Event of $victim" bash -c "[ -n \"\$(kubectl get events --field-selector involvedObject.name=$victim,reason=ModelResumed -o name)\" ]"
    echo "  $victim (Event ModelResumed): $(last_event "$victim" ModelResumed)"
    echo "  $victim (Event ModelLoaded, its cold load from disk for comparison): $(last_event "$victim" ModelLoaded)"
    echo "  $victim status.lastOperation: $(kubectl get llm "$victim" -o jsonpath='{.status.lastOperation}')"
  done
  kubectl get llm -o wide

  split_step "$port"

  cat <<TXT

Every figure above is read from the cluster: the planner's choice from the ModelPlacements, the rates and
seconds from what the workers measured (emulated: true, since this machine has no GPU: they show the
mechanism, not GPU speed). The full history of a model: kubectl describe llm coder

Calling the router needs a token the API server accepts, whose subject may \`infer\` on the model
(docs/serving.md). The demo's ServiceAccount default/demo-client has one in $DEMO/client.token:

  export KUBECONFIG=$KUBECONFIG
  export RESIDENCY_ROUTER=$RESIDENCY_ROUTER
  residency chat assistant "hello" --token-file $DEMO/client.token
  curl -H "Authorization: Bearer \$(cat $DEMO/client.token)" \$RESIDENCY_ROUTER/v1/models
  OPENAI_BASE_URL=\$RESIDENCY_ROUTER/v1 OPENAI_API_KEY=\$(kubectl create token demo-client) python -c \\
    'import openai; print(openai.OpenAI().chat.completions.create(model="chat-small", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content)'
  residency doctor
  kubectl get llm,modelplacements,nodeprofiles -A
  make cluster-down          # stop everything (demo processes and control plane) and remove the cluster
TXT
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
