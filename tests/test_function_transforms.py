"""``torch.func`` transforms (``grad``, ``vmap`` per-sample gradients, Opacus's per-sample gradients of a norm)
through our files: the fused ops and the chunked and light eager attention are autograd Functions without
``setup_context`` or vmap rules, so under a transform they compute as stock does (logged once). Gradients are
compared with stock's ordinary backward on the same weights (stock BLOOM cannot run under a transform: its GeLU
is an autograd Function of the old style).
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys

import pytest
import torch
from remote_code import assert_close_rel
from test_fused_models import TOL, batch_for, family_pairs, llama_config, randomize_, train_step  # noqa: F401
from test_qwen import random_model
from torch.func import functional_call, grad, vmap
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from memory_efficient_adapter.families import write_remote_code

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")

FAMILIES = ["llama", "llama_tied", "gpt2", "bloom", "bart", "bart_causal"]


def parameters_of(model) -> dict:
    return {name: param.detach() for name, param in model.named_parameters()}


def loss_of(model):
    return lambda params, batch: functional_call(model, params, kwargs=batch).loss


def assert_same_gradients(got: dict, expected: dict, what: str) -> None:
    """``expected`` from ``.grad``: a parameter the loss does not reach has none there, and zeros from torch.func."""
    assert got.keys() >= expected.keys(), what
    assert all(got[name].count_nonzero() == 0 for name in got.keys() - expected.keys()), what
    for name, value in expected.items():
        if name.endswith("k_proj.bias"):  # softmax ignores a key bias: both are rounding noise around 0
            assert got[name].abs().max() < 1e-8 and value.abs().max() < 1e-8, name
            continue
        assert_close_rel(got[name], value, TOL, f"{what}: grad of {name}")


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_func_grad_of_a_padded_training_loss_matches_stock_backward(family_pairs, name):
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(3))
    expected, expected_grads = train_step(stock, batch)
    ours.train()
    loss, grads = torch.func.grad_and_value(loss_of(ours))(parameters_of(ours), batch)[::-1]
    assert_close_rel(loss, expected.loss.detach(), TOL, "loss")
    assert_same_gradients(grads, expected_grads, name)


def gradients_for_passed_tensors(model, batch: dict) -> dict:
    """Gradients of the loss for tensors ``functional_call`` passes in place of the model's parameters (EMA or
    MAML fast weights), taken by an ordinary backward after the call has put the model's own back."""
    generator = torch.Generator().manual_seed(8)
    passed = {
        name: (param.detach() + 0.05 * torch.randn(param.shape, generator=generator)).requires_grad_()
        for name, param in model.named_parameters()
    }
    loss = functional_call(model.train(), passed, kwargs=batch).loss
    grads = torch.autograd.grad(loss, list(passed.values()), allow_unused=True)
    return {name: grad for name, grad in zip(passed, grads, strict=True) if grad is not None}


