"""Calls between a training forward and its backward: a second forward with the caller's mask edited in place,
``model.eval()`` for a teacher or validation call, hooks registered after the forward. Layers that run again in
backward (gradient checkpointing, ``config.offload_checkpoints``, ``config.sequence_tile_size``, recomputed norm
outputs) must run as they did in the forward, or refuse by name. Same weights and inputs as the stock class,
fp32 on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from remote_code import assert_close_rel
from test_fused_models import TOL, batch_for, family_pairs  # noqa: F401 - a fixture
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from memory_efficient_adapter.families import write_remote_code

RECOMPUTING = {
    "gradient checkpointing": {},
    "offloaded checkpoints": {"offload_checkpoints": True},
    "recomputed norm outputs": {"recompute_norm_outputs": True},
}


def grads_of(model) -> dict:
    return {name: param.grad.clone() for name, param in model.named_parameters()
            if param.grad is not None and not name.endswith("k_proj.bias")}  # fmt: skip


def assert_same_grads(grads: dict, expected: dict, what: str) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert_close_rel(grads[name], grad, TOL, f"grad of {name} ({what})")


def two_forwards_with_the_mask_edited_between(model, name: str) -> tuple:
    """Two forwards of one bool mask tensor, edited in place between them, and one backward of both losses."""
    batch = batch_for(name, torch.Generator().manual_seed(41))
    mask = batch["attention_mask"].bool()
    batch["attention_mask"] = mask
    model.train().zero_grad(set_to_none=True)
    first = model(**batch).loss
    mask[0, 9:] = False
    if name != "bart":
        batch["labels"] = batch["labels"].masked_fill(~mask, -100)
    second = model(**batch).loss
    (first + second).backward()
    return torch.stack([first.detach(), second.detach()]), grads_of(model)


@pytest.mark.parametrize("recompute", sorted(RECOMPUTING))
@pytest.mark.parametrize("name", ["llama", "bart"])
def test_a_bool_mask_edited_in_place_between_forwards_leaves_the_first_backward_as_stock(
    family_pairs, name, recompute
):
    """The keep-mask was the caller's bool tensor itself; the first forward's layers, run again in backward,
    read the edited mask (gradients 7% to 32% off). LLaMA keeps its padded rows here (``unpad_batches=False``),
    as a sequence-classification head or ``use_cache=True`` makes it do."""
    stock, ours, _ = family_pairs[name]
    stock, ours = copy.deepcopy(stock), copy.deepcopy(ours)
    ours.config.unpad_batches = False
    for key, value in RECOMPUTING[recompute].items():
        setattr(ours.config, key, value)
    if recompute == "gradient checkpointing":
        for model in (stock, ours):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    expected = two_forwards_with_the_mask_edited_between(stock, name)
    assert_same_steps(two_forwards_with_the_mask_edited_between(ours, name), expected, recompute)


@pytest.fixture(scope="module")
def gpt2_with_dropout(tmp_path_factory):
    """GPT-2 with residual dropout (inside the tiled MLP and every offloaded layer), stock and ours."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    folder = tmp_path_factory.mktemp("gpt2_dropout")
    GPT2LMHeadModel(config).save_pretrained(folder)
    write_remote_code(folder, "gpt2")
    return GPT2LMHeadModel.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def step_with_eval_before_backward(model, batch: dict) -> tuple:
    """(loss, gradients) of a training forward whose backward runs after ``model.eval()``."""
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**batch).loss
    model.eval()
    loss.backward()
    model.train()
    return loss.detach(), grads_of(model)


def assert_same_steps(got: tuple, expected: tuple, what: str) -> None:
    assert_close_rel(got[0], expected[0], TOL, f"loss ({what})")
    assert_same_grads(got[1], expected[1], what)


