"""Long-context options (sequence-tiled MLP and norms, offloaded layer checkpoints) against the plain models.

Tiny random LLaMA and Qwen models, fp32 on the CPU, loaded through trust_remote_code: with and without the
options, the loss and every gradient (LoRA gradients through PEFT too) agree within 1e-5 relative.
"""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from memory_efficient_adapter.configuration_qwen import QWenConfig
from memory_efficient_adapter.families import write_remote_code
from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel
from remote_code import (
    TRANSFORMERS_5,
    assert_close_rel,
    first_row_direction,
    relative_error,
    right_padded_mask,
)

TOL = 1e-5
VOCAB = 97
TILE = 5
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen": ["c_attn", "c_proj", "w1", "w2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
FAMILIES = ["llama", "qwen", "gpt2", "bloom", "bart"]
SECOND_ATTENTION = {"llama": "model.layers.1.self_attn", "qwen": "transformer.h.1.attn", "gpt2": "transformer.h.1.attn",
                    "bloom": "transformer.h.1.self_attention", "bart": "model.encoder.layers.1.self_attn"}  # fmt: skip
# BART: the decoder's layers are checkpointed too (their cross-attention runs again in backward).
DECODER_ATTENTION = {"bart": "model.decoder.layers.1.encoder_attn"}
OPTIONS = {
    "tiled": dict(sequence_tile_size=TILE),
    "offloaded": dict(offload_checkpoints=True),
    "tiled+offloaded": dict(sequence_tile_size=TILE, offload_checkpoints=True),
    "offloaded, last 2 on device": dict(offload_checkpoints=True, checkpoints_on_device=2),
}


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def randomize_(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere, norm scales and biases included."""
    generator = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name or name.split(".")[-2].startswith("ln_")
            param.copy_(1.0 + 0.2 * noise if is_norm else 0.15 * noise)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A saved remote-code folder per family: stock LLaMA, GPT-2 and BLOOM (no dropout) weights, and a Qwen with
    biases and partial rotary."""
    llama = LlamaForCausalLM(llama_config())
    qwen = QWenLMHeadModel(
        QWenConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, kv_channels=8,
            intermediate_size=80, seq_length=12, max_position_embeddings=64, rotary_pct=0.5, no_bias=False, fp32=True,
        )  # fmt: skip
    )
    qwen.config.bf16 = qwen.config.fp16 = qwen.config.fp32 = False
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0)  # fmt: skip
    )
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4))
    bart = BartForConditionalGeneration(
        BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=80, decoder_ffn_dim=72, max_position_embeddings=64,
                   dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
    )
    result = {}
    for family, model in (("llama", llama), ("qwen", qwen), ("gpt2", gpt2), ("bloom", bloom), ("bart", bart)):
        randomize_(model)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        result[family] = write_remote_code(folder, family)
    return result


def load(folder, family: str, **options):
    """Load as a user does; the long-context ``options`` are set on the config (they are read at forward)."""
    precision = {"fp32": True} if family == "qwen" else {}
    auto_class = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    model = auto_class.from_pretrained(folder, trust_remote_code=True, **precision)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    for name, value in options.items():
        setattr(model.config, name, value)
    return model.train()


def enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def batch(length: int = 13):
    ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(7))
    mask = right_padded_mask([length, length - 4], length)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def seq2seq_labels(length: int) -> torch.Tensor:
    """Decoder labels shorter than the encoder input, one row padded (-100)."""
    labels = torch.randint(3, VOCAB, (2, length - 4), generator=torch.Generator().manual_seed(8))
    return labels.masked_fill(right_padded_mask([length - 4, length - 7], length - 4) == 0, -100)


def loss_and_grads(model, length: int = 13):
    """The loss and every trainable parameter's gradient. BART's key biases are left out: softmax ignores a
    constant per query row, so their gradient is zero up to rounding and its relative error means nothing."""
    ids, mask, labels = (tensor.to(model.device) for tensor in batch(length))
    if model.config.is_encoder_decoder:
        labels = seq2seq_labels(length).to(model.device)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()
             if param.requires_grad and not name.endswith("k_proj.bias")}  # fmt: skip
    assert all(grad.abs().sum() > 0 for grad in grads.values()), "a gradient is zero: the test would prove nothing"
    return loss.detach(), grads


def assert_same_loss_and_grads(actual, expected, what: str, tol: float = TOL) -> None:
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    assert_close_rel(loss, expected_loss, tol, f"loss ({what})")
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert_close_rel(grads[name], grad, tol, f"grad of {name} ({what})")


def kernel_module(model):
    """The remote-code module the model's classes come from (holds its copy of the kernel layer)."""
    return sys.modules[type(model).__module__]


