"""The training loss without logits for an LM head the fused op cannot see into (PEFT LoRA or ``modules_to_save``
on ``lm_head``): ``wrapped_head_cross_entropy`` against a float64 reference, and each family through
``trust_remote_code`` + PEFT against stock + PEFT. A head with hooks keeps the stock path (``test_fused_models``).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from remote_code import assert_close_rel
from test_fused_models import (
    STOCK,
    TOL,
    VOCAB,
    assert_same_training_step,
    assert_training_step_compiles_into_one_graph,
    batch_for,
    randomize_,
    train_step,
)
from test_fused_ops import grads_of, random_targets, saved_tensor_shapes

from memory_efficient_adapter.families import write_remote_code

ops = importlib.import_module("memory_efficient_adapter.attention")
peft = pytest.importorskip("peft", reason="peft is in the test extra")


class LowRankHead(torch.nn.Module):
    """A stand-in for a wrapped head: a linear layer plus a low-rank term behind dropout, float64."""

    def __init__(self, hidden: int, vocab: int, rank: int, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base = torch.nn.Linear(hidden, vocab, dtype=torch.float64)
        self.down = torch.nn.Parameter(torch.randn(rank, hidden, generator=generator, dtype=torch.float64))
        self.up = torch.nn.Parameter(torch.randn(vocab, rank, generator=generator, dtype=torch.float64))
        self.dropout = torch.nn.Dropout(dropout)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(vocab, hidden, generator=generator, dtype=torch.float64))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base(hidden) + self.dropout(hidden) @ self.down.T @ self.up.T * 0.5


def reference_loss(head, hidden, targets, logits_bias=None, divisor=None) -> torch.Tensor:
    logits = head(hidden) + (0 if logits_bias is None else logits_bias)
    summed = F.cross_entropy(logits, targets, reduction="sum")
    return summed / ((targets != -100).sum() if divisor is None else divisor)


@pytest.mark.parametrize("rows,chunk", [(23, 5), (16, 16), (9, 40)])  # a remainder, one exact chunk, one chunk
@pytest.mark.parametrize("with_bias,num_items", [(False, None), (True, None), (True, 31)])
def test_wrapped_head_loss_and_gradients_match_a_float64_reference(rows, chunk, with_bias, num_items):
    generator = torch.Generator().manual_seed(rows * 100 + chunk)
    head = LowRankHead(8, 29, 3, 0.0, generator)
    hidden = torch.randn(rows, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = random_targets(rows, 29, 0.3, generator)
    bias = torch.randn(29, generator=generator, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [hidden, *head.parameters(), *([bias] if with_bias else [])]
    expected = reference_loss(head, hidden, targets, bias, num_items)
    loss = ops.wrapped_head_cross_entropy(hidden, head, targets, bias, num_items, chunk_size=chunk)
    assert_close_rel(loss.detach(), expected.detach(), 1e-12, "loss")
    for got, want in zip(grads_of(loss, inputs), grads_of(expected, inputs), strict=True):
        assert_close_rel(got, want, 1e-12, "gradient")


def test_wrapped_head_loss_of_an_all_ignored_batch_is_nan_like_pytorch():
    generator = torch.Generator().manual_seed(3)
    head = LowRankHead(8, 29, 3, 0.0, generator)
    hidden = torch.randn(11, 8, generator=generator, dtype=torch.float64)
    targets = torch.full((11,), -100)
    assert torch.isnan(ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=4))
    assert torch.isnan(F.cross_entropy(head(hidden), targets))


def test_wrapped_head_keeps_no_rows_by_vocab_tensor_and_recomputes_the_same_dropout():
    """Each chunk's logits are recomputed in backward, with the dropout mask its forward drew."""
    generator = torch.Generator().manual_seed(4)
    rows, vocab = 40, 211
    head = LowRankHead(16, vocab, 4, 0.5, generator).train()
    hidden = torch.randn(rows, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = random_targets(rows, vocab, 0.2, generator)
    torch.manual_seed(11)
    shapes = saved_tensor_shapes(lambda: ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=8))
    assert not any(vocab in shape for shape in shapes), shapes
    torch.manual_seed(11)
    loss = ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=8)
    torch.manual_seed(11)  # the same chunks, the same draws, kept instead of recomputed
    kept = sum(ops._chunk_loss_sum(head, h, t, None, -100) for h, t in zip(hidden.split(8), targets.split(8)))
    kept = kept / (targets != -100).sum()
    inputs = [hidden, head.down, head.up]
    for got, want in zip(grads_of(loss, inputs), grads_of(kept, inputs), strict=True):
        assert_close_rel(got, want, 1e-12, "gradient with dropout")