@pytest.mark.parametrize("options", [{"sequence_tile_size": 4}, {"offload_checkpoints": True}], ids=lambda o: next(iter(o)))
def test_eval_mode_before_backward_replays_the_forwards_dropout(gpt2_with_dropout, options):
    """The recompute in backward ran the modules in the mode they had then: after ``model.eval()`` without the
    forward's dropout masks (gradients 20% to 24% off). It now runs them in the forward's mode."""
    stock, ours = gpt2_with_dropout
    ours = copy.deepcopy(ours)
    for key, value in options.items():
        setattr(ours.config, key, value)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(42))
    batch = dict(input_ids=ids, labels=ids)
    expected = step_with_eval_before_backward(stock, batch)
    assert_same_steps(step_with_eval_before_backward(ours, batch), expected, f"{options}, eval before backward")
    assert ours.training and all(module.training for module in ours.modules())


@pytest.mark.parametrize("name", ["gpt2", "bloom", "bart"])
def test_eval_mode_between_forward_and_backward_with_checkpointing_trains_as_stock(family_pairs, name):
    """A teacher or validation call switches the model to eval before the student's backward: the layer norm
    took stock's path when the checkpointed layers ran again, which saved other tensors than the forward did,
    and backward failed (torch's CheckpointError)."""
    stock, ours = (copy.deepcopy(model) for model in family_pairs[name][:2])
    for model in (stock, ours):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = batch_for(name, torch.Generator().manual_seed(26))
    expected = step_with_eval_before_backward(stock, batch)
    assert_same_steps(step_with_eval_before_backward(ours, batch), expected, "checkpointed, eval before backward")


@pytest.mark.parametrize("options", [{"sequence_tile_size": 4}, {"offload_checkpoints": True}], ids=lambda o: next(iter(o)))
def test_a_gradient_hook_registered_after_the_forward_is_refused_by_name(family_pairs, options):
    """The forward checks for such hooks (the layers then run as usual); one registered after it ran twice
    (offloaded) or once per tile and again (tiles): the gradient doubled, silently."""
    ours = copy.deepcopy(family_pairs["llama"][1])
    for key, value in options.items():
        setattr(ours.config, key, value)
    loss = ours.train()(**batch_for("llama", torch.Generator().manual_seed(43))).loss
    ours.model.layers[0].mlp.down_proj.weight.register_hook(lambda grad: 2 * grad)
    with pytest.raises(RuntimeError, match=f"config.{next(iter(options))}: a gradient hook .* after the forward"):
        loss.backward()


def test_a_norm_hook_registered_after_the_forward_is_not_run_by_the_recompute(family_pairs):
    """A recomputed norm output was made by calling the norm again, hooks included: one registered after the
    forward (stock never calls it) ran in backward and, returning a value, changed the gradients (50%)."""
    stock, ours, _ = family_pairs["llama"]
    stock, ours = copy.deepcopy(stock), copy.deepcopy(ours)
    ours.config.recompute_norm_outputs = True
    batch = batch_for("llama", torch.Generator().manual_seed(44))
    results = []
    for model in (stock, ours):
        calls = []
        model.train().zero_grad(set_to_none=True)
        loss = model(**batch).loss
        model.model.layers[0].input_layernorm.register_forward_hook(
            lambda module, args, output: calls.append(1) or 1.5 * output
        )
        loss.backward()
        results.append((len(calls), grads_of(model)))
    (stock_calls, expected), (calls, grads) = results
    assert calls == stock_calls == 0
    assert_same_grads(grads, expected, "norm hook added after the forward")


def test_a_second_backward_through_offloaded_checkpoints_is_refused_by_name(family_pairs):
    """Each layer's offloaded input is released by its first backward; a second one (``retain_graph=True``, or
    two losses of one forward) said only that a checkpoint was fetched twice."""
    ours = copy.deepcopy(family_pairs["llama"][1])
    ours.config.offload_checkpoints = True
    ours.config.keep_logits_in_training = True  # the fused loss refuses a second backward by its own name
    output = ours.train()(**batch_for("llama", torch.Generator().manual_seed(45)))
    output.logits.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="config.offload_checkpoints: backward ran twice through one forward"):
        output.loss.backward()
