#!/usr/bin/env python
"""Training-step records of the fused ops (issue 15) -> one markdown table with the target ratios, and a plot.

    python scripts/fused_ops_report.py RUN/*/results.jsonl --out docs/benchmarks/fused_ops_h200

Reads the ``train`` records that ``scripts/benchmark.py`` wrote (any number of files), groups them by family
and vocabulary, and writes ``<out>.md`` (step time, peak memory, MFU per impl, and each ``ours`` row against
stock + Liger-Kernel and against ``base`` = our files before the fused ops) and ``<out>.png`` (needs
matplotlib). It does not import torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402

FAMILY_ORDER = ("llama", "qwen", "gpt2", "bloom", "bart")
ORDER = ("stock:sdpa", "stock:sdpa+liger", "base:auto", "ours:auto", "ours:auto+compile")
LABEL = {
    "stock:sdpa": "stock sdpa",
    "stock:sdpa+liger": "stock sdpa + Liger-Kernel",
    "base:auto": "base: ours before the fused ops",
    "ours:auto": "ours",
    "ours:auto+compile": "ours + `model.compile()`",
}


def read_records(paths: list) -> list:
    """The ``ok`` train records (with a peak memory) of ``paths``; a later record of one configuration wins."""
    measured = [
        record
        for record in bench_report.load_records(paths)
        if record.get("section") == "train" and record.get("status") == "ok" and record.get("peak_mem_mb")
    ]
    return list({bench_report.record_key(record): record for record in measured}.values())


def read_summary(path: Path, seq: int) -> list:
    """Records from a run's printed summary: ``family vocab impl status step_ms peak_GiB mfu`` per line
    (``#`` lines are comments), for runs whose results.jsonl did not come back."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        family, vocab, impl, status, step_ms, peak_gib, mfu = line.split()[:7]
        if status == "ok":
            records.append(
                {"family": family, "vocab": int(vocab), "seq": seq, "impl": impl, "step_ms": float(step_ms),
                 "peak_mem_mb": 1024 * float(peak_gib), "mfu": float(mfu)}
            )
    return records


def groups_of(records: list) -> dict:
    """impl -> record per measured model: family, vocabulary, length, batch and ``bench_report.variant`` (LoRA,
    packing, another depth or Qwen shape ...), so that only like runs are set against each other."""
    groups: dict = {}
    for record in records:
        key = (record["family"], record["vocab"], record["seq"], record.get("batch", 1), bench_report.variant(record))
        groups.setdefault(key, {})[record["impl"]] = record
    return groups


def group_order(item: tuple) -> tuple:
    (family, vocab, seq, batch, variant), _ = item
    rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return (rank, family, vocab, seq, batch, str(variant))


def model_label(family: str, seq: int, batch: int, variant: tuple, separator: str = " ") -> str:
    """``llama 8k``, with the batch and the variant where they are not the defaults."""
    extra = ([f"batch {batch}"] if batch != 1 else []) + ([bench_report.variant_label(variant)] if variant else [])
    return f"{family} {seq // 1024}k" + (separator + ", ".join(extra) if extra else "")


def ratio_text(record: dict, other: dict | None) -> str:
    if other is None:
        return "-"
    time, memory = record["step_ms"] / other["step_ms"], record["peak_mem_mb"] / other["peak_mem_mb"]
    return f"{time:.2f}x time, {memory:.2f}x memory"


def table(groups: dict) -> list:
    lines = [
        "| model | vocab | impl | step | peak memory | MFU | against Liger | against base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (family, vocab, seq, batch, variant), impls in sorted(groups.items(), key=group_order):
        for impl in [i for i in ORDER if i in impls]:
            record = impls[impl]
            mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") else "-"
            ours = impl.startswith("ours")
            lines.append(
                f"| {model_label(family, seq, batch, variant)} | {vocab:,} | {LABEL[impl]} | {record['step_ms']:.1f} ms | "
                f"{record['peak_mem_mb'] / 1024:.2f} GiB | {mfu} | "
                f"{ratio_text(record, impls.get('stock:sdpa+liger')) if ours else '-'} | "
                f"{ratio_text(record, impls.get('base:auto')) if ours else '-'} |"
            )
    return lines


def plot(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups, key=lambda key: group_order((key, None)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(ORDER)
    for index, impl in enumerate(ORDER):
        for axis, field, scale in ((axes[0], "step_ms", 1.0), (axes[1], "peak_mem_mb", 1 / 1024)):
            values = [groups[k][impl][field] * scale if impl in groups[k] else 0.0 for k in keys]
            axis.bar([i + index * width for i in range(len(keys))], values, width, label=LABEL[impl].replace("`", ""))
    names = [
        model_label(family, seq, batch, variant, "\n") + f"\nvocab {vocab // 1000}k"
        for family, vocab, seq, batch, variant in keys
    ]
    for axis, title in ((axes[0], "training step (ms)"), (axes[1], "peak memory (GiB)")):
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], names, fontsize=8)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="results.jsonl files of scripts/benchmark.py")
    parser.add_argument("--summary", type=Path, action="append", default=[], help="printed summaries (read_summary)")
    parser.add_argument("--seq", type=int, default=8192, help="sequence length of the --summary records")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: writes <out>.md and <out>.png")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    # a results.jsonl record wins over a printed summary line of the same configuration
    summary = [record for path in args.summary for record in read_summary(path, args.seq)]
    groups = groups_of(summary + read_records(args.results))
    if not groups:
        parser.error("no ok train records in the given files")
    args.out.with_suffix(".md").write_text("\n".join(table(groups)) + "\n", encoding="utf-8")
    if not args.no_plot:
        plot(groups, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
