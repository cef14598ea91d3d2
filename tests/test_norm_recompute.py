"""Norm outputs recomputed in backward (``after_norm``, ``config.recompute_norm_outputs``).

In eager training the pre-norm families (LLaMA, Qwen, GPT-2, BLOOM) need not keep a norm's output for the
projections that follow it, and neither does BART for the norms inside a layer (post-LN: the last norm's
output is the layer's, kept by the next layer): backward runs the norm again on its input, which the norm
keeps anyway. With the switch on they are recomputed; unset, only outputs of at least 16 MiB are. Checked
here: the outputs are freed after the forward (and kept with the switch off), the loss and every gradient
are bit for bit those of the step that keeps them (also under autocast and with PEFT LoRA), unset the switch
leaves it to the output's size, other saved-tensor hooks still see every tensor, and a bad switch value is
refused. Against stock: ``test_fused_ops.py`` and ``test_fused_models.py`` (unset there: these tiny models'
outputs are kept), so the recomputing step is checked against stock through the kept one.
"""

import contextlib
import copy
import importlib
import sys

import pytest
import torch
from remote_code import assert_close_rel
from test_fused_compile import assert_same_step
from test_fused_models import batch_for, family_pairs, train_step  # noqa: F401 - a fixture
from torch.multiprocessing.reductions import StorageWeakRef

ops = importlib.import_module("memory_efficient_adapter.attention")

# the norms whose outputs feed projections, per family (module name suffixes)
NORMS = {
    "llama": ("input_layernorm", "post_attention_layernorm"),
    "gpt2": ("ln_1", "ln_2"),
    "bloom": ("input_layernorm", "post_attention_layernorm"),
    "qwen": ("ln_1", "ln_2"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm"),
    "bart_causal": ("self_attn_layer_norm", "encoder_attn_layer_norm"),
}


def recomputed_norms(model) -> int:
    """How many norm outputs a training forward recomputes: two per layer; BART one per encoder layer and two
    per decoder layer (one without cross-attention, as in BartForCausalLM)."""
    config = model.config
    if type(model).__name__ == "BartForCausalLM":
        return config.decoder_layers
    if config.model_type == "bart":
        return config.encoder_layers + 2 * config.decoder_layers
    return 2 * config.num_hidden_layers


def norm_modules(model, family: str) -> list:
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in NORMS[family]]


@contextlib.contextmanager
def norm_outputs_seen(model, family: str, record):
    """``record(output)`` for every norm output made inside the block, as the model's kernel layer hands it to
    ``_layer_of_normed`` (a hook on the norms would make them hooked norms, which are never recomputed)."""
    kernel_layer = sys.modules[type(model).__module__]
    layer_of_normed, norms = kernel_layer._layer_of_normed, {id(module) for module in norm_modules(model, family)}

    def recording(norm, x, normed, layer, recompute):
        if id(norm) in norms:
            record(normed)
        return layer_of_normed(norm, x, normed, layer, recompute)

    kernel_layer._layer_of_normed = recording
    try:
        yield
    finally:
        kernel_layer._layer_of_normed = layer_of_normed


@contextlib.contextmanager
def recompute_set(config, value: bool):
    config.recompute_norm_outputs = value
    try:
        yield
    finally:
        del config.recompute_norm_outputs


def forward_with_norm_outputs(model, family: str, batch: dict):
    """The training forward's output, and a weak reference to the storage of every norm output it made."""
    outputs = []
    with norm_outputs_seen(model, family, lambda out: outputs.append(StorageWeakRef(out.untyped_storage()))):
        model.train()
        model.zero_grad(set_to_none=True)
        result = model(**batch)
    return result, outputs


def norm_output_sizes(model, family: str, batch: dict) -> list:
    """The bytes of every norm output of one forward."""
    sizes = []
    with norm_outputs_seen(model, family, lambda out: sizes.append(out.numel() * out.element_size())):
        model(**batch)
    return sizes


def norm_outputs_kept(model, family: str, batch: dict) -> list:
    """For every norm output of a training forward, whether it is alive while the forward's graph is."""
    output, norm_outputs = forward_with_norm_outputs(model, family, batch)  # the output holds the graph
    kept = [not ref.expired() for ref in norm_outputs]
    del output
    return kept


def assert_identical_steps(got, expected) -> None:
    """Two (loss, {name: grad}) steps, bit for bit."""
    (loss, grads), (expected_loss, expected_grads) = got, expected
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name


