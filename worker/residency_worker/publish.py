"""Publishing the background profiler's curves as SensitivityProfiles (worker -> API server).

One profile per model directory, GPU type and dtype, in the model's namespace, owned by the LLMModel it
was measured for (deleting the model deletes its curve). A profile that exists already — measured by
another worker or applied by hand — is not measured again; the operator uses the newest of several.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import PurePosixPath
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION
from residency_worker.profiler import MeasuredProfile

log = logging.getLogger(__name__)
PLURAL = "sensitivityprofiles"


def profile_name(model: str, gpu_type: str, dtype: str) -> str:
    """A DNS-subdomain name from the model's name and the GPU type (hashed where too long)."""
    base = f"{model.split('/', 1)[-1]}-{gpu_type}-{dtype}".lower()
    slug = re.sub(r"[^a-z0-9.-]+", "-", base).strip("-.") or "profile"
    if len(slug) > 200:
        slug = f"{slug[:180].rstrip('-.')}-{hashlib.sha256(base.encode()).hexdigest()[:12]}"
    return slug


def profile_body(measured: MeasuredProfile, node: str, model_uid: str | None) -> dict[str, Any]:
    """The SensitivityProfile object for one measured curve."""
    namespace, _, name = measured.model.partition("/")
    metadata: dict[str, Any] = {
        "name": profile_name(measured.model, measured.gpu_type, measured.dtype),
        "namespace": namespace,
        "labels": {"residency.dev/measured-by": node[:63].strip("-.") or "worker"},
        "annotations": {
            "residency.dev/spread": f"{measured.spread:.3f}",
            "residency.dev/yields": str(measured.yields),
        },
    }
    if model_uid:
        metadata["ownerReferences"] = [
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMModel", "name": name, "uid": model_uid}
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SensitivityProfile",
        "metadata": metadata,
        "spec": measured.spec(node),
    }


class ProfilePublisher:
    """Reads which curves exist and writes new ones."""

    def __init__(self, custom: client.CustomObjectsApi, node: str) -> None:
        self.custom = custom
        self.node = node
        self.model_uids: dict[str, str] = {}

    def exists(self, namespace: str, path: str, gpu_type: str, dtype: str) -> bool:
        """Whether the namespace holds a profile of this directory, GPU type and dtype (True also when this
        worker may not read them: it could not publish either)."""
        try:
            listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        except ApiException as exc:
            log.warning("cannot read SensitivityProfiles in %s (%s): not profiling", namespace, exc.reason)
            return True
        wanted = (str(PurePosixPath(path)), gpu_type, dtype)
        return any(
            (
                str(PurePosixPath(str(item["spec"].get("modelPath", "")))),
                item["spec"].get("gpuType"),
                item["spec"].get("dtype", "bfloat16"),
            )
            == wanted
            for item in listed.get("items", [])
        )

    def publish(self, measured: MeasuredProfile) -> None:
        body = profile_body(measured, self.node, self.model_uids.get(measured.model))
        namespace = body["metadata"]["namespace"]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body["metadata"]["name"], {"spec": body["spec"]}
            )
        log.info(
            "published SensitivityProfile %s/%s: %d points, spread %.2f",
            namespace,
            body["metadata"]["name"],
            len(measured.points),
            measured.spread,
        )
