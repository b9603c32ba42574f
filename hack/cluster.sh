#!/usr/bin/env bash
# A real local control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.
#   hack/cluster.sh up      start (idempotent: reuses a running one), print `export KUBECONFIG=...`
#   hack/cluster.sh down    stop every process it started (by PID) and remove the data dir
#   hack/cluster.sh status  exit 0 when the API server answers /readyz
#   hack/cluster.sh restart-apiserver | restart-etcd   (fault injection for tests)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${RESIDENCY_CLUSTER_DIR:-$ROOT/.cluster}"
BIN="${RESIDENCY_BIN:-$("$ROOT/hack/build-binaries.sh" path)}"
API_PORT="${RESIDENCY_API_PORT:-16443}"
ETCD_PORT="${RESIDENCY_ETCD_PORT:-23790}"
ETCD_PEER_PORT=$((ETCD_PORT + 10))
KCM_PORT="${RESIDENCY_KCM_PORT:-16257}"
SCHED_PORT="${RESIDENCY_SCHED_PORT:-16259}"
KUBECONFIG_PATH="$DIR/kubeconfig"
PKI="$DIR/pki"

log() { printf '[cluster] %s\n' "$*" >&2; }

alive() { [ -f "$DIR/pids/$1" ] && kill -0 "$(cat "$DIR/pids/$1")" 2>/dev/null; }

ready() {
  [ -f "$KUBECONFIG_PATH" ] || return 1
  if [ -x "$BIN/kubectl" ]; then
    "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=3s get --raw /readyz >/dev/null 2>&1
  else  # (the scale harness needs no kubectl)
    curl -sf --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
      "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
  fi
}

cert() { # name CN O [san]
  local name=$1 cn=$2 org=$3 san=${4:-}
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  local subj="/CN=$cn"
  [ -n "$org" ] && subj="/O=$org$subj"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext="$PKI/$name.ext"
  if [ -n "$san" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' >"$ext"
  fi
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
}

kubeconfig() { # path user-cert-name
  local path=$1 user=$2
  cat >"$path" <<KC
apiVersion: v1
kind: Config
clusters:
- name: residency-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $user
  user:
    client-certificate: $PKI/$user.crt
    client-key: $PKI/$user.key
contexts:
- name: residency-local
  context: {cluster: residency-local, user: $user}
current-context: residency-local
KC
}

make_pki() {
  [ -f "$PKI/ca.crt" ] && return
  mkdir -p "$PKI"
  log "generating certificates in $PKI"
  openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=residency-local-ca" -days 365 -out "$PKI/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  cert admin admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  kubeconfig "$KUBECONFIG_PATH" admin
  kubeconfig "$DIR/controller-manager.kubeconfig" controller-manager
  kubeconfig "$DIR/scheduler.kubeconfig" scheduler
}

start() { # name cmd...
  local name=$1; shift
  alive "$name" && return
  mkdir -p "$DIR/pids" "$DIR/logs"
  setsid "$@" >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name"
}

start_etcd() {
  start etcd "$BIN/etcd" --name residency --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "residency=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "" --log-level warn --quota-backend-bytes 2147483648
}

start_apiserver() {
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.0.0.0/24 --authorization-mode Node,RBAC --allow-privileged=true \
    --profiling=false --v=1
}

start_controllers() {
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$DIR/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller' --v=1
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig "$DIR/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --v=1
}

wait_ready() {
  for _ in $(seq 1 120); do
    ready && return 0
    if ! alive kube-apiserver; then
      log "kube-apiserver exited; last log lines:"; tail -20 "$DIR/logs/kube-apiserver.log" >&2; return 1
    fi
    sleep 0.5
  done
  log "kube-apiserver did not become ready in 60 s"; tail -20 "$DIR/logs/kube-apiserver.log" >&2
  return 1
}

stop() { # name
  local f="$DIR/pids/$1"
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    # a killed process holds its listening sockets until it is gone: a restart that binds the same
    # ports before then fails ("address already in use") and leaves the cluster without that component
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}

wait_port_free() { # port: until nothing listens there (10 s at most)
  for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0
    sleep 0.2
  done
  log "port $1 is still in use"
}

up() {
  local needed="etcd kube-apiserver"
  [ "${RESIDENCY_CLUSTER_CONTROLLERS:-true}" = false ] || needed="$needed kube-controller-manager kube-scheduler kubectl"
  for b in $needed; do
    [ -x "$BIN/$b" ] || { log "missing $BIN/$b: run hack/build-binaries.sh (make binaries)"; exit 1; }
  done
  if ready && alive etcd && alive kube-apiserver; then
    log "reusing the running control plane"
  else
    make_pki
    start_etcd
    start_apiserver
    wait_ready
    log "kube-apiserver ready on https://127.0.0.1:$API_PORT"
  fi
  # the scale harness measures only what residency puts on the API server: no controllers there
  [ "${RESIDENCY_CLUSTER_CONTROLLERS:-true}" = false ] || start_controllers
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
}

case "${1:-up}" in
  up) up ;;
  down)
    for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$p"; done
    rm -rf "$DIR"
    log "stopped and removed $DIR"
    ;;
  status) ready ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  restart-apiserver) stop kube-apiserver; wait_port_free "$API_PORT"; start_apiserver; wait_ready ;;
  restart-etcd) stop etcd; wait_port_free "$ETCD_PORT"; wait_port_free "$ETCD_PEER_PORT"; start_etcd; wait_ready ;;
  *) echo "usage: $0 up|down|status|kubeconfig|restart-apiserver|restart-etcd" >&2; exit 2 ;;
esac