def loss_and_grads(model, batch: dict) -> tuple:
    output, grads = train_step(model, batch)
    return output.loss.detach(), grads


def qwen_model(tmp_path):
    from test_qwen import load, random_model, save_qwen

    torch.manual_seed(5)
    return load(save_qwen(random_model(rotary_pct=0.5, no_bias=False), tmp_path))


def model_and_batch(family: str, family_pairs, tmp_path):  # noqa: F811 - the fixture's value
    model = qwen_model(tmp_path) if family == "qwen" else family_pairs[family][1]
    batch = batch_for(family if family.startswith("bart") else "llama", torch.Generator().manual_seed(7))
    if family == "qwen":
        batch.pop("attention_mask")
    return model, batch


@pytest.mark.parametrize("family", list(NORMS))
def test_norm_outputs_are_freed_after_forward_and_gradients_are_unchanged(family, family_pairs, tmp_path):  # noqa: F811
    model, batch = model_and_batch(family, family_pairs, tmp_path)
    steps = {}
    for recompute in (False, True):
        with recompute_set(model.config, recompute):
            output, norm_outputs = forward_with_norm_outputs(model, family, batch)
            kept = [not ref.expired() for ref in norm_outputs]
            output.loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        steps[recompute] = output.loss.detach(), grads
        assert len(kept) == recomputed_norms(model), len(kept)
        assert all(kept) if not recompute else not any(kept), (recompute, kept)
    assert_identical_steps(steps[True], steps[False])


def autocast_copies_kept(model, family: str, batch: dict) -> tuple:
    """A training forward under bf16 autocast (float32 weights, as ``Trainer(bf16=True)`` runs): for every bf16
    copy autocast makes of a norm output (or of a reshape of one), whether it is alive while the forward's graph
    is; and the step's loss and gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    norm_storages, copies = {}, []

    def is_norm_output(tensor: torch.Tensor) -> bool:
        """Its storage is a norm output's, still alive (a freed one's address may be reused by another tensor)."""
        storage = tensor.untyped_storage()
        ref = norm_storages.get(storage.data_ptr())
        return ref is not None and not ref.expired() and ref.cdata == storage._cdata

    class RecordCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if func is torch.ops.aten._to_copy.default and is_norm_output(source):
                copies.append(StorageWeakRef(result.untyped_storage()))
            return result

    model.train()
    model.zero_grad(set_to_none=True)

    def record(out: torch.Tensor) -> None:
        norm_storages[out.untyped_storage().data_ptr()] = StorageWeakRef(out.untyped_storage())

    with norm_outputs_seen(model, family, record), RecordCopies(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch)
    kept = [not ref.expired() for ref in copies]
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return kept, (output.loss.detach(), grads)


@pytest.mark.parametrize("family", list(NORMS))
def test_autocasts_copies_of_norm_outputs_are_freed_after_forward_and_gradients_are_unchanged(
    family, family_pairs, tmp_path  # noqa: F811
):
    """With float32 weights under autocast the projections keep autocast's bf16 copy of the norm output, not the
    output: recomputing it freed nothing. The copies are recomputed too (the norm, then the same cast)."""
    model, batch = model_and_batch(family, family_pairs, tmp_path)
    steps = {}
    for recompute in (False, True):
        with recompute_set(model.config, recompute):
            kept, steps[recompute] = autocast_copies_kept(model, family, batch)
        held = sum(kept)  # (a copy that nothing saves is freed either way)
        assert held >= recomputed_norms(model) if not recompute else held == 0, (recompute, kept)
    assert_identical_steps(steps[True], steps[False])


class CastAndClampMLP(torch.nn.Module):
    """A user's MLP that makes its own bf16 copy of its input and clamps it where autograd does not see it."""

    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)

    def forward(self, hidden_states, *residual):
        copy = hidden_states.to(torch.bfloat16)
        with torch.no_grad():
            copy.clamp_(-0.5, 0.5)
        out = self.down(torch.nn.functional.gelu(self.up(copy)))
        return out + residual[0] if residual else out  # (BLOOM's MLP also takes the residual)


