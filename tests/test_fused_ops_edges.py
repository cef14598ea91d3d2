"""Edge cases of the fused ops, against stock and float64: a saturated softmax in the fused loss, labels outside
the vocabulary, a float16 head under a loss scale, RMSNorm with a float32 weight on a half input; on CUDA the
Triton kernels with strided targets, a first block of -inf logits and a norm backward of no rows. The ops' main
tests are in ``test_fused_ops.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from remote_code import assert_close_rel
from test_fused_ops import ops, random_targets
from test_fused_ops_triton import assert_as_close_as_stock, run_and_grads, stock_rms_norm, triton_paths_ran


def check_precision_when_softmax_saturates(logit_scale: float, device: str) -> None:
    """Logits of a few hundred (a loss of about 900): the log-sum-exp, rounded at that magnitude, must not
    enter the softmax of the gradient; ours is as close to float64 as stock's float32 log_softmax."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(23, 16, generator=generator, dtype=torch.float64)
    weight = logit_scale * torch.randn(41, 16, generator=generator, dtype=torch.float64)
    targets = random_targets(23, 41, 0.2, generator).to(device)

    def stock_fn(h, w):
        return F.cross_entropy(h @ w.t(), targets)

    def ours_fn(h, w):
        return ops.linear_cross_entropy(h, w, targets, chunk_size=5)

    def cast(dtype):
        return [t.to(device, dtype).requires_grad_() for t in (hidden, weight)]

    reference = run_and_grads(stock_fn, cast(torch.float64), None)
    stock = run_and_grads(stock_fn, cast(torch.float32), None)
    ours = run_and_grads(ours_fn, cast(torch.float32), None)
    assert reference[0] > logit_scale  # saturated: the loss is of the logits' magnitude
    assert_as_close_as_stock("saturated linear_cross_entropy", ours, stock, reference, torch.float32)


@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_linear_cross_entropy_keeps_precision_when_softmax_saturates(logit_scale):
    check_precision_when_softmax_saturates(logit_scale, "cpu")


@pytest.mark.parametrize("bad", [-1, 41])
def test_labels_outside_the_vocabulary_are_refused(bad):
    """As PyTorch's loss refuses them (the Triton kernel would have read another row's logit)."""
    targets = torch.tensor([3, bad, -100, 7])
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 41\) or be ignore_index \(-100\)"):
        ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(41, 8), targets)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("wants", [(True, True, True), (True, False, False), (False, True, True), (False, True, False)])
def test_float16_head_gradients_taken_in_backward_are_as_close_to_float64_as_stock(wants, compiled):
    """A float16 head takes its gradients in backward, at the incoming gradient (a loss scale of 2**16 here):
    every combination of what needs one (a frozen head, hidden states without one), with a bias, eager and
    compiled (the backward's own opaque op), and a second backward that gives what the first gave."""
    generator = torch.Generator().manual_seed(15)
    values = (torch.randn(37, 16, generator=generator), torch.randn(41, 16, generator=generator), torch.randn(41))
    targets = random_targets(37, 41, 0.2, generator)

    def stock_fn(hidden, weight, bias):
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)

    def ours_fn(hidden, weight, bias):
        return ops.linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=5)

    if compiled:
        torch._dynamo.reset()
        ours_fn = torch.compile(ours_fn, backend="aot_eager", fullgraph=True)
    results = {}
    for name, fn, dtype in (("reference", stock_fn, torch.float64), ("stock", stock_fn, torch.float16),
                            ("ours", ours_fn, torch.float16)):  # fmt: skip
        inputs = [value.to(dtype).requires_grad_(wanted) for value, wanted in zip(values, wants, strict=True)]
        loss = fn(*inputs)
        trained = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(loss, trained, torch.tensor(2.0**16), retain_graph=True)
        results[name] = [loss.detach(), *(grad / 2**16 for grad in grads)]
        assert all(torch.isfinite(grad).all() for grad in grads), name
        if name == "ours":
            again = torch.autograd.grad(loss, trained, torch.tensor(2.0**16))
            assert all(torch.equal(a, b) for a, b in zip(again, grads, strict=True))
    assert_as_close_as_stock("float16 head", results["ours"], results["stock"], results["reference"], torch.float16)


