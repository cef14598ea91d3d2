#!/usr/bin/env python
"""Benchmark records (JSON lines from ``scripts/benchmark.py``) -> PNG plots and markdown tables.

    python scripts/plot_benchmarks.py out/bench/results.jsonl [more.jsonl ...] --out docs/benchmarks

Writes ``<out>/README.md`` (every table, the FLOP formulas, the environment and the commands, with the
plots embedded) and one PNG per family/section. Needs matplotlib (the ``bench`` extra) for the plots;
``--no-plots`` writes the markdown alone. Runs anywhere: it does not import torch.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
from bench_report import ordered, seq_label  # noqa: E402

STYLE = {
    # stock implementations dashed, ours solid; one colour per attention implementation
    "stock:eager": ("tab:red", "--", "s"),
    "stock:sdpa": ("tab:blue", "--", "s"),
    "stock:flex_attention": ("tab:purple", "--", "s"),
    "stock:flash_attention_2": ("tab:olive", "--", "s"),
    "ours:auto": ("black", "-", "o"),
    "ours:sdpa": ("tab:blue", "-", "o"),
    "ours:flex": ("tab:purple", "-", "o"),
    "ours:flash_attn": ("tab:olive", "-", "o"),
    "ours:xformers": ("tab:pink", "-", "o"),
    "ours:chunked": ("tab:green", "-", "o"),
    "ours:eager": ("tab:red", "-", "o"),
    # beyond attention (issue 15): stock + Liger-Kernel, and model.compile()
    "stock:sdpa+liger": ("tab:orange", "--", "D"),
    "stock:sdpa+compile": ("tab:cyan", "--", "v"),
    "ours:auto+compile": ("tab:gray", "-", "v"),
    # kernels called directly (kernel section): dotted
    "torch:sdpa": ("tab:blue", ":", "^"),
    "torch:sdpa-cudnn-first": ("tab:cyan", ":", "^"),
    "torch:sdpa-flash": ("tab:orange", ":", "^"),
    "torch:sdpa-efficient": ("tab:brown", ":", "^"),
    "torch:sdpa-cudnn": ("tab:gray", ":", "^"),
    "torch:flex": ("tab:purple", ":", "^"),
    "flash_attn": ("tab:olive", ":", "^"),
    "xformers": ("tab:pink", ":", "^"),
}


def style(impl: str) -> dict:
    colour, line, marker = STYLE.get(impl, (None, "-", "^"))
    return {
        "color": colour,
        "linestyle": line,
        "marker": marker,
        "label": impl,
        "linewidth": 2.0 if impl == "ours:auto" else 1.3,
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log2_seq_axis(ax, seqs: list) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs)
    ax.set_xticklabels([seq_label(s) for s in seqs])
    ax.grid(True, which="major", alpha=0.3)


def _series(records: list, impl: str, metric: str, scale: float = 1.0):
    xs, ys, oom_xs = [], [], []
    for r in sorted((r for r in records if r["impl"] == impl), key=lambda r: r["seq"]):
        if r.get("status") == "ok" and r.get(metric) is not None:
            xs.append(r["seq"])
            ys.append(r[metric] * scale)
        elif r.get("status") == "oom":
            oom_xs.append(r["seq"])
    return xs, ys, oom_xs


def plot_train(records: list, out: Path, section: str = "train") -> list:
    plt = _pyplot()
    written = []
    rows = [r for r in records if r.get("section") == section and r.get("batch") == 1 and not bench_report.variant(r)]
    for family, vocab in ordered((r["family"], r.get("vocab")) for r in rows):
        fam = [r for r in rows if r["family"] == family and r.get("vocab") == vocab]
        several = len(ordered(r.get("vocab") for r in rows if r["family"] == family)) > 1
        name = f"{section}_{family}" + (f"_vocab{vocab}" if several else "")
        seqs = sorted(ordered(r["seq"] for r in fam))
        impls = ordered(r["impl"] for r in fam)
        if not any(r.get("status") == "ok" for r in fam):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for ax, metric, scale, label in (
            (axes[0], "peak_mem_mb", 1 / 1024, "peak allocated memory (GB)"),
            (axes[1], "step_ms", 1.0, "training step time (ms)"),
        ):
            ooms = []
            for impl in impls:
                xs, ys, oom = _series(fam, impl, metric, scale)
                if xs:
                    ax.plot(xs, ys, **style(impl))
                ooms += [(x, impl) for x in oom]
            _log2_seq_axis(ax, seqs)
            ax.set_yscale("log")
            top = ax.get_ylim()[1]
            for x, impl in ooms:  # out of memory: a cross at the top of the panel
                ax.scatter([x], [top], marker="x", color=style(impl)["color"], s=60, clip_on=False)
            ax.set_xlabel("tokens" + (" (source; target ≤ 1k)" if family == "bart" else ""))
            ax.set_ylabel(label)
        legend_ax = axes[0] if axes[0].get_legend_handles_labels()[0] else axes[1]
        legend_ax.legend(fontsize=8, loc="upper left")
        dtype = fam[0].get("dtype")
        device = fam[0].get("device_name") or ""
        title = f"{family}" + (f", vocabulary {vocab:,}" if several and vocab else "")
        fig.suptitle(f"{title}: training step (forward + backward), {dtype}, batch 1, {device}  (x = out of memory)")
        written.append(save_figure(plt, fig, out / f"{name}.png"))
    return written


def plot_kernel(records: list, out: Path) -> list:
    plt = _pyplot()
    written = []
    rows = [r for r in records if r.get("section") == "kernel"]
    for head_dim in sorted(ordered(r["head_dim"] for r in rows)):
        sub = [r for r in rows if r["head_dim"] == head_dim]
        panels = ordered((r["mask"], r["mode"]) for r in sub)
        if not panels:
            continue
        cols = min(2, len(panels))
        rows_n = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.6 * rows_n), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, (mask, mode) in zip(axes.flat, panels, strict=False):
            panel = [r for r in sub if r["mask"] == mask and r["mode"] == mode]
            seqs = sorted(ordered(r["seq"] for r in panel))
            for impl in ordered(r["impl"] for r in panel):
                xs, ys, _ = _series(panel, impl, "tflops")
                if xs:
                    ax.plot(xs, ys, **style(impl))
            _log2_seq_axis(ax, seqs)
            ax.set_title(f"{mask}, {'forward + backward' if mode == 'fwdbwd' else 'forward'}")
            ax.set_xlabel("tokens (batch × tokens constant)")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
        fig.suptitle(
            f"attention kernels, head_dim {head_dim}, {sub[0].get('dtype')}, {sub[0].get('device_name') or ''}"
        )
        written.append(save_figure(plt, fig, out / f"kernel_d{head_dim}.png"))
    return written


def _bars(ax, groups: list, impls: list, value) -> None:
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        heights = [value(impl, group) for group in groups]
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [h or 0.0 for h in heights], width=width, label=impl, color=style(impl)["color"])


def _cell_value(cells: dict, metric: str, impl: str, group: tuple) -> Optional[float]:
    return (cells.get((impl, group[0], group[1])) or {}).get(metric)


def plot_infer(records: list, out: Path) -> list:
    plt = _pyplot()
    written = []
    # the default runs (dynamic cache, default sizes); the tables show the others
    rows = [r for r in records if r.get("section") == "infer" and not r.get("cache") and not bench_report.variant(r)]
    for family in ordered(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        if not any(r.get("status") == "ok" for r in fam):
            continue
        groups = sorted(ordered((r["seq"], r["batch"]) for r in fam))
        impls = ordered(r["impl"] for r in fam)
        cells = {(r["impl"], r["seq"], r["batch"]): r for r in fam if r.get("status") == "ok"}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, metric, label in (
            (axes[0], "prefill_ms", "prefill latency (ms)"),
            (axes[1], "decode_tokens_per_s", "decode tokens/s"),
        ):
            _bars(ax, groups, impls, functools.partial(_cell_value, cells, metric))
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"prompt {seq_label(s)}\nbatch {b}" for s, b in groups])
            ax.set_ylabel(label)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{family}: inference with the KV cache, {fam[0].get('dtype')}, {fam[0].get('device_name') or ''}")
        written.append(save_figure(plt, fig, out / f"infer_{family}.png"))
    return written


def plot_light(records: list, out: Path) -> list:
    rows = [r for r in records if r.get("section") == "light" and r.get("status") == "ok" and r.get("peak_mem_mb")]
    if not rows:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = [r["impl"] for r in rows]
    ax.barh(names, [r["peak_mem_mb"] for r in rows], color=[style(n.split("+")[0])["color"] for n in names])
    for i, r in enumerate(rows):
        ax.text(r["peak_mem_mb"], i, f" {r['peak_mem_mb']:,.0f} MB", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("max memory allocated (MB)")
    first = rows[0]
    ax.set_title(
        f"Light Attention: GPT-2 {first.get('layers')}x{first.get('hidden')}, batch {first.get('batch')} x "
        f"{first.get('seq')}, {first.get('dtype')}, dropout {first.get('dropout')}"
    )
    return [save_figure(plt, fig, out / "light.png")]


def headline_values(records: list, seq: int = 8192) -> list:
    """(family, reference impl, speed-up, memory ratio) of ours:auto against the best stock at ``seq``."""
    values = []
    pool = [r for r in bench_report.target_pool(records, seq) if r.get("status") == "ok"]
    for family in ordered(r["family"] for r in pool):
        fam = [r for r in pool if r["family"] == family]
        ours = [r for r in fam if r["impl"] == "ours:auto"]
        stock = [r for r in fam if r["impl"].startswith("stock:")]
        if family == "qwen":
            stock = [r for r in fam if r["impl"] == "ours:eager"]
        if not ours or not stock:
            continue
        best = min(stock, key=lambda r: r["step_ms"])
        memory = (
            best["peak_mem_mb"] / ours[0]["peak_mem_mb"]
            if best.get("peak_mem_mb") and ours[0].get("peak_mem_mb")
            else None
        )
        values.append((family, best["impl"], best["step_ms"] / ours[0]["step_ms"], memory))
    return values


def plot_headline(records: list, out: Path) -> list:
    seqs = {r.get("seq") for r in records if r.get("section") in ("train", "compare")}
    seq = 8192 if 8192 in seqs else max((s for s in seqs if s), default=None)
    values = headline_values(records, seq) if seq else []
    if not values:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels = [f"{f}\n(vs {ref})" for f, ref, _, _ in values]
    xs = range(len(values))
    ax.bar(
        [x - 0.2 for x in xs],
        [v[2] for v in values],
        width=0.4,
        label="speed-up (step time stock / ours)",
        color="tab:blue",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [v[3] or 0.0 for v in values],
        width=0.4,
        label="memory saved (peak stock / ours)",
        color="tab:orange",
    )
    for x, v in zip(xs, values, strict=True):
        ax.text(x - 0.2, v[2], f"{v[2]:.2f}×", ha="center", va="bottom", fontsize=8)
        if v[3]:
            ax.text(x + 0.2, v[3], f"{v[3]:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_ylabel("ours:auto against the fastest stock implementation")
    ax.set_title(f"training step at {seq_label(seq)} tokens, batch 1")
    ax.legend(fontsize=8)
    return [save_figure(plt, fig, out / "headline.png")]


def make_plots(records: list, out: Path) -> list:
    current = bench_report.latest(records)
    written = []
    for plot in (plot_headline, plot_train, plot_kernel, plot_infer, plot_light):
        written += plot(current, out)
    written += plot_train(current, out, "compare")
    return written


def write_readme(records: list, out: Path, images: list, title: str) -> Path:
    markdown = bench_report.render_markdown(records, title=title)
    if images:
        markdown += "\n## Plots\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    path = out / "README.md"
    path.write_text(markdown, encoding="utf-8")
    return path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.jsonl file(s) from scripts/benchmark.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks")
    parser.add_argument("--title", default="Benchmarks")
    parser.add_argument("--no-plots", action="store_true", help="write the markdown only (no matplotlib needed)")
    args = parser.parse_args(argv)
    records = bench_report.load_records(args.results)
    if not records:
        print(f"no records in {', '.join(map(str, args.results))}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    images = [] if args.no_plots else make_plots(records, args.out)
    readme = write_readme(records, args.out, images, args.title)
    print(f"{len(records)} records -> {readme}" + (f" and {len(images)} plots" if images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