class ResidualGateMLP(torch.nn.Module):
    """BLOOM's MLP signature; a gate from a float64 copy of the residual, which leaves BLOOM's fused norm node
    beside the norm's output (``with_residual``; not under autocast, where the norm is torch's)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gate, self.out = torch.nn.Linear(hidden, hidden).double(), torch.nn.Linear(hidden, hidden)

    def forward(self, hidden_states, residual):
        gate = torch.sigmoid(self.gate(residual.to(torch.float64))).float()
        return residual + gate * self.out(hidden_states)


@pytest.mark.parametrize("family,mlp,autocast", [("llama", CastAndClampMLP, True), ("bloom", CastAndClampMLP, True),
                                                 ("bloom", ResidualGateMLP, False)])  # fmt: skip
def test_only_autocasts_own_copies_of_a_norm_output_are_recomputed(
    family, mlp, autocast, family_pairs, tmp_path  # noqa: F811
):
    """A bf16 copy changed in place where autograd does not record it, and a copy of another output of the norm's
    node (BLOOM's residual), were taken for autocast's copy of the norm output: gradients 7% to 25% off."""
    model, batch = model_and_batch(family, family_pairs, tmp_path)
    model = copy.deepcopy(model)
    torch.manual_seed(3)
    for layer in model.base_model.layers if family == "llama" else model.base_model.h:
        layer.mlp = mlp(model.config.hidden_size)
    steps = {}
    for recompute in (False, True):
        with recompute_set(model.config, recompute), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            steps[recompute] = loss_and_grads(model, batch)
    assert_identical_steps(steps[True], steps[False])


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_unset_the_size_decides_and_gradients_match_under_autocast(family, family_pairs, monkeypatch):  # noqa: F811
    """Unset, the switch leaves it to each norm output's size: kept below ``_NORM_RECOMPUTE_MIN_BYTES``,
    recomputed from it up (the bound lowered to this tiny model's norm outputs, on the module the model was
    loaded from)."""
    model = family_pairs[family][1]
    batch = batch_for(family, torch.Generator().manual_seed(8))
    steps = []
    for recompute in (False, True):
        with recompute_set(model.config, recompute), torch.autocast("cpu", dtype=torch.bfloat16):
            steps.append(loss_and_grads(model, batch))
    assert_identical_steps(steps[1], steps[0])
    sizes = norm_output_sizes(model, family, batch)
    layer = sys.modules[type(model).__module__]
    for bound, expect_kept in ((max(sizes) + 1, True), (min(sizes), False), (ops._NORM_RECOMPUTE_MIN_BYTES, True)):
        monkeypatch.setattr(layer, "_NORM_RECOMPUTE_MIN_BYTES", bound)
        assert norm_outputs_kept(model, family, batch) == [expect_kept] * recomputed_norms(model), bound


def test_the_size_bound_puts_no_guard_on_a_compiled_graph(family_pairs, monkeypatch):  # noqa: F811
    """Compiling, nothing is recomputed and the size is not asked: two lengths on either side of the bound train
    in one graph with dynamic shapes (the size, asked first, would guard the graph on the sequence length)."""
    from torch._dynamo.testing import CompileCounter

    model = family_pairs["llama"][1]
    layer = sys.modules[type(model).__module__]
    generator = torch.Generator().manual_seed(12)
    ids = [torch.randint(3, model.config.vocab_size, (2, length), generator=generator) for length in (9, 21)]
    batches = [dict(input_ids=row, labels=row) for row in ids]
    bound = 2 * max(norm_output_sizes(model, "llama", batches[0]))  # 18 tokens: between the two lengths
    monkeypatch.setattr(layer, "_NORM_RECOMPUTE_MIN_BYTES", bound)
    kept = [norm_outputs_kept(model, "llama", batch) for batch in batches]
    assert kept[0] and all(kept[0]) and not any(kept[1]), "eager: the 9 tokens keep their norm outputs, 21 do not"
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for batch in batches:
        expected, expected_grads = train_step(model, batch)
        got, grads = train_step(compiled, batch)
        grads = {key.removeprefix("_orig_mod."): grad for key, grad in grads.items()}
        assert_same_step(got, grads, expected, expected_grads, "eager")
    assert counter.frame_count == 1, counter.frame_count


def test_lora_gradients_are_unchanged(family_pairs):  # noqa: F811
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        family_pairs["llama"][1], peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    batch = batch_for("llama", torch.Generator().manual_seed(9))
    config = model.base_model.model.config
    steps = []
    try:
        for recompute in (False, True):
            with recompute_set(config, recompute):
                steps.append(loss_and_grads(model, batch))
    finally:
        model.unload().requires_grad_(True)  # the fixture's model, which PEFT froze, trains again in other tests
    assert steps[0][1] and all("lora_" in name for name in steps[0][1])
    assert_identical_steps(steps[1], steps[0])


def test_other_saved_tensor_hooks_see_every_tensor_the_step_keeps(family_pairs):  # noqa: F811
    """Under someone else's hooks (activation offloading, a memory count) nothing is recomputed: their pack
    hook receives the norm outputs like every other saved tensor."""
    model = family_pairs["gpt2"][1]
    batch = batch_for("gpt2", torch.Generator().manual_seed(10))
    packed = set()

    def pack(tensor):
        packed.add(tensor.untyped_storage().data_ptr())
        return tensor

    outputs = []
    with norm_outputs_seen(model, "gpt2", lambda out: outputs.append(out.untyped_storage().data_ptr())):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            train_step(model, batch)
    assert len(outputs) == 4 and all(pointer in packed for pointer in outputs)


class CountingNorm(torch.nn.Module):
    """A norm a user swapped in that keeps state: it counts its calls."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.norm(x)


def with_norms_replaced(model, family: str, replacement):
    """A copy of ``model`` whose norms that feed projections are ``replacement(norm)``."""
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in NORMS[family]:
            parent, attribute = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, attribute, replacement(module))
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "qwen", "bart"])
def test_a_norm_replaced_by_a_random_or_stateful_module_is_not_run_again(family, family_pairs, tmp_path):  # noqa: F811
    """Only norms whose second call computes what the first did are recomputed. A norm followed by dropout
    drew a new mask in backward (gradients 60% to 100% off), a norm that counts its calls counted two."""
    model, batch = model_and_batch(family, family_pairs, tmp_path)
    dropping = with_norms_replaced(model, family, lambda norm: torch.nn.Sequential(norm, torch.nn.Dropout(0.3)))
    steps = {}
    for recompute in (False, True):
        with recompute_set(dropping.config, recompute):
            torch.manual_seed(3)
            steps[recompute] = loss_and_grads(dropping, batch)
    assert_identical_steps(steps[True], steps[False])
    counting = with_norms_replaced(model, family, CountingNorm)
    with recompute_set(counting.config, True):
        loss_and_grads(counting, batch)
    calls = [module.calls.item() for module in counting.modules() if isinstance(module, CountingNorm)]
    assert calls and all(count == 1 for count in calls), calls


