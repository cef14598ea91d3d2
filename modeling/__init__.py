"""memory-efficient-adapter: Hugging Face modeling files whose attention runs on fused kernels.

The kernel layer lives in ``memory_efficient_adapter.attention``; every ``modeling_*.py`` file in this
package carries a copy of it so that it can be used alone as ``trust_remote_code``.
"""

from .attention import (
    AUTO_ORDER,
    BACKENDS,
    DropoutMatmul,
    LightSoftmax,
    alibi_slopes,
    attention,
    available_backends,
    backend_from_config,
    cudnn_plan_cache_info,
    keep_mask_from_padding,
    resolve_backend,
    select_backend,
    set_chunk_sizes,
    set_flex_static_shapes,
)
from .patch import (
    BetterTransformer,
    apply_attention_patch,
    register_attention_backends,
    remove_attention_patch,
    reverse,
    transform,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BetterTransformer",
    "DropoutMatmul",
    "LightSoftmax",
    "alibi_slopes",
    "apply_attention_patch",
    "attention",
    "available_backends",
    "backend_from_config",
    "cudnn_plan_cache_info",
    "keep_mask_from_padding",
    "resolve_backend",
    "reverse",
    "register_attention_backends",
    "remove_attention_patch",
    "select_backend",
    "set_chunk_sizes",
    "set_flex_static_shapes",
    "transform",
]
