"""The router's calls to the API server: list LLMModels, review tokens and access, record wake requests.

The router writes nothing on LLMModels: a request for a model that is not running is recorded in the wake
ConfigMap of its own namespace (see residency_operator/wake.py), whose RBAC is `patch` on that one object.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION
from residency.kubeapi import TimeoutApiClient
from residency_operator.router.auth import Caller
from residency_operator.wake import WAKE_CONFIGMAP, wake_entry_key


class RouterKube:
    """Thin, blocking wrappers (the app calls them in threads)."""

    def __init__(self, wake_namespace: str, wake_configmap: str = WAKE_CONFIGMAP) -> None:
        api = TimeoutApiClient()
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.authentication = client.AuthenticationV1Api(api)
        self.authorization = client.AuthorizationV1Api(api)
        self.wake_namespace = wake_namespace
        self.wake_configmap = wake_configmap

    def list_models(self) -> list[dict[str, Any]]:
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, "llmmodels")
        return list(result.get("items", []))

    def wake(self, key: str, waiting: int) -> None:
        """Record that `waiting` requests wait for model `key` now (creates the ConfigMap when allowed)."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        data = {wake_entry_key(key): f"{now} {max(1, waiting)}"}
        try:
            self.core.patch_namespaced_config_map(self.wake_configmap, self.wake_namespace, {"data": data})
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1ConfigMap(
                metadata=client.V1ObjectMeta(
                    name=self.wake_configmap, labels={"app.kubernetes.io/component": "router"}
                ),
                data=data,
            )
            self.core.create_namespaced_config_map(self.wake_namespace, body)

    def review_token(self, token: str) -> Caller | None:
        review = self.authentication.create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        )
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return None
        user = status.user
        extra = tuple(sorted((k, tuple(v)) for k, v in (user.extra or {}).items()))
        return Caller(user.username or "", user.uid or "", tuple(user.groups or ()), extra)

    def review_access(self, caller: Caller, verb: str, namespace: str, name: str) -> bool:
        spec = client.V1SubjectAccessReviewSpec(
            user=caller.username,
            uid=caller.uid or None,
            groups=list(caller.groups) or None,
            extra={k: list(v) for k, v in caller.extra} or None,
            resource_attributes=client.V1ResourceAttributes(
                group=GROUP, resource="llmmodels", verb=verb, namespace=namespace, name=name
            ),
        )
        review = self.authorization.create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
        return bool(review.status and review.status.allowed)

    def review_path(self, caller: Caller, verb: str, path: str) -> bool:
        spec = client.V1SubjectAccessReviewSpec(
            user=caller.username,
            uid=caller.uid or None,
            groups=list(caller.groups) or None,
            extra={k: list(v) for k, v in caller.extra} or None,
            non_resource_attributes=client.V1NonResourceAttributes(path=path, verb=verb),
        )
        review = self.authorization.create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
        return bool(review.status and review.status.allowed)