# ----------------------------------------------------------------------------------------------
# Loss and gradients with and without the options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient_checkpointing_enable"])
def test_loss_and_every_gradient_match_the_plain_model(folders, family, options, checkpointing):
    expected = loss_and_grads(load(folders[family], family))
    model = load(folders[family], family, **OPTIONS[options])
    if checkpointing:
        enable_checkpointing(model)
    calls = []
    for name in (SECOND_ATTENTION[family], DECODER_ATTENTION.get(family)):
        if name is not None:
            model.get_submodule(name).register_forward_hook(lambda module, *args: calls.append(module))
    assert_same_loss_and_grads(loss_and_grads(model), expected, f"{family} {options}")
    recomputed = checkpointing or OPTIONS[options].get("offload_checkpoints", False)
    assert len(calls) == (2 if recomputed else 1) * (2 if family in DECODER_ATTENTION else 1)


def spectral_norm_on_down_projections(model) -> None:
    for layer in model.model.layers:
        torch.nn.utils.parametrizations.spectral_norm(layer.mlp.down_proj)


def legacy_spectral_norm_on_down_projections(model) -> None:
    for layer in model.model.layers:
        torch.nn.utils.spectral_norm(layer.mlp.down_proj)


def down_projection_made_from_the_first_layers(model) -> None:
    """Layer 1's down projection computed by a hook from layer 0's parameter (a tie across layers, scaled)."""
    first, second = model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.down_proj
    del second.weight
    second.weight = first.weight * 0.5
    second.register_forward_pre_hook(lambda module, args: setattr(module, "weight", first.weight * 0.5))


@pytest.mark.parametrize("options", ["tiled", "offloaded"])
@pytest.mark.parametrize(
    "transform",
    [spectral_norm_on_down_projections, legacy_spectral_norm_on_down_projections,
     down_projection_made_from_the_first_layers],
)  # fmt: skip
def test_weight_transforms_keep_the_plain_models_loss_and_gradients(folders, transform, options):
    """Spectral norm steps its power iteration at each call in training: called once per tile, the tiled MLP took
    several steps (gradients up to 0.30 off). A weight a hook computes from another layer's parameter: the tiles'
    and offloaded checkpoints' backward gave that parameter no gradient from this layer (0.71 off). Such modules
    run as usual, as in the plain model (the offloaded layers are recomputed in backward, as with stock's gradient
    checkpointing)."""
    models = []
    for settings in ({}, OPTIONS[options]):
        model = load(folders["llama"], "llama", **settings)
        torch.manual_seed(0)  # spectral norm's first vectors
        transform(model)
        if not settings and "offload_checkpoints" in OPTIONS[options]:
            enable_checkpointing(model)
        models.append(model)
    expected, actual = loss_and_grads(models[0]), loss_and_grads(models[1])
    assert_same_loss_and_grads(actual, expected, f"{transform.__name__}, {options}")


def test_an_activation_kept_on_a_module_leaves_the_options_on(folders, monkeypatch, caplog):
    """Only tensors named as weights and biases are looked at for parameters held elsewhere: an output kept on
    its module (its graph reaches every earlier layer's parameters) turned tiles and offloaded checkpoints off
    from the second step on. It is kept by the class's forward here: a hook of the user's turns tiles off."""
    model = load(folders["llama"], "llama", **OPTIONS["tiled+offloaded"])
    mlp_class = type(model.model.layers[0].mlp)
    mlp_forward = mlp_class.forward

    def keeping_the_output(module, *args, **kwargs):
        module.last_output = mlp_forward(module, *args, **kwargs)
        return module.last_output

    monkeypatch.setattr(mlp_class, "forward", keeping_the_output)
    monkeypatch.setattr(kernel_module(model), "_logged_messages", set())
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            loss_and_grads(model)
            model.zero_grad(set_to_none=True)
    assert "is off for modules" not in caplog.text


def loss_with_attention_terms(model) -> tuple:
    """The loss plus a penalty on every attention weight returned (a distillation-like term), and every gradient."""
    ids, mask, labels = batch()
    if model.config.is_encoder_decoder:
        labels = seq2seq_labels(ids.shape[1])
    output = model(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
    weights = [weight for name in names for weight in (getattr(output, name, None) or ())]
    assert weights and all(weight.requires_grad for weight in weights)
    loss = output.loss + sum(weight.square().sum() for weight in weights)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
                           and not name.endswith("k_proj.bias")}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient_checkpointing_enable"])
def test_attention_weights_asked_for_in_training_carry_gradients_with_offloaded_checkpoints(
    folders, family, checkpointing
):
    """Before, the offloaded layers' attention weights came from their forward without gradients: a loss term on
    them changed no gradient (0.95 to 1.0 relative error, all families). Such a forward runs its layers as usual,
    checkpointed as ``gradient_checkpointing_enable()`` set where it was called (each layer runs again)."""
    expected = loss_with_attention_terms(load(folders[family], family))
    model = load(folders[family], family, **OPTIONS["tiled+offloaded"])
    if checkpointing:
        enable_checkpointing(model)
    calls = []
    model.get_submodule(SECOND_ATTENTION[family]).register_forward_hook(lambda module, *args: calls.append(module))
    assert_same_loss_and_grads(loss_with_attention_terms(model), expected, f"{family} attention terms")
    assert len(calls) == (2 if checkpointing else 1)


