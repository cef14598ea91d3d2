"""The padded section: padded and packed training steps of our models on the default (auto) path.

Per family (8 layers, hidden 2048, bf16; LLaMA with 4 key/value heads for 16 query heads), forward + backward:
  padded    8 rows x 4096 tokens with about 50% padding (fixed random lengths):
              dense     the same batch with a caller's [b, 1, q, k] causal + padding mask (LLaMA, GPT-2: the
                        dense-mask SDPA step, what a padded batch cost before the varlen path)
              varlen    the 2-D padding mask (auto: varlen kernels, no [b, 1, q, k] tensor)
              unpadded  the same number of real tokens as full rows without a mask (the memory target)
  packed    one 32768-token row of documents of random lengths (100 to 4096) given by restarting position_ids,
            against the same row as one causal sequence.
Records carry ``section: padded``; ``<out>/padded.md`` holds the table with the ratios of the targets
(varlen <= 0.6x dense time, varlen peak <= 1.05x unpadded, packed within 1.1x of unpacked).

    python scripts/benchmark.py --section padded --family llama,bloom,qwen --out $OUT/bench
"""

from __future__ import annotations

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
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
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


def run_padded_family(bench: Bench, family: str) -> list:
    tiny = bench.tiny
    seq, packed_seq = (32, 256) if tiny else (4096, 32768)
    dims = bench.dims[family]
    kwargs = config_kwargs(family, dims, packed_seq, 0.0, bench.dtype)
    if family == "llama":
        kwargs["num_key_value_heads"] = max(1, dims.heads // 4)
    kwargs["use_cache"] = False
    model = bench.factory.build(family, "ours:auto", kwargs, bench.dtype).train()
    device, vocab = bench.device, dims.vocab
    generator = torch.Generator().manual_seed(0)
    lengths = padded_lengths(seq)
    padded = padded_case(lengths, seq, vocab, device)
    packed, documents = packed_case(packed_seq, vocab, device, generator)
    cases = {"padded varlen": padded, "padded unpadded": full_rows_case(sum(lengths), seq, vocab, device)}
    if family in TAKES_4D_MASK:
        cases["padded dense"] = dense_mask_case(padded)
    cases["packed documents"] = packed
    cases["packed one row"] = full_rows_case(packed_seq, packed_seq, vocab, device)
    records = []
    for case, inputs in cases.items():
        record = {
            "section": "padded",
            "family": family,
            "impl": f"ours:auto {case}",
            "seq": packed_seq if case.startswith("packed") else seq,
            "batch": inputs["input_ids"].shape[0],
            "tokens": int((inputs["labels"] != -100).sum()),
            "dtype": str(bench.dtype).replace("torch.", ""),
        }
        if case == "packed documents":
            record["documents"] = documents
        record = bench.rec.write(run_guarded(bench, record, lambda: measure(bench, model, inputs)))
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
    lines = ["", "| family | varlen / dense time (<= 0.6) | varlen / unpadded peak (<= 1.05) | packed / one row time (<= 1.1) |",
             "|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in records):
        mine = [r for r in records if r["family"] == family]
        cells = [
            ratio(mine, "padded varlen", "padded dense", "step_ms"),
            ratio(mine, "padded varlen", "padded unpadded", "peak_mem_mb"),
            ratio(mine, "packed documents", "packed one row", "step_ms"),
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
