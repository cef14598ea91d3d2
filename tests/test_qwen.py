"""Qwen-7B (first generation): modeling_qwen.py against ``ReferenceQwen`` (``qwen_reference.py``).

transformers has no Qwen-7B class, so the reference is a small eager implementation of the behaviour listed in
/work/shared/qwen7b.md that shares nothing with the modeling file but the weights (our state dict).

The models under test are loaded as users load them: saved next to our files with an ``auto_map`` and read
back with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from memory_efficient_adapter.configuration_qwen import QWenConfig
from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel
from tests.qwen_reference import (
    EOS,
    GENERATION_UTILS,
    CharTokenizer,
    ReferenceQwen,
    stand_in_generation_utils,
)
from tests.remote_code import (
    MODELING_DIR,
    TRANSFORMERS_5,
    assert_close_rel,
    left_padded_mask,
    right_padded_mask,
    save_with_remote_code,
)

CPU_BACKENDS = ["sdpa", "chunked", "eager"]
AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
TINY = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_channels=8,
    intermediate_size=48,
    seq_length=12,
    max_position_embeddings=64,
    initializer_range=0.2,
)


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


def random_model(**overrides) -> QWenLMHeadModel:
    """A tiny random fp32 Qwen with non-trivial norms and biases (so every weight matters)."""
    model = QWenLMHeadModel(QWenConfig(**{**TINY, "fp32": True, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def save_qwen(model, folder: Path) -> Path:
    """Our two files beside the weights, plus the generation helpers every Qwen checkpoint ships. The precision
    flags are saved unset, as in the published checkpoints (the model records its load-time choice in them)."""
    model.config.bf16 = model.config.fp16 = model.config.fp32 = False
    save_with_remote_code(model, folder, ["modeling_qwen.py", "configuration_qwen.py"], AUTO_MAP)
    (folder / "qwen_generation_utils.py").write_text(GENERATION_UTILS)
    return folder


def load(folder: Path, **kwargs):
    """Load as a user does; in fp32 unless a precision flag is given (so that CPU tests also pass on a GPU
    machine, where the model would otherwise pick bf16)."""
    if not any(flag in kwargs for flag in ("bf16", "fp16", "fp32")):
        kwargs["fp32"] = True
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny model (rotary over half the channels, biased projections) saved as a remote-code folder."""
    torch.manual_seed(1234)
    model = random_model(rotary_pct=0.5, no_bias=False)
    folder = save_qwen(model, tmp_path_factory.mktemp("qwen"))
    return folder, model.config, {k: v.clone() for k, v in model.state_dict().items()}


def automatic_dtype() -> torch.dtype:
    """The original's choice without precision flags: bf16 > fp16 (compute capability >= 7) > fp32."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 7:
        return torch.float16
    return torch.float32


def random_ids(batch: int, length: int, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(10, vocab, (batch, length))


def assert_close_where_kept(actual, expected, mask, tol, what):
    keep = mask.bool()
    assert_close_rel(actual[keep], expected[keep].to(actual.dtype), tol, what)


def call_recorder(monkeypatch, model):
    """Record the keyword arguments of every attention() call of the loaded module."""
    module = sys.modules[type(model).__module__]
    calls = []
    real = module.attention

    def recording(q, k, v, **kwargs):
        calls.append(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module, "attention", recording)
    return calls


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("no_bias", [True, False])
def test_state_dict_keys_and_shapes_are_the_original_ones(no_bias):
    config = QWenConfig(**{**TINY, "no_bias": no_bias})
    model = QWenLMHeadModel(config)
    hidden, inner, proj = config.hidden_size, config.intermediate_size // 2, config.kv_channels * 4
    expected = {
        "transformer.wte.weight": (101, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (101, hidden),
    }
    for n in range(config.num_hidden_layers):
        p = f"transformer.h.{n}"
        expected |= {
            f"{p}.ln_1.weight": (hidden,),
            f"{p}.ln_2.weight": (hidden,),
            f"{p}.attn.c_attn.weight": (3 * proj, hidden),
            f"{p}.attn.c_attn.bias": (3 * proj,),
            f"{p}.attn.c_proj.weight": (hidden, proj),
            f"{p}.mlp.w1.weight": (inner, hidden),
            f"{p}.mlp.w2.weight": (inner, hidden),
            f"{p}.mlp.c_proj.weight": (hidden, inner),
        }
        if not no_bias:
            expected |= {
                f"{p}.attn.c_proj.bias": (hidden,),
                f"{p}.mlp.w1.bias": (inner,),
                f"{p}.mlp.w2.bias": (inner,),
                f"{p}.mlp.c_proj.bias": (hidden,),
            }
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_accelerate_is_told_to_leave_the_cache_where_it_is():
    """accelerate's dispatch skips the names in ``_skip_keys_device_placement``: given as a bare string, transformers
    5 made it a set of the string's letters."""
    assert "past_key_values" in QWenLMHeadModel(QWenConfig(**TINY))._skip_keys_device_placement


