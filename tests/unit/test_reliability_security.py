"""Reliability, security: least-privilege RBAC as the chart renders it, bearer tokens on the worker and
router APIs (rejected when missing or wrong, never logged), models only from allowed roots, and
trust_remote_code only where the admin allows it per model root.

The same RBAC is enforced for real, against the API server, in e2e/test_reliability_badinput.py.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from residency.modeldir import ModelDirError, inspect_model_dir
from residency_operator.config import OperatorConfig
from residency_operator.validation import validate_model

pytestmark = pytest.mark.reliability
MakeDir = Callable[..., Path]  # tests/conftest.py's make_model_dir (not imported: `make reliability` also
# collects e2e/, whose conftest.py would shadow this directory's under the same module name)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "residency"
ADMIN_TOKEN = "sec-admin-7f3a9c"  # test-only secrets, distinctive so that a leak is unmistakable
INFERENCE_TOKEN = "sec-inference-2b8e1d"
CLIENT_TOKEN = "sec-client-5c4f0a"
WRONG_TOKEN = "sec-wrong-9d6e3b"

# verbs and resources that would let a component widen its own rights or read what it must not
DANGEROUS_VERBS = {"*", "escalate", "bind", "impersonate"}
DANGEROUS_RESOURCES = {"*", "secrets", "pods/exec", "pods/attach", "nodes/proxy", "serviceaccounts/token"}


# -- the chart's RBAC ----------------------------------------------------------------------------------
def _helm() -> Path | None:
    out = subprocess.run(
        [str(REPO / "hack" / "build-binaries.sh"), "path"], capture_output=True, text=True, check=False
    )
    path = Path(out.stdout.strip()) / "helm"
    return path if out.returncode == 0 and path.exists() else None


def render(*sets: str) -> list[dict[str, Any]]:
    helm = _helm()
    if helm is None:
        pytest.skip("helm binary not built (hack/build-binaries.sh)")
    args = [str(helm), "template", "rel", str(CHART), "-n", "residency", "--kube-version", "1.34.4"]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


ROUTER_GRANTS = {
    ("residency.dev", "llmmodels", "list"),
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
}


def find_role(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def grants(objects: list[dict[str, Any]], kind: str, name: str) -> set[tuple[str, str, str]]:
    role = next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [""])
        for resource in rule.get("resources", rule.get("nonResourceURLs", []))
        for verb in rule["verbs"]
    }


def test_chart_rbac_grants_no_component_more_than_it_uses(reliability: Any) -> None:
    reliability.record(injected="helm template (defaults, capacity requests on); every Role/ClusterRole")
    checked = 0
    for sets in (
        (),
        ("operator.capacityRequests.enabled=true", "router.auth=token", "router.clientTokenSecret=client"),
    ):
        objects = render(*sets)
        roles = [o for o in objects if o["kind"] in ("Role", "ClusterRole")]
        for role in roles:
            for group, resource, verb in grants(objects, role["kind"], role["metadata"]["name"]):
                checked += 1
                where = f"{role['metadata']['name']}: {verb} {resource}.{group}"
                assert verb not in DANGEROUS_VERBS, where
                assert resource not in DANGEROUS_RESOURCES, where
        for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
            assert binding["roleRef"]["name"].startswith("rel-residency-"), "binds a built-in role"
            assert all(s["kind"] == "ServiceAccount" for s in binding["subjects"])
    objects = render()
    worker = grants(objects, "ClusterRole", "rel-residency-worker")
    # placements: list and watch (with its node's label selector) and patch; never get, create or delete
    placement_verbs = {verb for group, resource, verb in worker if resource == "modelplacements"}
    assert placement_verbs == {"list", "watch", "patch"}
    assert not {r for _, r, _ in worker} & {"llmmodels", "secrets", "pods"}
    # profiles it measured: it publishes its own and reads which exist; never deletes or watches them
    profile_verbs = {verb for _, resource, verb in worker if resource == "sensitivityprofiles"}
    assert profile_verbs == {"list", "create", "patch"}
    assert ("", "nodes", "get") in worker and ("", "nodes", "patch") not in worker
    lease = grants(objects, "Role", "rel-residency-worker-lease")
    assert lease == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    pods = grants(objects, "Role", "rel-residency-worker-pods")
    assert pods == {("", "pods", "patch")}, "only its own namespace's pods, only to annotate"
    router = grants(objects, "ClusterRole", "rel-residency-router")
    assert router == ROUTER_GRANTS, "the router reads models and reviews callers; it writes no model"
    assert grants(objects, "Role", "rel-residency-router-wake") == {
        ("", "configmaps", "get"),
        ("", "configmaps", "patch"),
    }
    wake = find_role(objects, "Role", "rel-residency-router-wake")
    assert wake["rules"][0]["resourceNames"] == ["residency-wake"], "its one ConfigMap, by name"
    reliability.record(
        measured=f"{checked} grants checked: 0 wildcard/escalate/bind/impersonate, 0 Secret reads"
    )
    reliability.record(
        measured="worker: placements list+watch+patch only, no get; its node Lease; no models, no Secrets"
    )


def test_chart_admission_policy_confines_worker_writes_to_its_node(reliability: Any) -> None:
    reliability.record(injected="helm template: the worker's ValidatingAdmissionPolicy and its binding")
    objects = render()
    policy = next(o for o in objects if o["kind"] == "ValidatingAdmissionPolicy")
    binding = next(o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding")
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    rules = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert set(rules["resources"]) == {
        "modelplacements",
        "modelplacements/status",
        "nodeprofiles",
        "nodeprofiles/status",
    }
    assert set(rules["operations"]) >= {"CREATE", "UPDATE"}
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert "system:serviceaccount:residency:rel-residency-worker" in condition
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "variables.node == variables.target" in expressions and "variables.node != ''" in expressions
    assert not any(o["kind"] == "ValidatingAdmissionPolicy" for o in render("admissionPolicy.enabled=false"))
    reliability.record(measured="Fail-closed, Deny; CREATE/UPDATE of placements, profiles and their status")


def test_chart_tokens_travel_as_files_and_only_where_needed(reliability: Any) -> None:
    reliability.record(injected="helm template: where the admin and inference tokens are mounted")
    objects = render("router.auth=token", "router.clientTokenSecret=client")
    text = yaml.safe_dump_all(o for o in objects if o["kind"] != "Secret")
    daemonset = next(o for o in objects if o["kind"] == "DaemonSet")
    deployments = {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in objects if o["kind"] == "Deployment"}
    worker = daemonset["spec"]["template"]["spec"]
    args = " ".join(worker["containers"][0]["args"])
    assert "--admin-token-file=" in args and "--inference-token-file=" in args
    env_names = {e["name"] for c in worker["containers"] for e in c.get("env", [])}
    assert not {"RESIDENCY_ADMIN_TOKEN", "RESIDENCY_INFERENCE_TOKEN"} & env_names, "tokens in env"
    assert "secretKeyRef" not in text, "a token is passed through the environment"
    mounts = {m["name"]: m for m in worker["containers"][0]["volumeMounts"]}
    assert mounts["token"]["readOnly"] is True
    router_pod = deployments["router"]["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in router_pod["volumes"] if "secret" in v}
    # the router holds the inference token only: the admin token never leaves the worker pods
    assert secrets["worker-token"]["items"] == [{"key": "inference-token", "path": "inference-token"}]
    operator_pod = deployments["operator"]["spec"]["template"]["spec"]
    assert not [v for v in operator_pod["volumes"] if "secret" in v], "the operator pod mounts a token"
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert set(secret["data"]) == {"admin-token", "inference-token"}
    for value in secret["data"].values():
        assert value not in text, "a generated token appears outside its Secret"
    reliability.record(measured="worker: tokens as read-only files; router: inference token only")
    reliability.record(measured="operator container: no token; no token in args, env or other objects")


def test_chart_remote_code_roots_are_off_unless_listed(reliability: Any) -> None:
    reliability.record(injected="helm template with remoteCodeRoots unset and set to /models/trusted")

    def flags(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
        found = {}
        for kind in ("Deployment", "DaemonSet"):
            # the operator's Deployment (the router's has no model roots)
            owner = next(
                o for o in objects if o["kind"] == kind and not o["metadata"]["name"].endswith("-router")
            )
            container = owner["spec"]["template"]["spec"]["containers"][0]
            found[kind] = [a for a in container["args"] if a.startswith("--trust-remote-code-root")]
        return found

    assert flags(render()) == {"Deployment": [], "DaemonSet": []}
    on = flags(render("remoteCodeRoots={/models/trusted}"))
    assert on == {k: ["--trust-remote-code-root=/models/trusted"] for k in ("Deployment", "DaemonSet")}
    reliability.record(measured="default: no --trust-remote-code-root anywhere; listed root reaches both")


# -- bearer tokens on the worker's and the router's APIs ----------------------------------------------
@pytest.fixture(scope="module")
def empty_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An engine with no model: every auth decision is taken before any model is touched."""
    from residency_worker.engine import Engine, make_gpu_tier

    root = tmp_path_factory.mktemp("models")
    engine = Engine(make_gpu_tier(2**20, force_emulated=True), [root], node="sec", calibration_bytes=0)
    yield engine
    engine.close()


