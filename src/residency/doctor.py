"""`residency doctor`: one screen that says whether each piece is reachable and healthy, and what to do.

Checks run in the order the pieces depend on each other: the API server, the CRDs, the operator (its
Lease), the router, each worker (its NodeProfile heartbeat and its /healthz), then a line per model that
is not Ready. The judging functions are pure (dicts in, :class:`Check` out) and unit-tested; `gather`
does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from residency.api import GROUP
from residency.sizing import memory_text

CRD_PLURALS = ("llmmodels", "modelplacements", "nodeprofiles", "sensitivityprofiles")
LEASE_NAME = "residency-operator"
HEARTBEAT_GRACE_SECONDS = 60.0
SETTLED_PHASES = frozenset({"Ready", "Idle"})


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it is fine, what was seen, what to do."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    warning: bool = False  # not broken, but worth a look (does not fail the command)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def check_crds(crds: Iterable[dict[str, Any]]) -> Check:
    """Every residency CRD installed and Established."""
    established = set()
    found = set()
    for crd in crds:
        spec = crd.get("spec") or {}
        if spec.get("group") != GROUP:
            continue
        plural = (spec.get("names") or {}).get("plural")
        found.add(plural)
        conditions = (crd.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            established.add(plural)
    missing = [p for p in CRD_PLURALS if p not in found]
    pending = [p for p in CRD_PLURALS if p in found and p not in established]
    if missing:
        return Check(
            "CRDs",
            False,
            f"missing: {', '.join(missing)}",
            "install them: kubectl apply --server-side -f crds/ (or the Helm chart with crds.enabled=true)",
        )
    if pending:
        return Check("CRDs", False, f"not Established yet: {', '.join(pending)}", "wait a few seconds")
    return Check("CRDs", True, f"{len(CRD_PLURALS)} installed and Established")


def check_lease(lease: dict[str, Any] | None, now: datetime, namespace: str) -> Check:
    """The operator holds its Lease and renewed it within twice its duration."""
    start = (
        "start it: residency operator --models-root DIR (or check the operator Deployment's logs: "
        "kubectl -n residency logs deploy/residency-operator)"
    )
    if lease is None:
        return Check("operator", False, f"no Lease {namespace}/{LEASE_NAME}: it never ran here", start)
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = _parse_time(spec.get("renewTime"))
    duration = float(spec.get("leaseDurationSeconds") or 15)
    if not holder or renewed is None:
        return Check("operator", False, "its Lease is released: no operator leads", start)
    age = (now - renewed).total_seconds()
    if age > 2 * duration:
        return Check(
            "operator", False, f"leader {holder} last renewed its Lease {age:.0f} s ago (stopped?)", start
        )
    return Check("operator", True, f"leader {holder}, Lease renewed {age:.0f} s ago")


def check_router(url: str, health: Callable[[str], tuple[bool, str]]) -> Check:
    """The router answers /healthz."""
    ok, detail = health(f"{url.rstrip('/')}/healthz")
    if ok:
        return Check("router", True, f"{url} healthy")
    return Check(
        "router",
        False,
        f"{url}: {detail}",
        "start it (residency router --port PORT), or point --router / RESIDENCY_ROUTER at it "
        "(make demo prints its URL)",
    )


def check_worker(profile: dict[str, Any], now: datetime, health: Callable[[str], tuple[bool, str]]) -> Check:
    """A worker's NodeProfile heartbeat is fresh and its endpoint answers /healthz."""
    spec = profile.get("spec") or {}
    node = spec.get("nodeName") or (profile.get("metadata") or {}).get("name", "?")
    name = f"worker {node}"
    beat = _parse_time((profile.get("status") or {}).get("heartbeatTime"))
    tier = "emulated GPU tier" if spec.get("emulated") else str(spec.get("gpuType") or "GPU")
    budget = int(spec.get("gpuMemoryBytes") or 0)
    facts = f"{tier}, {memory_text(budget)}"
    if beat is None or (now - beat).total_seconds() > HEARTBEAT_GRACE_SECONDS:
        seen = "never" if beat is None else f"{(now - beat).total_seconds():.0f} s ago"
        return Check(
            name,
            False,
            f"{facts}; last heartbeat {seen}: the planner gives it no work",
            f"is `residency worker --node {node} --join` running? its log says why it stopped",
        )
    endpoint = spec.get("workerEndpoint")
    if not endpoint:
        return Check(name, True, f"{facts}; heartbeat fresh (no endpoint registered to probe)")
    ok, detail = health(f"{str(endpoint).rstrip('/')}/healthz")
    if not ok:
        return Check(
            name,
            False,
            f"{facts}; heartbeat fresh but {endpoint} does not answer: {detail}",
            "the router and the operator reach workers at this URL: check the worker's --port and "
            "network policy",
        )
    return Check(name, True, f"{facts}; heartbeat fresh, {endpoint} healthy")


