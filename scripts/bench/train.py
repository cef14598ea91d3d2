"""The train section: one training step (forward + backward of the model's loss) per family and size."""

from __future__ import annotations

import functools
import importlib.util
import statistics
from typing import Callable, Optional

import torch

from .core import Bench, ImplSweep, config_record
from .impls import LIGER_PATCHERS
from .models import (
    STOCK_CONFIG,
    Dims,
    config_kwargs,
    half_precision,
    model_flops_utilisation,
    next_pow2,
    packed_attention_share,
    random_ids,
    training_flops,
)
from .padded import document_lengths, document_positions
from .profiling import profile_call, profile_label

# Order of implementations in a family: the ones the targets need first, the ones that compile (flex) last,
# so that a run cut short by its budget still has the most.
IMPL_ORDER = (
    "stock:sdpa",
    "stock:eager",
    "ours:auto",
    "base:auto",
    "stock:sdpa+liger",
    "ours:sdpa",
    "ours:eager",
    "stock:flash_attention_2",
    "ours:flash_attn",
    "ours:xformers",
    "ours:chunked",
    "stock:flex_attention",
    "ours:flex",
    "ours:auto+compile",
    "stock:sdpa+compile",
)
CORE_IMPLS = ("stock:sdpa", "stock:eager", "ours:auto", "ours:eager")


def train_step_fn(model, inputs: dict, optimizer) -> Callable[[], torch.Tensor]:
    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for +cudagraphs impls; nothing for the others
        loss = model(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_train(
    bench: Bench,
    model,
    family: str,
    batch: int,
    seq: int,
    tgt: Optional[int],
    vocab: int,
    warmup: int,
    iters: int,
    profile_name: Optional[str] = None,
) -> dict:
    device = bench.device
    inputs = {"input_ids": random_ids(vocab, batch, seq, device)}
    inputs["labels"] = random_ids(vocab, batch, tgt, device) if family == "bart" else inputs["input_ids"]
    inputs.update(train_mask_inputs(bench.args.train_mask, inputs))
    model.train()
    model.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients behind
    optimizer = None
    if bench.args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=bench.is_cuda or None)
    step = train_step_fn(model, inputs, optimizer)
    bench.clean()
    static_mb = bench.allocated_mb()
    bench.reset_peak()
    last_ms = None
    for _ in range(warmup):
        last_ms = bench.one_call_ms(step)
    if last_ms is not None and last_ms * iters > 1e3 * bench.args.max_timed_s:
        iters = max(min(iters, 3), int(1e3 * bench.args.max_timed_s / last_ms))  # slow steps: fewer repeats
    losses = []
    times = bench.timed(functools.partial(record_loss, step, losses), iters)
    loss = float(losses[-1].float().item()) if losses else None
    peak = bench.peak_mb()
    ms = statistics.median(times)
    tokens = batch * (seq + (tgt or 0)) if family == "bart" else batch * seq
    share = packed_attention_share(inputs["position_ids"]) if "position_ids" in inputs else 1.0
    flops = None if bench.args.lora else training_flops(model, family, batch, seq, tgt, share)  # LoRA: no weight grads
    result = {
        "step_ms": ms,
        "step_ms_min": min(times),
        "step_ms_all": [round(t, 3) for t in times],
        "iters": len(times),
        "warmup": warmup,
        "peak_mem_mb": peak,
        "static_mem_mb": static_mb,
        "tokens": tokens,
        "tokens_per_s": tokens / (ms / 1e3),
        "flops": flops,
        "tflops": flops / (ms / 1e3) / 1e12 if flops else None,
        "mfu": model_flops_utilisation(flops, ms, bench.peak_tflops) if flops and half_precision(model) else None,
        "loss": loss,
        "optimizer": bench.args.optimizer,
    }
    if profile_name is not None:
        result.update(profile_call(bench, step, profile_name))
    return result


PACKED_FAMILIES = ("llama", "qwen")


def train_mask_inputs(train_mask: str, inputs: dict) -> dict:
    """What --train-mask adds to a training step's inputs: the Trainer's all-ones ``attention_mask`` (``ones``),
    or ``DataCollatorWithFlattening``'s packed documents (``packed``: ``position_ids`` restarting at every
    document, no mask, and labels of -100 at document starts; ``use_cache=False``, without which stock
    transformers makes a cache in training and then attends across the documents)."""
    ids = inputs["input_ids"]
    if train_mask == "ones":
        return {"attention_mask": torch.ones_like(ids)}
    if train_mask != "packed":
        return {}
    position_ids = torch.stack([packed_positions(ids.shape[1], seed=row) for row in range(ids.shape[0])]).to(ids.device)
    labels = inputs["labels"].masked_fill(position_ids == 0, -100)
    return {"position_ids": position_ids, "labels": labels, "use_cache": False}


