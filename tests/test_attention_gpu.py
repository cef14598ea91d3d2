"""The kernel layer on CUDA: every backend that runs on this machine against the float64 reference, flex block
masks, SDPA's kernel priority (per call, per thread, restored) and autocast."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from test_attention import TOLERANCE, kernel_layer, mea, random_case, reference_attention, run_and_compare


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
    q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)  # PyTorch settles its default order at a first call
    before = list(torch._C._get_sdp_priority_order())

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
