"""modeling_llama.py against stock transformers LLaMA with the same weights, loaded through trust_remote_code.

Runs on transformers 5.x and 4.57.x (configs are built in each version's RoPE format by ``llama_config``).
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from remote_code import (
    TRANSFORMERS_5,
    assert_close_rel,
    left_padded_mask,
    relative_error,
    right_padded_mask,
    save_with_remote_code,
)

CPU_BACKENDS = ["sdpa", "chunked", "eager"]
TOL = 1e-5
VOCAB = 101

LLAMA3_1_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def llama_config(rope: dict | None = None, rope_theta: float = 10000.0, **overrides) -> LlamaConfig:
    """A tiny GQA LLaMA config; ``rope`` is the scaling dict (None = plain RoPE) in this transformers' format."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    if TRANSFORMERS_5:
        kwargs["rope_parameters"] = {"rope_type": "default", **(rope or {}), "rope_theta": rope_theta}
    else:
        kwargs["rope_scaling"] = rope
        kwargs["rope_theta"] = rope_theta
    return LlamaConfig(**kwargs)


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Non-trivial weights everywhere, biases and norm scales included (default init leaves them 0 / 1)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise)


KINDS = {
    "causal": (LlamaForCausalLM, AutoModelForCausalLM, "AutoModelForCausalLM", "LlamaForCausalLM"),
    "seq_cls": (
        LlamaForSequenceClassification,
        AutoModelForSequenceClassification,
        "AutoModelForSequenceClassification",
        "LlamaForSequenceClassification",
    ),
}


def stock_and_folder(tmp_path_factory, config: LlamaConfig, kind: str = "causal", scale: float = 0.1):
    """A randomized stock model, saved with our modeling file beside it."""
    stock_class, _, auto_name, class_name = KINDS[kind]
    stock = stock_class(config).eval()
    randomize_(stock, scale)
    folder = save_with_remote_code(
        stock, tmp_path_factory.mktemp("llama"), ["modeling_llama.py"], {auto_name: f"modeling_llama.{class_name}"}
    )
    return stock, folder


def load_ours(folder, kind: str = "causal", attn_backend: str | None = None, **kwargs):
    """Our class through trust_remote_code. ``attn_backend`` is set on the loaded config: from_pretrained
    hands keys its config class does not define to the model's ``__init__``, not to the config."""
    model = KINDS[kind][1].from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
    if attn_backend is not None:
        model.config.attn_backend = attn_backend
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model).__name__ == KINDS[kind][3]
    return model


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """(stock, folder) for a named config, built once per session."""
    built = {}

    def get(name: str, config_fn, kind: str = "causal"):
        if name not in built:
            built[name] = stock_and_folder(tmp_path_factory, config_fn(), kind)
        return built[name]

    return get


def default_pair(pair):
    return pair("gqa", lambda: llama_config())


