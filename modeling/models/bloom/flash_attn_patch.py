"""``from memory_efficient_adapter.models.bloom.flash_attn_patch import apply_attention_patch`` (the original
adapter's BLOOM entry point): ``apply_attention_patch()`` patches BLOOM's attention class, so every stock BLOOM
model, existing or created afterwards, runs the attention of our modeling_bloom.py (ALiBi inside the kernel)."""

from .. import family_patch

apply_attention_patch, remove_attention_patch = family_patch("bloom")