def packed_positions(seq: int, seed: int) -> torch.Tensor:
    """Positions of ``seq`` tokens packed from documents of 1/16 to 1/4 of the row each (fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return document_positions(document_lengths(seq, max(1, seq // 16), max(2, seq // 4), generator))


def record_loss(step: Callable[[], torch.Tensor], losses: list) -> None:
    losses.append(step())


def train_impls(bench: Bench, family: str) -> list:
    """Every implementation this machine can run for ``family``, in IMPL_ORDER, as --impl selects them.

    ``+compile`` (minutes of compiling on the CPU) is a default on CUDA only; ``+liger`` where Liger-Kernel is
    installed and has a patcher for the family. --impl can ask for either anywhere."""
    stock = []
    if family in STOCK_CONFIG:
        stock = ["stock:sdpa", "stock:eager"]
        if bench.is_cuda or bench.args.cpu_flex:
            stock.append("stock:flex_attention")
        if bench.is_cuda and importlib.util.find_spec("flash_attn") is not None:
            stock.append("stock:flash_attention_2")
        if family in LIGER_PATCHERS and importlib.util.find_spec("liger_kernel") is not None:
            stock.append("stock:sdpa+liger")
        if bench.is_cuda:
            stock.append("stock:sdpa+compile")
    ours = ["ours:auto"] + [f"ours:{b}" for b in bench.our_backends()]
    if bench.is_cuda:
        ours.append("ours:auto+compile")
    if bench.args.baseline_modeling is not None:
        ours.append("base:auto")
    impls = [i for i in IMPL_ORDER if i in stock + ours] + [i for i in stock + ours if i not in IMPL_ORDER]
    return select_impls(bench, impls)


def select_impls(bench: Bench, impls: list) -> list:
    """``impls`` that --impl names (all without it; 'core' = CORE_IMPLS), then the variants --impl names of
    one of them (``ours:sdpa+compile``, ``stock:sdpa+liger``): these run even where they are not a default."""
    wanted = bench.args.impl
    if not wanted:
        return impls
    if "core" in wanted:
        wanted = [w for w in wanted if w != "core"] + list(CORE_IMPLS)
    variants = [w for w in wanted if w not in impls and _our_backend(w.split("+")[0]) in map(_our_backend, impls)]
    for name in wanted:
        if name not in impls and name not in variants:
            bench.rec.say(f"impl {name} does not run here (not one of: {', '.join(impls)})")
    return [i for i in impls if i in wanted] + variants


def _our_backend(impl: str) -> str:
    """``base:<backend>`` as the ``ours:<backend>`` it mirrors (the baseline folder has the same backends)."""
    return "ours:" + impl[len("base:"):] if impl.startswith("base:") else impl


def run_train_family(
    bench: Bench,
    section: str,
    family: str,
    impls: list,
    seqs: list,
    batches: list,
    dims: Dims,
    dtype: torch.dtype,
    dropout: float = 0.0,
    extra_config: Optional[dict] = None,
    extra_record: Optional[dict] = None,
) -> None:
    """Every implementation of ``impls`` at every batch and sequence length; ``extra_config`` maps an impl
    label to the impl it builds and the config fields it changes (the light section's variants)."""
    args = bench.args
    tgt_for = (lambda seq: min(args.bart_tgt, seq)) if family == "bart" else (lambda seq: None)
    max_pos = next_pow2(max(max(seqs), 1024))
    kwargs = config_kwargs(family, dims, max_pos, dropout, dtype)
    for impl in impls:
        built_impl, changed = (extra_config or {}).get(impl, (impl, {}))
        build = functools.partial(bench.factory.build, family, built_impl, {**kwargs, **changed}, dtype)
        sweep = ImplSweep(bench, build)
        for batch in batches:
            for seq in seqs:
                tgt = tgt_for(seq)
                record = config_record(
                    section, family, impl, seq, batch, dtype, tgt_len=tgt, vocab=dims.vocab, **(extra_record or {})
                )
                sizes = dict(family=family, batch=batch, seq=seq, tgt=tgt, vocab=dims.vocab)
                profile_name = profile_label(args, section, family, impl, seq, batch)
                measure = functools.partial(
                    measure_train, bench, **sizes, warmup=args.warmup, iters=args.iters, profile_name=profile_name
                )
                tokens = batch * (seq + (tgt or 0))
                sweep.run(record, tokens, args.warmup + args.iters, measure, lambda result: result["step_ms"])
        sweep.close()


def shape_record_fields(args) -> dict:
    """The model sizes a record measures, where they are not the defaults (every model-level section)."""
    fields = {}
    if args.layers is not None:
        fields["layers"] = args.layers
    if args.qwen_shape != "qwen-7b":
        fields["qwen_shape"] = args.qwen_shape
    return fields


def train_record_fields(args) -> dict:
    """The options that change what a training record measures, where they are not the defaults."""
    fields = shape_record_fields(args)
    if args.train_mask != "none":
        fields["train_mask"] = args.train_mask
    if args.optimizer != "none":
        fields["optimizer"] = args.optimizer
    if args.lora:
        fields["lora"] = ",".join(args.lora + [f"save:{name}" for name in args.modules_to_save])
    if args.loss_chunk_size is not None:
        fields["loss_chunk_size"] = args.loss_chunk_size
    return fields


def run_train(bench: Bench) -> None:
    args = bench.args
    for family in args.family:
        impls = train_impls(bench, family)
        bench.rec.say(f"== train {family}: {', '.join(impls)}")
        run_train_family(
            bench,
            "train",
            family,
            impls,
            args.seq_for("train"),
            args.batch_for("train"),
            bench.dims[family],
            bench.dtype,
            extra_record=train_record_fields(args) or None,
        )
        bench.rec.write_markdown()
