"""The cudnn backend (NVIDIA's cuDNN frontend graph API): capability checks, dispatch order and glue.

On a CPU the frontend is replaced by a stand-in module with cuDNN's documented sdpa / sdpa_backward semantics
(top-left causal mask, ALiBi with BLOOM's slopes from the head count, keys past ``seq_len_kv`` hidden, rows
past ``seq_len_q`` zero, natural-log softmax stats; ragged tensors: batch entry i starts at element
``ragged_offset[i]`` of its buffer, needs the padding mask, and only its first ``seq_len`` rows are read or
written), computed in float64; so a wrong layout, length, offset, bucket or gradient wiring in our glue fails
here (the packed-documents tests are in ``test_cudnn_packed.py``). The GPU tests run the real frontend against float64 math.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import math
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

import memory_efficient_adapter as mea
from remote_code import assert_close_rel, left_padded_mask, right_padded_mask, save_with_remote_code
from test_attention import reference_attention

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")


# ----------------------------------------------------------------------------------------------
# A stand-in for the `cudnn` module: the names our backend uses, with the documented semantics
# ----------------------------------------------------------------------------------------------


class FakeTensor:
    def __init__(self, graph, shape, stride, data_type=None):
        self.graph, self.shape, self.stride, self.is_output = graph, tuple(shape), tuple(stride), False
        self.data_type, self.ragged_offset = data_type, None
        self.uid = len(graph.tensors) + 100
        graph.tensors[self.uid] = self

    def get_uid(self):
        return self.uid

    def set_output(self, value):
        self.is_output = value
        return self

    def set_dim(self, dim):
        self.shape = tuple(dim)
        return self

    def set_stride(self, stride):
        self.stride = tuple(stride)
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self

    def set_ragged_offset(self, offset):
        assert isinstance(offset, FakeTensor) and offset.shape == (self.shape[0] + 1, 1, 1, 1), "[batch + 1, 1, 1, 1]"
        self.ragged_offset = offset
        return self


def ragged_index(tensor: FakeTensor, pack: dict) -> torch.Tensor:
    """The buffer element of every [b, h, s, d] entry of a ragged tensor: its batch entry's offset plus the
    strides of the other dimensions (the batch stride is unused)."""
    batch, heads, seq, dim = tensor.shape
    offsets = pack[tensor.ragged_offset].flatten()[:batch]
    _, stride_h, stride_s, stride_d = tensor.stride
    return (offsets.view(-1, 1, 1, 1) + torch.arange(heads).view(1, -1, 1, 1) * stride_h
            + torch.arange(seq).view(1, 1, -1, 1) * stride_s + torch.arange(dim).view(1, 1, 1, -1) * stride_d)


def storage_of(buffer: torch.Tensor) -> torch.Tensor:
    """The buffer's elements in memory order (a ragged buffer is dense, in its own layout)."""
    return torch.as_strided(buffer, (buffer.numel(),), (1,))


def read(tensor: FakeTensor, pack: dict) -> torch.Tensor:
    """A port's [b, h, s, d] values; for a ragged tensor, rows past a batch entry's length hold whatever
    follows it in memory (cuDNN masks them by the sequence lengths) and zeros past the buffer."""
    buffer = pack[tensor]
    if tensor.ragged_offset is None:
        return buffer
    index, flat = ragged_index(tensor, pack), storage_of(buffer)
    inside = index < flat.numel()
    return torch.where(inside, flat[index.clamp(max=flat.numel() - 1)], torch.zeros((), dtype=flat.dtype))


def write(tensor: FakeTensor, pack: dict, value: torch.Tensor, lengths) -> None:
    """A port's result; a ragged one writes only the first ``lengths[i]`` rows of batch entry i."""
    buffer = pack[tensor]
    if tensor.ragged_offset is None:
        buffer.copy_(value)
        return
    index = ragged_index(tensor, pack)
    rows = torch.arange(tensor.shape[2]).view(1, 1, -1, 1) < lengths.view(-1, 1, 1, 1)
    rows = rows.expand_as(index)
    storage_of(buffer)[index[rows]] = value.expand_as(index)[rows].to(buffer.dtype)