@pytest.mark.parametrize(
    "options", [dict(recompute_norm_outputs=True), dict(sequence_tile_size=4), dict(offload_checkpoints=True)], ids=str
)
@pytest.mark.parametrize("name", FAMILIES)
def test_recomputes_in_backward_use_the_tensors_functional_call_passed(family_pairs, name, options):
    """Recomputed with the model's own weights (norm outputs: gradients 5-8% off; tiles and offloaded layers:
    no gradient at all for the passed tensors); stock without checkpointing is the reference."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(4))
    expected = gradients_for_passed_tensors(stock, batch)
    ours = copy.deepcopy(ours)
    for option, value in options.items():
        setattr(ours.config, option, value)
    got = gradients_for_passed_tensors(ours, batch)
    assert_same_gradients(got, expected, f"{name} {options}")
    assert all(param.grad is None for param in ours.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_per_sample_gradients_with_vmap_match_one_backward_per_row(family_pairs, name):
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(4))
    rows = {key: batch[key] for key in ("input_ids", "labels")}
    ours.train()

    def row_loss(params, ids, labels):
        return loss_of(ours)(params, dict(input_ids=ids[None], labels=labels[None]))

    per_sample = vmap(grad(row_loss), in_dims=(None, 0, 0))(parameters_of(ours), rows["input_ids"], rows["labels"])
    for row in range(rows["input_ids"].shape[0]):
        _, expected = train_step(stock, {key: value[row : row + 1] for key, value in rows.items()})
        assert_same_gradients({key: value[row] for key, value in per_sample.items()}, expected, f"{name} row {row}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart_causal"])
def test_per_sample_gradients_of_padded_rows_with_their_mask_match_one_backward_per_row(family_pairs, name):
    """Each row with its own padding mask: deciding whether a row is padded read the mask on the host, which
    ``vmap`` refuses (functorch's data-dependent error on every backend), where stock eager runs."""
    stock, ours, _ = family_pairs[name]
    rows = batch_for(name, torch.Generator().manual_seed(6))
    assert not rows["attention_mask"].bool().all()
    ours.train()

    def row_loss(params, row):
        return loss_of(ours)(params, {key: value[None] for key, value in row.items()})

    per_sample = vmap(grad(row_loss), in_dims=(None, 0))(parameters_of(ours), rows)
    for row in range(rows["input_ids"].shape[0]):
        _, expected = train_step(stock, {key: value[row : row + 1] for key, value in rows.items()})
        assert_same_gradients({key: value[row] for key, value in per_sample.items()}, expected, f"{name} row {row}")
    if name == "bloom":  # its 0/1 check reads the rows' masks beneath vmap's wrapper
        with pytest.raises(ValueError, match="must hold only 0 and 1"):
            weighted = dict(rows, attention_mask=rows["attention_mask"] * 2)
            vmap(grad(row_loss), in_dims=(None, 0))(parameters_of(ours), weighted)


def test_per_sample_gradients_of_padded_rows_through_the_attention_registry_match_stock_eager():
    """Stock LLaMA on ``attn_implementation="mea"``: the registry's mask function read each row's mask on the host
    to tell a padded batch, which ``vmap`` refuses (stock sdpa's mask function fails the same way)."""
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(21))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    rows = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    per_sample = {}
    for implementation in ("eager", "mea"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config()).train()
        model.set_attn_implementation(implementation)

        def row_loss(params, row, model=model):
            return loss_of(model)(params, {key: value[None] for key, value in row.items()})

        per_sample[implementation] = vmap(grad(row_loss), in_dims=(None, 0))(parameters_of(model), rows)
    assert_same_gradients(per_sample["mea"], per_sample["eager"], "registry")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_forward_mode_ad_with_dual_tensors_matches_stock_eager(family_pairs, name):
    """``torch.autograd.forward_ad``'s dual tensors need a forward derivative of every op: our autograd Functions
    have none (torch's generic error), so inside a ``dual_level`` the fused ops compute as stock does."""
    stock, ours, _ = family_pairs[name]
    stock = copy.deepcopy(stock).eval()
    stock.set_attn_implementation("eager")
    batch = batch_for(name, torch.Generator().manual_seed(12))
    embeddings = ours.get_input_embeddings()(batch["input_ids"]).detach()
    tangent = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(13))
    derivatives = []
    for model in (stock, ours.eval()):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(embeddings, tangent)
            logits = model(inputs_embeds=dual, attention_mask=batch["attention_mask"]).logits
            derivatives.append(torch.autograd.forward_ad.unpack_dual(logits).tangent)
    kept = batch["attention_mask"].bool()
    assert_close_rel(derivatives[1][kept], derivatives[0][kept], TOL, "directional derivative of the logits")


def test_bloom_keeps_no_slopes_a_transform_made_so_later_transforms_run(family_pairs):
    """Slopes built inside a transform are wrapped at its level; kept in the slopes cache, the next transform
    failed torch's internal level check (second-order steps, one after the other)."""
    _, ours, _ = family_pairs["bloom"]
    ours.eval().config.attn_backend = "eager"
    try:
        ids = batch_for("bloom", torch.Generator().manual_seed(14))["input_ids"][:1]
        embeddings = ours.get_input_embeddings()(ids).detach()
        kernels = sys.modules[type(ours).__module__]
        kernels._slopes_cache.clear()

        def logits_sum(inputs_embeds):
            return ours(inputs_embeds=inputs_embeds).logits.square().sum()

        curvatures = [torch.func.grad(lambda e: torch.func.grad(logits_sum)(e).sum())(embeddings) for _ in range(2)]
        assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in kernels._slopes_cache.values())
        assert torch.equal(curvatures[0], curvatures[1]) and curvatures[0].abs().sum() > 0
    finally:
        ours.config.attn_backend = None


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart"])
def test_forward_mode_jvp_of_the_loss_matches_stock_eager(family_pairs, name):
    """Forward-mode AD (``torch.func.jvp``): stock needs its eager attention (sdpa has no forward derivative)."""
    stock, ours, _ = family_pairs[name]
    stock = copy.deepcopy(stock).train()
    stock.set_attn_implementation("eager")
    batch = batch_for(name, torch.Generator().manual_seed(10))
    generator = torch.Generator().manual_seed(11)
    tangents = {key: torch.randn(value.shape, generator=generator) for key, value in parameters_of(ours).items()}
    derivatives = [
        torch.func.jvp(lambda params: loss_of(model)(params, batch), (parameters_of(model),), (tangents,))[1]
        for model in (stock, ours.train())
    ]
    assert_close_rel(derivatives[1], derivatives[0], TOL, "directional derivative of the loss")


def test_a_compiled_loss_under_torch_func_grad_matches_stock(family_pairs, monkeypatch):
    """The once-only log of the transform path is not written while compiling (a logging call breaks the graph,
    and the resumed graph failed inside a transform)."""
    stock, ours, _ = family_pairs["llama"]
    monkeypatch.setattr(sys.modules[type(ours).__module__], "_logged_messages", set())
    batch = batch_for("llama", torch.Generator().manual_seed(15))
    expected, expected_grads = train_step(stock, batch)
    torch._dynamo.reset()
    compiled = torch.compile(loss_of(ours.train()), backend="eager", fullgraph=True)
    assert_same_gradients(grad(compiled)(parameters_of(ours), batch), expected_grads, "compiled under grad")


