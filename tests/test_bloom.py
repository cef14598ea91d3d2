"""modeling_bloom.py against stock transformers BLOOM with the same weights, loaded through trust_remote_code."""

from __future__ import annotations

import copy
import inspect
import math
import sys
import tempfile

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
    DynamicCache,
)
from transformers.models.bloom import modeling_bloom as stock_bloom

from remote_code import assert_close_rel, left_padded_mask, relative_error, right_padded_mask, save_with_remote_code

FP32_TOL = 1e-5
VOCAB = 101
PAD = 0
AUTO_MAP = {
    "AutoModel": "modeling_bloom.BloomModel",
    "AutoModelForCausalLM": "modeling_bloom.BloomForCausalLM",
    "AutoModelForSequenceClassification": "modeling_bloom.BloomForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_bloom.BloomForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_bloom.BloomForQuestionAnswering",
}
STOCK_TO_AUTO = {
    BloomModel: AutoModel,
    BloomForCausalLM: AutoModelForCausalLM,
    BloomForSequenceClassification: AutoModelForSequenceClassification,
    BloomForTokenClassification: AutoModelForTokenClassification,
    BloomForQuestionAnswering: AutoModelForQuestionAnswering,
}
# "auto" = no attn_backend and attn_implementation left unset, which the kernel layer reads as auto.
CPU_BACKENDS = ["auto", "chunked", "eager"]
PADDINGS = ["none", "left", "right"]


# ------------------------------------------------------------------------------------------------
# Helpers (local to this file)
# ------------------------------------------------------------------------------------------------


def tiny_config(n_head: int = 3, head_dim: int = 8, **overrides) -> BloomConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=n_head * head_dim,
        n_layer=2,
        n_head=n_head,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return BloomConfig(**values)


