"""The original adapter's ``models.bloom``: see ``flash_attn_patch``."""
