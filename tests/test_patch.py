"""apply_attention_patch / remove_attention_patch on stock transformers models, and the "mea" registry names.

References are the stock models themselves with the same weights (their default attention, or eager). A spy
on the kernel layer proves that patched models really run through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import memory_efficient_adapter as mea
import pytest
import torch
from remote_code import TRANSFORMERS_5, assert_close_rel, left_padded_mask, right_padded_mask
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

patch_module = importlib.import_module("memory_efficient_adapter.patch")
bloom_module = importlib.import_module("memory_efficient_adapter.modeling_bloom")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
VOCAB = 97
FP32_TOL = 1e-5
FAMILIES = ["llama", "gpt2", "bloom", "bart"]


# ----------------------------------------------------------------------------------------------
# Tiny stock models and inputs
# ----------------------------------------------------------------------------------------------


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
    if family == "bloom":
        return BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    return BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
    )  # fmt: skip


STOCK_CLASSES = {
    "llama": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "bloom": BloomForCausalLM,
    "bart": BartForConditionalGeneration,
}


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere (default init leaves biases at 0 and norm scales at 1)."""
    generator = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def tiny_stock(family: str, **config_overrides) -> PreTrainedModel:
    config = tiny_config(family)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return randomize_(STOCK_CLASSES[family](config))


def model_inputs(family: str, padding: str) -> tuple[dict, torch.Tensor]:
    """Random ids with padding on one side (odd lengths) and the keep-mask of the positions to compare."""
    generator = torch.Generator().manual_seed(7)
    make_mask = left_padded_mask if padding == "left" else right_padded_mask
    ids = torch.randint(3, VOCAB, (3, 11), generator=generator)
    mask = make_mask([11, 7, 4], 11)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "bart":
        decoder_mask = make_mask([9, 6, 3], 9)
        inputs.update(decoder_input_ids=ids[:, :9].flip(1), decoder_attention_mask=decoder_mask)
        return inputs, decoder_mask.bool()
    return inputs, mask.bool()


def builds_masks_through_registry(model_class: type) -> bool:
    """Whether this transformers version's model asks the mask registry for its masks (then ours are O(n)).

    Older versions of some models (BART and BLOOM on 4.57, BLOOM on 5.0) build 4-D masks themselves; the
    kernel layer still gets a correct mask, just not the linear form.
    """
    return "_update_causal_mask" not in inspect.getsource(sys.modules[model_class.__module__])


