"""The padded section: padded and packed training steps of our models (forward + backward of the loss).

Per family (8 layers, hidden 2048, bf16; LLaMA with 4 key/value heads for 16 query heads):
  padded    8 rows x 4096 tokens with about 50% padding (fixed random lengths, right padding):
              dense       a caller's [b, 1, q, k] causal + padding mask (LLaMA, GPT-2: what a padded batch cost
                          on the dense-mask SDPA path; a 4-D mask keeps every row at full length)
              full rows   the 2-D padding mask with ``config.unpad_batches = False``: varlen kernels, every other
                          op on all 8 x 4096 positions (the default before the heads unpadded)
              unpadded    the 2-D padding mask on the default path: the kept tokens as one packed row
              unpadded flex / sdpa / cudnn   the same on one backend: flex (document block mask), sdpa (nested
                          jagged varlen, keys and values copied per head for GQA), cudnn (ragged layout)
              same tokens the same number of real tokens as full rows without a mask (the memory target)
  packed    one 32768-token row of documents of random lengths (100 to 4096) given by restarting position_ids,
            on the default path and on each backend (``--padded-cases`` picks cases; BLOOM's ALiBi takes no sdpa).
Records carry ``section: padded`` and the cudnn plan cache counts after the case; ``<out>/padded.md`` holds
the table with the ratios of the targets (unpadded <= 0.6x dense time, unpadded peak <= 1.05x same tokens).

    python scripts/benchmark.py --section padded --family llama,bloom,qwen --out $OUT/bench
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch

from .core import Bench, run_guarded
from .models import config_kwargs

PADDED_FRACTIONS = (0.95, 0.2, 0.61, 0.29, 0.81, 0.15, 0.51, 0.48)  # of each row kept: 50% padding overall
PADDED_FAMILIES = ("llama", "gpt2", "bloom", "qwen")
TAKES_4D_MASK = ("llama", "gpt2")


def padded_lengths(seq: int) -> list:
    return [max(1, round(fraction * seq)) for fraction in PADDED_FRACTIONS]


def document_lengths(total: int, low: int, high: int, generator: torch.Generator) -> list:
    """Random document lengths in [low, high] filling exactly ``total`` tokens (the last one takes the rest)."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def document_positions(lengths: list) -> torch.Tensor:
    """Position ids of documents packed in one row: each restarts at 0."""
    return torch.cat([torch.arange(n) for n in lengths])


def padded_case(lengths: list, seq: int, vocab: int, device) -> dict:
    keep = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        keep[row, :length] = 1
    ids = torch.randint(0, vocab, keep.shape)
    return {"input_ids": ids.to(device), "attention_mask": keep.to(device), "labels": ids.masked_fill(keep == 0, -100).to(device)}


def dense_mask_case(padded: dict) -> dict:
    keep = padded["attention_mask"].bool()
    causal = torch.ones(keep.shape[1], keep.shape[1], dtype=torch.bool, device=keep.device).tril()
    return {**padded, "attention_mask": causal[None, None] & keep[:, None, None, :]}