def cudnn_sdpa_reference(q, k, v, scale, causal, alibi, seq_len_q, seq_len_kv):
    """cuDNN's sdpa in float64: (output, stats) with its masks applied in its own convention."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, s_q, _ = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    rows, cols = torch.arange(s_q)[:, None], torch.arange(k.shape[2])[None, :]
    if alibi:
        scores = scores + mea.alibi_slopes(heads).double()[:, None, None] * (cols - rows)
    hidden = torch.zeros(batch, 1, s_q, k.shape[2], dtype=torch.bool)
    row_valid = torch.ones(batch, 1, s_q, 1, dtype=torch.bool)
    if seq_len_kv is not None:
        hidden = hidden | (cols[None, None] >= seq_len_kv.view(batch, 1, 1, 1))
        row_valid = rows[None, None] < seq_len_q.view(batch, 1, 1, 1)
    if causal:
        hidden = hidden | (cols > rows)
    scores = scores.masked_fill(hidden, float("-inf"))
    stats = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = (torch.softmax(scores, dim=-1) @ v).masked_fill(~row_valid, 0.0)
    return out, stats


class FakeGraph:
    built_graphs = 0

    def __init__(self, handle=None, io_data_type=None, intermediate_data_type=None, compute_data_type=None):
        assert handle is not None and intermediate_data_type == compute_data_type == "FLOAT"
        self.node = None
        self.ready = False
        self.tensors = {}

    def tensor_like(self, x):
        return FakeTensor(self, x.shape, x.stride(), data_type=x.dtype)

    def tensor(self, dim, stride, data_type, name=None):
        return FakeTensor(self, dim, stride, data_type)

    def sdpa(self, name, q, k, v, generate_stats, **options):
        outputs = (FakeTensor(self, q.shape, q.stride), FakeTensor(self, q.shape[:3] + (1,), (0, 0, 0, 0)))
        self.node = ("fwd", dict(q=q, k=k, v=v, outputs=outputs, stats=generate_stats), options)
        return outputs

    def sdpa_backward(self, name, q, k, v, o, dO, stats, **options):
        outputs = tuple(FakeTensor(self, x.shape, x.stride) for x in (q, k, v))
        self.node = ("bwd", dict(q=q, k=k, v=v, o=o, dO=dO, stats=stats, outputs=outputs), options)
        return outputs

    def validate(self):
        assert self.node is not None

    def build_operation_graph(self):
        pass

    def create_execution_plans(self, modes):
        assert modes == ["A", "FALLBACK"]

    def check_support(self):
        pass

    def build_plans(self):
        FakeGraph.built_graphs += 1
        self.ready = True

    def get_workspace_size(self):
        return 64

    def execute(self, buffers, workspace, handle=None, tensor_uids=None):
        """The ordered form: buffers in the order of ``tensor_uids``, their graph tensors' uids."""
        assert self.ready and handle is not None and workspace.numel() == 64
        assert len(set(tensor_uids)) == len(tensor_uids) == len(buffers)
        pack = {self.tensors[uid]: buffer for uid, buffer in zip(tensor_uids, buffers)}
        kind, ports, options = self.node
        for tensor, buffer in pack.items():
            if tensor.ragged_offset is not None:
                assert options["use_padding_mask"], "ragged tensors need the padding mask (sequence lengths)"
                assert tensor.ragged_offset in pack, "a ragged tensor's offsets are bound at execution"
            else:
                same = (tuple(buffer.shape), tuple(buffer.stride())) == (tensor.shape, tensor.stride)
                assert same or tensor.shape[-1] == 1
        assert options["use_padding_mask"] == (options["seq_len_q"] is not None)
        lengths = [pack.get(options[name]) for name in ("seq_len_q", "seq_len_kv")]
        masks = dict(scale=options["attn_scale"], causal=options["use_causal_mask"], alibi=options["use_alibi_mask"])
        qkv = [read(ports[name], pack) for name in "qkv"]
        rows = lengths[0] if lengths[0] is not None else torch.full((qkv[0].shape[0],), qkv[0].shape[2])
        row_kept = torch.arange(qkv[0].shape[2]).view(1, 1, -1, 1) < rows.view(-1, 1, 1, 1)
        if kind == "fwd":
            out, stats = cudnn_sdpa_reference(*qkv, *masks.values(), *lengths)
            write(ports["outputs"][0], pack, out, rows)
            if ports["stats"]:
                write(ports["outputs"][1], pack, stats, rows)
            return
        # torch.func, not autograd: a custom op's body (the compiled glue's) runs below the autograd keys
        (out, stats), vjp = torch.func.vjp(
            lambda *x: cudnn_sdpa_reference(*x, *masks.values(), *lengths), *(x.double() for x in qkv)
        )
        grads = vjp((read(ports["dO"], pack).double() * row_kept, torch.zeros_like(stats)))
        assert torch.allclose(read(ports["o"], pack).double() * row_kept, out, atol=1e-5), "o is the forward's output"
        kept_stats = row_kept.expand_as(stats)
        assert torch.allclose(read(ports["stats"], pack).double()[kept_stats], stats[kept_stats], atol=1e-5), "stats"
        keys = lengths[1] if lengths[1] is not None else torch.full((qkv[1].shape[0],), qkv[1].shape[2])
        for port, grad, bound in zip(ports["outputs"], grads, (rows, keys, keys)):
            write(port, pack, grad, bound)


def fake_cudnn_module(stream_log: list | None = None, pygraph=FakeGraph):
    return SimpleNamespace(
        data_type=SimpleNamespace(HALF="HALF", BFLOAT16="BFLOAT16", FLOAT="FLOAT", INT32="INT32", INT64="INT64"),
        heur_mode=SimpleNamespace(A="A", FALLBACK="FALLBACK"),
        pygraph=pygraph,
        create_handle=lambda: object(),
        set_stream=lambda handle, stream: stream_log is not None and stream_log.append(stream),
    )


