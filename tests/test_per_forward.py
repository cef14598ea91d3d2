"""Work done once per forward, not once per layer: a packed row's block mask, document index and varlen layout
(LLaMA, GPT-2 and Qwen, whose layers take the forward's ``ForwardMask`` even without an attention mask), with the
results still those of the documents run one by one."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from tests.remote_code import assert_close_rel

DOCUMENT_LENGTHS = [6, 11, 1, 9]  # one row of 27 tokens
LAYERS = 3
FAMILIES = ["llama", "gpt2", "qwen"]
_LOADED: dict = {}


def _configs() -> dict:
    """head_dim 32 (flex takes no smaller); seq_length above every document, so Qwen uses no NTK or logn here."""
    from transformers import GPT2Config, LlamaConfig

    from memory_efficient_adapter.configuration_qwen import QWenConfig

    common = dict(vocab_size=61, use_cache=False)
    return {
        "llama": (LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64, **common), "LlamaForCausalLM"),
        "gpt2": (GPT2Config(n_embd=64, n_layer=LAYERS, n_head=2, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                            embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common), "GPT2LMHeadModel"),
        "qwen": (QWenConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, kv_channels=32,
                            intermediate_size=96, seq_length=64, max_position_embeddings=64, fp32=True, **common),
                 "QWenLMHeadModel"),
    }


def load_ours(family: str, tmp_path_factory):
    """Our model (random weights, saved, loaded back with trust_remote_code) and the module its code runs in."""
    if family not in _LOADED:
        import transformers

        from memory_efficient_adapter import modeling_gpt2, modeling_llama, modeling_qwen
        from memory_efficient_adapter.families import write_remote_code

        modules = {"llama": modeling_llama, "gpt2": modeling_gpt2, "qwen": modeling_qwen}
        config, class_name = _configs()[family]
        torch.manual_seed(0)
        model = getattr(modules[family], class_name)(config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.2)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        write_remote_code(folder, family)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(loaded).__module__.startswith("transformers_modules")
        _LOADED[family] = loaded
    model = _LOADED[family]
    model.config.attn_backend = None
    return model, sys.modules[type(model).__module__]


def packed_row(form: str):
    ids = torch.randint(0, 61, (1, sum(DOCUMENT_LENGTHS)))
    if form == "position_ids":
        return ids, {"position_ids": torch.cat([torch.arange(n) for n in DOCUMENT_LENGTHS])[None]}
    cu = F.pad(torch.tensor(DOCUMENT_LENGTHS).cumsum(0), (1, 0))
    return ids, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}


def counting(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def documents_alone(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=part).logits for part in ids.split(DOCUMENT_LENGTHS, dim=1)], dim=1)


def summed_loss_and_grads(model, ids, **packing):
    """The packed row's summed next-token loss inside each document (train mode, logits kept) and its gradients;
    without ``packing``, the same summed over the documents run alone."""
    model.train()
    model.config.keep_logits_in_training = True
    model.zero_grad(set_to_none=True)
    parts = [(ids, packing)] if packing else [(part, {}) for part in ids.split(DOCUMENT_LENGTHS, dim=1)]
    total = 0.0
    for part, extra in parts:
        logits = model(input_ids=part, **extra).logits[0].float()
        targets = part[0, 1:].clone()
        if packing:  # a document's first token is not predicted from the one before it
            targets[torch.tensor(DOCUMENT_LENGTHS).cumsum(0)[:-1] - 1] = -100
        total = total + F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum")
    total.backward()
    model.config.keep_logits_in_training = False
    return total.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_packed_row_builds_its_flex_block_mask_once_per_forward(family, form, monkeypatch, tmp_path_factory):
    model, module = load_ours(family, tmp_path_factory)
    model.eval()
    # flex runs uncompiled (its eager math) so that the test needs no compiler; the block mask is the same
    monkeypatch.setattr(module, "_flex_function", lambda static: module._flex_with_dynamic_shapes)
    built = counting(monkeypatch, module, "_banded_block_mask")
    ids, packing = packed_row(form)
    expected = documents_alone(model, ids)
    model.config.attn_backend = "flex"
    with torch.no_grad():
        logits = model(input_ids=ids, **packing).logits
    assert len(built) == 1, f"{len(built)} block masks built for one forward of {LAYERS} layers"
    assert_close_rel(logits, expected, 1e-5, "packed row on flex against its documents run alone")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_finds_its_documents_once_per_forward(family, monkeypatch, tmp_path_factory):
    """auto on the CPU runs a packed row on the chunked backend, which needs each token's document index."""
    model, module = load_ours(family, tmp_path_factory)
    ids, packing = packed_row("position_ids")
    expected_loss, expected_grads = summed_loss_and_grads(model, ids)
    indexed = counting(monkeypatch, module, "_document_index")
    loss, grads = summed_loss_and_grads(model, ids, **packing)
    assert len(indexed) == 1, f"document index computed {len(indexed)} times in one forward of {LAYERS} layers"
    assert_close_rel(loss, expected_loss, 1e-5, "summed loss")
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close_rel(grads[name], expected_grads[name], 1e-5, f"grad {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_lays_out_its_varlen_segments_once_per_forward(family, monkeypatch, tmp_path_factory):
    """The varlen path (CUDA's nested-tensor sdpa), here with a stand-in kernel that runs flash-attention's
    varlen contract segment by segment: its layout reads the segment lengths on the host, once per forward."""
    model, module = load_ours(family, tmp_path_factory)

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        pieces = []
        for start, stop in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            segment = [x[start:stop].transpose(0, 1)[None] for x in (q, k, v)]
            out = F.scaled_dot_product_attention(*segment, is_causal=causal, scale=softmax_scale, enable_gqa=True)
            pieces.append(out[0].transpose(0, 1))
        return torch.cat(pieces)

    ids, packing = packed_row("cu_seq_lens")
    expected_loss, expected_grads = summed_loss_and_grads(model, ids)
    monkeypatch.setattr(module, "_sdpa_varlen", stand_in)
    monkeypatch.setattr(module, "_sdpa_needs_dense_mask", lambda call: None)
    laid_out = counting(monkeypatch, module, "_ragged_layout")
    model.config.attn_backend = "sdpa"
    loss, grads = summed_loss_and_grads(model, ids, **packing)
    assert len(laid_out) == 1, f"varlen layout worked out {len(laid_out)} times in one forward of {LAYERS} layers"
    assert_close_rel(loss, expected_loss, 1e-5, "summed loss")
    for name in grads:
        assert_close_rel(grads[name], expected_grads[name], 1e-5, f"grad {name}")


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a tensor's value back on the host (on CUDA each one waits for the device)."""

    READING = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique_consecutive", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.READING):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_training_step_reads_the_host_once_per_forward_not_per_layer(family, monkeypatch, tmp_path_factory):
    """The varlen path's layout reads the segment lengths back (two host reads); a training step of a packed row
    does that once, whatever the number of layers. The stand-in kernel takes its segments from the known
    document lengths, so it reads nothing itself."""
    model, module = load_ours(family, tmp_path_factory)
    bounds = torch.tensor([0, *DOCUMENT_LENGTHS]).cumsum(0).tolist()

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        pieces = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            segment = [x[start:stop].transpose(0, 1)[None] for x in (q, k, v)]
            out = F.scaled_dot_product_attention(*segment, is_causal=causal, scale=softmax_scale, enable_gqa=True)
            pieces.append(out[0].transpose(0, 1))
        return torch.cat(pieces)

    ids, packing = packed_row("position_ids")
    expected_loss, _ = summed_loss_and_grads(model, ids)
    monkeypatch.setattr(module, "_sdpa_varlen", stand_in)
    monkeypatch.setattr(module, "_sdpa_needs_dense_mask", lambda call: None)
    model.config.attn_backend = "sdpa"
    with _HostReads() as reads:
        loss, _ = summed_loss_and_grads(model, ids, **packing)
    assert sorted(reads.found) == ["aten._local_scalar_dense.default", "aten.unique_consecutive.default"], reads.found
    assert_close_rel(loss, expected_loss, 1e-5, "summed loss")


# ----------------------------------------------------------------------------------------------
# Host work per call: described and dispatched once per forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_calls_of_a_forward_are_described_and_dispatched_once(family, monkeypatch, tmp_path_factory):
    """Every layer makes the same call: its checks, the backend choice and the config's attention options are
    worked out once per training step, with results bit-identical to working them out in every layer."""
    model, module = load_ours(family, tmp_path_factory)
    ids = torch.randint(0, 61, (2, 19))
    described = counting(monkeypatch, module, "_describe")
    selected = counting(monkeypatch, module, "select_backend")
    config_reads, reading = [], module.backend_from_config

    def backend_from_config(config=None, *args):
        if config is not None:
            config_reads.append(1)
        return reading(config, *args)

    monkeypatch.setattr(module, "backend_from_config", backend_from_config)
    loss, grads = _loss_and_grads(model, ids)
    assert (len(described), len(selected)) == (1, 1), f"{len(described)} descriptions for {LAYERS} layers"
    reads = len(config_reads)
    monkeypatch.setattr(module, "_once_per_forward", lambda holder, slot, inputs, compute: compute())
    reference_loss, reference_grads = _loss_and_grads(model, ids)
    assert len(described) == 1 + LAYERS  # the reference did describe every call
    assert len(config_reads) - reads == reads + LAYERS - 1  # the config's attention options: once, not per layer
    assert torch.equal(loss, reference_loss)
    for name in grads:
        assert torch.equal(grads[name], reference_grads[name]), name


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_a_later_call_with_other_inputs_is_checked_again():
    """What is kept per forward is kept for calls of the same shapes and options only: a later call that differs
    (a layer's bad input) is described, checked and refused as without the store."""
    from memory_efficient_adapter import attention, forward_mask

    q = torch.randn(2, 4, 9, 16)
    holder = forward_mask(None, without_mask=True)
    expected = attention(q, q, q, causal=True)
    assert torch.equal(attention(q, q, q, causal=True, attention_mask=holder), expected)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, q[:, :3], q[:, :3], causal=True, attention_mask=holder)
    with pytest.raises(TypeError, match="causal must be a Python bool"):
        attention(q, q, q, causal=1, attention_mask=holder)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, causal=True, dropout_p=1.5, attention_mask=holder)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        attention(q, q, q, causal=True, alibi_slopes=torch.ones(3), attention_mask=holder)
    with pytest.raises(ValueError, match="sequence_ids must have shape"):
        attention(q, q, q, causal=True, sequence_ids=torch.zeros(2, 8, dtype=torch.long), attention_mask=holder)
    assert torch.equal(attention(q, q, q, causal=True, attention_mask=holder), expected)