ADMIN_CALLS = [
    ("GET", "/admin/node", None),
    ("POST", "/admin/models", {"name": "m", "path": "/nowhere"}),
    ("GET", "/admin/models/m", None),
    ("DELETE", "/admin/models/m", None),
    ("POST", "/admin/models/m/residency", {"resident_fraction": 0.5}),
    ("POST", "/admin/models/m/preempt", None),
    ("POST", "/admin/models/m/resume", None),
    ("POST", "/admin/profile", {"path": "/nowhere"}),
]
INFERENCE_CALLS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
]


def presented(token: str) -> list[dict[str, str]]:
    """Authorization headers that must all be refused when `token` is the right one."""
    return [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {WRONG_TOKEN}"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token.upper()}"},
        {"Authorization": f"Bearer {token}\x00"},
        {"Authorization": f"Bearer {token},{token}"},
        {"X-Api-Key": token},
    ]


async def _status(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> int:
    return (await client.request(method, path, json=body, headers=headers)).status_code


async def test_worker_and_router_refuse_missing_and_wrong_tokens(
    empty_engine: Any, caplog: pytest.LogCaptureFixture, reliability: Any
) -> None:
    from residency_operator.router.app import ModelTable
    from residency_operator.router.app import create_app as create_router
    from residency_worker.server import ServerSettings, create_app

    reliability.record(injected="13 wrong/missing Authorization forms x admin, inference and router calls")
    caplog.set_level(logging.DEBUG)
    app = create_app(empty_engine, ServerSettings(admin_token=ADMIN_TOKEN, inference_token=INFERENCE_TOKEN))
    refused = wrong = 0
    problems: list[str] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
        for calls, token, other in (
            (ADMIN_CALLS, ADMIN_TOKEN, INFERENCE_TOKEN),
            (INFERENCE_CALLS, INFERENCE_TOKEN, ADMIN_TOKEN),
        ):
            for method, path, body in calls:
                for headers in [*presented(token), {"Authorization": f"Bearer {other}"}]:
                    status = await _status(client, method, path, body, headers)
                    refused += status == 401
                    if status != 401:
                        problems.append(f"{method} {path} {headers}: {status}")
                right = await _status(client, method, path, body, {"Authorization": f"Bearer {token}"})
                if right in (401, 403) and path != "/admin/profile" and path != "/admin/models":
                    wrong += 1
                    problems.append(f"{method} {path} with the right token: {right}")
        assert (await client.get("/healthz")).status_code == 200, "probes need no token"
    # no admin token configured: the admin API is closed to everyone, whatever they present
    closed = create_app(empty_engine, ServerSettings(admin_token=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=closed), base_url="http://w") as client:
        for method, path, body in ADMIN_CALLS:
            for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"Authorization": "Bearer "}):
                status = await _status(client, method, path, body, headers)
                refused += status == 401
                if status != 401:
                    problems.append(f"closed admin API {method} {path}: {status}")
    # the router's client token
    table = ModelTable(lambda: [])
    table.refresh()
    router = create_router(table, hold_seconds=0.1, token=CLIENT_TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://r") as client:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for headers in presented(CLIENT_TOKEN):
                status = await _status(client, "POST", path, {"model": "m"}, headers)
                refused += status == 401
                if status != 401:
                    problems.append(f"router {path} {headers}: {status}")
            right = await _status(
                client, "POST", path, {"model": "m"}, {"Authorization": f"Bearer {CLIENT_TOKEN}"}
            )
            if right != 404:
                problems.append(f"router {path} with the right token: {right}")
    assert problems == [], "\n".join(problems)
    # both checks compare in constant time (a plain == leaks the matching prefix length by timing)
    from residency import httpguard
    from residency_operator.router import auth as router_auth
    from residency_worker.server import auth as worker_auth

    assert "compare_digest" in inspect.getsource(httpguard.bearer_matches)
    assert "bearer_matches" in inspect.getsource(worker_auth._check_token)
    assert "bearer_matches" in inspect.getsource(router_auth.StaticTokenAccess)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (ADMIN_TOKEN, INFERENCE_TOKEN, CLIENT_TOKEN, WRONG_TOKEN):
        assert secret not in logged, "a token was logged"
    reliability.record(
        measured=f"{refused}/{refused} bad or missing tokens refused with 401; right tokens pass"
    )
    reliability.record(
        measured=f"admin API without a configured token: closed; {len(caplog.records)} log lines, 0 tokens"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow_reliability
def test_worker_process_never_logs_tokens(tmp_path: Path, reliability: Any) -> None:
    """The real `residency worker` at debug level, with uvicorn's access log: no token in its output."""
    reliability.record(injected="worker process at --log-level debug; right, wrong and odd tokens presented")
    (tmp_path / "models").mkdir()
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    port = _free_port()
    env = {**os.environ, "RESIDENCY_INFERENCE_TOKEN": INFERENCE_TOKEN, "PYTHONUNBUFFERED": "1"}
    command = [
        str(Path(sys.executable).parent / "residency"),
        "worker",
        "--standalone",
        "--node=sec",
        "--gpu-memory=16MiB",
        f"--models-root={tmp_path / 'models'}",
        f"--port={port}",
        f"--admin-token-file={tmp_path / 'admin'}",
        "--calibration-mib=1",
        "--log-level=debug",
    ]
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    sent = 0
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the worker did not start"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        statuses = []
        for token in (ADMIN_TOKEN, INFERENCE_TOKEN, WRONG_TOKEN, f"{ADMIN_TOKEN}x"):
            for method, path in (
                ("GET", "/admin/node"),
                ("GET", "/v1/models"),
                ("POST", "/admin/models/m/preempt"),
            ):
                response = httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {token}"})
                statuses.append(response.status_code)
                sent += 1
        assert statuses.count(200) == 2, statuses  # the admin token on /admin/node, the user's on /v1/models
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
        log.close()
    output = (tmp_path / "worker.log").read_text(errors="replace")
    assert "GET /admin/node" in output, "uvicorn's access log was not captured"
    leaked = [t for t in (ADMIN_TOKEN, INFERENCE_TOKEN, f"{ADMIN_TOKEN}x") if t in output]
    assert leaked == [], f"tokens in the worker's log: {leaked}"
    reliability.record(
        measured=f"{sent} requests, {len(output.splitlines())} log lines: 0 admin/inference tokens"
    )


# -- models only from allowed roots; remote code only where the admin allows it ----------------------
def test_model_paths_outside_the_allowed_roots_are_refused(
    tmp_path: Path, make_model_dir: MakeDir, reliability: Any
) -> None:
    reliability.record(injected="paths escaping the roots: .., symlinks, NUL, bidi/zero-width, /proc, long")
    root = tmp_path / "root"
    good = make_model_dir("good", root=root)
    secret = make_model_dir("secret", root=tmp_path / "other-tenant")
    os.symlink(secret, root / "alias")
    os.symlink(root / "alias", root / "alias-of-alias")
    os.symlink("/proc/self/root", root / "proc")
    cases = {
        "dotdot": f"{root}/../other-tenant/secret",
        "dotdot-deep": f"{good}/../../other-tenant/secret",
        "symlink": str(root / "alias"),
        "symlink-chain": str(root / "alias-of-alias"),
        "proc-root": f"{root}/proc{secret}",
        "absolute-outside": str(secret),
        "root-prefix-trick": f"{root}-evil/m",
        "relative": "root/good",
        "nul": f"{good}\x00",
        "rtl-override": f"{root}/\u202egood",
        "zero-width": f"{root}/go\u200bod",
        "bom": f"{root}/\ufeffgood",
        "c1-control": f"{root}/\x85good",
        "name-too-long": f"{root}/{'n' * 4000}",
    }
    reasons = {}
    for name, path in cases.items():
        with pytest.raises(ModelDirError) as refused:
            inspect_model_dir(path, [root])
        reasons[name] = refused.value.reason
        verdict = validate_model({"source": {"path": path}}, [root])
        assert getattr(verdict, "phase", None) == "Failed", name
    assert set(reasons.values()) <= {"PathNotAllowed", "ModelNotFound"}, reasons
    outside = [n for n, r in reasons.items() if r == "PathNotAllowed"]
    assert set(outside) >= {"dotdot", "symlink", "symlink-chain", "proc-root", "absolute-outside", "nul"}
    assert inspect_model_dir(str(good), [root]).path == good
    reliability.record(
        measured=f"{len(cases)}/{len(cases)} refused ({len(outside)} PathNotAllowed, rest ModelNotFound)"
    )


def test_remote_code_is_refused_unless_its_root_allows_it(
    tmp_path: Path, make_model_dir: MakeDir, monkeypatch: pytest.MonkeyPatch, reliability: Any
) -> None:
    reliability.record(injected="auto_map models under plain and remote-code roots; env/flag defaults")
    plain, trusted = tmp_path / "plain", tmp_path / "trusted"
    config = json.loads((make_model_dir("template", root=tmp_path / "template") / "config.json").read_text())
    custom = {**config, "auto_map": {"AutoModelForCausalLM": "modeling.Custom"}}
    under_plain = make_model_dir("custom", custom, root=plain)
    under_trusted = make_model_dir("custom", custom, root=trusted)
    native = make_model_dir("native", root=trusted)
    roots = [plain, trusted]
    for path in (under_plain, under_trusted):
        with pytest.raises(ModelDirError) as refused:
            inspect_model_dir(str(path), roots)
        assert refused.value.reason == "RemoteCodeNotAllowed"
    with pytest.raises(ModelDirError) as refused:
        inspect_model_dir(str(under_plain), roots, remote_code_roots=[trusted])
    assert refused.value.reason == "RemoteCodeNotAllowed"
    assert inspect_model_dir(str(under_trusted), roots, remote_code_roots=[trusted]).trust_remote_code is True
    assert inspect_model_dir(str(native), roots, remote_code_roots=[trusted]).trust_remote_code is False
    # a remote-code root that is not an allowed root opens nothing
    with pytest.raises(ModelDirError) as refused:
        inspect_model_dir(str(under_trusted), [plain], remote_code_roots=[trusted])
    assert refused.value.reason == "PathNotAllowed"
    monkeypatch.delenv("RESIDENCY_REMOTE_CODE_ROOTS", raising=False)
    assert OperatorConfig.from_env().remote_code_roots == []
    monkeypatch.setenv("RESIDENCY_REMOTE_CODE_ROOTS", f"{trusted}{os.pathsep}/x")
    assert OperatorConfig.from_env().remote_code_roots == [trusted, Path("/x")]
    reliability.record(measured="default: refused everywhere; allowed root: trust only for auto_map models")
    reliability.record(
        measured="other roots stay refused; a remote-code root outside the allowed roots: refused"
    )