def test_attention_dropout_under_a_transform_draws_as_stock_eager(tmp_path):
    """The eager path's fused dropout-matmul is an autograd Function too: under a transform it is stock's
    dropout then matmul, drawing the same masks from the same seed."""
    torch.manual_seed(0)
    stock = LlamaForCausalLM(llama_config(attention_dropout=0.3, attn_implementation="eager"))
    randomize_(stock)
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, "llama")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    ours.config.attn_backend = "eager"
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(12))
    batch = dict(input_ids=ids, labels=ids)
    torch.manual_seed(13)
    expected, expected_grads = train_step(stock, batch)
    torch.manual_seed(13)
    ours.train()
    loss, grads = torch.func.grad_and_value(loss_of(ours))(parameters_of(ours), batch)[::-1]
    assert_close_rel(loss, expected.loss.detach(), TOL, "loss with attention dropout")
    assert_same_gradients(grads, expected_grads, "llama with attention dropout")
    torch.manual_seed(14)
    assert train_step(stock, batch)[0].loss != expected.loss, "dropout is on"


@pytest.mark.parametrize("options", [{}, dict(sequence_tile_size=4, offload_checkpoints=True)], ids=str)
def test_qwen_under_torch_func_grad_matches_its_fused_backward(options):
    model = random_model(**options).train()
    ids = torch.randint(3, 101, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    expected, expected_grads = train_step(model, batch)
    assert expected.logits is None  # the fused loss ran outside the transform
    grads = grad(loss_of(model))(parameters_of(model), batch)
    assert_same_gradients(grads, expected_grads, "qwen")


@pytest.mark.parametrize("name, norm", [("llama", "model.layers.0.input_layernorm"), ("gpt2", "transformer.h.1.ln_2"),
                                        ("bart", "model.decoder.layers.0.final_layer_norm")])
def test_per_sample_gradients_of_a_norm_module_as_opacus_takes_them(family_pairs, name, norm):
    """Opacus computes per-sample gradients of a layer it has no rule for with vmap over the module alone."""
    stock_norm, our_norm = (pair.get_submodule(norm).train() for pair in family_pairs[name][:2])
    x = torch.randn(3, 5, stock_norm.weight.shape[0], generator=torch.Generator().manual_seed(6))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))

    def sample_loss(module):
        return lambda params, sample, up: (functional_call(module, params, (sample[None],)) * up[None]).sum()

    got = vmap(grad(sample_loss(our_norm)), in_dims=(None, 0, 0))(parameters_of(our_norm), x, upstream)
    expected = vmap(grad(sample_loss(stock_norm)), in_dims=(None, 0, 0))(parameters_of(stock_norm), x, upstream)
    assert_same_gradients(got, expected, norm)


def test_attention_under_a_transform_runs_sdpa_or_plain_eager_and_says_so_once(caplog, monkeypatch):
    q, k, v = torch.randn(3, 2, 4, 7, 8, generator=torch.Generator().manual_seed(8)).double().unbind(0)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, :2] = False

    def summed(q, backend, **options):
        return (kernel_layer.attention(q, k, v, causal=True, attention_mask=keep, backend=backend, **options) * v.sum()).sum()

    expected = torch.func.grad(lambda q: summed(q, "eager", light_softmax=False, dropout_matmul=False))(q)
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        for _ in range(2):
            assert_close_rel(torch.func.grad(lambda q: summed(q, "auto"))(q), expected, 1e-12, "auto")
            assert_close_rel(torch.func.grad(lambda q: summed(q, "eager"))(q), expected, 1e-12, "light eager")
    assert sum("torch.func transform" in record.getMessage() for record in caplog.records) == 1
    with pytest.raises(ValueError, match="'chunked' cannot take this call: chunked cannot run under torch.func"):
        torch.func.grad(lambda q: summed(q, "chunked"))(q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "bloom", "gpt2"])
def test_torch_func_grad_on_cuda_matches_stock_backward(family_pairs, name):
    """On CUDA too (where the fused ops are Triton kernels and attention has cuDNN and flash varlen paths)."""
    stock, ours = (copy.deepcopy(model).cuda() for model in family_pairs[name][:2])
    batch = {key: value.cuda() for key, value in batch_for(name, torch.Generator().manual_seed(9)).items()}
    expected, expected_grads = train_step(stock, batch)
    ours.train()
    loss, grads = torch.func.grad_and_value(loss_of(ours))(parameters_of(ours), batch)[::-1]
    assert_close_rel(loss, expected.loss.detach(), 1e-4, "loss")
    for key, value in expected_grads.items():
        if not key.endswith("k_proj.bias"):
            assert_close_rel(grads[key], value, 1e-4, f"{name}: grad of {key}")
    probed = sys.modules[type(ours).__module__]._probe_results  # probed under the transform: not recorded broken
    assert not any("does not run here" in str(reason) for reason in probed.values()), probed
