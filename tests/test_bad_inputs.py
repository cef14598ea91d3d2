"""Bad input, swept: every case gets a clear error that names the problem, and leaves nothing changed.

"Nothing changed" is checked after every test by tests/conftest.py (no backend left demoted in any loaded copy of
the kernel layer) and here by a valid call right after each bad one, which must still run on its first choice.
NaN and inf are not errors (checking them would need a host sync): they follow the documented behaviour, checked
at the end. hub_upload.py and scripts/train.py arguments have their own sweep in the tooling tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import pytest
import torch

import memory_efficient_adapter as mea

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")

BATCH, HEADS, KV_HEADS, Q_LEN, K_LEN, DIM = 2, 4, 2, 5, 8, 16


def good(**changes) -> dict:
    """A valid call (GQA, q_len < k_len, a key padding mask: auto runs it on sdpa) with ``changes`` applied."""
    gen = torch.Generator().manual_seed(0)
    call = dict(
        q=torch.randn(BATCH, HEADS, Q_LEN, DIM, generator=gen),
        k=torch.randn(BATCH, KV_HEADS, K_LEN, DIM, generator=gen),
        v=torch.randn(BATCH, KV_HEADS, K_LEN, DIM, generator=gen),
        causal=False,
        attention_mask=torch.ones(BATCH, K_LEN, dtype=torch.bool),
    )
    call.update(changes)
    return call


def run(call: dict) -> torch.Tensor:
    call = dict(call)
    return mea.attention(call.pop("q"), call.pop("k"), call.pop("v"), **call)


META = "meta"  # stands in for "another device" on a CPU-only machine

ATTENTION_CASES = {
    # q, k, v: type, rank, dtype, device, shape agreement, emptiness
    "q_not_a_tensor": (good(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "v_not_a_tensor": (good(v=None), TypeError, "v must be a torch.Tensor"),
    "q_3d": (good(q=torch.randn(BATCH, Q_LEN, DIM)), ValueError, r"must be 4-D \[batch, heads, seq, head_dim\]"),
    "k_5d": (good(k=torch.randn(1, BATCH, KV_HEADS, K_LEN, DIM)), ValueError, "must be 4-D"),
    "q_integer": (good(q=torch.ones(BATCH, HEADS, Q_LEN, DIM, dtype=torch.long)), ValueError, "one floating dtype"),
    "k_other_dtype": (good(k=torch.randn(BATCH, KV_HEADS, K_LEN, DIM, dtype=torch.float64)), ValueError, "one floating dtype"),
    "v_other_device": (good(v=torch.empty(BATCH, KV_HEADS, K_LEN, DIM, device=META)), ValueError, "must be on one device"),
    "k_other_batch": (good(k=torch.randn(3, KV_HEADS, K_LEN, DIM)), ValueError, r"k and v must be \[batch, kv_heads"),
    "k_other_head_dim": (good(k=torch.randn(BATCH, KV_HEADS, K_LEN, 8), v=torch.randn(BATCH, KV_HEADS, K_LEN, 8)), ValueError, "k and v must be"),
    "k_v_lengths_differ": (good(v=torch.randn(BATCH, KV_HEADS, K_LEN + 1, DIM)), ValueError, "k and v must be"),
    "heads_not_a_multiple": (good(k=torch.randn(BATCH, 3, K_LEN, DIM), v=torch.randn(BATCH, 3, K_LEN, DIM)), ValueError, r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    "empty_batch": (good(q=torch.randn(0, HEADS, Q_LEN, DIM), k=torch.randn(0, KV_HEADS, K_LEN, DIM), v=torch.randn(0, KV_HEADS, K_LEN, DIM), attention_mask=None), ValueError, r"empty dimension \(batch\)"),
    "zero_length_keys": (good(k=torch.randn(BATCH, KV_HEADS, 0, DIM), v=torch.randn(BATCH, KV_HEADS, 0, DIM), attention_mask=None), ValueError, r"empty dimension \(k_len\)"),
    "zero_length_queries": (good(q=torch.randn(BATCH, HEADS, 0, DIM)), ValueError, r"empty dimension \(q_len\)"),
    "zero_head_dim": (good(q=torch.randn(BATCH, HEADS, Q_LEN, 0), k=torch.randn(BATCH, KV_HEADS, K_LEN, 0), v=torch.randn(BATCH, KV_HEADS, K_LEN, 0)), ValueError, r"empty dimension \(head_dim\)"),
    # attention_mask: type, rank, dtype, device, shape
    "mask_not_a_tensor": (good(attention_mask=[[True] * K_LEN] * BATCH), TypeError, "attention_mask must be a torch.Tensor"),
    "mask_2d_float": (good(attention_mask=torch.ones(BATCH, K_LEN)), ValueError, "must be a bool keep-mask"),
    "mask_2d_wrong_length": (good(attention_mask=torch.ones(BATCH, K_LEN - 1, dtype=torch.bool)), ValueError, r"\[batch, k_len\] = \[2, 8\], got \[2, 7\]"),
    "mask_2d_wrong_batch": (good(attention_mask=torch.ones(3, K_LEN, dtype=torch.bool)), ValueError, r"\[batch, k_len\] = \[2, 8\], got \[3, 8\]"),
    "mask_3d": (good(attention_mask=torch.ones(BATCH, Q_LEN, K_LEN, dtype=torch.bool)), ValueError, "got 3 dimensions"),
    "mask_4d_wrong_heads": (good(attention_mask=torch.ones(BATCH, 3, Q_LEN, K_LEN, dtype=torch.bool)), ValueError, r"does not broadcast .* \(dimension heads\)"),
    "mask_4d_wrong_queries": (good(attention_mask=torch.ones(BATCH, 1, Q_LEN + 1, K_LEN, dtype=torch.bool)), ValueError, r"\(dimension q_len\)"),
    "mask_4d_integer": (good(attention_mask=torch.ones(BATCH, 1, Q_LEN, K_LEN, dtype=torch.int64)), ValueError, "must be bool .* or floating"),
    "mask_other_device": (good(attention_mask=torch.ones(BATCH, K_LEN, dtype=torch.bool, device=META)), ValueError, "attention_mask is on meta, but q, k and v are on cpu"),
    "forward_mask_wrong_shape": (good(attention_mask=mea.forward_mask(torch.ones(BATCH, 3, dtype=torch.bool))), ValueError, r"got \[2, 3\]"),
    # alibi_slopes: type, shape, dtype, device
    "slopes_not_a_tensor": (good(alibi_slopes=[0.5] * HEADS), TypeError, "alibi_slopes must be a torch.Tensor"),
    "slopes_wrong_length": (good(alibi_slopes=torch.rand(KV_HEADS)), ValueError, r"alibi_slopes must have shape \[heads\] = \[4\], got \[2\]"),
    "slopes_2d": (good(alibi_slopes=torch.rand(1, HEADS)), ValueError, "alibi_slopes must have shape"),
    "slopes_integer": (good(alibi_slopes=torch.ones(HEADS, dtype=torch.long)), ValueError, "alibi_slopes must be floating"),
    "slopes_other_device": (good(alibi_slopes=torch.rand(HEADS, device=META)), ValueError, "alibi_slopes is on meta"),
    # scalars
    "causal_a_tensor": (good(causal=torch.tensor(True)), TypeError, "causal must be a Python bool"),
    "light_softmax_a_string": (good(light_softmax="false"), TypeError, "light_softmax must be a Python bool, got str 'false'"),
    "dropout_matmul_none": (good(dropout_matmul=None), TypeError, "dropout_matmul must be a Python bool, got NoneType None"),
    "causal_none": (good(causal=None), TypeError, "causal must be a Python bool"),
    "dropout_one": (good(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    "dropout_negative": (good(dropout_p=-0.1), ValueError, "dropout_p"),
    "dropout_nan": (good(dropout_p=float("nan")), ValueError, "dropout_p"),
    "dropout_a_string": (good(dropout_p="0.1"), ValueError, "dropout_p"),
    "scale_nan": (good(scale=float("nan")), ValueError, "scale must be a finite number"),
    "scale_inf": (good(scale=float("inf")), ValueError, "scale must be a finite number"),
    "scale_a_string": (good(scale="0.3"), ValueError, "scale must be a finite number"),
    "scale_a_tensor": (good(scale=torch.tensor(0.25)), ValueError, r"finite number \(a Python float\) or None, got Tensor"),
    "sequence_ids_a_list": (good(sequence_ids=[[0] * K_LEN] * BATCH), TypeError, "sequence_ids must be an integer tensor .*got list"),
    # backend and its settings
    "backend_unknown": (good(backend="fastest"), ValueError, "backend='fastest' is not auto or one of"),
    "backend_not_a_string": (good(backend=None), ValueError, "backend=None"),
    "backend_cannot_take_alibi": (good(backend="sdpa", alibi_slopes=torch.rand(HEADS)), ValueError, "'sdpa' cannot take this call: sdpa cannot take ALiBi"),
    "backend_not_on_this_device": (good(backend="flash_attn"), ValueError, "'flash_attn' cannot take this call"),
    "chunk_size_zero": (good(chunk_size=0), ValueError, "chunk_size .* must be a positive int"),
    "chunk_size_three_values": (good(chunk_size=(4, 4, 4)), ValueError, "chunk_size"),
    "flex_static_shapes_negative": (good(flex_static_shapes=-1), ValueError, "flex_static_shapes"),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_bad_attention_call_is_refused_clearly_and_changes_nothing(name, monkeypatch):
    call, error, message = ATTENTION_CASES[name]
    ran = []
    for backend, original in list(kernel_layer._RUN.items()):
        monkeypatch.setitem(kernel_layer._RUN, backend, lambda *a, _n=backend, _o=original, **kw: ran.append(_n) or _o(*a, **kw))
    with pytest.raises(error, match=message):
        run(call)
    assert ran == []  # refused before any kernel ran
    assert mea.demoted_backends() == []
    out = run(good())  # the process still takes valid calls on its first choice
    assert ran == ["sdpa"] and torch.isfinite(out).all()


def test_bad_use_flash_attn_is_refused_clearly(monkeypatch):
    monkeypatch.setenv("USE_FLASH_ATTN", "fastest")
    with pytest.raises(ValueError, match="USE_FLASH_ATTN='fastest' is not true/false/1/0 or one of the backends"):
        run(good())


def test_alibi_slopes_of_no_heads_is_refused_clearly():
    for heads in (0, -2, 2.5):
        with pytest.raises(ValueError, match="positive number of attention heads"):
            mea.alibi_slopes(heads)


# ----------------------------------------------------------------------------------------------
# NaN and inf: not errors, one documented behaviour (README, "The kernel layer")
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["q", "k", "v", "alibi_slopes", "additive_mask"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_real_input_reaches_the_rows_that_see_it_and_demotes_nothing(where, value):
    call = good(causal=False, attention_mask=None, alibi_slopes=torch.rand(HEADS))
    if where == "additive_mask":
        call["attention_mask"] = torch.zeros(BATCH, 1, Q_LEN, K_LEN)
        call["attention_mask"][1, 0, 2, 3] = value
    elif where == "alibi_slopes":
        call["alibi_slopes"][1] = value
    else:
        call[where] = call[where].clone()
        index = (1, 0, 2, 3) if where == "q" else (1, 0, 3, 3)
        call[where][index] = value
    out = run(dict(call, backend="chunked"))
    poisoned, untouched = (out[:, 1], out[:, 0]) if where == "alibi_slopes" else (out[1], out[0])  # a head, or a batch row
    assert not torch.isfinite(poisoned).all()  # the poisoned input shows in the rows that see it
    assert torch.isfinite(untouched).all()
    assert mea.demoted_backends() == []


DOCUMENT_IDS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 7, 7, 7, 7]])


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "eager", "flex"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("where, value", [("k", float("nan")), ("k", -float("inf")), ("v", float("nan")), ("v", float("inf"))])
def test_a_non_finite_key_or_value_reaches_only_its_own_document_in_inference(backend, causal, where, value):
    """Packed documents share a row, where a hidden key still meets its queries at probability 0 (0 * NaN is NaN);
    in inference (how a padded eval batch runs) it reaches the queries of its own document that see it, and no
    other document's, as if each document ran alone."""
    generator = torch.Generator().manual_seed(33)
    q = torch.randn(2, 4, 9, 8, generator=generator)
    k, v = (torch.randn(2, 2, 9, 8, generator=generator) for _ in range(2))
    with torch.no_grad():
        clean = mea.attention(q, k, v, causal=causal, sequence_ids=DOCUMENT_IDS, backend=backend)
        poisoned = {"k": k.clone(), "v": v.clone()}
        poisoned[where][0, 1, 4, 2] = value  # row 0, document 1 (keys 3-6), key/value head 1: query heads 2 and 3
        out = mea.attention(q, poisoned["k"], poisoned["v"], causal=causal, sequence_ids=DOCUMENT_IDS, backend=backend)
    seeing = torch.zeros(2, 4, 9, dtype=torch.bool)
    seeing[0, 2:, 4:7] = True
    if not causal:
        seeing[0, 2:, 3] = True
    assert (~torch.isfinite(out)).any(dim=-1).equal(seeing)
    assert torch.allclose(out[~seeing], clean[~seeing], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The modeling files
# ----------------------------------------------------------------------------------------------


def tiny(family: str):
    from transformers import BartConfig, BloomConfig, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    module = importlib.import_module(f"memory_efficient_adapter.modeling_{family}")
    if family == "llama":
        config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
        return module.LlamaForCausalLM(config).eval()
    if family == "gpt2":
        return module.GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    if family == "bloom":
        return module.BloomForCausalLM(BloomConfig(vocab_size=40, hidden_size=32, n_layer=1, n_head=4)).eval()
    if family == "qwen":
        from memory_efficient_adapter.configuration_qwen import QWenConfig

        config = QWenConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, kv_channels=8,
                            intermediate_size=64, seq_length=16, max_position_embeddings=16, fp32=True)
        return module.QWenLMHeadModel(config).eval()
    config = BartConfig(vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=16,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return module.BartForConditionalGeneration(config).eval()


def model_inputs(family: str, length: int = 6, **changes) -> dict:
    inputs = dict(input_ids=torch.randint(3, 40, (2, length)), attention_mask=torch.ones(2, length, dtype=torch.long))
    if family == "bart":
        inputs["decoder_input_ids"] = torch.randint(3, 40, (2, 4))
    inputs.update(changes)
    return inputs


FAMILIES = ["llama", "gpt2", "bloom", "bart"]

MODEL_CASES = [
    (family, case)
    for family in FAMILIES
    for case in ("mask_too_short", "mask_wrong_batch", "mask_3d", "unknown_attn_backend", "bad_chunk_size")
] + [("gpt2", "position_ids_past_maximum"), ("bart", "input_past_maximum"), ("gpt2", "input_past_maximum")] + [
    (family, "unbatched_input_ids") for family in FAMILIES + ["qwen"]
] + [(family, "input_ids_3d") for family in ("llama", "bloom", "bart")] + [
    ("bart", "unbatched_decoder_input_ids"), ("bart", "no_pad_token_to_shift_input_ids")
]

MODEL_MESSAGES = {
    "mask_too_short": r"(attention_mask|padding mask).*\[2, 5\]|\[2, 5\].*(attention_mask|padding mask)|got shape \[2, 5\]",
    "mask_wrong_batch": r"\[3, 6\]",
    "mask_3d": r"3 dimensions|2-D|\[2, 6, 6\]",
    "unknown_attn_backend": "config.attn_backend='fastest' is not auto or one of the attention backends",
    "bad_chunk_size": r"config.attn_chunk_size\) must be a positive int",
    "position_ids_past_maximum": r"position_ids must lie in \[0, 16\)",
    "input_past_maximum": r"16 positions|\[0, 16\)",
    "unbatched_input_ids": r"^input_ids must be \[batch, seq\], got shape \[6\]",
    "input_ids_3d": r"^input_ids must be \[batch, seq\], got shape \[2, 1, 6\]",
    "unbatched_decoder_input_ids": r"^decoder_input_ids must be \[batch, seq\], got shape \[4\]",
    "no_pad_token_to_shift_input_ids": r"pad_token_id has to be defined to shift input_ids or labels right",
}


@pytest.mark.parametrize("family, case", MODEL_CASES)
def test_bad_model_input_is_refused_clearly_and_changes_nothing(family, case):
    model = tiny(family)
    inputs = model_inputs(family)
    if case == "mask_too_short":
        inputs["attention_mask"] = torch.ones(2, 5, dtype=torch.long)
    elif case == "mask_wrong_batch":
        inputs["attention_mask"] = torch.ones(3, 6, dtype=torch.long)
        inputs["attention_mask"][1, 0] = 0  # BART checks the batch of a mask only once it pads something
    elif case == "mask_3d":
        inputs["attention_mask"] = torch.ones(2, 6, 6, dtype=torch.long)
    elif case == "unknown_attn_backend":
        model.config.attn_backend = "fastest"
    elif case == "bad_chunk_size":
        model.config.attn_backend, model.config.attn_chunk_size = "chunked", 0
    elif case == "position_ids_past_maximum":
        inputs["position_ids"] = torch.arange(12, 18).expand(2, -1)
    elif case == "input_past_maximum":
        inputs = model_inputs(family, length=20)
    elif case == "unbatched_input_ids":
        inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][0], inputs["attention_mask"][0]
    elif case == "input_ids_3d":
        inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, None], inputs["attention_mask"][:, None]
    elif case == "unbatched_decoder_input_ids":
        inputs["decoder_input_ids"] = inputs["decoder_input_ids"][0]
    elif case == "no_pad_token_to_shift_input_ids":
        del inputs["decoder_input_ids"]
        model.config.pad_token_id = None
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match=MODEL_MESSAGES[case]):
        model(**inputs)
    assert importlib.import_module(type(model).__module__).demoted_backends() == []
    model.config.attn_backend, model.config.attn_chunk_size = None, None
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(family)).logits).all()  # the model still runs


