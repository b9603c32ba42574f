"""Prometheus metrics of one worker, in a registry of its own (one per app, so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from residency.heap import GcPauseMetric
from residency_worker.engine import Engine, EngineError
from residency_worker.engine.types import ResumeReport


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "residency_generated_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "residency_requests",
            "Inference requests by outcome",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.decode_rate = Gauge(
            "residency_decode_tokens_per_second",
            "Latest decode rate (tokens/s, batch)",
            ["model"],
            registry=self.registry,
        )
        self.prefill_rate = Gauge(
            "residency_prefill_tokens_per_second",
            "Latest prefill rate (tokens/s)",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "residency_queue_depth", "Requests waiting", ["model"], registry=self.registry
        )
        self.paced_seconds = Gauge(
            "residency_paced_seconds",
            "Seconds the model held back decode steps, ahead of its SLO, while a model beside it on the GPU "
            "had requests waiting for a batch slot (cumulative since it loaded)",
            ["model"],
            registry=self.registry,
        )
        self.resident_bytes = Gauge(
            "residency_resident_weight_bytes",
            "Weight bytes resident in GPU memory",
            ["model"],
            registry=self.registry,
        )
        self.resident_fraction = Gauge(
            "residency_resident_fraction", "Share of weight bytes resident", ["model"], registry=self.registry
        )
        self.gc = GcPauseMetric(self.registry)
        self.reload_seconds = Histogram(
            "residency_reload_seconds",
            "Weight reload time on resume",
            ["model"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.transfer_gbps = Gauge(
            "residency_transfer_gbps",
            "Latest measured transfer rate (GB/s)",
            ["model", "what"],
            registry=self.registry,
        )
        self.gpu_budget = Gauge(
            "residency_gpu_budget_bytes", "GPU memory budget of the node", registry=self.registry
        )
        self.gpu_reserved = Gauge(
            "residency_gpu_reserved_bytes", "GPU memory reserved by placements", registry=self.registry
        )
        self.emulated = Gauge(
            "residency_emulated", "1 when the GPU tier is emulated on the CPU", registry=self.registry
        )
        # every series labelled by model, with its label names: refresh removes those of unloaded models
        self._per_model: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (self.tokens, ("model",)),
            (self.requests, ("model", "outcome")),
            (self.decode_rate, ("model",)),
            (self.prefill_rate, ("model",)),
            (self.queue_depth, ("model",)),
            (self.paced_seconds, ("model",)),
            (self.resident_bytes, ("model",)),
            (self.resident_fraction, ("model",)),
            (self.reload_seconds, ("model",)),
            (self.transfer_gbps, ("model", "what")),
        ]

    def drain_gc_pauses(self) -> None:
        """Moves the collector's pauses recorded since the last scrape into the histogram."""
        self.gc.drain()

    def on_engine_event(self, model: str, operation: str, report: object) -> None:
        """Engine listener: records each resume's reload time as it happens, not at scrape time."""
        if isinstance(report, ResumeReport):
            self.reload_seconds.labels(model).observe(report.reload.seconds)

    def refresh(self, engine: Engine) -> None:
        """Copies the engine's current gauges in, just before a scrape."""
        self.drain_gc_pauses()
        node = engine.node_report()
        self.gpu_budget.set(node.budget_bytes)
        self.gpu_reserved.set(node.reserved_bytes)
        self.emulated.set(1 if node.emulated else 0)
        self._forget_unloaded(set(engine.names()))
        for name in engine.names():
            try:
                status = engine.status(name)
            except EngineError:
                continue  # unloaded between the listing and now
            self.queue_depth.labels(name).set(status.queue_depth)
            self.paced_seconds.labels(name).set(status.timings.paced_seconds)
            self.resident_bytes.labels(name).set(status.residency.resident_weight_bytes)
            self.resident_fraction.labels(name).set(status.residency.resident_fraction)
            timings = status.timings
            if timings.decode_tokens_per_second is not None:
                self.decode_rate.labels(name).set(timings.decode_tokens_per_second)
            if timings.prefill_tokens_per_second is not None:
                self.prefill_rate.labels(name).set(timings.prefill_tokens_per_second)
            for what, transfer in (
                ("load", timings.load_transfer),
                ("reload", timings.reload_transfer),
                ("kv_save", timings.kv_save_transfer),
                ("kv_restore", timings.kv_restore_transfer),
            ):
                if transfer is not None and transfer.moved_bytes:
                    self.transfer_gbps.labels(name, what).set(transfer.gbps)

    def _forget_unloaded(self, loaded: set[str]) -> None:
        """Removes the series of models no longer loaded: a gauge would go on reporting its last value,
        and a node that serves many models over time would export ever more series."""
        for metric, label_names in self._per_model:
            stale = {
                tuple(sample.labels[label] for label in label_names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("model") not in loaded
            }
            for label_values in stale:
                metric.remove(*label_values)
