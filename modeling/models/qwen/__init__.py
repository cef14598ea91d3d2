"""The original adapter's ``models.qwen``: see ``flash_attn_patch``."""
