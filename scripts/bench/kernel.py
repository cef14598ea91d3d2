"""The kernel section: each kernel-layer backend against the kernel it dispatches to, called directly."""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
from typing import Callable, Optional

import torch

from .core import Bench, ImplState, config_record, finish, pre_check, run_guarded


# Section: kernel
# ----------------------------------------------------------------------------------------------


def _sdpa_context(backends: Optional[list], priority: bool = False):
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    if priority:
        try:
            return sdpa_kernel(backends, set_priority=True)
        except TypeError:  # PyTorch without priorities: what the kernel layer falls back to as well
            return contextlib.nullcontext()
    return sdpa_kernel(backends)


# every direct call the kernel section can time (which of them run depends on the device and the backends)
DIRECT_KERNELS = (
    "torch:sdpa",
    "torch:sdpa-cudnn-first",
    "torch:sdpa-flash",
    "torch:sdpa-efficient",
    "torch:sdpa-cudnn",
    "torch:flex",
    "flash_attn",
    "xformers",
)


class DirectKernels:
    """The kernels our layer dispatches to, called directly: what a user calling them by hand would get."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.device = bench.device
        self.hopper = bench.is_cuda and torch.cuda.get_device_capability(bench.device)[0] >= 9
        self._flex = None
        self._block_masks: dict = {}
        self._score_mods: dict = {}

    def names(self, mask: str, ours: list) -> list:
        names = []
        if mask == "causal":
            names.append("torch:sdpa")
            if self.bench.is_cuda:
                if self.hopper:
                    names.append("torch:sdpa-cudnn-first")
                names += ["torch:sdpa-flash", "torch:sdpa-efficient", "torch:sdpa-cudnn"]
        if "flex" in ours:
            names.append("torch:flex")
        if "flash_attn" in ours:
            names.append("flash_attn")
        if "xformers" in ours and mask == "causal":
            names.append("xformers")
        return names

    def reference_for(self, backend: str) -> Optional[str]:
        """The direct call that runs the same kernel as our backend (None where there is no such call)."""
        return {
            "sdpa": "torch:sdpa-cudnn-first" if self.hopper else "torch:sdpa",
            "flex": "torch:flex",
            "flash_attn": "flash_attn",
            "xformers": "xformers",
        }.get(backend)

    def _flex_fn(self):
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._flex = torch.compile(flex_attention, dynamic=False)  # a static-shape kernel per shape: the fastest
        return self._flex

    def _block_mask(self, seq: int):
        if seq not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            def causal(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx

            self._block_masks[seq] = create_block_mask(causal, None, None, seq, seq, device=self.device)
        return self._block_masks[seq]

    def _alibi_mod(self, slopes: torch.Tensor):
        key = slopes.shape[0]
        if key not in self._score_mods:

            def alibi(score, b, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)

            self._score_mods[key] = alibi
        return self._score_mods[key]

    def prepare(self, name: str, seq: int) -> None:
        """Work a user does once per shape (a block mask), kept out of the timed calls."""
        if name == "torch:flex":
            self._block_mask(seq)

    def call(self, name: str, q, k, v, slopes: Optional[torch.Tensor] = None):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend

        alibi = slopes is not None
        if name.startswith("torch:sdpa"):
            if alibi:
                raise ValueError("SDPA takes no ALiBi without a materialized bias (not supported)")
            choice = {
                "torch:sdpa": (None, False),
                "torch:sdpa-cudnn-first": (
                    [
                        SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.FLASH_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH,
                    ],
                    True,
                ),
                "torch:sdpa-flash": ([SDPBackend.FLASH_ATTENTION], False),
                "torch:sdpa-efficient": ([SDPBackend.EFFICIENT_ATTENTION], False),
                "torch:sdpa-cudnn": ([SDPBackend.CUDNN_ATTENTION], False),
            }[name]
            with _sdpa_context(*choice):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if name == "torch:flex":
            score_mod = self._alibi_mod(slopes) if alibi else None
            return self._flex_fn()(q, k, v, score_mod=score_mod, block_mask=self._block_mask(q.shape[2]))
        if name == "flash_attn":
            from flash_attn import flash_attn_func

            out = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, alibi_slopes=slopes
            )
            return out.transpose(1, 2)
        if name == "xformers":
            import xformers.ops as xops

            out = xops.memory_efficient_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_bias=xops.fmha.attn_bias.LowerTriangularMask(),
            )
            return out.transpose(1, 2)
        raise ValueError(f"unknown direct kernel {name!r}")


def kernel_flops(batch: int, heads: int, seq: int, head_dim: int, mode: str) -> float:
    forward = 4.0 * batch * heads * seq * seq * head_dim * 0.5  # causal
    return forward if mode == "fwd" else 3.5 * forward


def measure_kernel(bench: Bench, fn: Callable, q, k, v, mode: str, flops: float, prepare: Callable[[], None]) -> dict:
    prepare()
    if mode == "fwd":
        q, k, v = (x.detach().requires_grad_(False) for x in (q, k, v))

        def call():
            with torch.no_grad():
                return fn(q, k, v)

    else:
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        grad_out = torch.randn_like(q)

        def call():
            out = fn(q, k, v)
            return torch.autograd.grad(out, (q, k, v), grad_out)

    bench.clean()
    bench.reset_peak()
    for _ in range(bench.args.kernel_warmup):
        call()
    one = max(bench.one_call_ms(call), 1e-3)
    reps = int(
        min(bench.args.kernel_max_reps, max(bench.args.kernel_min_reps, math.ceil(bench.args.kernel_target_ms / one)))
    )
    times = bench.timed(call, reps)
    ms = statistics.median(times)
    return {
        "ms": ms,
        "ms_min": min(times),
        "reps": reps,
        "flops": flops,
        "tflops": flops / (ms / 1e3) / 1e12,
        "peak_mem_mb": bench.peak_mb(),
    }


def run_kernel(bench: Bench) -> None:
    args = bench.args
    kl = bench.kernel_layer()
    backends = bench.our_backends()
    direct = DirectKernels(bench)
    seqs = args.seq_for("kernel")
    hidden = 128 if bench.tiny else 2048
    for head_dim in args.head_dim:
        heads = max(1, hidden // head_dim)
        slopes = kl.alibi_slopes(heads, device=bench.device)
        for mask in args.kernel_masks:
            for mode in args.kernel_modes:
                ours = ["ours:auto"] + [f"ours:{b}" for b in backends]
                impls = direct.names(mask, backends) + ours
                if args.impl:
                    impls = [i for i in impls if kernel_impl_wanted(i, args.impl)]
                bench.rec.say(f"== kernel d={head_dim} heads={heads} {mask} {mode}: {', '.join(impls)}")
                states = {impl: ImplState(exponent=1.0) for impl in impls}
                times_by_impl: dict = {}
                for seq in seqs:
                    alibi = slopes if mask == "alibi" else None
                    run_kernel_seq(
                        bench, kl, direct, impls, states, times_by_impl, seq, heads, head_dim, mask, mode, alibi
                    )
                bench.rec.write_markdown()


def run_kernel_seq(
    bench: Bench,
    kl,
    direct: DirectKernels,
    impls: list,
    states: dict,
    times_by_impl: dict,
    seq: int,
    heads: int,
    head_dim: int,
    mask: str,
    mode: str,
    alibi: Optional[torch.Tensor],
) -> None:
    """Every implementation on one set of inputs (batch x seq tokens, fixed across seqs)."""
    args = bench.args
    batch = max(1, args.kernel_tokens // seq)
    size = batch * seq * seq  # work and a materialized score matrix grow with this
    gen = torch.Generator(device=bench.device).manual_seed(seq)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=bench.device, dtype=bench.dtype, generator=gen) for _ in range(3))
    flops = kernel_flops(batch, heads, seq, head_dim, mode)
    for impl in impls:
        record = config_record(
            "kernel", None, impl, seq, batch, bench.dtype, heads=heads, head_dim=head_dim, mask=mask, mode=mode
        )
        backend = impl.split(":", 1)[1] if impl.startswith("ours:") else None
        if backend is not None:
            used = backend if backend != "auto" else auto_choice(kl, q, k, v, alibi, mode)
            record["backend_used"] = used
            record["reference"] = direct.reference_for(used) if used else None
        if bench.rec.is_done(record):
            continue
        skip = pre_check(bench, record, states[impl], size, args.kernel_warmup + args.kernel_min_reps)
        if skip is not None:
            finish(bench, skip, states[impl], size)
            continue
        if backend is not None:
            fn = functools.partial(ours_attention, kl, backend, alibi)
        else:
            fn = functools.partial(direct.call, impl, slopes=alibi)
        result = run_guarded(
            bench,
            record,
            functools.partial(
                measure_kernel, bench, fn, q, k, v, mode, flops, functools.partial(direct.prepare, impl, seq)
            ),
        )
        if result["status"] == "ok":
            states[impl].last_size, states[impl].last_ms = size, result["ms"]
            times_by_impl[(impl, seq)] = result["ms"]
            ref_ms = times_by_impl.get((result.get("reference"), seq))
            if ref_ms:
                result["overhead_pct"] = 100.0 * (result["ms"] / ref_ms - 1.0)
        finish(bench, result, states[impl], size)


def ours_attention(kl, backend: str, alibi: Optional[torch.Tensor], q, k, v):
    return kl.attention(q, k, v, causal=True, alibi_slopes=alibi, backend=backend)


KERNEL_CORE = ("ours:auto", "ours:sdpa", "ours:flex", "torch:sdpa", "torch:sdpa-cudnn-first", "torch:flex")


def kernel_impl_wanted(impl: str, wanted: list) -> bool:
    """``--impl`` for the kernel section: names, ``direct`` (every direct call) or ``core``."""
    if impl in wanted:
        return True
    if "direct" in wanted and not impl.startswith("ours:"):
        return True
    return "core" in wanted and impl in KERNEL_CORE


def auto_choice(kl, q, k, v, alibi, mode: str) -> Optional[str]:
    """The backend ``auto`` picks for this call (None if the kernel layer cannot say)."""
    try:
        with torch.set_grad_enabled(mode != "fwd"):
            qq = q.detach().requires_grad_(mode != "fwd")
            call = kl._describe(qq, k, v, True, None, alibi, 0.0)
            return kl.select_backend(call, "auto")
    except Exception:
        return None
