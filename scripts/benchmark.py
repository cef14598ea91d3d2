#!/usr/bin/env python
"""Memory and speed of our modeling files against stock transformers, and of the kernel layer's backends.

One script, split into sections that each fit in a few minutes of GPU time:

    train    training step (forward + backward of the model's loss) per family: peak allocated memory,
             step time, tokens/s and model FLOP utilisation at 1k .. 32k tokens (batch 1) until OOM, for
             stock transformers with each attn_implementation the class takes and ours with every backend
    infer    prefill latency and decode tokens/s with the KV cache (batch 1 and 16, prompts 1k and 2k)
    kernel   forward and forward+backward TFLOP/s of each kernel-layer backend against the kernel called
             directly (SDPA, compiled FlexAttention ...), causal and ALiBi, head dims 64 and 128, and our
             dispatch overhead
    light    the Light Attention table: GPT-2 small (12 x 768), batch 4 x 1024 tokens, fp32, dropout 0.1,
             training mode: max memory allocated of stock eager, our eager with/without light softmax and
             fused dropout-matmul, and our fused path
    compare  BLOOM (ours, auto) against a LLaMA of the same size on stock sdpa, and against stock BLOOM, at
             8k tokens: issue 4's targets

Every measurement is one JSON line appended to ``<out>/results.jsonl`` (safe to append several runs to one
file; a later record with the same key wins); ``<out>/results.md`` is rewritten from that file after each
family/section, and ``<out>/log.txt`` holds the progress and any tracebacks. PNG plots and the tables under
docs/benchmarks/ come from ``scripts/plot_benchmarks.py``. A failing configuration records its error (OOM,
unsupported, error, timeout) and the run goes on; a run stops starting new configurations once
``--budget-s`` is spent (they are recorded as skipped), and ``--resume`` skips what is already recorded.
``--profile`` adds a torch.profiler table per configuration (``<out>/profile-*.txt``) with the device's busy
time, which tells a host-bound step (small sizes, decoding) from a kernel-bound one. Our flex backend gets a
static-shape kernel for every size of a sweep, as a run at one fixed size does (see set_flex_static_shapes).

Examples (GPU):

    python scripts/benchmark.py --section kernel --out $OUT/bench
    python scripts/benchmark.py --section train --family llama --out $OUT/bench
    python scripts/benchmark.py --section light,compare --out $OUT/bench

CPU smoke run (tiny models, float32): ``python scripts/benchmark.py --device cpu --quick --out /tmp/bench``.
The FLOP formulas are in ``scripts/bench_report.py`` (FLOP_FORMULAS) and in every results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="mea-bench-modules-"))

import torch  # noqa: E402

SCRIPTS_DIR = Path(__file__).resolve().parent
ROOT = SCRIPTS_DIR.parent
MODELING_DIR = ROOT / "modeling"
sys.path.insert(0, str(SCRIPTS_DIR))
import bench_report  # noqa: E402


def module_from_file(name: str, path: Path):
    """A module of modeling/ loaded from its file: this script runs where the package is not installed."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


families = module_from_file("mea_bench_families", MODELING_DIR / "families.py")
FAMILIES = tuple(families.FAMILIES)
SECTIONS = ("train", "infer", "kernel", "light", "compare")
FINAL = bench_report.FINAL_STATUSES

STOCK_CONFIG = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "bloom": "BloomConfig", "bart": "BartConfig"}

# Order of implementations in a family: the ones the targets need first, the ones that compile (flex) last,
# so that a run cut short by its budget still has the most.
IMPL_ORDER = (
    "stock:sdpa",
    "stock:eager",
    "ours:auto",
    "ours:sdpa",
    "ours:eager",
    "stock:flash_attention_2",
    "ours:flash_attn",
    "ours:xformers",
    "ours:chunked",
    "stock:flex_attention",
    "ours:flex",
)
CORE_IMPLS = ("stock:sdpa", "stock:eager", "ours:auto", "ours:eager")


@dataclass(frozen=True)
class Dims:
    layers: int  # BART: per stack (encoder and decoder each)
    hidden: int
    heads: int
    vocab: int
    intermediate: Optional[int] = None