def test_forward_hooks_on_offloaded_layers_are_said_to_see_no_gradients(folders, monkeypatch, caplog):
    """A hook inside an offloaded layer sees its output without gradients (as under reentrant checkpointing): a
    loss term made from it gets none (3.7% off in q_proj's gradient for a penalty on an MLP output), said once."""
    model = load(folders["llama"], "llama", **OPTIONS["offloaded"])
    caught = []
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: caught.append(output))
    monkeypatch.setattr(kernel_module(model), "_logged_messages", set())
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        loss_and_grads(model)
    said = [record.getMessage() for record in caplog.records if "outputs without gradients" in record.getMessage()]
    assert len(said) == 1 and said[0].startswith("config.offload_checkpoints:"), said


MLP_MODULE = {"llama": "model.layers.0.mlp", "qwen": "transformer.h.0.mlp", "gpt2": "transformer.h.0.mlp",
              "bloom": "transformer.h.0.mlp", "bart": "model.encoder.layers.0.fc1"}  # fmt: skip


def first_row_steering(seen: list):
    """A hook that treats the rows apart: it adds a direction to the first row's output only (and notes the
    output's shape in ``seen``)."""

    def steer(module, args, output):
        seen.append(tuple(output.shape))
        return output + first_row_direction(output)

    return steer


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_hook_inside_a_tiled_module_sees_the_whole_output(folders, family):
    """Called per tile, a hook on a tiled module (or one inside it) saw one tile of flattened tokens at a time,
    and a hook that edits one row edited the wrong tokens: LLaMA's loss 3.8e-3 off. Modules with forward hooks
    run without tiles; the hook sees the ``[batch, seq, ...]`` output once, and the step equals the untiled one."""
    results, shapes = [], []
    for options in ({}, OPTIONS["tiled"]):
        model = load(folders[family], family, **options)
        seen = []
        model.get_submodule(MLP_MODULE[family]).register_forward_hook(first_row_steering(seen))
        results.append(loss_and_grads(model))
        shapes.append(seen)
    untiled, tiled = results
    assert_same_loss_and_grads(tiled, untiled, f"{family} tiled, hooked")
    assert shapes[1] == shapes[0] and all(len(shape) == 3 and shape[0] == 2 for shape in shapes[1]), shapes


def test_pruned_projections_keep_their_tiles(folders, monkeypatch):
    """torch's pruning computes a weight per call in a forward pre-hook, token by token like tensor parallelism's
    and ZeRO-3's hooks: a module with a known package's hook keeps its tiles (only hooks of the user's or PEFT's
    turn them off), and the step equals the untiled one."""
    from torch.nn.utils import prune

    seen = []
    compute_weight_before_the_call = prune.RandomUnstructured.__call__

    def noting_the_input(hook, module, inputs):
        seen.append(tuple(inputs[0].shape))
        return compute_weight_before_the_call(hook, module, inputs)

    monkeypatch.setattr(prune.RandomUnstructured, "__call__", noting_the_input)  # still torch's hook class
    results, shapes = [], []
    for options in ({}, OPTIONS["tiled"]):
        model = load(folders["llama"], "llama", **options)
        torch.manual_seed(0)  # the same pruning mask on both
        prune.random_unstructured(model.model.layers[0].mlp.up_proj, "weight", amount=0.3)
        seen.clear()
        results.append(loss_and_grads(model))
        shapes.append(list(seen))
    assert_same_loss_and_grads(results[1], results[0], "llama tiled, pruned")
    untiled, tiled = shapes
    assert len(untiled) == 1 and len(untiled[0]) == 3, shapes  # one call on the (packed) batch
    assert tiled and all(len(shape) == 2 and shape[0] <= TILE for shape in tiled), shapes  # a call per tile


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flop_counter_around_a_step_with_the_options_counts_their_recompute(folders, family):
    """``FlopCounterMode`` hooks every module (``ModuleTracker``): the tiles' inputs taken without gradients and
    the inputs recomputed in backward made it fail (a view with no autograd node; a hook on a leaf while
    ``autograd.grad`` runs). With both options the step equals the plain one, and the count includes the
    layers run again in backward."""
    from torch.utils.flop_counter import FlopCounterMode

    expected = loss_and_grads(load(folders[family], family))
    counts = []
    for options in ({}, OPTIONS["tiled+offloaded"]):
        with FlopCounterMode(display=False) as counter:
            result = loss_and_grads(load(folders[family], family, **options))
        counts.append((counter.get_total_flops(), counter.get_flop_counts()))
    # Under hooks for every module (ModuleTracker's) the fused ops compute as stock does, in another order than the
    # plain step's: BART's cross-attention query bias, a sum of nearly cancelling terms, is 1.1e-5 off on some CPUs.
    assert_same_loss_and_grads(result, expected, f"{family} tiled+offloaded under FlopCounterMode", tol=3 * TOL)
    (plain, _), (with_options, per_module) = counts
    assert with_options > plain, (with_options, plain)
    mlp = next(name for name in per_module if name.endswith(MLP_MODULE[family]))
    assert sum(per_module[mlp].values()) > 0, per_module[mlp]


