"""In-process use of the kernel layer with stock transformers models.

Two ways in, both reversible, and the seeds' interfaces on top:

* **The attention registry.** ``register_attention_backends()`` (run when this module is imported) adds
  ``"mea"`` (the ``auto`` backend) and ``"mea_<backend>"`` for every backend in ``BACKENDS`` to transformers'
  ``AttentionInterface``, plus a mask function for the same names to ``AttentionMaskInterface``. Any model
  whose attention modules call the registry then runs on our kernels with
  ``from_pretrained(..., attn_implementation="mea")``, padded batches included. The mask function hands the
  attention function an O(n) padding keep-mask (``[batch, k_len]``) instead of a 4-D mask whenever the mask
  is plain causal or bidirectional attention plus padding; other patterns (sliding windows, packed sequences,
  static caches, custom overlays) get the 4-D boolean mask that ``sdpa`` would get.

* **Patching.** ``apply_attention_patch(model)`` switches a loaded model in place (weights untouched):
  registry-based models (LLaMA, GPT-2, BART and many more) get our registered implementation name in their
  configs; BLOOM, which has no registry, gets an instance-level ``forward`` on each ``BloomAttention`` that
  runs our modeling_bloom.py's ``BloomAttention`` (sharing the stock module's weights): one BLOOM code
  path. ``apply_attention_patch()`` without a model makes models created afterwards use our kernels.
  ``remove_attention_patch(...)`` undoes either exactly, so ``save_pretrained`` afterwards writes a stock
  checkpoint. The registry's other users, models that compute attention themselves, get the eager mask.

* **The seeds' interfaces.** ``transform(model, keep_original_model=True)`` / ``reverse(model)`` (also as
  ``BetterTransformer.transform`` / ``.reverse``) with optimum's meaning, and the original adapter's
  ``memory_efficient_adapter.models.<family>.flash_attn_patch.apply_attention_patch`` (``modeling/models/``),
  whose no-argument form is the class-level patch limited to that family.

Everything that differs between transformers versions (4.57, 5.0, 5.x) sits in the "Version-specific"
section below.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    BACKENDS, ForwardMask, alibi_slopes, attention, attention_options, attention_recording_weights, backend_from_config,
    cache_capacity, keep_mask_from_padding, recorded_weights,
)

__all__ = [
    "REGISTERED_NAMES",
    "BetterTransformer",
    "apply_attention_patch",
    "implementation_name",
    "register_attention_backends",
    "remove_attention_patch",
    "reverse",
    "transform",
]

# Registered attention implementation names and the kernel-layer backend each one requests.
REGISTERED_NAMES: dict[str, str] = {"mea": "auto", **{f"mea_{name}": name for name in BACKENDS}}


def implementation_name(backend: str = "auto") -> str:
    """The registered ``attn_implementation`` name of a kernel-layer backend (``"auto"`` -> ``"mea"``)."""
    if backend == "auto":
        return "mea"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    return f"mea_{backend}"


# ----------------------------------------------------------------------------------------------
# Version-specific: every difference between transformers 4.57, 5.0 and 5.x is handled here
# ----------------------------------------------------------------------------------------------


def _attention_interface():
    from transformers import AttentionInterface

    return AttentionInterface


def _mask_interface():
    """``AttentionMaskInterface`` (transformers >= 4.53), or None where there is no mask registry."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return None
    return AttentionMaskInterface


def _plain_mask_pattern(mask_function: Callable | None) -> str | None:
    """The pattern transformers asks for, "causal" or "bidirectional", when it is exactly that (no overlay)."""
    from transformers import masking_utils

    if mask_function is not None and mask_function is getattr(masking_utils, "causal_mask_function", None):
        return "causal"
    if mask_function is not None and mask_function is getattr(masking_utils, "bidirectional_mask_function", None):
        return "bidirectional"
    return None


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _stock_mask_function(implementation: str) -> Callable:
    """transformers' own mask function for "sdpa" or "eager" (4.57 picks the sdpa variant per torch version)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[implementation]


def _query_end(mask_kwargs: dict) -> int | None:
    """One past the absolute position of the last query, from the mask function's arguments.

    transformers >= 5.x passes ``q_length``/``q_offset``; 4.57 and 5.0 pass ``cache_position``. Returns None
    when it cannot be read without tracing a tensor (then the caller falls back to the 4-D mask).
    """
    if "q_length" in mask_kwargs:
        offset = mask_kwargs.get("q_offset", 0)
        if isinstance(offset, torch.Tensor):
            if _is_tracing():
                return None
            offset = int(offset)
        return offset + int(mask_kwargs["q_length"])
    cache_position = mask_kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0 and not _is_tracing():
        return int(cache_position[-1]) + 1
    return None


def _get_implementation(config) -> str | None:
    return getattr(config, "_attn_implementation_internal", None)


def _set_implementation(config, name: str | None) -> None:
    """Set one config's implementation only (the public setter would also recurse into sub-configs)."""
    config._attn_implementation_internal = name


def _is_init_check(args: tuple, kwargs: dict) -> bool:
    """``is_init_check`` of ``PreTrainedModel._check_and_adjust_attn_implementation`` (same place in 4.57-5.x)."""
    return bool(kwargs.get("is_init_check", args[0] if args else False))


def _bloom_attention_class() -> type | None:
    try:
        from transformers.models.bloom.modeling_bloom import BloomAttention
    except ImportError:
        return None
    return BloomAttention


def _bloom_pretrained_class() -> type | None:
    try:
        from transformers.models.bloom.modeling_bloom import BloomPreTrainedModel
    except ImportError:
        return None
    return BloomPreTrainedModel


