"""Pre-norm blocks take their residual through the norm (``residual_after_norm``): the norm's backward adds the
residual's gradient while it writes x's, so no activation of a training graph feeds two autograd nodes (whose
gradients autograd would sum with an add kernel over the residual stream's size)."""

import collections

import pytest
import torch
import torch.nn.functional as F
from test_fused_models import batch_for, family_pairs  # noqa: F401 - a fixture
from test_fused_ops import TOL, _AddsOfShape, assert_close_rel, ops, reference_rms_norm
from test_fused_ops_triton import TRITON_CASES, assert_as_close_as_stock, on_cuda, stock_rms_norm, triton_paths_ran


def autograd_edges(output: torch.Tensor) -> collections.Counter:
    """How many edges of ``output``'s autograd graph lead to each (node, output index): two or more for a
    tensor used twice, whose gradients autograd then sums with an add kernel over the tensor's size."""
    edges, seen, stack = collections.Counter(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, index in node.next_functions:
            if child is not None:
                edges[(child, index)] += 1
                stack.append(child)
    return edges


def autograd_uses(leaf: torch.Tensor, output: torch.Tensor) -> int:
    """How many edges of ``output``'s autograd graph lead to the leaf tensor ``leaf``."""
    return sum(count for (node, _), count in autograd_edges(output).items() if getattr(node, "variable", None) is leaf)


class PassThroughRMSNorm(torch.nn.Module):
    """Shaped like LLaMA's and Qwen's RMSNorm modules: a forward and its pass-through form."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(weight), eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)

    def with_residual(self, x):
        return ops.rms_norm(x, self.weight, self.eps, with_residual=True)


def pass_through_norm(kind: str, width: int, generator: torch.Generator, dtype=torch.float64):
    weight = 1 + 0.3 * torch.randn(width, generator=generator, dtype=dtype)
    if kind == "rms":
        return PassThroughRMSNorm(weight)
    norm = ops.FusedLayerNorm(width, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.normal_(generator=generator)
    return norm


def reference_norm(kind: str, norm, x):
    if kind == "rms":
        return reference_rms_norm(x, norm.weight, norm.eps)
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("layer_adds", [False, True])
def test_residual_after_norm_adds_the_residual_gradient_inside_the_norm_backward(kind, layer_adds):
    """``x + layer(norm(x))`` (or ``layer(norm(x), x)``): values and every gradient against float64 with odd
    rows; the residual is x's storage, taken from the norm's autograd node: x has one use in the graph (its two
    gradients are summed in the norm's backward), where the plain block has two (summed by an add kernel)."""
    generator = torch.Generator().manual_seed(31 + layer_adds)
    x = (1 + torch.randn(3, 7, 10, generator=generator, dtype=torch.float64)).requires_grad_()
    norm = pass_through_norm(kind, 10, generator)
    projection = torch.nn.Linear(10, 10, dtype=torch.float64)
    block = (lambda normed, residual: residual + 2 * projection(normed)) if layer_adds else projection
    grad_out = torch.randn(3, 7, 10, generator=generator, dtype=torch.float64)
    leaves = [x, *norm.parameters(), *projection.parameters()]
    expected = x + (2 if layer_adds else 1) * projection(reference_norm(kind, norm, x))
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, TOL)):
        norm.to(dtype), projection.to(dtype)
        xs = x.detach().to(dtype).requires_grad_()
        seen = []
        if layer_adds:
            out = ops.residual_after_norm(norm, xs, lambda n, r: seen.append(r) or block(n, r), layer_adds=True)
            assert seen[0].data_ptr() == xs.data_ptr() and seen[0].grad_fn is not None
        else:
            out = ops.residual_after_norm(norm, xs, block)
        assert_close_rel(out.detach(), expected.detach(), tol, f"{kind} block {dtype}")
        assert autograd_uses(xs, out) == 1
        got = torch.autograd.grad(out, [xs, *norm.parameters(), *projection.parameters()], grad_out.to(dtype))
        for index, (g, want) in enumerate(zip(got, expected_grads, strict=True)):
            assert_close_rel(g, want, tol, f"grad {index}")
        plain = block(norm(xs), xs) if layer_adds else xs + block(norm(xs))
        assert autograd_uses(xs, plain) == 2
        norm.to(torch.float64), projection.to(torch.float64)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_residual_after_norm_calls_the_norm_as_is_where_it_cannot_pass_through(kind):
    """A hooked norm, a subclass with its own forward, no gradients or an input that needs none: the norm's
    forward runs (hooks included) and the block is the plain one. A FusedLayerNorm in eval mode passes the
    residual through while gradients are recorded (a checkpointed layer run again after ``model.eval()`` must
    save what its forward saved)."""
    generator = torch.Generator().manual_seed(33)
    x = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64).requires_grad_()
    projection = torch.nn.Linear(8, 8, dtype=torch.float64)

    def check(norm, x_in, passes: bool) -> None:
        out = ops.residual_after_norm(norm, x_in, projection)
        expected = x_in + projection(reference_norm(kind, norm, x_in))
        assert_close_rel(out.detach(), expected.detach(), 1e-12, "plain block")
        if x_in.requires_grad and torch.is_grad_enabled():
            assert autograd_uses(x_in, out) == (1 if passes else 2)

    norm = pass_through_norm(kind, 8, generator)
    check(norm, x, True)
    calls = []
    handle = norm.register_forward_hook(lambda module, args, output: calls.append(1))
    check(norm, x, False)
    assert calls == [1]
    handle.remove()

    class OwnForward(type(norm)):
        def forward(self, x_in):
            calls.append(2)
            return super().forward(x_in)

    norm.__class__ = OwnForward
    check(norm, x, False)
    assert calls == [1, 2]
    norm.__class__ = OwnForward.__mro__[1]
    with torch.no_grad():
        check(norm, x, False)
    check(norm, x.detach(), False)
    if kind == "layer":
        check(norm.eval(), x, True)


