"""modeling_gpt2.py against stock transformers GPT-2 with the same weights, loaded as users load it."""

import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from memory_efficient_adapter.families import write_remote_code
from remote_code import assert_close_rel, left_padded_mask, right_padded_mask, save_with_remote_code

CPU_BACKENDS = ["sdpa", "chunked", "eager"]
AUTO_MAP = {
    "AutoModel": "modeling_gpt2.GPT2Model",
    "AutoModelForCausalLM": "modeling_gpt2.GPT2LMHeadModel",
    "AutoModelForSequenceClassification": "modeling_gpt2.GPT2ForSequenceClassification",
}
VOCAB, PAD, EOS = 101, 0, 100
LENGTHS, TOTAL = [13, 8, 11], 13  # odd lengths, one row unpadded


def tiny_config(**overrides) -> GPT2Config:
    settings = dict(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=4,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        initializer_range=0.1,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="eager",  # the stock reference: its sdpa path ignores the scale options on 4.57
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def load_pair(tmp_path, backend=None, stock_class=GPT2LMHeadModel, auto_class=AutoModelForCausalLM, **overrides):
    """A stock model with random weights and ours loaded from its checkpoint through trust_remote_code."""
    stock = stock_class(tiny_config(**overrides)).eval()
    folder = save_with_remote_code(stock, tmp_path / "checkpoint", ["modeling_gpt2.py"], AUTO_MAP)
    ours = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(ours).__module__.startswith("transformers_modules"), type(ours).__module__
    if backend is not None:
        ours.config.attn_backend = backend
    return ours, stock


def kernel_module(model):
    return sys.modules[type(model).__module__]


def random_ids(batch: int = len(LENGTHS), length: int = TOTAL) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (batch, length))  # neither padding nor eos


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels that count only tokens predicted from a real token: a left-padding row sees no key, and there the
    kernels return zeros while stock attends uniformly to masked keys, so its prediction is arbitrary in both."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