def test_config_defaults_and_extra_keys():
    config = QWenConfig(onnx_safe=None, tokenizer_class="QWenTokenizer")
    assert (config.seq_length, config.use_flash_attn, config.rotary_emb_base) == (2048, "auto", 10000)
    assert config.tokenizer_class == "QWenTokenizer" and config.onnx_safe is None
    assert QWenConfig(seq_length=8192).seq_length == 8192
    assert config.to_dict()["model_type"] == "qwen"


def test_special_token_ids_default_to_none_as_configs_did_before_transformers_5(tmp_path):
    """Qwen-7B's config.json names no special tokens; transformers 5's pipelines still read them (an assistant
    model in "text-generation" raised an AttributeError on ``bos_token_id``)."""
    config = QWenConfig()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None, None, None)
    QWenConfig(eos_token_id=151643, pad_token_id=7).save_pretrained(tmp_path)
    loaded = QWenConfig.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (None, 151643, 7)


# ----------------------------------------------------------------------------------------------
# Forward against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_with_left_padding_match_reference(saved, backend):
    folder, config, state = saved
    model = load(folder, attn_backend=backend)
    assert model.dtype == torch.float32 and model.config.fp32
    ids = random_ids(3, 9)  # total 9 <= seq_length: no NTK, no logn
    mask = left_padded_mask([9, 5, 2], 9)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        as_tuple = model(inputs_embeds=model.transformer.wte(ids), attention_mask=mask, return_dict=False)
    expected, _, _ = ReferenceQwen(config, state).forward(ids, mask)
    assert_close_where_kept(out.logits, expected, mask, 1e-5, f"logits ({backend})")
    assert torch.equal(as_tuple[0], out.logits)
    assert len(out.hidden_states) == config.num_hidden_layers + 1


@pytest.mark.parametrize("torchscript", [False, True])
def test_tuples_carry_the_originals_fields(saved, torchscript):
    """``return_dict=False`` (or, on transformers 4.x, a ``torchscript`` config, which the original reads through
    ``use_return_dict``): the original's tuples, ``(logits, past, hidden states)`` of the fields that are set,
    never the attention weights."""
    folder, _, _ = saved
    model = load(folder)
    model.config.torchscript = torchscript
    ids, mask = random_ids(2, 7), left_padded_mask([7, 4], 7)
    flags = dict(output_attentions=True, output_hidden_states=True, use_cache=True)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, return_dict=True, **flags)
        as_tuple = model(ids, attention_mask=mask, return_dict=None if torchscript else False, **flags)
        base_tuple = model.transformer(ids, attention_mask=mask, return_dict=None if torchscript else False, **flags)
    if torchscript and TRANSFORMERS_5:  # 5.x ignores torchscript here
        assert isinstance(as_tuple, type(out)) and isinstance(base_tuple, BaseModelOutputWithPast)
        return
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    assert len(as_tuple) == 3 and len(base_tuple) == 3
    assert torch.equal(as_tuple[0], out.logits)
    assert as_tuple[1].get_seq_length() == 7
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[2], out.hidden_states, strict=True))
    assert torch.equal(base_tuple[2][-1], base_tuple[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_inputs_use_per_sample_ntk_and_logn(saved, backend):
    """Past seq_length (12), eval mode: per-sample NTK alphas 7, 3, 1 from 27, 15, 9 real tokens; logn on."""
    folder, config, state = saved
    model = load(folder, attn_backend=backend)
    reference = ReferenceQwen(config, state)
    ids = random_ids(3, 27)
    mask = left_padded_mask([27, 15, 9], 27)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        unpadded = model(ids[:1]).logits
    expected, _, alphas = reference.forward(ids, mask)
    assert alphas == [7, 3, 1]
    assert_close_where_kept(padded, expected, mask, 1e-5, f"per-sample NTK logits ({backend})")
    expected_single, _, _ = reference.forward(ids[:1])
    assert_close_rel(unpadded, expected_single.float(), 1e-5, f"single-alpha NTK logits ({backend})")

    # the reference without NTK or without logn disagrees: both features are really exercised
    no_ntk, _, _ = reference.forward(ids, mask, alphas=[1, 1, 1])
    reference.config = QWenConfig(**{**config.to_dict(), "use_logn_attn": False})
    no_logn, _, _ = reference.forward(ids, mask)
    for other, what in ((no_ntk, "NTK"), (no_logn, "logn")):
        keep = mask.bool()
        assert (other[keep].float() - padded[keep]).abs().max() > 1e-2, f"{what} made no difference"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_and_gradients_match_reference(saved, backend):
    """Training mode (dropout 0): NTK and logn are off even past seq_length; every gradient matches."""
    folder, config, state = saved
    model = load(folder, attn_backend=backend).train()
    ids = random_ids(2, 17)
    mask = torch.cat((left_padded_mask([11], 17), right_padded_mask([13], 17)))
    # -100 on padding and on the first real token of the left-padded row (a padding position predicts it)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 6] = -100
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()

    reference = ReferenceQwen(config, state, requires_grad=True)
    logits, _, alphas = reference.forward(ids, mask, training=True)
    expected_loss = reference.loss(logits, labels)
    expected_loss.backward()
    assert alphas == [1.0, 1.0]
    assert_close_rel(loss.detach(), expected_loss.detach().float(), 1e-5, "loss")
    grads = dict(model.named_parameters())
    for name, param in reference.params.items():
        assert_close_rel(grads[name].grad, param.grad.float(), 2e-5, f"grad of {name} ({backend})")


def test_inputs_embeds_made_under_inference_mode_train_as_with_ordinary_ones(saved):
    """Autograd refuses to save a tensor made under ``torch.inference_mode``; our first norm saved its input (a
    RuntimeError, where the original's RMSNorm saves a tensor of its own and trains)."""
    folder, _, _ = saved
    model = load(folder).train()
    ids = random_ids(2, 9)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            features = model.get_input_embeddings()(ids)
        model.zero_grad(set_to_none=True)
        loss = model(inputs_embeds=features, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (loss, grads) = results
    assert_close_rel(loss, expected, 1e-6, "loss")
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in expected_grads.items():
        assert_close_rel(grads[name], grad, 1e-6, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logn_factors_are_rounded_to_the_queries_dtype_not_the_embeddings(saved, dtype):
    """Half-precision ``inputs_embeds`` into an fp32 model: the original rounds its logn factors to the query's
    dtype (fp32 here); ours rounded them to the embeddings' (1e-3 off). The float64 run reproduces the original's
    one dtype-dependent step for these inputs: its first RMSNorm returns the input's dtype."""
    folder, config, _ = saved
    model, reference = load(folder), load(folder).double()
    ids = random_ids(1, 3 * config.seq_length + 4)
    embeds = model.transformer.wte(ids).detach().to(dtype)
    first_norm = reference.transformer.h[0].ln_1

    def normalised_in_the_inputs_dtype(module, args, output):
        x = args[0]
        normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.layer_norm_epsilon)
        return normalised.to(dtype).double() * module.weight

    handle = first_norm.register_forward_hook(normalised_in_the_inputs_dtype)
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds.double()).logits
        logits = model(inputs_embeds=embeds).logits
    handle.remove()
    assert_close_rel(logits, expected, 1e-5, f"logits from {dtype} inputs_embeds with logn scaling")


@pytest.mark.parametrize("training", [True, False])
def test_uint8_labels_give_the_int64_loss(saved, training):
    """The original's loss (``CrossEntropyLoss``) takes uint8 targets; ours padded uint8 labels with -100 for the
    shift and failed on the overflow, in training and eval. Read as int64 now, as int8 to int32 labels are."""
    folder, _, _ = saved
    model = load(folder).train(training)
    ids = random_ids(2, 9)
    losses = []
    for labels in (ids, ids.to(torch.uint8)):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels).loss
        if training:
            loss.backward()
        losses.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (expected, expected_grads), (loss, grads) = losses
    assert_close_rel(loss, expected, 1e-6, "loss")
    assert len(grads) == len(expected_grads) and (len(grads) > 0) is training
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_rel(grad, expected_grad, 1e-6, "gradient")


@pytest.mark.parametrize("training", [True, False])
def test_the_labels_of_one_row_without_their_batch_dimension_give_the_same_loss(saved, training):
    """The original's loss takes the labels of a batch of one as ``[s]`` (``labels[..., 1:]``, flattened); ours
    refused them (a ValueError naming the shapes), in training and eval."""
    folder, _, _ = saved
    model = load(folder).train(training)
    ids = random_ids(1, 11)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3, -100)
    results = []
    for given in (labels, labels[0]):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=given).loss
        if training:
            loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (loss, grads) = results
    assert_close_rel(loss, expected, 1e-6, "loss")
    assert grads.keys() == expected_grads.keys() and (len(grads) > 0) is training
    for name, grad in expected_grads.items():
        assert_close_rel(grads[name], grad, 1e-6, f"grad of {name}")


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(saved):
    folder, _, _ = saved
    ids = random_ids(2, 10)
    mask = right_padded_mask([10, 7], 10)
    grads = []
    for checkpointing in (False, True):
        model = load(folder).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        calls = []
        model.transformer.h[0].attn.register_forward_hook(lambda *args: calls.append(1))
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert_close_rel(grads[1][name], grad, 1e-6, f"checkpointed grad of {name}")


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