@pytest.fixture
def fake_cudnn(monkeypatch):
    """The stand-in module, one handle, stream 7, a fresh plan cache, and CUDA probed as if present."""
    streams: list = []
    module = fake_cudnn_module(streams)
    handle = (object(), threading.Lock())
    monkeypatch.setattr(kernel_layer, "_cudnn_module", lambda: module)
    monkeypatch.setattr(kernel_layer, "_cudnn_handle", lambda cudnn, device: handle)
    monkeypatch.setattr(kernel_layer, "_cuda_stream", lambda device: 7)
    monkeypatch.setattr(kernel_layer, "_cudnn_plans", kernel_layer._CudnnPlans(capacity=64))
    monkeypatch.setattr(kernel_layer, "_demoted", {})
    # probed as running: on a machine with CUDA the real probe would run the stand-in (and fail)
    monkeypatch.setattr(kernel_layer, "_probe_results", {("cudnn", "cuda"): None})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    FakeGraph.built_graphs = 0
    return SimpleNamespace(module=module, streams=streams)


def cuda_call(q, k, v, causal=True, mask=None, slopes=None, dropout_p=0.0, sequence_ids=None):
    """The description of a call as the CUDA device would see it (the tensors stay on the CPU)."""
    call = kernel_layer._describe(q, k, v, causal, mask, slopes, dropout_p, sequence_ids)
    return dataclasses.replace(call, device_type="cuda")


def right_padding(batch: int, seq: int, cut: int) -> torch.Tensor:
    return right_padded_mask([seq] + [seq - cut] * (batch - 1), seq).bool()


# ----------------------------------------------------------------------------------------------
# Capability checks and dispatch order
# ----------------------------------------------------------------------------------------------


def qkv(heads=4, kv_heads=2, seq=16, dim=64, dtype=torch.bfloat16, k_len=None):
    q = torch.randn(2, heads, seq, dim).to(dtype)
    k, v = (torch.randn(2, kv_heads, k_len or seq, dim).to(dtype) for _ in range(2))
    return q, k, v


LEFT_PADDING = torch.tensor([[True] * 16, [False] * 3 + [True] * 13])
FULLY_PADDED_ROW = torch.tensor([[True] * 16, [False] * 16])
HOLE = torch.tensor([[True] * 16, [True] * 5 + [False] + [True] * 10])


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: (qkv(), {}), None),
        (lambda: (qkv(), dict(slopes=mea.alibi_slopes(4))), None),
        (lambda: (qkv(heads=12, kv_heads=4), dict(slopes=mea.alibi_slopes(12), mask=right_padding(2, 16, 5))), None),
        (lambda: (qkv(dtype=torch.float16, dim=128), dict(slopes=mea.alibi_slopes(4))), None),
        (lambda: (qkv(dtype=torch.float32), {}), "float16/bfloat16"),
        (lambda: (qkv(dim=36), {}), "head_dim"),
        (lambda: (qkv(dim=256), {}), "head_dim"),
        (lambda: (qkv(), dict(causal=False)), "causal calls over the full sequence"),
        (lambda: (qkv(seq=1, k_len=16), dict(slopes=mea.alibi_slopes(4))), "decoding step"),
        (lambda: (qkv(seq=4, k_len=16), {}), "chunked prefill"),
        (lambda: (qkv(), dict(mask=torch.ones(2, 1, 16, 16, dtype=torch.bool))), "4-D mask"),
        (lambda: (qkv(), dict(slopes=mea.alibi_slopes(4), dropout_p=0.1)), "dropout"),
        (lambda: (qkv(), dict(sequence_ids=torch.tensor([[0] * 9 + [1] * 7] * 2))), None),
        (lambda: (qkv(), dict(sequence_ids=torch.tensor([[0] * 9 + [1] * 7] * 2), mask=right_padding(2, 16, 3))),
         "without a padding mask"),
        (lambda: (qkv(), dict(slopes=torch.rand(4))), "BLOOM's ALiBi slopes"),
        (lambda: (qkv(), dict(slopes=mea.alibi_slopes(4), mask=LEFT_PADDING)), None),
        (lambda: (qkv(), dict(mask=FULLY_PADDED_ROW)), None),
        (lambda: (qkv(), dict(mask=HOLE)), "gap inside a row"),
    ],
)
def test_capability_checks(fake_cudnn, build, reason):
    (q, k, v), options = build()
    got = kernel_layer._why_not("cudnn", cuda_call(q, k, v, **options))
    assert got is None if reason is None else reason in got, got


def test_capability_check_runs_only_on_cuda(fake_cudnn):
    q, k, v = qkv()
    assert "only on CUDA" in kernel_layer._why_not("cudnn", kernel_layer._describe(q, k, v, True, None, None, 0.0))


def count_value_checks(monkeypatch) -> dict:
    """Count the cudnn backend's host reads of the padding layout and the slopes."""
    reads = {"padding": 0, "slopes": 0}
    for slot, name in (("padding", "_padding_layout"), ("slopes", "_are_bloom_slopes")):
        original = getattr(kernel_layer, name)

        def counted(tensor, slot=slot, original=original):
            reads[slot] += 1
            return original(tensor)

        monkeypatch.setattr(kernel_layer, name, counted)
    return reads


