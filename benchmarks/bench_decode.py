"""Decode throughput of the engine's fast path, against the memory roofline and against transformers.

Measured side by side in one run, on one device, with the same weights, the same prompt and the same
number of new tokens, after a warm-up, over several trials (median, min-max):

  engine        aggregate decode tokens/s of the worker engine at batch b (b requests submitted at once,
                greedy): (b x (N-1)) / (time of N new tokens - time of 1 new token), so prefill cancels out
  transformers  `generate` with a static KV cache (`cache_implementation="static"`) on the same weights, the
                same batch of prompts, measured the same way
  roofline      the memory-read bound: b / (seconds to read one step's weights), at the device's measured
                read GB/s for resident bytes and the measured host-to-device GB/s for streamed ones (every
                weight is read once per step whatever the batch; an untied embedding only for b rows);
                compute is left out, so at large b the bound is loose on a CPU

and, with --serve, what users see: a standalone `residency worker` process serving the model over its
OpenAI-compatible HTTP API to 1 and to 16 concurrent clients (aggregate completion tokens/s, each client
sending `--serve-requests` requests in turn), against transformers `generate` at batch 16 on the same
weights (completion tokens/s, prefill included on both sides).

Without a GPU the engine runs on the emulated tier (a CPU memory pool): every number says emulated.
Advantages the engine has are named in the output: none on the CPU beyond its own code (same threads,
same dtype, same weights in memory; transformers runs eagerly, without torch.compile, as does the engine).
Both run with torch's huge-page CPU allocation (THP_MEM_ALLOC_ENABLE=1, as the worker sets it; the
benchmark runs itself again with it set unless the environment says otherwise, e.g. 0 to compare).

    python benchmarks/bench_decode.py                     # CPU: qwen2.5-0.5b shape, float32, b in 1, 4, 16
    python benchmarks/bench_decode.py --serve             # plus the HTTP end-to-end comparison
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM

from _table import table
from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams, cpu_kernels, make_gpu_tier
from residency_worker.engine.generate import RequestEvent
from residency_worker.engine.tiers import measure_host_to_device_peak
from residency_worker.hostmem import THP_ENV
from residency_worker.report.environment import read_gbps
from residency_worker.report.measure import generate_seconds

RESULTS = Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _prompt(length: int, vocab: int, salt: int) -> list[int]:
    return [(salt * 7919 + 13 * i + 5) % vocab for i in range(length)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def engine_rates(
    engine: Engine, name: str, prompts: list[list[int]], new_tokens: int, trials: int
) -> list[float]:
    """Aggregate decode tokens/s of the batch, one value per trial (after one untimed warm-up)."""

    def timed(tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        _synchronize(engine.tier.device)
        start = time.perf_counter()
        requests = [engine.submit(name, p, params) for p in prompts]
        for request in requests:
            request.wait(None)
        return time.perf_counter() - start  # the last token came back to the host: the device is done

    timed(4)
    rates = []
    for _ in range(trials):
        one, many = timed(1), timed(new_tokens)
        rates.append(len(prompts) * (new_tokens - 1) / max(many - one, 1e-9))
    return rates


def _generate_seconds(model: Any, ids: torch.Tensor, tokens: int) -> float:
    """Seconds of greedy `generate` with a static KV cache for exactly `tokens` new tokens."""
    return generate_seconds(model, ids, tokens, device=ids.device, static_cache=True)


def transformers_rates(model: Any, prompts: list[list[int]], new_tokens: int, trials: int) -> list[float]:
    """The same measure for `generate` with a static cache on the same weights."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)

    def timed(tokens: int) -> float:
        return _generate_seconds(model, ids, tokens)

    timed(4)
    rates = []
    for _ in range(trials):
        one, many = timed(1), timed(new_tokens)
        rates.append(len(prompts) * (new_tokens - 1) / max(many - one, 1e-9))
    return rates


def bytes_per_step(model_dir: Path, weight_bytes: int, element_bytes: int, batch: int) -> int:
    """Weight bytes one decode step reads: all of them, except an untied embedding table (b rows only)."""
    config = json.loads((model_dir / "config.json").read_text())
    embed_bytes = config["vocab_size"] * config["hidden_size"] * element_bytes
    if config.get("tie_word_embeddings"):
        return weight_bytes
    return weight_bytes - embed_bytes + batch * config["hidden_size"] * element_bytes


