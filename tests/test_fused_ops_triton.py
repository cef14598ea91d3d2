"""The fused ops' Triton kernels on the GPU: each against a float64 reference, values and gradients, as close as
stock PyTorch in the same dtype (odd widths and row counts, so that every kernel's masked tail runs). Their
pure-PyTorch paths are tested on the CPU in ``test_fused_ops.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from remote_code import relative_error
from test_fused_ops import ops, random_targets, reference_rotary

# odd widths and row counts: masked tails in every kernel, a row wider than one cross-entropy block
TRITON_CASES = [(3, 7, 37), (2, 129, 1000), (4099, 64)]
CE_CASES = [(37, 16, 53, 8), (300, 64, 5003, 128), (1029, 32, 32000, 256)]  # rows, d, vocab, chunk


def error_against(reference: torch.Tensor, value: torch.Tensor) -> float:
    return relative_error(value.double(), reference.double())


def assert_as_close_as_stock(name: str, ours: list, stock: list, reference: list, dtype: torch.dtype) -> None:
    """Each of ours is within twice stock's error (same dtype) against the float64 reference (fp32: 2e-6)."""
    for index, (got, plain, want) in enumerate(zip(ours, stock, reference, strict=True)):
        limit = 2 * error_against(want, plain) + (2e-6 if dtype == torch.float32 else 1e-3)
        assert error_against(want, got) <= limit, (name, index, error_against(want, got), limit)


def on_cuda(*tensors, dtype):
    return [t.detach().cuda().to(dtype).requires_grad_() for t in tensors]