def test_checks_run_once_per_forward_with_its_forward_mask_and_per_call_with_a_bare_tensor(fake_cudnn, monkeypatch):
    reads = count_value_checks(monkeypatch)
    q, k, v = qkv()
    mask, slopes = right_padding(2, 16, 4), mea.alibi_slopes(4)
    layers = mea.forward_mask(mask)  # what a model hands to every layer of one forward
    for _ in range(3):
        assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=layers, slopes=slopes)) is None
    assert reads == {"padding": 1, "slopes": 1}
    next_forward = mea.forward_mask(mask)
    assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=next_forward, slopes=slopes)) is None
    assert reads == {"padding": 2, "slopes": 2}
    for _ in range(3):  # a bare tensor (a direct attention() call): no holder, a check per call
        assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=mask, slopes=slopes)) is None
    assert reads == {"padding": 5, "slopes": 5}
    unpadded = mea.forward_mask(None, without_mask=True)  # a forward without padding still checks its slopes once
    for _ in range(2):
        assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=unpadded, slopes=slopes)) is None
    assert reads == {"padding": 5, "slopes": 6}
    assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=unpadded, slopes=torch.rand(4))) is not None
    assert reads["slopes"] == 7  # other slopes within the forward are checked, not taken from the first


def test_no_module_global_keeps_a_check_or_the_checked_tensors(fake_cudnn):
    assert not hasattr(kernel_layer, "_cudnn_checked") and not hasattr(kernel_layer, "_remembered_check")
    q, k, v = qkv()
    # a copy: alibi_slopes() keeps its own tensor (read-only, in a bounded cache), not a caller's
    mask, slopes = right_padding(2, 16, 4), mea.alibi_slopes(4).clone()
    layers = mea.forward_mask(mask)
    for call_mask in (mask, layers):
        assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=call_mask, slopes=slopes)) is None
    gap = mea.forward_mask(HOLE)
    assert "gap inside a row" in kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=gap, slopes=slopes))

    def holds(value, seen) -> bool:
        if id(value) in seen:
            return False
        seen.add(id(value))
        if isinstance(value, weakref.ref):
            return holds(value(), seen)
        if any(value is x for x in (mask, slopes, layers, gap, HOLE)):
            return True
        if isinstance(value, dict):
            return any(holds(x, seen) for item in value.items() for x in item)
        if isinstance(value, (list, tuple, set)):
            return any(holds(x, seen) for x in value)
        return False

    module_state = {name: value for name, value in vars(kernel_layer).items() if not name.startswith("__")}
    assert not [name for name, value in module_state.items() if holds(value, set())]


def test_checks_work_under_inference_mode(fake_cudnn, monkeypatch):
    """Inference tensors have no version counter; the forward's mask object needs none."""
    reads = count_value_checks(monkeypatch)
    with torch.inference_mode():
        q, k, v = qkv()
        slopes = mea.alibi_slopes(4)
        layers = mea.forward_mask(right_padding(2, 16, 4))
        for _ in range(2):
            assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=layers, slopes=slopes)) is None
        gap = HOLE.clone()
        for _ in range(2):
            assert "gap inside a row" in kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=gap, slopes=slopes))
    assert reads == {"padding": 3, "slopes": 3}


def test_a_gap_inside_a_row_in_a_forward_mask_goes_to_the_next_backend(fake_cudnn):
    q, k, v = qkv()
    slopes = mea.alibi_slopes(4)
    gap = mea.forward_mask(HOLE)
    for _ in range(2):  # the second layer reads the kept verdict
        assert mea.select_backend(cuda_call(q, k, v, slopes=slopes, mask=gap)) == "flex"
    for one_run_per_row in (right_padding(2, 16, 3), LEFT_PADDING, FULLY_PADDED_ROW):
        assert mea.select_backend(cuda_call(q, k, v, slopes=slopes, mask=mea.forward_mask(one_run_per_row))) == "cudnn"
    with pytest.raises(ValueError, match="gap inside a row"):
        mea.select_backend(cuda_call(q, k, v, slopes=slopes, mask=gap), "cudnn")


def test_auto_order_places_cudnn_after_sdpa_for_alibi_a_gap_to_flex_and_decoding_steps_to_sdpa(fake_cudnn):
    assert mea.AUTO_ORDER["cuda"][:2] == ("sdpa", "cudnn")
    q, k, v = qkv()
    slopes = mea.alibi_slopes(4)
    assert mea.select_backend(cuda_call(q, k, v, slopes=slopes)) == "cudnn"
    assert mea.select_backend(cuda_call(q, k, v, slopes=slopes, mask=right_padding(2, 16, 3))) == "cudnn"
    assert mea.select_backend(cuda_call(q, k, v)) == "sdpa"  # plain causal: SDPA's own cuDNN path
    assert mea.select_backend(cuda_call(q, k, v, slopes=slopes, mask=LEFT_PADDING)) == "cudnn"
    assert mea.select_backend(cuda_call(q, k, v, slopes=slopes, mask=HOLE)) == "flex"
    dq, dk, dv = qkv(seq=1, k_len=16)
    assert mea.select_backend(cuda_call(dq, dk, dv, slopes=slopes)) == "sdpa"  # one query row: an O(k) bias
    assert mea.select_backend(cuda_call(q, k, v, slopes=slopes, dropout_p=0.1)) == "chunked"
    assert mea.select_backend(cuda_call(q, k, v), "cudnn") == "cudnn"


def test_missing_module_falls_back_and_an_explicit_request_says_why(monkeypatch):
    monkeypatch.setattr(kernel_layer, "_cudnn_module", lambda: None)
    monkeypatch.setattr(kernel_layer, "_probe_results", {})
    q, k, v = qkv()
    call = cuda_call(q, k, v, slopes=mea.alibi_slopes(4))
    assert mea.select_backend(call) == "flex"
    with pytest.raises(ValueError, match="nvidia-cudnn-frontend package\\) is not installed"):
        mea.select_backend(call, "cudnn")


