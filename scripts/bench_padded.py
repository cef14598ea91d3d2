"""Padded and packed training steps on the GPU: the kernel layer's varlen path against a dense-mask SDPA step.

A LLaMA-shaped model (8 layers, hidden 2048, 32 heads, 4 key/value heads, bf16) runs forward + backward + loss:
  - padded: 8 rows x 4096 tokens, about 50% padding (fixed random lengths summing to 16384 real tokens):
      dense    - a caller's [b, 1, q, k] causal+padding mask: SDPA with a dense mask and GQA k/v per head
                 (what the kernel layer did for every padded batch before)
      varlen   - the 2-D padding mask: the default (auto) path, no [b, 1, q, k] tensor
      unpadded - the same 16384 tokens as 4 full rows, no mask (the memory target: varlen <= 1.05x)
  - packed: one 32768-token row of documents of random lengths (100 to 4096) given by restarting
    position_ids, against the same row unpacked (one causal sequence).

    PYTHONPATH=<dir holding memory_efficient_adapter> python scripts/bench_padded.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

LLAMA_SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    use_cache=False,
)
PADDED_LENGTHS = [3900, 800, 2500, 1200, 3300, 600, 2100, 1984]  # 16384 real tokens in 8 x 4096


def build_model(layers: int):
    from transformers import LlamaConfig

    from memory_efficient_adapter.modeling_llama import LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_SHAPE, "num_hidden_layers": layers})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.train()


def document_lengths(total: int, low: int, high: int, generator: torch.Generator) -> list:
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < 1:
        lengths.pop()
        lengths[-1] += total - sum(lengths)
    return lengths


def padded_inputs(seq: int, vocab: int) -> dict:
    keep = torch.zeros(len(PADDED_LENGTHS), seq, dtype=torch.long)
    for row, length in enumerate(PADDED_LENGTHS):
        keep[row, :length] = 1
    ids = torch.randint(0, vocab, keep.shape)
    labels = ids.masked_fill(keep == 0, -100)
    return {"input_ids": ids.cuda(), "attention_mask": keep.cuda(), "labels": labels.cuda()}


def dense_mask_inputs(inputs: dict) -> dict:
    """The same batch with the caller's dense [b, 1, q, k] causal + padding mask (a 4-D mask is passed through)."""
    keep = inputs["attention_mask"].bool()
    seq = keep.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
    return {**inputs, "attention_mask": mask, "position_ids": positions}


def unpadded_inputs(tokens: int, seq: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (tokens // seq, seq)).cuda()
    return {"input_ids": ids, "labels": ids}


def packed_inputs(seq: int, vocab: int, generator: torch.Generator) -> dict:
    lengths = document_lengths(seq, 100, 4096, generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    ids = torch.randint(0, vocab, (1, seq)).cuda()
    return {"input_ids": ids, "labels": ids, "position_ids": positions, "documents": len(lengths)}


def time_steps(model, inputs: dict, warmup: int, steps: int) -> dict:
    inputs = {k: v for k, v in inputs.items() if k != "documents"}
    for _ in range(warmup):
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - before
    return {"step_ms": 1000 * statistics.median(times), "peak_gib": peak / 2**30, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--packed-seq", type=int, default=32768)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(args.layers)
    vocab = model.config.vocab_size
    padded = padded_inputs(args.seq, vocab)
    cases = {
        "padded/dense-mask sdpa": dense_mask_inputs(padded),
        "padded/varlen (auto)": padded,
        "padded/same tokens unpadded": unpadded_inputs(sum(PADDED_LENGTHS), args.seq, vocab),
        "packed/documents (auto)": packed_inputs(args.packed_seq, vocab, generator),
        "packed/one causal row": unpadded_inputs(args.packed_seq, args.packed_seq, vocab),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for name, inputs in cases.items():
        results["cases"][name] = time_steps(model, inputs, args.warmup, args.steps)
        if "documents" in inputs:
            results["cases"][name]["documents"] = inputs["documents"]
        print(name, results["cases"][name], flush=True)
    cases_out = results["cases"]
    results["ratios"] = {
        "varlen/dense time": cases_out["padded/varlen (auto)"]["step_ms"] / cases_out["padded/dense-mask sdpa"]["step_ms"],
        "varlen/unpadded memory": cases_out["padded/varlen (auto)"]["peak_gib"]
        / cases_out["padded/same tokens unpadded"]["peak_gib"],
        "packed/unpacked time": cases_out["packed/documents (auto)"]["step_ms"] / cases_out["packed/one causal row"]["step_ms"],
    }
    print(json.dumps(results["ratios"], indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
