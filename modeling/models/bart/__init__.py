"""The original adapter's ``models.bart``: see ``flash_attn_patch``."""
