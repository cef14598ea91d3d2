"""LLaMA options and heads beyond tests/test_llama.py's core checks (whose helpers and ``pair`` fixture this file
imports): yarn's attention scaling, dynamic NTK on padded rows past max_position_embeddings, positions after a
cache, logits_to_keep, the final norm's eps, no attention dropout in eval, the embedding's padding row, token
classification and QA against stock. Found missing by mutating the model code."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForTokenClassification,
    LlamaForQuestionAnswering,
    LlamaForTokenClassification,
)

from remote_code import assert_close_rel, right_padded_mask, save_with_remote_code
from test_llama import (  # noqa: F401  (pair is a fixture)
    TOL,
    VOCAB,
    llama_config,
    load_ours,
    padded_batch,
    pair,
    positions_from_mask,
    random_ids,
    randomize_,
)

YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def test_yarn_attention_factor_matches_stock(pair):
    """YaRN scales cos/sin by its attention factor (0.1 ln(factor) + 1): logits of a padded batch are stock's."""
    stock, folder = pair("yarn", lambda: llama_config(rope=YARN_ROPE))
    ours = load_ours(folder)
    assert ours.model.rotary_emb.attention_scaling > 1.1
    ids, mask = padded_batch("left")
    positions = positions_from_mask(mask)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    assert_close_rel(actual[keep], expected[keep], TOL, "yarn")


def test_dynamic_ntk_right_padded_batch_beyond_max_positions_matches_stock(pair):
    """Dynamic NTK picks its frequencies from the padded batch's length (stock's positions include the padding):
    with every row right-padded past ``max_position_embeddings``, the training loss (where a padded batch may run
    packed) and the eval logits are stock's."""
    stock, folder = pair(
        "dynamic16", lambda: llama_config(rope={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    )
    ours = load_ours(folder).train()
    mask = right_padded_mask([14, 12, 9], 30)
    ids = random_ids(3, 30, 5).masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    stock.train()
    try:
        expected, actual = (model(input_ids=ids, attention_mask=mask, labels=labels).loss for model in (stock, ours))
        assert_close_rel(actual, expected, TOL, "dynamic, right padding: training loss")
    finally:
        stock.eval()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        actual = ours.eval()(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close_rel(actual[keep], expected[keep], TOL, "dynamic, right padding: eval logits")


def test_default_positions_continue_after_the_cache(pair):
    """Without ``position_ids``, tokens fed after a cache get positions from the cache length, as in stock."""
    stock, folder = pair("gqa", lambda: llama_config())
    ours = load_ours(folder)
    ids = random_ids(2, 10, 4)
    with torch.no_grad():
        full = stock(input_ids=ids).logits
        out = ours(input_ids=ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, ids.shape[1]):
            out = ours(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert_close_rel(torch.cat(steps, dim=1), full, TOL, "decoded without position_ids")


@pytest.mark.parametrize("keep", [3, "tensor"])
def test_logits_to_keep_matches_stock(pair, keep):
    """An int keeps that many last positions, a tensor the positions it lists, as stock."""
    stock, folder = pair("gqa", lambda: llama_config())
    ours = load_ours(folder)
    ids = random_ids(2, 10, 6)
    keep = torch.tensor([0, 5, 9]) if keep == "tensor" else keep
    with torch.no_grad():
        expected = stock(input_ids=ids, logits_to_keep=keep).logits
        actual = ours(input_ids=ids, logits_to_keep=keep).logits
    assert actual.shape == expected.shape == (2, 3, VOCAB)
    assert_close_rel(actual, expected, TOL, "kept logits")


def test_norm_eps_and_attention_dropout_in_eval_match_stock(pair):
    """A non-default ``rms_norm_eps`` reaches every norm (the final one included), and ``attention_dropout``
    acts in training only: eval logits equal stock's."""
    stock, folder = pair("eps_dropout", lambda: llama_config(rms_norm_eps=0.05, attention_dropout=0.5))
    ours = load_ours(folder)
    ids, mask = padded_batch("right")
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        actual = ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close_rel(actual[keep], expected[keep], TOL, "eval logits")


def test_padding_token_embedding_gets_no_gradient(pair):
    """``embed_tokens`` has ``padding_idx = pad_token_id`` as stock's: pad tokens in an unmasked batch leave its
    row without gradient, and every embedding gradient is stock's."""
    stock, folder = pair("gqa", lambda: llama_config())
    ours = load_ours(folder).train()
    ids = random_ids(2, 9, 8)
    ids[:, 6:] = 0  # pad_token_id, but no attention mask
    grads = []
    for model in (stock, ours):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
    stock.zero_grad()
    assert torch.count_nonzero(grads[1][0]) == 0, "the padding row got a gradient"
    assert_close_rel(grads[1], grads[0], 1e-4, "embedding gradient")


def head_pair(tmp_path, stock_class, auto_class, class_name: str, **overrides):
    """A randomized stock head model (biases non-zero) and ours loaded from its checkpoint."""
    stock = stock_class(llama_config(**overrides)).eval()
    randomize_(stock)
    folder = save_with_remote_code(
        stock, tmp_path, ["modeling_llama.py"], {auto_class.__name__: f"modeling_llama.{class_name}"}
    )
    ours = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(ours).__module__.startswith("transformers_modules") and type(ours).__name__ == class_name
    return stock, ours


def test_token_classification_matches_stock(tmp_path):
    """Token classification: ``score`` with its bias, and the loss, as stock's."""
    stock, ours = head_pair(
        tmp_path, LlamaForTokenClassification, AutoModelForTokenClassification, "LlamaForTokenClassification",
        num_labels=4,
    )
    ids, mask = padded_batch("right")
    labels = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, labels=labels)
        actual = ours(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    assert_close_rel(actual.logits[keep], expected.logits[keep], TOL, "logits")
    assert_close_rel(actual.loss, expected.loss, TOL, "loss")


def test_question_answering_matches_stock(tmp_path):
    """Extractive QA: start and end logits (not swapped) and the span loss, as stock's."""
    stock, ours = head_pair(
        tmp_path, LlamaForQuestionAnswering, AutoModelForQuestionAnswering, "LlamaForQuestionAnswering"
    )
    ids = random_ids(3, 11, 2)
    starts, ends = torch.tensor([1, 0, 4]), torch.tensor([5, 3, 9])
    with torch.no_grad():
        expected = stock(input_ids=ids, start_positions=starts, end_positions=ends)
        actual = ours(input_ids=ids, start_positions=starts, end_positions=ends)
    assert_close_rel(actual.start_logits, expected.start_logits, TOL, "start logits")
    assert_close_rel(actual.end_logits, expected.end_logits, TOL, "end logits")
    assert_close_rel(actual.loss, expected.loss, TOL, "loss")
