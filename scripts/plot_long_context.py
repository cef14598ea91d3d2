#!/usr/bin/env python
"""Peak GPU memory against sequence length for long-context LoRA training (``scripts/long_context_probe.py``
results) -> a PNG.

    python scripts/plot_long_context.py docs/benchmarks/raw/long_context_h200.json \
        docs/benchmarks/raw/long_context_h200_256k.json --out docs/benchmarks/long_context_h200.png

Three setups of the Llama-3-8B shape: our file with the long-context options (tiled MLP and norms, offloaded
checkpoints), our file with plain gradient checkpointing, and stock transformers (sdpa). The stock points at 16k,
64k and 128k (out of memory) come from issue #18's table (``STOCK_FROM_ISSUE``), the others from the files.
A 512k point is drawn hollow: the linear extrapolation of the two longest measured lengths, not a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Issue #18, measured on the same H200 with the same shape, LoRA and gradient checkpointing (stock sdpa).
STOCK_FROM_ISSUE = {16384: 42.8, 65536: 126.0}
STOCK_OUT_OF_MEMORY_FROM_ISSUE = 131072
SERIES = {
    "offloaded+tiled": ("ours, tiled MLP/norms + offloaded checkpoints", "black", "o"),
    "checkpointing": ("ours, gradient checkpointing (no long-context options)", "tab:green", "s"),
    "stock sdpa, checkpointing": ("stock transformers (sdpa), gradient checkpointing", "tab:blue", "D"),
}
ESTIMATE_LEN = 524288


def measured_points(paths: list) -> dict:
    """{series label: {tokens: peak allocated GiB}} for the 32-layer runs (with the issue's stock points)."""
    points: dict = {label: {} for label in SERIES}
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            if run.get("ok") and run.get("layers") == 32 and run["label"] in points:
                points[run["label"]][run["seq_len"]] = run["peak_allocated_gib"]
    for tokens, gib in STOCK_FROM_ISSUE.items():
        points["stock sdpa, checkpointing"].setdefault(tokens, gib)
    return points


def extrapolated(points: dict, tokens: int) -> float:
    """Linear in tokens through the two longest measured lengths."""
    (n1, m1), (n2, m2) = sorted(points.items())[-2:]
    return m2 + (m2 - m1) / (n2 - n1) * (tokens - n2)


def plot(points: dict, gpu_gib: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for label, (name, colour, marker) in SERIES.items():
        series = sorted(points[label].items())
        ax.plot([n / 1024 for n, _ in series], [m for _, m in series], marker=marker, color=colour, label=name)
    ours = points["offloaded+tiled"]
    estimate = extrapolated(ours, ESTIMATE_LEN)
    last = max(ours)
    ax.plot([last / 1024, ESTIMATE_LEN / 1024], [ours[last], estimate], ":", color="black")
    ax.plot([ESTIMATE_LEN / 1024], [estimate], "o", mfc="white", color="black", label="512k: extrapolated")
    oom = STOCK_OUT_OF_MEMORY_FROM_ISSUE / 1024
    ax.plot([oom], [gpu_gib], "x", color="tab:blue", markersize=10, label="stock: out of memory at 128k")
    ax.axhline(gpu_gib, color="gray", lw=0.8)
    ax.text(17, gpu_gib + 2, f"H200: {gpu_gib:.0f} GiB", color="gray")
    ax.set_xscale("log", base=2)
    ticks = [16, 32, 64, 128, 256, 512]
    ax.set_xticks(ticks, [f"{t}k" for t in ticks])
    ax.set_xlabel("tokens in one sequence")
    ax.set_ylabel("peak GPU memory allocated (GiB)")
    ax.set_title("Llama-3-8B shape, LoRA r=16 q/k/v/o, one training step, one H200")
    ax.set_ylim(0, gpu_gib + 12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="long_context_probe.py JSON files")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--gpu-gib", type=float, default=143771 / 1024, help="the GPU's memory (H200: 140 GiB)")
    args = parser.parse_args(argv)
    points = measured_points(args.results)
    plot(points, args.gpu_gib, Path(args.out))
    print(json.dumps({label: dict(sorted(series.items())) for label, series in points.items()}))
    print(f"512k extrapolated: {extrapolated(points['offloaded+tiled'], ESTIMATE_LEN):.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
