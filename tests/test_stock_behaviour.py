"""Our classes behave like the stock transformers classes where transformers' own model tests look (issue 21):
attention weights on request, hidden-state selection, config defaults, cache types, parallel plans, RoPE
types, custom 4-D masks and the heads users load. Same weights, same inputs, loaded through trust_remote_code.

Runs on transformers 5.x and 4.57.x.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers
from transformers import AutoModel, BartConfig, BloomConfig, GPT2Config, LlamaConfig

from memory_efficient_adapter.families import family_files, write_remote_code
from remote_code import TRANSFORMERS_5, assert_close_rel

TOL = 1e-5
VOCAB = 101


def family_config(family: str, **overrides):
    """A tiny config of each family (dropout left on: the models run in eval mode unless a test trains)."""
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False,
        )
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, pad_token_id=0)
    elif family == "bloom":
        config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4, pad_token_id=0)
    else:
        config = BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        )
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def randomize_(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if ("norm" in name or "ln" in name) else 0.1 * noise)


def stock_class(class_name: str) -> type:
    return getattr(transformers, class_name)


def stock_and_ours(family: str, class_name: str, tmp_path, config=None, stock_attn: str = "eager"):
    """The stock class with random weights (eager attention, so it can return weights) and ours loaded from
    its saved checkpoint through trust_remote_code, both in eval mode."""
    config = config or family_config(family)
    torch.manual_seed(0)
    stock = stock_class(class_name)(config)
    randomize_(stock)
    folder = tmp_path / f"{family}-{class_name}"
    stock.save_pretrained(folder)
    write_remote_code(folder, family, {"AutoModel": f"{family_files(family)[0][:-3]}.{class_name}"})
    ours = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(ours).__module__ != type(stock).__module__, "loaded the stock class instead of ours"
    stock = stock_class(class_name).from_pretrained(folder, attn_implementation=stock_attn)
    return stock.eval(), ours.eval()


def token_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Random ids with left padding in row 0 (decoder-only) or right padding (BART's encoder)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if family == "bart":
        mask[0, -2:] = 0
        decoder_ids = torch.randint(3, VOCAB, (batch, seq - 2), generator=generator)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


BASE_CLASSES = {"llama": "LlamaModel", "gpt2": "GPT2Model", "bloom": "BloomModel", "bart": "BartModel"}
ATTENTION_FIELDS = {
    "llama": ("attentions",),
    "gpt2": ("attentions",),
    "bloom": ("attentions",),
    "bart": ("encoder_attentions", "decoder_attentions", "cross_attentions"),
}


def assert_weights_match(ours, stock, mask: torch.Tensor | None, what: str) -> None:
    """Weights of stock's shapes, equal where a real query attends (stock's fully masked rows are arbitrary)."""
    assert ours is not None, f"{what}: no attention weights"
    assert len(ours) == len(stock), f"{what}: {len(ours)} layers != {len(stock)}"
    for layer, (actual, expected) in enumerate(zip(ours, stock)):
        assert actual.shape == expected.shape, f"{what}[{layer}]: {tuple(actual.shape)} != {tuple(expected.shape)}"
        if mask is not None and actual.shape[-2] == mask.shape[-1]:
            rows = mask.bool()[:, None, :, None]
            actual, expected = actual * rows, expected * rows
        assert_close_rel(actual, expected, TOL, f"{what}[{layer}]")


# ----------------------------------------------------------------------------------------------
# Attention weights on request (items 3, 4, 5)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_output_attentions_returns_stock_weights_and_outputs(family, tmp_path, caplog):
    stock, ours = stock_and_ours(family, BASE_CLASSES[family], tmp_path)
    inputs = token_inputs(family)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        expected = stock(**inputs, output_attentions=True)
        actual = ours(**inputs, output_attentions=True)
    assert "eager math" in caplog.text
    query_mask = None if family == "bart" else inputs["attention_mask"]
    for field in ATTENTION_FIELDS[family]:
        mask = inputs["attention_mask"] if field == "encoder_attentions" else query_mask
        assert_weights_match(getattr(actual, field), getattr(expected, field), mask, f"{family} {field}")
    real = 1.0 if family == "bart" else inputs["attention_mask"][..., None]
    assert_close_rel(actual.last_hidden_state * real, expected.last_hidden_state * real, TOL, f"{family} output")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_config_output_flags_are_honoured(family, tmp_path):
    """``config.output_hidden_states`` / ``config.output_attentions`` apply when the call does not say."""
    config = family_config(family)
    config._attn_implementation = "eager"  # transformers refuses output_attentions on a config with sdpa
    config.output_hidden_states = True
    config.output_attentions = True
    stock, ours = stock_and_ours(family, BASE_CLASSES[family], tmp_path, config=config)
    ours.config._attn_implementation = "eager"
    ours.config.output_hidden_states = True
    ours.config.output_attentions = True
    with torch.no_grad():
        actual = ours(**token_inputs(family))
    hidden_field = "encoder_hidden_states" if family == "bart" else "hidden_states"
    attention_field = ATTENTION_FIELDS[family][0]
    assert getattr(actual, hidden_field) is not None and len(getattr(actual, hidden_field)) == 4
    assert getattr(actual, attention_field) is not None and len(getattr(actual, attention_field)) == 3


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_attention_weights_keep_their_gradient(family, tmp_path):
    """``test_retain_grad_hidden_states_attentions``: the returned weights are part of the graph."""
    _, ours = stock_and_ours(family, BASE_CLASSES[family], tmp_path)
    outputs = ours(**token_inputs(family), output_attentions=True, output_hidden_states=True)
    field = ATTENTION_FIELDS[family][0]
    weights = getattr(outputs, field)[0]
    weights.retain_grad()
    outputs.last_hidden_state.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_qwen_attention_weights_reproduce_the_fused_output():
    from memory_efficient_adapter.configuration_qwen import QWenConfig
    from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

    torch.manual_seed(0)
    config = QWenConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
        intermediate_size=48, seq_length=12, max_position_embeddings=64, initializer_range=0.2,
        fp32=True,  # without a precision flag the original's choice is bf16 where CUDA has it
    )
    model = QWenLMHeadModel(config).eval()
    inputs = token_inputs("qwen", seq=9)
    with torch.no_grad():
        fused = model(**inputs)
        weighed = model(**inputs, output_attentions=True)
    assert fused.attentions is None
    assert len(weighed.attentions) == 2 and weighed.attentions[0].shape == (2, 4, 9, 9)
    assert_close_rel(weighed.logits[1], fused.logits[1], TOL, "qwen logits with weights")
    for weights in weighed.attentions:
        assert torch.allclose(weights[1].sum(-1), torch.ones(4, 9))
        assert weights[1].triu(1).abs().max() == 0  # causal
        assert weights[0, :, 2:, :2].abs().max() == 0  # left padding is never attended


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_generate_returns_attentions_like_stock(family, tmp_path):
    class_name = "BartForConditionalGeneration" if family == "bart" else "LlamaForCausalLM"
    stock, ours = stock_and_ours(family, class_name, tmp_path)
    inputs = token_inputs(family)
    inputs.pop("decoder_input_ids", None)
    options = dict(max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    expected = stock.generate(**inputs, **options)
    actual = ours.generate(**inputs, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    field = "decoder_attentions" if family == "bart" else "attentions"
    assert len(getattr(actual, field)) == len(getattr(expected, field)) == 3
    for step_actual, step_expected in zip(getattr(actual, field), getattr(expected, field)):
        assert [w.shape for w in step_actual] == [w.shape for w in step_expected]
    if family == "bart":
        assert_weights_match(actual.cross_attentions[-1], expected.cross_attentions[-1], None, "bart cross")


def test_bart_set_attn_implementation_reaches_the_kernel_layer(tmp_path, monkeypatch):
    _, ours = stock_and_ours("bart", "BartModel", tmp_path)
    module = __import__(type(ours).__module__, fromlist=["_RUN"])
    seen = []
    original = module._RUN["eager"]
    monkeypatch.setitem(module._RUN, "eager", lambda *a, **k: seen.append("eager") or original(*a, **k))
    inputs = token_inputs("bart")
    with torch.no_grad():
        ours(**inputs)
        assert not seen
        ours.set_attn_implementation("eager")
        ours(**inputs)
    assert len(seen) == 9  # 3 encoder layers + 3 decoder layers x (self + cross)


# ----------------------------------------------------------------------------------------------
# Hidden-state selection (item 8) and legacy caches (issue 14)
# ----------------------------------------------------------------------------------------------


def stock_selects_hidden_states() -> bool:
    """Whether stock selects hidden states by index as ours does (``selected_hidden_states``, transformers 5.23;
    4.57 and 5.0 return them all, 5.17 cuts the tuple after the last index and takes no negative one)."""
    import importlib.util

    if importlib.util.find_spec("transformers.utils.output_capturing") is None:
        return False
    from transformers.utils import output_capturing

    return hasattr(output_capturing, "selected_hidden_states")


HIDDEN_FIELDS = {"llama": ("hidden_states",), "gpt2": ("hidden_states",), "bloom": ("hidden_states",),
                 "bart": ("encoder_hidden_states", "decoder_hidden_states")}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
@pytest.mark.parametrize("selection", [[0, 2], -1, [1, -1]])
def test_output_hidden_states_selects_by_index_as_stock_does(family, selection, tmp_path):
    """transformers 5's ``output_hidden_states=[0, 2]``: a tuple as long as the full one, the selected states in
    their places and None elsewhere, as stock returns it (stock BLOOM, which ignores the selection, aside)."""
    stock, ours = stock_and_ours(family, BASE_CLASSES[family], tmp_path)
    inputs = token_inputs(family)
    with torch.no_grad():
        every = ours(**inputs, output_hidden_states=True)
        chosen = ours(**inputs, output_hidden_states=selection)
        expected = stock(**inputs, output_hidden_states=selection)
    indices = [selection] if isinstance(selection, int) else selection
    kept = {index % 4 for index in indices}
    for field in HIDDEN_FIELDS[family]:
        actual = getattr(chosen, field)
        assert len(actual) == len(getattr(every, field)) == 4
        for index, (state, full) in enumerate(zip(actual, getattr(every, field))):
            assert torch.equal(state, full) if index in kept else state is None, (field, index)
        if family != "bloom" and stock_selects_hidden_states():
            assert [state is None for state in actual] == [state is None for state in getattr(expected, field)]


def test_bart_causal_lm_counts_negative_hidden_state_indices_over_its_decoder(tmp_path):
    """Its states are the decoder's (2 layers here, 3 states); stock counts a negative index over
    ``num_hidden_layers``, the encoder's depth (4), and so selects nothing for -1 (README)."""
    config = family_config("bart", encoder_layers=4, decoder_layers=2)
    stock, ours = stock_and_ours("bart", "BartForCausalLM", tmp_path, config=config)
    inputs = {"input_ids": token_inputs("bart")["input_ids"]}
    with torch.no_grad():
        every = ours(**inputs, output_hidden_states=True).hidden_states
        chosen = ours(**inputs, output_hidden_states=[0, -1]).hidden_states
    assert len(chosen) == len(every) == 3 and chosen[1] is None
    assert torch.equal(chosen[0], every[0]) and torch.equal(chosen[2], every[2])


