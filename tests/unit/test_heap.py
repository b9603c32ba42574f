"""The serving processes' collector: pauses are timed for a metric, and the startup heap is frozen."""

from __future__ import annotations

import gc

from residency.heap import GcPauses, freeze_heap


def test_each_collection_s_pause_is_recorded_and_drained_once() -> None:
    pauses = GcPauses().install()
    try:
        gc.collect()  # a full collection: generation 2
        gc.collect(0)
    finally:
        pauses.uninstall()
    seen: list[tuple[int, float]] = []
    pauses.drain(lambda generation, seconds: seen.append((generation, seconds)))
    assert [generation for generation, _ in seen][-2:] == [2, 0]
    assert all(0.0 <= seconds < 60.0 for _, seconds in seen)
    again: list[tuple[int, float]] = []
    pauses.drain(lambda generation, seconds: again.append((generation, seconds)))
    assert again == [], "drained twice"
    gc.collect()
    pauses.drain(lambda generation, seconds: again.append((generation, seconds)))
    assert again == [], "uninstalled, still recording"


def test_a_frozen_heap_is_not_walked_by_a_full_collection() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    kept = [Node() for _ in range(1000)]
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= len(kept), "the objects alive are in the permanent generation"
        assert all(not gc.is_finalized(node) for node in kept)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
