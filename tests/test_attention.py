"""The kernel layer against a float64 reference written here: every backend on random cases, dropout, memory,
the flash_attn/xformers glue, NaN handling, per-forward settings and tracing. The dispatcher's choices and errors
are tested in ``test_backend_selection.py``, the GPU backends in ``test_attention_gpu.py``."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import memory_efficient_adapter as mea
from remote_code import assert_close_rel
kernel_layer = importlib.import_module("memory_efficient_adapter.attention")

CPU_BACKENDS = ["sdpa", "chunked", "eager"]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------------------------
# The reference: plain float64 math, written from the contract
# ----------------------------------------------------------------------------------------------


def reference_attention(q, k, v, causal=False, mask=None, slopes=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    q_len, k_len = q.shape[2], k.shape[2]
    device = q.device
    query_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key_pos = torch.arange(k_len, device=device)[None, :]
    keep = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (key_pos <= query_pos)
    if slopes is not None:
        scores = scores + slopes.double()[None, :, None, None] * (key_pos - query_pos)
    if mask is not None and mask.dim() == 2:
        keep = keep & mask[:, None, None, :]
    elif mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        hidden = mask <= torch.finfo(mask.dtype).min
        keep = keep & ~hidden
        scores = scores + mask.double().masked_fill(hidden, 0.0)
    scores = scores.masked_fill(~keep, float("-inf"))
    row_has_key = keep.any(dim=-1, keepdim=True)  # a row that sees no key is zero; a NaN input stays NaN
    probs = torch.softmax(scores, dim=-1).masked_fill(~row_has_key, 0.0)
    return probs @ v


def random_case(gen: torch.Generator, dtype=torch.float32):
    """One random call: shapes, GQA, causal alignment, a mask kind, ALiBi and scale drawn from ``gen``."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    batch, kv_heads = pick([1, 2, 3]), pick([1, 2, 3])
    heads = kv_heads * pick([1, 2, 4])
    head_dim = pick([16, 32, 40])
    q_len = pick([1, 5, 17, 33, 64])
    k_len = q_len if pick([True, False]) else q_len + pick([0, 3, 30])
    causal = pick([True, False])
    mask_kind = pick(["none", "padding", "bool", "additive", "bool_broadcast"])

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = randn(batch, heads, q_len, head_dim), randn(batch, kv_heads, k_len, head_dim), randn(batch, kv_heads, k_len, head_dim)
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(batch, k_len, dtype=torch.bool)
        mask[0, : pick([1, k_len // 2, k_len])] = False  # left padding, sometimes a fully padded sample
        if batch > 1:
            mask[-1, k_len - pick([1, 2]) :] = False  # right padding
    elif mask_kind == "bool":
        mask = torch.rand(batch, heads, q_len, k_len, generator=gen) > 0.3
        mask[0, 0, 0] = False  # a row with no visible key
    elif mask_kind == "bool_broadcast":
        mask = torch.rand(batch, 1, 1, k_len, generator=gen) > 0.4
    elif mask_kind == "additive":
        mask = torch.randn(batch, 1, q_len, k_len, generator=gen)
        mask[0, 0, :, : k_len // 3] = torch.finfo(torch.float32).min
        mask = mask.to(dtype)
    slopes = torch.rand(heads, generator=gen) if pick([True, False]) else None
    scale = pick([None, 0.3])
    return dict(q=q, k=k, v=v, causal=causal, mask=mask, slopes=slopes, scale=scale)


def padded_query_rows(case: dict):
    """``[b, 1, q_len, 1]``, True at query rows whose own position is padding (a 2-D keep-mask), or None.

    The contract leaves those rows' outputs unspecified: a backend returns the reference's value there, or
    zeros (the varlen kernels, as flash-attention-2 does in transformers). Every other row must be exact."""
    mask = case["mask"]
    if mask is None or mask.dim() != 2:
        return None
    return ~mask[:, -case["q"].shape[2] :][:, None, :, None].to(case["q"].device)


def assert_padded_rows_are_reference_or_zero(out, expected, padded, tol: float, describe: dict, backend: str) -> None:
    row_error = (out.double() - expected).norm(dim=-1, keepdim=True)
    row_is_reference = row_error <= 5 * tol * expected.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    row_is_zero = out.double().norm(dim=-1, keepdim=True) == 0
    allowed = row_is_reference | row_is_zero | ~padded
    assert allowed.all(), f"{backend}: a padded query row is neither the reference nor zero for {describe}"


def run_and_compare(backend: str, case: dict, dtype: torch.dtype, with_grad: bool = True) -> tuple[float, float]:
    """Assert ``backend`` matches the float64 reference; return the forward and worst gradient errors."""
    q, k, v = (case[name].clone().requires_grad_(with_grad) for name in "qkv")
    out = mea.attention(
        q, k, v, causal=case["causal"], attention_mask=case["mask"], alibi_slopes=case["slopes"],
        scale=case["scale"], backend=backend,
    )
    q64, k64, v64 = (case[name].double().requires_grad_(with_grad) for name in "qkv")
    expected = reference_attention(q64, k64, v64, case["causal"], case["mask"], case["slopes"], case["scale"])
    describe = {key: (tuple(val.shape) if torch.is_tensor(val) else val) for key, val in case.items()}
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all(), f"{backend}: non-finite output for {describe}"
    tol = TOLERANCE[dtype]
    padded = padded_query_rows(case)
    defined = torch.ones_like(expected, dtype=torch.bool) if padded is None else ~padded.expand_as(expected)
    kept_out, kept_expected = out.double() * defined, expected * defined
    err = ((kept_out - kept_expected).norm() / kept_expected.norm().clamp_min(1e-12)).item()
    assert err < tol, f"{backend}: forward relative error {err:.2e} for {describe}"
    if padded is not None:
        assert_padded_rows_are_reference_or_zero(out.detach(), expected.detach(), padded, tol, describe, backend)
    forward_err, grad_err = err, 0.0
    if not with_grad:
        return forward_err, grad_err
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device) * defined
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out)
    for name, got, want in zip("qkv", grads, expected_grads):
        assert torch.isfinite(got).all(), f"{backend}: non-finite d{name} for {describe}"
        # a row that sees a single key has dq = 0: measure against the gradient's scale, not only its norm
        scale_of_want = want.norm() + 1e-2 * want.numel() ** 0.5
        err = ((got.double() - want).norm() / scale_of_want).item()
        assert err < 2 * tol, f"{backend}: d{name} relative error {err:.2e} for {describe}"
        grad_err = max(grad_err, err)
    return forward_err, grad_err


def backend_takes(backend: str, case: dict) -> bool:
    return not (backend == "sdpa" and case["slopes"] is not None)


@pytest.fixture
def small_chunks():
    """Small blocks so that the chunked backend really walks several query and key blocks."""
    mea.set_chunk_sizes(query=16, key=24)
    yield
    mea.set_chunk_sizes()


def kernel_unavailable(*args, **kwargs):
    raise RuntimeError("No available kernel. Aborting execution.")


# ----------------------------------------------------------------------------------------------
# Correctness on random cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_float64_reference_on_random_cases(backend, dtype, small_chunks):
    gen = torch.Generator().manual_seed(1234 + CPU_BACKENDS.index(backend))
    checked = 0
    while checked < 30:
        case = random_case(gen, dtype)
        if backend_takes(backend, case):
            run_and_compare(backend, case, dtype)
            checked += 1


@pytest.mark.slow
def test_flex_forward_matches_float64_reference_on_cpu():
    gen = torch.Generator().manual_seed(99)
    checked = 0
    while checked < 4:
        case = random_case(gen, torch.float32)
        if case["q"].shape[-1] >= 32:
            run_and_compare("flex", case, torch.float32, with_grad=False)
            checked += 1


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_rows_without_visible_keys_are_zero_with_finite_gradients(backend):
    q = torch.randn(2, 2, 6, 16, requires_grad=True)
    k = torch.randn(2, 2, 6, 16, requires_grad=True)
    v = torch.randn(2, 2, 6, 16, requires_grad=True)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :3] = False  # left padding: with causal masking, queries 0..2 of sample 0 see nothing
    keep[1, :] = False  # a fully padded sample
    out = mea.attention(q, k, v, causal=True, attention_mask=keep, backend=backend)
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, :, 3:].abs().sum() > 0
    out.sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_decode_step_is_bottom_right_aligned():
    q = torch.randn(1, 4, 1, 32)
    k, v = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    full = reference_attention(q, k, v, causal=False)
    for backend in CPU_BACKENDS:
        out = mea.attention(q, k, v, causal=True, backend=backend)
        assert torch.allclose(out.double(), full, atol=1e-5), backend


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sdpa_takes_alibi_for_a_decoding_step_only(dtype):
    """One query row makes ALiBi an O(k) bias, so sdpa runs BLOOM's decoding steps (static caches under
    torch.compile among them); longer calls are refused. Left padding and GQA, against float64."""
    gen = torch.Generator().manual_seed(5)
    slopes = mea.alibi_slopes(8)
    keep = torch.ones(3, 29, dtype=torch.bool)
    keep[0, :6], keep[1, :1] = False, False
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    for causal in (True, False):
        q = torch.randn(3, 8, 1, 32, generator=gen).to(dtype)
        k, v = (torch.randn(3, 2, 29, 32, generator=gen).to(dtype) for _ in range(2))
        for mask in (None, keep):
            out = mea.attention(q, k, v, causal=causal, alibi_slopes=slopes, attention_mask=mask, backend="sdpa")
            expected = reference_attention(q, k, v, causal=causal, mask=mask, slopes=slopes)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < tol, (causal, mask is not None, error)
    assert kernel_layer._why_not("sdpa", kernel_layer._describe(q, k, v, True, None, slopes, 0.0)) is None
    two_rows = torch.randn(3, 8, 2, 32).to(dtype)
    with pytest.raises(ValueError, match="sdpa cannot take ALiBi beyond one query row"):
        mea.attention(two_rows, k, v, causal=True, alibi_slopes=slopes, backend="sdpa")