def check_bf16_loss_gradient_scale_is_not_rounded(device: str, compiled: bool) -> None:
    """``(loss / 3).backward()`` on a bf16 head (gradient accumulation by hand, accelerate's ``backward``): the
    gradients kept from forward are scaled by float32's 1/3 and rounded once, not by bf16's 1/3 (0.2% high)."""
    generator = torch.Generator().manual_seed(21)
    values = (torch.randn(37, 16, generator=generator), torch.randn(41, 16, generator=generator), torch.randn(41))
    targets = random_targets(37, 41, 0.2, generator).to(device)

    def ours_fn(hidden, weight, bias):
        return ops.linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=5)

    if compiled:
        torch._dynamo.reset()
        ours_fn = torch.compile(ours_fn, backend="aot_eager", fullgraph=True)

    def grads_at(divisor: float) -> list:
        inputs = [value.to(device, torch.bfloat16).requires_grad_() for value in values]
        return torch.autograd.grad(ours_fn(*inputs) / divisor, inputs)

    third = torch.tensor(1 / 3, device=device)
    for unscaled, scaled in zip(grads_at(1.0), grads_at(3.0), strict=True):
        assert torch.equal(scaled, (unscaled.float() * third).bfloat16())
        assert not torch.equal(scaled, unscaled * third.bfloat16())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_loss_gradient_scale_is_not_rounded(compiled):
    check_bf16_loss_gradient_scale_is_not_rounded("cpu", compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_loss_gradient_scale_is_not_rounded_on_cuda(compiled):
    check_bf16_loss_gradient_scale_is_not_rounded("cuda", compiled)
    triton_paths_ran()


def test_rms_norm_backward_with_a_float32_weight_rounds_as_stock():
    """bf16 input, float32 weight (PEFT's prepare_model_for_kbit_training upcasts norms): stock rounds
    ``grad * weight`` to the input's dtype where it backpropagates through the cast, as the Triton kernel does."""
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(8, 256, generator=generator).to(torch.bfloat16).requires_grad_()
    weight = (1 + 0.2 * torch.randn(256, generator=generator)).requires_grad_()
    grad = torch.randn(8, 256, generator=generator)
    expected = torch.autograd.grad(stock_rms_norm(x, weight, 1e-6), (x, weight), grad)
    got = torch.autograd.grad(ops.rms_norm(x, weight, 1e-6), (x, weight), grad)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cross_entropy_takes_strided_targets_and_a_first_block_of_minus_inf():
    """The kernel read targets at stride 1, and a row whose first 4,096 logits are -inf (tokens banned by a bias)
    turned its running sum to NaN (-inf - -inf)."""
    generator = torch.Generator().manual_seed(14)
    hidden = torch.randn(6, 16, generator=generator).cuda()
    weight = torch.randn(4200, 16, generator=generator).cuda()
    bias = torch.zeros(4200).cuda()
    bias[:4096] = float("-inf")
    strided = torch.randint(4096, 4200, (6, 2), generator=generator).cuda()[:, 0]
    for targets, row_bias in ((strided, None), (strided.contiguous(), bias)):
        loss = ops.linear_cross_entropy(hidden, weight, targets, bias=row_bias, chunk_size=4)
        expected = F.cross_entropy(F.linear(hidden, weight, row_bias), targets)
        assert_close_rel(loss, expected, 1e-5, f"loss, bias {row_bias is not None}")
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_triton_norm_backward_of_no_rows_falls_back_without_disabling_the_kernel(norm):
    """No rows to split over programs divided by zero: the kernel was marked failed for the whole process."""
    x = torch.randn(0, 64, device="cuda", requires_grad=True)
    weight = torch.ones(64, device="cuda", requires_grad=True)
    if norm == "rms":
        out = ops.rms_norm(x, weight, 1e-6)
    else:
        out = ops.FusedLayerNorm(64).cuda()(x)
    out.sum().backward()
    assert x.grad.shape == (0, 64)
    triton_paths_ran()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_triton_linear_cross_entropy_keeps_precision_when_softmax_saturates(logit_scale):
    check_precision_when_softmax_saturates(logit_scale, "cuda")
    triton_paths_ran()


def peak_allocated_bytes(step) -> int:
    """The most host memory held at once by the tensors ``step`` allocates: the profiler's allocation records
    (frees are negative), summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if type(event.extra_fields).__name__ == "_ExtraFields_Allocation":
            records.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    held = peak = 0
    for _, size in sorted(records):
        held += size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_of_one_chunk_holds_one_float32_logits_tensor_on_the_cpu(dtype):
    """The PyTorch body (CPU, and wherever Triton is missing) held the logits, their float32 copy, the shifted
    logits, the log-sum-exp's exponentials, the gradient and its scaled copy at once: about 4x a float32
    ``[rows, vocab]`` at fp32 and 4.5x at bf16, a step's peak above stock's. Now the chunk's own logits (and one
    float32 copy of half-precision ones) are worked on in place."""
    generator = torch.Generator().manual_seed(11)
    rows, vocab, width = 512, 4096, 32
    hidden = torch.randn(rows, width, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width, generator=generator).to(dtype).requires_grad_()
    targets = random_targets(rows, vocab, 0.1, generator)

    def step():
        ops.linear_cross_entropy(hidden, weight, targets, chunk_size=rows).backward()

    float32_logits = rows * vocab * 4
    chunk_logits = rows * vocab * dtype.itemsize
    allowed = float32_logits + (chunk_logits if dtype != torch.float32 else 0) + float32_logits // 4
    assert peak_allocated_bytes(step) <= allowed


def test_a_layer_norm_input_of_another_width_gets_stocks_error_naming_the_shapes():
    """BLOOM given inputs_embeds one wider than its hidden size failed inside the fused op with a bare size mismatch."""
    norm = ops.FusedLayerNorm(32).train()
    x = torch.randn(2, 7, 33, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[32\], expected input with shape \[\*, 32\]"):
        norm(x)




def rotate_as_stock(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def outputs_a_loss_reads(name: str, fused: bool, x, weight, bias) -> list:
    """The outputs of a several-output op that reach the loss: the others are read by nothing differentiable."""
    if name == "rms_norm":
        return [ops.rms_norm(x, weight, 1e-6, with_residual=True)[1] if fused else x]
    if name == "layer_norm":
        norm = ops.FusedLayerNorm(8).to(x).train()
        norm.weight, norm.bias = weight, bias
        return [norm.with_residual(x)[1] if fused else x]
    if name == "projections":
        linears = [torch.nn.Linear(8, 4, dtype=x.dtype, device=x.device) for _ in range(2)]
        linears[0].weight, linears[0].bias = weight, bias
        with torch.no_grad():
            linears[1].weight.copy_(weight.flip(0)), linears[1].bias.copy_(bias.flip(0))
        outputs = ops.shared_input_projections(x, *linears) if fused else [linear(x) for linear in linears]
        return [outputs[1]]
    cos, sin = bias.detach().cos(), bias.detach().sin()
    q, k = x.unsqueeze(2), weight.view(2, 4, 1, 8)
    return [ops.rotary_pair(q, k, cos, sin)[1] if fused else rotate_as_stock(k, cos, sin)]


ON_DEVICES = [
    ("cpu", torch.float64, 1e-12),
    pytest.param("cuda", torch.float32, 1e-5, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device, dtype, tol", ON_DEVICES)
@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "projections", "rotary"])
def test_an_output_that_reaches_no_loss_leaves_its_inputs_without_gradient_as_stock(name, device, dtype, tol):
    """A None gradient (an output read only by a non-differentiable module, such as a dynamically quantized
    linear) stays None: our ops turned it into zeros, which an optimizer's weight decay then moved. On CUDA
    through the Triton kernels."""
    generator = torch.Generator().manual_seed(11)
    shapes = {"x": (2, 4, 8), "weight": {"projections": (4, 8), "rotary": (64,)}.get(name, (8,)),
              "bias": (4,) if name == "projections" else (8,)}
    values = {key: torch.randn(shape, generator=generator, dtype=dtype).to(device) for key, shape in shapes.items()}
    grads = []
    for fused in (True, False):
        leaves = {key: torch.nn.Parameter(value.clone()) for key, value in values.items()}
        sum(output.pow(2).sum() for output in outputs_a_loss_reads(name, fused, **leaves)).backward()
        grads.append({key: leaf.grad for key, leaf in leaves.items()})
    fused_grads, stock_grads = grads
    assert any(grad is None for grad in stock_grads.values()), stock_grads
    for key, expected in stock_grads.items():
        assert (fused_grads[key] is None) == (expected is None), f"{name}: {key}"
        if expected is not None:
            assert_close_rel(fused_grads[key], expected, tol, f"{name}: gradient of {key}")
    if device == "cuda" and name != "projections":
        triton_paths_ran()
