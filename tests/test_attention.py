"""The kernel layer against a float64 reference written here, plus its dispatcher, errors and memory."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import memory_efficient_adapter as mea
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
# Dispatcher: choices, errors, probing, USE_FLASH_ATTN
# ----------------------------------------------------------------------------------------------


def describe(**overrides):
    q = torch.randn(1, 4, 8, 16, requires_grad=overrides.pop("grad", False))
    k = v = torch.randn(1, overrides.pop("kv_heads", 4), 8, 16)
    return kernel_layer._describe(q, k, v, overrides.pop("causal", True), overrides.pop("mask", None),
                                  overrides.pop("slopes", None), overrides.pop("dropout_p", 0.0))


def test_auto_order_on_cpu():
    assert mea.select_backend(describe()) == "sdpa"
    assert mea.select_backend(describe(slopes=torch.rand(4))) == "chunked"
    assert kernel_layer.AUTO_ORDER["cpu"] == ("sdpa", "chunked", "eager")


@pytest.mark.parametrize(
    "backend, call, message",
    [
        ("sdpa", dict(slopes=torch.rand(4)), "ALiBi"),
        ("flex", dict(grad=True), "no backward on CPU"),
        ("flex", dict(dropout_p=0.1), "dropout"),
        ("flash_attn", dict(), "flash_attn"),
        ("xformers", dict(), "xformers"),
        ("nonsense", dict(), "unknown attention backend"),
    ],
)
def test_explicit_backend_that_cannot_take_the_call_raises(backend, call, message):
    with pytest.raises(ValueError, match=message):
        mea.select_backend(describe(**call), backend)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_mask=torch.ones(2, 9, dtype=torch.bool)), r"\[batch, k_len\] = \[2, 8\]"),
        (dict(attention_mask=torch.ones(2, 8)), "bool keep-mask"),
        (dict(attention_mask=torch.ones(2, 8, 8, dtype=torch.bool)), "3 dimensions"),
        (dict(attention_mask=torch.ones(2, 3, 8, 8, dtype=torch.bool)), "dimension heads"),
        (dict(attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.int64)), "bool .* or floating"),
        (dict(alibi_slopes=torch.rand(3)), "alibi_slopes must have shape"),
        (dict(dropout_p=1.0), "dropout_p"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match=message):
        mea.attention(q, q, q, **kwargs)


def test_bad_shapes_and_dtypes_get_clear_errors():
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        mea.attention(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    with pytest.raises(ValueError, match="floating dtype"):
        mea.attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="4-D"):
        mea.attention(q[0], q[0], q[0])


@pytest.mark.parametrize(
    "value, expected", [("true", "sdpa"), ("1", "sdpa"), ("false", "eager"), ("0", "eager"), ("chunked", "chunked")]
)
def test_use_flash_attn_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("USE_FLASH_ATTN", value)
    chosen = []
    original = dict(kernel_layer._RUN)
    for name in original:
        monkeypatch.setitem(kernel_layer._RUN, name, lambda *a, _n=name, **kw: chosen.append(_n) or original[_n](*a, **kw))
    q = torch.randn(1, 2, 5, 16)
    out = mea.attention(q, q, q, causal=True)
    assert chosen == [expected]
    assert torch.allclose(out.double(), reference_attention(q, q, q, causal=True), atol=1e-5)
    assert mea.attention(q, q, q, causal=True, backend="eager") is not None and chosen[-1] == "eager"


def test_use_flash_attn_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("USE_FLASH_ATTN", "fastest")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="USE_FLASH_ATTN"):
        mea.attention(q, q, q)


def test_broken_optional_package_is_probed_once_logged_once_and_skipped(monkeypatch, caplog):
    class BrokenOps:
        calls = 0

        def memory_efficient_attention(self, *args, **kwargs):
            BrokenOps.calls += 1
            raise NotImplementedError("No operator found for memory_efficient_attention_forward")

    monkeypatch.setattr(kernel_layer, "_xformers_ops", lambda: BrokenOps())
    monkeypatch.setattr(kernel_layer, "_probe_results", {})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.empty(shape[:4]).normal_())
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        for _ in range(3):
            reason = kernel_layer._probe("xformers", "cuda")
    assert "installed but does not run here" in reason and "No operator found" in reason
    assert BrokenOps.calls == 1
    assert sum("xformers" in record.getMessage() for record in caplog.records) == 1
    assert "xformers" not in mea.available_backends("cuda")


def test_probes_run_as_written_while_torch_compile_traces(monkeypatch):
    """A probe runs real kernels and may take locks (cuDNN's plan cache), which Dynamo cannot trace: under
    torch.compile (fullgraph) the probe runs once while tracing, and its answer steers the compiled code."""
    import threading

    lock, calls = threading.Lock(), []

    def locked_probe(device_type: str):
        with lock:
            calls.append(device_type)
            return f"probed on {device_type} ({float(torch.ones(2).sum()):.0f} ones)"

    monkeypatch.setitem(kernel_layer._PROBES, "xformers", locked_probe)
    monkeypatch.setattr(kernel_layer, "_probe_results", {})

    def answer(x):
        reason = kernel_layer._probe("xformers", "cuda")
        return x + 1 if reason is not None and reason.startswith("probed on cuda (2 ones)") else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(answer, fullgraph=True)
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3)) and calls == ["cuda"]
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3)) and calls == ["cuda"]


def kernel_unavailable(*args, **kwargs):
    raise RuntimeError("No available kernel. Aborting execution.")


def test_backend_failure_in_auto_demotes_that_kind_of_call_only(monkeypatch, caplog):
    """sdpa without a kernel for one kind of call: auto falls back for that kind, logs once, keeps sdpa for others."""
    real_sdpa = kernel_layer._RUN["sdpa"]

    def sdpa_without_kernel_for_masks(q, k, v, call, mask, *args, **kwargs):
        if call.mask_kind != "none":
            kernel_unavailable()
        return real_sdpa(q, k, v, call, mask, *args, **kwargs)

    ran = []
    monkeypatch.setitem(kernel_layer._RUN, "sdpa", lambda *a, **kw: ran.append("sdpa") or sdpa_without_kernel_for_masks(*a, **kw))
    monkeypatch.setattr(kernel_layer, "_demoted", {})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    q = torch.randn(2, 2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, :3] = False
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):  # an encoder-like call: auto picks sdpa
        first = mea.attention(q, q, q, attention_mask=keep)
        second = mea.attention(q, q, q, attention_mask=keep)
    expected = reference_attention(q, q, q, mask=keep)
    assert torch.allclose(first.double(), expected, atol=1e-5) and torch.equal(first, second)
    assert ran == ["sdpa"]  # tried once, then skipped for this kind of call
    assert sum("No available kernel" in r.getMessage() for r in caplog.records) == 1
    assert [entry[0] for entry in mea.demoted_backends()] == ["sdpa"]
    unmasked = mea.attention(q, q, q, causal=True)  # another kind of call keeps its fastest kernel
    assert ran == ["sdpa", "sdpa"] and torch.allclose(unmasked.double(), reference_attention(q, q, q, causal=True), atol=1e-5)
    with pytest.raises(RuntimeError, match="No available kernel"):
        mea.attention(q, q, q, attention_mask=keep, backend="sdpa")  # an explicit choice is never replaced
    kernel_layer._demoted.clear()  # deliberate: the conftest check fails any test that leaves a demotion behind


def test_other_errors_in_auto_are_raised_and_demote_nothing(monkeypatch):
    """A failure that is not about kernel availability (a bug, a caller's mistake) must surface, not be hidden."""

    def exploding(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(kernel_layer._RUN, "sdpa", exploding)
    q = torch.randn(1, 2, 7, 16)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="kernel exploded"):
            mea.attention(q, q, q, causal=True)
    assert mea.demoted_backends() == []


def test_when_every_backend_fails_the_first_failure_is_raised(monkeypatch):
    monkeypatch.setattr(kernel_layer, "_demoted", {})
    for name, text in (("sdpa", "No available kernel (sdpa)"), ("chunked", "not compiled with chunks"), ("eager", "No operator found")):
        monkeypatch.setitem(kernel_layer._RUN, name, lambda *a, _t=text, **kw: (_ for _ in ()).throw(RuntimeError(_t)))
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match=r"No available kernel \(sdpa\)"):
        mea.attention(q, q, q)
    assert sorted(entry[0] for entry in mea.demoted_backends()) == ["chunked", "eager", "sdpa"]
    kernel_layer._demoted.clear()


def test_a_mask_on_the_wrong_device_is_refused_before_any_backend_runs(monkeypatch):
    """The review's case: one such call used to demote sdpa, chunked and eager for the whole process."""
    ran = []
    for name in CPU_BACKENDS:
        original = kernel_layer._RUN[name]
        monkeypatch.setitem(kernel_layer._RUN, name, lambda *a, _n=name, _o=original, **kw: ran.append(_n) or _o(*a, **kw))
    q = torch.randn(2, 2, 6, 16)
    with pytest.raises(ValueError, match="attention_mask is on meta, but q, k and v are on cpu"):
        mea.attention(q, q, q, causal=True, attention_mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="alibi_slopes is on meta"):
        mea.attention(q, q, q, causal=True, alibi_slopes=torch.rand(2, device="meta"))
    assert ran == [] and mea.demoted_backends() == []
    out = mea.attention(q, q, q, causal=True)
    assert ran == ["sdpa"] and torch.allclose(out.double(), reference_attention(q, q, q, causal=True), atol=1e-5)


def test_available_backends_on_cpu():
    names = mea.available_backends("cpu")
    assert {"sdpa", "chunked", "eager"} <= set(names)
    assert "flash_attn" not in names and "xformers" not in names


class FakeConfig:
    def __init__(self, implementation=None, attn_backend=None, use_flash_attn="auto"):
        self._attn_implementation = implementation
        self.use_flash_attn = use_flash_attn
        if attn_backend is not None:
            self.attn_backend = attn_backend


@pytest.mark.parametrize(
    "implementation, attn_backend, environment, use_flash_attn, expected",
    [
        (None, None, None, "auto", "auto"),
        ("sdpa", None, None, "auto", "auto"),  # transformers' default names nothing
        ("eager", None, None, "auto", "eager"),
        ("flash_attention_2", None, None, "auto", "flash_attn"),
        ("flex_attention", None, None, "auto", "flex"),
        ("mea_chunked", None, None, "auto", "chunked"),
        ("mea", None, None, "auto", "auto"),
        # 1. config.attn_backend over everything below it
        ("eager", "chunked", "flex", False, "chunked"),
        # "auto" in attn_backend names nothing: the next source decides
        ("eager", "auto", None, "auto", "eager"),
        # 2. attn_implementation over the environment and use_flash_attn
        ("eager", None, "chunked", False, "eager"),
        # 3. the environment over Qwen's use_flash_attn
        ("sdpa", None, "chunked", False, "chunked"),
        ("sdpa", None, "true", False, "auto"),
        ("sdpa", None, "false", True, "eager"),
        # 4. Qwen's use_flash_attn=False means eager, True/"auto" name nothing
        ("sdpa", None, None, False, "eager"),
        ("sdpa", None, None, True, "auto"),
        ("sdpa", "auto", None, False, "eager"),
    ],
)
def test_backend_selection_precedence(monkeypatch, implementation, attn_backend, environment, use_flash_attn, expected):
    if environment is not None:
        monkeypatch.setenv("USE_FLASH_ATTN", environment)
    config = FakeConfig(implementation, attn_backend, use_flash_attn)
    assert mea.backend_from_config(config) == expected
    assert mea.attention_options(config)["backend"] == expected
    assert mea.backend_from_config(config, "eager") == "eager"  # a call's own choice comes first


def test_backend_selection_without_a_config_applies_only_the_environment(monkeypatch):
    assert mea.backend_from_config() == "auto" and mea.backend_from_config(None, "chunked") == "chunked"
    monkeypatch.setenv("USE_FLASH_ATTN", "0")
    assert mea.backend_from_config() == "eager" and mea.backend_from_config(None, "sdpa") == "sdpa"


@pytest.mark.parametrize(
    "config, environment, message",
    [
        (FakeConfig(None, "fastest"), None, "config.attn_backend='fastest'"),
        (FakeConfig("mea_fastest"), None, "attn_implementation='fastest'"),
        (FakeConfig(), "fastest", "USE_FLASH_ATTN='fastest'"),
    ],
)
def test_backend_selection_rejects_unknown_names(monkeypatch, config, environment, message):
    if environment is not None:
        monkeypatch.setenv("USE_FLASH_ATTN", environment)
    with pytest.raises(ValueError, match=message):
        mea.backend_from_config(config)


def test_keep_mask_from_padding():
    assert mea.keep_mask_from_padding(torch.ones(2, 5, dtype=torch.long)) is None
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(mea.keep_mask_from_padding(mask), mask.bool())
    with pytest.raises(ValueError, match="2-D padding mask"):
        mea.keep_mask_from_padding(torch.ones(1, 1, 3, 3))


def test_keep_mask_from_padding_makes_no_data_dependent_branch_while_compiling():
    """The all-ones shortcut reads the mask on the host; under torch.compile(fullgraph=True) it must not run."""
    compiled = torch.compile(mea.keep_mask_from_padding, fullgraph=True, backend="eager")
    ones, padded = torch.ones(2, 5, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(compiled(ones), ones.bool()) and torch.equal(compiled(padded), padded.bool())


def test_alibi_slopes_of_no_heads_says_so():
    with pytest.raises(ValueError, match="positive number of attention heads, got num_heads=0"):
        mea.alibi_slopes(0)


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)  # slope * position
    assert torch.allclose(mea.alibi_slopes(heads), alibi[:, 0, 1], rtol=1e-6)


def test_alibi_slopes_are_built_once_per_device_and_rebuilt_after_a_change(monkeypatch):
    """A BLOOM forward asks for its slopes every time; on a GPU building them copies from host memory (a host
    sync), and checking them for cuDNN reads them back (another). Both happen once, not once per forward."""
    first = mea.alibi_slopes(12)
    assert mea.alibi_slopes(12) is first and kernel_layer._are_bloom_slopes(first)
    expected = first.clone()
    reads = []
    monkeypatch.setattr(torch, "allclose", lambda *a, **kw: reads.append(1) or True)
    assert kernel_layer._are_bloom_slopes(mea.alibi_slopes(12)) and reads == []  # not read again
    assert kernel_layer._are_bloom_slopes(expected) and reads == [1]  # another tensor is read
    monkeypatch.undo()
    first.mul_(2.0)  # a caller changed it in place: a fresh, correct tensor comes next
    again = mea.alibi_slopes(12)
    assert again is not first and torch.equal(again, expected)
    assert not kernel_layer._are_bloom_slopes(first)
    assert not kernel_layer._are_bloom_slopes(mea.alibi_slopes(12) * 1.5)
    with torch.inference_mode():  # not kept: an inference tensor has no version counter to check later
        made_in_inference = mea.alibi_slopes(5)
    assert mea.alibi_slopes(5) is not made_in_inference and mea.alibi_slopes(5) is mea.alibi_slopes(5)


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


BLOCK_MASK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import importlib, resource, sys, torch
    kernel_layer = importlib.import_module("memory_efficient_adapter.attention")
    n = int(sys.argv[1])
    kernel_layer._FLEX_BAND_ELEMENTS = 1 << 20
    kernel_layer._flex_module()  # importing flex is not the mask's memory
    q = torch.empty(1, 1, n, 32, device="meta")
    call = kernel_layer._describe(q, q, q, True, None, None, 0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    block_mask = kernel_layer._flex_block_mask(call, None, "cpu", None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, int(block_mask.kv_num_blocks.sum()), int(block_mask.full_kv_num_blocks.sum()))
    """
)


def test_flex_block_mask_is_built_in_bands_far_below_one_mask_matrix():
    """The peak resident size of a fresh process while it builds the block mask. That peak also moves with the
    C allocator's own behaviour (seen on torch 2.13: 15 MiB in some runs, over 250 MiB in others of the same
    code, including code from before any change here); a whole [q, k] matrix would be there in every run, so
    the least of up to three runs is what is held against a quarter of one."""
    tokens = 16384
    growths = []
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", BLOCK_MASK_MEMORY_SCRIPT, str(tokens)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        peak_growth, partial, full = (float(x) for x in result.stdout.split())
        blocks = tokens // 128
        assert partial == blocks and full == blocks * (blocks - 1) / 2  # causal: the diagonal tiles are partial
        growths.append(peak_growth)
        if peak_growth < tokens * tokens / 4:
            break
    # a quarter of one bool [q, k] matrix; create_block_mask's whole-grid evaluation grows it by ~2.5 GiB here
    assert min(growths) < tokens * tokens / 4, f"peak grew by {[round(g / 2**20) for g in growths]} MiB"


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
# GPU: every backend that runs on this machine, fp16 and bf16, against the float64 reference
# ----------------------------------------------------------------------------------------------


def to_cuda(case: dict) -> dict:
    return {key: (val.cuda() if torch.is_tensor(val) else val) for key, val in case.items()}


def long_cases(dtype):
    """Long causal calls with GQA, padding and ALiBi (BLOOM's slopes), as models make them."""
    gen = torch.Generator().manual_seed(5)
    cases = []
    for q_len, k_len, slopes, padded in [(2048, 2048, True, False), (1000, 1000, False, True), (1, 1537, True, True)]:
        q = torch.randn(2, 8, q_len, 128, generator=gen).to(dtype)
        k, v = (torch.randn(2, 2, k_len, 128, generator=gen).to(dtype) for _ in range(2))
        mask = None
        if padded:
            mask = torch.ones(2, k_len, dtype=torch.bool)
            mask[1, :37] = False
        cases.append(dict(q=q, k=k, v=v, causal=True, mask=mask, slopes=mea.alibi_slopes(8) if slopes else None, scale=None))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_every_gpu_backend_matches_float64_reference(dtype):
    TOLERANCE.setdefault(torch.float16, 1e-2)
    gen = torch.Generator().manual_seed(2024)
    cases = [random_case(gen, dtype) for _ in range(12)] + long_cases(dtype)
    backends = mea.available_backends("cuda")
    ran = {name: 0 for name in backends}
    worst = {name: [0.0, 0.0] for name in backends}
    for case in map(to_cuda, cases):
        for name in backends:
            q, k, v = case["q"], case["k"], case["v"]
            call = kernel_layer._describe(q, k, v, case["causal"], case["mask"], case["slopes"], 0.0)
            if kernel_layer._why_not(name, call) is not None:
                continue
            errors = run_and_compare(name, case, dtype)
            ran[name] += 1
            worst[name] = [max(a, b) for a, b in zip(worst[name], errors)]
    print(f"\n{dtype}: calls checked per backend: {ran}")
    for name, (forward_err, grad_err) in worst.items():
        print(f"{dtype} {name}: max rel err forward {forward_err:.2e}, gradients {grad_err:.2e}")
    assert all(count > 0 for count in ran.values()), ran
    assert {"sdpa", "flex", "chunked", "eager"} <= set(backends)


@pytest.mark.gpu
def test_auto_on_cuda_picks_a_fused_kernel_for_alibi():
    q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    call = kernel_layer._describe(q, q, q, True, None, torch.rand(4, device="cuda"), 0.0)
    assert mea.select_backend(call) in ("flash_attn", "flex")
    assert mea.select_backend(kernel_layer._describe(q, q, q, True, None, None, 0.0)) == "sdpa"


def count_block_mask_builds(monkeypatch) -> list:
    built = []
    original = kernel_layer._banded_block_mask
    monkeypatch.setattr(kernel_layer, "_banded_block_mask", lambda *a, **kw: built.append(1) or original(*a, **kw))
    return built


def test_flex_block_mask_is_built_once_per_forward_mask_and_per_call_for_a_bare_tensor(monkeypatch):
    built = count_block_mask_builds(monkeypatch)
    q = torch.randn(2, 2, 300, 32)
    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[0, :9] = False
    call = kernel_layer._describe(q, q, q, True, keep, None, 0.0)
    layers = mea.forward_mask(keep)  # what a model hands to every layer of one forward
    first = kernel_layer._flex_block_mask(call, keep, "cpu", layers)
    assert kernel_layer._flex_block_mask(call, keep, "cpu", layers) is first and len(built) == 1
    keep.data[1, :256] = False  # a write the old version-counter cache missed: a bare tensor is never cached
    rebuilt = kernel_layer._flex_block_mask(call, keep, "cpu", None)
    assert len(built) == 2 and not torch.equal(rebuilt.to_dense(), first.to_dense())
    kernel_layer._flex_block_mask(call, keep, "cpu", mea.forward_mask(keep))  # a new forward: a new block mask
    assert len(built) == 3


def test_flex_block_mask_works_under_inference_mode():
    """The old cache read ``mask._version``, which inference tensors do not have."""
    with torch.inference_mode():
        q = torch.randn(1, 2, 24, 32)
        keep = torch.ones(1, 24, dtype=torch.bool)
        keep[0, :4] = False
        call = kernel_layer._describe(q, q, q, True, keep, None, 0.0)
        for holder in (None, mea.forward_mask(keep)):
            block_mask = kernel_layer._flex_block_mask(call, keep, "cpu", holder)
            assert block_mask.to_dense().sum() > 0


def test_nothing_keeps_a_mask_alive_after_its_forward():
    """The old weak-reference cache never freed anything: its block mask's mask_mod held the mask."""
    import gc
    import weakref

    q = torch.randn(1, 2, 24, 32)
    keep = torch.ones(1, 24, dtype=torch.bool)
    keep[0, :4] = False
    alive = weakref.ref(keep)
    call = kernel_layer._describe(q, q, q, True, keep, None, 0.0)
    holder = mea.forward_mask(keep)
    kernel_layer._flex_block_mask(call, keep, "cpu", holder)
    kernel_layer._flex_block_mask(call, keep, "cpu", None)
    del keep, holder, call  # (the call description itself carries the padding mask, for cudnn's checks)
    gc.collect()
    assert alive() is None


def test_pure_causal_block_masks_are_shared_by_shape_in_a_bounded_cache(monkeypatch):
    built = count_block_mask_builds(monkeypatch)
    monkeypatch.setattr(kernel_layer, "_causal_block_masks", kernel_layer.OrderedDict())
    masks = []
    for length in range(130, 130 + kernel_layer._CAUSAL_BLOCK_MASKS_KEPT + 4):
        q = torch.empty(1, 2, length, 32, device="meta")
        call = kernel_layer._describe(q, q, q, True, None, None, 0.0)
        masks.append(kernel_layer._flex_block_mask(call, None, "cpu", None))
        assert kernel_layer._flex_block_mask(call, None, "cpu", None) is masks[-1]
    assert len(built) == len(masks) and len(kernel_layer._causal_block_masks) == kernel_layer._CAUSAL_BLOCK_MASKS_KEPT


@pytest.mark.slow
def test_flex_with_a_forward_mask_matches_reference():
    q = torch.randn(2, 2, 40, 32)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :9] = False
    layers = mea.forward_mask(keep)
    first = mea.attention(q, q, q, causal=True, attention_mask=layers, backend="flex")
    again = mea.attention(q, q, q, causal=True, attention_mask=layers, backend="flex")
    expected = reference_attention(q, q, q, causal=True, mask=keep)
    assert torch.equal(first, again) and torch.allclose(first.double(), expected, atol=1e-5)
    assert len(layers.block_masks) == 1


@pytest.mark.slow
def test_flex_decoding_steps_need_no_block_mask_and_match_reference(monkeypatch):
    """One query row sees every key, so a decoding step builds no block mask (which costs a pass over the
    [q, k] grid per step), and ALiBi's causal offset reaches the compiled kernel as a tensor."""
    built = []
    original = kernel_layer._banded_block_mask
    monkeypatch.setattr(kernel_layer, "_banded_block_mask", lambda *a, **kw: built.append(1) or original(*a, **kw))
    gen = torch.Generator().manual_seed(11)
    slopes = mea.alibi_slopes(4)
    for k_len in (37, 38):
        q = torch.randn(2, 4, 1, 32, generator=gen)
        k, v = (torch.randn(2, 2, k_len, 32, generator=gen) for _ in range(2))
        out = mea.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="flex")
        expected = reference_attention(q, k, v, causal=True, slopes=slopes)
        assert torch.allclose(out.double(), expected, atol=1e-5)
    assert built == []
    call = kernel_layer._describe(q, k, v, True, None, slopes, 0.0)
    score_mod = kernel_layer._flex_score_mod(call, None, slopes)
    captured = [cell.cell_contents for term in score_mod.__closure__[0].cell_contents for cell in term.__closure__]
    assert not any(isinstance(value, int) for value in captured), captured


