"""The cudnn backend under torch.compile, on the stand-in frontend of ``test_cudnn_backend.py``: the checks made
while tracing (no host read), the glue as opaque custom ops (dense calls, dynamic lengths), padding masks,
whose layout the ops check when the compiled step runs (one run of kept keys per row on cuDNN's ragged layout,
a gap inside a row on the chunked kernels), and packed documents, found when the step runs too.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

import pytest
import torch

import memory_efficient_adapter as mea
from remote_code import left_padded_mask, right_padded_mask
from test_cudnn_backend import (  # noqa: F401 (fake_cudnn: a fixture)
    HOLE,
    LEFT_PADDING,
    FakeGraph,
    assert_matches_float64_reference,
    assert_matches_reference,
    count_value_checks,
    cuda_call,
    fake_cudnn,
    qkv,
    right_padding,
)
from test_attention import reference_attention
from test_packed import packed_ids
from test_packed import reference_attention as documents_reference

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")


# ----------------------------------------------------------------------------------------------
# Under torch.compile: the checks that need no host read, and the glue as two opaque ops
# ----------------------------------------------------------------------------------------------


def test_while_tracing_cudnn_takes_padding_masks_documents_and_only_the_slopes_a_forward_mask_holds(fake_cudnn, monkeypatch):
    """Tracing cannot read the slopes, the padding layout or the documents: the model vouches for its slopes
    through its ForwardMask, a padding mask and packed documents are taken (found when the step runs), other
    slopes go to the next backend, and nothing is read on the host."""
    reads = count_value_checks(monkeypatch)
    monkeypatch.setattr(kernel_layer, "_is_tracing", lambda: True)

    def capture_state():  # Dynamo cannot trace it: a torch function that returns a bool breaks the graph
        raise AssertionError("is_current_stream_capturing() called while tracing")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", capture_state)
    kernel_layer._probe_results[("cudnn", "cuda")] = None  # the stand-in runs (the fixture resets these)
    q, k, v = qkv()
    holder = mea.forward_mask(None, without_mask=True)
    slopes = holder.bloom_alibi_slopes(4, "cpu")
    assert holder.bloom_alibi_slopes(4, "cpu") is slopes and torch.equal(slopes, mea.alibi_slopes(4))
    assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=holder, slopes=slopes)) is None
    assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=holder)) is None
    for padding in (right_padding(2, 16, 3), LEFT_PADDING, HOLE):
        padded = mea.forward_mask(padding)
        assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=padded, slopes=padded.bloom_alibi_slopes(4, "cpu"))) is None
    documents = torch.tensor([[0] * 9 + [1] * 7] * 2)
    assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=holder, slopes=slopes, sequence_ids=documents)) is None
    for options, reason in (
        (dict(slopes=mea.alibi_slopes(4)), "BLOOM slopes of the model's ForwardMask"),  # no holder
        (dict(mask=holder, slopes=mea.alibi_slopes(4).clone()), "BLOOM slopes of the model's ForwardMask"),
    ):
        assert reason in kernel_layer._cannot_cudnn(cuda_call(q, k, v, **options))
    assert reads == {"padding": 0, "slopes": 0}
    assert mea.select_backend(cuda_call(q, k, v, mask=holder, slopes=slopes)) == "cudnn"
    assert mea.select_backend(cuda_call(q, k, v, slopes=mea.alibi_slopes(4))) == "flex"


def test_eager_calls_take_a_forward_masks_slopes_without_reading_them(fake_cudnn, monkeypatch):
    reads = count_value_checks(monkeypatch)
    q, k, v = qkv()
    holder = mea.forward_mask(right_padding(2, 16, 3))
    slopes = holder.bloom_alibi_slopes(4, "cpu")
    assert kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=holder, slopes=slopes)) is None
    assert reads == {"padding": 1, "slopes": 0}
    assert "other slopes" in kernel_layer._cannot_cudnn(cuda_call(q, k, v, mask=holder, slopes=torch.rand(4)))


def compiled_with_graphs(function, dynamic=None) -> tuple:
    """``function`` compiled (one graph: a break raises), and the op names of each graph compiled for it, by
    kind: a forward graph per compile, a backward graph once a gradient through an output has been taken."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keeping(name):
        def compiler(graph, example_inputs):
            graphs[name].append([str(node.target) for node in graph.graph.nodes if node.op == "call_function"])
            return make_boxed_func(graph.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keeping("forward"), bw_compiler=keeping("backward"))
    return torch.compile(function, backend=backend, fullgraph=True, dynamic=dynamic), graphs


