"""Padded and packed batches: every backend against float64 references and per-document runs, every family
against stock transformers and against its documents run one by one, and no O(q * k) tensor on the way."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from memory_efficient_adapter import attention
from tests.remote_code import assert_close_rel

kernel_layer = importlib.import_module("memory_efficient_adapter.attention")
CPU_BACKENDS = ["auto", "sdpa", "chunked", "eager"]


def reference_attention(q, k, v, keep=None, documents=None, causal=True, alibi=None):
    """float64 math with an explicit [b, h, q, k] mask (the reference, not a code path under test)."""
    q, k, v = (x.double() for x in (q, k, v))
    heads, kv_heads, q_len, k_len = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    visible = torch.ones(q.shape[0], 1, q_len, k_len, dtype=torch.bool)
    q_pos = torch.arange(q_len)[:, None] + k_len - q_len
    if causal:
        visible &= torch.arange(k_len)[None, :] <= q_pos
    if keep is not None:
        visible &= keep[:, None, None, :]
        if alibi is not None:
            kept = keep.double().cumsum(-1)
            scores = scores + alibi.double()[None, :, None, None] * (kept[:, None, None, :] - kept[:, None, -q_len:, None])
    elif alibi is not None:
        scores = scores + alibi.double()[None, :, None, None] * (torch.arange(k_len)[None, :] - q_pos)
    if documents is not None:
        visible &= documents[:, None, -q_len:, None] == documents[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def random_qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float32, device="cpu", k_len=None):
    k_len = seq if k_len is None else k_len
    make = lambda h, s: torch.randn(batch, h, s, dim, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return make(heads, seq), make(kv_heads, k_len), make(kv_heads, k_len)


def padded_keep(lengths, seq, left=False, device="cpu"):
    keep = torch.zeros(len(lengths), seq, dtype=torch.bool, device=device)
    for row, length in enumerate(lengths):
        if left:
            keep[row, seq - length :] = True
        else:
            keep[row, :length] = True
    return keep


def packed_ids(lengths_per_row, device="cpu"):
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in lengths_per_row]
    return torch.stack(rows).to(device)


def grads_of(out, *tensors, weight):
    return torch.autograd.grad((out.double() * weight).sum(), tensors)


def check_against_reference(q, k, v, backend, tol, keep=None, documents=None, alibi=None, rows_to_check=None):
    out = attention(q, k, v, causal=True, attention_mask=keep, sequence_ids=documents, alibi_slopes=alibi, backend=backend)
    ref = reference_attention(q, k, v, keep, documents, alibi=alibi)
    rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if rows_to_check is None else rows_to_check
    rows = rows.to(out.device)[:, None, :, None]
    weight = torch.randn(out.shape, dtype=torch.float64, device=out.device) * rows
    assert_close_rel(out.double() * rows, ref.to(out.device) * rows, tol, f"{backend} output")
    for got, want, name in zip(grads_of(out, q, k, v, weight=weight), grads_of(ref, q, k, v, weight=weight.cpu()), "qkv"):
        assert_close_rel(got.double().cpu(), want.cpu(), tol, f"{backend} grad {name}")


# ----------------------------------------------------------------------------------------------
# Kernel layer on the CPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("left", [False, True])
def test_padded_rows_with_gqa_match_reference(backend, left):
    q, k, v = random_qkv(3, 4, 2, 37, 16)
    keep = padded_keep([37, 20, 5], 37, left=left)
    check_against_reference(q, k, v, backend, 1e-5, keep=keep, rows_to_check=keep)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_documents_with_padding_match_reference(backend):
    q, k, v = random_qkv(2, 4, 1, 30, 16)
    documents = packed_ids([[7, 13, 10], [30]])
    keep = padded_keep([30, 22], 30)
    check_against_reference(q, k, v, backend, 1e-5, keep=keep, documents=documents, rows_to_check=keep)


@pytest.mark.parametrize("backend", ["auto", "chunked", "eager"])
def test_alibi_distances_count_only_kept_keys(backend):
    """Non-contiguous padding (BLOOM's [1, 0, 1, 1] case): ALiBi uses positions among the kept tokens."""
    q, k, v = random_qkv(2, 4, 4, 9, 16)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    slopes = kernel_layer.alibi_slopes(4)
    check_against_reference(q, k, v, backend, 1e-5, keep=keep, alibi=slopes, rows_to_check=keep)


def test_document_ids_mean_runs_on_every_backend():
    """An id that comes back later in the row starts a new document: [0, 0, 1, 0] is three documents."""
    q, k, v = random_qkv(1, 2, 2, 8, 16)
    ids = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]])
    runs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    expected = reference_attention(q, k, v, documents=runs)
    for backend in CPU_BACKENDS:
        out = attention(q, k, v, causal=True, sequence_ids=ids, backend=backend)
        assert_close_rel(out.double(), expected, 1e-5, backend)