CAPTURED_FIELDS = ("hidden_states", "attentions", "cross_attentions")


def captured_by_hooks(model, **inputs):
    """The model's output with its hidden states and attentions replaced by what transformers' output-capturing
    hooks (installed from ``_can_record_outputs``) recorded during the same forward."""
    from transformers.utils.output_capturing import capture_outputs

    def forward_without_its_own_collection(self, **kwargs):
        output = type(self).forward(self, **kwargs)
        for field in CAPTURED_FIELDS:
            if field in output:
                output[field] = None
        return output

    return capture_outputs(forward_without_its_own_collection)(model, **inputs)


@pytest.mark.skipif(not stock_selects_hidden_states(), reason="transformers 5's output capture")
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_output_capturing_hooks_record_what_the_forward_returns(family, tmp_path):
    """``_can_record_outputs`` (declared as stock declares it) points transformers' output-capturing hooks at
    modules whose outputs are the hidden states and attention weights our forward returns."""
    _, ours = stock_and_ours(family, BASE_CLASSES[family], tmp_path)
    inputs = token_inputs(family)
    flags = dict(output_hidden_states=True, output_attentions=True)
    if family == "bart":
        encoder_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **flags)
        with torch.no_grad():
            encoded = ours.get_encoder()(**encoder_inputs)
        decoder_inputs = dict(input_ids=inputs["decoder_input_ids"], encoder_hidden_states=encoded.last_hidden_state,
                              encoder_attention_mask=inputs["attention_mask"], **flags)
        runs = [(ours.get_encoder(), encoder_inputs), (ours.get_decoder(), decoder_inputs)]
    else:
        runs = [(ours, {**inputs, **flags})]
    for module, module_inputs in runs:
        with torch.no_grad():
            direct, hooked = module(**module_inputs), captured_by_hooks(module, **module_inputs)
        for field in CAPTURED_FIELDS:
            if getattr(direct, field, None) is None:
                continue
            recorded = getattr(hooked, field)
            assert recorded is not None and len(recorded) == len(getattr(direct, field)), (family, field)
            assert len(recorded) > 0 or field == "cross_attentions"  # (GPT-2 without encoder states: (), as stock)
            for index, (a, b) in enumerate(zip(getattr(direct, field), recorded)):
                assert torch.equal(a, b), (family, field, index)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_sample_leaves_the_others_of_an_eval_batch_as_stock_does(family, value, tmp_path):
    """A padded eval batch without a cache runs packed into one row; an overflow in one sample stays there."""
    stock, ours = stock_and_ours(family, {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                                          "bloom": "BloomForCausalLM"}[family], tmp_path)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, :3] = 0, 0
    embeds = stock.get_input_embeddings()(ids).detach()
    embeds[0, 4, 3] = value
    with torch.no_grad():
        expected = stock(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        actual = ours(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    assert not torch.isfinite(actual[0, 4:]).any(dim=-1).any()  # the sample itself, from the overflow on
    kept = mask[1:].bool()
    assert torch.isfinite(actual[1:][kept]).all()
    assert_close_rel(actual[1:][kept], expected[1:][kept], TOL, f"{family}: the other samples")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart", "qwen"])
def test_legacy_tuple_cache_gets_one_clear_type_error(family, tmp_path):
    if family == "qwen":
        from memory_efficient_adapter.configuration_qwen import QWenConfig
        from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

        ours = QWenLMHeadModel(QWenConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, kv_channels=8, intermediate_size=48))
        inputs = token_inputs("qwen")
    else:
        _, ours = stock_and_ours(family, BASE_CLASSES[family], tmp_path)
        inputs = token_inputs(family)
    legacy = tuple((torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)) for _ in range(3))
    with pytest.raises(TypeError, match="Cache object"):
        ours(**inputs, past_key_values=legacy)