def bloom_attention_on_cudnn(q, k, v):
    """What BLOOM's attention asks of the cudnn backend: its ForwardMask's slopes, no mask (the device is
    described as CUDA; the tensors stay on the CPU, for the stand-in frontend)."""
    holder = mea.forward_mask(None, without_mask=True)
    slopes = holder.bloom_alibi_slopes(q.shape[1], q.device)
    call = dataclasses.replace(kernel_layer._describe(q, k, v, True, holder, slopes, 0.0), device_type="cuda")
    return kernel_layer._run_cudnn(q, k, v, call, None, slopes, 0.3)


def cudnn_ops_of(graph: list) -> list:
    return [op.removeprefix(f"{kernel_layer._OPS_NAMESPACE}.") for op in graph if "cudnn_" in op]


@pytest.mark.parametrize("seq", [64, 37], ids=["bucket", "padded_to_bucket"])
def test_compiled_glue_runs_as_opaque_ops_and_matches_reference(fake_cudnn, seq):
    heads, kv_heads, dim = 4, 2, 16
    q = torch.randn(2, heads, seq, dim, dtype=torch.float64).float()
    k, v = (torch.randn(2, kv_heads, seq, dim, dtype=torch.float64).float() for _ in range(2))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    compiled, graphs = compiled_with_graphs(bloom_attention_on_cudnn)
    out = compiled(*leaves)
    assert_matches_float64_reference(out, leaves, None, mea.alibi_slopes(heads), 0.3)
    assert [cudnn_ops_of(graph) for graph in graphs["forward"]] == [["cudnn_attention_forward.default"]]
    assert [cudnn_ops_of(graph) for graph in graphs["backward"]] == [["cudnn_attention_backward.default"]]
    assert FakeGraph.built_graphs == 2  # built when the compiled step ran, not while tracing


def test_compiled_glue_takes_dynamic_lengths_in_one_graph(fake_cudnn):
    """Padding to the bucket happens when the ops run, so a dynamic length compiles once (no guard on it)."""
    compiled, graphs = compiled_with_graphs(bloom_attention_on_cudnn, dynamic=True)
    for seq in (37, 50, 130):
        q = torch.randn(2, 4, seq, 16, dtype=torch.float64).float()
        k, v = (torch.randn(2, 2, seq, 16, dtype=torch.float64).float() for _ in range(2))
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        assert_matches_float64_reference(compiled(*leaves), leaves, None, mea.alibi_slopes(4), 0.3)
    assert len(graphs["forward"]) == len(graphs["backward"]) == 1
    assert FakeGraph.built_graphs == 4  # buckets 64 and 192: a forward and a backward graph each


# ----------------------------------------------------------------------------------------------
# Padding masks under torch.compile: checked when the step runs, once per mask tensor
# ----------------------------------------------------------------------------------------------


def two_cudnn_layers(q, k, v, keep, ids, alibi: bool, scale: float):
    """Two calls with one padding mask (``keep``) or one tensor of sequence ids (``ids``: packed documents), as
    two layers of one forward make them (BLOOM's slopes from the ForwardMask, or plain causal attention); the
    second takes k and v the other way round."""
    holder = mea.forward_mask(keep, without_mask=keep is None)
    slopes = holder.bloom_alibi_slopes(q.shape[1], q.device) if alibi else None
    outputs = []
    for key, value in ((k, v), (v, k)):
        call = dataclasses.replace(kernel_layer._describe(q, key, value, True, holder, slopes, 0.0, ids), device_type="cuda")
        outputs.append(kernel_layer._run_cudnn(q, key, value, call, keep, slopes, scale, sequence_ids=ids))
    return outputs[0] + outputs[1]