def test_broken_module_is_probed_once_logged_once_and_skipped(fake_cudnn, monkeypatch, caplog):
    attempts = []

    def broken_graph(**kwargs):
        attempts.append(1)
        raise RuntimeError("cudnnGraphNotSupportedError: no engine for this build")

    monkeypatch.setattr(kernel_layer, "_cudnn_module", lambda: fake_cudnn_module(pygraph=broken_graph))
    monkeypatch.setattr(kernel_layer, "_probe_results", {})  # this test probes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.empty(shape).normal_())
    q, k, v = qkv()
    call = cuda_call(q, k, v, slopes=mea.alibi_slopes(4))
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        assert mea.select_backend(call) == "flex"
        assert mea.select_backend(call) == "flex"
    assert attempts == [1]
    warnings = [r.message for r in caplog.records if "cudnn is installed but does not run" in r.message]
    assert len(warnings) == 1 and "no engine for this build" in warnings[0]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_bloom_hands_every_layer_one_mask_object_per_forward(monkeypatch, padded):
    """So cudnn's padding and slopes checks (and flex's block masks) run once per forward, padded or not."""
    bloom = importlib.import_module("memory_efficient_adapter.modeling_bloom")
    config = bloom.BloomConfig(vocab_size=50, hidden_size=32, n_layer=3, n_head=4)
    model = bloom.BloomForCausalLM(config).eval()
    seen = []
    original = bloom.attention

    def recording(*args, attention_mask=None, alibi_slopes=None, **kwargs):
        seen.append((attention_mask, alibi_slopes))
        return original(*args, attention_mask=attention_mask, alibi_slopes=alibi_slopes, **kwargs)

    monkeypatch.setattr(bloom, "attention", recording)
    ids = torch.randint(0, 50, (2, 9))
    mask = right_padded_mask([9, 6], 9) if padded else None
    with torch.no_grad():
        logits = [model(ids, attention_mask=mask).logits for _ in range(2)]
    assert torch.equal(logits[0], logits[1])
    forwards = [seen[:3], seen[3:]]
    assert len(seen) == 6
    for layers in forwards:
        holder, slopes = layers[0]
        assert isinstance(holder, bloom.ForwardMask)  # the model file's own copy of the kernel layer
        assert all(h is holder and s is slopes for h, s in layers)
        assert (holder.tensor is None) != padded
    assert forwards[0][0][0] is not forwards[1][0][0]  # a new object per forward: nothing outlives it


class FrontendNotSupported(Exception):
    """Stands for cudnn.cudnnGraphNotSupportedError (the binding's exception type, an Exception subclass)."""


FrontendNotSupported.__module__ = "cudnn._compiled_module"


def failing_graph(where: str, error: Exception, attempts: list):
    class Graph(FakeGraph):
        def build_plans(self):
            if where == "build":
                attempts.append(where)
                raise error
            super().build_plans()

        def execute(self, *args, **kwargs):
            if where == "execute":
                attempts.append(where)
                raise error
            super().execute(*args, **kwargs)

    return Graph


@pytest.mark.parametrize(
    "where, error",
    [
        ("build", FrontendNotSupported("No valid engine configs for SDPA")),
        ("build", RuntimeError("[cudnn_frontend] Error: No execution plans support the graph.")),
        ("execute", RuntimeError("cudnnException: CUDNN_STATUS_EXECUTION_FAILED")),
        ("execute", ValueError("The graph has no operand layout for ordered execution")),
    ],
    ids=["not_supported_at_build", "runtime_error_at_build", "runtime_error_at_execute", "value_error_at_execute"],
)
def test_frontend_errors_demote_cudnn_for_that_call_kind_and_auto_runs_the_next_backend(
    fake_cudnn, monkeypatch, caplog, where, error
):
    attempts: list = []
    monkeypatch.setattr(fake_cudnn.module, "pygraph", failing_graph(where, error, attempts))
    monkeypatch.setitem(kernel_layer._RUN, "flex", kernel_layer._run_eager)  # the next backend, on the CPU
    q, k, v = qkv(dtype=torch.float32)
    slopes = mea.alibi_slopes(4)
    call = dataclasses.replace(cuda_call(q, k, v, slopes=slopes), dtype=torch.bfloat16)
    options = dict(light_softmax=True, dropout_matmul=True, sequence_ids=None, holder=None)
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        for _ in range(2):
            out = kernel_layer._run_auto(q, k, v, call, None, slopes, 0.125, options)
            expected = reference_attention(q, k, v, True, None, slopes, 0.125)
            assert torch.allclose(out.double(), expected, atol=1e-5)
    assert attempts == [where]  # tried once, then skipped for this kind of call
    (demoted,) = mea.demoted_backends()
    assert demoted[0] == "cudnn" and type(error).__name__ in demoted[2] and str(error) in demoted[2]
    warnings = [r.message for r in caplog.records if "'cudnn' cannot run this kind of call" in r.message]
    assert len(warnings) == 1
    padded = dataclasses.replace(cuda_call(q, k, v, slopes=slopes, mask=right_padding(2, 16, 3)), dtype=torch.bfloat16)
    assert mea.select_backend(padded) == "cudnn"  # another kind of call keeps its kernel
    with pytest.raises(mea.BackendFailure, match=type(error).__name__) as raised:  # asked for by name: raised
        kernel_layer._run_cudnn(q, k, v, call, None, slopes, 0.125)
    assert raised.value.__cause__ is error
    kernel_layer._demoted.clear()  # deliberate: the conftest check fails any test that leaves a demotion behind


