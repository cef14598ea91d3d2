"""What apply_attention_patch / remove_attention_patch keep and undo when patches meet: a patch applied or
removed while another thread runs a patched model, patches of a model and its base model or of two models on
one config, deep copies of patched models, and a patched BLOOM whose config or dropout changes afterwards.

References are stock models with the same weights, as in test_patch.py (whose helpers these tests use).
"""

from __future__ import annotations

import copy
import inspect
import sys

import memory_efficient_adapter as mea
import pytest
import torch
from remote_code import assert_close_rel
from test_patch import (  # noqa: F401  (kernel_calls is a fixture)
    FP32_TOL,
    bloom_module,
    instance_forwards,
    kernel_calls,
    logits,
    model_inputs,
    patch_module,
    tiny_config,
    tiny_stock,
)
from transformers import LlamaForCausalLM


@pytest.fixture(autouse=True)
def _no_class_patch_left_behind():
    yield
    mea.remove_attention_patch()


def base_model(model):
    """The base model inside a causal LM (it reads the same config object)."""
    return model.transformer if hasattr(model, "transformer") else model.model


def twins(model) -> list[str]:
    return [name for name, module in model.named_modules() if patch_module._KERNEL_ATTENTION in module.__dict__]


def assert_stock(model, inputs, reference, implementation, what: str) -> None:
    assert model.config._attn_implementation == implementation, what
    assert instance_forwards(model) == [] and twins(model) == [], what
    assert torch.equal(logits(model, inputs), reference), f"{what}: not stock"


# ----------------------------------------------------------------------------------------------
# Patching in one thread while another runs a patched model
# ----------------------------------------------------------------------------------------------


def test_a_patch_or_removal_between_any_two_lines_of_a_patched_forward_leaves_it_intact():
    """Another thread may patch or unpatch some model between any two lines of patch.py that a patched BLOOM's
    forward runs (its mask function asks whether the model is a patched BLOOM). A trace function does exactly
    that at every such line, deterministically; the forward must still match stock."""
    model = tiny_stock("bloom")
    inputs, compare = model_inputs("bloom", "left")
    reference = logits(model, inputs)
    others = [mea.apply_attention_patch(tiny_stock("llama")) for _ in range(3)]
    churned = tiny_stock("llama")
    mea.apply_attention_patch(model, backend="chunked")
    patch_file, busy, injected = patch_module.__file__, [], []

    def patch_or_unpatch_another_model(frame, event, arg):
        if event == "line" and not busy:
            busy.append(True)
            if churned.config._attn_implementation == "sdpa":
                mea.apply_attention_patch(churned)
            else:
                mea.remove_attention_patch(churned)
            injected.append(True)
            busy.pop()
        return patch_or_unpatch_another_model

    def tracer(frame, event, arg):
        return patch_or_unpatch_another_model if frame.f_code.co_filename == patch_file else None

    sys.settrace(tracer)
    try:
        out = logits(model, inputs)
    finally:
        sys.settrace(None)
    assert len(injected) > 10, "the forward ran too few lines of patch.py to test anything"
    assert_close_rel(out[compare], reference[compare], FP32_TOL, "patched BLOOM with patches changing meanwhile")
    assert all(other.config._attn_implementation == "mea" for other in others)


# ----------------------------------------------------------------------------------------------
# Two patches holding one config (and one BLOOM attention module)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_removed", ["base model", "model"])
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_patches_of_a_model_and_its_base_model_undo_only_when_both_are_removed(family, first_removed, kernel_calls):
    model = tiny_stock(family)
    inputs, compare = model_inputs(family, "left")
    reference = logits(model, inputs)
    implementation = model.config._attn_implementation
    mea.apply_attention_patch(base_model(model), backend="chunked")
    mea.apply_attention_patch(model, backend="chunked")
    order = [base_model(model), model] if first_removed == "base model" else [model, base_model(model)]

    mea.remove_attention_patch(order[0])
    assert model.config._attn_implementation == "mea_chunked", "the other patch still holds the config"
    kernel_calls.clear()
    out = logits(model, inputs)
    assert kernel_calls and {call[0] for call in kernel_calls} == {"chunked"}
    assert_close_rel(out[compare], reference[compare], FP32_TOL, f"{family} still patched once")

    mea.remove_attention_patch(order[1])
    assert_stock(model, inputs, reference, implementation, f"{family} after both removals")


