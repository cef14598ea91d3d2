"""Profiling (--profile): one more call of a measured configuration under torch.profiler, its tables to a file."""

from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch

from .core import Bench


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