def randomize_(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (biases and LayerNorms included) so every term of the math shows up."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layernorm" in name or "ln_f" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif "word_embeddings" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


_PAIRS: dict = {}
_FOLDERS: list = []  # where the cached pairs' checkpoints go: pytest's temporary directory, not $TMPDIR


@pytest.fixture(scope="module", autouse=True)
def _pair_folders(tmp_path_factory):
    _FOLDERS.append(tmp_path_factory.mktemp("bloom-pairs"))
    yield
    _FOLDERS.pop()


def load_pair(stock_cls=BloomForCausalLM, attn_implementation: str | None = None, **config_overrides):
    """(stock model, our model loaded with trust_remote_code) with the same random weights; cached per setup."""
    key = (stock_cls.__name__, attn_implementation, tuple(sorted(config_overrides.items())))
    if key not in _PAIRS:
        torch.manual_seed(0)
        stock = stock_cls(tiny_config(**config_overrides))
        randomize_(stock)
        stock.eval()
        folder = save_with_remote_code(stock, tempfile.mkdtemp(prefix="bloom-", dir=_FOLDERS[-1]), ["modeling_bloom.py"],
                                       AUTO_MAP)
        kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        ours = STOCK_TO_AUTO[stock_cls].from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
        assert type(ours).__module__.startswith("transformers_modules"), type(ours).__module__
        assert type(ours).__name__ == stock_cls.__name__
        _PAIRS[key] = (stock, ours, folder)
    stock, ours, _ = _PAIRS[key]
    return stock, ours


def use_backend(model, backend: str) -> None:
    model.config.attn_backend = None if backend == "auto" else backend


def make_inputs(batch_lengths: list[int], total: int, padding: str, seed: int = 0):
    """Random token ids (pad id at padded positions) and their 0/1 mask (None for 'none')."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(batch_lengths), total), generator=generator)
    if padding == "none":
        return ids, None
    mask = (left_padded_mask if padding == "left" else right_padded_mask)(batch_lengths, total)
    return ids.masked_fill(mask == 0, PAD), mask


def kept(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


def our_module(model):
    return sys.modules[type(model).__module__]


# ------------------------------------------------------------------------------------------------
# ALiBi
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head", [1, 2, 3, 5, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_stock_build_alibi_tensor(n_head):
    _, ours = load_pair()
    stock_alibi = stock_bloom.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)
    stock_slopes = stock_alibi.view(n_head, 2)[:, 1]  # slope x position 1
    torch.testing.assert_close(our_module(ours).alibi_slopes(n_head), stock_slopes, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_base_models_build_alibi_tensor_gives_stocks_dense_bias(dtype):
    """Code that runs the blocks itself asks the base model for the dense bias; ours had no such method."""
    stock, ours = load_pair()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0]])
    for heads in (4, 6):
        expected = stock.transformer.build_alibi_tensor(mask, heads, dtype)
        got = ours.transformer.build_alibi_tensor(mask, heads, dtype)
        assert got.shape == expected.shape == (3 * heads, 1, 7) and got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_relative_alibi_differs_from_stock_by_a_row_constant(padding):
    """slope*(key - query) vs stock's slope*(cumsum(mask)-1): equal up to a per-row constant on visible keys."""
    n_head, total = 6, 9
    mask = (left_padded_mask if padding == "left" else right_padded_mask)([9, 6, 3], total)
    stock_bias = stock_bloom.build_alibi_tensor(mask, n_head, torch.float64).view(3, n_head, 1, total)
    _, ours = load_pair()
    slopes = our_module(ours).alibi_slopes(n_head).double()
    positions = torch.arange(total, dtype=torch.float64)
    our_bias = slopes[:, None, None] * (positions[None, None, :] - positions[None, :, None])  # [h, q, k]
    difference = stock_bias - our_bias[None]  # [b, h, q, k]
    visible = mask.bool()[:, None, None, :] & (positions[None, :] <= positions[:, None])[None, None]
    visible = visible & mask.bool()[:, None, :, None]  # real query rows only
    row_constant = difference.masked_fill(~visible, 0).sum(-1, keepdim=True) / visible.sum(-1, keepdim=True).clamp(1)
    spread = (difference - row_constant).masked_fill(~visible, 0).abs().max().item()
    assert spread < 1e-9
    real_rows = visible.any(-1, keepdim=True).expand_as(row_constant)
    assert row_constant[real_rows].unique().numel() > n_head  # the constant really varies from row to row


# ------------------------------------------------------------------------------------------------
# Logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head", [1, 3, 6, 8, 12])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_match_stock(n_head, backend):
    stock, ours = load_pair(n_head=n_head)
    use_backend(ours, backend)
    for padding in PADDINGS:
        ids, mask = make_inputs([13, 9, 4], 13, padding, seed=n_head)
        with torch.no_grad():
            expected = stock(ids, attention_mask=mask).logits
            actual = ours(ids, attention_mask=mask).logits
        keep = kept(mask, ids)
        assert_close_rel(actual[keep], expected[keep], FP32_TOL, f"{n_head} heads, {backend}, {padding} padding")


def test_padding_masks_of_any_dtype_match_stock_and_weighted_ones_are_refused():
    """Stock BLOOM multiplies its ALiBi positions by the mask's values: a mask of 0 and 1 in any dtype gives
    stock's logits; a 2 or a 0.5 (which stock turns into other distances) is refused by name."""
    stock, ours = load_pair()
    ids, mask = make_inputs([11, 6], 11, "left", seed=5)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        for dtype in (torch.bool, torch.int32, torch.float32, torch.bfloat16):
            actual = ours(ids, attention_mask=mask.to(dtype)).logits
            assert_close_rel(actual[mask.bool()], expected[mask.bool()], FP32_TOL, f"{dtype} mask")
        for weighted in (mask * 2, mask * 0.5):
            assert relative_error(stock(ids, attention_mask=weighted).logits[mask.bool()], expected[mask.bool()]) > 1e-4
            with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
                ours(ids, attention_mask=weighted)
            with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):  # runs unpadded
                ours(ids, attention_mask=weighted, use_cache=False)
    ours.train()
    try:
        with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):  # unpadded, the model gets none
            ours(ids, attention_mask=mask * 2, labels=ids.masked_fill(mask == 0, -100))
    finally:
        ours.eval()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hidden_states_and_inputs_embeds_match_stock(backend):
    stock, ours = load_pair()
    use_backend(ours, backend)
    ids, mask = make_inputs([11, 6], 11, "left", seed=3)
    with torch.no_grad():
        expected = stock.transformer(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = stock.transformer.word_embeddings(ids)
        actual = ours.transformer(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected) == stock.config.n_layer + 1
    keep = mask.bool()
    for layer, (a, e) in enumerate(zip(actual, expected)):
        assert_close_rel(a[keep], e[keep], FP32_TOL, f"hidden state {layer}")


# modules stock calls on the attention weights that drop otherwise than a kernel's elementwise dropout, or not at all
OTHER_ATTENTION_DROPOUTS = {
    "Softsign": torch.nn.Softsign,
    "AlphaDropout": lambda: torch.nn.AlphaDropout(0.3),
    "Dropout2d": lambda: torch.nn.Dropout2d(0.3),
}


def pair_with_attention_dropout(setting: str):
    """Copies of a pair with ``attention_dropout`` 0.5, every layer's attention-dropout module set up as ``setting``
    says (the model in training mode, but in eval for Monte-Carlo dropout)."""
    models = tuple(copy.deepcopy(model) for model in load_pair(attention_dropout=0.5))
    for model in models:
        model.train(setting != "monte_carlo_in_eval")
        for layer in model.transformer.h:
            attention = layer.self_attention
            if setting == "identity_in_training":
                attention.attention_dropout = torch.nn.Identity()
            elif setting in OTHER_ATTENTION_DROPOUTS:
                attention.attention_dropout = OTHER_ATTENTION_DROPOUTS[setting]()
            else:
                attention.attention_dropout.train(setting == "monte_carlo_in_eval")
    return models


@pytest.mark.parametrize("setting", ["dropouts_off_in_training", "identity_in_training"])
def test_an_attention_dropout_switched_off_by_its_module_trains_as_stock(setting):
    """Stock calls ``attention_dropout`` on the weights, so that module decides: trainers switch dropouts off one
    by one (``.eval()``) or put ``nn.Identity`` in their place. Ours read its ``p`` by the attention's own mode:
    it dropped in the first case and failed on the second (the Identity has no ``p``)."""
    stock, ours = pair_with_attention_dropout(setting)
    ids, mask = make_inputs([7, 5], 7, "right", seed=23)
    results = []
    for model in (stock, ours):
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (expected, expected_grads), (loss, grads) = results
    assert_close_rel(loss, expected, FP32_TOL, "loss")
    for (name, _), grad, want in zip(stock.named_parameters(), grads, expected_grads):
        assert_close_rel(grad, want, 1e-4, f"grad of {name}")


def test_monte_carlo_attention_dropout_in_eval_drops_as_stock():
    """``model.eval()`` with only the attention dropouts in training mode: stock drops attention weights (the
    module is called), ours never did (the attention's mode decided)."""
    ids, mask = make_inputs([7, 5], 7, "right", seed=24)
    plain = load_pair(attention_dropout=0.5)[1](ids, attention_mask=mask).logits.detach()
    for model in pair_with_attention_dropout("monte_carlo_in_eval"):
        with torch.no_grad():
            runs = [model(ids, attention_mask=mask).logits for _ in range(2)]
        kept = mask.bool()
        assert relative_error(runs[0][kept], plain[kept]) > 0.05, type(model).__module__
        assert relative_error(runs[0][kept], runs[1][kept]) > 0.05, type(model).__module__


@pytest.mark.parametrize("module", list(OTHER_ATTENTION_DROPOUTS))
def test_an_attention_dropout_module_a_kernel_cannot_run_is_named(module):
    """AlphaDropout shifts the weights, Dropout2d drops whole heads: ran as an elementwise dropout by their ``p``."""
    stock, ours = pair_with_attention_dropout(module)
    ids, _ = make_inputs([6], 6, "none", seed=25)
    stock(ids, labels=ids).loss.backward()
    with pytest.raises(TypeError, match=f"the attention dropout is a {module}"):
        ours(ids, labels=ids)


@pytest.mark.skipif(
    "logits_to_keep" not in inspect.signature(BloomForCausalLM.forward).parameters,
    reason="this transformers' BloomForCausalLM has no logits_to_keep to compare with",
)
def test_logits_to_keep_int_and_tensor_match_stock():
    """An int keeps the last positions' logits, a 1-D tensor the logits of the positions it lists."""
    stock, ours = load_pair()
    ids, _ = make_inputs([9, 9], 9, "none", seed=22)  # unpadded: position 0 is kept too
    with torch.no_grad():
        for keep in (3, torch.tensor([0, 4, 8])):
            expected = stock(ids, logits_to_keep=keep).logits
            actual = ours(ids, logits_to_keep=keep).logits
            assert_close_rel(actual, expected, FP32_TOL, f"logits_to_keep={keep}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_apply_residual_connection_post_layernorm(backend):
    stock, ours = load_pair(n_head=4, apply_residual_connection_post_layernorm=True)
    plain_stock, _ = load_pair(n_head=4)
    use_backend(ours, backend)
    ids, mask = make_inputs([10, 7], 10, "left", seed=5)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        actual = ours(ids, attention_mask=mask).logits
        plain = plain_stock(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert relative_error(plain[keep], expected[keep]) > 1e-2  # the option changes the result
    assert_close_rel(actual[keep], expected[keep], FP32_TOL, "post-layernorm residual")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pretraining_tp_slow_but_exact(backend):
    stock, ours = load_pair(n_head=4, pretraining_tp=2, slow_but_exact=True)
    fast_stock, _ = load_pair(n_head=4, pretraining_tp=2, slow_but_exact=False)
    use_backend(ours, backend)
    ids, mask = make_inputs([9, 5], 9, "right", seed=6)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        actual = ours(ids, attention_mask=mask).logits
        fast = fast_stock(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert relative_error(fast[keep], expected[keep]) > 1e-3  # stock's tp path really differs (it drops the biases)
    assert_close_rel(actual[keep], expected[keep], FP32_TOL, "pretraining_tp=2, slow_but_exact")


# ------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------


def test_forced_sdpa_backend_raises_clear_error_and_selection_is_per_forward(monkeypatch):
    stock, ours = load_pair()
    ids, mask = make_inputs([8, 5], 8, "left", seed=7)
    # left unset (read as auto), so that stock BLOOM shares the config; transformers 5.0 needs its default "sdpa"
    assert ours.config._attn_implementation == (None if our_module(ours).LEAVE_ATTN_IMPLEMENTATION_UNSET else "sdpa")
    use_backend(ours, "auto")
    with torch.no_grad():
        keep = mask.bool()
        expected = stock(ids, attention_mask=mask).logits[keep]
        assert_close_rel(ours(ids, attention_mask=mask).logits[keep], expected, FP32_TOL, "auto")
        ours.config.attn_backend = "sdpa"
        with pytest.raises(ValueError, match=r"'sdpa' cannot take this call: .*ALiBi"):
            ours(ids, attention_mask=mask)
        ours.config.attn_backend = None
        monkeypatch.setenv("USE_FLASH_ATTN", "sdpa")
        with pytest.raises(ValueError, match="ALiBi"):
            ours(ids, attention_mask=mask)
        monkeypatch.setenv("USE_FLASH_ATTN", "false")
        ours(ids, attention_mask=mask)


def test_attn_implementation_reaches_the_kernel_layer(monkeypatch):
    stock, ours = load_pair(attn_implementation="eager")
    module = our_module(ours)
    seen = []
    real_attention = module.attention

    def recording_attention(*args, **kwargs):
        seen.append(kwargs["backend"])
        assert kwargs["causal"] is True and kwargs["alibi_slopes"] is not None
        assert kwargs["attention_mask"] is None or kwargs["attention_mask"].dim() == 2
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(module, "attention", recording_attention)
    use_backend(ours, "auto")
    ids, mask = make_inputs([7, 4], 7, "left", seed=8)
    with torch.no_grad():
        ours(ids, attention_mask=mask)
        assert seen and set(seen) == {"eager"}
        seen.clear()
        ours.set_attn_implementation(None)
        actual = ours(ids, attention_mask=mask).logits
        assert set(seen) == {"auto"}
        seen.clear()
        ours.config.attn_backend = "chunked"
        ours(ids, attention_mask=mask)
        assert set(seen) == {"chunked"}
        ours.config.attn_backend = None
        ours.set_attn_implementation("eager")
    assert_close_rel(actual[mask.bool()], stock(ids, attention_mask=mask).logits[mask.bool()].detach(), FP32_TOL)


# ------------------------------------------------------------------------------------------------
# Training: loss, gradients, dropout, gradient checkpointing
# ------------------------------------------------------------------------------------------------


def set_checkpointing(model, enable: bool, use_reentrant: bool = False) -> None:
    """activation_checkpointing_* on transformers >= 5.x that have it, else the gradient_checkpointing_* names."""
    if enable and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def loss_and_grads(model, ids, mask, labels) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def lm_batch(padding: str, seed: int):
    """Labels ignore padded tokens and tokens right after padding (whose prediction comes from a padded row)."""
    ids, mask = make_inputs([12, 9, 5], 12, padding, seed=seed)
    after_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = ids.masked_fill((mask == 0) | after_padding, -100)
    return ids, mask, labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_loss_and_all_gradients_match_stock(backend, padding):
    stock, ours = load_pair()
    use_backend(ours, backend)
    ids, mask, labels = lm_batch(padding, seed=9)
    stock.train(), ours.train()
    try:
        expected_loss, expected = loss_and_grads(stock, ids, mask, labels)
        actual_loss, actual = loss_and_grads(ours, ids, mask, labels)
    finally:
        stock.eval(), ours.eval()
    assert_close_rel(actual_loss, expected_loss, FP32_TOL, "loss")
    assert actual.keys() == expected.keys() and len(expected) == len(dict(stock.named_parameters()))
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        assert_close_rel(actual[name], grad, FP32_TOL, f"grad {name}")


def test_fused_qkv_gradient_is_stacked_once_not_zero_filled_per_projection():
    """The q/k/v split's backward writes the fused projection's gradient once (a stack), where stock's three
    selections each write a zero-filled full-size copy, then add the three up (``aten::select_backward``)."""
    from torch.profiler import profile

    stock, ours = load_pair()
    ids, mask, labels = lm_batch("right", seed=10)
    ours.train()
    try:
        loss = ours(ids, attention_mask=mask, labels=labels).loss
        with profile() as prof:
            loss.backward()
    finally:
        ours.eval()
        ours.zero_grad(set_to_none=True)
    ops = {event.key: event.count for event in prof.key_averages()}
    assert "aten::select_backward" not in ops, sorted(ops)
    assert ops.get("aten::stack", 0) >= stock.config.n_layer, sorted(ops)


@pytest.mark.parametrize("backend", ["chunked", "eager"])
def test_hidden_dropout_matches_stock_in_training(backend):
    """With only hidden dropout on, both models draw the same masks in the same order from the same seed."""
    stock, ours = load_pair(hidden_dropout=0.25)
    use_backend(ours, backend)
    ids, mask, labels = lm_batch("left", seed=10)
    stock.train(), ours.train()
    # Rows at full length draw stock's masks; an unpadded batch draws them over its kept tokens only.
    ours.config.unpad_batches = False
    try:
        torch.manual_seed(42)
        expected_loss, expected = loss_and_grads(stock, ids, mask, labels)
        torch.manual_seed(42)
        actual_loss, actual = loss_and_grads(ours, ids, mask, labels)
        torch.manual_seed(43)
        other_loss, _ = loss_and_grads(ours, ids, mask, labels)
    finally:
        stock.eval(), ours.eval()
        ours.config.unpad_batches = True
    assert not torch.equal(other_loss, actual_loss)  # dropout is on
    assert_close_rel(actual_loss, expected_loss, FP32_TOL, "loss")
    for name, grad in expected.items():
        assert_close_rel(actual[name], grad, FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("backend", ["chunked", "eager"])
def test_attention_dropout_only_in_training(backend):
    stock, ours = load_pair(attention_dropout=0.3)
    use_backend(ours, backend)
    ids, mask, labels = lm_batch("right", seed=11)
    keep = mask.bool()
    with torch.no_grad():
        eval_logits = ours(ids, attention_mask=mask).logits
        assert_close_rel(eval_logits[keep], stock(ids, attention_mask=mask).logits[keep], FP32_TOL, "eval")
        ours.train()
        try:
            torch.manual_seed(1)
            first = ours(ids, attention_mask=mask).logits
            torch.manual_seed(1)
            again = ours(ids, attention_mask=mask).logits
            torch.manual_seed(2)
            other = ours(ids, attention_mask=mask).logits
        finally:
            ours.eval()
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # reproducible under a seed
    assert relative_error(first[keep], eval_logits[keep]) > 1e-3
    assert relative_error(first[keep], other[keep]) > 1e-3


@pytest.mark.parametrize("backend", ["chunked", "eager"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_matches_plain_backward_with_dropout(backend, use_reentrant):
    _, ours = load_pair(attention_dropout=0.2, hidden_dropout=0.1)
    use_backend(ours, backend)
    ids, mask, labels = lm_batch("left", seed=12)
    ours.train()
    try:
        torch.manual_seed(7)
        expected_loss, expected = loss_and_grads(ours, ids, mask, labels)
        set_checkpointing(ours, True, use_reentrant)
        assert all(block.gradient_checkpointing for block in ours.transformer.h)
        torch.manual_seed(7)
        actual_loss, actual = loss_and_grads(ours, ids, mask, labels)
    finally:
        set_checkpointing(ours, False)
        ours.eval()
    assert_close_rel(actual_loss, expected_loss, FP32_TOL, "loss")
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert_close_rel(actual[name], grad, FP32_TOL, f"grad {name}")


# ------------------------------------------------------------------------------------------------
# KV cache and generation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_decode_matches_full_forward(backend):
    stock, ours = load_pair(n_head=6)
    use_backend(ours, backend)
    prompt, prompt_mask = make_inputs([7, 4], 7, "left", seed=13)
    continuation = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(14))
    full_ids = torch.cat([prompt, continuation], dim=1)
    full_mask = torch.cat([prompt_mask, torch.ones_like(continuation)], dim=1)
    with torch.no_grad():
        expected = stock(full_ids, attention_mask=full_mask).logits
        cache = DynamicCache()
        out = ours(prompt, attention_mask=prompt_mask, past_key_values=cache, use_cache=True)
        steps = [out.logits]
        position = prompt.shape[1]
        for size in (1, 2, 1):  # a 2-token step checks bottom-right causal alignment with a cache
            chunk = full_ids[:, position : position + size]
            out = ours(chunk, attention_mask=full_mask[:, : position + size], past_key_values=out.past_key_values)
            steps.append(out.logits)
            position += size
    assert cache.get_seq_length() == full_ids.shape[1]
    actual = torch.cat(steps, dim=1)
    keep = full_mask.bool()
    assert_close_rel(actual[keep], expected[keep], FP32_TOL, "cached decode vs full forward")


def generation_pair():
    stock, ours = load_pair(n_head=4, head_dim=16)
    ids, mask = make_inputs([9, 6, 3], 9, "left", seed=15)
    return stock, ours, ids, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_and_beam_generate_match_stock_token_for_token(backend):
    stock, ours, ids, mask = generation_pair()
    use_backend(ours, backend)
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        expected = stock.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, **options)
        actual = ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, **options)
        assert expected.shape[1] > ids.shape[1]
        assert len(set(expected[:, ids.shape[1] :].flatten().tolist())) > 2  # not a degenerate repetition
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"{options}")


def test_sampling_and_static_cache_generate_match_stock():
    stock, ours, ids, mask = generation_pair()
    use_backend(ours, "auto")
    sample = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=8, pad_token_id=PAD)
    torch.manual_seed(3)
    expected = stock.generate(ids, attention_mask=mask, **sample)
    torch.manual_seed(3)
    actual = ours.generate(ids, attention_mask=mask, **sample)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    greedy = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    static = ours.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, cache_implementation="static"
    )
    torch.testing.assert_close(static, greedy, rtol=0, atol=0)


def test_compiled_forward_with_a_static_cache_generates_stocks_logits():
    """``model.forward = torch.compile(model.forward)`` with a static cache, as transformers' docs do it: the
    prefill is traced too, and ``generate`` pads BLOOM's 2-D mask to the cache's length, so the queries' positions
    come from the cache (each prompt token saw up to two later ones: logits 10% off)."""
    stock, ours, ids, mask = generation_pair()
    use_backend(ours, "auto")
    assert_compiled_static_generation_matches_stock(stock, ours, ids, mask, new_tokens=4)


def assert_compiled_static_generation_matches_stock(stock, ours, ids, mask, new_tokens: int) -> None:
    """``model.forward = torch.compile(model.forward)`` (transformers' documented recipe) with a static cache:
    stock's tokens and the logits of every step."""
    greedy = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    expected = stock.generate(ids, **greedy, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    ours.forward = torch.compile(ours.forward, backend="aot_eager", dynamic=False)
    try:
        actual = ours.generate(
            ids, **greedy, output_logits=True, return_dict_in_generate=True, cache_implementation="static"
        )
    finally:
        del ours.forward
    torch.testing.assert_close(actual.sequences, expected.sequences, rtol=0, atol=0)
    for step, (ours_logits, stock_logits) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close_rel(ours_logits, stock_logits, FP32_TOL, f"logits of step {step}")


@pytest.mark.parametrize("backend", ["auto", "flex", "eager"])
def test_compiled_prefill_into_a_static_cache_counts_alibi_distances_over_kept_tokens(backend):
    """A mask with holes inside rows (not only left padding): stock's ALiBi counts kept tokens only. A traced
    prefill into a static cache attends through a 4-D mask by cache position, whose slots count the holes too:
    the kept keys' positions go with it (logits 2% off before)."""
    stock, ours, ids, mask = generation_pair()
    mask = mask.clone()
    mask[0, [2, 5, 6]] = 0
    mask[1, 5] = 0
    use_backend(ours, backend)
    assert_compiled_static_generation_matches_stock(stock, ours, ids, mask, new_tokens=3)


def test_static_cache_generate_masks_the_unwritten_slots_in_traced_decoding_steps(monkeypatch):
    """Under torch.compile (``_is_tracing``) a decoding step reads the key length from the mask, which ``generate``
    pads to the static cache's length: its unwritten slots must be masked out. Run eagerly with tracing faked
    where ``generate`` compiles (the one-token decoding steps; the prefill runs as it comes), so no compile."""
    stock, ours, ids, mask = generation_pair()
    use_backend(ours, "auto")
    greedy = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    expected = stock.generate(ids, **greedy, output_logits=True, return_dict_in_generate=True)
    decoding = [False]

    def note_the_step(module, args, kwargs):
        decoding[0] = (kwargs.get("input_ids") if args == () else args[0]).shape[1] == 1

    monkeypatch.setattr(our_module(ours), "_is_tracing", lambda: decoding[0])
    hook = ours.transformer.register_forward_pre_hook(note_the_step, with_kwargs=True)
    try:
        actual = ours.generate(
            ids, **greedy, output_logits=True, return_dict_in_generate=True, cache_implementation="static"
        )
    finally:
        hook.remove()
    assert decoding[0], "no decoding step ran as traced"
    torch.testing.assert_close(actual.sequences, expected.sequences, rtol=0, atol=0)
    assert len(actual.logits) == len(expected.logits) == 4
    for step, (ours_logits, stock_logits) in enumerate(zip(actual.logits, expected.logits)):
        assert_close_rel(ours_logits, stock_logits, FP32_TOL, f"logits of step {step}")


# ------------------------------------------------------------------------------------------------
# Checkpoint compatibility and task heads
# ------------------------------------------------------------------------------------------------


def test_state_dict_keys_and_saving_back_into_the_stock_class(tmp_path):
    stock, ours = load_pair()
    assert ours.state_dict().keys() == stock.state_dict().keys()
    assert ours.lm_head.weight.data_ptr() == ours.transformer.word_embeddings.weight.data_ptr()  # tied
    folder = tmp_path / "bloom-back"
    ours.save_pretrained(folder)
    reloaded, info = BloomForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(reloaded).__module__.startswith("transformers.models.bloom")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = make_inputs([8, 5], 8, "left", seed=16)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits, rtol=0, atol=0
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_base_model_matches_stock(backend):
    stock, ours = load_pair(BloomModel, n_head=6)
    use_backend(ours, backend)
    ids, mask = make_inputs([10, 3], 10, "right", seed=17)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, attention_mask=mask).last_hidden_state
        as_tuple = ours(ids, attention_mask=mask, return_dict=False, use_cache=True)
    assert_close_rel(actual[mask.bool()], expected[mask.bool()], FP32_TOL, "last_hidden_state")
    assert len(as_tuple) == 2 and isinstance(as_tuple[1], DynamicCache)
    torch.testing.assert_close(as_tuple[0], actual, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_matches_stock(backend, padding):
    stock, ours = load_pair(BloomForSequenceClassification, num_labels=3)
    use_backend(ours, backend)
    ids, mask = make_inputs([11, 8, 2], 11, padding, seed=18)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask, labels=labels)
        actual = ours(ids, attention_mask=mask, labels=labels)
    assert actual.logits.shape == (3, 3)
    assert_close_rel(actual.logits, expected.logits, FP32_TOL, "pooled logits")
    assert_close_rel(actual.loss, expected.loss, FP32_TOL, "loss")


@pytest.mark.parametrize(
    "num_labels, problem_type",
    [(1, None), (3, "multi_label_classification"), (3, "regression"), (3, "single_label_classification")],
)
def test_sequence_classification_regression_multi_label_and_soft_label_losses_match_stock(num_labels, problem_type):
    """One label means regression: MSE over the squeezed [batch, 1] logits; multi-label takes BCE with logits;
    single-label takes class probabilities [batch, num_labels] as targets too, as stock BLOOM's loss does."""
    stock, ours = load_pair(BloomForSequenceClassification, num_labels=num_labels, problem_type=problem_type)
    ids, mask = make_inputs([9, 5, 2], 9, "left", seed=23)
    if problem_type == "single_label_classification":
        labels = torch.randn(3, num_labels).softmax(-1)
    elif problem_type == "multi_label_classification":
        labels = torch.rand(3, num_labels)
    else:
        labels = torch.randn(3, num_labels).squeeze(-1)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask, labels=labels)
        actual = ours(ids, attention_mask=mask, labels=labels)
    assert_close_rel(actual.logits, expected.logits, FP32_TOL, "pooled logits")
    assert_close_rel(actual.loss, expected.loss, FP32_TOL, f"{problem_type} loss")