# ----------------------------------------------------------------------------------------------
# Dropout, light softmax and the fused dropout-matmul
# ----------------------------------------------------------------------------------------------


def test_eager_keeps_the_digits_of_a_large_alibi_bias_in_bfloat16():
    """ALiBi over a long non-causal row adds hundreds to the scores, where bfloat16 steps by 2 to 4 (eager: 0.2 off)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 16, 1031, 32, generator=gen).to(torch.bfloat16) for _ in range(3))
    slopes = mea.alibi_slopes(16)
    expected = reference_attention(q, k, v, causal=False, slopes=slopes, scale=0.07)
    for backend in ("eager", "chunked"):
        out = mea.attention(q, k, v, causal=False, alibi_slopes=slopes, scale=0.07, backend=backend)
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < TOLERANCE[torch.bfloat16], (backend, error)


def test_a_named_backend_that_fails_on_its_own_says_which_and_on_what(monkeypatch):
    """A named backend's compile or kernel failure: one RuntimeError naming it and the call, from the original."""
    inductor_error = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})

    def failing_kernel(*args, **kwargs):
        raise inductor_error("LoweringException: NoValidChoicesError: No choices to select.\nlong trace")

    monkeypatch.setitem(kernel_layer._RUN, "chunked", failing_kernel)
    q = torch.randn(1, 4, 9, 16)
    message = r"attention backend 'chunked' failed on this call \(head_dim 16, 4 heads"
    with pytest.raises(RuntimeError, match=message) as raised:
        mea.attention(q, q, q, causal=True, backend="chunked")
    assert "NoValidChoicesError" in str(raised.value) and "long trace" not in str(raised.value)
    assert isinstance(raised.value.__cause__, inductor_error)


