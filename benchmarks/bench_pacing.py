"""Pacing: two models on one GPU, one with a backlog; its throughput with the other paced to its SLO vs not.

Measured side by side in one run, on one device, with the worker's own engine:
  steady   a model kept busy by 4 clients (batch 4), with an SLO of a quarter of its measured solo rate
  backlog  a model with more requests waiting than its batch holds (hungry throughout)
in three phases: ``backlog`` alone (what it gets with the device to itself), both unpaced (``steady`` has no
SLO: both decode as fast as they can and split the device's time) and both paced (``steady`` decodes at
1.25x its SLO while ``backlog`` has requests waiting). The phases take turns over ``--rounds`` rounds, every
other round backwards. The ratio of interest is backlog's tokens/s paced ÷ unpaced, with steady still
meeting its SLO; alone ÷ unpaced is the most pacing could give. Without a GPU the "device" is the emulated
tier on the CPU and every number is reported as emulated.

    python benchmarks/bench_pacing.py --seconds 20 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from _table import table
from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams, make_gpu_tier
from residency_worker.engine.generate import Request

RESULTS = Path(__file__).parent / "results"
PROMPT = "The planner places each model on the node where it meets its SLO"


def per_token_seconds(request: Request) -> float | None:
    if request.first_token_at is None or request.finished_at is None or len(request.token_ids) < 2:
        return None
    return (request.finished_at - request.first_token_at) / (len(request.token_ids) - 1)


def phase(
    engine: Engine, seconds: float, tokens: int, slo: float, paced: bool, clients: int = 4
) -> dict[str, Any]:
    """`steady` kept at a full batch and `backlog` flooded for `seconds`; what each got.

    `steady` is judged against `slo` in both phases; it is told the SLO (and so paced) only when `paced`.
    """
    engine.set_decode_slo("steady", slo if paced else None)
    stop = threading.Event()
    done: list[Request] = []
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    def client() -> None:
        while not stop.is_set():
            done.append(engine.generate("steady", PROMPT, params, timeout_seconds=600))

    backlog = [engine.submit("backlog", PROMPT, params) for _ in range(48)]
    paced_before = engine.status("steady").timings.paced_seconds
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    backlog_tokens = sum(len(r.token_ids) for r in backlog)
    elapsed = time.perf_counter() - started
    waiting = engine.status("backlog").queue_depth
    stop.set()
    for thread in threads:
        thread.join()
    for request in backlog:
        request.cancel()
    while engine.status("backlog").queue_depth or engine.status("backlog").active_sequences:
        time.sleep(0.01)
    rates = [1 / t for t in (per_token_seconds(r) for r in done) if t]
    return {
        "slo_tokens_per_second": slo,
        "paced": paced,
        "seconds": elapsed,
        "backlog_tokens_per_second": backlog_tokens / elapsed,
        "backlog_still_waiting": waiting,
        "steady_requests": len(rates),
        "steady_min_tokens_per_second": min(rates) if rates else None,
        "steady_mean_tokens_per_second": sum(rates) / len(rates) if rates else None,
        "steady_met_slo": sum(1 for r in rates if r >= slo) / len(rates) if rates else None,
        "steady_paced_seconds": engine.status("steady").timings.paced_seconds - paced_before,
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's rounds together: rates averaged, steady's requests pooled, each round kept."""
    rates = [r for r in runs if r["steady_requests"]]
    requests = sum(r["steady_requests"] for r in rates)
    return {
        "paced": runs[0]["paced"],
        "seconds": sum(r["seconds"] for r in runs),
        "backlog_tokens_per_second": sum(r["backlog_tokens_per_second"] for r in runs) / len(runs),
        "steady_requests": requests,
        "steady_min_tokens_per_second": min((r["steady_min_tokens_per_second"] for r in rates), default=None),
        "steady_mean_tokens_per_second": (
            sum(r["steady_mean_tokens_per_second"] * r["steady_requests"] for r in rates) / requests
            if requests
            else None
        ),
        "steady_met_slo": (
            sum(r["steady_met_slo"] * r["steady_requests"] for r in rates) / requests if requests else None
        ),
        "steady_paced_seconds": sum(r["steady_paced_seconds"] for r in runs),
        "rounds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="qwen2")
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's depth (0: keep)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase in each round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three phases")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    tier = make_gpu_tier(None if cuda else 8 * 2**30)
    with tempfile.TemporaryDirectory(prefix="bench-pacing-") as scratch:
        overrides = {"num_hidden_layers": args.layers} if args.layers else None
        for name in ("steady", "backlog"):
            make_model(Path(scratch) / name, args.arch, args.preset, seed=1, dtype=dtype, overrides=overrides)
        engine = Engine(tier, [Path(scratch)], node="bench", calibration_bytes=0)
        base = ModelOptions(dtype=dtype, max_sequence_length=256, max_batch_size=4, max_queue=64)
        engine.load("steady", str(Path(scratch) / "steady"), base)
        engine.load("backlog", str(Path(scratch) / "backlog"), dataclasses.replace(base, max_batch_size=2))
        try:
            # steady alone, at a full batch: its solo per-request rate sets its SLO (a quarter of it)
            warm = [
                engine.submit("steady", PROMPT, SamplingParams(max_tokens=args.tokens, ignore_eos=True))
                for _ in range(4)
            ]
            solo = [1 / t for t in (per_token_seconds(r.wait(600)) for r in warm) if t]
            slo = round(min(solo) / 4, 2)
            # the three phases in turn, every other round backwards, so that drift in the machine's speed
            # (other work, clocks) falls on all three alike
            kinds = {"alone": (False, 0), "unpaced": (False, 4), "paced": (True, 4)}  # (paced, clients)
            runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            for round_index in range(args.rounds):
                for kind in list(kinds)[:: 1 if round_index % 2 == 0 else -1]:
                    is_paced, clients = kinds[kind]
                    runs[kind].append(phase(engine, args.seconds, args.tokens, slo, is_paced, clients))
            alone, unpaced, paced = (combine(runs[kind]) for kind in kinds)
        finally:
            engine.close()
    device = torch.cuda.get_device_name() if cuda else "emulated (CPU)"
    ratio = paced["backlog_tokens_per_second"] / unpaced["backlog_tokens_per_second"]
    print(f"device: {device}; {args.arch} {args.preset} x{args.layers or 'all'} layers, {dtype}")
    print(f"steady solo: {min(solo):.1f} tok/s per request at batch 4; its SLO here: {slo} tok/s")
    rows = [
        [
            label,
            f"{p['backlog_tokens_per_second']:.1f}",
            " ".join(f"{r['backlog_tokens_per_second']:.1f}" for r in p["rounds"]),
            *(
                ["-"] * 3
                if p["steady_met_slo"] is None
                else [
                    f"{p['steady_mean_tokens_per_second']:.1f}",
                    f"{p['steady_min_tokens_per_second']:.1f}",
                    f"{100 * p['steady_met_slo']:.0f}%",
                ]
            ),
            f"{p['steady_paced_seconds']:.1f}",
        ]
        for label, p in (("backlog alone", alone), ("unpaced", unpaced), ("paced", paced))
    ]
    header = ["", "backlog tok/s", "per round", "steady tok/s/req", "steady min", "steady >= SLO", "held s"]
    print(table([header, *rows]))
    print(
        f"backlog throughput paced / unpaced: {ratio:.2f}x "
        f"(alone / unpaced, the most pacing could give it: "
        f"{alone['backlog_tokens_per_second'] / unpaced['backlog_tokens_per_second']:.2f}x)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_pacing_{'emulated' if not cuda else device.replace(' ', '_')}.json"
    out.write_text(
        json.dumps(
            {
                "device": device,
                "emulated": not cuda,
                "model": {"arch": args.arch, "preset": args.preset, "layers": args.layers, "dtype": dtype},
                "steady_solo_tokens_per_second": min(solo),
                "slo_tokens_per_second": slo,
                "backlog_alone": alone,
                "unpaced": unpaced,
                "paced": paced,
                "backlog_paced_over_unpaced": ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
