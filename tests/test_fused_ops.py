"""The kernel layer's fused ops (LM head + cross-entropy in chunks, RMSNorm, LayerNorm, activations, RoPE, shared
projections): each against a float64 reference (values and gradients) and what each keeps for backward. Whole
training steps are tested in ``test_fused_models.py``, the Triton kernels in ``test_fused_ops_triton.py``.
"""

from __future__ import annotations

import importlib
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from remote_code import assert_close_rel

ops = importlib.import_module("memory_efficient_adapter.attention")

TOL = 1e-5
VOCAB = 97


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def saved_tensor_shapes(fn, *args) -> list:
    """Shapes of every tensor autograd keeps for backward while ``fn(*args)`` runs."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return shapes


def grads_of(output: torch.Tensor, inputs: list) -> list:
    return list(torch.autograd.grad(output, inputs, allow_unused=True))


def random_targets(rows: int, vocab: int, ignored: float, generator: torch.Generator) -> torch.Tensor:
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return targets.masked_fill(torch.rand(rows, generator=generator) < ignored, -100)


# ----------------------------------------------------------------------------------------------
# LM head + cross-entropy
# ----------------------------------------------------------------------------------------------

# rows, vocab, chunk size: one chunk, chunks with an odd remainder, chunk of one row, chunk > rows
LCE_SHAPES = [(16, 11, 16), (37, 53, 8), (29, 31, 1), (5, 7, 100), (64, 130, 13)]


@pytest.mark.parametrize("rows,vocab,chunk", LCE_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 23, "tensor"])
def test_linear_cross_entropy_matches_float64_reference(rows, vocab, chunk, with_bias, num_items):
    generator = torch.Generator().manual_seed(rows * 1000 + vocab)
    hidden = torch.randn(rows, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = random_targets(rows, vocab, 0.3, generator)
    targets[0] = -100  # at least one ignored row
    if num_items == "tensor":
        num_items = torch.tensor(int((targets != -100).sum()) + 3)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    logits = hidden @ weight.T + (bias if with_bias else 0)
    if num_items is None:
        expected = F.cross_entropy(logits, targets, ignore_index=-100)
    else:
        expected = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items
    expected_grads = grads_of(expected, inputs)

    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, TOL)):
        cast = [t.detach().to(dtype).requires_grad_() for t in inputs]
        loss = ops.linear_cross_entropy(
            cast[0], cast[1], targets, bias=cast[2] if with_bias else None, num_items_in_batch=num_items,
            chunk_size=chunk,
        )
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_rel(loss.detach(), expected.detach(), tol, f"loss {dtype}")
        for name, got, want in zip(("hidden", "weight", "bias"), grads_of(loss, cast), expected_grads):
            assert_close_rel(got, want, tol, f"grad of {name} ({dtype})")


def test_all_ignored_batch_gives_nan_loss_and_zero_gradients_like_pytorch():
    hidden = torch.randn(9, 6, requires_grad=True)
    weight = torch.randn(13, 6, requires_grad=True)
    targets = torch.full((9,), -100)
    loss = ops.linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    expected = F.cross_entropy(hidden @ weight.T, targets)
    assert torch.isnan(loss) and torch.isnan(expected)
    got, want = grads_of(loss, [hidden, weight]), grads_of(expected, [hidden, weight])
    for g, w in zip(got, want):
        assert torch.equal(g, w) and not g.any()
    # with num_items_in_batch the all-ignored loss is 0, as stock's sum / n
    loss = ops.linear_cross_entropy(hidden, weight, targets, num_items_in_batch=4, chunk_size=4)
    assert loss.item() == 0.0


def test_no_rows_give_a_nan_loss_and_zero_gradients_of_the_right_shapes_like_pytorch():
    """The head's gradient starts as the first chunk's product: with no chunk at all it is still zeros."""
    hidden = torch.randn(0, 6, requires_grad=True)
    weight = torch.randn(13, 6, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    loss = ops.linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    assert torch.isnan(loss) and torch.isnan(expected)
    for got, want in zip(grads_of(loss, [hidden, weight, bias]), grads_of(expected, [hidden, weight, bias])):
        assert got.shape == want.shape and torch.equal(got, want) and not got.any()


def test_kept_loss_gradients_are_scaled_in_float32_and_rounded_once():
    """The scale (the loss's float32 gradient) is not rounded to a bf16 gradient's dtype before the product."""
    generator = torch.Generator().manual_seed(8)
    grads = [torch.randn(37, 5, generator=generator).to(dtype) for dtype in (torch.bfloat16, torch.float32)]
    grads.append(torch.randn(11, generator=generator).bfloat16())
    scale = torch.tensor(0.7312345)
    expected = [(grad.float() * scale).to(grad.dtype) for grad in grads]
    assert not torch.equal(expected[0], grads[0] * scale.to(torch.bfloat16))
    ops._scale_in_place(grads, scale)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_tied_weights_accumulate_the_head_and_embedding_gradients():
    generator = torch.Generator().manual_seed(3)
    embedding = torch.nn.Parameter(torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64))
    ids = torch.randint(0, VOCAB, (2, 15), generator=generator)
    labels = ids.clone()
    labels[1, :4] = -100

    def run(fused: bool):
        hidden = torch.tanh(embedding[ids] * 1.5)
        if fused:
            head = torch.nn.Linear(8, VOCAB, bias=False).double()
            head.weight = embedding  # tied: the same Parameter object
            config = transformers.PretrainedConfig(loss_chunk_size=7)
            return ops.lm_head_loss(hidden, head, labels, config)
        logits = hidden @ embedding.T
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))

    expected = run(False)
    (expected_grad,) = grads_of(expected, [embedding])
    loss = run(True)
    (grad,) = grads_of(loss, [embedding])
    assert_close_rel(loss.detach(), expected.detach(), 1e-10, "loss")
    assert_close_rel(grad, expected_grad, 1e-10, "grad of the tied weight")


def test_lm_head_loss_keeps_no_rows_by_vocab_tensor_for_backward():
    rows, vocab = 40, 211
    hidden = torch.randn(rows, 16, requires_grad=True)
    head = torch.nn.Linear(16, vocab)
    targets = torch.randint(0, vocab, (rows,))
    shapes = saved_tensor_shapes(
        lambda: ops.linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, chunk_size=8)
    )
    # the gradients of hidden, weight and bias, computed during forward: nothing of size rows x vocab
    assert sorted(shapes) == sorted([(rows, 16), (vocab, 16), (vocab,)]), shapes
    stock = saved_tensor_shapes(lambda: F.cross_entropy(head(hidden), targets))
    assert (rows, vocab) in stock  # the stock path does keep the logits


def test_loss_gradients_follow_the_incoming_gradient_and_a_second_backward_fails_loudly():
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(23, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(31, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = random_targets(23, 31, 0.2, generator)
    expected = grads_of(-2.5 * F.cross_entropy(hidden @ weight.t(), targets), [hidden, weight])
    loss = ops.linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    (-2.5 * loss).backward(retain_graph=True)
    assert_close_rel(hidden.grad, expected[0], 1e-12, "grad of hidden under a gradient of -2.5")
    assert_close_rel(weight.grad, expected[1], 1e-12, "grad of weight under a gradient of -2.5")
    with pytest.raises(RuntimeError, match="second backward through one loss"):
        loss.backward()


def test_loss_without_grad_mode_computes_no_gradients():
    hidden = torch.randn(9, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    targets = torch.randint(0, 5, (9,))
    with torch.no_grad():
        loss = ops.linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert_close_rel(loss, F.cross_entropy(hidden @ weight.t(), targets).detach(), TOL, "loss")
    assert saved_tensor_shapes(lambda: ops.linear_cross_entropy(hidden.detach(), weight.detach(), targets)) == []


def test_loss_chunk_size_by_vocab_and_from_config():
    config = transformers.PretrainedConfig()
    assert ops.loss_chunk_size(config, 32000, torch.bfloat16) == 2048  # 2048 x 32000 bf16 logits <= 128 MiB
    assert ops.loss_chunk_size(config, 32000, torch.float32) == 1024
    assert ops.loss_chunk_size(config, 151936, torch.bfloat16) == 768  # 441 fit: raised to the fewest tokens
    assert 441 * 151936 * 2 <= ops.LOSS_CHUNK_BYTES < 442 * 151936 * 2
    assert ops.loss_chunk_size(config, 151936, torch.bfloat16, min_tokens=1) == 384  # a wrapped head's: 64s
    assert ops.loss_chunk_size(config, 10**9, torch.float32, min_tokens=1) == 1  # never zero rows
    config.loss_chunk_size = 64
    assert ops.loss_chunk_size(config, 32000) == 64
    config.loss_chunk_size = 0
    with pytest.raises(ValueError, match="loss_chunk_size"):
        ops.loss_chunk_size(config, 32000)


@pytest.mark.parametrize("chunk_size", [0, -1, True, 2.0])
def test_the_loss_functions_refuse_a_chunk_size_that_is_not_a_positive_int(chunk_size):
    """``chunk_size=-1`` returned a loss of 0 and an unwritten hidden-state gradient (no chunk ran)."""
    hidden, weight = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 6, 0])
    with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {chunk_size!r}"):
        ops.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    head = torch.nn.Linear(3, 7)
    with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {chunk_size!r}"):
        ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [np.int64(2), np.int32(3), torch.tensor(2)], ids=repr)
def test_the_loss_functions_take_a_chunk_size_of_any_integer_type(chunk_size):
    hidden, weight = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    targets = torch.tensor([1, 2, -100, 6, 0])
    expected = F.cross_entropy(hidden @ weight.t(), targets)
    assert_close_rel(ops.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size), expected, 1e-12)
    head = torch.nn.Linear(3, 7, dtype=torch.float64)
    expected = F.cross_entropy(head(hidden), targets)
    got = ops.wrapped_head_cross_entropy(hidden, head, targets, chunk_size=chunk_size)
    assert_close_rel(got.detach(), expected.detach(), 1e-12)


def test_linear_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="targets"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))


def test_under_autocast_the_head_runs_in_the_autocast_dtype_like_stock():
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(24, 16, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=generator, requires_grad=True)
    targets = random_targets(24, VOCAB, 0.2, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(hidden, weight, targets, chunk_size=5)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert loss.dtype == torch.float32
    assert_close_rel(loss.detach(), expected.detach(), 1e-5, "loss")
    for got, want in zip(grads_of(loss, [hidden, weight]), grads_of(expected, [hidden, weight])):
        assert got.dtype == torch.float32
        assert_close_rel(got, want, 2e-2, "grad under autocast")


# ----------------------------------------------------------------------------------------------
# RMSNorm, activations, RoPE
# ----------------------------------------------------------------------------------------------


def reference_rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(3, 7, 16), (5, 33), (1, 1, 2, 24)])
def test_rms_norm_matches_float64_reference_and_keeps_input_and_rstd(shape):
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=generator, dtype=torch.float64)).requires_grad_()
    expected = reference_rms_norm(x, weight, 1e-6)
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [x, weight], grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        xs, ws = x.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        out = ops.rms_norm(xs, ws, 1e-6)
        assert_close_rel(out.detach(), expected.detach(), tol, f"rms_norm {dtype}")
        got = torch.autograd.grad(out, [xs, ws], grad_out.to(dtype))
        assert_close_rel(got[0], expected_grads[0], tol, "grad of x")
        assert_close_rel(got[1], expected_grads[1], tol, "grad of weight")
    kept = saved_tensor_shapes(lambda: ops.rms_norm(x, weight, 1e-6))
    assert sorted(kept) == sorted([shape, (shape[-1],), shape[:-1] + (1,)]), kept  # x, weight, per-row rstd


def test_rms_norm_in_bf16_casts_the_normalised_value_before_the_weight_like_stock():
    x = torch.randn(4, 8, 32, dtype=torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(32)).to(torch.bfloat16)
    x_float = x.float()
    stock = weight * (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), stock)


@pytest.mark.parametrize("shape", [(2, 7, 33), (5, 64), (1, 3, 1, 9)])
def test_fused_layer_norm_matches_float64_reference_and_keeps_input_mean_and_rstd(shape):
    generator = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = (3 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    reference = torch.nn.LayerNorm(shape[-1], eps=1e-5, dtype=torch.float64)
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, generator=generator)
    expected = reference(x)
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [x, *reference.parameters()], grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        norm = ops.FusedLayerNorm(shape[-1], eps=1e-5, dtype=dtype)
        norm.load_state_dict(reference.state_dict())
        xs = x.detach().to(dtype).requires_grad_()
        out = norm(xs)
        assert type(out.grad_fn).__name__ == "_LayerNormBackward"
        assert_close_rel(out.detach(), expected.detach(), tol, f"layer norm {dtype}")
        got = torch.autograd.grad(out, [xs, *norm.parameters()], grad_out.to(dtype))
        for name, g, want in zip(("x", "weight", "bias"), got, expected_grads, strict=True):
            assert_close_rel(g, want, tol, f"grad of {name}")
    norm = ops.FusedLayerNorm(shape[-1], dtype=torch.float64)
    kept = saved_tensor_shapes(lambda: norm(x))
    assert sorted(kept) == sorted([shape, (shape[-1],), shape[:-1] + (1,), shape[:-1] + (1,)]), kept


def test_fused_layer_norm_is_stocks_where_the_fused_op_does_not_apply():
    """Same state-dict keys as nn.LayerNorm; in eval mode without gradients, without a bias or weights, over two
    dims or under autocast the module is stock's (exactly); in eval mode with gradients (a checkpointed layer run
    again after ``model.eval()``) it is the fused op, as in training; bf16 input is normalised in float32."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 10, generator=generator)
    assert list(ops.FusedLayerNorm(10).state_dict()) == list(torch.nn.LayerNorm(10).state_dict())
    for args, kwargs in [((10,), dict(bias=False)), ((10,), dict(elementwise_affine=False)), (((4, 10),), {})]:
        ours, stock = ops.FusedLayerNorm(*args, **kwargs), torch.nn.LayerNorm(*args, **kwargs)
        out = ours(x)
        assert out.grad_fn is None or type(out.grad_fn).__name__ != "_LayerNormBackward"
        assert torch.equal(out, stock(x))
    ours, stock = ops.FusedLayerNorm(10), torch.nn.LayerNorm(10)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), stock(x))
    evaluated = ours(x.requires_grad_())
    assert type(evaluated.grad_fn).__name__ == "_LayerNormBackward"
    assert_close_rel(evaluated, stock(x), 1e-6, "eval mode with gradients")
    ours.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x.bfloat16()), stock(x.bfloat16()))
    half = ops.FusedLayerNorm(10).bfloat16()
    x_bf16 = x.bfloat16()
    expected = F.layer_norm(x_bf16.float(), (10,), half.weight.float(), half.bias.float()).bfloat16()
    assert_close_rel(half(x_bf16).float(), expected.float(), 1e-2, "bf16 layer norm")


