"""The kernel layer against the float64 reference of ``test_attention.py``: cases found by fuzzing (masks
broadcast over keys or queries, learnable biases, float64 masks and slopes, refused shapes, chunked kernels under
autocast)."""

from __future__ import annotations

import pytest
import torch

import memory_efficient_adapter as mea
from tests.test_attention import reference_attention


@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 2, 1, 1), (1, 1, 1, 12)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_4d_mask_broadcast_over_keys_or_queries_works_in_every_chunked_block_and_on_flex(shape, kind):
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (8, 12, 12))
    mask = torch.rand(shape, generator=gen) > 0.3 if kind == "bool" else torch.randn(shape, generator=gen)
    mask[..., 0] = True if kind == "bool" else 0.5  # some key visible to every query
    expected = reference_attention(q, k, v, causal=True, mask=mask)
    chunked = (("chunked", {"chunk_size": [3, 4]}), ("chunked", {"chunk_size": [8, 1]}))
    for backend, options in (*chunked, ("eager", {}), ("flex", {})):  # flex's lookup indexed a broadcast key
        out = mea.attention(q, k, v, causal=True, attention_mask=mask, backend=backend, **options)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_a_learnable_bias_gets_its_gradient_or_a_refusal_that_says_so():
    """An additive mask or ALiBi slopes that require grad: eager (and sdpa on the CPU) differentiate them, auto
    goes there, chunked refuses by name instead of leaving the gradient None."""
    gen = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    for mask, alibi in ((bias, None), (None, slopes)):
        learnable = bias if mask is not None else slopes
        (expected,) = torch.autograd.grad(reference_attention(q, k, v, True, mask, alibi).sum(), learnable)
        for backend in ("auto", "eager", "sdpa") if alibi is None else ("auto", "eager"):
            out = mea.attention(q, k, v, causal=True, attention_mask=mask, alibi_slopes=alibi, backend=backend)
            (grad,) = torch.autograd.grad(out.sum(), learnable)
            torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10)
        with pytest.raises(ValueError, match="chunked gives no gradient"):
            mea.attention(q, k, v, causal=True, attention_mask=mask, alibi_slopes=alibi, backend="chunked")
        with torch.no_grad():  # nothing to differentiate: chunked takes it
            mea.attention(q, k, v, causal=True, attention_mask=mask, alibi_slopes=alibi, backend="chunked")


def test_more_queries_than_keys_with_documents_or_padded_alibi_is_refused_by_name():
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    keep = torch.tensor([[True, False, True, True]])
    with pytest.raises(ValueError, match="q_len 6 > k_len 4 with sequence_ids"):
        mea.attention(q, k, v, sequence_ids=torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="q_len 6 > k_len 4 with alibi_slopes and a"):
        mea.attention(q, k, v, attention_mask=keep, alibi_slopes=torch.tensor([0.5]), backend="chunked")


@pytest.mark.parametrize("backend", ["chunked", "eager", "auto"])
def test_float64_alibi_and_additive_masks_keep_float64(backend):
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.3, 0.1234567], dtype=torch.float64)
    mask = torch.randn(1, 2, 16, 16, generator=gen, dtype=torch.float64) / 3
    for kwargs in ({"alibi_slopes": slopes}, {"attention_mask": mask}):
        expected = reference_attention(q, k, v, True, kwargs.get("attention_mask"), kwargs.get("alibi_slopes"))
        out = mea.attention(q, k, v, causal=True, backend=backend, **kwargs)
        assert (out - expected).abs().max() < 1e-12


def test_a_float_chunk_size_is_refused_by_name():
    with pytest.raises(ValueError, match="chunk_size"):
        mea.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend="chunked", chunk_size=2.0)


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_chunked_kernels_under_autocast_compute_as_without_it_and_as_compiled(alibi):
    """Under float16 autocast q, k and v are cast as for SDPA; the chunked kernels then keep their float32 scores
    and sums (autocast left on cast those matmuls back to half in eager calls only: 1.4x to 2.5x stock's error,
    and an eager step differed from a compiled one, whose graph runs our ops with autocast off)."""
    generator = torch.Generator().manual_seed(5)
    q = 2 * torch.randn(2, 4, 37, 16, generator=generator)
    k = 2 * torch.randn(2, 2, 37, 16, generator=generator)
    v = torch.randn(2, 2, 37, 16, generator=generator)
    grad = torch.randn(2, 4, 37, 16, generator=generator)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 29:] = False
    slopes = mea.alibi_slopes(4) if alibi else None

    def call(q, k, v):
        return mea.attention(q, k, v, causal=True, attention_mask=mask, alibi_slopes=slopes, backend="chunked")

    def run(fn, inputs, autocast: bool) -> list:
        inputs = [x.clone().requires_grad_() for x in inputs]
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        return [out, *(g.half() for g in grads)]

    without_autocast = run(call, [x.half() for x in (q, k, v)], autocast=False)
    torch._dynamo.reset()
    compiled = run(torch.compile(call, backend="aot_eager", fullgraph=True), [q, k, v], autocast=True)
    eager = run(call, [q, k, v], autocast=True)
    for name, got in (("eager", eager), ("compiled", compiled)):
        assert all(torch.equal(a, b) for a, b in zip(got, without_autocast, strict=True)), name
