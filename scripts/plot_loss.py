"""Plot loss logs of train.py runs on one PNG and summarize how far they are from the first one.

    python scripts/plot_loss.py runs/ours/loss.jsonl runs/eager/loss.jsonl --labels "ours (fused)" "stock eager" \
        --out docs/loss_parity.png [--max-diff 0.05]

Top panel: loss per step of every log; bottom panel: each log minus the first (the reference), smoothed over
``--window`` steps. Prints a JSON summary (final loss, mean/max absolute difference to the reference over
the shared steps, on the smoothed curves). With ``--max-diff`` the exit status is 1 when a smoothed
difference exceeds it, so scripts can gate on loss parity. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_log(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and losses of a ``loss.jsonl``, sorted by step (a later line for a step wins)."""
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            losses[int(record["step"])] = float(record["loss"])
    if not losses:
        raise ValueError(f"{path}: no steps logged (did the run fail?)")
    steps = np.array(sorted(losses), dtype=np.int64)
    return steps, np.array([losses[step] for step in steps], dtype=np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, values.size + 1) - window)]) / counts


def difference_to_reference(reference: dict, steps: np.ndarray, losses: np.ndarray, window: int):
    """Steps shared with the reference and the smoothed loss minus the smoothed reference loss there."""
    shared = [(step, value) for step, value in zip(steps.tolist(), smooth(losses, window)) if step in reference]
    return np.array([step for step, _ in shared]), np.array([value - reference[step] for step, value in shared])


def smoothed_reference(logs, window: int) -> dict:
    _, steps, losses = logs[0]
    return dict(zip(steps.tolist(), smooth(losses, window)))


def summarize(logs: list[tuple[str, np.ndarray, np.ndarray]], window: int) -> list[dict]:
    reference = smoothed_reference(logs, window)
    summary = []
    for label, steps, losses in logs:
        difference = np.abs(difference_to_reference(reference, steps, losses, window)[1])
        summary.append(
            {
                "label": label,
                "steps": int(steps[-1]),
                "final_loss": float(losses[-max(1, losses.size // 10) :].mean()),
                "mean_abs_diff": float(difference.mean()) if difference.size else float("nan"),
                "max_abs_diff": float(difference.max()) if difference.size else float("nan"),
            }
        )
    return summary


def plot(logs, window: int, out: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    reference = smoothed_reference(logs, window)
    for label, steps, losses in logs:
        line = top.plot(steps, losses, alpha=0.25, linewidth=0.8)[0]
        top.plot(steps, smooth(losses, window), color=line.get_color(), linewidth=1.6, label=label)
        bottom.plot(*difference_to_reference(reference, steps, losses, window), color=line.get_color())
    top.set_ylabel("training loss")
    top.legend()
    top.grid(alpha=0.3)
    if title:
        top.set_title(title)
    bottom.axhline(0.0, color="black", linewidth=0.6)
    bottom.set_ylabel(f"minus {logs[0][0]}")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="loss.jsonl files; the first is the reference")
    parser.add_argument("--labels", nargs="+", help="one label per log (default: the run folder names)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title")
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    parser.add_argument("--max-diff", type=float, help="exit 1 if a smoothed curve is further than this from the first")
    args = parser.parse_args(argv)
    labels = args.labels or [path.parent.name for path in args.logs]
    if len(labels) != len(args.logs):
        parser.error("give one label per log")
    logs = [(label, *read_log(path)) for label, path in zip(labels, args.logs)]
    plot(logs, args.window, args.out, args.title)
    summary = summarize(logs, args.window)
    print(json.dumps({"plot": str(args.out), "window": args.window, "runs": summary}, indent=2))
    if args.max_diff is not None and not all(run["max_abs_diff"] <= args.max_diff for run in summary):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
