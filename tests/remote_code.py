"""Helpers that put our modeling files next to a saved checkpoint and load it as a user would."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# MODELING_DIR: test files import it from here
from memory_efficient_adapter.families import MODELING_DIR, copy_modeling_files, set_auto_map  # noqa: F401

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def save_with_remote_code(model, folder: Path, files: list[str], auto_map: dict[str, str]) -> Path:
    """Save ``model`` with ``save_pretrained``, copy our ``files`` beside it and point ``auto_map`` at them.

    Tests name the files and classes they load (a subset of the family's, or stand-ins of their own);
    ``memory_efficient_adapter.families.write_remote_code`` writes a family's whole set."""
    folder = Path(folder)
    model.save_pretrained(folder)
    copy_modeling_files(folder, files)
    set_auto_map(folder, auto_map)
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


def first_row_direction(tensor: torch.Tensor) -> torch.Tensor:
    """A direction on the first row of ``tensor`` ``[batch, seq, hidden]``, zeros elsewhere: what a hook that
    treats the rows apart (steering one row) adds."""
    first_row = torch.zeros_like(tensor[..., :1])
    first_row[0] = 1.0
    return first_row * torch.linspace(-1.0, 1.0, tensor.shape[-1], dtype=tensor.dtype, device=tensor.device)
