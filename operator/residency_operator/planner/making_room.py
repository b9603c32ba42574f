"""Making room: the greedy's stage that frees memory on one node for a model that fits nowhere."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from residency_operator.planner.costs import (
    demote_cost,
)
from residency_operator.planner.greedy_base import GreedyBase, RoomCandidates
from residency_operator.planner.options import (
    MODES,
    option_score,
)
from residency_operator.planner.types import (
    ModelDemand,
    PlannerConfig,
)

RoomPlan = tuple[float, list[tuple[int, str, int]]]
"""What making room on one node loses in all, and its steps: (model index, "demote" or "preempt", level)."""

MAKE_ROOM_CANDIDATE_NODES = 8
"""Nodes examined (those with the most free memory) when a model must make room; bounds the cost."""


SAME_TIER_SWAP_GAIN = 2.0
"""A model may preempt one of its own tier to make room only if it gains this many times what that loses
(net of its amortised load): a clear win, never a swap of near equals that the next plan might undo."""


MAKE_ROOM_FAILURE_LIMIT = 32
"""After this many models in a row of one tier found no room to make, the tier stops trying (the cluster
is full for it); bounds the work on hopelessly over-subscribed inputs."""


def _better_room(
    room: tuple[float, float, bool], best: tuple[float, float, bool], config: PlannerConfig
) -> bool:
    """Whether making room on one node beats the best so far, each given as (what the newcomer's tier
    gains, what is lost in all, whether the node is the newcomer's home): more for the newcomer's tier by a
    clear margin (the hysteresis share); or about as much for it, and its home (where it runs or its host
    copy is: a resume at link speed, not a cold load while its requests wait); or else less lost in all."""
    tier_net, loss, home = room
    best_tier_net, best_loss, best_home = best
    margin = config.hysteresis_fraction * max(abs(tier_net), abs(best_tier_net), 1.0)
    if abs(tier_net - best_tier_net) > margin:
        return tier_net > best_tier_net
    if home != best_home:
        return home
    return loss < best_loss


class MakingRoom(GreedyBase):
    """Making room on one node for a model that fits nowhere: demote models of its own or a lower tier to
    their minimal SLO-meeting level and preempt strictly lower-priority preemptible ones, on the node where
    that loses the least."""

    def try_make_room(
        self,
        model_index: int,
        only_nodes: Sequence[int] | None = None,
        failed: dict[tuple[int, int, int], list[tuple[int, int, float, float]]] | None = None,
    ) -> bool:
        """Demote same-or-lower tiers / preempt strictly lower tiers on one node to admit the model.

        The nodes examined are, per class, the few with the most free memory, or else ``only_nodes``
        (the incremental planner's touched ones, in best-first order; ``failed`` then remembers which
        needs found no room on them, as the planner's own memo does for the usual nodes).
        """
        model = self.models[model_index]
        state, tables = self.state, self.tables
        home = self._home_node(model_index)
        best: tuple[float, float, bool, int, int, int, int, list[tuple[int, str, int]]] | None = None
        room_plans: dict[tuple[int, int, int, float, float, float], tuple[RoomPlan | None, bool]] = {}
        for node_class, mode_index in self._class_modes(model_index):
            # The least memory that meets its SLO, and its best level: a busy model's least-memory level
            # may need more GPU time than any node has, where a higher one fits beside the others. The
            # best level is tried only where the least-memory one found no room (or only by taking it
            # from the model's own tier), and needs less time.
            minimal = int(self.min_level[node_class, mode_index, model_index])
            target = int(self.target_level[node_class, mode_index, model_index])
            time_at = tables.busy_fraction[node_class, mode_index, model_index]
            levels = (minimal, target) if time_at[target] < time_at[minimal] - 1e-9 else (minimal,)
            found_here = False
            for level in levels:
                if found_here:
                    break
                need_gpu = int(tables.gpu_bytes[mode_index, model_index, level])
                need_host = int(tables.host_bytes[model_index, level])
                need_busy = float(tables.busy_fraction[node_class, mode_index, model_index, level])
                need_tolerance = float(tables.tolerance[node_class, mode_index, model_index, level])
                gain_value = float(tables.primary_value[node_class, mode_index, model_index, level])
                # What the newcomer gains is net of its amortised load (it serves nothing while it loads).
                net_gain = gain_value * (1.0 - self._load_share(node_class, model_index, level))
                # Models of its own tier worth this much or more are not preempted for it.
                limit = net_gain / SAME_TIER_SWAP_GAIN
                memo_key = (model.priority, node_class, mode_index)
                memo = self.failed_room if only_nodes is None else failed if failed is not None else {}
                failures = memo.setdefault(memo_key, [])
                if any(
                    g <= need_gpu and h <= need_host and b <= need_busy + 1e-12 and lim >= limit - 1e-12
                    for g, h, b, lim in failures
                ):
                    # A smaller need, that could preempt as much of its tier, already found no room here in
                    # this tier; room only shrinks as it fills.
                    continue
                value_bound = False
                if only_nodes is None:
                    largest = state.free_sorted[node_class][-MAKE_ROOM_CANDIDATE_NODES:]
                    candidates = [node for _, node in reversed(largest)]
                    if home is not None and home not in candidates and self.class_of_node[home] == node_class:
                        candidates.append(home)
                else:
                    candidates = [node for node in only_nodes if self.class_of_node[node] == node_class]
                for node in candidates:
                    # The bounds _room_plan checks first, without building a plan: most nodes fail them.
                    bounds = self._room_candidates(model.priority, node, False)
                    free_gpu = state.free_gpu[node]
                    if free_gpu + bounds.most_freed_gpu < need_gpu:
                        continue
                    if (
                        free_gpu + bounds.most_freed_lower_gpu < need_gpu
                        and bounds.least_same_tier_value >= limit
                    ):
                        value_bound = True
                        continue
                    # Modes with the same need (at 100 % resident they often are) share one room plan.
                    key = (node, need_gpu, need_host, need_busy, need_tolerance, limit)
                    known = room_plans.get(key)
                    if known is None:
                        need = (need_gpu, need_host, need_busy, need_tolerance)
                        known = room_plans[key] = (
                            self._room_plan(model, node, need, same_tier_value_limit=limit),
                            self.room_cut,
                        )
                    plan, cut = known
                    value_bound = value_bound or cut
                    if plan is None:
                        continue
                    loss, steps = plan
                    same_tier_loss = sum(
                        self._step_loss(i, kind, model.priority, step_level)
                        for i, kind, step_level in steps
                        if self.models[i].priority >= model.priority
                    )
                    if same_tier_loss >= gain_value:
                        continue
                    # Preempting a model of the same tier must clearly beat keeping it (SAME_TIER_SWAP_GAIN),
                    # so that models of one tier do not take turns evicting each other.
                    swapped = [
                        i
                        for i, kind, _ in steps
                        if kind == "preempt" and self.models[i].priority == model.priority
                    ]
                    if swapped:
                        margin = sum(
                            self.config.hysteresis_fraction * abs(self._value_of(i)) for i in swapped
                        )
                        if SAME_TIER_SWAP_GAIN * same_tier_loss + margin >= net_gain:
                            value_bound = True
                            continue
                    # Where the newcomer's own tier comes out best (what it gains there, net of its load
                    # and of what its own tier loses: a slow node's room is cheap but serves little), and
                    # among near equals, where the lower tiers lose least.
                    # The best level is still tried where this one takes room from the newcomer's own
                    # tier: it may need less of the GPU's time, and so room from lower tiers only.
                    found_here = found_here or not any(
                        self.models[i].priority >= model.priority for i, _, _ in steps
                    )
                    room = (net_gain - same_tier_loss, loss, node == home)
                    if best is None or _better_room(room, best[:3], self.config):
                        best = (*room, node, node_class, mode_index, level, steps)
                if best is None and len(failures) < 32:
                    # Where no model of its own tier was left out for its value, no newcomer of this tier
                    # finds room for this need, however valuable; else only those allowed to preempt more.
                    failures.append((need_gpu, need_host, need_busy, limit if value_bound else float("inf")))
        if best is None:
            return False
        _, _, _, node, node_class, mode_index, level, steps = best
        self._carry_out(steps, model_index)
        state.occupy(model_index, self._assignment_at(model_index, node, node_class, mode_index, level))
        return True

    def _home_node(self, model_index: int) -> int | None:
        """The node a model with requests waiting keeps its host copy on (it does not run), where it
        accepts work: there it comes back by a resume while its requests wait, elsewhere by a cold load."""
        model = self.models[model_index]
        now = self.current.get(model.name)
        if now is None or now.is_running or not model.waiting_requests:
            return None
        node = self.node_index.get(now.node)
        return node if node is not None and self.nodes[node].accepts_work else None

    def _carry_out(self, steps: Sequence[tuple[int, str, int]], for_model: int) -> None:
        for victim, kind, level in steps:
            if kind == "preempt":
                self.state.release(victim)
                self.state.preempted_by[victim] = for_model
            else:
                self._demote_to(victim, level)

    def _step_loss(self, model_index: int, kind: str, for_priority: int, level: int = -1) -> float:
        """Value a model loses to a room-making step (a demotion to ``level``, or a preemption)."""
        assignment = self.state.assignment[model_index]
        if assignment is None:
            return 0.0
        if kind == "preempt":
            return assignment.value
        if level >= 0:
            node_class = self.class_of_node[assignment.node]
            mode_index = MODES.index(assignment.mode)
            return assignment.value - self.tables.primary_value.item(
                node_class, mode_index, model_index, level
            )
        minimal = self._minimal_option(model_index, assignment, for_priority)
        return 0.0 if minimal is None else assignment.value - minimal[2]

    def _room_candidates(self, priority: int, node: int, lower_only: bool) -> RoomCandidates:
        """Demotions (cheapest loss per freed byte first) and preemptions (lowest priority, least value
        first) on ``node`` that could make room for a model of ``priority``; cached per node state."""
        state = self.state
        key = (node, priority, lower_only)
        cached = self._room_cache.get(key)
        if cached is not None and cached.version == state.node_version[node]:
            return cached
        demotions: list[tuple[float, str, int, int, int, float, float, float, int]] = []
        preemptions: list[tuple[int, float, str, int, int, int, float]] = []
        most_freed: dict[int, int] = {}
        same_tier_extra: dict[int, int] = {}
        for other in state.models_on_node[node]:
            other_model = self.models[other]
            assignment = state.assignment[other]
            if assignment is None or (lower_only and other_model.priority >= priority):
                continue
            # A non-preemptible model keeps running, but may be demoted within its SLO; a higher
            # priority one only as far as it still serves its demand.
            minimal = self._minimal_option(other, assignment, priority)
            if minimal is not None:
                freed = assignment.gpu_bytes - minimal[0]
                if freed > 0:
                    loss = assignment.value - minimal[2]
                    demotions.append(
                        (
                            loss / freed,
                            other_model.name,
                            other,
                            freed,
                            assignment.host_bytes - minimal[1],
                            minimal[3],
                            minimal[4],
                            loss,
                            minimal[5],
                        )
                    )
                    most_freed[other] = freed
            # Strictly lower tiers may be preempted; the same tier too (not for promotions, which take
            # room from lower tiers only) when what the newcomer gains outweighs what it loses, which
            # try_make_room weighs.
            lower = other_model.priority < priority or (not lower_only and other_model.priority == priority)
            if lower and other_model.preemptible:
                preemptions.append(
                    (
                        other_model.priority,
                        assignment.value,
                        other_model.name,
                        other,
                        assignment.gpu_bytes,
                        assignment.host_bytes,
                        assignment.value,
                    )
                )
                if other_model.priority == priority:
                    same_tier_extra[other] = assignment.gpu_bytes - most_freed.get(other, 0)
                most_freed[other] = assignment.gpu_bytes
        demotions.sort()
        preemptions.sort()
        staying: dict[int, tuple[float, float]] = {}
        for other in state.models_on_node[node]:
            a = state.assignment[other]
            if a is not None:
                staying[other] = (a.busy, a.tolerance)
        candidates = RoomCandidates(
            state.node_version[node],
            demotions,
            preemptions,
            sum(most_freed.values()),
            sum(most_freed.values()) - sum(same_tier_extra.values()),
            min(
                (value for tier, value, *_ in preemptions if tier == priority),
                default=float("inf"),
            ),
            staying,
            sum(busy for busy, _ in staying.values()),
        )
        self._room_cache[key] = candidates
        return candidates

    def _room_plan(
        self,
        model: ModelDemand,
        node: int,
        need: tuple[int, int, float, float],
        lower_only: bool = False,
        same_tier_value_limit: float = 0.0,
    ) -> RoomPlan | None:
        """Cheapest demotions then preemptions on ``node`` that make room; None when impossible.

        ``need`` is (GPU bytes, host bytes, busy share, tolerance) of the model to admit. Models of its own
        tier are preempted only below ``same_tier_value_limit`` (value); ``self.room_cut`` tells whether
        that limit left one out.
        """
        self.room_cut = False
        state = self.state
        need_gpu, need_host, need_busy, need_tolerance = need
        free_gpu, free_host = state.free_gpu[node], state.free_host[node]
        candidates = self._room_candidates(model.priority, node, lower_only)
        # (Both bounds fail only where the memory is short now, so room enough already never skips them.)
        if free_gpu + candidates.most_freed_gpu < need_gpu:
            return None  # not even demoting and preempting everything it may would free the memory
        if (
            free_gpu + candidates.most_freed_lower_gpu < need_gpu
            and candidates.least_same_tier_value >= same_tier_value_limit
        ):
            self.room_cut = True
            return None  # only models of its own tier worth too much to preempt would free enough
        # Busy share and tolerance of each model that would stay on the node.
        staying = dict(candidates.staying)
        # A running estimate of the busy share of those staying: it only rejects clear misses quickly
        # (by more than float noise); whether the room is enough is always decided by the exact sums.
        used_estimate = candidates.used_time

        def enough() -> bool:
            if free_gpu < need_gpu or free_host < need_host:
                return False
            if used_estimate > need_tolerance + 1e-6 or used_estimate + need_busy > state.max_busy + 1e-6:
                return False
            used = sum(busy for busy, _ in staying.values())
            cap = min([state.max_busy, need_tolerance + need_busy] + [b + t for b, t in staying.values()])
            return used + need_busy <= cap + 1e-9 and used <= need_tolerance + 1e-9

        if enough():
            return 0.0, []
        steps: list[tuple[int, str, int]] = []
        loss_total = 0.0
        demoted: dict[int, tuple[int, int, float]] = {}
        preempted: dict[int, tuple[int, int, float]] = {}
        for _, _, other, freed_gpu, host_delta, busy, tolerance, loss, level in candidates.demotions:
            if free_gpu >= need_gpu and free_host >= need_host and enough():
                break
            if free_host + host_delta < 0:
                continue
            free_gpu += freed_gpu
            free_host += host_delta
            used_estimate += busy - staying[other][0]
            staying[other] = (busy, tolerance)
            loss_total += loss
            demoted[other] = (freed_gpu, host_delta, loss)
            steps.append((other, "demote", level))
        for priority, _, _, other, gpu, host, value in candidates.preemptions:
            if free_gpu >= need_gpu and free_host >= need_host and enough():
                break
            if priority == model.priority and value >= same_tier_value_limit:
                self.room_cut = True
                break  # same tier, least valuable first: none from here on is worth preempting
            if priority >= model.priority:
                # Undone, the preemption gives back the model's whole original footprint.
                preempted[other] = (gpu, host, value)
            if other in demoted:
                # Preempting a model already demoted frees its demoted footprint, not its original one
                # (the demotion freed GPU memory and took host memory: ``host_delta`` is negative).
                freed_gpu, host_delta, demotion_loss = demoted.pop(other)
                gpu -= freed_gpu
                host -= host_delta
                loss_total -= demotion_loss
                steps = [step for step in steps if step[0] != other]
            free_gpu += gpu
            free_host += host
            left = staying.pop(other, None)
            if left is not None:
                used_estimate -= left[0]
            loss_total += value
            steps.append((other, "preempt", -1))
        # Demotions come first (they lose least per byte), but once preemptions freed the memory some are
        # needless, and each made a model slower: more of the GPU's time, less room for others' turns
        # (a demotion can be what leaves the newcomer no time). Undo every one the memory allows, the
        # costliest first.
        for other in sorted(demoted, key=lambda i: (-demoted[i][2], i)):
            freed_gpu, host_delta, demotion_loss = demoted[other]
            if free_gpu - freed_gpu < need_gpu or free_host - host_delta < need_host:
                continue
            free_gpu -= freed_gpu
            free_host -= host_delta
            used_estimate += candidates.staying[other][0] - staying[other][0]
            staying[other] = candidates.staying[other]
            loss_total -= demotion_loss
            steps = [step for step in steps if step[0] != other]
        # Likewise a preemption in the newcomer's own tier taken early (least valuable first) that a later,
        # larger one made needless: keep that model running where the room and the GPU's time still
        # suffice, the costliest first. (A lower tier's needless preemption stands: its models are placed
        # again in their own tier's round where room is left, and a higher tier arriving with a backlog,
        # a burst its last minute's rate understates, is better served by the slack: undoing those too
        # cut the production models' goodput in the priority-burst-idle simulation from 115 to 95 tok/s.)
        if preempted and enough():
            for other in sorted(preempted, key=lambda i: (-preempted[i][2], i)):
                gpu, host, value = preempted[other]
                if free_gpu - gpu < need_gpu or free_host - host < need_host:
                    continue
                free_gpu -= gpu
                free_host -= host
                staying[other] = candidates.staying[other]
                used_estimate += staying[other][0]
                if enough():
                    loss_total -= value
                    steps = [step for step in steps if step[0] != other]
                    continue
                free_gpu += gpu
                free_host += host
                used_estimate -= staying.pop(other)[0]
        if enough():
            return loss_total, steps
        return None

    def _demote_to(self, model_index: int, level: int) -> None:
        state = self.state
        assignment = state.assignment[model_index]
        if assignment is None:
            return
        node_class = self.class_of_node[assignment.node]
        mode_index = MODES.index(assignment.mode)
        state.release(model_index)
        demoted = self._assignment_at(model_index, assignment.node, node_class, mode_index, level)
        if assignment.incumbent:
            model = self.models[model_index]
            cost = demote_cost(
                model, self.nodes[assignment.node], assignment.resident_fraction, demoted.resident_fraction
            )
            demoted.score = option_score(demoted.value, cost, False, self.config)
            demoted.full_score = option_score(demoted.full_value, cost, False, self.config)
        state.occupy(model_index, demoted)

    def with_room_on(self, model_indices: Sequence[int], nodes: Sequence[int]) -> list[int]:
        """The models (in the given order) with room for one of their feasible options on at least one of
        ``nodes`` (GPU and host memory, GPU time, and the others' tolerance and their own)."""
        found = self.room_by_node(model_indices, nodes)
        anywhere = set().union(*found.values()) if found else set()
        return [i for i in np.asarray(model_indices, dtype=np.intp).tolist() if i in anywhere]

    def room_by_node(self, model_indices: Sequence[int], nodes: Sequence[int]) -> dict[int, set[int]]:
        """Per node of ``nodes``, the models of ``model_indices`` that :meth:`try_place` could put there: with
        room for a feasible option, counting GPU time a faster blocker would give up (see
        :meth:`_try_unblock`): the GPU's time left, not only what the others' SLOs leave."""
        found: dict[int, set[int]] = {node: set() for node in nodes}
        if not len(model_indices) or not len(nodes):
            return found
        state = self.state
        classes = np.array([self.class_of_node[node] for node in nodes], dtype=np.intp)
        free_gpu = np.array([state.free_gpu[node] for node in nodes], dtype=np.float64)
        free_host = np.array([state.free_host[node] for node in nodes], dtype=np.float64)
        used_time = np.array([state.used_time[node] for node in nodes], dtype=np.float64)
        free_time = np.maximum(
            np.array([state.free_time[node] for node in nodes], dtype=np.float64), state.max_busy - used_time
        )
        accepting = np.array([self.nodes[node].accepts_work for node in nodes], dtype=bool)
        indices = np.asarray(model_indices, dtype=np.intp)
        needs = self._need_rows[indices][:, classes, :]  # [model, node, field]
        # First what each resource alone rules out (cheap), then every option of the rest, exactly.
        plausible = (
            accepting
            & (needs[:, :, 0] <= free_gpu)
            & (needs[:, :, 1] <= free_host)
            & (free_time >= needs[:, :, 2] - 1e-9)
            & (used_time <= needs[:, :, 3] + 1e-9)
        )
        tables = self.tables
        for k in np.flatnonzero(plausible.any(axis=0)).tolist():
            members = indices[plausible[:, k]]
            node_class = int(classes[k])
            fits = (
                np.isfinite(self.newcomer_score[node_class][:, members, :])
                & (tables.gpu_bytes[:, members, :] <= free_gpu[k])
                & (tables.host_bytes[None, members, :] <= free_host[k])
                & (free_time[k] >= tables.busy_fraction[node_class][:, members, :] - 1e-9)
                & (used_time[k] <= tables.tolerance[node_class][:, members, :] + 1e-9)
            )  # [mode, model, level]
            found[nodes[k]] = set(members[fits.any(axis=(0, 2))].tolist())
        return found

    def could_make_room_on(self, model_indices: Sequence[int], nodes: Sequence[int]) -> list[int]:
        """The models (in the given order) whose smallest option could fit on one of ``nodes`` if every
        model there that may make room for them did (an upper bound on what making room frees)."""
        if not len(model_indices) or not len(nodes):
            return []
        indices = np.asarray(model_indices, dtype=np.intp)
        distinct, rows = np.unique(self.priorities[indices], return_inverse=True)
        bounds = np.array(
            [[self.room_bound(node, priority) for node in nodes] for priority in distinct.tolist()],
            dtype=np.float64,
        )
        classes = np.array([self.class_of_node[node] for node in nodes], dtype=np.intp)
        least_gpu = self._need_rows[indices][:, classes, 0]  # [model, node]
        return indices[(least_gpu <= bounds[rows]).any(axis=1)].tolist()  # type: ignore[no-any-return]

    def room_bound(self, node: int, priority: int) -> int:
        """The most GPU memory demoting and preempting could free on a node for a model of ``priority``,
        with what is free already (an upper bound: making room never frees more)."""
        return self.state.free_gpu[node] + self._room_candidates(priority, node, False).most_freed_gpu

    def make_room_after_promotion(self, tiers: dict[int, list[int]]) -> list[int]:
        """Make room once more for the models still left out, highest priority first: the final
        promotion raised models into free memory, which a demotion can now give back where a model left
        out fits (the next re-plan, starting from the promoted state, would otherwise do it then: the plan
        would not be a fixed point). Room found earlier to be short is looked at again."""
        self.failed_room.clear()
        placed: list[int] = []
        for priority in sorted(tiers, reverse=True):
            left_out = [i for i in tiers[priority] if self.state.assignment[i] is None and self.has_option[i]]
            failures_in_a_row = 0
            for model_index in self.admission_order(left_out):
                if failures_in_a_row >= MAKE_ROOM_FAILURE_LIMIT:
                    break
                if self.try_make_room(model_index):
                    placed.append(model_index)
                    failures_in_a_row = 0
                else:
                    failures_in_a_row += 1
        return placed
