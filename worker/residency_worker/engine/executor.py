"""Runs one model's steps: embed, the layers wherever the residency put them, the head, then sampling.

A step is flat (see ``model``): the decoding sequences' tokens and the prompt chunks of the step go
through each layer together. On a CUDA GPU, a decode-only step whose layers all compute on the GPU
(resident, or streamed through the staging buffers) replays a CUDA graph captured for its batch-size and
attended-length bucket: static input buffers (hidden states after the embedding, slots, positions, the
visibility mask) are filled, the graph runs the layers and the head, sampling follows on the device.
Streamed layers' copies are captured too, on the stager's copy stream, so they still overlap compute.
Graphs are dropped whenever weights, staging buffers or the KV pool move (residency change, preemption).
On the CPU (and the emulated tier), and for a model split across GPUs, every step runs eagerly; a split
model's activations pass from one GPU to the next (``.to``) where its layers change device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from residency_worker.engine import model as decoder
from residency_worker.engine.kvpool import KVPool
from residency_worker.engine.residency import PlacedWeights
from residency_worker.engine.types import ExecutionMode

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_BUCKET_MIN = 256


def bucket(value: int, buckets: tuple[int, ...], limit: int) -> int:
    """The smallest bucket that holds ``value``, capped at ``limit``."""
    for size in buckets:
        if size >= value:
            return min(size, limit)
    return limit


def length_bucket(tokens: int, limit: int) -> int:
    size = LENGTH_BUCKET_MIN
    while size < tokens:
        size *= 2
    return min(size, limit)


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The given rows (all of them without a copy); the index goes over from pinned memory, no sync."""
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor.index_select(0, decoder.index_tensor(rows, tensor.device))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [rows, hidden] static input
    slots: torch.Tensor  # [rows]
    positions: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab] static output
    step: decoder.StepTensors


