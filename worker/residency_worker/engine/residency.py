"""Where one model's weights are: the units resident in the GPU tiers (one GPU, or several in pipeline order),
the host views of the rest, and the staging buffers that stream offloaded units in (on the pipeline's last
GPU). Uploads and drops are measured transfers."""

from __future__ import annotations

import torch

from residency_worker.engine import cpu_kernels
from residency_worker.engine import model as decoder
from residency_worker.engine.loading import LoadedWeights, Unit
from residency_worker.engine.placement import (
    BudgetNeed,
    ResidencyPlan,
    head_matrix_name,
    head_pieces,
    head_rows_per_chunk,
    kv_stage,
    stage_needs,
    streamed_pieces,
    unit_piece,
)
from residency_worker.engine.tiers import GpuTier, reserve_on
from residency_worker.engine.transfer import Stager, upload_units
from residency_worker.engine.types import ExecutionMode, GpuResidencyReport, TransferTiming


class PlacedWeights:
    """A model's residency plan and modes, and the tensors that carry it out."""

    def __init__(
        self,
        weights: LoadedWeights,
        tiers: list[GpuTier],
        owner: str,
        plan: ResidencyPlan,
        decode_mode: ExecutionMode,
        prefill_mode: ExecutionMode,
        *,
        reload_streams: int,
        cpu_prepack: bool = False,
    ) -> None:
        self.weights = weights
        self.node_tiers = tiers  # every GPU of the node, by index; the plan names the ones it uses
        self.owner = owner
        self.plan = plan
        self.decode_mode = decode_mode
        self.prefill_mode = prefill_mode
        self.reload_streams = reload_streams
        spec = weights.spec
        self.gpu_flats: dict[str, torch.Tensor] = {}
        self._homes: dict[str, GpuTier] = {}  # the tier each of gpu_flats was allocated on
        self.gpu_views: dict[str, decoder.Weights] = {}
        self.host_views = {u.name: u.views(weights.host_unit(u)) for u in weights.units}
        self.layer_units = [weights.unit(f"layer.{i}") for i in range(spec.num_layers)]
        self.layer_pieces = {u.name: unit_piece(u) for u in self.layer_units}
        self.head_pieces = head_pieces(weights)
        self.head_matrix = head_matrix_name(weights)
        self.head_rows = head_rows_per_chunk(weights)
        self.embed_unit = weights.unit("head" if spec.tie_word_embeddings else "embed")
        self.stager: Stager | None = None
        # the emulated tier is host memory: its resident layers compute on the CPU, from weights packed
        # for oneDNN (a second copy in host memory, beside the tier's); see cpu_kernels
        self.prepack = cpu_prepack and tiers[0].device.type == "cpu" and cpu_kernels.available(weights.dtype)
        self.head_packed: list[torch.Tensor] | None = None

    # -- which GPU --------------------------------------------------------------------------------------
    @property
    def tier(self) -> GpuTier:
        """The pipeline's last GPU: where streamed units and (usually) the head compute, and sampling runs."""
        return self.node_tiers[self.plan.gpus[self.plan.stream_stage]]

    def tiers(self, plan: ResidencyPlan | None = None) -> list[GpuTier]:
        """The GPUs of ``plan`` (default: the current one), in pipeline order."""
        return [self.node_tiers[index] for index in (plan or self.plan).gpus]

    def tier_of(self, name: str) -> GpuTier:
        """The GPU that holds (or would hold) resident unit ``name``."""
        return self.node_tiers[self.plan.gpus[self.plan.stage(name)]]

    def spans_devices(self) -> bool:
        """Whether the pipeline crosses devices (real GPUs: then no CUDA graph captures a whole step)."""
        return len({tier.device for tier in self.tiers()}) > 1

    def need(
        self,
        plan: ResidencyPlan,
        decode_mode: ExecutionMode,
        prefill_mode: ExecutionMode,
        *,
        max_batch_size: int,
        max_sequence_length: int,
    ) -> dict[GpuTier, BudgetNeed]:
        """What each GPU of ``plan`` must reserve."""
        needs = stage_needs(
            self.weights,
            plan,
            decode_mode=decode_mode,
            prefill_mode=prefill_mode,
            max_batch_size=max_batch_size,
            max_sequence_length=max_sequence_length,
        )
        return {self.node_tiers[index]: need for index, need in needs.items()}

    def kv_homes(self) -> dict[int, GpuTier]:
        """Layers whose KV lives in a GPU tier (those decoding there: resident, or streamed in), and where."""
        homes: dict[int, GpuTier] = {}
        for layer in range(self.weights.spec.num_layers):
            stage = kv_stage(self.plan, layer, self.decode_mode)
            if stage is not None:
                homes[layer] = self.node_tiers[self.plan.gpus[stage]]
        return homes

    # -- reservations, per GPU ---------------------------------------------------------------------------
    def reserve(self, needs: dict[GpuTier, BudgetNeed], *, grow_only: bool = False) -> None:
        """Reserves each GPU's need, all or none (an over-budget share of one GPU refuses the lot)."""
        reserve_on(self.owner, {tier: need.total_bytes for tier, need in needs.items()}, grow_only=grow_only)

    def unreserve(self, keep: set[GpuTier] | None = None) -> None:
        """Gives back the model's reservation on every GPU but ``keep``, and their cached memory."""
        for tier in self.node_tiers:
            if (keep is None or tier not in keep) and tier.reserved_bytes(self.owner):
                tier.unreserve(self.owner)
                if tier.lost is None:
                    tier.empty_cache()

    def uses(self, tier: GpuTier) -> bool:
        """Whether the pipeline includes ``tier``, or the model still holds memory there."""
        return tier in self.tiers() or tier in self._homes.values() or bool(tier.reserved_bytes(self.owner))

    def gpu_residency(self) -> list[GpuResidencyReport]:
        """What each GPU of the pipeline holds of the model now, read from the tiers' allocations."""
        total = self.plan.weight_bytes or 1
        reports = []
        for tier, (_, share) in zip(self.tiers(), self.plan.gpu_shares(), strict=True):
            weight_bytes = tier.allocated_bytes(self.owner, "weights")
            reports.append(
                GpuResidencyReport(
                    index=tier.index,
                    requested_fraction=share,
                    resident_fraction=weight_bytes / total,
                    resident_bytes=weight_bytes + tier.allocated_bytes(self.owner, "kv"),
                    reserved_bytes=tier.reserved_bytes(self.owner),
                )
            )
        return reports

    def resident_units(self) -> list[Unit]:
        return [u for u in self.weights.units if u.name in self.plan.resident]

    def resident_weight_bytes(self) -> int:
        return sum(self.weights.unit_bytes(self.weights.unit(n)) for n in list(self.gpu_flats))

    def flat_homes(self) -> dict[str, GpuTier]:
        """Where each uploaded unit's buffer is (it stays there until dropped, whatever the plan says)."""
        return dict(self._homes)

    def streamed(self) -> bool:
        """Whether some unit of this plan computes on the GPU from a staging buffer."""
        return bool(streamed_pieces(self.weights, self.plan)) and "stream" in (
            self.decode_mode,
            self.prefill_mode,
        )

    def upload(self, units: list[Unit]) -> TransferTiming:
        homes = {unit.name: self.tier_of(unit.name) for unit in units}
        flats, timing = upload_units(
            self.tier, self.owner, self.weights, units, streams=self.reload_streams, homes=homes
        )
        self.gpu_flats.update(flats)
        self._homes.update(homes)
        for unit in units:
            views = unit.views(flats[unit.name])
            if self.prepack and unit.name.startswith("layer."):
                views = cpu_kernels.packed_views(views)
            elif self.prepack and unit.name == "head":
                self.head_packed = cpu_kernels.packed_rows(views[self.head_matrix], self.head_rows)
            self.gpu_views[unit.name] = views
        return timing

    def drop(self, names: set[str]) -> None:
        for name in names:
            self._homes.pop(name).release(self.gpu_flats.pop(name))
            self.gpu_views.pop(name, None)
            if name == "head":
                self.head_packed = None

    def drop_all(self) -> None:
        self.drop(set(self.gpu_flats))
        self.close_stager()

    def open_stager(self) -> None:
        if self.streamed():
            slot_numel = max(p.numel for p in streamed_pieces(self.weights, self.plan))
            self.stager = Stager(self.tier, self.owner, self.weights, slot_numel)

    def close_stager(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def moved_units(self, plan: ResidencyPlan) -> set[str]:
        """Uploaded units that ``plan`` keeps no more, or keeps on another GPU."""
        return {
            name
            for name, tier in self._homes.items()
            if name not in plan.resident or self.node_tiers[plan.gpus[plan.stage(name)]] is not tier
        }

    # -- what the forward pass reads ----------------------------------------------------------------
    def begin_pass(self, mode: ExecutionMode) -> None:
        """Starts streaming this pass's offloaded pieces, in compute order."""
        if mode == "stream" and self.stager is not None:
            self.stager.begin(streamed_pieces(self.weights, self.plan))

    def layer_weights(self, unit: Unit, mode: ExecutionMode) -> tuple[decoder.Weights, torch.device, bool]:
        """A layer's tensors, the device it computes on, and whether they came through the stager."""
        if unit.name in self.gpu_views:
            return self.gpu_views[unit.name], self._homes[unit.name].device, False
        if mode == "stream":
            assert self.stager is not None, "stream mode without staging buffers"
            return self.stager.acquire(self.layer_pieces[unit.name]), self.tier.device, True
        return self.host_views[unit.name], torch.device("cpu"), False

    def release_layer(self, unit: Unit) -> None:
        assert self.stager is not None
        self.stager.release(self.layer_pieces[unit.name])

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Input embeddings [tokens, hidden] where the table lives (a row gather: cheap on the host)."""
        if self.embed_unit.name in self.gpu_views:
            table, device = self.gpu_views[self.embed_unit.name], self._homes[self.embed_unit.name].device
        else:
            table, device = self.host_views[self.embed_unit.name], torch.device("cpu")
        return decoder.embed(table, decoder.index_tensor(token_ids, device))

    def embed_device(self) -> torch.device:
        if self.embed_unit.name in self.gpu_views:
            return self._homes[self.embed_unit.name].device
        return torch.device("cpu")

    def logits(self, last: torch.Tensor, mode: ExecutionMode) -> torch.Tensor:
        """Float32 logits [rows, vocab], computed in the same row chunks wherever the head lives."""
        norm_piece, *row_pieces = self.head_pieces
        spec = self.weights.spec
        if "head" in self.gpu_views or mode == "cpu":
            resident = "head" in self.gpu_views
            device = self._homes["head"].device if resident else torch.device("cpu")
            views = self.gpu_views["head"] if resident else self.host_views["head"]
            normed = decoder.final_norm(views["norm.weight"], spec, last.to(device))
            matrix = views[self.head_matrix]
            packed = self.head_packed if resident else None
            chunks = [
                decoder.logits_chunk(
                    matrix[start : start + self.head_rows], normed, packed[i] if packed else None
                )
                for i, start in enumerate(range(0, matrix.shape[0], self.head_rows))
            ]
            return torch.cat(chunks, dim=-1)
        assert self.stager is not None, "stream mode without staging buffers"
        last = last.to(self.tier.device, non_blocking=True)
        normed = decoder.final_norm(self.stager.acquire(norm_piece)["norm.weight"], spec, last)
        self.stager.release(norm_piece)
        chunks = []
        for piece in row_pieces:
            chunks.append(decoder.logits_chunk(self.stager.acquire(piece)["weight"], normed))
            self.stager.release(piece)
        return torch.cat(chunks, dim=-1)

    def computes_on_host(self, mode: ExecutionMode) -> bool:
        """Whether a pass in ``mode`` runs some layer or the head on the CPU."""
        if self.tier.device.type == "cpu":
            return False  # the emulated tier is the host: nothing is "elsewhere"
        return mode == "cpu" and len(self.gpu_views) < len(self.weights.units)