@pytest.mark.parametrize("backend", ["chunked", "eager"])
def test_dropout_backward_is_exact_for_a_fixed_seed(backend, small_chunks):
    """With the RNG reset before each call the dropped attention is a fixed function: gradcheck it in float64."""
    mea.set_chunk_sizes(query=4, key=5)
    q = torch.randn(1, 2, 11, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 13, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 13, 4, dtype=torch.float64, requires_grad=True)

    def dropped_attention(q, k, v):
        torch.manual_seed(7)
        return mea.attention(q, k, v, causal=True, alibi_slopes=torch.rand(2), dropout_p=0.3, backend=backend)

    assert torch.autograd.gradcheck(dropped_attention, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)
    no_dropout = mea.attention(q, k, v, causal=True, backend=backend)
    assert not torch.allclose(dropped_attention(q, k, v), no_dropout)


def test_chunked_dropout_does_not_follow_the_default_dtype(small_chunks):
    """Under ``torch.set_default_dtype(torch.float64)``: the same masks and float32 gradients (backward failed)."""
    mea.set_chunk_sizes(query=4, key=5)
    q, k, v = (torch.randn(1, 2, 11, 8, requires_grad=True) for _ in range(3))
    results = []
    for default in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            torch.manual_seed(7)
            out = mea.attention(q, k, v, causal=True, dropout_p=0.3, backend="chunked")
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        finally:
            torch.set_default_dtype(previous)
        results.append((out, *grads))
    for expected, actual in zip(*results):
        assert actual.dtype == torch.float32 and torch.equal(actual, expected)


@pytest.mark.parametrize("backend", ["chunked", "eager", "sdpa"])
def test_dropout_is_unbiased(backend, small_chunks):
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    expected = reference_attention(q, k, v, causal=True)
    mean = sum(mea.attention(q, k, v, causal=True, dropout_p=0.2, backend=backend) for _ in range(400)) / 400
    err = ((mean.double() - expected).norm() / expected.norm()).item()
    assert err < 0.08, f"mean of dropped outputs is {err:.3f} away from the undropped output"


def saved_tensors_of(fn, *args):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*args)
    return out, saved


def test_light_softmax_saves_only_its_output_and_has_exact_gradients():
    scores = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    out, saved = saved_tensors_of(mea.LightSoftmax.apply, scores)
    assert len(saved) == 1 and (saved[0] is out or torch.equal(saved[0], out))
    assert torch.allclose(out, torch.softmax(scores, dim=-1))
    assert torch.autograd.gradcheck(mea.LightSoftmax.apply, (scores,))


def test_dropout_matmul_saves_a_bool_mask_not_the_dropped_probabilities():
    probs = torch.softmax(torch.randn(2, 3, 7, 9, dtype=torch.float64), dim=-1).requires_grad_()
    value = torch.randn(2, 3, 9, 4, dtype=torch.float64, requires_grad=True)
    _, saved = saved_tensors_of(mea.DropoutMatmul.apply, probs, value, 0.25)
    saved_dtypes = sorted(str(t.dtype) for t in saved)
    assert saved_dtypes == ["torch.bool", "torch.float64", "torch.float64"]
    assert any(t is probs for t in saved) and any(t is value for t in saved)

    def fixed_seed(p, v):
        torch.manual_seed(3)
        return mea.DropoutMatmul.apply(p, v, 0.25)

    assert torch.autograd.gradcheck(fixed_seed, (probs, value))


