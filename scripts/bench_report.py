"""Reading benchmark records (JSON lines written by ``scripts/benchmark.py``) and rendering markdown tables.

Pure standard library, so that ``benchmark.py`` (on the GPU machine) and ``plot_benchmarks.py`` (anywhere)
share one rendering. A record is one measurement; a later record with the same key replaces an earlier
one, so appending the output of several runs (or of a re-run) to one file is safe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

# Fields that identify one measurement; a later record with the same values replaces an earlier one.
KEY_FIELDS = (
    "section",
    "family",
    "impl",
    "seq",
    "tgt_len",
    "batch",
    "head_dim",
    "mask",
    "mode",
    "device_name",
    "dtype",
    "vocab",
    "cache",
    "lora",
    "loss_chunk_size",
    "train_mask",
    "optimizer",
    "layers",
    "qwen_shape",
)
FINAL_STATUSES = ("ok", "oom", "unsupported")

FLOP_FORMULAS = """\
**How FLOPs are counted** (model FLOPs: recomputation inside a kernel is not counted)

- Training step (`train`, `compare`, `light`): forward + backward of the model's own cross-entropy loss
  (labels = inputs), gradients freed after each step, no optimizer step unless the record says
  `optimizer: adamw`. FLOPs = `6·N·T + 3·A`, where `N` = weights of every matmul layer (`nn.Linear`,
  `Conv1D`, the LM head; embedding lookups excluded), `T` = tokens through those weights (BART: encoder
  weights and the decoder's cross-attention keys/values × source tokens, the other decoder weights and the LM head ×
  target tokens), and `A` = forward attention FLOPs
  `Σ_layers 4·b·q_len·k_len·d_attn·c` (`d_attn` = heads × head_dim, `c` = ½ for causal self-attention, 1
  otherwise; packed rows, `--train-mask packed`: Σ over documents). For a decoder-only model that is
  `6·N·b·s + 6·L·d·s²·b` (= `12·L·d·s²·b / 2`).
- MFU = FLOPs / step time / the device's peak dense bf16 tensor rate (H100 SXM and H200: 989 TFLOP/s; the
  `env` record names the value used).