@pytest.mark.parametrize(
    "ids, mask, error",
    [
        (torch.zeros(2, 8), None, "integer"),
        (torch.zeros(2, 7, dtype=torch.long), None, "shape"),
        (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 1, 8, 8, dtype=torch.bool), "4-D"),
    ],
)
def test_bad_sequence_ids_are_refused(ids, mask, error):
    q, k, v = random_qkv(2, 2, 2, 8, 16)
    with pytest.raises(ValueError, match=error):
        attention(q, k, v, causal=True, sequence_ids=ids, attention_mask=mask)


def attention_by_segment(q, k, v, cu_seqlens, causal, scale):
    """Packed [tokens, heads, dim] sequences delimited by ``cu_seqlens``, attended one segment at a time (keys and
    values keep their own heads): flash_attn_varlen_func's contract, as a stand-in kernel."""
    pieces = []
    for start, stop in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        segment = [x[start:stop].transpose(0, 1)[None] for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*segment, is_causal=causal, scale=scale, enable_gqa=True)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)


def test_varlen_glue_against_a_stand_in_kernel(monkeypatch):
    """The sdpa varlen path (unpad, cu_seqlens, pad back) on the CPU, with a stand-in for the nested kernel that
    runs flash_attn_varlen_func's contract segment by segment."""

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and q.shape[1] == 4 and k.shape[1] == 2
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        return attention_by_segment(q, k, v, cu_q, causal, softmax_scale)

    monkeypatch.setattr(kernel_layer, "_sdpa_varlen", stand_in)
    monkeypatch.setattr(kernel_layer, "_sdpa_needs_dense_mask", lambda call: None)
    q, k, v = random_qkv(3, 4, 2, 24, 16)
    keep = padded_keep([24, 10, 17], 24, left=True)
    documents = packed_ids([[5, 19], [24], [12, 12]])
    check_against_reference(q, k, v, "sdpa", 1e-5, keep=keep, documents=documents, rows_to_check=keep)


def stand_in_flash_varlen_ops(calls: list) -> tuple:
    """CPU stand-ins for aten's flash varlen forward and backward (their argument order and outputs), which
    check what the glue hands them: grouped key-value heads as they are, the longest segment, no dropout, and
    in backward the output and log-sum-exp the forward returned."""
    kept = {}

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, return_debug_mask, *, scale):
        assert k.shape[1] == v.shape[1] == 2 and q.shape[1] == 4 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and dropout_p == 0.0 and not return_debug_mask
        calls.append("forward")
        out = attention_by_segment(q, k, v, cu_q, causal, scale)
        kept["lse"] = torch.randn(q.shape[1], q.shape[0])
        return out, kept["lse"], torch.tensor([7]), torch.tensor([11]), torch.empty(0)

    def backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, rng_state, rng_offset, *, scale
    ):
        assert torch.equal(lse, kept["lse"]) and rng_state.item() == 7 and rng_offset.item() == 11
        assert torch.equal(out, attention_by_segment(q, k, v, cu_q, causal, scale))
        calls.append("backward")
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            torch.autograd.backward(attention_by_segment(*leaves, cu_q, causal, scale), grad_out)
        return tuple(x.grad for x in leaves)

    return forward, backward


def test_flash_varlen_glue_against_stand_in_kernels(monkeypatch):
    """Where PyTorch's flash varlen kernels take the call, sdpa calls them directly (no nested tensors): keys and
    values keep their grouped heads, the backward gets what the forward kept, and every gradient is right."""
    calls = []
    ops = stand_in_flash_varlen_ops(calls)
    monkeypatch.setattr(kernel_layer, "_flash_varlen_ops", lambda: ops)
    monkeypatch.setattr(kernel_layer, "_flash_varlen_takes", lambda q, k, dropout_p, causal: True)
    monkeypatch.setattr(kernel_layer, "_sdpa_needs_dense_mask", lambda call: None)
    q, k, v = random_qkv(3, 4, 2, 29, 16)
    keep = padded_keep([29, 11, 17], 29, left=True)
    documents = packed_ids([[5, 24], [29], [13, 16]])
    check_against_reference(q, k, v, "sdpa", 1e-5, keep=keep, documents=documents, rows_to_check=keep)
    assert calls == ["forward", "backward"]