def recompiled_functions(run) -> list:
    """The names of the functions Dynamo compiles again while ``run()`` runs."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    try:
        run()
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
    return [message.split()[2] for message in messages if message.startswith("Recompiling function")]


@pytest.mark.parametrize("family", ["llama", "bart"])
@pytest.mark.parametrize("options", ["tiled+offloaded"])
def test_a_compiled_step_with_the_options_matches_the_plain_model(folders, family, options):
    """Under torch.compile the options run between graphs (README). torch 2.11's dynamo could not call the
    trace-time check for parameter hooks with a decoder layer: offloaded checkpoints failed to compile. Dynamo
    compiled the options' entries again for every module they run (past its limit of 8 with a few layers)."""
    expected = loss_and_grads(load(folders[family], family))
    model = load(folders[family], family, **OPTIONS[options])
    torch._dynamo.reset()
    model.compile(backend="eager")
    got = []
    recompiled = recompiled_functions(lambda: got.append(loss_and_grads(model)))
    # what remains: transformers' checkpointing wrapper per layer; our entries once at most (BART's decoder)
    ours = ("sequence_tiled", "offloaded_checkpoint")
    assert set(recompiled) <= {"forward_with_checkpointing", *ours}, recompiled
    assert all(recompiled.count(name) <= 1 for name in ours), recompiled
    assert_same_loss_and_grads(got[0], expected, f"compiled {family} {options}")


def test_a_strict_export_of_a_training_model_with_the_options_traces_stock_layers(folders):
    """Strict ``torch.export`` runs Dynamo, which refused the offloaded checkpoint's untraced call: the check that
    computes as stock under export sat behind it."""
    model = load(folders["llama"], "llama", **OPTIONS["tiled+offloaded"])
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    program = torch.export.export(model, (), inputs, strict=True)
    with torch.no_grad():
        assert_close_rel(program.module()(**inputs).loss, model(**inputs).loss, TOL, "exported loss")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", ["tiled", "tiled+offloaded"])
def test_lora_gradients_match_the_plain_model(folders, family, options):
    """Against the float64 model: within 1e-5 relative, or within twice the plain fp32 model's own error where
    that is larger (BART's LoRA gradients through attention keys cancel to about 2e-5 in fp32)."""
    peft = pytest.importorskip("peft")

    def lora_loss_and_grads(dtype, **model_options):
        model = load(folders[family], family, **model_options).to(dtype)
        torch.manual_seed(11)  # the same random LoRA weights (B too, so that every LoRA gradient is non-zero)
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[family],
                               init_lora_weights=False)  # fmt: skip
        model = peft.get_peft_model(model, lora)
        enable_checkpointing(model)
        result = loss_and_grads(model)
        assert result[1] and all("lora_" in name for name in result[1])
        return result

    expected_loss, expected = lora_loss_and_grads(torch.float64)
    plain_loss, plain = lora_loss_and_grads(torch.float32)
    loss, grads = lora_loss_and_grads(torch.float32, **OPTIONS[options])
    assert_close_rel(loss.double(), expected_loss, max(TOL, 2 * relative_error(plain_loss.double(), expected_loss)))
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        tol = max(TOL, 2 * relative_error(plain[name].double(), grad))
        assert_close_rel(grads[name].double(), grad, tol, f"grad of {name} ({family} LoRA {options})")


# ----------------------------------------------------------------------------------------------
# Sequence tiling
# ----------------------------------------------------------------------------------------------


# Each family's MLP projections, per layer (BART: encoder then decoder layers), and their intermediate width.
MLP_PROJECTIONS = {
    "llama": (lambda model: [(layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
                             for layer in model.model.layers], 80),
    "bloom": (lambda model: [(block.mlp.dense_h_to_4h, block.mlp.dense_4h_to_h) for block in model.transformer.h], 128),
    "bart": (lambda model: [(layer.fc1, layer.fc2) for stack in (model.model.encoder, model.model.decoder)
                            for layer in stack.layers], 80),
}  # fmt: skip


class _IntermediateWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of every op's outputs, forward and backward, as wide as the MLP's intermediate size, but for
    the weights' own shapes (their gradients)."""

    def __init__(self, intermediate: int, weight_shapes: set):
        super().__init__()
        self.intermediate, self.weight_shapes, self.shapes = intermediate, weight_shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.intermediate:
                if tuple(tensor.shape) not in self.weight_shapes:
                    self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("family", sorted(MLP_PROJECTIONS))
def test_tiled_mlp_never_holds_a_whole_intermediate_tensor(folders, family):
    """No tensor of the step, forward or backward, holds more than a tile's tokens of the MLP's intermediate
    width (watched at dispatch: hooks on the projections would be the user's, which turn the tiles off)."""
    model = load(folders[family], family, sequence_tile_size=4)
    layers, intermediate = MLP_PROJECTIONS[family]
    weight_shapes = {shape for layer in layers(model) for projection in layer
                     for shape in (tuple(projection.weight.shape), tuple(projection.weight.shape)[::-1])}  # fmt: skip
    with _IntermediateWatch(intermediate, weight_shapes) as watch:
        loss_and_grads(model, 11)
    assert watch.shapes  # seen only in tiles
    assert all(math.prod(shape[:-1]) <= 4 for shape in watch.shapes), sorted(set(watch.shapes))


def test_sequence_tiled_keeps_only_its_input_and_matches_the_module(folders):
    """Tiles of an MLP: output, input gradient and parameter gradients equal the whole-sequence call, and the
    function saves nothing for backward but its input and the parameters."""
    model = load(folders["llama"], "llama")
    layer = model.model.layers[0]
    modules = (layer.post_attention_layernorm, layer.mlp)
    tiled = kernel_module(model).sequence_tiled
    x = torch.randn(3, 7, 32, requires_grad=True)
    weights = torch.randn(3, 7, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        out = tiled(modules, x, 4)
    parameters = {param.data_ptr() for module in modules for param in module.parameters()}
    assert {tensor.data_ptr() for tensor in saved} == parameters | {x.data_ptr()}
    (out * weights).sum().backward()
    tiled_grads = [x.grad.clone()] + [param.grad.clone() for module in modules for param in module.parameters()]
    x.grad = None
    model.zero_grad()
    expected = layer.mlp(layer.post_attention_layernorm(x))
    (expected * weights).sum().backward()
    expected_grads = [x.grad] + [param.grad for module in modules for param in module.parameters()]
    assert_close_rel(out.detach(), expected.detach(), TOL, "tiled output")
    for actual, wanted in zip(tiled_grads, expected_grads):
        assert_close_rel(actual, wanted, TOL, "tiled gradient")


def test_sequence_tiled_float64_sums_its_tiles_in_float64(folders):
    """Per-tile parameter gradients are summed in float32 for half-precision parameters, never below float64."""
    model = load(folders["llama"], "llama").double()
    layer = model.model.layers[0]
    modules = (layer.post_attention_layernorm, layer.mlp)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    weights = torch.randn(2, 9, 32, dtype=torch.float64)
    (kernel_module(model).sequence_tiled(modules, x, 2) * weights).sum().backward()
    tiled = [param.grad.clone() for module in modules for param in module.parameters()]
    model.zero_grad()
    (layer.mlp(layer.post_attention_layernorm(x)) * weights).sum().backward()
    whole = [param.grad for module in modules for param in module.parameters()]
    assert all(grad.dtype == torch.float64 for grad in tiled)
    for actual, wanted in zip(tiled, whole):
        assert_close_rel(actual, wanted, 1e-12, "float64 tiled gradient")


def test_sequence_tile_size_must_be_a_non_negative_int(folders):
    module = kernel_module(load(folders["llama"], "llama"))
    assert module.sequence_tile_size(llama_config()) == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="sequence_tile_size"):
            module.sequence_tile_size(llama_config(sequence_tile_size=bad))


# ----------------------------------------------------------------------------------------------
# Offloaded checkpoints
# ----------------------------------------------------------------------------------------------


def test_offloaded_checkpoint_keeps_only_the_layer_input_in_host_memory(folders):
    model = load(folders["llama"], "llama", offload_checkpoints=True)
    layer = model.model.layers[1]
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(9)[None])
    weights = torch.randn(2, 9, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        out = layer(hidden, position_embeddings=position_embeddings)
    assert {tensor.data_ptr() for tensor in saved} == {param.data_ptr() for param in layer.parameters()}
    copy = out._mea_checkpoint_link.copy
    assert torch.equal(copy.host, hidden) and copy.host.data_ptr() != hidden.data_ptr()
    (out * weights).sum().backward()
    assert copy.host is None, "the host copy is released after backward"
    offloaded = [hidden.grad.clone()] + [param.grad.clone() for param in layer.parameters()]

    hidden.grad = None
    model.zero_grad()
    model.config.offload_checkpoints = False  # read at forward: the same layer without checkpointing
    expected = layer(hidden, position_embeddings=position_embeddings)
    (expected * weights).sum().backward()
    assert torch.equal(out.detach(), expected.detach())
    for actual, wanted in zip(offloaded, [hidden.grad] + [param.grad for param in layer.parameters()]):
        assert_close_rel(actual, wanted, TOL, "offloaded checkpoint gradient")


def test_backward_fetches_each_checkpoint_once_and_prefetches_the_previous_layer(folders, monkeypatch):
    model = load(folders["llama"], "llama", offload_checkpoints=True)
    host_copy = kernel_module(model)._HostCopy
    events, names = [], {}
    original_init, original_prefetch, original_fetch = host_copy.__init__, host_copy.prefetch, host_copy.fetch

    def init(self, tensor, *args):
        names[id(self)] = len(names)
        original_init(self, tensor, *args)

    def prefetch(self):
        events.append(("prefetch", names[id(self)]))
        original_prefetch(self)

    def fetch(self):
        events.append(("fetch", names[id(self)]))
        return original_fetch(self)

    monkeypatch.setattr(host_copy, "__init__", init)
    monkeypatch.setattr(host_copy, "prefetch", prefetch)
    monkeypatch.setattr(host_copy, "fetch", fetch)
    loss_and_grads(model)
    assert events == [("fetch", 2), ("prefetch", 1), ("fetch", 1), ("prefetch", 0), ("fetch", 0)]


def test_checkpoints_on_device_keeps_the_last_layers_inputs_without_a_copy(folders):
    model = load(folders["llama"], "llama", offload_checkpoints=True, checkpoints_on_device=1)
    hidden = torch.randn(1, 5, 32, requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(5)[None])
    first, last = (model.model.layers[index](hidden, position_embeddings=position_embeddings) for index in (0, 2))
    assert first._mea_checkpoint_link.copy.host is not None
    assert last._mea_checkpoint_link.copy.host is None
    assert last._mea_checkpoint_link.copy._on_device.data_ptr() == hidden.data_ptr()
    model.config.checkpoints_on_device = -1
    with pytest.raises(ValueError, match="checkpoints_on_device"):
        model.model.layers[0](hidden, position_embeddings=position_embeddings)
    model.config.checkpoints_on_device, model.config.offload_checkpoints = 1, "false"  # bool("false") is True
    with pytest.raises(ValueError, match="offload_checkpoints must be True, False or None, got 'false'"):
        model.model.layers[0](hidden, position_embeddings=position_embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_settings_given_to_from_pretrained_or_from_config_go_to_the_config(folders, family):
    """transformers sets a keyword on the config only where ``config.json`` has that attribute and hands the
    others to the model's constructor: ``from_pretrained(path, sequence_tile_size=5)`` failed with a TypeError.
    Our settings among the keywords now go to the config, and the step is the one with them set after loading."""
    auto_class = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    precision = {"fp32": True} if family == "qwen" else {}
    options = OPTIONS["tiled+offloaded"]
    model = auto_class.from_pretrained(folders[family], trust_remote_code=True, **options, **precision)
    assert {name: getattr(model.config, name) for name in options} == options
    assert_same_loss_and_grads(
        loss_and_grads(model.train()), loss_and_grads(load(folders[family], family, **options)), family, tol=0.0
    )
    config = AutoConfig.from_pretrained(folders[family], trust_remote_code=True, **precision)
    built = auto_class.from_config(config, trust_remote_code=True, unpad_batches=False, loss_chunk_size=3)
    assert (built.config.unpad_batches, built.config.loss_chunk_size) == (False, 3)
    with pytest.raises(TypeError, match="sequence_tile_sizes"):
        auto_class.from_pretrained(folders[family], trust_remote_code=True, sequence_tile_sizes=5, **precision)


def test_offloaded_decoder_layer_carries_gradients_to_the_encoder_states(folders):
    """A BART decoder layer's encoder states need gradients: they are an input of the checkpoint (kept on the
    device, shared by every layer), and nothing else is saved but the parameters."""
    model = load(folders["bart"], "bart", offload_checkpoints=True)
    layer = model.model.decoder.layers[1]
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 32, generator=generator, requires_grad=True)
    encoder_states = torch.randn(2, 9, 32, generator=generator, requires_grad=True)
    weights = torch.randn(2, 6, 32, generator=generator)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        out = layer(hidden, encoder_states)
    parameters = {param.data_ptr() for param in layer.parameters()}
    assert {tensor.data_ptr() for tensor in saved} == parameters | {encoder_states.data_ptr()}
    assert torch.equal(out._mea_checkpoint_link.copy.host, hidden)

    def gradients() -> dict:
        grads = {"hidden": hidden.grad, "encoder states": encoder_states.grad}
        grads.update((name, param.grad) for name, param in layer.named_parameters() if not name.endswith("k_proj.bias"))
        return {name: grad.clone() for name, grad in grads.items()}

    (out * weights).sum().backward()
    offloaded = gradients()
    hidden.grad = encoder_states.grad = None
    model.zero_grad()
    model.config.offload_checkpoints = False
    expected = layer(hidden, encoder_states)
    (expected * weights).sum().backward()
    assert torch.equal(out.detach(), expected.detach())
    for name, grad in gradients().items():
        assert grad.abs().sum() > 0, name
        assert_close_rel(offloaded[name], grad, TOL, f"offloaded decoder layer: grad of {name}")


def test_checkpoints_on_device_counts_the_layers_of_each_stack(folders, monkeypatch):
    """BART (3 encoder layers, 2 decoder layers), the last one of each stack on the device."""
    model = load(folders["bart"], "bart", offload_checkpoints=True, checkpoints_on_device=1)
    host_copy = kernel_module(model)._HostCopy
    kept, original_init = [], host_copy.__init__

    def init(self, tensor, keep_on_device=False):
        kept.append(keep_on_device)
        original_init(self, tensor, keep_on_device)

    monkeypatch.setattr(host_copy, "__init__", init)
    loss_and_grads(model)
    assert kept == [False, False, True, False, True]


def test_offloaded_checkpoint_rejects_gradients_it_cannot_carry(folders):
    model = load(folders["llama"], "llama", offload_checkpoints=True)
    layer = model.model.layers[0]
    hidden = torch.randn(1, 4, 32)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(4)[None])
    with pytest.raises(ValueError, match="only to the hidden states"):
        layer(hidden, position_embeddings=(cos.requires_grad_(), sin))


@pytest.mark.gpu
def test_offloaded_checkpoints_on_cuda_match_the_plain_model(folders):
    """The asynchronous path: pinned host copies on a side stream, prefetched; fp32 on the GPU."""
    expected = loss_and_grads(load(folders["llama"], "llama").cuda())
    model = load(folders["llama"], "llama", offload_checkpoints=True, sequence_tile_size=TILE).cuda()
    assert_same_loss_and_grads(loss_and_grads(model), expected, "cuda, tiled+offloaded")
    hidden = torch.randn(2, 9, 32, device="cuda", requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(9, device="cuda")[None])
    out = model.model.layers[0](hidden, position_embeddings=position_embeddings)
    host = out._mea_checkpoint_link.copy.host
    assert host.device.type == "cpu" and host.is_pinned()
    torch.cuda.synchronize()
    assert torch.equal(host, hidden.detach().cpu())


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


def test_qwen_dynamic_ntk_and_logn_keep_their_meaning_with_tiling(folders):
    """Past seq_length in eval, NTK and logn apply; tiling changes nothing there, nor in training (where the
    original Qwen uses neither)."""
    ids = torch.randint(3, VOCAB, (1, 30))
    plain, tiled = (load(folders["qwen"], "qwen", **options) for options in ({}, {"sequence_tile_size": 7}))
    for train in (False, True):
        plain.train(train), tiled.train(train)
        with torch.no_grad():
            expected, actual = plain(ids).logits, tiled(ids).logits
        assert_close_rel(actual, expected, TOL, f"logits (training={train})")
    with torch.no_grad():
        assert (plain.eval()(ids).logits - plain.train()(ids).logits).abs().max() > 1e-3, "NTK/logn had no effect"


def test_llama_rope_tables_are_built_once_per_step_and_cached_frequencies_stay_bounded(tmp_path):
    rope = {"rope_type": "dynamic", "factor": 2.0}
    overrides = {"rope_parameters": {**rope, "rope_theta": 10000.0}} if TRANSFORMERS_5 else {"rope_scaling": rope}
    stock = LlamaForCausalLM(llama_config(max_position_embeddings=8, **overrides))
    stock.save_pretrained(tmp_path)
    model = load(write_remote_code(tmp_path, "llama"), "llama", offload_checkpoints=True, sequence_tile_size=TILE)
    calls = []
    model.model.rotary_emb.register_forward_hook(lambda *args: calls.append(1))
    for length in (6, 13, 20, 13):
        calls.clear()
        loss_and_grads(model, length)
        assert len(calls) == 1, "cos/sin are computed once per step, not per layer or per recompute"
        stock.model.rotary_emb(torch.zeros(1), torch.arange(length)[None])  # stock's frequencies for this length
        assert torch.equal(model.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq)


# ----------------------------------------------------------------------------------------------
# scripts/train.py: --lora, --sequence-tile-size, --offload-checkpoints, --max-seq-len-probe
# ----------------------------------------------------------------------------------------------

TRAIN_TINY = ["--tiny-config", "llama", "--trust_remote_code", "--synthetic", "--seq-len", "24", "--batch-size", "2",
              "--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "4", "--tiny-vocab", "64", "--lr", "1e-2",
              "--warmup", "1", "--steps", "3", "--no-progress", "--device", "cpu"]  # fmt: skip


def train_script():
    return load_script("train")


def load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mea_long_context_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_lora_with_tiling_and_offloaded_checkpoints_matches_plain_lora(tmp_path):
    pytest.importorskip("peft")
    train = train_script()
    runs = {}
    for name, extra in (("plain", []), ("long", ["--sequence-tile-size", "8", "--offload-checkpoints"])):
        argv = [*TRAIN_TINY, "--output-dir", str(tmp_path / name), "--lora", "--lora-rank", "4", *extra]
        args = train.parse_args(argv)
        runs[name] = train.train(args)
    assert len(runs["plain"]) == 3
    for plain, long in zip(runs["plain"], runs["long"]):
        assert abs(long["loss"] - plain["loss"]) <= TOL * plain["loss"], (plain, long)
        assert abs(long["grad_norm"] - plain["grad_norm"]) <= TOL * plain["grad_norm"], (plain, long)
    assert runs["plain"][-1]["loss"] < runs["plain"][0]["loss"], "the LoRA adapters did not train"


def test_max_seq_len_probe_writes_every_trial_and_the_longest_length(tmp_path):
    train = train_script()
    argv = [*TRAIN_TINY, "--output-dir", str(tmp_path), "--seq-len", "16", "--max-seq-len-probe",
            "--probe-max-seq-len", "64", "--probe-resolution", "8", "--sequence-tile-size", "8",
            "--offload-checkpoints"]  # fmt: skip
    assert train.main(argv) == 0
    import json

    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["status"] == "done" and result["max_seq_len"] == 64
    assert [trial["seq_len"] for trial in result["trials"]] == [16, 32, 64]
    assert all(trial["ok"] and trial["tokens_per_s"] > 0 and math.isfinite(trial["loss"]) for trial in result["trials"])


