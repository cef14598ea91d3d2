"""Resuming scripts/train.py runs: what a checkpoint records about its run, which checkpoint to resume from,
and a loss log that is never truncated."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


class TrainError(ValueError):
    """A run that cannot start as asked (arguments, data, checkpoints); reported without a traceback."""


def run_identity(args: argparse.Namespace, world_size: int) -> dict:
    """What a checkpoint must share with the run that resumes it (recorded in state.json)."""
    if args.model:
        model = str(Path(args.model).resolve())
    else:
        model = (f"tiny {args.tiny_config} (hidden {args.tiny_hidden}, layers {args.tiny_layers}, heads "
                 f"{args.tiny_heads}, vocab {args.tiny_vocab}, seed {args.seed})")
    return {
        "model": model,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "data": "synthetic" if args.synthetic else str(Path(args.data).resolve()),
        "seed": args.seed,
        "world_size": world_size,
        "pack": args.pack,
        "lora": f"rank {args.lora_rank}, alpha {args.lora_alpha}, targets {args.lora_targets}" if args.lora else None,
        "lr_schedule": f"lr {args.lr}, warmup {args.warmup}, min ratio {args.min_lr_ratio}",
    }


def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders, newest first."""
    steps = [
        (int(path.name.split("-")[1]), path)
        for path in output_dir.glob("checkpoint-*")
        if path.is_dir() and path.name.split("-")[1].isdigit()
    ]
    return [path for _, path in sorted(steps, reverse=True)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[0] if found else None


class Checkpoint:
    """A checkpoint read into memory: its step, state.json and the model and optimizer state dicts."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.state = json.loads((folder / "state.json").read_text())
        if not isinstance(self.state, dict) or not isinstance(self.state.get("step"), int):
            raise ValueError("state.json has no integer `step`")
        self.step = self.state["step"]
        self.model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        self.optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)

    def differences(self, identity: dict) -> list[str]:
        """How this checkpoint's run differs from ``identity`` (keys it does not record are not compared)."""
        return [f"{key}: {self.state[key]!r} in {self.folder.name}, {value!r} now"
                for key, value in identity.items() if key in self.state and self.state[key] != value]

    def restore(self, model, optimizer) -> int:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, self.model_state, options=options)
        set_optimizer_state_dict(model, optimizer, self.optimizer_state, options=options)
        return self.step


def checkpoint_to_resume(output_dir: Path, identity: dict) -> Checkpoint:
    """The newest readable checkpoint in ``output_dir``, which must come from the same run (``identity``)."""
    found = checkpoints(output_dir)
    if not found:
        raise TrainError(f"--resume: {output_dir} holds no checkpoint-<step> folder to resume from")
    unreadable = []
    for folder in found:
        try:
            checkpoint = Checkpoint(folder)
        except Exception as error:  # torch.load and json raise many types for a damaged file
            unreadable.append(f"{folder.name} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            print(f"train.py: {folder} is unreadable ({type(error).__name__}); trying an older checkpoint",
                  file=sys.stderr)
            continue
        if differences := checkpoint.differences(identity):
            raise TrainError(f"--resume: {folder} comes from a different run; resume with its settings or use a "
                             "new --output-dir:\n  " + "\n  ".join(differences))
        if unreadable:
            print(f"train.py: resuming from {folder.name}, the newest readable checkpoint (skipped: "
                  f"{', '.join(unreadable)})", file=sys.stderr)
        return checkpoint
    raise TrainError(f"--resume: no readable checkpoint in {output_dir}: " + "; ".join(unreadable))


def check_fresh_output(output_dir: Path) -> None:
    """A run without --resume must not overwrite another run's log and checkpoints."""
    earlier = [path.name for path in (output_dir / "loss.jsonl", latest_checkpoint(output_dir))
               if path is not None and path.exists()]
    if earlier:
        raise TrainError(f"{output_dir} already holds a run ({', '.join(earlier)}): pass --resume to continue it "
                         "or choose a new --output-dir")


class LossLog:
    """``loss.jsonl`` in the output folder. On resume, a log with steps past the checkpoint's is kept whole as
    ``loss.jsonl.before-resume-<step>``, and a copy of its lines up to the checkpoint continues (written to a
    temporary file and moved into place: the log is never truncated)."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled or not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if logged_step(line) is not None and logged_step(line) <= start_step]
        if kept == lines:
            return
        archive = path.with_name(f"{path.name}.before-resume-{start_step}")
        number = 1
        while archive.exists():
            number += 1
            archive = path.with_name(f"{path.name}.before-resume-{start_step}.{number}")
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        shutil.copyfile(path, archive)
        partial.replace(path)
        print(f"train.py: {path.name} had {len(lines) - len(kept)} line(s) past step {start_step}; the whole log "
              f"is kept as {archive.name}", file=sys.stderr)

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as log:
                log.write(json.dumps(record) + "\n")


def logged_step(line: str) -> int | None:
    """The step of a loss.jsonl line; None for a line that is not a complete record (a crash mid-write)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None
