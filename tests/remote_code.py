"""Helpers that put our modeling files next to a saved checkpoint and load it as a user would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"


def save_with_remote_code(model, folder: Path, files: list[str], auto_map: dict[str, str]) -> Path:
    """Save ``model`` with ``save_pretrained``, copy our ``files`` beside it and point ``auto_map`` at them."""
    folder = Path(folder)
    model.save_pretrained(folder)
    for name in files:
        shutil.copy(MODELING_DIR / name, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def left_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    """A [batch, total] keep-mask with ``total - length`` padding positions on the left of each row."""
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, total - length :] = 1
    return mask


def right_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask
