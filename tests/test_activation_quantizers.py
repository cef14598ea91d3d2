"""Quantizers that scale activations by statistics of the whole tensor a module is given (one int8 scale per
call, outlier columns chosen over every token, calibrated ranges): a call on part of the tokens (a padded
batch run unpadded, a loss chunk, a sequence tile) would scale them otherwise, so such a model runs these
modules on what stock gives them. The stand-ins carry the attributes by which the libraries' modules are known
(torchao's QAT linears and quantized weights, optimum-quanto's modules, bitsandbytes' LLM.int8), and compute
their kind of quantization with a straight-through gradient, so that every gradient is checked against stock.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from remote_code import assert_close_rel
from test_fused_models import assert_same_training_step, batch_for, family_pairs, train_step  # noqa: F401 - a fixture
from test_modified_modules import pair_copy


def fake_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to int8 steps of one scale for the whole tensor; the gradient passes straight through."""
    scale = x.detach().abs().amax().clamp_min(1e-6) / 127
    return x + ((x / scale).round() * scale - x).detach()


class ActivationFakeQuantizer(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_int8(x)


class QATLinear(torch.nn.Linear):
    """As torchao's QAT linear: the input goes through ``activation_fake_quantizer``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activation_fake_quantizer(x), self.weight, self.bias)


class QuantoLinear(torch.nn.Linear):
    """As optimum-quanto's ``QLinear`` with ``activations=qint8`` (which its constructor sets on the instance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_int8(x), self.weight, self.bias)


class Linear8bitLt(torch.nn.Linear):
    """As bitsandbytes' LLM.int8: feature columns with an entry above ``state.threshold`` in any token stay exact,
    the others are quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = (x.detach().abs() > self.state.threshold).flatten(0, -2).any(0)
        return F.linear(torch.where(outliers, x, fake_int8(x)), self.weight, self.bias)


class Float8Linear(torch.nn.Linear):
    """As torchao's float8 training linear with tensorwise scaling: the input is cast by one amax of it all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_int8(x), self.weight, self.bias)


Float8Linear.__module__ = "torchao.float8.float8_linear"


class DynamicActivationWeight(torch.Tensor):
    """As torchao's weights that quantize the input of each ``F.linear`` (``act_quant_kwargs`` set), in a bare
    ``nn.Linear``."""

    act_quant_kwargs = "per tensor"

    @classmethod
    def __torch_function__(cls, func, types=(), args=(), kwargs=None):
        if func is F.linear:
            x, weight, *rest = args
            return F.linear(fake_int8(x), weight.as_subclass(torch.Tensor), *rest, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def qat(module: torch.nn.Linear) -> None:
    module.__class__ = QATLinear
    module.activation_fake_quantizer = ActivationFakeQuantizer()


def quanto(module: torch.nn.Linear) -> None:
    module.__class__ = QuantoLinear
    module.activation_qtype = "qint8"


def int8_with_outliers(module: torch.nn.Linear) -> None:
    module.__class__ = Linear8bitLt
    module.state = types.SimpleNamespace(threshold=0.5)


def float8_training(module: torch.nn.Linear) -> None:
    module.__class__ = Float8Linear


def dynamic_activations(module: torch.nn.Linear) -> None:
    frozen = module.weight.detach().clone().as_subclass(DynamicActivationWeight)
    module.weight = torch.nn.Parameter(frozen, requires_grad=False)


QUANTIZERS = {"torchao QAT": qat, "optimum-quanto": quanto, "bitsandbytes int8": int8_with_outliers,
              "torchao dynamic": dynamic_activations, "torchao float8": float8_training}
TILED = {"llama": "model.layers.0.mlp.down_proj", "bloom": "transformer.h.1.mlp.dense_4h_to_h",
         "bart": "model.encoder.layers.0.fc2"}
PAD = 3
kernel_layer = importlib.import_module("memory_efficient_adapter.attention")


def loud_padding(models: tuple, batch: dict) -> dict:
    """The padded positions hold a token whose embedding is one spike, which stays one through the norms: the
    largest activations of the batch are the padding's, and in stock a per-tensor scale sees them."""
    for model in models:
        with torch.no_grad():
            model.get_input_embeddings().weight[PAD] = F.one_hot(torch.tensor(0), model.config.hidden_size) * 10.0
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, PAD)
    return batch


CASES = [("llama", "padded"), ("gpt2", "padded"), ("bloom", "padded"), ("llama", "loss chunks"),
         ("bart", "loss chunks"), ("llama", "tiles"), ("bloom", "tiles"), ("bart", "tiles")]


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
@pytest.mark.parametrize("name, case", CASES)
def test_a_module_quantizing_by_its_whole_input_gets_it_whole_as_in_stock(family_pairs, name, case, quantizer):
    """Unpadded, the head's scale left out the padding (losses 4e-4 to 4e-3 off); per loss chunk or tile each
    part had its own scale or outlier columns (losses 2e-5 to 4e-4 off, BART's embedding gradient 3e-4)."""
    stock, ours = pair_copy(family_pairs, name)
    for model in (stock, ours):
        QUANTIZERS[quantizer](model.get_submodule(TILED[name] if case == "tiles" else "lm_head"))
    batch = batch_for(name, torch.Generator().manual_seed(41))
    if case == "padded":
        batch = loud_padding((stock, ours), batch)
    else:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    ours.config.loss_chunk_size = 4 if case == "loss chunks" else None
    ours.config.sequence_tile_size = 4 if case == "tiles" else 0
    assert_same_training_step(stock, ours, batch)


def input_ranges(model, batch: dict) -> dict:
    """The largest input magnitude of every linear in one eval forward, as calibration (optimum-quanto's, with
    hooks for every module) records it."""
    names = {id(module): name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    ranges = {}

    def record(module, args, output):
        if id(module) in names:
            ranges[names[id(module)]] = max(ranges.get(names[id(module)], 0.0), float(args[0].abs().max()))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with torch.no_grad():
            model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    return ranges


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_calibration_by_hooks_for_every_module_sees_the_padded_batch_as_stock(family_pairs, name):
    """Unpadded, the recorded ranges left out the padding's (a third smaller for the first layer and the head)."""
    stock, ours = pair_copy(family_pairs, name)
    batch = loud_padding((stock, ours), batch_for(name, torch.Generator().manual_seed(43)))
    expected, got = input_ranges(stock, batch), input_ranges(ours, batch)
    assert got.keys() == expected.keys() and "lm_head" in got
    for module, value in expected.items():
        assert_close_rel(torch.tensor(got[module]), torch.tensor(value), 1e-5, f"input range of {module}")


class FakeQuantizedLinearInputs(TorchFunctionMode):
    """Activation quantization written as a mode: every ``F.linear`` (GPT-2's ``Conv1D``: ``torch.addmm``) takes
    its input rounded by one int8 scale for the whole tensor it is given."""

    def __init__(self):
        super().__init__()
        self.input_shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch.addmm:
            position = 0 if func is F.linear else 1
            self.input_shapes.append(tuple(args[position].shape))
            args = (*args[:position], fake_int8(args[position]), *args[position + 1:])
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_a_function_mode_quantizing_linear_inputs_sees_the_padded_batch_as_stock(family_pairs, name):
    """Under a user's TorchFunctionMode the fused ops compute as stock, but a padded batch still ran unpadded:
    the mode saw the packed row, whose scale left out the padding (loss 8e-4 to 2e-3 off, gradients up to 7e-2)."""
    stock, ours = pair_copy(family_pairs, name)
    batch = loud_padding((stock, ours), batch_for(name, torch.Generator().manual_seed(47)))
    modes = FakeQuantizedLinearInputs(), FakeQuantizedLinearInputs()
    with modes[0]:
        expected = train_step(stock, batch)
    with modes[1]:
        got = train_step(ours, batch)
    assert modes[1].input_shapes == modes[0].input_shapes
    assert_close_rel(got[0].loss.detach(), expected[0].loss.detach(), 1e-5, "loss")
    for param_name, grad in expected[1].items():
        if not param_name.endswith("k_proj.bias"):  # rounding noise around 0 in both
            assert_close_rel(got[1][param_name], grad, 1e-5, f"grad of {param_name}")


class QuantizerOfItsClass(torch.nn.Linear):
    activation_qtype = "qint8"


class QuantizerAsProperty(torch.nn.Linear):
    @property
    def activation_fake_quantizer(self):
        return self.__dict__.get("quantizer")


def quantizer_as_property(quantizer) -> torch.nn.Module:
    module = QuantizerAsProperty(2, 2)
    module.__dict__["quantizer"] = quantizer
    return module


class ForwardingAttributes(torch.nn.Module):
    """A wrapper that gives the attributes of the module it wraps as its own."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.__dict__["inner"] = inner

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)


class GivesQuantizerOnLookup(torch.nn.Linear):
    """A ``__getattribute__`` of its own that gives an attribute held nowhere."""

    def __getattribute__(self, name: str):
        return "qint8" if name == "activation_qtype" else super().__getattribute__(name)


def weight_with_attribute(name: str, value) -> torch.nn.Module:
    module = torch.nn.Linear(2, 2)
    setattr(module.weight, name, value)
    return module


def with_attribute(name: str, value) -> torch.nn.Module:
    module = torch.nn.Linear(2, 2)
    setattr(module, name, value)
    return module


KEPT_QUANTIZERS = {
    "on the instance": (lambda: with_attribute("activation_qtype", "qint8"), True),
    "None on the instance": (lambda: with_attribute("activation_qtype", None), False),
    "a submodule": (lambda: with_attribute("activation_fake_quantizer", ActivationFakeQuantizer()), True),
    "None as a submodule": (lambda: with_attribute("activation_fake_quantizer", None), False),
    "on the class": (lambda: QuantizerOfItsClass(2, 2), True),
    "a property": (lambda: quantizer_as_property(ActivationFakeQuantizer()), True),
    "a property giving None": (lambda: quantizer_as_property(None), False),
    "forwarded by a wrapper": (lambda: ForwardingAttributes(with_attribute("activation_qtype", "qint8")), True),
    "given by __getattribute__": (lambda: GivesQuantizerOnLookup(2, 2), True),
    "on a plain weight": (lambda: weight_with_attribute("act_quant_kwargs", "per tensor"), True),
    "None on a plain weight": (lambda: weight_with_attribute("input_quant_func", None), False),
    "none": (lambda: torch.nn.Linear(2, 2), False),
    "a batch norm": (lambda: torch.nn.BatchNorm1d(2), True),
}


@pytest.mark.parametrize("kept", list(KEPT_QUANTIZERS))
def test_an_activation_quantizer_is_found_wherever_the_module_keeps_it(kept):
    """Each place a module or its weight may keep a quantizer counts (its instance, a submodule, its class, a
    property, a ``__getattr__`` or ``__getattribute__`` of its own), and None counts nowhere."""
    make, expected = KEPT_QUANTIZERS[kept]
    module = make()
    assert kernel_layer._takes_batch_statistics(module) is expected
    assert kernel_layer._takes_batch_statistics(module) is expected


def test_a_class_registered_as_a_quantizer_after_it_was_checked_counts():
    """Registering a class with torch.ao's abstract bases (``register``) after a module of it was checked makes
    it count from then on, as ``isinstance`` says."""

    class LateQuantizer(torch.nn.Identity):
        pass

    module = LateQuantizer()
    assert kernel_layer._takes_batch_statistics(module) is False
    torch.ao.quantization.FakeQuantizeBase.register(LateQuantizer)
    assert kernel_layer._takes_batch_statistics(module) is True



QUANTIZED = {  # which nn.Linear modules quantize_dynamic replaces, by their attribute name
    "layer linears": lambda name: name != "lm_head",
    "MLP outputs": lambda name: name in ("down_proj", "fc2"),
    "attention outputs": lambda name: name in ("o_proj", "out_proj", "dense"),
    "LM head": lambda name: name == "lm_head",
}


def quantize_linears(model: torch.nn.Module, chosen) -> None:
    """``quantize_dynamic`` on the ``nn.Linear`` children ``chosen`` by name: int8 modules that pass no gradient."""
    for name, module in list(model.named_children()):
        if isinstance(module, torch.nn.Linear) and chosen(name):
            quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(module), dtype=torch.qint8)
            setattr(model, name, quantized[0])
        else:
            quantize_linears(module, chosen)


@pytest.mark.parametrize(
    "name, quantized, settings",
    [("llama", "layer linears", {}), ("bloom", "layer linears", {}), ("bart", "layer linears", {}),
     ("llama", "MLP outputs", {}), ("bart", "MLP outputs", {}), ("llama", "attention outputs", {}),
     ("llama", "attention outputs", {"attn_backend": "eager", "attention_dropout": 0.2}),
     ("bloom", "attention outputs", {}), ("bart", "attention outputs", {}), ("llama", "LM head", {}),
     ("llama", "LM head", {"sequence_tile_size": 4}), ("bart", "LM head", {})],
)
def test_what_only_non_differentiable_modules_read_gets_no_gradient_as_in_stock(
    family_pairs, name, quantized, settings
):
    """Parameters whose outputs reach the loss only through ``quantize_dynamic``'s int8 linears get a None gradient
    in stock, which AdamW skips; our fused ops (norms, MLP activations, the padded batch's chunked or eager
    attention, sequence tiles) passed zeros back instead, which weight decay moved."""
    stock, ours = pair_copy(family_pairs, name)
    for model in (stock, ours):
        quantize_linears(model, QUANTIZED[quantized])
    for key, value in settings.items():
        setattr(ours.config, key, value)
    batch = batch_for(name, torch.Generator().manual_seed(3))
    before = {key: parameter.detach().clone() for key, parameter in ours.named_parameters()}
    steps = []
    for model in (stock, ours):
        torch.manual_seed(0)
        output, grads = train_step(model, batch)
        steps.append((output.loss.detach(), grads))
    (expected_loss, expected_grads), (loss, grads) = steps
    assert_close_rel(loss, expected_loss, 1e-5, "loss")
    untouched = set(before) - set(expected_grads)
    assert untouched, "stock gave every parameter a gradient: nothing to check"
    assert grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        if key.endswith("k_proj.bias"):  # softmax ignores a key bias: both are rounding noise around 0
            assert grads[key].abs().max() < 1e-7 and grad.abs().max() < 1e-7, key
            continue
        assert_close_rel(grads[key], grad, 1e-4, f"grad of {key}")
    torch.optim.AdamW(ours.parameters(), lr=0.1, weight_decay=0.5).step()
    moved = [key for key, value in ours.named_parameters() if key in untouched and not torch.equal(value, before[key])]
    assert not moved, f"AdamW moved parameters that stock leaves without a gradient: {moved}"