def prefill_flops(config: Any, prompt_tokens: int) -> float:
    """Multiply-add FLOPs of one prompt's prefill: 2 per weight of the layers (embedding gathers, the head
    runs for the last token only) and the causal attention's scores and sums."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * 2 + 3 * hidden * config.intermediate_size
    linear = 2 * layers * per_layer * prompt_tokens + 2 * hidden * config.vocab_size
    attention = 4 * layers * heads * head_dim * prompt_tokens * (prompt_tokens + 1) / 2
    return float(linear + attention)


def decode_flops(config: Any, context_tokens: int) -> float:
    """Multiply-add FLOPs of one decode token: 2 per weight of the layers and of the head, and attention
    over ``context_tokens`` earlier ones."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = prefill_flops(config, 1) - 4 * layers * heads * head_dim  # one token's layers and the head
    return float(linear + 4 * layers * heads * head_dim * context_tokens)


def serve_bounds(
    config: Any, prompt_tokens: int, new_tokens: int, peak: float, step_read_seconds: float
) -> tuple[float, float]:
    """Completion tokens/s no engine beats on this device, for 1 client and for 16 at once: every prompt
    prefilled at the best measured multiply rate, and each later token decoded at no less than the
    larger of its FLOPs at that rate and one read of the weights (shared by a batch) at the measured
    read rate. The HTTP path, tokenization and the clients' own CPU are left out."""
    context = prompt_tokens + new_tokens // 2
    step_flops = decode_flops(config, context)
    one = prefill_flops(config, prompt_tokens) / peak + (new_tokens - 1) * max(
        step_read_seconds, step_flops / peak
    )
    sixteen = 16 * prefill_flops(config, prompt_tokens) / peak + (new_tokens - 1) * max(
        step_read_seconds, 16 * step_flops / peak
    )
    return new_tokens / one, 16 * new_tokens / sixteen


def peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, trials: int = 5) -> float:
    """The device's best measured matrix-multiply rate: a large square product, best of a few, through
    both of torch's CPU paths (MKL and oneDNN's packed weights) where they exist."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    candidates = [lambda: a @ b]
    if device.type == "cpu" and cpu_kernels.available(dtype):
        packed = cpu_kernels.pack(b)
        candidates.append(lambda: cpu_kernels.linear(a, packed, None))
    best = float("inf")
    for multiply in candidates:
        multiply()
        for _ in range(trials):
            _synchronize(device)
            start = time.perf_counter()
            multiply()
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# -- end to end ----------------------------------------------------------------------------------------
async def _clients(
    url: str, model: str, prompts: list[list[int]], clients: int, per_client: int, tokens: int
) -> float:
    """Aggregate completion tokens/s of `clients` concurrent clients, each sending `per_client` requests
    with a prompt of its own (no two clients share a prefix, as real clients do not)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one_client(prompt: list[int]) -> int:
            produced = 0
            for _ in range(per_client):
                response = await http.post(
                    "/v1/completions",
                    json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0},
                )
                response.raise_for_status()
                produced += int(response.json()["usage"]["completion_tokens"])
            return produced

        start = time.perf_counter()
        produced = await asyncio.gather(*(one_client(prompts[i]) for i in range(clients)))
        return sum(produced) / (time.perf_counter() - start)


def serve_rates(
    model_dir: Path, args: argparse.Namespace, prompts: list[list[int]], trials: int
) -> dict[str, list[float]]:
    port = args.serve_port
    token = "bench-admin-token"
    env = {**os.environ, "RESIDENCY_ADMIN_TOKEN": token}
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "residency"), "worker", "--standalone", "--emulate",
            "--gpu-memory", f"{args.gpu_memory_gib}GiB", "--models-root", str(model_dir.parent),
            "--port", str(port), "--calibration-mib", "16", "--log-level", "warning",
        ],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the worker did not start")
            time.sleep(0.5)
        loaded = httpx.post(
            f"{url}/admin/models",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "name": "bench", "path": str(model_dir), "dtype": args.dtype, "resident_fraction": 1.0,
                "decode_mode": "stream", "max_batch_size": 16,
                "max_sequence_length": args.prompt_tokens + args.serve_tokens + 8,
            },
            timeout=600,
        )  # fmt: skip
        loaded.raise_for_status()
        rates: dict[str, list[float]] = {"1": [], "16": []}
        asyncio.run(_clients(url, "bench", prompts, 1, 1, 4))  # warm-up
        for _ in range(trials):
            for clients in (1, 16):
                rate = asyncio.run(
                    _clients(url, "bench", prompts, clients, args.serve_requests, args.serve_tokens)
                )
                rates[str(clients)].append(rate)
        return rates
    finally:
        worker.terminate()
        worker.wait(30)


