"""Packed documents on the cudnn backend: cuDNN's ragged (THD) layout, one graph batch entry per document.

On a CPU the frontend is the stand-in of ``test_cudnn_backend.py`` (ragged offsets with cuDNN's documented
semantics, computed in float64): the layout, the graph build arguments, the buckets, the dispatch and the
single host read of the unpadded path. On the GPU: the real frontend against float64 math (random document
lengths, ALiBi and plain causal, GQA, fp16/bf16, forward and every gradient), and LLaMA and BLOOM padded
batches run unpadded on cudnn against the fp32 stock models.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

import memory_efficient_adapter as mea
from remote_code import assert_close_rel, left_padded_mask, right_padded_mask
from test_cudnn_backend import FakeGraph, cuda_call, fake_cudnn, needs_cudnn_frontend  # noqa: F401 (fixture)
from test_packed import packed_ids, reference_attention

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")


def random_document_lengths(total: int, generator: torch.Generator, longest: int) -> list:
    """Random lengths in [1, longest] filling exactly ``total`` tokens."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(1, longest + 1, (1,), generator=generator)), total - sum(lengths)))
    return lengths


def documents_qkv(batch, heads, kv_heads, seq, dim, generator, fused=False):
    """q, k, v [b, h, s, d] in float32: laid out as [b, s, h, d] (what cuDNN's ragged layout reads) or, with
    ``fused``, views of one [b, s, h, 3, d] projection (BLOOM's layout: the glue must copy them)."""
    if fused:
        projection = torch.randn(batch, seq, heads, 3, dim, generator=generator)
        q, k, v = (projection[:, :, :, i].transpose(1, 2) for i in range(3))
        return q, k[:, :kv_heads], v[:, :kv_heads]
    return tuple(torch.randn(batch, seq, h, dim, generator=generator).transpose(1, 2) for h in (heads, kv_heads, kv_heads))


# ----------------------------------------------------------------------------------------------
# The layout: documents, buckets, offsets, one host read
# ----------------------------------------------------------------------------------------------


def test_ragged_documents_find_every_document_and_bucket_the_graph_sizes():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [7] * 10, [0, 0, 1, 0, 0, 0, 0, 0, 0, 3]])
    documents = kernel_layer._ragged_documents(ids)
    assert documents.batch == 8 and documents.seq == 64  # 7 documents -> 8 entries; longest 10 -> 64
    assert documents.lengths.flatten().tolist() == [3, 2, 5, 10, 2, 1, 6, 1]
    assert documents.lengths.dtype == torch.int32
    assert documents.starts.flatten().tolist() == [0, 3, 5, 10, 20, 22, 23, 29, 30]
    many = torch.arange(40).repeat_interleave(3)[None]  # 40 documents of 3 tokens
    documents = kernel_layer._ragged_documents(many)
    assert documents.batch == 40 and documents.lengths.flatten().tolist() == [3] * 40
    documents = kernel_layer._ragged_documents(torch.arange(41).repeat_interleave(2)[None])
    assert documents.batch == 48 and documents.lengths.flatten().tolist() == [2] * 41 + [0] * 7
    assert documents.starts.flatten().tolist()[-8:] == [82] * 8  # empty entries sit at the end of the tokens



def test_kept_runs_make_one_ragged_entry_per_padded_row():
    """A padding mask's rows as ragged entries (found on the device): from the first kept token, its kept keys,
    and every query from there to the row's end (right padding's queries still see the keys before them)."""
    keep = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [0] * 3 + [1] * 7, [0] * 10, [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]).bool()
    lengths, query_lengths, starts = kernel_layer._kept_runs(keep)
    assert lengths.flatten().tolist() == [10, 6, 7, 0, 3] and lengths.dtype == query_lengths.dtype == torch.int32
    assert query_lengths.flatten().tolist() == [10, 10, 7, 0, 8]
    assert starts.flatten().tolist() == [0, 10, 23, 40, 42, 50] and starts.shape == (6, 1, 1, 1)
    rows = kernel_layer._padded_rows(keep, lengths, query_lengths, starts)
    assert rows.batch == 5 and rows.seq == 64 and rows.gaps
    assert rows.sequence_lengths[0] is query_lengths and rows.sequence_lengths[1] is lengths
    assert kernel_layer._padding_layout(keep) == "runs"
    assert kernel_layer._padding_layout(keep[:2]) == "prefix" and kernel_layer._padding_layout(keep[:1]) == "full"
    keep[4, 7] = True  # a second run in the last row
    assert kernel_layer._padding_layout(keep) == "gaps"