def test_light_eager_path_equals_plain_eager_path_under_one_seed():
    q, k, v = (torch.randn(2, 4, 12, 16, requires_grad=True) for _ in range(3))
    results = []
    for light in (True, False):
        torch.manual_seed(11)
        out = mea.attention(q, k, v, causal=True, dropout_p=0.1, backend="eager", light_softmax=light, dropout_matmul=light)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Memory: chunked forward + backward at 16k tokens stays far below one score matrix
# ----------------------------------------------------------------------------------------------


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    import memory_efficient_adapter as mea
    torch.manual_seed(0)
    n = int(sys.argv[1])
    q, k, v = (torch.randn(1, 1, n, 32, requires_grad=True) for _ in range(3))
    mea.set_chunk_sizes(query=1024, key=1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = mea.attention(q, k, v, causal=True, alibi_slopes=torch.tensor([0.5]), backend="chunked")
    out.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, float(q.grad.abs().sum()))
    """
)


def test_chunked_forward_backward_memory_is_far_below_one_score_matrix():
    tokens = 16384
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tokens)], capture_output=True, text=True, timeout=300, check=True
    )
    peak_growth, grad_sum = (float(x) for x in result.stdout.split())
    score_matrix_bytes = tokens * tokens * 4
    assert grad_sum > 0
    assert peak_growth < score_matrix_bytes / 8, f"peak grew by {peak_growth / 2**20:.0f} MiB"


def test_compiled_chunked_attention_keeps_what_eager_keeps_not_the_score_blocks():
    """Under torch.compile the chunked backend's forward and backward are opaque ops, so the compiler's
    partitioner cannot keep the blocks' scores (matmul outputs, which it never recomputes) for backward: the
    whole O(n^2) score matrix. It keeps what eager keeps: q, k, v, the output and the log-sum-exp."""

    def run(q, k, v):
        return mea.attention(q, k, v, causal=True, attention_mask=keep, backend="chunked", chunk_size=64)

    def kept_bytes(fn) -> tuple:
        """``fn``'s output and the bytes of the distinct storages it keeps for backward."""
        out, saved = saved_tensors_of(fn, q, k, v)
        storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in saved}
        return out, sum(storages.values())

    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 511, 8, generator=generator, requires_grad=True) for _ in range(3))
    keep = torch.ones(1, 511, dtype=torch.bool)
    keep[0, :37] = False
    torch._dynamo.reset()
    compiled = torch.compile(run, backend="aot_eager_decomp_partition", fullgraph=True)
    compiled(q, k, v).sum().backward()
    (expected, eager_bytes), (got, compiled_bytes) = kept_bytes(run), kept_bytes(compiled)
    assert compiled_bytes <= eager_bytes < 2 * 511 * 511 * 4 / 8, (compiled_bytes, eager_bytes)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    assert torch.allclose(got, expected, atol=1e-6) and torch.isfinite(got).all()
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-6)


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (real memory: an expanded view counts its base) of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.bytes = max(self.bytes, leaf.untyped_storage().nbytes())
        return out


def largest_storage_of_a_causal_block_mask(tokens: int) -> tuple:
    """(the largest storage any op makes while the block mask of one causal [tokens, tokens] call is built,
    the mask's partial and full kv blocks)."""
    kernel_layer._flex_module()  # importing flex is not the mask's memory
    q = torch.empty(1, 1, tokens, 32, device="meta")
    call = kernel_layer._describe(q, q, q, True, None, None, 0.0)
    with LargestStorage() as largest:
        block_mask = kernel_layer._flex_block_mask(call, None, "cpu", None)
    return largest.bytes, int(block_mask.kv_num_blocks.sum()), int(block_mask.full_kv_num_blocks.sum())


@pytest.mark.parametrize("band_elements, whole_grid", [(1 << 20, False), (1 << 40, True)])
def test_flex_block_mask_is_built_in_bands_far_below_one_mask_matrix(monkeypatch, band_elements, whole_grid):
    """No op makes a tensor near one [q, k] mask matrix while the block mask is built in bands; with a band as
    large as the whole grid (what create_block_mask alone does), one does: the measure sees the matrix."""
    tokens = 1024 if whole_grid else 16384
    monkeypatch.setattr(kernel_layer, "_FLEX_BAND_ELEMENTS", band_elements)
    largest, partial, full = largest_storage_of_a_causal_block_mask(tokens)
    blocks = tokens // 128
    assert partial == blocks and full == blocks * (blocks - 1) / 2  # causal: the diagonal tiles are partial
    one_matrix = tokens * tokens  # bytes of a bool [q, k] matrix
    if whole_grid:
        assert largest >= one_matrix, largest
    else:
        assert largest < one_matrix / 64, f"an op made a {largest / 2**20:.1f} MiB tensor"


