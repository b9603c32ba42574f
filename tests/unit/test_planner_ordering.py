"""The step order of a plan (planner/ordering.py): no step takes memory an earlier one has not freed."""

from __future__ import annotations

from residency_operator.planner.ordering import Footprint, order_by_room
from residency_operator.planner.types import Action, NodeCapacity


def nodes(*host_bytes: int) -> list[NodeCapacity]:
    """Nodes of 10 bytes of GPU memory and the given host memory (tiny units keep the sums readable)."""
    return [NodeCapacity(f"n{i}", "H100", 10, host, 6.0, 300.0, 25.0) for i, host in enumerate(host_bytes)]


def steps(ordered: list[Action]) -> list[tuple[str, str]]:
    return [(a.kind, a.model) for a in ordered]


def evict(name: str, node: str) -> list[Action]:
    return [Action("evict", name, "no host memory to keep it cached", from_node=node)]


def test_models_trading_places_split_a_migration_and_keep_the_cache_that_then_fits() -> None:
    # X (n0 -> n1) and Y (n1 -> n0) trade places on full GPUs; P, preempted on n0, keeps 8 bytes cached,
    # which fit once X has left n0's host memory. Splitting X unblocks everything: no cache is given up.
    actions = [
        Action("preempt", "P", "", from_node="n0"),
        Action("migrate", "X", "", from_node="n0", to_node="n1"),
        Action("migrate", "Y", "", from_node="n1", to_node="n0"),
    ]
    before: dict[str, Footprint] = {"P": {0: (2, 0)}, "X": {0: (6, 6)}, "Y": {1: (6, 0)}}
    after: dict[str, Footprint] = {"P": {0: (0, 8)}, "X": {1: (6, 0)}, "Y": {0: (6, 0)}}
    ordered, dropped = order_by_room(
        actions,
        before,
        after,
        nodes(10, 10),
        [4, 4],
        [2, 10],
        caches={"P": (0, 8)},
        drop_cache=lambda n: evict(n, "n0"),
    )
    assert dropped == []
    assert steps(ordered) == [("evict", "X"), ("preempt", "P"), ("migrate", "Y"), ("load", "X")]
    assert ordered[0].reason.startswith("unload from n0 first") and ordered[-1].to_node == "n1"


def test_a_cache_is_given_up_where_a_preemption_and_a_promotion_need_what_the_other_frees() -> None:
    # On n2, P's preemption frees the GPU memory Q's promotion needs, and caching P's weights needs the
    # host memory Q's promotion frees. P goes without its cache; X and Y, trading places elsewhere, go in
    # halves around each other (the halves stay apart).
    actions = [
        Action("preempt", "P", "", from_node="n2"),
        Action("promote", "Q", "", from_node="n2", to_node="n2"),
        Action("migrate", "X", "", from_node="n0", to_node="n1"),
        Action("migrate", "Y", "", from_node="n1", to_node="n0"),
    ]
    before: dict[str, Footprint] = {"P": {2: (6, 2)}, "Q": {2: (4, 6)}, "X": {0: (6, 0)}, "Y": {1: (6, 0)}}
    after: dict[str, Footprint] = {"P": {2: (0, 8)}, "Q": {2: (8, 0)}, "X": {1: (6, 0)}, "Y": {0: (6, 0)}}
    ordered, dropped = order_by_room(
        actions,
        before,
        after,
        nodes(100, 100, 10),
        [4, 4, 2],
        [100, 100, 2],
        caches={"P": (2, 8)},
        drop_cache=lambda n: evict(n, "n2"),
    )
    assert dropped == ["P"]
    order = steps(ordered)
    assert order.index(("evict", "P")) < order.index(("promote", "Q"))
    split, whole = ("X", "Y") if ("evict", "X") in order else ("Y", "X")
    assert order.index(("evict", split)) < order.index(("migrate", whole)) < order.index(("load", split))


def test_a_cache_already_in_the_order_or_kept_by_a_model_with_no_step_may_be_given_up() -> None:
    # Q's demotion needs host memory on n0, which R's promotion frees; R's promotion needs the GPU memory
    # Q's demotion frees. The host memory is held by caches: C's (preempted in this plan, its step
    # already ordered) and I's (preempted earlier, no step of its own). The larger goes.
    actions = [
        Action("preempt", "C", "", from_node="n0"),
        Action("demote", "Q", "", from_node="n0", to_node="n0"),
        Action("promote", "R", "", from_node="n0", to_node="n0"),
    ]
    before: dict[str, Footprint] = {"C": {0: (1, 0)}, "Q": {0: (5, 0)}, "R": {0: (4, 3)}}
    after: dict[str, Footprint] = {"C": {0: (0, 2)}, "Q": {0: (2, 3)}, "R": {0: (7, 0)}}
    # host memory 10: I's cache 5 + C's 2 + Q's 3 after the plan; GPU 10: 0 + 2 + 7
    ordered, dropped = order_by_room(
        actions,
        before,
        after,
        nodes(10),
        [1],
        [0],
        caches={"C": (0, 2), "I": (0, 5)},
        drop_cache=lambda n: evict(n, "n0"),
    )
    assert dropped == ["I"]
    assert steps(ordered) == [("preempt", "C"), ("evict", "I"), ("demote", "Q"), ("promote", "R")]