def test_a_bad_switch_value_is_refused(family_pairs):  # noqa: F811
    model = family_pairs["bloom"][1]
    refused = pytest.raises(ValueError, match="config.recompute_norm_outputs must be True, False or None")
    with recompute_set(model.config, "yes"), refused:
        train_step(model, batch_for("bloom", torch.Generator().manual_seed(11)))
    assert ops.recompute_norm_outputs(model.config) is None


def test_a_dropped_forward_frees_what_a_layer_saved_of_its_own_outputs():
    """The saved-tensor hooks kept every other tensor as it was: a node that saves its own output (SDPA) then held
    the output, whose ``grad_fn`` is that node, a cycle Python's collector cannot see, so a training forward
    dropped without backward (an exception, a skipped batch) never freed it. Kept detached, it is freed."""
    import gc
    import weakref

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(16)
    x = torch.randn(2, 5, 16, requires_grad=True)

    attended = []

    def attend(normed: torch.Tensor) -> torch.Tensor:
        q = normed.view(2, 5, 2, 8).transpose(1, 2)
        output = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        attended.append(weakref.ref(output))
        return output.transpose(1, 2).reshape(2, 5, 16)

    out = ops.after_norm(norm, x * 1.0, attend, recompute=True)
    assert attended[0]() is not None
    del out
    gc.collect()
    assert attended[0]() is None


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart"])
def test_training_forwards_dropped_without_backward_leave_nothing_alive(family_pairs, name):
    """An exception mid-step or a skipped batch drops a training forward's graph: with the recompute on, every
    such forward was kept alive (the helper's LLaMA repro grew by about 400 MB a dropped step); stock frees it."""
    import copy
    import gc

    _, ours, _ = family_pairs[name]
    model = copy.deepcopy(ours).train()
    model.config.recompute_norm_outputs = True
    batch = batch_for(name, torch.Generator().manual_seed(40))

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())

    model(**batch)  # anything built once (tables, caches) is built before counting
    before = live_tensors()  # (other tests' garbage may go meanwhile: fewer is fine)
    for _ in range(3):
        model(**batch)
    assert live_tensors() <= before