@pytest.mark.parametrize("q_len, k_len, kind", [(300, 300, "none"), (257, 513, "padding"), (130, 130, "bool"), (1, 700, "padding")])
def test_banded_block_mask_matches_create_block_mask(monkeypatch, q_len, k_len, kind):
    monkeypatch.setattr(kernel_layer, "_FLEX_BAND_ELEMENTS", 3 * 128 * 128)  # many bands, some of one block row
    gen = torch.Generator().manual_seed(q_len + k_len)
    q, k = torch.randn(2, 4, q_len, 32, generator=gen), torch.randn(2, 4, k_len, 32, generator=gen)
    mask = {"none": None, "padding": torch.rand(2, k_len, generator=gen) > 0.3}.get(kind)
    if kind == "bool":
        mask = torch.rand(2, 4, q_len, k_len, generator=gen) > 0.5
    call = kernel_layer._describe(q, k, k, True, mask, None, 0.0)
    mask_mod = kernel_layer._flex_mask_mod(call, mask, "cpu")
    batch, heads = (1 if mask is None else 2), (4 if kind == "bool" else 1)
    ours = kernel_layer._banded_block_mask(mask_mod, batch, heads, q_len, k_len, "cpu")
    expected = kernel_layer._flex_module().create_block_mask(mask_mod, batch, heads, q_len, k_len, device="cpu")
    assert torch.equal(ours.to_dense(), expected.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(expected, name)), name
    assert ours.seq_lengths == (q_len, k_len)


# ----------------------------------------------------------------------------------------------
# The flash_attn and xformers glue (unpadding, varlen, layouts, causal alignment) on stand-in kernels.
# The real packages need CUDA; these fakes compute the documented semantics with the float64 reference,
# so a wrong transpose, unpad, scatter or causal flag in our glue fails here on a CPU.
# ----------------------------------------------------------------------------------------------


def flash_func_reference(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None):
    """flash_attn_func's contract: [b, s, h, d], bottom-right causal, ALiBi -slope*|i_aligned - j| (= slope*(j - i_aligned) when causal)."""
    out = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, None, alibi_slopes, softmax_scale)
    return out.transpose(1, 2).to(q.dtype)


def flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    pieces = [
        flash_func_reference(q[cu_q[i] : cu_q[i + 1]][None], k[cu_k[i] : cu_k[i + 1]][None], v[cu_k[i] : cu_k[i + 1]][None], **kwargs)[0]
        for i in range(len(cu_q) - 1)
    ]
    return torch.cat(pieces)


@pytest.mark.parametrize("padding", ["none", "left", "right", "left_decode"])
def test_flash_attn_glue_matches_reference(monkeypatch, padding):
    monkeypatch.setattr(kernel_layer, "_flash_attn_functions", lambda: (flash_func_reference, flash_varlen_reference))
    q_len = 1 if padding == "left_decode" else 13
    q, k, v = torch.randn(3, 4, q_len, 16), torch.randn(3, 2, 13, 16), torch.randn(3, 2, 13, 16)
    keep = torch.ones(3, 13, dtype=torch.bool)
    if padding in ("left", "left_decode"):
        keep[0, :5], keep[2, :2] = False, False
    elif padding == "right":
        keep[1, 9:] = False
    mask = None if padding == "none" else keep
    slopes = torch.rand(4)
    call = kernel_layer._describe(q, k, v, True, mask, slopes, 0.0)
    out = kernel_layer._run_flash_attn(q, k, v, call, mask, slopes, 0.25)
    expected = reference_attention(q, k, v, causal=True, mask=mask, slopes=slopes, scale=0.25)
    query_keep = keep[:, -q_len:]
    assert torch.allclose(out.double()[query_keep[:, None, :].expand_as(out[..., 0])],
                          expected[query_keep[:, None, :].expand_as(out[..., 0])], atol=1e-5)
    assert torch.equal(out.transpose(1, 2)[~query_keep], torch.zeros_like(out.transpose(1, 2)[~query_keep]))


class FakeXformersOps:
    """xformers.ops' names our backend uses, with the documented semantics."""

    class fmha:
        class attn_bias:
            class LowerTriangularMask:
                pass

            class LowerTriangularFromBottomRightMask:
                pass

    @staticmethod
    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.shape[2] == k.shape[2], "our backend expands k/v heads for xformers"
        causal = attn_bias is not None
        if isinstance(attn_bias, FakeXformersOps.fmha.attn_bias.LowerTriangularMask):
            assert q.shape[1] == k.shape[1], "top-left causal only for equal lengths"
        return flash_func_reference(q, k, v, softmax_scale=scale, causal=causal)


@pytest.mark.parametrize("q_len", [13, 4])
def test_xformers_glue_matches_reference(monkeypatch, q_len):
    monkeypatch.setattr(kernel_layer, "_xformers_ops", lambda: FakeXformersOps)
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    call = kernel_layer._describe(q, k, v, True, None, None, 0.0)
    out = kernel_layer._run_xformers(q, k, v, call, None, None, 0.3)
    expected = reference_attention(q, k, v, causal=True, scale=0.3)
    assert out.shape == q.shape and torch.allclose(out.double(), expected, atol=1e-5)