def test_patches_of_two_models_built_on_one_config_undo_only_when_both_are_removed(kernel_calls):
    config = tiny_config("llama")
    first, second = LlamaForCausalLM(config), LlamaForCausalLM(config)
    second.load_state_dict(first.state_dict())
    inputs, _ = model_inputs("llama", "right")
    reference = logits(first.eval(), inputs)
    mea.apply_attention_patch(first)
    mea.apply_attention_patch(second.eval())
    mea.remove_attention_patch(first)
    assert config._attn_implementation == "mea"
    kernel_calls.clear()
    logits(second, inputs)
    assert kernel_calls, "the second model's patch was undone by the first one's removal"
    mea.remove_attention_patch(second)
    for model in (first, second):
        assert_stock(model, inputs, reference, "sdpa", "two models on one config")


# ----------------------------------------------------------------------------------------------
# Deep copies of patched models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_a_deep_copy_of_a_patched_model_is_removed_like_the_original(family, kernel_calls):
    model = tiny_stock(family)
    inputs, compare = model_inputs(family, "left")
    reference = logits(model, inputs)
    implementation = model.config._attn_implementation
    mea.apply_attention_patch(model, backend="chunked")
    duplicate = copy.deepcopy(model)  # e.g. a reference model for DPO, an EMA copy
    kernel_calls.clear()
    out = logits(duplicate, inputs)
    assert kernel_calls, "the copy does not run on the kernel layer"
    assert_close_rel(out[compare], reference[compare], FP32_TOL, f"{family} patched copy")

    mea.remove_attention_patch(duplicate)
    assert_stock(duplicate, inputs, reference, implementation, f"{family} copy after its removal")
    assert model.config._attn_implementation == "mea_chunked", "removing the copy's patch touched the original"
    kernel_calls.clear()
    logits(model, inputs)
    assert kernel_calls
    mea.remove_attention_patch(model)
    assert_stock(model, inputs, reference, implementation, f"{family} original after its removal")


@pytest.mark.parametrize("removal", ["class patch", "the copy"])
def test_a_deep_copy_of_a_model_created_under_the_class_patch_is_removed_like_the_original(removal):
    inputs, _ = model_inputs("llama", "left")
    reference = logits(tiny_stock("llama"), inputs)
    mea.apply_attention_patch()
    model = tiny_stock("llama")
    duplicate = copy.deepcopy(model)
    assert duplicate.config._attn_implementation == "mea"
    if removal == "class patch":
        mea.remove_attention_patch()
        assert_stock(model, inputs, reference, "sdpa", "original after removing the class patch")
    else:
        mea.remove_attention_patch(duplicate)
        assert model.config._attn_implementation == "mea", "removing the copy's switch touched the original"
    assert_stock(duplicate, inputs, reference, "sdpa", f"copy after removing {removal}")


# ----------------------------------------------------------------------------------------------
# A patched BLOOM reads its config and its modules' dropout at every forward
# ----------------------------------------------------------------------------------------------


def test_patched_bloom_reads_the_config_switches_at_every_forward(monkeypatch):
    model = tiny_stock("bloom")
    inputs, compare = model_inputs("bloom", "right")
    reference = logits(model, inputs)
    mea.apply_attention_patch(model, backend="chunked")
    calls = []
    real_attention = bloom_module.attention

    def spy(q, k, v, **kwargs):
        calls.append((kwargs.get("backend"), kwargs.get("chunk_size")))
        return real_attention(q, k, v, **kwargs)

    monkeypatch.setattr(bloom_module, "attention", spy)
    for switches, expected in [
        ({}, ("chunked", None)),
        ({"attn_backend": "eager"}, ("eager", None)),
        ({"attn_backend": None, "attn_chunk_size": [2, 3]}, ("chunked", [2, 3])),
    ]:
        for name, value in switches.items():
            setattr(model.config, name, value)
        calls.clear()
        out = logits(model, inputs)
        assert calls and all(call == expected for call in calls), (switches, calls)
        assert_close_rel(out[compare], reference[compare], FP32_TOL, f"patched BLOOM with {switches}")