def padded_layers(keep) -> tuple:
    """The arguments of ``two_cudnn_layers`` after q, k and v for a padding mask (BLOOM, scale 0.3)."""
    return keep, None, True, 0.3


def two_layers_reference(keep, slopes):
    """``two_cudnn_layers`` with ``padded_layers(keep)`` in float64 math."""

    def reference(q, k, v):
        return sum(reference_attention(q, a, b, causal=True, mask=keep, slopes=slopes, scale=0.3) for a, b in ((k, v), (v, k)))

    return reference


def recorded_calls(monkeypatch, name: str) -> list:
    """The tensors the kernel layer's one-argument function ``name`` (a host read) is called with from now on."""
    seen = []
    original = getattr(kernel_layer, name)
    monkeypatch.setattr(kernel_layer, name, lambda x: seen.append(x) or original(x))
    return seen


def counting_run_checks(monkeypatch) -> list:
    return recorded_calls(monkeypatch, "_padding_layout")


@pytest.mark.parametrize(
    "padding, graphs_built",
    [
        (lambda seq: right_padded_mask([seq, seq - 9, 1], seq), "dense with key lengths"),
        (lambda seq: left_padded_mask([seq, seq - 9, 0], seq), "ragged"),
        (lambda seq: torch.ones(3, seq, dtype=torch.long), "dense"),
    ],
    ids=["right", "left_with_an_empty_row", "none_padded"],
)
def test_compiled_padding_mask_runs_on_cudnn_found_once_when_the_step_runs(fake_cudnn, monkeypatch, padding, graphs_built):
    """Right padding on the dense graphs with sequence lengths, a mask that keeps every key on the dense graphs
    as if there were none (64 tokens: its own bucket), left padding on the ragged layout."""
    checked = counting_run_checks(monkeypatch)
    heads, kv_heads, seq = 4, 2, 64
    keep = padding(seq).bool()
    q = torch.randn(3, heads, seq, 16, dtype=torch.float64).float()
    k, v = (torch.randn(3, kv_heads, seq, 16, dtype=torch.float64).float() for _ in range(2))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    compiled, graphs = compiled_with_graphs(two_cudnn_layers)
    out = compiled(*leaves, *padded_layers(keep))
    assert len(checked) == 1 and checked[0] is keep  # read when the step ran (tracing sees fake tensors)
    assert_matches_reference(out, leaves, two_layers_reference(keep, mea.alibi_slopes(heads)))
    assert len(checked) == 1  # one host read for two layers, forward and backward
    assert [cudnn_ops_of(graph) for graph in graphs["forward"]] == [["cudnn_padded_rows_forward.default"] * 2]
    assert [cudnn_ops_of(graph) for graph in graphs["backward"]] == [["cudnn_padded_rows_backward.default"] * 2]
    assert FakeGraph.built_graphs == 2  # one forward and one backward graph, shared by the layers
    directions = {"fwd-ragged", "bwd-ragged"} if graphs_built == "ragged" else {"fwd", "bwd"}
    plans = list(kernel_layer._cudnn_plans._plans)
    assert {key[0] for key in plans} == directions
    flags = [part for key in plans for part in key if isinstance(part, kernel_layer._CudnnFlags)]
    assert len(flags) == 2 and all(flag.padded == (graphs_built != "dense") for flag in flags)


def test_compiled_padding_masks_take_dynamic_lengths_in_one_graph(fake_cudnn):
    compiled, graphs = compiled_with_graphs(two_cudnn_layers, dynamic=True)
    for seq, padding in ((37, left_padded_mask), (50, right_padded_mask), (130, left_padded_mask)):
        keep = padding([seq, seq - 11], seq).bool()
        q = torch.randn(2, 4, seq, 16, dtype=torch.float64).float()
        k, v = (torch.randn(2, 2, seq, 16, dtype=torch.float64).float() for _ in range(2))
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = compiled(*leaves, *padded_layers(keep))
        assert_matches_reference(out, leaves, two_layers_reference(keep, mea.alibi_slopes(4)))
    assert len(graphs["forward"]) == len(graphs["backward"]) == 1