def test_flex_compiles_static_shapes_for_the_first_shapes_then_one_dynamic_kernel(monkeypatch):
    monkeypatch.setattr(kernel_layer, "_flex_static_signatures", set())

    def static(q_len, k_len, device_type="cuda", batch=1):
        q, k = torch.empty(batch, 4, q_len, 32, device="meta"), torch.empty(batch, 2, k_len, 32, device="meta")
        call = dataclasses.replace(kernel_layer._describe(q, k, k, True, None, None, 0.0), device_type=device_type)
        return kernel_layer._flex_uses_static_shapes(call, q, k, 2)

    assert static(1024, 1024) and static(2048, 2048)  # two shapes: a static kernel each
    assert not static(4096, 4096) and not static(1024, 1024, batch=2)  # past the limit: the dynamic kernel
    assert static(1024, 1024) and static(2048, 2048)  # shapes seen before keep theirs
    assert not static(1, 1500) and not static(1, 1501)  # decoding steps: dynamic
    assert static(4096, 4096, device_type="cpu")  # the CPU builds static shapes only
    with pytest.raises(ValueError, match="static flex shapes"):
        mea.set_flex_static_shapes(-1)
    q = torch.randn(1, 2, 4, 32)
    with pytest.raises(ValueError, match="config.attn_flex_static_shapes"):
        mea.attention(q, q, q, flex_static_shapes=-1)