# ----------------------------------------------------------------------------------------------
# Kernel layer on the GPU (nested jagged tensors)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-4)])
def test_gpu_varlen_sdpa_matches_reference(dtype, tol, monkeypatch):
    """fp16/bf16 on PyTorch's flash varlen kernels called directly, fp32 on nested tensors."""
    q, k, v = random_qkv(3, 8, 2, 300, 64, dtype=dtype, device="cuda")
    keep = padded_keep([300, 170, 33], 300, left=True, device="cuda")
    documents = packed_ids([[100, 200], [300], [150, 150]], device="cuda")
    call = kernel_layer._describe(q, k, v, True, keep, None, 0.0, documents)
    assert kernel_layer._sdpa_needs_dense_mask(call) is None
    flash_calls = []
    real_ops = kernel_layer._flash_varlen_ops()
    monkeypatch.setattr(kernel_layer, "_flash_varlen_ops", lambda: flash_calls.append(1) or real_ops)
    cpu = lambda x: x.detach().cpu().requires_grad_(True)  # noqa: E731
    out = attention(q, k, v, causal=True, attention_mask=keep, sequence_ids=documents, backend="sdpa")
    qc, kc, vc = cpu(q), cpu(k), cpu(v)
    ref = reference_attention(qc, kc, vc, keep.cpu(), documents.cpu())
    rows = keep[:, None, :, None]
    weight = torch.randn(out.shape, dtype=torch.float64, device="cuda") * rows
    assert_close_rel((out.double() * rows).cpu(), ref * rows.cpu(), tol, "output")
    for got, want, name in zip(grads_of(out, q, k, v, weight=weight), grads_of(ref, qc, kc, vc, weight=weight.cpu()), "qkv"):
        assert_close_rel(got.double().cpu(), want, tol, f"grad {name}")
    assert len(flash_calls) == (0 if dtype == torch.float32 else 2)  # forward and backward


@pytest.mark.gpu
def test_gpu_flash_varlen_dropout_backward_replays_the_forward_mask():
    """Dropout on flash varlen over packed documents, the RNG reset before each call: the output is P @ v for one
    dropped probability matrix P per head, read back column by column with one-hot values. The value gradient
    must be P^T @ grad (backward replays the forward's mask), a dropped entry is 0 and a kept one is the
    softmax probability / (1 - p), and about p of the visible entries are dropped."""
    p, seq, dim = 0.3, 64, 32
    q, k, v = random_qkv(1, 2, 1, seq, dim, dtype=torch.float16, device="cuda")
    documents = packed_ids([[29, 35]], device="cuda")

    def dropped(values):
        torch.cuda.manual_seed(5)
        return attention(q, k, values, causal=True, sequence_ids=documents, dropout_p=p, backend="sdpa")

    columns = []
    for block in range(seq // dim):
        one_hot = torch.zeros(1, 1, seq, dim, dtype=torch.float16, device="cuda")
        one_hot[0, 0, block * dim : (block + 1) * dim] = torch.eye(dim, dtype=torch.float16, device="cuda")
        columns.append(dropped(one_hot).detach())
    dropped_probs = torch.cat(columns, dim=-1).double()[0]  # [heads, queries, keys]
    out = dropped(v)
    grad = torch.randn_like(out)
    (grad_v,) = torch.autograd.grad(out, v, grad)
    expected_grad_v = (dropped_probs.transpose(-1, -2) @ grad.double()[0]).sum(0)
    assert_close_rel(grad_v.double()[0, 0], expected_grad_v, 1e-2, "value gradient under dropout")
    probs = reference_attention(q.detach().cpu(), k.detach().cpu(), torch.eye(seq)[None, None].expand(1, 1, seq, seq),
                                documents=documents.cpu())[0].to("cuda")
    visible = probs > 0
    kept = dropped_probs != 0
    assert not (kept & ~visible).any()
    assert_close_rel(dropped_probs[kept], probs[kept] / (1 - p), 1e-2, "kept probabilities")
    dropped_share = 1 - kept[visible].double().mean().item()
    assert abs(dropped_share - p) < 0.05, dropped_share


# ----------------------------------------------------------------------------------------------
# Models: packed rows against their documents run one by one, padding against stock
# ----------------------------------------------------------------------------------------------


def _tiny_configs() -> dict:
    from transformers import BloomConfig, GPT2Config, LlamaConfig

    from memory_efficient_adapter.configuration_qwen import QWenConfig

    common = dict(vocab_size=97, use_cache=False)
    return {
        "llama": (LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common), "LlamaForCausalLM"),
        "gpt2": (GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_pdrop=0.0, resid_pdrop=0.0,
                            embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common), "GPT2LMHeadModel"),
        "bloom": (BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common), "BloomForCausalLM"),
        # seq_length 8: documents longer than 8 tokens use dynamic NTK and logn scaling in eval mode
        "qwen": (QWenConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
                            intermediate_size=64, seq_length=8, max_position_embeddings=128, fp32=True,
                            use_dynamic_ntk=True, use_logn_attn=True, **common), "QWenLMHeadModel"),
    }


