"""GPT-2 for transformers whose attention runs through the fused kernel layer below.

Drop-in replacement for transformers' `GPT2Model`, `GPT2LMHeadModel` and `GPT2ForSequenceClassification`:
the module tree and state-dict keys are the stock ones, so original checkpoints load unchanged and
`save_pretrained` output loads back into the stock classes. Every attention call goes through `attention(...)`
with an O(n) padding keep-mask and `causal=True`; no [batch, 1, q_len, k_len] mask is ever built.

GPT-2 specific options read from the config:
- `attn_backend` / `attn_implementation` / `USE_FLASH_ATTN`: which kernel runs (see `backend_from_config`).
- `use_lightsoftmax`, `use_dropmatmul` (default False): on the "eager" backend, a softmax that keeps only its
  output for backward, and attention dropout fused into the probabilities @ values matmul that keeps only the
  dropout mask.
- `reorder_and_upcast_attn`: the fused kernels already accumulate in float32; the eager backend then runs the
  whole attention in float32 (autocast off) and casts the result back.
"""

import torch
from torch import nn
from transformers import GenerationMixin, GPT2Config, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    SequenceClassifierOutputWithPast,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

# The one version-specific bit: transformers 5 re-runs `_init_weights` over loaded modules and ships init
# functions that skip tensors it has already loaded; transformers 4 only initializes missing weights.
try:
    from transformers import initialization as _init
except ImportError:
    from torch.nn import init as _init

# >>> kernel layer: copied from modeling/attention.py by scripts/sync_kernels.py; edit it there >>>
# <<< kernel layer <<<

logger = logging.get_logger(__name__)


def attention_scale(config: GPT2Config, layer_idx: int) -> float:
    """Softmax scale of one layer: 1/sqrt(head_dim) unless disabled, divided by layer_idx + 1 if asked."""
    scale = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


def padding_mask_and_causality(attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """The mask to hand to `attention` and whether the kernel must add causality itself.

    A 2-D 0/1 padding mask becomes a bool [batch, k_len] keep-mask (None when nothing is padded). A 4-D mask
    given by the caller (e.g. built by `generate` for a static cache) already holds causality and is passed
    through unchanged, as the stock model does.
    """
    if attention_mask is None:
        return None, True
    if attention_mask.dim() == 4:
        return attention_mask, False
    return keep_mask_from_padding(attention_mask), True


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with GPT-2's fused qkv projection (`c_attn`) and `c_proj`."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"hidden_size ({self.embed_dim}) must be divisible by num_attention_heads ({self.num_heads})"
            )
        self.layer_idx = layer_idx
        self.scaling = attention_scale(config, layer_idx)

        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """[batch, seq, embed] -> [batch, heads, seq, head_dim]."""
        return tensor.view(*tensor.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        backend: str,
    ) -> torch.Tensor:
        kwargs = {
            "causal": causal,
            "attention_mask": mask,
            "dropout_p": self.attn_dropout.p if self.training else 0.0,
            "scale": self.scaling,
            "backend": backend,
        }
        if backend != "eager":
            return attention(query, key, value, **kwargs)
        kwargs["light_softmax"] = bool(getattr(self.config, "use_lightsoftmax", False))
        kwargs["dropout_matmul"] = bool(getattr(self.config, "use_dropmatmul", False))
        if not self.config.reorder_and_upcast_attn:
            return attention(query, key, value, **kwargs)
        with torch.autocast(device_type=query.device.type, enabled=False):
            output = attention(query.float(), key.float(), value.float(), **kwargs)
        return output.to(query.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        past_key_values: Cache | None,
        backend: str,
    ) -> torch.Tensor:
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        output = self._attend(query, key, value, mask, causal, backend)
        output = output.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.embed_dim)
        return self.resid_dropout(self.c_proj(output))


class GPT2MLP(nn.Module):
    def __init__(self, intermediate_size: int, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, intermediate_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GPT2Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        hidden_size = config.hidden_size
        inner_dim = config.n_inner if config.n_inner is not None else 4 * hidden_size
        self.ln_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner_dim, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        past_key_values: Cache | None,
        backend: str,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), mask, causal, past_key_values, backend)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2PreTrainedModel(PreTrainedModel):
    config_class = GPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block"]
    _skip_keys_device_placement = ["past_key_values"]
    # transformers checks these before accepting an attn_implementation; `backend_from_config` maps the names.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_cache_class = True
    # Old checkpoints carry the causal-mask buffers of the original implementation.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$", r"attn\.masked_bias$"]

    def __init__(self, config: GPT2Config, *inputs, **kwargs):
        if getattr(config, "add_cross_attention", False):
            raise ValueError("this GPT-2 implementation has no cross-attention (config.add_cross_attention=True)")
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's scheme: N(0, initializer_range), with both residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            residual_std = std / (2 * self.config.n_layer) ** 0.5
            _init.normal_(module.c_proj.weight, mean=0.0, std=residual_std)


class GPT2Model(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions | tuple:
        """Extra keyword arguments (e.g. `cache_position` from transformers 4.x `generate`) are accepted and unused."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: the fused kernels never form attention weights")
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache), not legacy tuples")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False
        if checkpointing:
            past_key_values = None
        elif use_cache and past_key_values is None:
            past_key_values = DynamicCache()

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if position_ids is None:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(
                past_length, past_length + inputs_embeds.shape[1], device=inputs_embeds.device
            ).unsqueeze(0)
        hidden_states = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids)
        hidden_states = self.drop(hidden_states)

        mask, causal = padding_mask_and_causality(attention_mask)
        backend = backend_from_config(self.config)
        all_hidden_states = []
        for block in self.h:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block.__call__, hidden_states, mask, causal, None, backend
                )
            else:
                hidden_states = block(hidden_states, mask, causal, past_key_values, backend)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        output = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


class GPT2LMHeadModel(GPT2PreTrainedModel, GenerationMixin):
    # transformers 5 reads the {target: source} mapping; transformers 4 iterates it and sees the target name.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions | tuple:
        """`labels` are shifted inside (set labels = input_ids); -100 is ignored. `logits_to_keep`: an int keeps
        the last that many positions (0 keeps all), a tensor gives the positions to keep. Extra keyword arguments
        go to the loss function (e.g. `num_items_in_batch`)."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    """Classifies each sequence from the hidden state of its last non-padding token."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    def _last_token_index(self, input_ids: torch.LongTensor | None, batch_size: int) -> torch.Tensor | int:
        """Index of the last token that is not `pad_token_id` in each row (the last position without one)."""
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None:
            if batch_size != 1:
                raise ValueError("cannot classify batches larger than 1 without config.pad_token_id")
            return -1
        if input_ids is None:
            logger.warning_once("padding cannot be detected in inputs_embeds; classifying from the last position")
            return -1
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return (positions * (input_ids != pad_token_id)).argmax(-1)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
            return nn.functional.mse_loss(logits, labels)
        if self.config.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        last = self._last_token_index(input_ids, batch_size)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last]

        loss = self._loss(pooled_logits, labels.to(logits.device)) if labels is not None else None
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["GPT2PreTrainedModel", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification"]