def transformers_batch_rates(
    model: Any, prompts: list[list[int]], batch: int, tokens: int, trials: int
) -> list[float]:
    """Completion tokens/s of `generate` at batch `batch`, prefill included (as the HTTP clients see it)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts[:batch], device=device)
    rates = []
    for trial in range(trials + 1):
        seconds = _generate_seconds(model, ids, tokens)
        if trial:  # the first is the warm-up
            rates.append(batch * tokens / seconds)
    return rates


def inter_token_latency(
    engine: Engine, name: str, vocab: int, streams: int, long_prompt_tokens: int, chunk_label: str
) -> dict[str, Any]:
    """Inter-token latency of `streams` decoding streams before and while a long prompt is prefilled."""
    stamps: list[list[float]] = [[] for _ in range(streams)]

    def recorder(index: int) -> Any:
        def on_event(event: RequestEvent) -> None:
            if event.token_id is not None:
                stamps[index].append(time.perf_counter())

        return on_event

    params = SamplingParams(max_tokens=100_000, ignore_eos=True)
    running = [
        engine.submit(name, _prompt(16, vocab, 100 + i), params, on_event=recorder(i)) for i in range(streams)
    ]
    while min(len(s) for s in stamps) < 6:
        time.sleep(0.01)
    arrived = time.perf_counter()
    long_request = engine.submit(name, _prompt(long_prompt_tokens, vocab, 99), SamplingParams(max_tokens=1))
    long_request.wait(None)
    prefilled = time.perf_counter()
    for request in running:
        request.cancel()
    for request in running:
        request.done.wait(60)

    def gaps(start: float, end: float) -> list[float]:
        found = []
        for times in stamps:
            found.extend(b - a for a, b in itertools.pairwise(times) if start <= b <= end)
        return found

    before = gaps(0.0, arrived)
    during = gaps(arrived, prefilled)
    return {
        "chunking": chunk_label,
        "streams": streams,
        "long_prompt_tokens": long_prompt_tokens,
        "prefill_seconds": prefilled - arrived,
        "itl_before_median_seconds": statistics.median(before) if before else None,
        "itl_during_median_seconds": statistics.median(during) if during else None,
        "itl_during_max_seconds": max(during) if during else None,
        "tokens_during_prefill": len(during),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default=None, help="default: from the preset (llama-*: llama, else qwen2)")
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's depth (0: keep it)")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="resident fraction (the rest streamed in)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--gpu-memory-gib", type=float, default=8.0, help="budget of the emulated tier")
    parser.add_argument("--serve", action="store_true", help="also measure through a worker's HTTP API")
    parser.add_argument("--serve-tokens", type=int, default=32)
    parser.add_argument("--serve-requests", type=int, default=2, help="requests per client per trial")
    parser.add_argument("--serve-port", type=int, default=18931)
    parser.add_argument("--skip-engine", action="store_true", help="only the end-to-end part")
    parser.add_argument(
        "--itl", action="store_true", help="inter-token latency of 4 streams while a long prompt arrives"
    )
    parser.add_argument(
        "--itl-prompt-tokens", type=int, default=None, help="default: 4096 on a GPU, 512 on the CPU"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.arch = args.arch or ("llama" if args.preset.startswith("llama") else "qwen2")
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    overrides = {"num_hidden_layers": args.layers} if args.layers else None
    model_dir = make_model(
        workdir / "model",
        args.arch,
        args.preset,
        seed=3,
        dtype=args.dtype,
        overrides=overrides,
        device="cuda" if cuda else "cpu",
    )
    tier = make_gpu_tier(None if cuda else int(args.gpu_memory_gib * 2**30))
    device = tier.device
    read = read_gbps(device, 512 * 2**20)
    emulated = tier.emulated
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    reference.eval()
    config = reference.config
    vocab = config.vocab_size
    result: dict[str, Any] = {
        "device": tier.gpu_name,
        "emulated": emulated,
        "model": {
            "arch": args.arch,
            "preset": args.preset,
            "layers": config.num_hidden_layers,
            "dtype": args.dtype,
        },
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "trials": args.trials,
        "read_gbps": read,
        "threads": torch.get_num_threads(),
        "huge_pages": os.environ.get(THP_ENV) == "1",  # torch's CPU buffers: both sides, one process
        "advantages": "none on the CPU: same process, threads, dtype and weights; neither side compiles"
        if not cuda
        else "the engine replays CUDA graphs for decode; transformers runs eagerly with a static cache",
        "batches": [],
    }
    rows = [
        ["batch", "engine tok/s", "min-max", "÷ roofline", "transformers tok/s", "min-max", "engine ÷ hf"]
    ]
    if not args.skip_engine:
        engine = Engine(tier, [workdir], node="bench", calibration_bytes=0)
        engine.load(
            "m",
            str(model_dir),
            ModelOptions(
                dtype=args.dtype,
                resident_fraction=args.fraction,
                decode_mode="stream",
                max_batch_size=max(batches),
                max_sequence_length=args.prompt_tokens + args.new_tokens + 8,
            ),
        )
        residency = engine.residency("m")
        weight_bytes = residency.weight_bytes
        streamed_bytes = weight_bytes - residency.resident_weight_bytes
        link = measure_host_to_device_peak(tier, 256 * 2**20) if streamed_bytes else None
        result["resident_fraction"] = residency.resident_fraction
        result["link_gbps"] = link.gbps if link else None
        element = torch.empty((), dtype=dtype).element_size()
        batch1 = None
        for batch in batches:
            prompts = [_prompt(args.prompt_tokens, vocab, salt) for salt in range(batch)]
            ours = engine_rates(engine, "m", prompts, args.new_tokens, args.trials)
            theirs = transformers_rates(reference, prompts, args.new_tokens, args.trials)
            # resident bytes at the device's read rate, streamed bytes at the link's (stream mode's bound)
            step_bytes = bytes_per_step(model_dir, weight_bytes, element, batch)
            step_seconds = (step_bytes - streamed_bytes) / (read * 1e9)
            if link is not None:
                step_seconds += streamed_bytes / (link.gbps * 1e9)
            roofline = batch / step_seconds  # a memory-bound step serves every row of the batch
            ours_s, theirs_s = _spread(ours), _spread(theirs)
            batch1 = batch1 or ours_s["median"]
            entry = {
                "batch": batch,
                "engine_tokens_per_second": ours_s,
                "transformers_tokens_per_second": theirs_s,
                "roofline_tokens_per_second": roofline,
                "engine_over_roofline": ours_s["median"] / roofline,
                "engine_over_transformers": ours_s["median"] / theirs_s["median"],
                "engine_over_engine_batch1": ours_s["median"] / batch1,
                "engine_trials": ours,
                "transformers_trials": theirs,
            }
            result["batches"].append(entry)
            rows.append(
                [
                    str(batch),
                    f"{ours_s['median']:.2f}",
                    f"{ours_s['min']:.2f}-{ours_s['max']:.2f}",
                    f"{entry['engine_over_roofline']:.2f}",
                    f"{theirs_s['median']:.2f}",
                    f"{theirs_s['min']:.2f}-{theirs_s['max']:.2f}",
                    f"{entry['engine_over_transformers']:.2f}x",
                ]
            )
            print(table(rows), flush=True)
        engine.close()
    if args.itl:
        long_tokens = args.itl_prompt_tokens or (4096 if cuda else 512)
        rows = [
            ["prefill", "prompt", "prefill s", "ITL before", "ITL during (median)", "max", "tokens during"]
        ]
        result["inter_token_latency"] = []
        for label, chunk in (("chunked", None), ("whole prompt", long_tokens + 16)):
            engine = Engine(tier, [workdir], node="bench", calibration_bytes=0)
            engine.load(
                "m",
                str(model_dir),
                ModelOptions(
                    dtype=args.dtype,
                    decode_mode="stream",
                    max_batch_size=8,
                    max_sequence_length=long_tokens + 64,
                    prefill_chunk_tokens=chunk,
                ),
            )
            found = inter_token_latency(engine, "m", vocab, 4, long_tokens, label)
            engine.close()
            result["inter_token_latency"].append(found)

            def ms(value: float | None) -> str:
                return "-" if value is None else f"{value * 1000:.0f} ms"

            rows.append(
                [
                    label,
                    str(long_tokens),
                    f"{found['prefill_seconds']:.2f}",
                    ms(found["itl_before_median_seconds"]),
                    ms(found["itl_during_median_seconds"]),
                    ms(found["itl_during_max_seconds"]),
                    str(found["tokens_during_prefill"]),
                ]
            )
        print()
        print(table(rows))
    if args.serve:
        prompts = [_prompt(args.prompt_tokens, vocab, 1 + client) for client in range(16)]
        served = serve_rates(model_dir, args, prompts, args.trials)
        hf16 = transformers_batch_rates(reference, prompts, 16, args.serve_tokens, args.trials)
        one, sixteen, hf = _spread(served["1"]), _spread(served["16"]), _spread(hf16)
        flops = prefill_flops(config, args.prompt_tokens)
        peak = peak_flops(device, dtype)
        # no engine serves 16 distinct prompts faster than the device multiplies their prefill at its
        # best measured rate (decode steps not even counted): the bound of any design on this device
        bound = 16 * args.serve_tokens / (16 * flops / peak)
        element = torch.empty((), dtype=dtype).element_size()
        reference_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())  # tied: once
        step_read_seconds = bytes_per_step(model_dir, reference_bytes, element, 1) / (read * 1e9)
        bound_1, bound_16 = serve_bounds(
            config, args.prompt_tokens, args.serve_tokens, peak, step_read_seconds
        )
        result["serve"] = {
            "clients_1_tokens_per_second": one,
            "clients_16_tokens_per_second": sixteen,
            "transformers_batch16_tokens_per_second": hf,
            "clients_16_over_1": sixteen["median"] / one["median"],
            "clients_16_over_transformers_batch16": sixteen["median"] / hf["median"],
            "new_tokens_per_request": args.serve_tokens,
            "requests_per_client": args.serve_requests,
            "prefill_flops_per_request": flops,
            "device_peak_flops": peak,
            "clients_16_prefill_bound_tokens_per_second": bound,
            "prefill_bound_over_1_client": bound / one["median"],
            "clients_1_bound_tokens_per_second": bound_1,
            "clients_16_bound_tokens_per_second": bound_16,
            "bound_16_over_bound_1": bound_16 / bound_1,
        }
        print()
        print(
            table(
                [
                    ["served", "tok/s", "min-max"],
                    ["1 client", f"{one['median']:.2f}", f"{one['min']:.2f}-{one['max']:.2f}"],
                    ["16 clients", f"{sixteen['median']:.2f}", f"{sixteen['min']:.2f}-{sixteen['max']:.2f}"],
                    ["transformers b=16", f"{hf['median']:.2f}", f"{hf['min']:.2f}-{hf['max']:.2f}"],
                ]
            )
        )
        print(
            f"16 clients ÷ 1: {result['serve']['clients_16_over_1']:.2f}x; "
            f"16 clients ÷ transformers b=16: {result['serve']['clients_16_over_transformers_batch16']:.2f}x"
        )
        print(
            f"any engine's bound for 16 clients on this device (their prefill at the best measured "
            f"{peak / 1e9:.0f} GFLOP/s, decode free): {bound:.2f} tok/s = "
            f"{bound / one['median']:.2f}x one client"
        )
        print(
            f"with decode counted (FLOPs at that rate, a step no faster than one read of the weights at "
            f"{read:.1f} GB/s): any engine serves at most {bound_1:.2f} tok/s to 1 client and {bound_16:.2f} "
            f"to 16, so 16 ÷ 1 is at most {bound_16 / bound_1:.2f}x for an engine at both bounds; ours: "
            f"1 client at {one['median'] / bound_1:.2f} of its bound, "
            f"16 at {sixteen['median'] / bound_16:.2f}"
        )
    label = "emulated" if emulated else tier.gpu_name.replace(" ", "_")
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.fraction == 1.0 else f"_r{args.fraction:g}"
    out = RESULTS / f"bench_decode_{label}_{args.preset}{suffix}_p{args.prompt_tokens}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'EMULATED (CPU) ' if emulated else ''}read {read:.1f} GB/s; wrote {out}")


if __name__ == "__main__":
    if THP_ENV not in os.environ:  # torch reads it once, at import: run again with it set, as the worker does
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, THP_ENV: "1"})
    main()