def test_wrapped_head_loss_without_grad_mode():
    generator = torch.Generator().manual_seed(5)
    head = LowRankHead(8, 29, 3, 0.0, generator)
    hidden = torch.randn(13, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = random_targets(13, 29, 0.2, generator)
    with torch.no_grad():
        shapes = saved_tensor_shapes(lambda: ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=4))
        loss = ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=4)
        assert_close_rel(loss, reference_loss(head, hidden, targets), 1e-12, "loss")
    assert shapes == [] and loss.grad_fn is None


# ----------------------------------------------------------------------------------------------
# Families with PEFT on the head, against stock + PEFT
# ----------------------------------------------------------------------------------------------

def logits_kept_for_backward(model, batch: dict) -> bool:
    """Whether a training forward keeps logits (a matrix whose last dimension is the vocabulary) for backward."""
    model.train()
    shapes = saved_tensor_shapes(lambda: model(**batch))
    return any(len(shape) >= 2 and shape[-1] == VOCAB for shape in shapes)


HEAD_ADAPTERS = {  # family: PEFT options that wrap its lm_head
    "llama": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    "bloom": dict(target_modules=["query_key_value"], modules_to_save=["lm_head"]),
    "bart": dict(target_modules=["q_proj", "fc1"], modules_to_save=["lm_head"]),
    "gpt2": dict(target_modules=["c_attn", "lm_head"]),
}


def plain_pair(tmp_path, name: str):
    """Stock and ours with the same random weights, ours loaded through trust_remote_code."""
    stock_class, make_config, auto_class = STOCK[name]
    torch.manual_seed(0)
    stock = stock_class(make_config())
    randomize_(stock)
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, name.split("_")[0])
    return stock, auto_class.from_pretrained(tmp_path, trust_remote_code=True)


def peft_pair(tmp_path, name: str, adapter: dict):
    stock, ours = plain_pair(tmp_path, name)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **adapter)
    torch.manual_seed(1)
    stock = peft.get_peft_model(stock, peft.LoraConfig(**lora))
    ours = peft.get_peft_model(ours, peft.LoraConfig(**lora))
    ours.load_state_dict(stock.state_dict())
    with torch.no_grad():  # a trained head copy: modules_to_save starts as the original's copy
        for (_, mine), (_, theirs) in zip(ours.named_parameters(), stock.named_parameters(), strict=True):
            if mine.requires_grad:
                noise = 0.05 * torch.randn(theirs.shape, generator=torch.Generator().manual_seed(theirs.numel()))
                theirs.add_(noise)
                mine.copy_(theirs)
    return stock, ours


@pytest.mark.parametrize("name", list(HEAD_ADAPTERS))
def test_wrapped_head_trains_without_logits_like_stock_with_peft(tmp_path, name):
    stock, ours = peft_pair(tmp_path, name, HEAD_ADAPTERS[name])
    ours.config.loss_chunk_size = 5  # several chunks and a remainder
    head = ours.get_output_embeddings()
    assert not ops._is_plain_module(head), type(head)
    batch = batch_for(name, torch.Generator().manual_seed(12))
    expected, expected_grads = train_step(stock, batch)
    got, grads = train_step(ours, batch)
    assert got.logits is None and expected.logits is not None
    assert logits_kept_for_backward(stock, batch) and not logits_kept_for_backward(ours, batch)
    assert_close_rel(got.loss.detach(), expected.loss.detach(), TOL, "loss")
    assert grads.keys() == expected_grads.keys() and any("lm_head" in key for key in grads)
    for key, grad in expected_grads.items():
        assert_close_rel(grads[key], grad, TOL, f"grad of {key}")


