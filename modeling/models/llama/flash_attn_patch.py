"""``from memory_efficient_adapter.models.llama.flash_attn_patch import apply_attention_patch`` (the original
adapter's LLaMA entry point): ``apply_attention_patch()`` puts LLaMA models created afterwards on our kernels."""

from .. import family_patch

apply_attention_patch, remove_attention_patch = family_patch("llama")
