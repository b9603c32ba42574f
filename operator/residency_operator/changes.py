"""Which watch events can change a plan or a status (pure: dicts in, a yes or no out).

Every object the operator reads changes far more often than its plan could: the operator's own writes come
back as events, Nodes carry kubelet heartbeats, leases renew. A planning round starts only for a change
that one of these functions says can matter; the periodic resync catches anything time alone changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from residency_operator.state import WAITING_ANNOTATION, WAKE_ANNOTATION, node_accepts

Body = dict[str, Any]


@dataclass(frozen=True)
class Changes:
    """What changed since the last round, by what the planning loop can do about it. Each set holds model
    keys (``namespace/name``); at fleet size a round whose changes are all in the sets may be planned
    incrementally (:mod:`residency_operator.incremental`), anything in ``other`` plans in full."""

    spec: frozenset[str] = field(default_factory=frozenset)
    """Models whose spec changed (a new generation), or that began deletion."""
    added: frozenset[str] = field(default_factory=frozenset)
    """Models that came."""
    reported: frozenset[str] = field(default_factory=frozenset)
    """Models whose worker reported on their placement (its status alone changed)."""
    ended: frozenset[str] = field(default_factory=frozenset)
    """Models that are gone, and models whose placement began deletion or is gone."""
    other: bool = False
    """Anything else that can change a plan: a node, a profile, a Lease, a woken model, ..."""

    def models(self) -> frozenset[str]:
        return self.spec | self.added | self.reported | self.ended


def _meta(body: Body) -> Body:
    return body.get("metadata") or {}


def _lifecycle(body: Body) -> tuple[Any, ...]:
    meta = _meta(body)
    return (meta.get("uid"), meta.get("deletionTimestamp"), tuple(meta.get("finalizers") or ()))


def model_changed(old: Body | None, new: Body | None) -> bool:
    """An LLMModel came, went, changed its spec (generation), began deletion, or the router woke it. Its
    status is the operator's own output; kopf's annotations and finalizer are bookkeeping."""
    if old is None or new is None:
        return True
    if _lifecycle(old)[:2] != _lifecycle(new)[:2] or _meta(old).get("generation") != _meta(new).get(
        "generation"
    ):
        return True
    before, after = _meta(old).get("annotations") or {}, _meta(new).get("annotations") or {}
    return any(before.get(k) != after.get(k) for k in (WAKE_ANNOTATION, WAITING_ANNOTATION))


def model_spec_changed(old: Body | None, new: Body | None) -> bool:
    """Only the spec of a model that stays (a new generation: priority, SLO, ...): a change the planner's
    incremental mode can take (a model that came, went, began deletion or was woken cannot)."""
    if old is None or new is None or _lifecycle(old)[:2] != _lifecycle(new)[:2] or _lifecycle(new)[1]:
        return False
    before, after = _meta(old).get("annotations") or {}, _meta(new).get("annotations") or {}
    if any(before.get(k) != after.get(k) for k in (WAKE_ANNOTATION, WAITING_ANNOTATION)):
        return False
    return bool(_meta(old).get("generation") != _meta(new).get("generation"))


def model_deletion_began(old: Body | None, new: Body | None) -> bool:
    """The same model, now being deleted: to the planner it is no longer wanted, a change of its demand."""
    if old is None or new is None or _lifecycle(old)[0] != _lifecycle(new)[0]:
        return False
    return not _lifecycle(old)[1] and bool(_lifecycle(new)[1])


def model_key(body: Body) -> str:
    meta = _meta(body)
    return f"{meta.get('namespace')}/{meta.get('name')}"


def placement_model_key(body: Body) -> str | None:
    """The key of the model a ModelPlacement places."""
    model = (body.get("spec") or {}).get("model") or {}
    if not model.get("namespace") or not model.get("name"):
        return None
    return f"{model['namespace']}/{model['name']}"


def placement_report(old: Body | None, new: Body | None) -> bool:
    """A placement that stays changed (its worker's report, or its finalizer): the same object, not being
    deleted."""
    if old is None or new is None or _lifecycle(old)[0] != _lifecycle(new)[0] or _lifecycle(new)[1]:
        return False
    return _lifecycle(old) != _lifecycle(new) or old.get("status") != new.get("status")


def placement_ending(old: Body | None, new: Body | None) -> bool:
    """A placement is gone, or is being deleted and changed (its deletion began, a finalizer came off, its
    worker reported the unload)."""
    if new is None:
        return old is not None
    return old is not None and bool(_lifecycle(new)[1]) and _lifecycle(old)[0] == _lifecycle(new)[0]


def placement_changed(old: Body | None, new: Body | None) -> bool:
    """A ModelPlacement came or went, its worker reported (status), or its deletion moved on. Its spec and
    labels are the operator's own writes."""
    if old is None or new is None:
        return True
    return _lifecycle(old) != _lifecycle(new) or old.get("status") != new.get("status")


def profile_changed(old: Body | None, new: Body | None) -> bool:
    """A NodeProfile came, went, or its measured values changed (a bare heartbeat time is not a change:
    liveness is the node's Lease)."""
    if old is None or new is None:
        return True
    if old.get("spec") != new.get("spec") or _lifecycle(old)[:2] != _lifecycle(new)[:2]:
        return True
    before = {k: v for k, v in (old.get("status") or {}).items() if k != "heartbeatTime"}
    after = {k: v for k, v in (new.get("status") or {}).items() if k != "heartbeatTime"}
    return before != after


def node_changed(old: Body | None, new: Body | None) -> bool:
    """A Node came, went, or changed whether it takes work (Ready, cordoned, being disrupted): not its
    kubelet's heartbeats, images or addresses."""
    if old is None or new is None:
        return True
    return node_accepts(old) != node_accepts(new)


def spec_changed(old: Body | None, new: Body | None) -> bool:
    """A SensitivityProfile came, went, or changed its curves."""
    if old is None or new is None:
        return True
    return old.get("spec") != new.get("spec")


def lease_holder_changed(old: Body | None, new: Body | None) -> bool:
    """A node Lease came, went or changed hands; a renewal alone is not a change (the controller checks
    each node's renewals against the grace period itself)."""
    if old is None or new is None:
        return True
    return (old.get("spec") or {}).get("holderIdentity") != (new.get("spec") or {}).get("holderIdentity")
