"""GPT-2 options and heads beyond tests/test_gpt2.py's core checks (whose helpers this file imports): cross-attention
with a padded encoder and its cache, positions after a cache, token_type_ids, each dropout in training, logits_to_keep,
the double-heads, classification, token-classification and QA heads against stock. Found missing by mutating the
model code."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
)

from remote_code import assert_close_rel, left_padded_mask, right_padded_mask, save_with_remote_code
from test_gpt2 import LENGTHS, PAD, TOTAL, VOCAB, load_pair, random_ids, tiny_config


def load_head_pair(tmp_path, stock_class, auto_class, class_name: str, **overrides):
    """Like `load_pair`, for a head that test_gpt2's auto map does not name (`auto_class` loads `class_name`)."""
    torch.manual_seed(0)
    stock = stock_class(tiny_config(**overrides)).eval()
    auto_name = "AutoModel" if auto_class is AutoModel else auto_class.__name__
    folder = save_with_remote_code(
        stock, tmp_path / "checkpoint", ["modeling_gpt2.py"], {auto_name: f"modeling_gpt2.{class_name}"}
    )
    ours = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(ours).__module__.startswith("transformers_modules") and type(ours).__name__ == class_name
    return ours, stock


def encoder_inputs(batch: int = len(LENGTHS), length: int = 7, width: int = 32):
    """Random encoder states and a right-padded encoder mask (each row a different length)."""
    generator = torch.Generator().manual_seed(5)
    states = torch.randn(batch, length, width, generator=generator)
    return states, right_padded_mask([7, 4, 2][:batch], length)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cross_attention_with_a_padded_encoder_matches_stock(tmp_path, backend):
    """`add_cross_attention`: the decoder reads encoder states through `encoder_attention_mask` (padding hidden),
    not causally, and the cross-attention weights are stock's."""
    ours, stock = load_pair(tmp_path, backend, add_cross_attention=True)
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    states, encoder_mask = encoder_inputs()
    kwargs = dict(attention_mask=mask, encoder_hidden_states=states, encoder_attention_mask=encoder_mask)
    with torch.no_grad():
        got = ours(ids, output_attentions=True, **kwargs)
        want = stock(ids, output_attentions=True, **kwargs)
    real = mask.bool()
    assert_close_rel(got.logits[real], want.logits[real], 1e-5, "logits")
    assert len(got.cross_attentions) == len(want.cross_attentions) == 3
    for layer, (a, e) in enumerate(zip(got.cross_attentions, want.cross_attentions)):
        assert_close_rel(a.transpose(1, 2)[real], e.transpose(1, 2)[real], 1e-5, f"cross-attention weights {layer}")


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cross_attention_decode_with_cache_matches_stock_step_by_step(tmp_path, backend):
    """Decoding token by token with an `EncoderDecoderCache`: the encoder keys/values are projected once and
    reused (not appended again each step), and every step's logits are stock's."""
    ours, stock = load_pair(tmp_path, backend, add_cross_attention=True)
    ids = random_ids(length=6)
    states, encoder_mask = encoder_inputs()
    caches = {}
    for step in range(ids.shape[1]):
        outputs = {}
        for name, model in (("ours", ours), ("stock", stock)):
            with torch.no_grad():
                out = model(
                    ids[:, step : step + 1] if step else ids[:, :2],
                    past_key_values=caches.get(name),
                    encoder_hidden_states=states,
                    encoder_attention_mask=encoder_mask,
                    use_cache=True,
                )
            caches[name], outputs[name] = out.past_key_values, out.logits
        if step == 0:
            continue  # the first call fed two tokens
        assert_close_rel(outputs["ours"], outputs["stock"], 1e-5, f"step {step}")
    layer = caches["ours"].cross_attention_cache.layers[0]
    assert layer.keys.shape[-2] == states.shape[1], "the encoder keys were stored more than once"


