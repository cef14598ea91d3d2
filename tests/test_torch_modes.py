"""Our models under torch's modes: a user's ``TorchFunctionMode`` (quantization-aware training written as a mode),
and the fake and meta tensors that tools estimating memory or shapes run a model on. Same weights and inputs as the
stock class, loaded through trust_remote_code; Qwen, which has no stock class, where only ours is at stake.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.overrides import TorchFunctionMode

from memory_efficient_adapter.configuration_qwen import QWenConfig
from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel
from remote_code import assert_close_rel
from test_stock_behaviour import GENERATIVE_CLASSES, VOCAB, family_config, stock_and_ours, token_inputs

FAMILIES = ["llama", "gpt2", "bloom", "bart"]
NO_DROPOUT = {
    "llama": {},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "bloom": {"hidden_dropout": 0.0, "attention_dropout": 0.0},
    "bart": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
}


class FakeQuantizedLinears(TorchFunctionMode):
    """Quantization-aware training as a mode: every ``F.linear`` takes its weight rounded to 8 bits, and the
    gradient passes the rounding straight through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            scale = weight.detach().abs().amax() / 127
            rounded = weight + ((weight / scale).round() * scale - weight).detach()
            return func(x, rounded, *rest, **kwargs)
        return func(*args, **kwargs)


def training_inputs(family: str) -> dict:
    """A padded batch with labels; a left-padded row's first kept token is not predicted (stock predicts it from
    a padded position, whose output differs: ours are zeros where stock averages over nothing)."""
    inputs = token_inputs(family, seq=9)
    labels = inputs.get("decoder_input_ids", inputs["input_ids"]).clone()
    if family != "bart":
        labels[0, :3] = -100  # row 0 is padded on the left over two tokens
    return {**inputs, "labels": labels}


def loss_and_gradients(model, inputs: dict):
    model.zero_grad(set_to_none=True)
    with FakeQuantizedLinears():
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_users_function_mode_changes_what_stock_sees_and_the_gradients_follow(family, tmp_path):
    """Our autograd Functions called ``F.linear`` in forward, where the mode swapped in the rounded weight, and
    took their backward from the module's weight: the loss was stock's, the gradients 0.5% to 2.6% off (GPT-2's
    loss too: its MLP projection reached the mode as an ``F.linear`` stock never calls). Under a mode of the
    user's the fused ops compute as stock does."""
    config = family_config(family, **NO_DROPOUT[family])
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path, config=config)
    inputs = training_inputs(family)
    expected_loss, expected = loss_and_gradients(stock.train(), inputs)
    actual_loss, actual = loss_and_gradients(ours.train(), inputs)
    assert_close_rel(actual_loss, expected_loss, 1e-6, "loss")
    assert actual.keys() == expected.keys()
    total = torch.cat([grad.flatten() for grad in expected.values()]).norm()
    for name, grad in expected.items():  # (key biases' gradients are zero up to rounding: measured against all)
        assert (actual[name] - grad).norm() <= 1e-5 * max(grad.norm(), 1e-3 * total), name


def test_torchs_own_device_context_keeps_the_fused_ops(tmp_path):
    """``with torch.device(...)`` is a function mode of torch's: the fused loss still runs (no logits)."""
    _, ours = stock_and_ours("llama", GENERATIVE_CLASSES["llama"], tmp_path)
    inputs = training_inputs("llama")
    with torch.device("cpu"):
        assert ours.train()(**inputs).logits is None
    with FakeQuantizedLinears():
        assert ours(**inputs).logits is not None


def fake_run(model_class, config, inputs: dict, training: bool):
    """Build the model and run a padded batch on fake tensors, as memory estimators do: the output's shapes."""
    with FakeTensorMode() as mode:
        model = model_class(config).train(training)
        fake = {name: mode.from_tensor(tensor) for name, tensor in inputs.items()}
        output = model(**fake)
        if training:
            output.loss.backward()
        return {name: tuple(value.shape) for name, value in output.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_runs_on_fake_tensors_as_stocks(family, training, tmp_path):
    """Deciding whether anything is padded, and which tokens to keep, read the mask on the host: fake tensors have
    no values (``DataDependentOutputException``). Such a mask is now taken as padded, as while tracing."""
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = training_inputs(family) if training else token_inputs(family, seq=9)
    actual = fake_run(type(ours), ours.config, inputs, training)
    assert ("loss" in actual) == training and ("logits" in actual or training)  # (training with labels: no logits)
    try:
        expected = fake_run(type(stock), stock.config, inputs, training)
    except DataDependentOutputException:  # stock BART on transformers 4.57 and 5.0 reads its mask on the host
        assert family == "bart" and training
        return
    assert all(expected[name] == shape for name, shape in actual.items())


def test_a_mode_around_the_forward_only_trains_with_gradient_checkpointing_as_stock(tmp_path):
    """The forward computed as stock under the mode; backward recomputed the checkpointed layers without it, on the
    fused path, which saves other tensors (CheckpointError). The recompute now takes stock's path again."""
    config = family_config("llama", **NO_DROPOUT["llama"])
    stock, ours = stock_and_ours("llama", GENERATIVE_CLASSES["llama"], tmp_path, config=config)
    inputs = training_inputs("llama")
    steps = []
    for model in (stock, ours):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train().zero_grad(set_to_none=True)
        with PassThroughMode():
            loss = model(**inputs).loss
        loss.backward()
        steps.append((loss.detach(), {name: param.grad for name, param in model.named_parameters()}))
    (expected_loss, expected), (actual_loss, actual) = steps
    assert_close_rel(actual_loss, expected_loss, 1e-6, "loss")
    for name, grad in expected.items():
        assert_close_rel(actual[name], grad, 1e-5, name)


class PassThroughMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("family", [
    pytest.param("llama", marks=pytest.mark.skipif(
        transformers.__version__.startswith(("4.", "5.0.")),
        reason="stock LLaMA's rotary embedding refuses the meta device on transformers 4.57 and 5.0",
    )),
    "gpt2",
    "bloom",
])
def test_a_padded_batch_runs_on_the_meta_device_as_stock(family, training, tmp_path):
    """Stock BLOOM runs a padded batch on meta tensors, and all three train there with attention dropout (ours drew
    the chunked kernel's dropout from a generator the meta device does not have)."""
    config = family_config(family, **({"attention_dropout": 0.1} if family == "llama" else {}))
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path, config=config)
    inputs = {name: tensor.to("meta") for name, tensor in training_inputs(family).items()}
    if not training:
        inputs.pop("labels")
    shapes = []
    for model in (stock, ours):
        output = copy.deepcopy(model).to("meta").train(training)(**inputs)
        shapes.append(output.loss.shape if training else output.logits.shape)
    assert shapes[1] == shapes[0]


def test_qwen_is_built_and_run_under_fake_tensor_mode():
    """The constructor converted the model to its precision even where every parameter had it already, and a
    fake parameter cannot be swapped for a converted copy; as in the original, nothing is converted then."""
    config = QWenConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
                        intermediate_size=48, seq_length=64, fp32=True)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    shapes = fake_run(QWenLMHeadModel, config, {"input_ids": ids, "attention_mask": mask}, training=False)
    assert shapes["logits"] == (2, 9, VOCAB)
