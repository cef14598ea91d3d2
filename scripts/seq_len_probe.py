"""The search for the longest sequence that trains (``train.py --max-seq-len-probe``) and the step it times;
``long_context_probe.py`` shares the helpers."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def probe_step(model, optimizer, seq_len: int, vocab_size: int, device: torch.device, args: argparse.Namespace):
    """One training step on one random sequence of ``seq_len`` tokens (repeated once, and timed, when the first
    took under 10 s, so that one-time set-up does not count); its time, tokens/s and peak memory."""
    ids = torch.randint(vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(args.seed)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = 0.0
    for _ in range(2):
        synchronize(device)
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step_s = time.perf_counter() - started
        if step_s >= 10.0:
            break
    record = {"seq_len": seq_len, "ok": True, "loss": loss.item(), "step_s": round(step_s, 3),
              "tokens_per_s": round(seq_len / step_s, 1)}  # fmt: skip
    if device.type == "cuda":
        record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return record


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predicted_step_s(trials: list[dict], seq_len: int) -> float | None:
    """Step time at ``seq_len`` from a fit ``a*n + b*n^2`` (a, b >= 0) to the trials that trained."""
    done = [(trial["seq_len"], trial["step_s"]) for trial in trials if trial["ok"]]
    if not done:
        return None
    lengths = np.array([n for n, _ in done], dtype=np.float64)
    times = np.array([s for _, s in done], dtype=np.float64)
    if len(done) == 1:
        return float(times[0] * seq_len / lengths[0])
    (a, b), *_ = np.linalg.lstsq(np.stack([lengths, lengths**2], axis=1), times, rcond=None)
    a, b = max(a, 0.0), max(b, 0.0)
    return float(a * seq_len + b * seq_len**2) or float(times.max() * seq_len / lengths.max())


class SeqLenProbe:
    """Doubles the length until a step fails, then bisects; every trial goes to ``path`` as it finishes."""

    def __init__(self, run_step, cleanup, args: argparse.Namespace, path: Path, info: dict):
        self.run_step, self.cleanup, self.args, self.path = run_step, cleanup, args, path
        self.result = {**info, "status": "running", "trials": [], "max_seq_len": None, "best": None}

    def trial(self, seq_len: int) -> bool:
        limit = self.args.probe_time_limit
        predicted = predicted_step_s(self.result["trials"], seq_len)
        if limit is not None and predicted is not None and predicted > limit:
            error = f"predicted step time {predicted:.0f} s > {limit:.0f} s"
            record = {"seq_len": seq_len, "ok": False, "error": error}
        else:
            try:
                record = self.run_step(seq_len)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                record = {"seq_len": seq_len, "ok": False, "error": "out of memory"}
            self.cleanup()  # here, not in the except clause, whose traceback still holds the step's tensors
            if record["ok"] and limit is not None and record["step_s"] > limit:
                record = {**record, "ok": False, "error": f"step took {record['step_s']:.0f} s > {limit:.0f} s"}
        self.result["trials"].append(record)
        if record["ok"] and seq_len > (self.result["max_seq_len"] or 0):
            self.result["max_seq_len"], self.result["best"] = seq_len, record
        self.write()
        return record["ok"]

    def run(self) -> dict:
        resolution = self.args.probe_resolution
        good, bad, length = 0, None, self.args.seq_len
        while length <= self.args.probe_max_seq_len and bad is None:
            if self.trial(length):
                good, length = length, length * 2
            elif good == 0 and length > resolution:
                length = max(resolution, length // 2 // resolution * resolution)
            else:
                bad = length
        while bad is not None and bad - good > resolution:
            middle = (good + bad) // 2 // resolution * resolution
            if middle <= good:
                break
            good, bad = (middle, bad) if self.trial(middle) else (good, middle)
        self.result["status"] = "done"
        self.write()
        return self.result

    def write(self) -> None:
        self.path.write_text(json.dumps(self.result, indent=2))
