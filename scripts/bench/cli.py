"""The command line: flags, the environment record, and the run of the chosen sections."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import subprocess
import sys
import traceback
import uuid
from pathlib import Path
from typing import Optional

import bench_report
import torch

import bench as package

from . import ROOT
from .compare import run_compare
from .core import Bench, Recorder, short_error
from .infer import run_infer
from .impls import parse_impl
from .kernel import DIRECT_KERNELS, run_kernel
from .light import LIGHT_VARIANTS, run_light
from .models import FAMILIES
from .padded import run_padded
from .train import PACKED_FAMILIES, run_train

SECTIONS = ("train", "infer", "kernel", "light", "compare", "padded")


def environment(bench: Bench, argv: list) -> dict:
    import transformers

    env = {
        "section": "env",
        "impl": "env",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if bench.is_cuda else None,
        "peak_tflops": bench.peak_tflops,
        "device_count": torch.cuda.device_count() if bench.is_cuda else 0,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "xformers": importlib.util.find_spec("xformers") is not None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "command": " ".join(["python", "scripts/benchmark.py"] + list(argv)),
        "tiny": bench.tiny,
    }
    if bench.is_cuda:
        props = torch.cuda.get_device_properties(bench.device)
        env.update(
            capability=f"{props.major}.{props.minor}",
            total_mem_mb=props.total_memory / 2**20,
            sms=props.multi_processor_count,
        )
    try:
        env["backends"] = bench.our_backends()
    except Exception as error:
        env["backends"] = [f"error: {short_error(error)}"]
    with contextlib.suppress(Exception):
        env["git"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    return env


def int_list(text: str) -> list:
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        values.append(int(float(part.rstrip("k")) * scale))
    return values


def str_list(text: str) -> list:
    return [p.strip() for p in text.split(",") if p.strip()]


IMPL_KEYWORDS = ("core", "direct")


def impl_name_problem(name: str) -> Optional[str]:
    """Why ``--impl`` cannot mean ``name`` (None when some section knows it)."""
    if name in IMPL_KEYWORDS or name in DIRECT_KERNELS or name in LIGHT_VARIANTS:
        return None
    try:
        parse_impl(name)
    except ValueError as error:
        return (
            f"{error}; the kernel section also takes {', '.join(DIRECT_KERNELS)}, the light section "
            f"{', '.join(n for n in LIGHT_VARIANTS if '+' in n)}; core (every section) and direct (kernel) select groups"
        )
    return None


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=package.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=bench_report.FLOP_FORMULAS,
    )
    p.add_argument(
        "--section",
        type=str_list,
        default=["train", "infer", "kernel", "light", "compare"],
        help="comma list of " + ", ".join(SECTIONS) + " (or all)",
    )
    p.add_argument("--family", type=str_list, default=list(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    p.add_argument(
        "--seq",
        type=int_list,
        default=None,
        help="sequence lengths, e.g. 1k,2k,8k (default per section; BART: source length)",
    )
    p.add_argument("--batch", type=int_list, default=None, help="batch sizes (default: train 1, infer 1,16)")
    p.add_argument(
        "--impl",
        type=str_list,
        default=None,
        help="only these, e.g. stock:sdpa,ours:auto (kernel: torch:flex ...); 'core' = the ones the targets need",
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="vocabulary size of every model (default 32000; 151936 is Qwen-7B's, where the logits dominate)",
    )
    p.add_argument(
        "--baseline-modeling",
        type=Path,
        default=None,
        help="a modeling/ folder of our files (e.g. an earlier commit's) that the base:<backend> impls load",
    )
    p.add_argument("--exclude-backends", type=str_list, default=[], help="our backends to leave out, e.g. xformers")
    p.add_argument("--head-dim", type=int_list, default=None, help="kernel head dims (default 128,64)")
    p.add_argument("--kernel-masks", type=str_list, default=["causal", "alibi"])
    p.add_argument("--kernel-modes", type=str_list, default=["fwdbwd", "fwd"])
    p.add_argument("--kernel-tokens", type=int, default=None, help="batch x seq of a kernel call (default 32768)")
    p.add_argument("--bart-tgt", type=int, default=1024, help="BART target length (capped at the source length)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps in infer (default 128)")
    p.add_argument(
        "--static-cache",
        action="store_true",
        help="infer: decode with generate(cache_implementation='static'), which on CUDA compiles the decoding step",
    )
    p.add_argument("--layers", type=int, default=None, help="layers of every model (BART: per stack)")
    p.add_argument(
        "--qwen-shape",
        choices=["qwen-7b", "llama"],
        default="qwen-7b",
        help="Qwen's layer sizes: Qwen-7B's (4 layers of hidden 4096) or the LLaMA-shaped model's",
    )
    p.add_argument(
        "--optimizer", choices=["none", "adamw"], default="none", help="add an AdamW step to the training step"
    )
    p.add_argument(
        "--lora", type=str_list, default=[],
        help="train: wrap every model in PEFT LoRA (rank 16) on these module names, e.g. q_proj,v_proj or lm_head "
        "(no MFU: frozen weights get no weight gradients)",
    )
    p.add_argument("--modules-to-save", type=str_list, default=[], help="with --lora: PEFT's modules_to_save, e.g. lm_head")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="train: config.loss_chunk_size of our models")
    p.add_argument(
        "--train-mask", choices=["none", "ones", "packed"], default="none",
        help="train: pass an all-ones attention_mask, as the Trainer's collators do for unpadded rows (ones), or "
        "pack documents of 1/16 to 1/4 of a row each as DataCollatorWithFlattening does (packed: position_ids "
        "restarting per document, no mask; llama and qwen)",
    )
    p.add_argument("--warmup", type=int, default=None, help="training warm-up steps (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed training steps, median reported (default 5)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more training step, prefill and 8 decode steps (tables in <out>/profile-*.txt)",
    )
    p.add_argument("--prefill-iters", type=int, default=None)
    p.add_argument("--kernel-warmup", type=int, default=3)
    p.add_argument("--kernel-min-reps", type=int, default=5)
    p.add_argument("--kernel-max-reps", type=int, default=100)
    p.add_argument(
        "--kernel-target-ms", type=float, default=None, help="timed time per kernel configuration (default 200 ms)"
    )
    p.add_argument(
        "--padded-cases", type=str_list, default=None, help="cases of the padded section (default: all; see padded.py)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer sizes and repeats (tiny models on the CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny models (default on the CPU with --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on the CPU"
    )
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting configurations after this many seconds")
    p.add_argument("--max-config-s", type=float, default=90.0, help="skip a configuration predicted to take longer")
    p.add_argument(
        "--max-timed-s",
        type=float,
        default=15.0,
        help="fewer timed training steps (at least 3) when they would take longer",
    )
    p.add_argument(
        "--config-timeout-s",
        type=float,
        default=180.0,
        help="abandon a configuration after this long, or 30 s past the budget (0: never)",
    )
    p.add_argument(
        "--first-config-s",
        type=float,
        default=45.0,
        help="budget left needed to start an implementation's first configuration",
    )
    p.add_argument("--resume", action="store_true", help="skip configurations already in <out>/results.jsonl")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s for MFU (default: from the device name)",
    )
    p.add_argument(
        "--cpu-flex", action="store_true", help="also run FlexAttention on the CPU (forward only; slow to compile)"
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads on the CPU (1 keeps a shared machine's timings steady)",
    )
    p.add_argument(
        "--dynamo-cache-limit", type=int, default=64, help="torch._dynamo cache_size_limit (compiled flex variants)"
    )
    args = p.parse_args(argv)

    if "all" in args.section:
        args.section = list(SECTIONS)
    bad = [s for s in args.section if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    bad = [f for f in args.family if f not in FAMILIES]
    if bad:
        p.error(f"unknown family {bad}; choose from {', '.join(FAMILIES)}")
    unpacked = [f for f in args.family if f not in PACKED_FAMILIES]
    if args.train_mask == "packed" and "train" in args.section and unpacked:
        p.error(f"--train-mask packed restarts position ids, which {', '.join(unpacked)} do not take")
    for name in args.impl or []:
        problem = impl_name_problem(name)
        if problem:
            p.error(f"--impl: {problem}")
    if args.modules_to_save and not args.lora:
        p.error("--modules-to-save is a PEFT LoRA option: name the LoRA targets with --lora too")
    on_cpu = torch.device(args.device).type == "cpu"
    args.tiny = args.tiny or (args.quick and on_cpu)
    args.dtype = args.dtype or ("fp32" if on_cpu else "bf16")
    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.iters = args.iters if args.iters is not None else (2 if quick else 5)
    args.prefill_iters = args.prefill_iters or (2 if quick else 3)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 16 if quick else 128)
    args.kernel_target_ms = args.kernel_target_ms or (20.0 if quick else 200.0)
    if quick:
        args.kernel_warmup = min(args.kernel_warmup, 2)
        args.kernel_min_reps = min(args.kernel_min_reps, 2)
    if args.tiny:
        args.kernel_tokens = args.kernel_tokens or 256
        args.head_dim = args.head_dim or [32]
        args.bart_tgt = min(args.bart_tgt, 16)
    else:
        args.kernel_tokens = args.kernel_tokens or 32768
        args.head_dim = args.head_dim or ([128] if quick else [128, 64])

    defaults = {
        "train": [32, 64] if args.tiny else [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384, 32768],
        "compare": [64] if args.tiny else [4096] if quick else [8192],
        "infer": [32] if args.tiny else [512] if quick else [1024, 2048],
        "kernel": [64, 128] if args.tiny else [1024, 8192] if quick else [1024, 2048, 4096, 8192, 16384, 32768],
    }
    batch_defaults = {"infer": [1, 2] if args.tiny else [1, 4] if quick else [1, 16]}
    args.seq_for = lambda section: args.seq or defaults[section]
    args.batch_for = lambda section: args.batch or batch_defaults.get(section, [1])
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(Exception):
        # every compiled flex_attention call (direct and ours, each mask, head dim, with and without grad)
        # caches on one code object: past the default limit of 8 dynamo would silently fall back to eager
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, args.dynamo_cache_limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 16 * args.dynamo_cache_limit
        )
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; pass --device cpu for a CPU smoke run", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    base = {"run_id": uuid.uuid4().hex[:8], "device": args.device}
    recorder = Recorder(args.out, base, args.resume)
    bench = Bench(args, recorder)
    base["device_name"] = bench.device_name
    env = environment(bench, sys.argv[1:] if argv is None else argv)
    recorder.write(env)
    recorder.say(
        f"device {bench.device_name} ({args.device}, {args.dtype}), torch {env['torch']}, "
        f"transformers {env['transformers']}, peak {bench.peak_tflops} TFLOP/s, backends {env['backends']}, "
        f"sections {args.section}, families {args.family}, budget {args.budget_s:.0f} s, out {args.out}"
    )
    runners = {
        "kernel": run_kernel,
        "light": run_light,
        "compare": run_compare,
        "train": run_train,
        "infer": run_infer,
        "padded": run_padded,
    }
    for section in args.section:
        try:
            runners[section](bench)
        except Exception as error:  # a section that breaks outside a configuration still lets the others run
            recorder.say(f"section {section} failed: {short_error(error)}")
            recorder.log_only(traceback.format_exc())
            recorder.write({"section": section, "impl": "section", "status": "error", "error": short_error(error)})
        bench.clean()
    recorder.write_markdown()
    statuses: dict = {}
    for record in recorder.run_records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    markdown = bench_report.render_markdown([env] + recorder.run_records, title="This run")
    print("\n" + markdown[-9000:], flush=True)
    recorder.say(
        f"done in {bench.elapsed():.0f} s: {statuses}; results in {recorder.path} and {args.out / 'results.md'}"
    )
    if args.impl and not args.resume and not recorder.run_records:
        recorder.say(f"no configuration ran: --impl {','.join(args.impl)} names nothing that runs in {args.section}")
        return 1
    return 0