# ----------------------------------------------------------------------------------------------
# GPT-2 takes [batch, choices, seq] (item 11)
# ----------------------------------------------------------------------------------------------


def test_gpt2_model_takes_multiple_choice_inputs(tmp_path):
    stock, ours = stock_and_ours("gpt2", "GPT2Model", tmp_path)
    ids = torch.randint(3, VOCAB, (2, 3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = stock(ids, output_hidden_states=True)
        actual = ours(ids, output_hidden_states=True)
    assert actual.last_hidden_state.shape == (2, 3, 6, 32)
    assert_close_rel(actual.last_hidden_state, expected.last_hidden_state, TOL, "gpt2 [b, c, s]")
    assert [h.shape for h in actual.hidden_states] == [h.shape for h in expected.hidden_states]


def test_stock_bloom_builds_from_our_config_after_our_model_ran(tmp_path):
    """Our BLOOM leaves the implementation it was not asked for unset in the config it shares with the caller, so
    stock BLOOM (which has no sdpa path and refuses a config saying "sdpa") builds from it and agrees."""
    stock, ours = stock_and_ours("bloom", "BloomForCausalLM", tmp_path)
    if not __import__(type(ours).__module__, fromlist=["_"]).LEAVE_ATTN_IMPLEMENTATION_UNSET:
        pytest.skip("transformers 5.0 fails on an unset attn_implementation: our BLOOM claims sdpa there")
    inputs = token_inputs("bloom")
    with torch.no_grad():
        actual = ours(**inputs).logits
    config = family_config("bloom")
    type(ours)(config)
    assert getattr(config, "_attn_implementation", None) in (None, "eager")
    stock_class("BloomForSequenceClassification")(ours.config)  # a stock head on our base's config
    rebuilt = stock_class("BloomForCausalLM")(ours.config).eval()
    rebuilt.load_state_dict(ours.state_dict())
    real = inputs["attention_mask"][..., None]
    with torch.no_grad():
        assert_close_rel(rebuilt(**inputs).logits * real, actual * real, TOL, "stock BLOOM on our config")
        assert_close_rel(ours(**inputs).logits * real, actual * real, TOL, "ours after stock was built")


# ----------------------------------------------------------------------------------------------
# Custom 4-D masks (item 10)
# ----------------------------------------------------------------------------------------------

SHARED_PREFIX_KEEP = torch.tensor(
    [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0],
     [1, 1, 1, 0, 0, 1]]
)[None, None]


@pytest.mark.parametrize("mask_kind", ["int", "bool", "additive"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
def test_custom_4d_mask_packs_a_shared_prefix_like_stock(family, mask_kind, tmp_path):
    """Three continuations of one prefix, packed into one row by a 4-D mask, give the unpacked logits (the
    test transformers runs as ``test_custom_4d_attention_mask``); BART's decoder takes the mask."""
    class_name = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bart": "BartForConditionalGeneration"}
    stock, ours = stock_and_ours(family, class_name[family], tmp_path)
    mask = {"int": SHARED_PREFIX_KEEP, "bool": SHARED_PREFIX_KEEP.bool(),
            "additive": (1.0 - SHARED_PREFIX_KEEP.float()) * torch.finfo(torch.float32).min}[mask_kind]
    unpacked = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    packed = torch.tensor([[10, 11, 12, 13, 14, 15]])
    if family == "bart":
        encoder_ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = ours(encoder_ids.expand(3, -1), decoder_input_ids=unpacked).logits[:, -1]
            actual = ours(encoder_ids, decoder_input_ids=packed, decoder_attention_mask=mask).logits[0, -3:]
            reference = stock(encoder_ids, decoder_input_ids=packed, decoder_attention_mask=mask).logits[0, -3:]
        # BART's learned positions are by index, so the packed row is compared with stock's packed row too
        if mask_kind == "additive":
            assert_close_rel(actual, reference, TOL, "bart packed decoder vs stock")
        assert_close_rel(actual[0], expected[0], TOL, "bart first continuation")
        return
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    with torch.no_grad():
        expected = ours(unpacked, position_ids=torch.arange(4).expand(3, -1)).logits[:, -1]
        actual = ours(packed, attention_mask=mask, position_ids=positions).logits[0, -3:]
        reference = stock(packed, attention_mask=mask, position_ids=positions).logits[0, -3:]
    assert_close_rel(actual, expected, TOL, f"{family} packed vs unpacked")
    if mask_kind == "additive":  # stock's eager attention adds any 4-D mask; transformers' test passes floats
        assert_close_rel(actual, reference, TOL, f"{family} packed vs stock")


# ----------------------------------------------------------------------------------------------
# Declared capabilities, static caches and compilation (items 6 and 9)
# ----------------------------------------------------------------------------------------------

GENERATIVE_CLASSES = {
    "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bloom": "BloomForCausalLM",
    "bart": "BartForConditionalGeneration",
}
DECLARED = (
    "_can_compile_fullgraph", "_supports_attention_backend", "_tp_plan", "_pp_plan", "_fsdp_plan", "_supports_sdpa"
)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_declares_what_stock_declares(family, tmp_path):
    """Capability flags and parallel plans (resolved by post_init, the config's base-model plans included)."""
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    for name in DECLARED:
        if getattr(stock, name, None):
            assert getattr(ours, name, None) == getattr(stock, name), name
    if family == "llama":
        assert "lm_head" in type(ours)._tp_plan and "lm_head" in type(ours)._pp_plan


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_continuous_batching_is_refused_before_it_starts(family, tmp_path):
    """transformers' continuous batching runs the forward on a thread that only logs errors: the refusal inside
    our forward left every request empty, ``generate(cache_implementation="paged")`` returned the prompts as if
    it had decoded, and BART (whose forward drops unknown keywords) decoded one wrong token."""
    _, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = token_inputs(family, batch=1)
    with pytest.raises(NotImplementedError, match="continuous batching"):
        ours.generate_batch(inputs=inputs["input_ids"].tolist(), generation_config=ours.generation_config)
    if TRANSFORMERS_5:
        with pytest.raises(NotImplementedError, match="continuous batching"):
            ours.generate(inputs["input_ids"], cache_implementation="paged", max_new_tokens=2)
    ours.config._attn_implementation = "paged|eager"  # ran auto before, the config saying otherwise
    with pytest.raises(ValueError, match=re.escape("'paged|eager': transformers' continuous batching")):
        ours(**inputs)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_an_attention_function_registered_by_the_user_is_refused_by_name(family, tmp_path):
    """Stock LLaMA, GPT-2 and BART call a function registered with ``AttentionInterface`` under the name given as
    ``attn_implementation``; ours cannot (attention runs in the kernel layer) and ran ``auto`` instead, logged.
    transformers' own registrations (4.57's ``sdpa_without_vmap`` for ExecuTorch export) still run ``auto``."""
    calls = []

    def recorded_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(module)
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )

    transformers.AttentionInterface.register("recorded_attention", recorded_attention)
    stock, _ = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path, stock_attn="recorded_attention")
    inputs = token_inputs(family)
    with torch.no_grad():
        stock(**inputs)
    assert bool(calls) == (family != "bloom")  # stock BLOOM computes its attention itself
    ours = AutoModel.from_pretrained(tmp_path / f"{family}-{GENERATIVE_CLASSES[family]}", trust_remote_code=True,
                                     attn_implementation="recorded_attention")
    with torch.no_grad(), pytest.raises(ValueError, match="'recorded_attention' names '.*recorded_attention' "
                                                          "\\(from test_stock_behaviour\\), registered with"):
        ours(**inputs)
    transformers.AttentionInterface.register(
        "sdpa_as_exported", transformers.integrations.sdpa_attention.sdpa_attention_forward
    )
    ours.config._attn_implementation = "sdpa_as_exported"  # as 4.57's ExecuTorch wrappers set it
    with torch.no_grad():
        exported_name = ours(**inputs).logits
        ours.config._attn_implementation = None
        assert torch.equal(exported_name, ours(**inputs).logits)


# ----------------------------------------------------------------------------------------------
# Every RoPE type transformers knows (item 7)
# ----------------------------------------------------------------------------------------------

HALF_HEAD_DIM = 8  # family_config("llama"): head_dim 16
ROPE_TYPES = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {
        "short_factor": [1.0 + 0.1 * i for i in range(HALF_HEAD_DIM)],
        "long_factor": [1.5 + 0.3 * i for i in range(HALF_HEAD_DIM)],
        "factor": 2.0,
        "original_max_position_embeddings": 8,
    },
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "proportional": {"partial_rotary_factor": 0.5},
}