def use_flash_stand_in(monkeypatch, module=kernel_layer):
    """Let ``module``'s flash_attn backend run on the CPU with the stand-in kernels: every capability check
    of the real backend applies, except the CUDA/half-precision requirement of the real package."""
    real_cannot = module._cannot_flash_attn
    monkeypatch.setattr(module, "_flash_attn_functions", lambda: (flash_func_reference, flash_varlen_reference))
    monkeypatch.setattr(module, "_probe_results", {})
    monkeypatch.setitem(
        module._CANNOT, "flash_attn", lambda call: real_cannot(dataclasses.replace(call, device_type="cuda", dtype=torch.float16))
    )


@pytest.mark.parametrize("q_len, k_len", [(5, 13), (17, 6)])
def test_flash_attn_glue_non_causal_padding_hides_keys_only(monkeypatch, q_len, k_len):
    """BART's encoder and cross-attention: the keep-mask covers keys; every query row is real (it was taken
    from the key mask, so cross-attention rows came out 36-41% off)."""
    use_flash_stand_in(monkeypatch)
    q, k, v = torch.randn(3, 4, q_len, 16), torch.randn(3, 2, k_len, 16), torch.randn(3, 2, k_len, 16)
    keep = torch.ones(3, k_len, dtype=torch.bool)
    keep[0, k_len - 3 :] = False  # a right-padded source row
    keep[2, :2] = False
    out = mea.attention(q, k, v, attention_mask=keep, scale=0.3, backend="flash_attn")
    expected = reference_attention(q, k, v, causal=False, mask=keep, scale=0.3)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def tiny_bart_config():
    from transformers import BartConfig

    return BartConfig(
        vocab_size=53, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.3, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )


def test_bart_on_flash_attn_matches_stock_with_a_padded_source(monkeypatch):
    from transformers import BartForConditionalGeneration

    ours_module = importlib.import_module("memory_efficient_adapter.modeling_bart")
    use_flash_stand_in(monkeypatch, ours_module)
    torch.manual_seed(3)
    stock = BartForConditionalGeneration(tiny_bart_config()).eval()
    ours = ours_module.BartForConditionalGeneration(tiny_bart_config()).eval()
    ours.load_state_dict(stock.state_dict())
    ours.config.attn_backend = "flash_attn"
    ran = []
    real = ours_module._RUN["flash_attn"]
    monkeypatch.setitem(ours_module._RUN, "flash_attn", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    source = torch.randint(3, 53, (2, 11))
    source_mask = torch.ones(2, 11, dtype=torch.long)
    source_mask[0, 7:] = 0  # right padding
    source_mask[1, :3] = 0  # left padding
    target = torch.randint(3, 53, (2, 6))
    with torch.no_grad():
        expected = stock(input_ids=source, attention_mask=source_mask, decoder_input_ids=target).logits
        actual = ours(input_ids=source, attention_mask=source_mask, decoder_input_ids=target).logits
    assert len(ran) == 6  # two encoder layers, two decoder layers with self- and cross-attention
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


# ----------------------------------------------------------------------------------------------
# NaN: one behaviour for every backend. A NaN (or inf) in a real input propagates to the outputs that
# attend to it; a padded key never matters, whatever it holds.
# ----------------------------------------------------------------------------------------------


def padded_case():
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False  # left padding
    keep[1, 4:] = False  # right padding
    return q, k, v, keep


def test_a_process_forked_while_another_thread_holds_the_slopes_lock_still_gets_slopes():
    """A child forked while the lock was held (another thread building slopes) inherited it held and waited on it
    forever in every BLOOM forward."""
    with kernel_layer._slopes_lock:
        pid = os.fork()
        if pid == 0:  # the child: slopes within 30 s, or SIGALRM ends it; never back into pytest
            code = 1
            try:
                signal.alarm(30)
                code = 0 if torch.equal(kernel_layer.alibi_slopes(5), kernel_layer._build_alibi_slopes(5, None)) else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "flex"])