- Prefill (`infer`): `2·N·T + A` over the prompt. Decode tokens/s = batch × new tokens / decode time
  (greedy, one token per step, through the model's KV cache; prefill not included).
- Kernel level (`kernel`): forward `4·b·h·s²·d·c`; forward+backward = 3.5 × forward (backward counted as
  2.5 × forward, FlashAttention's convention, which includes the recomputation of the scores).
"""


# What a record without the field measured (older records, and plans, leave the defaults out).
KEY_DEFAULTS = {"optimizer": "none", "train_mask": "none"}


# Fields that make a training step another measurement than the default one (LoRA, packed rows, an optimizer
# step, another depth ...): tables keep each such variant apart, and targets and plots read the default runs only.
VARIANT_FIELDS = ("lora", "loss_chunk_size", "train_mask", "optimizer", "layers", "qwen_shape")


def variant(record: dict) -> tuple:
    """(field, value) pairs of the VARIANT_FIELDS that ``record`` sets away from the default; () for a default run.

    ``qwen_shape`` only shapes Qwen, so the other families' records ignore it."""
    pairs = []
    for field in VARIANT_FIELDS:
        value = record.get(field)
        if value is None or value == KEY_DEFAULTS.get(field):
            continue
        if field == "qwen_shape" and record.get("family") != "qwen":
            continue
        pairs.append((field, value))
    return tuple(pairs)


def variant_label(pairs: tuple) -> str:
    return ", ".join(f"{field.replace('_', ' ')} {value}" for field, value in pairs)


def record_key(record: dict) -> tuple:
    return tuple(record.get(field, KEY_DEFAULTS.get(field)) for field in KEY_FIELDS)


def load_records(paths: Iterable[Path]) -> list:
    """All records of the JSON-lines files, in file order; lines that do not parse are skipped."""
    records = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def latest(records: list) -> list:
    """One record per key (the last one), in first-seen order; ``env`` records are dropped.

    A later run that skipped a configuration (out of time budget) does not hide an earlier measurement.
    """
    by_key: dict = {}
    for record in records:
        if record.get("section") == "env":
            continue
        key = record_key(record)
        if record.get("status") == "skipped" and key in by_key:
            continue
        by_key[key] = record
    return list(by_key.values())


def env_records(records: list) -> list:
    return [r for r in records if r.get("section") == "env"]


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def seq_label(seq) -> str:
    if seq is None:
        return "-"
    seq = int(seq)
    return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def fmt(value, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def status_cell(record: Optional[dict]) -> Optional[str]:
    """A short cell for a record that has no numbers (OOM, error...), or None when it has numbers."""
    if record is None:
        return "·"
    status = record.get("status")
    if status == "ok":
        return None
    if status == "oom":
        return "OOM"
    if status == "unsupported":
        return "n/a"
    if status == "skipped":
        return "skip"
    if status == "timeout":
        return "timeout"
    return "error"


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ordered(values: Iterable) -> list:
    seen = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def gb(mb) -> Optional[float]:
    return None if mb is None else mb / 1024.0


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def _train_cell(record: Optional[dict]) -> str:
    short = status_cell(record)
    if short is not None:
        return short
    parts = [fmt(record.get("step_ms"), 1, " ms"), fmt(gb(record.get("peak_mem_mb")), 2, " GB")]
    if record.get("tokens_per_s") is not None:
        parts.append(fmt(record["tokens_per_s"] / 1e3, 1, "k tok/s"))
    if record.get("mfu") is not None:
        parts.append(fmt(100.0 * record["mfu"], 1, "%"))
    return " · ".join(part for part in parts if part != "-") or "-"


def train_tables(records: list, section: str = "train") -> str:
    rows = [r for r in records if r.get("section") == section]
    if not rows:
        return ""
    out = []
    for family in ordered(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        vocabs = ordered(r.get("vocab") for r in fam)
        for batch, vocab, kind in ordered((r.get("batch"), r.get("vocab"), variant(r)) for r in fam):
            sub = [r for r in fam if (r.get("batch"), r.get("vocab"), variant(r)) == (batch, vocab, kind)]
            seqs = sorted(ordered(r["seq"] for r in sub))
            impls = ordered(r["impl"] for r in sub)
            tgt = ordered(r.get("tgt_len") for r in sub if r.get("tgt_len"))
            title = f"#### {section}: {family}, batch {batch}"
            if len(vocabs) > 1:
                title += f", vocabulary {vocab:,}" if vocab else ", vocabulary not recorded"
            if kind:
                title += f", {variant_label(kind)}"
            if tgt:
                title += f" (source lengths below; target {', '.join(seq_label(t) for t in tgt)})"
            cells = {(r["impl"], r["seq"]): r for r in sub}
            body = [[impl] + [_train_cell(cells.get((impl, seq))) for seq in seqs] for impl in impls]
            out.append(
                title
                + "\n\nstep time · peak allocated memory · tokens/s · MFU\n\n"
                + table(["impl"] + [seq_label(s) for s in seqs], body)
            )
    return "\n\n".join(out)


def _best(records: list, metric: str = "step_ms") -> Optional[dict]:
    ok = [r for r in records if r.get("status") == "ok" and r.get(metric) is not None]
    return min(ok, key=lambda r: r[metric]) if ok else None


def _find(records, **fields) -> list:
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


def judged(target: str, measured: str, met: bool) -> list:
    """A row [target, measured, met] of a targets table."""
    return [target, measured, "yes" if met else "no"]


BLOOM_TARGET = "BLOOM: ≥4× faster, ≥6× less memory than stock eager"
LLAMA_TARGET = "BLOOM ours step time within 10% of same-size LLaMA on stock sdpa"


def _bloom_vs_stock(ours: dict, stock: dict) -> tuple:
    speed = stock["step_ms"] / ours["step_ms"]
    mem = stock["peak_mem_mb"] / ours["peak_mem_mb"] if ours.get("peak_mem_mb") else None
    return f"{speed:.2f}× faster, {fmt(mem, 2)}× less memory", speed >= 4.0 and (mem is not None and mem >= 6.0)


def _bloom_vs_llama(ours: dict, llama: dict) -> tuple:
    ratio = ours["step_ms"] / llama["step_ms"]
    return f"{ratio:.3f}× LLaMA's time", ratio <= 1.10


def target_pool(records: list, seq: int) -> list:
    """Default training-step records (no LoRA, packing, optimizer ...: ``variant``) at ``seq`` tokens, batch 1, at
    one vocabulary: the targets (and the headline plot) are set at the benchmark's default, the smallest one a run
    records (--vocab adds larger ones)."""
    pool = [r for r in records if r.get("section") in ("compare", "train") and r.get("seq") == seq]
    pool = [r for r in pool if r.get("batch") == 1 and not variant(r)]
    vocabs = [r["vocab"] for r in pool if r.get("vocab") is not None]
    return [r for r in pool if r.get("vocab") is None or r["vocab"] == min(vocabs)]


def target_rows(records: list, seq: int = 8192) -> list:
    """Rows [target, measured, met] for issue 8's and issue 4's training-step targets at ``seq`` tokens."""
    rows = []
    pool = target_pool(records, seq)

    def pick(family, impl):
        # a `compare` record beats a `train` one of the same configuration
        found = _find(pool, family=family, impl=impl)
        found.sort(key=lambda r: r.get("section") != "compare")
        return found[0] if found else None

    def pair(ours, ref, what):
        if ours is None or ref is None:
            return None
        if ours.get("status") != "ok" or ref.get("status") != "ok":
            return f"{what}: ours {ours.get('status')}, reference {ref.get('status')}"
        return None

    def compared(target: str, ours, ref, what: str, judge) -> None:
        if ours is None or ref is None:
            return
        problem = pair(ours, ref, what)
        rows.append([target, problem, "?"] if problem else judged(target, *judge(ours, ref)))

    bloom_ours, bloom_stock = pick("bloom", "ours:auto"), pick("bloom", "stock:eager")
    compared(BLOOM_TARGET, bloom_ours, bloom_stock, "bloom", _bloom_vs_stock)
    if bloom_ours and not bloom_stock and bloom_ours.get("status") == "ok":
        rows.append([BLOOM_TARGET, "stock eager not measured", "?"])
    compared(LLAMA_TARGET, bloom_ours, pick("llama", "stock:sdpa"), "bloom vs llama", _bloom_vs_llama)
    for family in ("llama", "gpt2", "bart"):
        fam = [r for r in pool if r.get("family") == family]
        ours = pick(family, "ours:auto")
        stock = _best([r for r in fam if str(r.get("impl", "")).startswith("stock:")])
        if ours is None or stock is None:
            continue
        if ours.get("status") != "ok":
            rows.append([f"{family}: faster than the best stock, no more memory", f"ours {ours.get('status')}", "no"])
            continue
        speed = stock["step_ms"] / ours["step_ms"]
        mem = (
            ours["peak_mem_mb"] / stock["peak_mem_mb"] if stock.get("peak_mem_mb") and ours.get("peak_mem_mb") else None
        )
        met = speed > 1.0 and (mem is None or mem <= 1.0)
        target = f"{family}: faster than the best stock ({stock['impl']}), no more memory"
        rows.append(judged(target, f"{speed:.3f}× its speed, {fmt(mem, 3)}× its memory", met))
    return rows


def targets_section(records: list) -> str:
    seqs = sorted({r.get("seq") for r in records if r.get("section") in ("train", "compare") and r.get("seq")})
    seq = 8192 if 8192 in seqs else (seqs[-1] if seqs else None)
    if seq is None:
        return ""
    rows = target_rows(records, seq)
    kernel_rows = kernel_target_rows(records)
    dtypes = ", ".join(ordered(str(r.get("dtype")) for r in records if r.get("section") in ("train", "compare")))
    out = []
    if rows:
        out.append(
            f"#### Training-step targets at {seq_label(seq)} tokens ({dtypes}, batch 1)\n\n"
            + table(["target", "measured", "met"], rows)
        )
    if kernel_rows:
        out.append("#### Kernel-layer targets\n\n" + table(["target", "measured", "met"], kernel_rows))
    return "\n\n".join(out)


def infer_label(record: dict) -> str:
    """An infer row's name: the impl, the cache when it is not the default dynamic one (--static-cache), and the
    model's sizes when they are not the default ones (--layers, --qwen-shape)."""
    label = record["impl"] + (f" · {record['cache']} cache" if record.get("cache") else "")
    return label + (f" · {variant_label(variant(record))}" if variant(record) else "")


def infer_tables(records: list) -> str:
    rows = [r for r in records if r.get("section") == "infer"]
    if not rows:
        return ""
    out = []
    for family in ordered(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        columns = sorted(ordered((r["seq"], r["batch"]) for r in fam))
        cells = {(infer_label(r), r["seq"], r["batch"]): r for r in fam}
        body = []
        for impl in ordered(infer_label(r) for r in fam):
            row = [impl]
            for seq, batch in columns:
                record = cells.get((impl, seq, batch))
                short = status_cell(record)
                row.append(
                    short
                    if short
                    else f"{fmt(record.get('prefill_ms'), 1)} ms · {fmt(record.get('decode_tokens_per_s'), 0)} tok/s"
                )
            body.append(row)
        header = ["impl"] + [f"prompt {seq_label(s)}, batch {b}" for s, b in columns]
        out.append(f"#### infer: {family}\n\nprefill latency · decode tokens/s\n\n" + table(header, body))
    return "\n\n".join(out)


def _reference_of(record: dict) -> Optional[str]:
    return record.get("reference")


def kernel_tables(records: list) -> str:
    rows = [r for r in records if r.get("section") == "kernel"]
    if not rows:
        return ""
    out = []
    for head_dim in sorted(ordered(r["head_dim"] for r in rows)):
        for mask in ordered(r["mask"] for r in rows if r["head_dim"] == head_dim):
            for mode in ordered(r["mode"] for r in rows if r["head_dim"] == head_dim and r["mask"] == mask):
                sub = [r for r in rows if r["head_dim"] == head_dim and r["mask"] == mask and r["mode"] == mode]
                seqs = sorted(ordered(r["seq"] for r in sub))
                cells = {(r["impl"], r["seq"]): r for r in sub}
                body = []
                for impl in ordered(r["impl"] for r in sub):
                    row = [impl]
                    for seq in seqs:
                        record = cells.get((impl, seq))
                        short = status_cell(record)
                        row.append(short if short else fmt(record.get("tflops"), 0))
                    body.append(row)
                over = overhead_rows(sub, seqs)
                text = f"#### kernel: head_dim {head_dim}, {mask}, {mode} (TFLOP/s)\n\n" + table(
                    ["impl"] + [seq_label(s) for s in seqs], body
                )
                if over:
                    text += f"\n\n{OVERHEAD_NOTE}\n\n"
                    text += table(["comparison"] + [seq_label(s) for s in seqs], over)
                out.append(text)
    return "\n\n".join(out)


OVERHEAD_NOTE = (
    "Ours against the kernel it dispatches to (time ours / time direct − 1; target within 5%), "
    "and ours:auto against the best direct kernel (target ≥ 90%)"
)


def overhead_rows(sub: list, seqs: list) -> list:
    cells = {(r["impl"], r["seq"]): r for r in sub}
    out = []
    pairs = ordered(
        (r["impl"], r.get("reference")) for r in sub if r.get("reference") and str(r["impl"]).startswith("ours:")
    )
    for impl, reference in pairs:
        row = [f"{impl} vs {reference}"]
        for seq in seqs:
            ours, ref = cells.get((impl, seq)), cells.get((reference, seq))
            if ours and ref and ours.get("status") == "ok" and ref.get("status") == "ok" and ref.get("ms"):
                row.append(f"{100.0 * (ours['ms'] / ref['ms'] - 1.0):+.1f}%")
            else:
                row.append("-")
        out.append(row)
    row = ["ours:auto / best direct"]
    any_value = False
    for seq in seqs:
        auto = cells.get(("ours:auto", seq))
        best = _best_direct(sub, seq)
        if auto and best and auto.get("status") == "ok":
            row.append(f"{100.0 * auto['tflops'] / best['tflops']:.0f}% ({best['impl']})")
            any_value = True
        else:
            row.append("-")
    if any_value:
        out.append(row)
    return out


def _best_direct(sub: list, seq) -> Optional[dict]:
    direct = [
        r
        for r in sub
        if r["seq"] == seq and r.get("status") == "ok" and not str(r["impl"]).startswith("ours:") and r.get("tflops")
    ]
    return max(direct, key=lambda r: r["tflops"]) if direct else None


def kernel_target_rows(records: list) -> list:
    sub = [r for r in records if r.get("section") == "kernel"]
    if not sub:
        return []
    worst_overhead, worst_where = None, None
    worst_ratio, ratio_where = None, None
    for r in sub:
        if r.get("status") != "ok" or not str(r["impl"]).startswith("ours:"):
            continue
        group = [x for x in sub if x["head_dim"] == r["head_dim"] and x["mask"] == r["mask"] and x["mode"] == r["mode"]]
        where = f"d{r['head_dim']} {r['mask']} {r['mode']} {seq_label(r['seq'])}"
        ref = [x for x in group if x["impl"] == r.get("reference") and x["seq"] == r["seq"] and x.get("status") == "ok"]
        if ref and ref[0].get("ms"):
            overhead = 100.0 * (r["ms"] / ref[0]["ms"] - 1.0)
            if worst_overhead is None or overhead > worst_overhead:
                worst_overhead, worst_where = overhead, f"{r['impl']} {where}"
        if r["impl"] == "ours:auto":
            best = _best_direct(group, r["seq"])
            if best:
                ratio = r["tflops"] / best["tflops"]
                if worst_ratio is None or ratio < worst_ratio:
                    worst_ratio, ratio_where = ratio, f"{where} (best: {best['impl']})"
    rows = []
    if worst_overhead is not None:
        rows.append(
            [
                "dispatch overhead within 5% (worst case)",
                f"{worst_overhead:+.1f}% at {worst_where}",
                "yes" if worst_overhead <= 5.0 else "no",
            ]
        )
    if worst_ratio is not None:
        rows.append(
            [
                "ours:auto ≥ 90% of the best kernel's TFLOP/s (worst case)",
                f"{100 * worst_ratio:.0f}% at {ratio_where}",
                "yes" if worst_ratio >= 0.9 else "no",
            ]
        )
    return rows


def light_table(records: list) -> str:
    rows = [r for r in records if r.get("section") == "light"]
    if not rows:
        return ""
    base = next((r for r in rows if r["impl"] == "stock:eager" and r.get("status") == "ok"), None)
    body = []
    for r in rows:
        short = status_cell(r)
        if short:
            body.append([r["impl"], short, "-", "-"])
            continue
        ratio = (
            base["peak_mem_mb"] / r["peak_mem_mb"]
            if base and base.get("peak_mem_mb") and r.get("peak_mem_mb")
            else None
        )
        body.append(
            [r["impl"], fmt(r.get("peak_mem_mb"), 0, " MB"), fmt(r.get("step_ms"), 1, " ms"), fmt(ratio, 2, "×")]
        )
    first = rows[0]
    title = (
        f"#### Light Attention table: GPT-2 {first.get('layers', '?')} layers, hidden {first.get('hidden', '?')}, "
        f"batch {first.get('batch')}, seq {first.get('seq')}, {first.get('dtype')}, dropout {first.get('dropout')}, "
        "training mode"
    )
    return title + "\n\n" + table(["impl", "max memory allocated", "step time", "memory saved vs stock eager"], body)


def env_section(records: list) -> str:
    envs = env_records(records)
    if not envs:
        return ""
    rows = []
    for env in ordered(
        json.dumps(
            {
                k: env.get(k)
                for k in (
                    "device_name",
                    "torch",
                    "transformers",
                    "cuda",
                    "cudnn",
                    "peak_tflops",
                    "backends",
                    "flash_attn",
                    "xformers",
                )
            },
            sort_keys=True,
        )
        for env in envs
    ):
        e = json.loads(env)
        rows.append(
            [
                e.get("device_name"),
                e.get("torch"),
                e.get("transformers"),
                e.get("cuda") or "-",
                e.get("cudnn") or "-",
                fmt(e.get("peak_tflops"), 0),
                ", ".join(e.get("backends") or []),
            ]
        )
    commands = ordered(env.get("command") for env in envs if env.get("command"))
    text = "#### Environment\n\n" + table(
        ["device", "torch", "transformers", "CUDA", "cuDNN", "peak bf16 TFLOP/s", "our backends"], rows
    )
    if commands:
        text += "\n\nCommands:\n\n" + "\n".join(f"    {c}" for c in commands)
    return text


def render_markdown(records: list, title: str = "Benchmarks") -> str:
    """All tables for the records (latest record per key), with the FLOP formulas and the environment."""
    current = latest(records)
    parts = [
        f"# {title}",
        env_section(records),
        targets_section(current),
        train_tables(current, "train"),
        train_tables(current, "compare"),
        infer_tables(current),
        kernel_tables(current),
        light_table(current),
        FLOP_FORMULAS,
    ]
    return "\n\n".join(part for part in parts if part) + "\n"