@pytest.mark.gpu
def test_sdpa_on_cuda_leaves_the_global_kernel_priority_as_it_found_it():
    q = torch.randn(1, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)  # PyTorch settles its default order at its first call
    before = list(torch._C._get_sdp_priority_order())
    k = torch.randn(1, 8, 300, 128, device="cuda", dtype=torch.bfloat16)
    for query, key in ((q, q), (q[:, :, :1], k)):  # prefill-shaped (cuDNN first), then decoding (flash first)
        out = mea.attention(query, key, key, causal=True, backend="sdpa")
        assert list(torch._C._get_sdp_priority_order()) == before
        expected = reference_attention(query, key, key, causal=True)
        assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


SDPA_ORDER_AFTER = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    import memory_efficient_adapter as mea
    q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
    if sys.argv[1] == "ours":  # the process's first SDPA call is ours
        mea.attention(q, q, q, causal=True, backend="sdpa")
    F.scaled_dot_product_attention(q, q, q, is_causal=True)
    print(list(torch._C._get_sdp_priority_order()))
    """
)


@pytest.mark.gpu
def test_our_first_sdpa_call_leaves_pytorchs_default_kernel_order_in_place():
    """PyTorch settles its default SDPA order at a process's first SDPA call; when that call was ours, the
    placeholder order read before it was restored after it, and later stock SDPA calls ran flash where
    PyTorch picks cuDNN on Hopper. Fresh processes: the order after a stock call alone, and after ours first."""

    def order_after(first: str) -> str:
        done = subprocess.run([sys.executable, "-c", SDPA_ORDER_AFTER, first], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert order_after("ours") == order_after("stock")


@pytest.mark.gpu
def test_flex_decoding_on_cuda_compiles_a_bounded_number_of_graphs():
    """Growing key lengths (decoding) must not recompile flex_attention every step."""
    import torch._dynamo.utils

    slopes = mea.alibi_slopes(8).cuda()
    keep = torch.ones(2, 600, dtype=torch.bool, device="cuda")
    keep[0, :21] = False
    graphs = []
    for k_len in range(500, 520):
        q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, k_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = mea.attention(q, k, v, causal=True, alibi_slopes=slopes, attention_mask=keep[:, :k_len], backend="flex")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    expected = reference_attention(q, k, v, causal=True, mask=keep[:, :k_len], slopes=slopes)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2
    assert graphs[-1] - graphs[0] <= 3, graphs  # a static first step, a dynamic kernel, a few specializations


def test_sdpa_priority_is_set_for_the_call_and_restored_after_it():
    before = list(torch._C._get_sdp_priority_order())
    first = [before[-2], before[-1]]
    seen = []

    def run():
        seen.append(list(torch._C._get_sdp_priority_order()))
        return torch.zeros(1)

    kernel_layer._with_sdpa_priority(first, run)
    assert seen[0][:2] == first and sorted(seen[0]) == sorted(before)
    assert list(torch._C._get_sdp_priority_order()) == before

    def failing():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        kernel_layer._with_sdpa_priority(first, failing)
    assert list(torch._C._get_sdp_priority_order()) == before
    q = torch.randn(1, 2, 5, 16)
    assert kernel_layer._sdpa_priority(kernel_layer._describe(q, q, q, True, None, None, 0.0), q.device) is None


def test_sdpa_priority_puts_cudnn_first_for_prefill_and_training_and_flash_for_decoding(monkeypatch):
    """The rule on a (pretended) Hopper: a training call with fewer queries than keys (cross-attention, whose
    shapes do not change from step to step) gets cuDNN first like prefill; an inference call with a longer
    key than query (decoding, a new key length each step) gets flash first."""
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(kernel_layer, "_is_hopper_or_newer", lambda device: True)
    monkeypatch.setattr(kernel_layer, "_settle_default_sdpa_priority", lambda device: None)
    cudnn, flash = int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)
    q, k = torch.randn(1, 2, 5, 16, requires_grad=True), torch.randn(1, 2, 9, 16)

    def order(query, key, causal):
        call = dataclasses.replace(kernel_layer._describe(query, key, key, causal, None, None, 0.0), device_type="cuda")
        return kernel_layer._sdpa_priority(call, q.device)

    assert order(q, q, True) == [cudnn, flash]  # training self-attention
    assert order(q, k, False) == [cudnn, flash]  # training cross-attention
    assert order(q.detach(), q.detach(), True) == [cudnn, flash]  # prefill
    assert order(q.detach()[:, :, :1], k, True) == [flash, cudnn]  # decoding
    with torch.no_grad():
        assert order(q, k, False) == [flash, cudnn]  # cross-attention while generating


def test_sdpa_priority_is_never_shared_between_threads():
    """Two threads setting different orders: each call runs under its own order, and the global one survives."""
    import threading

    before = list(torch._C._get_sdp_priority_order())
    orders = {"a": [before[-1]], "b": [before[-2]]}
    seen = {"a": [], "b": []}
    a_running, b_ran = threading.Event(), threading.Event()

    def run_a():
        seen["a"].append(list(torch._C._get_sdp_priority_order()))
        a_running.set()
        b_ran.wait(timeout=0.5)  # without the lock, b would set its order and run here
        seen["a"].append(list(torch._C._get_sdp_priority_order()))
        return torch.zeros(1)

    def run_b():
        seen["b"].append(list(torch._C._get_sdp_priority_order()))
        b_ran.set()
        return torch.zeros(1)

    def thread_b():
        a_running.wait(timeout=5)
        kernel_layer._with_sdpa_priority(orders["b"], run_b)

    other = threading.Thread(target=thread_b)
    other.start()
    kernel_layer._with_sdpa_priority(orders["a"], run_a)
    other.join(timeout=10)
    assert [order[0] for order in seen["a"]] == [before[-1], before[-1]]
    assert [order[0] for order in seen["b"]] == [before[-2]]
    assert list(torch._C._get_sdp_priority_order()) == before


@pytest.mark.gpu
def test_sdpa_threads_run_their_intended_kernels_on_hopper():
    """Prefill (cuDNN first) and decoding (flash first) in two threads at once: one profiler over both threads
    (two profilers at once crash kineto) names the SDPA kernel each thread's calls dispatched to."""
    import threading

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the priority is set only on Hopper and newer")
    try:
        all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        pytest.skip("this PyTorch's profiler cannot record other threads")
    before = list(torch._C._get_sdp_priority_order())
    q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 700, 128, device="cuda", dtype=torch.bfloat16)

    def run(name, query, key):
        with torch.profiler.record_function(name):
            for _ in range(20):
                mea.attention(query, key, key, causal=True, backend="sdpa")

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, experimental_config=all_threads) as profile:
        threads = [threading.Thread(target=run, args=("prefill", q, q)), threading.Thread(target=run, args=("decode", q[:, :, :1], k))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        torch.cuda.synchronize()

    def scope_of(event):
        while event is not None and event.name not in ("prefill", "decode"):
            event = event.cpu_parent
        return None if event is None else event.name

    kernels = {"prefill": set(), "decode": set()}
    for event in profile.events():
        if event.name.startswith("aten::_scaled_dot_product_") and scope_of(event) in kernels:
            kernels[scope_of(event)].add(event.name)
    assert kernels["prefill"] and all("cudnn" in name for name in kernels["prefill"]), kernels
    assert kernels["decode"] and all("flash" in name for name in kernels["decode"]), kernels
    assert list(torch._C._get_sdp_priority_order()) == before


@pytest.mark.gpu
def test_training_cross_attention_runs_cudnn_and_generating_runs_flash_on_hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the priority is set only on Hopper and newer")
    q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, 700, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def sdpa_ops(grad: bool) -> set:
        with torch.set_grad_enabled(grad), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = mea.attention(q, k, k, causal=False, backend="sdpa")
        expected = reference_attention(q.detach(), k.detach(), k.detach(), causal=False)
        assert ((out.detach().double() - expected).norm() / expected.norm()).item() < 2e-2
        return {event.name for event in prof.events() if event.name.startswith("aten::_scaled_dot_product_")}

    training, generating = sdpa_ops(True), sdpa_ops(False)
    assert training and all("cudnn" in name for name in training), training
    assert generating and all("flash" in name for name in generating), generating


def test_autocast_casts_mixed_inputs_like_sdpa():
    q, k = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    v = torch.randn(1, 2, 9, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mea.attention(q, k, v, causal=True, backend="chunked")
    assert out.dtype == torch.bfloat16
    expected = reference_attention(q.bfloat16(), k.bfloat16(), v, causal=True)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


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