def test_errors_outside_the_frontend_are_not_the_backends(fake_cudnn, monkeypatch):
    """Running out of memory, or a bug in our glue, is raised as it is rather than hidden by a fallback."""
    q, k, v = qkv(dtype=torch.float32)
    slopes = mea.alibi_slopes(4)
    call = cuda_call(q, k, v, slopes=slopes)
    options = dict(light_softmax=True, dropout_matmul=True, sequence_ids=None, holder=None)
    for error in (torch.OutOfMemoryError("CUDA out of memory"), AssertionError("glue bug")):
        monkeypatch.setattr(fake_cudnn.module, "pygraph", failing_graph("build", error, []))
        monkeypatch.setattr(kernel_layer, "_cudnn_plans", kernel_layer._CudnnPlans())
        with pytest.raises(type(error)):
            kernel_layer._run_auto(q, k, v, dataclasses.replace(call, dtype=torch.bfloat16), None, slopes, 0.125, options)
    assert mea.demoted_backends() == []


# ----------------------------------------------------------------------------------------------
# The glue on the stand-in: layouts, sequence lengths, buckets, GQA, forward and every gradient
# ----------------------------------------------------------------------------------------------


def assert_matches_float64_reference(out, leaves: list, mask, slopes, scale: float) -> None:
    """``out`` (causal attention of the leaves q, k, v) against float64 math: values, and every gradient for one
    random output gradient."""
    assert_matches_reference(
        out, leaves, lambda q, k, v: reference_attention(q, k, v, causal=True, mask=mask, slopes=slopes, scale=scale)
    )


def assert_matches_reference(out, leaves: list, reference) -> None:
    """``out`` (a function of the leaves q, k, v) against ``reference`` of them in float64: values, and every
    gradient for one random output gradient."""
    expected_leaves = [x.detach().double().requires_grad_() for x in leaves]
    expected = reference(*expected_leaves)
    assert out.shape == leaves[0].shape and torch.allclose(out.double(), expected, atol=1e-5)
    grad = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad.float())
    for got, want in zip(grads, torch.autograd.grad(expected, expected_leaves, grad)):
        assert got.shape == want.shape and torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("seq", [64, 37, 130])
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "causal"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_glue_matches_reference_forward_and_gradients(fake_cudnn, seq, alibi, padding):
    heads, kv_heads, dim = 6, 2, 16
    # q, k, v as BLOOM makes them: views of one fused [b, s, h, 3, d] projection
    fused = torch.randn(3, seq, heads, 3, dim, dtype=torch.float64).float()
    q, k, v = (fused[:, :, :, i].transpose(1, 2) for i in range(3))
    k, v = k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous()
    padded_mask = {"right": right_padded_mask, "left": left_padded_mask}.get(padding)
    mask = None if padded_mask is None else padded_mask([seq, seq - 5, 1 if padding == "right" else 0], seq).bool()
    slopes = mea.alibi_slopes(heads) if alibi else None
    call = cuda_call(q, k, v, mask=mask, slopes=slopes)
    assert kernel_layer._cannot_cudnn(dataclasses.replace(call, dtype=torch.bfloat16)) is None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = kernel_layer._run_cudnn(*leaves, dataclasses.replace(call, needs_grad=True), mask, slopes, 0.3)
    assert_matches_float64_reference(out, leaves, mask, slopes, 0.3)
    assert set(fake_cudnn.streams) == {7}  # every launch on the current stream
    assert FakeGraph.built_graphs == 2  # one forward and one backward graph


def test_inference_builds_a_graph_without_stats(fake_cudnn):
    q, k, v = qkv(dtype=torch.float32)
    call = cuda_call(q, k, v, slopes=mea.alibi_slopes(4))
    with torch.no_grad():
        out = kernel_layer._run_cudnn(q, k, v, call, None, mea.alibi_slopes(4), 0.125)
    assert torch.allclose(out.double(), reference_attention(q, k, v, True, None, mea.alibi_slopes(4), 0.125), atol=1e-5)
    (key,) = kernel_layer._cudnn_plans._plans
    assert key[0] == "fwd" and key[-1] is False


def test_bucket_lengths_bound_waste_and_the_number_of_graphs():
    buckets = {kernel_layer._cudnn_bucket(n) for n in range(1, 32769)}
    for n in list(range(1, 2000)) + [4095, 8000, 8192, 8193, 16383, 32768]:
        bucket = kernel_layer._cudnn_bucket(n)
        assert bucket >= n and bucket % 64 == 0 and (bucket <= 1.125 * n or bucket - n < 64)
    assert kernel_layer._cudnn_bucket(8192) == 8192 and kernel_layer._cudnn_bucket(2048) == 2048
    assert len(buckets) <= 8 * 6 + 8  # eight per doubling above 512 tokens, eight below


