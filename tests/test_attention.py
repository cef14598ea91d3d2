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
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
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
    err = ((out.double() - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert err < tol, f"{backend}: forward relative error {err:.2e} for {describe}"
    forward_err, grad_err = err, 0.0
    if not with_grad:
        return forward_err, grad_err
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device)
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
    assert len(saved) == 1 and saved[0] is out or torch.equal(saved[0], out)
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


def test_runtime_failure_in_auto_falls_back_once_with_the_right_result(monkeypatch, caplog):
    def failing_sdpa(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(kernel_layer._RUN, "sdpa", failing_sdpa)
    monkeypatch.setattr(kernel_layer, "_failed_at_runtime", set())
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    q = torch.randn(1, 2, 7, 16)
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        first = mea.attention(q, q, q, causal=True)
        second = mea.attention(q, q, q, causal=True)
    expected = reference_attention(q, q, q, causal=True)
    assert torch.allclose(first.double(), expected, atol=1e-5) and torch.equal(first, second)
    assert sum("kernel exploded" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="kernel exploded"):
        mea.attention(q, q, q, causal=True, backend="sdpa")


def test_available_backends_on_cpu():
    names = mea.available_backends("cpu")
    assert {"sdpa", "chunked", "eager"} <= set(names)
    assert "flash_attn" not in names and "xformers" not in names


class FakeConfig:
    def __init__(self, implementation=None, attn_backend=None):
        self._attn_implementation = implementation
        if attn_backend is not None:
            self.attn_backend = attn_backend


@pytest.mark.parametrize(
    "implementation, attn_backend, expected",
    [
        (None, None, "auto"),
        ("sdpa", None, "auto"),
        ("eager", None, "eager"),
        ("flash_attention_2", None, "flash_attn"),
        ("flex_attention", None, "flex"),
        ("mea_chunked", None, "chunked"),
        ("eager", "chunked", "chunked"),
    ],
)
def test_backend_from_config(implementation, attn_backend, expected):
    assert mea.backend_from_config(FakeConfig(implementation, attn_backend)) == expected


def test_backend_from_config_rejects_unknown_attn_backend():
    with pytest.raises(ValueError, match="attn_backend"):
        mea.backend_from_config(FakeConfig(None, "fastest"))


def test_keep_mask_from_padding():
    assert mea.keep_mask_from_padding(torch.ones(2, 5, dtype=torch.long)) is None
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(mea.keep_mask_from_padding(mask), mask.bool())
    with pytest.raises(ValueError, match="2-D padding mask"):
        mea.keep_mask_from_padding(torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)  # slope * position
    assert torch.allclose(mea.alibi_slopes(heads), alibi[:, 0, 1], rtol=1e-6)


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


BLOCK_MASK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import importlib, resource, sys, torch
    kernel_layer = importlib.import_module("memory_efficient_adapter.attention")
    n = int(sys.argv[1])
    kernel_layer._FLEX_BAND_ELEMENTS = 1 << 20
    q = torch.empty(1, 1, n, 32, device="meta")
    call = kernel_layer._describe(q, q, q, True, None, None, 0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    block_mask = kernel_layer._flex_block_mask(call, None, "cpu")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, int(block_mask.kv_num_blocks.sum()), int(block_mask.full_kv_num_blocks.sum()))
    """
)


def test_flex_block_mask_is_built_in_bands_far_below_one_mask_matrix():
    tokens = 16384
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
    # a quarter of one bool [q, k] matrix; create_block_mask's whole-grid evaluation grows it by ~2.5 GiB here
    assert peak_growth < tokens * tokens / 4, f"peak grew by {peak_growth / 2**20:.0f} MiB"


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


@pytest.mark.slow
def test_flex_block_masks_are_reused_only_for_the_same_mask(monkeypatch):
    q = torch.randn(2, 2, 40, 32)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :9] = False
    calls = []
    original = kernel_layer._banded_block_mask
    monkeypatch.setattr(kernel_layer, "_banded_block_mask", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    first = mea.attention(q, q, q, causal=True, attention_mask=keep, backend="flex")
    again = mea.attention(q, q, q, causal=True, attention_mask=keep, backend="flex")
    assert len(calls) == 1 and torch.equal(first, again)
    keep[1, :5] = False  # modified in place: the cached block mask must not be reused
    changed = mea.attention(q, q, q, causal=True, attention_mask=keep, backend="flex")
    assert len(calls) == 2
    expected = reference_attention(q, q, q, causal=True, mask=keep)
    assert torch.allclose(changed.double(), expected, atol=1e-5)
    mea.attention(q, q, q, causal=True, backend="flex")
    mea.attention(q, q, q, causal=True, backend="flex")
    assert len(calls) == 3


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
    monkeypatch.setitem(kernel_layer._FLEX_STATIC_SHAPES, "limit", 2)

    def static(q_len, k_len, device_type="cuda", batch=1):
        q, k = torch.empty(batch, 4, q_len, 32, device="meta"), torch.empty(batch, 2, k_len, 32, device="meta")
        call = dataclasses.replace(kernel_layer._describe(q, k, k, True, None, None, 0.0), device_type=device_type)
        return kernel_layer._flex_uses_static_shapes(call, q, k)

    assert static(1024, 1024) and static(2048, 2048)  # two shapes: a static kernel each
    assert not static(4096, 4096) and not static(1024, 1024, batch=2)  # past the limit: the dynamic kernel
    assert static(1024, 1024) and static(2048, 2048)  # shapes seen before keep theirs
    assert not static(1, 1500) and not static(1, 1501)  # decoding steps: dynamic
    assert static(4096, 4096, device_type="cpu")  # the CPU builds static shapes only
    with pytest.raises(ValueError, match="static flex shapes"):
        mea.set_flex_static_shapes(-1)


@pytest.mark.gpu
def test_sdpa_on_cuda_leaves_the_global_kernel_priority_as_it_found_it():
    before = list(torch._C._get_sdp_priority_order())
    q = torch.randn(1, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 300, 128, device="cuda", dtype=torch.bfloat16)
    for query, key in ((q, q), (q[:, :, :1], k)):  # prefill-shaped (cuDNN first), then decoding (flash first)
        out = mea.attention(query, key, key, causal=True, backend="sdpa")
        assert list(torch._C._get_sdp_priority_order()) == before
        expected = reference_attention(query, key, key, causal=True)
        assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


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
