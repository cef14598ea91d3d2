"""What code that observes or reuses gradients sees, against stock: tensor hooks on parameters and on returned
tensors, ``retain_grad``/``autograd.grad`` on outputs, module backward hooks, and a second backward through one
loss. A padded batch runs unpadded and the long-context options recompute layers in backward: neither may change
what these observers see."""

from __future__ import annotations

import contextlib

import pytest
import torch
from remote_code import assert_close_rel
from test_fused_models import TOL, assert_same_training_step, batch_for, family_pairs  # noqa: F401 - a fixture
from test_modified_modules import pair_copy


OPTIONS = [dict(sequence_tile_size=4), dict(offload_checkpoints=True)]


def share_the_up_projections_weight(*models) -> None:
    """Layer 0's ``up_proj`` of each model without a weight of its own: a forward pre-hook makes it, at every
    call, from a parameter the model holds (``model.shared_up``)."""
    for model in models:
        up = model.model.layers[0].mlp.up_proj
        model.shared_up = torch.nn.Parameter(up.weight.detach().clone())
        del up.weight
        up.register_forward_pre_hook(lambda module, args, model=model: setattr(module, "weight", 1.5 * model.shared_up))


def loss_of(model, batch: dict, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    return model(**batch, **kwargs)


@pytest.mark.parametrize("hooks", ["none", "save_on_cpu", "identity saved_tensors_hooks"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_second_backward_through_the_fused_loss_is_refused_under_saved_tensor_hooks_too(family_pairs, name, hooks):
    """The first backward scales the kept gradients in place; autograd's version check misses that for tensors
    saved through hooks, so a second one (with a first gradient other than 1) silently gave 1.5x stock's."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(21))
    contexts = {
        "none": contextlib.nullcontext,
        "save_on_cpu": torch.autograd.graph.save_on_cpu,
        "identity saved_tensors_hooks": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
    }
    grads = {}
    for label, model in (("stock", stock), ("ours", ours)):
        with contexts[hooks]():
            loss = loss_of(model, batch).loss
        loss.backward(torch.tensor(2.0), retain_graph=True)
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if label == "ours":
            with pytest.raises(RuntimeError, match="second backward through one loss"):
                loss.backward(torch.tensor(2.0))
    for param_name, grad in grads["stock"].items():
        if not param_name.endswith("k_proj.bias"):
            assert_close_rel(grads["ours"][param_name], grad, TOL, f"first backward, grad of {param_name}")


@pytest.mark.parametrize("asked", ["argument", "config"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_hidden_states_returned_in_training_are_on_the_graph_of_the_loss(family_pairs, name, asked):
    """A padded batch asked for its hidden states while gradients are recorded keeps its rows: the hidden states
    of packed rows came back as copies beside the loss's graph (``autograd.grad`` raised, hooks did nothing)."""
    stock, ours = pair_copy(family_pairs, name)
    batch = batch_for(name, torch.Generator().manual_seed(22))
    for model in (stock, ours):
        model.config.output_hidden_states = asked == "config"
    kwargs = {"output_hidden_states": True} if asked == "argument" else {}
    expected, got = (loss_of(model, batch, **kwargs) for model in (stock, ours))
    (want,) = torch.autograd.grad(expected.loss, expected.hidden_states[1])
    (have,) = torch.autograd.grad(got.loss, got.hidden_states[1])
    assert_close_rel(have, want, TOL, "gradient of the loss at hidden_states[1]")


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_logits_returned_beside_the_loss_are_what_it_is_computed_from(family_pairs, name):
    """With ``keep_logits_in_training`` a padded batch still runs unpadded, and the loss comes from the logits
    it returns (it came from the packed logits, so a hook on the returned ones did nothing)."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(23))
    ours.config.keep_logits_in_training = True
    try:
        expected, got = (loss_of(model, batch) for model in (stock, ours))
        (want,) = torch.autograd.grad(expected.loss, expected.logits)
        (have,) = torch.autograd.grad(got.loss, got.logits)
    finally:
        del ours.config.keep_logits_in_training
    assert_close_rel(have, want, TOL, "gradient of the loss at the logits")


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
@pytest.mark.parametrize("name, parameter", [
    ("llama", "model.layers.0.mlp.down_proj.weight"), ("bart_causal", "model.decoder.layers.0.fc2.weight"),
])  # fmt: skip
def test_parameter_gradient_hooks_run_once_with_tiles_and_offloaded_checkpoints(family_pairs, name, parameter, option):
    """The recompute took the parameters' gradients itself and handed them on, so autograd ran their tensor hooks
    once per tile and again on the sum (a doubling hook gave 4x), and with None for a layer's unused parameters
    (BART-causal's cross-attention): such modules run as usual (logged once)."""
    stock, ours = pair_copy(family_pairs, name)
    for key, value in option.items():
        setattr(ours.config, key, value)
    calls = {"stock": [], "ours": []}
    for label, model in (("stock", stock), ("ours", ours)):
        for param_name, param in model.named_parameters():
            param.register_hook(lambda grad, label=label, param_name=param_name: calls[label].append(param_name) or (
                None if grad is None else (2 * grad if param_name == parameter else grad)
            ))
    batch = batch_for(name, torch.Generator().manual_seed(24))
    assert_same_training_step(stock, ours, batch)
    assert sorted(calls["ours"]) == sorted(calls["stock"]) and calls["ours"].count(parameter) == 1


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_module_backward_hooks_see_the_whole_output_gradient_with_tiles_and_offloaded_checkpoints(family_pairs, option):
    """A full backward hook on a tiled module ran once per tile, on a flattened slice of the gradient."""
    stock, ours = pair_copy(family_pairs, "llama")
    for key, value in option.items():
        setattr(ours.config, key, value)
    seen = {"stock": [], "ours": []}
    for label, model in (("stock", stock), ("ours", ours)):
        model.model.layers[0].mlp.register_full_backward_hook(
            lambda module, grad_in, grad_out, label=label: seen[label].append(grad_out[0].detach().clone())
        )
    batch = batch_for("llama", torch.Generator().manual_seed(25))
    assert_same_training_step(stock, ours, batch)
    assert len(seen["ours"]) == len(seen["stock"]) == 1
    kept = batch["attention_mask"].bool()  # a backward hook of the user's keeps the padded rows
    assert seen["ours"][0].shape == seen["stock"][0].shape
    assert_close_rel(seen["ours"][0][kept], seen["stock"][0][kept], TOL, "the MLP's output gradient")


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_a_weight_a_pre_hook_makes_gets_its_gradient_from_the_first_step(family_pairs, option):
    """A projection whose weight a forward pre-hook makes from a parameter held elsewhere: before its first call
    it holds none, which the check for such weights missed, so the first step gave that parameter no gradient."""
    stock, ours = pair_copy(family_pairs, "llama")
    for key, value in option.items():
        setattr(ours.config, key, value)
    share_the_up_projections_weight(stock, ours)
    assert_same_training_step(stock, ours, batch_for("llama", torch.Generator().manual_seed(26)))
    assert ours.shared_up.grad is not None
    assert_close_rel(ours.shared_up.grad, stock.shared_up.grad, TOL, "the shared weight's gradient")


def test_a_weight_a_pre_hook_makes_gets_its_gradient_while_another_thread_compiles(family_pairs):
    """torch flags a compile for the whole process: while another thread compiled, the check for such weights was
    skipped here (dynamo cannot run it), so the tiles ran the projection and its weight's parameter got none."""
    import threading

    stock, ours = pair_copy(family_pairs, "llama")
    ours.config.sequence_tile_size = 4
    share_the_up_projections_weight(stock, ours)
    inside, release = threading.Event(), threading.Event()

    def backend_that_waits(graph_module, example_inputs):
        inside.set()
        release.wait(60)
        return graph_module

    worker = threading.Thread(target=lambda: torch.compile(torch.sin, backend=backend_that_waits)(torch.ones(3)))
    worker.start()
    try:
        assert inside.wait(60)  # torch 2.13 now flags a compile for every thread (2.9: for the compiling one only)
        assert_same_training_step(stock, ours, batch_for("llama", torch.Generator().manual_seed(27)))
    finally:
        release.set()
        worker.join()
    assert_close_rel(ours.shared_up.grad, stock.shared_up.grad, TOL, "the shared weight's gradient")


@pytest.mark.skipif(
    tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 13),
    reason="torch 2.11's dynamo cannot call the trace-time hook check with modules (README: use "
    "register_post_accumulate_grad_hook there)",
)
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_parameter_gradient_hooks_run_once_in_a_compiled_step(family_pairs, option):
    """Dynamo's trace reads a parameter's ``_backward_hooks`` as empty, so a compiled step checkpointed the layer
    anyway: an offloaded layer's hook ran twice (a doubling hook gave that weight 4x its gradient)."""
    stock, ours = pair_copy(family_pairs, "llama")
    for key, value in option.items():
        setattr(ours.config, key, value)
    parameter = "model.layers.0.mlp.down_proj.weight"
    calls = {"stock": 0, "ours": 0}
    for label, model in (("stock", stock), ("ours", ours)):
        model.get_parameter(parameter).register_hook(
            lambda grad, label=label: calls.__setitem__(label, calls[label] + 1) or 2 * grad
        )
    batch = batch_for("llama", torch.Generator().manual_seed(26))
    torch._dynamo.reset()
    ours.compile(backend="aot_eager")
    assert_same_training_step(stock, ours, batch)
    assert calls == {"stock": 1, "ours": 1}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_backward_hooks_on_the_input_embeddings_see_the_padded_batch(family_pairs, name):
    """The padded batch is embedded first for them, as for forward hooks: they saw the packed ``[1, n, d]``."""
    stock, ours = pair_copy(family_pairs, name)
    seen = {}
    for label, model in (("stock", stock), ("ours", ours)):
        model.get_input_embeddings().register_full_backward_hook(
            lambda module, grad_input, grad_output, label=label: seen.__setitem__(label, grad_output[0])
        )
    batch = batch_for(name, torch.Generator().manual_seed(25))
    assert_same_training_step(stock, ours, batch)
    assert seen["ours"].shape == seen["stock"].shape == (*batch["input_ids"].shape, 32)
    assert_close_rel(seen["ours"], seen["stock"], TOL, "grad_output of the input embeddings")
