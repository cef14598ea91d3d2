"""What every section shares: recording results, timing, memory, the time budget, and running one
configuration so that its failure becomes a status instead of stopping the run."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import bench_report
import torch

from . import MODELING_DIR, module_from_file
from .models import ModelFactory, family_dims, lora_adapter

FINAL = bench_report.FINAL_STATUSES


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
        self.dims = family_dims(self.tiny, args.vocab, args.layers, args.qwen_shape)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.device_name = torch.cuda.get_device_name(self.device) if self.is_cuda else platform.processor() or "cpu"
        self.peak_tflops = args.peak_tflops or (peak_bf16_tflops(self.device_name) if self.is_cuda else None)
        # every size of a sweep gets its own static-shape flex kernel, as in a run at one fixed size
        self.flex_static_shapes = args.dynamo_cache_limit // 2
        self.factory = ModelFactory(self.device, self.flex_static_shapes, args.baseline_modeling)
        self.factory.adapter = lora_adapter(args.lora, args.modules_to_save)
        self.factory.loss_chunk_size = args.loss_chunk_size
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


def config_record(
    section: str, family: Optional[str], impl: str, seq: int, batch: int, dtype: torch.dtype, **fields
) -> dict:
    """The fields that name one configuration (bench_report.KEY_FIELDS and what tables show)."""
    dtype_name = str(dtype).replace("torch.", "")
    return dict(section=section, family=family, impl=impl, seq=seq, batch=batch, dtype=dtype_name, **fields)


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


class ImplSweep:
    """One implementation over a section's sizes: its model is built once, on first use; a failed build is
    recorded for every size; what it measured predicts the cost of the next, larger size (ImplState)."""

    def __init__(self, bench: Bench, build: Callable[[], object], exponent: float = 2.0):
        self.bench = bench
        self.build = build
        self.state = ImplState(exponent=exponent)
        self.model = None
        self.n_params: Optional[int] = None
        self.build_error: Optional[dict] = None

    def run(
        self, record: dict, tokens: int, calls: int, measure: Callable[[object], dict], cost_ms: Callable[[dict], float]
    ) -> None:
        """Measure one configuration (``measure(model)``), or record why it is not run."""
        bench, state = self.bench, self.state
        if bench.rec.is_done(record):
            return
        skip = pre_check(bench, record, state, tokens, calls)
        if skip is None and self.build_error is not None:
            skip = {**record, **self.build_error, "implied": True}
        if skip is not None:
            finish(bench, skip, state, tokens)
            return
        if self.model is None and not self._build(record, tokens):
            return
        result = run_guarded(bench, {**record, "n_params": self.n_params}, functools.partial(measure, self.model))
        if result["status"] == "ok":
            state.last_size, state.last_ms = tokens, cost_ms(result)
        finish(bench, result, state, tokens)

    def _build(self, record: dict, tokens: int) -> bool:
        built = run_guarded(self.bench, record, lambda: {"model": self.build()})
        if built["status"] != "ok":
            self.build_error = {"status": built["status"], "error": "model build: " + (built.get("error") or "")}
            finish(self.bench, {**record, **self.build_error}, self.state, tokens)
            return False
        self.model = built.pop("model")
        self.n_params = sum(p.numel() for p in self.model.parameters())
        return True

    def close(self) -> None:
        """Drop the model and free its memory before the next implementation is built."""
        self.model = None
        self.bench.clean()
        self.bench.factory.release()