def rope_config(rope_type: str):
    """A tiny LLaMA config with ``rope_type`` in this transformers version's format; max_position_embeddings 16,
    so the 20-token inputs below also exercise dynamic NTK's and LongRoPE's long-sequence branches."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        pytest.skip(f"transformers {transformers.__version__} has no rope type {rope_type!r}")
    config = family_config("llama", max_position_embeddings=16)
    rope = {"rope_type": rope_type, **ROPE_TYPES[rope_type]}
    if TRANSFORMERS_5:
        config.rope_parameters = {**rope, "rope_theta": 500.0}
    else:
        config.rope_scaling, config.rope_theta = rope, 500.0
    return config


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_every_rope_type_matches_stock(rope_type, tmp_path):
    stock, ours = stock_and_ours("llama", "LlamaForCausalLM", tmp_path, config=rope_config(rope_type))
    assert torch.equal(ours.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq)
    for seq in (6, 20):  # within, then beyond max_position_embeddings
        ids = torch.randint(3, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            assert_close_rel(ours(ids).logits, stock(ids).logits, TOL, f"{rope_type} logits, {seq} tokens")
        assert torch.equal(ours.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "yarn"])
def test_padded_batch_shorter_than_its_length_keeps_stocks_frequencies(rope_type, tmp_path):
    """Dynamic NTK and LongRoPE pick their frequencies from the padded batch's largest position (beyond the
    original length here) while every kept token lies within it: eval logits at kept positions, the training
    loss and every gradient equal stock's (yarn, whose frequencies are fixed, runs unpadded as before)."""
    stock, ours = stock_and_ours("llama", "LlamaForCausalLM", tmp_path, config=rope_config(rope_type))
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 7:], mask[1, 5:] = 0, 0  # kept tokens within both original lengths (8, 16), the padded row beyond
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    with torch.no_grad():
        kept = mask[..., None].bool()
        expected = stock(ids, attention_mask=mask).logits.masked_fill(~kept, 0)
        assert_close_rel(ours(ids, attention_mask=mask, use_cache=False).logits.masked_fill(~kept, 0), expected, TOL,
                         f"{rope_type} logits")
    losses, grads = [], []
    for model in (stock, ours):
        model.train().zero_grad(set_to_none=True)
        losses.append(model(**batch).loss)
        losses[-1].backward()
        grads.append({name: param.grad for name, param in model.named_parameters()})
        model.eval()
    assert_close_rel(losses[1].detach(), losses[0].detach(), TOL, f"{rope_type} loss")
    for name, grad in grads[0].items():
        assert_close_rel(grads[1][name], grad, TOL, f"{rope_type} grad of {name}")