def test_variable_lengths_reuse_plans(fake_cudnn):
    slopes = mea.alibi_slopes(2)
    lengths = torch.randint(500, 1000, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    for length in lengths:
        q, k, v = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(3))
        call = dataclasses.replace(cuda_call(q, k, v, slopes=slopes), needs_grad=True)
        kernel_layer._run_cudnn(q, k, v, call, None, slopes, 0.3).sum().backward()
    info = mea.cudnn_plan_cache_info()
    distinct = {kernel_layer._cudnn_bucket(n) for n in lengths}
    assert info["builds"] == 2 * len(distinct) < 2 * len(lengths)
    assert info["hits"] == 2 * len(lengths) - info["builds"] and info["build_seconds"] > 0


def test_plan_cache_is_bounded_lru_and_builds_once_under_concurrent_calls():
    plans = kernel_layer._CudnnPlans(capacity=2)
    built = []

    def build(name):
        built.append(name)
        return (name,)

    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        assert plans.get("a", lambda: build("a")) == ("a",)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == ["a"]
    plans.get("b", lambda: build("b"))
    plans.get("a", lambda: build("a"))  # a is now the most recent
    plans.get("c", lambda: build("c"))  # evicts b
    plans.get("a", lambda: build("a"))
    plans.get("b", lambda: build("b"))
    assert built == ["a", "b", "c", "b"]
    info = plans.info()
    assert info["size"] == 2 and info["hits"] == 5 and info["builds"] == 4


# ----------------------------------------------------------------------------------------------
# GPU: the real frontend against float64 math, and BLOOM end to end against the fp32 stock model
# ----------------------------------------------------------------------------------------------


def needs_cudnn_frontend():
    if "cudnn" not in mea.available_backends("cuda"):
        pytest.skip("nvidia-cudnn-frontend is not installed or does not run here")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", [(1, 1), (3, 1), (12, 4), (16, 16), (112, 112)])
def test_cudnn_matches_float64_reference_on_gpu(dtype, heads, kv_heads):
    needs_cudnn_frontend()
    gen = torch.Generator().manual_seed(heads)
    dim = 128 if heads == 112 else 64
    for alibi in (True, False):
        for seq, mask in (
            (128, None),
            (203, right_padded_mask([203, 150], 203).bool()),
            (203, left_padded_mask([203, 97], 203).bool()),
            (131, left_padded_mask([0, 60], 131).bool()),
        ):
            q = torch.randn(2, heads, seq, dim, generator=gen).to(dtype).cuda()
            k, v = (torch.randn(2, kv_heads, seq, dim, generator=gen).to(dtype).cuda() for _ in range(2))
            slopes = mea.alibi_slopes(heads, "cuda") if alibi else None
            mask = None if mask is None else mask.cuda()
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = mea.attention(*leaves, causal=True, attention_mask=mask, alibi_slopes=slopes, backend="cudnn")
            expected_leaves = [x.double().requires_grad_() for x in (q, k, v)]
            expected = reference_attention(*expected_leaves, causal=True, mask=mask, slopes=slopes)
            what = f"{dtype} h={heads}/{kv_heads} s={seq} alibi={alibi} mask={None if mask is None else mask.sum(-1).tolist()}"
            assert_close_rel(out, expected, 1e-2, what)
            grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).cuda()
            grads = torch.autograd.grad(out, leaves, grad.to(dtype))
            for name, got, want in zip("qkv", grads, torch.autograd.grad(expected, expected_leaves, grad)):
                assert_close_rel(got, want, 2e-2, f"d{name} {what}")


@pytest.mark.gpu
def test_auto_picks_cudnn_for_bloom_alibi_and_left_padding_on_gpu_and_flex_for_a_gap():
    needs_cudnn_frontend()
    q = torch.randn(2, 16, 256, 64, device="cuda", dtype=torch.bfloat16)
    slopes = mea.alibi_slopes(16, "cuda")
    assert mea.select_backend(kernel_layer._describe(q, q, q, True, None, slopes, 0.0)) == "cudnn"
    left = torch.ones(2, 256, dtype=torch.bool, device="cuda")
    left[1, :10] = False
    assert mea.select_backend(kernel_layer._describe(q, q, q, True, left, slopes, 0.0)) == "cudnn"
    gap = left.clone()
    gap[0, 100] = False
    assert mea.select_backend(kernel_layer._describe(q, q, q, True, gap, slopes, 0.0)) in ("flash_attn", "flex")