# ~8 layers, hidden 2048, 16 heads (Qwen: Qwen-7B's 4096 x 32 heads, 4 layers). A 32k vocabulary for all, so
# that the LM head does not hide the attention (BLOOM's real 250k vocabulary would dominate memory).
FULL_DIMS = {
    "llama": Dims(8, 2048, 16, 32000, 5632),
    "gpt2": Dims(8, 2048, 16, 32000),
    "bloom": Dims(8, 2048, 16, 32000),
    "bart": Dims(4, 2048, 16, 32000),
    "qwen": Dims(4, 4096, 32, 32000, 22016),
}
TINY_DIMS = {
    "llama": Dims(2, 64, 4, 256, 128),
    "gpt2": Dims(2, 64, 4, 256),
    "bloom": Dims(2, 64, 4, 256),
    "bart": Dims(1, 64, 4, 256),
    "qwen": Dims(2, 64, 4, 256, 256),
}
LIGHT_FULL = dict(layers=12, hidden=768, heads=12, vocab=50257, batch=4, seq=1024, dropout=0.1)
LIGHT_TINY = dict(layers=2, hidden=64, heads=4, vocab=256, batch=2, seq=32, dropout=0.1)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """Dense (non-sparse) bf16 tensor-core peak of known devices, from the vendors' datasheets."""
    name = device_name.upper()
    if "H200" in name or "GH200" in name:
        return 989.0
    if "H100" in name or "H800" in name:
        if "PCIE" in name:
            return 756.0
        if "NVL" in name:
            return 835.0
        return 989.0  # SXM ("H100 80GB HBM3")
    if "B200" in name:
        return 2250.0
    if "A100" in name or "A800" in name:
        return 312.0
    if "L40S" in name:
        return 362.0
    return None


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON line per measurement, echoes progress, and knows what earlier runs finished."""

    def __init__(self, out_dir: Path, base: dict, resume: bool):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "results.jsonl"
        self.log_path = out_dir / "log.txt"
        self.base = base
        self.run_records: list = []
        self.done: set = set()
        if resume:
            for record in bench_report.load_records([self.path]):
                if record.get("status") in FINAL:
                    self.done.add(bench_report.record_key(record))

    def say(self, message: str) -> None:
        print(message, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(message + "\n")

    def log_only(self, message: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(message + "\n")

    def full(self, record: dict) -> dict:
        return {**self.base, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}

    def is_done(self, record: dict) -> bool:
        return bench_report.record_key(self.full(record)) in self.done

    def write(self, record: dict) -> dict:
        record = self.full(record)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, default=str) + "\n")
            out.flush()
            os.fsync(out.fileno())
        if record.get("section") != "env":
            self.run_records.append(record)
        return record

    def write_markdown(self) -> None:
        records = bench_report.load_records([self.path])
        (self.out_dir / "results.md").write_text(bench_report.render_markdown(records), encoding="utf-8")


class ConfigTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ConfigTimeout in the main thread after ``seconds`` (Unix); a no-op elsewhere or for 0."""
    usable = seconds > 0 and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise ConfigTimeout(f"configuration ran past {seconds:.0f} s (--config-timeout-s or the end of --budget-s)")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def classify(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".lower()
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return "oom"
    if isinstance(error, ConfigTimeout) or "--config-timeout-s" in text:
        return "timeout"
    unsupported = (
        "cannot take this call",
        "does not support an attention implementation",
        "does not support",
        "not supported",
        "no available kernel",
        "is not installed",
        "runs only on cuda",
    )
    if isinstance(error, (ValueError, NotImplementedError, ImportError, RuntimeError)) and any(
        s in text for s in unsupported
    ):
        return "unsupported"
    return "error"


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    return text[:400]


# ----------------------------------------------------------------------------------------------
# Context: device, dtype, sizes, budget
# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, recorder: Recorder):
        self.args = args
        self.rec = recorder
        self.device = torch.device(args.device)
        self.is_cuda = self.device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.tiny = args.tiny
        self.dims = TINY_DIMS if self.tiny else FULL_DIMS
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.device_name = torch.cuda.get_device_name(self.device) if self.is_cuda else platform.processor() or "cpu"
        self.peak_tflops = args.peak_tflops or (peak_bf16_tflops(self.device_name) if self.is_cuda else None)
        # every size of a sweep gets its own static-shape flex kernel, as in a run at one fixed size
        self.flex_static_shapes = args.dynamo_cache_limit // 2
        self.factory = ModelFactory(self.device, self.flex_static_shapes)
        self._kernel_layer = None

    # -- timing and memory --------------------------------------------------------------------

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def clean(self) -> None:
        """Free what the last configuration left (on the GPU, where memory is measured)."""
        if self.is_cuda:
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_mb(self) -> Optional[float]:
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.is_cuda else None

    def peak_mb(self) -> Optional[float]:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.is_cuda else None

    def timed(self, fn: Callable[[], object], iters: int) -> list:
        """Milliseconds of each of ``iters`` calls: CUDA events on the GPU, a host clock on the CPU."""
        if not self.is_cuda:
            times = []
            for _ in range(iters):
                begin = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - begin))
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]

    def one_call_ms(self, fn: Callable[[], object]) -> float:
        self.sync()
        begin = time.perf_counter()
        fn()
        self.sync()
        return 1e3 * (time.perf_counter() - begin)

    # -- the kernel layer ---------------------------------------------------------------------

    def kernel_layer(self):
        """modeling/attention.py loaded from its file (the source every modeling file carries a copy of)."""
        if self._kernel_layer is None:
            self._kernel_layer = module_from_file("mea_bench_attention", MODELING_DIR / "attention.py")
            self._kernel_layer.set_flex_static_shapes(self.flex_static_shapes)
        return self._kernel_layer

    def our_backends(self) -> list:
        names = list(self.kernel_layer().available_backends(self.device.type))
        if self.device.type == "cpu" and not self.args.cpu_flex and "flex" in names:
            names.remove("flex")  # forward-only on CPU and ~20 s to compile: opt in with --cpu-flex
        return [n for n in names if n not in self.args.exclude_backends]


