"""Reliability against the real API server: bad LLMModel manifests, broken model directories, and RBAC.

- 44 malformed manifests (types, ranges, unknown fields, huge strings, path traversal, unicode tricks,
  immutable-field changes), each refused by `kubectl apply`/`replace` with a message naming the field.
- Schema-valid models whose directories are broken or outside the allowed roots: the operator sets each
  Failed with the expected reason and a message, keeps planning the good one, and never restarts.
- (long) Directories that only a load can expose: the worker's failure reaches the model's status as
  Failed with the worker's reason while a good model on the same node is Ready and serves.
- The chart's RBAC and admission policy applied to the API server, checked by impersonation and with a
  real pod-bound worker token: no Secret reads, writes confined to the worker's own node.
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import os
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import NodePool, purge_models
from harness import GOOD, REPO, SMALL_LIMITS, Process, apply, binaries_dir, get_json, kubectl, llm, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

DELETE = object()


def spec(**changes: Any) -> dict[str, Any]:
    """GOOD with spec fields changed; `a__b` is spec.a.b, DELETE removes a field."""
    manifest = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        node = manifest["spec"]
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return manifest


def meta(**changes: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(GOOD)
    manifest["metadata"].update(changes)
    return manifest


# (category, id, manifest, text the refusal must contain: the field it names)
MANIFESTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("types", "priority-float", spec(priority=1.5), "spec.priority"),
    ("types", "priority-bool", spec(priority=True), "spec.priority"),
    ("types", "dtype-number", spec(dtype=16), "spec.dtype"),
    ("types", "slo-string", spec(slo="fast"), "spec.slo"),
    ("types", "offload-list", spec(offload=[0.5]), "spec.offload"),
    ("types", "max-seq-string", spec(maxSequenceLength="4k"), "spec.maxSequenceLength"),
    ("types", "source-string", spec(source="/models/a"), "spec.source"),
    ("types", "idle-after-float", spec(idle__afterSeconds=1.5), "spec.idle.afterSeconds"),
    ("ranges", "priority-above-max", spec(priority=1_000_001), "spec.priority"),
    ("ranges", "max-seq-above-max", spec(maxSequenceLength=2**20 + 1), "spec.maxSequenceLength"),
    ("ranges", "batch-above-max", spec(maxBatchSize=1025), "spec.maxBatchSize"),
    ("ranges", "batch-negative", spec(maxBatchSize=-1), "spec.maxBatchSize"),
    ("ranges", "slo-above-max", spec(slo__minDecodeTokensPerSecond=1e7), "spec.slo.minDecodeTokensPerSecond"),
    ("ranges", "offload-above-1", spec(offload__maxFraction=2), "spec.offload.maxFraction"),
    ("ranges", "idle-above-30-days", spec(idle__afterSeconds=30 * 86400 + 1), "spec.idle.afterSeconds"),
    ("unknown-fields", "spec-gpu", spec(gpu=1), "spec.gpu"),
    ("unknown-fields", "slo-max-latency", spec(slo__maxLatency=5), "spec.slo.maxLatency"),
    ("unknown-fields", "offload-device", spec(offload__device="nvme"), "spec.offload.device"),
    ("unknown-fields", "snake-case", spec(max_sequence_length=10), "spec.max_sequence_length"),
    ("unknown-fields", "user-trusts-remote-code", spec(trustRemoteCode=True), "spec.trustRemoteCode"),
    ("huge-strings", "name-254-chars", meta(name="n" * 254), "metadata.name"),
    ("huge-strings", "dtype-100k", spec(dtype="b" * 100_000), "spec.dtype"),
    ("huge-strings", "path-4097", spec(source__path="/" + "p" * 4096), "spec.source.path"),
    ("huge-strings", "annotation-300k", meta(annotations={"a": "v" * 300_000}), "metadata.annotations"),
    ("huge-strings", "label-value-100", meta(labels={"team": "t" * 100}), "metadata.labels"),
    ("path-traversal", "dotdot-etc", spec(source__path="/models/../../etc/shadow"), "spec.source.path"),
    ("path-traversal", "trailing-dotdot", spec(source__path="/models/chat/.."), "spec.source.path"),
    ("path-traversal", "dot-then-dotdot", spec(source__path="/models/./../etc"), "spec.source.path"),
    ("path-traversal", "home-tilde", spec(source__path="~/models/chat"), "spec.source.path"),
    ("path-traversal", "windows-backslash", spec(source__path="\\models\\chat"), "spec.source.path"),
    ("path-traversal", "nul-byte", spec(source__path="/models/chat\x00.txt"), "spec.source.path"),
    ("unicode-tricks", "rtl-override", spec(source__path="/models/\u202etxt.exe"), "spec.source.path"),
    ("unicode-tricks", "zero-width-space", spec(source__path="/models/chat\u200b"), "spec.source.path"),
    ("unicode-tricks", "byte-order-mark", spec(source__path="/models/\ufeffchat"), "spec.source.path"),
    ("unicode-tricks", "c1-control", spec(source__path="/models/\x85chat"), "spec.source.path"),
    ("unicode-tricks", "fullwidth-solidus", spec(source__path="\uff0fmodels\uff0fchat"), "spec.source.path"),
    ("unicode-tricks", "cyrillic-name", meta(name="ch\u0430t"), "metadata.name"),
    ("unicode-tricks", "dtype-zero-width", spec(dtype="bfloat16\u200b"), "spec.dtype"),
    ("unicode-tricks", "fullwidth-digits", spec(priority="\uff11\uff10\uff10"), "spec.priority"),
]

# changes to an existing LLMModel (kubectl replace) that the API server must refuse
IMMUTABLE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("uid", lambda o: o["metadata"].update(uid=str(uuid.uuid4())), "UID in precondition"),
    ("stale-resource-version", lambda o: o["metadata"].update(resourceVersion="1"), "has been modified"),
    ("namespace", lambda o: o["metadata"].update(namespace="kube-system"), "namespace"),
    ("api-version", lambda o: o.update(apiVersion="residency.dev/v1"), 'version "residency.dev/v1"'),
    ("kind", lambda o: o.update(kind="LLMModelX"), 'kind "LLMModelX"'),
]


def test_malformed_manifests_are_refused_naming_the_field(namespace: str, reliability: Any) -> None:
    total = len(MANIFESTS) + len(IMMUTABLE)
    categories = collections.Counter(c for c, *_ in MANIFESTS) + collections.Counter(
        {"immutable": len(IMMUTABLE)}
    )
    reliability.record(injected=f"{total} malformed LLMModel manifests via kubectl apply/replace")
    wrong: list[str] = []
    for category, name, manifest, field in MANIFESTS:
        manifest = copy.deepcopy(manifest)
        if name not in ("name-254-chars", "cyrillic-name"):
            manifest["metadata"]["name"] = f"m-{name}"
        result = apply(manifest, namespace, check=False)
        if result.returncode == 0:
            wrong.append(f"{category}/{name}: accepted")
        elif field not in result.stderr:
            wrong.append(f"{category}/{name}: message does not name {field}: {result.stderr[:300]}")
    # immutable-field changes on an object that exists
    existing = copy.deepcopy(GOOD)
    existing["metadata"]["name"] = "immutable"
    apply(existing, namespace)
    current = get_json("llm", "immutable", "-n", namespace)
    for name, change, text in IMMUTABLE:
        changed = copy.deepcopy(current)
        change(changed)
        result = kubectl("replace", "-n", namespace, "-f", "-", stdin=json.dumps(changed), check=False)
        if result.returncode == 0:
            wrong.append(f"immutable/{name}: accepted")
        elif text not in result.stderr:
            wrong.append(f"immutable/{name}: message lacks {text!r}: {result.stderr[:300]}")
    after = get_json("llm", "immutable", "-n", namespace)
    assert after["metadata"]["uid"] == current["metadata"]["uid"], "the object was replaced"
    assert after["spec"] == current["spec"]
    assert wrong == [], "\n".join(wrong)
    listed = kubectl("get", "llm", "-n", namespace, "-o", "name").stdout.split()
    assert listed == ["llmmodel.residency.dev/immutable"], listed
    assert len(MANIFESTS) + len(IMMUTABLE) >= 30
    reliability.record(measured=f"{total}/{total} refused at apply naming the field; 0 objects created")
    reliability.record(measured=", ".join(f"{c} {n}" for c, n in categories.items()))


# -- broken model directories against the operator (and, long, a worker) ---------------------------------
@dataclass(frozen=True)
class BrokenModel:
    name: str
    path: Path
    reason: str


def _config(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "config.json").read_text()))


def _set_config(directory: Path, **changes: Any) -> None:
    config = {**_config(directory), **changes}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def broken_models(root: Path, outside: Path, good: Path) -> list[BrokenModel]:
    """Model directories the operator refuses before placing anything (reason from the operator)."""
    made: list[BrokenModel] = []

    def variant(name: str, reason: str, mutate: Callable[[Path], None]) -> None:
        shutil.copytree(good, root / name)
        mutate(root / name)
        made.append(BrokenModel(name, root / name, reason))

    weights = "model.safetensors"
    variant(
        "weights-garbage",
        "WeightsCorrupt",
        lambda d: (d / weights).write_bytes(b"\x08" + b"\x00" * 7 + b"{oops}"),
    )
    variant(
        "weights-truncated",
        "WeightsCorrupt",
        lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:-512]),
    )
    variant("weights-missing", "WeightsMissing", lambda d: (d / weights).unlink())
    variant("config-missing", "ConfigMissing", lambda d: (d / "config.json").unlink())
    variant(
        "config-malformed", "ConfigInvalid", lambda d: (d / "config.json").write_text("{'single': 'quotes'}")
    )
    variant("config-layers-disagree", "ConfigInvalid", lambda d: _set_config(d, num_hidden_layers=40))
    variant("config-absurd-width", "ConfigInvalid", lambda d: _set_config(d, hidden_size=2**40))
    variant("arch-unsupported", "UnsupportedArchitecture", lambda d: _set_config(d, model_type="bert"))
    variant("remote-code", "RemoteCodeNotAllowed", lambda d: _set_config(d, auto_map={"AutoModel": "x.Y"}))
    variant("tokenizer-missing", "TokenizerMissing", lambda d: (d / "tokenizer.json").unlink())

    def fifo(d: Path) -> None:
        (d / weights).unlink()
        os.mkfifo(d / weights)

    variant("weights-fifo", "PathNotAllowed", fifo)
    (outside / "config.json").write_text((good / "config.json").read_text())

    def link_config(d: Path) -> None:
        (d / "config.json").unlink()
        os.symlink(outside / "config.json", d / "config.json")

    variant("link-file-escapes", "PathNotAllowed", link_config)
    shutil.copytree(good, outside / "elsewhere")
    os.symlink(outside / "elsewhere", root / "link-dir-escapes")
    made.append(BrokenModel("link-dir-escapes", root / "link-dir-escapes", "PathNotAllowed"))
    made.append(BrokenModel("path-outside-roots", outside / "elsewhere", "PathNotAllowed"))
    made.append(BrokenModel("path-absent", root / "absent", "ModelNotFound"))
    made.append(BrokenModel("path-is-a-file", good / "config.json", "ModelNotFound"))
    made.append(BrokenModel("path-name-too-long", root / ("x" * 300), "ModelNotFound"))
    return made


def worker_only_broken(root: Path, good: Path) -> list[BrokenModel]:
    """Directories that look sound to the operator; only the worker's load can tell (worker's reason)."""
    from safetensors.torch import load_file, save_file

    made: list[BrokenModel] = []
    shutil.copytree(good, root / "tokenizer-corrupt")
    (root / "tokenizer-corrupt" / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    made.append(BrokenModel("tokenizer-corrupt", root / "tokenizer-corrupt", "TokenizerInvalid"))
    shutil.copytree(good, root / "tensor-missing")
    tensors = load_file(root / "tensor-missing" / "model.safetensors")
    tensors.pop("model.norm.weight")
    save_file(tensors, root / "tensor-missing" / "model.safetensors")
    made.append(BrokenModel("tensor-missing", root / "tensor-missing", "WeightsInvalid"))
    shutil.copytree(good, root / "width-disagrees")
    _set_config(root / "width-disagrees", hidden_size=96)
    made.append(BrokenModel("width-disagrees", root / "width-disagrees", "WeightsInvalid"))
    return made


@pytest.fixture(scope="module")
def input_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An allowed models root with a good tiny model; and a directory outside it."""
    from residency.modelgen import make_model

    base = tmp_path_factory.mktemp("badinput")
    root, outside = base / "models", base / "outside"
    outside.mkdir()
    make_model(root / "good", arch="llama", preset="tiny", seed=7)
    return root, outside