class SequenceShapedHead(torch.nn.Module):
    """A user's head written for ``[batch, seq, d]`` input, as stock calls it: an unpacked shape and an einsum."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        return torch.einsum("bsd,vd->bsv", hidden, self.weight).reshape(batch, seq, -1)


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_a_head_written_for_batch_and_sequence_trains_without_logits_like_stock(tmp_path, name):
    """Before, the chunks reached the head as ``[rows, d]``: a ValueError (unpack) or a RuntimeError (einsum)
    where stock trains."""
    stock, ours = plain_pair(tmp_path, name)
    stock.lm_head = SequenceShapedHead(stock.lm_head)
    ours.lm_head = SequenceShapedHead(ours.lm_head)
    ours.config.loss_chunk_size = 5  # several chunks and a remainder
    _, got = assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(14)))
    assert got.logits is None and ours.lm_head.weight.grad is not None


def spy_on(monkeypatch, model, name: str) -> list:
    """Record the calls of ``name`` in the module our (PEFT-wrapped) model was loaded from."""
    module = importlib.import_module(type(model.base_model.model).__module__)
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


@pytest.mark.parametrize("name", ["bloom", "llama"])
def test_a_modules_to_save_head_runs_the_fused_op_and_a_lora_head_is_called_on_chunks(tmp_path, monkeypatch, name):
    """``modules_to_save`` wraps a plain copy of the head, which the fused op takes as it is (no head call, no
    recomputation); LoRA on the head changes its forward, so the head is called."""
    _, ours = peft_pair(tmp_path, name, HEAD_ADAPTERS[name])
    fused = spy_on(monkeypatch, ours, "linear_cross_entropy")
    chunked = spy_on(monkeypatch, ours, "wrapped_head_cross_entropy")
    train_step(ours, batch_for(name, torch.Generator().manual_seed(15)))
    assert (len(fused), len(chunked)) == ((1, 0) if "modules_to_save" in HEAD_ADAPTERS[name] else (0, 1))


def test_a_modules_to_save_head_with_adapters_disabled_is_the_original_head(tmp_path, monkeypatch):
    """With adapters disabled the wrapper runs the original head, not the trained copy: so does the loss."""
    stock, ours = peft_pair(tmp_path, "bart", HEAD_ADAPTERS["bart"])
    copies = ours.get_output_embeddings().modules_to_save
    assert not torch.equal(copies["default"].weight, ours.get_output_embeddings().original_module.weight)
    fused = spy_on(monkeypatch, ours, "linear_cross_entropy")
    batch = batch_for("bart", torch.Generator().manual_seed(16))
    stock.train(), ours.train()
    with stock.disable_adapter(), ours.disable_adapter():
        expected, got = stock(**batch).loss, ours(**batch).loss
    assert fused and got.requires_grad is expected.requires_grad
    assert_close_rel(got.detach(), expected.detach(), TOL, "loss with adapters disabled")
    assert_close_rel(ours(**batch).loss.detach(), stock(**batch).loss.detach(), TOL, "loss with the copy")


def test_wrapped_head_with_num_items_in_batch_and_tied_embeddings(tmp_path):
    stock, ours = peft_pair(tmp_path, "llama_tied", dict(target_modules=["lm_head", "gate_proj"]))
    batch = batch_for("llama", torch.Generator().manual_seed(13))
    expected, expected_grads = train_step(stock, batch, num_items_in_batch=torch.tensor(37))
    got, grads = train_step(ours, batch, num_items_in_batch=torch.tensor(37))
    assert got.logits is None
    assert_close_rel(got.loss.detach(), expected.loss.detach(), TOL, "loss")
    for key, grad in expected_grads.items():
        assert_close_rel(grads[key], grad, TOL, f"grad of {key}")


def test_qwen_wrapped_head_matches_its_own_kept_logits(tmp_path):
    from test_qwen import load, random_ids, random_model, save_qwen

    torch.manual_seed(6)
    model = load(save_qwen(random_model(), tmp_path)).train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["c_attn", "w1"], modules_to_save=["lm_head"])
    model = peft.get_peft_model(model, lora)
    model.config.loss_chunk_size = 4
    ids = random_ids(2, 11)
    labels = ids.clone()
    labels[0, 2:6] = -100
    results = []
    for keep in (True, False):
        model.config.keep_logits_in_training = keep
        results.append(train_step(model, dict(input_ids=ids, labels=labels)))
    (kept, kept_grads), (got, grads) = results
    assert kept.logits is not None and got.logits is None
    assert_close_rel(got.loss.detach(), kept.loss.detach(), TOL, "loss")
    assert grads.keys() == kept_grads.keys() and any("lm_head" in key for key in grads)
    for key, grad in kept_grads.items():
        assert_close_rel(grads[key], grad, TOL, f"grad of {key}")


def test_a_hooked_head_keeps_its_logits_and_says_so_once(tmp_path, monkeypatch, caplog):
    stock, ours = peft_pair(tmp_path, "llama", HEAD_ADAPTERS["llama"])
    handle = ours.get_output_embeddings().base_layer.register_forward_pre_hook(lambda *args: None)
    module = importlib.import_module(type(ours.base_model.model).__module__)
    monkeypatch.setattr(module, "_logged_messages", set())
    batch = batch_for("llama", torch.Generator().manual_seed(14))
    try:
        with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
            for _ in range(2):
                got, grads = train_step(ours, batch)
    finally:
        handle.remove()
    assert got.logits is not None and got.logits.shape[-1] == VOCAB
    assert sum("LM head has hooks" in record.getMessage() for record in caplog.records) == 1
    expected, expected_grads = train_step(stock, batch)
    assert_close_rel(got.loss.detach(), expected.loss.detach(), TOL, "loss")


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_wrapped_head_training_step_compiles_into_one_graph(tmp_path, name):
    """The chunks' checkpoints trace as dynamo's checkpoint operator: no graph break in our code or PEFT's."""
    _, ours = peft_pair(tmp_path, name, dict(target_modules=["q_proj", "lm_head"]))
    assert_training_step_compiles_into_one_graph(ours, batch_for(name, torch.Generator().manual_seed(17)))
