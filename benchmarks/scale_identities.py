"""The scale harness's clients as a cluster has them: the operator and the nodes each under a ServiceAccount
of their own (as the chart installs them), not the admin certificate.

It matters for what the harness measures. The API server's Priority and Fairness exempts `system:masters`
(the admin kubeconfig) from all queuing, so with one admin identity for everyone the API server serves
requests in arrival order: a thousand node agents with a request in flight each crowd out the operator's
few writers, which no real cluster does. Under ServiceAccounts, the default FlowSchema
`service-accounts` queues each account as its own flow, so the operator's placements and the nodes' Lease
renewals share the API server fairly, as they would in a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

IDENTITIES = ("operator", "nodes")
TOKEN_SECONDS = 24 * 3600


def _binding_name(namespace: str, who: str) -> str:
    return f"residency-scale-{namespace}-{who}"


def service_account_kubeconfigs(
    api: client.ApiClient, admin_kubeconfig: str, namespace: str, out: Path
) -> dict[str, str]:
    """One kubeconfig per client of the run (``operator``, ``nodes``): a ServiceAccount in ``namespace``
    bound to cluster-admin (the harness's own permissions are not what it measures) and a token for it."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for who in IDENTITIES:
        account = f"residency-{who}"
        _create(core.create_namespaced_service_account, namespace, {"metadata": {"name": account}})
        binding: dict[str, Any] = {
            "metadata": {"name": _binding_name(namespace, who), "labels": {"scale": "hollow"}},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        }
        _create(rbac.create_cluster_role_binding, binding)
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS)
        )
        token = core.create_namespaced_service_account_token(account, namespace, request).status.token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "scale", "cluster": cluster}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "scale", "context": {"cluster": "scale", "user": account}}],
            "current-context": "scale",
        }
        path = out / f"{who}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        paths[who] = str(path)
    return paths


def lease_flow_schema(
    namespace: str, lease_namespace: str, priority_level: str = "node-high", precedence: int = 1000
) -> dict[str, Any]:
    """The chart's FlowSchema (charts/residency/templates/flowschema.yaml) for the run's ServiceAccounts:
    the node Lease renewals and the operator's leader Lease in their own priority level, as kubelets'
    heartbeats are (tests/unit/test_chart.py checks that the two agree)."""
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": _flow_schema_name(namespace), "labels": {"scale": "hollow"}},
        "spec": {
            "priorityLevelConfiguration": {"name": priority_level},
            "matchingPrecedence": precedence,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "serviceAccount": {"name": f"residency-{who}", "namespace": namespace},
                        }
                        for who in IDENTITIES
                    ],
                    "resourceRules": [
                        {
                            "verbs": ["get", "create", "update", "patch"],
                            "apiGroups": ["coordination.k8s.io"],
                            "resources": ["leases"],
                            "namespaces": [lease_namespace],
                        }
                    ],
                }
            ],
        },
    }


def create_lease_flow_schema(api: client.ApiClient, namespace: str, lease_namespace: str) -> None:
    body = lease_flow_schema(namespace, lease_namespace)
    _create(client.FlowcontrolApiserverV1Api(api).create_flow_schema, body)


def _flow_schema_name(namespace: str) -> str:
    return f"residency-scale-{namespace}-leases"


def remove_bindings(api: client.ApiClient, namespace: str) -> None:
    """The run's ClusterRoleBindings and FlowSchema (its ServiceAccounts go with its namespace)."""
    rbac = client.RbacAuthorizationV1Api(api)
    for who in IDENTITIES:
        try:
            rbac.delete_cluster_role_binding(_binding_name(namespace, who))
        except ApiException as exc:
            if exc.status != 404:
                raise
    try:
        client.FlowcontrolApiserverV1Api(api).delete_flow_schema(_flow_schema_name(namespace))
    except ApiException as exc:
        if exc.status != 404:
            raise


def _create(call: Any, *args: Any) -> None:
    """Create, or find it there already (a run again on the same control plane)."""
    try:
        call(*args)
    except ApiException as exc:
        if exc.status != 409:
            raise
