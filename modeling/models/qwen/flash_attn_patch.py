"""``from memory_efficient_adapter.models.qwen.flash_attn_patch import apply_attention_patch`` (the original
adapter's Qwen entry point). Qwen-7B has no transformers class: its kernels come with our modeling_qwen.py
(a ``-mea`` repo, reference mode, or the file copied over the original). ``apply_attention_patch()`` makes
Qwen models created afterwards from that file use ``backend``; a Qwen model from the original modeling file
cannot be patched, and its creation logs so."""

from .. import family_patch

apply_attention_patch, remove_attention_patch = family_patch("qwen")