def test_compiled_mask_with_a_gap_runs_the_chunked_kernels_and_says_so_once(fake_cudnn, monkeypatch, caplog):
    checked = counting_run_checks(monkeypatch)
    keep = HOLE.clone()
    keep[0, 3:6] = False
    q = torch.randn(2, 4, 16, 16, dtype=torch.float64).float()
    k, v = (torch.randn(2, 2, 16, 16, dtype=torch.float64).float() for _ in range(2))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    compiled, _ = compiled_with_graphs(two_cudnn_layers)
    with caplog.at_level(logging.WARNING):
        out = compiled(*leaves, *padded_layers(keep))
    slopes = mea.alibi_slopes(4)

    def eager_backend(q, k, v):  # ALiBi over a gap counts kept keys only: the eager backend's rule
        return sum(mea.attention(q, a, b, causal=True, attention_mask=keep, alibi_slopes=slopes.double(), scale=0.3,
                                 backend="eager") for a, b in ((k, v), (v, k)))

    assert_matches_reference(out, leaves, eager_backend)
    assert len(checked) == 1 and FakeGraph.built_graphs == 0
    assert [r.message for r in caplog.records].count(kernel_layer._GAP_ON_CHUNKED) == 1


def test_a_masks_layout_is_kept_on_the_tensor_with_its_version(fake_cudnn, monkeypatch):
    checked = counting_run_checks(monkeypatch)
    keep = LEFT_PADDING.clone()
    assert kernel_layer._padding_layout_when_run(keep) == kernel_layer._padding_layout_when_run(keep) == "runs"
    assert len(checked) == 1
    keep[1, 8] = False  # changed in place: found again
    assert kernel_layer._padding_layout_when_run(keep) == "gaps" and len(checked) == 2
    keep[1] = True
    assert kernel_layer._padding_layout_when_run(keep) == "full" and len(checked) == 3
    keep[1, 12:] = False
    with torch.inference_mode():
        frozen = LEFT_PADDING.clone()
    assert kernel_layer._padding_layout_when_run(keep) == "prefix" and len(checked) == 4
    for _ in range(2):  # an inference tensor has no version: found every time, nothing kept on it
        assert kernel_layer._padding_layout_when_run(frozen) == "runs"
    assert len(checked) == 6 and not hasattr(frozen, kernel_layer._LAYOUT_SEEN)


# ----------------------------------------------------------------------------------------------
# Packed documents under torch.compile: found when the step runs, once per sequence-ids tensor
# ----------------------------------------------------------------------------------------------


def two_layers_of_documents_reference(ids, alibi: bool):
    """``two_cudnn_layers`` over packed documents (head size 16) in float64 math."""
    slopes = mea.alibi_slopes(4) if alibi else None

    def reference(q, k, v):
        return sum(documents_reference(q, a, b, documents=ids, alibi=slopes) for a, b in ((k, v), (v, k)))

    return reference


def counting_documents_found(monkeypatch) -> list:
    return recorded_calls(monkeypatch, "_ragged_documents")