def test_every_attention_call_is_causal_with_an_o_n_mask_and_use_flash_attn_picks_the_backend(saved, monkeypatch):
    folder, _, _ = saved
    ids = random_ids(2, 6)
    mask = left_padded_mask([6, 4], 6)
    cases = [
        (dict(), "auto"),
        (dict(use_flash_attn=True), "auto"),
        (dict(use_flash_attn=False), "eager"),
        (dict(use_flash_attn=False, attn_backend="chunked"), "chunked"),
        (dict(attn_implementation="eager"), "eager"),
    ]
    for kwargs, backend in cases:
        model = load(folder, **kwargs)
        calls = call_recorder(monkeypatch, model)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert len(calls) == model.config.num_hidden_layers
        for call in calls:
            assert call["backend"] == backend, kwargs
            assert call["causal"] is True
            keep = call["attention_mask"]
            assert keep.dtype == torch.bool and tuple(keep.shape) == tuple(mask.shape)
    monkeypatch.setenv("USE_FLASH_ATTN", "chunked")  # the environment variable overrides use_flash_attn=False
    model = load(folder, use_flash_attn=False)
    calls = call_recorder(monkeypatch, model)
    with torch.no_grad():
        model(ids)
    module = sys.modules[type(model).__module__]  # no padding: the forward's mask object carries no tensor
    assert [call["backend"] for call in calls] == ["chunked"] * 2
    assert module.mask_tensor(calls[0]["attention_mask"]) is None