def test_document_buckets_bound_waste_and_the_number_of_graphs():
    counts = {kernel_layer._cudnn_bucket(n, smallest=8) for n in range(1, 1025)}
    for n in range(1, 1025):
        bucket = kernel_layer._cudnn_bucket(n, smallest=8)
        assert bucket >= n and bucket % 8 == 0 and (bucket <= 1.125 * n or bucket - n < 8)
    assert len(counts) <= 8 * 7 + 8


def test_documents_found_without_nonzero_reading_the_host(monkeypatch):
    ids = packed_ids([[5, 13, 1, 11]])
    expected = kernel_layer._ragged_documents(ids)

    def refuse(*args, **kwargs):
        raise AssertionError("nonzero reads the count on the host again")

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    got = kernel_layer._ragged_documents(ids)
    assert torch.equal(got.starts, expected.starts) and torch.equal(got.lengths, expected.lengths)


def counting_host_reads(monkeypatch) -> list:
    """Every tolist()/item() call (the host reads of a CUDA forward) is logged; nonzero() is refused."""
    reads = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def refuse(*args, **kwargs):
        raise AssertionError("nonzero reads the kept count on the host a second time")

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    return reads


def test_padded_rows_read_the_host_once(monkeypatch):
    keep = left_padded_mask([7, 3, 5], 7).bool()
    ids = torch.randint(0, 50, keep.shape)
    labels = ids.masked_fill(~keep, -100)
    labels[torch.arange(3), 7 - torch.tensor([7, 3, 5])] = -100  # a row's first real token is predicted from padding
    expected = torch.arange(keep.numel())[keep.flatten()]
    model = torch.nn.Module().train()  # a stand-in head: a config, no modules
    model.config = SimpleNamespace(use_cache=False, output_attentions=False)
    reads = counting_host_reads(monkeypatch)
    rows = kernel_layer.padded_rows(model, keep.long(), input_ids=ids, labels=labels)
    assert reads == ["tolist"]
    assert torch.equal(rows.indices, expected)
    assert torch.equal(rows.pack(ids), ids[keep][None])


def test_padded_rows_without_nonzero_static_still_find_the_kept_tokens(monkeypatch):
    keep = right_padded_mask([4, 6, 1], 6).bool()
    monkeypatch.delattr(torch, "nonzero_static")
    rows = kernel_layer.PaddedRows(keep, int(keep.sum()))
    assert torch.equal(rows.indices, torch.arange(keep.numel())[keep.flatten()])


# ----------------------------------------------------------------------------------------------
# The glue on the stand-in: forward and every gradient, saved tensors, graph arguments, plan reuse
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "causal"])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("fused", [False, True], ids=["bshd", "fused_projection"])
def test_packed_documents_glue_matches_reference(fake_cudnn, alibi, heads, kv_heads, fused):
    generator = torch.Generator().manual_seed(heads + 7 * alibi + 3 * fused)
    seq, dim = 71, 16
    rows = [random_document_lengths(seq, generator, 30) for _ in range(2)]
    ids = packed_ids(rows)
    q, k, v = documents_qkv(2, heads, kv_heads, seq, dim, generator, fused)
    slopes = mea.alibi_slopes(heads) if alibi else None
    call = dataclasses.replace(cuda_call(q, k, v, slopes=slopes, sequence_ids=ids), needs_grad=True)
    assert kernel_layer._cannot_cudnn(dataclasses.replace(call, dtype=torch.bfloat16)) is None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = kernel_layer._run_cudnn(*leaves, call, None, slopes, 1.0 / math.sqrt(dim), sequence_ids=ids)
    expected_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(*expected_leaves, documents=ids, alibi=slopes)
    assert out.shape == q.shape and torch.allclose(out.double(), expected, atol=1e-5)
    saved = out.grad_fn.saved_tensors  # q, k, v, the output, the stats and the ids: k and v with their own heads
    tokens = 2 * seq
    shapes = [tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(q.shape), (tokens, heads), tuple(ids.shape)]
    assert [tuple(x.shape) for x in saved] == shapes and saved[-1] is ids
    assert all(x.transpose(1, 2).is_contiguous() for x in saved[:3])  # packed rows: copied once, in forward
    grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    grads = torch.autograd.grad(out, leaves, grad.float())
    for got, want in zip(grads, torch.autograd.grad(expected, expected_leaves, grad)):
        assert got.shape == want.shape and torch.allclose(got.double(), want, atol=1e-5)
    assert FakeGraph.built_graphs == 2 and set(fake_cudnn.streams) == {7}