def test_rotary_frequencies_are_restored_after_meta_device_loading(tmp_path):
    """``inv_freq`` is a non-persistent buffer, as in stock: loading (meta device in transformers 5) must give
    the computed frequencies back, not uninitialised memory."""
    stock, ours = stock_and_ours("llama", "LlamaForCausalLM", tmp_path, config=rope_config("yarn"))
    assert ours.model.rotary_emb.inv_freq.device.type == "cpu"
    assert torch.equal(ours.model.rotary_emb.original_inv_freq, stock.model.rotary_emb.original_inv_freq)
    assert ours.model.rotary_emb.attention_scaling == stock.model.rotary_emb.attention_scaling != 1.0


# ----------------------------------------------------------------------------------------------
# The heads users load (item 11)
# ----------------------------------------------------------------------------------------------

HEADS = [
    ("llama", "LlamaForQuestionAnswering"),
    ("llama", "LlamaForTokenClassification"),
    ("gpt2", "GPT2ForQuestionAnswering"),
    ("gpt2", "GPT2ForTokenClassification"),
    ("gpt2", "GPT2DoubleHeadsModel"),
    ("bloom", "BloomForQuestionAnswering"),
    ("bart", "BartForQuestionAnswering"),
    ("bart", "BartForCausalLM"),
]
HEAD_OUTPUTS = ("start_logits", "end_logits", "logits", "mc_logits", "loss", "mc_loss")