def test_patched_bloom_reads_dropout_changed_after_its_first_forward():
    """As TRL's disable_dropout_in_model does: every nn.Dropout's p set to 0 once the model has run (here also
    the residual dropout, a float on BLOOM's modules). Training forwards must then match stock's."""
    stock = tiny_stock("bloom", attention_dropout=0.3, hidden_dropout=0.2).train()
    patched = mea.apply_attention_patch(copy.deepcopy(stock), backend="chunked")
    inputs, compare = model_inputs("bloom", "left")
    for model in (stock, patched):
        model(**inputs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "hidden_dropout"):
                module.hidden_dropout = 0.0
    reference = logits(stock, inputs)
    first, second = logits(patched, inputs), logits(patched, inputs)
    assert torch.equal(first, second), "dropout is still on"
    assert_close_rel(first[compare], reference[compare], FP32_TOL, "training forward without dropout")

    for module in patched.modules():  # and back on: attention dropout applies again
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    assert not torch.equal(logits(patched, inputs), logits(patched, inputs)), "attention dropout stays off"


@pytest.mark.parametrize("setting", ["eval_model", "dropouts_off_in_training", "identity_in_training"])
def test_patched_bloom_lets_its_attention_dropout_module_decide_as_stock(setting):
    """Stock calls ``attention_dropout`` on the weights, so that module's mode and type decide. The patched
    model's twin kept a dropout of its own, in training mode and given only ``p``: it dropped in an eval model and
    where the module alone was set to eval, and failed on an ``nn.Identity`` (no ``p``)."""
    stock = tiny_stock("bloom", attention_dropout=0.5).train(setting != "eval_model")
    for layer in stock.transformer.h:
        if setting == "identity_in_training":
            layer.self_attention.attention_dropout = torch.nn.Identity()
        else:
            layer.self_attention.attention_dropout.eval()
    patched = mea.apply_attention_patch(copy.deepcopy(stock), backend="chunked")
    inputs, compare = model_inputs("bloom", "right")
    reference = logits(stock, inputs)
    first, second = logits(patched, inputs), logits(patched, inputs)
    assert torch.equal(first, second), "attention dropout is on"
    assert_close_rel(first[compare], reference[compare], FP32_TOL, f"patched BLOOM, {setting}")


# ----------------------------------------------------------------------------------------------
# Code outside the attention layers that handles the mask our names make
# ----------------------------------------------------------------------------------------------


def greedy_with_a_static_cache(model, inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_a_static_cache_through_our_names_matches_stock(family):
    """For a static cache ``generate`` makes the mask before each forward: 5.x asks it for ``.contiguous()``,
    4.57 and 5.0 hand it to the model as its ``attention_mask`` (which our mask function then gets back, and
    GPT-2 reshapes where it is not 4-D), up to a last step whose query meets the cache's end. A registry name
    or a patch must give stock's tokens."""
    model = tiny_stock(family).eval()
    inputs, _ = model_inputs(family, "left")
    expected = greedy_with_a_static_cache(model, inputs)
    for name in ("mea", "mea_chunked"):
        model.set_attn_implementation(name)
        assert torch.equal(greedy_with_a_static_cache(model, inputs), expected), name
    model.set_attn_implementation("sdpa")
    mea.apply_attention_patch(model, backend="chunked")
    assert torch.equal(greedy_with_a_static_cache(model, inputs), expected), "patched"


def static_cache_scores(model, inputs) -> tuple:
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0,
                         output_scores=True, output_attentions=True, return_dict_in_generate=True)  # fmt: skip
    return out.scores, out.attentions


