"""kopf timer on SensitivityProfiles: writes whether the planner uses each one (status.conditions[Used],
status.pointCount) and a Warning Event when it does not. The decision is residency_operator.profiles'."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION, ConditionStatus
from residency_operator.conditions import now_rfc3339, set_condition
from residency_operator.controller import Controller
from residency_operator.profiles import USED, profile_use

SENSITIVITY_PROFILES = (GROUP, VERSION, "sensitivityprofiles")
CHECK_SECONDS = 10.0
"""How often each profile's use is re-checked (a model or a node may appear after the profile)."""


def _inputs(controller: Controller) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    if controller.cache is not None:
        state = controller.cache.state()
        profiles, models, node_profiles = state.sensitivity_profiles, state.models, state.node_profiles
    else:
        kube = controller.kube
        profiles = kube.list_custom("sensitivityprofiles")
        models = kube.list_custom("llmmodels")
        node_profiles = kube.list_custom("nodeprofiles")
    gpu_types = [str((p.get("spec") or {}).get("gpuType", "")) for p in node_profiles]
    return profiles, models, gpu_types


def check_profile(controller: Controller, body: dict[str, Any]) -> None:
    """Recompute the profile's ``Used`` condition; patch status and post an Event only on a change."""
    profiles, models, gpu_types = _inputs(controller)
    use = profile_use(body, profiles, models, gpu_types)
    status = body.get("status") or {}
    conditions = list(status.get("conditions") or [])
    previous = next((c for c in conditions if c.get("type") == USED), None)
    meta = body["metadata"]
    generation = meta.get("generation")
    wanted: ConditionStatus = "True" if use.used else "False"
    if (
        previous is not None
        and previous.get("status") == wanted
        and previous.get("reason") == use.reason
        and previous.get("message") == use.message
        and previous.get("observedGeneration") == generation
        and status.get("pointCount") == use.point_count
    ):
        return
    conditions = set_condition(conditions, USED, wanted, use.reason, use.message, generation, now_rfc3339())
    try:
        controller.kube.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            meta["namespace"],
            "sensitivityprofiles",
            meta["name"],
            {"status": {"pointCount": use.point_count, "conditions": conditions}},
        )
    except ApiException as exc:
        if exc.status == 404:  # deleted meanwhile
            return
        raise
    if not use.used and (previous is None or previous.get("reason") != use.reason):
        controller.kube.post_event(body, "Warning", use.reason, use.message, kind="SensitivityProfile")


@kopf.timer(*SENSITIVITY_PROFILES, interval=CHECK_SECONDS, initial_delay=0.5)
async def check_sensitivity_profile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo["controller"]
    await asyncio.to_thread(check_profile, controller, dict(body))