# a weight of a projection that reads a recomputed norm output (a tensor its op saves for backward)
PROJECTION_AFTER_NORM = {
    "llama": "layers.1.mlp.gate_proj.weight",
    "gpt2": "h.1.mlp.c_fc.weight",
    "bloom": "h.1.mlp.dense_h_to_4h.weight",
    "qwen": "h.1.mlp.w1.weight",
    "bart": "encoder.layers.0.fc1.weight",
}


def backward_after_changing(model, batch: dict, name: str):
    """A training forward, then the parameter ending in ``name`` changed in place (an optimizer step or EMA
    update run too early), then backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    weight = next(param for key, param in model.named_parameters() if key.endswith(name))
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        loss.backward()
    finally:
        with torch.no_grad():
            weight.div_(1.5)


# a parameter of a norm whose output is recomputed: the bias where the norm has one (nothing in ours saves it)
RECOMPUTED_NORM_PARAMETER = {
    "llama": "layers.1.post_attention_layernorm.weight",
    "gpt2": "h.1.ln_2.bias",
    "bloom": "h.1.post_attention_layernorm.bias",
    "qwen": "h.1.ln_2.weight",
    "bart": "encoder.layers.0.self_attn_layer_norm.bias",
}


@pytest.mark.parametrize("changed", [PROJECTION_AFTER_NORM, RECOMPUTED_NORM_PARAMETER], ids=["projection", "norm"])
@pytest.mark.parametrize("family", list(PROJECTION_AFTER_NORM))
def test_a_saved_weight_changed_in_place_before_backward_is_refused_as_stock(  # noqa: F811
    family, changed, family_pairs, tmp_path  # noqa: F811
):
    """Autograd checks the version of what it saves, not of what saved-tensor hooks return: with the norm outputs
    recomputed, ours ran backward with the changed weight (gradients 3-13% off) where stock raises; and with a
    norm's bias changed, which only the norm's output (not kept) depended on, gradients 40-130% off."""
    model, batch = model_and_batch(family, family_pairs, tmp_path)
    models = [model] if family == "qwen" else [family_pairs[family][0], model]
    for each in models:
        with recompute_set(model.config, True), pytest.raises(RuntimeError, match="modified by an inplace operation"):
            backward_after_changing(each, batch, changed[family])
    with recompute_set(model.config, True):
        assert recomputed_norms(model) > 0 and not any(norm_outputs_kept(model, family, batch))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_a_frozen_norm_changed_in_place_before_backward_changes_nothing_as_in_stock(family, family_pairs):  # noqa: F811
    """With only the MLPs trained, a norm records no graph and stock keeps its output: a norm parameter changed
    before backward changes nothing. Ours recomputed that output (and then refused the changed parameter), keeping
    the norm's input instead, which saves nothing there."""
    name = RECOMPUTED_NORM_PARAMETER[family].replace("1.", "0.", 1)  # the first layer's: its input needs no gradient
    grads = []
    for model in (copy.deepcopy(family_pairs[family][0]), copy.deepcopy(family_pairs[family][1])):
        model.config.recompute_norm_outputs = True
        for key, param in model.named_parameters():
            param.requires_grad_(".mlp." in key)
        backward_after_changing(model, batch_for(family, torch.Generator().manual_seed(7)), name)
        grads.append({key: param.grad for key, param in model.named_parameters() if param.grad is not None})
    expected, got = grads
    assert got.keys() == expected.keys() and expected
    for key, grad in expected.items():
        assert_close_rel(got[key], grad, 1e-5, f"grad of {key}")


def test_a_step_under_disabled_saved_tensor_hooks_keeps_its_norm_outputs(family_pairs):  # noqa: F811
    """``disable_saved_tensors_hooks`` refuses every hook set inside it: ours set its own and failed with the
    caller's message, where stock runs."""
    model = family_pairs["llama"][1]
    batch = batch_for("llama", torch.Generator().manual_seed(11))
    with recompute_set(model.config, True):
        expected = loss_and_grads(model, batch)
        with torch.autograd.graph.disable_saved_tensors_hooks("this step takes no saved-tensor hooks"):
            assert all(norm_outputs_kept(model, "llama", batch))
            got = loss_and_grads(model, batch)
    assert_identical_steps(got, expected)
