"""A loss of the user's: ``model.loss_function = fn`` or a ``loss_type`` naming an entry the user added to
transformers' ``LOSS_MAPPING``. Stock's causal LM heads (LLaMA, GPT-2, BLOOM) and LLaMA's classification heads
call it; ours must too, in training as well (where the fused LM head + loss would skip it), with the logits of
every position as stock gives them (padded rows kept). Heads whose stock class computes its loss itself (BART's,
the question-answering heads of GPT-2, BLOOM and BART) call no such function, in stock or ours.

Runs on transformers 5.x and 4.57.x.
"""

from __future__ import annotations

import torch
import pytest
import torch.nn.functional as F
from remote_code import assert_close_rel

from test_fused_models import train_step
from test_stock_behaviour import VOCAB, family_config, stock_and_ours
from test_qwen import load, random_ids, saved  # noqa: F401 - saved: a fixture
from qwen_reference import ReferenceQwen

TOL = 1e-5


def smoothed_loss_with_z_term(logits, labels=None, vocab_size=None, shift_labels=None, **kwargs):
    """A user's causal-LM loss: label-smoothed cross-entropy plus a z-loss over every position's logits (padded
    positions included, as users write it), so that it differs from the stock loss and reads every logit."""
    smoothed_loss_with_z_term.calls += 1
    logits = logits.float()
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    cross_entropy = F.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=-100, label_smoothing=0.3)
    return cross_entropy + 1e-2 * torch.logsumexp(flat, dim=-1).square().mean()


def squared_error_of_classes(logits, labels, config=None, pooled_logits=None, **kwargs):
    """A user's classification loss (both heads' stock signatures): mean squared error against one-hot labels."""
    squared_error_of_classes.calls += 1
    scores = (logits if pooled_logits is None else pooled_logits).float()
    kept = labels != -100
    return (scores[kept] - F.one_hot(labels[kept], scores.shape[-1]).float()).square().mean()


NO_DROPOUT = {
    "llama": dict(classifier_dropout=0.0),
    "gpt2": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "bloom": dict(hidden_dropout=0.0, attention_dropout=0.0),
    "bart": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0),
}


def trainable_pair(family: str, class_name: str, tmp_path) -> tuple:
    """Stock and ours with dropout off, so that their training steps compare."""
    return stock_and_ours(family, class_name, tmp_path, config=family_config(family, **NO_DROPOUT[family]))


def refusing_loss(*args, **kwargs):
    raise AssertionError("a head whose stock class computes its loss itself called model.loss_function")


def right_padded_batch(class_name: str) -> dict:
    """Right padding (so that a causal LM's rows may run unpadded), labels ignored at padded positions."""
    generator = torch.Generator().manual_seed(31)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    if "SequenceClassification" in class_name:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    labels = (ids % 2) if "TokenClassification" in class_name else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(mask == 0, -100)}