def stock_rms_norm(x, weight, eps):
    x_float = x.float() if x.dtype != torch.float64 else x
    return weight * (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def run_and_grads(fn, inputs: list, grad_out) -> list:
    """``fn(*inputs)`` and the gradients of its inputs (under ``grad_out``, or of a scalar output)."""
    out = fn(*inputs)
    grad = None if grad_out is None else grad_out.to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def triton_paths_ran() -> None:
    assert ops.triton is not None, "Triton is not installed with this CUDA build of torch"
    assert not ops._triton_failed, f"Triton kernels fell back to PyTorch: {ops._triton_failed}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TRITON_CASES)
def test_triton_norm_and_activations_match_float64_like_stock(dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    up = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = 1 + 0.3 * torch.randn(shape[-1], generator=generator, dtype=torch.float64)
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).cuda()
    cases = {
        "rms_norm": (lambda a, w: ops.rms_norm(a, w, 1e-6), lambda a, w: stock_rms_norm(a, w, 1e-6), [x, weight]),
        "silu_mul": (lambda a, u: ops.gated_activation("silu", a, u, None), lambda a, u: F.silu(a) * u, [x, up]),
        "gelu_tanh": (lambda a: ops.activation("gelu_new", a, None), lambda a: F.gelu(a, approximate="tanh"), [x]),
        "gelu": (lambda a: ops.activation("gelu", a, None), F.gelu, [x]),
    }
    for name, (ours_fn, stock_fn, inputs) in cases.items():
        reference = run_and_grads(stock_fn, on_cuda(*inputs, dtype=torch.float64), grad_out)
        stock = run_and_grads(stock_fn, on_cuda(*inputs, dtype=dtype), grad_out)
        ours = run_and_grads(ours_fn, on_cuda(*inputs, dtype=dtype), grad_out)
        assert_as_close_as_stock(name, ours, stock, reference, dtype)
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu", "gelu_new", "gelu"])
def test_triton_projected_activation_matches_float64_like_stock(dtype, name):
    generator = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(2, 67, 97, generator=generator, dtype=torch.float64)
    up = torch.randn(2, 67, 97, generator=generator, dtype=torch.float64)
    head = torch.nn.Linear(97, 45, dtype=torch.float64)
    grad_out = torch.randn(2, 67, 45, generator=generator, dtype=torch.float64).cuda()
    act = {"silu": F.silu, "gelu_new": lambda a: F.gelu(a, approximate="tanh"), "gelu": F.gelu}[name]
    gated = name == "silu"

    def run(dtype_, fused: bool) -> list:
        projection = torch.nn.Linear(97, 45).cuda().to(dtype_)
        projection.load_state_dict(head.state_dict())
        inputs = on_cuda(x, up, dtype=dtype_) if gated else on_cuda(x, dtype=dtype_)
        if fused:
            out = ops.projected_activation(name, inputs[0], projection, None, up=inputs[1] if gated else None)
            assert type(out.grad_fn).__name__ == "_ActivationLinearBackward"
        else:
            out = projection(act(inputs[0]) * inputs[1] if gated else act(inputs[0]))
        leaves = inputs + [projection.weight, projection.bias]
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]

    reference, stock, ours = run(torch.float64, False), run(dtype, False), run(dtype, True)
    assert_as_close_as_stock(f"projected {name}", ours, stock, reference, dtype)
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TRITON_CASES)
def test_triton_layer_norm_matches_float64_like_stock(dtype, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    x = 3 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    reference = torch.nn.LayerNorm(shape[-1], dtype=torch.float64)
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, generator=generator)
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).cuda()

    def run(dtype_, module_class) -> list:
        norm = module_class(shape[-1], device="cuda", dtype=dtype_)
        norm.load_state_dict(reference.state_dict())
        inputs = on_cuda(x, dtype=dtype_)
        out = norm(inputs[0])
        return [out.detach(), *torch.autograd.grad(out, inputs + [norm.weight, norm.bias], grad_out.to(out.dtype))]

    expected, stock = run(torch.float64, torch.nn.LayerNorm), run(dtype, torch.nn.LayerNorm)
    assert_as_close_as_stock("layer norm", run(dtype, ops.FusedLayerNorm), stock, expected, dtype)
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["silu_mul", "gelu_tanh", "gelu"])
def test_triton_activation_gradients_with_the_value_match_the_separate_kernels_bit_for_bit(kind):
    """The projected activation's backward recomputes the value in the kernel that computes the gradients:
    the same value the forward kernel makes (so the weight's gradient is unchanged), the same gradients as
    the gradient-only kernel, and the gradient of x written over the incoming gradient (no new buffer)."""
    generator = torch.Generator().manual_seed(21)
    shape = (3, 129, 1001)  # not a multiple of the kernel's block
    x, up, grad = (torch.randn(shape, generator=generator).mul(2).cuda().bfloat16() for _ in range(3))
    up = up if kind == "silu_mul" else None
    expected_value = ops._activation_forward_triton(kind, x, up)
    expected_grads = ops._activation_backward_triton(kind, grad, x, up)
    owned = grad.clone()
    grad_x, grad_up, value = ops._activation_grads_and_value_triton(kind, owned, x, up)
    assert grad_x.data_ptr() == owned.data_ptr()
    assert torch.equal(value, expected_value) and torch.equal(grad_x, expected_grads[0])
    assert (grad_up is None and expected_grads[1] is None) or torch.equal(grad_up, expected_grads[1])
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim,vocab,chunk", CE_CASES)
def test_triton_linear_cross_entropy_matches_float64_like_stock(dtype, rows, dim, vocab, chunk):
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64) / dim**0.5
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
    targets = random_targets(rows, vocab, 0.2, generator).cuda()

    def stock_fn(h, w, b):
        return F.cross_entropy(F.linear(h, w, b).float() if h.dtype != torch.float64 else F.linear(h, w, b), targets)

    def ours_fn(h, w, b):
        return ops.linear_cross_entropy(h, w, targets, bias=b, chunk_size=chunk) * 3.0  # a gradient of 3

    tensors = [hidden, weight, bias]
    reference = [3 * v for v in run_and_grads(stock_fn, on_cuda(*tensors, dtype=torch.float64), None)]
    stock = [3 * v for v in run_and_grads(stock_fn, on_cuda(*tensors, dtype=dtype), None)]
    ours = run_and_grads(ours_fn, on_cuda(*tensors, dtype=dtype), None)
    assert_as_close_as_stock("linear_cross_entropy", ours, stock, reference, dtype)
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd_view", "contiguous", "partial_rotary"])
def test_triton_rotary_matches_float64_like_stock(dtype, layout):
    """RoPE on a transposed [b, s, h, d] view (LLaMA's q/k), a contiguous tensor with cos/sin shared by the
    batch, and Qwen's first channels of a wider head (a slice whose rows are strided)."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, seq, dim = 2, 3, 77, 64
    width = dim + 32 if layout == "partial_rotary" else dim
    base = torch.randn(batch, seq, heads, width, generator=generator, dtype=torch.float64)
    angles = torch.randn(1 if layout == "contiguous" else batch, 1, seq, dim // 2, generator=generator) * 3
    angles = torch.cat((angles, angles), dim=-1).double()
    grad_out = torch.randn(batch, heads, seq, dim, generator=generator, dtype=torch.float64).cuda()

    def run(dtype_, fn) -> list:
        leaf = base.cuda().to(dtype_).requires_grad_()
        x = leaf.transpose(1, 2)
        x = x.contiguous() if layout == "contiguous" else x
        x = x[..., :dim] if layout == "partial_rotary" else x
        out = fn(x, angles.cos().cuda().to(dtype_), angles.sin().cuda().to(dtype_))
        return [out.detach(), *torch.autograd.grad(out, [leaf], grad_out.to(out.dtype))]

    ours, stock, reference = run(dtype, ops.rotary), run(dtype, reference_rotary), run(torch.float64, reference_rotary)
    assert_as_close_as_stock("rotary", ours, stock, reference, dtype)
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["llama_gqa", "qwen_fused_projection"])
def test_triton_rotary_pair_matches_float64_like_stock(dtype, layout):
    """q and k in one kernel: LLaMA's transposed views with fewer k heads, and Qwen's q/k as strided slices of
    one fused projection rotated by float32 cos/sin into their own dtype."""
    generator = torch.Generator().manual_seed(5)
    batch, heads, seq, dim = 2, 4, 77, 64
    k_heads = 2 if layout == "llama_gqa" else heads
    mixed = torch.randn(batch, seq, heads + k_heads, dim, generator=generator, dtype=torch.float64)
    angles = torch.randn(batch, 1, seq, dim // 2, generator=generator) * 3
    angles = torch.cat((angles, angles), dim=-1).double()
    grads_out = [torch.randn(batch, h, seq, dim, generator=generator, dtype=torch.float64) for h in (heads, k_heads)]
    qwen = layout == "qwen_fused_projection"

    def run(dtype_, rotate) -> list:
        leaf = mixed.cuda().to(dtype_).requires_grad_()
        q, k = leaf[:, :, :heads].transpose(1, 2), leaf[:, :, heads:].transpose(1, 2)
        # Qwen's cos/sin are float32 whatever the model's dtype (float64 for the reference)
        angle_dtype = (torch.float64 if dtype_ == torch.float64 else torch.float32) if qwen else dtype_
        cos, sin = angles.cos().cuda().to(angle_dtype), angles.sin().cuda().to(angle_dtype)
        outs = rotate(q, k, cos, sin, dtype_)
        grads = torch.autograd.grad(outs, [leaf], [g.cuda().to(dtype_) for g in grads_out])
        return [*(out.detach() for out in outs), *grads]

    def stock(q, k, cos, sin, dtype_):
        return [reference_rotary(x.to(cos.dtype) if qwen else x, cos, sin).to(dtype_) for x in (q, k)]

    ours = run(dtype, lambda q, k, cos, sin, dtype_: ops.rotary_pair(q, k, cos, sin, dtype=dtype_))
    assert_as_close_as_stock("rotary_pair", ours, run(dtype, stock), run(torch.float64, stock), dtype)
    triton_paths_ran()