@pytest.mark.parametrize("padded", [True, False])
def test_a_patched_bloom_decodes_over_a_static_cache_with_stocks_scores_and_weights(padded):
    """transformers 4.57 and 5.0 static caches write where ``cache_position`` says (4.57's stock BLOOM hands it to
    its attention) and at slot 0 without it: the patched attention passed none, so every decoding step wrote over
    the first key (scores 4e-2 to 1e-1 off from the second step on; tokens of a tiny model still agreed). The
    attention weights span the whole cache, as stock's (they spanned the written slots only), an unpadded
    prompt's too (which 5.23 hands the attention without a mask)."""
    model = tiny_stock("bloom").eval()
    inputs, _ = model_inputs("bloom", "left")
    if not padded:
        inputs = {"input_ids": inputs["input_ids"][:, :9]}
    expected, expected_weights = static_cache_scores(model, inputs)
    mea.apply_attention_patch(model, backend="chunked")
    got, weights = static_cache_scores(model, inputs)
    assert len(got) == len(expected) == 5
    for step, (scores, stock_scores) in enumerate(zip(got, expected)):
        keep = stock_scores.isfinite()
        assert torch.equal(scores.isfinite(), keep), step
        assert_close_rel(scores[keep], stock_scores[keep], FP32_TOL, f"scores of step {step}")
    # a padded prompt's padded queries have no defined weights: its decoding steps (one real query each) only
    for step in range(1 if padded else 0, 5):
        for layer, (layer_weights, stock_layer_weights) in enumerate(zip(weights[step], expected_weights[step])):
            assert_close_rel(layer_weights, stock_layer_weights, FP32_TOL, f"weights of step {step}, layer {layer}")


def test_a_tensor_method_called_on_the_forward_mask_names_the_problem_and_hasattr_still_works():
    """Stock code that treats the mask as a tensor (``attention_mask.to(...)``, ``.masked_fill``) gets an
    AttributeError saying why, as ``hasattr``/``getattr(..., default)`` and copies expect of a missing attribute."""
    forward_mask = patch_module.ForwardMask(torch.tensor([[True, False, True]]))
    for name in ("to", "masked_fill", "is_cuda"):
        with pytest.raises(AttributeError, match=rf"no attribute '{name}': this model reads its attention mask itself"):
            getattr(forward_mask, name)
        assert not hasattr(forward_mask, name)
    with pytest.raises(AttributeError, match=r"no attribute 'not_a_tensor_method'$"):
        forward_mask.not_a_tensor_method
    assert getattr(forward_mask, "_private", "default") == "default"
    without_tensor = patch_module.ForwardMask(None)  # what a forward without a mask hands its layers
    with pytest.raises(AttributeError, match="holds no mask tensor"):
        without_tensor.shape
    copied = copy.deepcopy(forward_mask)
    assert torch.equal(copied.tensor, forward_mask.tensor) and copied.tensor is not forward_mask.tensor


def test_a_model_that_reads_the_mask_or_passes_sparse_indices_is_refused_by_name():
    """DeepSeek-V3.2-style models index the mask for their top-k selector, then hand other attention names the
    selection as ``indices``: both must fail naming the problem, never run dense attention silently."""
    forward_mask = patch_module.ForwardMask(torch.ones(2, 1, 5, 5, dtype=torch.bool))
    assert forward_mask.contiguous().shape == (2, 1, 5, 5)
    assert forward_mask.ndim == 4
    with pytest.raises(TypeError, match="reads its attention mask itself"):
        forward_mask[:, 0]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    indices = torch.randint(0, 5, (1, 5, 2))
    with pytest.raises(NotImplementedError, match="does not take `indices`"):
        ALL_ATTENTION_FUNCTIONS["mea_chunked"](torch.nn.Module(), q, k, v, None, indices=indices)


