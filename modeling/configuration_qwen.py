"""Configuration of Qwen-7B (first generation), compatible with the original `configuration_qwen.py`.

The keys and defaults are the original ones, so a Qwen-7B `config.json` loads unchanged and a config
saved from this class loads into the original one. Two additions:

- `seq_length`: the training length that dynamic NTK and logn scaling compare against. The original
  class has no default for it (it arrives through `config.json`); we default to 2048, the value of the
  first published revisions, when it is absent.
- `attn_backend`: which fused-attention backend to use ("auto", "sdpa", "flex", "flash_attn",
  "xformers", "chunked", "eager"); `None` defers to `use_flash_attn`, `attn_implementation` and the
  `USE_FLASH_ATTN` environment variable.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: bool | str = "auto",
        intermediate_size: int = 22016,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        use_cache_quantization: bool = False,
        use_cache_kernel: bool = False,
        softmax_in_fp32: bool = False,
        seq_length: int = 2048,
        attn_backend: str | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.use_cache_quantization = use_cache_quantization
        self.use_cache_kernel = use_cache_kernel
        self.softmax_in_fp32 = softmax_in_fp32
        self.seq_length = seq_length
        self.attn_backend = attn_backend
        # None unless given, as every config had them before transformers 5 (its pipelines still read them)
        special_tokens = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **special_tokens, **kwargs)