def test_silu_gate_matches_float64_reference_and_keeps_only_the_matmul_outputs():
    generator = torch.Generator().manual_seed(11)
    gate = torch.randn(3, 9, 20, generator=generator, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 9, 20, generator=generator, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 9, 20, generator=generator, dtype=torch.float64)
    expected = F.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, [gate, up], grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        g, u = gate.detach().to(dtype).requires_grad_(), up.detach().to(dtype).requires_grad_()
        out = ops.gated_activation("silu", g, u, fallback=None)
        assert_close_rel(out.detach(), expected.detach(), tol, "silu(gate) * up")
        for got, want in zip(torch.autograd.grad(out, [g, u], grad_out.to(dtype)), expected_grads):
            assert_close_rel(got, want, tol, "silu gate grad")
    assert saved_tensor_shapes(lambda: ops.gated_activation("silu", gate, up, None)) == [(3, 9, 20), (3, 9, 20)]
    assert len(saved_tensor_shapes(lambda: F.silu(gate) * up)) == 3  # stock also keeps silu(gate)


def reference_gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x.pow(3))))


def reference_gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2.0**0.5))


@pytest.mark.parametrize(
    "name,reference",
    [("gelu_new", reference_gelu_tanh), ("gelu_pytorch_tanh", reference_gelu_tanh), ("gelu", reference_gelu_erf)],
)
def test_gelu_family_matches_float64_reference_and_keeps_only_its_input(name, reference):
    generator = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(4, 13, 24, generator=generator, dtype=torch.float64)
    x.requires_grad_()
    grad_out = torch.randn(4, 13, 24, generator=generator, dtype=torch.float64)
    expected = reference(x)
    (expected_grad,) = torch.autograd.grad(expected, [x], grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        xs = x.detach().to(dtype).requires_grad_()
        out = ops.activation(name, xs, fallback=None)
        assert_close_rel(out.detach(), expected.detach(), tol, name)
        assert_close_rel(torch.autograd.grad(out, [xs], grad_out.to(dtype))[0], expected_grad, tol, f"grad {name}")
    assert saved_tensor_shapes(lambda: ops.activation(name, x, None)) == [(4, 13, 24)]
    if name == "gelu_new":  # stock's composite gelu_new keeps several [.., d] intermediates
        assert len(saved_tensor_shapes(lambda: transformers.activations.ACT2FN[name](x))) > 2


def test_activations_without_a_fused_form_use_the_fallback():
    x = torch.randn(3, 5)
    assert torch.equal(ops.activation("relu", x, torch.relu), torch.relu(x))
    assert torch.equal(ops.gated_activation("relu", x, x + 1, torch.relu), torch.relu(x) * (x + 1))


@pytest.mark.parametrize("name", ["silu", "gelu_new", "gelu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_projected_activation_matches_float64_and_keeps_only_the_matmul_outputs(name, with_bias):
    generator = torch.Generator().manual_seed(13)
    x = 2 * torch.randn(3, 5, 12, generator=generator, dtype=torch.float64)
    up = torch.randn(3, 5, 12, generator=generator, dtype=torch.float64) if name == "silu" else None
    projection = torch.nn.Linear(12, 7, bias=with_bias, dtype=torch.float64)
    act = transformers.activations.ACT2FN[name]
    inputs = [t.requires_grad_() for t in (x, up) if t is not None] + list(projection.parameters())
    grad_out = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    expected = projection(act(x) * up if up is not None else act(x))
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        cast = projection.to(dtype)
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, up) if t is not None]
        out = ops.projected_activation(name, leaves[0], cast, act, up=leaves[1] if up is not None else None)
        assert type(out.grad_fn).__name__ == "_ActivationLinearBackward"
        assert_close_rel(out.detach(), expected.detach(), tol, f"projected {name}")
        got = torch.autograd.grad(out, leaves + list(cast.parameters()), grad_out.to(dtype))
        for index, (g, want) in enumerate(zip(got, expected_grads, strict=True)):
            assert_close_rel(g, want, tol, f"grad {index} of projected {name}")
        projection.to(torch.float64)
    kept = saved_tensor_shapes(lambda: ops.projected_activation(name, x, projection, act, up=up))
    assert sorted(kept) == sorted([(3, 5, 12)] * (2 if up is not None else 1) + [(7, 12)]), kept  # x (, up), weight
    stock_kept = saved_tensor_shapes(lambda: projection(act(x) * up if up is not None else act(x)))
    activation_sized = [shape for shape in kept if torch.Size(shape).numel() == x.numel()]
    stock_activation_sized = [shape for shape in stock_kept if torch.Size(shape).numel() == x.numel()]
    assert len(stock_activation_sized) > len(activation_sized)  # stock also keeps the activation for the weight


def test_projected_activation_and_shared_input_projections_on_one_vector_compute_as_stock():
    """A single vector (no rows): the backward flattened rows and failed; stock's calls take it."""
    generator = torch.Generator().manual_seed(14)
    x, up = torch.randn(12, generator=generator), torch.randn(12, generator=generator).requires_grad_()
    first, second = torch.nn.Linear(12, 7), torch.nn.Linear(12, 5)
    act = transformers.activations.ACT2FN["silu"]
    cases = {
        "projected": (lambda x: ops.projected_activation("silu", x, first, act), lambda x: first(act(x))),
        "gated": (lambda x: ops.projected_activation("silu", x, first, act, up=up), lambda x: first(act(x) * up)),
        "shared": (lambda x: torch.cat(ops.shared_input_projections(x, first, second)),
                   lambda x: torch.cat([first(x), second(x)])),
    }
    leaves = [up, first.weight, first.bias, second.weight, second.bias]
    for what, (ours, stock) in cases.items():
        grad_out = torch.randn(stock(x).shape, generator=generator)
        expected = torch.autograd.grad(stock(x.requires_grad_()), [x, *leaves], grad_out, allow_unused=True)
        got = torch.autograd.grad(ours(x), [x, *leaves], grad_out, allow_unused=True)
        for index, (g, want) in enumerate(zip(got, expected, strict=True)):
            assert (g is None) == (want is None), f"{what}: grad {index}"
            if want is not None:
                assert_close_rel(g, want, TOL, f"{what}: grad {index}")


class _WideTensorsAtBiasReduction(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, when the first row reduction (``aten.sum`` over dim 0: the bias gradient) runs, how many tensors
    of ``shape`` made since entering are still alive."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape, self.made, self.alive_at_sum = shape, [], None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.sum.dim_IntList and self.alive_at_sum is None and list(args[1]) == [0]:
            self.alive_at_sum = sum(1 for ref in self.made if ref() is not None)
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                self.made.append(weakref.ref(tensor))
        return out


def test_projected_activation_backward_reduces_the_bias_gradient_before_making_wide_tensors():
    """The bias gradient's reduction (a workspace as large as [tokens, intermediate] on CUDA) runs while no
    [tokens, intermediate] tensor of the backward (the input's gradient, the recomputed activation) exists."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(37, 24, generator=generator, requires_grad=True)
    projection = torch.nn.Linear(24, 8)
    out = ops.projected_activation("gelu", x, projection, F.gelu)
    watch = _WideTensorsAtBiasReduction((37, 24))
    with watch:
        out.backward(torch.randn(out.shape, generator=generator))
    assert watch.made, "the backward made no [tokens, intermediate] tensor: the test watches nothing"
    assert watch.alive_at_sum == 0


def test_projected_activation_on_a_transposed_conv1d_weight_and_the_stock_path_for_wrapped_projections():
    from transformers.pytorch_utils import Conv1D

    generator = torch.Generator().manual_seed(14)
    x = torch.randn(2, 6, 10, generator=generator, requires_grad=True)
    conv = Conv1D(4, 10)
    torch.nn.init.normal_(conv.weight, generator=generator)
    torch.nn.init.normal_(conv.bias, generator=generator)
    act = transformers.activations.ACT2FN["gelu_new"]
    expected = conv(act(x))
    got = ops.projected_activation("gelu_new", x, conv, act, projection_class=Conv1D, transposed=True)
    assert type(got.grad_fn).__name__ == "_ActivationLinearBackward"
    assert_close_rel(got.detach(), expected.detach(), TOL, "Conv1D projection")
    leaves = [x, conv.weight, conv.bias]
    for a, b in zip(grads_of(got.sum(), leaves), grads_of(expected.sum(), leaves), strict=True):
        assert_close_rel(a, b, TOL, "Conv1D grads")
    seen = []
    handle = conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        hooked = ops.projected_activation("gelu_new", x, conv, act, projection_class=Conv1D, transposed=True)
    finally:
        handle.remove()
    assert seen == [(2, 6, 4)] and type(hooked.grad_fn).__name__ != "_ActivationLinearBackward"
    assert_close_rel(hooked.detach(), expected.detach(), TOL, "hooked projection, stock path")
    relu = ops.projected_activation("relu", x, conv, torch.relu, projection_class=Conv1D, transposed=True)
    assert_close_rel(relu.detach(), conv(torch.relu(x)).detach(), TOL, "an activation without a fused form")


class _AddsOfShape(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts additions (``aten.add``/``aten.add_``) whose output has ``shape``."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and tuple(out.shape) == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("widths,with_bias", [((12, 4, 4), False), ((12, 4, 4), True), ((9, 9), True), ((5,), False)])
def test_shared_input_projections_match_float64_and_sum_the_input_gradient_without_adds(widths, with_bias):
    """Projections of one input (q/k/v with GQA widths, gate/up) as one node: outputs and every gradient against
    float64 calls of each projection, odd rows; the input's gradient is summed in the matmuls, where autograd
    runs one add over the input's size per extra projection."""
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(3, 7, 10, generator=generator, dtype=torch.float64)
    projections = [torch.nn.Linear(10, width, bias=with_bias, dtype=torch.float64) for width in widths]
    for projection in projections:
        for parameter in projection.parameters():
            torch.nn.init.normal_(parameter, generator=generator)
    grad_outs = [torch.randn(3, 7, width, generator=generator, dtype=torch.float64) for width in widths]
    leaves = [x.requires_grad_()] + [p for projection in projections for p in projection.parameters()]
    expected = [projection(x) for projection in projections]
    expected_grads = torch.autograd.grad(expected, leaves, grad_outs)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        cast = [projection.to(dtype) for projection in projections]
        x_cast = x.detach().to(dtype).requires_grad_()
        outs = ops.shared_input_projections(x_cast, *cast)
        assert len({out.grad_fn for out in outs}) == 1 and type(outs[0].grad_fn).__name__ == "_SharedInputLinearsBackward"
        for out, want in zip(outs, expected, strict=True):
            assert_close_rel(out.detach(), want.detach(), tol, "projection")
        cast_leaves = [x_cast] + [p for projection in cast for p in projection.parameters()]
        adds = _AddsOfShape(tuple(x.shape))
        with adds:
            got = torch.autograd.grad(outs, cast_leaves, [g.to(dtype) for g in grad_outs])
        assert adds.count == 0
        for index, (g, want) in enumerate(zip(got, expected_grads, strict=True)):
            assert_close_rel(g, want, tol, f"grad {index}")
        for projection in projections:
            projection.to(torch.float64)
    if len(widths) > 1:
        stock_adds = _AddsOfShape(tuple(x.shape))
        with stock_adds:
            torch.autograd.grad([projection(x) for projection in projections], [x], grad_outs)
        assert stock_adds.count == len(widths) - 1


def test_shared_input_projections_train_only_what_requires_grad_and_keep_stock_calls_otherwise():
    generator = torch.Generator().manual_seed(22)
    x = torch.randn(2, 5, 6, generator=generator)
    first, second = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3)
    first.weight.requires_grad_(False)
    outs = ops.shared_input_projections(x, first, second)
    sum(out.sum() for out in outs).backward()
    assert first.weight.grad is None and first.bias.grad is not None and second.weight.grad is not None
    assert_close_rel(first.bias.grad, torch.full((4,), 10.0), TOL, "bias of the frozen-weight projection")
    assert_close_rel(second.weight.grad, x.reshape(-1, 6).sum(0).expand(3, 6), TOL, "weight gradient")
    with torch.no_grad():
        assert all(out.grad_fn is None for out in ops.shared_input_projections(x, first, second))
    seen = []
    second.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    hooked = ops.shared_input_projections(x.requires_grad_(), first, second)
    assert seen == [(2, 5, 3)] and type(hooked[0].grad_fn).__name__ != "_SharedInputLinearsBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        second._forward_hooks.clear()
        under_autocast = ops.shared_input_projections(x, first, second)
        stock = (first(x), second(x))
    assert all(out.dtype == torch.bfloat16 for out in under_autocast)
    for ours, want in zip(under_autocast, stock, strict=True):
        torch.testing.assert_close(ours, want, rtol=0, atol=0)


def reference_rotary(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


@pytest.mark.parametrize("heads,seq,dim", [(3, 7, 8), (1, 16, 32), (4, 5, 2)])
def test_rotary_matches_float64_reference_and_keeps_only_cos_sin(heads, seq, dim):
    generator = torch.Generator().manual_seed(heads * seq)
    x = torch.randn(2, heads, seq, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 1, seq, dim // 2, generator=generator, dtype=torch.float64) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    grad_out = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    expected = reference_rotary(x, cos, sin)
    (expected_grad,) = torch.autograd.grad(expected, [x], grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        xs = x.detach().to(dtype).requires_grad_()
        out = ops.rotary(xs, cos.to(dtype), sin.to(dtype))
        assert_close_rel(out.detach(), expected.detach(), tol, "rotary")
        assert_close_rel(torch.autograd.grad(out, [xs], grad_out.to(dtype))[0], expected_grad, tol, "grad rotary")
    assert saved_tensor_shapes(lambda: ops.rotary(x, cos, sin)) == [tuple(cos.shape), tuple(sin.shape)]
    # the backward is the inverse rotation: rotating the gradient back undoes the forward rotation
    (back,) = torch.autograd.grad(ops.rotary(x, cos, sin), [x], ops.rotary(x, cos, sin).detach())
    assert_close_rel(back, x.detach(), 1e-12, "inverse rotation")


@pytest.mark.parametrize("q_heads,k_heads,seq,dim", [(4, 2, 7, 8), (3, 3, 16, 32), (2, 1, 5, 2)])
def test_rotary_pair_rotates_q_and_k_in_one_op_like_float64_and_keeps_only_cos_sin(q_heads, k_heads, seq, dim):
    """q and k (GQA: fewer k heads) rotated together, forward and gradients, against the float64 formula."""
    generator = torch.Generator().manual_seed(q_heads * seq + k_heads)
    q = torch.randn(2, seq, q_heads, dim, generator=generator, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, k_heads, seq, dim, generator=generator, dtype=torch.float64)
    angles = torch.randn(2, 1, seq, dim // 2, generator=generator, dtype=torch.float64) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    grads_out = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in (q, k)]
    leaves = [x.clone().requires_grad_() for x in (q, k)]
    expected = [reference_rotary(x, cos, sin) for x in leaves]
    expected_grads = torch.autograd.grad(expected, leaves, grads_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k)]
        outs = ops.rotary_pair(*inputs, cos.to(dtype), sin.to(dtype))
        assert type(outs[0].grad_fn).__name__ == "_RotaryBackward" and outs[0].grad_fn is outs[1].grad_fn
        grads = torch.autograd.grad(outs, inputs, [g.to(dtype) for g in grads_out])
        for name, got, want in zip(("q", "k", "grad q", "grad k"), [*outs, *grads], [*expected, *expected_grads]):
            assert got.dtype == dtype
            assert_close_rel(got.detach(), want.detach(), tol, f"rotary_pair {name} {dtype}")
    assert saved_tensor_shapes(lambda: ops.rotary_pair(*leaves, cos, sin)) == [tuple(cos.shape), tuple(sin.shape)]


def test_rotary_in_a_narrower_dtype_is_the_float32_formula_cast_once():
    """Qwen's rotation: bf16 q/k with float32 cos/sin, computed in float32 and returned in bf16 (the original
    copies to float32 and casts back), gradients too; a partial rotation leaves the other channels as they were."""
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(1, 3, 9, 16, generator=generator).bfloat16().requires_grad_()
    k = torch.randn(1, 3, 9, 16, generator=generator).bfloat16().requires_grad_()
    angles = torch.randn(1, 1, 9, 8, generator=generator) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    grads_out = [torch.randn(x.shape, generator=generator).bfloat16() for x in (q, k)]
    outs = ops.rotary_pair(q, k, cos, sin, dtype=torch.bfloat16)
    wide = [x.detach().float().requires_grad_() for x in (q, k)]
    expected = [reference_rotary(x, cos, sin) for x in wide]
    expected_grads = torch.autograd.grad(expected, wide, [g.float() for g in grads_out])
    grads = torch.autograd.grad(outs, [q, k], grads_out)
    for got, want in zip([*outs, *grads], [*expected, *expected_grads]):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
    partial = ops.rotary(q[..., :8], cos[..., :8], sin[..., :8], dtype=torch.bfloat16)
    assert partial.dtype == torch.bfloat16
    torch.testing.assert_close(partial, reference_rotary(q.detach()[..., :8].float(), cos[..., :8], sin[..., :8]).bfloat16())
    assert ops.rotary(q, cos, sin).dtype == torch.float32  # by default the promoted dtype, as the formula gives


def test_fused_ops_trace_into_one_graph_under_torch_compile():
    torch._dynamo.reset()
    head = torch.nn.Linear(16, VOCAB)
    config = transformers.PretrainedConfig(loss_chunk_size=5)

    def step(hidden, weight, gate, up, cos, sin, labels):
        normed = ops.rms_norm(hidden, weight, 1e-6)
        mixed = ops.gated_activation("silu", gate, up, None) + ops.activation("gelu_new", gate, None)
        rotated = ops.rotary(mixed.unsqueeze(1), cos, sin).squeeze(1)
        return ops.lm_head_loss(normed + rotated.sum(-1, keepdim=True), head, labels, config)

    args = (
        torch.randn(2, 9, 16, requires_grad=True),
        torch.randn(16, requires_grad=True),
        torch.randn(2, 9, 8, requires_grad=True),
        torch.randn(2, 9, 8, requires_grad=True),
        torch.randn(2, 1, 9, 8).cos(),
        torch.randn(2, 1, 9, 8).sin(),
        torch.randint(0, VOCAB, (2, 9)),
    )
    expected = step(*args)
    expected_grads = grads_of(expected, list(args[:4]))
    compiled = torch.compile(step, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    loss = compiled(*args)
    assert_close_rel(loss.detach(), expected.detach(), TOL, "compiled loss")
    for got, want in zip(grads_of(loss, list(args[:4])), expected_grads):
        assert_close_rel(got, want, TOL, "compiled grads")