# ----------------------------------------------------------------------------------------------
# From transformers' masks to the kernel layer's forms
# ----------------------------------------------------------------------------------------------


def _kernel_arguments(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, q_len: int):
    """Map the mask an attention function receives onto the kernel layer's ``causal`` flag and mask forms.

    * None: no mask; causal if ``is_causal`` (the caller's ``is_causal`` argument, else the module's flag),
      which is what it means to transformers' sdpa function. Like that function, a causal call with more keys
      than queries (a prefill into an empty static cache) sees only the first ``q_len`` key slots.
    * 2-D ``[batch, k_len]``: a padding keep-mask on causal attention (our mask function returns this form
      only for causal patterns; ``is_causal`` is ignored, as sdpa ignores it when given a mask).
    * 4-D bool ``[batch, 1, 1, k_len]``: a padding keep-mask for bidirectional attention.
    * Any other 4-D mask (bool or additive) already says which keys each query sees: passed as is.
    A mask in our mask function's ``ForwardMask`` is handed on as that object where no cut is needed.
    Returns ``(key, value, kernel_mask, causal)``.
    """
    k_len = key.shape[2]
    holder, mask = _forward_mask_parts(mask)
    if mask is None:
        if is_causal and 1 < q_len < k_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        return key, value, holder, is_causal
    if mask.dim() == 2:
        return key, value, _as_given(holder, mask, k_len, mask[:, -k_len:].bool()), True
    if mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1:
        return key, value, mask[:, 0, 0, :k_len].expand(key.shape[0], k_len), False
    return key, value, _as_given(holder, mask, k_len, mask[..., :k_len]), False


def _forward_mask_parts(mask) -> tuple:
    """``(ForwardMask or None, tensor or None)`` of a mask our mask function made (or a bare tensor/None)."""
    if isinstance(mask, (ForwardMask, _bloom_modeling_module().ForwardMask)):
        return mask, mask.tensor
    return None, mask


def _as_given(holder: ForwardMask | None, mask: torch.Tensor, k_len: int, cut: torch.Tensor):
    """The forward's ``ForwardMask`` when its tensor already is the form the kernel takes (bool where 2-D,
    ``k_len`` keys wide), so that every layer hands on one object; else ``cut``, made for this layer."""
    if holder is not None and mask.shape[-1] == k_len and (mask.dim() == 4 or mask.dtype == torch.bool):
        return holder
    return cut