class RecordingGraph(FakeGraph):
    """The stand-in graph, keeping itself and the buffers of its last launch for inspection."""

    graphs: list = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        RecordingGraph.graphs.append(self)

    def execute(self, buffers, workspace, handle=None, tensor_uids=None):
        self.bound = {self.tensors[uid]: buffer for uid, buffer in zip(tensor_uids, buffers)}
        return super().execute(buffers, workspace, handle=handle, tensor_uids=tensor_uids)


def test_graph_build_arguments_of_packed_documents(fake_cudnn):
    fake_cudnn.module.pygraph = RecordingGraph
    RecordingGraph.graphs = []
    heads, kv_heads, dim = 6, 2, 16
    lengths = [9, 30, 1, 20]  # 4 documents -> 8 graph entries; the longest, 30 -> 64
    ids = packed_ids([lengths])
    q, k, v = documents_qkv(1, heads, kv_heads, 60, dim, torch.Generator().manual_seed(0))
    slopes = mea.alibi_slopes(heads)
    call = dataclasses.replace(cuda_call(q, k, v, slopes=slopes, sequence_ids=ids), needs_grad=True)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    kernel_layer._run_cudnn(*leaves, call, None, slopes, 0.25, sequence_ids=ids).sum().backward()
    forward, backward = RecordingGraph.graphs
    starts = torch.tensor([0, 9, 39, 40] + [60] * 5)
    for graph, names in ((forward, ("q", "k", "v", "outputs")), (backward, ("q", "k", "v", "o", "dO", "outputs"))):
        kind, ports, options = graph.node
        assert options["use_padding_mask"] and options["use_causal_mask"] and options["use_alibi_mask"]
        assert options["attn_scale"] == 0.25
        for name in ("seq_len_q", "seq_len_kv"):
            assert graph.bound[options[name]].flatten().tolist() == lengths + [0] * 4
        tensors = [t for name in names for t in (ports[name] if name == "outputs" else (ports[name],))]
        if kind == "fwd":
            tensors = tensors[:-1]  # the stats, below
        for tensor in tensors:
            tensor_heads = tensor.shape[1]
            assert tensor_heads in (heads, kv_heads) and tensor.shape == (8, tensor_heads, 64, dim)
            assert tensor.stride == (64 * tensor_heads * dim, dim, tensor_heads * dim, 1)  # [tokens, heads, dim] rows
            offsets = graph.bound[tensor.ragged_offset]
            assert offsets.dtype == torch.int64 and torch.equal(offsets.flatten(), starts * tensor_heads * dim)
        stats = ports["outputs"][1] if kind == "fwd" else ports["stats"]
        assert stats.shape == (8, heads, 64, 1) and stats.stride == (64 * heads, 1, heads, 1)
        assert torch.equal(graph.bound[stats.ragged_offset].flatten(), starts * heads)
        assert tuple(graph.bound[stats].shape) == (60, heads)