def record_attention_calls(monkeypatch, model) -> list:
    """Replace the kernel layer's `attention` in our module with a wrapper that records each call's options."""
    module = kernel_module(model)
    real = module.attention
    calls = []

    def recording(q, k, v, **kwargs):
        calls.append(dict(kwargs, dtype=q.dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module, "attention", recording)
    return calls


def loss_and_grads(model, ids, mask, labels) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_loss_and_grads(actual, expected, tol: float, what: str) -> None:
    (loss_a, grads_a), (loss_e, grads_e) = actual, expected
    assert_close_rel(loss_a, loss_e, tol, f"{what}: loss")
    assert grads_a.keys() == grads_e.keys()
    for name in grads_e:
        assert_close_rel(grads_a[name], grads_e[name], tol, f"{what}: grad of {name}")


# ---------------------------------------------------------------------------------------------
# Structure and checkpoints
# ---------------------------------------------------------------------------------------------


def test_same_state_dict_and_tied_head(tmp_path):
    ours, stock = load_pair(tmp_path)
    assert list(ours.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    assert type(ours.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert ours.transformer.h[0].attn.c_attn.weight.shape == (32, 96)  # Conv1D layout [in, out]


def test_base_model_from_lm_checkpoint(tmp_path):
    ours, stock = load_pair(tmp_path)
    base = AutoModel.from_pretrained(tmp_path / "checkpoint", trust_remote_code=True).eval()
    assert type(base).__name__ == "GPT2Model" and type(base).__module__ == type(ours).__module__
    ids, mask = random_ids(), right_padded_mask(LENGTHS, TOTAL)
    with torch.no_grad():
        got = base(ids, attention_mask=mask).last_hidden_state
        want = stock.transformer(ids, attention_mask=mask).last_hidden_state
    assert_close_rel(got[mask.bool()], want[mask.bool()], 1e-5, "last hidden state")


def test_fresh_init_follows_gpt2_scheme(tmp_path):
    ours, _ = load_pair(tmp_path)
    config = tiny_config(n_embd=128, n_layer=8, initializer_range=0.02)
    model = type(ours)(config)  # our class, initialized from scratch by transformers' post_init
    residual_std = 0.02 / (2 * 8) ** 0.5
    block = model.transformer.h[3]
    for name, weight, std in [
        ("wte", model.transformer.wte.weight, 0.02),
        ("c_attn", block.attn.c_attn.weight, 0.02),
        ("mlp.c_fc", block.mlp.c_fc.weight, 0.02),
        ("attn.c_proj", block.attn.c_proj.weight, residual_std),
        ("mlp.c_proj", block.mlp.c_proj.weight, residual_std),
    ]:
        assert abs(weight.std().item() - std) < 0.05 * std, f"{name}: std {weight.std().item():.5f} != {std:.5f}"
    assert torch.equal(block.attn.c_attn.bias, torch.zeros_like(block.attn.c_attn.bias))
    assert torch.equal(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.skipif(
    transformers.__version__.startswith("5.0."), reason="transformers 5.0 initializes stock GPT-2 in another order"
)
@pytest.mark.parametrize("cross_attention", [False, True])
def test_one_seed_gives_stocks_initial_weights(tmp_path, cross_attention):
    """The residual projections are drawn as stock draws them (a plain draw, then the scaled one), and the
    modules (cross-attention's too) in stock's order, so the state dicts list the same keys in the same order."""
    ours, _ = load_pair(tmp_path)
    config = tiny_config(n_embd=64, n_layer=3, initializer_range=0.02, add_cross_attention=cross_attention)
    torch.manual_seed(8)
    seeded = type(ours)(config)
    torch.manual_seed(8)
    stock = GPT2LMHeadModel(config)
    assert list(seeded.state_dict()) == list(stock.state_dict())
    assert all(torch.equal(tensor, stock.state_dict()[name]) for name, tensor in seeded.state_dict().items())


def test_old_checkpoints_mask_buffers_load_without_a_report(tmp_path):
    """Checkpoints of the original GPT-2 code carry causal-mask buffers (`attn.bias`, `attn.masked_bias`, and the
    cross-attention's): nothing reads them, so the loading report leaves them out (stock reports some of them,
    which ones depending on its version)."""
    stock = GPT2LMHeadModel(tiny_config(add_cross_attention=True))
    state = dict(stock.state_dict())
    for layer in range(stock.config.n_layer):
        for module in ("attn", "crossattention"):
            state[f"transformer.h.{layer}.{module}.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
            state[f"transformer.h.{layer}.{module}.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "old"
    stock.save_pretrained(folder, state_dict=dict(state))  # (it drops the tied head from the dict it gets)
    write_remote_code(folder, "gpt2")
    ours, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert type(ours).__module__.startswith("transformers_modules")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(tensor, state[name]) for name, tensor in ours.state_dict().items())


def test_save_back_into_stock_class(tmp_path):
    ours, stock = load_pair(tmp_path, backend="chunked")
    ours.save_pretrained(tmp_path / "ours")
    reloaded, info = GPT2LMHeadModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for key, value in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    ids = random_ids()
    assert_close_rel(reloaded.eval()(ids).logits, stock(ids).logits, 1e-5, "reloaded stock")


@pytest.mark.skipif(not hasattr(transformers.PreTrainedModel, "prune_heads"), reason="transformers 5 prunes no heads")
def test_pruned_heads_train_save_and_reload_as_stock(tmp_path):
    """transformers 4's ``prune_heads``, and its loading of a checkpoint whose config lists ``pruned_heads``, call
    the base model's ``_prune_heads``, which ours lacked (AttributeError where stock pruned)."""
    ours, stock = load_pair(tmp_path)
    for model in (ours, stock):
        model.prune_heads({0: [1, 2], 1: [0]})
        model.prune_heads({0: [2, 3]})  # head 2 again, and head 3 as numbered before any pruning
    assert [block.attn.num_heads for block in ours.transformer.h] == [1, 3, 4]
    ids, mask = random_ids(), right_padded_mask(LENGTHS, TOTAL)
    labels = labels_for(ids, mask)
    ours.train(), stock.train()
    assert_same_loss_and_grads(
        loss_and_grads(ours, ids, mask, labels), loss_and_grads(stock, ids, mask, labels), 1e-5, "pruned"
    )
    ours.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules"), type(reloaded).__module__
    real = mask.bool()
    with torch.no_grad():
        got, want = reloaded(ids, attention_mask=mask).logits, stock.eval()(ids, attention_mask=mask).logits
    assert_close_rel(got[real], want[real], 1e-5, "reloaded pruned logits")
    prompt = dict(input_ids=ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long))
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(reloaded.generate(**prompt, **settings), stock.generate(**prompt, **settings))


# ---------------------------------------------------------------------------------------------
# Forward, loss and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_padded_batch(tmp_path, backend, padding):
    ours, stock = load_pair(tmp_path, backend)
    ids = random_ids()
    mask = (left_padded_mask if padding == "left" else right_padded_mask)(LENGTHS, TOTAL)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
        want = stock(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert_close_rel(got.logits[real], want.logits[real], 1e-5, "logits")
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    for layer, (a, e) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert_close_rel(a[real], e[real], 1e-5, f"hidden state {layer}")
    with torch.no_grad():
        last = ours(ids, attention_mask=mask, logits_to_keep=1, return_dict=False)
    assert isinstance(last, tuple)
    assert_close_rel(last[0], got.logits[:, -1:], 1e-6, "logits_to_keep=1")


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_and_every_gradient(tmp_path, backend, padding):
    ours, stock = load_pair(tmp_path, backend)
    ours.train(), stock.train()
    ids = random_ids()
    mask = (left_padded_mask if padding == "left" else right_padded_mask)(LENGTHS, TOTAL)
    labels = labels_for(ids, mask)
    assert_same_loss_and_grads(
        loss_and_grads(ours, ids, mask, labels), loss_and_grads(stock, ids, mask, labels), 1e-5, backend
    )


class _EmbeddingLookups(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts index lookups into embedding tables (``aten.embedding``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.embedding.default
        return func(*args, **(kwargs or {}))


def test_default_positions_read_wpe_as_a_slice_with_stocks_gradient(tmp_path):
    """Without position_ids the consecutive positions are a slice of wpe (no index lookup, whose backward sorts
    and scatters), with stock's gradient for wpe; a hooked wpe is called with the positions as stock calls it,
    given position_ids are looked up, and too long an input is refused before any kernel runs."""
    ours, stock = load_pair(tmp_path, "sdpa")
    ours.train(), stock.train()
    ids = random_ids()
    lookups = _EmbeddingLookups()
    with lookups:
        actual = loss_and_grads(ours, ids, None, ids)
    assert lookups.count == 1  # the token embedding only
    assert_same_loss_and_grads(actual, loss_and_grads(stock, ids, None, ids), 1e-5, "slice")
    assert actual[1]["transformer.wpe.weight"][TOTAL:].count_nonzero() == 0
    assert actual[1]["transformer.wpe.weight"][:TOTAL].count_nonzero() > 0

    with lookups, torch.no_grad():
        ours(ids, position_ids=torch.arange(TOTAL)[None] + 3)
    assert lookups.count == 3
    seen = []
    ours.transformer.wpe.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0], torch.arange(TOTAL)[None], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 64\).*needs 70"), torch.no_grad():
        ours.transformer.wpe._forward_hooks.clear()
        ours(random_ids(1, 70))


VARIANTS = {
    "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast": dict(reorder_and_upcast_attn=True),
    "unscaled": dict(scale_attn_weights=False),
    "n_inner_relu": dict(n_inner=48, activation_function="relu"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_config_variants(tmp_path, backend, variant):
    ours, stock = load_pair(tmp_path, backend, **VARIANTS[variant])
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    assert_close_rel(got[mask.bool()], want[mask.bool()], 1e-5, variant)


def test_scale_options_reach_the_kernel(tmp_path, monkeypatch):
    ours, _ = load_pair(tmp_path, "sdpa", scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False)
    calls = record_attention_calls(monkeypatch, ours)
    ours(random_ids())
    assert [call["scale"] for call in calls] == [1.0, 1.0 / 2, 1.0 / 3]
    module = kernel_module(ours)  # no padding: the forward's mask object carries no tensor
    assert all(call["causal"] and module.mask_tensor(call["attention_mask"]) is None for call in calls)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_reorder_and_upcast_runs_eager_in_float32(tmp_path, monkeypatch, backend):
    ours, stock = load_pair(tmp_path, backend, reorder_and_upcast_attn=True)
    ours.to(torch.bfloat16)
    calls = record_attention_calls(monkeypatch, ours)
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = stock(ids, attention_mask=mask).logits
    expected = torch.float32 if backend == "eager" else torch.bfloat16  # fused kernels accumulate in fp32 anyway
    assert [call["dtype"] for call in calls] == [expected] * 3
    assert got.dtype == torch.bfloat16
    assert_close_rel(got[mask.bool()], want[mask.bool()], 2e-2, "bf16 vs fp32 stock")


def test_reorder_and_upcast_holds_when_attention_weights_are_asked_for(tmp_path):
    """Stock upcasts the eager scores to float32 whether or not it returns the weights; ours computed them in the
    model's dtype when they were asked for (bf16: the logits changed by 1e-2; fp16: NaN where scores pass its
    range)."""
    ours, stock = load_pair(tmp_path, "eager", reorder_and_upcast_attn=True)
    ours.to(torch.bfloat16), stock.to(torch.bfloat16)
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask).logits
        weighed, expected = (m(ids, attention_mask=mask, output_attentions=True) for m in (ours, stock))
    kept = mask.bool()
    assert_close_rel(weighed.logits[kept], plain[kept], 1e-5, "logits with the weights asked for")
    for layer, (got, want) in enumerate(zip(weighed.attentions, expected.attentions)):
        assert got.dtype == want.dtype == torch.bfloat16
        rows = kept[:, None, :, None].expand_as(got)  # queries that see a key (padding rows are zeros in ours)
        assert_close_rel(got[rows].float(), want[rows].float(), 1e-2, f"weights of layer {layer}")


def test_reorder_and_upcast_keeps_a_float64_model_in_float64(tmp_path):
    """The upcast cast float64 scores down to float32 (4e-8 off); stock refuses the combination."""
    ours, _ = load_pair(tmp_path, "eager", reorder_and_upcast_attn=True)
    ours.double()
    ids = random_ids()
    with torch.no_grad():
        upcast = ours(ids).logits
        ours.config.reorder_and_upcast_attn = False
        plain = ours(ids).logits
    assert_close_rel(upcast, plain, 1e-12, "float64 logits with reorder_and_upcast_attn")


# ---------------------------------------------------------------------------------------------
# Cache and generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_decode_matches_full_forward(tmp_path, backend):
    ours, stock = load_pair(tmp_path, backend)
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate passes for a left-padded batch
    with torch.no_grad():
        want = stock(ids, attention_mask=mask, position_ids=positions).logits
        cache = None
        # a prefill, a 3-token chunk (q_len < k_len, bottom-right causal), then one token at a time
        bounds = [0, 6, 9, *range(10, TOTAL + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out = ours(
                ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            real = mask[:, start:stop].bool()
            assert_close_rel(out.logits[real], want[:, start:stop][real], 1e-5, f"tokens {start}:{stop}")
    assert cache.get_seq_length() == TOTAL



@pytest.mark.parametrize("cross_attention", [False, True])
def test_a_cache_from_a_shallower_model_is_refused_as_stock_refuses_it(tmp_path, cross_attention):
    """The caches a model builds have one layer per block, as stock's (``DynamicCache(config=...)``): a cache
    left by a one-layer model, given to a deeper one, raised nowhere and its second layer saw no past."""
    shallow, _ = load_pair(tmp_path / "shallow", n_layer=1, add_cross_attention=cross_attention)
    deep, _ = load_pair(tmp_path / "deep", add_cross_attention=cross_attention)
    ids = random_ids()
    encoder = {"encoder_hidden_states": torch.randn(len(LENGTHS), 5, 32)} if cross_attention else {}
    with torch.no_grad():
        cache = shallow(ids, use_cache=True, **encoder).past_key_values
        with pytest.raises(IndexError):
            deep(ids[:, :1], past_key_values=cache, use_cache=True, **encoder)

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_generate_greedy_beam_and_sampling(tmp_path, backend):
    ours, stock = load_pair(tmp_path, backend)
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    ids = ids.masked_fill(mask == 0, PAD)
    settings = {
        "greedy": dict(do_sample=False),
        "beam": dict(do_sample=False, num_beams=3),
        "sampling": dict(do_sample=True, top_k=0, temperature=1.0),
    }
    for name, options in settings.items():
        outputs = []
        for model in (ours, stock):
            torch.manual_seed(1)
            outputs.append(
                model.generate(
                    ids, attention_mask=mask, max_new_tokens=7, pad_token_id=PAD, eos_token_id=EOS, **options
                )
            )
        assert outputs[0].shape[1] > TOTAL
        assert torch.equal(outputs[0], outputs[1]), f"{name}: {outputs[0][:, TOTAL:]} != {outputs[1][:, TOTAL:]}"


def test_generate_with_static_cache(tmp_path):
    # generate builds a 4-D mask for static caches; it reaches the kernel as a mask that already holds causality
    ours, stock = load_pair(tmp_path, "sdpa")
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    ids = ids.masked_fill(mask == 0, PAD)
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    got = ours.generate(ids, cache_implementation="static", **options)
    assert torch.equal(got, stock.generate(ids, **options))


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------


def test_attn_implementation_mapping(tmp_path, monkeypatch):
    stock = GPT2LMHeadModel(tiny_config())
    folder = save_with_remote_code(stock, tmp_path / "checkpoint", ["modeling_gpt2.py"], AUTO_MAP)
    ids = random_ids(1, 5)

    def backends_used(model) -> set:
        calls = record_attention_calls(monkeypatch, model)
        model(ids)
        return {(call["backend"], call["light_softmax"], call["dropout_matmul"]) for call in calls}

    eager = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert backends_used(eager) == {("eager", False, False)}
    sdpa = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa")
    assert backends_used(sdpa) == {("auto", False, False)}
    sdpa.set_attn_implementation("eager")
    assert backends_used(sdpa) == {("eager", False, False)}
    sdpa.config.attn_backend = "chunked"  # ours wins over attn_implementation
    assert backends_used(sdpa) == {("chunked", False, False)}

    config = AutoConfig.from_pretrained(folder)  # from_pretrained hands unknown keywords to __init__, not the config
    config.use_lightsoftmax, config.use_dropmatmul = True, True
    light = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True)
    assert backends_used(light) == {("auto", True, True)}
    monkeypatch.setenv("USE_FLASH_ATTN", "false")  # the original adapter's switch: auto -> eager
    assert backends_used(light) == {("eager", True, True)}
    light.config.use_lightsoftmax = "false"  # read as true before
    with pytest.raises(ValueError, match="config.use_lightsoftmax must be True, False or None, got 'false'"):
        backends_used(light)


# ---------------------------------------------------------------------------------------------
# Dropout and gradient checkpointing
# ---------------------------------------------------------------------------------------------

DROPOUT = dict(attn_pdrop=0.3, resid_pdrop=0.1, embd_pdrop=0.1)


def set_light(model, light: bool) -> None:
    model.config.use_lightsoftmax = light
    model.config.use_dropmatmul = light


def saved_for_backward_bytes(model, ids, mask) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one training forward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, attention_mask=mask)
    return sum(storages.values())


def test_light_eager_path_equals_plain_eager_under_one_seed(tmp_path):
    # On this device F.dropout draws its mask as bernoulli_(1 - p) over a tensor like the input, exactly as the
    # fused dropout-matmul does, so under one seed both paths drop the same entries. Check that premise first.
    probs = torch.rand(2, 4, 7, 7)
    torch.manual_seed(3)
    plain_keep = F.dropout(probs, p=0.3, training=True) != 0
    torch.manual_seed(3)
    fused_keep = torch.empty_like(probs).bernoulli_(0.7).bool()
    assert torch.equal(plain_keep, fused_keep), "RNG premise broken: compare the paths statistically instead"

    ours, _ = load_pair(tmp_path, "eager", **DROPOUT)
    ours.train()
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    labels = labels_for(ids, mask)
    results = {}
    for light in (False, True):
        set_light(ours, light)
        torch.manual_seed(7)
        results[light] = loss_and_grads(ours, ids, mask, labels)
    assert_same_loss_and_grads(results[True], results[False], 1e-5, "light vs plain eager")

    saved = {}
    for light in (False, True):
        set_light(ours, light)
        saved[light] = saved_for_backward_bytes(ours, ids, mask)
    score_bytes = len(LENGTHS) * 4 * TOTAL * TOTAL * 4  # one float32 [batch, heads, q_len, k_len] tensor
    assert saved[False] - saved[True] >= 3 * score_bytes, f"light path keeps {saved[True]} bytes, plain {saved[False]}"

    set_light(ours, False)
    ours.eval()
    with torch.no_grad():
        eval_loss = ours(ids, attention_mask=mask, labels=labels).loss
    assert abs(eval_loss - results[False][0]) > 1e-3, "dropout did not change the training loss"


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "eager", "eager_light"])
def test_attention_dropout_active_only_in_training(tmp_path, backend):
    ours, stock = load_pair(tmp_path, backend.removesuffix("_light"), attn_pdrop=0.5)
    set_light(ours, backend == "eager_light")
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    real = mask.bool()
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    assert_close_rel(got[real], want[real], 1e-5, "eval logits")

    ours.train()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        logits = ours(ids, attention_mask=mask).logits
        runs.append(logits.detach())
    logits.float().pow(2).mean().backward()
    assert torch.equal(runs[0], runs[1]), "training forward is not reproducible under one seed"
    assert (runs[0] - runs[2]).abs().max() > 1e-3, "attention dropout had no effect in training"
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "eager_light"])
def test_gradient_checkpointing_matches_with_dropout(tmp_path, monkeypatch, backend):
    ours, _ = load_pair(tmp_path, backend.removesuffix("_light"), **DROPOUT)
    set_light(ours, backend == "eager_light")
    ours.train()
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    labels = labels_for(ids, mask)
    calls = record_attention_calls(monkeypatch, ours)
    results = {}
    for checkpointing in (False, True):
        if checkpointing:
            ours.gradient_checkpointing_enable()
        calls.clear()
        torch.manual_seed(11)
        results[checkpointing] = loss_and_grads(ours, ids, mask, labels)
        assert len(calls) == 3 * (2 if checkpointing else 1)  # recomputed in backward when checkpointing
    assert_same_loss_and_grads(results[True], results[False], 1e-5, "checkpointed vs not")


# ---------------------------------------------------------------------------------------------
# Sequence classification, flex, GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequence_classification(tmp_path, backend):
    ours, stock = load_pair(
        tmp_path, backend, GPT2ForSequenceClassification, AutoModelForSequenceClassification, num_labels=3
    )
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    ids = ids.masked_fill(mask == 0, PAD)
    labels = torch.tensor([0, 2, 1])
    got, want = ours(ids, attention_mask=mask, labels=labels), stock(ids, attention_mask=mask, labels=labels)
    assert_close_rel(got.logits, want.logits, 1e-5, "pooled logits")
    assert_close_rel(got.loss, want.loss, 1e-5, "loss")


@pytest.mark.slow
def test_flex_inference(tmp_path):
    ours, stock = load_pair(tmp_path, "flex", n_embd=128)  # flex needs head_dim >= 32
    ids, mask = random_ids(), left_padded_mask(LENGTHS, TOTAL)
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    assert_close_rel(got[mask.bool()], want[mask.bool()], 1e-5, "flex")


@pytest.mark.gpu
def test_bf16_cuda_every_backend(tmp_path):
    ours, stock = load_pair(tmp_path, n_embd=128, n_positions=128)  # head_dim 32 suits every kernel
    ours.to("cuda", torch.bfloat16)
    lengths, total = [61, 40, 53], 61
    ids, mask = random_ids(3, total), left_padded_mask(lengths, total)
    with torch.no_grad():
        unpadded = stock(ids).logits
        padded = stock(ids, attention_mask=mask).logits
    ids, mask = ids.cuda(), mask.cuda()
    backends = kernel_module(ours).available_backends("cuda")
    assert {"sdpa", "chunked", "eager"} <= set(backends)
    for backend in backends:
        ours.config.attn_backend = backend
        with torch.no_grad():
            got = ours(ids).logits.float().cpu()
            assert_close_rel(got, unpadded, 2e-2, f"{backend} unpadded")
            if backend == "xformers":  # xformers takes no padding mask
                continue
            got = ours(ids, attention_mask=mask).logits.float().cpu()
            real = mask.bool().cpu()
            assert_close_rel(got[real], padded[real], 2e-2, f"{backend} left-padded")


def test_attention_output_sliced_from_a_longer_bucket_reaches_conv1d(tmp_path, monkeypatch):
    """cuDNN pads the queries to a length bucket and returns a slice of its longer output, so the heads merge into
    a tensor whose batch rows are not adjacent; GPT-2's Conv1D views its input and must still get a layout it can
    view (found on the H200: 61 tokens in a 64-token bucket)."""
    ours, stock = load_pair(tmp_path, "eager")
    kernels = kernel_module(ours)
    run_eager = kernels._RUN["eager"]

    def bucketed(q, k, v, call, *args, **kwargs):
        out = run_eager(q, k, v, call, *args, **kwargs).transpose(1, 2)  # [b, s, h, d]
        longer = F.pad(out, (0, 0, 0, 0, 0, 3)).transpose(1, 2)  # [b, h, s + 3, d], laid out as [b, s + 3, h, d]
        return longer[:, :, : call.q_len]

    monkeypatch.setitem(kernels._RUN, "eager", bucketed)
    ids = random_ids()
    with torch.no_grad():
        got, want = ours(ids).logits, stock(ids).logits
    assert_close_rel(got, want, 1e-5, "logits through a bucket-sliced attention output")


def test_padding_without_an_attention_mask_is_warned_about_as_stock(tmp_path):
    """Stock GPT-2 asks for an attention mask when the ids end or start with the pad token and none is given."""
    import logging

    ours, stock = load_pair(tmp_path)
    ids = random_ids(2, 6)
    ids[1, -2:] = PAD
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings[-1].append(record.getMessage())
    logger = logging.getLogger("transformers")  # which does not propagate to the root logger
    logger.addHandler(handler)
    try:
        for model in (stock, ours):
            logging.Logger.warning_once.cache_clear()  # the same message from either model is logged once a process
            warnings.append([])
            with torch.no_grad():
                model(ids)
    finally:
        logger.removeHandler(handler)
    asked = [[message for message in logged if "attention_mask" in message] for logged in warnings]
    assert len(asked[0]) == 1 and asked[1] == asked[0]


@pytest.mark.parametrize(
    "cross_attention",
    [False, pytest.param(True, marks=pytest.mark.skipif(
        transformers.__version__.startswith(("4.", "5.0.")),
        reason="stock GPT-2 with cross-attention, asked for weights without encoder states, fails on 4.57 and 5.0",
    ))],
)
def test_attention_weights_without_encoder_states_leave_stocks_cross_attention_field(tmp_path, cross_attention):
    """With no encoder states stock gives ``cross_attentions=()`` where the model has cross-attention, or where
    transformers records outputs (5.2x), else None; ours gave None always: tuples one entry short on 5.23."""
    ours, stock = load_pair(tmp_path, add_cross_attention=cross_attention)
    ids = random_ids()
    with torch.no_grad():
        expected = stock(ids, output_attentions=True, return_dict=False)
        actual = ours(ids, output_attentions=True, return_dict=False)
        expected_field = stock(ids, output_attentions=True).cross_attentions
        actual_field = ours(ids, output_attentions=True).cross_attentions
    assert actual_field == expected_field
    assert [type(entry) for entry in actual] == [type(entry) for entry in expected]
    assert_close_rel(actual[0], expected[0], 1e-5, "logits")
