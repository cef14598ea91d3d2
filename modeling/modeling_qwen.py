"""Qwen-7B (first generation) for Hugging Face transformers, with attention routed through the kernel layer.

A drop-in replacement for the ``modeling_qwen.py`` of the Qwen-7B checkpoints: the same classes and
state-dict keys, the same outputs (rotary embedding, dynamic NTK, logn attention scaling, the bf16/fp16/fp32
load-time precision choice, ``chat()``/``chat_stream()``), but written against the transformers Cache API so
that it runs on transformers 4.57.x and 5.x. It can be copied alone over the original file in a checkpoint
folder; it needs that folder's ``configuration_qwen.py`` and, for ``chat()``/``chat_stream()`` and
``stop_words_ids``, a ``qwen_generation_utils.py``. That import is lazy, so the module itself imports without
it, but transformers' remote-code loader copies every ``from .x import`` it finds in the file: a folder
loaded with ``trust_remote_code`` must hold ``qwen_generation_utils.py`` (every Qwen checkpoint ships one,
and this project ships its own implementation beside this file).

Every attention call goes through ``attention()`` (the kernel layer copied below) with ``causal=True`` and an
O(seq) padding keep-mask. The version-specific bit is the ``GradientCheckpointingLayer`` import.
"""

import copy
import math
import os
import queue
import threading
from contextlib import ExitStack
from functools import partial
from typing import Any, Generator, Optional, Union

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizer
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.logging import get_logger

from .configuration_qwen import QWenConfig

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers without modeling_layers: the same mechanism, spelled out

    class GradientCheckpointingLayer(nn.Module):
        """Runs the layer under ``self._gradient_checkpointing_func`` (set by ``gradient_checkpointing_enable``)."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)


# Version guard: transformers 5 re-runs `_init_weights` over loaded modules and ships init
# functions that skip tensors it has already loaded; transformers 4 only initializes missing weights.
try:
    from transformers import initialization as _init
except ImportError:
    from torch.nn import init as _init

# Cache implementations whose caches are static (compileable): refused before generate() builds one.
try:
    from transformers.generation.configuration_utils import (
        ALL_STATIC_CACHE_IMPLEMENTATIONS as _STATIC_CACHE_IMPLEMENTATIONS,
    )
except ImportError:
    _STATIC_CACHE_IMPLEMENTATIONS = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked")

# >>> kernel layer: copied from modeling/attention.py by scripts/sync_kernels.py; edit it there >>>
"""The kernel layer of memory-efficient-adapter: one ``attention()`` call, many fused kernels.

Every modeling file of this project carries a verbatim copy of this module (see
``scripts/sync_kernels.py``), so it imports only torch and the standard library at module level;
optional packages (xformers, flash_attn) are imported lazily inside ``try`` blocks.

Layout is ``[batch, heads, seq, head_dim]``. Backends, one function each, declare what they can take;
``auto`` walks a fixed order per device (``AUTO_ORDER``) and runs the first one that can take the call.
"""

import hashlib
import inspect
import logging
import math
import operator
import os
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_logger = logging.getLogger("memory_efficient_adapter")

BACKENDS = ("sdpa", "cudnn", "flex", "flash_attn", "xformers", "chunked", "eager")
AUTO_ORDER = {
    "cuda": ("sdpa", "cudnn", "flash_attn", "flex", "xformers", "chunked", "eager"),
    "cpu": ("sdpa", "chunked", "eager"),
}
AUTO_ORDER_OTHER_DEVICES = ("sdpa", "chunked", "eager")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Query/key block sizes of the chunked backend for calls that pass no ``chunk_size``; set_chunk_sizes()
# changes them for this copy of the layer only (a model reads ``config.attn_chunk_size`` instead).
_DEFAULT_CHUNK_SIZES = {"query": 1024, "key": 1024}

_logged_messages: set = set()
_probe_results: dict = {}


def _log_once(message: str) -> bool:
    """Logs ``message`` the first time it comes. Marked as a constant-result function below: while compiling,
    dynamo runs it when it traces the graph instead of putting a logging call (a graph break) into it."""
    if message not in _logged_messages:
        _logged_messages.add(message)
        _logger.warning(message)
    return True


_log_once._dynamo_marked_constant = True  # as torch._dynamo.assume_constant_result sets it (see _probe)


# ----------------------------------------------------------------------------------------------
# Describing a call
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to decide whether it can take a call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    causal: bool
    mask_kind: str  # "none", "padding" ([b, k] bool), "bool" or "additive" (broadcastable 4-D)
    documents: bool  # sequence_ids given: packed documents, each attending only to itself
    alibi: bool
    dropout_p: float
    needs_grad: bool
    bias_needs_grad: bool = False  # an additive mask or ALiBi slopes that require grad (see _cannot_differentiate)
    # The tensors behind mask_kind "padding" and alibi, for a backend that must read their values to decide.
    padding_mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    slopes: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    # The forward's ForwardMask when the caller passed one: where checks of values are kept for the forward.
    holder: Optional["ForwardMask"] = field(default=None, compare=False, repr=False)

    @property
    def causal_offset(self) -> int:
        """Bottom-right alignment: query i sees keys j <= i + causal_offset."""
        return self.k_len - self.q_len

    @property
    def ragged(self) -> bool:
        """Rows of different lengths or several documents per row, where a causal call would need a
        [b, 1, q, k] mask on a dense kernel."""
        return self.documents or (self.mask_kind == "padding" and self.causal)


class ForwardMask:
    """One forward pass's attention mask, made once by the model and handed to every layer.

    It carries the mask tensor (what ``attention()`` takes as ``attention_mask``; None for a forward without
    one), the flex block masks built from it, and in ``kept`` other values worked out once per forward (the
    cudnn backend's checks of the padding layout and the ALiBi slopes, a patched model's slopes). So each of
    those happens once per forward rather than once per layer, and nothing outlives the forward: no cache
    keyed by tensor identity.
    ``attention()`` takes it wherever it takes a mask tensor; ``dim()``, ``ndim``, ``shape``, ``dtype`` and
    ``device`` are the tensor's.
    """

    def __init__(
        self,
        tensor: Optional[torch.Tensor],
        filled_keys: Optional[int] = None,
        cache_position: Optional[torch.Tensor] = None,
    ):
        if isinstance(tensor, ForwardMask):
            tensor = tensor.tensor
        self.tensor = tensor
        self.filled_keys = filled_keys  # see filled_cache_length
        self.cache_position = cache_position  # see cache_mask_and_position
        self.cache_slots: Optional[int] = None  # a fixed-size cache's whole length, once cut (update_cache)
        self.block_masks: dict = {}
        self.kept: dict = {}
        self.bloom_slopes: Optional[torch.Tensor] = None
        # [b, k_len] ALiBi positions of the keys of a 4-D mask whose slots are not positions (see _alibi_key_positions)
        self.alibi_key_positions: Optional[torch.Tensor] = None

    def bloom_alibi_slopes(self, num_heads: int, device) -> torch.Tensor:
        """BLOOM's slopes (``alibi_slopes``) for every layer of this forward. The cudnn backend, which computes
        BLOOM's slopes itself, takes these without reading them: also while torch.compile traces, where it
        could not read them."""
        slopes = self.bloom_slopes
        if slopes is None or slopes.shape[0] != num_heads or slopes.device != torch.device(device or "cpu"):
            slopes = self.bloom_slopes = alibi_slopes(num_heads, device=device)
        return slopes

    def dim(self) -> int:
        return self.tensor.dim()

    @property
    def ndim(self) -> int:
        return self.tensor.dim()

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def contiguous(self) -> Optional[torch.Tensor]:
        """The mask tensor itself, for code outside the attention layers that asks for a tensor (``generate``
        makes a static cache's mask before the forward and passes it in as a custom mask)."""
        return None if self.tensor is None else self.tensor.contiguous()

    def __getitem__(self, index):
        raise TypeError(_mask_used_as_a_tensor_message("it indexes it"))

    def __getattr__(self, name: str):
        """Only for names that normal lookup does not find (or whose property raised AttributeError): a tensor
        method names the problem (still an AttributeError, so ``hasattr`` and ``getattr(..., default)`` keep
        working)."""
        if name in type(self).__dict__:  # shape, dtype, ... of a holder without a tensor
            raise AttributeError(f"this ForwardMask holds no mask tensor (the forward has no mask): no {name}")
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise AttributeError(f"'ForwardMask' object has no attribute {name!r}")
        reason = _mask_used_as_a_tensor_message(f"it uses .{name}")
        raise AttributeError(f"'ForwardMask' object has no attribute {name!r}: {reason}")


def _mask_used_as_a_tensor_message(how: str) -> str:
    """Why a model that treats its attention mask as a tensor (``how``) cannot run on our attention names."""
    return (
        f"this model reads its attention mask itself ({how}), where the kernel layer's attention names hand the "
        "attention layers a per-forward ForwardMask: load it with its own attention (attn_implementation='sdpa' "
        "or 'eager')"
    )


def forward_mask(
    mask: Optional[torch.Tensor],
    without_mask: bool = False,
    filled_keys: Optional[int] = None,
    cache_position: Optional[torch.Tensor] = None,
) -> Optional[ForwardMask]:
    """The mask a model hands to all its layers for one forward pass. None stays None unless
    ``without_mask``: then a holder without a tensor, for a model whose layers hand it only to ``attention()``
    (so a packed row's block mask, document index and varlen layout, and the slopes check, are worked out once
    per forward there too). ``filled_keys``: see ``filled_cache_length``; ``cache_position``: see
    ``cache_mask_and_position``."""
    return None if mask is None and not without_mask else ForwardMask(mask, filled_keys, cache_position)


def cache_mask_and_position(
    past_key_values, attention_mask: Optional[torch.Tensor], batch_size: int, new_tokens: int, cache_position, device
) -> tuple:
    """``(attention_mask, cache_position)`` of a forward, its 2-D mask over the keys (``_mask_over_keys``: the
    cached and new tokens, where a fixed-size cache's mask may cover its unwritten slots too).
    While tracing into a fixed-size cache, with no mask or a 2-D one, the filled slots cannot be counted (a
    data-dependent value), and neither the mask's length nor the capacity says where the queries sit: aligned with
    the end of either, prompt tokens saw later ones. Such a call gets its ``traced_cache_position`` and a bool 4-D
    mask ``[batch, 1, new, slots]``: the slots up to each query's position (``visible_cache_slots``) that the 2-D
    mask keeps (its column j is slot j), as transformers' static-cache masks; the positions go on the
    ``ForwardMask`` too, where caches that need one write (before transformers 5.4). Anything else as given."""
    two_d = attention_mask is not None and attention_mask.dim() == 2
    if attention_mask is not None and not two_d:
        return attention_mask, _fixed_cache_position(past_key_values, new_tokens, device, cache_position)
    if not _traced_into_fixed_cache(past_key_values):
        return (_mask_over_keys(past_key_values, attention_mask, new_tokens) if two_d else None), cache_position
    cache_position = traced_cache_position(past_key_values, new_tokens, device, cache_position)
    slots = cache_capacity(past_key_values)
    if not two_d:
        visible = visible_cache_slots(cache_position.to(device), slots)
        return visible.expand(batch_size, 1, *visible.shape), cache_position
    return cache_slots_mask(_mask_over_cache_slots(attention_mask, slots), cache_position), cache_position


def _mask_over_keys(past_key_values, attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """A 2-D mask cut to the keys its forward attends to: the cached tokens, then the new ones (the filled slots of
    a fixed-size cache, whose mask stock pads to the cache's length). Stock reads the first columns of a longer
    mask (a decode loop may pass the whole sequence's mask at every step); a shorter one is refused whatever it
    holds (stock pads it with zeros, hiding the newest keys, a silently wrong result; and an all-ones one would
    otherwise pass unseen: see ``check_mask_shape``)."""
    keys = filled_cache_length(past_key_values, attention_mask, new_tokens)
    if keys is None:
        keys = (past_key_values.get_seq_length() if past_key_values is not None else 0) + new_tokens
    else:
        slots = cache_capacity(past_key_values)
        _refuse_tokens_past_the_cache(keys, new_tokens, slots)
        _refuse_mask_longer_than_cache(attention_mask, slots)
    if attention_mask.shape[1] < keys:
        raise ValueError(
            f"a 2-D attention_mask must cover the cached and the new tokens ({keys - new_tokens} + {new_tokens} = "
            f"{keys} positions), got {attention_mask.shape[1]} (shape {list(attention_mask.shape)})"
        )
    return attention_mask[:, :keys]


def _fixed_cache_position(past_key_values, new_tokens: int, device, cache_position: Optional[torch.Tensor]):
    """Where a call writes into a fixed-size cache: the caller's ``cache_position``, else the cache's count plus
    0 .. new_tokens - 1 (a tensor: no host sync, and a static shape while tracing). Neither a 4-D mask nor a traced
    2-D one says it (caches before transformers 5.4 need it)."""
    if cache_position is not None or not getattr(past_key_values, "is_compileable", False):
        return cache_position
    return torch.arange(new_tokens, device=device) + past_key_values.get_seq_length()


def _mask_over_cache_slots(attention_mask: torch.Tensor, slots: int) -> torch.Tensor:
    """A 2-D padding mask as bool ``[batch, slots]``: slots past its end hold nothing yet."""
    _refuse_mask_longer_than_cache(attention_mask, slots)
    return F.pad(attention_mask.bool(), (0, slots - attention_mask.shape[1]), value=False)


def _refuse_tokens_past_the_cache(keys: int, new_tokens: int, slots: int) -> None:
    if keys > slots:
        raise ValueError(
            f"the cache has {slots} slots: {keys - new_tokens} cached and {new_tokens} new tokens do not fit "
            "(build it with a larger max_cache_len)"
        )


def _refuse_mask_longer_than_cache(attention_mask: torch.Tensor, slots: int) -> None:
    if attention_mask.shape[1] > slots:
        raise ValueError(
            f"a 2-D attention_mask of {attention_mask.shape[1]} positions is longer than the cache's {slots} slots"
        )


def traced_cache_position(
    past_key_values, new_tokens: int, device, cache_position: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """Where a traced call into a fixed-size cache puts its tokens (``_fixed_cache_position``): neither a mask's
    length nor the cache's capacity says it. Outside such a call, ``cache_position`` as given."""
    if not _traced_into_fixed_cache(past_key_values):
        return cache_position
    return _fixed_cache_position(past_key_values, new_tokens, device, cache_position)


def visible_cache_slots(cache_position: torch.Tensor, slots: int) -> torch.Tensor:
    """Bool ``[new, slots]``: each new token sees the cache's slots up to its own position."""
    return torch.arange(slots, device=cache_position.device) <= cache_position[:, None]


def cache_slots_mask(kept_slots: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """Bool ``[batch, 1, new, slots]`` from a bool ``[batch, slots]``: the kept slots up to each new token's
    position, as transformers' static-cache masks."""
    visible = visible_cache_slots(cache_position.to(kept_slots.device), kept_slots.shape[-1])
    return kept_slots[:, None, None, :] & visible


def _traced_into_fixed_cache(past_key_values) -> bool:
    return _is_tracing() and getattr(past_key_values, "is_compileable", False)


def cache_capacity(cache) -> int:
    """How many tokens a fixed-size cache holds (``get_max_length`` since transformers 5.2x, before that
    ``get_max_cache_shape``)."""
    if hasattr(cache, "get_max_length"):  # not ``getattr(...) or``: dynamo before torch 2.13 breaks the graph there
        return cache.get_max_length()
    return cache.get_max_cache_shape()


def broadcast_encoder_batch(
    batch: int, encoder_hidden_states: Optional[torch.Tensor], encoder_attention_mask: Optional[torch.Tensor]
) -> tuple:
    """One encoder row's states (and mask) for a decoder batch of ``batch`` rows: stock's attention matmuls
    broadcast a single source over every decoder row (one source scored against several targets). The states
    are copied, not only expanded: GPT-2's ``Conv1D`` views its input as rows."""
    if encoder_hidden_states is None or encoder_hidden_states.shape[0] != 1 or batch == 1:
        return encoder_hidden_states, encoder_attention_mask
    encoder_hidden_states = encoder_hidden_states.expand(batch, *encoder_hidden_states.shape[1:]).contiguous()
    if encoder_attention_mask is not None and encoder_attention_mask.shape[0] == 1:
        encoder_attention_mask = encoder_attention_mask.expand(batch, *encoder_attention_mask.shape[1:])
    return encoder_hidden_states, encoder_attention_mask


def filled_cache_length(past_key_values, attention_mask: Optional[torch.Tensor], new_tokens: int) -> Optional[int]:
    """How many slots of a fixed-size cache hold keys once this forward has written its ``new_tokens``.

    ``StaticCache.update`` returns its whole buffer, unwritten slots included, and a causal call aligns its
    queries with the end of the keys, so without a 4-D mask the layers must attend to the written slots only
    (``update_cache``). None where nothing is to cut: no cache, a cache that grows, or a 4-D mask (it says which
    slots each query sees, as transformers' static-cache masks do). While tracing, a 2-D mask's length (past
    + new tokens) gives the count without reading the cache; without a mask the count would be data-dependent,
    and the call runs as given (``generate`` compiles decoding steps with a mask).
    """
    if past_key_values is None or not getattr(past_key_values, "is_compileable", False):
        return None
    if attention_mask is not None and attention_mask.dim() != 2:
        return None
    if _is_tracing():
        return None if attention_mask is None else attention_mask.shape[1]
    return int(past_key_values.get_seq_length()) + new_tokens


def _filled_keys(mask) -> Optional[int]:
    """The ``filled_keys`` of the forward's ``ForwardMask`` (None for a bare mask or none)."""
    return mask.filled_keys if isinstance(mask, ForwardMask) else None


def cache_update_kwargs(
    mask, new_tokens: int, device, cache_position: Optional[torch.Tensor] = None, filled: Optional[int] = None
) -> dict:
    """``cache_kwargs`` for ``Cache.update``: where the new tokens go. transformers 4.x static caches write at
    ``cache_position`` (without it, at 0 .. new_tokens - 1; later ones track it themselves); when the caller gave
    none, it follows from the forward's ``filled_keys`` (``filled_cache_length``), else from ``filled`` (the keys
    after this update, where a layer knows them without our mask: a patched stock BLOOM's)."""
    if cache_position is None and isinstance(mask, ForwardMask):
        cache_position = mask.cache_position
    mask_filled = _filled_keys(mask)
    filled = mask_filled if mask_filled is not None else filled
    if cache_position is None and filled is not None:
        cache_position = torch.arange(filled - new_tokens, filled, device=device)
    return {"cache_position": cache_position}


def update_cache(
    cache,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_idx: int,
    mask,
    cache_position: Optional[torch.Tensor] = None,
    filled: Optional[int] = None,
) -> tuple:
    """``cache.update`` of a layer's new ``key``/``value`` ``[b, h, new, d]`` (at ``cache_update_kwargs``' positions),
    returning the keys and values to attend to: without a fixed-size cache's unwritten slots, the first ``filled``
    (by default the ``filled_keys`` of the forward's ``ForwardMask``, ``filled_cache_length``). A cut is noted on
    the ``ForwardMask``, so that attention weights asked for span the whole cache, as stock's do. A growing cache
    with more than ``filled`` keys was written twice by this forward: refused."""
    where = cache_update_kwargs(mask, key.shape[-2], key.device, cache_position, filled)
    key, value = cache.update(key, value, layer_idx, where)
    filled = _filled_keys(mask) if filled is None else filled
    if filled is None or key.shape[-2] <= filled:
        return key, value
    if not getattr(cache, "is_compileable", False):
        raise ValueError(
            f"the cache of layer {layer_idx} holds {key.shape[-2]} keys where this forward has {filled}: the layer "
            "ran twice in one forward (one module in two places of the stack?), and both wrote to that cache "
            "layer; give each place its own copy (copy.deepcopy) with its own layer_idx"
        )
    if isinstance(mask, ForwardMask):
        mask.cache_slots = key.shape[-2]
    return key[:, :, :filled], value[:, :, :filled]


def mask_tensor(mask) -> Optional[torch.Tensor]:
    """The tensor of a mask given bare or in a ``ForwardMask`` (None for none)."""
    return mask.tensor if isinstance(mask, ForwardMask) else mask


def _once_per_forward(holder: Optional[ForwardMask], slot: tuple, inputs: tuple, compute: Callable):
    """``compute()``, kept on the forward's ``ForwardMask`` under ``slot`` for as long as the same ``inputs``
    (tensors, compared by identity) come back: every layer of a forward passes the same mask and sequence ids,
    so what is derived from them is worked out once per forward. Without a holder every call computes, as
    every call does while compiling (the compiled graph runs none of this per call anyway)."""
    if holder is None or torch.compiler.is_compiling():
        return compute()
    entry = holder.kept.get(slot)
    if entry is None or len(entry[0]) != len(inputs) or any(a is not b for a, b in zip(entry[0], inputs)):
        entry = holder.kept[slot] = (inputs, compute())
    return entry[1]


def _mask_kind(mask: Optional[torch.Tensor], batch: int, heads: int, q_len: int, k_len: int) -> str:
    if mask is None:
        return "none"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, a ForwardMask or None, got {type(mask).__name__}")
    if mask.dim() == 2:
        if mask.dtype != torch.bool:
            raise ValueError(
                f"a 2-D attention_mask must be a bool keep-mask [batch, k_len], got dtype {mask.dtype}; "
                "convert a 0/1 padding mask with keep_mask_from_padding()"
            )
        if tuple(mask.shape) != (batch, k_len):
            raise ValueError(
                f"a 2-D attention_mask must have shape [batch, k_len] = [{batch}, {k_len}], got {list(mask.shape)}"
            )
        return "padding"
    if mask.dim() != 4:
        raise ValueError(
            "attention_mask must be a bool keep-mask [batch, k_len] or a 4-D mask broadcastable to "
            f"[batch, heads, q_len, k_len]; got {mask.dim()} dimensions {list(mask.shape)}"
        )
    for size, full, name in zip(mask.shape, (batch, heads, q_len, k_len), ("batch", "heads", "q_len", "k_len")):
        if size not in (1, full):
            raise ValueError(
                f"attention_mask of shape {list(mask.shape)} does not broadcast to "
                f"[batch, heads, q_len, k_len] = [{batch}, {heads}, {q_len}, {k_len}] (dimension {name})"
            )
    if mask.dtype == torch.bool:
        return "bool"
    if mask.dtype in FLOAT_DTYPES:
        return "additive"
    raise ValueError(f"a 4-D attention_mask must be bool (True = attend) or floating (additive), got {mask.dtype}")


def _check_sequence_ids(sequence_ids: Optional[torch.Tensor], attention_mask, batch: int, k_len: int, device) -> bool:
    if sequence_ids is None:
        return False
    if not isinstance(sequence_ids, torch.Tensor):
        raise TypeError(f"sequence_ids must be an integer tensor [batch, k_len], got {type(sequence_ids).__name__}")
    if sequence_ids.dtype.is_floating_point or sequence_ids.dtype.is_complex or sequence_ids.dtype == torch.bool:
        raise ValueError(f"sequence_ids must be an integer tensor [batch, k_len], got dtype {sequence_ids.dtype}")
    if tuple(sequence_ids.shape) != (batch, k_len):
        raise ValueError(
            f"sequence_ids must have shape [batch, k_len] = [{batch}, {k_len}], got {list(sequence_ids.shape)}"
        )
    if sequence_ids.device != device:
        raise ValueError(f"sequence_ids must be on the device of q ({device}), got {sequence_ids.device}")
    if attention_mask is not None and attention_mask.dim() == 4:
        raise ValueError(
            "sequence_ids cannot be combined with a 4-D attention_mask: fold the documents into the 4-D mask, "
            "or pass a [batch, k_len] padding mask"
        )
    return True


def _check_are_tensors(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_tensors(q, k, v) -> None:
    _check_are_tensors(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k and v must be 4-D [batch, heads, seq, head_dim]; got shapes "
            f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share one floating dtype (float16, bfloat16, float32, float64); got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k and v must be [batch, kv_heads, k_len, head_dim] matching q {list(q.shape)}; got {list(k.shape)}, {list(v.shape)}"
        )
    empty = [name for name, size in zip(("batch", "heads", "q_len", "head_dim"), q.shape) if size == 0]
    empty += [name for name, size in zip(("kv_heads", "k_len"), k.shape[1:3]) if size == 0]
    if empty:
        raise ValueError(f"attention got an empty dimension ({', '.join(empty)}): q {list(q.shape)}, k {list(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def _check_switches(**switches) -> None:
    """True/False arguments: anything else (a string "false", a tensor) would be read by its truth value."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a Python bool, got {type(value).__name__} {value!r}")


def _check_scalars(causal, dropout_p) -> None:
    _check_switches(causal=causal)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


def _check_options(q, attention_mask, alibi_slopes, causal, dropout_p) -> None:
    """The caller's mistakes, caught before any backend runs (a backend never pays for them)."""
    _check_scalars(causal, dropout_p)
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.device != q.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, but q, k and v are on {q.device}")
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    heads = q.shape[1]
    if alibi_slopes.dim() != 1 or alibi_slopes.shape[0] != heads:
        raise ValueError(f"alibi_slopes must have shape [heads] = [{heads}], got {list(alibi_slopes.shape)}")
    if alibi_slopes.dtype not in FLOAT_DTYPES:
        raise ValueError(f"alibi_slopes must be floating (float32 is best), got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, but q, k and v are on {q.device}")


def _describe(q, k, v, causal, attention_mask, alibi_slopes, dropout_p, sequence_ids=None) -> AttentionCall:
    holder = attention_mask if isinstance(attention_mask, ForwardMask) else None
    attention_mask = mask_tensor(attention_mask)
    _check_tensors(q, k, v)
    _check_options(q, attention_mask, alibi_slopes, causal, dropout_p)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    mask_kind = _mask_kind(attention_mask, batch, heads, q_len, k_len)
    keys_must_cover_queries = sequence_ids is not None or (alibi_slopes is not None and mask_kind == "padding")
    if keys_must_cover_queries and q_len > k_len:  # in this order: a traced q_len > k_len is a guard on the shapes
        given = "sequence_ids" if sequence_ids is not None else "alibi_slopes and a [b, k_len] keep-mask"
        raise ValueError(
            f"q_len {q_len} > k_len {k_len} with {given}: the queries take the positions of the last q_len "
            "keys, so there must be at least as many keys"
        )
    return AttentionCall(
        device_type=q.device.type,
        dtype=q.dtype,
        head_dim=head_dim,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        k_len=k_len,
        causal=causal,
        mask_kind=mask_kind,
        documents=_check_sequence_ids(sequence_ids, attention_mask, batch, k_len, q.device),
        alibi=alibi_slopes is not None,
        dropout_p=float(dropout_p),
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        bias_needs_grad=torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (attention_mask if mask_kind == "additive" else None, alibi_slopes)
        ),
        padding_mask=attention_mask if mask_kind == "padding" else None,
        slopes=alibi_slopes,
        holder=holder,
    )


# ----------------------------------------------------------------------------------------------
# Shared mask arithmetic (dense forms are used only by sdpa and eager, and by chunked per block)
# ----------------------------------------------------------------------------------------------


def _additive_hidden(mask: torch.Tensor) -> torch.Tensor:
    """Positions an additive mask hides: -inf or the dtype's minimum (transformers' convention), and for a
    float64 mask anything at or below float32's minimum, which a float32 softmax would read as -inf (every
    backend then agrees, whatever the inputs' dtype)."""
    return mask <= max(torch.finfo(mask.dtype).min, torch.finfo(torch.float32).min)


def _additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask's entries in ``dtype``, the hidden ones 0 (the keep-mask hides them)."""
    return mask.to(dtype).masked_fill(_additive_hidden(mask), 0.0)


def _document_index(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] ids -> [b, s] index of the document each token is in: a new document starts wherever the id
    changes along the row (so every backend agrees even on ids such as [0, 0, 1, 0])."""
    starts = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return F.pad(starts.cumsum(-1, dtype=torch.int32), (1, 0))


def _kept_positions(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[b, k] position of each key counting only kept keys: ALiBi distances skip padding, as in BLOOM."""
    return keep.cumsum(-1, dtype=dtype)


def _alibi_key_positions(call: AttentionCall) -> Optional[torch.Tensor]:
    """``[b, k_len]`` ALiBi positions of a 4-D mask call's keys, where the model gives them on its ``ForwardMask``:
    BLOOM's traced prefill into a fixed-size cache, whose 4-D mask keeps slots by cache position while ALiBi
    counts only kept keys (a hole inside a row is no distance). A query's own position adds the same to every
    score of its row, which softmax ignores, so the query side keeps its slot index."""
    return None if call.holder is None or not call.alibi else call.holder.alibi_key_positions


def _query_slice(call: AttentionCall, rows: slice) -> slice:
    """The key positions of query rows (bottom-right aligned)."""
    return slice(rows.start + call.causal_offset, rows.stop + call.causal_offset)


def _mask_block(mask: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """The rows x cols block of a 4-D mask broadcastable to [b, h, q_len, k_len] (a size-1 dim stays whole)."""
    return mask[:, :, rows if mask.shape[2] != 1 else slice(None), cols if mask.shape[3] != 1 else slice(None)]


def _block_keep(call: AttentionCall, mask, rows: slice, cols: slice, device, documents=None) -> Optional[torch.Tensor]:
    """Bool keep-mask of the block rows x cols, broadcastable to [b, h, rows, cols]; None = keep all.
    ``documents`` is ``_document_index`` of the call's sequence_ids."""
    keep = None
    if documents is not None:
        keep = (documents[:, None, _query_slice(call, rows), None] == documents[:, None, None, cols])
    if call.causal:
        q_pos = torch.arange(rows.start, rows.stop, device=device)[:, None] + call.causal_offset
        k_pos = torch.arange(cols.start, cols.stop, device=device)[None, :]
        causal = (k_pos <= q_pos)[None, None]
        keep = causal if keep is None else keep & causal
    if call.mask_kind == "padding":
        pad = mask[:, None, None, cols]
        keep = pad if keep is None else keep & pad
    elif call.mask_kind in ("bool", "additive"):
        block = _mask_block(mask, rows, cols)
        block_keep = block if call.mask_kind == "bool" else ~_additive_hidden(block)
        keep = block_keep if keep is None else keep & block_keep
    return keep


def _block_bias(
    call: AttentionCall, mask, alibi_slopes, rows: slice, cols: slice, device, key_positions=None
) -> Optional[torch.Tensor]:
    """Additive bias of the block (ALiBi and an additive mask) in the call's compute dtype (float32, or float64
    for float64 inputs), broadcastable to [b, h, rows, cols]. ``key_positions``: ``_alibi_key_positions``."""
    dtype, bias = _compute_dtype(call.dtype), None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=device, dtype=dtype)[None, :, None, None]
        if call.mask_kind == "padding":
            positions = _kept_positions(mask, dtype)
            bias = slopes * (positions[:, None, None, cols] - positions[:, None, _query_slice(call, rows), None])
        else:
            q_pos = torch.arange(rows.start, rows.stop, device=device, dtype=dtype)[:, None] + call.causal_offset
            if key_positions is None:
                k_pos = torch.arange(cols.start, cols.stop, device=device, dtype=dtype)[None, :]
            else:
                k_pos = key_positions[:, None, None, cols].to(device=device, dtype=dtype)
            bias = slopes * (k_pos - q_pos)
    if call.mask_kind == "additive":
        block = _mask_block(mask, rows, cols)
        block = _additive_bias(block, dtype)
        bias = block if bias is None else bias + block
    return bias


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention: [b, h_kv, s, d] -> [b, h, s, d]."""
    batch, kv_heads, seq, dim = x.shape
    if kv_heads == heads:
        return x
    return x[:, :, None].expand(batch, kv_heads, heads // kv_heads, seq, dim).reshape(batch, heads, seq, dim)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation precision: float32 for half types, the input's own precision otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _zero_empty_rows(out: torch.Tensor, row_has_key: Optional[torch.Tensor]) -> torch.Tensor:
    return out if row_has_key is None else out.masked_fill(~row_has_key, 0.0)


def _keys_no_query_sees(call: AttentionCall, mask) -> Optional[torch.Tensor]:
    """``[b or 1, 1, k_len, 1]``, True at keys hidden from every query (padding); None when the mask says
    nothing per key (no mask, or a 4-D mask that differs per head or per query row)."""
    if call.mask_kind == "padding":
        return ~mask[:, None, :, None]
    if call.mask_kind in ("bool", "additive") and mask.shape[1] == 1 and mask.shape[2] == 1:
        hidden = ~mask if call.mask_kind == "bool" else _additive_hidden(mask)
        return hidden[:, :, 0, :, None]
    return None


def _clear_padded_keys(k: torch.Tensor, v: torch.Tensor, call: AttentionCall, mask):
    """Zero k and v where no query can see them, so a NaN or inf in a padded key never reaches any output
    (a hidden key's probability is 0, but 0 * NaN is NaN inside every kernel's matmul)."""
    hidden = _keys_no_query_sees(call, mask)
    if hidden is None:
        return k, v
    return k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)


# ----------------------------------------------------------------------------------------------
# Light softmax and fused dropout-matmul (the eager path made lighter)
# ----------------------------------------------------------------------------------------------


def _under_function_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``; Opacus's per-sample gradients
    of layers it has no rule for) or forward-mode AD (a ``torch.autograd.forward_ad.dual_level``) is running. Our
    autograd Functions have no ``setup_context``, vmap rule or ``jvp``, which those need, so the fused ops and
    attention's own paths then compute as stock does; logged once."""
    if not (torch._C._are_functorch_transforms_active() or _forward_ad_active()):
        return False
    _log_once(
        "a torch.func transform or forward-mode AD is running: the fused ops (loss, norms, MLP, RoPE, tiles, "
        "offloaded checkpoints) compute as stock does, holding what stock holds, and attention runs on sdpa or "
        "plain eager (another backend named explicitly is refused)"
    )
    return True


def _forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level()`` is open (its dual tensors need forward derivatives)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _computes_as_stock() -> bool:
    """Whether the fused ops and attention's own paths compute as stock does, with torch's operators only: under
    a ``torch.func`` transform (``_under_function_transform``), and while ``torch.export`` or ``torch.onnx``
    traces (``_is_exporting``), so that an exported program holds no op of ours (it has a backward, loads where
    this file was never imported, and lowers to runtimes such as ExecuTorch and ONNX Runtime that know torch's
    operators only); logged once."""
    if _under_function_transform() or _under_users_function_mode():
        return True
    if not (_is_exporting() or torch.jit.is_tracing()):
        return False
    _log_once(
        "torch.export, torch.onnx or torch.jit.trace is tracing: the fused ops (loss, norms, MLP, RoPE, tiles, "
        "offloaded checkpoints) compute as stock does and attention's auto backend takes sdpa or plain eager, so "
        "the program holds torch's operators only (a traced module is saved by torch.jit.save)"
    )
    return True


def _under_users_function_mode() -> bool:
    """Whether a ``TorchFunctionMode`` of the caller's is active (torch's own ``torch.device(...)`` context aside).
    Such a mode sees, and may change, the calls inside our autograd Functions' forwards (a fake-quantized weight
    given to ``F.linear``), which their backwards would not see; the fused ops then compute as stock does, so that
    the mode sees stock's calls; logged once."""
    if torch.compiler.is_compiling() or torch._C._len_torch_function_stack() == 0:
        return False
    modes = torch.overrides._get_current_function_mode_stack()
    if all(type(mode).__name__ == "DeviceContext" for mode in modes):
        return False
    _log_once(
        "a TorchFunctionMode is active: the fused ops (loss, norms, MLP, RoPE, tiles, offloaded checkpoints) compute "
        "as stock does and padded batches keep their rows, so that the mode sees the calls stock makes"
    )
    return True


def _is_exporting() -> bool:
    """Whether ``torch.export`` is tracing, or ``torch.onnx``'s TorchScript exporter (``dynamo=False``), which
    drops what an autograd Function of ours writes into its output slice by slice (attention came out of
    ``chunked`` as a constant). The flag export sets is read where torch has it: torch 2.11's dynamo folds
    ``torch.compiler.is_exporting()`` to True in every graph it traces, ``torch.compile``'s included."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        exporting = flag
    else:
        is_exporting = getattr(torch.compiler, "is_exporting", None)
        exporting = is_exporting is not None and is_exporting()
    return exporting and _traced_in_this_thread() or torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def _traced_in_this_thread() -> bool:
    """Whether this thread's code is being traced: dynamo tracing it, or fake tensors running through it (a
    non-strict export, AOTAutograd). torch sets its export flag for the whole process, so another thread's
    export would otherwise move this thread's models onto the paths they take while exported."""
    dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", None)
    return (dynamo_compiling is not None and dynamo_compiling()) or _fake_tensor_mode_active()


def _refuse_double_backward(op: str) -> None:
    """Called first in the backward of ops whose backward is not itself differentiable: autograd runs a backward
    with gradients recorded only for ``create_graph=True``, whose second derivatives would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: gradients of gradients (backward with create_graph=True: gradient penalties, Hessian-vector "
            "products, influence functions) are not supported by this op's backward: take them with torch.func "
            "(torch.func.hessian, grad of grad; the fused ops then compute as stock does, attention on "
            "config.attn_backend='eager'), or run the stock class"
        )


def _savable(x: torch.Tensor) -> torch.Tensor:
    """``x``, as a forward saves it for backward: a copy of a tensor made under ``torch.inference_mode`` (frozen
    features passed as ``inputs_embeds``), which autograd refuses to save; stock's norms save a tensor of their own
    there, so they train on such inputs."""
    return x.clone() if not _is_tracing() and x.is_inference() else x


def _pass_unused_gradients_as_none(ctx) -> None:
    """Called in forward: backward then gets None, not zeros, for an output whose gradient is undefined (it
    reaches no loss, or only through an op without a derivative, such as ``quantize_dynamic``'s linears), and
    passes None on, so the parameters behind it keep a None gradient, as stock's do (optimizers skip those; zeros
    would be decayed). Traced graphs make their own gradients (dynamo cannot trace the call)."""
    if not _is_tracing():
        ctx.set_materialize_grads(False)


def _keep_fake_constants_whole(ctx, constants: tuple) -> None:
    """Under a ``FakeTensorMode`` outside tracing (memory estimators), hold the Python objects of saved tensors made
    in forward that nothing else keeps (masks, slopes): torch 2.9 unpacks a saved fake tensor whose object died as a
    bare ``FakeTensor`` without its ``fake_mode``, on which backward's first device query fails."""
    if not _is_tracing() and _fake_tensor_mode_active():
        ctx.fake_constants = constants


def _none_for_every_input(ctx) -> tuple:
    """A backward's result when its output's gradient is undefined (see ``_pass_unused_gradients_as_none``)."""
    return (None,) * len(ctx.needs_input_grad)


class LightSoftmax(torch.autograd.Function):
    """Softmax over the last dim, computed in float32, that keeps only its output (in the input dtype) for backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1, dtype=_compute_dtype(scores.dtype))
        if probs.dtype != scores.dtype:  # a no-op .to() returns an alias, whose gradient torch 2.11's dynamo drops
            probs = probs.to(scores.dtype)
        ctx.save_for_backward(probs)
        _pass_unused_gradients_as_none(ctx)
        return probs

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor):
        if grad_probs is None:
            return _none_for_every_input(ctx)
        (probs,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad_probs.to(probs.dtype), probs, -1, probs.dtype)


class DropoutMatmul(torch.autograd.Function):
    """``dropout(probs) @ value`` that saves the bool dropout mask instead of the dropped probabilities."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, value: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty_like(probs).bernoulli_(1.0 - p).bool()
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(probs, value, keep)
        ctx.scale = scale
        _pass_unused_gradients_as_none(ctx)
        return torch.matmul(probs * keep * scale, value)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if grad_out is None:
            return _none_for_every_input(ctx)
        probs, value, keep = ctx.saved_tensors
        dropped = probs * keep * ctx.scale
        grad_value = torch.matmul(dropped.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, value.transpose(-1, -2)) * keep * ctx.scale
        return grad_probs, grad_value, None


# ----------------------------------------------------------------------------------------------
# Backend: eager
# ----------------------------------------------------------------------------------------------


def _documents_of(call: AttentionCall, sequence_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``_document_index`` of the call's sequence ids, once per forward (None without them)."""
    if sequence_ids is None:
        return None
    return _once_per_forward(call.holder, ("documents",), (sequence_ids,), lambda: _document_index(sequence_ids))


def _eager_probabilities(q, k, call: AttentionCall, mask, alibi_slopes, scale, light_softmax=True, sequence_ids=None):
    """Softmax weights ``[b, h, q_len, k_len]`` and which query rows see a key (None: all of them)."""
    k = _expand_kv(k, call.heads)
    rows, cols = slice(0, call.q_len), slice(0, call.k_len)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = _block_keep(call, mask, rows, cols, q.device, _documents_of(call, sequence_ids))
    bias = _block_bias(call, mask, alibi_slopes, rows, cols, q.device, _alibi_key_positions(call))
    if bias is not None:
        scores = _biased_scores(scores, bias, keep)
    row_has_key = None
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        row_has_key = keep.any(dim=-1, keepdim=True)
    if light_softmax and not _computes_as_stock():
        probs = LightSoftmax.apply(scores)
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs, row_has_key


def _biased_scores(scores: torch.Tensor, bias: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``scores + bias`` summed in the compute dtype, less each row's largest visible score, in the scores'
    dtype. Softmax does not change; what changes is what a 16-bit cast keeps: ALiBi over a long non-causal row
    adds hundreds, where bfloat16 steps by 2 to 4, but the scores near a row's largest decide its weights."""
    biased = scores.to(_compute_dtype(scores.dtype)) + bias
    visible = biased if keep is None else biased.masked_fill(~keep, float("-inf"))
    largest = visible.amax(dim=-1, keepdim=True)
    return (biased - torch.where(torch.isfinite(largest), largest, 0.0)).to(scores.dtype)


def _run_eager(
    q, k, v, call: AttentionCall, mask, alibi_slopes, scale, light_softmax=True, dropout_matmul=True, sequence_ids=None, **_
):
    probs, row_has_key = _eager_probabilities(q, k, call, mask, alibi_slopes, scale, light_softmax, sequence_ids)
    v = _expand_kv(v, call.heads)
    if call.dropout_p > 0.0 and dropout_matmul and not _computes_as_stock():
        out = DropoutMatmul.apply(probs, v, call.dropout_p)
    else:
        out = torch.matmul(F.dropout(probs, p=call.dropout_p, training=call.dropout_p > 0.0), v)
    return _zero_empty_rows(out, row_has_key)


# ----------------------------------------------------------------------------------------------
# Backend: sdpa
# ----------------------------------------------------------------------------------------------


_hopper_or_newer: dict = {}


def _is_hopper_or_newer(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _hopper_or_newer:
        _hopper_or_newer[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _hopper_or_newer[index]


def _sdpa_priority(call: AttentionCall, device: torch.device) -> Optional[list]:
    """SDPA's kernel order on Hopper and newer: cuDNN first for full-sequence calls (prefill) and for every
    call that trains (cross-attention included: forward and backward of a 1k-query, 8k-key call take 0.73 ms
    against flash's 0.94 ms on an H200), where it is the fastest; flash first for an inference call whose key
    length differs from its query length (decoding with a KV cache), because cuDNN builds a new execution plan
    for every new key length. None: PyTorch's own order.

    Only the priority changes (kernels the user disabled stay disabled), and it is set through two cheap
    calls rather than ``sdpa_kernel``, which costs more than a decoding step's attention kernel and, in some
    PyTorch versions, does not restore the priority order on exit.
    """
    if call.device_type != "cuda" or not hasattr(torch._C, "_set_sdp_priority_order"):
        return None
    if torch.compiler.is_compiling() or not _is_hopper_or_newer(device):
        return None
    _settle_default_sdpa_priority(device)
    from torch.nn.attention import SDPBackend

    full, flash = int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)
    return [full, flash] if call.q_len == call.k_len or call.needs_grad else [flash, full]


# PyTorch keeps SDPA's kernel priority in one process-wide setting; every change of it, and the kernel call
# made under it, happens while holding this lock, so threads never run under each other's order.
_sdpa_priority_lock = threading.Lock()
_sdpa_default_settled: list = []  # one entry once PyTorch has put its default order in place


def _settle_default_sdpa_priority(device: torch.device) -> None:
    """Let PyTorch put its default SDPA order in place before the first time ours is set.

    PyTorch settles its default order (cuDNN first on Hopper and Blackwell with a recent cuDNN) at the
    process's first SDPA dispatch on CUDA, and never again. Read before that, the order is a placeholder with
    flash first; restoring it after our call would make it the process's order for good, and every later SDPA
    call (stock models, compiled graphs) would run flash where PyTorch picks cuDNN (2x slower at 8k tokens
    on an H200). One dispatch decision, which runs no kernel, settles the default first.
    """
    if _sdpa_default_settled:
        return
    with _sdpa_priority_lock:
        if not _sdpa_default_settled:
            probe = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.float16)
            try:
                torch._fused_sdp_choice(probe, probe, probe)
            except RuntimeError:  # every SDPA kernel disabled by the user: nothing to settle
                pass
            _sdpa_default_settled.append(True)


def _with_sdpa_priority(first: Optional[list], run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()`` with the backends in ``first`` ahead of the others, then the previous order restored.

    The lock is held only around the kernel launch (CUDA runs it asynchronously), and the order is restored
    before it is released, so another thread sees the order it left and the global order never drifts.
    """
    if first is None:
        return run()
    with _sdpa_priority_lock:
        previous = list(torch._C._get_sdp_priority_order())
        wanted = first + [backend for backend in previous if backend not in first]
        if wanted == previous:
            return run()
        torch._C._set_sdp_priority_order(wanted)
        try:
            return run()
        finally:
            torch._C._set_sdp_priority_order(previous)


def _flash_varlen_ops() -> tuple:
    """PyTorch's own flash-attention varlen kernels (the ones SDPA's nested tensors reach), forward and backward."""
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward


def _flash_varlen_takes(q: torch.Tensor, k: torch.Tensor, dropout_p: float, causal: bool) -> bool:
    """Whether PyTorch's flash kernels take these packed ``[tokens, heads, dim]`` queries and keys directly:
    flash enabled in SDPA's settings, and SDPA's own checks for flash passed (GPU, dtype, head dim, and the
    head dims whose backward a GPU lacks), asked of the tokens seen as one sequence."""
    if not (q.is_cuda and torch.backends.cuda.flash_sdp_enabled()):
        return False
    dense_q, dense_k = (x.transpose(0, 1)[None] for x in (q, k))
    params = torch.backends.cuda.SDPAParams(dense_q, dense_k, dense_k, None, dropout_p, causal, k.shape[1] != q.shape[1])
    return torch.backends.cuda.can_use_flash_attention(params, False)


class _FlashVarlenAttention(torch.autograd.Function):
    """Packed sequences on PyTorch's flash varlen kernels, called without nested tensors: their autograd runs
    in Python around every view and kept the host, not the GPU, busy (README, "Padded batches run unpadded").
    The kernels take grouped key-value heads as they are, and replay their own dropout in backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, causal):
        forward_op, _ = _flash_varlen_ops()
        out, lse, rng_state, rng_offset, _ = forward_op(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, rng_offset)
        ctx.options = (max_seqlen_q, max_seqlen_k, dropout_p, causal, scale)
        _pass_unused_gradients_as_none(ctx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("flash-attention varlen")
        if grad_out is None:
            return _none_for_every_input(ctx)
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, rng_offset = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, dropout_p, causal, scale = ctx.options
        _, backward_op = _flash_varlen_ops()
        grad_q, grad_k, grad_v = backward_op(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p, causal, rng_state, rng_offset, scale=scale,
        )
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


def _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal):
    """flash_attn_varlen_func's contract on SDPA: packed ``[tokens, heads, dim]`` sequences delimited by
    ``cu_seqlens``, on PyTorch's flash varlen kernels where they take the call, else as nested jagged tensors
    (memory-efficient varlen kernels), which take no GQA: there the packed keys and values are repeated per
    head (O(tokens))."""
    if _flash_varlen_takes(q, k, dropout_p, causal):
        return _FlashVarlenAttention.apply(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal
        )
    heads = q.shape[1]
    k, v = (_expand_kv(x.transpose(0, 1)[None], heads)[0].transpose(0, 1) for x in (k, v))

    def nested(x, cu_seqlens, longest):
        jagged = torch.nested.nested_tensor_from_jagged(x, cu_seqlens.long(), max_seqlen=longest)
        return jagged.transpose(1, 2)

    out = F.scaled_dot_product_attention(
        nested(q, cu_seqlens_q, max_seqlen_q),
        nested(k, cu_seqlens_k, max_seqlen_k),
        nested(v, cu_seqlens_k, max_seqlen_k),
        dropout_p=dropout_p,
        is_causal=causal,
        scale=softmax_scale,
    )
    return out.transpose(1, 2).values()


def _sdpa_runs_varlen(call: AttentionCall) -> bool:
    """Whether sdpa runs a padded or packed call on its nested jagged (varlen) kernels, each row or document alone."""
    return call.ragged and call.q_len > 1 and _sdpa_needs_dense_mask(call) is None and not _computes_as_stock()


def _run_sdpa(q, k, v, call: AttentionCall, mask, alibi_slopes, scale, sequence_ids=None, **_):
    if _sdpa_runs_varlen(call):
        return _run_varlen(_sdpa_varlen, q, k, v, call, mask, sequence_ids, scale)
    dropout = call.dropout_p
    no_mask = call.mask_kind == "none" and not call.documents and not call.alibi
    if no_mask and (not call.causal or call.q_len == 1 and call.k_len >= 1 or call.q_len == call.k_len):
        # a branch, not bool(): under dynamic shapes the comparison is a SymBool, which SDPA does not take
        is_causal = False
        if call.causal and call.q_len == call.k_len and call.q_len > 1:
            is_causal = True
        attn_mask, row_has_key = None, None
    else:
        is_causal = False
        rows, cols = slice(0, call.q_len), slice(0, call.k_len)
        keep = _block_keep(call, mask, rows, cols, q.device, _documents_of(call, sequence_ids))
        if keep is None:  # ALiBi alone: not causal, nothing masked
            keep = torch.ones(1, 1, 1, call.k_len, dtype=torch.bool, device=q.device)
        row_has_key = keep.any(dim=-1, keepdim=True)
        safe_keep = keep | ~row_has_key
        if call.alibi:  # one query row (_cannot_sdpa): the bias is O(k)
            bias = _block_bias(call, mask, alibi_slopes, rows, cols, q.device, _alibi_key_positions(call))
            attn_mask = bias.masked_fill(~safe_keep, float("-inf")).to(q.dtype)
        elif call.mask_kind == "additive":
            attn_mask = mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min).masked_fill(~safe_keep, float("-inf"))
        else:
            attn_mask = safe_keep
    gqa = call.kv_heads != call.heads
    if gqa and attn_mask is None:
        kwargs = {"enable_gqa": True}
    else:
        k, v, kwargs = _expand_kv(k, call.heads), _expand_kv(v, call.heads), {}
    run = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scale, **kwargs
    )
    out = _with_sdpa_priority(_sdpa_priority(call, q.device), run)
    return _zero_empty_rows(out, row_has_key)


# Custom ops need torch >= 2.4; without them an enclosing torch.compile traces the PyTorch bodies instead.
_custom_op = getattr(torch.library, "custom_op", None)
# One namespace per copy of this layer (a module name per modeling file), so copies never replace each other's ops.
_OPS_NAMESPACE = "memory_efficient_adapter_" + "".join(c if c.isalnum() else "_" for c in __name__)


def _opaque(
    name: str,
    schema: str,
    implementation: Callable,
    fake: Callable,
    mutates: tuple = (),
    tags: tuple = (),
    kernels: Optional[Callable] = None,
) -> Callable:
    """``implementation``, which an enclosing torch.compile sees as one custom op ``name`` (``schema``) whose
    outputs are shaped like ``fake``'s (run on fake tensors); outside torch.compile it runs directly.
    ``mutates``: the arguments it changes in place (marked ``(a!)`` in ``schema`` too); ``tags``: the op's
    ``torch.Tag``s. ``kernels``: the same math launching Triton kernels through ``_kernel_for``; where
    ``_traced_kernels_take`` the arguments, the compiler traces it instead (``_kernel_op``) and launches those
    kernels from its own code, without our Python around each launch."""
    if _custom_op is None:
        return lambda *args: _as_compiled_graphs_run(implementation, args)
    tagged = {"tags": tags} if tags else {}
    op = _custom_op(f"{_OPS_NAMESPACE}::{name}", implementation, mutates_args=mutates, schema=schema, **tagged)
    op.register_fake(fake)
    overload = getattr(getattr(torch.ops, _OPS_NAMESPACE), name).default
    traced = _kernel_op(f"{name}_kernels", schema, kernels) if kernels is not None else None

    def run(*args):
        if not torch.compiler.is_compiling():
            return _as_compiled_graphs_run(implementation, args)
        if traced is not None and _traced_kernels_take(*args):
            return traced(*args)
        return overload(*args)

    return run


def _as_compiled_graphs_run(implementation: Callable, args: tuple):
    """``implementation(*args)`` with autocast off on the arguments' device, as a compiled graph runs an opaque
    op. Our ops cast their inputs as autocast would before they are called, and keep float32 matmuls (attention
    scores and sums) in float32 on purpose: autocast left on would cast those to half in eager calls only."""
    if not _any_autocast_enabled():
        return implementation(*args)
    first = _first_tensor(args)
    device_type = first.device.type if first is not None else "meta"
    if not _autocast_enabled(device_type):
        return implementation(*args)
    with torch.autocast(device_type, enabled=False):
        return implementation(*args)


# One cheap check for the common case of no autocast at all (torch >= 2.4; else the per-device check decides).
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _first_tensor(args) -> Optional[torch.Tensor]:
    """The first tensor of ``args``, looking into lists (an op's ``Tensor[]`` argument)."""
    for arg in args:
        found = _first_tensor(arg) if isinstance(arg, (list, tuple)) else arg
        if isinstance(found, torch.Tensor):
            return found
    return None


_wrap_triton = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6
try:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    _TRACED_TENSOR_TYPES: tuple = (FakeTensor, FunctionalTensor)
except ImportError:
    FunctionalTensorMode = None
    _TRACED_TENSOR_TYPES = ()


@lru_cache(maxsize=1)
def _source_digest() -> Optional[str]:
    """A digest of this file's source, part of the traced ops' names. A compiled graph that a cache keeps on disk
    is keyed by the ops it calls, not by the launchers traced through them: with the digest in their names, an
    edited copy of this file never reuses a graph compiled from another. None where the source is unavailable."""
    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError, KeyError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _kernel_op(name: str, schema: str, kernels: Callable) -> Optional[Callable]:
    """An op (its overload) whose implementation and fake implementation are ``kernels``, and which a compiler
    tracing it (the functionalization of torch.compile's AOT tracing) decomposes into ``kernels``: their Triton
    launches, wrapped by ``_kernel_for``, land in its graph, and Inductor compiles and launches them itself
    (what ``torch.library.triton_op`` does, without importing Inductor when this layer loads). None where torch
    (< 2.6), Triton or this file's source is missing: the opaque custom op is used instead."""
    if _custom_op is None or triton is None or _wrap_triton is None or not _TRACED_TENSOR_TYPES:
        return None
    digest = _source_digest()
    if digest is None:
        return None
    traced_name = f"{name}_{digest}"
    op = _custom_op(f"{_OPS_NAMESPACE}::{traced_name}", kernels, mutates_args=(), schema=schema)
    op.register_fake(kernels)

    def decompose(mode, func, types, args, kwargs):
        with mode:
            return kernels(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, decompose)
    return getattr(getattr(torch.ops, _OPS_NAMESPACE), traced_name).default


def _traced_kernels_take(*args) -> bool:
    """Whether a compiled graph traces an op's Triton kernels for these (fake) arguments: every tensor on CUDA
    in a dtype the kernels take, and no kernel of this layer has failed to build on this machine."""
    return not _triton_failed and _triton_tensors(args)


def _kernel_for(kernel, tensor: torch.Tensor):
    """``kernel``, or, where ``tensor`` is one a compiler traces (inside a ``_kernel_op``),
    ``torch.library.wrap_triton(kernel)``, whose launch the compiler records in its graph."""
    return _wrap_triton(kernel) if isinstance(tensor, _TRACED_TENSOR_TYPES) else kernel


def _launch_or_body(kernel: Callable, body: Callable, *args):
    """``kernel(*args)``, or ``body(*args)`` where the launcher does not take the call: ``_fused`` as a
    compiler traces it (no fallback on failure: a kernel that fails to build fails the compile)."""
    result = kernel(*args)
    return body(*args) if result is None else result


# ----------------------------------------------------------------------------------------------
# Backend: chunked (pure PyTorch, O(n) memory: Rabe & Staats with recomputation in backward)
# ----------------------------------------------------------------------------------------------


def _dropout_keep(seed: int, q_block: int, k_block: int, n_k_blocks: int, shape, device) -> torch.Tensor:
    """The dropout keep-mask of one block, drawn from a generator seeded per block so backward can redraw it (on
    the meta device, which has no generator, an empty one: a run on meta tensors computes shapes only)."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device=device, dtype=torch.float32)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + q_block * n_k_blocks + k_block)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


class _ChunkedAttention(torch.autograd.Function):
    """Keeps q, k, v, the output and the log-sum-exp; backward recomputes every block's scores. Under
    torch.compile forward and backward are opaque custom ops, so the compiler cannot keep the blocks' scores
    (matmul outputs, which it does not recompute) for backward: that would be the whole O(n^2) score matrix."""

    @staticmethod
    def forward(ctx, q, k, v, call, mask, alibi_slopes, scale, seed, documents, sizes):
        options, key_positions = _chunked_options(call, scale, seed, sizes), _alibi_key_positions(call)
        out, lse = _chunked_forward_op(q, k, v, mask, alibi_slopes, documents, key_positions, *options)
        ctx.save_for_backward(q, k, v, out, lse, mask, alibi_slopes, documents, key_positions)
        ctx.options = options
        _keep_fake_constants_whole(ctx, (mask, alibi_slopes, documents, key_positions))
        _pass_unused_gradients_as_none(ctx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("chunked attention")
        if grad_out is None:
            return _none_for_every_input(ctx)
        q, k, v, out, lse, mask, alibi_slopes, documents, key_positions = ctx.saved_tensors
        grads = _chunked_backward_op(
            q, k, v, out, lse, grad_out, mask, alibi_slopes, documents, key_positions, *ctx.options
        )
        return (*grads, None, None, None, None, None, None, None)


def _chunked_options(call: AttentionCall, scale: float, seed: Optional[torch.Tensor], sizes: tuple) -> tuple:
    """What the chunked ops read of a call, beyond its tensors, as custom-op arguments (in their order)."""
    return float(scale), seed, int(sizes[0]), int(sizes[1]), call.causal, call.mask_kind, float(call.dropout_p)


def _dropout_seed(seed: Optional[torch.Tensor]) -> int:
    """The seed's value; 0 for a fake seed, which has none (a run on fake tensors computes shapes only)."""
    return 0 if seed is None or _fake_tensor_mode_active() else int(seed.item())


def _chunked_call(q, k, slopes, documents, causal: bool, mask_kind: str, dropout_p: float) -> AttentionCall:
    """The call rebuilt from a chunked op's arguments (the fields the chunked kernels read)."""
    return AttentionCall(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], heads=q.shape[1], kv_heads=k.shape[1],
        q_len=q.shape[2], k_len=k.shape[2], causal=causal, mask_kind=mask_kind, documents=documents is not None,
        alibi=slopes is not None, dropout_p=dropout_p, needs_grad=False,
    )


def _chunked_forward_impl(
    q, k, v, mask, slopes, documents, key_positions, scale, seed, q_chunk, k_chunk, causal, mask_kind, dropout_p
):
    call = _chunked_call(q, k, slopes, documents, causal, mask_kind, dropout_p)
    blocks = _ChunkedBlocks(mask, slopes, scale, documents, key_positions)
    return _chunked_forward(q, k, v, call, blocks, _dropout_seed(seed), (q_chunk, k_chunk))


def _chunked_backward_impl(
    q, k, v, out, lse, grad_out, mask, slopes, documents, key_positions, scale, seed, q_chunk, k_chunk, causal,
    mask_kind, dropout_p,
):
    call = _chunked_call(q, k, slopes, documents, causal, mask_kind, dropout_p)
    blocks = _ChunkedBlocks(mask, slopes, scale, documents, key_positions)
    return list(_chunked_backward(q, k, v, out, lse, grad_out, call, blocks, _dropout_seed(seed), (q_chunk, k_chunk)))


_CHUNKED_OPTIONS_SCHEMA = (
    "float scale, Tensor? seed, int q_chunk, int k_chunk, bool causal, str mask_kind, float dropout_p"
)
_chunked_forward_op = _opaque(
    "chunked_attention_forward",
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? slopes, Tensor? documents, Tensor? key_positions, "
    f"{_CHUNKED_OPTIONS_SCHEMA}) "
    "-> (Tensor, Tensor)",
    _chunked_forward_impl,
    lambda q, k, v, *rest: (torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_compute_dtype(q.dtype))),
)
_chunked_backward_op = _opaque(
    "chunked_attention_backward",
    "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, Tensor? mask, Tensor? slopes, "
    f"Tensor? documents, Tensor? key_positions, {_CHUNKED_OPTIONS_SCHEMA}) -> Tensor[]",
    _chunked_backward_impl,
    lambda q, k, v, *rest: [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)],
)


def _chunk_slices(length: int, size: int) -> list:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _block_is_hidden(call: AttentionCall, rows: slice, cols: slice) -> bool:
    """A key block entirely to the right of the causal diagonal for every query of the block."""
    return call.causal and cols.start > rows.stop - 1 + call.causal_offset


class _ChunkedBlocks(NamedTuple):
    """What every block of a chunked call reads besides q, k and v (see ``attention()`` and ``_block_bias``)."""

    mask: Optional[torch.Tensor]
    alibi_slopes: Optional[torch.Tensor]
    scale: float
    documents: Optional[torch.Tensor]
    key_positions: Optional[torch.Tensor]


def _block_scores(q_blk, k_blk, call, blocks: _ChunkedBlocks, rows, cols):
    """Float32 scores of one block with ALiBi/additive bias and -inf where a key is hidden."""
    dtype, mask = _compute_dtype(q_blk.dtype), blocks.mask
    scores = torch.matmul(q_blk.to(dtype), k_blk.to(dtype).transpose(-1, -2)) * blocks.scale
    bias = _block_bias(call, mask, blocks.alibi_slopes, rows, cols, q_blk.device, blocks.key_positions)
    if bias is not None:
        scores = scores + bias
    keep = _block_keep(call, mask, rows, cols, q_blk.device, blocks.documents)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def _chunked_forward(q, k, v, call, blocks: _ChunkedBlocks, seed, sizes):
    batch, heads, _, dim = q.shape
    dtype = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, call.q_len, device=q.device, dtype=dtype)
    k_slices = _chunk_slices(call.k_len, sizes[1])
    for qi, rows in enumerate(_chunk_slices(call.q_len, sizes[0])):
        q_blk = q[:, :, rows]
        row_max = torch.full((batch, heads, rows.stop - rows.start, 1), float("-inf"), device=q.device, dtype=dtype)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(batch, heads, rows.stop - rows.start, dim, device=q.device, dtype=dtype)
        for ki, cols in enumerate(k_slices):
            if _block_is_hidden(call, rows, cols):
                continue
            scores = _block_scores(q_blk, k[:, :, cols], call, blocks, rows, cols)
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - safe_max)
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(dim=-1, keepdim=True)
            if call.dropout_p > 0.0:
                draw = _dropout_keep(seed, qi, ki, len(k_slices), probs.shape, q.device)
                probs = probs * (draw >= call.dropout_p) / (1.0 - call.dropout_p)
            acc = acc * rescale + torch.matmul(probs, v[:, :, cols].to(dtype))
            row_max = new_max
        has_key = ~torch.isneginf(row_max)  # NaN from a real input is not -inf: it propagates, as in sdpa
        out[:, :, rows] = torch.where(has_key, acc / row_sum.clamp_min(1e-30), torch.zeros_like(acc)).to(q.dtype)
        lse[:, :, rows] = torch.where(has_key, row_max + torch.log(row_sum.clamp_min(1e-30)), row_max).squeeze(-1)
    return out, lse


def _chunked_backward(q, k, v, out, lse, grad_out, call, blocks: _ChunkedBlocks, seed, sizes):
    dtype = _compute_dtype(q.dtype)
    grad_q, grad_k, grad_v = (torch.zeros_like(x, dtype=dtype) for x in (q, k, v))
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(dim=-1, keepdim=True)
    k_slices = _chunk_slices(call.k_len, sizes[1])
    for qi, rows in enumerate(_chunk_slices(call.q_len, sizes[0])):
        q_blk, g_blk = q[:, :, rows], grad_out[:, :, rows].to(dtype)
        row_lse = lse[:, :, rows, None]
        finite_lse = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        for ki, cols in enumerate(k_slices):
            if _block_is_hidden(call, rows, cols):
                continue
            scores = _block_scores(q_blk, k[:, :, cols], call, blocks, rows, cols)
            probs = torch.exp(scores - finite_lse).masked_fill(torch.isinf(row_lse), 0.0)
            grad_probs = torch.matmul(g_blk, v[:, :, cols].to(dtype).transpose(-1, -2))
            if call.dropout_p > 0.0:
                draw = _dropout_keep(seed, qi, ki, len(k_slices), probs.shape, q.device)
                kept = (draw >= call.dropout_p).to(probs.dtype) / (1.0 - call.dropout_p)
                grad_v[:, :, cols] += torch.matmul((probs * kept).transpose(-1, -2), g_blk)
                grad_probs = grad_probs * kept
            else:
                grad_v[:, :, cols] += torch.matmul(probs.transpose(-1, -2), g_blk)
            grad_scores = probs * (grad_probs - delta[:, :, rows]) * blocks.scale
            grad_q[:, :, rows] += torch.matmul(grad_scores, k[:, :, cols].to(dtype))
            grad_k[:, :, cols] += torch.matmul(grad_scores.transpose(-1, -2), q_blk.to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _run_chunked(q, k, v, call: AttentionCall, mask, alibi_slopes, scale, sequence_ids=None, chunk_size=None, **_):
    k, v = _expand_kv(k, call.heads), _expand_kv(v, call.heads)
    # a tensor: read inside the ops, so that a compiled graph does not read it on the host (a break per call)
    seed = torch.randint(0, 2**62, (1,), device="cpu") if call.dropout_p > 0.0 else None
    documents, sizes = _documents_of(call, sequence_ids), _chunk_sizes(chunk_size)
    return _ChunkedAttention.apply(q, k, v, call, mask, alibi_slopes, scale, seed, documents, sizes)


def _chunk_sizes(chunk_size) -> tuple:
    """(query, key) block sizes from ``chunk_size``: None (this copy's default), an int for both, or a pair."""
    if chunk_size is None:
        return _DEFAULT_CHUNK_SIZES["query"], _DEFAULT_CHUNK_SIZES["key"]
    pair = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
    pair = tuple(pair) if isinstance(pair, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in pair):
        raise ValueError(f"chunk_size (config.attn_chunk_size) must be a positive int or a [query, key] pair, got {chunk_size!r}")
    return pair


def set_chunk_sizes(query: int = 1024, key: int = 1024) -> None:
    """Set the default query and key block sizes of the chunked backend (memory ~ batch x heads x query x key).

    This reaches only calls through this copy of the kernel layer that pass no ``chunk_size``: direct
    ``attention()`` calls and models built from this very module. A model loaded with ``trust_remote_code``
    carries its own copy: set ``model.config.attn_chunk_size = [query, key]`` (or one int) there instead.
    """
    _DEFAULT_CHUNK_SIZES["query"], _DEFAULT_CHUNK_SIZES["key"] = _chunk_sizes((query, key))


# ----------------------------------------------------------------------------------------------
# Backend: flex (FlexAttention with a block mask and a score_mod)
# ----------------------------------------------------------------------------------------------


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:
        return None
    return flex


# How many distinct call shapes get their own static-shape flex kernel when a call passes no
# ``flex_static_shapes``; set_flex_static_shapes() changes it for this copy of the layer only.
_FLEX_STATIC_SHAPES = {"limit": 6}
_flex_static_signatures: set = set()
_compiled_flex: dict = {}


def _flex_static_limit(flex_static_shapes) -> int:
    if flex_static_shapes is None:
        return _FLEX_STATIC_SHAPES["limit"]
    if isinstance(flex_static_shapes, bool) or not isinstance(flex_static_shapes, int) or flex_static_shapes < 0:
        raise ValueError(
            "the number of static flex shapes (flex_static_shapes, config.attn_flex_static_shapes) must be an "
            f"int >= 0, got {flex_static_shapes!r}"
        )
    return flex_static_shapes


def set_flex_static_shapes(limit: int) -> None:
    """How many distinct call shapes flex compiles with static shapes before it moves to one dynamic kernel.

    A static-shape kernel is much faster (on an H100, ALiBi forward+backward at 16k tokens: 373 against
    245 TFLOP/s) but costs a compile per shape, and dynamo keeps at most ``cache_size_limit`` (default 8)
    compiled variants of one function. Raise both together for a sweep over many shapes.

    This sets the default of this copy of the kernel layer only: direct ``attention()`` calls and models
    built from this very module. A model loaded with ``trust_remote_code`` carries its own copy: set
    ``model.config.attn_flex_static_shapes = n`` there instead.
    """
    _FLEX_STATIC_SHAPES["limit"] = _flex_static_limit(limit)


def _flex_with_static_shapes(flex_attention, *args, **kwargs):
    """The entry compiled with static shapes. It and the dynamic one below are separate functions so that
    each has its own dynamo cache (and cache-size limit)."""
    return flex_attention(*args, **kwargs)


def _flex_with_dynamic_shapes(flex_attention, *args, **kwargs):
    """The entry compiled with automatic dynamic shapes: decoding steps and shapes past the static limit."""
    return flex_attention(*args, **kwargs)


def _flex_uses_static_shapes(call: AttentionCall, q: torch.Tensor, k: torch.Tensor, limit: int) -> bool:
    """Static shapes on the CPU (dynamic ones fail to build there) and for the first few full-sequence
    shapes; a decoding step (one query row, a new key length every step) goes to the dynamic kernel."""
    if call.device_type == "cpu":
        return True
    if call.q_len == 1:
        return False
    signature = (tuple(q.shape), tuple(k.shape), call.dtype, call.needs_grad, call.causal, call.mask_kind, call.documents, call.alibi)
    if signature not in _flex_static_signatures:
        if len(_flex_static_signatures) >= limit:
            return False
        _flex_static_signatures.add(signature)
    return True


def _flex_function(static: bool):
    if static not in _compiled_flex:
        entry = _flex_with_static_shapes if static else _flex_with_dynamic_shapes
        _compiled_flex[static] = torch.compile(entry, dynamic=False if static else None)
    return _compiled_flex[static]


def _flex_offset(call: AttentionCall, device) -> torch.Tensor:
    """The causal offset as a 0-d tensor: a Python int captured by a mod would make the compiled
    flex_attention recompile for every new key length (every decoding step)."""
    return torch.full((), call.causal_offset, dtype=torch.int32, device=device)


def _flex_masks_causally(call: AttentionCall) -> bool:
    """Causal masking hides something only with more than one query row (bottom-right aligned, a single
    row sees every key), so decoding steps need no block mask."""
    return call.causal and call.q_len > 1


def _lookup_in_broadcast_mask(mask: torch.Tensor) -> Callable:
    """``(b, h, q_idx, kv_idx) -> mask[b, h, q_idx, kv_idx]`` for a ``[b or 1, h or 1, q or 1, k or 1]`` mask (bool,
    or a bias for a ``score_mod``). Its dimensions of size one are dropped rather than indexed at 0: flex evaluates
    masks under vmap, which in torch 2.9 reads a Python int among vmapped tensor indices on the host and fails."""
    broadcast = tuple(dim for dim in range(4) if mask.shape[dim] == 1)
    kept = mask.squeeze(broadcast) if broadcast else mask

    def lookup(b, h, q_idx, kv_idx):
        return kept[tuple(index for dim, index in enumerate((b, h, q_idx, kv_idx)) if dim not in broadcast)]

    return lookup


def _flex_mask_mod(call: AttentionCall, mask, device, sequence_ids=None) -> Callable:
    conditions = []
    if sequence_ids is not None:
        documents, offset = _document_index(sequence_ids), _flex_offset(call, device)
        conditions.append(lambda b, h, q_idx, kv_idx: documents[b, q_idx + offset] == documents[b, kv_idx])
    if _flex_masks_causally(call):
        offset = _flex_offset(call, device)
        conditions.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset)
    if call.mask_kind == "padding":
        conditions.append(lambda b, h, q_idx, kv_idx: mask[b, kv_idx])
    elif call.mask_kind in ("bool", "additive"):
        keep = mask if call.mask_kind == "bool" else ~_additive_hidden(mask)
        conditions.append(_lookup_in_broadcast_mask(keep))

    def mask_mod(b, h, q_idx, kv_idx):
        result = conditions[0](b, h, q_idx, kv_idx)
        for condition in conditions[1:]:
            result = result & condition(b, h, q_idx, kv_idx)
        return result

    return mask_mod


def _flex_score_mod(call: AttentionCall, mask, alibi_slopes) -> Optional[Callable]:
    terms, key_positions = [], _alibi_key_positions(call)
    if alibi_slopes is not None and call.mask_kind == "padding":
        slopes, positions = alibi_slopes.to(torch.float32), _kept_positions(mask)
        offset = _flex_offset(call, slopes.device)
        terms.append(lambda b, h, q_idx, kv_idx: slopes[h] * (positions[b, kv_idx] - positions[b, q_idx + offset]))
    elif alibi_slopes is not None and key_positions is not None:
        slopes, positions = alibi_slopes.to(torch.float32), key_positions.to(torch.float32)
        offset = _flex_offset(call, slopes.device)
        terms.append(lambda b, h, q_idx, kv_idx: slopes[h] * (positions[b, kv_idx] - q_idx - offset))
    elif alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        offset = _flex_offset(call, slopes.device)
        terms.append(lambda b, h, q_idx, kv_idx: slopes[h] * (kv_idx - q_idx - offset))
    if call.mask_kind == "additive":
        terms.append(_lookup_in_broadcast_mask(_additive_bias(mask, torch.float32)))
    if not terms:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        for term in terms:
            score = score + term(b, h, q_idx, kv_idx)
        return score

    return score_mod


_FLEX_BLOCK = 128  # flex_attention's default sparse block size
_FLEX_BAND_ELEMENTS = 1 << 22  # mask elements evaluated at once while building a block mask


def _block_classes(keep: torch.Tensor, q_blocks: int, k_blocks: int):
    """Per [q-block, k-block] tile of a [b, h, rows, cols] keep-mask: (partly kept, fully kept)."""
    tiles = keep.view(*keep.shape[:2], q_blocks, _FLEX_BLOCK, k_blocks, _FLEX_BLOCK)
    any_kept, all_kept = tiles.any(dim=5).any(dim=3), tiles.all(dim=5).all(dim=3)
    return any_kept & ~all_kept, all_kept


def _ordered_block_indices(present: torch.Tensor):
    """[b, h, q_blocks, k_blocks] bool -> (count per row, the present column indices first, in order)."""
    counts = present.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def _banded_block_mask(mask_mod: Callable, batch: int, heads: int, q_len: int, k_len: int, device):
    """A flex BlockMask built one band of query blocks at a time.

    create_block_mask evaluates the whole [batch, heads, q_len, k_len] grid at once and reduces it with
    wide integers (2.5 GB of host memory at 16k tokens); a band holds about 4M mask elements, so building costs
    O(seq) memory. ``mask_mod`` must broadcast over index tensors, as the mods of this file do.
    """
    q_blocks, k_blocks = -(-q_len // _FLEX_BLOCK), -(-k_len // _FLEX_BLOCK)
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    cols = torch.arange(k_blocks * _FLEX_BLOCK, device=device)
    kv_idx = cols.clamp(max=k_len - 1)[None, None, None, :]
    band = max(1, _FLEX_BAND_ELEMENTS // (batch * heads * k_blocks * _FLEX_BLOCK * _FLEX_BLOCK))
    partial, full = [], []
    for first in range(0, q_blocks, band):
        rows = torch.arange(first * _FLEX_BLOCK, min(first + band, q_blocks) * _FLEX_BLOCK, device=device)
        q_idx = rows.clamp(max=q_len - 1)[None, None, :, None]
        inside = (rows < q_len)[:, None] & (cols < k_len)[None, :]  # tile padding past the ends is never kept
        keep = (mask_mod(b, h, q_idx, kv_idx) & inside).expand(batch, heads, -1, -1)
        band_partial, band_full = _block_classes(keep, rows.numel() // _FLEX_BLOCK, k_blocks)
        partial.append(band_partial)
        full.append(band_full)
    kv_counts, kv_indices = _ordered_block_indices(torch.cat(partial, dim=2))
    full_counts, full_indices = _ordered_block_indices(torch.cat(full, dim=2))
    return _flex_module().BlockMask.from_kv_blocks(
        kv_counts,
        kv_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=_FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(q_len, k_len),
    )


# Block masks of pure causal calls depend on the shape alone: kept for the most recent shapes, under a lock.
_CAUSAL_BLOCK_MASKS_KEPT = 16
_causal_block_masks: OrderedDict = OrderedDict()
_causal_block_masks_lock = threading.Lock()


def _causal_block_mask(key: tuple, build: Callable):
    with _causal_block_masks_lock:
        if key in _causal_block_masks:
            _causal_block_masks.move_to_end(key)
            return _causal_block_masks[key]
    block_mask = build()
    with _causal_block_masks_lock:
        _causal_block_masks[key] = block_mask
        while len(_causal_block_masks) > _CAUSAL_BLOCK_MASKS_KEPT:
            _causal_block_masks.popitem(last=False)
    return block_mask


def _flex_block_mask(call: AttentionCall, mask, device, holder: Optional[ForwardMask], sequence_ids=None):
    """The block mask of a call.

    Every layer of a forward pass makes the same call, so rebuilding the block mask each time would cost a
    pass over the [q, k] grid per layer. A pure causal block mask depends on the shape alone and is kept in a
    small shape-keyed cache; one that depends on a mask (and the sequence ids of the same forward) is kept on
    the model's ``ForwardMask`` (``holder``), which lives for one forward pass; without one, every call builds
    its own.
    """
    by_shape = call.mask_kind == "none" and not call.documents
    if not _flex_masks_causally(call) and by_shape:
        return None
    per_batch = call.documents or (call.mask_kind != "none" and mask.shape[0] != 1)
    per_head = call.mask_kind in ("bool", "additive") and mask.shape[1] != 1
    key = (call.causal, call.causal_offset, call.q_len, call.k_len, str(device), call.mask_kind, call.documents, per_batch, per_head)

    def build():
        batch = (mask.shape[0] if call.mask_kind != "none" else sequence_ids.shape[0]) if per_batch else 1
        return _banded_block_mask(
            _flex_mask_mod(call, mask, device, sequence_ids),
            batch,
            call.heads if per_head else 1,
            call.q_len,
            call.k_len,
            device,
        )

    if by_shape:
        return _causal_block_mask(key, build)
    if holder is None:
        return build()
    if key not in holder.block_masks:
        holder.block_masks[key] = build()
    return holder.block_masks[key]


def _run_flex(
    q, k, v, call: AttentionCall, mask, alibi_slopes, scale, sequence_ids=None, holder=None, flex_static_shapes=None, **_
):
    block_mask = _flex_block_mask(call, mask, q.device, holder, sequence_ids)
    score_mod = _flex_score_mod(call, mask, alibi_slopes)
    static = _flex_uses_static_shapes(call, q, k, _flex_static_limit(flex_static_shapes))
    return _flex_function(static)(
        _flex_module().flex_attention,
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=call.kv_heads != call.heads,
    )


# ----------------------------------------------------------------------------------------------
# Backend: flash_attn (the flash-attn package; varlen for padding)
# ----------------------------------------------------------------------------------------------


def _flash_attn_functions():
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as error:
        return _none_if_not_installed(error, "flash_attn")
    return flash_attn_func, flash_attn_varlen_func


def _none_if_not_installed(error: ImportError, package: str) -> None:
    """None where ``package`` itself is missing; any other import error is a broken install (a wheel built for
    another torch fails on an undefined symbol, one of another version lacks a function, a compiled extension is
    missing), raised for the backend's probe to log once by name instead of calling it "not installed"."""
    if isinstance(error, ModuleNotFoundError) and error.name == package:
        return None
    raise error


def _ragged_layout(call: AttentionCall, mask, sequence_ids, batch: int, device):
    """The kept tokens of ``[b, s]`` rows as consecutive segments, one per row and document: their flat
    token indices (None: every token), int32 ``cu_seqlens`` and the longest segment (one host sync)."""
    seq = call.k_len
    segment = torch.arange(batch, device=device)[:, None] * seq
    if sequence_ids is not None:
        segment = segment + _document_index(sequence_ids)
    segment = segment.expand(batch, seq).flatten()
    indices = None
    if call.mask_kind == "padding":
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        segment = segment.index_select(0, indices)
    _, counts = torch.unique_consecutive(segment, return_counts=True)
    cu_seqlens = F.pad(torch.cumsum(counts, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(counts.max()) if counts.numel() else 0


def _run_varlen(varlen_func, q, k, v, call: AttentionCall, mask, sequence_ids, scale, alibi_slopes=None):
    """A padded or packed call with q_len == k_len as one varlen kernel call over the kept tokens: every
    segment (row and document) attends only to itself, causal inside; padded query rows return zeros. The
    layout (and its host sync) is worked out once per forward."""
    batch, heads, seq, dim = q.shape
    indices, cu_seqlens, longest = _once_per_forward(
        call.holder,
        ("ragged", batch, call.k_len, call.mask_kind),
        (mask, sequence_ids),
        lambda: _ragged_layout(call, mask, sequence_ids, batch, q.device),
    )

    def pack(x: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)
        return flat if indices is None else flat.index_select(0, indices)

    extra = {} if alibi_slopes is None else {"alibi_slopes": alibi_slopes.to(torch.float32)}
    out = q.new_zeros(batch * seq, heads, dim)
    if longest > 0:
        packed = varlen_func(
            pack(q), pack(k), pack(v), cu_seqlens, cu_seqlens, longest, longest,
            dropout_p=call.dropout_p, softmax_scale=scale, causal=call.causal, **extra,
        )
        out = packed if indices is None else out.index_copy(0, indices, packed)
    return out.view(batch, seq, heads, dim).transpose(1, 2)


def _unpad(x: torch.Tensor, keep: torch.Tensor):
    """[b, s, h, d] with a [b, s] keep-mask -> packed [tokens, h, d], flat indices, cu_seqlens, max length."""
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, int(lengths.max().item())


def _run_flash_attn(q, k, v, call: AttentionCall, mask, alibi_slopes, scale, sequence_ids=None, **_):
    flash_func, varlen_func = _flash_attn_functions()
    if call.documents or call.mask_kind == "padding" and call.q_len == call.k_len:
        return _run_varlen(varlen_func, q, k, v, call, mask, sequence_ids, scale, alibi_slopes)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    slopes = alibi_slopes.to(torch.float32) if alibi_slopes is not None else None
    common = dict(dropout_p=call.dropout_p, softmax_scale=scale, causal=call.causal, alibi_slopes=slopes)
    if call.mask_kind == "none":
        return flash_func(q, k, v, **common).transpose(1, 2)
    k_packed, _, cu_k, max_k = _unpad(k, mask)
    v_packed, _, _, _ = _unpad(v, mask)
    if not call.causal:
        # The keep-mask covers keys only (e.g. BART's cross-attention, q_len != k_len): every query is real.
        batch, q_len = q.shape[:2]
        cu_q = torch.arange(0, (batch + 1) * q_len, q_len, device=q.device, dtype=torch.int32)
        packed = varlen_func(q.reshape(batch * q_len, *q.shape[2:]), k_packed, v_packed, cu_q, cu_k, q_len, max_k, **common)
        return packed.view(q.shape).transpose(1, 2)
    # Causal self-attention: the queries are the last q_len key positions, so they share the keys' padding,
    # and varlen's bottom-right alignment within each unpadded row is the padded rows' causal alignment.
    q_packed, q_index, cu_q, max_q = _unpad(q, mask[:, -call.q_len :])
    packed = varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, **common)
    out = torch.zeros(q.shape[0] * q.shape[1], *q.shape[2:], device=q.device, dtype=q.dtype)
    out = out.index_copy(0, q_index, packed)
    return out.view(q.shape).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Backend: xformers (memory_efficient_attention, when it really runs here)
# ----------------------------------------------------------------------------------------------


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as error:
        return _none_if_not_installed(error, "xformers")
    return xops


def _run_xformers(q, k, v, call: AttentionCall, mask, alibi_slopes, scale, **_):
    xops = _xformers_ops()
    k, v = _expand_kv(k, call.heads), _expand_kv(v, call.heads)
    bias = None
    if call.causal:
        masks = xops.fmha.attn_bias
        bias = masks.LowerTriangularFromBottomRightMask() if call.q_len != call.k_len else masks.LowerTriangularMask()
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=call.dropout_p, scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Backend: cudnn (NVIDIA's cuDNN frontend graph API: native ALiBi and sequence lengths, fwd + bwd)
# ----------------------------------------------------------------------------------------------


def _cudnn_module():
    try:
        import cudnn
    except ImportError as error:
        return _none_if_not_installed(error, "cudnn")
    return cudnn


@dataclass(frozen=True)
class _CudnnFlags:
    """What a cuDNN sdpa graph computes besides q, k and v (part of the plan key)."""

    causal: bool
    alibi: bool
    padded: bool  # sequence lengths bound the rows and keys (right padding, or a length padded to its bucket)
    scale: float
    ragged: bool = False  # packed documents: one graph batch entry per document, found by ragged offsets


class _CudnnPlans:
    """Built cuDNN graphs by key (direction, device, dtype, shapes, strides, flags): LRU-bounded, thread-safe.

    Building a graph costs milliseconds, so each distinct shape is built once; ``_cudnn_bucket`` keeps the
    number of shapes of a variable-length run small. A build happens under the lock: two threads that miss
    on one key build it once.
    """

    def __init__(self, capacity: int = 128):
        self.capacity = capacity
        self._plans: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "builds": 0, "build_seconds": 0.0}

    def get(self, key: tuple, build: Callable[[], tuple]) -> tuple:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self._counts["hits"] += 1
                return plan
            start = time.perf_counter()
            plan = build()
            self._counts["build_seconds"] += time.perf_counter() - start
            self._counts["builds"] += 1
            self._plans[key] = plan
            while len(self._plans) > self.capacity:
                self._plans.popitem(last=False)
            return plan

    def info(self) -> dict:
        with self._lock:
            calls = self._counts["hits"] + self._counts["builds"]
            hit_rate = self._counts["hits"] / calls if calls else 0.0
            return dict(self._counts, size=len(self._plans), capacity=self.capacity, hit_rate=hit_rate)


_cudnn_plans = _CudnnPlans()
_cudnn_handles: dict = {}
_cudnn_handles_lock = threading.Lock()


def cudnn_plan_cache_info() -> dict:
    """The cudnn backend's plan cache: hits, builds, seconds spent building, hit rate, size and capacity."""
    return _cudnn_plans.info()


def _cudnn_handle(cudnn, device: torch.device) -> tuple:
    """One cuDNN handle per device, with the lock that keeps its stream fixed while a graph launches on it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _cudnn_handles_lock:
        if index not in _cudnn_handles:
            with torch.cuda.device(index):
                _cudnn_handles[index] = (cudnn.create_handle(), threading.Lock())
        return _cudnn_handles[index]


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _cudnn_bucket(length: int, smallest: int = 64) -> int:
    """The size a graph is built for: ``length`` rounded up to a multiple of ``smallest`` (64 for sequence
    lengths, 8 for document counts), or of an eighth of its power of two above 8 x ``smallest`` (at most
    12.5% more), so that a run over many lengths builds about eight graphs per doubling instead of one per
    length."""
    granule = max(smallest, 2 ** max(0, length.bit_length() - 4))
    return -(-length // granule) * granule


def _kept_per_forward(call: AttentionCall, slot: tuple, tensor: torch.Tensor, compute: Callable[[torch.Tensor], object]):
    """``compute(tensor)`` (it reads the host), once per forward for that tensor (see ``_once_per_forward``)."""
    return _once_per_forward(call.holder, slot, (tensor,), lambda: compute(tensor))


def _checked_per_forward(call: AttentionCall, slot: str, tensor: torch.Tensor, check: Callable[[torch.Tensor], bool]) -> bool:
    """``check(tensor)`` (one host read), once per forward where the call has a ``ForwardMask``."""
    return _kept_per_forward(call, ("checked", slot), tensor, lambda x: bool(check(x)))


def _padding_layout(mask: torch.Tensor) -> str:
    """How a bool keep-mask ``[b, s]`` pads its rows (one host read): ``"full"`` where it keeps every key,
    ``"prefix"`` where every row keeps a non-empty prefix of its keys (right padding: sequence lengths express
    it), ``"runs"`` where every row keeps one run of consecutive keys or none (left padding too: cuDNN's ragged
    layout, ``_kept_runs``), else ``"gaps"``."""
    run_starts = mask & ~F.pad(mask[:, :-1], (1, 0), value=False)
    one_run, prefix, full = torch.stack([(run_starts.sum(dim=-1) <= 1).all(), mask[:, 0].all(), mask.all()]).tolist()
    if not one_run:
        return "gaps"
    return "full" if full else "prefix" if prefix else "runs"


def _are_bloom_slopes(slopes: torch.Tensor) -> bool:
    """cuDNN computes the ALiBi slopes itself (BLOOM's, from the head count); other slopes cannot go there."""
    if _is_cached_bloom_slopes(slopes):
        return True
    return torch.allclose(slopes.detach().float().cpu(), alibi_slopes(slopes.shape[0]), rtol=1e-6, atol=0.0)


def _cudnn_operand(x: torch.Tensor) -> torch.Tensor:
    """x as cuDNN takes it: unit stride in head_dim, 16-byte aligned rows; copied only when it is not."""
    aligned = x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0
    return x if aligned else x.contiguous()


def _bshd_empty(batch: int, heads: int, seq: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """A [b, h, s, d] tensor laid out as [b, s, h, d], so that the model's transpose + reshape is free."""
    return torch.empty(batch, seq, heads, dim, device=like.device, dtype=like.dtype).transpose(1, 2)


def _layout(x: torch.Tensor) -> tuple:
    return tuple(x.shape), tuple(x.stride())


def _nonzero_static(flags: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the ``count`` true entries of a 1-D bool tensor, without reading the host where torch
    has ``nonzero_static`` (``nonzero`` reads the count back)."""
    if hasattr(torch, "nonzero_static"):
        return torch.nonzero_static(flags, size=count).squeeze(-1)
    return flags.nonzero().squeeze(-1)


@dataclass(frozen=True)
class _RaggedDocuments:
    """Packed documents in cuDNN's ragged (THD) layout: graph batch entry i is document i, ``lengths[i]``
    tokens from token ``starts[i]`` of the flattened ``[b * s]`` rows. The graph's batch and sequence sizes
    are the document count and the longest document rounded up to their buckets, so a run with random
    lengths reuses a few graphs; the batch entries past the last document are empty (length 0)."""

    batch: int
    seq: int
    lengths: torch.Tensor  # int32 [batch, 1, 1, 1]
    starts: torch.Tensor  # int64 [batch + 1, 1, 1, 1], the last ones at the token count
    # Padded rows (``_kept_runs``): query rows per entry where they outnumber the keys (a row's padding after
    # its kept keys), and tokens between the entries that no entry covers (zeros in the output and gradients).
    query_lengths: Optional[torch.Tensor] = None
    gaps: bool = False
    # Packed documents: every row is one document (the dense graphs take the call as it is, without copies).
    one_per_row: bool = False

    @property
    def sequence_lengths(self) -> tuple:
        """(seq_len_q, seq_len_kv) of the graph."""
        return (self.lengths if self.query_lengths is None else self.query_lengths), self.lengths

    def new_output(self, x: torch.Tensor) -> torch.Tensor:
        """An output shaped and laid out like x (``[b, h, s, d]`` as ``[b, s, h, d]``), zero where no entry writes."""
        out = _bshd_empty(*x.shape, x)
        return out.zero_() if self.gaps else out


def _ragged_documents(sequence_ids: torch.Tensor) -> _RaggedDocuments:
    """The documents of ``[b, s]`` sequence ids (a new one wherever the id changes and at every row start),
    with one host read: the document count and the longest document."""
    starts = F.pad(sequence_ids[:, 1:] != sequence_ids[:, :-1], (1, 0), value=True).reshape(-1)
    tokens = torch.arange(starts.numel(), device=starts.device)
    document_start = torch.where(starts, tokens, 0).cummax(0).values
    count, longest = torch.stack([starts.sum(), (tokens - document_start).max() + 1]).tolist()
    batch = _cudnn_bucket(count, smallest=8)
    offsets = F.pad(_nonzero_static(starts, count), (0, batch + 1 - count), value=starts.numel())
    lengths = offsets.diff().to(torch.int32)
    return _RaggedDocuments(
        batch,
        _cudnn_bucket(longest),
        lengths.view(batch, 1, 1, 1),
        offsets.view(batch + 1, 1, 1, 1),
        one_per_row=count == sequence_ids.shape[0],
    )


def _ragged_offsets(documents: _RaggedDocuments, heads: int, kv_heads: int, dim: int) -> tuple:
    """Element offsets of every document in q/o/dq/do, k/v/dk/dv (packed [tokens, heads, dim]) and the stats
    (packed [tokens, heads])."""
    return documents.starts * (heads * dim), documents.starts * (kv_heads * dim), documents.starts * heads


def _packed_operand(x: torch.Tensor) -> torch.Tensor:
    """x ``[b, h, s, d]`` as packed rows ``[b * s, h, d]`` (laid out as ``[b, s, h, d]``, 16-byte aligned),
    as cuDNN's ragged layout reads it; copied only when it is not."""
    if x.transpose(1, 2).is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _ragged_tensor(graph, data_type, documents: _RaggedDocuments, heads: int, dim: int, offset, tensor=None):
    """A ``[documents, heads, seq, dim]`` graph tensor over packed rows, placed by ``offset`` (``tensor``: an
    operation's output to describe so, else a new input)."""
    seq = documents.seq
    shape, stride = [documents.batch, heads, seq, dim], [seq * heads * dim, dim, heads * dim, 1]
    if tensor is None:
        tensor = graph.tensor(dim=shape, stride=stride, data_type=data_type)
    else:
        tensor.set_output(True).set_dim(shape).set_stride(stride)
    tensor.set_ragged_offset(offset)
    return tensor


def _cudnn_types(cudnn, dtype: torch.dtype) -> dict:
    io = cudnn.data_type.HALF if dtype == torch.float16 else cudnn.data_type.BFLOAT16
    return dict(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT, compute_data_type=cudnn.data_type.FLOAT)


def _cudnn_mask_options(graph, flags: _CudnnFlags, lengths) -> tuple:
    """The sdpa / sdpa_backward options for the masks, and the graph tensors of the sequence lengths."""
    length_tensors = tuple(graph.tensor_like(x) for x in lengths) if flags.padded else (None, None)
    options = dict(
        attn_scale=flags.scale,
        use_causal_mask=flags.causal,
        use_alibi_mask=flags.alibi,
        use_padding_mask=flags.padded,
        seq_len_q=length_tensors[0],
        seq_len_kv=length_tensors[1],
    )
    return options, length_tensors


class BackendFailure(RuntimeError):
    """A backend's own library refused or failed to run a call that the capability checks let through (for
    cudnn: the frontend's ``cudnnGraphNotSupportedError``, or the RuntimeError/ValueError its binding raises
    from a graph build, plan or launch). ``auto`` skips that backend for such calls and runs the next one;
    an explicit request raises it. The library's error is the ``__cause__``."""


def _is_library_error(error: Exception, library: str) -> bool:
    """An error a library reports about a call (its own exception types, RuntimeError, ValueError), as opposed
    to running out of memory or a bug (AssertionError, TypeError, KeyError, ...) in the code calling it."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    return isinstance(error, (RuntimeError, ValueError)) or type(error).__module__.split(".")[0] == library


@contextmanager
def _failures_owned_by(backend: str, library: str):
    """Errors ``library`` raises inside, re-raised as ``BackendFailure``s of ``backend``; others as they are."""
    try:
        yield
    except Exception as error:
        if not _is_library_error(error, library):
            raise
        raise BackendFailure(f"{backend}: {type(error).__name__}: {error}") from error


def _cudnn_finish(cudnn, graph, operands: tuple) -> tuple:
    """The built plan: the graph, which of ``operands`` it binds (some are None where the graph lacks them,
    e.g. stats in inference) with their uids, and its workspace size."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    slots = tuple(i for i, operand in enumerate(operands) if operand is not None)
    uids = tuple(operands[i].get_uid() for i in slots)
    return graph, slots, uids, graph.get_workspace_size()


def _cudnn_plan(key: tuple, build: Callable[[], tuple]) -> tuple:
    with _failures_owned_by("cudnn", "cudnn"):
        return _cudnn_plans.get(key, build)


def _cudnn_execute(cudnn, plan: tuple, buffers: tuple, device: torch.device) -> None:
    """Run a built graph on the current CUDA stream; ``buffers`` line up with the operands the plan was built
    from. They go to the frontend in order with their uids (``tensor_uids``) rather than as a dict keyed by
    graph tensor: a shorter path through its Python (0.68 instead of 0.83 ms for an ALiBi forward + backward at
    2k tokens on an H200, bit-identical; ``scripts/check_cudnn.py --sections execute``)."""
    graph, slots, uids, workspace_size = plan
    handle, lock = _cudnn_handle(cudnn, device)
    workspace = torch.empty(workspace_size, device=device, dtype=torch.uint8)
    with lock, _failures_owned_by("cudnn", "cudnn"):
        cudnn.set_stream(handle, _cuda_stream(device))
        graph.execute([buffers[i] for i in slots], workspace, handle=handle, tensor_uids=uids)


def _cudnn_forward(q, k, v, lengths: tuple, flags: _CudnnFlags, with_stats: bool):
    """cuDNN sdpa: the output ([b, h, s, d] laid out as [b, s, h, d]) and, for training, the softmax stats."""
    cudnn = _cudnn_module()
    batch, heads, seq, dim = q.shape
    out = _bshd_empty(batch, heads, seq, dim, q)
    stats = torch.empty(batch, heads, seq, 1, device=q.device, dtype=torch.float32) if with_stats else None
    key = ("fwd", q.device, q.dtype, _layout(q), _layout(k), _layout(v), flags, with_stats)

    def build():
        handle, _ = _cudnn_handle(cudnn, q.device)
        graph = cudnn.pygraph(handle=handle, **_cudnn_types(cudnn, q.dtype))
        tq, tk, tv = (graph.tensor_like(x) for x in (q, k, v))
        options, length_tensors = _cudnn_mask_options(graph, flags, lengths)
        to, tstats = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=with_stats, **options)
        to.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride()))
        if with_stats:
            tstats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        return _cudnn_finish(cudnn, graph, (tq, tk, tv, to, tstats if with_stats else None, *length_tensors))

    plan = _cudnn_plan(key, build)
    _cudnn_execute(cudnn, plan, (q, k, v, out, stats, *lengths), q.device)
    return out, stats


def _cudnn_backward(q, k, v, out, stats, grad_out, lengths: tuple, flags: _CudnnFlags) -> tuple:
    """cuDNN sdpa_backward: dq, dk, dv from the forward's output and softmax stats."""
    cudnn = _cudnn_module()
    grad_out = _cudnn_operand(grad_out)
    grads = tuple(_bshd_empty(*x.shape, x) for x in (q, k, v))
    key = ("bwd", q.device, q.dtype, _layout(q), _layout(k), _layout(v), _layout(out), _layout(grad_out), flags)

    def build():
        handle, _ = _cudnn_handle(cudnn, q.device)
        graph = cudnn.pygraph(handle=handle, **_cudnn_types(cudnn, q.dtype))
        inputs = tuple(graph.tensor_like(x) for x in (q, k, v, out, grad_out, stats))
        options, length_tensors = _cudnn_mask_options(graph, flags, lengths)
        outputs = graph.sdpa_backward(name="sdpa_backward", q=inputs[0], k=inputs[1], v=inputs[2], o=inputs[3],
                                      dO=inputs[4], stats=inputs[5], **options)
        for tensor, like in zip(outputs, grads):
            tensor.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride()))
        return _cudnn_finish(cudnn, graph, (*inputs, *outputs, *length_tensors))

    plan = _cudnn_plan(key, build)
    _cudnn_execute(cudnn, plan, (q, k, v, out, grad_out, stats, *grads, *lengths), q.device)
    return grads


def _ragged_stats(graph, cudnn, documents: _RaggedDocuments, heads: int, offset, tensor=None):
    """The softmax stats as packed ``[tokens, heads]`` float32 rows (``tensor``: the forward's output)."""
    shape, stride = [documents.batch, heads, documents.seq, 1], [documents.seq * heads, 1, heads, 1]
    if tensor is None:
        tensor = graph.tensor(dim=shape, stride=stride, data_type=cudnn.data_type.FLOAT)
    else:
        tensor.set_output(True).set_dim(shape).set_stride(stride).set_data_type(cudnn.data_type.FLOAT)
    tensor.set_ragged_offset(offset)
    return tensor


def _ragged_key(direction: str, q, k, documents: _RaggedDocuments, flags: _CudnnFlags) -> tuple:
    return (direction, q.device, q.dtype, documents.batch, documents.seq, q.shape[1], k.shape[1], q.shape[3], flags)


def _cudnn_ragged_forward(q, k, v, documents: _RaggedDocuments, flags: _CudnnFlags, with_stats: bool):
    """cuDNN sdpa over packed documents (q/k/v packed rows, see ``_packed_operand``): the output (packed like
    q) and, for training, the softmax stats (packed ``[tokens, heads]``)."""
    cudnn = _cudnn_module()
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    out = documents.new_output(q)
    stats = torch.empty(batch * seq, heads, device=q.device, dtype=torch.float32) if with_stats else None
    offsets = _ragged_offsets(documents, heads, kv_heads, dim)
    key = _ragged_key("fwd-ragged", q, k, documents, flags) + (with_stats,)

    def build():
        handle, _ = _cudnn_handle(cudnn, q.device)
        types = _cudnn_types(cudnn, q.dtype)
        graph = cudnn.pygraph(handle=handle, **types)
        io = types["io_data_type"]
        q_offset, kv_offset = graph.tensor_like(offsets[0]), graph.tensor_like(offsets[1])
        stats_offset = graph.tensor_like(offsets[2]) if with_stats else None
        tq = _ragged_tensor(graph, io, documents, heads, dim, q_offset)
        tk, tv = (_ragged_tensor(graph, io, documents, kv_heads, dim, kv_offset) for _ in range(2))
        options, length_tensors = _cudnn_mask_options(graph, flags, documents.sequence_lengths)
        to, tstats = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=with_stats, **options)
        _ragged_tensor(graph, io, documents, heads, dim, q_offset, tensor=to)
        if with_stats:
            _ragged_stats(graph, cudnn, documents, heads, stats_offset, tensor=tstats)
        operands = (tq, tk, tv, to, tstats if with_stats else None, *length_tensors, q_offset, kv_offset, stats_offset)
        return _cudnn_finish(cudnn, graph, operands)

    plan = _cudnn_plan(key, build)
    buffers = (q, k, v, out, stats, *documents.sequence_lengths, *offsets)
    _cudnn_execute(cudnn, plan, buffers, q.device)
    return out, stats


def _cudnn_ragged_backward(q, k, v, out, stats, grad_out, documents: _RaggedDocuments, flags: _CudnnFlags) -> tuple:
    """cuDNN sdpa_backward over packed documents: dq, dk, dv packed like q, k, v."""
    cudnn = _cudnn_module()
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
    grad_out = _packed_operand(grad_out)
    grads = tuple(documents.new_output(x) for x in (q, k, v))
    offsets = _ragged_offsets(documents, heads, kv_heads, dim)
    key = _ragged_key("bwd-ragged", q, k, documents, flags)

    def build():
        handle, _ = _cudnn_handle(cudnn, q.device)
        types = _cudnn_types(cudnn, q.dtype)
        graph = cudnn.pygraph(handle=handle, **types)
        io = types["io_data_type"]
        q_offset, kv_offset, stats_offset = (graph.tensor_like(x) for x in offsets)
        tq, to, tdo = (_ragged_tensor(graph, io, documents, heads, dim, q_offset) for _ in range(3))
        tk, tv = (_ragged_tensor(graph, io, documents, kv_heads, dim, kv_offset) for _ in range(2))
        tstats = _ragged_stats(graph, cudnn, documents, heads, stats_offset)
        options, length_tensors = _cudnn_mask_options(graph, flags, documents.sequence_lengths)
        outputs = graph.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=tstats, **options)
        for tensor, tensor_heads, offset in zip(outputs, (heads, kv_heads, kv_heads), (q_offset, kv_offset, kv_offset)):
            _ragged_tensor(graph, io, documents, tensor_heads, dim, offset, tensor=tensor)
        operands = (tq, tk, tv, to, tdo, tstats, *outputs, *length_tensors, q_offset, kv_offset, stats_offset)
        return _cudnn_finish(cudnn, graph, operands)

    plan = _cudnn_plan(key, build)
    buffers = (q, k, v, out, grad_out, stats, *grads, *documents.sequence_lengths, *offsets)
    _cudnn_execute(cudnn, plan, buffers, q.device)
    return grads


def _cudnn_dense_layout(q, key_lengths, q_len: int, causal: bool, alibi: bool, scale: float) -> tuple:
    """The graph's flags and sequence lengths (int32 [b, 1, 1, 1]) for q padded to its bucket: the first
    ``q_len`` query rows are the call's (a padded row still sees the kept keys before it, as in every other
    backend), and the keys are bounded by ``key_lengths`` (a right-padding mask's) or by ``q_len``. No lengths
    where nothing pads."""
    padded = key_lengths is not None or q_len != q.shape[2]
    flags = _CudnnFlags(causal=causal, alibi=alibi, padded=padded, scale=scale)
    if not padded:
        return flags, (None, None)
    seq_len_q = torch.full((q.shape[0], 1, 1, 1), q_len, device=q.device, dtype=torch.int32)
    return flags, (seq_len_q, seq_len_q if key_lengths is None else key_lengths)


def _in_bucket(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """x (``[b, h, s, ...]``) padded with zero rows along s to ``bucket`` rows."""
    if x.shape[2] == bucket:
        return x
    return F.pad(x, (0,) * (2 * (x.dim() - 3)) + (0, bucket - x.shape[2]))


def _first_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows (dim 2) of a ``[b, h, s, d]`` result laid out as ``[b, s, h, d]``, as a tensor of
    its own in that layout (what the op's fake result is)."""
    if x.shape[2] == rows:
        return x
    return _bshd_empty(x.shape[0], x.shape[1], rows, x.shape[3], x).copy_(x[:, :, :rows])


def _no_stats(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(0, dtype=torch.float32)


def _cudnn_dense_forward_impl(q, k, v, q_len, causal, alibi, scale, with_stats):
    """q, k and v as long as the call (traced: padded to the bucket here, when the step runs and the length
    is known) or already padded to it (eager: ``_run_cudnn`` pads them and cuts the output as a view)."""
    return _cudnn_dense_forward(q, k, v, None, q_len, causal, alibi, scale, with_stats)


def _cudnn_dense_backward_impl(q, k, v, out, stats, grad_out, q_len, causal, alibi, scale):
    return _cudnn_dense_backward(q, k, v, out, stats, grad_out, None, q_len, causal, alibi, scale)


def _cudnn_dense_forward(q, k, v, key_lengths, q_len, causal, alibi, scale, with_stats):
    rows, bucket = q.shape[2], _cudnn_bucket(q.shape[2])
    q, k, v = (_cudnn_operand(_in_bucket(x, bucket)) for x in (q, k, v))
    flags, lengths = _cudnn_dense_layout(q, key_lengths, q_len, causal, alibi, scale)
    out, stats = _cudnn_forward(q, k, v, lengths, flags, with_stats)
    if not with_stats:
        stats = _no_stats(q)
    elif rows != bucket:
        stats = stats[:, :, :rows].contiguous()
    return _first_rows(out, rows), stats


def _cudnn_dense_backward(q, k, v, out, stats, grad_out, key_lengths, q_len, causal, alibi, scale):
    rows, bucket = q.shape[2], _cudnn_bucket(q.shape[2])
    q, k, v = (_cudnn_operand(_in_bucket(x, bucket)) for x in (q, k, v))
    out, stats, grad_out = (_in_bucket(x, bucket) for x in (out, stats, grad_out))  # grad_out: aligned below
    flags, lengths = _cudnn_dense_layout(q, key_lengths, q_len, causal, alibi, scale)
    return [_first_rows(grad, rows) for grad in _cudnn_backward(q, k, v, out, stats, grad_out, lengths, flags)]


def _cudnn_dense_forward_fake(q, k, v, q_len, causal, alibi, scale, with_stats):
    batch, heads, seq, dim = q.shape
    stats_shape = (batch, heads, seq, 1) if with_stats else (0,)
    return _bshd_empty(batch, heads, seq, dim, q), q.new_empty(stats_shape, dtype=torch.float32)


def _cudnn_grads_fake(q, k, v, *rest) -> list:
    return [_bshd_empty(*x.shape, x) for x in (q, k, v)]


_CUDNN_OPTIONS_SCHEMA = "SymInt q_len, bool causal, bool alibi, float scale"
# Opaque under torch.compile: the frontend's graphs, plan cache and handle lock run when the compiled step runs.
_cudnn_forward_op = _opaque(
    "cudnn_attention_forward",
    f"(Tensor q, Tensor k, Tensor v, {_CUDNN_OPTIONS_SCHEMA}, bool with_stats) -> (Tensor, Tensor)",
    _cudnn_dense_forward_impl,
    _cudnn_dense_forward_fake,
)
_cudnn_backward_op = _opaque(
    "cudnn_attention_backward",
    f"(Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor grad_out, {_CUDNN_OPTIONS_SCHEMA}) -> Tensor[]",
    _cudnn_dense_backward_impl,
    _cudnn_grads_fake,
)
_DENSE_OPS = (_cudnn_forward_op, _cudnn_backward_op)


class _CudnnTrainingAttention(torch.autograd.Function):
    """cuDNN attention for training around one pair of opaque ops (``ops``: dense rows, padded rows or packed
    documents): forward keeps the softmax stats, backward runs the pair's backward op. Saved: q, k, v, the
    output, the stats and the layout's tensors (``layout``); under torch.compile both ops stay opaque."""

    @staticmethod
    def forward(ctx, ops, q, k, v, layout, *options):
        forward_op, _ = ops
        out, stats = forward_op(q, k, v, *layout, *options, True)
        ctx.save_for_backward(q, k, v, out, stats, *layout)
        ctx.ops, ctx.options = ops, options
        _pass_unused_gradients_as_none(ctx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("cudnn attention")
        if grad_out is None:
            return _none_for_every_input(ctx)
        q, k, v, out, stats, *layout = ctx.saved_tensors
        grads = ctx.ops[1](q, k, v, out, stats, grad_out, *layout, *ctx.options)
        return (None, *grads, None, *(None,) * len(ctx.options))


def _kept_runs(keep: torch.Tensor) -> tuple:
    """A padded batch (bool keep-mask ``[b, s]``, one run of kept keys per row) as cuDNN's ragged entries, one
    per row, found on the device: (key lengths, query lengths, starts). Entry i starts at row i's first kept
    token; its keys are the run, its queries every token from there to the row's end (a query after the run
    still sees the kept keys before it, as on every other backend); tokens before the run see no key and
    stay zero. A row with no kept token is an empty entry."""
    batch, seq = keep.shape
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    first = torch.where(lengths > 0, keep.to(torch.int32).argmax(dim=-1), seq)
    starts = torch.arange(batch + 1, device=keep.device) * seq + F.pad(first, (0, 1))  # the last at b * s
    query_lengths = (seq - first).to(torch.int32)
    return lengths.view(batch, 1, 1, 1), query_lengths.view(batch, 1, 1, 1), starts.view(batch + 1, 1, 1, 1)


def _ragged_flags(alibi: bool, scale: float) -> _CudnnFlags:
    """Causal attention inside each ragged entry (a packed document or a padded row), bounded by its lengths."""
    return _CudnnFlags(causal=True, alibi=alibi, padded=True, scale=float(scale), ragged=True)


def _dense_key_lengths(layout: str, lengths: torch.Tensor) -> Optional[torch.Tensor]:
    """The keys' lengths a padding layout gives the dense graphs: none where the mask keeps every key."""
    return lengths if layout == "prefix" else None


def _padded_rows(keep: torch.Tensor, lengths, query_lengths, starts) -> _RaggedDocuments:
    batch, seq = keep.shape
    return _RaggedDocuments(batch, _cudnn_bucket(seq), lengths, starts, query_lengths=query_lengths, gaps=True)


def _kept_on_tensor(x: torch.Tensor, attribute: str, find: Callable[[torch.Tensor], object]):
    """``find(x)`` (it reads the host) for a compiled step, whose ops see x only when they run. The answer
    rides on the tensor as ``attribute`` with its version, so a step reads the host once where the compiled
    code hands every layer's op, forward and backward, the same tensor (nothing kept on an inference tensor)."""
    if x.is_inference():
        return find(x)
    version, found = getattr(x, attribute, (None, None))
    if version != x._version:
        found = find(x)
        setattr(x, attribute, (x._version, found))
    return found


_LAYOUT_SEEN = "_memory_efficient_adapter_padding_layout"
_DOCUMENTS_SEEN = "_memory_efficient_adapter_documents"


def _padding_layout_when_run(keep: torch.Tensor) -> str:
    return _kept_on_tensor(keep, _LAYOUT_SEEN, _padding_layout)


def _documents_when_run(sequence_ids: torch.Tensor) -> _RaggedDocuments:
    return _kept_on_tensor(sequence_ids, _DOCUMENTS_SEEN, _ragged_documents)


_GAP_ON_CHUNKED = (
    "cudnn under torch.compile: a padding mask with a gap inside a row runs on the chunked kernels (cuDNN takes "
    "one run of kept keys per row); pad on one side, or set config.attn_backend='flex'"
)


def _layout_of(keep: torch.Tensor, layout: str) -> str:
    """The layout an eager caller found (``_padding_layout_per_forward``), else the one found now."""
    layout = layout or _padding_layout_when_run(keep)
    if layout == "gaps":
        _log_once(_GAP_ON_CHUNKED)
    return layout


def _chunked_for_padded_rows(q, alibi: bool) -> tuple:
    """What the chunked kernels need to run a padded-rows call that cuDNN cannot take: the call (k and v with
    q's heads: the caller expands them), BLOOM's slopes and the block sizes."""
    slopes = alibi_slopes(q.shape[1], q.device) if alibi else None
    return _chunked_call(q, q, slopes, None, True, "padding", 0.0), slopes, _chunk_sizes(None)


def _padded_rows_chunked_forward(q, k, v, keep, alibi, scale, with_stats):
    call, slopes, sizes = _chunked_for_padded_rows(q, alibi)
    k, v = _expand_kv(k, call.heads), _expand_kv(v, call.heads)
    out, lse = _chunked_forward(q, k, v, call, _ChunkedBlocks(keep, slopes, scale, None, None), 0, sizes)
    stats = lse.transpose(1, 2).reshape(-1, call.heads) if with_stats else _no_stats(q)
    return _packed_operand(out), stats


def _padded_rows_chunked_backward(q, k, v, out, stats, grad_out, keep, alibi, scale) -> list:
    call, slopes, sizes = _chunked_for_padded_rows(q, alibi)
    batch, heads, seq, dim = q.shape
    lse = stats.view(batch, seq, heads).transpose(1, 2)
    full_k, full_v = _expand_kv(k, heads), _expand_kv(v, heads)
    blocks = _ChunkedBlocks(keep, slopes, scale, None, None)
    grads = _chunked_backward(q, full_k, full_v, out, lse, grad_out, call, blocks, 0, sizes)
    grad_q, grad_k, grad_v = (
        grad.view(batch, x.shape[1], heads // x.shape[1], seq, dim).sum(2) if x.shape[1] != heads else grad
        for grad, x in zip(grads, (q, k, v))
    )
    return [_packed_operand(grad) for grad in (grad_q, grad_k, grad_v)]


def _dense_or_ragged_forward(q, k, v, entries: Optional[_RaggedDocuments], key_lengths, alibi, scale, with_stats):
    """Causal cuDNN attention on the dense graphs where ``entries`` is None (any strides of q, k and v; rows
    bounded by ``key_lengths`` where given), else on the ragged layout of ``entries`` (packed rows: strided q, k
    and v are copied). The stats are ``[b * s, h]`` floats either way."""
    if entries is None:
        out, stats = _cudnn_dense_forward(q, k, v, key_lengths, q.shape[2], True, alibi, scale, with_stats)
        return out, stats.view(-1, q.shape[1]) if with_stats else stats
    q, k, v = (_packed_operand(x) for x in (q, k, v))
    out, stats = _cudnn_ragged_forward(q, k, v, entries, _ragged_flags(alibi, scale), with_stats)
    return out, stats if with_stats else _no_stats(q)


def _dense_or_ragged_backward(q, k, v, out, stats, grad_out, entries, key_lengths, alibi, scale) -> list:
    if entries is None:
        stats = stats.view(q.shape[0], q.shape[1], q.shape[2], 1)
        return _cudnn_dense_backward(q, k, v, out, stats, grad_out, key_lengths, q.shape[2], True, alibi, scale)
    q, k, v = (_packed_operand(x) for x in (q, k, v))
    return list(_cudnn_ragged_backward(q, k, v, out, stats, grad_out, entries, _ragged_flags(alibi, scale)))


def _padded_rows_entries(layout: str, keep, lengths, query_lengths, starts) -> Optional[_RaggedDocuments]:
    """None where the dense graphs take the mask (it keeps every key, or a prefix of every row), else the
    ragged entries of its rows."""
    return None if layout in ("full", "prefix") else _padded_rows(keep, lengths, query_lengths, starts)


def _padded_rows_forward_impl(q, k, v, keep, lengths, query_lengths, starts, alibi, scale, layout, with_stats):
    """A mask that keeps every key (the Trainer's all-ones one) or right padding on the dense graphs (no copy of
    strided q, k and v; sequence lengths for the padding), other single runs per row on the ragged layout, a
    mask with a gap inside a row on the chunked kernels. ``layout``: what an eager caller found, or empty (a
    compiled step: found here)."""
    layout = _layout_of(keep, layout)
    if layout == "gaps":
        return _padded_rows_chunked_forward(q, k, v, keep, alibi, scale, with_stats)
    entries = _padded_rows_entries(layout, keep, lengths, query_lengths, starts)
    return _dense_or_ragged_forward(q, k, v, entries, _dense_key_lengths(layout, lengths), alibi, scale, with_stats)


def _padded_rows_backward_impl(
    q, k, v, out, stats, grad_out, keep, lengths, query_lengths, starts, alibi, scale, layout
):
    layout = _layout_of(keep, layout)
    if layout == "gaps":
        return _padded_rows_chunked_backward(q, k, v, out, stats, grad_out, keep, alibi, scale)
    entries = _padded_rows_entries(layout, keep, lengths, query_lengths, starts)
    key_lengths = _dense_key_lengths(layout, lengths)
    return _dense_or_ragged_backward(q, k, v, out, stats, grad_out, entries, key_lengths, alibi, scale)


def _rows_forward_fake(q, k, v, *layout_and_options):
    """Fake outputs of the padded-rows and documents forward ops, whose last argument is ``with_stats``."""
    batch, heads, seq, dim = q.shape
    stats_shape = (batch * seq, heads) if layout_and_options[-1] else (0,)
    return _bshd_empty(batch, heads, seq, dim, q), q.new_empty(stats_shape, dtype=torch.float32)


_PADDED_ROWS_SCHEMA = "Tensor keep, Tensor lengths, Tensor query_lengths, Tensor starts, bool alibi, float scale, str layout"
# Not captured into a CUDA graph (where torch has the tag): the layout is found, and may change, when the step runs.
_CUDAGRAPH_UNSAFE = getattr(getattr(torch, "Tag", None), "cudagraph_unsafe", None)
_NOT_IN_CUDA_GRAPHS = () if _CUDAGRAPH_UNSAFE is None else (_CUDAGRAPH_UNSAFE,)
_padded_rows_forward_op = _opaque(
    "cudnn_padded_rows_forward",
    f"(Tensor q, Tensor k, Tensor v, {_PADDED_ROWS_SCHEMA}, bool with_stats) -> (Tensor, Tensor)",
    _padded_rows_forward_impl,
    _rows_forward_fake,
    tags=_NOT_IN_CUDA_GRAPHS,
)
_padded_rows_backward_op = _opaque(
    "cudnn_padded_rows_backward",
    f"(Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor grad_out, {_PADDED_ROWS_SCHEMA}) -> Tensor[]",
    _padded_rows_backward_impl,
    _cudnn_grads_fake,
    tags=_NOT_IN_CUDA_GRAPHS,
)
_PADDED_ROWS_OPS = (_padded_rows_forward_op, _padded_rows_backward_op)


def _documents_entries(documents: _RaggedDocuments) -> Optional[_RaggedDocuments]:
    """None where every row is one document (the dense graphs take the call), else the documents."""
    return None if documents.one_per_row else documents


def _documents_forward_impl(q, k, v, sequence_ids, alibi, scale, with_stats):
    """Packed documents, found when the step runs (``_documents_when_run``: once per step in a compiled one)."""
    entries = _documents_entries(_documents_when_run(sequence_ids))
    return _dense_or_ragged_forward(q, k, v, entries, None, alibi, scale, with_stats)


def _documents_backward_impl(q, k, v, out, stats, grad_out, sequence_ids, alibi, scale) -> list:
    entries = _documents_entries(_documents_when_run(sequence_ids))
    return _dense_or_ragged_backward(q, k, v, out, stats, grad_out, entries, None, alibi, scale)


_DOCUMENTS_SCHEMA = "Tensor sequence_ids, bool alibi, float scale"
_documents_forward_op = _opaque(
    "cudnn_documents_forward",
    f"(Tensor q, Tensor k, Tensor v, {_DOCUMENTS_SCHEMA}, bool with_stats) -> (Tensor, Tensor)",
    _documents_forward_impl,
    _rows_forward_fake,
    tags=_NOT_IN_CUDA_GRAPHS,
)
_documents_backward_op = _opaque(
    "cudnn_documents_backward",
    f"(Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor grad_out, {_DOCUMENTS_SCHEMA}) -> Tensor[]",
    _documents_backward_impl,
    _cudnn_grads_fake,
    tags=_NOT_IN_CUDA_GRAPHS,
)
_DOCUMENTS_OPS = (_documents_forward_op, _documents_backward_op)


def _run_cudnn_documents(q, k, v, call: AttentionCall, sequence_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Packed documents, causal inside each (ALiBi relative inside each): one document per row on the dense
    graphs, else on cuDNN's ragged layout (no copy of the keys and values per head, no padding to a common
    length). The documents are found with one host read: once per step in training (kept on the ids' tensor),
    once per forward with a ``ForwardMask`` in an eager forward without gradients, when the step runs in a
    compiled one. Eager calls copy strided q, k and v to packed rows here, once for forward and backward (the
    ops copy them when they run, where they must)."""
    options, tracing = (call.alibi, float(scale)), _is_tracing()
    if not tracing:
        q, k, v = (_packed_operand(x) for x in (q, k, v))
    if call.needs_grad:
        return _CudnnTrainingAttention.apply(_DOCUMENTS_OPS, q, k, v, (sequence_ids,), *options)
    if tracing:
        return _documents_forward_op(q, k, v, sequence_ids, *options, False)[0]
    entries = _documents_entries(_kept_per_forward(call, ("cudnn", "documents"), sequence_ids, _ragged_documents))
    return _dense_or_ragged_forward(q, k, v, entries, None, *options, False)[0]


def _run_cudnn_padded_rows(q, k, v, call: AttentionCall, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """A padding mask (right or left padding: one run of kept keys per row) on cuDNN: its rows' runs found on the
    device (``_kept_runs``, once per forward with a ``ForwardMask``) and its layout on the host, by
    ``_cannot_cudnn`` for an eager call; a compiled step's ops find the layout when they run, and take the
    chunked kernels for a gap inside a row (cuDNN cannot, and no other backend can be chosen then)."""
    tracing = _is_tracing()
    runs = _kept_runs(mask) if tracing else _kept_per_forward(call, ("cudnn", "runs"), mask, _kept_runs)
    options = (call.alibi, float(scale), "" if tracing else _padding_layout_per_forward(call))
    if call.needs_grad:
        return _CudnnTrainingAttention.apply(_PADDED_ROWS_OPS, q, k, v, (mask, *runs), *options)
    return _padded_rows_forward_op(q, k, v, mask, *runs, *options, False)[0]


def _run_cudnn(q, k, v, call: AttentionCall, mask, alibi_slopes, scale, sequence_ids=None, **_):
    """q, k and v padded to the length's bucket (``_cudnn_bucket``), the output cut back to it as a view.
    While tracing the ops pad instead, when the step runs, so that the length may be dynamic. Packed documents
    run on the ragged layout, padding masks as ``_run_cudnn_padded_rows`` says."""
    if call.documents:
        return _run_cudnn_documents(q, k, v, call, sequence_ids, scale)
    if mask is not None:
        return _run_cudnn_padded_rows(q, k, v, call, mask, scale)
    bucket = call.q_len if _is_tracing() else _cudnn_bucket(call.q_len)
    if bucket != call.q_len:
        q, k, v = (F.pad(x, (0, 0, 0, bucket - call.q_len)) for x in (q, k, v))
    options = (call.q_len, call.causal, call.alibi, float(scale))
    if call.needs_grad:
        out = _CudnnTrainingAttention.apply(_DENSE_OPS, q, k, v, (), *options)
    else:
        out, _ = _cudnn_forward_op(q, k, v, *options, False)
    return out[:, :, : call.q_len] if bucket != call.q_len else out


# ----------------------------------------------------------------------------------------------
# Capabilities: each returns None when the backend can take the call, else the reason it cannot
# ----------------------------------------------------------------------------------------------


def _cannot_eager(call: AttentionCall) -> Optional[str]:
    return None


def _cannot_chunked(call: AttentionCall) -> Optional[str]:
    return None


def _cannot_sdpa(call: AttentionCall) -> Optional[str]:
    if call.alibi and call.q_len != 1:
        return (
            "sdpa cannot take ALiBi beyond one query row (a decoding step) without materializing an O(q * k) "
            "bias; use cudnn, flex, flash_attn or chunked"
        )
    return None


def _sdpa_needs_dense_mask(call: AttentionCall) -> Optional[str]:
    """Why sdpa would run a padded or packed call with a dense [b, 1, q, k] mask (None: it needs none).
    ``auto`` then prefers an O(n) backend; an explicit ``sdpa`` still runs it, with the dense mask."""
    if not call.ragged or call.q_len == 1:
        return None
    if call.q_len != call.k_len:
        return "sdpa takes padded or packed rows with a cache only one query row at a time"
    if call.device_type != "cuda":
        return "sdpa's nested jagged (varlen) kernels are causal only on CUDA"
    if torch.compiler.is_compiling():
        return "sdpa's varlen path reads the sequence lengths on the host, which torch.compile cannot trace"
    return None


def _cannot_flex(call: AttentionCall) -> Optional[str]:
    if _flex_module() is None:
        return "flex needs torch.nn.attention.flex_attention (PyTorch >= 2.5)"
    if call.device_type not in ("cuda", "cpu"):
        return f"flex does not run on {call.device_type}"
    if call.device_type == "cpu" and call.needs_grad:
        return "flex has no backward on CPU"
    if call.dropout_p > 0.0:
        return "flex does not take attention dropout"
    if call.device_type == "cuda" and call.head_dim < 32:
        return f"flex needs head_dim >= 32 on CUDA (its Triton templates have no smaller tiles), got {call.head_dim}"
    if call.dtype == torch.float64 or (call.device_type == "cpu" and call.dtype == torch.float16):
        return f"flex does not take {call.dtype} on {call.device_type}"
    return None


def _cannot_flash_attn(call: AttentionCall) -> Optional[str]:
    if call.device_type != "cuda":
        return "flash_attn runs only on CUDA"
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn takes only float16/bfloat16, got {call.dtype}"
    if call.head_dim > 256 or call.head_dim % 8 != 0:
        return f"flash_attn needs head_dim <= 256 and a multiple of 8, got {call.head_dim}"
    if call.mask_kind in ("bool", "additive"):
        return "flash_attn takes only a [batch, k_len] padding mask, not a 4-D mask"
    if call.documents and call.q_len != call.k_len:
        return "flash_attn takes sequence_ids only with q_len == k_len"
    if call.alibi and not call.causal:
        return "flash_attn's ALiBi is symmetric (-slope*|i-j|) without causal masking"
    if call.causal and call.q_len > call.k_len:
        return "flash_attn needs q_len <= k_len with causal masking"
    return None


def _cannot_cudnn(call: AttentionCall) -> Optional[str]:
    """cuDNN's own rules, plus what this backend's glue takes. The padding layout and the slopes are values,
    read once per forward with the forward's ``ForwardMask`` (not once per layer), else once per call."""
    if call.device_type != "cuda":
        return "cudnn runs only on CUDA"
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"cudnn takes only float16/bfloat16, got {call.dtype}"
    if call.head_dim % 8 != 0 or call.head_dim > 128:
        return f"cudnn's fused attention needs head_dim <= 128 and a multiple of 8, got {call.head_dim}"
    if not call.causal or call.q_len != call.k_len:
        return "cudnn here takes causal calls over the full sequence (not a decoding step, chunked prefill or non-causal call)"
    if call.mask_kind in ("bool", "additive"):
        return "cudnn takes padding only as sequence lengths, not a 4-D mask"
    if call.documents and call.mask_kind != "none":
        return "cudnn takes packed documents (sequence_ids) only without a padding mask"
    if call.dropout_p > 0.0:
        return "cudnn here takes no attention dropout (cuDNN refuses it with ALiBi; sdpa runs plain dropout)"
    if _is_tracing():
        return _cannot_trace_cudnn(call)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "cudnn graphs are not captured into a CUDA graph here"
    if call.alibi and not _has_bloom_slopes(call):
        return "cudnn computes BLOOM's ALiBi slopes itself and cannot take other slopes"
    if call.mask_kind == "padding" and _padding_layout_per_forward(call) == "gaps":
        return "cudnn takes a padding mask that keeps one run of keys per row (right or left padding), not a gap inside a row"
    return None


def _cannot_trace_cudnn(call: AttentionCall) -> Optional[str]:
    """While torch.compile (or export) traces, cudnn becomes opaque ops, and it takes only the calls it can
    accept without reading a tensor's values on the host: ALiBi only with the slopes a model's ``ForwardMask``
    holds as BLOOM's (``ForwardMask.bloom_alibi_slopes``). A padding mask's layout and packed documents are
    found when the step runs (``_run_cudnn_padded_rows``, ``_run_cudnn_documents``). Lengths may be dynamic:
    the ops pad to the bucket when they run."""
    if call.alibi and not _are_vouched_bloom_slopes(call):
        return "cudnn under torch.compile takes ALiBi only with the BLOOM slopes of the model's ForwardMask"
    return None


def _padding_layout_per_forward(call: AttentionCall) -> str:
    return _kept_per_forward(call, ("cudnn", "padding"), call.padding_mask, _padding_layout)


def _has_bloom_slopes(call: AttentionCall) -> bool:
    """The slopes its forward's ``ForwardMask`` made as BLOOM's, else slopes checked (a host read, once per
    forward with a ``ForwardMask``) to equal them."""
    return _are_vouched_bloom_slopes(call) or _checked_per_forward(call, "slopes", call.slopes, _are_bloom_slopes)


def _are_vouched_bloom_slopes(call: AttentionCall) -> bool:
    """The call's slopes are the ones its forward's ``ForwardMask`` made as BLOOM's: no need to read them."""
    return call.holder is not None and call.holder.bloom_slopes is call.slopes


def _cannot_xformers(call: AttentionCall) -> Optional[str]:
    if call.device_type != "cuda":
        return "xformers runs only on CUDA here"
    if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers does not take {call.dtype}"
    if call.alibi:
        return "xformers cannot take ALiBi slopes without a materialized bias"
    if call.mask_kind != "none" or call.documents:
        return "xformers backend takes no attention_mask or sequence_ids here"
    if call.causal and call.q_len > call.k_len:
        return "xformers needs q_len <= k_len with causal masking"
    return None


# ----------------------------------------------------------------------------------------------
# Probing installed packages: once per backend and device type
# ----------------------------------------------------------------------------------------------


def _probe_flash_attn(device_type: str) -> Optional[str]:
    functions = _flash_attn_functions()
    if functions is None:
        return "flash_attn is not installed"
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    functions[0](q, q, q, causal=True)
    return None


def _probe_xformers(device_type: str) -> Optional[str]:
    xops = _xformers_ops()
    if xops is None:
        return "xformers is not installed"
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    xops.memory_efficient_attention(q, q, q)
    return None


def _probe_cudnn(device_type: str) -> Optional[str]:
    if _cudnn_module() is None:
        return "cudnn (the nvidia-cudnn-frontend package) is not installed"
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    flags = _CudnnFlags(causal=True, alibi=True, padded=False, scale=0.125)
    out, stats = _cudnn_forward(q, q, q, (None, None), flags, with_stats=True)
    _cudnn_backward(q, q, q, out, stats, torch.ones_like(out), (None, None), flags)
    return None


_PROBES = {"flash_attn": _probe_flash_attn, "xformers": _probe_xformers, "cudnn": _probe_cudnn}


def _run_outside_transforms_and_modes(probe: Callable[[str], Optional[str]], device_type: str) -> Optional[str]:
    """A probe's kernels run on fresh real tensors even when the first call that asks comes under a
    ``torch.func`` transform (whose tensors have no storage to hand a kernel) or a dispatch mode such as
    FakeTensorMode: there the probe would fail and a working backend be recorded broken for the process."""
    from torch.utils._python_dispatch import _disable_current_modes

    with torch._C._DisableFuncTorch(), _disable_current_modes():
        return probe(device_type)


def _probe(name: str, device_type: str) -> Optional[str]:
    """Why an optional backend does not run on this machine (None if it runs); probed once, logged once.

    A probe builds and runs real kernels (cuDNN's takes a lock around its plan cache), which torch.compile could
    not trace: under torch.compile this function runs as it is while the graph is traced, and its result (fixed
    for the process) is a constant of the graph (see the mark below)."""
    if name not in _PROBES:
        return None
    key = (name, device_type)
    if key not in _probe_results:
        try:
            _probe_results[key] = _run_outside_transforms_and_modes(_PROBES[name], device_type)
        except Exception as error:  # an install built for another torch/CUDA fails in many ways
            reason = f"{name} is installed but does not run here ({type(error).__name__}: {error}); skipping it"
            _log_once(reason)
            _probe_results[key] = reason
    return _probe_results[key]


# What torch._dynamo.assume_constant_result sets (torch marks its own functions this way too); set directly so
# that loading the kernel layer does not import torch._dynamo.
_probe._dynamo_marked_constant = True

_CANNOT = {
    "sdpa": _cannot_sdpa,
    "cudnn": _cannot_cudnn,
    "flex": _cannot_flex,
    "flash_attn": _cannot_flash_attn,
    "xformers": _cannot_xformers,
    "chunked": _cannot_chunked,
    "eager": _cannot_eager,
}
_RUN = {
    "sdpa": _run_sdpa,
    "cudnn": _run_cudnn,
    "flex": _run_flex,
    "flash_attn": _run_flash_attn,
    "xformers": _run_xformers,
    "chunked": _run_chunked,
    "eager": _run_eager,
}


def _cannot_differentiate(name: str, call: AttentionCall) -> Optional[str]:
    """An additive mask or ALiBi slopes that require grad get their gradient only where autograd runs through the
    bias added to the scores: eager, and sdpa on the CPU (its math kernel). The others would leave it None."""
    if call.bias_needs_grad and not (name == "eager" or (name == "sdpa" and call.device_type == "cpu")):
        return (
            f"{name} gives no gradient to an additive attention_mask or alibi_slopes that requires grad; "
            "eager does (and sdpa on the CPU), or detach them"
        )
    return None


def _cannot_transform(name: str) -> Optional[str]:
    """Under a ``torch.func`` transform only torch's sdpa and the plain eager path run: the other backends are
    autograd Functions (ours, flash_attn's, xformers') or higher-order ops without rules for every transform.
    While ``torch.export`` or ``torch.onnx`` traces, the same two (``_computes_as_stock``): any other puts an op of
    its own into the program, without a backward there, and one that loads only where this file was imported."""
    if name in ("sdpa", "eager"):
        return None
    if _under_function_transform():
        return (
            f"{name} cannot run under torch.func transforms (grad, vmap, jvp) or forward-mode AD (inside "
            "torch.autograd.forward_ad.dual_level, which torch keeps process-wide); sdpa and eager can"
        )
    if _is_exporting():
        return (
            f"{name} would put an op of its own into the exported program (no backward there, and it loads only "
            "where this modeling file was imported): export with the auto, sdpa or eager backend"
        )
    return None


def _why_not(name: str, call: AttentionCall) -> Optional[str]:
    return (
        _probe(name, call.device_type)
        or _cannot_differentiate(name, call)
        or _cannot_transform(name)
        or _CANNOT[name](call)
    )


def _auto_skips(name: str, call: AttentionCall) -> bool:
    """``auto`` passes over sdpa where it would build an O(q * k) mask for a padded or packed call, and over every
    backend but sdpa and plain eager while the model computes as stock does (``_computes_as_stock``: the others
    are ops of their own, which a trace cannot save and a user's TorchFunctionMode sees only in forward)."""
    if _computes_as_stock():
        return name not in ("sdpa", "eager")
    return name == "sdpa" and _sdpa_needs_dense_mask(call) is not None


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _auto_order(device_type: str) -> tuple:
    return AUTO_ORDER.get(device_type, AUTO_ORDER_OTHER_DEVICES)


def _cudnn_first(call: AttentionCall) -> bool:
    """Packed documents go to cudnn before sdpa: cuDNN's ragged layout runs them in 0.91x to 0.98x the time of
    PyTorch's flash varlen kernels (an H200, LLaMA-shaped 8k step: 43.4 against 45.7 ms), and far faster than
    the nested tensors sdpa falls back to for fp32 (README, "Padded batches run unpadded")."""
    return call.documents


def _auto_order_for(call: AttentionCall) -> tuple:
    order = _auto_order(call.device_type)
    if "cudnn" in order and _cudnn_first(call):
        return ("cudnn",) + tuple(name for name in order if name != "cudnn")
    return order


# Backends ``auto`` skips after they failed for reasons of their own (a missing kernel, a failed compile),
# per call signature (shapes aside), so one kind of call never costs another its fastest kernel.
_DEMOTIONS_KEPT = 256
_demoted: dict = {}
_demoted_lock = threading.Lock()

# Messages of failures that belong to a backend (no kernel for this GPU, dtype or build), not to the call.
_UNAVAILABLE_KERNEL_MESSAGES = (
    "no available kernel",
    "no kernel image is available",
    "no operator found",
    "not compiled with",
    "only supports",
    "not implemented for",
    "unsupported gpu",
)


def _signature(name: str, call: AttentionCall) -> tuple:
    return (name, call.device_type, call.dtype, call.head_dim, call.heads, call.kv_heads, call.causal,
            call.mask_kind, call.documents, call.alibi, call.dropout_p > 0.0, call.needs_grad)


def _is_backend_failure(error: BaseException) -> bool:
    """An import or kernel-availability failure of the backend itself, which another backend can avoid."""
    if isinstance(error, (BackendFailure, ImportError, NotImplementedError)):
        return True
    if type(error).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _UNAVAILABLE_KERNEL_MESSAGES)


def _demote(name: str, call: AttentionCall, error: BaseException) -> None:
    reason = f"{type(error).__name__}: {error}"
    with _demoted_lock:
        if len(_demoted) < _DEMOTIONS_KEPT:
            _demoted[_signature(name, call)] = reason
    _log_once(f"attention backend {name!r} cannot run this kind of call here ({reason}); auto skips it for such calls")


def demoted_backends() -> list:
    """``(backend, call signature, reason)`` for every backend ``auto`` skips after a failure of its own."""
    with _demoted_lock:
        return [(signature[0], signature[1:], reason) for signature, reason in _demoted.items()]


def _first_auto_backend(call: AttentionCall, skip: tuple = ()) -> Optional[str]:
    for name in _auto_order_for(call):
        if name in skip or _signature(name, call) in _demoted or _auto_skips(name, call):
            continue
        if _why_not(name, call) is None:
            return name
    return None


def select_backend(call: AttentionCall, backend: str = "auto") -> str:
    """The backend that will run ``call``; raises ValueError when an explicit backend cannot take it."""
    if backend == "auto":
        name = _first_auto_backend(call)
        if name is None:
            raise ValueError(f"no attention backend can take this call: {call}")
        return name
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    reason = _why_not(backend, call)
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} cannot take this call: {reason}")
    return backend


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False on the meta device, which autocast refuses to name."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under ``torch.autocast`` cast q, k and v to the autocast dtype, as autocast does for SDPA (not float64)."""
    device_type = q.device.type
    if not _autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast_as_autocast_would(t, dtype) for t in (q, k, v))


def _run(name: str, q, k, v, call: AttentionCall, mask, alibi_slopes, scale, options: dict) -> torch.Tensor:
    if name != "flash_attn":  # flash_attn drops padded keys itself (varlen)
        k, v = _clear_padded_keys(k, v, call, mask)
    if _runs_documents_in_one_dense_row(name, call):
        return _run_documents_kept_apart(_RUN[name], q, k, v, call, (mask, alibi_slopes, scale), options)
    return _RUN[name](q, k, v, call, mask, alibi_slopes, scale, **options)


def _runs_documents_in_one_dense_row(name: str, call: AttentionCall) -> bool:
    """Whether ``name`` runs an inference call's packed documents as one dense row (sdpa's varlen kernels and
    cuDNN's ragged graphs run each document alone). There a key hidden from a query still enters its matmuls
    at probability 0, and 0 * NaN is NaN: a value that is not finite (on sdpa's additive mask a key too) would
    reach every document of the row. In inference each document's outputs are read on their own (a padded eval
    batch runs packed, see ``padded_rows``); in training a NaN anywhere makes the loss NaN anyway."""
    if not call.documents or call.needs_grad:
        return False
    return name in ("eager", "chunked", "flex") or name == "sdpa" and not _sdpa_runs_varlen(call)


def _run_documents_kept_apart(run: Callable, q, k, v, call: AttentionCall, arguments: tuple, options: dict):
    """``run`` on keys and values whose non-finite rows are zeroed, then NaN at the queries that see such a
    row in their own document (to their left when causal): what running each document alone gives, up to
    which non-finite value (inf or NaN) comes out."""
    not_finite = ~(torch.isfinite(k).all(dim=-1) & torch.isfinite(v).all(dim=-1))
    hidden = not_finite[..., None]
    out = run(q, k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0), call, *arguments, **options)
    documents = _documents_of(call, options["sequence_ids"])
    seen = _queries_seeing_in_their_document(not_finite, documents, call)
    return out.masked_fill(_expand_kv(seen[..., None], call.heads), float("nan"))


def _queries_seeing_in_their_document(flags: torch.Tensor, documents: torch.Tensor, call: AttentionCall):
    """``[b, h_kv, q_len]``: whether a query's document holds a flagged key (``flags`` ``[b, h_kv, k_len]``) that
    the query sees: at or before its own position when causal (queries aligned to the last keys), anywhere in
    the document otherwise."""
    batch, kv_heads, length = flags.shape
    documents = documents.expand(batch, length)
    positions = torch.arange(length, device=flags.device).expand(batch, length)
    starts = F.pad(documents[:, 1:] != documents[:, :-1], (1, 0), value=True)
    first = torch.where(starts, positions, 0).cummax(dim=-1).values
    flags = flags.long()
    counts = flags.cumsum(dim=-1)

    def at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(-1, index[:, None].expand(batch, kv_heads, length))

    before = at(counts, first) - at(flags, first)
    if call.causal:
        through = counts
    else:
        ends = F.pad(documents[:, 1:] != documents[:, :-1], (0, 1), value=True)
        last = torch.where(ends, positions, length - 1).flip(-1).cummin(dim=-1).values.flip(-1)
        through = at(counts, last)
    return (through - before > 0)[..., length - call.q_len:]


def _run_auto(q, k, v, call: AttentionCall, mask, alibi_slopes, scale, options: dict, name: Optional[str] = None):
    """The first backend of the auto order that takes the call (``name`` when the caller chose it already). A
    backend failing for reasons of its own is skipped for this kind of call from then on; any other error is
    the caller's (or a bug) and is raised. A failure under a ``torch.func`` transform (sdpa has no forward-mode
    derivative for ``jvp``) belongs to the transform: the next backend runs, and nothing is skipped later."""
    name = select_backend(call, "auto") if name is None else name
    failed, first_failure = (), None
    while name is not None:
        try:
            return _run(name, q, k, v, call, mask, alibi_slopes, scale, options)
        except Exception as error:
            if not _is_backend_failure(error):
                raise
            if not _under_function_transform():
                _demote(name, call, error)
            failed, first_failure = failed + (name,), first_failure or error
        name = _first_auto_backend(call, skip=failed)
    raise first_failure


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: Optional[Union[torch.Tensor, ForwardMask]] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
    light_softmax: bool = True,
    dropout_matmul: bool = True,
    chunk_size: Optional[Union[int, tuple, list]] = None,
    flex_static_shapes: Optional[int] = None,
    sequence_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scaled dot-product attention through the fastest backend that can take the call.

    q ``[b, h, q_len, d]``, k/v ``[b, h_kv, k_len, d]`` (``h % h_kv == 0``). ``causal`` is bottom-right
    aligned when ``q_len != k_len``. ``attention_mask`` is a bool keep-mask ``[b, k_len]`` or a bool/additive
    mask broadcastable to ``[b, h, q_len, k_len]``, bare or in a ``ForwardMask``. ``alibi_slopes`` ``[h]``
    adds ``slope * (j - i_aligned)``. A query row that sees no key returns zeros; a NaN in a real input
    propagates, one in a padded key never matters. ``light_softmax``/``dropout_matmul`` shape the eager
    path, ``chunk_size`` the chunked one, ``flex_static_shapes`` flex's compiles (see ``attention_options``).

    ``sequence_ids`` ``[b, k_len]`` (integers) packs several documents into a row: a new document starts
    wherever the id changes along the row, and a query sees only keys of its own document (with ``causal``
    and the padding mask on top). With a padding mask, ALiBi distances count only kept keys (as BLOOM's
    positions do). Padded or packed calls never build a ``[b, 1, q_len, k_len]`` mask except on ``eager``
    and for a user's 4-D mask; outputs at padded query positions are unspecified (zeros on varlen kernels).
    """
    _refuse_context_parallel()
    mask = mask_tensor(attention_mask)
    requested = backend_from_config(None, backend)
    _check_are_tensors(q, k, v)
    q, k, v = _autocast_inputs(q, k, v)
    call, name = _described_and_selected(q, k, v, causal, attention_mask, alibi_slopes, dropout_p, sequence_ids, requested)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -math.inf < scale < math.inf):
        raise ValueError(
            f"scale must be a finite number (a Python float) or None, got {type(scale).__name__} {scale!r}"
        )
    scale = 1.0 / math.sqrt(call.head_dim) if scale is None else float(scale)
    _check_switches(light_softmax=light_softmax, dropout_matmul=dropout_matmul)
    options = dict(
        light_softmax=light_softmax,
        dropout_matmul=dropout_matmul,
        chunk_size=_chunk_sizes(chunk_size),
        flex_static_shapes=_flex_static_limit(flex_static_shapes),
        holder=call.holder,
        sequence_ids=sequence_ids,
    )
    if requested == "auto":
        return _run_auto(q, k, v, call, mask, alibi_slopes, scale, options, name)
    return _run_requested(name, q, k, v, call, mask, alibi_slopes, scale, options)


# Where torch's context parallel keeps its record of replaced functions (torch 2.13; before: the second).
_CONTEXT_PARALLEL_MODULES = (
    "torch.distributed.tensor.experimental._context_parallel._attention",
    "torch.distributed.tensor.experimental._attention",
)


def _refuse_context_parallel() -> None:
    """torch's ``context_parallel`` shards the sequence over ranks and makes attention whole again by replacing
    ``F.scaled_dot_product_attention`` (its record of replaced functions says so), which the kernels here do
    not go through: each rank would attend to its own shard only, silently."""
    if torch.compiler.is_compiling():
        return
    records = (getattr(sys.modules.get(name), "_replaced_functions", None) for name in _CONTEXT_PARALLEL_MODULES)
    if any(replaced and F.scaled_dot_product_attention in replaced for replaced in records):
        raise NotImplementedError(
            "context parallel (torch.distributed.tensor.experimental.context_parallel) is not supported: it "
            "reaches attention through F.scaled_dot_product_attention, which these kernels do not call"
        )


def _run_requested(name: str, q, k, v, call: AttentionCall, mask, alibi_slopes, scale, options: dict) -> torch.Tensor:
    """A backend the caller named. A failure of its own (no kernel for this call, a compile that fails: a
    Triton template without tiles for this head_dim) is raised as one RuntimeError naming the backend and the
    call, from the original error; ``auto`` would have run the next backend that takes the call."""
    try:
        return _run(name, q, k, v, call, mask, alibi_slopes, scale, options)
    except Exception as error:
        if not _is_backend_failure(error):
            raise
        first_line = next(iter(str(error).strip().splitlines()), "")
        raise RuntimeError(
            f"attention backend {name!r} failed on this call (head_dim {call.head_dim}, {call.heads} heads, "
            f"{call.kv_heads} key/value heads, {call.dtype}, {call.mask_kind} mask): {type(error).__name__}: "
            f"{first_line}; backend='auto' runs the next backend that can take it"
        ) from error


def _described_and_selected(q, k, v, causal, attention_mask, alibi_slopes, dropout_p, sequence_ids, requested: str):
    """The call's description (its checks included) and the backend that runs it.

    Every layer of a forward makes the same call, so with the forward's ``ForwardMask`` both are worked out
    once per forward: kept there for calls with the same shapes, dtypes, devices, options, slopes and sequence
    ids (and the same set of demoted backends); each call still checks its scalar options. Without a holder,
    or while compiling, every call describes and selects."""

    def describe_and_select() -> tuple:
        call = _describe(q, k, v, causal, attention_mask, alibi_slopes, dropout_p, sequence_ids)
        return call, select_backend(call, requested)

    if not isinstance(attention_mask, ForwardMask) or torch.compiler.is_compiling():
        return describe_and_select()
    _check_scalars(causal, dropout_p)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    slot = (
        "call", q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
        causal, dropout_p, needs_grad, requested, len(_demoted),
    )
    return _once_per_forward(attention_mask, slot, (alibi_slopes, sequence_ids), describe_and_select)


# ----------------------------------------------------------------------------------------------
# Attention weights on request (output_attentions=True)
# ----------------------------------------------------------------------------------------------


def attention_with_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    sequence_ids: Optional[torch.Tensor] = None,
) -> tuple:
    """``attention()`` on the eager math, returning ``(output, weights)``; ``weights`` ``[b, h, q_len, k_len]``
    are the softmax probabilities after dropout, as transformers' eager attention returns them.

    For ``output_attentions=True`` only: the weights are O(seq^2), which the fused kernels never form.
    """
    _log_once("output_attentions=True: attention weights are computed with the eager math (O(seq^2) memory)")
    mask = mask_tensor(attention_mask)
    q, k, v = _autocast_inputs(q, k, v)
    call = _describe(q, k, v, causal, mask, alibi_slopes, dropout_p, sequence_ids)
    scale = 1.0 / math.sqrt(call.head_dim) if scale is None else float(scale)
    k, v = _clear_padded_keys(k, v, call, mask)
    probs, row_has_key = _eager_probabilities(q, k, call, mask, alibi_slopes, scale, sequence_ids=sequence_ids)
    weights = F.dropout(probs, p=call.dropout_p, training=call.dropout_p > 0.0)
    output = torch.matmul(weights, _expand_kv(v, call.heads))
    return _zero_empty_rows(output, row_has_key), weights


_WEIGHTS_ARGUMENTS = ("causal", "attention_mask", "alibi_slopes", "dropout_p", "scale", "sequence_ids")


def attention_recording_weights(q, k, v, weights: Optional[list], **kwargs) -> torch.Tensor:
    """``attention(q, k, v, **kwargs)``; given a ``weights`` list, ``attention_with_weights`` instead, with the
    weights appended to the list (how a model collects them per layer for ``output_attentions=True``)."""
    if weights is None:
        return attention(q, k, v, **kwargs)
    output, layer_weights = attention_with_weights(q, k, v, **{n: kwargs[n] for n in _WEIGHTS_ARGUMENTS if n in kwargs})
    weights.append(_over_whole_cache(layer_weights, kwargs.get("attention_mask")))
    return output


def _over_whole_cache(weights: torch.Tensor, mask) -> torch.Tensor:
    """Weights over the written slots of a fixed-size cache widened to the whole cache with zeros: stock masks
    the unwritten slots, so its weights there are exactly zero."""
    slots = mask.cache_slots if isinstance(mask, ForwardMask) else None
    if slots is None or weights.shape[-1] >= slots:
        return weights
    return F.pad(weights, (0, slots - weights.shape[-1]))


def recorded_weights(weights: Optional[list]) -> Optional[torch.Tensor]:
    """The weights ``attention_recording_weights`` appended last, or None when none were asked for. Attention
    modules return them beside their output, as transformers' do, so that transformers' output-capturing hooks
    (``_can_record_outputs``) find the same weights as ``output_attentions``."""
    return weights[-1] if weights else None


def available_backends(device: Optional[str] = None) -> list:
    """Backends that run on ``device`` (default: CUDA if present, else CPU) on this machine."""
    device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    names = []
    for name in BACKENDS:
        if _probe(name, device_type) is not None:
            continue
        if name == "flex" and _flex_module() is None:
            continue
        if device_type == "cpu" and name in ("cudnn", "flash_attn", "xformers"):
            continue
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# Helpers for the models
# ----------------------------------------------------------------------------------------------


# BLOOM's slopes per (head count, device): a model asks for them every forward, and building them on a GPU
# copies from host memory, which waits for the GPU to finish its queued work. A cached tensor that was
# changed in place or made to require grad is built again.
_SLOPES_KEPT = 64
_slopes_cache: dict = {}
_slopes_lock = threading.Lock()


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """BLOOM's ALiBi slopes (float32 ``[num_heads]``), including head counts that are not powers of two.

    Outside tracing and ``torch.func`` transforms the tensor is cached per head count and device (treat it as
    read-only)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes needs a positive number of attention heads, got num_heads={num_heads!r}")
    if (
        _is_tracing()
        or torch.is_inference_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or _fake_tensor_mode_active()
    ):
        # a constant of the traced graph; an inference tensor; one a transform wraps at its level (used after the
        # transform, it fails torch's level check); a fake tensor (shape inference): never cached
        return _build_alibi_slopes(num_heads, device)
    key = (num_heads, torch.device("cpu" if device is None else device))
    with _slopes_lock:
        slopes = _slopes_cache.get(key)
        if slopes is None or slopes._version != 0 or slopes.requires_grad:
            if len(_slopes_cache) >= _SLOPES_KEPT:
                _slopes_cache.clear()
            slopes = _slopes_cache[key] = _build_alibi_slopes(num_heads, device)
    return slopes


def _fresh_locks_in_forked_child() -> None:
    """A process forked while another thread held one of the kernel layer's locks (a DataLoader worker, say)
    would inherit it held, and wait on it forever (every BLOOM forward takes the slopes' lock): the child gets new
    ones, every module-level lock found as it is (a lock added later included) and the cuDNN plan cache's. What they
    guard stays as the fork found it (each cache is consistent between its statements)."""
    module_globals = globals()
    for name, value in list(module_globals.items()):
        if isinstance(value, _LOCK_TYPE):
            module_globals[name] = threading.Lock()
    _cudnn_plans._lock = threading.Lock()


_LOCK_TYPE = type(threading.Lock())


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_fresh_locks_in_forked_child)


def _fake_tensor_mode_active() -> bool:
    detect = getattr(torch._guards, "detect_fake_mode", None)
    return detect is not None and detect() is not None


def _is_cached_bloom_slopes(slopes: torch.Tensor) -> bool:
    """``slopes`` is alibi_slopes()'s own tensor for its head count and device, unchanged: no need to read it."""
    cached = _slopes_cache.get((slopes.shape[0], slopes.device)) if slopes.dim() == 1 else None
    return cached is slopes and slopes._version == 0 and not slopes.requires_grad


def _build_alibi_slopes(num_heads: int, device) -> torch.Tensor:
    closest_power = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest_power) - 3)))
    slopes = [base ** (i + 1) for i in range(closest_power)]
    if closest_power != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest_power) - 3)))
        remaining = min(closest_power, num_heads - closest_power)
        slopes += [extra_base ** (2 * i + 1) for i in range(remaining)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def _is_tracing() -> bool:
    """True while torch.compile, torch.export or torch.jit.trace traces the forward: no host sync or
    data-dependent branch then (a trace would keep the branch its example inputs took)."""
    return torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()


def keep_mask_from_padding(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A transformers 0/1 padding mask ``[b, k_len]`` as a bool keep-mask, or None when nothing is padded.

    Deciding "nothing is padded" reads the mask on the host, so while compiling or exporting, and under
    ``torch.func`` transforms, the keep-mask is always returned (the kernels take an all-True mask as well, at the
    price of a mask). A bool mask is copied too: layers run again in backward (checkpoints, recomputed norms) read
    the keep-mask then, and the caller may have changed their mask in place since (stock builds a mask of its own at
    every forward).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [batch, k_len], got shape {list(attention_mask.shape)}")
    keep = attention_mask.to(torch.bool, copy=True)
    if _host_cannot_read(keep):
        return keep
    return None if bool(keep.all()) else keep


def _host_cannot_read(tensor: torch.Tensor) -> bool:
    """Whether a mask's values cannot be read on the host to choose a path: while tracing, under a ``torch.func``
    transform (``vmap``'s per-sample rows), and for fake or meta tensors (what tools that estimate memory or shapes
    run a model on)."""
    return torch._C._are_functorch_transforms_active() or _values_unreadable(tensor)


def _values_unreadable(tensor: torch.Tensor) -> bool:
    """Whether a tensor's values cannot be read on the host at all: while tracing, fake or meta tensors."""
    return _is_tracing() or _fake_tensor_mode_active() or tensor.device.type == "meta"


def check_mask_shape(attention_mask: Optional[torch.Tensor], batch_size: int, new_tokens: int) -> None:
    """Refuse a model's attention_mask made for another batch or shorter than the new tokens, before an
    all-ones padding mask (which ``keep_mask_from_padding`` turns into None) could hide its shape. A 4-D mask
    may broadcast over the batch and the keys (size 1), as SDPA takes it."""
    if attention_mask is None:
        return
    broadcasts = attention_mask.dim() == 4
    batch_ok = attention_mask.shape[0] == batch_size or (broadcasts and attention_mask.shape[0] == 1)
    keys_ok = attention_mask.shape[-1] >= new_tokens or (broadcasts and attention_mask.shape[-1] == 1)
    if not batch_ok or not keys_ok:
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)}, but the inputs have batch size {batch_size} "
            f"and {new_tokens} new tokens (the mask covers the cached tokens too)"
        )


def check_positions(position_ids: torch.Tensor, limit: int, what: str) -> None:
    """Refuse positions outside ``[0, limit)`` with a message naming them, without a host sync: on the CPU it
    raises at once; on CUDA it is a device-side assert, as the embedding lookup it protects would be."""
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position_ids must be int64 or int32 (they index {what}'s positions), got {position_ids.dtype}")
    inside = ((position_ids >= 0) & (position_ids < limit)).all()
    torch._assert_async(inside, f"position_ids must lie in [0, {limit}): {what} has {limit} positions")


def _document_of_token(cu_seqlens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(cu_seqlens[1:].to(tokens.dtype).contiguous(), tokens, right=True)


def varlen_keywords(kwargs: dict) -> dict:
    """The flash-attention varlen keywords (packed rows, as transformers and TRL pass them) among ``kwargs``,
    for a head model to hand on to its base model."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    return {name: kwargs[name] for name in names if name in kwargs}


CONTINUOUS_BATCHING_REFUSAL = (
    "transformers' continuous batching (generate_batch, generate(cache_implementation='paged'), a paged cache) is "
    "not supported by these modeling files: use generate() with a dynamic or static cache, or the stock class"
)


# The settings this layer reads from a model's config at each forward (README, "Settings"), which our classes'
# ``from_pretrained`` and ``from_config`` also take as keywords.
CONFIG_SWITCHES = (
    "attn_backend", "attn_chunk_size", "attn_flex_static_shapes", "unpad_batches", "sequence_tile_size",
    "offload_checkpoints", "checkpoints_on_device", "recompute_norm_outputs", "loss_chunk_size",
    "keep_logits_in_training",
)


class KernelLayerModelMixin:
    """First base of every model class of ours: how they answer transformers' attention machinery."""

    # the family's own config settings beyond ``CONFIG_SWITCHES`` (GPT-2's Light Attention)
    _family_config_switches: tuple = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, which also takes our settings as keywords (``sequence_tile_size=4``)
        and sets them on the loaded config: transformers sets a keyword on the config only where ``config.json``
        already has it, and hands the others to the model's constructor, which takes none (a TypeError)."""
        switches = cls._config_switches_in(kwargs)
        loaded = super().from_pretrained(*args, **kwargs)
        _set_config_switches((loaded[0] if isinstance(loaded, tuple) else loaded).config, switches)
        return loaded

    @classmethod
    def _from_config(cls, config, **kwargs):
        """What ``AutoModel...from_config(config, **kwargs)`` calls: as ``from_pretrained``, our settings among the
        keywords go to the model's config."""
        switches = cls._config_switches_in(kwargs)
        model = super()._from_config(config, **kwargs)
        _set_config_switches(model.config, switches)
        return model

    @classmethod
    def _config_switches_in(cls, kwargs: dict) -> dict:
        """Our settings among ``kwargs``, taken out of it."""
        names = (*CONFIG_SWITCHES, *cls._family_config_switches)
        return {name: kwargs.pop(name) for name in names if name in kwargs}

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """``set_attn_implementation`` works: attention reads ``config._attn_implementation`` on every forward
        (transformers decides this from the source text, looking for its own AttentionInterface)."""
        return True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, with our code written beside the checkpoint wherever the config's
        ``auto_map`` names this class: transformers before 5.1x registers a class loaded as remote code for its
        Auto class only where it has no class of that model type itself, so our LLaMA, GPT-2, BLOOM and BART
        saved a config pointing at a modeling file they did not write (reloading failed, or gave the stock class
        without a word)."""
        if type(self)._auto_class is None:
            for auto_class in _auto_classes_naming(self.config, type(self).__name__):
                try:
                    type(self).register_for_auto_class(auto_class)
                    break
                except ValueError:  # an Auto class this transformers does not have
                    continue
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _initialize_weights(self, module: torch.nn.Module, is_custom_code: bool = False) -> None:
        """transformers' per-module init, as it runs for its own classes. For remote code later transformers 5 skips
        modules without parameters of their own, guarding code that writes loaded tensors directly; ours writes
        through transformers' init functions, which leave loaded tensors alone, and GPT-2's and Qwen's attention
        and MLP modules hold the scaled draw of their ``c_proj``, as stock's do."""
        super()._initialize_weights(module)

    def init_continuous_batching(self, *args, **kwargs):
        """Refused before it starts: continuous batching runs the model on a thread of its own, which only logs a
        forward's error (each request came back empty, ``generate`` returned the prompts, and BART, whose forward
        drops unknown keywords, decoded one wrong token)."""
        raise NotImplementedError(CONTINUOUS_BATCHING_REFUSAL)


def _set_config_switches(config, switches: dict) -> None:
    for name, value in switches.items():
        setattr(config, name, value)


def _auto_classes_naming(config, class_name: str) -> list:
    """The Auto classes whose ``config.auto_map`` entry (``module.Class`` or ``repo--module.Class``) is the class
    ``class_name``."""
    auto_map = getattr(config, "auto_map", None) or {}
    return [key for key, ref in auto_map.items() if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == class_name]


def packed_documents(
    batch_size: int,
    seq_len: int,
    device,
    position_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    past_key_values=None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    cu_seq_lens_k: Optional[torch.Tensor] = None,
    **_,
) -> tuple:
    """``(sequence_ids, position_ids)`` for a model forward that may pack several documents per row.

    Two forms, as transformers and TRL produce them: ``cu_seq_lens_q``/``cu_seq_lens_k`` (cumulative document
    lengths over the flattened ``batch * seq`` tokens, flash-attention's varlen keywords), or ``position_ids``
    restarting inside a row with no attention mask and no cache given (``DataCollatorWithFlattening``; a
    position that does not follow its left neighbour by +1 starts a document, as in transformers). Without
    either, ``sequence_ids`` is None. Missing ``position_ids`` are derived from ``cu_seq_lens_q`` (restarting at
    0 per document). No host sync and no data-dependent branch: one document per row gives all-zero ids.
    """
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if isinstance(cu_seq_lens_q, dict) or isinstance(cu_seq_lens_k, dict):
            raise NotImplementedError(f"cu_seq_lens per layer type: {CONTINUOUS_BATCHING_REFUSAL}")
        if not (isinstance(cu_seq_lens_q, torch.Tensor) and isinstance(cu_seq_lens_k, torch.Tensor)):
            raise ValueError("packed self-attention needs cu_seq_lens_q and cu_seq_lens_k, both tensors")
        if cu_seq_lens_q.shape != cu_seq_lens_k.shape:
            raise ValueError("packed self-attention needs cu_seq_lens_q and cu_seq_lens_k of the same shape")
        if past_key_values is not None and not _is_tracing() and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "cu_seq_lens_q/cu_seq_lens_k pack documents into fresh rows: they cannot continue a cache that "
                "already holds tokens"
            )
        if cu_seq_lens_q.dim() != 1 or cu_seq_lens_q.dtype.is_floating_point or cu_seq_lens_q.numel() < 2:
            raise ValueError(
                f"cu_seq_lens_q must be 1-D integer cumulative lengths [documents + 1], got {cu_seq_lens_q.dtype} "
                f"{list(cu_seq_lens_q.shape)}"
            )
        cu_seqlens = cu_seq_lens_q.to(device)
        _check_cumulative_lengths(cu_seqlens, cu_seq_lens_k.to(device), batch_size * seq_len)
        tokens = torch.arange(batch_size * seq_len, device=device)
        documents = _document_of_token(cu_seqlens, tokens)
        if position_ids is None:
            position_ids = (tokens - cu_seqlens[documents]).view(batch_size, seq_len)
        return documents.view(batch_size, seq_len), position_ids
    if position_ids is None or attention_mask is not None or past_key_values is not None:
        return None, position_ids
    rows_given = position_ids.shape[0] if position_ids.dim() == 2 else 1
    if not 1 <= position_ids.dim() <= 2 or position_ids.shape[-1] != seq_len or rows_given not in (1, batch_size):
        raise ValueError(
            f"position_ids must be [batch, seq], [1, seq] or [seq] for inputs of batch size {batch_size} and "
            f"{seq_len} tokens, got shape {list(position_ids.shape)}"
        )
    rows = position_ids.expand(batch_size, seq_len)
    starts = torch.diff(rows, dim=-1) != 1
    return F.pad(starts.cumsum(-1, dtype=torch.int32), (1, 0)), position_ids


def _check_cumulative_lengths(cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor, tokens: int) -> None:
    """Self-attention's cumulative lengths: equal for queries and keys, from 0, never decreasing, ending at the
    flattened inputs' token count (flash-attention's convention over the kept tokens of a padded batch ends
    short: each document would take others' tokens). Checked without a host sync: at once on the CPU, a
    device-side assert on CUDA. The message names no size: a traced length would be specialized by it."""
    valid = (cu_seq_lens_q[0] == 0) & (cu_seq_lens_q[-1] == tokens) & (cu_seq_lens_q.diff() >= 0).all()
    torch._assert_async(
        valid & (cu_seq_lens_k == cu_seq_lens_q).all(),
        "cu_seq_lens_q and cu_seq_lens_k must be the same cumulative document lengths, from 0 and never decreasing "
        "up to the inputs' batch * seq tokens (padding included)",
    )


def refuse_head_masks(keywords: dict) -> None:
    """Head masks among a model's keyword arguments (``head_mask``, ``decoder_head_mask``,
    ``cross_attn_head_mask``), which the fused kernels cannot take. transformers 4.x applies them (stock BLOOM
    always, GPT-2 and BART on eager attention), so there one is refused by name rather than ignored;
    transformers 5 ignores them, as ours do."""
    names = ("head_mask", "decoder_head_mask", "cross_attn_head_mask")
    given = [name for name in names if keywords.get(name) is not None]
    if not given:
        return
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(
            f"{', '.join(given)} is not supported: the fused attention kernels take no per-head mask (transformers "
            f"{transformers.__version__}'s stock eager attention applies it; transformers 5 ignores head masks)"
        )


def check_token_inputs(
    input_ids: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    prefix: str = "",
    leading_dimensions: bool = False,
) -> None:
    """Exactly one of ``{prefix}input_ids`` ``[batch, seq]`` and ``{prefix}inputs_embeds`` ``[batch, seq, hidden]``.

    Stock fails on other ranks deep inside (a mask or a shape unpacking; an unbatched sequence is blamed on the
    attention mask), so the shape is named here. ``leading_dimensions``: more leading dimensions are flattened
    into the batch (GPT-2's ``[batch, choices, seq]``)."""
    ids_name, embeds_name = f"{prefix}input_ids", f"{prefix}inputs_embeds"
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"You must specify exactly one of {ids_name} or {embeds_name}")
    name, given, rank = (ids_name, input_ids, 2) if input_ids is not None else (embeds_name, inputs_embeds, 3)
    if given.dim() == rank or (leading_dimensions and given.dim() > rank):
        return
    expected = "[batch, seq]" if rank == 2 else "[batch, seq, hidden]"
    hint = f"; add the batch dimension ({name}[None])" if given.dim() == rank - 1 else ""
    raise ValueError(f"{name} must be {expected}, got shape {list(given.shape)}{hint}")


def check_cache_type(past_key_values) -> None:
    """Refuses the legacy tuple-of-tuples cache with one clear error (every family, every transformers version)."""
    if isinstance(past_key_values, (tuple, list)):
        raise TypeError(
            "past_key_values must be a transformers Cache object (e.g. DynamicCache or EncoderDecoderCache), "
            f"not the legacy {type(past_key_values).__name__} of per-layer tensors; build a DynamicCache instead"
        )


def check_cache_not_dropped(
    past_key_values, layers, training: bool, attention_mask: Optional[torch.Tensor] = None, inputs=None
) -> None:
    """Refuses a filled cache in a training forward whose layers are checkpointed (``gradient_checkpointing_enable``
    or ``config.offload_checkpoints``): transformers' checkpointed layers run without the cache (their recompute
    in backward would write it twice), so the cached tokens would silently be left out while positions count
    them. Stock fails there on a shape mismatch.

    For the same reason such layers never fill a cache: refused are an empty cache handed to a forward without
    gradients (``generate()`` with the model left in train mode; with gradients it is a training forward that
    happens to pass one) and a forward whose 2-D ``attention_mask`` covers earlier tokens than its ``inputs`` (ids
    or embeddings) without cached ones (a later step of ``generate()`` or of a decode loop). Each step would attend
    to its new tokens only (stock silently generates from them)."""
    if not training or not _checkpointed(layers):
        return
    cached = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0
    if cached:
        raise ValueError(
            f"a training forward with checkpointed layers (gradient checkpointing or config.offload_checkpoints) "
            f"cannot continue a cache: its layers run without past_key_values, which holds {cached} tokens here. "
            "Run the cached prefix in the same forward, or continue the cache with checkpointing off (PEFT's "
            "prefix tuning is such a cache)"
        )
    if past_key_values is not None and not torch.is_grad_enabled():
        raise _cache_left_unfilled("a forward without gradients given a cache (generate() passes one)")
    if inputs is None or inputs.dim() < 2 or attention_mask is None or attention_mask.dim() != 2:
        return
    if attention_mask.shape[-1] > inputs.shape[1]:
        raise _cache_left_unfilled(
            f"a forward whose attention_mask covers {attention_mask.shape[-1]} tokens, {inputs.shape[1]} of them "
            "new, with no cached ones"
        )


def _cache_left_unfilled(what: str) -> ValueError:
    return ValueError(
        f"{what}, on a model in train mode whose layers are checkpointed (gradient checkpointing or "
        "config.offload_checkpoints): those layers run without past_key_values, so a cache stays empty and each "
        "step would see only its new tokens. Call model.eval() before generating or decoding (or pass "
        "use_cache=False; gradient_checkpointing_disable() and config.offload_checkpoints = False turn "
        "checkpointing off)"
    )


def selected_hidden_states(hidden_states: list, output_hidden_states) -> Optional[tuple]:
    """The hidden states a model returns: all of them for ``output_hidden_states=True``, None when it is false,
    and for an index or list of indices (transformers 5's selection; negative ones count from the end) a tuple of
    the same length holding the selected states and None elsewhere, as transformers' output capture returns."""
    if not output_hidden_states:
        return None
    if output_hidden_states is True:
        return tuple(hidden_states)
    count = len(hidden_states)
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
    keep = {index % count for index in indices if -count <= index < count}
    return tuple(state if index in keep else None for index, state in enumerate(hidden_states))


def span_logits(logits: torch.Tensor) -> tuple:
    """A question-answering head's ``[..., 2]`` output as ``(start_logits, end_logits)``."""
    start, end = logits.split(1, dim=-1)
    return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """transformers' question-answering loss (positions clamped to the sequence, those past it ignored), called
    directly for heads whose stock class computes it itself: a ``model.loss_function`` of the user's is not
    theirs to call."""
    from transformers.loss.loss_utils import ForQuestionAnsweringLoss

    return ForQuestionAnsweringLoss(start_logits, end_logits, start_positions, end_positions)


def classifier_dropout_probability(config) -> float:
    """Token-classification dropout as transformers picks it: ``classifier_dropout``, else ``hidden_dropout``,
    else 0.1."""
    for name in ("classifier_dropout", "hidden_dropout"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return 0.1


# ----------------------------------------------------------------------------------------------
# Padded batches run unpadded: the kept tokens of every row as one packed row (README, "Packed sequences")
# ----------------------------------------------------------------------------------------------


class PaddedRows:
    """A padded batch ``[b, s]`` as one packed row ``[1, n]`` of its kept tokens, row after row, each row one
    document (``cu_seq_lens_q``/``cu_seq_lens_k`` of the packed forms), and back. ``keep`` is the bool keep-mask
    and ``kept`` its count of kept tokens where the caller read it already: then finding the kept tokens reads
    nothing more on the host (``torch.nonzero_static``; without it, ``nonzero`` reads the count again)."""

    def __init__(self, keep: torch.Tensor, kept: Optional[int] = None):
        self.batch, self.seq = keep.shape
        flat = keep.reshape(-1)
        self.indices = flat.nonzero().squeeze(-1) if kept is None else _nonzero_static(flat, kept)
        cu_seqlens = F.pad(keep.sum(-1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        self.keywords = {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens}

    def pack(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[b or 1, s, ...]`` -> ``[1, n, ...]`` (the kept tokens in order)."""
        if x is None:
            return None
        x = x.to(self.indices.device).expand(self.batch, self.seq, *x.shape[2:])
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)[None]

    def pack_inputs(self, input_ids, inputs_embeds, position_ids, input_embeddings: torch.nn.Module) -> tuple:
        """``(input_ids, inputs_embeds, position_ids)`` as the packed row; positions default to what a forward
        without cache uses, ``0 .. s - 1`` in every row (left padding included). Only a bare ``nn.Embedding``
        embeds the packed ids: any other module, or hooks on it (the Trainer's NEFTune noise is scaled by the
        output's shape), may depend on the shape it is given, so the padded batch is embedded first and they see
        the ``[b, s]`` ids and ``[b, s, d]`` tensors stock gives them."""
        embeds_by_token = type(input_embeddings) is torch.nn.Embedding and _runs_as_written(input_embeddings)
        if input_ids is not None and not embeds_by_token:
            input_ids, inputs_embeds = None, input_embeddings(input_ids)
            if tuple(inputs_embeds.shape[:2]) != (self.batch, self.seq):
                raise ValueError(
                    f"the input embeddings gave {list(inputs_embeds.shape[:2])} for ids of [batch, sequence] "
                    f"{[self.batch, self.seq]} (a sequence-parallel plan shards them): a padded batch runs unpadded "
                    "only whole; set config.unpad_batches = False"
                )
        if position_ids is None:
            position_ids = torch.arange(self.seq, device=self.indices.device)[None]
        return self.pack(input_ids), self.pack(inputs_embeds), self.pack(position_ids)

    def unpack(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[1, n, ...]`` -> ``[b, s, ...]`` with zeros at the padded positions."""
        if x is None:
            return None
        flat = x.new_zeros(self.batch * self.seq, *x.shape[2:]).index_copy(0, self.indices.to(x.device), x[0])
        return flat.view(self.batch, self.seq, *x.shape[2:])

    def unpack_all(self, states: Optional[tuple]) -> Optional[tuple]:
        return None if states is None else tuple(self.unpack(x) for x in states)


def labels_mismatch(name: str, shape: torch.Size, inputs_shape: torch.Size) -> ValueError:
    """The error for labels (or ``shift_labels``) of ``shape`` given with inputs of ``[batch, sequence]``."""
    return ValueError(
        f"{name} of shape {list(shape)} do not match the inputs' [batch, sequence] {list(inputs_shape)}: one label "
        "per input token"
    )


def labels_of_rows(labels: Optional[torch.Tensor], kwargs: dict, input_ids, inputs_embeds) -> Optional[torch.Tensor]:
    """``labels`` (and a ``shift_labels`` in ``kwargs``, replaced there) of a batch of one given without their batch
    dimension, ``[s]`` for inputs ``[1, s]``, as ``[1, s]``: stock's LM losses take them so (they shift along the
    last dimension and flatten). Other shapes are left to the loss's check. Narrower signed integer labels
    come back as int64 (``label_ids``)."""
    inputs = input_ids if input_ids is not None else inputs_embeds

    def with_batch(given):
        given = label_ids(given)
        lacks_batch = given is not None and inputs is not None and given.dim() == 1 and inputs.dim() >= 2
        return given[None] if lacks_batch and inputs.shape[0] == 1 and given.shape[0] == inputs.shape[1] else given

    if kwargs.get("shift_labels") is not None:
        kwargs["shift_labels"] = with_batch(kwargs["shift_labels"])
    return with_batch(labels)


def label_ids(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """uint8/int8/int16/int32 labels as int64. The fused loss takes any integer labels, PyTorch's cross-entropy
    only int64 (and uint8, which the label shift's -100 padding overflows): without this a model trained on int32
    labels (a dataset's column type) would fail at its first evaluation, where the logits path runs. Stock refuses
    them in both."""
    if labels is not None and labels.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        return labels.long()
    return labels


def shifted_labels(labels: Optional[torch.Tensor], shift_labels=None, ignore_index: Optional[int] = None, **_):
    """The target of every position of a causal LM, as transformers shifts ``labels`` (``shift_labels`` as given)."""
    if shift_labels is not None or labels is None:
        return shift_labels
    return F.pad(labels, (0, 1), value=IGNORE_INDEX if ignore_index is None else ignore_index)[..., 1:]


def _hook_defined_in(hook) -> str:
    """The module a hook is defined in (a ``functools.partial``'s function's; a callable object's class's)."""
    return getattr(hook.func if isinstance(hook, partial) else hook, "__module__", None) or ""


def _is_peft_hook(hook) -> bool:
    return _hook_defined_in(hook).startswith("peft.")


# Modules whose output depends on statistics of the whole tensor they see, padded rows included in stock: torch.ao's
# observers and fake-quantizers (QAT, calibration: min/max of the activations), dynamically quantized linears (an
# activation scale per call) and batch norms.
_BATCH_STATISTICS_MODULES = (
    torch.ao.quantization.ObserverBase,
    torch.ao.quantization.FakeQuantizeBase,
    torch.ao.nn.quantized.dynamic.Linear,
    torch.nn.modules.batchnorm._BatchNorm,
)


def _takes_batch_statistics(module: torch.nn.Module) -> bool:
    """Whether ``module`` scales what it computes by statistics of the whole tensor it is given (padded rows
    included in stock): ``_BATCH_STATISTICS_MODULES``, and the quantization libraries' modules that quantize
    their input activations: optimum-quanto's (``activation_qtype`` set; calibrated from the activations),
    torchao's QAT linears (``activation_fake_quantizer``), its weights that quantize the input at each call
    (``act_quant_kwargs``, ``input_quant_func``) and float8 training linears (``Float8Linear``: an amax over the
    input), and bitsandbytes' LLM.int8 (outlier columns chosen over all tokens: a ``threshold`` above 0). Some of
    them scale per token, which would allow parts of the input; the libraries do not say so alike, so every such
    module counts."""
    if isinstance(module, _BATCH_STATISTICS_MODULES):
        return True
    if any(getattr(module, name, None) is not None for name in ("activation_qtype", "activation_fake_quantizer")):
        return True
    weight = module._parameters["weight"] if "weight" in module._parameters else None  # a ScriptModule's has no get
    if any(getattr(weight, name, None) is not None for name in ("act_quant_kwargs", "input_quant_func")):
        return True
    kind = type(module)
    if kind.__name__ == "Float8Linear" and kind.__module__.startswith("torchao."):
        return True
    return kind.__name__ == "Linear8bitLt" and getattr(getattr(module, "state", None), "threshold", 0) > 0


def _must_be_called_once(*modules: torch.nn.Module) -> bool:
    """Whether a module in ``modules`` (or inside one) would change the result if called on parts of its input
    (loss chunks, sequence tiles) instead of once: a parametrized weight (spectral norm steps its power iteration
    at each computation in training; legacy spectral norm's hook too) or a module that takes statistics of what
    it sees (``_takes_batch_statistics``)."""
    return any(
        torch.nn.utils.parametrize.is_parametrized(inner)
        or _takes_batch_statistics(inner)
        or any(_is_legacy_spectral_norm(hook) for hook in inner._forward_pre_hooks.values())
        for module in modules
        for inner in module.modules()
    )


def _is_legacy_spectral_norm(hook) -> bool:
    """``torch.nn.utils.spectral_norm``'s hook (the package attribute of that name is the function)."""
    return type(hook).__name__ == "SpectralNorm" and type(hook).__module__ == "torch.nn.utils.spectral_norm"


def _needs_its_padded_rows(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` computes over the batch as a whole, so that rows packed into one would
    change its result: PEFT's forward pre-hooks (for one call or for good: in peft 0.21 every such hook carries
    per-row state, a mixed-adapter batch's ``adapter_names``, aLoRA's offsets, Poly's task ids, X-LoRA's
    scalings, Shadow's states; plain LoRA and the other token-wise adapters add none), an embedding whose
    lookup depends on every id of the batch, padding's too (``max_norm`` renormalises each row it looks up in
    place; ``scale_grad_by_freq`` divides by the counts of ids in the batch), modules that take statistics of
    the whole tensor they see (``_takes_batch_statistics``), and hooks for every module (calibration, such as
    optimum-quanto's, records the range of every module's input and output), and modules of a kind this file
    does not know (``_of_a_kind_unknown_here``)."""
    if _global_module_hooks():
        return True
    for module in model.modules():
        if _of_a_kind_unknown_here(module):
            return True
        if isinstance(module, torch.nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
            return True
        if _takes_batch_statistics(module):
            return True
        if any(_is_peft_hook(hook) for hook in module._forward_pre_hooks.values()):
            return True
        if _code_of_a_kind_unknown_here(module):
            return True
    return False


# Packages whose modules compute token by token (layers, norms, activations, adapters, quantized linears) or wrap
# one that does without mixing tokens (checkpointing, sharding, offloading).
_PACKAGES_WITH_TOKEN_WISE_MODULES = (
    "torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "torchao", "optimum", "liger_kernel",
)


def _known_here(defined_in: str) -> bool:
    """Whether code defined in module ``defined_in`` is this file's or a package's in
    ``_PACKAGES_WITH_TOKEN_WISE_MODULES``."""
    return defined_in == __name__ or defined_in.split(".")[0] in _PACKAGES_WITH_TOKEN_WISE_MODULES


def _of_a_kind_unknown_here(module: torch.nn.Module) -> bool:
    """A module neither of this file nor of a package in ``_PACKAGES_WITH_TOKEN_WISE_MODULES``: a user's own
    attention, MLP or wrapper, which may mix the tokens of a row (a causal attention of its own, a token shift)
    and would then mix the rows packed into one; such a model keeps its padded rows (said once)."""
    defined_in = type(module).__module__ or ""
    if _known_here(defined_in):
        return False
    _log_once(
        f"a module of a kind this file does not know ({type(module).__name__}, from {defined_in}) is inside the "
        "model: padded batches keep their rows (packed into one, a module that mixes tokens would mix the rows)"
    )
    return True


def _code_of_a_kind_unknown_here(module: torch.nn.Module) -> list:
    """The hooks of ``module`` (forward and backward, and their pre-hooks) and the ``forward`` set on it
    (accelerate's ``ModelHook``s included) that are defined outside this file and the packages of
    ``_PACKAGES_WITH_TOKEN_WISE_MODULES``: a user's, which may treat the rows apart (steer one row, edit one row's
    gradient, read each row's last token) and would see them packed into one; such a model keeps its padded rows
    (said once)."""
    hook_dicts = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    if not any(hook_dicts) and "forward" not in module.__dict__:  # most modules: walked at every padded forward
        return []
    code = [hook for hooks in hook_dicts for hook in hooks.values()]
    if "forward" in module.__dict__:
        code.append(module.__dict__["forward"])
        accelerate_hook = getattr(module, "_hf_hook", None)
        code.extend(getattr(accelerate_hook, "hooks", [accelerate_hook]))  # a SequentialHook holds several
    unknown = [each for each in code if each is not None and not _known_here(_hook_defined_in(each))]
    if unknown:
        _log_once(
            f"a hook or forward from {_hook_defined_in(unknown[0]) or 'an unknown module'} is on a "
            f"{type(module).__name__}: padded batches keep their rows (packed into one, a hook that treats rows "
            "apart would see a single row)"
        )
    return unknown


def _drops_its_cache(model) -> bool:
    """Training with gradient checkpointing: the forward builds no cache, whatever ``use_cache`` says (as stock)."""
    return model.training and _checkpointed((model,))


def use_cache_under_checkpointing(model, use_cache: bool) -> bool:
    """``use_cache``, but False in training with checkpointed layers (said once): they run without the cache, so
    it would come back empty, and a later call continuing it would leave the tokens before it out (as stock)."""
    if use_cache and _drops_its_cache(model):
        if not torch.compiler.is_compiling():  # a logging call would break the compiled graph
            _log_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False")
        return False
    return use_cache


def _checkpointed(modules) -> bool:
    """Whether a layer among ``modules`` or inside one (wrapped by the user too) is checkpointed
    (``gradient_checkpointing_enable`` or ``config.offload_checkpoints``) and in training: what transformers'
    ``GradientCheckpointingLayer`` checks before it checkpoints (the models' own flag is not a layer's)."""
    return any(
        getattr(module, "gradient_checkpointing", False) is True and module.training and _is_checkpointing_layer(module)
        for owner in modules
        for module in owner.modules()
    )


def _is_checkpointing_layer(module) -> bool:
    """A transformers ``GradientCheckpointingLayer`` (named, not imported: the kernel layer loads without
    transformers)."""
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


def padded_rows(
    model, attention_mask, input_ids=None, inputs_embeds=None, labels=None, past_key_values=None, use_cache=None,
    output_attentions=None, logits_to_keep=0, output_hidden_states=None, **kwargs,
) -> Optional[PaddedRows]:
    """The ``PaddedRows`` of a causal LM forward that runs unpadded, or None for one that runs as it came.

    Unpadded: a 2-D padding mask with at least one padded and one kept token, no cache given, none to build
    (``default_use_cache``: ``use_cache=True`` keeps the rows padded, so that the cache covers them, in training
    too), no attention weights asked for, no hidden states asked for while gradients are recorded (those returned are copies beside the
    graph the loss comes from: a hook or ``autograd.grad`` on them would not see its gradient), all logits asked
    for, no packed keywords already, ``config.unpad_batches`` not false, no module that computes over the whole
    batch (``_needs_its_padded_rows``), nothing that makes the fused ops compute as stock (``_computes_as_stock``: a
    ``TorchFunctionMode`` of the user's sees stock's padded calls), no loss function of the user's with labels (``loss_replaced_by_user``:
    it gets stock's logits, padded positions' too), no label that a padded position predicts (its loss term needs
    that position's output; with left padding, mask the first token's label too), and not while compiling or
    exporting (finding the kept tokens is a host read: compiled forwards keep the padding mask and run every row
    at full length). One host read decides and sizes the packed row.
    """
    config = model.config
    inputs = input_ids if input_ids is not None else inputs_embeds
    if inputs is None or attention_mask is None or attention_mask.dim() != 2:
        return None
    if tuple(attention_mask.shape) != tuple(inputs.shape[:2]) or inputs.dim() != 2 + (input_ids is None):
        return None
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    if (
        past_key_values is not None
        or (default_use_cache(model, use_cache) and not _drops_its_cache(model))
        or output_attentions
        or (output_hidden_states and torch.is_grad_enabled())
        or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
        or varlen_keywords(kwargs)
        or not config_switch(config, "unpad_batches", True)
        or _host_cannot_read(attention_mask)
        or _needs_its_padded_rows(model)
        or _computes_as_stock()
    ):
        return None
    targets = None if labels is None else shifted_labels(labels, **kwargs)  # as stock: no labels, no loss
    if targets is not None and loss_replaced_by_user(model):  # the user's loss gets stock's logits, padding's too
        return None
    keep = attention_mask.to(inputs.device).bool()
    predicted = keep.new_zeros(())
    if targets is not None:
        if targets.shape != keep.shape:
            raise labels_mismatch("labels", targets.shape, keep.shape)
        predicted = targets.to(keep.device) != kwargs.get("ignore_index", IGNORE_INDEX)
    kept, predicted_from_padding = torch.stack([keep.sum(), (predicted & ~keep).sum()]).tolist()
    if kept in (0, keep.numel()):
        return None
    if predicted_from_padding:
        _log_once(
            "a padded batch with labels predicted from padded positions runs with every row at full length (slower); "
            "with left padding each row's first kept token is predicted from a padded position, whose output differs "
            "from stock's (README, 'Differences from stock'): a label of -100 there lets it run unpadded, as stock"
        )
        return None
    return PaddedRows(keep, kept)


def unpadded_lm_outputs(model, lm_head, hidden_states, labels, rows: PaddedRows, **kwargs) -> tuple:
    """``(loss, logits)`` of a causal LM head over the packed hidden states ``[1, n, d]`` of ``rows``: the loss
    over the kept positions (the fused LM head + loss where ``fused_loss_applies``), the same terms as
    transformers' loss over the padded batch (``padded_rows`` made sure no padded position predicts a label);
    logits ``[b, s, vocab]`` with zeros at padded positions (None with the fused loss). The loss is computed from
    the logits returned, so that a hook or ``autograd.grad`` on them sees its gradient, as in stock."""
    targets = None if labels is None else shifted_labels(labels, **kwargs)
    kwargs.pop("shift_labels", None)
    if fused_loss_applies(model, lm_head, targets):
        packed = rows.pack(targets)
        return lm_head_loss(hidden_states, lm_head, packed, model.config, shift_labels=packed, **kwargs), None
    logits = rows.unpack(lm_head(hidden_states))
    loss = None
    if targets is not None:
        vocab_size = logits.shape[-1]  # the head's: a head replaced by a wider one needs no config change
        loss = model.loss_function(
            logits=logits, labels=None, vocab_size=vocab_size, shift_labels=targets.contiguous(), **kwargs
        )
    return loss, logits


# ----------------------------------------------------------------------------------------------
# Choosing the backend: the one rule every caller uses (README, "Choosing the attention kernel")
# ----------------------------------------------------------------------------------------------


_IMPLEMENTATION_TO_BACKEND = {
    None: "auto",
    "sdpa": "auto",
    "eager": "eager",
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn",
    "flex_attention": "flex",
    "mea": "auto",
}
_ENVIRONMENT_AUTO = ("true", "1", "yes", "on", "auto")
_ENVIRONMENT_EAGER = ("false", "0", "no", "off")


def _named_backend(name, source: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"{source}={name!r} is not auto or one of the attention backends {', '.join(BACKENDS)}")
    return name


# transformers 4.57's names of its continuous-batching attention (5.x: "paged|<name>").
_PAGED_IMPLEMENTATIONS = ("paged_attention", "sdpa_paged", "eager_paged")


def _backend_from_implementation(implementation) -> str:
    if implementation in _IMPLEMENTATION_TO_BACKEND:
        return _IMPLEMENTATION_TO_BACKEND[implementation]
    if isinstance(implementation, str) and implementation.startswith("mea_"):
        return _named_backend(implementation[len("mea_") :], "attn_implementation")
    paged = isinstance(implementation, str) and implementation.startswith("paged|")
    if paged or implementation in _PAGED_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={implementation!r}: {CONTINUOUS_BATCHING_REFUSAL}")
    function = _registered_attention_of_others(implementation)
    if function is not None:
        raise ValueError(
            f"attn_implementation={implementation!r} names {getattr(function, '__qualname__', function)!r} "
            f"(from {function.__module__}), registered with transformers' AttentionInterface: these modeling files "
            "compute attention in their own kernel layer and cannot call it. Load the stock class to run it, or name "
            f"one of {', '.join(repr(name) for name in _IMPLEMENTATION_TO_BACKEND if name)}"
        )
    _log_once(f"attn_implementation={implementation!r} has no kernel-layer equivalent; using auto")
    return "auto"


def _registered_attention_of_others(implementation):
    """The function transformers' attention registry holds under ``implementation`` when someone other than
    transformers registered it (a user's or an engine's attention, which ``auto`` would not compute), else None.
    transformers' own entries (export variants of sdpa, ...) compute the usual attention, which ``auto`` does;
    Hub kernels (names with a "/") are not asked about."""
    if not isinstance(implementation, str) or "/" in implementation:
        return None
    registry = getattr(sys.modules.get("transformers.modeling_utils"), "ALL_ATTENTION_FUNCTIONS", None)
    function = registry.get(implementation) if registry is not None else None
    function = getattr(function, "func", function)  # a functools.partial of a function
    if function is None or str(getattr(function, "__module__", "")).split(".")[0] == "transformers":
        return None
    return function


def _backend_from_environment() -> Optional[str]:
    """``USE_FLASH_ATTN`` (the original adapter's switch): true = auto, false = eager, or a backend name."""
    value = os.environ.get("USE_FLASH_ATTN", "").strip().lower()
    if not value:
        return None
    if value in _ENVIRONMENT_AUTO:
        return "auto"
    if value in _ENVIRONMENT_EAGER:
        return "eager"
    if value in BACKENDS:
        return value
    raise ValueError(f"USE_FLASH_ATTN={value!r} is not true/false/1/0 or one of the backends {', '.join(BACKENDS)}")


def backend_from_config(config=None, backend: str = "auto") -> str:
    """The backend a model (``config``) or a call (``backend``) asks for: ``"auto"`` or a backend name.

    The one selection rule of the project; the first source that names a backend wins:

    1. ``backend`` (a call's own choice), then ``config.attn_backend``; ``"auto"`` names nothing;
    2. ``config._attn_implementation`` (``"eager"``, ``"flash_attention_2"``, ``"flex_attention"``,
       ``"mea_<backend>"``); transformers' default ``"sdpa"`` (and ``"mea"``) names nothing;
    3. the ``USE_FLASH_ATTN`` environment variable: ``true`` = auto, ``false`` = eager, or a backend name;
    4. Qwen's ``config.use_flash_attn``: ``False`` = eager (``True``/``"auto"`` name nothing);
    5. otherwise ``"auto"``: the fastest backend that can take each call.
    """
    named = _named_backend(backend, "backend")
    if named != "auto":
        return named
    if config is None:
        return _backend_from_environment() or "auto"
    explicit = getattr(config, "attn_backend", None)
    if explicit is not None and _named_backend(explicit, "config.attn_backend") != "auto":
        return explicit
    implemented = _backend_from_implementation(getattr(config, "_attn_implementation", None))
    if implemented != "auto":
        return implemented
    from_environment = _backend_from_environment()
    if from_environment is not None:
        return from_environment
    return "eager" if getattr(config, "use_flash_attn", "auto") is False else "auto"


def attention_options(config, backend: str = "auto", mask=None) -> dict:
    """The ``attention()`` keyword arguments a model's config asks for, read at every forward:
    ``backend`` (``backend_from_config(config, backend)``), ``chunk_size`` (``config.attn_chunk_size``: an
    int or a ``[query, key]`` pair, the chunked backend's block sizes) and ``flex_static_shapes``
    (``config.attn_flex_static_shapes``: how many shapes flex compiles with static shapes). Given the
    forward's ``ForwardMask`` as ``mask``, they are read once per forward rather than in every layer."""

    def read() -> dict:
        return dict(
            backend=backend_from_config(config, backend),
            chunk_size=getattr(config, "attn_chunk_size", None),
            flex_static_shapes=getattr(config, "attn_flex_static_shapes", None),
        )

    holder = mask if isinstance(mask, ForwardMask) else None
    return _once_per_forward(holder, ("options", backend), (config,), read)


# ----------------------------------------------------------------------------------------------
# Fused ops: LM head + cross-entropy in chunks, RMSNorm, activations, MLP projection, RoPE
#
# Each op is an autograd.Function that saves only what its backward needs. The math has a pure-PyTorch
# body (the CPU path, tested against float64). On CUDA an op runs a Triton kernel of this section where
# Triton is installed (it ships with CUDA builds of torch), else its PyTorch body compiled once by
# torch.compile. A kernel or compiler that fails is logged once and the PyTorch body runs instead.
# Inside an enclosing torch.compile each forward and each backward is one opaque custom op (``_opaque``):
# the compiler neither replaces the kernels nor re-decides what the op keeps for backward, so a compiled
# step keeps what an eager one keeps (no graph break either: the compiler knows the ops' output shapes).
# On CUDA the norm, activation (with the MLP projection) and RoPE ops are traced instead (``_kernel_op``):
# the compiler launches our kernels from its own code (a short step no longer waits on our Python between
# launches), and their outputs, which it cannot recompute, are still all that the ops keep.
# ----------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

# Target size of one chunk of logits (in the logits' dtype) in the fused LM head + loss: the auto chunk size.
LOSS_CHUNK_BYTES = 128 * 1024 * 1024
# Fewest tokens in an auto-sized chunk of a plain head's fused loss: each chunk's head-gradient matmul also reads
# and writes the whole [vocab, hidden] gradient, and with fewer tokens that traffic, not the arithmetic, sets its
# time (Qwen's 151,936-token vocabulary in bf16 on an H200, 8k tokens a step: 79.0 ms in chunks of 384, 75.6 in
# chunks of 768). Larger vocabularies get larger chunks than LOSS_CHUNK_BYTES.
LOSS_CHUNK_MIN_TOKENS = 768
IGNORE_INDEX = -100
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_BLOCK = 1024  # elements per program of the element-wise kernels
_TRITON_MAX_ROW = 65536  # widest row the one-block-per-row norm kernels take

_compiled_functions: dict = {}
_compiled_functions_lock = threading.Lock()
_compile_failed: set = set()
_triton_failed: set = set()


def _compiled(fn: Callable) -> Callable:
    with _compiled_functions_lock:
        if fn not in _compiled_functions:
            _compiled_functions[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _compiled_functions[fn]


def _pointwise(fn: Callable, *args):
    """Run ``fn(*args)``: compiled on CUDA outside an enclosing torch.compile, eagerly otherwise.

    A compiler that fails here (e.g. no C compiler for Triton) is logged once and the eager body is used.
    """
    first = _first_tensor(args)
    if first.device.type != "cuda" or torch.compiler.is_compiling() or fn in _compile_failed:
        return fn(*args)
    try:
        return _compiled(fn)(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the same math, eagerly
        _compile_failed.add(fn)
        _log_once(f"torch.compile of {fn.__name__} failed ({type(error).__name__}: {error}); running it eagerly")
        return fn(*args)


def _triton_takes(*args) -> bool:
    """Whether this section's Triton kernels run for a call with these arguments: Triton installed, every
    tensor on CUDA in a type Triton handles, and no enclosing torch.compile (which fuses the PyTorch body
    itself). Checked on every call of a fused op, so the cheapest test comes first."""
    return triton is not None and not torch.compiler.is_compiling() and _triton_tensors(args)


def _triton_tensors(args: tuple) -> bool:
    """Whether every tensor of ``args`` is on CUDA in a type Triton handles."""
    return all(not isinstance(a, torch.Tensor) or (a.is_cuda and _triton_dtype(a)) for a in args)


def _triton_dtype(t: torch.Tensor) -> bool:
    return t.dtype in _TRITON_DTYPES or not t.is_floating_point()


def _fused(kernel: Callable, body: Callable, *args):
    """``kernel(*args)`` (a Triton launcher) where Triton takes the tensors, else ``body(*args)`` through
    ``_pointwise``. The two compute the same math. A launcher returns None for a call it does not take (a
    shape or dtype mix it has no kernel for); a kernel that fails is logged once and not tried again."""
    if kernel not in _triton_failed and _triton_takes(*args):
        try:
            result = kernel(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a kernel that cannot build falls back to the same math
            _triton_failed.add(kernel)
            _log_once(f"Triton kernel {kernel.__name__} failed ({type(error).__name__}: {error}); using PyTorch")
        else:
            if result is not None:
                return result
    return _pointwise(body, *args)


def _run_body(kernel: Callable, body: Callable, *args):
    """``_fused``'s stand-in for fake tensors: the PyTorch body, whose output shapes and dtypes the kernel's match."""
    return body(*args)


def _unwritten(like: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """A one-element stand-in for a kernel's output that this launch leaves unwritten. Never another output's
    memory: a compiler that traces the launch (``_kernel_op``) takes each output argument for a separate
    buffer, so two outputs in one memory could come back as either's."""
    return like.new_empty((1,) * dims)


def _contiguous(result):
    """``result`` (a tensor or a list of tensors) with every tensor contiguous."""
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    return [t.contiguous() for t in result]


def _opaque_fused(name: str, schema: str, kernel: Callable, body: Callable) -> Callable:
    """``_fused(kernel, body, ...)`` with contiguous outputs, as an ``_opaque`` op."""

    def kernels(*args):
        return _contiguous(_launch_or_body(kernel, body, *args))

    return _opaque(
        name,
        schema,
        lambda *args: _contiguous(_fused(kernel, body, *args)),
        lambda *args: _contiguous(body(*args)),
        kernels=kernels,
    )


def _kernels_of(function: Callable) -> Callable:
    """``function(*args, run=_launch_or_body)`` with contiguous outputs: the ``kernels`` of an ``_opaque`` op
    whose implementation is ``function(*args)`` (which runs its kernels through ``_fused``)."""

    def kernels(*args):
        return _contiguous(function(*args, run=_launch_or_body))

    return kernels


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as is when it is float64 (so that float64 references check the math exactly)."""
    return x if x.dtype == torch.float64 else x.float()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``[rows, last dim]`` matrix (a view when it already is contiguous)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr, stride, targets_ptr, loss_ptr, scale_ptr, n_cols, ignore_index,
        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One row: loss = logsumexp - logit[target] (0 when ignored), both less the row's maximum; with
        WRITE_GRAD the row is overwritten by its gradient (softmax - one_hot) x scale (0 when ignored)."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        running_max = tl.full([], float("-inf"), tl.float32)
        running_sum = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # -inf - -inf would be NaN
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
            running_max = new_max
        log_sum = tl.log(running_sum)  # apart from the maximum: not rounded at the logits' magnitude
        counted = target != ignore_index
        safe_target = tl.where(counted, target, 0)
        picked = tl.load(base + safe_target).to(tl.float32) - running_max
        tl.store(loss_ptr + row, tl.where(counted, log_sum - picked, 0.0))
        if WRITE_GRAD:
            scale = tl.where(counted, tl.load(scale_ptr).to(tl.float32), 0.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                grad = tl.exp((x - running_max) - log_sum) - tl.where(cols == safe_target, 1.0, 0.0)
                tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=cols < n_cols)

    @triton.jit
    def _rms_norm_forward_kernel(x_ptr, weight_ptr, out_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight, as stock
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _norm_backward_rows(grad_ptr, x_ptr, start, last, cols, n_cols, ROWS: tl.constexpr):
        """Rows [start, start + ROWS) of a norm backward, those before ``last``: their indices, mask and offsets,
        and the incoming gradient and the input there in float32."""
        rows = start + tl.arange(0, ROWS)
        kept = (rows < last)[:, None] & (cols < n_cols)[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        grad = tl.load(grad_ptr + offsets, mask=kept, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=kept, other=0.0).to(tl.float32)
        return rows, kept, offsets, grad, x

    @triton.jit
    def _rms_norm_backward_kernel(
        grad_ptr, x_ptr, weight_ptr, rstd_ptr, residual_ptr, grad_x_ptr, grad_weight_ptr, n_rows, n_cols,
        rows_per_program, BLOCK: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr,
    ):
        """Rows [program x rows_per_program, ...), ROWS at a time: grad_x per row (plus the residual's gradient
        there, with RESIDUAL), and this program's partial weight gradient."""
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        grad_weight = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        first = program.to(tl.int64) * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, ROWS):
            rows, kept, offsets, grad, x = _norm_backward_rows(grad_ptr, x_ptr, start, last, cols, n_cols, ROWS)
            rstd = tl.load(rstd_ptr + rows, mask=rows < last, other=0.0)[:, None]
            x_hat = x * rstd
            # d(weight * normed): grad x weight rounded to the normalised value's dtype, as stock's autograd
            grad_normed = (grad * weight[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
            dot = tl.sum(grad_normed * x_hat, 1)[:, None] / n_cols
            grad_x = rstd * (grad_normed - x_hat * dot)
            if RESIDUAL:
                grad_x += tl.load(residual_ptr + offsets, mask=kept, other=0.0).to(tl.float32)
            tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=kept)
            grad_weight += grad * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(grad_weight_ptr + program.to(tl.int64) * n_cols + cols, tl.sum(grad_weight, 0), mask=inside)

    @triton.jit
    def _layer_norm_forward_kernel(
        x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / n_cols
        centered = tl.where(inside, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, 0) / n_cols + eps)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        out = centered * rstd * weight + bias
        tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _layer_norm_backward_kernel(
        grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, residual_ptr, grad_x_ptr, partial_ptr, n_rows, n_cols,
        rows_per_program, BLOCK: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr,
    ):
        """Rows [program x rows_per_program, ...), ROWS at a time: grad_x per row (plus the residual's gradient
        there, with RESIDUAL), and this program's partial weight and bias gradients (partial_ptr:
        [programs, 2, n_cols])."""
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        grad_weight = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        grad_bias = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        first = program.to(tl.int64) * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, ROWS):
            rows, kept, offsets, grad, x = _norm_backward_rows(grad_ptr, x_ptr, start, last, cols, n_cols, ROWS)
            mean = tl.load(mean_ptr + rows, mask=rows < last, other=0.0)[:, None]
            rstd = tl.load(rstd_ptr + rows, mask=rows < last, other=0.0)[:, None]
            x_hat = tl.where(kept, (x - mean) * rstd, 0.0)
            grad_normed = grad * weight[None, :]
            mean_grad = tl.sum(grad_normed, 1)[:, None] / n_cols
            mean_grad_x_hat = tl.sum(grad_normed * x_hat, 1)[:, None] / n_cols
            grad_x = rstd * (grad_normed - mean_grad - x_hat * mean_grad_x_hat)
            if RESIDUAL:
                grad_x += tl.load(residual_ptr + offsets, mask=kept, other=0.0).to(tl.float32)
            tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=kept)
            grad_weight += grad * x_hat
            grad_bias += grad
        partial = partial_ptr + program.to(tl.int64) * 2 * n_cols + cols
        tl.store(partial, tl.sum(grad_weight, 0), mask=inside)
        tl.store(partial + n_cols, tl.sum(grad_bias, 0), mask=inside)

    @triton.jit
    def _rotate_rows(
        x_ptr, out_ptr, cos_ptr, sin_ptr, batch, head, positions, dims, kept, half,
        x_b, x_h, x_s, c_b, c_s, o_b, o_h, o_s, INVERSE: tl.constexpr,
    ):
        """One block of rows of one head of x [b, h, s, 2 x half] (last stride 1) rotated into out, in float32:
        out = x * cos + rotate_half(x) * sin, or its transpose (INVERSE, the backward)."""
        x = x_ptr + batch.to(tl.int64) * x_b + head.to(tl.int64) * x_h + positions * x_s + dims
        c = batch.to(tl.int64) * c_b + positions * c_s + dims
        x1 = tl.load(x, mask=kept, other=0.0).to(tl.float32)
        x2 = tl.load(x + half, mask=kept, other=0.0).to(tl.float32)
        cos1 = tl.load(cos_ptr + c, mask=kept, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + c + half, mask=kept, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + c, mask=kept, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + c + half, mask=kept, other=0.0).to(tl.float32)
        if INVERSE:
            out1 = x1 * cos1 + x2 * sin2
            out2 = x2 * cos2 - x1 * sin1
        else:
            out1 = x1 * cos1 - x2 * sin1
            out2 = x2 * cos2 + x1 * sin2
        out = out_ptr + batch.to(tl.int64) * o_b + head.to(tl.int64) * o_h + positions * o_s + dims
        tl.store(out, out1.to(out_ptr.dtype.element_ty), mask=kept)
        tl.store(out + half, out2.to(out_ptr.dtype.element_ty), mask=kept)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, q_heads, k_heads, seq, half,
        q_b, q_h, q_s, k_b, k_h, k_s, c_b, c_s, qo_b, qo_h, qo_s, ko_b, ko_h, ko_s,
        INVERSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """q [b, q_heads, s, 2 x half] and k [b, k_heads, s, 2 x half] rotated by cos/sin [b, 1, s, 2 x half]
        (strides c_b, c_s): the programs of axis 0 take q's heads of a batch row, then k's."""
        heads = q_heads + k_heads
        batch, head = tl.program_id(0) // heads, tl.program_id(0) % heads
        positions = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        kept = (positions < seq) & (dims < half)
        if head < q_heads:
            _rotate_rows(
                q_ptr, q_out_ptr, cos_ptr, sin_ptr, batch, head, positions, dims, kept, half,
                q_b, q_h, q_s, c_b, c_s, qo_b, qo_h, qo_s, INVERSE,
            )
        else:
            _rotate_rows(
                k_ptr, k_out_ptr, cos_ptr, sin_ptr, batch, head - q_heads, positions, dims, kept, half,
                k_b, k_h, k_s, c_b, c_s, ko_b, ko_h, ko_s, INVERSE,
            )

    @triton.jit
    def _silu(x):
        return x * tl.sigmoid(x)

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _gelu_and_slope(x, TANH: tl.constexpr):
        """GeLU of float32 ``x`` and its derivative, in the tanh or the erf form."""
        if TANH:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            t = _tanh(inner)
            value = 0.5 * x * (1.0 + t)
            slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        else:
            value = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
            slope = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return value, slope

    @triton.jit
    def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        """x *= scale, the product computed in float32 (or scale's float64) and rounded once to x's dtype."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(x_ptr + offsets, (x * tl.load(scale_ptr)).to(x_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _activation_forward_kernel(x_ptr, up_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        """KIND 0: silu(x) * up; 1: gelu tanh; 2: gelu erf. Rounded like stock: the activation to the input
        dtype first, then the product."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if KIND == 0:
            up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            value = _silu(x).to(out_ptr.dtype.element_ty).to(tl.float32) * up
        else:
            value, _ = _gelu_and_slope(x, KIND == 1)
        tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _activation_backward_kernel(
        grad_ptr, x_ptr, up_ptr, grad_x_ptr, grad_up_ptr, value_ptr, n,
        KIND: tl.constexpr, WRITE_VALUE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """The gradients of x (and up); with WRITE_VALUE, the forward's value too, exactly as
        ``_activation_forward_kernel`` computes it. Each element is read before it is written, so ``grad_x``
        may be ``grad``'s memory."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if KIND == 0:
            up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            sigmoid = tl.sigmoid(x)
            silu = (x * sigmoid).to(x_ptr.dtype.element_ty).to(tl.float32)
            if WRITE_VALUE:
                tl.store(value_ptr + offsets, (silu * up).to(value_ptr.dtype.element_ty), mask=inside)
            tl.store(grad_up_ptr + offsets, (grad * silu).to(grad_up_ptr.dtype.element_ty), mask=inside)
            grad_silu = (grad * up).to(x_ptr.dtype.element_ty).to(tl.float32)
            grad_x = grad_silu * sigmoid * (1.0 + x * (1.0 - sigmoid))
        else:
            value, slope = _gelu_and_slope(x, KIND == 1)
            if WRITE_VALUE:
                tl.store(value_ptr + offsets, value.to(value_ptr.dtype.element_ty), mask=inside)
            grad_x = grad * slope
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)


def _row_block(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# --- LM head + cross-entropy ------------------------------------------------------------------


def _cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Summed float32 cross-entropy of the counted rows of one chunk, the exponentials of the logits less their row
    maximum, and each row's sum of those. Kept apart from the maximum, the log-sum is not rounded at the logits'
    magnitude, so a saturated softmax keeps its precision, as with log_softmax. Float32 and float64 logits (the
    chunk's own) are overwritten: no other ``[rows, vocab]`` tensor is made."""
    shifted = _at_least_float32(logits)
    shifted = shifted.sub_(shifted.amax(dim=-1, keepdim=True))
    counted = targets != ignore_index
    picked = shifted.gather(1, torch.where(counted, targets, 0).unsqueeze(1)).squeeze(1)
    exps = shifted.exp_()
    exp_sums = exps.sum(dim=-1)
    return torch.where(counted, exp_sums.log() - picked, 0.0).sum(), exps, exp_sums


def _cross_entropy_chunk_grad(
    exps: torch.Tensor, exp_sums: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: torch.Tensor
) -> torch.Tensor:
    """d(loss)/d(logits) of one chunk: (softmax - one_hot) x scale on counted rows, computed in the memory of
    ``_cross_entropy_chunk``'s exponentials."""
    counted = targets != ignore_index
    safe_targets = torch.where(counted, targets, 0).unsqueeze(1)
    grad = exps.div_(exp_sums.unsqueeze(1))
    grad.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=grad.dtype))
    return grad.mul_(torch.where(counted, scale, 0.0).unsqueeze(1))


def _cross_entropy_in_place_triton(logits, targets, ignore_index: int, scale: Optional[torch.Tensor]):
    """The chunk's summed loss; with ``scale``, ``logits`` now hold their gradient (one Triton kernel)."""
    if not logits.is_contiguous():
        return None
    targets = targets.contiguous()  # the kernel reads one target per row at stride 1
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    block = min(_row_block(logits.shape[1]), 4096)
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, logits.stride(0), targets, loss, loss if scale is None else scale, logits.shape[1], ignore_index,
        WRITE_GRAD=scale is not None, BLOCK=block, num_warps=8,
    )
    return loss.sum(), (logits if scale is not None else None)


def _cross_entropy_torch(logits, targets, ignore_index: int, scale: Optional[torch.Tensor]):
    """The chunk's summed loss, and its logits' gradient when ``scale`` is given, written over the logits (the
    PyTorch body; half-precision logits get it from a float32 copy)."""
    chunk_sum, exps, exp_sums = _cross_entropy_chunk(logits, targets, ignore_index)
    if scale is None:
        return chunk_sum, None
    grad = _cross_entropy_chunk_grad(exps, exp_sums, targets, ignore_index, scale)
    return chunk_sum, grad if grad is logits else logits.copy_(grad)


def _cross_entropy_with_grad(logits, targets, ignore_index: int, scale: Optional[torch.Tensor]):
    """One chunk's summed loss and, given ``scale``, its logits' gradient (Triton: in the logits' memory)."""
    return _fused(_cross_entropy_in_place_triton, _cross_entropy_torch, logits, targets, ignore_index, scale)


def _chunked_loss_and_grads(
    hidden, weight, bias, targets, scale: Optional[torch.Tensor], chunk_size: int, ignore_index: int, wants: tuple
) -> tuple:
    """The summed loss (float32 or float64) and the gradients ``wants`` asks for (of hidden, weight, bias),
    each computed chunk by chunk while the chunk's logits exist, the logits' gradient taken at ``scale``."""
    accumulate = torch.promote_types(hidden.dtype, torch.float32)
    scale = None if scale is None else scale.to(accumulate)
    grad_hidden = torch.empty_like(hidden) if wants[0] else None
    grad_weight = None  # the first chunk's product, then accumulated in place (no zero fill of vocab x hidden)
    grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if wants[2] else None
    total = torch.zeros((), dtype=accumulate, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        logits = F.linear(hidden[rows], weight, bias)
        chunk_sum, grad_logits = _cross_entropy_with_grad(logits, targets[rows], ignore_index, scale)
        total = total + chunk_sum
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits @ weight
        if wants[1]:
            if grad_weight is None:
                grad_weight = grad_logits.t().mm(hidden[rows])
            else:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
        if grad_bias is not None:
            grad_bias += grad_logits.to(accumulate).sum(0)
    if wants[1] and grad_weight is None:
        grad_weight = torch.zeros_like(weight)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return total, [g for g in (grad_hidden, grad_weight, grad_bias) if g is not None]


def _linear_cross_entropy_forward(
    hidden, weight, bias, targets, divisor, chunk_size: int, ignore_index: int, *wants: bool
) -> list:
    """``[summed loss / divisor]`` followed by the gradients ``wants`` asks for, already scaled by ``1 / divisor``."""
    scale = 1.0 / divisor if any(wants) else None
    total, grads = _chunked_loss_and_grads(hidden, weight, bias, targets, scale, chunk_size, ignore_index, wants)
    return [total / divisor] + grads


def _linear_cross_entropy_backward(
    hidden, weight, bias, targets, scale, chunk_size: int, ignore_index: int, *wants: bool
) -> list:
    """The gradients ``wants`` asks for, from logits recomputed chunk by chunk, the logits' gradient taken at
    ``scale`` (backward's incoming gradient over the divisor) before its cast to the head's dtype."""
    return _chunked_loss_and_grads(hidden, weight, bias, targets, scale, chunk_size, ignore_index, wants)[1]


def _linear_cross_entropy_fake(hidden, weight, bias, targets, divisor_or_scale, chunk_size, ignore_index, *wants):
    outputs = [hidden.new_empty((), dtype=torch.promote_types(hidden.dtype, torch.float32))]
    if wants[0]:
        outputs.append(hidden.new_empty(hidden.shape))
    if wants[1]:
        outputs.append(weight.new_empty(weight.shape))
    if wants[2]:
        outputs.append(weight.new_empty(weight.shape[:1], dtype=bias.dtype))
    return outputs


_linear_cross_entropy_op = _opaque(
    "linear_cross_entropy",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor divisor, int chunk_size, "
    "int ignore_index, bool want_hidden, bool want_weight, bool want_bias) -> Tensor[]",
    lambda *args: _contiguous(_linear_cross_entropy_forward(*args)),
    _linear_cross_entropy_fake,
)
_linear_cross_entropy_backward_op = _opaque(
    "linear_cross_entropy_backward",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor scale, int chunk_size, "
    "int ignore_index, bool want_hidden, bool want_weight, bool want_bias) -> Tensor[]",
    lambda *args: _contiguous(_linear_cross_entropy_backward(*args)),
    lambda *args: _linear_cross_entropy_fake(*args)[1:],
)


def _scale_in_place(grads: list, scale: torch.Tensor) -> None:
    """Every gradient times the 0-dim ``scale`` (the loss's float32 or float64 gradient), each product rounded
    once to the gradient's dtype. Gradients in ``scale``'s dtype take one foreach call, which reads ``scale`` on
    the device; the others (bf16) one Triton kernel each: a foreach call would round ``scale`` to their dtype
    first (bf16's 1/3 is 0.2% high), and a plain ``mul_`` by a 0-dim device tensor takes PyTorch's slower
    broadcasting kernel."""
    same = [grad for grad in grads if grad.dtype == scale.dtype]
    if same:
        torch._foreach_mul_(same, scale)
    for grad in grads:
        if grad.dtype != scale.dtype:
            _fused(_scale_triton, _scale_torch, grad, scale)


def _scale_torch(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad *= scale`` (a 0-dim tensor of another dtype), the product computed in ``scale``'s dtype. ``mul_``
    does so for a CPU ``scale`` only: on CUDA it rounds ``scale`` to ``grad``'s dtype first."""
    if scale.device.type == "cpu":
        return grad.mul_(scale)
    return grad.copy_(grad.to(scale.dtype) * scale)


def _scale_triton(grad: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
    if not grad.is_contiguous():
        return None
    n = grad.numel()
    _kernel_for(_scale_kernel, grad)[(triton.cdiv(n, _TRITON_BLOCK),)](grad, scale, n, BLOCK=_TRITON_BLOCK)
    return grad


# In place under torch.compile too: Inductor then reuses the kept gradients' memory instead of allocating a
# scaled copy of each (the head's weight gradient: vocab x hidden) while every activation is still alive.
_scale_in_place_op = _opaque(
    "scale_in_place", "(Tensor(a!)[] grads, Tensor scale) -> ()", _scale_in_place, lambda grads, scale: None,
    mutates=("grads",),
)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ weight.T + bias, targets)) / divisor`` over row chunks.

    No ``[rows, vocab]`` tensor outlives its chunk. When gradients are wanted, forward computes them chunk by
    chunk while each chunk's logits exist (so backward runs no second matmul over the vocabulary) and keeps
    only them: backward scales them by the incoming gradient, in place. The loss is accumulated in float32.

    A float16 head (``in_backward``) keeps its inputs instead, and backward recomputes each chunk's logits and
    takes their gradient at the incoming gradient, as stock does: one more matmul, and room for a loss scale
    (GradScaler's 2**16 times gradients kept at ``1 / divisor`` overflowed float16, and small ones underflowed).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, divisor, chunk_size: int, ignore_index: int, wants: tuple,
        in_backward: bool = False,
    ):
        ctx.in_backward, ctx.wants, ctx.options = in_backward, wants, (chunk_size, ignore_index)
        computing = (False,) * 3 if in_backward else wants
        options = (targets, divisor, chunk_size, ignore_index, *computing)
        loss, *computed = _linear_cross_entropy_op(hidden, weight, bias, *options)
        if in_backward:
            ctx.save_for_backward(hidden, weight, bias, targets, divisor)
        else:
            computed = iter(computed)
            ctx.save_for_backward(*(next(computed) if wanted else None for wanted in wants))
        _pass_unused_gradients_as_none(ctx)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_double_backward("the fused LM head + loss")
        if grad_loss is None:
            return _none_for_every_input(ctx)
        if ctx.in_backward:
            hidden, weight, bias, targets, divisor = ctx.saved_tensors
            options = (targets, grad_loss / divisor, *ctx.options, *ctx.wants)
            computed = iter(_linear_cross_entropy_backward_op(hidden, weight, bias, *options))
            return (*(next(computed) if wanted else None for wanted in ctx.wants), None, None, None, None, None, None)
        if getattr(ctx, "scaled", False):  # autograd's version check misses tensors saved through hooks
            raise RuntimeError(
                "the fused LM head + loss: a second backward through one loss (retain_graph=True) is not supported: "
                "the first scaled its kept gradients in place; set config.keep_logits_in_training = True for it"
            )
        grads = ctx.saved_tensors
        ctx.scaled = True
        _scale_in_place_op([g for g in grads if g is not None], grad_loss)
        return (*grads, None, None, None, None, None, None)


def _loss_chunk_size_checked(chunk_size, name: str = "chunk_size", alternative: str = "") -> int:
    """``chunk_size`` as an int (a numpy integer or a 0-d integer tensor too), or a ValueError naming it."""
    try:
        size = None if isinstance(chunk_size, bool) else operator.index(chunk_size)
    except TypeError:
        size = None
    if size is None or size < 1:
        raise ValueError(f"{name} must be a positive int{alternative}, got {chunk_size!r}")
    return size


def loss_chunk_size(
    config, vocab_size: int, dtype: torch.dtype = torch.float32, min_tokens: int = LOSS_CHUNK_MIN_TOKENS
) -> int:
    """Tokens per chunk of the fused LM head + loss: ``config.loss_chunk_size`` when set, else as many as keep
    one chunk's logits (in ``dtype``, the head's) within ``LOSS_CHUNK_BYTES``, rounded down to a multiple of
    64 where that leaves some, and at least ``min_tokens`` (2,048 tokens at a 32,000-token vocabulary in bf16,
    768 at 151,936)."""
    explicit = getattr(config, "loss_chunk_size", None)
    if explicit is not None:
        return _loss_chunk_size_checked(explicit, "config.loss_chunk_size", " or None")
    rows = max(1, LOSS_CHUNK_BYTES // (torch.finfo(dtype).bits // 8 * vocab_size))
    return max(rows - rows % 64 if rows >= 64 else rows, min_tokens)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_GLOBAL_BACKWARD_HOOKS = ("_global_backward_hooks", "_global_backward_pre_hooks")
_GLOBAL_MODULE_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", *_GLOBAL_BACKWARD_HOOKS)


def _global_module_hooks(names: tuple = _GLOBAL_MODULE_HOOKS) -> bool:
    """Whether hooks for every module are registered (``torch.nn.modules.module.register_module_forward_hook``
    and its siblings; those ``names`` only): they expect each module to be called, once per forward."""
    return any(getattr(torch.nn.modules.module, name, None) for name in names)


def _runs_as_written(module) -> bool:
    """No hooks on ``module`` (forward or backward, its own or for every module) and no forward set on the
    instance: calling it runs its class's forward and nothing else."""
    return (
        not module._forward_hooks
        and not module._forward_pre_hooks
        and not module._backward_hooks
        and not module._backward_pre_hooks
        and "forward" not in module.__dict__
        and not _global_module_hooks()
    )


def _is_plain_module(module, expected_class: type = torch.nn.Linear) -> bool:
    """A bare ``expected_class`` that runs as written and whose parameters are plain tensors: no subclass or
    wrapper (PEFT, parametrizations, quantized modules), no quantized weight in a bare module (torchao's tensor
    subclasses, whose matmuls the fused ops' backward cannot run), no hooks, and no ``torch.func`` transform
    running. The fused ops compute such a module's output (and its gradients) from its weights without
    calling it."""
    return (
        type(module) is expected_class
        and _runs_as_written(module)
        and all(p is None or type(p) in _PLAIN_TENSOR_TYPES for p in module._parameters.values())
        and not _computes_as_stock()
    )


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a module inside it has hooks or a replaced ``forward`` (FSDP2, DeepSpeed ZeRO-3,
    accelerate's offloading, or the user's own) or is an FSDP1 wrapper, or hooks for every module are
    registered: those gather or move weights, or observe outputs, at each call and expect one call per forward
    (FSDP's gathers are collectives: a call per chunk would mismatch across ranks with other token counts)."""
    return any(not _runs_as_written(m) or "_fsdp_wrapped_module" in m._modules for m in module.modules())


def _defined_by_transformers(function, name: str, loss_utils) -> bool:
    """By where it is defined: a library may patch a module's name and the mapping's entry alike."""
    return (getattr(function, "__module__", None), getattr(function, "__name__", None)) == (loss_utils.__name__, name)


def _loss_function_of_the_users(model) -> bool:
    """A function set as ``model.loss_function`` (or a class's ``_loss_function``), or a subclass's own
    ``loss_function`` (a property or a method): stock reads ``model.loss_function`` and calls either."""
    if hasattr(model, "_loss_function"):
        return True
    owner = next((cls for cls in type(model).__mro__ if "loss_function" in vars(cls)), None)
    return owner is not None and not owner.__module__.startswith("transformers.")


def loss_replaced_by_user(model, stock_loss: str = "ForCausalLMLoss") -> bool:
    """Whether the loss stock would call is the user's: a loss function of the model's own
    (``_loss_function_of_the_users``), the entry of transformers' ``LOSS_MAPPING`` that ``model.loss_type`` names
    (stock's rule: ForCausalLM's where it names none) when it is not transformers' own ``stock_loss`` (a patched
    entry included), or a patched ``fixed_cross_entropy`` (which stock's losses look up at each call). Our heads
    compute the stock losses their own way (fused, counted, in float32), which would skip such a function."""
    if _loss_function_of_the_users(model):
        return True
    try:
        from transformers.loss import loss_utils
    except ImportError:  # a transformers without LOSS_MAPPING calls no loss of the user's
        return False
    loss_type = getattr(model, "loss_type", None)
    chosen = loss_utils.LOSS_MAPPING.get(loss_type if loss_type in loss_utils.LOSS_MAPPING else "ForCausalLM")
    cross_entropy = getattr(loss_utils, "fixed_cross_entropy", None)
    patched = cross_entropy is not None and not _defined_by_transformers(cross_entropy, "fixed_cross_entropy", loss_utils)
    return patched or not _defined_by_transformers(chosen, stock_loss, loss_utils)


def attention_dropout_p(dropout: torch.nn.Module) -> float:
    """The probability an attention-dropout module of BLOOM or Qwen drops with now, handed to the kernels (which
    drop inside, where stock calls the module on the weights): an ``nn.Dropout``'s ``p`` while that module is in
    training mode (its own flag, as when stock calls it: Monte-Carlo dropout turns only the dropouts on), none for
    ``nn.Identity`` (a common way to switch it off). Another module (``AlphaDropout``, ``Dropout2d``, a subclass
    with a forward of its own) drops otherwise than a kernel can: a clear error."""
    if isinstance(dropout, torch.nn.Identity):
        return 0.0
    if isinstance(dropout, torch.nn.Dropout) and type(dropout).forward is torch.nn.Dropout.forward:
        return dropout.p if dropout.training else 0.0
    raise TypeError(
        f"the attention dropout is a {type(dropout).__name__}: the attention kernels drop elements by an "
        "nn.Dropout's p (nn.Identity for none) and cannot call another module on the attention weights"
    )


def hidden_states_to_keep(hidden_states: torch.Tensor, logits_to_keep: Union[int, torch.Tensor]) -> torch.Tensor:
    """The positions of ``hidden_states`` ``[batch, seq, hidden]`` whose logits are asked for, as transformers 5.23
    reads ``logits_to_keep`` (on every release we run on): an int keeps the last n (0: all); a 1-D tensor the same
    positions of every row; a 2-D integer one ``[batch, n]`` n positions of each row; a 2-D bool one
    ``[batch, seq]`` the True positions, flattened to ``[kept, hidden]`` (their count may differ between rows)."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    if not (isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2):
        return hidden_states[:, logits_to_keep]  # a 1-D tensor, or any index (a list, a slice) as stock takes it
    if logits_to_keep.dtype == torch.bool:
        return hidden_states[logits_to_keep.to(hidden_states.device)]
    return torch.take_along_dim(hidden_states, logits_to_keep.to(hidden_states.device)[..., None], dim=1)


def fused_loss_applies(model, lm_head, labels, logits_to_keep=0, stock_calls_loss_function: bool = True) -> bool:
    """Whether ``model`` computes its training loss without logits (and returns none).

    It does in training mode with ``labels``, all logits asked for, ``config.keep_logits_in_training`` unset,
    a head without hooks that is no FSDP1 unit (``_has_hooks``) and, where stock's head calls
    ``model.loss_function`` (``stock_calls_loss_function``; BART's computes its cross-entropy itself), no loss
    function of the user's; ``lm_head_loss`` then runs the fused op or calls a wrapped head chunk by chunk.
    Everything else goes the stock way.
    """
    applies = (
        labels is not None
        and model.training
        and not config_switch(model.config, "keep_logits_in_training", False)
        and isinstance(logits_to_keep, int)
        and logits_to_keep == 0
        and not _computes_as_stock()
    )
    if applies and stock_calls_loss_function and loss_replaced_by_user(model):
        _log_once(
            "the model's loss function is your own (model.loss_function or loss_type), so it gets the [tokens, "
            "vocab] logits of every position as stock gives them: no fused LM head + loss"
        )
        return False
    if applies and _has_hooks(lm_head):
        _log_once(
            "the LM head has hooks or is an FSDP unit (FSDP, DeepSpeed ZeRO-3, offloading, hooks for every module "
            "or your own), so it is called once on every token as stock calls it: the training loss holds the "
            "[tokens, vocab] logits"
        )
        return False
    if applies and _plain_linear_run_by(lm_head) is None and _must_be_called_once(lm_head):
        _log_once(
            "the LM head holds a parametrized weight or quantizes by statistics of its whole input, which a call "
            "per loss chunk would change, so it is called once on every token as stock calls it: the training "
            "loss holds the [tokens, vocab] logits"
        )
        return False
    return applies


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# the dtypes autocast casts for a matmul; float64 (and integer) tensors it leaves as they are
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _cast_as_autocast_would(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return tensor.to(dtype) if tensor is not None and tensor.dtype in _AUTOCAST_CASTS else tensor


def _dtype_under_autocast(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a matmul of ``dtype`` inputs runs in here: autocast's where it is on and casts ``dtype``."""
    autocast_dtype = _autocast_dtype(device_type)
    return autocast_dtype if autocast_dtype is not None and dtype in _AUTOCAST_CASTS else dtype


def _apply_as_autocast_would(function, tensors: tuple, *options):
    """``function.apply(*tensors, *options)``; under autocast the tensors are first cast to its dtype, as it
    would cast them for the matmuls inside, and the function runs with autocast off (its backward too)."""
    floating = [t for t in tensors if t is not None]
    autocast_dtype = _autocast_dtype(floating[0].device.type) if floating else None
    if autocast_dtype is None:
        return function.apply(*tensors, *options)
    cast = tuple(_cast_as_autocast_would(t, autocast_dtype) for t in tensors)
    with torch.autocast(floating[0].device.type, enabled=False):
        return function.apply(*cast, *options)


def _loss_divisor(targets: torch.Tensor, num_items_in_batch, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """What the summed loss is divided by: the counted targets, or ``num_items_in_batch`` when given."""
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=targets.device)
        if divisor.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one number, got a tensor of shape {list(divisor.shape)}")
        divisor = divisor.reshape(())
    return divisor.to(torch.promote_types(dtype, torch.float32))


def _shaped_like_stock(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Stock divides the summed loss by ``num_items_in_batch`` as given, so a ``[1, 1]`` count (the Trainer's
    under DataParallel) gives a ``[1, 1]`` loss."""
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.dim() > 0:
        return loss.reshape(num_items_in_batch.shape)
    return loss


def _token_ids(targets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Integer labels as int64 on ``device``: the gathers index with them (PyTorch's loss takes uint8 labels too)."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {targets.dtype}")
    return targets.to(device, torch.int64)


def _check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Refuse a label outside ``[0, vocab)`` that is not ``ignore_index``, as PyTorch's loss does, without a host
    sync: at once on the CPU, a device-side assert on CUDA (the Triton kernel would read another row's logit)."""
    inside = ((targets >= 0) & (targets < vocab_size)) | (targets == ignore_index)
    torch._assert_async(inside.all(), f"labels must lie in [0, {vocab_size}) or be ignore_index ({ignore_index})")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cross-entropy of ``hidden [rows, d] @ weight [vocab, d].T (+ bias)`` against ``targets [rows]``.

    The mean over the rows whose target is not ``ignore_index`` (NaN when there is none, as in PyTorch),
    or the sum divided by ``num_items_in_batch`` when given (transformers' gradient-accumulation rule).
    Under autocast, ``hidden``/``weight``/``bias`` are cast as autocast would cast them for ``F.linear``.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy expects hidden [rows, d] and targets [rows], got {list(hidden.shape)} "
            f"and {list(targets.shape)}"
        )
    chunk_size = _loss_chunk_size_checked(chunk_size)
    targets = _token_ids(targets, hidden.device)
    _check_targets(targets, weight.shape[0], ignore_index)
    divisor = _loss_divisor(targets, num_items_in_batch, ignore_index, hidden.dtype)
    grad_enabled = torch.is_grad_enabled()
    wants = tuple(grad_enabled and t is not None and t.requires_grad for t in (hidden, weight, bias))
    in_backward = any(wants) and _dtype_under_autocast(weight.dtype, weight.device.type) == torch.float16
    if in_backward:
        _log_once("the fused LM head + loss takes a float16 head's gradients in backward (room for a loss scale)")
    return _apply_as_autocast_would(
        _LinearCrossEntropy, (hidden, weight, bias), targets, divisor, chunk_size, ignore_index, wants, in_backward
    )


def _is_parametrized_linear(module) -> bool:
    """An ``nn.Linear`` whose weights ``torch.nn.utils.parametrize`` computes (weight or spectral norm,
    orthogonal), nothing else changed. Its one call per forward in stock computes the weight once, and so must
    the fused loss: a per-chunk call would redo the parametrization, and a stateful one (spectral norm's power
    iteration) would step once per chunk."""
    return (
        torch.nn.utils.parametrize.is_parametrized(module)
        and type(module).__bases__ == (torch.nn.Linear,)
        and _runs_as_written(module)
    )


def _linear_read_by_weight(module: torch.nn.Module) -> bool:
    return _is_plain_module(module) or _is_parametrized_linear(module)


def _plain_linear_run_by(head: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The ``nn.Linear`` that ``head(x)`` runs, when the fused op may read its weights instead (a plain or a
    parametrized one), or None: the head itself, or the module a PEFT ``modules_to_save`` wrapper calls (its
    one active copy; the original with adapters disabled or none active). The wrapper is read through its own
    module slots and properties, so an attribute it lacks gives None."""
    if _linear_read_by_weight(head):
        return head
    copies, original = head._modules.get("modules_to_save"), head._modules.get("original_module")
    wrapper = type(head)
    if not (
        isinstance(copies, torch.nn.ModuleDict)
        and isinstance(original, torch.nn.Module)
        and isinstance(getattr(wrapper, "active_adapters", None), property)
        and isinstance(getattr(wrapper, "disable_adapters", None), property)
    ):
        return None
    active = head.active_adapters
    if head.disable_adapters is True or (isinstance(active, list) and not active):
        module = original
    elif isinstance(active, list) and len(active) == 1 and active[0] in copies:
        module = copies[active[0]]
    else:
        return None
    return module if _linear_read_by_weight(module) else None


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor, logits_bias, ignore_index: int):
    """The head sees its chunk of rows as a batch of one sequence, ``[1, rows, d]``: the shape of stock's call,
    which a head written for ``[batch, seq, d]`` (an einsum, an unpacked shape) takes."""
    logits = head(hidden.unsqueeze(0)).flatten(0, -2)
    if logits_bias is not None:
        logits = logits + logits_bias
    return F.cross_entropy(_at_least_float32(logits), targets, ignore_index=ignore_index, reduction="sum")


def wrapped_head_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    logits_bias: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden [rows, d]) (+ logits_bias)`` against ``targets [rows]`` for a head the
    fused op cannot see into (PEFT LoRA or ``modules_to_save`` on ``lm_head``, a quantized layer), with the
    divisor of ``linear_cross_entropy``. The head is called on chunks of rows, each one checkpointed: its
    logits are freed once its loss is summed and recomputed (dropout included) in backward.
    """
    chunk_size = _loss_chunk_size_checked(chunk_size)
    targets = _token_ids(targets, hidden.device)
    divisor = _loss_divisor(targets, num_items_in_batch, ignore_index, hidden.dtype)
    chunk_loss = _chunk_loss_sum
    if torch.is_grad_enabled():
        chunk_loss = partial(checkpoint, _chunk_loss_sum, use_reentrant=False)
    sums = [
        chunk_loss(head, rows, row_targets, logits_bias, ignore_index)
        for rows, row_targets in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True)
    ]
    return torch.stack(sums).sum() / divisor


def _fused_loss_keeps_stock_numerics(weight: torch.Tensor, logits_bias: Optional[torch.Tensor]) -> bool:
    """Whether the fused op computes what stock's head and loss compute here. Not for a logits bias in another
    dtype than the head's matmul (BART's float32 ``final_logits_bias`` in a half-precision model or under
    autocast), which promotes stock's logits: such a head runs on checkpointed chunks of ``F.linear`` of the
    weight read once (stock's numerics, one more head matmul in backward)."""
    head_dtype = _dtype_under_autocast(weight.dtype, weight.device.type)
    if logits_bias is not None and logits_bias.dtype != head_dtype:
        _log_once("the fused LM head + loss runs on checkpointed chunks: a logits bias in another dtype than the head")
        return False
    return True


def lm_head_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    config,
    shift: bool = True,
    logits_bias: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: Optional[torch.Tensor] = None,
    **_,
) -> torch.Tensor:
    """The stock LM loss of ``lm_head(hidden_states) (+ logits_bias)`` against ``labels``, without logits.

    ``shift``: causal LM (position t predicts label t + 1, as transformers' ``ForCausalLMLoss``; a given
    ``shift_labels`` is used as is); ``shift=False``: labels align with positions (BART). A plain or parametrized
    ``nn.Linear`` head (or a PEFT ``modules_to_save`` copy of one) runs the fused op; any other head (PEFT LoRA, a
    quantized layer) is called on chunks.
    """
    name, given = ("shift_labels", shift_labels) if shift and shift_labels is not None else ("labels", labels)
    # the rank too: labels [b, s, 1] would shift along their last dimension and count no token (a NaN loss)
    if given.dim() != hidden_states.dim() - 1 or given.numel() != math.prod(hidden_states.shape[:-1]):
        raise labels_mismatch(name, given.shape, hidden_states.shape[:-1])  # (Size.numel() specializes traced sizes)
    if shift and shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = (shift_labels if shift else labels).reshape(-1)
    hidden_rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    if logits_bias is not None:
        logits_bias = logits_bias.reshape(-1).to(hidden_states.device)
    linear = _plain_linear_run_by(lm_head)
    if linear is not None:
        weight, bias = linear.weight, linear.bias  # read once: a parametrized head computes them at each read
        if not _fused_loss_keeps_stock_numerics(weight, logits_bias):
            lm_head, linear = partial(F.linear, weight=weight, bias=bias), None
    if linear is None:
        head_dtype = _dtype_under_autocast(hidden_states.dtype, hidden_states.device.type)
        # a wrapped head (PEFT LoRA: its term in float32) gains little from more tokens a chunk (peft_head_h200.md)
        chunk_size = loss_chunk_size(config, config.vocab_size, head_dtype, min_tokens=1)
        loss = wrapped_head_cross_entropy(
            hidden_rows, lm_head, targets, logits_bias, num_items_in_batch, ignore_index, chunk_size
        )
    else:
        if logits_bias is not None:
            bias = logits_bias if bias is None else bias + logits_bias
        head_dtype = _dtype_under_autocast(weight.dtype, hidden_states.device.type)
        loss = linear_cross_entropy(
            hidden_rows,
            weight,
            targets,
            bias=bias,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            chunk_size=loss_chunk_size(config, weight.shape[0], head_dtype),
        )
    return _shaped_like_stock(loss, num_items_in_batch)


# --- Losses of the heads that keep their logits ------------------------------------------------


class CountsLossItems:
    """For a head whose loss divides by ``num_items_in_batch`` when given one (``token_loss``,
    ``sequence_classification_loss``, ``lm_head_loss``).

    The Trainer reads ``accepts_loss_kwargs``: where True it counts the labels of the accumulated micro-batches,
    passes the count and leaves the loss undivided by the accumulation steps, and its label smoothing divides
    by the count too from transformers 5.1x on. Before that its label smoother takes no count, and a smoothed
    loss would be summed over the micro-batches: there the Trainer gets False and averages them instead. A
    subclass's forward that takes no ``**kwargs`` gets False, as the Trainer decides for a stock model."""

    @property
    def accepts_loss_kwargs(self) -> bool:
        chosen = getattr(self, "_accepts_loss_kwargs_set", None)
        if chosen is not None:
            return chosen
        parameters = inspect.signature(self.forward).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in parameters):
            return False
        trainer_utils = sys.modules.get("transformers.trainer_pt_utils")
        smoother = getattr(trainer_utils, "LabelSmoother", None)
        return smoother is None or "num_items_in_batch" in inspect.signature(smoother.__call__).parameters

    @accepts_loss_kwargs.setter
    def accepts_loss_kwargs(self, value: bool) -> None:
        """Set by hand (as on a stock model), it is what the Trainer reads."""
        self._accepts_loss_kwargs_set = value


def _transformers_major_version() -> int:
    """The major version of the transformers the model files run under (5 where it is not imported)."""
    module = sys.modules.get("transformers")
    return 5 if module is None else int(module.__version__.split(".")[0])


_TORCHSCRIPT_CONFIG_RETURNS_TUPLES = _transformers_major_version() < 5


def returns_dict(config, return_dict: Optional[bool]) -> bool:
    """``return_dict`` where the call gives it, else the config's ``use_return_dict`` as stock's GPT-2, BLOOM and
    BART and the original Qwen read it: False for a ``torchscript`` config on transformers 4.x (tuples, for
    ``torch.jit.trace``); 5.x reads ``return_dict`` alone (and warns that ``use_return_dict`` is deprecated)."""
    if return_dict is not None:
        return return_dict
    return config.return_dict and not (_TORCHSCRIPT_CONFIG_RETURNS_TUPLES and config.torchscript)


def _mean_or_counted(loss_fn: Callable, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch):
    """``loss_fn``'s mean, or, given the Trainer's ``num_items_in_batch``, its sum divided by that count, so that
    accumulated micro-batches add up to the loss of the whole batch (README, gradient accumulation). The sum is
    taken in float32 at least (a float16 one over many tokens overflows) and returned in the mean's dtype."""
    if num_items_in_batch is None:
        return loss_fn(logits, labels)
    wide = _at_least_float32(logits)
    plain_dtype = _plain_loss_dtype(logits, labels)
    labels = labels.to(wide.dtype) if labels.is_floating_point() else labels
    divisor = _loss_divisor(labels, num_items_in_batch, IGNORE_INDEX, wide.dtype)  # the LM loss's count rules
    counted = (loss_fn(wide, labels, reduction="sum") / divisor).to(plain_dtype)
    return _shaped_like_stock(counted, num_items_in_batch)


def _plain_loss_dtype(logits: torch.Tensor, labels: torch.Tensor) -> torch.dtype:
    """The dtype of a loss function's result for ``logits`` and ``labels``: float32 for half-precision logits
    under autocast (which runs the losses in float32), else the logits' own, promoted with float labels'
    (mean squared error and binary cross-entropy of bfloat16 logits against float32 labels are float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16) and _autocast_enabled(logits.device.type):
        return torch.float32
    return torch.promote_types(logits.dtype, labels.dtype) if labels.is_floating_point() else logits.dtype


def token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of per-position logits ``[..., classes]`` against labels aligned with them (-100 ignored):
    the token-classification heads' loss and BART's LM loss over kept logits."""
    flat_logits, targets = logits.reshape(-1, logits.shape[-1]), label_ids(labels).to(logits.device).reshape(-1)
    return _mean_or_counted(F.cross_entropy, flat_logits, targets, num_items_in_batch)


def sequence_classification_loss(
    config, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None
) -> Optional[torch.Tensor]:
    """A sequence-classification head's loss of its pooled ``[batch, num_labels]`` logits, by
    ``config.problem_type`` (inferred and stored on the config where unset, as stock): mean squared error,
    cross-entropy or binary cross-entropy with logits. None for a problem type stock does not know."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            logits, labels = logits.squeeze(), labels.squeeze()
        return _mean_or_counted(F.mse_loss, logits, labels, num_items_in_batch)
    if config.problem_type == "single_label_classification":
        if labels.is_floating_point():  # class probabilities [batch, num_labels], as stock BLOOM's loss takes
            # the Trainer counts every entry of such labels: num_labels a row
            rows = None if num_items_in_batch is None else num_items_in_batch / labels.shape[-1]
            return _mean_or_counted(F.cross_entropy, logits, labels, rows)
        return _mean_or_counted(F.cross_entropy, logits.view(-1, num_labels), labels.view(-1), num_items_in_batch)
    if config.problem_type == "multi_label_classification":
        return _mean_or_counted(F.binary_cross_entropy_with_logits, logits, labels, num_items_in_batch)
    return None


# --- RMSNorm ----------------------------------------------------------------------------------


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    x_float = _at_least_float32(x)
    rstd = torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x_float * rstd).to(x.dtype), rstd


def _plus_residual(grad_x: torch.Tensor, residual_grad: Optional[torch.Tensor]) -> torch.Tensor:
    """A norm's input gradient (float32 or float64) plus the gradient of its residual pass-through, if any:
    one sum before the cast to the input's dtype, as the kernels compute it."""
    return grad_x if residual_grad is None else grad_x + residual_grad.to(grad_x.dtype)


def _rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, residual_grad=None
):
    x_hat = _at_least_float32(x) * rstd
    grad_normed = (grad * weight).to(x.dtype).to(x_hat.dtype)  # rounded as stock's cast of the normed input
    grad_x = rstd * (grad_normed - x_hat * (grad_normed * x_hat).mean(-1, keepdim=True))
    grad_weight = (grad.to(x_hat.dtype) * x_hat.to(x.dtype).to(x_hat.dtype)).reshape(-1, x.shape[-1]).sum(0)
    return _plus_residual(grad_x, residual_grad).to(x.dtype), grad_weight.to(weight.dtype)


def _rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    if x.shape[-1] > _TRITON_MAX_ROW:
        return None
    x_rows = _rows(x)
    out = torch.empty(x_rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
    block = _row_block(x_rows.shape[1])
    _kernel_for(_rms_norm_forward_kernel, x)[(x_rows.shape[0],)](
        x_rows, weight.contiguous(), out, rstd, x_rows.shape[1], eps, BLOCK=block, num_warps=_row_warps(block)
    )
    return out.view(x.shape), rstd.view(*x.shape[:-1], 1)


def _norm_backward_split(n_rows: int, block: int, device: torch.device) -> tuple:
    """``(programs, rows_per_program, rows_at_once)`` for the norm backward kernels: two programs per SM, each
    taking ROWS rows at a time on ``_row_warps(block)`` warps (the fastest launch measured on an H200 at
    8192 x 2048 in bf16: 30 us against 41 us for four per SM on warps sized for all ROWS rows)."""
    rows_at_once = max(1, min(8, 8192 // block))
    programs = max(1, min(n_rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    rows_per_program = rows_at_once * triton.cdiv(triton.cdiv(n_rows, programs), rows_at_once)
    return triton.cdiv(n_rows, rows_per_program), rows_per_program, rows_at_once


def _rms_norm_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, residual_grad=None
):
    x_rows, grad_rows = _rows(x), _rows(grad)
    n_rows, n_cols = x_rows.shape
    if n_rows == 0:  # nothing to split over programs: the PyTorch body returns the empty and zero gradients
        return None
    block = _row_block(n_cols)
    programs, rows_per_program, rows_at_once = _norm_backward_split(n_rows, block, x.device)
    grad_x = torch.empty_like(x_rows)
    partial_grad_weight = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    residual_rows = grad_rows if residual_grad is None else _rows(residual_grad)  # read only with RESIDUAL
    _kernel_for(_rms_norm_backward_kernel, x)[(programs,)](
        grad_rows, x_rows, weight.contiguous(), rstd.contiguous(), residual_rows, grad_x, partial_grad_weight,
        n_rows, n_cols, rows_per_program, BLOCK=block, ROWS=rows_at_once, RESIDUAL=residual_grad is not None,
        num_warps=_row_warps(block),
    )
    return grad_x.view(x.shape), partial_grad_weight.sum(0).to(weight.dtype)


_rms_norm_forward_op = _opaque_fused(
    "rms_norm_forward", "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    _rms_norm_forward_triton, _rms_norm_forward,
)
_rms_norm_backward_op = _opaque_fused(
    "rms_norm_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor rstd, Tensor? residual_grad) -> (Tensor, Tensor)",
    _rms_norm_backward_triton, _rms_norm_backward,
)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, normalised in float32; saves x and per-row rstd.
    ``with_residual``: x is returned too (see ``residual_after_norm``)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, with_residual: bool):
        out, rstd = _rms_norm_forward_op(x, weight, eps)
        ctx.save_for_backward(_savable(x), weight, rstd)
        _pass_unused_gradients_as_none(ctx)
        return (out, x) if with_residual else out

    @staticmethod
    def backward(ctx, grad, residual_grad=None):
        _refuse_double_backward("the fused RMSNorm")
        if grad is None:  # only the residual reaches a loss
            return residual_grad, None, None, None
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _rms_norm_backward_op(grad, x, weight, rstd, residual_grad)
        return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, with_residual: bool = False):
    """RMSNorm as LLaMA and Qwen compute it: statistics in float32 (float64 for float64 input), normalised
    value cast to the input dtype, then scaled by ``weight``. ``with_residual``: ``(normed, x)``, x passed
    through the norm's autograd node (see ``residual_after_norm``)."""
    if _computes_as_stock():
        normed = _rms_norm_forward(x, weight, eps)[0]
        return (normed, x) if with_residual else normed
    return _RMSNorm.apply(x, weight, eps, with_residual)


# --- LayerNorm --------------------------------------------------------------------------------


def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    x_float = _at_least_float32(x)
    mean = x_float.mean(-1, keepdim=True)
    centered = x_float - mean
    rstd = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    out = centered * rstd * weight.to(x_float.dtype) + bias.to(x_float.dtype)
    return out.to(x.dtype), mean, rstd


def _layer_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean, rstd, residual_grad=None
):
    x_hat = (_at_least_float32(x) - mean) * rstd
    grad_float = grad.to(x_hat.dtype)
    grad_normed = grad_float * weight.to(x_hat.dtype)
    mean_grad_x_hat = (grad_normed * x_hat).mean(-1, keepdim=True)
    grad_x = rstd * (grad_normed - grad_normed.mean(-1, keepdim=True) - x_hat * mean_grad_x_hat)
    grad_rows = grad_float.reshape(-1, x.shape[-1])
    grad_weight = (grad_rows * x_hat.reshape(-1, x.shape[-1])).sum(0)
    grad_x = _plus_residual(grad_x, residual_grad).to(x.dtype)
    return grad_x, grad_weight.to(weight.dtype), grad_rows.sum(0).to(weight.dtype)


def _layer_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    if x.shape[-1] > _TRITON_MAX_ROW:
        return None
    x_rows = _rows(x)
    out = torch.empty_like(x_rows)
    mean = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = _row_block(x_rows.shape[1])
    _kernel_for(_layer_norm_forward_kernel, x)[(x_rows.shape[0],)](
        x_rows, weight.contiguous(), bias.contiguous(), out, mean, rstd, x_rows.shape[1], eps,
        BLOCK=block, num_warps=_row_warps(block),
    )
    stats_shape = (*x.shape[:-1], 1)
    return out.view(x.shape), mean.view(stats_shape), rstd.view(stats_shape)


def _layer_norm_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean, rstd, residual_grad=None
):
    x_rows, grad_rows = _rows(x), _rows(grad)
    n_rows, n_cols = x_rows.shape
    if n_rows == 0:  # nothing to split over programs: the PyTorch body returns the empty and zero gradients
        return None
    block = _row_block(n_cols)
    programs, rows_per_program, rows_at_once = _norm_backward_split(n_rows, block, x.device)
    grad_x = torch.empty_like(x_rows)
    partial = torch.empty(programs, 2, n_cols, dtype=torch.float32, device=x.device)
    residual_rows = grad_rows if residual_grad is None else _rows(residual_grad)  # read only with RESIDUAL
    _kernel_for(_layer_norm_backward_kernel, x)[(programs,)](
        grad_rows, x_rows, weight.contiguous(), mean.contiguous(), rstd.contiguous(), residual_rows, grad_x,
        partial, n_rows, n_cols, rows_per_program, BLOCK=block, ROWS=rows_at_once,
        RESIDUAL=residual_grad is not None, num_warps=_row_warps(block),
    )
    # two reductions, not views of one [2, n_cols] sum: a custom op's outputs must not alias each other
    grad_weight, grad_bias = (partial[:, index].sum(0).to(weight.dtype) for index in (0, 1))
    return grad_x.view(x.shape), grad_weight, grad_bias


_layer_norm_forward_op = _opaque_fused(
    "layer_norm_forward", "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
    _layer_norm_forward_triton, _layer_norm_forward,
)
_layer_norm_backward_op = _opaque_fused(
    "layer_norm_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor? residual_grad)"
    " -> (Tensor, Tensor, Tensor)",
    _layer_norm_backward_triton, _layer_norm_backward,
)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim, statistics in float32; saves x and the per-row mean and rstd.
    ``with_residual``: x is returned too (see ``residual_after_norm``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, with_residual: bool):
        out, mean, rstd = _layer_norm_forward_op(x, weight, bias, eps)
        ctx.save_for_backward(_savable(x), weight, mean, rstd)
        _pass_unused_gradients_as_none(ctx)
        return (out, x) if with_residual else out

    @staticmethod
    def backward(ctx, grad, residual_grad=None):
        _refuse_double_backward("the fused LayerNorm")
        if grad is None:  # only the residual reaches a loss
            return residual_grad, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _layer_norm_backward_op(grad, x, weight, mean, rstd, residual_grad)
        needs = ctx.needs_input_grad
        return grad_x, grad_weight if needs[1] else None, grad_bias if needs[2] else None, None, None


class FusedLayerNorm(torch.nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, state-dict keys and math) that runs the fused op (``_LayerNorm``:
    Triton kernels on CUDA, one per direction) where it applies: in training mode or while gradients are
    recorded (a recomputation in backward, see ``after_norm``, or a checkpointed layer's, then runs the same
    kernel as the forward, even after ``model.eval()`` between the two), over one dim, with a weight and a bias
    of the input's dtype, without autocast. Anything else, inference included (where aten's one kernel launches
    faster than a Triton kernel), is stock's ``nn.LayerNorm``."""

    recomputes_exactly = True  # see ``_runs_again_alike``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_applies(x):
            return super().forward(x)
        return _LayerNorm.apply(x, self.weight, self.bias, self.eps, False)

    def with_residual(self, x: torch.Tensor) -> tuple:
        """``(self(x), x)``, x passed through the fused op's autograd node where it applies (see
        ``residual_after_norm``)."""
        if not self._fused_applies(x):
            return super().forward(x), x
        return _LayerNorm.apply(x, self.weight, self.bias, self.eps, True)

    def _fused_applies(self, x: torch.Tensor) -> bool:
        return (
            (self.training or torch.is_grad_enabled())
            and len(self.normalized_shape) == 1
            and x.shape[-1] == self.normalized_shape[0]  # else stock's call names the mismatch
            and self.weight is not None
            and self.bias is not None
            and x.dtype == self.weight.dtype == self.bias.dtype
            and x.is_floating_point()
            and _autocast_dtype(x.device.type) is None
            and not _computes_as_stock()
        )


# --- Activations ------------------------------------------------------------------------------

# The fused activations: silu(gate) * up, and GeLU in its tanh and erf forms (Triton kernel KIND 0, 1, 2).
_ACTIVATION_KINDS = {"silu_mul": 0, "gelu_tanh": 1, "gelu": 2}
# transformers' activation names whose math is F.gelu's ("gelu_new" and "gelu_fast" are the tanh form)
_GELU_KINDS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_SILU_NAMES = ("silu", "swish")


def _activation_forward(kind: str, x: torch.Tensor, up: Optional[torch.Tensor]) -> torch.Tensor:
    if kind == "silu_mul":
        return F.silu(x) * up
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def _activation_backward(kind: str, grad: torch.Tensor, x: torch.Tensor, up: Optional[torch.Tensor]):
    """Gradients of x and up (None for GeLU), in their dtypes, computed in float32 like stock's kernels."""
    if kind != "silu_mul":
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward(grad, x, approximate=approximate), None
    x_float = _at_least_float32(x)
    sigmoid = torch.sigmoid(x_float)
    grad_up = grad * F.silu(x)
    grad_silu = _at_least_float32(grad * up)
    grad_x = grad_silu * sigmoid * (1 + x_float * (1 - sigmoid))
    return grad_x.to(x.dtype), grad_up.to(up.dtype)


def _activation_forward_triton(kind: str, x: torch.Tensor, up: Optional[torch.Tensor]) -> torch.Tensor:
    if up is not None and (up.shape, up.dtype) != (x.shape, x.dtype):
        return None  # broadcasting or mixed dtypes: the PyTorch body
    x = x.contiguous()
    up = up.contiguous() if up is not None else None
    out = torch.empty_like(x)
    n = x.numel()
    _kernel_for(_activation_forward_kernel, x)[(triton.cdiv(n, _TRITON_BLOCK),)](
        x, x if up is None else up, out, n, KIND=_ACTIVATION_KINDS[kind], BLOCK=_TRITON_BLOCK
    )
    return out


def _activation_backward_triton(
    kind: str, grad: torch.Tensor, x: torch.Tensor, up: Optional[torch.Tensor], with_value: bool = False
):
    """``_activation_backward``'s gradients as one kernel; ``with_value`` (``_activation_grads_and_value``):
    also the forward's value, and the gradient of x written over ``grad``, which the caller owns."""
    if any(t is not None and (t.shape, t.dtype) != (x.shape, x.dtype) for t in (grad, up)):
        return None
    if with_value and not grad.is_contiguous():
        return None
    grad, x = grad.contiguous(), x.contiguous()
    up = up.contiguous() if up is not None else None
    grad_x = grad if with_value else torch.empty_like(x)
    grad_up = torch.empty_like(up) if up is not None else None
    value = torch.empty_like(x) if with_value else None
    n = x.numel()
    _kernel_for(_activation_backward_kernel, x)[(triton.cdiv(n, _TRITON_BLOCK),)](
        grad, x, x if up is None else up, grad_x, grad_up if up is not None else _unwritten(x),
        value if with_value else _unwritten(x), n,
        KIND=_ACTIVATION_KINDS[kind], WRITE_VALUE=with_value, BLOCK=_TRITON_BLOCK,
    )
    return (grad_x, grad_up, value) if with_value else (grad_x, grad_up)


def _activation_grads_and_value_triton(kind: str, grad: torch.Tensor, x: torch.Tensor, up: Optional[torch.Tensor]):
    return _activation_backward_triton(kind, grad, x, up, with_value=True)


def _activation_grads_and_value(kind: str, grad: torch.Tensor, x: torch.Tensor, up: Optional[torch.Tensor]):
    """The gradients of x and up (``_activation_backward``) and the forward's value, which the backward of the
    matmul after the activation needs: one pass over the inputs where Triton runs it."""
    return (*_activation_backward(kind, grad, x, up), _activation_forward(kind, x, up))


def _activation_input_grads(kind: str, grad, x, up, run: Callable = _fused) -> list:
    """The gradients of x and (when given) up, as a list: a custom op returns no None."""
    grads = run(_activation_backward_triton, _activation_backward, kind, grad, x, up)
    return [g for g in grads if g is not None]


_activation_forward_op = _opaque_fused(
    "activation_forward", "(str kind, Tensor x, Tensor? up) -> Tensor",
    _activation_forward_triton, _activation_forward,
)
_activation_backward_op = _opaque(
    "activation_backward", "(str kind, Tensor grad, Tensor x, Tensor? up) -> Tensor[]",
    lambda *args: _contiguous(_activation_input_grads(*args)),
    lambda *args: _contiguous(_activation_input_grads(*args, run=_run_body)),
    kernels=_kernels_of(_activation_input_grads),
)


class _Activation(torch.autograd.Function):
    """``silu(x) * up`` or GeLU saving only its inputs (the matmul outputs); recomputed in backward."""

    @staticmethod
    def forward(ctx, kind: str, x, up):
        ctx.kind = kind
        ctx.save_for_backward(x, up)
        _pass_unused_gradients_as_none(ctx)
        return _activation_forward_op(kind, x, up)

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward("the fused activation")
        if grad is None:
            return _none_for_every_input(ctx)
        x, up = ctx.saved_tensors
        grads = _activation_backward_op(ctx.kind, grad, x, up)
        return None, grads[0], grads[1] if up is not None else None


def _fused_kind(name: Optional[str], gated: bool) -> Optional[str]:
    """The fused activation for transformers' activation ``name`` (gated: times ``up``), or None (also for no
    name: a replaced activation module, see ``fused_activation_name``; also under a ``torch.func`` transform)."""
    if _computes_as_stock():
        return None
    if gated:
        return "silu_mul" if name in _SILU_NAMES else None
    return _GELU_KINDS.get(name)


def fused_activation_name(name: Optional[str], module: torch.nn.Module, built_type: type) -> Optional[str]:
    """``name`` while the MLP's activation ``module`` is still the plain one it was built with (of
    ``built_type``: ``ACT2FN[name]``), whose function the fused ops compute; None once it is replaced or hooked
    (``mlp.act_fn = nn.ReLU()``, a hook that records activations): it is then called as it is."""
    return name if _is_plain_module(module, built_type) else None


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)`` keeping only ``x`` for backward."""
    if _computes_as_stock():
        return F.gelu(x, approximate=approximate)
    return _Activation.apply("gelu_tanh" if approximate == "tanh" else "gelu", x, None)


def activation(name: Optional[str], x: torch.Tensor, fallback: Callable) -> torch.Tensor:
    """``ACT2FN[name](x)``; the GeLU family through the fused op, anything else through ``fallback``."""
    kind = _fused_kind(name, gated=False)
    return fallback(x) if kind is None else _Activation.apply(kind, x, None)


def gated_activation(
    name: Optional[str], gate: torch.Tensor, up: torch.Tensor, fallback: Callable
) -> torch.Tensor:
    """``ACT2FN[name](gate) * up``; SiLU through the fused op, anything else through ``fallback``."""
    kind = _fused_kind(name, gated=True)
    return fallback(gate) * up if kind is None else _Activation.apply(kind, gate, up)


# --- MLP output projection: activation + linear, the activation recomputed in backward ----------


def _activation_linear_forward(kind: str, x, up, weight, bias, run: Callable = _fused) -> torch.Tensor:
    return _linear_of_its_own(run(_activation_forward_triton, _activation_forward, kind, x, up), weight, bias)


def _linear_of_its_own(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a tensor of its own, not a view: with a bias and a batch of rows,
    ``F.linear`` returns its 2-D ``addmm`` viewed as ``[..., out]``, and a view that an autograd Function returns
    cannot be edited in place (a user's hook ablating MLP channels, which stock's output takes)."""
    if bias is None or x.dim() == 2:
        return F.linear(x, weight, bias)
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    torch.addmm(bias, x.flatten(0, -2), weight.t(), out=out.flatten(0, -2))
    return out


def _activation_linear_backward(
    kind: str, grad, x, up, weight, need_inputs: bool, need_weight: bool, need_bias: bool, run: Callable = _fused
) -> list:
    """The gradients asked for, in the order x, up (when given), weight, bias. The activation is recomputed
    for the weight's: by the kernel that computes the inputs' gradients when both are wanted. The bias's
    comes first: the reduction's workspace (as large as ``[tokens, intermediate]`` on CUDA for a bf16 sum over
    8k rows) then meets none of the ``[tokens, intermediate]`` tensors this backward makes."""
    grad_rows = grad.flatten(0, -2)
    grad_bias = [grad_rows.sum(0)] if need_bias else []
    grad_inputs, activated = [], None
    if need_inputs and need_weight:
        grad_x, grad_up, activated = run(
            _activation_grads_and_value_triton, _activation_grads_and_value, kind, grad.matmul(weight), x, up
        )
        grad_inputs = [g for g in (grad_x, grad_up) if g is not None]
    elif need_inputs:
        grad_inputs = _activation_input_grads(kind, grad.matmul(weight), x, up, run)
    elif need_weight:
        activated = run(_activation_forward_triton, _activation_forward, kind, x, up)
    grad_weight = [grad_rows.t().mm(activated.flatten(0, -2))] if need_weight else []  # (an MLP width of 0 too)
    return grad_inputs + grad_weight + grad_bias


_activation_linear_forward_op = _opaque(
    "activation_linear_forward", "(str kind, Tensor x, Tensor? up, Tensor weight, Tensor? bias) -> Tensor",
    lambda *args: _activation_linear_forward(*args).contiguous(),
    lambda *args: _activation_linear_forward(*args, run=_run_body).contiguous(),
    kernels=_kernels_of(_activation_linear_forward),
)
_activation_linear_backward_op = _opaque(
    "activation_linear_backward",
    "(str kind, Tensor grad, Tensor x, Tensor? up, Tensor weight, bool need_inputs, bool need_weight, "
    "bool need_bias) -> Tensor[]",
    lambda *args: _contiguous(_activation_linear_backward(*args)),
    lambda *args: _contiguous(_activation_linear_backward(*args, run=_run_body)),
    kernels=_kernels_of(_activation_linear_backward),
)


class _ActivationLinear(torch.autograd.Function):
    """``F.linear(act(x[, up]), weight, bias)`` keeping only ``x`` (and ``up``): the activation, the largest
    tensor of an MLP, is not kept for the weight gradient but recomputed in backward."""

    @staticmethod
    def forward(ctx, x, up, weight, bias, kind: str):
        ctx.kind = kind
        ctx.save_for_backward(x, up, weight)
        _pass_unused_gradients_as_none(ctx)
        return _activation_linear_forward_op(kind, x, up, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward("the fused MLP projection")
        if grad is None:
            return _none_for_every_input(ctx)
        x, up, weight = ctx.saved_tensors
        need_x, need_up, need_weight, need_bias = ctx.needs_input_grad[:4]
        need_inputs = need_x or need_up
        grads = iter(_activation_linear_backward_op(ctx.kind, grad, x, up, weight, need_inputs, need_weight, need_bias))
        grad_x = next(grads) if need_inputs else None
        grad_up = next(grads) if need_inputs and up is not None else None
        grad_weight = next(grads) if need_weight else None
        grad_bias = next(grads) if need_bias else None
        return grad_x, grad_up, grad_weight, grad_bias, None


def projected_activation(
    name: Optional[str],
    x: torch.Tensor,
    projection: torch.nn.Module,
    fallback: Callable,
    up: Optional[torch.Tensor] = None,
    projection_class: type = torch.nn.Linear,
    transposed: bool = False,
) -> torch.Tensor:
    """``projection(ACT2FN[name](x) [* up])``, the MLP's last matmul, without keeping its input for backward.

    Fused where the activation has a fused form and ``projection`` is a plain ``projection_class`` (an
    ``nn.Linear``, or GPT-2's ``Conv1D`` whose weight is ``[in, out]``: ``transposed``); a wrapped or hooked
    projection (PEFT LoRA, quantization), another activation or a single vector ``x`` takes the stock path.
    """
    kind = _fused_kind(name, gated=up is not None)
    if kind is None or x.dim() < 2 or not _is_plain_module(projection, projection_class):
        return projection(activation(name, x, fallback) if up is None else gated_activation(name, x, up, fallback))
    weight = projection.weight.t() if transposed else projection.weight
    return _apply_as_autocast_would(_ActivationLinear, (x, up, weight, projection.bias), kind)


# --- Projections of one input: its gradient summed inside the matmuls ---------------------------


def _shared_input_linears_backward(
    x: torch.Tensor, weights: list, grads: list, want_x: bool, want_weights: list, want_biases: list
) -> list:
    """The wanted gradients of ``_SharedInputLinears``, in order: x's, then the weights', then the biases'.
    x's gradient is summed in the matmuls (``addmm_``, beta 1) in place."""
    x_rows = x.flatten(0, -2)
    grad_x, grad_weights, grad_biases = None, [], []
    for grad, weight, want_weight, want_bias in zip(grads, weights, want_weights, want_biases, strict=True):
        grad_rows = grad.flatten(0, -2)
        if want_bias:
            grad_biases.append(grad_rows.sum(0))
        if want_weight:
            grad_weights.append(grad_rows.t().mm(x_rows))
        if want_x:
            grad_x = grad_rows.mm(weight) if grad_x is None else grad_x.addmm_(grad_rows, weight)
    return ([grad_x.view(x.shape)] if want_x else []) + grad_weights + grad_biases


def _shared_input_linears_backward_fake(x, weights, grads, want_x, want_weights, want_biases) -> list:
    grad_weights = [
        weight.new_empty(weight.shape, dtype=grad.dtype)
        for weight, grad, wanted in zip(weights, grads, want_weights)
        if wanted
    ]
    grad_biases = [g.new_empty(g.shape[-1:]) for g, wanted in zip(grads, want_biases) if wanted]
    return ([x.new_empty(x.shape)] if want_x else []) + grad_weights + grad_biases


# Opaque under torch.compile: functionalized, each in-place addmm_ would become an out-of-place addmm, which
# first copies its input (a [tokens, hidden] copy per projection after the first).
_shared_input_linears_backward_op = _opaque(
    "shared_input_linears_backward",
    "(Tensor x, Tensor[] weights, Tensor[] grads, bool want_x, bool[] want_weights, bool[] want_biases)"
    " -> Tensor[]",
    _shared_input_linears_backward,
    _shared_input_linears_backward_fake,
)


class _SharedInputLinears(torch.autograd.Function):
    """``F.linear(x, weight_i, bias_i)`` for each projection i of one ``x``, as one autograd node. Backward sums
    the gradient of ``x`` in the matmuls, where autograd runs one add kernel over ``x``'s size for every
    projection after the first; the weights' and biases' gradients are stock's."""

    @staticmethod
    def forward(ctx, x, *weights_and_biases):
        count = len(weights_and_biases) // 2
        weights, biases = weights_and_biases[:count], weights_and_biases[count:]
        ctx.save_for_backward(x, *weights)
        _pass_unused_gradients_as_none(ctx)
        return tuple(F.linear(x, weight, bias) for weight, bias in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        """Projections whose output reaches no loss (None gradient) are left out: None for their weights."""
        x, *weights = ctx.saved_tensors
        count = len(weights)
        used = [index for index, grad in enumerate(grads) if grad is not None]
        want_x = ctx.needs_input_grad[0] and bool(used)
        want_weights = [ctx.needs_input_grad[1 + index] for index in used]
        want_biases = [ctx.needs_input_grad[1 + count + index] for index in used]
        computed = iter(
            _shared_input_linears_backward_op(
                x, [weights[index] for index in used], [grads[index] for index in used], want_x, want_weights,
                want_biases,
            ) if used else []
        )
        grad_x = next(computed) if want_x else None
        grad_weights, grad_biases = [None] * count, [None] * count
        for gradients, wants in ((grad_weights, want_weights), (grad_biases, want_biases)):
            for index, wanted in zip(used, wants):
                gradients[index] = next(computed) if wanted else None
        return (grad_x, *grad_weights, *grad_biases)


def shared_input_projections(x: torch.Tensor, *projections: torch.nn.Module) -> tuple:
    """``tuple(projection(x) for projection in projections)``: one autograd node (``_SharedInputLinears``)
    when gradients are recorded and every projection is a plain ``nn.Linear``; a wrapped or hooked one (PEFT
    LoRA, quantization) keeps the stock calls, as does a single vector ``x``."""
    if torch.is_grad_enabled() and x.dim() >= 2 and all(_is_plain_module(projection) for projection in projections):
        weights = tuple(projection.weight for projection in projections)
        biases = tuple(projection.bias for projection in projections)
        if any(t is not None and t.requires_grad for t in (x, *weights, *biases)):
            return _apply_as_autocast_would(_SharedInputLinears, (x, *weights, *biases))
    return tuple(projection(x) for projection in projections)


# --- Rotary position embedding ----------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _rotary_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transposed (inverse) rotation: rotate_half's transpose is -rotate_half."""
    return grad * cos - _rotate_half(grad * sin)


def _rotated_pair(rotate: Callable, q, k, cos, sin, dtype: torch.dtype) -> list:
    """``rotate`` (the forward or the inverse rotation) of q and of k (when given), each in ``dtype``: the
    PyTorch body of the rotary ops, computed in the promoted dtype of x and cos as the stock formula is."""
    return [rotate(x, cos, sin).to(dtype) for x in (q, k) if x is not None]


def _rotary_output(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor shaped like ``x`` in ``dtype``, laid out like it where its last stride is 1."""
    out = torch.empty_like(x, dtype=dtype)
    return out if out.stride(-1) == 1 else torch.empty(x.shape, dtype=dtype, device=x.device)


def _rotary_pair_triton(q, k, cos, sin, dtype: torch.dtype, inverse: bool) -> Optional[list]:
    """``_rotated_pair`` as one Triton kernel for q and k together (one launch, in float32), for 4-D q/k of one
    shape but their head count, each with a contiguous even last dimension, and cos/sin ``[b or 1, 1, s, d]``;
    None for anything else (the PyTorch body takes it)."""
    pair = [x for x in (q, k) if x is not None]
    if any(x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1 for x in pair):
        return None
    batch, _, seq, dim = q.shape
    if k is not None and (k.shape[0], k.shape[2], k.shape[3], k.dtype) != (batch, seq, dim, q.dtype):
        return None
    try:
        cos, sin = cos.expand(batch, 1, seq, dim), sin.expand(batch, 1, seq, dim)
    except RuntimeError:
        return None
    if cos.stride() != sin.stride() or cos.stride(-1) != 1 or cos.dtype != sin.dtype:
        return None
    outs = [_rotary_output(x, dtype) for x in pair]
    k_in, k_out = (k, outs[1]) if k is not None else (q, _unwritten(q, dims=4))  # k's zero heads: no program
    block_s = 32
    _kernel_for(_rotary_kernel, q)[(batch * sum(x.shape[1] for x in pair), triton.cdiv(seq, block_s))](
        q, k_in, cos, sin, outs[0], k_out, q.shape[1], k_in.shape[1] if k is not None else 0, seq, dim // 2,
        *q.stride()[:3], *k_in.stride()[:3], cos.stride(0), cos.stride(2), *outs[0].stride()[:3], *k_out.stride()[:3],
        INVERSE=inverse, BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4,
    )
    return outs


def _rotary_forward_body(q, k, cos, sin, dtype: torch.dtype) -> list:
    return _rotated_pair(_rotary_forward, q, k, cos, sin, dtype)


def _rotary_backward_body(q, k, cos, sin, dtype: torch.dtype) -> list:
    return _rotated_pair(_rotary_backward, q, k, cos, sin, dtype)


def _rotary_forward_triton(q, k, cos, sin, dtype: torch.dtype) -> Optional[list]:
    return _rotary_pair_triton(q, k, cos, sin, dtype, inverse=False)


def _rotary_backward_triton(q, k, cos, sin, dtype: torch.dtype) -> Optional[list]:
    return _rotary_pair_triton(q, k, cos, sin, dtype, inverse=True)


def _laid_out_like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` with the strides ``torch.empty_like(x)`` has (those the Triton kernel writes: q and k stay in
    the layout of the projection they come from), copied into them where the PyTorch body chose others."""
    if out.stride() == x.stride() or out.stride() == torch.empty_like(x, dtype=out.dtype, device="meta").stride():
        return out
    return torch.empty_like(x, dtype=out.dtype).copy_(out)


def _rotary_op(name: str, kernel: Callable, body: Callable) -> Callable:
    """``_fused(kernel, body, q, k, cos, sin, dtype)``, each output laid out like its input, as an ``_opaque`` op.
    (Traced, the op's kernels are their own fake implementation: no layout to match.)"""

    def kernels(q, k, cos, sin, dtype):
        return _launch_or_body(kernel, body, q, k, cos, sin, dtype)

    return _opaque(
        name,
        "(Tensor q, Tensor? k, Tensor cos, Tensor sin, ScalarType dtype) -> Tensor[]",
        lambda q, k, cos, sin, dtype: [
            _laid_out_like(out, x) for out, x in zip(_fused(kernel, body, q, k, cos, sin, dtype), (q, k))
        ],
        lambda q, k, cos, sin, dtype: [torch.empty_like(x, dtype=dtype) for x in (q, k) if x is not None],
        kernels=kernels,
    )


_rotary_forward_op = _rotary_op("rotary_forward", _rotary_forward_triton, _rotary_forward_body)
_rotary_backward_op = _rotary_op("rotary_backward", _rotary_backward_triton, _rotary_backward_body)


class _Rotary(torch.autograd.Function):
    """RoPE (``x * cos + rotate_half(x) * sin``) of q and, when given, k (of q's dtype) in one op, whose
    backward is the inverse rotation, also in one op; saves only cos/sin."""

    @staticmethod
    def forward(ctx, cos, sin, dtype, q, k):
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = q.dtype
        _pass_unused_gradients_as_none(ctx)
        return tuple(_rotary_forward_op(q, k, cos, sin, dtype))

    @staticmethod
    def backward(ctx, grad_q, grad_k=None):
        _refuse_double_backward("the fused RoPE")
        cos, sin = ctx.saved_tensors
        given = [grad for grad in (grad_q, grad_k) if grad is not None]  # None: that output reaches no loss
        if not given:
            return _none_for_every_input(ctx)
        rotated = iter(_rotary_backward_op(given[0], given[1] if len(given) == 2 else None, cos, sin, ctx.input_dtype))
        return None, None, None, *(None if grad is None else next(rotated) for grad in (grad_q, grad_k))


def _rotates_through_autograd(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """cos/sin that need a gradient (nobody's do in our files) or differ in dtype, or a ``torch.func`` transform
    running: the plain autograd path."""
    return cos.requires_grad or sin.requires_grad or cos.dtype != sin.dtype or _computes_as_stock()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rotate ``x`` by ``cos``/``sin`` (broadcastable to ``x``, halves repeated as in transformers), computed in
    the promoted dtype of x and cos and returned in ``dtype`` (by default that promoted dtype)."""
    dtype = torch.promote_types(x.dtype, cos.dtype) if dtype is None else dtype
    if _rotates_through_autograd(cos, sin):
        return _rotary_forward(x, cos, sin).to(dtype)
    return _Rotary.apply(cos, sin, dtype, x, None)[0]


def rotary_pair(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: Optional[torch.dtype] = None
) -> tuple:
    """``(rotary(q, cos, sin, dtype), rotary(k, cos, sin, dtype))`` in one op (on CUDA one kernel launch each way)."""
    if _rotates_through_autograd(cos, sin) or k.dtype != q.dtype:
        return rotary(q, cos, sin, dtype), rotary(k, cos, sin, dtype)
    dtype = torch.promote_types(q.dtype, cos.dtype) if dtype is None else dtype
    return _Rotary.apply(cos, sin, dtype, q, k)


# ----------------------------------------------------------------------------------------------
# Long context: sequence-tiled position-wise blocks, checkpoints offloaded to host memory
# ----------------------------------------------------------------------------------------------

# Attribute of a checkpointed layer's output that links it to the checkpoint of the layer that made it, so
# that the backward of the next layer can start fetching that checkpoint ahead of need.
_CHECKPOINT_LINK_ATTRIBUTE = "_mea_checkpoint_link"

_side_streams: dict = {}


def sequence_tile_size(config) -> int:
    """``config.sequence_tile_size``: tokens per tile of the sequence-tiled MLP and norms (0 or None: off)."""
    return _count_setting(config, "sequence_tile_size", "tokens per tile")


def _count_setting(config, name: str, unit: str) -> int:
    """A count setting of ``config`` (unset or None: 0); anything but a non-negative int is refused by name (also
    ``False``, ``0.0`` or ``""``, which read as 0 but would say nothing of a ``4.0`` refused)."""
    value = getattr(config, name, None)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{name} must be a non-negative int ({unit}), got {value!r}")
    return value


def offload_checkpoints(config) -> bool:
    """``config.offload_checkpoints``: checkpoint every decoder layer in training, its input kept in host memory."""
    return config_switch(config, "offload_checkpoints", False)


def config_switch(config, name: str, default: bool) -> bool:
    """A True/False setting of ``config`` (unset or None: ``default``); anything else is refused by name, since
    a string such as "false" would otherwise read as true."""
    value = getattr(config, name, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.{name} must be True, False or None, got {value!r}")
    return value


def keeps_checkpoint_on_device(config, layer_index: int, num_layers: Optional[int] = None) -> bool:
    """``config.checkpoints_on_device = N``: the last N layers (of ``num_layers``, by default
    ``config.num_hidden_layers``; an encoder-decoder passes each stack's own) keep their checkpoint on the device
    (their backward comes first, so they need no copy back; host memory then holds only the others')."""
    kept = _count_setting(config, "checkpoints_on_device", "layers")
    return layer_index >= (config.num_hidden_layers if num_layers is None else num_layers) - kept


class _ReplayState:
    """Autocast settings, RNG states, and the train/eval mode and weights of ``modules`` (and every module inside
    them) at the start of a forward, so a recompute in backward replays it exactly (same dropout masks, same
    autocast dtype), also after ``model.eval()`` between forward and backward (a teacher's or a validation call)
    and for a forward under ``torch.func.functional_call`` (EMA or fast weights)."""

    def __init__(self, device: torch.device, modules: tuple):
        self.device = device
        self.modes = _train_modes(modules)
        self.tensors = _module_tensors(modules)
        self.autocast = _autocast_enabled(device.type)
        self.autocast_dtype = torch.get_autocast_dtype(device.type) if self.autocast else None
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with torch.enable_grad(), torch.autocast(
                self.device.type, dtype=self.autocast_dtype, enabled=self.autocast
            ), _train_modes_restored(self.modes), _module_tensors_restored(self.tensors):
                yield


def _train_modes(modules) -> list:
    """``(module, module.training)`` for ``modules`` and every module inside them."""
    return [(module, module.training) for owner in modules for module in owner.modules()]


@contextmanager
def _train_modes_restored(modes: list):
    """The modules in the train/eval modes ``modes`` recorded (``_train_modes``), and back to their current ones
    after: a recompute in backward runs them as the forward did, also after ``model.eval()`` in between."""
    now = [module.training for module, _ in modes]
    for module, training in modes:
        module.training = training
    try:
        yield
    finally:
        for (module, _), training in zip(modes, now):
            module.training = training


def _module_tensors(modules) -> list:
    """``(slot, name, tensor)`` for every parameter and buffer of ``modules`` and the modules inside them (``slot``:
    the module's ``_parameters`` or ``_buffers``), as their forward reads them: under ``torch.func.functional_call``,
    the tensors it passed."""
    return [
        (slot, name, tensor)
        for owner in modules
        for module in owner.modules()
        for slot in (module._parameters, module._buffers)
        for name, tensor in slot.items()
        if tensor is not None
    ]


@contextmanager
def _module_tensors_restored(tensors: list):
    """The modules computing with the tensors ``tensors`` recorded (``_module_tensors``), and with their current
    ones after. A recompute in backward then uses the forward's weights also where the forward ran under
    ``torch.func.functional_call``, which has put the modules' own back by then (gradients went to the wrong
    tensors). Nothing is written where the tensors are the same (every other forward)."""
    swapped = [(slot, name, slot.get(name), tensor) for slot, name, tensor in tensors if slot.get(name) is not tensor]
    for slot, name, _, tensor in swapped:
        slot[name] = tensor
    try:
        yield
    finally:
        for slot, name, now, _ in swapped:
            slot[name] = now


def _owning_module(function) -> torch.nn.Module:
    """A module, or the module a bound method belongs to (``mlp.feed_forward``): whose parameters it uses."""
    return function if isinstance(function, torch.nn.Module) else function.__self__


def _run_modules(modules: tuple, x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def _tiles(rows: int, tile_size: int) -> list:
    return [slice(start, min(start + tile_size, rows)) for start in range(0, rows, tile_size)]


def _run_in_tiles(modules: tuple, x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """``modules`` over ``x`` ``[..., hidden]`` one tile of tokens at a time, written into one output tensor.
    Nothing here takes gradients; ``x`` is detached so that its tiles do not look like tensors that need them
    (a view taken without gradients of one that needs them says it does, with no autograd node behind it)."""
    flat = x.detach().flatten(0, -2)
    out = flat_out = None
    for rows in _tiles(flat.shape[0], tile_size):
        tile = _run_modules(modules, flat[rows])
        if out is None:  # the output's own shape, written through a flat view: a view returned would refuse edits
            out = tile.new_empty((*x.shape[:-1], *tile.shape[1:]))
            flat_out = out.view(flat.shape[0], *tile.shape[1:])
        flat_out[rows] = tile
    return out


@contextmanager
def _no_grad_past_autocasts_cache():
    """``torch.no_grad()`` for running a user's modules, with autocast's cache of cast weights off. torch 2.9 caches
    the low-precision copy of a trainable weight made without gradients too, for the rest of the autocast region:
    a later use of that weight with gradients (the backward's recompute, a second forward) would take the copy
    without its history, and the weight (a LoRA matrix) would get no gradient."""
    cache_enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_autocast_cache_enabled(cache_enabled)


class _SequenceTiled(torch.autograd.Function):
    """Position-wise ``modules`` over tiles of the sequence. Forward keeps only the input; backward recomputes one
    tile at a time and takes its gradients at once, so no tile's intermediates outlive it. The trainable
    parameters are inputs of the function, so their gradients flow through autograd like any other. ``owners``:
    the modules whose parameters ``modules`` use (``_owning_module``), whose train/eval mode the recompute replays."""

    @staticmethod
    def forward(
        ctx, modules: tuple, owners: tuple, tile_size: int, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.modules, ctx.owners, ctx.tile_size = modules, owners, tile_size
        ctx.state = _ReplayState(x.device, owners)
        ctx.save_for_backward(x, *params)
        _pass_unused_gradients_as_none(ctx)
        with _no_grad_past_autocasts_cache():
            return _run_in_tiles(modules, x, tile_size)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        _refuse_double_backward("config.sequence_tile_size")
        if grad_out is None:
            return _none_for_every_input(ctx)
        _refuse_gradient_hooks_added_since_forward("config.sequence_tile_size", ctx.owners)
        x, *params = ctx.saved_tensors
        wants_input = ctx.needs_input_grad[3]
        flat, grad_flat = x.flatten(0, -2), grad_out.flatten(0, -2)
        grad_x = torch.empty_like(flat) if wants_input else None
        sums = [None] * len(params)
        with ctx.state.replay():
            for rows in _tiles(flat.shape[0], ctx.tile_size):
                tile = flat[rows].detach().requires_grad_(wants_input)
                out = _run_modules(ctx.modules, _behind_a_node(tile))
                inputs = ([tile] if wants_input else []) + params
                grads = _gradients_or_none(out, inputs, grad_flat[rows])
                if wants_input:
                    grad = grads.pop(0)
                    grad_x[rows] = 0 if grad is None else grad
                sums = [_accumulate(total, grad) for total, grad in zip(sums, grads)]
        grad_params = [None if total is None else total.to(param.dtype) for total, param in zip(sums, params)]
        return (None, None, None, None if grad_x is None else grad_x.view_as(x), *grad_params)


def _gradients_or_none(output: torch.Tensor, inputs: list, grad_output: torch.Tensor) -> list:
    """``output``'s gradients for ``inputs``, None for those it does not depend on: all of them when it needs
    none (a module that ignores its input and has no trainable parameters, such as an ablated MLP)."""
    if not output.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(output, inputs, grad_output, allow_unused=True))


def _behind_a_node(tensor: torch.Tensor) -> torch.Tensor:
    """A recomputed input as the output of an autograd node (a view of itself) when it requires gradients:
    tools that watch a module input's gradient (``torch.utils.module_tracker``, run by ``FlopCounterMode``)
    cannot set their hook on a leaf while ``autograd.grad`` runs."""
    return tensor.view_as(tensor) if tensor.requires_grad else tensor


def _accumulate(total: Optional[torch.Tensor], grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum of per-tile parameter gradients, in float32 for half-precision parameters (float64 stays)."""
    if grad is None:
        return total
    return _at_least_float32(grad) if total is None else total.add_(grad)


def default_use_cache(module, use_cache: Optional[bool], past_key_values=None) -> bool:
    """``use_cache`` as given; unset, the config's, except in training with gradients and no cache passed, where
    it is False.

    A training forward's cache is a copy of every layer's keys and values that nothing reads. Stock builds it:
    its copies took 2.5 ms of GPU time in an 8-layer, 8k-token LLaMA step on an H200, and it holds them until
    the loss is computed. ``use_cache=True`` still returns one (stock BART turns it off when given labels), and so
    does a passed cache (training on a prompt's cache, as stock).
    """
    if use_cache is not None:
        return use_cache
    if module.training and torch.is_grad_enabled() and past_key_values is None:
        return False
    return bool(getattr(module.config, "use_cache", False))


# A norm output this large or larger is recomputed in backward when the config leaves it to us (see ``after_norm``).
_NORM_RECOMPUTE_MIN_BYTES = 16 * 2**20


def recompute_norm_outputs(config) -> Optional[bool]:
    """``config.recompute_norm_outputs``: True or False, or None (unset, the default) for ``after_norm`` to
    decide by the size of each norm output."""
    enabled = getattr(config, "recompute_norm_outputs", None)
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"config.recompute_norm_outputs must be True, False or None, got {enabled!r}")
    return enabled


def after_norm(
    norm, x: torch.Tensor, layer, tile_size: int = 0, position_wise: bool = False, recompute: Optional[bool] = None
):
    """``layer(norm(x))``, keeping less for backward in training.

    What ``layer`` keeps of the norm's output for backward (the input of its projections, PEFT's included) is
    not kept: backward runs the norm again on ``x``, which the norm keeps for its own backward anyway. That is
    one ``[tokens, hidden]`` tensor less per norm, for one more norm forward per norm in backward; gradients
    are unchanged (the same kernels run on the same input). It applies in eager training (not while compiling,
    where Inductor decides what to keep, and not under other saved-tensor hooks, such as non-reentrant gradient
    checkpointing's or activation offloading's). ``recompute`` (``config.recompute_norm_outputs``): True or
    False, or None to recompute a norm output of at least ``_NORM_RECOMPUTE_MIN_BYTES`` (16 MiB: 4,096 tokens
    at hidden size 2,048 in bf16). A smaller one is kept: it saves little memory, and a short step waits on
    the host, for which the recompute is one more norm call and a saved-tensor hook per saved tensor. With
    sequence tiles (``tile_size``, see ``sequence_tiled``) the norm runs in tiles instead, and so does ``layer``
    when it is ``position_wise`` (a module).
    """
    if _tiles_apply(x, tile_size):
        if position_wise:
            return sequence_tiled((norm, layer), x, tile_size)
        return layer(sequence_tiled((norm,), x, tile_size))
    return _layer_of_normed(norm, x, norm(x), layer, recompute)


def residual_after_norm(
    norm, x: torch.Tensor, layer, tile_size: int = 0, position_wise: bool = False,
    recompute: Optional[bool] = None, layer_adds: bool = False,
) -> torch.Tensor:
    """``x + after_norm(norm, x, layer, ...)``: a pre-norm block with its residual; with ``layer_adds``,
    ``layer(normed, x)`` for a block that adds the residual itself (BLOOM's, after dropout).

    In training, x is used twice (the norm and the residual), so autograd adds the two gradients of x with one
    kernel over x's size. Where the norm has a pass-through form (``with_residual``: LLaMA's and Qwen's RMSNorm,
    ``FusedLayerNorm``, as plain modules), the residual is taken from the norm's autograd node instead, and the
    norm's backward kernel adds the residual's gradient while it writes x's. Outputs are unchanged; x's
    gradient is the same sum, rounded once to x's dtype instead of twice.
    """
    if _tiles_apply(x, tile_size):
        if layer_adds:
            return layer(sequence_tiled((norm,), x, tile_size), x)
        return x + after_norm(norm, x, layer, tile_size, position_wise, recompute)
    normed, residual = _normed_and_residual(norm, x)
    if layer_adds:
        return _layer_of_normed(norm, x, normed, lambda value: layer(value, residual), recompute)
    return residual + _layer_of_normed(norm, x, normed, layer, recompute)


def _normed_and_residual(norm, x: torch.Tensor) -> tuple:
    """``(norm(x), x)``, through the norm's ``with_residual`` where it has one and runs as written: its own class
    defines it next to its forward (a subclass that changes the forward does not pass through), and no hook or
    instance attribute changes the forward."""
    members = vars(type(norm))
    if (
        "with_residual" in members
        and "forward" in members
        and torch.is_grad_enabled()
        and x.requires_grad
        and _is_plain_module(norm, type(norm))
    ):
        return norm.with_residual(x)
    return norm(x), x


def _layer_of_normed(norm, x: torch.Tensor, normed: torch.Tensor, layer, recompute: Optional[bool]):
    """``layer(normed)`` for ``normed = norm(x)``, the norm's output recomputed in backward (see ``after_norm``).
    A hooked norm is not run again: its hooks would see a second call."""
    if not (
        _norm_output_can_be_recomputed(normed)
        and _recompute_wanted(normed, recompute)
        and _runs_again_alike(norm)
    ):
        return layer(normed)
    recipe = _NormOutputRecipe(norm, x)
    with torch.autograd.graph.saved_tensors_hooks(recipe.pack_for(normed), recipe.unpack):
        return layer(normed)


def _runs_again_alike(norm) -> bool:
    """Whether a second call of ``norm`` computes what the first did and changes nothing: torch's LayerNorm or
    RMSNorm, or a norm class of ours (its own ``recomputes_exactly``), called as written. A norm replaced by
    something else (with dropout, a batch norm's running statistics, a subclass) is not run again."""
    cls = type(norm)
    known = cls in (torch.nn.LayerNorm, torch.nn.RMSNorm) or cls.__dict__.get("recomputes_exactly")
    return bool(known) and _is_plain_module(norm, cls)


def _recompute_wanted(normed: torch.Tensor, recompute: Optional[bool]) -> bool:
    """``recompute``, or where it is None whether ``normed`` takes at least ``_NORM_RECOMPUTE_MIN_BYTES``. Asked
    after ``_norm_output_can_be_recomputed``, which is False while compiling: the size test would otherwise
    guard a graph on the sequence length."""
    if recompute is None:
        return normed.numel() * normed.element_size() >= _NORM_RECOMPUTE_MIN_BYTES
    return recompute


def _norm_output_can_be_recomputed(normed: torch.Tensor) -> bool:
    """Where the norm recorded a graph: without one (its input and weights need no gradient) nothing else keeps
    its input, so a recipe would keep as much as the output does, and the output's values are final (a weight
    changed before backward changes nothing, as in stock)."""
    if not torch.is_grad_enabled() or _is_tracing() or type(normed) is not torch.Tensor or normed.grad_fn is None:
        return False
    if not normed.is_contiguous() or normed.storage_offset() != 0:
        return False
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if top_hooks is None or hooks_enabled is None or not hooks_enabled():  # the caller's disable_saved_tensors_hooks
        return False
    try:
        return top_hooks(False) is None  # nobody else's saved-tensor hooks (ours would hide theirs)
    except TypeError:
        return False


class _SavedWithVersion:
    """A tensor saved through our hooks, detached, with its version at saving. Autograd checks the version of the
    tensors it saves itself but not of those that hooks return: a weight changed in place between forward and
    backward (an optimizer step, an EMA update) would give gradients at the new values where stock raises."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor.detach(), tensor._version  # detach() shares the version counter

    def unchanged(self) -> torch.Tensor:
        return _unchanged_since_saved(self.tensor, self.version)


def _unchanged_since_saved(tensor: torch.Tensor, version: int) -> torch.Tensor:
    """``tensor``, at the ``version`` it had when backward's need for it was recorded, or autograd's error."""
    if tensor._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{tensor.type()} {list(tensor.shape)}] is at version {tensor._version}; expected version {version} "
            "instead (a tensor that backward needs where a norm's output is recomputed)"
        )
    return tensor


# autograd nodes of views that keep a contiguous tensor's element order (what ``_NormOutputRecipe`` may follow)
_RESHAPE_NODES = frozenset(
    ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0", "SqueezeBackward0",
     "SqueezeBackward1", "UnsqueezeBackward0")
)


class _NormOutputRecipe:
    """Saved for backward in place of a norm's output, its views and its copies in another dtype (autocast's half
    precision copy, which the projections keep when their weights are float32): the norm, its input, its
    train/eval mode and weights and the forward's autocast state. The first unpack of each dtype runs the norm
    again; the result lives while a saved slot refers to it. A weight or bias changed in place since (an optimizer
    step before backward) raises autograd's error, as the norm's output it stands for would have in stock."""

    def __init__(self, norm, x: torch.Tensor):
        self.norm, self.x, self.modes, self.tensors = norm, x, _train_modes((norm,)), _module_tensors((norm,))
        self.versions = [tensor._version for _, _, tensor in self.tensors]
        self.autocast_dtype = _autocast_dtype(x.device.type)
        self.values: dict = {}

    def pack_for(self, normed: torch.Tensor):
        """The pack hook: the norm's output, its views and its dtype copies as the recipe, any other tensor
        detached with its version (``_SavedWithVersion``). Kept as it was, a tensor that its own node saves (SDPA's
        output) would hold that node through its ``grad_fn``, a cycle through C++ that Python's collector cannot
        break: a forward dropped without backward leaked."""
        key = (normed.untyped_storage().data_ptr(), normed.device, normed.dtype, normed._version)
        normed_dtype, numel, device = normed.dtype, normed.numel(), normed.device
        normed_edge, copy_dtype = (normed.grad_fn, normed.output_nr), self.autocast_dtype

        def is_autocast_copy(tensor: torch.Tensor) -> bool:
            """``tensor`` holds ``normed.to(dtype)`` in its order, reshaped: under autocast, a copy in autocast's
            dtype made from ``normed`` (that output of its node: BLOOM's norm also hands on its residual) by one
            dtype copy and reshapes only (``x.view(-1, d)`` before ``addmm``, a matmul's folding), unchanged since."""
            if copy_dtype is None or tensor.dtype != copy_dtype or normed_edge[0] is None or tensor._version != 0:
                return False
            if tensor.numel() != numel or tensor.device != device or not tensor.is_contiguous():
                return False
            edge, copies = (tensor.grad_fn, 0), 0
            while type(edge[0]).__name__ in _RESHAPE_NODES or type(edge[0]).__name__ == "ToCopyBackward0":
                copies += type(edge[0]).__name__ == "ToCopyBackward0"
                edge = edge[0].next_functions[0]
            return edge[0] is normed_edge[0] and edge[1] == normed_edge[1] and copies == 1

        def pack(tensor: torch.Tensor):
            # a wrapper subclass (optimum-quanto's weights) has no storage to compare
            plain = type(tensor) in _PLAIN_TENSOR_TYPES and tensor.layout == torch.strided and not tensor.is_nested
            if plain and (tensor.untyped_storage().data_ptr(), tensor.device, tensor.dtype, tensor._version) == key:
                return (self, normed_dtype, tensor.shape, tensor.stride(), tensor.storage_offset())
            if plain and tensor.storage_offset() == 0 and is_autocast_copy(tensor):
                return (self, tensor.dtype, tensor.shape, tensor.stride(), 0)
            return _SavedWithVersion(tensor)

        return pack

    def unpack(self, saved):
        if isinstance(saved, _SavedWithVersion):
            return saved.unchanged()
        _, dtype, size, stride, offset = saved
        return self.recomputed(dtype).as_strided(size, stride, offset)

    def recomputed(self, dtype: torch.dtype) -> torch.Tensor:
        """The norm's output, in ``dtype`` (cast as autocast casts it)."""
        if dtype not in self.values:
            for (_, _, tensor), version in zip(self.tensors, self.versions):
                _unchanged_since_saved(tensor, version)
            autocast_dtype = self.autocast_dtype
            with torch.autocast(
                self.x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ), _train_modes_restored(self.modes), _module_tensors_restored(self.tensors):
                normed = type(self.norm).forward(self.norm, self.x)  # as in forward: without hooks added since
            self.values[dtype] = normed.to(dtype)
        return self.values[dtype]


def _tiles_apply(x: torch.Tensor, tile_size: int) -> bool:
    return tile_size > 0 and x.numel() // max(x.shape[-1], 1) > tile_size and not _computes_as_stock()


def _weights_outside_parameters(modules) -> bool:
    """Whether a module in ``modules`` (or inside one) computes with a tensor made from a parameter they do not
    hold: FSDP1's views of a flat parameter held by an outer wrapper (``use_orig_params=False``; with ``True``
    the views are registered), or a weight a hook computes from another module's parameter (pruning's and weight
    norm's come from parameters of their own module; only tensors named as weights and biases count, not an
    activation a hook keeps on its module). The tiles' and offloaded checkpoints' backward takes
    gradients for their inputs only, and would give those parameters none: such modules run as usual instead
    (logged once). Not while compiling: torch.compile takes FSDP1 with ``use_orig_params=True`` only (and torch
    2.11's dynamo cannot walk ``vars()`` of a module; another thread's compile, which torch flags for the whole
    process, does not count)."""
    if torch.compiler.is_compiling() and _traced_in_this_thread():
        return False
    registered = {id(param) for module in modules for param in module.parameters()}
    for module in modules:
        for inner in module.modules():
            if _weight_made_at_each_call(inner):
                return True
            for name, value in vars(inner).items():
                if not isinstance(value, torch.Tensor) or not value.requires_grad or id(value) in registered:
                    continue
                if isinstance(value._base, torch.nn.Parameter):
                    if id(value._base) not in registered:
                        return True
                elif name.endswith(("weight", "bias")) and not registered.issuperset(map(id, _leaf_tensors(value))):
                    return True
    return False


_MODULES_HOLDING_A_WEIGHT = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)


def _weight_made_at_each_call(module: torch.nn.Module) -> bool:
    """A module of a kind that holds its weight (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, GPT-2's
    ``Conv1D``) holding none, neither registered nor set, nor parametrized: a forward pre-hook must set it at each
    call, from a parameter held elsewhere (before the first call nothing shows where from)."""
    if not isinstance(module, _MODULES_HOLDING_A_WEIGHT) and type(module).__name__ != "Conv1D":
        return False
    if "weight" in module._parameters or isinstance(vars(module).get("weight"), torch.Tensor):
        return False
    return not torch.nn.utils.parametrize.is_parametrized(module, "weight")


def _leaf_tensors(tensor: torch.Tensor) -> list:
    """The leaf tensors (parameters) ``tensor``'s autograd graph reaches."""
    leaves, seen, pending = [], set(), [tensor.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad
        if leaf is not None:
            leaves.append(leaf)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _parameters_with_gradient_hooks(*modules: torch.nn.Module) -> bool:
    """Whether a trainable parameter in ``modules`` has tensor hooks (``param.register_hook``). The tiles' and
    offloaded checkpoints' backward takes the parameters' gradients in a recompute and hands them on to autograd,
    which would run such hooks twice (once per tile, and again on the sum), where stock runs them once."""
    return any(param.requires_grad and param._backward_hooks for module in modules for param in module.parameters())


# Dynamo's trace reads ``_backward_hooks`` as empty: the check runs at trace time instead, on the modules themselves
# (one positional argument each: a list of them is an argument dynamo cannot hand over).
_parameters_with_gradient_hooks._dynamo_marked_constant = True

# torch 2.11's dynamo cannot hand a decoder layer (a module it does not specialize) to such a trace-time function:
# the compile failed. There a compiled step does not see parameter hooks (README).
_HOOKS_SEEN_WHILE_COMPILING = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13)


def _refuse_gradient_hooks_added_since_forward(what: str, modules: tuple) -> None:
    """A forward that ran ``modules`` in tiles or an offloaded checkpoint saw no gradient hooks on their parameters
    (``_runs_without_saving``); one registered since would run on every recompute's gradient and again on
    their sum, where stock runs it once."""
    if _parameters_with_gradient_hooks(*modules):
        raise RuntimeError(
            f"{what}: a gradient hook (Tensor.register_hook) was registered on a parameter after the forward that "
            "ran it; its backward would run the hook more than once. Register it before the forward (those modules "
            "then run as usual) or use register_post_accumulate_grad_hook"
        )


def _gradient_hooks_seen(modules) -> bool:
    if torch.compiler.is_compiling() and not _HOOKS_SEEN_WHILE_COMPILING:
        return False
    return _parameters_with_gradient_hooks(*modules)


def _runs_without_saving(what: str, modules) -> bool:
    """While gradients are recorded, whether ``modules`` must run as usual, logged once with ``what`` is off:
    ``_weights_outside_parameters`` or ``_parameters_with_gradient_hooks``."""
    if not torch.is_grad_enabled():
        return False
    if _weights_outside_parameters(modules):
        _log_once(
            f"{what} is off for modules whose weights are made from a parameter they do not hold (FSDP1 with "
            "use_orig_params=False, or a hook computing a weight from another module's parameter): they run as "
            "usual; FSDP2 (fully_shard) or FSDP1's use_orig_params=True keep it on"
        )
        return True
    if _gradient_hooks_seen(modules):
        _log_once(
            f"{what} is off for modules with a parameter that has gradient hooks (Tensor.register_hook), which its "
            "recompute would run more than once: they run as usual (register_post_accumulate_grad_hook keeps it on)"
        )
        return True
    if _module_backward_hooks(modules):
        _log_once(
            f"{what} is off for modules with backward hooks (register_full_backward_hook and its pre-hook), which "
            "would see each tile's or recompute's gradients instead of the whole output's: they run as usual"
        )
        return True
    return False


def _module_backward_hooks(modules) -> bool:
    """Whether a module in ``modules`` (or inside one) has backward hooks, or hooks for every module's backward are
    registered."""
    if _global_module_hooks(_GLOBAL_BACKWARD_HOOKS):
        return True
    return any(inner._backward_hooks or inner._backward_pre_hooks for module in modules for inner in module.modules())


def _say_hooks_see_no_gradients(what: str, modules) -> None:
    """Forward hooks inside ``modules`` (PEFT's aside) see outputs computed without gradients, computed again in
    backward (as under reentrant checkpointing): a loss term made from what such a hook catches gets no gradient
    from it, which is said once."""
    hooks = (hook for owner in modules for module in owner.modules()
             for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()))  # fmt: skip
    if any(not _is_peft_hook(hook) for hook in hooks):
        _log_once(
            f"{what}: forward hooks on the modules it runs see their outputs without gradients (computed again in "
            f"backward, as under reentrant checkpointing), so a loss term made from what a hook catches gets no "
            f"gradient; set {what} off for such a term"
        )


def sequence_tiled(modules, x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """``modules`` (position-wise: an MLP, a norm, or a norm then an MLP; modules or bound methods of modules)
    applied one after the other to ``x`` ``[..., hidden]``, ``tile_size`` tokens at a time, so that no
    ``[tokens, intermediate]`` tensor is ever whole, in forward or backward. Works with any implementation inside
    the modules (PEFT LoRA layers included): it only calls them. Dropout inside draws one mask per tile (the
    recompute replays it). ``tile_size`` 0, or no more tokens than that, runs the modules as usual."""
    modules = tuple(modules)
    if not _tiles_apply(x, tile_size):
        return _run_modules(modules, x)
    return _run_tiled(modules, x, tile_size)


@torch.compiler.disable
def _run_tiled(modules: tuple, x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """``sequence_tiled`` where tiles apply. Under ``torch.compile`` it runs between graphs (the tiles' RNG replay
    cannot be traced), as one call: traced, Dynamo compiled it again for every module it tiles."""
    owners = tuple({id(owner): owner for owner in map(_owning_module, modules)}.values())
    if _must_be_called_once(*owners):
        _log_once(
            "config.sequence_tile_size is off for modules with a parametrized weight or that quantize by statistics "
            "of their whole input, which a call per tile would change: they run as usual"
        )
        return _run_modules(modules, x)
    if _forward_hooks_run_per_tile(modules):
        _log_once(
            "config.sequence_tile_size is off for modules with forward hooks of your own or PEFT's, which would see "
            "each tile's tokens (flattened) instead of the whole output: they run as usual"
        )
        return _run_modules(modules, x)
    if _runs_without_saving("config.sequence_tile_size", owners):
        return _run_modules(modules, x)
    params = [param for module in owners for param in module.parameters() if param.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return _run_in_tiles(modules, x, tile_size)
    return _SequenceTiled.apply(modules, owners, tile_size, x, *params)


def _forward_hooks_run_per_tile(modules) -> bool:
    """Whether a module that a tile's call runs has a forward hook or pre-hook of the user's or of PEFT (which
    carries per-row state): a module of ``modules`` and those inside it (a bound method runs its owner's forward
    without the owner's hooks, those inside with theirs). The known packages' other hooks act per token (tensor
    parallelism, pruning, ZeRO-3's gathering) and keep the tiles, as do hooks for every module
    (``FlopCounterMode``'s): they see every module as a tool does."""
    called = (
        module
        for function in modules
        for module in (
            function.modules() if isinstance(function, torch.nn.Module)
            else (inner for child in _owning_module(function).children() for inner in child.modules())
        )
    )
    return any(
        _is_peft_hook(hook) or not _known_here(_hook_defined_in(hook))
        for module in called
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    )


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per CUDA device for checkpoint transfers (created once; it changes no result)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams.setdefault(index, torch.cuda.Stream(device=index))
    return _side_streams[index]


class _HostCopy:
    """A layer input kept in pinned host memory. On CUDA the copy out (forward) and the copy back (backward)
    run on a side stream, so they overlap compute; ``prefetch`` starts the copy back ahead of need. On other
    devices it is a plain copy, which keeps the path exact and testable on a CPU. ``keep_on_device``: no copy,
    the tensor itself is held."""

    def __init__(self, tensor: torch.Tensor, keep_on_device: bool = False):
        tensor = tensor.detach()
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self._on_device, self._ready, self.host = None, None, None
        self._fetched = False
        if keep_on_device or self.device.type != "cuda":
            if keep_on_device:
                self._on_device = tensor
            else:
                self.host = tensor.to("cpu", copy=True)
            return
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.host = torch.empty(self.shape, dtype=self.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the allocator must not reuse its memory before the copy is done

    def prefetch(self) -> None:
        if self.device.type != "cuda" or self._on_device is not None or self._fetched:
            return
        stream = _side_stream(self.device)
        on_device = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            on_device.copy_(self.host, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(stream)
        on_device.record_stream(stream)
        self._on_device = on_device

    def fetch(self) -> torch.Tensor:
        """The tensor back on its device (ready for the current stream); the host copy is released."""
        if self._fetched:
            raise RuntimeError(
                "config.offload_checkpoints: backward ran twice through one forward (retain_graph=True, or two losses "
                "of one forward backpropagated one after the other), and a layer's offloaded input is released by its "
                "first backward: sum the losses and call backward once, or turn the option off for such steps"
            )
        if self._on_device is None and self.device.type != "cuda":
            tensor = self.host.to(self.device, copy=True)
        else:
            self.prefetch()
            if self._ready is not None:
                torch.cuda.current_stream(self.device).wait_event(self._ready)
            tensor = self._on_device
        self.host = self._on_device = None
        self._fetched = True
        return tensor


class _CheckpointLink:
    """One layer's offloaded input and the link to the previous layer's, whose backward comes next."""

    def __init__(self, previous: Optional["_CheckpointLink"], keep_on_device: bool):
        self.previous, self.keep_on_device, self.copy = previous, keep_on_device, None


def _with_context(rest: tuple, slots: tuple, context) -> tuple:
    """``rest`` with the tensors at positions ``slots`` (left empty in it) put back."""
    rest = list(rest)
    for slot, tensor in zip(slots, context):
        rest[slot] = tensor
    return tuple(rest)


class _OffloadedCheckpoint(torch.autograd.Function):
    """A decoder layer run without keeping anything but its input, which goes to host memory. Backward fetches
    it, starts fetching the previous layer's, recomputes the layer and takes its gradients.

    ``inputs`` are the layer's trainable parameters, then the context: positional arguments that need gradients
    (a decoder's encoder states, at positions ``slots`` of ``rest``). The context stays on the device: it is one
    tensor shared by every layer, not a per-layer activation."""

    @staticmethod
    def forward(ctx, function: Callable, layer, rest: tuple, slots: tuple, link: _CheckpointLink, hidden, *inputs):
        ctx.function, ctx.layer, ctx.rest, ctx.slots, ctx.link = function, layer, rest, slots, link
        ctx.state = _ReplayState(hidden.device, (layer,))
        link.copy = _HostCopy(hidden, link.keep_on_device)  # first, so that the copy overlaps this layer's compute
        with _no_grad_past_autocasts_cache():
            output = function(hidden, *_with_context(rest, slots, inputs[len(inputs) - len(slots) :]))
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"offloaded checkpoints need a layer that returns one tensor, got {type(output).__name__}")
        ctx.save_for_backward(*inputs)
        _pass_unused_gradients_as_none(ctx)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        _refuse_double_backward("config.offload_checkpoints")
        if grad_output is None:
            return _none_for_every_input(ctx)
        _refuse_gradient_hooks_added_since_forward("config.offload_checkpoints", (ctx.layer,))
        inputs = list(ctx.saved_tensors)
        hidden = ctx.link.copy.fetch()
        if ctx.link.previous is not None:
            ctx.link.previous.copy.prefetch()
        wants = ctx.needs_input_grad[5:]
        first_context = len(inputs) - len(ctx.slots)
        context_wants = wants[1 + first_context :]
        inputs[first_context:] = [
            tensor.detach().requires_grad_(wanted) for tensor, wanted in zip(inputs[first_context:], context_wants)
        ]
        hidden = hidden.requires_grad_(wants[0])
        with ctx.state.replay():
            context = [_behind_a_node(tensor) for tensor in inputs[first_context:]]
            output = ctx.function(_behind_a_node(hidden), *_with_context(ctx.rest, ctx.slots, context))
        differentiable = [tensor for tensor, wanted in zip([hidden, *inputs], wants) if wanted]
        grads = iter(torch.autograd.grad(output, differentiable, grad_output, allow_unused=True))
        return (None, None, None, None, None, *(next(grads) if wanted else None for wanted in wants))


def _nested_tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _nested_tensors(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _nested_tensors(item)]
    return []


def offloaded_checkpoint(
    layer: torch.nn.Module, function: Callable, hidden: torch.Tensor, *rest, keep_on_device: bool = False
) -> torch.Tensor:
    """``function(hidden, *rest)`` (a decoder layer's forward) checkpointed with only ``hidden`` kept, in host
    memory (on the device with ``keep_on_device``). Gradients flow to ``hidden``, to ``layer``'s trainable
    parameters (PEFT LoRA included) and to tensors in ``rest`` itself (a decoder's encoder states, kept on the
    device); the other arguments (positions, masks, nested in ``rest`` or bound in ``function``) must not need
    gradients. A call that records attention weights runs as usual (its weights carry gradients only from the
    layer's own graph). Under ``torch.compile`` it runs between graphs, as one call (traced, Dynamo compiled it
    again for every layer), and the layer with it; ``torch.export`` traces the layer as stock."""
    if _computes_as_stock():
        return function(hidden, *rest)
    return _offloaded_checkpoint(layer, function, hidden, *rest, keep_on_device=keep_on_device)


@torch.compiler.disable
def _offloaded_checkpoint(
    layer: torch.nn.Module, function: Callable, hidden: torch.Tensor, *rest, keep_on_device: bool = False
) -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("offloaded checkpoints need the hidden states as the first positional argument")
    bound = getattr(function, "keywords", None) or {}
    if torch.is_grad_enabled() and any(name.endswith("attention_weights") and value is not None
                                       for name, value in bound.items()):  # fmt: skip
        _log_once(
            "config.offload_checkpoints is off for a training forward asked for attention weights "
            "(output_attentions): they carry gradients only from the layer's own graph, so its layers run as usual "
            "(checkpointed as gradient_checkpointing_enable() set, where it was called)"
        )
        if layer.__dict__.get("_checkpointing_enabled", False):
            return layer.enabled_checkpointing_function()(function, hidden, *rest)
        return function(hidden, *rest)
    slots = tuple(i for i, arg in enumerate(rest) if isinstance(arg, torch.Tensor) and arg.requires_grad)
    nested = [arg for i, arg in enumerate(rest) if i not in slots]
    if any(tensor.requires_grad for tensor in _nested_tensors((nested, bound))):
        raise ValueError(
            "offloaded checkpoints carry gradients only to the hidden states, the layer's parameters and tensors "
            "passed positionally"
        )
    params = [param for param in layer.parameters() if param.requires_grad]
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params or slots):
        return function(hidden, *rest)
    if _runs_without_saving("config.offload_checkpoints", [layer]):
        return function(hidden, *rest)
    _say_hooks_see_no_gradients("config.offload_checkpoints", [layer])
    link = _CheckpointLink(getattr(hidden, _CHECKPOINT_LINK_ATTRIBUTE, None), keep_on_device)
    context = [rest[slot] for slot in slots]
    rest = tuple(None if i in slots else arg for i, arg in enumerate(rest))
    extras: list = []
    output = _OffloadedCheckpoint.apply(
        _hidden_states_of(function, extras), layer, rest, slots, link, hidden, *params, *context
    )
    setattr(output, _CHECKPOINT_LINK_ATTRIBUTE, link)
    return (output, *extras[0]) if extras else output


def _hidden_states_of(function: Callable, extras: list) -> Callable:
    """``function`` returning only its hidden states, for a layer that returns ``(hidden states, *rest)`` as
    stock BLOOM's does: the rest of its first call (the forward's, without gradients: attention weights or
    None) goes to ``extras``."""

    def hidden_states_only(*args):
        output = function(*args)
        if not isinstance(output, tuple):
            return output
        if not extras:
            extras.append(output[1:])
        return output[0]

    return hidden_states_only


class _PassThroughFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _recomputed_on_the_forwards_path(checkpoint_function: Callable, function: Callable, *args, **kwargs):
    """``checkpoint_function(function, *args, **kwargs)``. Under a user's TorchFunctionMode a layer computes as
    stock does (``_under_users_function_mode``); backward recomputes it where the mode may be gone (a mode around
    the forward only), and the fused path would save other tensors than the forward did (a CheckpointError).
    Such a layer is recomputed under a pass-through mode: on stock's path again."""
    if not _under_users_function_mode():
        return checkpoint_function(function, *args, **kwargs)

    def under_a_mode(*inner_args, **inner_kwargs):
        with _PassThroughFunctionMode():
            return function(*inner_args, **inner_kwargs)

    return checkpoint_function(under_a_mode, *args, **kwargs)


class LongContextCheckpointing:
    """Mixin for decoder layers (before ``GradientCheckpointingLayer`` in the bases; the layer has ``config``
    and ``layer_idx``, and ``num_stack_layers`` where its stack is not ``config.num_hidden_layers`` deep).

    With ``config.offload_checkpoints`` the layer is checkpointed in training whether or not
    ``gradient_checkpointing_enable`` was called, through ``offloaded_checkpoint`` instead of the function that
    call set (``config.checkpoints_on_device`` keeps the last layers' on the device). Read at every forward."""

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.__dict__.get("_checkpointing_enabled", False)) or offload_checkpoints(self.config)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.__dict__["_checkpointing_enabled"] = enabled

    @property
    def _gradient_checkpointing_func(self) -> Callable:
        if offload_checkpoints(self.config):
            keep = keeps_checkpoint_on_device(self.config, self.layer_idx, getattr(self, "num_stack_layers", None))
            return partial(offloaded_checkpoint, self, keep_on_device=keep)
        return self.enabled_checkpointing_function()

    def enabled_checkpointing_function(self) -> Callable:
        """The checkpointing ``gradient_checkpointing_enable`` set (non-reentrant where it set none), recomputing
        on the path its forward took (``_recomputed_on_the_forwards_path``)."""
        function = self.__dict__.get("_checkpointing_function")
        function = partial(checkpoint, use_reentrant=False) if function is None else function
        return partial(_recomputed_on_the_forwards_path, function)

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, function: Callable) -> None:
        self.__dict__["_checkpointing_function"] = function

    @_gradient_checkpointing_func.deleter
    def _gradient_checkpointing_func(self) -> None:
        self.__dict__.pop("_checkpointing_function", None)
# <<< kernel layer <<<


logger = get_logger(__name__)

HistoryType = list[tuple[str, str]]

# Attributes of the Cache object that carry the NTK alphas chosen at prefill to the decode steps, and what
# tells per-sample alphas' rows apart (``_alphas_of_cached_rows``).
_NTK_ALPHAS_ATTRIBUTE = "qwen_ntk_alphas"
_NTK_ROWS_ATTRIBUTE = "qwen_ntk_rows"

_DEFAULT_SEQ_LENGTH = 2048

_UNSUPPORTED_OPTIONS = {
    "use_cache_quantization": "the 8-bit KV-cache quantization of the original Qwen code",
    "use_cache_kernel": "the original Qwen code's CUDA kernels for the quantized KV cache",
}


# ----------------------------------------------------------------------------------------------
# Configuration helpers
# ----------------------------------------------------------------------------------------------


def _seq_length(config: QWenConfig) -> int:
    """The training length that dynamic NTK and logn scaling compare against (``seq_length`` in config.json)."""
    return getattr(config, "seq_length", None) or _DEFAULT_SEQ_LENGTH


def _check_no_unsupported_option(config: QWenConfig) -> None:
    """At build and at every forward: an option set on the config after loading would otherwise be ignored."""
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if getattr(config, option, False):
            raise ValueError(
                f"{option}=True is not supported: this modeling file does not implement {what}. "
                f"Load the model with {option}=False."
            )


def _check_supported(config: QWenConfig) -> None:
    _check_no_unsupported_option(config)
    if config.use_logn_attn and _seq_length(config) <= 1:
        raise ValueError(
            f"use_logn_attn=True scales queries by log(position) / log(seq_length): seq_length={_seq_length(config)} "
            "gives no such scale (the original divides by zero); set seq_length to the training length"
        )
    if not 0 <= config.rotary_pct <= 1:
        raise ValueError(
            f"rotary_pct={config.rotary_pct} is not a fraction of the head's kv_channels: the rotated channels are "
            "the first kv_channels * rotary_pct of each head; give a value from 0 to 1"
        )
    rotary_dim = int(config.kv_channels * config.rotary_pct)
    if 2 * math.ceil(rotary_dim / 2) > config.kv_channels:
        raise ValueError(
            f"kv_channels * rotary_pct = {config.kv_channels} * {config.rotary_pct} gives {rotary_dim} rotary channels, "
            f"rotated in pairs: {2 * math.ceil(rotary_dim / 2)} channels, more than a head's {config.kv_channels} (the "
            "original fails there too); lower rotary_pct or use an even kv_channels"
        )
    if rotary_dim == 2:
        raise ValueError(
            f"kv_channels * rotary_pct = {config.kv_channels} * {config.rotary_pct} gives 2 rotary channels, which "
            "Qwen's rotary base (base * alpha^(dim / (dim - 2)), as in the original) cannot take; rotate more channels"
        )
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"kv_channels * num_attention_heads = {config.kv_channels} * {config.num_attention_heads} must be "
            f"hidden_size ({config.hidden_size}): the original splits c_attn's output into query, key and value of "
            "hidden_size each (it fails there otherwise)"
        )


PRECISION_FLAGS = ("bf16", "fp16", "fp32")


def resolve_precision(config: QWenConfig) -> torch.dtype:
    """The original's load-time precision choice; records it in ``config`` (its flags and ``dtype``) and returns
    the dtype to use.

    With none of ``bf16``/``fp16``/``fp32`` set: bf16 where CUDA supports it, else fp16 on CUDA devices of
    compute capability 7 or newer, else fp32 (always fp32 on CPU).
    """
    flags = [bool(getattr(config, name, False)) for name in PRECISION_FLAGS]
    if sum(flags) > 1:
        chosen = [name for name, flag in zip(PRECISION_FLAGS, flags) if flag]
        ways = " or ".join(
            ", ".join(f"{name}={name == wanted}" for name in chosen) for wanted in chosen
        )
        raise ValueError(
            f'Only one of "bf16", "fp16", "fp32" can be true; {" and ".join(chosen)} are. A checkpoint saved by '
            "save_pretrained keeps the precision chosen when it was loaded: pass the one you want as True and the "
            f"others as False ({ways})"
        )
    if sum(flags) == 0:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            config.bf16 = True
        elif torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 7:
            config.fp16 = True
        else:
            config.fp32 = True
        if not config.fp32:
            logger.warning(
                f"QWen: converting the model to {'bf16' if config.bf16 else 'fp16'} for faster inference; pass "
                "bf16/fp16/fp32=True to from_pretrained to choose the precision yourself."
            )
    dtype = torch.float32
    if getattr(config, "bf16", False):
        dtype = torch.bfloat16
    elif getattr(config, "fp16", False):
        dtype = torch.float16
    config.dtype = dtype  # what the model runs in, as transformers records a loaded model's dtype
    return dtype


def _log_precision_over_requested_dtype(dtype: torch.dtype) -> None:
    """A ``dtype`` given to ``from_pretrained`` (or a default dtype) does not choose Qwen's precision: the flags
    do, as in the original. Say so when the two disagree, rather than convert without a word."""
    requested = torch.get_default_dtype()
    if requested != torch.float32 and requested != dtype:
        logger.warning_once(
            f"QWen: the model runs in {dtype} as its bf16/fp16/fp32 flags (or this machine) decide, not in "
            f"{requested}, the dtype it was created in (a dtype= given to from_pretrained or from_config, "
            "config.json's under transformers' default dtype='auto', or torch's default dtype); pass bf16=True, "
            "fp16=True or fp32=True to choose"
        )


# ----------------------------------------------------------------------------------------------
# Positions: rotary embedding with dynamic NTK, logn attention scaling
# ----------------------------------------------------------------------------------------------


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha for a sequence of ``length`` tokens: 2^ceil(log2(length / seq_length) + 1) - 1, at least 1."""
    context_value = math.log(max(length, 1) / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


# How many of the positions the model wrote first tell a cache's rows apart (``_position_signatures``).
_SIGNATURE_POSITIONS = 8


def _position_signatures(cache: Cache, positions: int) -> Optional[torch.Tensor]:
    """``[rows, n]`` (int64): the first layer's key at each of the first ``n`` (up to ``positions``) cached
    positions, summed exactly over its bits (so equal keys give equal sums, whatever the summation order). Keys are
    stored rotated, so prompt rows with other NTK alphas differ from the first position the model wrote on (past 0),
    whatever their tokens; a key moves with its row whatever reorders, selects or repeats the rows. None where the
    cache holds no such keys (none yet, or a quantized cache's older keys)."""
    keys = getattr(cache.layers[0], "keys", None) if getattr(cache, "layers", None) else None
    if keys is None or keys.dim() != 4 or keys.shape[2] == 0 or cache.get_seq_length() != keys.shape[2]:
        return None
    if keys.element_size() < 2:
        return None
    leading = keys[:, :, :positions].contiguous()
    return leading.view(torch.int16).sum(dim=(1, 3), dtype=torch.int64)


def _prompt_rows(current: torch.Tensor, prompt: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """For each cached row (``current``: its ``_position_signatures``), a prompt row (``prompt``'s) whose keys it
    still holds over the longest run of leading positions (crop and tokens fed since change only later ones), and
    whose alpha every such prompt row shares; asserted on the device (no host sync), as positions are."""
    shown = min(current.shape[1], prompt.shape[1])
    same = current[:, None, :shown] == prompt[None, :, :shown]
    shared = same.to(torch.int32).cumprod(dim=-1).sum(dim=-1)
    longest = shared.max(dim=1, keepdim=True).values
    candidates = (shared == longest) & (longest > 0)
    highest = torch.where(candidates, alphas[None, :], -torch.inf).amax(dim=1)
    lowest = torch.where(candidates, alphas[None, :], torch.inf).amin(dim=1)
    torch._assert_async(
        (highest == lowest).all(),
        "the cache's rows no longer tell which prompt row each one decodes (cropped to keys that prompts with "
        "different dynamic-NTK alphas share, or replaced): decode from a fresh prefill",
    )
    return candidates.to(torch.int32).argmax(dim=1)


def _alphas_of_cached_rows(cache: Cache, alphas: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The prefill's NTK alphas for the ``batch_size`` rows the cache holds now. Per-sample alphas follow their
    rows through beam search's reordering, the cache's own ``reorder_cache``, ``batch_select_indices`` and
    ``batch_repeat_interleave``, ``crop`` and tokens fed after it: each row takes the alpha of the prompt row
    whose keys it holds (``_prompt_rows``). A cache that keeps no keys to compare: rows taken as kept in order,
    each repeated alike."""
    prompt = getattr(cache, _NTK_ROWS_ATTRIBUTE, None)
    if alphas.numel() > 1 and prompt is not None:
        current = _position_signatures(cache, prompt.shape[1])
        if current is not None:
            origin = _prompt_rows(current, prompt.to(current.device), alphas.to(current.device))
            return alphas[origin.to(alphas.device)]
    if alphas.numel() in (1, batch_size):
        return alphas
    if batch_size % alphas.numel() == 0:
        return alphas.repeat_interleave(batch_size // alphas.numel())
    raise ValueError(f"the cache holds per-sample NTK alphas for {alphas.numel()} rows but the batch has {batch_size}")


def document_ntk_alphas(sequence_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Dynamic-NTK alpha ``[b, s]`` (float64) of every token from the length of its packed document, as the
    original computes it for that document alone (``ntk_alpha``, on tensors: no host sync)."""
    batch, seq = sequence_ids.shape
    rows = torch.arange(batch, device=sequence_ids.device)[:, None] * seq
    segment = (rows + _document_index(sequence_ids)).flatten()
    counts = torch.zeros(batch * seq, dtype=torch.float64, device=sequence_ids.device)
    lengths = counts.index_add_(0, segment, torch.ones_like(counts))[segment].view(batch, seq)
    context_value = torch.log2(lengths.clamp_min(1) / seq_length) + 1
    return (2 ** torch.ceil(context_value) - 1).clamp_min(1)


def document_positions(positions: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """``positions`` ``[b, s]`` less the position each token's packed document starts at: 0 .. length - 1 in
    every document, whatever offset the given positions carry."""
    index = torch.arange(positions.shape[-1], device=positions.device).expand_as(positions)
    starts = F.pad(torch.diff(sequence_ids, dim=-1) != 0, (1, 0), value=True)
    first = torch.where(starts, index, 0).cummax(-1).values
    return positions - positions.gather(-1, first)


def rotary_cos_sin(
    positions: torch.Tensor, alphas: torch.Tensor, rotary_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin ``[n, 1, seq, rotary_dim]`` for ``positions`` ``[1 or b, seq]`` and NTK ``alphas``
    ``[n, 1]`` (one alpha for the batch, or one per sample) or ``[b, seq]`` (one per token: packed documents).

    Each alpha raises the rotary base to ``base * alpha^(dim / (dim - 2))``.
    """
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float64) / rotary_dim
    bases = base * alphas.to(torch.float64) ** (rotary_dim / (rotary_dim - 2))
    inv_freq = (1.0 / bases[..., None] ** exponents).float()
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` channels of query and key ``[b, h, s, d]`` ("rotate half" style), computed
    in float32 (cos/sin are float32) and returned in their dtype, as the original's float32 copy and cast back."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == query.shape[-1]:
        return rotary_pair(query, key, cos, sin, dtype=query.dtype)
    return tuple(
        torch.cat((rotary(x[..., :rotary_dim], cos, sin, dtype=x.dtype), x[..., rotary_dim:]), dim=-1)
        for x in (query, key)
    )


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """logn query scale ``[seq]`` (float64) at absolute ``positions``: log(p + 1) / log(seq_length) where
    p + 1 > seq_length, else 1."""
    lengths = positions.to(torch.float64) + 1
    return torch.where(lengths > seq_length, lengths.log() / math.log(seq_length), torch.ones_like(lengths))


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    recomputes_exactly = True  # its output may be recomputed in backward (see after_norm)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def with_residual(self, x: torch.Tensor) -> tuple:
        """``(self(x), x)`` as one autograd node: see ``residual_after_norm``."""
        return rms_norm(x, self.weight, self.eps, with_residual=True)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class QWenAttention(nn.Module):
    """Self-attention with a fused ``c_attn`` projection; the score computation happens in the kernel layer."""

    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.scale = self.head_dim**-0.5
        if getattr(config, "scale_attn_weights", True) is False:
            _log_once(
                "config.scale_attn_weights=False is ignored, as the original Qwen-7B code ignores it: the scores "
                "are always scaled by 1/sqrt(kv_channels)"
            )
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)  # a module, as the original's (trainers set its p)
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        query_scale: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        sequence_ids: Optional[torch.Tensor] = None,
        attention_weights: Optional[list] = None,
        cache_index: Optional[int] = None,
    ) -> torch.Tensor:
        """``rotary``: cos/sin ``[b or 1, 1, s, rotary_dim]``; ``query_scale``: logn factors ``[b or 1, 1, s, 1]``;
        ``attention_mask``: bool keep-mask ``[b, past + s]`` or None; ``sequence_ids``: packed documents. Given
        an ``attention_weights`` list, the weights are computed and appended to it (``output_attentions``).
        ``cache_index``: the block's place in the stack, which picks its cache layer (``layer_idx`` by default)."""
        batch, q_len, _ = hidden_states.shape
        mixed = self.c_attn(hidden_states).view(batch, q_len, 3, self.num_heads, self.head_dim)
        query, key, value = mixed.permute(2, 0, 3, 1, 4).unbind(0)

        cos, sin = rotary
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if query_scale is not None:
            query = query * query_scale.to(query.dtype)  # float64 factors rounded once, as the original's type_as
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx if cache_index is None else cache_index)
        elif value.requires_grad and torch.is_grad_enabled():
            # query and key are new tensors after the rotation: a value kept for backward as a view of c_attn's
            # output would hold all of it, two [tokens, hidden] tensors more per layer than this copy
            value = value.contiguous()

        output = attention_recording_weights(
            query,
            key,
            value,
            attention_weights,
            causal=True,
            attention_mask=attention_mask,
            dropout_p=attention_dropout_p(self.attn_dropout),
            scale=self.scale,
            sequence_ids=sequence_ids,
            **attention_options(self.config, mask=attention_mask),
        )
        output = output.transpose(1, 2).reshape(batch, q_len, self.projection_size)
        return self.c_proj(output)


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        up, gate = shared_input_projections(hidden_states, self.w1, self.w2)
        return projected_activation("silu", gate, self.c_proj, nn.functional.silu, up=up)


class QWenBlock(LongContextCheckpointing, GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        query_scale: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        sequence_ids: Optional[torch.Tensor] = None,
        attention_weights: Optional[list] = None,
        cache_index: Optional[int] = None,
    ) -> torch.Tensor:
        tile_size, recompute = sequence_tile_size(self.config), recompute_norm_outputs(self.config)

        def attend(normed: torch.Tensor) -> torch.Tensor:
            return self.attn(
                normed,
                rotary,
                query_scale,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                sequence_ids=sequence_ids,
                attention_weights=attention_weights,
                cache_index=cache_index,
            )

        hidden_states = residual_after_norm(self.ln_1, hidden_states, attend, tile_size, recompute=recompute)
        return residual_after_norm(self.ln_2, hidden_states, self.mlp, tile_size, True, recompute)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _as_original_tuple(output) -> tuple:
    """``return_dict=False`` as the original answers it: the output's fields that are set, in order, except the
    attention weights, which the original's tuples never carry."""
    return tuple(value for name, value in output.items() if name != "attentions")


class QWenPreTrainedModel(KernelLayerModelMixin, PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # buffers that some older Qwen checkpoints carry; this file recomputes them
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"attn\.masked_bias"]
    # transformers accepts these attn_implementation names; backend_from_config maps them to kernels
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms; the residual output projections
        (``c_proj`` of attention and MLP) are drawn again, with the std divided by sqrt(2 * num_hidden_layers), when
        their attention or MLP module is passed, as in the original."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        if isinstance(module, (QWenAttention, QWenMLP)):
            _init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        _check_supported(config)
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_dim = config.hidden_size
        self.seq_length = _seq_length(config)
        self.rotary_dim = int(config.kv_channels * config.rotary_pct)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QWenBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def get_ntk_alpha(self, true_seq_len: int) -> float:
        return ntk_alpha(true_seq_len, self.seq_length)

    def _ntk_alphas(
        self,
        attention_mask: Optional[torch.Tensor],
        past_key_values: Optional[Cache],
        past_length: int,
        total_length: int,
        batch_size: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """NTK alphas ``[1]`` or ``[batch]`` (float64) for this forward, and the same alphas where this forward
        chose them for the cache (None where it reuses the cache's, has none, or runs without dynamic NTK).

        Chosen at prefill (empty cache, or one the model did not fill, as PEFT's prefix tuning hands in, its tokens
        counted): with a padding mask and a total length above ``seq_length``, one alpha per sample from its count
        of non-padded tokens; otherwise one alpha from the total length. They are kept on the cache, and decode
        steps reuse them, per sample for the rows the cache holds then. A forward without dynamic NTK (training
        mode) rotates by alpha 1, and a cache it fills keeps that alpha for later steps in eval mode (as the
        original, whose alphas carry over from the previous call).
        """
        stored = getattr(past_key_values, _NTK_ALPHAS_ATTRIBUTE, None) if past_length > 0 else None
        if not self._uses_dynamic_ntk():
            alphas = torch.ones(1, dtype=torch.float64, device=device)
            if past_key_values is not None and stored is None:
                setattr(past_key_values, _NTK_ALPHAS_ATTRIBUTE, alphas)
            return alphas, None
        if stored is not None:
            return _alphas_of_cached_rows(past_key_values, stored, batch_size), None
        if attention_mask is not None and total_length > self.seq_length:
            lengths = attention_mask.sum(dim=-1).tolist()
        else:
            lengths = [total_length]
        alphas = [self.get_ntk_alpha(int(length)) for length in lengths]
        if len(set(alphas)) == 1:
            alphas = alphas[:1]
        alphas = torch.tensor(alphas, dtype=torch.float64, device=device)
        if past_key_values is None:
            return alphas, None
        setattr(past_key_values, _NTK_ALPHAS_ATTRIBUTE, alphas)
        return alphas, alphas

    def _uses_dynamic_ntk(self) -> bool:
        """Whether this forward picks NTK alphas: in eval mode with ``use_dynamic_ntk``, where the rotation reads
        them (fewer than two rotary channels rotate by an exponent of 0, the same whatever the base)."""
        return not self.training and self.config.use_dynamic_ntk and self.rotary_dim >= 2

    def _logn_query_scale(self, positions: torch.Tensor, total_length: int) -> Optional[torch.Tensor]:
        if self.training or not self.config.use_logn_attn or total_length <= self.seq_length:
            return None
        return logn_scale(positions, self.seq_length)[:, None, :, None]

    def _packed_positions(
        self, sequence_ids: torch.Tensor, position_ids: torch.Tensor, cache: Optional[Cache]
    ) -> tuple:
        """Rotary cos/sin and logn scale of packed documents, each as the original computes them for that
        document alone: NTK alpha from the document's length (1 without dynamic NTK), kept on a cache being built
        as the alpha of each row's last document (the one a decoding step continues), and returned as well."""
        positions = position_ids.expand(sequence_ids.shape)
        if not self._uses_dynamic_ntk():
            alphas = torch.ones(1, 1, dtype=torch.float64, device=positions.device)
        else:
            alphas = document_ntk_alphas(sequence_ids, self.seq_length)
        rotary = rotary_cos_sin(positions, alphas, self.rotary_dim, float(self.config.rotary_emb_base))
        logn = not self.training and self.config.use_logn_attn  # logn_scale is 1 inside a short document
        query_scale = logn_scale(positions, self.seq_length)[:, None, :, None] if logn else None
        if cache is None:
            return rotary, query_scale, None
        setattr(cache, _NTK_ALPHAS_ATTRIBUTE, alphas[:, -1])
        return rotary, query_scale, alphas[:, -1]

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        padded_rows_positions: bool = False,
        **kwargs,
    ) -> Union[BaseModelOutputWithPast, tuple]:
        """Like the original ``QWenModel.forward``. Positions are absolute (0 .. cache + seq - 1, left padding
        included), so ``position_ids`` is ignored, as are ``token_type_ids`` and the encoder arguments, except
        for packed rows: ``position_ids`` restarting inside a row with no attention mask and no cache, or
        ``cu_seq_lens_q``/``cu_seq_lens_k``, where each document attends only to itself, positions from 0.
        ``padded_rows_positions``: the LM head's own call for a padded batch run as one packed row, whose
        ``position_ids`` are the original's absolute positions of each row, used as given.
        ``attention_mask`` is a 2-D 0/1 padding mask covering the cache and the new tokens; ``past_key_values``
        a transformers ``Cache``."""
        _check_no_unsupported_option(self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if (input_ids is not None and input_ids.dim() != 2) or (inputs_embeds is not None and inputs_embeds.dim() != 3):
            given = "input_ids" if input_ids is not None else "inputs_embeds"
            shape = list((input_ids if input_ids is not None else inputs_embeds).shape)
            raise ValueError(
                f"{given} must be [batch, seq]{'' if input_ids is not None else ' + [hidden]'}, got shape {shape}; "
                "the original viewed other shapes as rows of seq tokens: pass them so (input_ids.view(-1, seq))"
            )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if head_mask is not None:
            raise ValueError("head_mask is not supported: the fused attention kernels take no per-head mask")
        check_cache_type(past_key_values)
        check_cache_not_dropped(
            past_key_values, self.h, self.training, attention_mask,
            input_ids if input_ids is not None else inputs_embeds,
        )
        if getattr(past_key_values, "is_compileable", False):
            raise ValueError("static (compileable) caches are not supported; use a DynamicCache")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = default_use_cache(self, use_cache, past_key_values)
        return_dict = returns_dict(self.config, return_dict)
        use_cache = use_cache_under_checkpointing(self, use_cache)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        sequence_ids, position_ids = packed_documents(
            batch_size, seq_len, device, position_ids, attention_mask, past_key_values, **kwargs
        )
        if sequence_ids is not None and not padded_rows_positions:
            # the original reads no position_ids: each packed document counts from 0, whatever positions came
            position_ids = document_positions(position_ids.expand(sequence_ids.shape), sequence_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()  # a layer per block that runs, however many the config says

        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        total_length = past_length + seq_len
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, total_length):
            raise ValueError(
                "attention_mask must be a 2-D padding mask [batch, past + seq] = "
                f"[{batch_size}, {total_length}], got shape {list(attention_mask.shape)}"
            )

        if sequence_ids is None:
            positions = torch.arange(past_length, total_length, device=device)[None]
            alphas, chosen_alphas = self._ntk_alphas(
                attention_mask, past_key_values, past_length, total_length, batch_size, device
            )
            rotary = rotary_cos_sin(positions, alphas[:, None], self.rotary_dim, float(self.config.rotary_emb_base))
            query_scale = self._logn_query_scale(positions, total_length)
        else:
            rotary, query_scale, chosen_alphas = self._packed_positions(sequence_ids, position_ids, past_key_values)
        keep_mask = forward_mask(keep_mask_from_padding(attention_mask), without_mask=True)  # one for every layer

        hidden_states = self.drop(inputs_embeds)
        all_hidden_states = []
        all_attentions = [] if output_attentions else None
        # a block's cache layer is its place in the stack, as in the original (whose cache is a list it walks
        # with the blocks): blocks dropped, reordered or repeated after loading keep a cache each
        for index, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = block(
                hidden_states,
                rotary,
                query_scale,
                attention_mask=keep_mask,
                past_key_values=past_key_values,
                sequence_ids=sequence_ids,
                attention_weights=all_attentions,
                cache_index=index,
            )
        hidden_states = sequence_tiled((self.ln_f,), hidden_states, sequence_tile_size(self.config))
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if chosen_alphas is not None and chosen_alphas.numel() > 1:  # per-sample alphas: which cached row holds which
            # the keys handed in before (a PEFT prefix, maybe alike in every row) and the first the model wrote
            signatures = _position_signatures(past_key_values, past_length + _SIGNATURE_POSITIONS)
            if signatures is not None:
                setattr(past_key_values, _NTK_ROWS_ATTRIBUTE, signatures)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,  # a cache passed with use_cache=False too, which it updated (as stock)
            hidden_states=selected_hidden_states(all_hidden_states, output_hidden_states),
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict else _as_original_tuple(output)


class _TokenQueueStreamer(BaseStreamer):
    """Hands the tokens ``generate`` produces to the reader, one ``put`` at a time (the prompt, its first ``put``,
    is skipped), and lets ``generate`` go on only when the reader asks for the next ones: the worker computes (and
    samples, from torch's process-wide generator) only while the reader waits, as the original's generator runs
    only when read, so a reader drawing random numbers between reads changes no token. The queue holds at most
    one unread entry while the reader reads (the worker waits for its ask), and is left behind once the reader is
    gone (``abandoned``): then nothing waits."""

    def __init__(self, abandoned: threading.Event):
        self.queue: queue.Queue = queue.Queue()
        self.abandoned = abandoned
        self._asked = threading.Semaphore(0)
        self._prompt_seen = False
        self._handed_any = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())
        self._wait_for_the_readers_ask()

    def end(self) -> None:
        self.queue.put(None)

    def next_tokens(self) -> Optional[list]:
        """The reader's side: the next tokens ``generate`` hands over (None at the end). The first call runs with
        the worker just started; each later one first lets the worker's last ``put`` return."""
        if self._handed_any:
            self._asked.release()
        self._handed_any = True
        return self.queue.get()

    def _wait_for_the_readers_ask(self) -> None:
        while not self.abandoned.is_set():
            if self._asked.acquire(timeout=0.05):
                return


class _StopWhenAbandoned(StoppingCriteria):
    """Ends ``generate`` at its next step once the reader of ``chat_stream`` stopped reading (a ``break``,
    ``close()``, the generator collected), as the original's generator, which runs nothing unread, stops."""

    def __init__(self, abandoned: threading.Event):
        self.abandoned = abandoned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.abandoned.is_set(), dtype=torch.bool, device=input_ids.device)


def _autocast_regions_of_this_thread() -> list:
    """The autocast regions the calling thread is in (autocast is per thread), to enter again in a worker."""
    return [
        torch.autocast(device, dtype=torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    ]


def _generation_utils():
    """``make_context, decode_tokens, get_stop_words_ids, StopWordsLogitsProcessor`` from the
    ``qwen_generation_utils.py`` beside this file, imported only when chat or stop words need them."""
    try:
        from .qwen_generation_utils import StopWordsLogitsProcessor, decode_tokens, get_stop_words_ids, make_context
    except ImportError as error:
        raise ImportError(
            "QWen chat(), chat_stream() and stop_words_ids need qwen_generation_utils.py (the Qwen-7B checkpoints' "
            "or memory-efficient-adapter's) next to this modeling file"
        ) from error
    return make_context, decode_tokens, get_stop_words_ids, StopWordsLogitsProcessor


def _check_chat_format(generation_config: GenerationConfig) -> None:
    if getattr(generation_config, "chat_format", None) != "chatml":
        raise ValueError(
            'chat() and chat_stream() need generation_config.chat_format == "chatml": use a chat model '
            '(e.g. "Qwen/Qwen-7B-Chat"), not the pretrained base model'
        )


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    # tied only where config.tie_word_embeddings says so (Qwen-7B does not), as the original ties under transformers 4
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        dtype = resolve_precision(config)
        _log_precision_over_requested_dtype(dtype)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"
        if any(param.dtype != dtype for param in self.parameters()):  # (no copy where none is needed: fake tensors)
            self.to(dtype)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> Union[CausalLMOutputWithPast, tuple]:
        """``labels`` are shifted inside (the original's causal-LM loss, -100 ignored). ``logits_to_keep``: an
        int keeps the logits of that many last positions (0 = all), a tensor indexes the sequence dimension."""
        return_dict = returns_dict(self.config, return_dict)
        labels = labels_of_rows(labels, kwargs, input_ids, inputs_embeds)
        rows = padded_rows(
            self, attention_mask, input_ids, inputs_embeds, labels, past_key_values, use_cache,
            output_attentions, logits_to_keep, output_hidden_states, **kwargs,
        )
        if rows is not None:
            # A padded batch runs as one packed row of its kept tokens, one document per row. The original takes
            # absolute positions (0 .. s - 1, left padding included) and an NTK alpha per row from its kept
            # length: the packed form's per-document alphas, with these positions.
            input_ids, inputs_embeds, position_ids = rows.pack_inputs(
                input_ids, inputs_embeds, None, self.get_input_embeddings()
            )
            attention_mask, use_cache = None, False
        outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            padded_rows_positions=rows is not None,
            **(varlen_keywords(kwargs) if rows is None else rows.keywords),
        )
        hidden_states = outputs.last_hidden_state
        if rows is not None:
            loss, logits = unpadded_lm_outputs(self, self.lm_head, hidden_states, labels, rows, **kwargs)
        elif fused_loss_applies(self, self.lm_head, labels, logits_to_keep):
            loss = lm_head_loss(hidden_states, self.lm_head, labels, self.config, **kwargs)
            logits = None
        else:
            if labels is not None and labels.dim() != hidden_states.dim() - 1:  # the original raises too
                raise labels_mismatch("labels", labels.shape, hidden_states.shape[:-1])
            logits = self.lm_head(hidden_states_to_keep(hidden_states, logits_to_keep))
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states if rows is None else rows.unpack_all(outputs.hidden_states),
            attentions=outputs.attentions,
        )
        return output if return_dict else _as_original_tuple(output)

    def generate(
        self,
        inputs: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        **kwargs,
    ):
        """``GenerationMixin.generate`` plus the original's stop words: ``stop_words_ids`` (a keyword argument or
        ``generation_config.stop_words_ids``) end a sequence with EOS once it ends with one of them. Each of the
        two is read as ``generate`` reads its settings: the call's keyword, else the ``generation_config`` passed,
        else the model's own (``generate`` fills a passed config's unset values from it)."""
        cache_implementation = self._generation_setting(
            "cache_implementation", generation_config, kwargs.get("cache_implementation")
        )
        if cache_implementation in _STATIC_CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation={cache_implementation!r} builds a static (compileable) cache, which QWen does "
                "not support: leave it unset for the default DynamicCache"
            )
        given_stop_words = kwargs.pop("stop_words_ids", None)
        stop_words_ids = self._generation_setting("stop_words_ids", generation_config, given_stop_words)
        eos_token_id = self._generation_setting("eos_token_id", generation_config, kwargs.get("eos_token_id"))
        if stop_words_ids and eos_token_id is None:
            raise ValueError(
                "stop_words_ids end a sequence with EOS, and no eos_token_id is set: pass eos_token_id= to generate() "
                "or set generation_config.eos_token_id"
            )
        processor = self._stop_words_processor(stop_words_ids, eos_token_id)
        if processor is not None:
            logits_processor = LogitsProcessorList([*(logits_processor or []), processor])
        return super().generate(
            inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs
        )

    def _generation_setting(self, name: str, generation_config: Optional[GenerationConfig], given):
        """``given`` (a keyword of the call), else ``generation_config``'s value, else the model's own."""
        for value in (given, getattr(generation_config, name, None)):
            if value is not None:
                return value
        return getattr(self.generation_config, name, None)

    @staticmethod
    def _stop_words_processor(stop_words_ids: Optional[list[list[int]]], eos_token_id):
        """The original's ``StopWordsLogitsProcessor``; None when there is nothing to stop on beyond EOS itself."""
        if not stop_words_ids:
            return None
        eos_ids = set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else {eos_token_id}
        if all(len(words) == 1 and words[0] in eos_ids for words in stop_words_ids):
            return None  # generate already ends a sequence at EOS
        *_, stop_words_logits_processor = _generation_utils()
        return stop_words_logits_processor(stop_words_ids=stop_words_ids, eos_token_id=eos_token_id)

    def _chat_inputs(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType],
        system: str,
        stop_words_ids: Optional[list[list[int]]],
        generation_config: Optional[GenerationConfig],
        max_window_size: Optional[int],
    ) -> tuple[str, list[int], torch.Tensor, list[list[int]]]:
        """The ChatML prompt (text and tokens), its input ids and the stop words, as the original builds them."""
        config = generation_config if generation_config is not None else self.generation_config
        _check_chat_format(config)
        make_context, _, get_stop_words_ids, _ = _generation_utils()
        if max_window_size is None:
            max_window_size = getattr(config, "max_window_size", None)
        raw_text, context_tokens = make_context(
            tokenizer,
            query,
            history=history or [],
            system=system,
            max_window_size=max_window_size,
            chat_format=config.chat_format,
        )
        stop_words_ids = list(stop_words_ids or []) + get_stop_words_ids(config.chat_format, tokenizer)
        input_ids = torch.tensor([context_tokens], device=self.device)
        return raw_text, context_tokens, input_ids, stop_words_ids

    def chat(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType],
        system: str = "You are a helpful assistant.",
        stop_words_ids: Optional[list[list[int]]] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> tuple[str, HistoryType]:
        """One ChatML turn: returns the response and ``history`` (a copy) with ``(query, response)`` appended."""
        if kwargs.pop("stream", None) is not None:
            raise ValueError("chat(..., stream=...) is not supported; use chat_stream(...)")
        _, decode_tokens, _, _ = _generation_utils()
        history = copy.deepcopy(history) if history is not None else []
        raw_text, context_tokens, input_ids, stop_words_ids = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs.pop("max_window_size", None)
        )
        outputs = self.generate(
            input_ids, stop_words_ids=stop_words_ids, generation_config=generation_config, **kwargs
        )
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        response = decode_tokens(
            sequences[0],
            tokenizer,
            raw_text_len=len(raw_text),
            context_length=len(context_tokens),
            chat_format="chatml",
            verbose=False,
            errors="replace",
        )
        history.append((query, response))
        return response, history

    def chat_stream(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType],
        system: str = "You are a helpful assistant.",
        stop_words_ids: Optional[list[list[int]]] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> Generator[str, Any, None]:
        """Like ``chat`` but yields the growing response text. ``generate`` runs in a worker thread, in the
        reader's autocast regions, only while the reader waits for the next text (``_TokenQueueStreamer``), and
        stops once the generator is closed."""
        _, _, input_ids, stop_words_ids = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs.pop("max_window_size", None)
        )
        abandoned = threading.Event()
        stopping_criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping_criteria.append(_StopWhenAbandoned(abandoned))

        def stream() -> Generator[str, Any, None]:
            streamer = _TokenQueueStreamer(abandoned)
            autocast_regions = _autocast_regions_of_this_thread()  # the reader's, at its first next()
            failures = []

            def run() -> None:
                try:
                    with ExitStack() as regions:
                        for region in autocast_regions:
                            regions.enter_context(region)
                        self.generate(
                            input_ids,
                            stop_words_ids=stop_words_ids,
                            logits_processor=logits_processor,
                            generation_config=generation_config,
                            stopping_criteria=stopping_criteria,
                            streamer=streamer,
                            **kwargs,
                        )
                except Exception as error:  # re-raised in the consumer's thread below
                    failures.append(error)
                    streamer.end()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            tokens: list[int] = []
            try:
                while (new_tokens := streamer.next_tokens()) is not None:
                    tokens.extend(new_tokens)
                    yield tokenizer.decode(tokens, skip_special_tokens=True, errors="ignore")
            finally:
                abandoned.set()
                worker.join()
            if failures:
                raise failures[0]

        return stream()


__all__ = ["QWenPreTrainedModel", "QWenModel", "QWenLMHeadModel"]
