"""``apply_attention_patch`` on stock model classes of the pinned transformers that other versions lack: a class
that stock runs on eager attention only, in a modeling file whose other classes declare sdpa."""

from __future__ import annotations

import copy

import memory_efficient_adapter as mea
import torch
import transformers
from remote_code import assert_close_rel


def test_an_eager_only_class_beside_sdpa_classes_gets_eager_masks():
    """Gemma 4's audio model (``_supports_sdpa=False``; its chunked attention reads an additive eager mask) sits in
    a file of sdpa classes: the file-wide decision gave it our bool keep-mask, and every forward failed in
    ``torch.finfo`` of a bool mask."""
    config = transformers.Gemma4AudioConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, subsampling_conv_channels=[8, 8],
        attention_chunk_size=4, attention_context_left=5, attention_context_right=0, output_proj_dims=16,
    )
    torch.manual_seed(0)
    stock = transformers.Gemma4AudioModel(config).eval()
    features = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 40:] = False
    patched = mea.apply_attention_patch(copy.deepcopy(stock), backend="chunked")
    with torch.no_grad():
        for keep in (mask, torch.ones_like(mask)):
            expected = stock(features, attention_mask=keep)
            got = patched(features, attention_mask=keep).last_hidden_state
            valid = expected.attention_mask.bool()
            assert_close_rel(got[valid], expected.last_hidden_state[valid], 1e-5, "Gemma 4 audio")
