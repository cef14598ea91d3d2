"""What an impl name means: ``stock:<attn_implementation>[+liger][+compile|+cudagraphs]``,
``ours:<backend>[+compile|+cudagraphs]``, or ``base:<backend>[+compile|+cudagraphs]``: our files from the folder
that ``--baseline-modeling`` names (e.g. an earlier commit's ``modeling/``, checked out with ``git archive``), to
measure a change against the code before it.

``+liger`` applies Liger-Kernel's patcher for the family (``liger_kernel.transformers.apply_liger_kernel_to_llama``:
RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy) before the stock model is built. Liger patches the
transformers module itself, so the patch is undone once the model is dropped (LigerPatch.undo), and the stock
impls measured afterwards are stock again. ``+compile`` calls ``model.compile()`` (torch.compile in place);
``+cudagraphs`` calls ``model.compile(mode="reduce-overhead")``, which replays each compiled graph as a CUDA graph
(what a host-bound short step can use).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Callable

KINDS = ("stock", "ours", "base")
MODIFIERS = ("liger", "compile", "cudagraphs")
# families with a Liger-Kernel patcher, and the transformers module it patches
LIGER_PATCHERS = {"llama": ("apply_liger_kernel_to_llama", "transformers.models.llama.modeling_llama")}


@dataclass(frozen=True)
class Impl:
    kind: str  # "stock", "ours" or "base" (ours from the baseline folder)
    attention: str  # stock: attn_implementation; ours and base: attn_backend
    liger: bool = False
    compile: bool = False
    cudagraphs: bool = False

    @property
    def ours(self) -> bool:
        """Our files (the current ones or the baseline's), loaded through trust_remote_code."""
        return self.kind in ("ours", "base")


def parse_impl(name: str) -> Impl:
    """``stock:sdpa+liger`` -> Impl("stock", "sdpa", liger=True); a clear ValueError for anything else."""
    kind, sep, rest = name.partition(":")
    attention, *modifiers = rest.split("+")
    if not sep or kind not in KINDS or not attention:
        raise ValueError(
            f"impl {name!r}: expected stock:<attn_implementation>, ours:<backend> or base:<backend>, then +modifiers"
        )
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown or len(set(modifiers)) != len(modifiers):
        raise ValueError(f"impl {name!r}: modifiers are {', '.join('+' + m for m in MODIFIERS)}, each at most once")
    if kind != "stock" and "liger" in modifiers:
        raise ValueError(f"impl {name!r}: +liger patches stock transformers classes only, not ours (not supported)")
    if "compile" in modifiers and "cudagraphs" in modifiers:
        raise ValueError(f"impl {name!r}: +cudagraphs compiles the model already; name one of +compile, +cudagraphs")
    return Impl(kind, attention, "liger" in modifiers, "compile" in modifiers, "cudagraphs" in modifiers)


def import_liger():
    """liger_kernel.transformers, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("liger_kernel.transformers")
    except ImportError as error:
        raise ImportError(
            f"liger_kernel is not installed ({error}): `pip install liger-kernel` (it needs a CUDA build of torch "
            "and Triton) to measure the stock:<attn>+liger impls"
        ) from error


class ModuleState:
    """A module's globals and the attributes of the classes it defines, to put back what a patcher changed."""

    def __init__(self, module: types.ModuleType):
        self.module = module
        self.globals = dict(vars(module))
        self.classes = {
            name: dict(vars(value))
            for name, value in self.globals.items()
            if isinstance(value, type) and value.__module__ == module.__name__
        }

    def restore(self) -> None:
        namespace = vars(self.module)
        for name in [n for n in namespace if n not in self.globals]:
            delattr(self.module, name)
        for name, value in self.globals.items():
            if namespace.get(name) is not value:
                setattr(self.module, name, value)
        for name, attributes in self.classes.items():
            cls = self.globals[name]
            for attr in [a for a in vars(cls) if a not in attributes]:
                delattr(cls, attr)
            for attr, value in attributes.items():
                if attr not in ("__dict__", "__weakref__") and vars(cls).get(attr) is not value:
                    setattr(cls, attr, value)


def apply_liger(family: str) -> Callable[[], None]:
    """Apply Liger-Kernel's patcher for ``family``'s stock classes; returns the function that undoes it."""
    if family not in LIGER_PATCHERS:
        raise ValueError(f"Liger-Kernel has no patcher for {family} (not supported); it has one for llama")
    patcher_name, module_name = LIGER_PATCHERS[family]
    patcher = getattr(import_liger(), patcher_name)
    state = ModuleState(importlib.import_module(module_name))
    try:
        patcher()
    except BaseException:
        state.restore()
        raise
    return state.restore
