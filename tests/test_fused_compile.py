"""The fused ops under torch.compile: a compiled training step keeps no more for backward than an eager one,
computes the same loss and gradients as eager and stock, and compiles into one graph (no break from our code).

Under torch.compile each fused op's forward and backward is one opaque custom op (on CUDA, the norm,
activation and RoPE ops' Triton kernels traced into the graph), so the partitioner (the compiler's choice of
what a compiled step keeps for backward) cannot keep the activations the fused ops recompute: before, it kept
``silu(gate) * up`` of every LLaMA layer for ``down_proj``'s weight gradient.
``aot_eager_decomp_partition`` runs Inductor's decompositions and partitioner without generating code.
"""

import copy
from collections import Counter

import pytest
import torch
from remote_code import assert_close_rel
from test_fused_models import STOCK, TOL, batch_for, family_pairs, train_step  # noqa: F401 - a fixture

PARTITIONING_BACKEND = "aot_eager_decomp_partition"


def saved_storages(model, step) -> tuple:
    """(the result of ``step()``, the distinct storages autograd keeps for backward while it runs, the model's
    weights excluded, as a Counter of (bytes, shape and dtype of the first tensor saved in each))."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    return result, Counter(storages.values())


def assert_keeps_no_more(compiled: Counter, eager: Counter, block: int = 1) -> None:
    """The compiled step keeps no more bytes than the eager one; on failure, what each kept that the other did not.
    ``block``: the allocator's rounding of each storage (CUDA's caching allocator: 512 bytes), so that a tensor
    Inductor keeps in a larger buffer freed before (BART's [2, 4, 13, 8] bf16 tensors, 1,664 bytes, in 2,048-byte
    buffers) costs what it costs on the device."""
    compiled_bytes, eager_bytes = (
        sum(-(-entry[0] // block) * block * n for entry, n in kept.items()) for kept in (compiled, eager)
    )
    assert compiled_bytes <= eager_bytes, (
        compiled_bytes, eager_bytes, compiled - eager, eager - compiled
    )


def compiled_against_eager(model, batch: dict, **kwargs) -> tuple:
    """One training step compiled (fullgraph: a graph break raises) and one eager, each with what it keeps for
    backward: ((output, grads, saved storages) compiled, (output, grads, saved storages) eager)."""
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=PARTITIONING_BACKEND, fullgraph=True)
    train_step(compiled, batch, **kwargs)  # compiles forward and backward
    (eager, eager_grads), eager_saved = saved_storages(model, lambda: train_step(model, batch, **kwargs))
    (got, grads), compiled_saved = saved_storages(model, lambda: train_step(compiled, batch, **kwargs))
    grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
    return (got, grads, compiled_saved), (eager, eager_grads, eager_saved)


def assert_same_step(got, grads, expected, expected_grads, what: str) -> None:
    assert_close_rel(got.loss.detach(), expected.loss.detach(), TOL, f"compiled loss against {what}")
    assert grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        if key.endswith("k_proj.bias"):  # softmax ignores a key bias: rounding noise around 0 on both sides
            continue
        assert_close_rel(grads[key], grad, TOL, f"compiled grad of {key} against {what}")


def unpadded_batch(name: str, seed: int) -> dict:
    """A batch without attention_mask (padding masks are the attention layer's business, not the fused ops')."""
    batch = batch_for(name, torch.Generator().manual_seed(seed))
    del batch["attention_mask"]
    return batch


@pytest.mark.parametrize("name", list(STOCK))
def test_compiled_training_step_keeps_no_more_than_eager_and_matches_stock(family_pairs, name):
    stock, ours, _ = family_pairs[name]
    batch = unpadded_batch(name, 20)
    (got, grads, compiled_saved), (eager, eager_grads, eager_saved) = compiled_against_eager(ours, batch)
    assert_keeps_no_more(compiled_saved, eager_saved)
    assert got.logits is None
    expected, expected_grads = train_step(stock, batch)
    assert_same_step(got, grads, expected, expected_grads, "stock")
    assert_same_step(got, grads, eager, eager_grads, "eager")


def test_kernel_ops_are_decomposed_by_the_compiler_and_named_after_the_source(monkeypatch):
    """A ``_kernel_op`` runs its function eagerly, and a compiler tracing it records what the function does (on
    CUDA: the Triton launches) instead of a call of the op. Here with a PyTorch function, standing in for Triton."""
    import importlib
    import uuid

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops = importlib.import_module("memory_efficient_adapter.attention")
    monkeypatch.setattr(ops, "triton", object())  # present, as with a CUDA build of torch
    monkeypatch.setattr(ops, "_wrap_triton", lambda kernel: kernel)

    def kernels(x, scale):
        return [x * scale, x.exp()]

    name = f"stand_in_{uuid.uuid4().hex[:8]}"
    op = ops._kernel_op(name, "(Tensor x, float scale) -> Tensor[]", kernels)
    assert str(op).endswith(f"{name}_{ops._source_digest()}.default"), op
    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    def step(x):
        scaled, exp = op(x, 3.0)
        return scaled.sin() + exp

    x = torch.randn(5, 7)
    expected = (x * 3.0).sin() + x.exp()
    torch.testing.assert_close(step(x), expected)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(x), expected)
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert not [target for target in targets if name in target], targets
    assert "aten.exp.default" in targets and "aten.mul.Tensor" in targets, targets


def test_compiled_qwen_training_step_keeps_no_more_than_eager_and_matches_it(tmp_path):
    from test_qwen import load, random_ids, random_model, save_qwen

    torch.manual_seed(5)
    ours = load(save_qwen(random_model(rotary_pct=0.5, no_bias=False), tmp_path))
    ours.config.loss_chunk_size = 5  # several chunks and a remainder
    ids = random_ids(2, 11)
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
    batch = dict(input_ids=ids, labels=labels)
    (got, grads, compiled_saved), (eager, eager_grads, eager_saved) = compiled_against_eager(ours, batch)
    assert_keeps_no_more(compiled_saved, eager_saved)
    assert got.logits is None
    assert_same_step(got, grads, eager, eager_grads, "eager")


# The fused ops whose Triton kernels a compiled CUDA graph launches from its own code (``_kernel_op``).
KERNEL_OPS = (
    "rms_norm_forward", "rms_norm_backward", "layer_norm_forward", "layer_norm_backward", "activation_forward",
    "activation_backward", "activation_linear_forward", "activation_linear_backward", "rotary_forward",
    "rotary_backward",
)
TRITON_KERNELS = {
    "llama": ("_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_activation_forward_kernel",
              "_activation_backward_kernel", "_rotary_kernel", "_cross_entropy_rows_kernel"),
    "layer_norm": ("_layer_norm_forward_kernel", "_layer_norm_backward_kernel", "_activation_forward_kernel",
                   "_activation_backward_kernel", "_cross_entropy_rows_kernel"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart"])
def test_inductor_compiled_bf16_step_on_cuda_runs_our_triton_kernels_and_keeps_no_more_than_eager(
    family_pairs, name
):
    """Inductor launches our norm, activation and RoPE kernels from its own code (no opaque op around them),
    keeps no more than eager, and computes eager's loss and gradients."""
    import copy
    import sys

    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(family_pairs[name][1]).to("cuda", torch.bfloat16).train()
    batch = {key: value.cuda() for key, value in unpadded_batch(name, 21).items()}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # Inductor
    # Inductor pads a matmul's unaligned rows (26 tokens here) where its own timing of both says padding is
    # faster, and then keeps the padded copy for backward: a choice that varies between machines, not ours.
    with torch._inductor.config.patch(shape_padding=False):
        train_step(compiled, batch)
    (eager, eager_grads), eager_saved = saved_storages(model, lambda: train_step(model, batch))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        (got, grads), compiled_saved = saved_storages(model, lambda: train_step(compiled, batch))
        torch.cuda.synchronize()
    grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
    kernels = {event.key for event in prof.key_averages()}
    for kernel in TRITON_KERNELS["llama" if name == "llama" else "layer_norm"]:
        assert any(kernel in launched for launched in kernels), (kernel, sorted(kernels))
    layer = sys.modules[type(model).__module__]
    assert not layer._triton_failed and not layer._compile_failed
    opaque_calls = [key for key in kernels if key.split("::")[-1] in KERNEL_OPS]  # traced, not called
    assert not opaque_calls, opaque_calls
    assert_keeps_no_more(compiled_saved, eager_saved, block=512)
    assert_close_rel(got.loss.detach().float(), eager.loss.detach().float(), 1e-2, "compiled bf16 loss")
    for key, grad in eager_grads.items():
        if not key.endswith("k_proj.bias"):  # softmax ignores a key bias: rounding noise around 0 on both sides
            assert_close_rel(grads[key].float(), grad.float(), 3e-2, f"compiled bf16 grad of {key}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_compiled_bloom_on_cuda_follows_changing_lengths(family_pairs):
    """BLOOM's attention on the cudnn backend's ops (where the frontend is installed): the first length
    compiles with static shapes, the next two share one graph with dynamic shapes (the ops pad to the length's
    bucket when they run), and every step equals eager's."""
    import copy

    from torch._inductor.compile_fx import compile_fx

    compiles = []

    def inductor(graph, example_inputs):
        compiles.append(1)
        return compile_fx(graph, example_inputs)

    model = copy.deepcopy(family_pairs["bloom"][1]).to("cuda", torch.bfloat16).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=inductor, fullgraph=True)
    generator = torch.Generator().manual_seed(23)
    for length in (64, 100, 37):
        ids = torch.randint(3, model.config.vocab_size, (2, length), generator=generator).cuda()
        expected, expected_grads = train_step(model, dict(input_ids=ids, labels=ids))
        got, grads = train_step(compiled, dict(input_ids=ids, labels=ids))
        assert_close_rel(got.loss.detach().float(), expected.loss.detach().float(), 1e-2, f"loss at {length}")
        for key, grad in expected_grads.items():
            assert_close_rel(grads[f"_orig_mod.{key}"].float(), grad.float(), 3e-2, f"grad of {key} at {length}")
    assert len(compiles) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_cuda_graph_replays_of_training_steps_match_eager(family_pairs, name):
    """``model.compile(mode="reduce-overhead")`` (what a host-bound short step wants): our Triton kernels and
    cuDNN graphs are captured without a skipped graph, and the replayed steps on new token ids equal eager's."""
    import copy

    from torch._dynamo.utils import counters

    model = copy.deepcopy(family_pairs[name][1]).to("cuda", torch.bfloat16).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    generator = torch.Generator().manual_seed(29)
    for step in range(4):  # a warm-up run, the recording, then replays
        ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=generator).cuda()
        expected, expected_grads = train_step(model, dict(input_ids=ids, labels=ids))
        torch.compiler.cudagraph_mark_step_begin()
        got, grads = train_step(compiled, dict(input_ids=ids, labels=ids))
        assert_close_rel(got.loss.detach().float(), expected.loss.detach().float(), 1e-2, f"loss of step {step}")
        for key, grad in expected_grads.items():
            assert_close_rel(grads[f"_orig_mod.{key}"].float(), grad.float(), 3e-2, f"grad of {key}, step {step}")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