@pytest.mark.parametrize(
    "lengths, alibi, graphs_built",
    [
        ([[9, 30, 1, 24], [64]], True, "ragged"),
        ([[40, 24], [3, 61]], False, "ragged"),
        ([[64], [64]], True, "dense"),
    ],
    ids=["documents_alibi", "documents_causal", "one_per_row"],
)
def test_compiled_packed_documents_run_on_cudnn_found_once_when_the_step_runs(
    fake_cudnn, monkeypatch, lengths, alibi, graphs_built
):
    """Several documents in a row run the ragged layout, one document per row the dense graphs without lengths
    (no copies of q, k and v); the documents are found once for two layers, forward and backward."""
    found = counting_documents_found(monkeypatch)
    ids = packed_ids(lengths)
    q = torch.randn(2, 4, 64, 16, dtype=torch.float64).float()
    k, v = (torch.randn(2, 2, 64, 16, dtype=torch.float64).float() for _ in range(2))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    compiled, graphs = compiled_with_graphs(two_cudnn_layers)
    out = compiled(*leaves, None, ids, alibi, 16**-0.5)
    assert len(found) == 1 and found[0] is ids  # found when the step ran (tracing sees fake tensors)
    assert_matches_reference(out, leaves, two_layers_of_documents_reference(ids, alibi))
    assert len(found) == 1  # one host read for two layers, forward and backward
    assert [cudnn_ops_of(graph) for graph in graphs["forward"]] == [["cudnn_documents_forward.default"] * 2]
    assert [cudnn_ops_of(graph) for graph in graphs["backward"]] == [["cudnn_documents_backward.default"] * 2]
    assert FakeGraph.built_graphs == 2
    plans = list(kernel_layer._cudnn_plans._plans)
    directions = {"fwd-ragged", "bwd-ragged"} if graphs_built == "ragged" else {"fwd", "bwd"}
    assert {key[0] for key in plans} == directions
    flags = [part for key in plans for part in key if isinstance(part, kernel_layer._CudnnFlags)]
    assert len(flags) == 2 and all(flag.padded == (graphs_built == "ragged") and flag.alibi == alibi for flag in flags)


def test_compiled_packed_documents_take_dynamic_lengths_in_one_graph(fake_cudnn):
    compiled, graphs = compiled_with_graphs(two_cudnn_layers, dynamic=True)
    for lengths in ([[20, 17], [37]], [[50], [10, 40]], [[60, 70], [1, 129]]):
        ids = packed_ids(lengths)
        seq = ids.shape[1]
        q = torch.randn(2, 4, seq, 16, dtype=torch.float64).float()
        k, v = (torch.randn(2, 2, seq, 16, dtype=torch.float64).float() for _ in range(2))
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = compiled(*leaves, None, ids, True, 16**-0.5)
        assert_matches_reference(out, leaves, two_layers_of_documents_reference(ids, True))
    assert len(graphs["forward"]) == len(graphs["backward"]) == 1


def test_documents_are_kept_on_the_ids_tensor_with_their_version(monkeypatch):
    found = counting_documents_found(monkeypatch)
    ids = packed_ids([[5, 11], [16]])
    first = kernel_layer._documents_when_run(ids)
    assert kernel_layer._documents_when_run(ids) is first and len(found) == 1 and not first.one_per_row
    ids[0] = 0  # changed in place: found again
    assert kernel_layer._documents_when_run(ids).one_per_row and len(found) == 2
    with torch.inference_mode():
        frozen = packed_ids([[5, 11], [16]])
    for _ in range(2):  # an inference tensor has no version: found every time, nothing kept on it
        assert not kernel_layer._documents_when_run(frozen).one_per_row
    assert len(found) == 4 and not hasattr(frozen, kernel_layer._DOCUMENTS_SEEN)


@pytest.mark.skipif(not hasattr(torch, "Tag") or not hasattr(torch.Tag, "cudagraph_unsafe"), reason="no such tag")
def test_padded_rows_and_documents_ops_are_kept_out_of_cuda_graphs():
    """Their layout is checked, and may change, when the step runs: a captured graph would replay the first."""
    namespace = getattr(torch.ops, kernel_layer._OPS_NAMESPACE)
    padded_rows = ("cudnn_padded_rows_forward", "cudnn_padded_rows_backward")
    for name in padded_rows + ("cudnn_documents_forward", "cudnn_documents_backward"):
        assert torch.Tag.cudagraph_unsafe in getattr(namespace, name).default.tags
    assert torch.Tag.cudagraph_unsafe not in namespace.cudnn_attention_forward.default.tags
