"""The original adapter's import paths, kept so that scripts written for it run unchanged.

``memory_efficient_adapter.models.<family>.flash_attn_patch`` for ``llama``, ``bloom``, ``bart`` and ``qwen``
holds ``apply_attention_patch`` and ``remove_attention_patch``: thin aliases of ``memory_efficient_adapter.patch``.
Called without a model, ``apply_attention_patch()`` patches that family's classes: its models created
afterwards (and, for BLOOM, existing ones too) run attention on the kernel layer. Called with a model, it
patches that model, as ``memory_efficient_adapter.apply_attention_patch(model)`` does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .. import patch


def family_patch(family: str) -> tuple[Callable, Callable]:
    """The ``apply_attention_patch`` / ``remove_attention_patch`` pair of one family's seed module."""

    def apply_attention_patch(model: nn.Module | None = None, backend: str = "auto") -> nn.Module | None:
        if model is not None:
            return patch.apply_attention_patch(model, backend=backend)
        return patch.apply_attention_patch(backend=backend, families=[family])

    def remove_attention_patch(model: nn.Module | None = None) -> nn.Module | None:
        return patch.remove_attention_patch(model)

    apply_attention_patch.__doc__ = (
        f"Without a model: {family} models created from now on (stock transformers classes, and ours loaded "
        f"with trust_remote_code) run attention on the kernel layer with ``backend``"
        + (" (and BLOOM's attention class itself, so existing BLOOM models too)" if family == "bloom" else "")
        + ". With a model: patch that model in place and return it. Undo with remove_attention_patch."
    )
    remove_attention_patch.__doc__ = "Undo apply_attention_patch: for ``model``, or without one the class-level patch."
    return apply_attention_patch, remove_attention_patch