def test_probe_doubles_then_bisects_and_respects_the_time_limit(tmp_path):
    train = train_script()

    def run_step(seq_len: int) -> dict:
        if seq_len > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        return {"seq_len": seq_len, "ok": True, "step_s": seq_len / 10, "tokens_per_s": 10.0}

    args = train.parse_args([*TRAIN_TINY, "--output-dir", str(tmp_path), "--seq-len", "16", "--probe-resolution", "8"])
    result = train.SeqLenProbe(run_step, lambda: None, args, tmp_path / "probe.json", {}).run()
    assert [(trial["seq_len"], trial["ok"]) for trial in result["trials"]] == [
        (16, True), (32, True), (64, True), (128, False), (96, True), (112, False), (104, False),
    ]  # fmt: skip
    assert result["max_seq_len"] == 96 and result["best"]["step_s"] == 9.6

    args.probe_time_limit = 5.0
    result = train.SeqLenProbe(run_step, lambda: None, args, tmp_path / "probe.json", {}).run()
    assert result["max_seq_len"] == 48
    assert "predicted step time" in result["trials"][2]["error"]


# ----------------------------------------------------------------------------------------------
# scripts/long_context_probe.py (the GPU benchmark), on the CPU with tiny shapes
# ----------------------------------------------------------------------------------------------

PROBE_TINY = {
    "llama3-8b": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen-7b": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 3,
                "num_attention_heads": 4, "kv_channels": 8, "seq_length": 12},
}  # fmt: skip


@pytest.mark.parametrize("model_name", sorted(PROBE_TINY))
def test_long_context_probe_records_exactness_steps_and_memory(tmp_path, model_name):
    pytest.importorskip("peft")
    import json

    probe = load_script("long_context_probe")
    output = tmp_path / "probe.json"
    stock = ["--stock-lens", "24"] if model_name == "llama3-8b" else []
    argv = ["--model", model_name, "--shape", json.dumps(PROBE_TINY[model_name]), "--device", "cpu", "--output",
            str(output), "--throughput-len", "24", "--long-lens", "40", "--shallow-lens", "48", "--exactness-len", "32",
            "--tile", "8", "--lora-rank", "4", "--exactness-noise", *stock]  # fmt: skip
    assert probe.main(argv) == 0
    runs = json.loads(output.read_text())["runs"]
    steps = [(run["label"], run["layers"], run["seq_len"]) for run in runs if "step_s" in run]
    expected_steps = [("checkpointing+tiled", 3, 24), ("offloaded+tiled", 3, 24), ("offloaded+tiled", 3, 40),
                      ("checkpointing", 3, 24), ("offloaded+tiled", 2, 48)]  # fmt: skip
    assert steps == ([("stock sdpa, checkpointing", 3, 24)] if stock else []) + expected_steps
    assert all(run["ok"] and run["tokens_per_s"] > 0 for run in runs if "step_s" in run)
    offloaded = next(run for run in runs if run.get("seq_len") == 40)
    assert offloaded["host_checkpoint_gib"] == round(3 * 40 * 32 * 2 / 2**30, 2)
    (exactness,) = [run for run in runs if run["label"] == "exactness"]
    # LoRA on the attention projections only: q/k/v/o (LLaMA), c_attn and the attention's c_proj (Qwen)
    assert exactness["lora_tensors"] == 3 * 2 * (4 if model_name == "llama3-8b" else 2)
    assert exactness["tile"] == 8 and math.isfinite(exactness["loss_with"])
    assert exactness["loss_rel_diff"] <= 1e-2 and exactness["grad_rel_diff_max"] <= 5e-2, exactness
    assert 0 < exactness["noise_grad_rel_diff_mean"] <= exactness["noise_grad_rel_diff_max"] < 1, exactness


def test_plot_long_context_reads_probe_results_and_extrapolates_linearly(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    plot = load_script("plot_long_context")
    runs = [
        {"label": "offloaded+tiled", "layers": 32, "seq_len": 65536, "ok": True, "peak_allocated_gib": 30.0},
        {"label": "offloaded+tiled", "layers": 32, "seq_len": 131072, "ok": True, "peak_allocated_gib": 40.0},
        {"label": "offloaded+tiled", "layers": 2, "seq_len": 262144, "ok": True, "peak_allocated_gib": 5.0},
        {"label": "checkpointing", "layers": 32, "seq_len": 32768, "ok": False, "error": "out of memory"},
        {"label": "stock sdpa, checkpointing", "layers": 32, "seq_len": 32768, "ok": True, "peak_allocated_gib": 70.0},
    ]
    results = tmp_path / "probe.json"
    results.write_text(json.dumps({"runs": runs}))
    assert plot.main([str(results), "--out", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0
    points = plot.measured_points([results])
    assert points["offloaded+tiled"] == {65536: 30.0, 131072: 40.0}  # the 2-layer and failed runs are left out
    assert points["checkpointing"] == {}
    assert points["stock sdpa, checkpointing"] == {16384: 42.8, 32768: 70.0, 65536: 126.0}  # with the issue's
    assert plot.extrapolated(points["offloaded+tiled"], 524288) == 40.0 + 10.0 * (524288 - 131072) / 65536