def test_precision_flags_choose_the_dtype(saved):
    folder, _, _ = saved
    automatic = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    flag = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[automatic_dtype()]
    assert automatic.dtype == automatic_dtype() and getattr(automatic.config, flag)  # the choice is recorded
    for flag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = load(folder, **{flag: True})
        assert model.dtype == model.config.dtype == dtype  # the config says what the model runs in
    with pytest.raises(ValueError, match="Only one of"):
        load(folder, bf16=True, fp32=True)


def test_a_precision_flag_against_the_one_a_saved_checkpoint_records_is_refused_with_the_way_out(saved, tmp_path):
    """``save_pretrained`` writes the precision chosen at load (fp32 on a CPU): ``bf16=True``, as the automatic
    choice's warning suggests, met the saved ``fp32`` with a message that named no flag the call had not given."""
    folder, _, _ = saved
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, fp32=True).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"bf16 and fp32 are\. .* \(bf16=True, fp32=False or bf16=False, fp32=True\)"):
        load(tmp_path / "saved", bf16=True)
    assert load(tmp_path / "saved", bf16=True, fp32=False).dtype == torch.bfloat16


def test_a_dtype_the_precision_flags_override_is_logged(saved, caplog):
    folder, _, _ = saved
    logging.Logger.warning_once.cache_clear()  # transformers' once-only warnings: earlier tests may have logged it
    with caplog.at_level(logging.WARNING):
        model = load(folder, fp32=True, dtype=torch.bfloat16)
    assert model.dtype == torch.float32
    assert any("not in torch.bfloat16, the dtype it was created in" in record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------------------------
# Copied over a Qwen-7B snapshot
# ----------------------------------------------------------------------------------------------


def qwen_snapshot(folder: Path, model: QWenLMHeadModel) -> Path:
    """A folder shaped like Qwen/Qwen-7B: its config.json keys, bf16 safetensors, generation config, the
    configuration file (ours stands in for the original) and qwen_generation_utils.py (a stand-in)."""
    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": AUTO_MAP,
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "initializer_range": 0.02,
        "kv_channels": cfg.kv_channels,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 32768,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": cfg.seq_length,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": cfg.vocab_size,
    }
    generation_config = {
        "chat_format": "chatml",
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "max_window_size": 6144,
        "max_new_tokens": 6,
        "do_sample": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(MODELING_DIR / "configuration_qwen.py", folder / "configuration_qwen.py")
    (folder / "qwen_generation_utils.py").write_text(GENERATION_UTILS)
    shutil.copy(MODELING_DIR / "modeling_qwen.py", folder / "modeling_qwen.py")  # the copy-over itself
    return folder


def test_copied_over_a_qwen_snapshot_loads_generates_and_chats(tmp_path):
    torch.manual_seed(99)
    original = random_model(no_bias=True)
    folder = qwen_snapshot(tmp_path / "Qwen-7B-Chat", original)
    weights = {k: v.to(torch.bfloat16) for k, v in original.state_dict().items()}
    reference = ReferenceQwen(original.config, weights)

    # the precision flags decide, not config.json's torch_dtype (bfloat16): fp32 on CPU, as the original
    assert AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).dtype == automatic_dtype()
    model = load(folder)
    ids = random_ids(2, 15)
    mask = left_padded_mask([15, 9], 15)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    expected, _, _ = reference.forward(ids, mask)
    assert_close_where_kept(logits, expected, mask, 1e-5, "snapshot logits")

    # generate(): stop_words_ids end a row with EOS right after the stop word
    with torch.no_grad():
        plain = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
        stopped = model.generate(ids[:1], max_new_tokens=3, do_sample=False, stop_words_ids=[[int(plain[0, 15])]])
    assert torch.equal(plain, reference.greedy(ids[:1], torch.ones_like(ids[:1]), steps=3))
    assert stopped[0, 15] == plain[0, 15] and stopped[0, 16] == EOS
    # an eos_token_id given to the call is the one forced (and it ends the row); none at all is named
    other_eos = (int(plain[0, 15]) + 1) % model.config.vocab_size
    with torch.no_grad():
        stopped = model.generate(
            ids[:1], max_new_tokens=4, do_sample=False, stop_words_ids=[[int(plain[0, 15])]], eos_token_id=other_eos
        )
    assert stopped[0, 16] == other_eos and stopped.shape[1] == 17
    # a generation config passed without one: the model's own, as generate fills a passed config's unset values
    no_eos = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        stopped = model.generate(ids[:1], generation_config=no_eos, stop_words_ids=[[int(plain[0, 15])]])
    assert stopped[0, 15] == plain[0, 15] and stopped[0, 16] == EOS
    model.generation_config.eos_token_id = None
    try:
        with pytest.raises(ValueError, match="no eos_token_id is set"):
            model.generate(ids[:1], generation_config=no_eos, stop_words_ids=[[int(plain[0, 15])]])
    finally:
        model.generation_config.eos_token_id = EOS

    # chat() and chat_stream(): ChatML prompt through qwen_generation_utils, greedy as the generation config says
    utils = stand_in_generation_utils()
    tokenizer = CharTokenizer()
    history = [("hi", "hello")]
    response, new_history = model.chat(tokenizer, "What is 2+2?", history=history, system="Be brief.")
    _, context = utils.make_context(tokenizer, "What is 2+2?", history, "Be brief.")
    prompt = torch.tensor([context])
    processor = utils.StopWordsLogitsProcessor(utils.get_stop_words_ids("chatml", tokenizer), EOS)
    expected_ids = reference.greedy(prompt, torch.ones_like(prompt), steps=6, processor=processor, eos=EOS)
    assert response == utils.decode_tokens(expected_ids[0], tokenizer, 0, len(context), "chatml")
    assert new_history == history + [("What is 2+2?", response)] and history == [("hi", "hello")]

    streamed = list(model.chat_stream(tokenizer, "What is 2+2?", history=history, system="Be brief."))
    expected_text = tokenizer.decode(expected_ids[0, len(context) :], skip_special_tokens=True)
    assert streamed and streamed[-1] == expected_text
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:]))

    model.generation_config.chat_format = "raw"
    with pytest.raises(ValueError, match="chatml"):
        model.chat(tokenizer, "hi", history=None)