def test_variable_document_lengths_reuse_plans(fake_cudnn):
    """Twelve training steps with random documents build a graph pair per (document count, longest) bucket."""
    generator = torch.Generator().manual_seed(5)
    slopes = mea.alibi_slopes(2)
    buckets = set()
    for _ in range(12):
        rows = [random_document_lengths(int(torch.randint(150, 300, (1,), generator=generator)), generator, 60)]
        ids = packed_ids(rows)
        q, k, v = (torch.randn(1, 2, ids.shape[1], 8, requires_grad=True) for _ in range(3))
        call = dataclasses.replace(cuda_call(q, k, v, slopes=slopes, sequence_ids=ids), needs_grad=True)
        kernel_layer._run_cudnn(q, k, v, call, None, slopes, 0.3, sequence_ids=ids).sum().backward()
        documents = kernel_layer._ragged_documents(ids)
        buckets.add((documents.batch, documents.seq))
    info = mea.cudnn_plan_cache_info()
    assert info["builds"] == 2 * len(buckets) < 2 * 12 and info["hits"] == 24 - info["builds"]


def test_documents_are_found_once_per_forward_with_its_forward_mask(fake_cudnn, monkeypatch):
    found = []
    original = kernel_layer._ragged_documents
    monkeypatch.setattr(kernel_layer, "_ragged_documents", lambda ids: found.append(ids) or original(ids))
    ids = packed_ids([[5, 13, 1, 11]])
    q, k, v = documents_qkv(1, 4, 2, 30, 8, torch.Generator().manual_seed(1))
    holder = mea.forward_mask(None, without_mask=True)
    for mask, expected in ((holder, 1), (None, 2)):
        found.clear()
        for _layer in range(2):
            call = cuda_call(q, k, v, mask=mask, sequence_ids=ids)
            with torch.no_grad():
                kernel_layer._run_cudnn(q, k, v, call, None, None, 0.3, sequence_ids=ids)
        assert len(found) == expected


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_one_document_per_row_runs_the_dense_graphs(fake_cudnn, grad):
    """Sequence ids that start no document inside a row (position ids given without packing) need no ragged
    layout: the dense graphs take q, k and v as they are (strided views of a fused projection here), the rows
    padded to their bucket by sequence lengths."""
    ids = packed_ids([[37], [37]])
    q, k, v = documents_qkv(2, 4, 2, 37, 16, torch.Generator().manual_seed(3), fused=True)
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]
    call = dataclasses.replace(cuda_call(*leaves, sequence_ids=ids), needs_grad=grad)
    with torch.set_grad_enabled(grad):
        out = kernel_layer._run_cudnn(*leaves, call, None, None, 16**-0.5, sequence_ids=ids)
    expected_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(*expected_leaves, documents=ids)
    assert torch.allclose(out.detach().double(), expected, atol=1e-5)
    if grad:
        weight = torch.randn(out.shape, dtype=torch.float64)
        wanted = torch.autograd.grad(expected, expected_leaves, weight)
        for got, want in zip(torch.autograd.grad(out, leaves, weight.float()), wanted):
            assert torch.allclose(got.double(), want, atol=1e-5)
    plans = list(kernel_layer._cudnn_plans._plans)
    assert {key[0] for key in plans} == ({"fwd", "bwd"} if grad else {"fwd"})
    flags = [part for key in plans for part in key if isinstance(part, kernel_layer._CudnnFlags)]
    assert flags and all(flag.padded and not flag.ragged for flag in flags)  # 37 rows padded to the bucket of 64


def test_auto_sends_packed_documents_to_cudnn(fake_cudnn):
    ids = packed_ids([[5, 7, 4], [16]])
    gqa, mha = documents_qkv(2, 4, 2, 16, 64, torch.Generator()), documents_qkv(2, 4, 4, 16, 64, torch.Generator())
    bf16 = lambda xs: [x.bfloat16() for x in xs]  # noqa: E731
    slopes = mea.alibi_slopes(4)
    assert mea.select_backend(cuda_call(*bf16(gqa), sequence_ids=ids)) == "cudnn"
    assert mea.select_backend(cuda_call(*bf16(mha), sequence_ids=ids)) == "cudnn"  # not SDPA's nested tensors
    assert mea.select_backend(cuda_call(*bf16(mha), sequence_ids=ids, slopes=slopes)) == "cudnn"
    assert mea.select_backend(cuda_call(*bf16(gqa))) == "sdpa"  # a call without documents: unchanged
    padded = torch.ones(2, 16, dtype=torch.bool)
    padded[1, 12:] = False
    assert mea.select_backend(cuda_call(*bf16(gqa), sequence_ids=ids, mask=padded)) == "sdpa"
    assert mea.select_backend(cuda_call(*gqa, sequence_ids=ids)) == "sdpa"  # float32: not cuDNN's