def test_a_float64_additive_mask_hides_what_float32_cannot_hold_on_every_backend(backend):
    """-1e300 is finite in float64 but -inf in a float32 softmax: it hides its key, as float64's minimum does
    (a row of only such entries is zeros). Backends disagreed: eager returned NaN, sdpa the uniform average
    (with a gradient 160% off), chunked and flex zeros."""
    generator = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(2, 2, length, 8, generator=generator) for length in (4, 6, 6))
    mask = torch.randn(2, 1, 4, 6, generator=generator, dtype=torch.float64)
    mask[0, 0, 1] = -1e300  # every key of a row
    mask[1, 0, 2, :3] = -1e300  # some keys of a row
    mask[1, 0, 3, 4:] = torch.finfo(torch.float64).min
    mask[1, 0, 0] = -3.5e38  # just below float32's minimum: hidden, the row zeros
    as_hidden = mask.masked_fill(mask <= -3.5e38, torch.finfo(torch.float64).min)
    leaves = [t.requires_grad_() for t in (q, k, v)] if backend != "flex" else []  # flex: no backward on CPU
    with torch.set_grad_enabled(bool(leaves)):
        out = mea.attention(q, k, v, attention_mask=mask, backend=backend)
    reference_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*reference_leaves, mask=as_hidden)
    assert_close_rel(out.detach(), expected.detach().float(), 1e-5, backend)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    if leaves:
        grad_out = torch.randn(out.shape, generator=generator)
        expected_grads = torch.autograd.grad(expected, reference_leaves, grad_out.double())
        for got, want in zip(torch.autograd.grad(out, leaves, grad_out), expected_grads, strict=True):
            assert_close_rel(got, want.float(), 1e-5, f"{backend} gradient")


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "flex"])
def test_a_float64_additive_mask_just_above_float32_minimum_keeps_its_keys(backend):
    """-3.0e38 fits float32: the keys stay visible, a row of only such entries their plain average."""
    generator = torch.Generator().manual_seed(32)
    q, k, v = (torch.randn(1, 2, length, 8, generator=generator) for length in (3, 5, 5))
    mask = torch.zeros(1, 1, 3, 5, dtype=torch.float64)
    mask[0, 0, 1] = -3.0e38
    with torch.no_grad():
        out = mea.attention(q, k, v, attention_mask=mask, backend=backend)
    assert_close_rel(out[0, :, 1], v[0].mean(dim=1), 1e-5, backend)


@pytest.mark.parametrize(
    "backend, mask_form",
    [(name, form) for name in CPU_BACKENDS for form in ("keep", "bool_4d", "additive_4d")] + [("flash_attn", "keep")],
)
def test_nan_and_inf_in_padded_keys_never_matter(monkeypatch, backend, mask_form):
    if backend == "flash_attn":
        use_flash_stand_in(monkeypatch)
    q, k, v, keep = padded_case()
    mask = {
        "keep": keep,
        "bool_4d": keep[:, None, None, :],
        "additive_4d": torch.zeros(2, 1, 1, 6).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min),
    }[mask_form]
    causal = mask_form == "keep"
    clean = mea.attention(q, k, v, causal=causal, attention_mask=mask, backend=backend)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[0, :, :2], dirty_v[0, :, :2] = float("nan"), float("inf")
    dirty_k[1, :, 4:], dirty_v[1, :, 4:] = float("-inf"), float("nan")
    dirty = mea.attention(q, dirty_k, dirty_v, causal=causal, attention_mask=mask, backend=backend)
    real_rows = keep[:, None, :, None].expand_as(clean) if backend == "flash_attn" else torch.ones_like(clean, dtype=torch.bool)
    assert torch.isfinite(dirty[real_rows]).all()
    assert torch.allclose(dirty[real_rows], clean[real_rows], atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["flash_attn"])
def test_nan_in_a_real_input_propagates(monkeypatch, backend):
    if backend == "flash_attn":
        use_flash_stand_in(monkeypatch)
    q, k, v, keep = padded_case()
    clean = mea.attention(q, k, v, causal=True, attention_mask=keep, backend=backend)
    nan_query = q.clone()
    nan_query[1, 2, 3, 0] = float("nan")  # a real query row
    nan_query[0, 1, 0, 0] = float("nan")  # a left-padded row: it sees no key and stays zero
    out = mea.attention(nan_query, k, v, causal=True, attention_mask=keep, backend=backend)
    assert torch.isnan(out[1, 2, 3]).all()
    assert torch.equal(out[0, 1, 0], torch.zeros_like(out[0, 1, 0]))
    others = torch.ones_like(out, dtype=torch.bool)
    others[1, 2, 3] = False
    assert torch.allclose(out[others], clean[others], atol=1e-6)
    nan_value = v.clone()
    nan_value[1, 0, 2, 5] = float("nan")  # a real key that every later query of row 1, heads 0-1, sees
    out = mea.attention(q, k, nan_value, causal=True, attention_mask=keep, backend=backend)
    assert torch.isnan(out[1, :2, 2:4]).any(dim=-1).all() and torch.isfinite(out[0]).all()


def test_chunked_propagates_nan_like_sdpa_instead_of_returning_zeros():
    q, k, v, keep = padded_case()
    q[1, 0, 3, 0] = float("nan")
    chunked = mea.attention(q, k, v, causal=True, attention_mask=keep, backend="chunked")
    sdpa = mea.attention(q, k, v, causal=True, attention_mask=keep, backend="sdpa")
    assert torch.isnan(chunked[1, 0, 3]).all() and torch.isnan(sdpa[1, 0, 3]).all()


# ----------------------------------------------------------------------------------------------
# Settings a model reads from its config at every forward (module globals never reach remote code)
# ----------------------------------------------------------------------------------------------