def launched_kernels(step) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = step()
        torch.cuda.synchronize()
    return result, [event.key for event in prof.key_averages()]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "compiled, padding",
    [(False, "right"), (False, "left"), (True, None), (True, "right"), (True, "left")],
    ids=["eager_right", "eager_left", "compiled", "compiled_right", "compiled_left"],
)
def test_bloom_on_cudnn_matches_fp32_stock_logits_and_gradients(compiled, padding, tmp_path):
    """Eager: a padded batch on the cudnn backend (kept padded: ``unpad_batches=False``). Compiled (Inductor, one
    graph): ``auto`` sends the attention to cudnn's opaque ops (not to flex) with the slopes of the model's
    ForwardMask; a padding mask on the ragged ops, checked when the step runs."""
    needs_cudnn_frontend()
    config = BloomConfig(vocab_size=300, hidden_size=8 * 64, n_layer=2, n_head=8, pad_token_id=0)
    torch.manual_seed(0)
    stock = BloomForCausalLM(config).eval()
    for param in stock.parameters():
        param.data.normal_(0.0, 0.05)
    folder = save_with_remote_code(stock, str(tmp_path), ["modeling_bloom.py"],
                                   {"AutoModelForCausalLM": "modeling_bloom.BloomForCausalLM"})
    ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()
    stock = stock.cuda()
    ids = torch.randint(3, 300, (2, 333), generator=torch.Generator().manual_seed(1)).cuda()
    padded_mask = {"right": right_padded_mask, "left": left_padded_mask}.get(padding)
    mask = torch.ones_like(ids) if padded_mask is None else padded_mask([333, 250], 333).cuda()
    labels = ids.masked_fill(mask == 0, -100)
    expected = stock(ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(ours, fullgraph=True)
        given = {} if padding is None else {"attention_mask": mask}
        actual, kernels = launched_kernels(lambda: run(ids, labels=labels, **given))
        _, backward_kernels = launched_kernels(actual.loss.backward)
        assert any("sdpa" in name and "fprop" in name for name in kernels), kernels
        assert any("sdpa" in name and "bprop" in name for name in backward_kernels), backward_kernels
        assert not any("flex" in name for name in kernels + backward_kernels), kernels + backward_kernels
    else:
        ours.config.attn_backend, ours.config.unpad_batches = "cudnn", False
        actual = ours(ids, attention_mask=mask, labels=labels)
        actual.loss.backward()
    keep = mask.bool()
    assert_close_rel(actual.logits.float()[keep], expected.logits[keep], 2e-2, "logits")
    assert abs(actual.loss.item() - expected.loss.item()) < 1e-2 * expected.loss.item()
    ours_grads = dict(ours.named_parameters())
    for name, param in stock.named_parameters():
        assert_close_rel(ours_grads[name].grad.float(), param.grad, 5e-2, f"grad {name}")
    assert math.isfinite(actual.loss.item())


# ----------------------------------------------------------------------------------------------
# Once per forward on the patch / registry path: transformers makes the mask once and hands it to every layer
# ----------------------------------------------------------------------------------------------


def patched_tiny_stock(family: str, backend: str):
    from test_patch import STOCK_CLASSES, randomize_
    from transformers import LlamaConfig

    if family == "llama":  # head_dim 32: what flex takes
        config = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    else:
        config = BloomConfig(vocab_size=61, hidden_size=64, n_layer=3, n_head=2)
    torch.manual_seed(0)
    stock = randomize_(STOCK_CLASSES[family](config))
    ours = copy.deepcopy(stock)
    mea.apply_attention_patch(ours, backend=backend)
    return stock, ours


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_patched_models_build_one_flex_block_mask_per_forward(monkeypatch, family):
    bloom = importlib.import_module("memory_efficient_adapter.modeling_bloom")
    layer = bloom if family == "bloom" else kernel_layer  # patched BLOOM runs modeling_bloom's copy of the layer
    built = []
    original = layer._banded_block_mask
    monkeypatch.setattr(layer, "_banded_block_mask", lambda *a, **kw: built.append(1) or original(*a, **kw))
    stock, ours = patched_tiny_stock(family, "flex")
    ids = torch.randint(3, 61, (3, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[1] * 11, [0] * 4 + [1] * 7, [0] * 7 + [1] * 4])  # left padding
    try:
        with torch.no_grad():
            for forward in range(2):
                got = ours(ids, attention_mask=mask).logits
                assert len(built) == forward + 1  # three layers, one block mask
            expected = stock(ids, attention_mask=mask).logits
    finally:
        mea.remove_attention_patch(ours)
    keep = mask.bool()
    assert_close_rel(got[keep], expected[keep], 1e-4, f"{family} on flex vs stock")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_patched_bloom_hands_every_layer_one_mask_and_one_slopes_tensor_per_forward(monkeypatch, padded):
    bloom = importlib.import_module("memory_efficient_adapter.modeling_bloom")
    seen = []
    original = bloom.attention

    def recording(*args, attention_mask=None, alibi_slopes=None, **kwargs):
        seen.append((attention_mask, alibi_slopes))
        return original(*args, attention_mask=attention_mask, alibi_slopes=alibi_slopes, **kwargs)

    monkeypatch.setattr(bloom, "attention", recording)
    stock, ours = patched_tiny_stock("bloom", "auto")
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = right_padded_mask([9, 6], 9) if padded else torch.ones(2, 9, dtype=torch.long)
    try:
        with torch.no_grad():
            got = [ours(ids, attention_mask=mask).logits for _ in range(2)]
            expected = stock(ids, attention_mask=mask).logits
    finally:
        mea.remove_attention_patch(ours)
    keep = mask.bool()
    assert_close_rel(got[1][keep], expected[keep], 1e-4, "patched BLOOM vs stock")
    assert len(seen) == 6
    for layers in (seen[:3], seen[3:]):
        holder, slopes = layers[0]
        assert isinstance(holder, bloom.ForwardMask) and (holder.tensor is None) != padded
        assert all(h is holder and s is slopes for h, s in layers)
        assert torch.equal(slopes, mea.alibi_slopes(2))
    assert seen[0][0] is not seen[3][0]