def activations_used_twice(output: torch.Tensor) -> collections.Counter:
    """The autograd nodes of ``output``'s graph (by type) one of whose outputs feeds two or more nodes: each
    costs an add kernel in backward to sum the gradients. Parameters (``AccumulateGrad``, tied weights) are left
    out."""
    return collections.Counter(
        type(node).__name__
        for (node, _), count in autograd_edges(output).items()
        if count > 1 and not hasattr(node, "variable")
    )


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "qwen"])
def test_pre_norm_blocks_take_their_residual_through_the_norm(family_pairs, tmp_path, name):
    """No activation of our training graph feeds two nodes: every residual is taken from its norm's autograd node
    (``residual_after_norm``), so no gradient of the residual stream is summed by a separate add. Stock's graph
    sums one per norm (the residual adds' outputs and the embedding's feed the norm and the next residual)."""
    if name == "qwen":
        from test_qwen import load, random_ids, random_model, save_qwen

        torch.manual_seed(8)
        ours = load(save_qwen(random_model(), tmp_path)).train()
        ids = random_ids(2, 9)
        assert activations_used_twice(ours(input_ids=ids, labels=ids).loss) == {}
        return
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(12))
    assert activations_used_twice(ours.train()(**batch).loss) == {}
    assert activations_used_twice(stock.train()(**batch).loss)["AddBackward0"] >= stock.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", TRITON_CASES)
def test_triton_norm_backward_adds_the_residual_gradient_like_stock(dtype, kind, shape):
    """``residual_after_norm`` on CUDA: the norm's backward kernel sums the residual's gradient into x's (no add
    kernel of x's size runs in backward), within twice stock's error (a norm, then ``x + ...``) of float64."""
    generator = torch.Generator().manual_seed(shape[-1] + 7)
    x = 1 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).cuda()

    def run(dtype_, fused: bool) -> list:
        norm = pass_through_norm(kind, shape[-1], torch.Generator().manual_seed(1)).cuda().to(dtype_)
        scale = torch.randn(shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        scale = scale.cuda().to(dtype_)
        inputs = on_cuda(x, dtype=dtype_)
        if fused:
            out = ops.residual_after_norm(norm, inputs[0], lambda normed: normed * scale)
        elif kind == "rms":
            out = inputs[0] + stock_rms_norm(inputs[0], norm.weight, norm.eps) * scale
        else:
            out = inputs[0] + reference_norm(kind, norm, inputs[0]) * scale
        adds = _AddsOfShape(tuple(shape))
        with adds:
            grads = torch.autograd.grad(out, inputs + list(norm.parameters()), grad_out.to(out.dtype))
        assert not fused or adds.count == 0
        return [out.detach(), *grads]

    expected, stock = run(torch.float64, False), run(dtype, False)
    assert_as_close_as_stock(f"{kind} norm with residual", run(dtype, True), stock, expected, dtype)
    triton_paths_ran()
