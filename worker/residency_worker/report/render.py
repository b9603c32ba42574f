"""The report as Markdown with PNG plots; every reading is computed from the measured figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 2**30


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, out_dir: Path, name: str) -> str:
    figure.tight_layout()
    figure.savefig(out_dir / name, dpi=110)
    _pyplot().close(figure)
    return name


def _paired_bars(
    axis: Any, labels: list[str], ours: list[float], theirs: list[float], names: tuple[str, str]
) -> None:
    """Ours beside the baseline for each shape, on a log scale (the gaps span orders of magnitude)."""
    xs = range(len(labels))
    axis.bar([x - 0.2 for x in xs], ours, 0.4, label=names[0])
    axis.bar([x + 0.2 for x in xs], theirs, 0.4, label=names[1])
    axis.set_xticks(list(xs), labels, fontsize=8)
    axis.set_yscale("log")
    axis.legend(fontsize=8)


def _plot_curves(report: dict[str, Any], out_dir: Path, mode: str) -> str | None:
    plt = _pyplot()
    shapes = report["summary"]["shapes"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for label, data in shapes.items():
        for key, values in sorted(data["normalised"].items()):
            curve_mode, length = key.split("/")
            if curve_mode != mode:
                continue
            points = sorted((float(r), v) for r, v in values.items())
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "-o" if length == str(min(report["settings"]["sequence_lengths"])) else "--s",
                label=f"{label}, seq {length}",
            )
            drawn += 1
    if not drawn:
        plt.close(figure)
        return None
    tier = report["environment"]["gpu_name"] + (" (EMULATED)" if report["emulated"] else "")
    axis.set_xlabel("resident fraction of weight bytes")
    axis.set_ylabel("decode tokens/s ÷ fully resident")
    axis.set_title(f"decode under offload, {mode} mode — {tier}", fontsize=10)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, out_dir, f"curves-{mode}.png")


def _plot_preemption(report: dict[str, Any], out_dir: Path) -> str | None:
    plt = _pyplot()
    labels, save, reload, restore = [], [], [], []
    for label, data in report["summary"]["shapes"].items():
        for p in data["preemption"]:
            labels.append(f"{label}\n{p['kv_tokens']} tok")
            save.append(p["kv_save_seconds"])
            reload.append(p["reload_seconds"])
            restore.append(p["kv_restore_seconds"])
    if not labels:
        return None
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.5))
    xs = range(len(labels))
    axis.bar(xs, reload, label="weight reload")
    axis.bar(xs, save, bottom=reload, label="KV save")
    axis.bar(xs, restore, bottom=[a + b for a, b in zip(reload, save, strict=True)], label="KV restore")
    axis.set_xticks(list(xs), labels, fontsize=7)
    axis.set_ylabel("seconds")
    axis.set_title("preemption cost: reload vs KV transfer" + (" (EMULATED)" if report["emulated"] else ""))
    axis.legend(fontsize=8)
    return _save(figure, out_dir, "preemption.png")


def _plot_peers(report: dict[str, Any], out_dir: Path) -> str | None:
    plt = _pyplot()
    shapes = report["summary"]["shapes"]
    labels = [
        label
        for label, d in shapes.items()
        if d.get("ours_over_accelerate") or d.get("resume_speedup_over_from_pretrained")
    ]
    if not labels:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ours = [max(shapes[label]["ours_tokens_per_second"].values(), default=0) for label in labels]
    theirs = [shapes[label]["accelerate_tokens_per_second"] or 0 for label in labels]
    _paired_bars(left, labels, ours, theirs, ("residency engine", "Accelerate device_map"))
    left.set_ylabel("decode tokens/s")
    left.set_title(f"decode at resident fraction {report['settings']['peer_fraction']}", fontsize=10)
    resume = [shapes[label]["resume_seconds"] or 0 for label in labels]
    cold = [shapes[label]["from_pretrained_seconds"] or 0 for label in labels]
    _paired_bars(right, labels, resume, cold, ("residency resume", "unload + from_pretrained"))
    right.set_ylabel("seconds to serve again")
    right.set_title("bring a model back", fontsize=10)
    return _save(figure, out_dir, "peers.png")


def _plot_predictor(report: dict[str, Any], out_dir: Path) -> str | None:
    plt = _pyplot()
    rows = report["predictions"]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for method, marker in (("roofline", "x"), ("profile_loo", "o"), ("other_length", "^")):
        pairs = [(r["observed"], r["predicted"][method]) for r in rows if r["predicted"].get(method)]
        if pairs:
            axis.scatter([p[0] for p in pairs], [p[1] for p in pairs], marker=marker, label=method, alpha=0.7)
    observed = [r["observed"] for r in rows]
    low, high = min(observed) * 0.5, max(observed) * 2
    axis.plot([low, high], [low, high], "k--", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("observed decode tokens/s")
    axis.set_ylabel("predicted decode tokens/s")
    axis.set_title("planner predictor vs measurement", fontsize=10)
    axis.legend(fontsize=8)
    return _save(figure, out_dir, "predictor.png")


def render(report: dict[str, Any], out_dir: Path) -> Path:
    env = report["environment"]
    summary = report["summary"]
    shapes = summary["shapes"]
    bandwidths = report["bandwidths"]
    emulated = report["emulated"]
    lines = [
        f"# residency report — {env['gpu_name']}{' (EMULATED: CPU memory pool)' if emulated else ''}",
        "",
    ]
    if emulated:
        lines += [
            "> **Emulated.** No CUDA GPU: the 'GPU' is a CPU memory pool. These numbers check the pipeline "
            "only and support no performance claim.",
            "",
        ]
    link = (
        f"PCIe gen {env['pcie_generation']} (max {env['pcie_max_generation']}) x{env['pcie_width']}"
        if env.get("pcie_generation")
        else "PCIe link not reported"
    )
    lines += [f"> {note}" for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    lines += [
        f"GPU {env['gpu_name']} ({env['gpu_memory_bytes'] / GIB:.0f} GiB), driver {env['driver'] or '—'}, "
        f"CUDA {env['cuda'] or '—'}, torch {env['torch']}, transformers {env['transformers']}, {link}; "
        f"CPU {env['cpu']} ({env['cpu_count']} threads), "
        f"{env['host_memory_bytes'] / GIB:.0f} GiB host memory. "
        f"Created {report['created']}, {report['wall_seconds']:.0f} s of measurement.",
        "",
        "Measured ceilings: pinned host→device "
        f"{bandwidths['pinned_host_to_device']['gbps']:.1f} GB/s, pageable "
        f"{bandwidths['pageable_host_to_device']['gbps']:.1f} GB/s, device memory read "
        f"{bandwidths['device_read_gbps']:.0f} GB/s, "
        f"host memory read {bandwidths['host_read_gbps']:.1f} GB/s.",
        "",
        "## Goals",
        "",
    ]
    names = {
        "reload_over_peak": "reload GB/s ÷ pinned peak (worst shape)",
        "ours_over_accelerate": "decode vs Accelerate offload at the same GPU memory (worst shape)",
        "resume_speedup_over_from_pretrained": "resume vs unload + from_pretrained (worst shape)",
        "predictor_median_error": "predictor median error, profiled model (leave-one-out)",
    }
    goal_rows = []
    for key, label in names.items():
        value = summary["goals"][key]
        target = summary["goal_targets"][key]
        met = summary["goals_met"][key]
        sign = "≤" if key == "predictor_median_error" else "≥"
        goal_rows.append(
            [label, _f(value, 2), f"{sign} {target}", "—" if met is None else ("met" if met else "NOT met")]
        )
    lines += _table(["goal", "measured", "target", ""], goal_rows)

    # (a)
    lines += ["## (a) Decode under partial residency (study: non-linear, small models hurt most)", ""]
    for mode in report["settings"]["modes"]:
        name = _plot_curves(report, out_dir, mode)
        if name:
            lines += [f"![decode vs residency, {mode}]({name})", ""]
    fractions = [f"{r:g}" for r in report["settings"]["fractions"]]
    curve_rows = []
    for label, data in shapes.items():
        for key, values in sorted(data["normalised"].items(), key=lambda kv: _curve_order(kv[0])):
            curve_rows.append(
                [label, key.replace("/", ", seq "), f"{data['curves'][key]['1']:.1f}"]
                + [_f(values.get(r), 2) for r in fractions]
            )
    lines += _table(["shape", "mode", "tok/s at r=1"] + [f"r={r}" for r in fractions], curve_rows)
    reading = _reading_curves(report)
    lines += [reading, ""] if reading else []

    # (b)
    lines += ["## (b) Preemption cost: weight reload vs KV transfer (study: the reload dominates)", ""]
    name = _plot_preemption(report, out_dir)
    if name:
        lines += [f"![preemption breakdown]({name})", ""]
    rows = []
    for label, data in shapes.items():
        for p in data["preemption"]:
            rows.append(
                [
                    label,
                    str(p["kv_tokens"]),
                    f"{p['kv_bytes'] / 2**20:.1f} MiB",
                    f"{p['kv_save_seconds']:.4f}",
                    f"{p['kv_restore_seconds']:.4f}",
                    f"{p['reload_bytes'] / GIB:.2f} GiB",
                    f"{p['reload_seconds']:.3f}",
                    _f(p["reload_share"] and 100 * p["reload_share"], 1, " %"),
                ]
            )
    lines += _table(
        [
            "shape",
            "KV tokens",
            "KV bytes",
            "KV save s",
            "KV restore s",
            "weights",
            "reload s",
            "reload share",
        ],
        rows,
    )
    rows = [
        [
            label,
            _f(data["reload_gbps"], 1),
            _f(data["reload_over_peak"], 2),
            _f(data["naive_gbps"], 1),
            _f(data["naive_over_peak"], 2),
            _f(data["reload_speedup_over_naive"], 2, "x"),
        ]
        for label, data in shapes.items()
    ]
    lines += _table(
        [
            "shape",
            "engine reload GB/s",
            "÷ pinned peak",
            "naive per-tensor GB/s",
            "÷ peak",
            "engine vs naive",
        ],
        rows,
    )

    # (c)
    lines += ["## (c) Link bandwidth (study: a slower link amplifies both)", ""]
    rows = [
        [
            label,
            _f(data["pageable_reload_slowdown"], 2, "x"),
            _f(data["pageable_decode_slowdown"], 2, "x"),
        ]
        for label, data in shapes.items()
    ]
    lines += [
        f"Pageable host memory moves {bandwidths['pageable_host_to_device']['gbps']:.1f} GB/s against "
        f"{bandwidths['pinned_host_to_device']['gbps']:.1f} GB/s pinned. "
        "Slowdown when the host cache is pageable "
        f"(reload; streamed decode at r={report['settings']['peer_fraction']}):",
        "",
    ]
    lines += _table(["shape", "reload slower by", "offloaded decode slower by"], rows)
    reading = _reading_lengths(report)
    lines += [reading, ""] if reading else []

    # peers
    lines += ["## Peers, same run", ""]
    name = _plot_peers(report, out_dir)
    if name:
        lines += [f"![peers]({name})", ""]
    rows = []
    for label, data in shapes.items():
        ours = data["ours_tokens_per_second"]
        rows.append(
            [
                label,
                " / ".join(f"{mode} {rate:.1f}" for mode, rate in ours.items()) or "—",
                _f(data["accelerate_tokens_per_second"], 2),
                _f(data["ours_over_accelerate"], 1, "x"),
                _f(data["resume_seconds"], 3),
                _f(data["from_pretrained_seconds"], 2),
                _f(data["resume_speedup_over_from_pretrained"], 1, "x"),
            ]
        )
    lines += _table(
        [
            "shape",
            "ours tok/s",
            "Accelerate tok/s",
            "ours ÷ Accelerate",
            "resume s",
            "from_pretrained s",
            "speedup",
        ],
        rows,
    )

    # predictor
    errors = summary["predictor_errors"]
    lines += ["## Predictor accuracy", ""]
    name = _plot_predictor(report, out_dir)
    if name:
        lines += [f"![predictor]({name})", ""]
    lines += _table(
        ["method", "median abs. error"],
        [
            [
                "roofline only (no profile, measured bandwidths)",
                _f(errors.get("roofline") and 100 * errors["roofline"], 1, " %"),
            ],
            [
                "profile, leave-one-out",
                _f(errors.get("profile_loo") and 100 * errors["profile_loo"], 1, " %"),
            ],
            [
                "profile of the other sequence length",
                _f(errors.get("other_length") and 100 * errors["other_length"], 1, " %"),
            ],
        ],
    )
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in report["skipped"]] + [""]
    lines += ["Raw figures: `report.json` beside this file.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _curve_order(key: str) -> tuple[str, int]:
    mode, length = key.split("/")
    return mode, int(length)


def _reading_curves(report: dict[str, Any]) -> str:
    """Which shape loses most at half residency, and whether the loss is more than proportional."""
    shortest = min(report["settings"]["sequence_lengths"])
    losses = []
    for label, data in report["summary"]["shapes"].items():
        value = data["normalised"].get(f"stream/{shortest}", {}).get("0.5")
        if value is not None:
            losses.append((value, label, data["weight_bytes"]))
    if len(losses) < 1:
        return ""
    losses.sort()
    parts = [
        f"At half residency (stream, seq {shortest}) decode keeps "
        + ", ".join(f"{v:.0%} for {label}" for v, label, _ in losses)
        + "."
    ]
    smallest = min(losses, key=lambda item: item[2])
    parts.append(
        f"The smallest model ({smallest[1]}) keeps {smallest[0]:.0%}; "
        + ("it suffers most." if smallest is losses[0] else f"the most affected is {losses[0][1]}.")
    )
    nonlinear = [label for v, label, _ in losses if v < 0.5]
    if nonlinear:
        parts.append(
            "Losing half the residency costs more than half the speed for "
            + ", ".join(nonlinear)
            + " (non-linear)."
        )
    return " ".join(parts)


def _reading_lengths(report: dict[str, Any]) -> str:
    lengths = sorted(report["settings"]["sequence_lengths"])
    if len(lengths) < 2:
        return ""
    short, long = lengths[0], lengths[-1]
    parts = []
    for label, data in report["summary"]["shapes"].items():
        a = data["normalised"].get(f"stream/{short}", {}).get("0.5")
        b = data["normalised"].get(f"stream/{long}", {}).get("0.5")
        ra = data["curves"].get(f"stream/{short}", {}).get("1")
        rb = data["curves"].get(f"stream/{long}", {}).get("1")
        if None not in (a, b, ra, rb):
            parts.append(
                f"{label}: fully resident {ra:.0f} → {rb:.0f} tok/s, half resident keeps {a:.0%} → {b:.0%}"
            )
    if not parts:
        return ""
    return f"Sequence length {short} → {long} tokens (stream mode): " + "; ".join(parts) + "."
