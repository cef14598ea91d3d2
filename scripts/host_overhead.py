#!/usr/bin/env python
"""Host time of a LLaMA training step: stock transformers against our modeling_llama.py (and an earlier copy).

A short training step (1k-2k tokens on a GPU) is bound by the host: the Python and dispatch work that issues
the kernels. This measures, per implementation and length, the median step (synchronised), the host time to
issue it (until the step returns, before the final synchronisation), and the host syncs inside it (CUDA's
sync debug mode; on the CPU the ops that read a value back), and writes a cProfile table of one step per
implementation, so that the host work per layer of ours can be told apart from stock's. Variants of ours
switch one of our choices off (by patching the loaded module) to find what a difference comes from.

    python scripts/host_overhead.py --seq 1024,2048 --out $OUT/host            # GPU, LLaMA 8 x 2048
    python scripts/host_overhead.py --device cpu --tiny --seq 8 --out /tmp/host  # CPU: host time alone
    python scripts/host_overhead.py --baseline-modeling /path/to/old/modeling ...  # adds base:auto
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import json
import os
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique_consecutive", "aten.masked_select")


def load_modeling(name: str, folder: Path):
    spec = importlib.util.spec_from_file_location(name, folder / "modeling_llama.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _direct_sdpa(q, k, v, weights, causal, scale, dropout_p, **_):
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)


# Variants of ours: one of our choices switched off in the loaded module (attributes replaced while measured).
VARIANTS = {
    # PyTorch's own SDPA kernel order (ours puts cuDNN first on Hopper)
    "flash-first": {"_sdpa_priority": lambda call, device: None},
    # the fused ops' PyTorch bodies, eagerly, instead of their Triton kernels
    "pytorch-fused-ops": {"_triton_takes": lambda *tensors: False, "_pointwise": lambda fn, *args: fn(*args)},
    # logits and transformers' loss instead of the fused LM head + loss
    "stock-loss": {"fused_loss_applies": lambda *args, **kwargs: False},
    # F.scaled_dot_product_attention instead of the kernel layer's dispatch
    "direct-sdpa": {"attention_recording_weights": _direct_sdpa},
}


@contextlib.contextmanager
def variant_of(module, variant: str):
    patches = VARIANTS[variant] if variant else {}
    saved = {name: getattr(module, name) for name in patches}
    for name, value in patches.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def build(args, module):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq), tie_word_embeddings=False, use_cache=False,
    )
    config._attn_implementation = "sdpa"
    cls = transformers.LlamaForCausalLM if module is None else module.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(args.device):
        model = cls(config)
    return model.to(args.dtype).train()


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Ops that read a tensor's value on the host (what makes the CPU wait for the device)."""

    def __init__(self):
        super().__init__()
        self.found: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(SYNCING_OPS):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def count_syncs(step, device: torch.device) -> list:
    if device.type != "cuda":
        with SyncCounter() as counter:
            step()
        return counter.found
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, model, seq: int, device_time: bool) -> dict:
    ids = torch.randint(0, args.vocab, (1, seq), device=args.device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    walls, hosts = [], []
    for _ in range(args.iters):
        begin = time.perf_counter()
        step()
        issued = time.perf_counter()
        sync(args.device)
        walls.append(1e3 * (time.perf_counter() - begin))
        hosts.append(1e3 * (issued - begin))
    syncs = count_syncs(step, args.device)
    profile = cProfile.Profile()
    profile.enable()
    step()
    sync(args.device)
    profile.disable()
    stats = pstats.Stats(profile)
    tables = [profile_table(stats, args.profile_rows, column) for column in (2, 3)]
    return {
        "step_ms": statistics.median(walls), "host_ms": statistics.median(hosts), "step_ms_all": walls,
        "syncs": len(syncs), "sync_ops": sorted(set(syncs)), "python_calls": stats.total_calls,
        **({"device_ms": device_busy_ms(step, args.device)} if args.device_time and device_time else {}),
        "profile": "\n\n".join(tables),
    }


def device_busy_ms(step, device: torch.device) -> float:
    """The device's kernel time in one step (torch.profiler): far below the step time means a host-bound step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type != torch.autograd.DeviceType.CPU]
    return sum(e.self_device_time_total for e in kernels) / 1e3


def profile_table(stats: pstats.Stats, rows: int, column: int) -> str:
    """The functions of one profiled step with the most time of their own (column 2) or with their callees
    (column 3), in microseconds."""
    entries = sorted(stats.stats.items(), key=lambda item: -item[1][column])[:rows]
    lines = [f"{'calls':>7} {'own us':>9} {'with callees us':>15}  function"]
    for (path, line, name), (_, calls, own, cumulative, _) in entries:
        where = f"{Path(path).name}:{line}" if line else ""
        lines.append(f"{calls:>7} {1e6 * own:>9.0f} {1e6 * cumulative:>15.0f}  {name} {where}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    parser.add_argument("--seq", default="1024,2048")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tiny", action="store_true", help="16 layers of width 16, vocabulary 256: host time alone")
    parser.add_argument("--impl", default="stock,ours", help=f"stock, ours, base; ours+VARIANT: {list(VARIANTS)}")
    parser.add_argument("--baseline-modeling", type=Path, default=None, help="a modeling/ folder for base")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device-time", action="store_true", help="also the device's busy time (torch.profiler)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new implementation after this")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.seq = [int(s) for s in args.seq.split(",")]
    if args.tiny:
        args.layers, args.hidden, args.heads, args.intermediate, args.vocab = 16, 16, 2, 32, 256
    default_dtype = "bf16" if args.device.type == "cuda" else "fp32"
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or default_dtype]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    modules = {"stock": None, "ours": load_modeling("mea_host_ours", MODELING_DIR)}
    if args.baseline_modeling is not None:
        modules["base"] = load_modeling("mea_host_base", args.baseline_modeling)
    records, began, built = [], time.perf_counter(), (None, None)
    with open(args.out / "host_overhead.log", "w", encoding="utf-8") as log:
        for impl in args.impl.split(","):
            if time.perf_counter() - began > args.budget_s:
                print(f"{impl}: skipped, the budget of {args.budget_s} s is spent", flush=True)
                continue
            source, _, variant = impl.partition("+")
            if built[0] != source:
                built = (None, None)
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
                built = (source, build(args, modules[source]))
            for seq in args.seq:
                with variant_of(modules[source], variant):
                    record = {"impl": impl, "seq": seq, "device": str(args.device), "layers": args.layers,
                              "hidden": args.hidden, **measure(args, built[1], seq, device_time=not variant)}
                profile = record.pop("profile")
                device = f", device {record['device_ms']:7.2f} ms" if "device_ms" in record else ""
                line = (f"{impl:>24} {seq:>6}: step {record['step_ms']:8.2f} ms, host {record['host_ms']:8.2f} ms"
                        f"{device}, {record['syncs']} host syncs {record['sync_ops']}, "
                        f"{record['python_calls']} Python calls")
                print(line, flush=True)
                log.write(f"{line}\n{profile}\n\n")
                log.flush()
                records.append(record)
                (args.out / "host_overhead.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
