"""Padded batches run unpadded: the causal-LM heads pack a padded batch's kept tokens into one row, and keep
the rows at full length where a cache, attention weights, or labels predicted from padding need them. Against stock
transformers and against the same rows run at full length."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.remote_code import assert_close_rel
from tests.test_packed import (FAMILIES, LayerInputs, load_ours, load_stock, packed_row, padded_batch, per_document,
                               set_backend)


def step(model, ids, keep, labels, **extra):
    """Loss, logits and gradients of one forward + backward (logits kept in training), with the hidden states of
    the same forward run without gradients (asked for while gradients are recorded, they keep the padded rows)."""
    model.config.keep_logits_in_training = True
    model.zero_grad(set_to_none=True)
    if extra.pop("embeddings", False):  # the same tokens as inputs_embeds, through each model's own table
        extra["inputs_embeds"], ids = model.get_input_embeddings()(ids), None
    out = model(input_ids=ids, attention_mask=keep, labels=labels, **extra)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        extra = {key: value.detach() if key == "inputs_embeds" else value for key, value in extra.items()}
        out.hidden_states = model(input_ids=ids, attention_mask=keep, output_hidden_states=True, **extra).hidden_states
    return out, grads


def assert_same_step(got, want, keep, tol=1e-5):
    (out, grads), (ref, ref_grads) = got, want
    kept = keep.bool()[..., None]
    assert_close_rel(out.loss.detach(), ref.loss.detach(), tol, "loss")
    assert_close_rel(out.logits.detach() * kept, ref.logits.detach() * kept, tol, "logits at kept positions")
    assert len(out.hidden_states) == len(ref.hidden_states)
    for index, (state, expected) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close_rel(state.detach() * kept, expected.detach() * kept, tol, f"hidden state {index}")
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close_rel(grads[name], ref_grads[name], tol, f"grad {name}")


ODD_LENGTHS = (17, 9, 1, 12)  # 39 of 68 tokens kept


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("variant", ["plain", "fused loss", "checkpointing", "num_items_in_batch", "inputs_embeds"])
def test_padded_batch_runs_unpadded_and_matches_stock(family, padding, variant, tmp_path_factory):
    """The layers see one row of the kept tokens; logits and hidden states at kept positions, the loss and every
    gradient match stock (LLaMA: 2 key/value heads for 4 query heads), and padded positions hold zeros."""
    ours, _ = load_ours(family, tmp_path_factory)
    stock = load_stock(family, tmp_path_factory)
    set_backend(ours, "auto")
    ids, keep, labels = padded_batch(padding, ODD_LENGTHS, 17)
    extra = {"num_items_in_batch": {"num_items_in_batch": torch.tensor(29)}, "inputs_embeds": {"embeddings": True}}
    extra = extra.get(variant, {})
    for model in (ours, stock):
        model.train()
        if variant == "checkpointing":
            model.gradient_checkpointing_enable()
    try:
        want = step(stock, ids, keep, labels, **extra)
        with LayerInputs(ours) as seen:
            got = step(ours, ids, keep, labels, **extra)
            if variant == "fused loss":
                ours.config.keep_logits_in_training = False
                fused = ours(input_ids=ids, attention_mask=keep, labels=labels)
                assert fused.logits is None
                assert_close_rel(fused.loss.detach(), want[0].loss.detach(), 1e-5, "fused loss")
    finally:
        for model in (ours, stock):
            model.gradient_checkpointing_disable()
            if variant == "checkpointing":  # enabling it hooked the embeddings; the cached models go on
                model.disable_input_require_grads()
    kept = int(keep.sum())
    assert set(seen.shapes) == {(1, kept, 32)}
    assert_same_step(got, want, keep)
    padded = ~keep.bool()
    assert float(got[0].logits[padded].abs().max()) == 0.0
    assert all(float(state[padded].abs().max()) == 0.0 for state in got[0].hidden_states)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_qwen_padded_batch_unpadded_matches_its_rows_at_full_length(mode, tmp_path_factory):
    """Qwen against its padded path (tested against the original in test_qwen.py). In eval mode the rows of
    16 and 9 tokens pass seq_length 8: an NTK alpha per row from its kept length, logn from absolute positions."""
    model, _ = load_ours("qwen", tmp_path_factory)
    model.train(mode == "train")
    set_backend(model, "auto")
    ids, keep, labels = padded_batch("left")
    model.config.unpad_batches = False
    try:
        with LayerInputs(model) as seen:
            full_rows = step(model, ids, keep, labels)
    finally:
        model.config.unpad_batches = True
    with LayerInputs(model) as seen_unpadded:
        unpadded = step(model, ids, keep, labels)
    # each step: a training forward, then one without gradients for the hidden states
    assert seen.shapes == [(3, 16, 32)] * 2 and seen_unpadded.shapes == [(1, int(keep.sum()), 32)] * 2
    assert_same_step(unpadded, full_rows, keep)


def test_lora_gradients_of_an_unpadded_batch_match_its_rows_at_full_length(tmp_path_factory):
    peft = pytest.importorskip("peft", reason="peft is in the test extra")
    import transformers

    _, folder = load_ours("llama", tmp_path_factory)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # peft freezes it
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False))
    lora.train()
    ids, keep, labels = padded_batch("right", ODD_LENGTHS, 17)
    with LayerInputs(model) as seen:
        unpadded = step(lora, ids, keep, labels)
        model.config.unpad_batches = False
        full_rows = step(lora, ids, keep, labels)
    assert seen.shapes == [(1, int(keep.sum()), 32)] * 2 + [(4, 17, 32)] * 2  # training, then hidden states
    assert unpadded[1] and all("lora_" in name for name in unpadded[1])
    assert_same_step(unpadded, full_rows, keep)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["labels predicted from padding", "cache", "attention weights", "logits_to_keep",
                                  "unpad_batches=False"])
def test_padded_batches_that_keep_their_rows_at_full_length(family, case, tmp_path_factory):
    model, _ = load_ours(family, tmp_path_factory)
    set_backend(model, "auto")
    ids, keep, labels = padded_batch("right")
    kwargs = {"input_ids": ids, "attention_mask": keep}
    if case == "labels predicted from padding":  # right padding: padded positions predict padding tokens
        model.train()
        kwargs["labels"] = ids
    else:
        model.eval()
        kwargs.update({"cache": {"use_cache": True}, "attention weights": {"output_attentions": True},
                       "logits_to_keep": {"logits_to_keep": 1}}.get(case, {}))
    model.config.unpad_batches = case != "unpad_batches=False"
    try:
        with LayerInputs(model) as seen, torch.no_grad():
            out = model(**kwargs)
    finally:
        model.config.unpad_batches = True
    assert seen.shapes == [(3, 16, 32)]
    if case == "labels predicted from padding" and family != "qwen":
        stock = load_stock(family, tmp_path_factory).train()
        with torch.no_grad():
            assert_close_rel(out.loss, stock(**kwargs).loss, 1e-5, "loss with labels at padded positions")


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_asked_for_a_cache_keeps_the_rows_and_returns_it(family, tmp_path_factory):
    """``use_cache=True`` in training with gradients: the rows stay padded and the cache comes back, as stock
    (it ran unpadded and returned none, or one when a label was predicted from padding); unset, no cache is
    built in training and the batch runs unpadded, with the same loss."""
    model, _ = load_ours(family, tmp_path_factory)
    model.train()
    set_backend(model, "auto")
    ids, keep, labels = padded_batch("right")
    with LayerInputs(model) as seen:
        out = model(input_ids=ids, attention_mask=keep, labels=labels, use_cache=True)
    assert seen.shapes == [(*ids.shape, 32)]
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    with LayerInputs(model) as seen:
        unpadded = model(input_ids=ids, attention_mask=keep, labels=labels)
    assert seen.shapes == [(1, int(keep.sum()), 32)] and unpadded.past_key_values is None
    assert_close_rel(out.loss.detach(), unpadded.loss.detach(), 1e-5, "loss with and without the cache")
    checkpointed = copy.deepcopy(model)  # gradient checkpointing drops the cache (as stock): no reason to pad
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with LayerInputs(checkpointed) as seen:
        dropped = checkpointed(input_ids=ids, attention_mask=keep, labels=labels, use_cache=True)
    assert seen.shapes[0] == (1, int(keep.sum()), 32) and dropped.past_key_values is None


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_without_gradients_keeps_the_rows_and_the_cache(family, tmp_path_factory):
    """A rollout in training mode under ``torch.no_grad()`` (a hand-written decode loop) builds the cache it
    asks for, as in eval mode: the rows stay padded, the cache comes back, and the next step decodes on it as a
    whole forward does (unpadded, it returned no cache and the next step failed on the mask's length)."""
    model, _ = load_ours(family, tmp_path_factory)
    model.train()
    set_backend(model, "auto")
    ids, keep, _ = padded_batch("left")
    following = torch.randint(0, 97, (ids.shape[0], 1))
    whole_ids, whole_keep = torch.cat([ids, following], 1), F.pad(keep, (0, 1), value=1)
    with torch.no_grad():
        with LayerInputs(model) as seen:
            out = model(input_ids=ids, attention_mask=keep, use_cache=True)
        assert seen.shapes == [(*ids.shape, 32)] and out.past_key_values is not None
        step = model(input_ids=following, attention_mask=whole_keep, past_key_values=out.past_key_values).logits
        whole = model(input_ids=whole_ids, attention_mask=whole_keep).logits  # training mode: Qwen's NTK off
    assert_close_rel(step[:, -1], whole[:, -1], 1e-5, "logits of the step after a cached training-mode prefill")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen"])
def test_packed_position_ids_with_use_cache_in_training_stay_inside_each_document(family, tmp_path_factory):
    """Stock transformers 5 makes a cache in a training forward with ``use_cache=True`` (most configs' default)
    and then no longer looks for packing in the position ids: its documents attend to each other. Ours keeps
    them apart."""
    model, _ = load_ours(family, tmp_path_factory)
    model.train()
    set_backend(model, "auto")
    model.config.keep_logits_in_training = True
    ids, packing = packed_row("position_ids")
    logits = model(input_ids=ids, use_cache=True, **packing).logits
    assert_close_rel(logits.detach(), per_document(model, ids)[0], 1e-5, "logits")


def test_compiled_forward_keeps_rows_at_full_length_without_a_host_read(tmp_path_factory):
    """torch.compile(fullgraph=True) fails on a host read: the compiled forward keeps the padding mask."""
    model, _ = load_ours("llama", tmp_path_factory)
    model.train()
    set_backend(model, "auto")
    ids, keep, labels = padded_batch("left")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=keep, labels=labels).loss
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        traced = compiled(input_ids=ids, attention_mask=keep, labels=labels).loss
    assert_close_rel(traced, eager, 1e-5, "compiled loss")