def assert_same_training_step(stock, ours, batch: dict, what: str) -> None:
    expected, expected_grads = train_step(stock, batch)
    got, grads = train_step(ours, batch)
    assert_close_rel(got.loss.detach(), expected.loss.detach(), TOL, f"{what}: loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if grad.norm() < 1e-6:  # a bias added to every position under a softmax over positions: rounding noise
            assert grads[name].norm() < 1e-5, name
        else:
            assert_close_rel(grads[name], grad, TOL, f"{what}: grad of {name}")


@pytest.mark.parametrize(
    "family, class_name, user_loss",
    [
        ("llama", "LlamaForCausalLM", smoothed_loss_with_z_term),
        ("gpt2", "GPT2LMHeadModel", smoothed_loss_with_z_term),
        ("bloom", "BloomForCausalLM", smoothed_loss_with_z_term),
        ("llama", "LlamaForSequenceClassification", squared_error_of_classes),
        ("llama", "LlamaForTokenClassification", squared_error_of_classes),
    ],
)
def test_a_loss_function_set_on_the_model_trains_as_in_stock(tmp_path, family, class_name, user_loss):
    """Before, our heads computed plain cross-entropy in training (LLaMA 4.843 against stock's 4.866 with this
    smoothing; the classification heads in eval too) and never called the user's function."""
    stock, ours = trainable_pair(family, class_name, tmp_path)
    stock.loss_function = ours.loss_function = user_loss
    user_loss.calls = 0
    assert_same_training_step(stock, ours, right_padded_batch(class_name), class_name)
    assert user_loss.calls == 2
    with torch.no_grad():
        batch = right_padded_batch(class_name)
        assert_close_rel(ours.eval()(**batch).loss, stock.eval()(**batch).loss, TOL, f"{class_name}: eval loss")


def test_a_loss_type_naming_an_entry_of_the_users_trains_as_in_stock(tmp_path, monkeypatch):
    from transformers.loss.loss_utils import LOSS_MAPPING

    monkeypatch.setitem(LOSS_MAPPING, "SmoothedWithZTerm", smoothed_loss_with_z_term)
    stock, ours = trainable_pair("llama", "LlamaForCausalLM", tmp_path)
    stock.loss_type = ours.loss_type = "SmoothedWithZTerm"
    smoothed_loss_with_z_term.calls = 0
    assert_same_training_step(stock, ours, right_padded_batch("LlamaForCausalLM"), "loss_type")
    assert smoothed_loss_with_z_term.calls == 2


def test_an_entry_of_the_users_named_after_the_class_is_its_loss_type_as_in_stock(tmp_path, monkeypatch):
    """transformers names the loss type after the class where ``LOSS_MAPPING`` has an entry of that name; GPT-2's
    head set its own ``ForCausalLM`` over it, so the user's loss was never called."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    monkeypatch.setitem(LOSS_MAPPING, "GPT2LMHeadModel", smoothed_loss_with_z_term)
    stock, ours = trainable_pair("gpt2", "GPT2LMHeadModel", tmp_path)
    assert stock.loss_type == ours.loss_type == "GPT2LMHeadModel"
    smoothed_loss_with_z_term.calls = 0
    assert_same_training_step(stock, ours, right_padded_batch("GPT2LMHeadModel"), "loss_type")
    assert smoothed_loss_with_z_term.calls == 2


def test_a_builtin_loss_patched_where_transformers_keeps_it_trains_as_in_stock(tmp_path, monkeypatch):
    """Libraries patch transformers' causal-LM loss in both places it lives (the module's name and the mapping's
    entry): stock calls the patched function; ours compared against the patched name and ran the fused loss."""
    from transformers.loss import loss_utils

    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", smoothed_loss_with_z_term)
    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", smoothed_loss_with_z_term)
    stock, ours = trainable_pair("llama", "LlamaForCausalLM", tmp_path)
    smoothed_loss_with_z_term.calls = 0
    assert_same_training_step(stock, ours, right_padded_batch("LlamaForCausalLM"), "patched ForCausalLMLoss")
    assert smoothed_loss_with_z_term.calls == 2


@pytest.mark.parametrize("family, class_name", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_shift_labels_without_labels_give_no_loss_as_in_stock(tmp_path, family, class_name):
    """Stock computes a causal LM's loss only where ``labels`` are given; ours took ``shift_labels`` alone for a
    padded training batch (loss, no logits)."""
    stock, ours = trainable_pair(family, class_name, tmp_path)
    batch = right_padded_batch(class_name)
    labels = batch.pop("labels")
    for model in (stock.train(), ours.train()):
        output = model(**batch, shift_labels=labels)
        assert output.loss is None and output.logits.shape == (*labels.shape, VOCAB)


@pytest.mark.parametrize(
    "family, class_name",
    [
        ("gpt2", "GPT2ForQuestionAnswering"),
        ("bloom", "BloomForQuestionAnswering"),
        ("bart", "BartForQuestionAnswering"),
        ("bart", "BartForConditionalGeneration"),
        ("bart", "BartForCausalLM"),
    ],
)
def test_heads_whose_stock_class_computes_its_own_loss_call_no_loss_function(tmp_path, family, class_name):
    """Before, the question-answering heads of GPT-2, BLOOM and BART called ``model.loss_function``, which their
    stock classes never do; BART's LM heads keep their fused loss (no logits in training) as stock ignores it."""
    stock, ours = trainable_pair(family, class_name, tmp_path)
    stock.loss_function = ours.loss_function = refusing_loss
    generator = torch.Generator().manual_seed(32)
    ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    if family == "bart":
        ids[:, -1] = stock.config.eos_token_id  # BART's classification and span heads read the eos positions
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "QuestionAnswering" in class_name:
        batch.update(start_positions=torch.tensor([1, 9]), end_positions=torch.tensor([5, 3]))
    else:
        batch["labels"] = torch.randint(3, VOCAB, (2, 8), generator=generator)
    assert_same_training_step(stock, ours, batch, class_name)
    if "QuestionAnswering" not in class_name:
        assert ours.train()(**batch).logits is None  # the fused LM head + loss still runs


def test_qwen_trains_with_a_loss_function_set_on_the_model(saved):
    """Qwen follows transformers' convention (its eval loss calls ``model.loss_function``): in training too, with
    the logits of every position, padded ones included, as a float64 reference computes them."""
    folder, config, state = saved
    model = load(folder)
    model.loss_function = smoothed_loss_with_z_term
    assert_qwen_trains_with_the_users_loss(model, config, state, "the user's function")