# ----------------------------------------------------------------------------------------------
# GPU: the real frontend against float64 math, and padded batches unpadded on cudnn against fp32 stock
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, dim", [(12, 4, 64), (16, 16, 128)])
def test_cudnn_packed_documents_match_float64_reference_on_gpu(dtype, heads, kv_heads, dim):
    needs_cudnn_frontend()
    generator = torch.Generator().manual_seed(heads)
    for batch, seq, longest in ((1, 611, 250), (2, 300, 120)):
        ids = packed_ids([random_document_lengths(seq, generator, longest) for _ in range(batch)])
        q, k, v = documents_qkv(batch, heads, kv_heads, seq, dim, generator)
        for alibi in (True, False):
            slopes = mea.alibi_slopes(heads, "cuda") if alibi else None
            leaves = [x.to(dtype).cuda().requires_grad_() for x in (q, k, v)]
            out = mea.attention(*leaves, causal=True, sequence_ids=ids.cuda(), alibi_slopes=slopes, backend="cudnn")
            expected_leaves = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
            expected = reference_attention(*expected_leaves, documents=ids, alibi=None if slopes is None else slopes.cpu())
            what = f"{dtype} h={heads}/{kv_heads} d={dim} b={batch} documents={ids.max(dim=1).values.tolist()} alibi={alibi}"
            assert_close_rel(out.cpu(), expected, 1e-2, what)
            grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
            grads = torch.autograd.grad(out, leaves, grad.to(dtype).cuda())
            for name, got, want in zip("qkv", grads, torch.autograd.grad(expected, expected_leaves, grad)):
                assert_close_rel(got.cpu(), want, 2e-2, f"d{name} {what}")


def tiny_stock(family: str):
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=300, hidden_size=512, intermediate_size=768, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
        model = LlamaForCausalLM(config)
    else:
        config = BloomConfig(vocab_size=300, hidden_size=512, n_layer=2, n_head=8, use_cache=False)
        model = BloomForCausalLM(config)
    for param in model.parameters():
        param.data.normal_(0.0, 0.05)
    return model.train()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batch_unpadded_on_cudnn_matches_fp32_stock(family, padding, tmp_path):
    """A padded bf16 training step runs unpadded on cudnn's ragged layout (LLaMA 8 query / 2 key-value heads;
    BLOOM with ALiBi); logits at kept positions, loss and gradients match the fp32 stock model."""
    needs_cudnn_frontend()
    from transformers import AutoModelForCausalLM

    from memory_efficient_adapter.families import write_remote_code

    stock = tiny_stock(family)
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, family)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16).cuda().train()
    ours.config.keep_logits_in_training = True
    stock = stock.cuda()
    lengths = [333, 250, 71, 190]
    mask = (right_padded_mask if padding == "right" else left_padded_mask)(lengths, 333).cuda()
    ids = torch.randint(3, 300, mask.shape, generator=torch.Generator().manual_seed(1)).cuda()
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":
        labels[:, :1] = -100
        labels[torch.arange(len(lengths)), 333 - torch.tensor(lengths)] = -100
    layer = importlib.import_module(type(ours).__module__)
    assert "cudnn" in layer.available_backends("cuda")  # the probe runs its own small graph: count after it
    before = layer.cudnn_plan_cache_info()["builds"] + layer.cudnn_plan_cache_info()["hits"]
    for backend in ("cudnn", None):  # explicit, then auto (which picks cudnn for GQA and ALiBi documents)
        ours.config.attn_backend = backend
        ours.zero_grad(set_to_none=True)
        stock.zero_grad(set_to_none=True)
        expected = stock(ids, attention_mask=mask, labels=labels)
        expected.loss.backward()
        actual = ours(ids, attention_mask=mask, labels=labels)
        actual.loss.backward()
        keep = mask.bool()
        assert_close_rel(actual.logits.float()[keep], expected.logits[keep], 2e-2, f"{backend} logits")
        assert abs(actual.loss.item() - expected.loss.item()) < 1e-2 * expected.loss.item()
        ours_grads = dict(ours.named_parameters())
        for name, param in stock.named_parameters():
            assert_close_rel(ours_grads[name].grad.float(), param.grad, 5e-2, f"{backend} grad {name}")
    after = layer.cudnn_plan_cache_info()
    assert after["builds"] + after["hits"] - before == 2 * 2 * 2  # 2 layers x (forward + backward) x 2 runs