TRAINING_CASES = {
    "labels_shorter_than_a_padded_batch": r"labels of shape \[2, 5\] do not match the inputs' \[batch, sequence\] \[2, 6\]",
    "float_labels": "labels must be integer token ids, got dtype torch.float32",
    "keep_logits_in_training_as_a_string": r"config.keep_logits_in_training must be True, False or None, got 'false'",
    "unpad_batches_as_0": r"config.unpad_batches must be True, False or None, got 0",
    "loss_chunk_size_as_true": r"config.loss_chunk_size must be a positive int or None, got True",
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_bad_training_input_or_setting_is_refused_by_name(family, case):
    """Labels and loss settings a padded training step reads: stock's shape and dtype errors, and True/False
    switches that refuse other values (a string "false" would read as true)."""
    model = tiny(family).train()
    inputs = model_inputs(family)
    inputs["attention_mask"][1, 4:] = 0
    labels = inputs["input_ids"].clone()
    if case == "labels_shorter_than_a_padded_batch":
        labels = labels[:, :-1]
    elif case == "float_labels":
        labels, inputs["attention_mask"] = labels.float(), torch.ones_like(labels)
    elif case == "keep_logits_in_training_as_a_string":
        model.config.keep_logits_in_training = "false"
    elif case == "unpad_batches_as_0":
        model.config.unpad_batches = 0
    else:
        model.config.loss_chunk_size = True
    with pytest.raises(ValueError, match=TRAINING_CASES[case]):
        model(**inputs, labels=labels)


@pytest.mark.parametrize("family", FAMILIES + ["qwen"])
def test_labels_of_another_length_are_named_by_the_fused_loss(family):
    """Unpadded training rows go straight to the fused LM-head loss: a label count that is not one per token gets
    a ValueError with both shapes (stock's cross-entropy: a ValueError about batch sizes), not an internal one."""
    model = tiny(family).train()
    inputs = model_inputs(family)
    inputs.pop("attention_mask")
    labels = (inputs["decoder_input_ids"] if family == "bart" else inputs["input_ids"])[:, :-1]
    expected = [2, 3] if family == "bart" else [2, 5]
    sequence = [2, 4] if family == "bart" else [2, 6]
    message = f"labels of shape {expected} do not match the inputs' [batch, sequence] {sequence}"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(**inputs, labels=labels)


def test_qwen_refuses_logn_scaling_over_a_training_length_of_one():
    """logn scaling divides by log(seq_length): the original fails at construction (division by zero); ours
    names the setting instead of building a model whose backends return NaN or disagree."""
    from memory_efficient_adapter.configuration_qwen import QWenConfig
    from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

    config = QWenConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, kv_channels=8,
                        intermediate_size=64, seq_length=1, use_logn_attn=True, fp32=True)
    with pytest.raises(ValueError, match=r"use_logn_attn=True .* seq_length=1"):
        QWenLMHeadModel(config)
    config.use_logn_attn = False
    assert torch.isfinite(QWenLMHeadModel(config).eval()(torch.randint(3, 40, (1, 5))).logits).all()
    config.use_logn_attn, config.seq_length = True, None  # no training length given: the default one
    assert torch.isfinite(QWenLMHeadModel(config).eval()(torch.randint(3, 40, (1, 5))).logits).all()


def test_context_parallel_is_refused_by_name(monkeypatch):
    """torch's ``context_parallel`` replaces ``F.scaled_dot_product_attention`` and records the replacement; the
    kernels here do not go through it, so each rank attended to its own shard of the sequence only (a wrong
    loss, silently). Stand-in for the replacement, made as ``context_parallel`` makes it."""
    import torch.nn.functional as F

    context_parallel = next(  # where the installed torch keeps it (the module moved after torch 2.9)
        importlib.import_module(name)
        for name in kernel_layer._CONTEXT_PARALLEL_MODULES
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name)
    )
    original = F.scaled_dot_product_attention

    def replaced(*args, **kwargs):
        return original(*args, **kwargs)

    q = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(F, "scaled_dot_product_attention", replaced)
    assert kernel_layer.attention(q, q, q, causal=True).shape == q.shape  # another library's replacement runs
    monkeypatch.setitem(context_parallel._replaced_functions, replaced, ("scaled_dot_product_attention", original))
    with pytest.raises(NotImplementedError, match=re.escape("context parallel (torch.distributed.tensor.experimental")):
        kernel_layer.attention(q, q, q, causal=True)