def full_rows_case(tokens: int, seq: int, vocab: int, device) -> dict:
    ids = torch.randint(0, vocab, (max(1, tokens // seq), seq), device=device)
    return {"input_ids": ids, "labels": ids}


def packed_case(seq: int, vocab: int, device, generator: torch.Generator) -> tuple:
    lengths = document_lengths(seq, max(2, seq // 328), max(4, seq // 8), generator)
    positions = document_positions(lengths)[None]
    ids = torch.randint(0, vocab, (1, seq), device=device)
    return {"input_ids": ids, "labels": ids, "position_ids": positions.to(device)}, len(lengths)


def measure(bench: Bench, model, inputs: dict) -> dict:
    """Median step time (forward + backward of the loss) and the peak memory above the model's own."""

    def step():
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(bench.args.warmup):
        step()
    bench.clean()
    before = bench.allocated_mb()
    bench.reset_peak()
    times = sorted(bench.timed(step, bench.args.iters))
    peak = bench.peak_mb()
    return {
        "status": "ok",
        "step_ms": times[len(times) // 2],
        "peak_mem_mb": None if peak is None else peak - before,
    }


BACKEND_CASES = ("flex", "sdpa", "cudnn")
PADDED_CASES = ("padded dense", "padded full rows", "padded unpadded", "padded same tokens", "packed documents",
                "packed one row") + tuple(f"{kind} {backend}" for backend in BACKEND_CASES
                                          for kind in ("padded unpadded", "packed documents"))


def padded_cases(family: str, seq: int, packed_seq: int, vocab: int, device) -> dict:
    """Case name -> (inputs, config settings for the case) for one family."""
    generator = torch.Generator().manual_seed(0)
    lengths = padded_lengths(seq)
    padded = padded_case(lengths, seq, vocab, device)
    packed, documents = packed_case(packed_seq, vocab, device, generator)
    cases = {
        "padded dense": (dense_mask_case(padded), {}),
        "padded full rows": (padded, {"unpad_batches": False}),
        "padded unpadded": (padded, {}),
        "padded same tokens": (full_rows_case(sum(lengths), seq, vocab, device), {}),
        "packed documents": (packed, {}),
        "packed one row": (full_rows_case(packed_seq, packed_seq, vocab, device), {}),
    }
    for backend in BACKEND_CASES:
        if backend == "sdpa" and family == "bloom":  # sdpa takes no ALiBi
            continue
        cases[f"padded unpadded {backend}"] = (padded, {"attn_backend": backend})
        cases[f"packed documents {backend}"] = (packed, {"attn_backend": backend})
    if family not in TAKES_4D_MASK:
        del cases["padded dense"]
    return cases, documents


def cudnn_plans(model) -> Optional[dict]:
    """The cudnn plan cache counts of the model's own copy of the kernel layer (None where it has none)."""
    info = getattr(sys.modules.get(type(model).__module__), "cudnn_plan_cache_info", None)
    return None if info is None else info()


@contextlib.contextmanager
def config_settings(model, settings: dict):
    saved = {name: getattr(model.config, name, None) for name in settings}
    for name, value in settings.items():
        setattr(model.config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(model.config, name, value)


def run_padded_family(bench: Bench, family: str) -> list:
    tiny = bench.tiny
    seq, packed_seq = (32, 256) if tiny else (4096, 32768)
    dims = bench.dims[family]
    kwargs = config_kwargs(family, dims, packed_seq, 0.0, bench.dtype)
    if family == "llama":
        kwargs["num_key_value_heads"] = max(1, dims.heads // 4)
    kwargs["use_cache"] = False
    model = bench.factory.build(family, "ours:auto", kwargs, bench.dtype).train()
    cases, documents = padded_cases(family, seq, packed_seq, dims.vocab, bench.device)
    chosen = bench.args.padded_cases or PADDED_CASES
    records = []
    for case, (inputs, settings) in cases.items():
        if case not in chosen:
            continue
        record = {
            "section": "padded",
            "family": family,
            "impl": f"ours:auto {case}",
            "seq": packed_seq if case.startswith("packed") else seq,
            "batch": inputs["input_ids"].shape[0],
            "tokens": int((inputs["labels"] != -100).sum()),
            "dtype": str(bench.dtype).replace("torch.", ""),
            "settings": settings,
        }
        if case.startswith("packed documents"):
            record["documents"] = documents
        with config_settings(model, settings):
            record = run_guarded(bench, record, lambda: measure(bench, model, inputs))
            record = bench.rec.write({**record, "cudnn_plans": cudnn_plans(model)})
        bench.rec.say(f"padded {family} {case}: {record.get('step_ms') or record['status']} ms, {record.get('peak_mem_mb')} MB")
        records.append(record)
    del model
    bench.factory.release()
    bench.clean()
    return records


def ratio(records: list, numerator: str, denominator: str, field: str):
    by_case = {r["impl"].split(" ", 1)[1]: r for r in records if r.get("status") == "ok"}
    top, bottom = by_case.get(numerator, {}).get(field), by_case.get(denominator, {}).get(field)
    return None if top is None or not bottom else top / bottom


def padded_table(records: list) -> str:
    rows = ["| family | case | batch x seq | real tokens | step | peak memory |", "|---|---|---|---|---|---|"]
    for r in records:
        step = f"{r['step_ms']:.1f} ms" if r.get("step_ms") is not None else r.get("status", "?")
        peak = f"{r['peak_mem_mb']:.0f} MB" if r.get("peak_mem_mb") is not None else "-"
        rows.append(f"| {r['family']} | {r['impl']} | {r['batch']} x {r['seq']} | {r['tokens']} | {step} | {peak} |")
    lines = ["", "| family | unpadded / dense time (<= 0.6) | unpadded / full rows time | unpadded / same tokens peak "
             "(<= 1.05) | cudnn / sdpa time, padded | cudnn / sdpa peak, padded | cudnn / sdpa time, packed | "
             "flex / default time, padded | flex / default time, packed |", "|---|---|---|---|---|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in records):
        mine = [r for r in records if r["family"] == family]
        cells = [
            ratio(mine, "padded unpadded", "padded dense", "step_ms"),
            ratio(mine, "padded unpadded", "padded full rows", "step_ms"),
            ratio(mine, "padded unpadded", "padded same tokens", "peak_mem_mb"),
            ratio(mine, "padded unpadded cudnn", "padded unpadded sdpa", "step_ms"),
            ratio(mine, "padded unpadded cudnn", "padded unpadded sdpa", "peak_mem_mb"),
            ratio(mine, "packed documents cudnn", "packed documents sdpa", "step_ms"),
            ratio(mine, "padded unpadded flex", "padded unpadded", "step_ms"),
            ratio(mine, "packed documents flex", "packed documents", "step_ms"),
        ]
        lines.append(f"| {family} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(rows + lines) + "\n"


def run_padded(bench: Bench) -> None:
    """Padded and packed training steps for each chosen decoder family."""
    records = []
    for family in [f for f in bench.args.family if f in PADDED_FAMILIES]:
        bench.rec.say(f"== padded {family}")
        records += run_padded_family(bench, family)
    table = padded_table(records)
    (bench.rec.out_dir / "padded.md").write_text(table, encoding="utf-8")
    bench.rec.say(table)
