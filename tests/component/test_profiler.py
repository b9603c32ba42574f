"""The worker's background profiler on a tiny real model: it measures a compact curve when the GPU is idle,
steps aside for requests and admin commands, and keeps what it measured."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from residency.api import SensitivityProfileSpec
from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams, make_gpu_tier
from residency_worker.profiler import BackgroundProfiler, CompactSettings, MeasuredProfile

pytestmark = pytest.mark.component

SETTINGS = CompactSettings(
    fractions=(1.0, 0.0),
    sequence_lengths=(8, 32),
    decode_tokens=4,
    trials=2,
    idle_seconds=0.2,
    poll_seconds=0.01,
)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny", "llama", "tiny", seed=1, dtype="float32")
    return root


@pytest.fixture
def engine(models_root: Path) -> Iterator[Engine]:
    tier = make_gpu_tier(32 * 2**20, force_emulated=True)
    eng = Engine(tier, [models_root], node="test", calibration_bytes=2**20)
    yield eng
    eng.close()


def wait_for(condition: Callable[[], bool], timeout_seconds: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start(profiler: BackgroundProfiler) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=profiler.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_an_idle_gpu_gets_a_compact_curve_published_once(engine: Engine, models_root: Path) -> None:
    published: list[MeasuredProfile] = []
    profiler = BackgroundProfiler(engine, published.append, SETTINGS)
    path = str(models_root / "tiny")
    assert profiler.want("team-a/tiny", path, "float32")
    assert not profiler.want("team-a/tiny", path, "float32")  # queued once
    thread, stop = start(profiler)
    try:
        wait_for(lambda: len(published) == 1)
    finally:
        stop.set()
        thread.join(30)
    (profile,) = published
    assert len(profile.points) == SETTINGS.point_count
    assert {(p.execution_mode, p.sequence_length) for p in profile.points} == {
        (m, n) for m in ("stream", "cpu") for n in (8, 32)
    }
    assert all(p.decode_tokens_per_second > 0 and p.trials == 2 for p in profile.points)
    assert profile.spread >= 0 and profile.emulated
    # the published spec is a valid SensitivityProfile, and the profiler's copy is gone
    spec = SensitivityProfileSpec.model_validate(profile.spec("node-1"))
    assert spec.measured_by == "node-1" and spec.gpu_type == engine.tier.gpu_name
    assert engine.names() == []
    assert not profiler.want("team-a/tiny", path, "float32")  # done: not measured again


def test_it_yields_to_a_request_and_to_an_admin_command_and_keeps_its_points(
    engine: Engine, models_root: Path
) -> None:
    path = str(models_root / "tiny")
    engine.load(
        "team-a/served",
        path,
        ModelOptions(dtype="float32", resident_fraction=1.0, max_sequence_length=256, max_batch_size=2),
    )
    published: list[MeasuredProfile] = []
    settings = CompactSettings(
        fractions=(1.0, 0.5, 0.0),
        sequence_lengths=(8, 64),
        decode_tokens=6,
        trials=3,
        idle_seconds=0.2,
        poll_seconds=0.01,
    )
    profiler = BackgroundProfiler(engine, published.append, settings)
    profiler.want("team-a/served", path, "float32")
    thread, stop = start(profiler)
    try:
        # a request arrives while the profiler measures: it steps aside before its next trial
        wait_for(profiler.measuring.is_set)
        job = profiler._jobs[0]
        request = engine.submit(
            "team-a/served", list(range(1, 20)), SamplingParams(max_tokens=48, ignore_eos=True)
        )
        request.wait(None)
        assert request.finished_at is not None
        # no trial starts while the request runs, but the one the profiler had already checked for
        during = [t for t in profiler.trial_starts if request.submitted_at <= t <= request.finished_at]
        assert len(during) <= 1
        wait_for(lambda: job.yields >= 1)
        kept = {point: list(rates) for point, rates in job.decode.items()}
        # an admin command also interrupts; the points measured before are kept
        wait_for(lambda: profiler.measuring.is_set() or published != [])
        profiler.interrupt()
        wait_for(lambda: job.yields >= 2 or published != [])
        wait_for(lambda: len(published) == 1)
    finally:
        stop.set()
        thread.join(30)
    assert len(published[0].points) == settings.point_count
    assert published[0].yields >= 1
    # the trials measured before the yields are kept, not measured again: each point's trials begin with
    # them, and no point has more than its trials
    for point, rates in kept.items():
        assert job.decode[point][: len(rates)] == rates
    assert all(len(rates) == settings.trials for rates in job.decode.values())
    assert all(p.trials == settings.trials for p in published[0].points)
    assert engine.names() == ["team-a/served"]


def test_a_request_arriving_mid_trial_cancels_the_trial_at_once(engine: Engine, models_root: Path) -> None:
    """The trial in flight is dropped at the engine's next step, not finished: a long trial (400 decode
    tokens) is cut after a fraction of them, and the request is served beside the profiler's copy for at
    most a step of it."""
    path = str(models_root / "tiny")
    engine.load(
        "team-a/served",
        path,
        ModelOptions(dtype="float32", resident_fraction=1.0, max_sequence_length=256, max_batch_size=2),
    )
    settings = CompactSettings(
        fractions=(1.0,),
        sequence_lengths=(8,),
        decode_tokens=400,
        trials=1,
        idle_seconds=0.2,
        poll_seconds=0.01,
    )
    published: list[MeasuredProfile] = []
    profiler = BackgroundProfiler(engine, published.append, settings)
    profiler.want("team-a/served", path, "float32")
    thread, stop = start(profiler)
    try:
        wait_for(profiler.measuring.is_set)
        request = engine.submit("team-a/served", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        request.wait(None)
        wait_for(lambda: profiler.interrupted_trials != [])
    finally:
        stop.set()
        thread.join(60)
    (tokens,) = profiler.interrupted_trials[:1]
    assert tokens < settings.decode_tokens  # cut part-way, not run to its end
    assert request.finish_reason == "length" and len(request.token_ids) == 4