def check_models(models: Iterable[dict[str, Any]]) -> list[Check]:
    """One warning per model that is not serving, with its reason and message."""
    checks: list[Check] = []
    total = 0
    for model in models:
        total += 1
        status = model.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase in SETTLED_PHASES:
            continue
        meta = model.get("metadata") or {}
        checks.append(
            Check(
                f"model {meta.get('namespace')}/{meta.get('name')}",
                False,
                f"{phase} ({status.get('reason') or 'no reason yet'}): {status.get('message') or ''}".strip(),
                f"kubectl describe llm -n {meta.get('namespace')} {meta.get('name')}",
                warning=True,
            )
        )
    if not checks:
        checks.append(Check("models", True, f"{total} model(s), all Ready or Idle"))
    return checks


def render(checks: Iterable[Check]) -> str:
    """The report, one line per check and an indented hint under each failure."""
    lines = []
    for check in checks:
        mark = "ok  " if check.ok else ("warn" if check.warning else "FAIL")
        lines.append(f"[{mark}] {check.name:<20} {check.detail}")
        if not check.ok and check.hint:
            lines.append(f"       {'':<20} -> {check.hint}")
    return "\n".join(lines)


def http_health(url: str) -> tuple[bool, str]:
    """GET url: (healthy, what went wrong)."""
    import httpx

    try:
        response = httpx.get(url, timeout=3.0)
    except httpx.HTTPError as exc:
        return False, f"unreachable ({type(exc).__name__})"
    if response.status_code != 200:
        return False, f"HTTP {response.status_code}"
    return True, ""


def gather(router_url: str, lease_namespace: str) -> list[Check]:
    """Run every check against the cluster in $KUBECONFIG (or in-cluster credentials)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from residency.api import VERSION
    from residency.kubeapi import TimeoutApiClient

    try:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    except (config.ConfigException, OSError) as exc:
        return [
            Check("API server", False, f"no credentials: {exc}", "export KUBECONFIG=$PWD/.cluster/kubeconfig")
        ]
    api = TimeoutApiClient(connect_seconds=3.0, read_seconds=10.0)
    host = api.configuration.host
    try:
        version = client.VersionApi(api).get_code()
    except Exception as exc:  # any failure to reach it is the finding itself
        return [
            Check(
                "API server",
                False,
                f"{host}: unreachable ({type(exc).__name__})",
                "start it (make cluster) or check KUBECONFIG",
            )
        ]
    checks = [Check("API server", True, f"{host}, Kubernetes {version.git_version}")]
    crds = client.ApiextensionsV1Api(api).list_custom_resource_definition().to_dict()["items"]
    crds = [
        {
            "spec": {"group": c["spec"]["group"], "names": {"plural": c["spec"]["names"]["plural"]}},
            "status": {"conditions": (c.get("status") or {}).get("conditions") or []},
        }
        for c in crds
    ]
    checks.append(check_crds(crds))
    if not checks[-1].ok:
        return checks
    now = datetime.now(UTC)
    try:
        found = client.CoordinationV1Api(api).read_namespaced_lease(LEASE_NAME, lease_namespace)
        spec = (found.to_dict() or {}).get("spec") or {}
        lease: dict[str, Any] | None = {
            "spec": {
                "holderIdentity": spec.get("holder_identity"),
                "renewTime": spec.get("renew_time"),
                "leaseDurationSeconds": spec.get("lease_duration_seconds"),
            }
        }
    except ApiException as exc:
        if exc.status != 404:
            raise
        lease = None
    checks.append(check_lease(lease, now, lease_namespace))
    checks.append(check_router(router_url, http_health))
    custom = client.CustomObjectsApi(api)
    profiles = custom.list_cluster_custom_object(GROUP, VERSION, "nodeprofiles")["items"]
    if not profiles:
        checks.append(
            Check(
                "workers",
                False,
                "no NodeProfile: no worker has joined",
                "start one per GPU node: residency worker --node NAME --join ...",
            )
        )
    for profile in sorted(profiles, key=lambda p: str(p["metadata"]["name"])):
        checks.append(check_worker(profile, now, http_health))
    models = custom.list_cluster_custom_object(GROUP, VERSION, "llmmodels")["items"]
    checks.extend(check_models(models))
    return checks