def start_operator(cluster: str, root: Path, log: Path) -> Process:
    return Process(
        "operator",
        ["operator", "--models-root", str(root)],
        log,
        env={
            "KUBECONFIG": cluster,
            "RESIDENCY_RESYNC_SECONDS": "3",
            "RESIDENCY_HEARTBEAT_GRACE_SECONDS": "20",
        },
    ).start()


def phases(namespace: str) -> dict[str, dict[str, Any]]:
    items = json.loads(kubectl("get", "llm", "-n", namespace, "-o", "json").stdout)["items"]
    return {m["metadata"]["name"]: m.get("status") or {} for m in items}


def settle(
    namespace: str, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float, what: str
) -> dict[str, dict[str, Any]]:
    """The namespace's model statuses once `done` holds; on timeout, says where each model stood."""
    deadline = time.monotonic() + timeout
    while True:
        seen = phases(namespace)
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            where = {name: (s.get("phase"), s.get("reason")) for name, s in sorted(seen.items())}
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {where}")
        time.sleep(0.5)


def assert_healthy(operator: Process) -> None:
    assert operator.alive(), f"the operator exited: {operator.log()[-3000:]}"
    log = operator.log()
    for sign in ("Traceback", "planning round failed"):
        assert sign not in log, log[log.index(sign) - 2000 : log.index(sign) + 2000]