# dynamic=None (what model.compile() does): recompiled with dynamic shapes at the second length, every family;
# that traces every family's ops with symbolic shapes already. dynamic=True (symbolic from the first trace) on LLaMA.
@pytest.mark.parametrize(
    "name, dynamic", [("llama", None), ("gpt2", None), ("bloom", None), ("bart", None), ("llama", True)]
)
def test_compiled_training_step_follows_changing_lengths_in_one_graph(family_pairs, name, dynamic):
    _, ours, _ = family_pairs[name]
    ours.train()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=PARTITIONING_BACKEND, fullgraph=True, dynamic=dynamic)
    generator = torch.Generator().manual_seed(22)
    for length in (9, 14, 21):
        ids = torch.randint(3, ours.config.vocab_size, (2, length), generator=generator)
        labels = ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.2, -100)
        batch = dict(input_ids=ids, labels=labels[:, : max(length // 2, 3)] if name == "bart" else labels)
        expected, expected_grads = train_step(ours, batch)
        got, grads = train_step(compiled, batch)
        grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
        assert_same_step(got, grads, expected, expected_grads, f"eager at length {length}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart"])
def test_compiled_step_with_gradient_checkpointing_is_one_graph_and_equals_eager(family_pairs, name):
    """``use_cache`` left at its default (True): the 'incompatible with gradient checkpointing' warning is not
    logged inside a compiled graph (a logging call would break it)."""
    _, ours, _ = family_pairs[name]
    batch = unpadded_batch(name, 23)
    expected, expected_grads = train_step(ours, batch)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert ours.config.use_cache
        torch._dynamo.reset()
        compiled = torch.compile(ours, backend=PARTITIONING_BACKEND, fullgraph=True)
        got, grads = train_step(compiled, batch)
    finally:
        ours.gradient_checkpointing_disable()
    grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
    assert_same_step(got, grads, expected, expected_grads, "eager without checkpointing")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_compiled_step_with_attention_dropout_and_a_padding_mask_is_one_graph_and_equals_eager(family_pairs, name):
    """The chunked backend (where a compiled padded call goes on the CPU, or on CUDA without flash-attn) read its
    dropout seed on the host: a graph break at every attention call, and ``fullgraph=True`` failed (stock compiles
    it in one graph). The seed now reaches the ops as a tensor; the same RNG state draws the same dropout in both.
    An all-ones mask, as the Trainer passes: eager runs every row at full length too."""
    ours = copy.deepcopy(family_pairs[name][1])
    ours.config.attn_backend = "chunked"
    for module in ours.modules():  # what the attention layers read: LLaMA's float, GPT-2's and BLOOM's modules
        for attribute in ("attention_dropout", "attn_dropout"):
            value = module.__dict__.get(attribute, module._modules.get(attribute))
            if isinstance(value, torch.nn.Dropout):
                value.p = 0.25
            elif isinstance(value, float):
                setattr(module, attribute, 0.25)
    batch = unpadded_batch(name, 24)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    torch.manual_seed(5)
    expected, expected_grads = train_step(ours, batch)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=PARTITIONING_BACKEND, fullgraph=True)
    torch.manual_seed(5)
    got, grads = train_step(compiled, batch)
    grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
    assert_same_step(got, grads, expected, expected_grads, "eager with the same dropout")
    torch.manual_seed(6)
    assert not torch.equal(train_step(ours, batch)[0].loss, expected.loss)  # dropout does draw


def backward_graph_ops(model, batch: dict) -> list:
    """The op names of the backward graph a compiled training step runs (Inductor's decompositions applied)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs = []

    def keep_backward(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    backend = aot_autograd(
        fw_compiler=lambda graph, example_inputs: make_boxed_func(graph.forward),
        bw_compiler=keep_backward,
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    train_step(torch.compile(model.train(), backend=backend, fullgraph=True), batch)
    (graph,) = graphs
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


def test_compiled_backward_sums_the_shared_input_gradient_in_place(family_pairs):
    """Functionalized, an in-place ``addmm_`` becomes an out-of-place ``addmm``, which copies its input first:
    the shared projections' backward (LLaMA's q/k/v and gate/up) is one opaque op per group instead."""
    _, ours, _ = family_pairs["llama"]
    ops = backward_graph_ops(ours, unpadded_batch("llama", 23))
    assert not [op for op in ops if op.startswith("aten.addmm")], ops
    assert sum(op.endswith("shared_input_linears_backward.default") for op in ops) == 2 * ours.config.num_hidden_layers


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_a_compiled_step_keeps_the_fused_ops_where_dynamo_folds_is_exporting_to_true(family_pairs, name, monkeypatch):
    """torch 2.11's dynamo folds ``torch.compiler.is_exporting()`` to True in every graph it traces, so the
    fused ops took ``torch.compile`` for an export and computed as stock (on the GPU machine's torch, none of our
    kernels ran in a compiled step). Simulated here: ``is_exporting`` answers what ``is_compiling`` answers."""
    _, ours, _ = family_pairs[name]
    batch = unpadded_batch(name, 23)
    expected = [op for op in backward_graph_ops(ours, batch) if "memory_efficient_adapter" in op]
    assert expected
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    assert [op for op in backward_graph_ops(ours, batch) if "memory_efficient_adapter" in op] == expected


@pytest.mark.parametrize("name, switches", [
    ("llama", dict(attn_backend="eager")), ("bloom", dict(attn_backend="eager")), ("bart", dict(attn_backend="eager")),
    ("gpt2", dict(attn_backend="eager", use_lightsoftmax=True)),
])  # fmt: skip
def test_compiled_step_on_the_eager_attention_backend_equals_eager(family_pairs, name, switches):
    """The eager backend's float32 softmax kept its output through a ``.to()`` that changed nothing (an alias):
    torch 2.11's dynamo gave the scores no gradient (LLaMA's q and k projections got zeros), 2.13 did not."""
    _, ours, _ = family_pairs[name]
    batch = unpadded_batch(name, 24)
    previous = {key: getattr(ours.config, key, None) for key in switches}
    for key, value in switches.items():
        setattr(ours.config, key, value)
    try:
        ours.train()
        expected, expected_grads = train_step(ours, batch)
        torch._dynamo.reset()
        got, grads = train_step(torch.compile(ours, backend="aot_eager", fullgraph=True), batch)
    finally:
        for key, value in previous.items():
            setattr(ours.config, key, value)
    grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
    assert_same_step(got, grads, expected, expected_grads, f"eager ({switches})")
