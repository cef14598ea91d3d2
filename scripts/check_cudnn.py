#!/usr/bin/env python
"""The cudnn backend on a GPU: correctness against float64 and speed against cuDNN plain causal and flex.

    python scripts/check_cudnn.py --out $OUT/cudnn        (needs CUDA and nvidia-cudnn-frontend)

Sections (each prints one JSON line per measurement and appends it to ``<out>/cudnn.jsonl``):
  correct   forward and every gradient of ``attention(backend="cudnn")`` against float64 math: ALiBi and
            plain causal, GQA, right padding, odd lengths (bucketed), 1/3/12/16/112 heads, fp16/bf16
  speed     forward + backward TFLOP/s (3.5 x the causal forward FLOPs), batch 1, head_dim 128: ALiBi through
            our dispatch (auto) and through flex, plain causal through auto (SDPA's cuDNN) and through our
            cudnn backend, at 2k/8k/16k tokens with 16 heads (bf16) and 2k/8k with 112 heads (fp16, bf16)
  varlen    training-like steps over random lengths: the plan cache's builds, build time and hit rate
  execute   host overhead at 2k tokens (ALiBi, 16 heads, bf16): forward + backward through attention() with the
            frontend's execute fed ordered buffers with their graph tensors' uids (``tensor_uids``, what the
            backend does) and fed a variant-pack dict, outputs and gradients compared bit for bit

``--speed-heads 112`` limits the speed section to the 176B-shaped calls (112 heads, head_dim 128).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import time
from pathlib import Path

import torch

import memory_efficient_adapter as mea

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")


def record(out: Path, **fields) -> None:
    line = json.dumps(fields)
    print(line, flush=True)
    with open(out / "cudnn.jsonl", "a") as handle:
        handle.write(line + "\n")


def reference(q, k, v, causal_alibi: bool, keep, scale):
    """Float64 causal attention (ALiBi with BLOOM's slopes when asked), keys hidden where ``keep`` is False."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    positions = torch.arange(q.shape[2], device=q.device)
    distance = (positions[None, :] - positions[:, None]).double()
    if causal_alibi:
        scores = scores + mea.alibi_slopes(q.shape[1], q.device).double()[:, None, None] * distance
    hidden = (distance > 0)[None, None] | ~keep[:, None, None, :]
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v


def check_case(heads, kv_heads, seq, dim, dtype, alibi, padded, gen):
    device = "cuda"
    q = torch.randn(2, heads, seq, dim, generator=gen, device=device).to(dtype)
    k, v = (torch.randn(2, kv_heads, seq, dim, generator=gen, device=device).to(dtype) for _ in range(2))
    keep = torch.ones(2, seq, dtype=torch.bool, device=device)
    if padded:
        keep[1, seq - seq // 3 :] = False
    scale = 1 / math.sqrt(dim)
    slopes = mea.alibi_slopes(heads, device) if alibi else None
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = mea.attention(*inputs, causal=True, attention_mask=keep if padded else None, alibi_slopes=slopes, backend="cudnn")
    grad = torch.randn(out.shape, generator=gen, device=device)
    grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    expected = reference(*ref_inputs, alibi, keep, scale)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad.double())
    errors = {"out": ((out.double() - expected).norm() / expected.norm()).item()}
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        errors[name] = ((got.double() - want).norm() / want.norm()).item()
    return errors


def section_correct(out: Path) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for heads, kv_heads in ((1, 1), (3, 1), (12, 4), (16, 16), (112, 112)):
        for dtype in (torch.float16, torch.bfloat16):
            for alibi in (True, False):
                for seq, padded in ((256, False), (203, True)):
                    errors = check_case(heads, kv_heads, seq, 128 if heads == 112 else 64, dtype, alibi, padded, gen)
                    worst = max(worst, *errors.values())
                    record(out, section="correct", heads=heads, kv_heads=kv_heads, seq=seq, dtype=str(dtype),
                           alibi=alibi, right_padded=padded, **{f"rel_err_{k}": round(v, 6) for k, v in errors.items()})
    record(out, section="correct", worst_rel_err=worst, passed=worst < 2e-2)


def time_fwd_bwd(run, q, k, v, iters: int = 10) -> float:
    """Milliseconds per forward + backward (median of ``iters`` after warm-up)."""
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn_like(q)
    for _ in range(3):
        run(*inputs).backward(grad)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(*inputs).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def section_speed(out: Path, shapes) -> None:
    for heads, seq, dtype in shapes:
        q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
        slopes = mea.alibi_slopes(heads, "cuda")
        flops = 3.5 * 4 * heads * seq * seq * 128 / 2
        variants = {  # flex last: it compiles, so a run that hits its time limit loses only flex
            "alibi_auto": dict(alibi_slopes=slopes, backend="auto"),
            "causal_auto_sdpa": dict(backend="auto"),
            "causal_cudnn": dict(backend="cudnn"),
            "alibi_flex": dict(alibi_slopes=slopes, backend="flex"),
        }
        if heads > 16:
            variants.pop("alibi_flex")
        for name, kwargs in variants.items():
            picked = mea.select_backend(kernel_layer._describe(q, k, v, True, None, kwargs.get("alibi_slopes"), 0.0), kwargs["backend"])
            try:
                ms = time_fwd_bwd(lambda a, b, c: mea.attention(a, b, c, causal=True, **kwargs), q, k, v)
                record(out, section="speed", variant=name, backend=picked, heads=heads, seq=seq, dtype=str(dtype),
                       ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
            except Exception as error:  # an OOM or an unsupported shape is a result too
                record(out, section="speed", variant=name, heads=heads, seq=seq, error=f"{type(error).__name__}: {error}"[:300])
            torch.cuda.empty_cache()


def section_varlen(out: Path, steps: int) -> None:
    """Random lengths from 1k to 4k tokens, batch 2, 16 heads, with right padding in half the steps."""
    rng = random.Random(0)
    before = mea.cudnn_plan_cache_info()
    slopes = mea.alibi_slopes(16, "cuda")
    start = time.perf_counter()
    for step in range(steps):
        seq = rng.randint(1024, 4096)
        q, k, v = (torch.randn(2, seq, 16, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(3))
        keep = None
        if step % 2:
            keep = torch.ones(2, seq, dtype=torch.bool, device="cuda")
            keep[1, rng.randint(1, seq - 1) :] = False
        mea.attention(q, k, v, causal=True, attention_mask=keep, alibi_slopes=slopes).sum().backward()
    torch.cuda.synchronize()
    after = mea.cudnn_plan_cache_info()
    builds, hits = after["builds"] - before["builds"], after["hits"] - before["hits"]
    record(out, section="varlen", steps=steps, plan_builds=builds, plan_hits=hits, hit_rate=round(hits / (hits + builds), 3),
           build_seconds=round(after["build_seconds"] - before["build_seconds"], 3),
           seconds_per_build=round((after["build_seconds"] - before["build_seconds"]) / max(builds, 1), 4),
           wall_seconds=round(time.perf_counter() - start, 2), cache=after)


def execute_dict(cudnn, plan: tuple, buffers: tuple, device: torch.device) -> None:
    """The backend's ``_cudnn_execute`` as it was: the frontend fed a variant-pack dict (keyed by uid)."""
    graph, slots, uids, workspace_size = plan
    handle, lock = kernel_layer._cudnn_handle(cudnn, device)
    workspace = torch.empty(workspace_size, device=device, dtype=torch.uint8)
    with lock:
        cudnn.set_stream(handle, kernel_layer._cuda_stream(device))
        graph.execute({uid: buffers[i] for uid, i in zip(uids, slots)}, workspace, handle=handle)


def section_execute(out: Path) -> None:
    heads, seq = 16, 2048
    q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    slopes = mea.alibi_slopes(heads, "cuda")
    flops = 3.5 * 4 * heads * seq * seq * 128 / 2
    layers = mea.forward_mask(None, without_mask=True)  # as in a model: the slopes are checked once, not per call
    run = lambda a, b, c: mea.attention(a, b, c, causal=True, attention_mask=layers, alibi_slopes=slopes, backend="cudnn")  # noqa: E731
    results, original = {}, kernel_layer._cudnn_execute
    for name, execute in (("dict", execute_dict), ("ordered_uids", original)):
        kernel_layer._cudnn_execute = execute
        try:
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            output = run(*inputs)
            results[name] = (output.detach(), *torch.autograd.grad(output, inputs, torch.ones_like(output)))
            ms = min(time_fwd_bwd(run, q, k, v, iters=20) for _ in range(3))
            record(out, section="execute", variant=name, heads=heads, seq=seq, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
        except Exception as error:
            record(out, section="execute", variant=name, error=f"{type(error).__name__}: {error}"[:300])
        finally:
            kernel_layer._cudnn_execute = original
    if len(results) == 2:
        same = all(torch.equal(a, b) for a, b in zip(results["dict"], results["ordered_uids"]))
        record(out, section="execute", same_outputs_and_gradients=same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("cudnn-check"))
    parser.add_argument("--sections", default="correct,varlen,speed")
    parser.add_argument("--varlen-steps", type=int, default=60)
    parser.add_argument("--speed-heads", default="16,112", help="head counts of the speed section (16: 2k/8k/16k, 112: 2k/8k)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record(args.out, device=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
           backends=mea.available_backends("cuda"))
    sections = args.sections.split(",")
    if "correct" in sections:
        section_correct(args.out)
    if "varlen" in sections:
        section_varlen(args.out, args.varlen_steps)
    if "speed" in sections:
        heads = [int(h) for h in args.speed_heads.split(",")]
        shapes = [(16, s, torch.bfloat16) for s in (2048, 8192, 16384)] if 16 in heads else []
        shapes += [(112, s, dtype) for s in (2048, 8192) for dtype in (torch.float16, torch.bfloat16)] if 112 in heads else []
        section_speed(args.out, shapes)
    if "execute" in sections:
        section_execute(args.out)


if __name__ == "__main__":
    main()