def test_sequence_classification_without_a_pad_token_takes_one_row_only_as_stock():
    """Without pad_token_id the last token is pooled, which stock allows for batch size 1 only."""
    stock, ours = load_pair(BloomForSequenceClassification, num_labels=2, pad_token_id=None)
    ids, _ = make_inputs([9, 9], 9, "none", seed=24)
    for model in (stock, ours):
        with pytest.raises(ValueError, match="batch sizes > 1"):
            model(ids)
    with torch.no_grad():
        assert_close_rel(ours(ids[:1]).logits, stock(ids[:1]).logits, FP32_TOL, "one row without a pad token")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_classification_matches_stock(backend):
    stock, ours = load_pair(BloomForTokenClassification, num_labels=5)
    use_backend(ours, backend)
    ids, mask = make_inputs([9, 4], 9, "left", seed=19)
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(20)).masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask, labels=labels)
        actual = ours(ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    assert_close_rel(actual.logits[keep], expected.logits[keep], FP32_TOL, "token logits")
    assert_close_rel(actual.loss, expected.loss, FP32_TOL, "loss")


def test_token_classification_dropout_matches_stock_in_training():
    """The head's dropout (classifier_dropout) draws stock's mask from the same seed; eval mode has none."""
    stock, ours = load_pair(BloomForTokenClassification, num_labels=5, classifier_dropout=0.5)
    ids, _ = make_inputs([9, 9], 9, "none", seed=25)
    with torch.no_grad():
        evaluated = ours(ids).logits
        stock.train(), ours.train()
        try:
            torch.manual_seed(3)
            expected = stock(ids).logits
            torch.manual_seed(3)
            trained = ours(ids).logits
        finally:
            stock.eval(), ours.eval()
        assert_close_rel(evaluated, stock(ids).logits, FP32_TOL, "eval logits")
    assert relative_error(trained, evaluated) > 1e-2
    assert_close_rel(trained, expected, FP32_TOL, "train-mode logits with classifier dropout")


def test_question_answering_matches_stock():
    """Unpadded rows: the span logits at padded positions are not defined (README)."""
    stock, ours = load_pair(BloomForQuestionAnswering)
    ids, _ = make_inputs([9, 9, 9], 9, "none", seed=26)
    spans = dict(start_positions=torch.tensor([4, 5, 7]), end_positions=torch.tensor([6, 8, 8]))
    with torch.no_grad():
        expected, actual = stock(ids, **spans), ours(ids, **spans)
    assert_close_rel(actual.start_logits, expected.start_logits, FP32_TOL, "start logits")
    assert_close_rel(actual.end_logits, expected.end_logits, FP32_TOL, "end logits")
    assert_close_rel(actual.loss, expected.loss, FP32_TOL, "loss")


# ------------------------------------------------------------------------------------------------
# GPU (run on the GPU machine): bf16 through every ALiBi-capable backend vs the fp32 stock model
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_bf16_cuda_backends_match_fp32_stock_and_beat_bf16_stock_at_2048_tokens(tmp_path):
    config = tiny_config(n_head=8, head_dim=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    stock = BloomForCausalLM(config)
    randomize_(stock)
    folder = save_with_remote_code(stock.eval(), tmp_path / "bloom", ["modeling_bloom.py"], AUTO_MAP)
    ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    assert type(ours).__module__.startswith("transformers_modules")
    ours = ours.cuda().eval()
    stock = stock.cuda()
    module = our_module(ours)

    ran, refused = [], []
    for seq, lengths, padding in ((77, [77, 50, 9], "left"), (64, [64, 31, 5], "right")):
        ids, mask = make_inputs(lengths, seq, padding, seed=seq)
        ids, mask = ids.cuda(), mask.cuda()
        with torch.no_grad():
            expected = stock(ids, attention_mask=mask).logits.float()
            for backend in module.available_backends("cuda"):
                ours.config.attn_backend = backend
                try:
                    actual = ours(ids, attention_mask=mask).logits.float()
                except ValueError as error:
                    assert "cannot take this call" in str(error) and "ALiBi" in str(error), str(error)
                    refused.append(backend)
                    continue
                ran.append(backend)
                keep = mask.bool()
                assert_close_rel(actual[keep], expected[keep], 2e-2, f"bf16 {backend}, {padding} padding")
    assert {"chunked", "eager"} <= set(ran)
    assert set(refused) <= {"sdpa", "xformers"}

    # Long context: stock BLOOM rounds slope x absolute position to bf16; ours adds relative ALiBi in fp32.
    ids = torch.randint(3, VOCAB, (1, 2048), generator=torch.Generator().manual_seed(21)).cuda()
    ours.config.attn_backend = None
    with torch.no_grad():
        reference = stock(ids).logits.float()
        ours_error = relative_error(ours(ids).logits.float(), reference)
        stock_bf16 = stock.to(torch.bfloat16)
        stock_error = relative_error(stock_bf16(ids).logits.float(), reference)
    assert ours_error < 2e-2, ours_error
    assert ours_error < stock_error, (ours_error, stock_error)