def random_ids(batch: int, length: int, generator_seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(generator_seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` derives them: count of real tokens so far, padding parked at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def padded_batch(side: str):
    lengths, total = [13, 9, 4], 13
    mask = (left_padded_mask if side == "left" else right_padded_mask)(lengths, total)
    ids = random_ids(len(lengths), total).masked_fill(mask == 0, 0)
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Forward, loss, gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_and_hidden_states_match_stock(pair, backend, side):
    stock, folder = default_pair(pair)
    ours = load_ours(folder, attn_backend=backend)
    ids, mask = padded_batch(side)
    keep = mask.bool()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        actual = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        as_tuple = ours(input_ids=ids, attention_mask=mask, return_dict=False)
    assert_close_rel(actual.logits[keep], expected.logits[keep], TOL, f"{backend} {side} logits")
    assert len(actual.hidden_states) == len(expected.hidden_states) == stock.config.num_hidden_layers + 1
    for layer, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        assert_close_rel(a[keep], e[keep], TOL, f"hidden state {layer}")
    assert torch.equal(as_tuple[0], actual.logits)


@pytest.mark.slow
def test_flex_logits_match_stock_on_cpu(pair):
    """flex_attention compiles on first use (~20 s on a CPU), so it gets one inference-only check here."""
    stock, folder = pair("head_dim_32", lambda: llama_config(hidden_size=128))  # flex needs head_dim >= 32
    ours = load_ours(folder, attn_backend="flex")
    ids, mask = padded_batch("left")
    keep = mask.bool()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        actual = ours(input_ids=ids, attention_mask=mask).logits
    assert_close_rel(actual[keep], expected[keep], TOL, "flex logits")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_and_every_gradient_match_stock(pair, backend):
    stock, folder = pair("biases", lambda: llama_config(attention_bias=True, mlp_bias=True))
    ours = load_ours(folder, attn_backend=backend).train()
    stock.train()
    ids, mask = padded_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (stock, ours):
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (stock_loss, stock_grads), (our_loss, our_grads) = results
    assert_close_rel(our_loss, stock_loss, TOL, "loss")
    assert our_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        assert grad is not None and our_grads[name] is not None, name
        assert_close_rel(our_grads[name], grad, 1e-4, f"grad {name}")
    stock.eval()


def test_gradient_checkpointing_gives_the_same_gradients(pair):
    stock, folder = default_pair(pair)
    ours = load_ours(folder, attn_backend="chunked").train()
    ids, mask = padded_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:  # renamed activation_checkpointing_enable in transformers 5.x
            enable = getattr(ours, "activation_checkpointing_enable", ours.gradient_checkpointing_enable)
            enable()
            assert all(layer.gradient_checkpointing for layer in ours.model.layers)
        ours.zero_grad()
        ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in ours.named_parameters()})
    for name, grad in grads[0].items():
        assert_close_rel(grads[1][name], grad, TOL, f"checkpointed grad {name}")


# ----------------------------------------------------------------------------------------------
# Generation and the KV cache
# ----------------------------------------------------------------------------------------------


GENERATION_CASES = [(b, mode) for mode in ("greedy", "beam") for b in CPU_BACKENDS] + [("sdpa", "sample")]


@pytest.mark.parametrize("backend,mode", GENERATION_CASES)
def test_generate_matches_stock_token_for_token(pair, backend, mode):
    stock, folder = default_pair(pair)
    ours = load_ours(folder, attn_backend=backend)
    ids, mask = padded_batch("left")
    options = {
        "greedy": dict(do_sample=False),
        "beam": dict(do_sample=False, num_beams=3),
        "sample": dict(do_sample=True, top_k=0, temperature=1.0),
    }[mode]
    outputs = []
    for model in (stock, ours):
        torch.manual_seed(7)
        outputs.append(
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=9, min_new_tokens=9, pad_token_id=0, **options
            )
        )
    assert outputs[0].shape == (ids.shape[0], ids.shape[1] + 9)
    assert torch.equal(outputs[1], outputs[0]), f"{mode} generation differs:\n{outputs[1]}\n{outputs[0]}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_decode_step_by_step_matches_full_forward(pair, backend):
    stock, folder = default_pair(pair)
    ours = load_ours(folder, attn_backend=backend)
    ids, mask = padded_batch("left")
    positions = positions_from_mask(mask)
    prefill = 6
    with torch.no_grad():
        full = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(
            input_ids=ids[:, :prefill],
            attention_mask=mask[:, :prefill],
            position_ids=positions[:, :prefill],
            use_cache=True,
        )
        cache = out.past_key_values
        assert cache.get_seq_length() == prefill
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = ours(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    decoded = torch.cat(steps, dim=1)
    keep = mask.bool()
    assert_close_rel(decoded[keep], full[keep], TOL, f"{backend} cached decode")


# ----------------------------------------------------------------------------------------------
# Checkpoints and configurations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_our_checkpoint_loads_into_the_stock_class(pair, tmp_path, tied):
    stock, folder = pair(f"tied={tied}", lambda: llama_config(tie_word_embeddings=tied))
    ours = load_ours(folder)
    assert (ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()) == tied
    ours.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LlamaForCausalLM
    ours_state, stock_state, reloaded_state = ours.state_dict(), stock.state_dict(), reloaded.state_dict()
    assert ours_state.keys() == stock_state.keys() == reloaded_state.keys()
    for name, tensor in stock_state.items():
        assert torch.equal(ours_state[name], tensor), name
        assert torch.equal(reloaded_state[name], tensor), name
    ids, mask = padded_batch("left")
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids=ids, attention_mask=mask).logits, stock(input_ids=ids, attention_mask=mask).logits
        )


VARIANTS = {
    "mha": lambda: llama_config(num_key_value_heads=4),
    "mqa": lambda: llama_config(num_key_value_heads=1),
    "head_dim_24": lambda: llama_config(head_dim=24),
    "biases": lambda: llama_config(attention_bias=True, mlp_bias=True),
    "tied": lambda: llama_config(tie_word_embeddings=True),
    "llama3_theta": lambda: llama_config(rope_theta=500000.0),
    "llama3.1": lambda: llama_config(rope=LLAMA3_1_ROPE, rope_theta=500000.0),
    "linear": lambda: llama_config(rope={"rope_type": "linear", "factor": 2.0}),
    "dynamic": lambda: llama_config(rope={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "longrope": lambda: longrope_config(),
}


LONGROPE_SHORT, LONGROPE_LONG = [1.0 + 0.1 * i for i in range(8)], [2.0 + 0.5 * i for i in range(8)]


def longrope_config() -> LlamaConfig:
    """LongRoPE past its original length 8 (long factors from 9 tokens on): transformers 5 keeps the original length
    in ``rope_parameters``, 4.x at the config's top level."""
    factors = {"rope_type": "longrope", "short_factor": LONGROPE_SHORT, "long_factor": LONGROPE_LONG}
    if TRANSFORMERS_5:
        return llama_config(rope={**factors, "original_max_position_embeddings": 8}, max_position_embeddings=64)
    return llama_config(rope=factors, max_position_embeddings=64, original_max_position_embeddings=8)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_stock(pair, variant):
    stock, folder = pair(variant, VARIANTS[variant])
    ours = load_ours(folder)
    lengths, total = [23, 17, 10], 23  # longer than the dynamic variant's max_position_embeddings (16)
    mask = left_padded_mask(lengths, total)
    ids = random_ids(len(lengths), total, 3).masked_fill(mask == 0, 0)
    positions = positions_from_mask(mask)
    keep = mask.bool()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert_close_rel(actual[keep], expected[keep], TOL, variant)


@pytest.mark.parametrize("variant", ["llama3_theta", "llama3.1", "linear", "dynamic", "longrope"])
def test_rope_variant_changes_the_logits(pair, variant):
    """Guards the variant tests: plain RoPE on the same weights must give clearly different logits."""
    stock, _ = pair(variant, VARIANTS[variant])
    plain = LlamaForCausalLM(llama_config(max_position_embeddings=stock.config.max_position_embeddings)).eval()
    plain.load_state_dict(stock.state_dict())
    ids = random_ids(1, 23, 3)
    with torch.no_grad():
        assert relative_error(plain(input_ids=ids).logits, stock(input_ids=ids).logits) > 1e-3


@pytest.mark.parametrize("variant", ["llama3_theta", "llama3.1", "linear", "dynamic", "longrope"])
def test_a_config_written_by_transformers_5_runs_its_rope_on_every_version(tmp_path_factory, variant):
    """transformers 5 writes RoPE as ``rope_parameters`` only. On 4.57 ours failed to load a scaled one (4.x's init
    functions read ``rope_scaling``, None there) and stock runs plain RoPE; ours now runs the checkpoint's RoPE,
    that of the stock model built from the same settings in this version's format. LongRoPE's original length,
    nested there, failed to load on 4.57 (or, with a ``factor``, ran another scaling)."""
    import json

    stock, folder = stock_and_folder(tmp_path_factory, VARIANTS[variant]())
    saved = json.loads((folder / "config.json").read_text())
    theta = saved.pop("rope_theta", None) or 10000.0  # 4.x's keys, folded into 5.x's one dict
    params = {"rope_type": "default", "rope_theta": theta, **(saved.pop("rope_scaling", None) or {})}
    params.update(saved.pop("rope_parameters", None) or {})
    params["rope_type"] = params.pop("type", params["rope_type"])
    if saved.get("original_max_position_embeddings"):  # 4.x's LongRoPE keeps it at the top level
        params["original_max_position_embeddings"] = saved.pop("original_max_position_embeddings")
    (folder / "config.json").write_text(json.dumps({**saved, "rope_parameters": params}))
    ours = load_ours(folder)
    ids = random_ids(2, 23, 4)
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids).logits, stock(input_ids=ids).logits, TOL, variant)


@pytest.mark.parametrize("given", [{"factor": 4.0}, {}, {"attention_factor": 1.2}])
def test_longrope_as_transformers_5_writes_it_runs_its_tables_on_every_version(tmp_path_factory, given):
    """A LongRoPE config in transformers 5's format (original length 8 in ``rope_parameters``, max 64): short
    factors up to 8 positions, long ones past them, cos/sin scaled by the given ``attention_factor``, else by
    ``sqrt(1 + ln(factor) / ln(8))`` with the given factor, else 64 / 8. Against a float64 reference of that rule.
    On 4.57 ours failed to load it without a factor; with one it scaled by 64 / 8."""
    import json
    import math

    _, folder = stock_and_folder(tmp_path_factory, VARIANTS["longrope"]())
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("rope_scaling", None), saved.pop("original_max_position_embeddings", None)
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": LONGROPE_SHORT,
              "long_factor": LONGROPE_LONG, "original_max_position_embeddings": 8, **given}  # fmt: skip
    (folder / "config.json").write_text(json.dumps({**saved, "rope_parameters": params}))
    rotary = load_ours(folder).model.rotary_emb
    factor = given.get("factor", 64 / 8)
    scaling = given.get("attention_factor", math.sqrt(1 + math.log(factor) / math.log(8)))
    for length, factors in ((6, LONGROPE_SHORT), (23, LONGROPE_LONG)):
        positions = torch.arange(length)[None]
        exponents = torch.arange(0, 16, 2, dtype=torch.float64) / 16
        angles = positions[0, :, None].double() / (torch.tensor(factors, dtype=torch.float64) * 10000.0**exponents)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = rotary(torch.ones(1, dtype=torch.float32), positions)
        assert_close_rel(cos[0].double(), angles.cos() * scaling, 1e-6, f"cos at {length} positions")
        assert_close_rel(sin[0].double(), angles.sin() * scaling, 1e-6, f"sin at {length} positions")


def test_dynamic_ntk_generation_past_max_position_embeddings_matches_stock(tmp_path_factory):
    """The prompt fits max_position_embeddings (16); decoding goes past it, re-deriving the base each step."""
    stock, folder = stock_and_folder(tmp_path_factory, VARIANTS["dynamic"]())
    ours = load_ours(folder)
    ids, mask = padded_batch("left")
    generated = [
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0
        )
        for model in (stock, ours)
    ]
    assert ids.shape[1] < 16 < generated[0].shape[1]
    assert torch.equal(generated[1], generated[0])


def test_dynamic_ntk_state_across_calls_matches_stock(tmp_path_factory):
    """Past max_position_embeddings (16) the base follows the longest call so far, also for a shorter call
    that is still too long; a call that fits resets it (transformers' own update rule, so 5.0 keeps its quirk)."""
    stock, folder = stock_and_folder(tmp_path_factory, VARIANTS["dynamic"]())
    ours = load_ours(folder)
    with torch.no_grad():
        for length in (26, 20, 9, 19):
            ids = random_ids(2, length, length)
            assert_close_rel(ours(input_ids=ids).logits, stock(input_ids=ids).logits, TOL, f"length {length}")


# ----------------------------------------------------------------------------------------------
# Masks beyond padding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_user_4d_mask_is_passed_through(pair, kind):
    stock, folder = default_pair(pair)
    ours = load_ours(folder)
    ids, mask = padded_batch("left")
    length = ids.shape[1]
    generator = torch.Generator().manual_seed(5)
    holes = torch.rand(ids.shape[0], 1, length, length, generator=generator) < 0.3
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[-5:, -5:] = True  # a bidirectional block: a 4-D mask replaces causal masking, as in transformers
    visible = allowed & mask.bool()[:, None, None, :] & ~holes
    visible |= torch.eye(length, dtype=torch.bool)  # every query sees at least itself
    mask_4d = (
        visible if kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    )
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask_4d).logits
        actual = ours(input_ids=ids, attention_mask=mask_4d).logits
        causal_only = ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close_rel(actual[keep], expected[keep], TOL, f"{kind} 4-D mask")
    assert relative_error(causal_only[keep], expected[keep]) > 1e-3  # the holes matter


def test_packed_sequences_without_mask_match_stock(pair):
    stock, folder = default_pair(pair)
    ours = load_ours(folder)
    lengths = [5, 7, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = random_ids(1, positions.shape[1], 11)
    with torch.no_grad():
        expected = stock(input_ids=ids, position_ids=positions, use_cache=False).logits
        actual = ours(input_ids=ids, position_ids=positions, use_cache=False).logits
        separate = torch.cat(
            [ours(input_ids=chunk, use_cache=False).logits for chunk in ids.split(lengths, dim=1)], dim=1
        )
    assert_close_rel(actual, expected, TOL, "packed")
    assert_close_rel(actual, separate, TOL, "packed vs one at a time")


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


def record_kernel_calls(model, monkeypatch) -> list:
    """(backend the model requested, backend the kernel layer ran) for every attention call of ``model``."""
    module = sys.modules[type(model).__module__]
    calls, requested = [], []
    original_attention, original_run = module.attention, module._run

    def attention(*args, backend="auto", **kwargs):
        requested.append(backend)
        return original_attention(*args, backend=backend, **kwargs)

    def run(name, *args, **kwargs):  # every call runs its backend (the choice is made once per forward)
        calls.append((requested[-1], name))
        return original_run(name, *args, **kwargs)

    monkeypatch.setattr(module, "attention", attention)
    monkeypatch.setattr(module, "_run", run)
    return calls


def run_and_collect(model, calls: list) -> set:
    calls.clear()
    with torch.no_grad():
        model(input_ids=random_ids(2, 7))
    assert len(calls) == model.config.num_hidden_layers
    return set(calls)


def test_attn_implementation_and_overrides_pick_the_kernel(pair, monkeypatch):
    _, folder = default_pair(pair)
    eager = load_ours(folder, attn_implementation="eager")
    assert run_and_collect(eager, record_kernel_calls(eager, monkeypatch)) == {("eager", "eager")}

    sdpa = load_ours(folder, attn_implementation="sdpa")
    calls = record_kernel_calls(sdpa, monkeypatch)
    assert run_and_collect(sdpa, calls) == {("auto", "sdpa")}
    sdpa.set_attn_implementation("eager")  # read per forward, not frozen at init
    assert run_and_collect(sdpa, calls) == {("eager", "eager")}

    chunked = load_ours(folder, attn_implementation="eager", attn_backend="chunked")  # ours wins
    assert run_and_collect(chunked, record_kernel_calls(chunked, monkeypatch)) == {("chunked", "chunked")}

    default = load_ours(folder)
    calls = record_kernel_calls(default, monkeypatch)
    monkeypatch.setenv("USE_FLASH_ATTN", "false")
    assert run_and_collect(default, calls) == {("eager", "eager")}  # the model applies USE_FLASH_ATTN itself


# ----------------------------------------------------------------------------------------------
# Sequence classification
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification_matches_stock(pair, side):
    stock, folder = pair("seq_cls", lambda: llama_config(num_labels=3), kind="seq_cls")
    ours = load_ours(folder, kind="seq_cls")
    assert ours.state_dict().keys() == stock.state_dict().keys()
    ids, mask = padded_batch(side)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, labels=labels)
        actual = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert actual.logits.shape == (3, 3)
    assert_close_rel(actual.logits, expected.logits, TOL, f"{side} pooled logits")
    assert_close_rel(actual.loss, expected.loss, TOL, "loss")


# ----------------------------------------------------------------------------------------------
# GPU (run on the GPU machine)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_bf16_cuda_every_backend_matches_fp32_stock(tmp_path_factory):
    config = llama_config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rope=LLAMA3_1_ROPE, rope_theta=500000.0,
    )  # fmt: skip
    # weights at 0.03: bf16 rounding alone then moves the stock model's logits by ~1%, at 0.1 by ~6%
    stock, folder = stock_and_folder(tmp_path_factory, config, scale=0.03)
    stock = stock.cuda()
    ours = load_ours(folder).to("cuda", torch.bfloat16)
    module = sys.modules[type(ours).__module__]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (3, 301), generator=generator).cuda()
    unpadded, padded = torch.ones_like(ids), left_padded_mask([301, 250, 77], 301).cuda()
    with torch.no_grad():
        references = {
            name: stock(input_ids=ids, attention_mask=m).logits
            for name, m in (("unpadded", unpadded), ("padded", padded))
        }
    rejected = []
    for backend in module.available_backends():
        ours.config.attn_backend = backend
        for name, mask in (("unpadded", unpadded), ("padded", padded)):
            try:
                with torch.no_grad():
                    logits = ours(input_ids=ids, attention_mask=mask).logits
            except ValueError as error:
                if name == "padded" and "cannot take this call" in str(error):
                    rejected.append(backend)  # e.g. a kernel without padding masks
                    continue
                raise
            keep = mask.bool()
            assert_close_rel(logits[keep].float(), references[name][keep], 2e-2, f"{backend} {name} bf16")
    assert "sdpa" not in rejected and len(rejected) < len(module.available_backends())
