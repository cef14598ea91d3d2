"""The infer section: prefill latency and decode tokens/s through the KV cache."""

from __future__ import annotations

import functools
import statistics
from typing import Optional

import torch

from .core import Bench, ImplSweep, config_record
from .models import STOCK_CONFIG, config_kwargs, next_pow2, prefill_flops, random_ids
from .profiling import profile_call, profile_label
from .train import shape_record_fields, train_impls


# ----------------------------------------------------------------------------------------------


def prefill(model, family: str, ids: torch.Tensor):
    """The prompt through the model with an empty cache: (output, encoder output for BART)."""
    if family == "bart":
        encoder_out = model.get_encoder()(input_ids=ids)
        start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id, dtype=ids.dtype, device=ids.device)
        return model(encoder_outputs=encoder_out, decoder_input_ids=start, use_cache=True), encoder_out
    return model(input_ids=ids, use_cache=True), None


def decode(model, family: str, state, steps: int) -> None:
    """Greedy decoding of ``steps`` tokens, one forward per token through the model's KV cache."""
    out, encoder_out = state
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        if family == "bart":
            out = model(encoder_outputs=encoder_out, decoder_input_ids=token, past_key_values=past, use_cache=True)
        else:
            out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)


def generate_static(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens over a static cache: on CUDA transformers compiles the
    decoding step for it (its auto-compile: torch.compile, mode reduce-overhead), for stock and our classes alike."""
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
    )


def measure_static_generate(
    bench: Bench, model, batch: int, ids: torch.Tensor, new_tokens: int, profile_name: Optional[str] = None
) -> dict:
    """Decode speed over a static cache: ``generate`` of ``new_tokens`` tokens less ``generate`` of one (the
    prefill), so the ``new_tokens - 1`` compiled decoding steps are what is timed (after a warm-up that compiles).
    With ``--profile``, one more ``generate`` runs under the profiler."""
    model.eval()
    with torch.no_grad():
        bench.clean()
        bench.reset_peak()
        generate_static(model, ids, new_tokens)  # warm-up: compiles the decoding step, records its CUDA graphs
        prefill_times = bench.timed(functools.partial(generate_static, model, ids, 1), bench.args.prefill_iters)
        generate_times = bench.timed(functools.partial(generate_static, model, ids, new_tokens), 2)
        peak = bench.peak_mb()
        profiled = {}
        if profile_name is not None:
            generate = functools.partial(generate_static, model, ids, new_tokens)
            profiled = {f"{key}_generate": value for key, value in profile_call(bench, generate, profile_name).items()}
    prefill_ms, generate_ms = statistics.median(prefill_times), min(generate_times)
    decode_ms = generate_ms - prefill_ms
    steps = new_tokens - 1
    return {
        "prefill_ms": prefill_ms,
        "generate_ms": generate_ms,
        "new_tokens": new_tokens,
        "decode_ms": decode_ms,
        "decode_ms_per_step": decode_ms / steps,
        "decode_tokens_per_s": batch * steps / (decode_ms / 1e3),
        "peak_mem_mb": peak,
        **profiled,
    }


def measure_infer(
    bench: Bench,
    model,
    family: str,
    batch: int,
    seq: int,
    vocab: int,
    new_tokens: int,
    profile_name: Optional[str] = None,
) -> dict:
    ids = random_ids(vocab, batch, seq, bench.device)
    if bench.args.static_cache:
        return measure_static_generate(bench, model, batch, ids, new_tokens, profile_name)
    model.eval()
    with torch.no_grad():
        bench.clean()
        bench.reset_peak()
        decode(model, family, prefill(model, family, ids), min(4, new_tokens))  # warm-up (and compile)
        prefill_times = bench.timed(functools.partial(prefill, model, family, ids), bench.args.prefill_iters)
        state = prefill(model, family, ids)
        bench.sync()
        decode_ms = bench.timed(functools.partial(decode, model, family, state, new_tokens), 1)[0]
        peak = bench.peak_mb()
        if profile_name is not None:
            profiled = {
                "prefill": functools.partial(prefill, model, family, ids),
                "decode": functools.partial(decode, model, family, prefill(model, family, ids), 8),
            }
            profiles = {part: profile_call(bench, fn, f"{profile_name}-{part}") for part, fn in profiled.items()}
    prefill_ms = statistics.median(prefill_times)
    flops = prefill_flops(model, family, batch, seq)
    result = {
        "prefill_ms": prefill_ms,
        "prefill_ms_all": [round(t, 3) for t in prefill_times],
        "prefill_tflops": flops / (prefill_ms / 1e3) / 1e12,
        "new_tokens": new_tokens,
        "decode_ms": decode_ms,
        "decode_ms_per_step": decode_ms / new_tokens,
        "decode_tokens_per_s": batch * new_tokens / (decode_ms / 1e3),
        "peak_mem_mb": peak,
    }
    if profile_name is not None:
        for part, numbers in profiles.items():
            result.update({f"{key}_{part}": value for key, value in numbers.items()})
    return result


def run_infer(bench: Bench) -> None:
    args = bench.args
    seqs, batches = args.seq_for("infer"), args.batch_for("infer")
    for family in args.family:
        impls = (["stock:sdpa", "stock:eager"] if family in STOCK_CONFIG else ["ours:eager"]) + ["ours:auto"]
        if args.impl:
            every = train_impls(bench, family)
            impls = [i for i in every if i in impls or i in args.impl]
        bench.rec.say(f"== infer {family}: {', '.join(impls)}")
        dims = bench.dims[family]
        max_pos = next_pow2(max(seqs) + args.new_tokens + 8)
        kwargs = config_kwargs(family, dims, max_pos, 0.0, bench.dtype)
        for impl in impls:
            sweep = ImplSweep(bench, functools.partial(bench.factory.build, family, impl, kwargs, bench.dtype), 1.0)
            for batch in batches:
                for seq in seqs:
                    cache = {"cache": "static"} if args.static_cache else {}
                    record = config_record(
                        "infer", family, impl, seq, batch, bench.dtype, vocab=dims.vocab, **cache, **shape_record_fields(args)
                    )
                    measure = functools.partial(
                        measure_infer,
                        bench,
                        family=family,
                        batch=batch,
                        seq=seq,
                        vocab=dims.vocab,
                        new_tokens=args.new_tokens,
                        profile_name=profile_label(args, "infer", family, impl, seq, batch),
                    )
                    sweep.run(record, batch * seq, 1, measure, functools.partial(infer_cost_ms, args.prefill_iters))
            sweep.close()
        bench.rec.write_markdown()


def infer_cost_ms(prefill_iters: int, result: dict) -> float:
    """What measuring one configuration took: warm-up, timed and measured prefills, and decoding."""
    return result["prefill_ms"] * (prefill_iters + 2) + result["decode_ms"] * 1.2