def per_document_stock_step(stock, ids: torch.Tensor, lengths_per_row: list, labels: torch.Tensor):
    """Stock's logits of a packed batch with every document run as a sequence of its own (the reference, not
    transformers' packing), and its loss over the packed rows' shifted labels, backward taken."""
    rows = []
    for row, lengths in zip(ids, lengths_per_row):
        pieces = row.split(lengths)
        rows.append(torch.cat([stock(piece[None]).logits[0] for piece in pieces]))
    logits = torch.stack(rows)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return logits, loss


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend, compiled", [("auto", False), ("auto", True), ("sdpa", False)], ids=["cudnn", "cudnn_compiled", "sdpa"]
)
@pytest.mark.parametrize(
    "lengths_per_row", [[[150, 61, 122], [333]], [[333], [333]]], ids=["packed", "one_document_per_row"]
)
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_packed_llama_trains_against_fp32_stock_per_document(backend, compiled, lengths_per_row, form, tmp_path):
    """DataCollatorWithFlattening's batches (position ids restarting, no attention mask; or the flash-attention
    keywords, whose lengths are checked on the device) in a bf16 training step, eager and compiled (Inductor, one
    graph): attention on cuDNN by default (no flex kernel), on PyTorch's flash varlen kernels with
    ``backend="sdpa"`` (what runs without the cuDNN frontend); logits, loss and every gradient against the fp32
    stock model run on each document alone."""
    if backend == "auto":
        needs_cudnn_frontend()
    from transformers import AutoModelForCausalLM

    from memory_efficient_adapter.families import write_remote_code
    from test_cudnn_backend import launched_kernels

    stock = tiny_stock("llama")
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, "llama")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16).cuda().train()
    ours.config.keep_logits_in_training = True
    ours.config.attn_backend = backend
    stock = stock.cuda()
    ids = torch.randint(3, 300, (2, 333), generator=torch.Generator().manual_seed(2)).cuda()
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row]).cuda()
    labels = ids.masked_fill(position_ids == 0, -100)  # no prediction across a document start
    expected_logits, expected_loss = per_document_stock_step(stock, ids, lengths_per_row, labels)
    run = ours
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(ours, fullgraph=True)
    packing = {"position_ids": position_ids}
    if form == "cu_seq_lens":
        lengths = torch.tensor([n for row in lengths_per_row for n in row])
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).cuda()
        packing = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 333, "max_length_k": 333}
    actual, kernels = launched_kernels(lambda: run(ids, labels=labels, **packing))
    _, backward_kernels = launched_kernels(actual.loss.backward)
    forward_kernel, backward_kernel = ("fprop", "bprop") if backend == "auto" else ("flash_fwd", "flash_bwd")
    assert any(forward_kernel in name for name in kernels), kernels
    assert any(backward_kernel in name for name in backward_kernels), backward_kernels
    assert not any("flex" in name for name in kernels + backward_kernels), kernels + backward_kernels
    assert_close_rel(actual.logits.float(), expected_logits, 2e-2, "logits")
    assert abs(actual.loss.item() - expected_loss.item()) < 1e-2 * expected_loss.item()
    ours_grads = dict(ours.named_parameters())
    for name, param in stock.named_parameters():
        assert_close_rel(ours_grads[name].grad.float(), param.grad, 5e-2, f"grad {name}")