def causal_mask(config, embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """``create_causal_mask`` across versions (4.57 and 5.0 name the embeddings differently and need positions)."""
    parameters = inspect.signature(create_causal_mask).parameters
    embeds_name = "inputs_embeds" if "inputs_embeds" in parameters else "input_embeds"
    if "cache_position" in parameters:
        kwargs["cache_position"] = torch.arange(embeds.shape[1])
    return create_causal_mask(
        config=config, attention_mask=attention_mask, past_key_values=None, **{embeds_name: embeds}, **kwargs
    )


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records each kernel-layer call made by patch.py: (backend, causal, mask shape or None, alibi)."""
    calls = []

    def spy_on(real_attention):
        def spy(q, k, v, **kwargs):
            mask = getattr(kwargs.get("attention_mask"), "tensor", kwargs.get("attention_mask"))  # a ForwardMask's
            calls.append(
                (kwargs.get("backend"), kwargs.get("causal"), None if mask is None else tuple(mask.shape),
                 kwargs.get("alibi_slopes") is not None)
            )  # fmt: skip
            return real_attention(q, k, v, **kwargs)

        return spy

    monkeypatch.setattr(patch_module, "attention", spy_on(patch_module.attention))
    # patched BLOOM runs modeling_bloom's attention module, on that file's copy of the kernel layer
    monkeypatch.setattr(bloom_module, "attention", spy_on(bloom_module.attention))
    return calls


@pytest.fixture(autouse=True)
def _no_class_patch_left_behind():
    yield
    mea.remove_attention_patch()


def instance_forwards(model) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


def backends_for(family: str) -> list[str]:
    # sdpa cannot take ALiBi (BLOOM) without a materialized bias, by design of the kernel layer
    return ["auto", "chunked", "eager"] + ([] if family == "bloom" else ["sdpa"])


# ----------------------------------------------------------------------------------------------
# Instance patch: round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_matches_stock_and_removal_restores_it_bit_for_bit(family, padding, kernel_calls):
    model = tiny_stock(family)
    inputs, compare = model_inputs(family, padding)
    reference = logits(model, inputs)
    implementation = model.config._attn_implementation
    state = {name: (tensor.data_ptr(), tensor.clone()) for name, tensor in model.state_dict().items()}

    for backend in backends_for(family):
        kernel_calls.clear()
        assert mea.apply_attention_patch(model, backend=backend) is model
        patched = logits(model, inputs)
        assert kernel_calls, f"{family}/{backend}: the patched model never called the kernel layer"
        assert {call[0] for call in kernel_calls} == {backend}
        assert all(call[3] == (family == "bloom") for call in kernel_calls), "ALiBi slopes only (and always) for BLOOM"
        assert_close_rel(patched[compare], reference[compare], FP32_TOL, f"{family}/{backend}/{padding}")

        mea.remove_attention_patch(model)
        assert torch.equal(logits(model, inputs), reference), f"{family}/{backend}: not stock after removal"
        assert model.config._attn_implementation == implementation
        assert instance_forwards(model) == []

    after = model.state_dict()
    assert list(after) == list(state)
    for name, (pointer, values) in state.items():
        assert after[name].data_ptr() == pointer and torch.equal(after[name], values), name


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_generation_with_cache_matches_stock(family, kernel_calls):
    """Left-padded greedy decoding: prefill + one-token steps against the growing cache (BART: padded encoder)."""
    model = tiny_stock(family)
    inputs, _ = model_inputs(family, "left")
    inputs = {key: value for key, value in inputs.items() if not key.startswith("decoder_")}
    settings = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        stock = model.generate(**inputs, **settings, pad_token_id=0)
        mea.apply_attention_patch(model, backend="chunked")
        patched = model.generate(**inputs, **settings, pad_token_id=0)
    padded_calls = [call for call in kernel_calls if family != "bart" or not call[1]]  # BART's decoder is unpadded
    assert padded_calls and all(call[2] is not None for call in padded_calls), "the padding never reached the kernel"
    if builds_masks_through_registry(type(model)):
        assert all(len(call[2]) == 2 for call in padded_calls), "padding must reach the kernel as [b, k_len] masks"
    assert torch.equal(patched.sequences, stock.sequences)
    for step, (ours, theirs) in enumerate(zip(patched.logits, stock.logits)):
        assert_close_rel(ours, theirs, FP32_TOL, f"{family} step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_after_removal_writes_the_stock_checkpoint(family, tmp_path):
    model = tiny_stock(family)
    inputs, _ = model_inputs(family, "left")
    model.save_pretrained(tmp_path / "before")
    mea.apply_attention_patch(model)
    logits(model, inputs)
    mea.remove_attention_patch(model)
    model.save_pretrained(tmp_path / "after")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes(), name
    reloaded = STOCK_CLASSES[family].from_pretrained(tmp_path / "after").eval()
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_patching_twice_replaces_the_backend_and_one_removal_restores(kernel_calls):
    model = tiny_stock("llama")
    inputs, _ = model_inputs("llama", "left")
    reference = logits(model, inputs)
    mea.apply_attention_patch(model, backend="eager")
    mea.apply_attention_patch(model, backend="chunked")
    kernel_calls.clear()
    logits(model, inputs)
    assert {call[0] for call in kernel_calls} == {"chunked"}
    assert model.config._attn_implementation == "mea_chunked"
    mea.remove_attention_patch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, inputs), reference)


def test_unsupported_models_get_an_error_naming_the_class():
    gptj = GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=32))
    with pytest.raises(TypeError, match="GPTJForCausalLM.*GPTJAttention"):
        mea.apply_attention_patch(gptj)
    assert gptj.config._attn_implementation != "mea"
    with pytest.raises(TypeError, match="Linear"):
        mea.apply_attention_patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown attention backend"):
        mea.apply_attention_patch(tiny_stock("llama"), backend="turbo")


@pytest.mark.parametrize(
    "families, error, message",
    [("llama", TypeError, "list of family names.*'llama'"), (["lama"], ValueError, "unknown model family 'lama'")],
)
def test_class_patch_refuses_families_it_cannot_read(families, error, message):
    with pytest.raises(error, match=message):
        mea.apply_attention_patch(families=families)
    assert tiny_stock("llama").config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------
# Class-level patch
# ----------------------------------------------------------------------------------------------


def test_class_patch_switches_models_created_afterwards_and_removal_reverts_them(kernel_calls):
    stock = {family: tiny_stock(family) for family in FAMILIES}
    inputs = {family: model_inputs(family, "left") for family in FAMILIES}
    reference = {family: logits(stock[family], inputs[family][0]) for family in FAMILIES}
    original_check = PreTrainedModel.__dict__["_check_and_adjust_attn_implementation"]
    original_bloom_forward = patch_module._bloom_attention_class().__dict__["forward"]

    mea.apply_attention_patch(backend="chunked")
    created = {family: tiny_stock(family) for family in FAMILIES}
    explicit_eager = LlamaForCausalLM._from_config(tiny_config("llama"), attn_implementation="eager")
    assert explicit_eager.config._attn_implementation == "eager"
    assert stock["llama"].config._attn_implementation == "sdpa", "models created before the patch keep theirs"
    for family in FAMILIES:
        assert created[family].config._attn_implementation == "mea_chunked"
        assert instance_forwards(created[family]) == []
        kernel_calls.clear()
        out = logits(created[family], inputs[family][0])
        assert kernel_calls and {call[0] for call in kernel_calls} == {"chunked"}, family
        compare = inputs[family][1]
        assert_close_rel(out[compare], reference[family][compare], FP32_TOL, f"class patch {family}")

    mea.remove_attention_patch()
    assert PreTrainedModel.__dict__["_check_and_adjust_attn_implementation"] is original_check
    assert patch_module._bloom_attention_class().__dict__["forward"] is original_bloom_forward
    for family in FAMILIES:
        assert created[family].config._attn_implementation == stock[family].config._attn_implementation
        assert torch.equal(logits(created[family], inputs[family][0]), reference[family]), family
    assert tiny_stock("llama").config._attn_implementation == "sdpa"


def test_class_patch_removal_reverts_the_config_of_a_model_already_collected():
    """The switch lives on the config, which the caller keeps after the model is gone."""
    import gc

    config = tiny_config("llama")
    mea.apply_attention_patch()
    model = LlamaForCausalLM(config)
    assert config._attn_implementation == "mea"
    del model
    gc.collect()
    mea.remove_attention_patch()
    assert config._attn_implementation == "sdpa"
    assert LlamaForCausalLM(config).config._attn_implementation == "sdpa"


def test_class_patch_then_instance_removal_reverts_that_model_only():
    mea.apply_attention_patch()
    first, second = tiny_stock("gpt2"), tiny_stock("gpt2")
    mea.remove_attention_patch(first)
    assert first.config._attn_implementation == "sdpa"
    assert second.config._attn_implementation == "mea"


# ----------------------------------------------------------------------------------------------
# The registry: attn_implementation="mea" / "mea_<backend>" through from_pretrained
# ----------------------------------------------------------------------------------------------


def test_every_name_is_registered_with_a_mask_function():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    names = mea.register_attention_backends()
    assert names == ["mea"] + [f"mea_{backend}" for backend in mea.BACKENDS]
    for name in names:
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert ALL_MASK_ATTENTION_FUNCTIONS[name] is patch_module.kernel_layer_mask


@pytest.mark.parametrize("name", ["mea", "mea_chunked"])
@pytest.mark.parametrize("family", ["llama", "bart"])
def test_from_pretrained_with_registered_name_handles_padding(family, name, tmp_path, kernel_calls):
    tiny_stock(family).save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    eager = auto.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = auto.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert ours.config._attn_implementation == name

    # left padding shifts BART's absolute learned positions, so it gets right padding; LLaMA's RoPE does not care
    inputs, compare = model_inputs(family, "right" if family == "bart" else "left")
    kernel_calls.clear()
    out = logits(ours, inputs)
    assert kernel_calls, "the registered function was not called"
    # The padded batch must reach the kernel as an O(n) keep-mask, not as None (transformers' default for
    # names without a mask function) and not as a [b, 1, q, k] mask.
    mask_shapes = {call[2] for call in kernel_calls}
    assert None not in mask_shapes
    if builds_masks_through_registry(type(ours)):
        assert all(len(shape) == 2 or shape[-2] == 1 for shape in mask_shapes), mask_shapes
    assert_close_rel(out[compare], logits(eager, inputs)[compare], FP32_TOL, f"{family}/{name} vs eager")

    # Row 2 alone, unpadded, gives the same logits at its real positions ...
    keep = compare[2]
    alone = {"input_ids": inputs["input_ids"][2][inputs["attention_mask"][2].bool()][None]}
    if family == "bart":
        alone["decoder_input_ids"] = inputs["decoder_input_ids"][2][keep][None]
    assert_close_rel(logits(ours, alone)[0], out[2][keep], FP32_TOL, f"{family}/{name} padded vs alone")
    # ... while ignoring the padding changes them: the mask really is applied.
    unmasked = {key: value for key, value in inputs.items() if "attention_mask" not in key}
    assert (logits(ours, unmasked)[2][keep] - out[2][keep]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mea", "mea_chunked"])
def test_registered_names_read_the_config_at_every_call_as_our_files_do(name, tmp_path, monkeypatch):
    """``config.attn_backend`` (source 1 of the selection rule) beats the registered name's backend (source 2),
    and ``config.attn_chunk_size`` reaches the chunked backend, read at every call."""
    tiny_stock("llama").save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    seen = []
    run_chunked = patch_module.attention.__globals__["_RUN"]["chunked"]
    monkeypatch.setitem(patch_module.attention.__globals__["_RUN"], "chunked",
                        lambda *args, **kwargs: seen.append(kwargs.get("chunk_size")) or run_chunked(*args, **kwargs))
    inputs, _ = model_inputs("llama", "left")
    ours.config.attn_chunk_size = [3, 5]
    ours.config.attn_backend = "chunked"
    logits(ours, inputs)
    assert seen and set(seen) == {(3, 5)}
    seen.clear()
    ours.config.attn_backend = "eager"
    logits(ours, inputs)
    assert not seen


def test_mask_function_returns_linear_masks_for_plain_patterns_and_4d_otherwise():
    config = tiny_config("llama")
    config._attn_implementation = "mea"
    embeds = torch.zeros(2, 5, 8)
    padded = left_padded_mask([5, 3], 5)
    mask = causal_mask(config, embeds, padded)  # made once per forward: in a ForwardMask for every layer
    assert isinstance(mask, mea.ForwardMask) and mask.dtype == torch.bool and torch.equal(mask.tensor, padded.bool())
    assert causal_mask(config, embeds, torch.ones(2, 5, dtype=torch.long)) is None
    # an overlay (here: nothing past position 3) is not a plain pattern: the full 4-D mask comes back
    overlay = causal_mask(config, embeds, padded, and_mask_function=lambda b, h, q, kv: kv < 3)
    assert isinstance(overlay, mea.ForwardMask) and overlay.shape == (2, 1, 5, 5)
    assert not overlay.tensor[0, 0, 4, 3] and overlay.tensor[0, 0, 4, 2]


@pytest.mark.parametrize("value_head_dim", [12, 24])
def test_patched_model_with_another_value_head_size_matches_stock(value_head_dim):
    """Multi-head latent attention (DeepSeek-V3): values narrower or wider than queries and keys (16)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=VOCAB, hidden_size=48, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=value_head_dim, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    stock = randomize_(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    patched = randomize_(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    patched.load_state_dict(stock.state_dict())
    mea.apply_attention_patch(patched, backend="chunked")
    inputs, compare = model_inputs("llama", "left")
    outputs = []
    for model in (stock, patched):
        out = model(**inputs).logits
        out[compare].square().mean().backward()
        outputs.append(out[compare].detach())
    assert_close_rel(outputs[1], outputs[0], FP32_TOL, "logits")
    for (name, ours), theirs in zip(patched.named_parameters(), stock.parameters()):
        if theirs.grad is not None:
            assert_close_rel(ours.grad, theirs.grad, FP32_TOL, name)


def test_attention_function_refuses_what_it_cannot_compute():
    function = ALL_ATTENTION_FUNCTIONS["mea"]
    q = torch.randn(1, 2, 3, 8)
    output, weights = function(torch.nn.Module(), q, q, q, None, scaling=0.5)
    assert output.shape == (1, 3, 2, 8) and weights is None
    with pytest.raises(NotImplementedError, match="softcap.*this model's own attention"):
        function(torch.nn.Module(), q, q, q, None, softcap=30.0)


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------

BF16_TOL = 3e-2


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_patched_model_trains_under_bf16_autocast(family, kernel_calls):
    """The bf16 training path of train.py: under autocast LLaMA's rotary embedding hands over float32 q/k
    beside a bfloat16 v; the kernel gets them in the autocast dtype, as SDPA would, and stays close to fp32."""
    model = tiny_stock(family).train()
    inputs, compare = model_inputs(family, "left")
    with torch.no_grad():
        reference = model(**inputs).logits
    mea.apply_attention_patch(model, backend="chunked")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, use_cache=False).logits  # (a cache would store v in k's dtype and hide the mix)
    out.float()[compare].square().mean().backward()
    assert kernel_calls
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
    assert_close_rel(out.float()[compare].detach(), reference[compare], BF16_TOL, f"{family} bf16 autocast")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_in_bf16_on_gpu_matches_fp32_stock(family, kernel_calls):
    model = tiny_stock(family)
    inputs, compare = model_inputs(family, "left")
    reference = logits(model, inputs)
    model = model.to("cuda", torch.bfloat16)
    mea.apply_attention_patch(model)
    out = logits(model, {key: value.cuda() for key, value in inputs.items()}).float().cpu()
    assert kernel_calls and {call[0] for call in kernel_calls} == {"auto"}
    assert_close_rel(out[compare], reference[compare], BF16_TOL, f"{family} bf16 cuda")
    mea.remove_attention_patch(model)


# ----------------------------------------------------------------------------------------------
# Every registry name on every family it reaches (issue 14): right, or run by the model's own attention
# ----------------------------------------------------------------------------------------------

CPU_NAMES = ["mea"] + [f"mea_{b}" for b in mea.available_backends("cpu") if b != "flex"]  # flex: minutes to compile


def family_model(family: str, folder, **kwargs):
    auto = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    return auto.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("name", CPU_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_registry_names_match_eager_unpadded_and_padded_on_every_family(family, name, tmp_path):
    """Stock BLOOM computes attention itself: its mask must then be the one its own code reads (it used to
    get our O(n) forms and run non-causal without padding, and crash with padding)."""
    tiny_stock(family).save_pretrained(tmp_path)
    if family == "bloom" and "sdpa" in name and TRANSFORMERS_5:  # 5.x refuses names with "sdpa" on BLOOM
        with pytest.raises(ValueError, match="BloomForCausalLM does not support"):
            family_model(family, tmp_path, attn_implementation=name)
        return
    eager = family_model(family, tmp_path, attn_implementation="eager")
    ours = family_model(family, tmp_path, attn_implementation=name)
    assert ours.config._attn_implementation == name
    for padding in ("none", "left", "right"):
        inputs, compare = model_inputs(family, "left" if padding == "left" else "right")
        if padding == "none":
            inputs = {key: value for key, value in inputs.items() if "attention_mask" not in key}
            compare = torch.ones_like(compare)
        out = logits(ours, inputs)
        assert_close_rel(out[compare], logits(eager, inputs)[compare], FP32_TOL, f"{family}/{name}/{padding}")
    # causal: changing only the last (decoder) token leaves every earlier position's logits unchanged
    inputs, _ = model_inputs(family, "right")
    inputs = {key: value for key, value in inputs.items() if "attention_mask" not in key}
    changed = dict(inputs)
    last = "decoder_input_ids" if family == "bart" else "input_ids"
    changed[last] = inputs[last].clone()
    changed[last][:, -1] = (changed[last][:, -1] + 1) % VOCAB
    before, after = logits(ours, inputs), logits(ours, changed)
    assert torch.equal(before[:, :-1], after[:, :-1]) and not torch.equal(before[:, -1], after[:, -1])


def test_unpatched_stock_bloom_with_our_name_runs_its_own_attention(kernel_calls, tmp_path):
    tiny_stock("bloom").save_pretrained(tmp_path)
    model = family_model("bloom", tmp_path, attn_implementation="mea")
    inputs, _ = model_inputs("bloom", "left")
    logits(model, inputs)
    assert kernel_calls == []  # no registry call in BLOOM: its attention is its own until patched
    mea.apply_attention_patch(model, backend="chunked")
    logits(model, inputs)
    assert kernel_calls and all(call[2] is not None for call in kernel_calls)
    if builds_masks_through_registry(type(model)):
        assert all(len(call[2]) == 2 for call in kernel_calls), "patched: the O(n) keep-mask again"


# ----------------------------------------------------------------------------------------------
# BLOOM's patch runs modeling_bloom.py's attention module: one code path
# ----------------------------------------------------------------------------------------------


def test_patched_bloom_runs_the_modeling_file_attention_module(monkeypatch):
    """A change to modeling_bloom.BloomAttention.forward shows in the patched stock model: no second copy."""
    model = tiny_stock("bloom")
    inputs, compare = model_inputs("bloom", "left")
    mea.apply_attention_patch(model, backend="chunked")
    patched = logits(model, inputs)
    real_forward = bloom_module.BloomAttention.forward
    calls = []

    def changed_forward(self, hidden_states, residual, **kwargs):
        calls.append(kwargs["backend"])
        output, weights = real_forward(self, hidden_states, residual, **kwargs)
        return output * 2.0, weights

    monkeypatch.setattr(bloom_module.BloomAttention, "forward", changed_forward)
    doubled = logits(model, inputs)
    assert calls == ["chunked"] * model.config.n_layer
    assert (doubled[compare] - patched[compare]).abs().max() > 1e-3
    monkeypatch.setattr(bloom_module.BloomAttention, "forward", real_forward)
    assert torch.equal(logits(model, inputs), patched)


def test_bloom_patch_shares_the_weights_and_leaves_no_trace(kernel_calls):
    model = tiny_stock("bloom").train()
    inputs, compare = model_inputs("bloom", "left")
    keys = list(model.state_dict())
    mea.apply_attention_patch(model, backend="chunked")
    logits_train = model(**inputs).logits
    logits_train[compare].square().mean().backward()
    attention = model.transformer.h[0].self_attention
    twin = attention.__dict__[patch_module._KERNEL_ATTENTION]
    assert twin.query_key_value is attention.query_key_value and twin.dense is attention.dense
    assert twin.training and attention.query_key_value.weight.grad is not None
    assert list(model.state_dict()) == keys
    mea.remove_attention_patch(model)
    assert all(patch_module._KERNEL_ATTENTION not in m.__dict__ for m in model.modules())


def test_patched_bloom_runs_adapters_added_after_its_first_forward():
    """PEFT (or a quantizer) swapping ``query_key_value`` after a forward reaches the kernel-layer attention."""
    from peft import LoraConfig, get_peft_model

    model = tiny_stock("bloom")
    reference = tiny_stock("bloom")
    reference.load_state_dict(model.state_dict())
    inputs, compare = model_inputs("bloom", "right")
    mea.apply_attention_patch(model, backend="chunked")
    with torch.no_grad():
        model(**inputs)
    adapters = LoraConfig(r=4, target_modules=["query_key_value", "dense"], init_lora_weights=False)
    peft_models = []
    for stock in (model, reference):
        torch.manual_seed(5)
        peft_models.append(get_peft_model(stock, LoraConfig(**adapters.to_dict())).train())
    outputs = []
    for peft_model in peft_models:
        out = peft_model(**inputs).logits
        out[compare].square().mean().backward()
        outputs.append(out[compare].detach())
    assert_close_rel(outputs[0], outputs[1], FP32_TOL, "logits with LoRA")
    named = [dict(m.named_parameters()) for m in peft_models]
    lora = [name for name in named[1] if "lora_" in name]
    assert lora
    for name in lora:
        assert named[0][name].grad is not None, name
        assert_close_rel(named[0][name].grad, named[1][name].grad, FP32_TOL, name)


# ----------------------------------------------------------------------------------------------
# The seeds' own interfaces: models.<family>.flash_attn_patch, USE_FLASH_ATTN, BetterTransformer
# ----------------------------------------------------------------------------------------------


def seed_module(family: str):
    return importlib.import_module(f"memory_efficient_adapter.models.{family}.flash_attn_patch")


@pytest.mark.parametrize("family", ["llama", "bloom", "bart"])
def test_seed_module_patches_its_family_only(family, kernel_calls):
    """``apply_attention_patch()`` of models.<family>: that family's models created afterwards run on the
    kernel layer and match stock; another family's do not change."""
    other = "gpt2"
    inputs, compare = model_inputs(family, "left")
    reference = logits(tiny_stock(family), inputs)
    seed_module(family).apply_attention_patch()
    created, bystander = tiny_stock(family), tiny_stock(other)
    kernel_calls.clear()
    out = logits(created, inputs)
    assert kernel_calls and {call[0] for call in kernel_calls} == {"auto"}
    assert_close_rel(out[compare], reference[compare], FP32_TOL, f"seed {family}")
    assert bystander.config._attn_implementation == "sdpa"
    kernel_calls.clear()
    logits(bystander, model_inputs(other, "left")[0])
    assert kernel_calls == []
    seed_module(family).remove_attention_patch()
    assert torch.equal(logits(created, inputs), reference)


def test_seed_modules_add_up_and_take_a_model_or_a_backend(kernel_calls):
    seed_module("llama").apply_attention_patch(backend="chunked")
    seed_module("bart").apply_attention_patch(backend="chunked")  # same backend: LLaMA stays patched too
    llama, bart, gpt2 = tiny_stock("llama"), tiny_stock("bart"), tiny_stock("gpt2")
    assert (llama.config._attn_implementation, bart.config._attn_implementation) == ("mea_chunked",) * 2
    assert gpt2.config._attn_implementation == "sdpa"
    mea.remove_attention_patch()
    assert seed_module("bloom").apply_attention_patch(gpt2, backend="eager") is gpt2  # a model: that model
    assert gpt2.config._attn_implementation == "mea_eager"


def test_seed_qwen_module_switches_our_qwen_created_afterwards(tmp_path):
    from memory_efficient_adapter import families
    from memory_efficient_adapter.configuration_qwen import QWenConfig
    from transformers import AutoConfig

    config = QWenConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
        intermediate_size=128, max_position_embeddings=64, seq_length=64, fp32=True,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    families.write_remote_code(tmp_path, "qwen")
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    seed_module("qwen").apply_attention_patch(backend="chunked")
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    assert model.config._attn_implementation == "mea_chunked"
    assert sys.modules[type(model).__module__].backend_from_config(model.config) == "chunked"
    mea.remove_attention_patch()
    assert model.config._attn_implementation != "mea_chunked"


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_use_flash_attn_reaches_models_patched_through_the_seed_module(family, monkeypatch):
    """``export USE_FLASH_ATTN=...``, read at every call as in the original adapter: false = eager."""
    inputs, compare = model_inputs(family, "left")
    reference = logits(tiny_stock(family), inputs)
    seed_module(family).apply_attention_patch()
    model = tiny_stock(family)
    chosen = []
    kernel_layer = bloom_module if family == "bloom" else importlib.import_module("memory_efficient_adapter.attention")
    real_select = kernel_layer.select_backend

    def spy(call, backend="auto"):
        chosen.append(real_select(call, backend))
        return chosen[-1]

    monkeypatch.setattr(kernel_layer, "select_backend", spy)
    for value, expected in (("true", None), ("false", "eager"), ("chunked", "chunked")):
        monkeypatch.setenv("USE_FLASH_ATTN", value)
        chosen.clear()
        out = logits(model, inputs)
        assert chosen and (expected is None or set(chosen) == {expected}), (value, chosen)
        assert_close_rel(out[compare], reference[compare], FP32_TOL, f"{family} USE_FLASH_ATTN={value}")
    monkeypatch.setenv("USE_FLASH_ATTN", "fastest")
    with pytest.raises(ValueError, match="USE_FLASH_ATTN"):
        logits(model, inputs)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_transform_keep_original_model_patches_a_copy_and_reverse_restores_it(family, kernel_calls):
    model = tiny_stock(family)
    inputs, compare = model_inputs(family, "left")
    reference = logits(model, inputs)
    implementation = model.config._attn_implementation
    transformed = mea.BetterTransformer.transform(model, keep_original_model=True)
    assert transformed is not model and type(transformed) is type(model)
    kernel_calls.clear()
    assert torch.equal(logits(model, inputs), reference) and kernel_calls == [], "the original was touched"
    assert instance_forwards(model) == [] and model.config._attn_implementation == implementation
    out = logits(transformed, inputs)
    assert kernel_calls, "the copy does not run on the kernel layer"
    assert_close_rel(out[compare], reference[compare], FP32_TOL, f"{family} transformed copy")
    first = next(transformed.parameters())
    assert first.data_ptr() != next(model.parameters()).data_ptr(), "the copy shares the original's weights"

    assert mea.BetterTransformer.reverse(transformed) is transformed
    assert torch.equal(logits(transformed, inputs), reference)
    assert instance_forwards(transformed) == [] and transformed.config._attn_implementation == implementation
    assert mea.transform(model) is model and kernel_calls  # without keep_original_model: in place
    mea.reverse(model)
    assert torch.equal(logits(model, inputs), reference)


def test_transform_of_a_patched_model_keeps_the_copy_reversible():
    model = mea.apply_attention_patch(tiny_stock("bloom"), backend="chunked")
    inputs, _ = model_inputs("bloom", "left")
    copy_ = mea.transform(model, keep_original_model=True, backend="eager")
    assert copy_.config._attn_implementation == "mea_eager" and model.config._attn_implementation == "mea_chunked"
    mea.reverse(copy_)
    assert copy_.config._attn_implementation == "eager" and instance_forwards(copy_) == []
    mea.reverse(model)
    assert torch.equal(logits(copy_, inputs), logits(model, inputs))


def test_train_py_takes_the_bare_use_flash_attn_flag_of_the_original_scripts():
    spec = importlib.util.spec_from_file_location("mea_train_script", SCRIPTS / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    common = ["--tiny-config", "llama", "--synthetic", "--output-dir", "/tmp/unused"]
    assert train.parse_args(common + ["--use_flash_attn"]).use_flash_attn == "true"
    assert train.parse_args(common + ["--use_flash_attn", "chunked"]).use_flash_attn == "chunked"
    assert train.parse_args(common).use_flash_attn is None


def test_patched_bloom_returns_attention_weights_like_stock():
    model = tiny_stock("bloom")
    inputs, compare = model_inputs("bloom", "left")
    with torch.no_grad():
        stock = model(**inputs, output_attentions=True).attentions
        mea.apply_attention_patch(model, backend="chunked")
        ours = model(**inputs, output_attentions=True).attentions
    assert len(ours) == len(stock) == model.config.n_layer
    rows = compare[:, None, :, None].expand_as(stock[0])  # padded query rows differ by convention
    for layer, (theirs, mine) in enumerate(zip(stock, ours)):
        assert_close_rel(mine[rows], theirs[rows], FP32_TOL, f"layer {layer} attention weights")
