"""Decode tokens/s under partial residency, per mode, against the roofline and against HF Accelerate.

Measured side by side in one run, on one device, for r in {1, .75, .5, .25}:
  engine     decode tokens/s in `stream` mode (offloaded layers copied in, double-buffered) and in
             `cpu` mode (offloaded layers computed on the host)
  roofline   the bound from measured bandwidths: resident bytes / device-memory GB/s + offloaded bytes /
             link GB/s (stream) or / host-memory GB/s (cpu); bytes are those read per token
  accelerate Hugging Face Accelerate `device_map` offload with the same GPU memory limit (on a GPU);
             without a GPU there is nothing to offload to, so the baseline is plain transformers on CPU
Without a GPU the "device" is the emulated tier (a CPU memory pool): every number says emulated.

    python benchmarks/bench_offload.py --preset qwen2.5-0.5b --layers 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from _table import table
from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams, make_gpu_tier
from residency_worker.engine.tiers import measure_host_to_device_peak
from residency_worker.report.environment import read_gbps
from residency_worker.report.measure import engine_decode_rate, hf_decode_rate, hf_model

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="qwen2")
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, default=8, help="override the preset's depth (0: keep)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-gib", type=float, default=16.0, help="budget of the emulated tier")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--bandwidth-mib", type=int, default=512)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="use this model instead of generating one"
    )
    args = parser.parse_args()

    tier = make_gpu_tier(int(args.gpu_memory_gib * 2**30) if not torch.cuda.is_available() else None)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    link = measure_host_to_device_peak(tier, args.bandwidth_mib * 2**20)
    device_gbps = read_gbps(tier.device, args.bandwidth_mib * 2**20)
    host_gbps = read_gbps(torch.device("cpu"), args.bandwidth_mib * 2**20)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as scratch:
        model_dir = args.model_dir or make_model(
            Path(scratch) / "model",
            arch=args.arch,
            preset=args.preset,
            dtype=args.dtype,
            overrides={"num_hidden_layers": args.layers} if args.layers else None,
        )
        engine = Engine(tier, [model_dir.resolve().parent], node="bench", calibration_bytes=0)
        baseline_cache: dict[int, tuple[float, str]] = {}
        # one untimed pass first, so one-off costs (kernel selection, first-touch memory) hit no row
        engine.load(
            "warm-up",
            str(model_dir),
            ModelOptions(
                dtype=args.dtype,
                decode_mode="stream",
                max_batch_size=1,
                max_sequence_length=args.prompt_tokens + 16,
            ),
        )
        engine.generate("warm-up", [1] * args.prompt_tokens, SamplingParams(max_tokens=4, ignore_eos=True))
        engine.unload("warm-up")
        for fraction in FRACTIONS:
            for mode in ("stream", "cpu"):
                name = f"r{int(fraction * 100)}-{mode}"
                engine.load(
                    name,
                    str(model_dir),
                    ModelOptions(
                        dtype=args.dtype,
                        resident_fraction=fraction,
                        decode_mode=mode,
                        max_batch_size=1,
                        max_sequence_length=args.prompt_tokens + args.decode_tokens + 8,
                    ),
                )
                runner = engine.runner(name)
                residency = engine.residency(name)
                per_token = [u for u in runner.weights.units if u.name != "embed"]
                resident_bytes = sum(
                    runner.weights.unit_bytes(u) for u in per_token if u.name in residency.resident_units
                )
                offloaded_bytes = sum(
                    runner.weights.unit_bytes(u) for u in per_token if u.name not in residency.resident_units
                )
                offload_gbps = link.gbps if mode == "stream" else host_gbps
                roofline_seconds = resident_bytes / (device_gbps * 1e9) + offloaded_bytes / (
                    offload_gbps * 1e9
                )
                prompt = [(13 * i + 7) % runner.spec.vocab_size for i in range(args.prompt_tokens)]
                rate = engine_decode_rate(engine, name, prompt, args.decode_tokens, args.trials)
                engine.unload(name)
                # the baseline depends only on the GPU memory limit: reuse it across modes (on CPU, across r)
                key = residency.resident_weight_bytes if tier.device.type == "cuda" else -1
                if not args.skip_baseline and key not in baseline_cache:
                    model, label = hf_model(model_dir, tier, torch_dtype, residency.resident_weight_bytes)
                    baseline_cache[key] = (
                        hf_decode_rate(model, prompt, args.decode_tokens, args.trials),
                        label,
                    )
                    del model
                    gc.collect()
                    tier.empty_cache()
                baseline_rate, baseline_label = baseline_cache.get(key, (float("nan"), "skipped"))
                results.append(
                    {
                        "requested_fraction": fraction,
                        "resident_fraction": residency.resident_fraction,
                        "mode": mode,
                        "decode_tokens_per_second": rate,
                        "roofline_tokens_per_second": 1 / roofline_seconds,
                        "over_roofline": rate * roofline_seconds,
                        "baseline_tokens_per_second": baseline_rate,
                        "baseline": baseline_label,
                        "over_baseline": rate / baseline_rate,
                        "resident_bytes_per_token": resident_bytes,
                        "offloaded_bytes_per_token": offloaded_bytes,
                    }
                )
        engine.close()
    device = f"{tier.gpu_name}{' (EMULATED: CPU memory pool)' if tier.emulated else ''}"
    print(
        f"bench_offload on {device}; {args.preset} ({args.layers or 'all'} layers, {args.dtype}); batch 1, "
        f"prompt {args.prompt_tokens}, {args.decode_tokens} decode tokens, median of {args.trials}"
    )
    print(
        f"measured: device memory {device_gbps:.1f} GB/s, host memory {host_gbps:.1f} GB/s, "
        f"link {link.gbps:.1f} GB/s ({link.path})"
    )
    rows = [
        [
            "r asked",
            "r actual",
            "mode",
            "tok/s",
            "roofline tok/s",
            "÷ roofline",
            "baseline tok/s",
            "÷ baseline",
        ]
    ]
    for r in results:
        rows.append(
            [
                f"{r['requested_fraction']:.2f}",
                f"{r['resident_fraction']:.3f}",
                r["mode"],
                f"{r['decode_tokens_per_second']:.2f}",
                f"{r['roofline_tokens_per_second']:.2f}",
                f"{r['over_roofline']:.2f}",
                f"{r['baseline_tokens_per_second']:.2f}",
                f"{r['over_baseline']:.2f}",
            ]
        )
    print(table(rows))
    print(f"baseline: {results[-1]['baseline']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_offload_{'emulated' if tier.emulated else tier.gpu_name.replace(' ', '_')}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_offload",
                "device": device,
                "emulated": tier.emulated,
                "model": {
                    "arch": args.arch,
                    "preset": args.preset,
                    "layers": args.layers,
                    "dtype": args.dtype,
                },
                "bandwidth_gbps": {
                    "device_memory": device_gbps,
                    "host_memory": host_gbps,
                    "link": link.gbps,
                    "link_path": link.path,
                },
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "trials": args.trials,
                "points": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