def tiny_llama_folder(tmp_path):
    from remote_code import save_with_remote_code
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    stock = LlamaForCausalLM(config).eval()
    folder = save_with_remote_code(stock, tmp_path / "llama", ["modeling_llama.py"],
                                   {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"})
    return stock, folder


def load_remote(folder, **config_values):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for name, value in config_values.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")
    return model, sys.modules[type(model).__module__]


def test_config_chunk_size_and_flex_shapes_reach_a_remote_code_model(tmp_path, monkeypatch):
    stock, folder = tiny_llama_folder(tmp_path)
    model, module = load_remote(folder, attn_backend="chunked", attn_chunk_size=[3, 5])
    sizes = []
    real_forward = module._chunked_forward
    monkeypatch.setattr(module, "_chunked_forward", lambda *a: sizes.append(a[-1]) or real_forward(*a))
    ids = torch.randint(0, 61, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    mea.set_chunk_sizes(query=7, key=7)  # the package's own copy: it must not reach the remote-code model
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            expected = stock(ids, attention_mask=mask).logits
    finally:
        mea.set_chunk_sizes()
    assert sizes == [(3, 5), (3, 5)]
    assert ((logits - expected)[mask.bool()].norm() / expected[mask.bool()].norm()).item() < 1e-5
    model.config.attn_chunk_size = 4  # read at every forward
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert sizes[-1] == (4, 4)

    limits = []
    monkeypatch.setitem(module._CANNOT, "flex", lambda call: None)  # flex itself needs head_dim >= 32
    monkeypatch.setitem(module._RUN, "flex", lambda *a, flex_static_shapes=None, **kw: limits.append(flex_static_shapes) or module._run_eager(*a, **kw))
    model.config.attn_backend, model.config.attn_flex_static_shapes = "flex", 2
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert limits == [2, 2]
    model.config.attn_flex_static_shapes = -1
    with pytest.raises(ValueError, match="config.attn_flex_static_shapes"):
        model(ids, attention_mask=mask)


def test_a_broken_primary_backend_is_noticed_by_a_model_on_auto(tmp_path, monkeypatch):
    """A buggy sdpa fails the model's forward; an sdpa that cannot run here is skipped, and that shows (the
    conftest check fails any test that leaves it so)."""
    import conftest

    _, folder = tiny_llama_folder(tmp_path)
    model, module = load_remote(folder)
    ids = torch.randint(0, 61, (1, 5))
    monkeypatch.setitem(module._RUN, "sdpa", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("wrong strides")))
    with pytest.raises(RuntimeError, match="wrong strides"):
        model(ids)
    assert conftest.demotions() == []
    monkeypatch.setitem(module._RUN, "sdpa", kernel_unavailable)
    with torch.no_grad():
        model(ids)
    assert [(entry[0], entry[1]) for entry in conftest.demotions()] == [(module.__name__, "sdpa")]
    module._demoted.clear()


# ----------------------------------------------------------------------------------------------
# Tracing: torch.compile(fullgraph=True) and torch.export with a padding mask (no host sync on the way)
# ----------------------------------------------------------------------------------------------


def tiny_family_model(family: str):
    from transformers import BloomConfig, GPT2Config, LlamaConfig

    torch.manual_seed(5)
    if family == "llama":
        module = importlib.import_module("memory_efficient_adapter.modeling_llama")
        config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return module.LlamaForCausalLM(config).eval()
    if family == "gpt2":
        module = importlib.import_module("memory_efficient_adapter.modeling_gpt2")
        config = GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return module.GPT2LMHeadModel(config).eval()
    if family == "bloom":
        module = importlib.import_module("memory_efficient_adapter.modeling_bloom")
        config = BloomConfig(vocab_size=61, hidden_size=32, n_layer=2, n_head=4)
        return module.BloomForCausalLM(config).eval()
    module = importlib.import_module("memory_efficient_adapter.modeling_bart")
    return module.BartForConditionalGeneration(tiny_bart_config()).eval()


def tracing_inputs(family: str) -> dict:
    ids = torch.randint(3, 53, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    if family == "bart":
        mask[0, 5:] = 0  # a right-padded source
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(3, 53, (2, 4)), use_cache=False)
    mask[0, :3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, use_cache=False)


def compiled_fullgraph(model, inputs):
    return torch.compile(model, fullgraph=True, backend="eager")


def exported(model, inputs):
    return torch.export.export(model, (), kwargs=inputs).module()


@pytest.mark.parametrize("trace", [compiled_fullgraph, pytest.param(exported, marks=pytest.mark.slow)], ids=["compile", "export"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_compile_and_export_with_a_padding_mask(family, trace):
    model = tiny_family_model(family)
    inputs = tracing_inputs(family)
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = trace(model, inputs)(**inputs).logits
    # Traced forwards keep every row at full length; an eager one runs the decoders' kept tokens only (zeros
    # at padded positions), so padded positions of a decoder-only model are left out.
    kept = torch.ones_like(actual[..., :1]) if family == "bart" else inputs["attention_mask"][..., None]
    assert torch.allclose(actual * kept, expected * kept, atol=1e-5)