def test_default_positions_continue_after_the_cache(tmp_path):
    """Without `position_ids`, tokens fed after a cache read `wpe` from the cache length on, as in stock."""
    ours, stock = load_pair(tmp_path, "sdpa")
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = stock(ids).logits
        out = ours(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, ids.shape[1]):
            out = ours(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert_close_rel(torch.cat(steps, dim=1), full, 1e-5, "decoded without position_ids")


def test_token_type_ids_are_embedded_as_stock(tmp_path):
    """`token_type_ids` add rows of `wte` to the input embeddings, as in stock."""
    ours, stock = load_pair(tmp_path, "sdpa")
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    token_types = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=token_types).logits
        want = stock(ids, attention_mask=mask, token_type_ids=token_types).logits
        plain = stock(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (want[real] - plain[real]).abs().max() > 1e-2  # the token types matter
    assert_close_rel(got[real], want[real], 1e-5, "logits with token_type_ids")


@pytest.mark.parametrize("training", [True, False])
def test_flat_token_type_ids_are_read_as_rows_as_stock(tmp_path, training):
    """Stock views `token_type_ids` as rows of the sequence length (flat `[batch * seq]` types too); ours failed on
    a shape error, unpadded (training with labels) and on full rows."""
    ours, stock = load_pair(tmp_path, "sdpa")
    ids, mask = random_ids(), right_padded_mask(LENGTHS, TOTAL)
    token_types = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(4))
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for model, types in ((stock, token_types), (ours, token_types.reshape(-1))):
        model.train(training)
        with torch.no_grad():
            losses.append(model(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss)
    assert_close_rel(losses[1], losses[0], 1e-5, "loss with flat token_type_ids")


def test_a_padded_batch_run_unpadded_gives_no_missing_mask_warning(tmp_path, monkeypatch):
    """Run as one packed row without a mask, GPT2Model saw the pad id among the kept tokens (EOS as pad, as GPT-2
    fine-tuning sets it) and logged transformers' "passing in an attention_mask" advice, though the caller gave one.
    transformers warns where the pad id ends a row without a mask: recorded here, as its warning is logged once."""
    ours, _ = load_pair(tmp_path, "sdpa")
    ids, mask = random_ids(), right_padded_mask(LENGTHS, TOTAL)
    ids[0, 0] = ids[-1, LENGTHS[-1] - 1] = PAD  # real tokens equal to the pad id at both ends of the packed row
    would_warn = []

    def record(self, input_ids, attention_mask):
        would_warn.append(attention_mask is None and bool((input_ids[:, [-1, 0]] == PAD).any()))

    monkeypatch.setattr(type(ours.transformer), "warn_if_padding_and_no_attention_mask", record)
    ours.train()
    assert ours(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.isfinite()
    assert not any(would_warn)
    ours(ids[:, :3])  # a call without a mask is still checked
    assert would_warn


@pytest.mark.parametrize("dropout", ["embd_pdrop", "resid_pdrop", "attn_pdrop"])
def test_training_forward_under_one_seed_matches_stock_dropout(tmp_path, dropout):
    """Each dropout (embeddings, attention and MLP outputs, attention probabilities) sits where stock's does:
    in training, under one seed, ours draws the same masks as stock and gives the same logits."""
    ours, stock = load_pair(tmp_path, "sdpa", **{dropout: 0.3})
    ours.train(), stock.train()
    ids = random_ids()
    torch.manual_seed(3)
    got = ours(ids).logits
    torch.manual_seed(3)
    want = stock(ids).logits
    with torch.no_grad():
        assert (want - stock.eval()(ids).logits).abs().max() > 1e-2, "dropout had no effect"
    assert_close_rel(got, want, 1e-5, f"training logits with {dropout}")


def test_logits_to_keep_tensor_selects_positions(tmp_path):
    """A tensor `logits_to_keep` keeps the logits of the positions it lists, as stock does."""
    ours, stock = load_pair(tmp_path, "sdpa")
    ids = random_ids()
    keep = torch.tensor([0, 4, 12])
    with torch.no_grad():
        got = ours(ids, logits_to_keep=keep).logits
        want = stock(ids, logits_to_keep=keep).logits
    assert got.shape == want.shape == (len(LENGTHS), 3, VOCAB)
    assert_close_rel(got, want, 1e-5, "kept logits")


def test_double_heads_mc_token_ids_and_both_losses_match_stock(tmp_path):
    """GPT2DoubleHeadsModel: each choice is scored at its `mc_token_ids` position; the LM loss is shifted and
    the multiple-choice loss is stock's."""
    ours, stock = load_head_pair(tmp_path, GPT2DoubleHeadsModel, AutoModel, "GPT2DoubleHeadsModel")
    batch, choices, length = 2, 3, 9
    ids = torch.randint(1, VOCAB - 1, (batch, choices, length), generator=torch.Generator().manual_seed(4))
    mc_token_ids = torch.tensor([[3, 8, 5], [0, 6, 2]])
    mc_labels = torch.tensor([2, 0])
    with torch.no_grad():
        got = ours(ids, mc_token_ids=mc_token_ids, labels=ids, mc_labels=mc_labels)
        want = stock(ids, mc_token_ids=mc_token_ids, labels=ids, mc_labels=mc_labels)
    assert got.mc_logits.shape == (batch, choices)
    assert_close_rel(got.mc_logits, want.mc_logits, 1e-5, "mc logits")
    assert_close_rel(got.logits, want.logits, 1e-5, "lm logits")
    assert_close_rel(got.loss, want.loss, 1e-5, "lm loss")
    assert_close_rel(got.mc_loss, want.mc_loss, 1e-5, "mc loss")


def test_double_heads_decode_step_with_the_choices_whole_masks_matches_stock(tmp_path):
    """A cached step of `[batch, choices, seq]` inputs with `[batch, choices, past + new]` masks: ours refused the
    mask (its length is not the new tokens'), stock reads it as rows."""
    ours, stock = load_head_pair(tmp_path, GPT2DoubleHeadsModel, AutoModel, "GPT2DoubleHeadsModel")
    ids = torch.randint(1, VOCAB - 1, (2, 3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 0, :2] = 0
    steps = []
    for model in (ours, stock):
        with torch.no_grad():
            cache = model(ids[..., :4], attention_mask=mask[..., :4], use_cache=True).past_key_values
            step = model(ids[..., 4:], attention_mask=mask, past_key_values=cache, mc_token_ids=torch.ones(2, 3).long())
        steps.append(step)
    assert_close_rel(steps[0].logits, steps[1].logits, 1e-5, "lm logits")
    assert_close_rel(steps[0].mc_logits, steps[1].mc_logits, 1e-5, "mc logits")


@pytest.mark.parametrize("layout", ["choices_in_one_row", "one_row", "one_column"])
def test_double_heads_masks_of_other_2d_layouts_are_viewed_as_rows_as_stock(tmp_path, layout):
    """Stock views any mask of fewer than 4 dimensions as `[batch * choices, -1]`: `[batch, choices * seq]`,
    `[1, batch * choices * seq]`, `[batch * choices * seq, 1]` run there; ours refused them (a 2-D mask was
    taken as rows as it came)."""
    ours, stock = load_head_pair(tmp_path, GPT2DoubleHeadsModel, AutoModel, "GPT2DoubleHeadsModel")
    ids = torch.randint(1, VOCAB - 1, (2, 3, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 2, 3:] = 0
    shapes = {"choices_in_one_row": (2, 15), "one_row": (1, 30), "one_column": (30, 1)}
    given = mask.reshape(shapes[layout])
    choice = torch.tensor([[4, 4, 4], [4, 4, 2]])
    with torch.no_grad():
        got, want = (model(ids, attention_mask=given, mc_token_ids=choice) for model in (ours, stock))
    kept = mask.bool()
    assert_close_rel(got.logits[kept], want.logits[kept], 1e-5, "lm logits")
    assert_close_rel(got.mc_logits, want.mc_logits, 1e-5, "mc logits")


@pytest.mark.parametrize("layout", ["choices_in_one_row", "one_row", "one_column"])
def test_double_heads_whole_sequence_masks_of_other_2d_layouts_are_cut_as_stock(tmp_path, layout):
    """A prefill and a decode step each given the whole sequence's mask (longer than the cached + new tokens) as
    `[batch, choices * total]`, `[1, batch * choices * total]` or `[batch * choices * total, 1]`: stock views it as
    rows and reads their first columns; ours refused it (only a mask of exactly the cached + new tokens was
    viewed so)."""
    ours, stock = load_head_pair(tmp_path, GPT2DoubleHeadsModel, AutoModel, "GPT2DoubleHeadsModel")
    ids = torch.randint(1, VOCAB - 1, (2, 3, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, 1, :2] = 0
    given = mask.reshape({"choices_in_one_row": (2, 21), "one_row": (1, 42), "one_column": (42, 1)}[layout])
    last = torch.full((2, 3), -1)
    runs = []
    for model in (ours, stock):
        with torch.no_grad():
            prefill = model(ids[..., :4], attention_mask=given, use_cache=True, mc_token_ids=last + 4)
            cache = prefill.past_key_values
            step = model(ids[..., 4:6], attention_mask=given, past_key_values=cache, mc_token_ids=last + 2)
        runs.append((prefill, step))
    for what, got, want, kept in zip(("prefill", "step"), *runs, (mask[..., :4].bool(), mask[..., 4:6].bool())):
        assert_close_rel(got.logits[kept], want.logits[kept], 1e-5, f"{what} logits")
        assert_close_rel(got.mc_logits, want.mc_logits, 1e-5, f"{what} mc logits")


def test_a_2d_mask_of_another_batch_is_refused_even_where_it_is_long_enough(tmp_path):
    """`[2, 12]` for four rows of 4 tokens holds three values per token: its rows are not the inputs' (nor a
    vector of them), so ours names its shape rather than read it as `[4, 6]` and cut it."""
    ours, _ = load_head_pair(tmp_path, GPT2DoubleHeadsModel, AutoModel, "GPT2DoubleHeadsModel")
    ids = torch.randint(1, VOCAB - 1, (4, 1, 4), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 12\]"):
        ours(ids, attention_mask=torch.ones(2, 12, dtype=torch.long))


def test_double_heads_with_one_choice_takes_a_4d_mask_as_stock(tmp_path):
    """`[batch, 1, seq]` inputs with an additive 4-D mask `[batch, 1, q, k]`: ours reshaped the mask as if it were
    embeddings (its leading dimensions equal the inputs' shape), refusing a prefill and, in a decode step, reading
    its 0 (keep) as padding and its -inf as keep. Stock passes it on as it is."""
    ours, stock = load_head_pair(tmp_path, GPT2DoubleHeadsModel, AutoModel, "GPT2DoubleHeadsModel")
    ids = torch.randint(1, VOCAB - 1, (2, 1, 5), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    causal[0, ..., 1] = False
    additive = torch.zeros(causal.shape).masked_fill(~causal, float("-inf"))
    choice = torch.full((2, 1), 3)
    outputs = []
    for model in (ours, stock):
        with torch.no_grad():
            prefill = model(ids, attention_mask=additive, mc_token_ids=choice)
            cache = model(ids[..., :4], use_cache=True).past_key_values
            step_mask = additive[:, :, 4:]
            step = model(ids[..., 4:], attention_mask=step_mask, past_key_values=cache, mc_token_ids=choice * 0)
        outputs.append((prefill.logits, prefill.mc_logits, step.logits))
    for name, got, want in zip(("prefill logits", "mc logits", "step logits"), *outputs):
        assert_close_rel(got, want, 1e-5, name)


@pytest.mark.parametrize("num_labels, problem_type", [(1, None), (3, "multi_label_classification"), (3, "regression")])
def test_sequence_classification_regression_and_multi_label_losses_match_stock(tmp_path, num_labels, problem_type):
    """Float labels: regression (one label: squeezed; several: per label) and multi-label BCE, as stock."""
    ours, stock = load_pair(
        tmp_path, "sdpa", GPT2ForSequenceClassification, AutoModelForSequenceClassification,
        num_labels=num_labels, problem_type=problem_type,
    )
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    ids = ids.masked_fill(mask == 0, PAD)
    generator = torch.Generator().manual_seed(6)
    labels = torch.randn(len(LENGTHS), generator=generator) if num_labels == 1 else torch.rand(len(LENGTHS), 3, generator=generator)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, labels=labels)
        want = stock(ids, attention_mask=mask, labels=labels)
    assert_close_rel(got.logits, want.logits, 1e-5, "pooled logits")
    assert_close_rel(got.loss, want.loss, 1e-5, "loss")


def test_sequence_classification_pools_the_last_non_pad_token_when_pad_occurs_inside(tmp_path):
    """Stock pools each row at its last token that is not `pad_token_id`, also where the pad id (often GPT-2's
    eos) occurs inside the text: not at the token before the first pad."""
    ours, stock = load_pair(
        tmp_path, "sdpa", GPT2ForSequenceClassification, AutoModelForSequenceClassification, num_labels=3
    )
    ids, mask = random_ids(), right_padded_mask(LENGTHS, TOTAL)
    ids = ids.masked_fill(mask == 0, PAD)
    ids[:, 2] = PAD  # a pad id inside every row's text
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = stock(ids, attention_mask=mask).logits
    assert_close_rel(got, want, 1e-5, "pooled logits")


def test_token_classification_matches_stock_in_eval_and_training(tmp_path):
    """Token classification: logits and loss as stock's; in training its dropout (`classifier_dropout`) is drawn
    as stock's under one seed."""
    ours, stock = load_head_pair(
        tmp_path, GPT2ForTokenClassification, AutoModelForTokenClassification, "GPT2ForTokenClassification",
        num_labels=4, classifier_dropout=0.4,
    )
    ids, mask = random_ids(), right_padded_mask(LENGTHS, TOTAL)
    labels = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, -100)
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask, labels=labels), stock(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert_close_rel(got.logits[real], want.logits[real], 1e-5, "eval logits")
    assert_close_rel(got.loss, want.loss, 1e-5, "eval loss")
    ours.train(), stock.train()
    torch.manual_seed(9)
    got = ours(ids, labels=labels).loss
    torch.manual_seed(9)
    want = stock(ids, labels=labels).loss
    assert_close_rel(got, want, 1e-5, "training loss under one seed")


def test_question_answering_matches_stock(tmp_path):
    """Extractive QA: start and end logits (not swapped) and the span loss, as stock's."""
    ours, stock = load_head_pair(
        tmp_path, GPT2ForQuestionAnswering, AutoModelForQuestionAnswering, "GPT2ForQuestionAnswering"
    )
    ids = random_ids()
    starts, ends = torch.tensor([1, 0, 4]), torch.tensor([5, 3, 9])
    with torch.no_grad():
        got = ours(ids, start_positions=starts, end_positions=ends)
        want = stock(ids, start_positions=starts, end_positions=ends)
    assert_close_rel(got.start_logits, want.start_logits, 1e-5, "start logits")
    assert_close_rel(got.end_logits, want.end_logits, 1e-5, "end logits")
    assert_close_rel(got.loss, want.loss, 1e-5, "loss")