def test_operator_fails_broken_models_with_reason_and_never_restarts(
    cluster: str, namespace: str, input_root: tuple[Path, Path], tmp_path: Path, reliability: Any
) -> None:
    root, outside = input_root
    work = tmp_path / "models"
    shutil.copytree(root, work, symlinks=True)
    broken = broken_models(work, outside, work / "good")
    reliability.record(
        injected=f"{len(broken)} schema-valid models with broken/escaping dirs + 1 good, at once"
    )
    operator = start_operator(cluster, work, tmp_path / "operator.log")
    try:
        started = time.monotonic()
        pid = operator.popen.pid if operator.popen else None
        manifests = [llm(b.name, b.path, **SMALL_LIMITS) for b in broken] + [
            llm("good", work / "good", **SMALL_LIMITS)
        ]
        apply("\n---\n".join(yaml.safe_dump(m) for m in manifests), namespace)

        def settled(seen: dict[str, dict[str, Any]]) -> bool:
            assert_healthy(operator)
            done = all(seen.get(b.name, {}).get("phase") == "Failed" for b in broken)
            return done and bool(seen.get("good", {}).get("reason"))

        seen = settle(namespace, settled, 90, "every broken model Failed")
        elapsed = time.monotonic() - started
        wrong = []
        for model in broken:
            status = seen[model.name]
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            validated = conditions.get("Validated", {})
            if status.get("reason") != model.reason or not status.get("message"):
                wrong.append(
                    f"{model.name}: {status.get('reason')} {status.get('message')!r}, want {model.reason}"
                )
            elif validated.get("status") != "False" or validated.get("reason") != model.reason:
                wrong.append(f"{model.name}: Validated condition {validated}")
        assert wrong == [], "\n".join(wrong)
        assert seen["good"].get("phase") != "Failed", seen["good"]

        # reasons are also posted as Warning Events
        def warned() -> set[str]:
            events = kubectl(
                "get", "events", "-n", namespace, "--field-selector", "type=Warning", "-o", "json"
            ).stdout
            return {e["involvedObject"]["name"] for e in json.loads(events)["items"]}

        # (Events go out in the background, moments after the statuses)
        wait_for(lambda: warned() >= {b.name for b in broken}, 30, what="a Warning Event per broken model")
        time.sleep(4)  # one more resync round over the same broken models
        assert_healthy(operator)
        assert operator.popen is not None and operator.popen.pid == pid
    finally:
        operator.stop()
    reasons = collections.Counter(b.reason for b in broken)
    reliability.record(
        measured=f"{len(broken)}/{len(broken)} Failed with the expected reason+message in {elapsed:.1f} s"
    )
    reliability.record(measured=f"reasons {dict(sorted(reasons.items()))}; a Warning Event for each")
    good = seen["good"]
    reliability.record(
        measured=f"good {good.get('phase')} ({good.get('reason')}); operator 0 restarts/tracebacks"
    )