@pytest.mark.parametrize("option", ["use_cache_quantization", "use_cache_kernel"])
def test_unsupported_cache_options_raise_a_clear_error(tmp_path, option):
    folder = qwen_snapshot(tmp_path / "Qwen-7B", random_model())
    with pytest.raises(ValueError, match=option):
        load(folder, **{option: True})
    model = load(folder)
    setattr(model.config, option, True)  # after loading: generate ran as if unset
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)


def test_fresh_weights_follow_the_original_scheme():
    """N(0, initializer_range), with the residual projections (attention's and the MLP's ``c_proj``) scaled by
    1/sqrt(2 * num_hidden_layers): here 0.02 against 0.005 (8 layers)."""
    torch.manual_seed(0)
    wider = {"hidden_size": 64, "kv_channels": 16, "num_hidden_layers": 8, "initializer_range": 0.02, "fp32": True}
    config = QWenConfig(**{**TINY, **wider})
    model = QWenLMHeadModel(config)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            expected = 0.02 / math.sqrt(2 * 8)
        elif name.endswith((".weight",)) and param.dim() == 2:
            expected = 0.02
        else:
            continue
        assert abs(param.std().item() / expected - 1) < 0.1, f"{name}: std {param.std().item():.4f}, not {expected:.4f}"


@pytest.mark.parametrize("padded", [False, True])
def test_a_wider_head_set_by_the_user_gives_the_loss_over_its_logits(padded):
    """The original computes the loss over ``logits.size(-1)`` classes, so a head replaced by a wider one (with
    ``config.vocab_size`` unchanged) trains and evaluates; in training the fused loss takes it as it is."""
    torch.manual_seed(3)
    model = random_model()
    model.set_output_embeddings(torch.nn.Linear(TINY["hidden_size"], TINY["vocab_size"] + 10, bias=False))
    ids = random_ids(2, 9)
    mask = right_padded_mask([9, 6 if padded else 9], 9)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits = model.eval()(ids, attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            loss = model(ids, attention_mask=mask, labels=labels).loss
        assert_close_rel(loss, expected, 1e-5, f"{mode} loss")


@pytest.mark.parametrize("tied", [False, True])
def test_the_head_is_tied_to_the_embeddings_only_where_the_config_says_so(tied, tmp_path):
    torch.manual_seed(4)
    model = random_model(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    loaded = load(save_qwen(model, tmp_path))
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tied
    ids = random_ids(1, 7)
    with torch.no_grad():
        assert_close_rel(loaded(ids).logits, model.eval()(ids).logits, 1e-6, "logits after a save and load")


@pytest.mark.parametrize("training", [False, True])
def test_labels_with_a_trailing_dimension_raise_a_clear_error(saved, training):
    """Labels [batch, seq, 1] would be shifted along their last dimension, leaving no counted token (a NaN loss);
    the original's shift ``labels[..., 1:]`` raises at its loss. One label per token, or a clear error."""
    folder, _, _ = saved
    model = load(folder).train(training)
    ids = random_ids(2, 9)
    with pytest.raises(ValueError, match=r"labels of shape \[2, 9, 1\] do not match the inputs' \[batch, sequence\]"):
        model(ids, labels=ids[..., None])
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_init_weights_called_on_a_loaded_model_keeps_its_weights_on_transformers_5(saved):
    """As transformers 5's stock models: its init functions skip tensors loaded from a checkpoint (on 4.x, where the
    original Qwen ran, they draw them again). Ours called ``torch.nn.init`` directly."""
    import importlib.util

    from tests.test_stock_behaviour import changed_by_init_weights

    kept = not changed_by_init_weights(load(saved[0]))
    assert kept == (importlib.util.find_spec("transformers.initialization") is not None)


@pytest.mark.parametrize("given", ["input_ids", "inputs_embeds"])
def test_inputs_with_extra_leading_dimensions_raise_a_clear_error(saved, given):
    """The original views ``[a, b, seq]`` ids as ``[a * b, seq]``; ours failed with "too many values to unpack".
    Flattened ids, or a clear error that says so."""
    folder, config, _ = saved
    model = load(folder)
    ids = random_ids(2, 9).view(2, 1, 9)
    inputs = {"input_ids": ids} if given == "input_ids" else {"inputs_embeds": model.transformer.wte(ids).detach()}
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{given} must be \[batch, seq\].*got shape \[2, 1, 9"):
        model(**inputs)


def test_two_rotary_channels_raise_a_clear_error(tmp_path):
    """The original divides by ``dim - 2`` for its NTK base: a ZeroDivisionError at the first forward."""
    with pytest.raises(ValueError, match=r"kv_channels \* rotary_pct = 8 \* 0.25 gives 2 rotary channels"):
        random_model(rotary_pct=0.25)


@pytest.mark.parametrize("kv_channels", [7, 1])
def test_rotary_channels_that_do_not_fit_a_head_in_pairs_raise_a_clear_error(kv_channels):
    """The rotation takes channels in pairs: an odd kv_channels rotated whole failed at the first forward (as in the
    original) with a shape mismatch."""
    with pytest.raises(ValueError, match=rf"kv_channels \* rotary_pct = {kv_channels} \* 1.0 gives {kv_channels} rotary"):
        random_model(kv_channels=kv_channels)


@pytest.mark.parametrize("rotary_pct", [0.0, 0.125])
def test_fewer_than_two_rotary_channels_decode_a_batch_whose_rows_chose_different_ntk_alphas(rotary_pct, tmp_path):
    """With 0 or 1 rotary channels the rotation is the same whatever the NTK alpha; the rows' alphas (3 and 1 here)
    were still kept on the cache, and the decode step, which tells the rows apart by their cached keys, refused to
    go on (their keys no longer differ)."""
    torch.manual_seed(9)
    model = load(save_qwen(random_model(rotary_pct=rotary_pct), tmp_path / "qwen-few-rotary-channels"))
    mask = F.pad(left_padded_mask([16, 12], 26), (0, 1), value=1)  # a left-padded prompt, then one new token
    ids = random_ids(2, 27).masked_fill(mask == 0, 0)
    with torch.no_grad():
        cache = model(ids[:, :26], attention_mask=mask[:, :26], use_cache=True).past_key_values
        step = model(ids[:, 26:], attention_mask=mask, past_key_values=cache).logits[:, -1]
        expected = model(ids, attention_mask=mask).logits[:, -1]
    assert_close_rel(step, expected, 1e-5, "decode step after per-row alphas")


def test_kv_channels_that_do_not_split_the_hidden_size_into_the_heads_raise_a_clear_error():
    """The original splits c_attn's output into hidden_size-wide query, key and value: kv_channels 16 with 4 heads
    and hidden 32 fails there; ours ran it with 16-channel heads, a model the original never had."""
    with pytest.raises(ValueError, match=r"kv_channels \* num_attention_heads = 16 \* 4 must be hidden_size \(32\)"):
        random_model(kv_channels=16)


@pytest.mark.parametrize("rotary_pct", [1.5, -0.5])
def test_a_rotary_fraction_outside_zero_to_one_raises_a_clear_error(rotary_pct):
    """Above 1 both the original and ours failed with a shape mismatch deep in the rotation."""
    with pytest.raises(ValueError, match=rf"rotary_pct={rotary_pct} is not a fraction of the head's kv_channels"):
        random_model(rotary_pct=rotary_pct)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_bf16_on_cuda_every_backend_matches_the_fp32_reference(tmp_path):
    """Without precision flags the model picks bf16 on CUDA, as the original does; every CUDA backend then
    agrees with the fp32 reference (same weights) on a left-padded batch with per-sample NTK and logn."""
    torch.manual_seed(4321)
    # head_dim 32: flex needs at least 32
    original = random_model(rotary_pct=0.5, no_bias=False, initializer_range=0.1, hidden_size=128, kv_channels=32)
    state = {k: v.clone() for k, v in original.state_dict().items()}
    folder = save_qwen(original, tmp_path / "qwen")
    reference = ReferenceQwen(original.config, state, dtype=torch.float32, device="cuda")
    ids = random_ids(3, 27).cuda()
    mask = left_padded_mask([27, 15, 9], 27).cuda()  # NTK alphas 7, 3, 1 and logn
    probe = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert probe.dtype == torch.bfloat16 and probe.config.bf16
    backends = sys.modules[type(probe).__module__].available_backends("cuda")
    assert "sdpa" in backends
    for backend in backends:
        model = load(folder, bf16=True, attn_backend=backend).cuda()
        assert model.dtype == torch.bfloat16
        # xformers takes no padding mask: give it an unpadded batch
        batch_mask = torch.ones_like(mask) if backend == "xformers" else mask
        with torch.no_grad():
            logits = model(ids, attention_mask=batch_mask).logits
        expected, _, _ = reference.forward(ids, batch_mask)
        assert_close_where_kept(logits.float(), expected, batch_mask, 2e-2, f"bf16 logits ({backend})")