def test_torch_multihead_attention_in_a_pooling_head_stays_as_it_is():
    """SigLIP's vision pooling head is a plain ``nn.MultiheadAttention``, which no registry name reaches: the
    patch leaves it and patches the encoder's attention, with stock's outputs; removal is exact."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=16, patch_size=8)).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(pixel_values=pixels).pooler_output
        mea.apply_attention_patch(model, backend="chunked")
        assert model.config._attn_implementation == "mea_chunked"
        assert_close_rel(model(pixel_values=pixels).pooler_output, expected, FP32_TOL, "patched SigLIP")
        mea.remove_attention_patch(model)
        assert torch.equal(model(pixel_values=pixels).pooler_output, expected)


def tiny_t5_and_gemma2() -> list:
    """Models whose attention hands the registry what ours refuses: T5's position bias (on 5.x; on 4.57 it
    computes attention itself) and Gemma 2's logit softcapping (set by default)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB_OF_REFUSED, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                             num_heads=4, decoder_start_token_id=0))  # fmt: skip
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB_OF_REFUSED, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8))  # fmt: skip
    return [t5.eval(), gemma2.eval()]


VOCAB_OF_REFUSED = 53


def forward_of(model) -> torch.Tensor:
    ids = torch.randint(3, VOCAB_OF_REFUSED, (2, 7), generator=torch.Generator().manual_seed(3))
    extra = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def test_models_whose_attention_passes_what_ours_refuses_keep_their_own_under_the_class_patch():
    """The no-model patch switched every later model that calls the registry, T5 and Gemma 2 too, which then
    failed at their first forward (``position_bias``, ``softcap``) where stock runs; patching one of them names
    the problem at once instead."""
    expected = [forward_of(model) for model in tiny_t5_and_gemma2()]
    mea.apply_attention_patch()
    try:
        models = tiny_t5_and_gemma2()
        for model, logits_before in zip(models, expected):
            assert not str(model.config._attn_implementation).startswith("mea"), type(model).__name__
            assert torch.equal(forward_of(model), logits_before), type(model).__name__
    finally:
        mea.remove_attention_patch()
    for model in models:
        with pytest.raises(TypeError, match=f"apply_attention_patch does not support {type(model).__name__}"):
            mea.apply_attention_patch(model)


def test_output_attentions_through_our_registry_name_gives_eager_weights():
    """The registry function returned no weights and said nothing (stock sdpa warns); it now computes them."""
    model = tiny_stock("llama").eval()
    inputs, _ = model_inputs("llama", "left")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True).attentions
    model.set_attn_implementation("mea")
    with torch.no_grad():
        got = model(**inputs, output_attentions=True).attentions
    assert len(got) == len(expected) == 2
    for layer, (weights, stock_weights) in enumerate(zip(got, expected)):
        assert weights.shape == stock_weights.shape
        keep = inputs["attention_mask"].bool()
        rows, stock_rows = weights.transpose(1, 2)[keep], stock_weights.transpose(1, 2)[keep]  # kept queries
        assert_close_rel(rows, stock_rows, FP32_TOL, f"weights of layer {layer}")


def test_removing_the_patch_from_a_wrapper_is_refused_as_patching_one_is():
    """Removing through a wrapper (a PEFT model, a container) released nothing and said nothing."""
    model = mea.apply_attention_patch(tiny_stock("llama"), backend="chunked")
    wrapper = torch.nn.ModuleList([model])
    for call in (mea.apply_attention_patch, mea.remove_attention_patch, mea.reverse):
        with pytest.raises(TypeError, match="PreTrainedModel|transformers model that was patched"):
            call(wrapper)
    assert str(model.config._attn_implementation).startswith("mea")
    mea.remove_attention_patch(model)
    assert not str(model.config._attn_implementation).startswith("mea")


def test_a_model_whose_modeling_file_also_has_a_position_bias_attention_is_patched_by_its_own_classes():
    """SeamlessM4T's file holds a conformer attention that passes ``position_bias``; its text-to-text model
    never uses it. The refusal read the whole file and named the text attention, which passes none."""
    from transformers import SeamlessM4TConfig, SeamlessM4TForTextToText

    torch.manual_seed(0)
    config = SeamlessM4TConfig(
        vocab_size=VOCAB_OF_REFUSED, t2u_vocab_size=VOCAB_OF_REFUSED, hidden_size=32, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        speech_encoder_layers=1, speech_encoder_attention_heads=4, speech_encoder_intermediate_size=48,
        t2u_encoder_layers=1, t2u_decoder_layers=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, decoder_start_token_id=3,
    )
    model = SeamlessM4TForTextToText(config).eval()
    expected = forward_of(model)
    if "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(sys.modules[type(model).__module__]):  # before 5.x
        with pytest.raises(TypeError, match="SeamlessM4TAttention neither calls transformers' attention registry"):
            mea.apply_attention_patch(model)
        return
    mea.apply_attention_patch(model, backend="chunked")
    assert model.config._attn_implementation == "mea_chunked"
    assert_close_rel(forward_of(model), expected, FP32_TOL, "patched SeamlessM4T text-to-text")