def head_inputs(family: str, class_name: str) -> dict:
    """Unpadded inputs with labels (a loss over padded positions would compare their arbitrary logits)."""
    inputs = token_inputs(family)
    inputs.pop("attention_mask")
    generator = torch.Generator().manual_seed(5)
    batch, seq = inputs["input_ids"].shape
    if class_name.endswith("QuestionAnswering"):
        inputs["start_positions"] = torch.randint(0, seq, (batch,), generator=generator)
        inputs["end_positions"] = torch.randint(0, seq, (batch,), generator=generator)
    elif class_name.endswith("TokenClassification"):
        inputs["labels"] = torch.randint(0, 2, (batch, seq), generator=generator)
    elif class_name == "GPT2DoubleHeadsModel":
        inputs = {"input_ids": torch.randint(3, VOCAB, (batch, 3, seq), generator=generator)}
        inputs["mc_token_ids"] = torch.randint(0, seq, (batch, 3), generator=generator)
        inputs["labels"] = inputs["input_ids"]
        inputs["mc_labels"] = torch.randint(0, 3, (batch,), generator=generator)
    elif class_name == "BartForCausalLM":
        inputs = {"input_ids": inputs["decoder_input_ids"], "labels": inputs["decoder_input_ids"].roll(-1, 1)}
    return inputs


@pytest.mark.parametrize("family,class_name", HEADS)
def test_head_matches_stock_and_keeps_its_keys(family, class_name, tmp_path):
    stock, ours = stock_and_ours(family, class_name, tmp_path)
    assert type(ours).__name__ == class_name
    assert set(ours.state_dict()) == set(stock.state_dict())
    inputs = head_inputs(family, class_name)
    with torch.no_grad():
        expected, actual = stock(**inputs), ours(**inputs)
    compared = 0
    for name in HEAD_OUTPUTS:
        if getattr(expected, name, None) is not None:
            assert_close_rel(getattr(actual, name), getattr(expected, name), TOL, f"{class_name}.{name}")
            compared += 1
    assert compared >= 2