FAMILIES = ["llama", "gpt2", "bloom", "qwen"]
_LOADED: dict = {}


def load_ours(family: str, tmp_path_factory):
    """Our model of ``family`` (random weights, saved, loaded back with trust_remote_code), cached per family."""
    if family not in _LOADED:
        import transformers

        from memory_efficient_adapter.families import write_remote_code
        from memory_efficient_adapter import modeling_bloom, modeling_gpt2, modeling_llama, modeling_qwen

        modules = {"llama": modeling_llama, "gpt2": modeling_gpt2, "bloom": modeling_bloom, "qwen": modeling_qwen}
        config, class_name = _tiny_configs()[family]
        torch.manual_seed(0)
        model = getattr(modules[family], class_name)(config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.2)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        write_remote_code(folder, family)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(loaded).__module__.startswith("transformers_modules")
        _LOADED[family] = (loaded, folder)
    return _LOADED[family]


def set_backend(model, backend: str) -> None:
    model.config.attn_backend = None if backend == "auto" else backend


DOCUMENT_LENGTHS = [5, 13, 1, 11]  # 30 tokens in one row; the 13- and 11-token documents pass Qwen's seq_length


def packed_row(form: str):
    """One row of DOCUMENT_LENGTHS documents, in one of the forms transformers and TRL use."""
    ids = torch.randint(0, 97, (1, sum(DOCUMENT_LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in DOCUMENT_LENGTHS])[None]
    if form == "position_ids":
        return ids, {"position_ids": positions}
    cu = F.pad(torch.tensor(DOCUMENT_LENGTHS).cumsum(0), (1, 0))
    longest = max(DOCUMENT_LENGTHS)
    return ids, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def logits_loss_grads(model, ids, labels, **kwargs):
    # our files return no logits in training with labels (fused LM head + loss) unless asked to keep them
    model.config.keep_logits_in_training = True
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def per_document(model, ids):
    """Logits, summed token loss (labels shifted inside each document) and gradients of the documents run alone."""
    model.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    for document in ids.split(DOCUMENT_LENGTHS, dim=1):
        out = model(input_ids=document)
        logits.append(out.logits.detach())
        if document.shape[1] > 1:
            total = total + F.cross_entropy(out.logits[0, :-1].float(), document[0, 1:], reduction="sum")
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, dim=1), total.detach(), grads


def document_labels(ids):
    """Labels for the packed row: the first token of every document is not predicted from the previous one."""
    labels = ids.clone()
    starts = F.pad(torch.tensor(DOCUMENT_LENGTHS).cumsum(0)[:-1], (0, 0))
    labels[0, starts] = -100
    return labels