def eager_only_models() -> dict:
    """Stock models that run on eager attention only, whose code relies on eager's mask: NLLB-MoE (decoder modules
    say ``is_causal=False``; its router reads the mask), Splinter (no ``is_causal`` flag: bidirectional), and
    BigBird-Pegasus (its full encoder attention adds the mask to scores it computes itself)."""
    import transformers as T

    seq2seq = dict(vocab_size=VOCAB_OF_REFUSED, d_model=32, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                   max_position_embeddings=64, pad_token_id=0, decoder_start_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    return {
        "nllb_moe": T.NllbMoeForConditionalGeneration(T.NllbMoeConfig(
            **seq2seq, num_experts=2, expert_capacity=16, encoder_sparse_step=1, decoder_sparse_step=1)),
        "splinter": T.SplinterModel(T.SplinterConfig(
            vocab_size=VOCAB_OF_REFUSED, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=48, pad_token_id=0, question_token_id=5)),
        "bigbird_pegasus": T.BigBirdPegasusModel(T.BigBirdPegasusConfig(**seq2seq, attention_type="original_full")),
    }


@pytest.mark.parametrize("name", ["nllb_moe", "splinter", "bigbird_pegasus"])
@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_models_that_stock_runs_on_eager_only_get_eager_masks_and_stock_outputs(name, backend):
    """Their unpadded calls got no mask, so the kernel took the pattern from the modules' is_causal (NLLB-MoE's
    decoder saw later tokens; Splinter's encoder became causal); padded ones got our keep-masks, which BigBird's
    own attention added to its scores as +1/0 and NLLB-MoE's router read inverted."""
    model = eager_only_models()[name].eval()
    ids = torch.randint(3, VOCAB_OF_REFUSED, (2, 9), generator=torch.Generator().manual_seed(4))
    padded = torch.ones_like(ids)
    padded[1, 6:] = 0
    extra = {"decoder_input_ids": ids[:, :6]} if model.config.is_encoder_decoder else {}
    expected = []
    with torch.no_grad():
        for mask in (None, padded):
            expected.append(model(input_ids=ids, attention_mask=mask, **extra)[0])
        mea.apply_attention_patch(model, backend=backend)
        for mask, stock_output in zip((None, padded), expected):
            output = model(input_ids=ids, attention_mask=mask, **extra)[0]
            kept = (slice(None),) if mask is None or extra else (mask.bool(),)
            assert_close_rel(output[kept], stock_output[kept], FP32_TOL, f"{name}, mask {mask is not None}")


def test_the_class_patch_says_why_a_model_without_the_registry_keeps_its_own_attention(caplog):
    """MPT computes attention itself (its ALiBi ``position_bias`` is its own argument): the log said its attention
    takes a ``position_bias`` the kernel layer refuses, as for T5, whose attention calls the registry."""
    from transformers import MptConfig, MptForCausalLM

    mea.apply_attention_patch()
    try:
        with caplog.at_level("WARNING"):
            model = MptForCausalLM(MptConfig(vocab_size=VOCAB_OF_REFUSED, d_model=32, n_heads=4, n_layers=1))
    finally:
        mea.remove_attention_patch()
    assert not str(model.config._attn_implementation).startswith("mea")
    said = [record.getMessage() for record in caplog.records if "MptForCausalLM" in record.getMessage()]
    assert said and "does not call transformers' attention registry itself" in said[0], said
    assert "position_bias" not in said[0]