def changed_by_init_weights(model) -> set:
    """The names of the tensors that ``model.apply(model._init_weights)`` changes (users call it after adding
    modules to a loaded model)."""
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.apply(model._init_weights)
    return {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}


LM_HEADS = [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"), ("bloom", "BloomForCausalLM"),
            ("bart", "BartForConditionalGeneration")]  # fmt: skip


@pytest.mark.parametrize("family,class_name", LM_HEADS)
def test_init_weights_called_on_a_loaded_model_changes_what_stocks_changes(family, class_name, tmp_path):
    """transformers 5's init functions skip tensors loaded from a checkpoint (4.57's re-initialise them, in stock
    too). Our BART called ``torch.nn.init`` directly: every loaded weight was drawn again on 5.x (logits 2.6 off)."""
    stock, ours = stock_and_ours(family, class_name, tmp_path)
    expected = changed_by_init_weights(stock)
    assert changed_by_init_weights(ours) == expected
    assert not expected or not TRANSFORMERS_5


def test_bart_causal_lm_decodes_with_cross_attention_like_stock(tmp_path):
    """BartForCausalLM as the decoder of an encoder-decoder pair: encoder states in, cached generation steps."""
    stock, ours = stock_and_ours("bart", "BartForCausalLM", tmp_path)
    generator = torch.Generator().manual_seed(9)
    encoder_states = torch.randn(2, 5, 32, generator=generator)
    encoder_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.randint(3, VOCAB, (2, 4), generator=generator)
    with torch.no_grad():
        expected = stock(ids, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask)
        actual = ours(ids, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask)
        step = torch.randint(3, VOCAB, (2, 1), generator=generator)
        next_expected = stock(step, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                              past_key_values=expected.past_key_values)
        next_actual = ours(step, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                           past_key_values=actual.past_key_values)
    assert_close_rel(actual.logits, expected.logits, TOL, "BartForCausalLM logits")
    assert_close_rel(next_actual.logits, next_expected.logits, TOL, "BartForCausalLM cached step")


def test_bart_causal_lm_returns_stocks_outputs_with_weights_and_no_encoder_states(tmp_path):
    """Without encoder states stock's cross-attention weights are None before transformers' output recorders
    (4.57, 5.0) and an empty tuple with them, which the tuple output keeps in its place."""
    stock, ours = stock_and_ours("bart", "BartForCausalLM", tmp_path)
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = stock(ids, output_attentions=True, return_dict=False)
        actual = ours(ids, output_attentions=True, return_dict=False)
    assert [type(entry) for entry in actual] == [type(entry) for entry in expected]
    assert_close_rel(actual[0], expected[0], TOL, "logits")
    assert_weights_match(actual[2], expected[2], None, "decoder self-attention")
    assert len(actual) < 4 or actual[3] == expected[3] == ()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_family_auto_map_loads_the_new_heads(family, tmp_path):
    """A checkpoint folder written with the family's auto_map loads our question-answering head."""
    from transformers import AutoModelForQuestionAnswering

    class_name = {"llama": "LlamaForQuestionAnswering", "gpt2": "GPT2ForQuestionAnswering",
                  "bloom": "BloomForQuestionAnswering", "bart": "BartForQuestionAnswering"}[family]
    stock = stock_class(class_name)(family_config(family))
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, family)
    ours = AutoModelForQuestionAnswering.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(ours).__name__ == class_name and type(ours).__module__ != type(stock).__module__


def stock_auto_classes(model_type: str) -> dict:
    """``{auto class: class name}`` for every transformers auto class that maps ``model_type`` to a class."""
    from transformers.models.auto import modeling_auto

    found = {}
    for name, auto in vars(modeling_auto).items():
        names = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        if name.startswith("AutoModel") and isinstance(names, dict) and isinstance(names.get(model_type), str):
            found[auto] = names[model_type]
    return found


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_every_auto_class_that_loads_a_stock_class_loads_ours(family, tmp_path):
    """Every auto class transformers maps the model type to (a pipeline picks one by task: ``fill-mask`` takes
    ``AutoModelForMaskedLM``, which loaded stock BART without a word) loads our class of that name."""
    stock = stock_class(GENERATIVE_CLASSES[family])(family_config(family))
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, family)
    autos = stock_auto_classes(family)
    assert len(autos) >= 5
    for auto, class_name in autos.items():
        ours = auto.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(ours).__name__ == class_name and type(ours).__module__ != type(stock).__module__, auto.__name__