def assert_packed_row_matches_documents_run_alone(model, ids: torch.Tensor, packing: dict) -> None:
    """Logits, loss and every gradient of the packed row against its documents run one by one (fp32, 1e-5)."""
    labels = document_labels(ids)
    logits, loss, grads = logits_loss_grads(model, ids, labels, **packing)
    ref_logits, ref_sum, ref_grads = per_document(model, ids)
    predicted = int((labels[0, 1:] != -100).sum())
    assert_close_rel(logits, ref_logits, 1e-5, "logits")
    assert_close_rel(loss * predicted, ref_sum, 1e-5, "loss")
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        assert_close_rel(grads[name] * predicted, ref_grads[name], 1e-5, f"grad {name}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_row_matches_documents_run_alone(family, form, backend, mode, tmp_path_factory):
    model, _ = load_ours(family, tmp_path_factory)
    model.train(mode == "train")
    if family == "bloom" and backend == "sdpa":
        backend = "chunked"  # sdpa cannot take ALiBi
    set_backend(model, backend)
    assert_packed_row_matches_documents_run_alone(model, *packed_row(form))


@pytest.mark.parametrize("positions", ["row", "from 1"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_qwen_documents_count_positions_from_0_whatever_position_ids_come_with_cu_seq_lens(
    positions, mode, tmp_path_factory
):
    """The original reads no ``position_ids``: given ``cu_seq_lens`` with positions over the whole row, or
    restarting at 1 (``DataCollatorWithFlattening(position_ids_start=1)``), each document still counts from 0
    (its rotary, logn scaling and dynamic NTK, which eval mode applies past ``seq_length``)."""
    model, _ = load_ours("qwen", tmp_path_factory)
    model.train(mode == "train")
    set_backend(model, "auto")
    ids, packing = packed_row("cu_seq_lens")
    from_1 = torch.cat([torch.arange(1, n + 1) for n in DOCUMENT_LENGTHS])[None]
    packing["position_ids"] = torch.arange(ids.shape[1])[None] if positions == "row" else from_1
    assert_packed_row_matches_documents_run_alone(model, ids, packing)


CUMULATIVE_LENGTHS_MESSAGE = "cu_seq_lens_q and cu_seq_lens_k must be the same cumulative document lengths"
BAD_CUMULATIVE_LENGTHS = {  # DOCUMENT_LENGTHS' cumulative lengths are [0, 5, 18, 19, 30]
    "cu_seq_lens short of the tokens": [0, 5, 18, 19, 28],
    "cu_seq_lens past the tokens": [0, 5, 18, 19, 31],
    "cu_seq_lens not from 0": [1, 5, 18, 19, 30],
    "cu_seq_lens decreasing": [0, 18, 5, 19, 30],
    "cu_seq_lens_k other than cu_seq_lens_q": [0, 5, 17, 19, 30],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(BAD_CUMULATIVE_LENGTHS))
def test_cumulative_lengths_that_do_not_cover_the_tokens_are_refused_by_name(family, case, tmp_path_factory):
    """Lengths that do not cover the tokens (flash-attention's varlen convention counts only a padded batch's kept
    ones) mixed documents silently; GPT-2 blamed its position_ids."""
    model, _ = load_ours(family, tmp_path_factory)
    ids, packing = packed_row("cu_seq_lens")
    bad = torch.tensor(BAD_CUMULATIVE_LENGTHS[case])
    packing["cu_seq_lens_k" if case.startswith("cu_seq_lens_k") else "cu_seq_lens_q"] = bad
    if not case.startswith("cu_seq_lens_k"):
        packing["cu_seq_lens_k"] = bad
    with pytest.raises(RuntimeError, match=CUMULATIVE_LENGTHS_MESSAGE):
        model(input_ids=ids, **packing)


@pytest.mark.parametrize("case", ["cu_seq_lens as lists", "cu_seq_lens over a cache", "uint8 positions"])
def test_bad_packed_inputs_are_refused_by_name(case, tmp_path_factory):
    model, _ = load_ours("gpt2", tmp_path_factory)
    model.eval()
    ids, packing = packed_row("cu_seq_lens")
    if case == "cu_seq_lens as lists":
        packing.update(cu_seq_lens_q=packing["cu_seq_lens_q"].tolist(), cu_seq_lens_k=packing["cu_seq_lens_k"].tolist())
        message = "cu_seq_lens_q and cu_seq_lens_k, both tensors"
    elif case == "cu_seq_lens over a cache":
        with torch.no_grad():
            packing["past_key_values"] = model(input_ids=ids[:, :3], use_cache=True).past_key_values
        message = "cannot continue a cache that already holds tokens"
    else:
        packing = {"position_ids": torch.cat([torch.arange(n) for n in DOCUMENT_LENGTHS])[None].to(torch.uint8)}
        message = "position_ids must be int64 or int32"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(input_ids=ids, **packing)


def load_stock(family: str, tmp_path_factory):
    import transformers

    _, folder = load_ours(family, tmp_path_factory)
    stock_class = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
                   "bloom": transformers.BloomForCausalLM}[family]
    return stock_class.from_pretrained(folder, attn_implementation="eager")


def padded_batch(padding: str, lengths=(16, 9, 4), total=16):
    keep = padded_keep(list(lengths), total, left=padding == "left").long()
    if padding == "gaps":  # BLOOM's non-contiguous case: holes inside the rows
        keep = torch.tensor([[1, 0, 1, 1] * 4, [0, 0, 1, 1, 0, 1, 1, 1] * 2, [1] * 16])
    ids = torch.randint(0, 97, keep.shape)
    # a row's first kept token would be predicted from a padded position, whose output is unspecified
    first_kept = F.pad(keep.cumsum(-1), (1, 0))[:, :-1] == 0
    return ids, keep, ids.masked_fill((keep == 0) | first_kept, -100)


def assert_matches_stock(ours, stock, ids, keep, labels, **extra):
    ours.train()  # dropout is 0 in these configs; train mode runs the training code paths
    stock.train()
    logits, loss, grads = logits_loss_grads(ours, ids, labels, attention_mask=keep, **extra)
    ref_logits, ref_loss, ref_grads = logits_loss_grads(stock, ids, labels, attention_mask=keep, **extra)
    kept = keep.bool()[..., None]
    assert_close_rel(logits * kept, ref_logits * kept, 1e-5, "logits at kept positions")
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close_rel(grads[name], ref_grads[name], 1e-5, f"grad {name}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "chunked", "eager"])
def test_padded_batch_matches_stock(family, padding, backend, tmp_path_factory):
    """LLaMA has 2 key/value heads for 4 query heads (GQA)."""
    ours, _ = load_ours(family, tmp_path_factory)
    if family == "bloom" and backend == "sdpa":
        backend = "flex"  # sdpa cannot take ALiBi; flex has no backward on CPU, so this runs chunked by auto
        backend = "auto"
    set_backend(ours, backend)
    ids, keep, labels = padded_batch(padding)
    extra = {}
    if family != "bloom":  # generate's positions for left padding; BLOOM's ALiBi follows the mask
        extra["position_ids"] = (keep.cumsum(-1) - 1).clamp_min(0)
    assert_matches_stock(ours, load_stock(family, tmp_path_factory), ids, keep, labels, **extra)


@pytest.mark.parametrize("backend", ["auto", "chunked", "eager"])
def test_bloom_non_contiguous_padding_matches_stock(backend, tmp_path_factory):
    """A mask such as [1, 0, 1, 1]: stock BLOOM counts ALiBi positions over kept tokens, and so do we."""
    ours, _ = load_ours("bloom", tmp_path_factory)
    set_backend(ours, backend)
    ids, keep, labels = padded_batch("gaps")
    assert_matches_stock(ours, load_stock("bloom", tmp_path_factory), ids, keep, labels)


def _stock_detects_packing() -> bool:
    import transformers.masking_utils as masking_utils

    return hasattr(masking_utils, "find_packed_sequence_indices")


@pytest.mark.skipif(not _stock_detects_packing(), reason="this transformers does not detect packed position_ids")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_position_ids_match_stock(family, tmp_path_factory):
    """GPT-2 used to attend across packed documents (error 6e-2 against stock)."""
    ours, _ = load_ours(family, tmp_path_factory)
    set_backend(ours, "auto")
    stock = load_stock(family, tmp_path_factory)
    ids, packing = packed_row("position_ids")
    labels = document_labels(ids)
    for model in (ours, stock):
        model.train()
    logits, loss, grads = logits_loss_grads(ours, ids, labels, **packing)
    ref_logits, ref_loss, ref_grads = logits_loss_grads(stock, ids, labels, **packing)
    assert_close_rel(logits, ref_logits, 1e-5, "logits")
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    for name in grads:
        assert_close_rel(grads[name], ref_grads[name], 1e-5, f"grad {name}")


def decoder_layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


class LayerInputs:
    """Records the shape of the hidden states every forward hands the first decoder layer. It wraps the layer's
    class's forward for a while instead of hooking the layer: a forward hook of the user's keeps a padded batch's
    rows."""

    def __init__(self, model):
        self.shapes = []
        layer = decoder_layers(model)[0]
        self.layer_class, self.class_forward = type(layer), vars(type(layer))["forward"]

        def forward(module, *args, **kwargs):
            if module is layer:
                self.shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape))
            return self.class_forward(module, *args, **kwargs)

        self.layer_class.forward = forward

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.layer_class.forward = self.class_forward


# ----------------------------------------------------------------------------------------------
# No O(q * k) tensor for a padded or packed call
# ----------------------------------------------------------------------------------------------


class _QuadraticTensorWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op, forward and backward, whose output has two dimensions of a sequence length (a
    [.., q, k] mask or score tensor): the padded rows' or the packed row of their kept tokens; the test's
    lengths are no other size of the model."""

    def __init__(self, *lengths: int):
        super().__init__()
        self.lengths, self.found = set(lengths), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and sum(size in self.lengths for size in tensor.shape) >= 2:
                self.found.append(f"{func}: {list(tensor.shape)}")
        return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["padded", "packed"])
def test_default_path_builds_no_quadratic_tensor(family, case, tmp_path_factory):
    model, _ = load_ours(family, tmp_path_factory)
    model.train()
    set_backend(model, "auto")
    model.config.attn_chunk_size = 16  # chunked blocks smaller than the sequence (read at every forward)
    seq, kept = 40, 63
    if case == "padded":  # runs unpadded: one row of 63 kept tokens (the first kept token is not predicted)
        keep = padded_keep([40, 23], seq, left=True).long()
        ids = torch.randint(0, 97, (2, seq))
        labels = ids.masked_fill(keep == 0, -100)
        labels[1, 17] = -100
        kwargs = {"attention_mask": keep, "labels": labels}
    else:
        ids = torch.randint(0, 97, (2, seq))
        positions = torch.cat([torch.arange(15), torch.arange(25)])[None].expand(2, -1)
        kwargs = {"position_ids": positions, "labels": ids}
    watch = _QuadraticTensorWatch(seq, kept)
    with watch, LayerInputs(model) as seen:
        model(input_ids=ids, **kwargs).loss.backward()
    assert watch.found == []
    assert seen.shapes == [(1, kept, 32) if case == "padded" else (2, seq, 32)]
    # the watch itself sees the dense path: the eager backend builds [b, h, q, k] scores
    set_backend(model, "eager")
    watch = _QuadraticTensorWatch(seq, kept)
    with watch:
        model(input_ids=ids, **kwargs).loss.backward()
    assert watch.found
    set_backend(model, "auto")


# ----------------------------------------------------------------------------------------------
# The benchmark's padded section and train.py --pack
# ----------------------------------------------------------------------------------------------


def test_benchmark_padded_section_runs_and_reports_the_target_ratios(tmp_path):
    from tests.test_benchmark_script import bench_module

    cli, core, padded = bench_module("cli"), bench_module("core"), bench_module("padded")
    # flex has no backward on the CPU, and cudnn runs only on CUDA
    chosen = [case for case in padded.PADDED_CASES if not case.endswith(("flex", "cudnn"))]
    args = cli.parse_args(["--device", "cpu", "--quick", "--section", "padded", "--family", "llama", "--out", str(tmp_path),
                           "--padded-cases", ",".join(chosen)])
    padded.run_padded(core.Bench(args, core.Recorder(tmp_path, {"device": "cpu"}, resume=False)))
    records = [r for r in core.bench_report.load_records([tmp_path / "results.jsonl"]) if r.get("section") == "padded"]
    cases = {r["impl"]: r for r in records}
    assert set(cases) == {f"ours:auto {case}" for case in chosen}
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in records)
    assert cases["ours:auto padded unpadded"]["tokens"] == sum(padded.padded_lengths(32))
    assert cases["ours:auto padded full rows"]["settings"] == {"unpad_batches": False}
    assert cases["ours:auto packed documents"]["documents"] > 1
    table = (tmp_path / "padded.md").read_text()
    assert "| llama | ours:auto padded unpadded | 8 x 32 |" in table and "unpadded / dense time" in table


def test_train_pack_marks_documents_and_restarts_positions(tmp_path):
    from tests.test_train import load_script

    train = load_script("train")
    (tmp_path / "docs.jsonl").write_text("[5, 6, 7]\n[8, 9]\n\n[10, 11, 12, 13]\n[14]\n")
    args = train.parse_args(["--tiny-config", "llama", "--data", str(tmp_path / "docs.jsonl"), "--seq-len", "4", "--pack",
                             "--output-dir", "x"])
    starts = train.document_starts(args, 10, 64, 1)
    assert starts.tolist() == [True, False, False, True, False, True, False, False, False, True]
    ids = torch.arange(5, 13).view(2, 4)
    inputs = train.packed_inputs(ids, starts[:8].view(2, 4))
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]  # a row start restarts too
    assert inputs["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, 11, 12]]


def test_train_pack_runs_each_synthetic_document_on_its_own(tmp_path):
    """--pack trains on the same blocks with position_ids restarting per document, and the model sees them."""
    from tests.test_train import TINY, load_script

    train = load_script("train")
    args = train.parse_args([*TINY, "--tiny-config", "llama", "--trust_remote_code", "--steps", "2", "--pack",
                             "--output-dir", str(tmp_path / "run")])
    n_tokens = args.steps * args.batch_size * args.seq_len
    tokens = train.load_tokens(args, None, 64, 1)
    starts = train.document_starts(args, tokens.numel(), 64, 1)
    documents = train.synthetic_documents(n_tokens, 64, args.seq_len, args.seed)
    assert torch.equal(tokens, torch.cat(documents)[:n_tokens]) and int(starts.sum()) == len(documents) > 1
    assert starts.nonzero().flatten().diff().tolist() == [len(d) for d in documents[:-1]]
    schedule = train.BlockSchedule(tokens, args.seq_len, args.batch_size, 1, 1, args.seed, starts)
    inputs = schedule.model_inputs(0, 0, 0)
    assert torch.equal(inputs["input_ids"], schedule.micro_batch(0, 0, 0))
    assert (inputs["position_ids"] == 0).sum() > inputs["input_ids"].shape[0]  # documents start inside rows
    records = train.train(args)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)



class _HostSyncWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that read a tensor's value on the host (.item(), bool(), data-dependent shapes): what a
    data-dependent Python branch or a host sync needs, and what torch.compile(fullgraph=True) cannot trace."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique_consecutive", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_packed_forward_reads_nothing_back_to_the_host(family, form, tmp_path_factory):
    model, _ = load_ours(family, tmp_path_factory)
    model.train()
    set_backend(model, "auto")
    ids, packing = packed_row(form)
    watch = _HostSyncWatch()
    with watch:
        model(input_ids=ids, labels=document_labels(ids), **packing).loss.backward()
    assert watch.found == []
    # the watch does see a host read: the varlen layout reads the segment lengths
    call = kernel_layer._describe(*random_qkv(1, 2, 2, 9, 16), True, None, None, 0.0, torch.zeros(1, 9, dtype=torch.long))
    with watch:
        kernel_layer._ragged_layout(call, None, torch.zeros(1, 9, dtype=torch.long), 1, "cpu")
    assert watch.found


def test_flex_forward_with_documents_padding_and_alibi_matches_reference():
    """flex (forward only on the CPU): a document mask_mod, and ALiBi over kept positions as a score_mod."""
    q, k, v = (x.detach() for x in random_qkv(2, 4, 2, 40, 32))
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, 3:9] = False  # a hole inside a document
    keep[1, :5] = False  # left padding
    documents = packed_ids([[25, 15], [40]])
    slopes = kernel_layer.alibi_slopes(4)
    out = attention(q, k, v, causal=True, attention_mask=keep, sequence_ids=documents, alibi_slopes=slopes,
                    backend="flex")
    expected = reference_attention(q, k, v, keep, documents, alibi=slopes)
    rows = keep[:, None, :, None]
    assert_close_rel(out.double() * rows, expected * rows, 1e-5, "flex")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_of_a_packed_row_stay_inside_each_document(family, tmp_path_factory):
    model, _ = load_ours(family, tmp_path_factory)
    model.eval()
    ids, packing = packed_row("position_ids")
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True, **packing).attentions
    documents = packed_ids([DOCUMENT_LENGTHS])[0]
    across = documents[:, None] != documents[None, :]
    assert len(weights) == 2 and all(w.shape[-2:] == (len(documents), len(documents)) for w in weights)
    assert all(float(w[..., across].abs().max()) == 0.0 and float(w.sum(-1).min()) > 0.99 for w in weights)


@pytest.mark.parametrize("quantization", ["qat", "dynamic"])
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_modules_that_take_statistics_of_the_batch_keep_its_rows(family, quantization, tmp_path_factory):
    """torch.ao's QAT observers and dynamically quantized linears scale by the min/max of the whole tensor they
    see, padded rows included in stock: such a model runs a padded batch at full length, as stock (unpadded,
    LLaMA's QAT gradients were 1.6e-2 off and its dynamically quantized logits 3.5e-2)."""
    import copy

    import torch.ao.quantization as quantization_api

    model, _ = load_ours(family, tmp_path_factory)
    ours, stock = copy.deepcopy(model), load_stock(family, tmp_path_factory)
    set_backend(ours, "auto")
    ids, keep, labels = padded_batch("right")
    ids = ids.masked_fill(keep == 0, 48)  # padding whose activations set the range
    for candidate in (ours, stock):
        if quantization == "qat":
            for module in candidate.modules():
                if type(module) is torch.nn.Linear:
                    module.qconfig = quantization_api.get_default_qat_qconfig("x86")
            quantization_api.prepare_qat(candidate.train(), inplace=True)
        else:
            quantization_api.quantize_dynamic(candidate.eval(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    inputs = {"input_ids": ids, "attention_mask": keep, "labels": labels, "use_cache": False}
    with LayerInputs(ours) as seen, torch.set_grad_enabled(quantization == "qat"):
        actual, expected = ours(**inputs).loss, stock(**inputs).loss
    assert seen.shapes == [(*ids.shape, 32)]
    assert_close_rel(actual.detach(), expected.detach(), 1e-5, f"{quantization} loss")
    if quantization == "qat":
        actual.backward()
        expected.backward()
        stock_parameters = dict(stock.named_parameters())
        for name, parameter in ours.named_parameters():
            assert_close_rel(parameter.grad, stock_parameters[name].grad, 1e-4, f"{quantization} {name}")


@pytest.mark.parametrize("family", ["llama", "bloom", "qwen"])
@pytest.mark.parametrize("shape", [(2, 8), (3, 7), (1, 2, 7)])
def test_packed_position_ids_of_the_wrong_shape_are_refused_by_name(family, shape, tmp_path_factory):
    """Restarting positions with no mask pack documents; a wrong shape failed in an expand without naming them."""
    model, _ = load_ours(family, tmp_path_factory)
    ids = torch.randint(0, 97, (2, 7))
    positions = torch.arange(shape[-1]).remainder(4).expand(shape)
    shown = ", ".join(map(str, shape))
    with torch.no_grad(), pytest.raises(ValueError, match=rf"position_ids must be .*got shape \[{shown}\]"):
        model(input_ids=ids, position_ids=positions)
