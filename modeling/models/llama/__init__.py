"""The original adapter's ``models.llama``: see ``flash_attn_patch``."""