def test_gpt2_cross_attention_matches_stock_with_cache_and_weights(tmp_path):
    """GPT-2 built with ``add_cross_attention`` (the decoder of an ``EncoderDecoderModel``): stock's keys, logits,
    cached decoding steps and cross-attention weights."""
    config = family_config("gpt2", add_cross_attention=True)
    stock, ours = stock_and_ours("gpt2", "GPT2LMHeadModel", tmp_path, config=config)
    assert set(ours.state_dict()) == set(stock.state_dict())
    generator = torch.Generator().manual_seed(11)
    encoder = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
               "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    ids = torch.randint(3, VOCAB, (2, 4), generator=generator)
    step = torch.randint(3, VOCAB, (2, 1), generator=generator)
    with torch.no_grad():
        expected = stock(ids, **encoder, output_attentions=True)
        actual = ours(ids, **encoder, output_attentions=True)
        next_expected = stock(step, past_key_values=expected.past_key_values, **encoder)
        next_actual = ours(step, past_key_values=actual.past_key_values, **encoder)
    assert_close_rel(actual.logits, expected.logits, TOL, "cross-attention logits")
    assert_close_rel(next_actual.logits, next_expected.logits, TOL, "cached step")
    assert_weights_match(actual.cross_attentions, expected.cross_attentions, None, "cross_attentions")


@pytest.mark.parametrize("reentrant", [True, False])
def test_gpt2_cross_attention_trains_under_gradient_checkpointing_like_stock(reentrant, tmp_path):
    """Encoder states that carry gradients (an encoder's outputs) through several checkpointed blocks: reentrant
    checkpointing detaches only positional arguments, so the blocks must take them positionally, as stock's do."""
    config = family_config("gpt2", add_cross_attention=True, n_layer=3)
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    stock, ours = stock_and_ours("gpt2", "GPT2LMHeadModel", tmp_path, config=config)
    generator = torch.Generator().manual_seed(12)
    states = torch.randn(2, 5, 32, generator=generator)
    ids = torch.randint(3, VOCAB, (2, 6), generator=generator)
    results = []
    for model in (stock, ours):
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        encoder_states = states.clone().requires_grad_()
        encoded = torch.tanh(encoder_states)  # a graph before the decoder, as an encoder's
        loss = model(ids, encoder_hidden_states=encoded, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), encoder_states.grad, {n: p.grad for n, p in model.named_parameters()}))
    (expected, expected_states, expected_grads), (actual, actual_states, grads) = results
    assert_close_rel(actual, expected, TOL, "loss")
    assert_close_rel(actual_states, expected_states, TOL, "gradient of the encoder states")
    for name in ("transformer.h.0.crossattention.c_attn.weight", "transformer.h.2.attn.c_attn.weight"):
        assert_close_rel(grads[name], expected_grads[name], TOL, name)


LAYER_STACKS = {"llama": ("LlamaForCausalLM", "model.layers"), "gpt2": ("GPT2LMHeadModel", "transformer.h")}


def layers_of(model, family: str) -> torch.nn.ModuleList:
    return model.get_submodule(LAYER_STACKS[family][1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpointing_function_can_be_patched_and_restored_as_on_stock_layers(family, tmp_path):
    """transformers' gradient-checkpointing tests patch a layer's ``_gradient_checkpointing_func`` with
    ``mock.patch.object`` (set, then delete on exit) and count the recomputed forwards; the layers are
    ``GradientCheckpointingLayer``s, as stock's are."""
    import unittest.mock

    from transformers.modeling_layers import GradientCheckpointingLayer

    _, ours = stock_and_ours(family, LAYER_STACKS[family][0], tmp_path)
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in layers_of(ours, family))
    ours.train()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = layers_of(ours, family)[0]
    original = layer._gradient_checkpointing_func
    inputs = token_inputs(family)
    with unittest.mock.patch.object(layer, "_gradient_checkpointing_func", side_effect=original) as patched:
        ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert patched.call_count == 1
    assert layer._gradient_checkpointing_func is not patched


@pytest.mark.parametrize("checkpointing", ["gradient_checkpointing_enable", "offload_checkpoints"])
def test_gpt2_blocks_checkpoint_like_stock_and_offload(checkpointing, tmp_path):
    """GPT-2's blocks checkpoint themselves (stock's ``gradient_checkpointing_enable``, or our offloaded
    ``config.offload_checkpoints``): each block's attention runs again in backward, and the gradients are the
    plain model's."""
    _, ours = stock_and_ours("gpt2", "GPT2LMHeadModel", tmp_path)
    ours.config.attn_pdrop = ours.config.resid_pdrop = ours.config.embd_pdrop = 0.0
    ours.train()
    inputs = token_inputs("gpt2")

    def loss_gradients_and_block_calls() -> tuple:
        calls = []
        hooks = [block.attn.register_forward_pre_hook(lambda *_: calls.append(1)) for block in ours.transformer.h]
        for module in ours.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        ours.zero_grad()
        loss = ours(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        for hook in hooks:
            hook.remove()
        return loss.detach(), {name: p.grad.clone() for name, p in ours.named_parameters()}, len(calls)

    plain_loss, plain_grads, plain_calls = loss_gradients_and_block_calls()
    if checkpointing == "offload_checkpoints":
        ours.config.offload_checkpoints = True
    else:
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads, calls = loss_gradients_and_block_calls()
    assert plain_calls == 3 and calls == 6, (plain_calls, calls)
    assert_close_rel(loss, plain_loss, TOL, "checkpointed loss")
    for name, grad in grads.items():
        assert_close_rel(grad, plain_grads[name], TOL, f"checkpointed grad {name}")