def assert_qwen_trains_with_the_users_loss(model, config, state, what: str) -> None:
    """Qwen's training loss of a right-padded batch is ``smoothed_loss_with_z_term`` of a float64 reference's
    logits, called once per forward (the fused loss would skip it)."""
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    smoothed_loss_with_z_term.calls = 0
    loss = model.train()(ids, attention_mask=mask, labels=labels).loss
    logits = ReferenceQwen(config, state).forward(ids, attention_mask=mask, training=True)[0]
    expected = smoothed_loss_with_z_term(logits, labels)
    assert_close_rel(loss.detach(), expected.float(), TOL, f"Qwen training loss with {what}")
    assert smoothed_loss_with_z_term.calls == 2


def as_users_subclass(model, user_loss, form: str):
    """``model`` made an instance of a user's subclass of its class that brings ``user_loss`` as stock reads it:
    a ``loss_function`` property, a ``loss_function`` method, or a class-level ``_loss_function``."""
    if form == "property":
        body = {"loss_function": property(lambda self: user_loss)}
    elif form == "method":
        body = {"loss_function": lambda self, *args, **kwargs: user_loss(*args, **kwargs)}
    else:
        body = {"_loss_function": staticmethod(user_loss)}
    model.__class__ = type(f"Users{type(model).__name__}", (type(model),), body)
    return model


@pytest.mark.parametrize(
    "family, class_name, user_loss, form",
    [
        ("llama", "LlamaForCausalLM", smoothed_loss_with_z_term, "property"),
        ("llama", "LlamaForCausalLM", smoothed_loss_with_z_term, "method"),
        ("llama", "LlamaForCausalLM", smoothed_loss_with_z_term, "class attribute"),
        ("gpt2", "GPT2LMHeadModel", smoothed_loss_with_z_term, "property"),
        ("bloom", "BloomForCausalLM", smoothed_loss_with_z_term, "method"),
        ("llama", "LlamaForSequenceClassification", squared_error_of_classes, "property"),
        ("llama", "LlamaForTokenClassification", squared_error_of_classes, "method"),
    ],
)
def test_a_subclass_bringing_its_own_loss_function_trains_as_in_stock(tmp_path, family, class_name, user_loss, form):
    """Before, only a function set on the instance counted: a subclass's loss was skipped for the fused plain
    cross-entropy in training (LLaMA 5.926 against stock's 6.234, gradients 25-30% off; the classification heads
    in eval too), and a padded eval batch ran unpadded and called it with ``labels=None`` (a TypeError)."""
    stock, ours = trainable_pair(family, class_name, tmp_path)
    stock, ours = as_users_subclass(stock, user_loss, form), as_users_subclass(ours, user_loss, form)
    user_loss.calls = 0
    assert_same_training_step(stock, ours, right_padded_batch(class_name), f"{class_name}, {form}")
    assert user_loss.calls == 2
    with torch.no_grad():
        batch = right_padded_batch(class_name)
        if "CausalLM" in class_name:
            batch["use_cache"] = False  # a padded eval batch without a cache may run unpadded
        assert_close_rel(ours.eval()(**batch).loss, stock.eval()(**batch).loss, TOL, f"{class_name}: eval loss")


def test_qwen_subclass_bringing_its_own_loss_function_trains_with_it(saved):
    folder, config, state = saved
    model = as_users_subclass(load(folder), smoothed_loss_with_z_term, "property")
    assert_qwen_trains_with_the_users_loss(model, config, state, "a subclass's function")


def label_smoothed_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """A patch of transformers' ``fixed_cross_entropy`` (same signature) as scripts write them."""
    label_smoothed_cross_entropy.calls += 1
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(source, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.2)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@pytest.mark.parametrize(
    "family, class_name",
    [
        ("llama", "LlamaForCausalLM"),
        ("gpt2", "GPT2LMHeadModel"),
        ("bloom", "BloomForCausalLM"),
        ("llama", "LlamaForTokenClassification"),
    ],
)
def test_a_patched_fixed_cross_entropy_trains_as_in_stock(tmp_path, monkeypatch, family, class_name):
    """Stock's losses look ``fixed_cross_entropy`` up at each call, so a patch of it changes stock's loss; ours
    ran the fused (or counted) cross-entropy without it: loss 0.2-2.3% off, gradients up to 29%."""
    from transformers.loss import loss_utils

    monkeypatch.setattr(loss_utils, "fixed_cross_entropy", label_smoothed_cross_entropy)
    stock, ours = trainable_pair(family, class_name, tmp_path)
    label_smoothed_cross_entropy.calls = 0
    assert_same_training_step(stock, ours, right_padded_batch(class_name), f"{class_name}, patched cross-entropy")
    assert label_smoothed_cross_entropy.calls == 2