class Executor:
    """The forward pass of one model over its placed weights and its KV pool."""

    def __init__(
        self, placed: PlacedWeights, pool: KVPool, rotary: decoder.Rotary, *, cuda_graphs: bool
    ) -> None:
        self.placed = placed
        self.pool = pool
        self.rotary = rotary
        self.spec = placed.weights.spec
        self.use_cuda_graphs = cuda_graphs and placed.tier.device.type == "cuda"
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_pool: Any = None  # one memory pool shared by this model's graphs
        self._graphs_failed = False
        self.graph_replays = 0

    # -- eager --------------------------------------------------------------------------------------
    def forward(
        self, layout: decoder.StepLayout, token_ids: list[int], sample_rows: list[int], mode: ExecutionMode
    ) -> torch.Tensor:
        """Float32 logits [len(sample_rows), vocab] of the step's ``sample_rows``, on the head's device."""
        graph = self._graph_for(layout, token_ids, mode)
        if graph is not None:
            return _rows(self._replay(graph, layout, token_ids), sample_rows)
        hidden = self.placed.embed(token_ids)
        return self._layers_and_head(hidden, layout, sample_rows, mode)

    def _layers_and_head(
        self, hidden: torch.Tensor, layout: decoder.StepLayout, sample_rows: list[int], mode: ExecutionMode
    ) -> torch.Tensor:
        placed = self.placed
        placed.begin_pass(mode)
        steps: dict[torch.device, decoder.StepTensors] = {}
        for index, unit in enumerate(placed.layer_units):
            weights, device, staged = placed.layer_weights(unit, mode)
            if hidden.device != device:
                hidden = hidden.to(device, non_blocking=device.type == "cuda")
            if device not in steps:
                steps[device] = decoder.StepTensors.build(layout, self.rotary, device, hidden.dtype)
            hidden = decoder.layer(weights, self.spec, index, hidden, steps[device], self.pool.layer(index))
            if staged:
                placed.release_layer(unit)
        return placed.logits(_rows(hidden, sample_rows), mode)

    # -- CUDA graphs --------------------------------------------------------------------------------
    def drop_graphs(self) -> None:
        """Weights, staging or the KV pool moved: every captured graph points at stale memory."""
        self._graphs.clear()
        self._graphs_failed = False

    def _graph_for(
        self, layout: decoder.StepLayout, token_ids: list[int], mode: ExecutionMode
    ) -> _Graph | None:
        if not self.use_cuda_graphs or self._graphs_failed or layout.chunks or not layout.dense:
            return None
        if self.placed.spans_devices():  # a split's step crosses GPUs: one graph captures one device
            return None
        if self.placed.computes_on_host(mode) and mode == "cpu":
            return None
        rows = bucket(layout.decode_rows, BATCH_BUCKETS, self.pool.slots)
        length = length_bucket(layout.attend_tokens, self.pool.capacity)
        key = (rows, length)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(rows, length, mode, layout, token_ids)
            except Exception:  # a driver or allocator limit: eager still gives the same tokens
                log.exception(
                    "CUDA graph capture failed for %s rows x %s tokens; running eagerly", rows, length
                )
                self._graphs_failed = True
                return None
        return self._graphs[key]

    def _capture(
        self, rows: int, length: int, mode: ExecutionMode, layout: decoder.StepLayout, token_ids: list[int]
    ) -> _Graph:
        """Captures the step for ``rows`` x ``length``. The warm-up pass runs this very step (its inputs
        are filled first), so the keys and values it writes are the step's own."""
        device = self.placed.tier.device
        dtype = self.placed.weights.dtype
        static_layout = decoder.StepLayout(
            decode_slots=tuple(range(rows)),
            decode_positions=(0,) * rows,
            chunks=(),
            occupied=rows,
            attend_tokens=length,
        )
        hidden = torch.zeros((rows, self.spec.hidden_size), dtype=dtype, device=device)
        step = decoder.StepTensors.build(static_layout, self.rotary, device, dtype)
        positions = step.decode_positions  # the step's position tensors are filled before each replay
        step.row_positions = positions
        step.positions = positions
        cos_table, sin_table = self.rotary.tables(device, dtype)

        def run() -> torch.Tensor:
            step.cos = cos_table[positions].unsqueeze(1)
            step.sin = sin_table[positions].unsqueeze(1)
            step._masks.clear()
            return self._graph_body(hidden, step, mode)

        self._fill(hidden, positions, layout, token_ids)
        # warm-up on a side stream (as torch asks) so lazy initialisation is not captured
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = run()
        log.info("captured a CUDA graph for %d rows x %d tokens", rows, length)
        return _Graph(graph, hidden, step.decode_slots, positions, logits, step)

    def _graph_body(
        self, hidden: torch.Tensor, step: decoder.StepTensors, mode: ExecutionMode
    ) -> torch.Tensor:
        placed = self.placed
        placed.begin_pass(mode)
        for index, unit in enumerate(placed.layer_units):
            weights, _, staged = placed.layer_weights(unit, mode)
            hidden = decoder.layer(weights, self.spec, index, hidden, step, self.pool.layer(index))
            if staged:
                placed.release_layer(unit)
        return placed.logits(hidden, mode)

    def _fill(
        self, hidden: torch.Tensor, positions: torch.Tensor, layout: decoder.StepLayout, token_ids: list[int]
    ) -> None:
        rows = hidden.shape[0]
        used = layout.decode_rows
        hidden[:used].copy_(self.placed.embed(token_ids), non_blocking=True)
        # padding rows decode slot i at position 0: slots past the occupied ones are free (the pool keeps
        # occupied slots dense), so what they write there is never read
        padded = list(layout.decode_positions) + [0] * (rows - used)
        positions.copy_(decoder.index_tensor(padded, positions.device), non_blocking=True)

    def _replay(self, graph: _Graph, layout: decoder.StepLayout, token_ids: list[int]) -> torch.Tensor:
        self._fill(graph.hidden, graph.positions, layout, token_ids)
        graph.graph.replay()
        self.graph_replays += 1
        return graph.logits[: layout.decode_rows]