# ----------------------------------------------------------------------------------------------
# Models: configs, stock and ours
# ----------------------------------------------------------------------------------------------


def config_kwargs(family: str, dims: Dims, max_pos: int, dropout: float, dtype: torch.dtype) -> dict:
    h, n, v = dims.hidden, dims.heads, dims.vocab
    if family == "llama":
        return dict(
            vocab_size=v,
            hidden_size=h,
            intermediate_size=dims.intermediate,
            num_hidden_layers=dims.layers,
            num_attention_heads=n,
            num_key_value_heads=n,
            max_position_embeddings=max_pos,
            attention_dropout=dropout,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt2":
        return dict(
            vocab_size=v,
            n_embd=h,
            n_layer=dims.layers,
            n_head=n,
            n_positions=max_pos,
            attn_pdrop=dropout,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "bloom":
        return dict(
            vocab_size=v,
            hidden_size=h,
            n_layer=dims.layers,
            n_head=n,
            attention_dropout=dropout,
            hidden_dropout=dropout,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if family == "bart":
        return dict(
            vocab_size=v,
            d_model=h,
            encoder_layers=dims.layers,
            decoder_layers=dims.layers,
            encoder_attention_heads=n,
            decoder_attention_heads=n,
            encoder_ffn_dim=4 * h,
            decoder_ffn_dim=4 * h,
            max_position_embeddings=max_pos,
            dropout=dropout,
            attention_dropout=dropout,
            activation_dropout=dropout,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    if family == "qwen":
        return dict(
            vocab_size=v,
            hidden_size=h,
            num_hidden_layers=dims.layers,
            num_attention_heads=n,
            kv_channels=h // n,
            intermediate_size=dims.intermediate,
            max_position_embeddings=max_pos,
            seq_length=max_pos,
            emb_dropout_prob=dropout,
            attn_dropout_prob=dropout,
            use_flash_attn="auto",
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            fp32=dtype == torch.float32,
        )
    raise ValueError(f"unknown family {family!r}")


class ModelFactory:
    """Builds stock models from a config and ours through trust_remote_code from a folder of our files."""

    def __init__(self, device: torch.device, flex_static_shapes: int):
        self.device = device
        self.flex_static_shapes = flex_static_shapes
        self.root = Path(tempfile.mkdtemp(prefix="mea-bench-models-"))

    def config(self, family: str, kwargs: dict, ours: bool):
        import transformers

        if not ours:
            if family not in STOCK_CONFIG:
                raise ValueError(f"{family} has no stock transformers class (not supported)")
            return getattr(transformers, STOCK_CONFIG[family])(**kwargs)
        # ours are loaded as users load them: copied next to a config.json whose auto_map points at them
        folder = self.root / f"mea_bench_{family}"
        folder.mkdir(parents=True, exist_ok=True)
        if family in STOCK_CONFIG:
            getattr(transformers, STOCK_CONFIG[family])(**kwargs).save_pretrained(folder)
        else:
            data = {
                "model_type": families.FAMILIES[family].model_type,
                "architectures": [families.main_entry(family).class_name],
                **kwargs,
            }
            (folder / "config.json").write_text(json.dumps(data, indent=2))
        families.write_remote_code(folder, family)
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)

    def build(self, family: str, impl: str, kwargs: dict, dtype: torch.dtype):
        """``impl`` is ``stock:<attn_implementation>`` or ``ours:<attn_backend>``."""
        import transformers

        kind, name = impl.split(":", 1)
        ours = kind == "ours"
        config = self.config(family, kwargs, ours)
        auto = getattr(transformers, families.main_entry(family).auto_class)
        torch.manual_seed(0)
        with torch.device(self.device):
            if ours:
                config.attn_backend = name
                model = auto.from_config(config, trust_remote_code=True, dtype=dtype)
                if not type(model).__module__.startswith("transformers_modules"):
                    raise RuntimeError(f"expected our class through trust_remote_code, got {type(model).__module__}")
                sys.modules[type(model).__module__].set_flex_static_shapes(self.flex_static_shapes)
            else:
                model = auto.from_config(config, attn_implementation=name, dtype=dtype)
        return model.to(self.device)


def matmul_weights(model, family: str) -> dict:
    """Weights of every matmul layer, split into encoder (BART) and the rest; embeddings are lookups."""
    conv1d = None
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D as conv1d
    counts = {"encoder": 0, "decoder": 0}
    for name, module in model.named_modules():
        is_matmul = isinstance(module, torch.nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
        if not is_matmul:
            continue
        part = "encoder" if family == "bart" and ".encoder." in f".{name}." else "decoder"
        counts[part] += module.weight.numel()
    return counts


def attention_geometry(model, family: str) -> tuple:
    """(layers, d_attn) of the self-attention stack(s); BART: (encoder layers, decoder layers, d_attn)."""
    c = model.config
    if family == "bart":
        return c.encoder_layers, c.decoder_layers, c.d_model
    if family == "gpt2":
        return c.n_layer, c.n_embd
    if family == "bloom":
        return c.n_layer, c.hidden_size
    if family == "qwen":
        return c.num_hidden_layers, c.num_attention_heads * c.kv_channels
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_attention_heads * head_dim


def attention_forward_flops(model, family: str, batch: int, seq: int, tgt: Optional[int] = None) -> float:
    if family == "bart":
        enc_layers, dec_layers, d = attention_geometry(model, family)
        return 4.0 * batch * d * (enc_layers * seq * seq + dec_layers * (0.5 * tgt * tgt + tgt * seq))
    layers, d = attention_geometry(model, family)
    return 4.0 * batch * d * layers * 0.5 * seq * seq


def training_flops(model, family: str, batch: int, seq: int, tgt: Optional[int]) -> float:
    w = matmul_weights(model, family)
    if family == "bart":
        tokens_mm = w["encoder"] * batch * seq + w["decoder"] * batch * tgt
    else:
        tokens_mm = w["decoder"] * batch * seq
    return 6.0 * tokens_mm + 3.0 * attention_forward_flops(model, family, batch, seq, tgt)


def prefill_flops(model, family: str, batch: int, seq: int) -> float:
    w = matmul_weights(model, family)
    if family == "bart":
        return 2.0 * (w["encoder"] * batch * seq + w["decoder"] * batch) + attention_forward_flops(
            model, family, batch, seq, 1
        )
    return 2.0 * w["decoder"] * batch * seq + attention_forward_flops(model, family, batch, seq)


def half_precision(model) -> bool:
    """MFU is against the bf16/fp16 tensor-core peak; for fp32 runs (the light table) it is not reported."""
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


def random_ids(vocab: int, batch: int, seq: int, device) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, seq), device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


# ----------------------------------------------------------------------------------------------
# One configuration, shared by the train-like sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ImplState:
    """What one implementation's earlier configurations tell about the next ones."""

    exponent: float = 2.0  # time ~ size**exponent (2 for tokens: attention-bound worst case)
    oom_at: Optional[int] = None  # smallest size that ran out of memory
    unsupported: Optional[str] = None
    timed_out: Optional[str] = None
    last_size: Optional[int] = None
    last_ms: Optional[float] = None

    def predicted_ms(self, size: int) -> Optional[float]:
        if self.last_ms is None or not self.last_size:
            return None
        return self.last_ms * (size / self.last_size) ** self.exponent


def pre_check(bench: Bench, record: dict, state: ImplState, tokens: int, calls: int) -> Optional[dict]:
    """A record to write instead of running (implied OOM, unsupported, too slow, out of budget), or None."""
    if state.unsupported is not None:
        return {**record, "status": "unsupported", "error": state.unsupported, "implied": True}
    if state.timed_out is not None:
        return {
            **record,
            "status": "skipped",
            "error": f"an earlier configuration timed out: {state.timed_out}",
            "implied": True,
        }
    if state.oom_at is not None and tokens >= state.oom_at:
        return {**record, "status": "oom", "error": "implied by a smaller configuration's OOM", "implied": True}
    predicted = state.predicted_ms(tokens)
    if predicted is not None:
        cost_s = calls * predicted / 1e3
        if cost_s > bench.args.max_config_s:
            return {
                **record,
                "status": "skipped",
                "error": f"predicted {cost_s:.0f} s > --max-config-s {bench.args.max_config_s:.0f}",
            }
        if cost_s > bench.remaining():
            return {**record, "status": "skipped", "error": "time budget (--budget-s) spent"}
    elif bench.remaining() < bench.args.first_config_s:
        # nothing known about this implementation yet: its first call may compile for a minute
        return {**record, "status": "skipped", "error": "time budget (--budget-s) spent"}
    return None


def describe(record: dict) -> str:
    parts = [f"[{record['section']}]", record.get("family") or "", record["impl"]]
    if record.get("head_dim"):
        parts.append(f"d={record['head_dim']} {record.get('mask')} {record.get('mode')}")
    parts.append(f"seq={record.get('seq')}")
    if record.get("tgt_len"):
        parts.append(f"tgt={record['tgt_len']}")
    parts.append(f"b={record.get('batch')}")
    return " ".join(p for p in parts if p)


def summary(record: dict, bench: Bench) -> str:
    if record["status"] != "ok":
        return f"{describe(record)}: {record['status'].upper()} {record.get('error') or ''}".rstrip()
    bits = []
    for key, unit, scale, digits in (
        ("step_ms", " ms", 1, 1),
        ("ms", " ms", 1, 3),
        ("peak_mem_mb", " GB", 1 / 1024, 2),
        ("tokens_per_s", " tok/s", 1, 0),
        ("tflops", " TFLOP/s", 1, 1),
        ("prefill_ms", " ms prefill", 1, 1),
        ("decode_tokens_per_s", " tok/s decode", 1, 0),
    ):
        if record.get(key) is not None:
            bits.append(f"{record[key] * scale:,.{digits}f}{unit}")
    if record.get("mfu") is not None:
        bits.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("overhead_pct") is not None:
        bits.append(f"overhead {record['overhead_pct']:+.1f}% vs {record['reference']}")
    return f"{describe(record)}: " + ", ".join(bits) + f"  [{bench.elapsed():.0f} s]"


def finish(bench: Bench, record: dict, state: Optional[ImplState] = None, tokens: Optional[int] = None) -> dict:
    written = bench.rec.write(record)
    bench.rec.say(summary(written, bench))
    if state is not None and not record.get("implied"):
        if record["status"] == "oom" and tokens is not None:
            state.oom_at = tokens if state.oom_at is None else min(state.oom_at, tokens)
        elif record["status"] == "unsupported":
            state.unsupported = record.get("error")
        elif record["status"] == "timeout":
            state.timed_out = f"seq {record.get('seq')}"
    return written


def run_guarded(bench: Bench, record: dict, body: Callable[[], dict]) -> dict:
    """Run ``body`` under the per-configuration time limit; turn an exception into a status."""
    limit = (
        min(bench.args.config_timeout_s, max(20.0, bench.remaining() + 30.0)) if bench.args.config_timeout_s > 0 else 0
    )
    try:
        with time_limit(limit):
            result = body()
        return {**record, "status": "ok", **result}
    except Exception as error:  # one failing configuration must not stop the run
        record = {**record, "status": classify(error), "error": short_error(error)}
        if record["status"] == "error":
            bench.rec.log_only(f"{describe(record)}\n{traceback.format_exc()}")
    bench.clean()  # after the except block, so the traceback's frames (and their tensors) are gone
    return record


# ----------------------------------------------------------------------------------------------
# Section: train (and compare, light)
# ----------------------------------------------------------------------------------------------


def build_model(bench: Bench, family: str, impl: str, kwargs: dict, dtype: torch.dtype) -> dict:
    return {"model": bench.factory.build(family, impl, kwargs, dtype)}


def train_step_fn(model, inputs: dict, optimizer) -> Callable[[], torch.Tensor]:
    def step():
        loss = model(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def profile_label(
    args: argparse.Namespace, section: str, family: str, impl: str, seq: int, batch: int
) -> Optional[str]:
    """The name of a configuration's profile table, or None without --profile."""
    return f"{section}-{family}-{impl.replace(':', '_')}-{seq}-b{batch}" if args.profile else None


def profile_call(bench: Bench, fn: Callable[[], object], name: str) -> dict:
    """``fn`` once more under torch.profiler: its busiest host and device ops go to ``<out>/profile-<name>.txt``.

    Device busy time well under the wall time means the GPU waits on the host (Python, dispatch, guards).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.is_cuda else [])
    bench.sync()
    begin = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        bench.sync()
    wall_ms = 1e3 * (time.perf_counter() - begin)
    events = prof.key_averages()
    kernels = [event for event in events if event.device_type != torch.autograd.DeviceType.CPU]
    device_ms = sum(event.self_device_time_total for event in kernels) / 1e3
    path = bench.rec.out_dir / f"profile-{name}.txt"
    tables = [f"{name}: wall {wall_ms:.1f} ms under the profiler, device busy {device_ms:.1f} ms"]
    for key in ("self_cpu_time_total", "self_device_time_total"):
        tables.append(f"\n-- sorted by {key}\n" + events.table(sort_by=key, row_limit=25, max_name_column_width=70))
    path.write_text("\n".join(tables) + "\n", encoding="utf-8")
    return {"profile_wall_ms": wall_ms, "profile_device_ms": device_ms, "profile_file": path.name}


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
    flops = training_flops(model, family, batch, seq, tgt)
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
        "tflops": flops / (ms / 1e3) / 1e12,
        "mfu": (flops / (ms / 1e3) / 1e12) / bench.peak_tflops if bench.peak_tflops and half_precision(model) else None,
        "loss": loss,
        "optimizer": bench.args.optimizer,
    }
    if profile_name is not None:
        result.update(profile_call(bench, step, profile_name))
    return result


def record_loss(step: Callable[[], torch.Tensor], losses: list) -> None:
    losses.append(step())


def train_impls(bench: Bench, family: str) -> list:
    stock = []
    if family in STOCK_CONFIG:
        stock = ["stock:sdpa", "stock:eager"]
        if bench.is_cuda or bench.args.cpu_flex:
            stock.append("stock:flex_attention")
        if bench.is_cuda and importlib.util.find_spec("flash_attn") is not None:
            stock.append("stock:flash_attention_2")
    ours = ["ours:auto"] + [f"ours:{b}" for b in bench.our_backends()]
    impls = [i for i in IMPL_ORDER if i in stock + ours] + [i for i in stock + ours if i not in IMPL_ORDER]
    return select_impls(bench, impls)


def select_impls(bench: Bench, impls: list) -> list:
    wanted = bench.args.impl
    if not wanted:
        return impls
    if "core" in wanted:
        wanted = [w for w in wanted if w != "core"] + list(CORE_IMPLS)
    return [i for i in impls if i in wanted]


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
    args = bench.args
    tgt_for = (lambda seq: min(args.bart_tgt, seq)) if family == "bart" else (lambda seq: None)
    max_pos = next_pow2(max(max(seqs), 1024))
    kwargs = config_kwargs(family, dims, max_pos, dropout, dtype)
    for impl in impls:
        state = ImplState()
        impl_kwargs = dict(kwargs)
        impl_name = impl
        if extra_config and impl in extra_config:
            impl_name, config_extra = extra_config[impl]
            impl_kwargs.update(config_extra)
        model = None
        build_error = None
        for batch in batches:
            for seq in seqs:
                tgt = tgt_for(seq)
                tokens = batch * (seq + (tgt or 0))
                record = {
                    "section": section,
                    "family": family,
                    "impl": impl,
                    "seq": seq,
                    "tgt_len": tgt,
                    "batch": batch,
                    "dtype": str(dtype).replace("torch.", ""),
                    **(extra_record or {}),
                }
                if bench.rec.is_done(record):
                    continue
                skip = pre_check(bench, record, state, tokens, args.warmup + args.iters)
                if skip is not None:
                    finish(bench, skip, state, tokens)
                    continue
                if build_error is not None:
                    finish(bench, {**record, **build_error, "implied": True}, state, tokens)
                    continue
                if model is None:
                    built = run_guarded(
                        bench, record, functools.partial(build_model, bench, family, impl_name, impl_kwargs, dtype)
                    )
                    if built["status"] != "ok":
                        build_error = {"status": built["status"], "error": "model build: " + (built.get("error") or "")}
                        finish(bench, {**record, **build_error}, state, tokens)
                        continue
                    model = built.pop("model")
                    n_params = sum(p.numel() for p in model.parameters())
                record["n_params"] = n_params
                profile_name = profile_label(args, section, family, impl, seq, batch)
                measure = functools.partial(
                    measure_train,
                    bench,
                    model,
                    family,
                    batch,
                    seq,
                    tgt,
                    dims.vocab,
                    args.warmup,
                    args.iters,
                    profile_name,
                )
                result = run_guarded(bench, record, measure)
                if result["status"] == "ok":
                    state.last_size, state.last_ms = tokens, result["step_ms"]
                finish(bench, result, state, tokens)
        del model
        bench.clean()


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
        )
        bench.rec.write_markdown()


def run_compare(bench: Bench) -> None:
    """BLOOM (ours, auto; stock eager) against a same-size LLaMA (stock sdpa; ours auto): issue 4's targets."""
    args = bench.args
    seqs, batches = args.seq_for("compare"), [1]
    plan = [("bloom", ["stock:eager", "ours:auto"]), ("llama", ["stock:sdpa", "ours:auto"])]
    for family, impls in plan:
        impls = select_impls(bench, impls) if args.impl else impls
        bench.rec.say(f"== compare {family}: {', '.join(impls)}")
        run_train_family(bench, "compare", family, impls, seqs, batches, bench.dims[family], bench.dtype)
    bench.rec.write_markdown()
    records = bench_report.latest(bench_report.load_records([bench.rec.path]))
    for seq in seqs:
        for target, measured, met in bench_report.target_rows(records, seq):
            bench.rec.say(f"target @ {seq}: {target}: {measured} -> {met}")


LIGHT_CORE = ("stock:eager", "ours:eager", "ours:eager+lightsoftmax+dropmatmul", "ours:auto")


def run_light(bench: Bench) -> None:
    """The Light Attention table: GPT-2 small in fp32 with dropout 0.1 in training mode."""
    spec = LIGHT_TINY if bench.tiny else LIGHT_FULL
    dims = Dims(spec["layers"], spec["hidden"], spec["heads"], spec["vocab"])
    plain = {"use_lightsoftmax": False, "use_dropmatmul": False}
    variants = {
        "stock:eager": ("stock:eager", {}),
        "stock:sdpa": ("stock:sdpa", {}),
        "ours:eager": ("ours:eager", plain),
        "ours:eager+lightsoftmax": ("ours:eager", {"use_lightsoftmax": True, "use_dropmatmul": False}),
        "ours:eager+dropmatmul": ("ours:eager", {"use_lightsoftmax": False, "use_dropmatmul": True}),
        "ours:eager+lightsoftmax+dropmatmul": ("ours:eager", {"use_lightsoftmax": True, "use_dropmatmul": True}),
        "ours:auto": ("ours:auto", plain),
        "ours:chunked": ("ours:chunked", plain),
    }
    wanted = bench.args.impl or list(variants)
    if "core" in wanted:
        wanted = list(wanted) + list(LIGHT_CORE)
    impls = [name for name in variants if name in wanted]
    bench.rec.say(f"== light gpt2: {', '.join(impls)}")
    run_train_family(
        bench,
        "light",
        "gpt2",
        impls,
        [spec["seq"]],
        [spec["batch"]],
        dims,
        torch.float32,
        dropout=spec["dropout"],
        extra_config=variants,
        extra_record={"layers": spec["layers"], "hidden": spec["hidden"], "dropout": spec["dropout"]},
    )
    bench.rec.write_markdown()


# ----------------------------------------------------------------------------------------------
# Section: infer
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
            state = ImplState(exponent=1.0)
            model, build_error = None, None
            for batch in batches:
                for seq in seqs:
                    tokens = batch * seq
                    record = {
                        "section": "infer",
                        "family": family,
                        "impl": impl,
                        "seq": seq,
                        "batch": batch,
                        "dtype": str(bench.dtype).replace("torch.", ""),
                    }
                    if bench.rec.is_done(record):
                        continue
                    skip = pre_check(bench, record, state, tokens, 1)
                    if skip is not None:
                        finish(bench, skip, state, tokens)
                        continue
                    if build_error is not None:
                        finish(bench, {**record, **build_error, "implied": True}, state, tokens)
                        continue
                    if model is None:
                        built = run_guarded(
                            bench, record, functools.partial(build_model, bench, family, impl, kwargs, bench.dtype)
                        )
                        if built["status"] != "ok":
                            build_error = {
                                "status": built["status"],
                                "error": "model build: " + (built.get("error") or ""),
                            }
                            finish(bench, {**record, **build_error}, state, tokens)
                            continue
                        model = built.pop("model")
                    profile_name = profile_label(args, "infer", family, impl, seq, batch)
                    measure = functools.partial(
                        measure_infer, bench, model, family, batch, seq, dims.vocab, args.new_tokens, profile_name
                    )
                    result = run_guarded(bench, record, measure)
                    if result["status"] == "ok":  # what the next, larger configuration may cost
                        state.last_size = tokens
                        state.last_ms = result["prefill_ms"] * (args.prefill_iters + 2) + result["decode_ms"] * 1.2
                    finish(bench, result, state, tokens)
            del model
            bench.clean()
        bench.rec.write_markdown()


# ----------------------------------------------------------------------------------------------
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
    dtype = str(bench.dtype).replace("torch.", "")
    for impl in impls:
        record = {
            "section": "kernel",
            "family": None,
            "impl": impl,
            "seq": seq,
            "batch": batch,
            "heads": heads,
            "head_dim": head_dim,
            "mask": mask,
            "mode": mode,
            "dtype": dtype,
        }
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


# ----------------------------------------------------------------------------------------------
# Environment and command line
# ----------------------------------------------------------------------------------------------


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


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
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
    p.add_argument("--exclude-backends", type=str_list, default=[], help="our backends to leave out, e.g. xformers")
    p.add_argument("--head-dim", type=int_list, default=None, help="kernel head dims (default 128,64)")
    p.add_argument("--kernel-masks", type=str_list, default=["causal", "alibi"])
    p.add_argument("--kernel-modes", type=str_list, default=["fwdbwd", "fwd"])
    p.add_argument("--kernel-tokens", type=int, default=None, help="batch x seq of a kernel call (default 32768)")
    p.add_argument("--bart-tgt", type=int, default=1024, help="BART target length (capped at the source length)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps in infer (default 128)")
    p.add_argument(
        "--optimizer", choices=["none", "adamw"], default="none", help="add an AdamW step to the training step"
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
    runners = {"kernel": run_kernel, "light": run_light, "compare": run_compare, "train": run_train, "infer": run_infer}
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
    return 0


if __name__ == "__main__":
    gc.freeze()  # what is imported stays: later collections only walk what the benchmark creates
    sys.exit(main())
