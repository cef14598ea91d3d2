"""``from memory_efficient_adapter.models.bart.flash_attn_patch import apply_attention_patch`` (the original
adapter's BART entry point): ``apply_attention_patch()`` puts BART models created afterwards on our kernels."""

from .. import family_patch

apply_attention_patch, remove_attention_patch = family_patch("bart")