def _padding_keep(attention_mask: torch.Tensor | None, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """The 2-D padding mask as a bool keep-mask over the key slots ``kv_offset .. kv_offset + kv_length``."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    keep = attention_mask.bool()
    missing = kv_offset + kv_length - keep.shape[-1]
    if missing > 0:  # key slots past the end of the user's mask hold no token (static caches)
        keep = F.pad(keep, (0, missing), value=False)
    return keep[:, kv_offset : kv_offset + kv_length]


def kernel_layer_mask(**mask_kwargs: Any):
    """Mask function registered for our names in ``AttentionMaskInterface`` (called with keywords only).

    A model whose attention our names do not reach (one that builds its mask through the registry but
    computes attention itself, e.g. stock BLOOM unless patched) gets the eager mask, which its own attention
    code reads correctly, and a warning (once per model type).

    Otherwise returns a ``[batch, kv_length]`` keep-mask for causal attention with padding, a
    ``[batch, 1, 1, kv_length]`` keep-mask for bidirectional attention with padding, and otherwise whatever
    transformers' sdpa mask function returns for the same call (None for unpadded causal/bidirectional calls,
    where the attention function then relies on ``is_causal``, or a 4-D bool mask for every other pattern).
    transformers makes the mask once per forward and hands it to every layer, so the causal keep-mask and a
    4-D mask come inside a ``ForwardMask`` (so does a patched BLOOM's causal call without padding, for its
    slopes; a patched BLOOM gets modeling_bloom's class, whose copy of the kernel layer runs its attention):
    flex's block mask and cudnn's checks then happen once per forward, not once per layer. (The
    bidirectional keep-mask stays a tensor: the attention function makes a new 2-D mask of it per layer.)
    A ``ForwardMask`` given as the attention mask is returned as it is: ``generate`` before transformers 5.x
    makes a static cache's mask with this function and passes the result to the forward, which asks again.
    """
    made_for_this_step, _ = _forward_mask_parts(mask_kwargs.get("attention_mask"))
    if made_for_this_step is not None:
        return made_for_this_step
    config = mask_kwargs.get("config")
    if config is not None and not _attention_reads_our_mask(config):
        _warn_stock_attention_once(config)
        return _stock_mask_function("eager")(**mask_kwargs)
    if config is not None and _stock_runs_eager_only(config):
        return _stock_mask_function("eager")(**mask_kwargs)
    kv_length, kv_offset = mask_kwargs["kv_length"], mask_kwargs.get("kv_offset", 0)
    pattern = _plain_mask_pattern(mask_kwargs.get("mask_function"))
    if mask_kwargs.get("local_size") is not None or isinstance(kv_offset, torch.Tensor) or _is_tracing():
        pattern = None
    if pattern == "causal" and (
        _query_end(mask_kwargs) != kv_offset + kv_length or mask_kwargs.get("allow_is_causal_skip") is False
    ):
        # queries not aligned with the last keys, or a fixed-size cache's step (transformers then allows no
        # causal shortcut): the explicit mask. Before 5.x ``generate`` hands this mask to the model as its
        # ``attention_mask``, where a 2-D keep-mask would be read as a padding mask (GPT-2 reshapes it).
        pattern = None
    patched_bloom = config is not None and _is_patched_bloom(config)
    holder = _bloom_modeling_module().ForwardMask if patched_bloom else ForwardMask
    if pattern is not None:
        keep = keep_mask_from_padding(_padding_keep(mask_kwargs.get("attention_mask"), kv_length, kv_offset))
        if pattern == "causal" and (keep is not None or patched_bloom):
            return holder(keep)
        if keep is not None:
            return keep[:, None, None, :]
    mask = _stock_mask_function("sdpa")(**mask_kwargs)
    return holder(mask) if mask is not None and mask.dim() == 4 and not _is_tracing() else mask


# ----------------------------------------------------------------------------------------------
# The registered attention functions
# ----------------------------------------------------------------------------------------------


def _config_options(config, backend: str, mask) -> dict:
    """What the model's config asks of ``attention()`` at this call, as for our modeling files
    (``attention_options``: ``config.attn_backend`` first, ``attn_chunk_size``, ``attn_flex_static_shapes``);
    the registered name's ``backend`` where the config names none."""
    if config is None:
        return {"backend": backend}
    options = attention_options(config, mask=mask)
    return options if options["backend"] != "auto" else {**options, "backend": backend}


def _one_head_size(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v zero-padded to one head size: models with multi-head latent attention (DeepSeek-V2/V3) give
    values another head size than queries and keys. Zero columns change neither the scores (the scale is fixed
    before) nor the first ``value`` columns of the output."""
    extra = query.shape[-1] - value.shape[-1]
    if extra > 0:
        value = F.pad(value, (0, extra))
    elif extra < 0:
        query, key = F.pad(query, (0, -extra)), F.pad(key, (0, -extra))
    return query, key, value


# What some models hand the attention function and the kernel layer cannot take: Gemma 2's logit softcapping,
# gpt-oss's attention sinks, T5's relative position bias, and the rest.
_REFUSED_ARGUMENTS = ("softcap", "s_aux", "position_bias", "cache", "head_mask", "indices")


def _make_attention_function(backend: str) -> Callable:
    def kernel_layer_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """transformers attention function: q ``[b, h, q, d]``, k/v ``[b, h_kv, k, d]`` -> (``[b, q, h, d]``, the
        weights ``[b, h, q, k]`` where ``output_attentions`` asks for them, as eager attention gives them, else
        None)."""
        for unsupported in _REFUSED_ARGUMENTS:
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(
                    f"the kernel layer ({implementation_name(backend)}) does not take `{unsupported}`; "
                    "use this model's own attention (e.g. attn_implementation='eager')"
                )
        is_causal = _causal_without_a_mask(module, kwargs.get("is_causal"))
        key, value, mask, causal = _kernel_arguments(key, value, attention_mask, is_causal, query.shape[2])
        options = _config_options(getattr(module, "config", None), backend, mask)
        value_size = value.shape[-1]
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        query, key, value = _one_head_size(query, key, value)
        arguments = dict(causal=causal, attention_mask=mask, dropout_p=dropout, scale=scaling, **options)
        weights = [] if kwargs.get("output_attentions") else None
        if weights is None:
            output = attention(query, key, value, **arguments)
        else:
            output = attention_recording_weights(query, key, value, weights, **arguments)
        return output[..., :value_size].transpose(1, 2).contiguous(), recorded_weights(weights)

    kernel_layer_attention.__qualname__ = kernel_layer_attention.__name__ = f"{implementation_name(backend)}_attention"
    return kernel_layer_attention


_ATTENTION_FUNCTIONS: dict[str, Callable] = {name: _make_attention_function(b) for name, b in REGISTERED_NAMES.items()}


def _causal_without_a_mask(module: nn.Module, is_causal: bool | None) -> bool:
    """Whether a call that comes without a mask is causal: as transformers' sdpa function reads it (the caller's
    ``is_causal``, else the module's flag, causal when unset), except in a model stock runs on eager attention
    only, whose attention applies no pattern but its mask's (its encoders' modules have no flag)."""
    config = getattr(module, "config", None)
    if config is not None and _stock_runs_eager_only(config):
        return False
    return getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)


def register_attention_backends() -> list[str]:
    """Register ``"mea"`` and ``"mea_<backend>"`` in transformers' attention (and mask) registries.

    Runs when ``memory_efficient_adapter.patch`` is imported (so importing the package is enough); calling
    it again is harmless. Returns the registered names. A name that contains "flash" makes transformers 5.x
    look for a Hub kernel in ``from_pretrained``, so pick the flash-attn backend there with
    ``attn_implementation="mea"`` and ``USE_FLASH_ATTN=flash_attn``, or with
    ``apply_attention_patch(model, backend="flash_attn")``.
    """
    attention_interface, mask_interface = _attention_interface(), _mask_interface()
    for name, function in _ATTENTION_FUNCTIONS.items():
        attention_interface.register(name, function)
        if mask_interface is not None:
            mask_interface.register(name, kernel_layer_mask)
    return list(_ATTENTION_FUNCTIONS)


# ----------------------------------------------------------------------------------------------
# BLOOM: no registry, so its attention modules run the attention module of our modeling_bloom.py
# ----------------------------------------------------------------------------------------------

_KERNEL_ATTENTION = "_mea_kernel_attention"  # where a stock BloomAttention keeps its kernel-layer twin


def _bloom_modeling_module() -> types.ModuleType:
    """Our modeling_bloom.py (loaded on first use): its attention module, and its copy of the kernel layer."""
    from . import modeling_bloom

    return modeling_bloom


class _LiveConfig:
    """The config a stock BloomAttention's twin reads: the stock model's config, read at every call (so its
    ``attn_backend``, ``attn_chunk_size``, ... apply whenever they are set, as on the registry's models), under
    the patch's implementation name (a BLOOM created before a class-level patch still says "eager" there).
    ``config`` is None where the class-level patch does not know the model: then no switches."""

    def __init__(self, config, backend: str):
        self.model_config, self._attn_implementation = config, implementation_name(backend)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "model_config":  # (copy protocol; an instance being copied)
            raise AttributeError(name)
        return getattr(self.model_config, name)


def _make_twin(stock: nn.Module, config: _LiveConfig) -> nn.Module:
    """modeling_bloom.py's ``BloomAttention`` sharing ``stock``'s projections: one BLOOM attention code path.

    Built on the meta device (no weights allocated) and kept in the stock module's ``__dict__``, outside its
    state dict; it reads ``config``.
    """
    modeling_bloom = _bloom_modeling_module()
    shape = modeling_bloom.BloomConfig(
        hidden_size=stock.hidden_size,
        n_head=stock.num_heads,
        pretraining_tp=stock.pretraining_tp,
        slow_but_exact=stock.slow_but_exact,
    )
    with torch.device("meta"):
        twin = modeling_bloom.BloomAttention(shape, stock.layer_idx)
    _share_projections(twin, stock)
    if any(parameter.is_meta for parameter in twin.parameters()):
        raise RuntimeError("modeling_bloom.BloomAttention has weights the stock BloomAttention lacks")
    twin.config = config
    stock.__dict__[_KERNEL_ATTENTION] = twin
    return twin


def _bloom_kernel_attention(stock: nn.Module, backend: str) -> nn.Module:
    """``stock``'s twin, up to date: it is handed the stock module's ``query_key_value`` and ``dense`` (modules
    swapped in later, PEFT's LoRA layers or a quantizer's, are the ones that run), mode, hidden dropout and
    attention-dropout module (whose own mode and type decide, as where stock calls it; a trainer may change them
    after the first forward) at every call."""
    twin = stock.__dict__.get(_KERNEL_ATTENTION)
    if twin is None or twin.config._attn_implementation != implementation_name(backend):
        # the first call under the class-level patch (which does not know the model), or another backend
        twin = _make_twin(stock, _LiveConfig(None if twin is None else twin.config.model_config, backend))
    elif twin.query_key_value is not stock.query_key_value or twin.dense is not stock.dense:
        _share_projections(twin, stock)
    twin.training, twin.hidden_dropout = stock.training, stock.hidden_dropout
    twin.attention_dropout = stock.attention_dropout
    return twin


def _share_projections(twin: nn.Module, stock: nn.Module) -> None:
    twin.query_key_value, twin.dense = stock.query_key_value, stock.dense


def _bloom_padding_mask(attention_mask, kv_length: int):
    """The mask stock BLOOM hands its attention, in the form modeling_bloom's attention takes.

    None (no padding) and our mask function's ``ForwardMask`` pass as they are (one object per forward); a
    bare 2-D mask becomes a bool keep-mask, and a 4-D mask (transformers 4.57's, or a static cache's) is cut
    to the keys in use; the kernel adds causality.
    """
    holder, mask = _forward_mask_parts(attention_mask)
    if mask is None:
        return holder
    if mask.dim() == 2:
        return _as_given(holder, mask, kv_length, mask[:, -kv_length:].bool())
    return _as_given(holder, mask, kv_length, mask[..., :kv_length])


def _bloom_slopes(attention_mask, num_heads: int, device: torch.device) -> torch.Tensor:
    """BLOOM's ALiBi slopes: made once per forward when the forward has a ``ForwardMask`` (every layer then
    passes the same tensor, which the cudnn backend takes as BLOOM's without reading it), else per layer."""
    holder, _ = _forward_mask_parts(attention_mask)
    if holder is None:
        return alibi_slopes(num_heads, device=device)
    return holder.bloom_alibi_slopes(num_heads, device)


def _weights_over_every_cached_key(weights: torch.Tensor | None, layer_past) -> torch.Tensor | None:
    """Attention weights over every key slot, as stock BLOOM's: a static cache's weights span its unwritten slots
    too (after the written ones), at 0, where the kernel attends to the written keys only."""
    if weights is None or not getattr(layer_past, "is_compileable", False):
        return weights
    return F.pad(weights, (0, cache_capacity(layer_past) - weights.shape[-1]))


def _make_bloom_forward(backend: str) -> Callable:
    """A stock ``BloomAttention.forward`` (same arguments and returns) that runs modeling_bloom's attention
    module on ``backend`` (unless the model's ``config.attn_backend`` names another): ALiBi as slopes inside
    the kernel; attention probabilities only when asked for."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer_past=None,
        head_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if head_mask is not None:
            raise NotImplementedError("the kernel layer does not take BLOOM's head_mask; remove_attention_patch first")
        past = layer_past.get_seq_length(self.layer_idx) if layer_past is not None else 0
        kv_length = int(past) + hidden_states.shape[1]
        twin = _bloom_kernel_attention(self, backend)
        output, weights = twin(
            hidden_states,
            residual,
            alibi_slopes=_bloom_slopes(attention_mask, self.num_heads, hidden_states.device),
            padding_mask=_bloom_padding_mask(attention_mask, kv_length),
            backend=backend_from_config(twin.config),
            kv_length=kv_length,
            layer_past=layer_past,
            attention_weights=[] if output_attentions else None,
        )
        return output, _weights_over_every_cached_key(weights, layer_past)

    forward.__qualname__ = f"BloomAttention.forward[{implementation_name(backend)}]"
    return forward


# Made once, never changed: forwards read it without a lock.
_BLOOM_FORWARDS: dict[str, Callable] = {backend: _make_bloom_forward(backend) for backend in REGISTERED_NAMES.values()}


# ----------------------------------------------------------------------------------------------
# Which models we can patch
# ----------------------------------------------------------------------------------------------

# Per Python module or class (by qualified name): whether its source calls the attention registry, and the
# ``_REFUSED_ARGUMENTS`` it passes as keywords. Filled once each (a source does not change), read without a lock.
_SOURCE_FACTS: dict[str, tuple[bool, frozenset]] = {}


def _source_facts(owner: types.ModuleType | type | None) -> tuple[bool, frozenset]:
    key = getattr(owner, "__name__", "") if isinstance(owner, types.ModuleType) else repr(owner)
    if key not in _SOURCE_FACTS:
        try:
            source = inspect.getsource(owner)
        except (OSError, TypeError):
            source = ""
        passed = frozenset(name for name in _REFUSED_ARGUMENTS if f"{name}=" in source)
        _SOURCE_FACTS[key] = ("ALL_ATTENTION_FUNCTIONS" in source, passed)
    return _SOURCE_FACTS[key]


def _module_uses_registry(module_name: str) -> bool:
    """Whether a Python module's source calls transformers' attention registry."""
    return _source_facts(sys.modules.get(module_name))[0]


def _refused_arguments(owner: types.ModuleType | type, config) -> list[str]:
    """What ``owner`` (an attention module class, by the class whose ``forward`` it runs; or a model's whole
    modeling file, before its modules exist) hands our attention function and it refuses: T5's ``position_bias``,
    gpt-oss's ``s_aux``, and ``softcap`` where the config sets a softcapping (Gemma 2)."""
    if isinstance(owner, type):
        owner = next((base for base in owner.__mro__ if "forward" in vars(base)), owner)
    passed = _source_facts(owner)[1]
    refused = [name for name in ("position_bias", "s_aux") if name in passed]
    if "softcap" in passed and getattr(config, "attn_logit_softcapping", None) is not None:
        refused.append("softcap")
    return refused


def _is_our_module(module: types.ModuleType | None) -> bool:
    """One of our modeling files (they carry the kernel layer and read the config per call)."""
    return (
        module is not None
        and callable(getattr(module, "backend_from_config", None))
        and callable(getattr(module, "attention", None))
    )


def _is_ours(cls: type) -> bool:
    return _is_our_module(sys.modules.get(cls.__module__))


def _attention_reads_our_mask(config) -> bool:
    """Whether the model a config belongs to runs attention that takes our mask function's masks: its modeling
    module calls the registry, it is one of our files, or it is a BLOOM whose attention we patched."""
    module_name = _modeling_module_name(config)
    if _module_uses_registry(module_name) or _is_our_module(sys.modules.get(module_name)):
        return True
    return _is_patched_bloom(config)


def _modeling_module_name(config) -> str:
    return type(config).__module__.replace(".configuration_", ".modeling_")


# Per config class: whether none of the model classes made from it declares sdpa support. Filled once per class,
# read without a lock.
_EAGER_ONLY: dict[type, bool] = {}


def _stock_runs_eager_only(config) -> bool:
    """Whether stock runs the config's model on eager attention only: no model class of its modeling file made
    from this config class (else none of the file's) declares sdpa support. Such a model's code may rely on
    eager's mask: a decoder whose attention modules say
    ``is_causal=False`` (NLLB-MoE, Pegasus-X), encoders whose modules have no such flag (which sdpa's contract
    reads as causal: Splinter, ALIGN, CLAP), modules that read the mask or add it to scores they compute
    themselves (NLLB-MoE's router, BigBird-Pegasus's full attention). Our mask function gives these models that
    mask, whose values say every pattern; the kernels take it as an additive mask. Not our files, nor a stock
    BLOOM whose attention runs ours (both take our masks)."""
    from transformers import PreTrainedModel

    key = type(config)  # read per attention call: no string work once known
    if key not in _EAGER_ONLY:
        name = _modeling_module_name(config)
        module = sys.modules.get(name)
        if module is None or _is_our_module(module):
            return False
        classes = [
            value for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, PreTrainedModel) and value.__module__ == name
        ]
        own = [cls for cls in classes if cls.config_class is type(config)] or classes
        _EAGER_ONLY[key] = bool(own) and not any(cls._supports_sdpa for cls in own)
    return _EAGER_ONLY[key] and not _is_patched_bloom(config)


def _is_patched_bloom(config) -> bool:
    """A stock BLOOM whose attention modules run ours (class-level patch, or this model's own patch)."""
    bloom = _bloom_attention_class()
    if bloom is None or _modeling_module_name(config) != bloom.__module__:
        return False
    if bloom.__dict__["forward"] in _BLOOM_FORWARDS.values():
        return True
    implementation = _get_implementation(config)  # a model's own patch: a model holds its config
    return isinstance(implementation, _HeldName) and any(
        isinstance(reference(), nn.Module) for reference in implementation.hold.holding()
    )


def _warn_stock_attention_once(config) -> None:
    from transformers.utils import logging

    model_type = getattr(config, "model_type", None)
    logging.get_logger(__name__).warning_once(
        f"{type(config).__name__} (model_type {model_type!r}): this model computes attention itself instead of "
        f"calling transformers' attention registry, so attn_implementation={_get_implementation(config)!r} "
        "cannot put it on the kernel layer; it runs its own eager attention, with the eager mask. "
        "apply_attention_patch(model) runs BLOOM's attention on the kernel layer, and our modeling files every "
        "family we ship."
    )


def _attention_kind(cls: type) -> str:
    """What an attention module class is to us: "bloom", "ours", "registry" or "other"."""
    bloom = _bloom_attention_class()
    if bloom is not None and issubclass(cls, bloom):
        return "bloom"
    if _is_ours(cls):
        return "ours"
    if _module_uses_registry(cls.__module__):
        return "registry"
    return "other"


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules a registry name reaches (torch's own ``nn.MultiheadAttention``, e.g. in
    SigLIP's pooling head, reads no registry: it stays as it is)."""
    return [
        m
        for m in model.modules()
        if m is not model and "Attention" in type(m).__name__ and not _is_model(m)
        and not type(m).__module__.startswith("torch.")
    ]


def _is_model(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _check_supported(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules; raises TypeError naming the class when we cannot patch them."""
    name = type(model).__name__
    advice = (
        "apply_attention_patch supports BLOOM and models whose attention modules call transformers' attention "
        "registry (ALL_ATTENTION_FUNCTIONS), e.g. LLaMA, GPT-2 and BART; for other models load our modeling "
        "files with trust_remote_code=True"
    )
    if not _is_model(model):
        raise TypeError(f"apply_attention_patch needs a transformers PreTrainedModel, got {name}; {advice}")
    modules = _attention_modules(model)
    if not modules:
        raise TypeError(f"apply_attention_patch does not support {name}: it has no attention modules; {advice}")
    for module in modules:
        if _attention_kind(type(module)) == "other":
            raise TypeError(
                f"apply_attention_patch does not support {name}: its attention module "
                f"{type(module).__module__}.{type(module).__name__} neither calls transformers' attention "
                f"registry nor is BLOOM's; {advice}"
            )
        refused = _refused_arguments(type(module), getattr(module, "config", model.config))
        if _attention_kind(type(module)) == "registry" and refused:
            raise TypeError(
                f"apply_attention_patch does not support {name}: its attention module {type(module).__name__} "
                f"passes {', '.join(f'`{n}`' for n in refused)}, which the kernel layer does not take; {advice}"
            )
    return modules


def _model_configs(model: nn.Module) -> list:
    """Every distinct config object the model's modules read (the model's own, sub-models', sub-configs)."""
    from transformers import PretrainedConfig

    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


# ----------------------------------------------------------------------------------------------
# Patch state, kept in the patched objects themselves
#
# What a patch changes on an object (a config's attention implementation, a BLOOM attention module's
# forward) is recorded on that object: its value before the first patch and the patches that hold the change
# (a ``_Hold``). Patches of one object (a model and its base model, two models built on one config) share the
# record; the last one removed puts the value back. A deep copy of a patched model carries the records, so it
# is removed like the original. Records are replaced, never changed, under ``_LOCK``: a forward reads them
# without one.
# ----------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_MISSING = object()
_HELD_FORWARD = "_mea_held_forward"  # where a patched stock BloomAttention keeps its forward's _Hold


@dataclass(eq=False)
class _ClassPatch:
    backend: str
    original_check: Callable
    original_bloom_forward: Callable | None
    families: frozenset | None = None  # None: every family
    # id(config) -> config, for each config it switched, as long as the config lives: the caller's config
    # outlives a model made from it, and removing the patch restores it too
    configs: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)


_CLASS_PATCH: _ClassPatch | None = None


class _Hold:
    """The value an object had before it was patched (``original``) and who holds the patch (``holders``: weak
    references to patched models and to the class-level patch). ``owner_id`` is the object's id."""

    def __init__(self, owner_id: int, original, holders: tuple):
        self.owner_id, self.original, self.holders = owner_id, original, holders

    def holding(self, leaving: tuple = ()) -> tuple:
        """The holders still holding, less ``leaving``: live models, and the class-level patch while it runs."""
        return tuple(reference for reference in self.holders if _holds(reference(), leaving))

    def __deepcopy__(self, memo: dict) -> _Hold:
        """The record of a copy: held by the models copied along with it (their copies), and by the running
        class-level patch, which then restores the copy too."""
        patch, holders = _CLASS_PATCH, []
        for reference in self.holding():
            holder = reference()
            if holder is patch:
                holders.append(reference)
            elif id(holder) in memo:
                holders.append(weakref.ref(memo[id(holder)]))
        owner = memo.get(self.owner_id)
        if owner is not None and patch is not None and any(reference() is patch for reference in holders):
            with _LOCK:
                patch.configs[id(owner)] = owner
        original = self.original if self.original is _MISSING else copy.deepcopy(self.original, memo)
        return _Hold(self.owner_id if owner is None else id(owner), original, tuple(holders))


def _holds(holder, leaving: tuple) -> bool:
    if holder is None or any(holder is gone for gone in leaving):
        return False
    return not isinstance(holder, _ClassPatch) or holder is _CLASS_PATCH


def _taken(hold: _Hold | None, owner, original, holder) -> _Hold:
    """``hold`` with ``holder`` added, or a new record of ``original`` where the object has none."""
    if hold is None:
        return _Hold(id(owner), original, (weakref.ref(holder),))
    return _Hold(id(owner), hold.original, hold.holding((holder,)) + (weakref.ref(holder),))


class _HeldName(str):
    """An attention implementation name a patch set on a config, carrying the config's ``_Hold``. The name
    is the value of ``_attn_implementation_internal``, which transformers never serializes, so the record
    travels with the config (deep copies included) and leaves nothing in a saved ``config.json``."""

    hold: _Hold

    def __new__(cls, name: str, hold: _Hold) -> _HeldName:
        held = super().__new__(cls, name)
        held.hold = hold
        return held

    def __deepcopy__(self, memo: dict) -> _HeldName:
        return _HeldName(str(self), copy.deepcopy(self.hold, memo))

    def __copy__(self) -> _HeldName:
        return self

    def __reduce__(self):
        return str, (str(self),)  # pickled (to another process) as the plain name


def _switch_config(config, name: str, holder, original) -> _HeldName:
    """``name`` for ``config``, held by ``holder``; ``original`` is the value to restore if nothing held it."""
    current = _get_implementation(config)
    hold = current.hold if isinstance(current, _HeldName) else None
    return _HeldName(name, _taken(hold, config, original, holder))


def _release_config(config, leaving: tuple) -> None:
    current = _get_implementation(config)
    if not isinstance(current, _HeldName):
        return
    hold = current.hold
    holders = hold.holding(leaving)
    kept = _HeldName(current, _Hold(id(config), hold.original, holders)) if holders else hold.original
    _set_implementation(config, kept)


def _patch_bloom_module(module: nn.Module, backend: str, model: nn.Module, config: _LiveConfig) -> None:
    hold = module.__dict__.get(_HELD_FORWARD)
    module.__dict__[_HELD_FORWARD] = _taken(hold, module, module.__dict__.get("forward", _MISSING), model)
    module.forward = types.MethodType(_BLOOM_FORWARDS[backend], module)
    _make_twin(module, config)


def _release_bloom_module(module: nn.Module, leaving: tuple) -> None:
    hold = module.__dict__[_HELD_FORWARD]
    holders = hold.holding(leaving)
    if holders:
        module.__dict__[_HELD_FORWARD] = _Hold(id(module), hold.original, holders)
        return
    for name in (_HELD_FORWARD, _KERNEL_ATTENTION, "forward"):
        module.__dict__.pop(name, None)
    if hold.original is not _MISSING:
        module.__dict__["forward"] = hold.original


def _apply_to_model(model: nn.Module, backend: str) -> None:
    modules = _check_supported(model)
    name = implementation_name(backend)
    for config in _model_configs(model):
        _set_implementation(config, _switch_config(config, name, model, _get_implementation(config)))
    twin_config = _LiveConfig(model.config, backend)  # one per model: options are then read once per forward
    for module in modules:
        if _attention_kind(type(module)) == "bloom":
            _patch_bloom_module(module, backend, model, twin_config)


def _release(model: nn.Module, leaving: tuple) -> None:
    """Drop the holds of ``leaving`` on ``model``'s BLOOM attention forwards and configs; whatever no patch holds
    any more gets its value from before the first patch back."""
    for module in model.modules():
        if _HELD_FORWARD in module.__dict__:
            _release_bloom_module(module, leaving)
    for config in _model_configs(model):
        _release_config(config, leaving)


def _family_of(cls: type) -> str:
    """``llama`` for ``transformers.models.llama.modeling_llama`` and for a remote-code ``modeling_llama``."""
    return cls.__module__.rsplit(".", 1)[-1].removeprefix("modeling_")


def _in_scope(patch: _ClassPatch, family: str) -> bool:
    return patch.families is None or family in patch.families


def _class_patch_applies(patch: _ClassPatch, cls: type, config) -> bool:
    """Whether a model class created under the class-level patch should use our kernels (logs why not, once,
    for a class of a family the patch names: the original Qwen-7B code, a model without the registry, a model
    whose attention takes what ours refuses)."""
    if not _in_scope(patch, _family_of(cls)):
        return False
    bloom = _bloom_pretrained_class()
    if (bloom is not None and issubclass(cls, bloom)) or _is_ours(cls):
        return True
    from transformers.utils import logging

    uses_registry = _module_uses_registry(cls.__module__)
    refused = _refused_arguments(sys.modules.get(cls.__module__), config) if uses_registry else []
    if uses_registry and not refused:
        return True
    why = (
        f"is in a modeling file whose attention takes {', '.join(f'`{name}`' for name in refused)}, which the "
        "kernel layer does not take"
        if refused
        else "does not call transformers' attention registry itself (it computes attention itself, or only holds "
        "sub-models, which are patched on their own where their classes call it)"
    )
    logging.get_logger(__name__).warning_once(
        f"apply_attention_patch(): {cls.__module__}.{cls.__name__} {why}, so its models keep their own attention; "
        "our modeling files (trust_remote_code=True, or copied over the original) run LLaMA, GPT-2, BLOOM, BART "
        "and Qwen-7B on the kernel layer"
    )
    return False


def _family_names(families: Iterable[str]) -> frozenset:
    """``families`` as a set of names, each one a transformers model package or one of our files' families."""
    if isinstance(families, str):
        raise TypeError(f"families takes a list of family names, e.g. [{families!r}], not the string {families!r}")
    names = frozenset(families)
    unknown = sorted(repr(name) for name in names if not _is_model_family(name))
    if unknown:
        raise ValueError(
            f"families: unknown model family {', '.join(unknown)}: a name is the package of a model "
            "in transformers.models ('llama', 'gpt2', 'bloom', 'bart', 'mistral', ...) or 'qwen'"
        )
    return names


def _is_model_family(name: object) -> bool:
    if not isinstance(name, str) or not name.isidentifier():
        return False
    return name == "qwen" or importlib.util.find_spec(f"transformers.models.{name}") is not None


def _make_init_hook(original: Callable) -> Callable:
    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        resolved = original(self, attn_implementation, *args, **kwargs)
        patch = _CLASS_PATCH
        if patch is None or not _is_init_check(args, kwargs) or attn_implementation not in (None, "sdpa"):
            return resolved
        if not _class_patch_applies(patch, type(self), self.config):
            return resolved
        with _LOCK:
            patch.configs[id(self.config)] = self.config
            return _switch_config(self.config, implementation_name(patch.backend), patch, resolved)

    _check_and_adjust_attn_implementation.__wrapped__ = original
    return _check_and_adjust_attn_implementation


def _apply_to_classes(backend: str, families: frozenset | None) -> None:
    """Start the class-level patch, or widen the running one when it has the same backend (the seed modules
    patch one family each: patching LLaMA, then BLOOM, patches both)."""
    global _CLASS_PATCH
    from transformers import PreTrainedModel

    if _CLASS_PATCH is not None and _CLASS_PATCH.backend == backend:
        wider = None if None in (families, _CLASS_PATCH.families) else _CLASS_PATCH.families | families
        _CLASS_PATCH.families = wider
    else:
        _remove_from_classes()
        original_check = PreTrainedModel.__dict__["_check_and_adjust_attn_implementation"]
        bloom = _bloom_attention_class()
        original_bloom = bloom.__dict__["forward"] if bloom is not None else None
        _CLASS_PATCH = _ClassPatch(backend, original_check, original_bloom, families)
        PreTrainedModel._check_and_adjust_attn_implementation = _make_init_hook(original_check)
    bloom = _bloom_attention_class()
    if bloom is not None and _in_scope(_CLASS_PATCH, "bloom"):
        bloom.forward = _BLOOM_FORWARDS[backend]


def _remove_from_classes() -> None:
    global _CLASS_PATCH
    from transformers import PreTrainedModel

    patch, _CLASS_PATCH = _CLASS_PATCH, None
    if patch is None:
        return
    PreTrainedModel._check_and_adjust_attn_implementation = patch.original_check
    bloom = _bloom_attention_class()
    if bloom is not None:
        bloom.forward = patch.original_bloom_forward
    for config in list(patch.configs.values()):
        _release_config(config, (patch,))


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def apply_attention_patch(
    model: nn.Module | None = None, backend: str = "auto", families: Iterable[str] | None = None
) -> nn.Module | None:
    """Route attention through the kernel layer, in place; undo with ``remove_attention_patch``.

    With a model (a loaded stock transformers LLaMA, GPT-2, BLOOM, BART, or any model whose attention modules
    call transformers' attention registry; our own modeling files too): switch that model, weights untouched,
    and return it. Other models raise TypeError naming the class.

    Without a model: models created afterwards that would use transformers' default attention (``sdpa``, or
    no explicit choice) use ours instead, and BLOOM's attention class runs on the kernel layer (for existing
    BLOOM models too). An explicit ``attn_implementation`` such as ``"eager"`` is respected.

    ``families`` (no-model form only) limits that to the classes of these families (``"llama"``,
    ``"bloom"``, ...): the original adapter's per-family ``models.<family>.flash_attn_patch`` modules use it.

    ``backend`` is ``"auto"`` (the fastest kernel that can take each call; ``USE_FLASH_ATTN`` applies) or a
    kernel-layer backend name. Patching again with another backend replaces the previous patch; with the same
    backend, a class-level patch covers the union of the families asked for.
    """
    implementation_name(backend)  # validates the backend
    register_attention_backends()
    if model is None:
        names = None if families is None else _family_names(families)
        with _LOCK:
            _apply_to_classes(backend, names)
        return None
    if families is not None:
        raise ValueError("families limits the class-level patch (no model); a model is patched whatever its family")
    with _LOCK:
        _release(model, (model,))
        _apply_to_model(model, backend)
    return model


def remove_attention_patch(model: nn.Module | None = None) -> nn.Module | None:
    """Undo ``apply_attention_patch``: exactly the configs and forwards it changed, nothing else.

    With a model: undo that model's patch (and the switch the class-level patch made when it was created;
    BLOOM's attention class itself stays patched until the class-level patch is removed); a model that was
    never patched is returned unchanged. Without a model: undo the class-level patch, including the switch it
    made on models created under it.

    Where other patches hold the same config or module (the model's base model, another model built on the
    same config), it keeps the patch until the last of them is removed. A deep copy of a patched model is
    undone the same way.
    """
    if model is not None and not _is_model(model):
        raise TypeError(
            f"remove_attention_patch needs the transformers model that was patched, got {type(model).__name__}; "
            "pass the model a wrapper holds (a PEFT model's get_base_model(), a compiled module's _orig_mod)"
        )
    with _LOCK:
        if model is None:
            _remove_from_classes()
            return None
        _release(model, (model,) if _CLASS_PATCH is None else (model, _CLASS_PATCH))
    return model


def transform(model: nn.Module, keep_original_model: bool = False, backend: str = "auto") -> nn.Module:
    """BetterTransformer's ``transform``: the model with its attention on the kernel layer.

    ``keep_original_model=True`` patches a deep copy and leaves ``model`` as it was (two sets of weights in
    memory, as with BetterTransformer); otherwise ``model`` itself is patched and returned.
    """
    if keep_original_model:
        model = copy.deepcopy(model)  # a patched model's copy carries its patch records (see "Patch state")
    return apply_attention_patch(model, backend=backend)


def reverse(model: nn.Module) -> nn.Module:
    """BetterTransformer's ``reverse``: the model with its stock attention back (exactly as before the patch)."""
    return remove_attention_patch(model)


class BetterTransformer:
    """``BetterTransformer.transform(model, keep_original_model=True)`` / ``BetterTransformer.reverse(model)``
    of optimum, on the kernel layer: change only the import of a script written for BetterTransformer."""

    transform = staticmethod(transform)
    reverse = staticmethod(reverse)


register_attention_backends()
