"""memory-efficient-adapter: Hugging Face modeling files whose attention runs on fused kernels.

The kernel layer lives in ``memory_efficient_adapter.attention``; every ``modeling_*.py`` file in this
package carries a copy of it so that it can be used alone as ``trust_remote_code``.

Importing the package costs about one ``import torch``: the patching API (``memory_efficient_adapter.patch``,
which needs transformers' whole modeling stack) loads on first use, and our names join transformers'
attention registry as soon as transformers loads its models (``transformers.modeling_utils``), which
``from_pretrained`` always does before it reads ``attn_implementation``.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys

from .attention import (
    AUTO_ORDER,
    BACKENDS,
    BackendFailure,
    DropoutMatmul,
    ForwardMask,
    LightSoftmax,
    alibi_slopes,
    attention,
    attention_options,
    available_backends,
    backend_from_config,
    cudnn_plan_cache_info,
    demoted_backends,
    forward_mask,
    keep_mask_from_padding,
    select_backend,
    set_chunk_sizes,
    set_flex_static_shapes,
)

_PATCH_NAMES = ("BetterTransformer", "apply_attention_patch", "register_attention_backends",
                "remove_attention_patch", "reverse", "transform")
_REGISTRY_MODULE = "transformers.modeling_utils"  # defines AttentionInterface; imports masking_utils

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendFailure",
    "BetterTransformer",
    "DropoutMatmul",
    "ForwardMask",
    "LightSoftmax",
    "alibi_slopes",
    "apply_attention_patch",
    "attention",
    "attention_options",
    "available_backends",
    "backend_from_config",
    "cudnn_plan_cache_info",
    "demoted_backends",
    "forward_mask",
    "keep_mask_from_padding",
    "reverse",
    "register_attention_backends",
    "remove_attention_patch",
    "select_backend",
    "set_chunk_sizes",
    "set_flex_static_shapes",
    "transform",
]


def __getattr__(name: str):
    """The patching API, imported on first use (PEP 562)."""
    if name in _PATCH_NAMES:
        return getattr(importlib.import_module(".patch", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


def _register_with_transformers() -> None:
    """Importing ``.patch`` registers our attention implementations (see patch.register_attention_backends)."""
    try:
        importlib.import_module(".patch", __name__)
    except Exception as error:  # never break transformers' own import; say once why "mea" is missing
        logging.getLogger(__name__).warning(
            "memory_efficient_adapter: could not register the 'mea' attention implementations (%s: %s)",
            type(error).__name__, error)


class _RegisterAfterTransformersModels(importlib.abc.MetaPathFinder):
    """Runs ``_register_with_transformers`` right after ``transformers.modeling_utils`` has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if _REGISTRY_MODULE in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterTransformersModels) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformersModels())