@pytest.mark.slow_reliability
def test_worker_load_failures_reach_status_while_a_good_model_serves(
    cluster: str, namespace: str, input_root: tuple[Path, Path], tmp_path: Path, reliability: Any
) -> None:
    root, _ = input_root
    work = tmp_path / "models"
    shutil.copytree(root, work, symlinks=True)
    broken = worker_only_broken(work, work / "good")
    reliability.record(injected=f"{len(broken)} dirs only a load exposes + 1 good model on one worker node")
    operator = start_operator(cluster, work, tmp_path / "operator.log")
    pool = NodePool(cluster, work, tmp_path)
    try:
        node = pool.add(f"badinput-{uuid.uuid4().hex[:6]}", "256MiB")
        manifests = [llm(b.name, b.path, **SMALL_LIMITS) for b in broken] + [
            llm("good", work / "good", **SMALL_LIMITS)
        ]
        apply("\n---\n".join(yaml.safe_dump(m) for m in manifests), namespace)

        def settled(seen: dict[str, dict[str, Any]]) -> bool:
            assert_healthy(operator)
            assert node.process.alive(), node.process.log()[-3000:]
            done = all(seen.get(b.name, {}).get("phase") == "Failed" for b in broken)
            return done and seen.get("good", {}).get("phase") == "Ready"

        seen = settle(namespace, settled, 180, "good Ready and the broken ones Failed")
        wrong = [
            f"{b.name}: {seen[b.name].get('reason')} {seen[b.name].get('message')!r}, want {b.reason}"
            for b in broken
            if seen[b.name].get("reason") != b.reason or not seen[b.name].get("message")
        ]
        assert wrong == [], "\n".join(wrong)
        response = httpx.post(
            f"{node.url}/v1/completions",
            json={"model": f"{namespace}/good", "prompt": "Hello", "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert node.process.alive() and "Traceback" not in node.process.log(), node.process.log()[-3000:]
        assert_healthy(operator)
    finally:
        pool.close()
        operator.stop()
        purge_models(namespace)
    reasons = ", ".join(sorted({b.reason for b in broken}))
    reliability.record(measured=f"{len(broken)}/{len(broken)} Failed with the worker's reason ({reasons})")
    reliability.record(measured="good model Ready on the same node and served a completion; 0 restarts")


# -- RBAC and the worker admission policy, enforced by the API server ------------------------------------
RBAC_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Secret",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def helm_template(release: str, namespace: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            str(binaries_dir() / "helm"),
            "template",
            release,
            str(REPO / "charts" / "residency"),
            "-n",
            namespace,
            "--kube-version",
            json.loads(kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@dataclass
class ApiAs:
    """Raw calls to the API server with one bearer token, as the worker's own client makes them (kubectl
    would GET before a PATCH, which the worker may not)."""

    server: str
    verify: str
    token: str

    @classmethod
    def of(cls, cluster: str, token: str, workdir: Path) -> ApiAs:
        view = json.loads(
            kubectl("config", "view", "--minify", "--raw", "-o", "json", "--kubeconfig", cluster).stdout
        )
        entry = view["clusters"][0]["cluster"]
        authority = entry.get("certificate-authority")
        if authority is None:
            authority = str(workdir / "ca.crt")
            Path(authority).write_bytes(base64.b64decode(entry["certificate-authority-data"]))
        return cls(entry["server"], authority, token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        """(HTTP status, response text) of one call; writes are dry runs (admission still applies)."""
        dry = "?dryRun=All" if method in ("POST", "PATCH", "DELETE") else ""
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        response = httpx.request(
            method,
            f"{self.server}{path}{dry}",
            content=json.dumps(body) if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type},
            verify=ssl.create_default_context(cafile=self.verify),
            timeout=30,
        )
        return response.status_code, response.text


@pytest.fixture
def chart_rbac(cluster: str) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """The chart's ServiceAccounts, roles, bindings, token Secret and admission policy, applied for real."""
    suffix = uuid.uuid4().hex[:6]
    release, namespace = f"rbac-{suffix}", f"e2e-rbac-{suffix}"
    kubectl("create", "namespace", namespace)
    objects = [o for o in helm_template(release, namespace) if o["kind"] in RBAC_KINDS]
    apply("\n---\n".join(yaml.safe_dump(o) for o in objects), namespace)
    yield release, namespace, objects
    for obj in reversed(objects):
        scope = (
            ["-n", namespace] if obj["kind"] in ("ServiceAccount", "Role", "RoleBinding", "Secret") else []
        )
        kubectl("delete", obj["kind"], obj["metadata"]["name"], *scope, "--wait=false", check=False)
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# (service account, verb, resource, extra args, allowed): what least privilege means, asked by impersonation
CAN_I: list[tuple[str, str, str, tuple[str, ...], bool]] = [
    ("worker", "get", "secrets", ("-n", "{ns}"), False),
    ("worker", "list", "secrets", ("-n", "{ns}"), False),
    ("worker", "watch", "secrets", ("-A",), False),
    ("worker", "get", "secrets/{release}-residency-worker-token", ("-n", "{ns}"), False),
    ("worker", "get", "secrets", ("-n", "kube-system"), False),
    ("worker", "get", "modelplacements.residency.dev", (), False),
    ("worker", "watch", "modelplacements.residency.dev", (), True),  # its node's, by label selector
    ("worker", "list", "modelplacements.residency.dev", (), True),
    ("worker", "delete", "modelplacements.residency.dev", (), False),
    ("worker", "list", "llmmodels.residency.dev", ("-A",), False),
    ("worker", "get", "nodes", (), True),
    ("worker", "patch", "nodes", (), False),
    ("worker", "create", "pods/exec", ("-n", "{ns}"), False),
    ("worker", "create", "serviceaccounts/token", ("-n", "{ns}"), False),
    ("worker", "impersonate", "serviceaccounts", ("-n", "{ns}"), False),
    ("worker", "escalate", "clusterroles", (), False),
    ("operator", "get", "secrets", ("-n", "{ns}"), False),
    ("operator", "list", "secrets", ("-A",), False),
    ("operator", "create", "pods", ("-n", "team-a"), False),
    ("operator", "update", "leases.coordination.k8s.io/another", ("-n", "{ns}"), False),
    ("router", "get", "secrets", ("-n", "{ns}"), False),
    ("router", "list", "modelplacements.residency.dev", (), False),
    ("router", "delete", "llmmodels.residency.dev", ("-n", "team-a"), False),
]


def placement(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "residency.dev/v1alpha1",
        "kind": "ModelPlacement",
        "metadata": {"name": name, "labels": {"residency.dev/node": node}},
        "spec": {
            "model": {"namespace": "team-a", "name": name},
            "nodeName": node,
            "sourcePath": "/models/x",
            "residentFraction": 1.0,
        },
    }


def test_rbac_and_admission_policy_are_enforced_by_the_api_server(
    cluster: str, chart_rbac: tuple[str, str, list[dict[str, Any]]], tmp_path: Path, reliability: Any
) -> None:
    release, namespace, _ = chart_rbac
    reliability.record(injected="chart RBAC+policy applied; impersonation + a real pod-bound worker token")
    # 1. impersonation: what each component's ServiceAccount may do
    wrong = []
    for account, verb, resource, extra, allowed in CAN_I:
        resource = resource.format(release=release)
        args = [a.format(ns=namespace) for a in extra]
        result = kubectl(
            "auth",
            "can-i",
            verb,
            resource,
            f"--as=system:serviceaccount:{namespace}:{release}-residency-{account}",
            *args,
            check=False,
        )
        if (result.stdout.strip() == "yes") != allowed:
            wrong.append(
                f"{account} {verb} {resource} {' '.join(args)}: {result.stdout.strip()}, want {allowed}"
            )
    assert wrong == [], "\n".join(wrong)

    # 2. a real worker: a pod-bound token for a pod on node A (no kubelet: the Pod object stands in)
    suffix = uuid.uuid4().hex[:6]
    node_a, node_b = f"rbac-a-{suffix}", f"rbac-b-{suffix}"
    mine, theirs = f"mine-{suffix}", f"theirs-{suffix}"
    worker_sa = f"{release}-residency-worker"
    group = "/apis/residency.dev/v1alpha1"
    try:
        for node in (node_a, node_b):
            apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "worker-a"},
            "spec": {
                "serviceAccountName": worker_sa,
                "nodeName": node_a,
                "automountServiceAccountToken": False,
                "containers": [{"name": "worker", "image": "residency:test"}],
            },
        }
        apply(pod, namespace)
        apply(placement(mine, node_a))
        apply(placement(theirs, node_b))
        token = ["create", "token", worker_sa, "-n", namespace, "--duration=1h"]
        bound = kubectl(*token, "--bound-object-kind=Pod", "--bound-object-name=worker-a").stdout.strip()
        worker = ApiAs.of(cluster, bound, tmp_path)
        unbound = ApiAs.of(cluster, kubectl(*token).stdout.strip(), tmp_path)
        state = {"status": {"state": "Loaded"}}
        # the policy takes a moment to load after it is created: wait until it denies
        wait_for(
            lambda: "its own node"
            in worker.call("PATCH", f"{group}/modelplacements/{theirs}/status", state)[1],
            30,
            what="the admission policy to deny",
        )

        def profile(node: str) -> dict[str, Any]:
            return {
                "apiVersion": "residency.dev/v1alpha1",
                "kind": "NodeProfile",
                "metadata": {"name": node},
                "spec": {
                    "nodeName": node,
                    "gpuType": "x",
                    "gpuCount": 1,
                    "gpuMemoryBytes": 1,
                    "hostMemoryBytes": 1,
                    "hostToDeviceGbps": 1.0,
                    "hbmGbps": 1.0,
                    "emulated": True,
                },
            }

        relabel = {"metadata": {"labels": {"residency.dev/node": node_b}}}
        steal = {"metadata": {"labels": {"residency.dev/node": node_a}}}
        placements = f"{group}/modelplacements"
        secret = f"/api/v1/namespaces/{namespace}/secrets/{release}-residency-worker-token"
        # (what, client, method, path, body, allowed, text the refusal names)
        checks: list[tuple[str, ApiAs, str, str, dict[str, Any] | None, bool, str]] = [
            ("patch own placement status", worker, "PATCH", f"{placements}/{mine}/status", state, True, ""),
            (
                "patch own placement",
                worker,
                "PATCH",
                f"{placements}/{mine}",
                {"spec": {"residentFraction": 0.5}},
                True,
                "",
            ),
            ("create own NodeProfile", worker, "POST", f"{group}/nodeprofiles", profile(node_a), True, ""),
            (
                "list own node's placements",
                worker,
                "GET",
                f"{placements}?labelSelector=residency.dev/node={node_a}",
                None,
                True,
                "",
            ),
            (
                "patch another node's status",
                worker,
                "PATCH",
                f"{placements}/{theirs}/status",
                state,
                False,
                "its own node",
            ),
            (
                "patch another node's placement",
                worker,
                "PATCH",
                f"{placements}/{theirs}",
                {"spec": {"residentFraction": 0.1}},
                False,
                "its own node",
            ),
            (
                "move own placement away",
                worker,
                "PATCH",
                f"{placements}/{mine}",
                relabel,
                False,
                "its own node",
            ),
            (
                "take another node's placement",
                worker,
                "PATCH",
                f"{placements}/{theirs}",
                steal,
                False,
                "may not move",
            ),
            (
                "create another node's profile",
                worker,
                "POST",
                f"{group}/nodeprofiles",
                profile(node_b),
                False,
                "its own node",
            ),
            ("read its token Secret", worker, "GET", secret, None, False, "forbidden"),
            ("list all Secrets", worker, "GET", "/api/v1/secrets", None, False, "forbidden"),
            (
                "get another node's placement",
                worker,
                "GET",
                f"{placements}/{theirs}",
                None,
                False,
                "forbidden",
            ),
            (  # allowed since workers watch their node's placements (RBAC cannot scope it by label: the
                # same documented gap as list, below)
                "watch placements",
                worker,
                "GET",
                f"{placements}?watch=true&timeoutSeconds=1",
                None,
                True,
                "",
            ),
            ("delete own placement", worker, "DELETE", f"{placements}/{mine}", None, False, "forbidden"),
            ("list LLMModels", worker, "GET", f"{group}/llmmodels", None, False, "forbidden"),
            (
                "write with an unbound token",
                unbound,
                "PATCH",
                f"{placements}/{mine}/status",
                state,
                False,
                "pod-bound token",
            ),
        ]
        wrong = []
        for what, client, method, path, body, allowed, text in checks:
            status, answer = client.call(method, path, body)
            if (status < 300) != allowed or (not allowed and (status != 403 or text not in answer)):
                wrong.append(f"{what}: {status} {answer[:300]}")
        assert wrong == [], "\n".join(wrong)
        # the documented gap: RBAC cannot scope `list` by label and no admission applies to reads, so a
        # worker that omits its label selector sees every node's placements (model names, paths, sizes)
        status, listing = worker.call("GET", placements)
        gap = status == 200 and theirs in listing
    finally:
        for name in (mine, theirs):
            kubectl("delete", "modelplacement", name, "--wait=false", check=False)
        for node in (node_a, node_b):
            kubectl("delete", "node", node, "--wait=false", check=False)
    denied = sum(not allowed for *_, allowed in CAN_I) + sum(not c[5] for c in checks)
    reliability.record(
        measured=f"impersonation: {len(CAN_I)}/{len(CAN_I)} as the chart intends (0 Secret reads)"
    )
    reliability.record(
        measured=f"pod-bound worker token: {len(checks)}/{len(checks)} enforced ({denied} denials in all)"
    )
    reliability.record(
        measured="GAP: an unfiltered list shows other nodes' placements"
        if gap
        else "other nodes' placements hidden"
    )
