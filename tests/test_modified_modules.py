"""Models changed after loading, the same way on both sides: the fused ops compute a module from its weights
only while it is the plain module they assume, and every other change runs as in stock. Quantized weights in a
bare ``nn.Linear`` (torchao's tensor subclasses), a parametrized LM head (spectral norm), hooks for every
module, replaced or hooked activations, GPT-2 position tables with options or wrappers, and blocks dropped or
repeated (Qwen keeps a cache per place in its stack, as the original does; BLOOM refuses a block run twice),
blocks wrapped by the user, MLPs ablated under sequence tiles, and attention sharded as tensor parallelism does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from remote_code import assert_close_rel, first_row_direction
from test_fused_models import TOL, assert_same_training_step, batch_for, family_pairs  # noqa: F401 - a fixture
from transformers import LlamaConfig

from memory_efficient_adapter.configuration_qwen import QWenConfig
from memory_efficient_adapter.modeling_llama import LlamaForCausalLM as OurLlama
from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

MATMULS = {torch.mm, torch.matmul, torch.addmm, torch.Tensor.mm, torch.Tensor.matmul, torch.Tensor.addmm_,
           torch.Tensor.addmm, torch.Tensor.__matmul__}


class LinearOnlyWeight(torch.Tensor):
    """A frozen weight that, like torchao's quantized tensors, runs ``F.linear`` and no other matmul."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            return F.linear(x, weight.as_subclass(torch.Tensor), *rest, **kwargs)
        if func in MATMULS:
            raise NotImplementedError(f"LinearOnlyWeight runs F.linear only, not {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs)


class LookupOnlyWeight(torch.Tensor):
    """A frozen table that, like torchao's quantized tensors, runs ``F.embedding`` and no slicing."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            ids, weight, *rest = args
            return F.embedding(ids, weight.as_subclass(torch.Tensor), *rest, **kwargs)
        if func is torch.Tensor.__getitem__:
            raise NotImplementedError("LookupOnlyWeight runs F.embedding only, not slicing")
        return super().__torch_function__(func, types, args, kwargs)


class StoragelessWeight(torch.Tensor):
    """A frozen weight with no storage of its own (a wrapper around a plain tensor), as optimum-quanto's
    quantized weights are."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.t.default):  # stay wrapped, as quanto's do
            return StoragelessWeight(func(args[0].inner))
        unwrap = lambda value: value.inner if isinstance(value, StoragelessWeight) else value  # noqa: E731
        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


def pair_copy(family_pairs, name: str) -> tuple:
    stock, ours, _ = family_pairs[name]
    return copy.deepcopy(stock), copy.deepcopy(ours)


def modify_both(pair: tuple, change) -> tuple:
    for model in pair:
        change(model)
    return pair


def linear_only(module: torch.nn.Linear) -> None:
    module.weight = torch.nn.Parameter(module.weight.detach().clone().as_subclass(LinearOnlyWeight), requires_grad=False)


QUANTIZED = {
    "llama": ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.0.mlp.down_proj"],
    "bloom": ["transformer.h.0.mlp.dense_4h_to_h", "transformer.h.1.self_attention.query_key_value"],
    "bart": ["model.decoder.layers.1.fc2", "model.encoder.layers.0.self_attn.k_proj"],
}


@pytest.mark.parametrize("name, module", [(name, module) for name, modules in QUANTIZED.items() for module in modules])
def test_a_quantized_weight_in_a_bare_linear_keeps_the_stock_call(family_pairs, name, module):
    """The fused ops' backward multiplies by the weight itself, which such a tensor cannot do (torchao's
    int8/NF4 weights raised, or silently multiplied by the transpose): the module is called as stock calls it."""
    stock, ours = modify_both(pair_copy(family_pairs, name), lambda model: linear_only(model.get_submodule(module)))
    batch = batch_for(name, torch.Generator().manual_seed(11))
    assert_same_training_step(stock, ours, batch)


class TokenShift(torch.nn.Module):
    """A user's module around a layer's MLP that mixes each token with the one before it in its row."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden, *args, **kwargs):
        output = self.mlp(hidden, *args, **kwargs)
        return output + 0.5 * F.pad(hidden, (0, 0, 1, 0))[:, :-1]


MLP_PATHS = {"llama": ("model.layers", "mlp"), "gpt2": ("transformer.h", "mlp"), "bloom": ("transformer.h", "mlp")}


@pytest.mark.parametrize("name", list(MLP_PATHS))
def test_a_users_token_mixing_module_in_the_layers_keeps_the_padded_rows(family_pairs, name):
    """Packed into one row, a padded batch's rows would meet in a module of the user's that mixes tokens (here
    row 1's first token took row 0's last): a module of a kind the file does not know keeps the rows."""
    layers_path, attribute = MLP_PATHS[name]

    def shift_tokens(model):
        for layer in model.get_submodule(layers_path):
            setattr(layer, attribute, TokenShift(getattr(layer, attribute)))

    stock, ours = modify_both(pair_copy(family_pairs, name), shift_tokens)
    batch = batch_for(name, torch.Generator().manual_seed(13))
    assert_same_training_step(stock, ours, batch)


def steer_first_row(module, args, output):
    """A user's hook that treats the rows apart: a direction added to the first row's hidden states only."""
    hidden = output[0] if isinstance(output, tuple) else output
    steered = hidden + first_row_direction(hidden)
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


def edit_first_rows_gradient(module, grad_input, grad_output):
    """A user's backward hook that treats the rows apart: the first row's input gradient edited."""
    return (grad_input[0] + 0.3 * first_row_direction(grad_input[0]), *grad_input[1:])


class FirstRowSteering:
    """A user's hook object; its ``func`` attribute is not a ``functools.partial``'s function."""

    func = torch.nn.functional.linear

    def __call__(self, module, args, output):
        return steer_first_row(module, args, output)


def steer_through_the_instances_forward(layer) -> None:
    """A user's wrapper set as the layer's ``forward`` (a steering recipe), not a hook."""
    forward = layer.forward

    def steered(*args, **kwargs):
        return steer_first_row(layer, args, forward(*args, **kwargs))

    layer.forward = steered


ROW_TREATING_CODE = {
    "forward hook": lambda layer: layer.register_forward_hook(steer_first_row),
    "hook object with func": lambda layer: layer.register_forward_hook(FirstRowSteering()),
    "backward hook": lambda layer: layer.register_full_backward_hook(edit_first_rows_gradient),
    "backward pre-hook": lambda layer: layer.register_full_backward_pre_hook(
        lambda module, grad_output: (grad_output[0] * (1.0 + first_row_direction(grad_output[0]).abs()),
                                     *grad_output[1:])
    ),
    "forward set on the instance": steer_through_the_instances_forward,
}


@pytest.mark.parametrize("code", list(ROW_TREATING_CODE))
@pytest.mark.parametrize("name", list(MLP_PATHS))
def test_a_users_code_that_treats_rows_apart_keeps_the_padded_rows(family_pairs, name, code):
    """Packed into one row, a padded batch's rows met a user's hook on a layer as one row: a hook steering the
    first row steered every row (LLaMA's loss 3.4e-2 off), a backward hook editing the first row's gradient
    edited every row's (24-64% off). Hooks and a ``forward`` set on a module, defined outside the known
    packages, keep the rows."""
    layers_path, _ = MLP_PATHS[name]
    stock, ours = pair_copy(family_pairs, name)
    for model in (stock, ours):
        ROW_TREATING_CODE[code](model.get_submodule(layers_path)[0])
    batch = batch_for(name, torch.Generator().manual_seed(15))
    assert_same_training_step(stock, ours, batch)


def ablate_channels_in_place(module, args, output):
    """An interpretability hook that zeroes some channels of a module's output in place."""
    (output if isinstance(output, torch.Tensor) else output[0])[..., :8] = 0  # a tuple or a ModelOutput


@pytest.mark.parametrize("where,options", [("transformer.h.0.mlp", {}), ("transformer", {"sequence_tile_size": 4})],
                         ids=["mlp", "base model, tiled"])
def test_a_hook_editing_an_output_in_place_trains_as_stock(family_pairs, where, options):
    """The fused MLP's output (F.linear with a bias: a view of its 2-D matmul) and the tiles' output (a view of
    their flat buffer) came out of autograd Functions as views, which refuse in-place edits: stock's are tensors
    of their own."""
    stock, ours = pair_copy(family_pairs, "gpt2")
    for name, value in options.items():
        setattr(ours.config, name, value)
    for model in (stock, ours):
        model.get_submodule(where).register_forward_hook(ablate_channels_in_place)
    assert_same_training_step(stock, ours, batch_for("gpt2", torch.Generator().manual_seed(16)))


def test_a_pre_hook_on_llamas_rotary_module_finds_the_positions_by_keyword(family_pairs):
    """Stock calls ``rotary_emb(hidden_states, position_ids=...)``; ours passed the positions by place, so a
    pre-hook with keywords that rescales them (position interpolation) failed with a KeyError."""

    def halve_positions(module, args, kwargs):
        return args, {**kwargs, "position_ids": kwargs["position_ids"] // 2}

    stock, ours = pair_copy(family_pairs, "llama")
    for model in (stock, ours):
        model.model.rotary_emb.register_forward_pre_hook(halve_positions, with_kwargs=True)
    assert_same_training_step(stock, ours, batch_for("llama", torch.Generator().manual_seed(17)))


def remove_head(model, name: str, head: int = 1) -> None:
    """Head ``head`` of every layer's self-attention removed by hand, as stock 4.x's ``prune_heads`` did."""
    layers = model.transformer.h
    for layer in layers:
        attention = layer.attn if name == "gpt2" else layer.self_attention
        heads, width = attention.num_heads, attention.head_dim
        kept_heads = [index for index in range(heads) if index != head]
        if name == "gpt2":  # Conv1D: weight [in, out]; c_attn's columns are q | k | v, each heads x head_dim
            columns = torch.tensor([part * heads * width + index * width + offset for part in range(3)
                                    for index in kept_heads for offset in range(width)])
            rows = columns[: len(columns) // 3]
            attention.c_attn.weight = torch.nn.Parameter(attention.c_attn.weight.detach()[:, columns].clone())
            attention.c_attn.bias = torch.nn.Parameter(attention.c_attn.bias.detach()[columns].clone())
            attention.c_attn.nf = len(columns)  # Conv1D's output width
            attention.c_proj.weight = torch.nn.Parameter(attention.c_proj.weight.detach()[rows].clone())
            attention.split_size = len(rows)
        else:  # Linear: query_key_value's rows are per head [q, k, v], each head_dim
            rows = torch.tensor([index * 3 * width + offset for index in kept_heads for offset in range(3 * width)])
            columns = torch.tensor([index * width + offset for index in kept_heads for offset in range(width)])
            qkv = attention.query_key_value
            qkv.weight = torch.nn.Parameter(qkv.weight.detach()[rows].clone())
            qkv.bias = torch.nn.Parameter(qkv.bias.detach()[rows].clone())
            attention.dense.weight = torch.nn.Parameter(attention.dense.weight.detach()[:, columns].clone())
        attention.num_heads = heads - 1
    if name == "bloom":
        model.transformer.num_heads -= 1  # the ALiBi slopes


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_attention_heads_removed_by_hand_train_as_stock(family_pairs, name):
    """Stock splits and merges the heads by ``split_size`` / ``num_heads * head_dim``; ours used the hidden size."""
    stock, ours = modify_both(pair_copy(family_pairs, name), lambda model: remove_head(model, name))
    batch = batch_for(name, torch.Generator().manual_seed(14))
    assert_same_training_step(stock, ours, batch)


def test_a_spectral_norm_head_computes_its_weight_once_per_forward(family_pairs):
    """A parametrized head's weight is read once, as its one stock call reads it: spectral norm's power
    iteration steps once per forward (called per chunk it stepped per chunk, and again in backward)."""

    def spectral_norm_head(model):
        torch.manual_seed(5)  # the power iteration's random start, and its steps at registration (train mode)
        torch.nn.utils.parametrizations.spectral_norm(model.train().lm_head)

    stock, ours = modify_both(pair_copy(family_pairs, "llama"), spectral_norm_head)
    for step in range(2):
        batch = batch_for("llama", torch.Generator().manual_seed(12 + step))
        assert_same_training_step(stock, ours, batch)
        vectors = [model.lm_head.parametrizations.weight[0]._u for model in (stock, ours)]
        assert_close_rel(vectors[1], vectors[0], TOL, f"power-iteration vector after step {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("parametrization", ["spectral_norm", "weight_norm"])
def test_a_parametrized_head_computes_its_weight_once_per_forward_in_any_dtype(family_pairs, parametrization, dtype):
    """A float16 head once went to checkpointed chunks, which called the head per chunk and again in backward,
    so the parametrization ran once per chunk (spectral norm's power iteration stepped each time); the dtype
    check crashed on weight norm (no ``original``)."""
    stock, ours = pair_copy(family_pairs, "llama")
    for model in (stock, ours):
        torch.manual_seed(5)
        getattr(torch.nn.utils.parametrizations, parametrization)(model.to(dtype).train().lm_head)
        model.config.loss_chunk_size = 4
    batch = batch_for("llama", torch.Generator().manual_seed(19))
    assert_same_training_step(stock, ours, batch, tol=TOL if dtype == torch.float32 else 5e-3)
    if parametrization == "spectral_norm":  # the power iteration's vector after one step each
        assert torch.equal(ours.lm_head.parametrizations.weight[0]._u, stock.lm_head.parametrizations.weight[0]._u)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart"])
def test_hooks_for_every_module_see_stock_calls_and_change_outputs_as_in_stock(family_pairs, name):
    stock, ours = pair_copy(family_pairs, name)
    calls = []

    def scale_linear_outputs(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            calls.append(module)
            return output * 1.1
        return output

    handle = torch.nn.modules.module.register_module_forward_hook(scale_linear_outputs)
    try:
        batch = batch_for(name, torch.Generator().manual_seed(13))
        counts = []
        for model in (stock, ours):
            calls.clear()
            model.train()
            model(**batch).loss.backward()
            counts.append(len(calls))
        assert counts[1] == counts[0] > 0
        assert_same_training_step(stock, ours, batch)
    finally:
        handle.remove()


ACTIVATIONS = {
    "llama": lambda model: [layer.mlp for layer in model.model.layers],
    "gpt2": lambda model: [block.mlp for block in model.transformer.h],
    "bloom": lambda model: [block.mlp for block in model.transformer.h],
    "bart": lambda model: [*model.model.encoder.layers, *model.model.decoder.layers],
}
ACTIVATION_SLOT = {"llama": "act_fn", "gpt2": "act", "bloom": "gelu_impl", "bart": "activation_fn"}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_a_replaced_activation_runs_as_stock_runs_it(family_pairs, name):
    """``mlp.act_fn = nn.ReLU()`` on both: the fused ops computed the configured activation regardless."""

    def replace(model):
        for owner in ACTIVATIONS[name](model):
            setattr(owner, ACTIVATION_SLOT[name], torch.nn.ReLU())

    stock, ours = modify_both(pair_copy(family_pairs, name), replace)
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(14)))


@pytest.mark.parametrize("tile_size", [0, 4])
def test_a_scripted_activation_trains_as_stock(family_pairs, tile_size):
    """A TorchScript module has no ``_parameters.get``: the check for activation quantizers failed on it in
    every padded training forward and before tiles."""
    stock, ours = pair_copy(family_pairs, "llama")
    for model in (stock, ours):
        for mlp in ACTIVATIONS["llama"](model):
            mlp.act_fn = torch.jit.script(torch.nn.SiLU())
    ours.config.sequence_tile_size = tile_size
    assert_same_training_step(stock, ours, batch_for("llama", torch.Generator().manual_seed(36)))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_a_hooked_activation_sees_every_call_with_stock_inputs(family_pairs, name):
    """An activation-recording hook (interpretability, pruning statistics) gets what stock's gets."""
    stock, ours = pair_copy(family_pairs, name)
    recorded = {}
    for label, model in (("stock", stock), ("ours", ours)):
        recorded[label] = []
        owner = ACTIVATIONS[name](model)[0]
        getattr(owner, ACTIVATION_SLOT[name]).register_forward_hook(
            lambda module, inputs, output, into=recorded[label]: into.append(output.detach())
        )
    batch = batch_for(name, torch.Generator().manual_seed(15))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # unpadded: the same [b, s, d] tensors
    assert_same_training_step(stock, ours, batch)
    assert len(recorded["ours"]) == len(recorded["stock"]) > 0
    for got, expected in zip(recorded["ours"], recorded["stock"]):
        assert_close_rel(got, expected, TOL, f"{name} recorded activation")


def test_bloom_keeps_stock_gelu_module(family_pairs):
    stock, ours, _ = family_pairs["bloom"]
    assert {n for n, _ in stock.named_modules() if n.endswith("gelu_impl")} == {
        n for n, _ in ours.named_modules() if n.endswith("gelu_impl")
    }


@pytest.mark.parametrize(
    "options", [dict(padding_idx=0), dict(max_norm=0.05), dict(scale_grad_by_freq=True)], ids=lambda o: next(iter(o))
)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_gpt2_position_table_options_are_honoured(family_pairs, options, padded):
    """A table with options is looked up as stock looks it up (a slice of its rows ignored them: padding_idx's
    row got a gradient, max_norm's rows were not renormalized; a padded batch run as packed rows counted each
    position once per row that keeps it, where stock looks up one row of positions for the batch)."""
    pair = pair_copy(family_pairs, "gpt2")
    stock, ours = modify_both(pair, lambda model: with_embedding_options(model, "transformer.wpe", options))
    batch = batch_for("gpt2", torch.Generator().manual_seed(16))
    if not padded:  # the positions are a slice of the table
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    assert_same_training_step(stock, ours, batch)
    assert torch.equal(ours.transformer.wpe.weight, stock.transformer.wpe.weight)  # max_norm renormalizes in place


def with_embedding_options(model: torch.nn.Module, name: str, options: dict) -> None:
    """Replaces the embedding ``name`` by one with the same rows and ``options`` (a tied head keeps the tie)."""
    old = model.get_submodule(name)
    table = torch.nn.Embedding(old.num_embeddings, old.embedding_dim, **options)
    table.weight = old.weight
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, table)


@pytest.mark.parametrize("options", [dict(max_norm=1.0), dict(scale_grad_by_freq=True)], ids=lambda o: next(iter(o)))
@pytest.mark.parametrize("name", ["llama_tied", "gpt2", "bloom"])
def test_input_embedding_options_that_act_on_the_whole_batch_see_its_padding_as_in_stock(family_pairs, name, options):
    """``max_norm`` renormalizes every row looked up (padding's ids too) and ``scale_grad_by_freq`` counts ids over
    the whole batch: a padded batch run as packed rows of its kept tokens gave other gradients (and, tied, another
    loss), so such a model keeps its padded rows."""
    stock, ours = pair_copy(family_pairs, name)
    batch = batch_for(name, torch.Generator().manual_seed(18))
    if "max_norm" in options:  # an id only the padding uses: stock renormalizes its row, packed rows did not
        pad_id = next(i for i in range(3, 1000) if not (batch["input_ids"] == i).any())
    else:  # a real token of row 0 is also the padding of row 1: stock counts it there too
        pad_id = int(batch["input_ids"][0, 3])
    batch["input_ids"][1] = batch["input_ids"][1].masked_fill(batch["attention_mask"][1] == 0, pad_id)
    for model in (stock, ours):
        with torch.no_grad():  # rows of norm above max_norm, the padding's among them
            model.get_input_embeddings().weight.mul_(3.0)
        with_embedding_options(model, embedding_name(model), options)
    assert_same_training_step(stock, ours, batch)
    assert torch.equal(ours.get_input_embeddings().weight, stock.get_input_embeddings().weight)


def embedding_name(model: torch.nn.Module) -> str:
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings)


def test_gpt2_with_lora_on_its_position_table_runs_as_stock(family_pairs):
    """PEFT's LoRA embedding has no ``num_embeddings``: our position check read it and raised."""
    peft = pytest.importorskip("peft")
    stock, ours = pair_copy(family_pairs, "gpt2")
    config = dict(target_modules=["wpe"], r=2, lora_alpha=4, init_lora_weights=False)
    torch.manual_seed(3)
    stock = peft.get_peft_model(stock, peft.LoraConfig(**config))
    torch.manual_seed(3)
    ours = peft.get_peft_model(ours, peft.LoraConfig(**config))
    batch = batch_for("gpt2", torch.Generator().manual_seed(17))
    assert_same_training_step(stock, ours, batch)


# ----------------------------------------------------------------------------------------------
# Blocks dropped, reordered or repeated
# ----------------------------------------------------------------------------------------------


def qwen_with_blocks(order: list, share: bool) -> tuple:
    """A Qwen whose stack is ``order`` (indices into the built blocks; ``share``: repeats are one module) and
    the same model with a deep copy per place, each numbered by its place."""
    torch.manual_seed(0)
    model = QWenLMHeadModel(QWenConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       kv_channels=8, intermediate_size=48, seq_length=64, fp32=True)).eval()
    blocks = list(model.transformer.h)
    renumbered = copy.deepcopy(model)
    copies = [copy.deepcopy(blocks[i]) for i in order]
    for place, block in enumerate(copies):
        block.layer_idx = block.attn.layer_idx = place
    renumbered.transformer.h = torch.nn.ModuleList(copies)
    model.transformer.h = torch.nn.ModuleList([blocks[i] if share else copy.deepcopy(blocks[i]) for i in order])
    for changed in (model, renumbered):
        changed.config.num_hidden_layers = len(order)
    return model, renumbered


@pytest.mark.parametrize("order, share", [([1, 2], False), ([0, 1, 1, 2], True), ([2, 0, 1], False)],
                         ids=["drop-first", "repeat-shared", "reorder"])
def test_qwen_blocks_changed_after_loading_keep_a_cache_each_as_in_the_original(order, share):
    """The original walks its cache list with its blocks; ours picked a block's cache layer by the index it was
    built with: dropping block 0 broke decoding, a repeated block wrote one layer twice."""
    model, renumbered = qwen_with_blocks(order, share)
    ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(18))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = renumbered.generate(ids, use_cache=False, **settings)
    assert torch.equal(model.generate(ids, **settings), expected)
    assert torch.equal(model.generate(ids, use_cache=False, **settings), expected)
    with torch.no_grad():
        assert_close_rel(model(ids, attention_mask=mask).logits[mask.bool()],
                         renumbered(ids, attention_mask=mask, use_cache=False).logits[mask.bool()], TOL, "logits")


def test_bloom_block_run_twice_with_a_cache_is_refused_by_name(family_pairs):
    """Both places write the one cache layer: the second attended to the first one's keys (stock fails on the
    mask's size)."""
    _, ours = pair_copy(family_pairs, "bloom")
    blocks = ours.transformer.h
    ours.transformer.h = torch.nn.ModuleList([blocks[0], blocks[1], blocks[1]])
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(19))
    with torch.no_grad(), pytest.raises(ValueError, match="ran twice in one forward"):
        ours.eval()(ids, use_cache=True)


def test_llama_with_an_odd_head_size_is_refused_by_name():
    """RoPE turns channel pairs: stock 5.x builds one with head_dim 1 and broadcasts q/k to two channels."""
    config = LlamaConfig(vocab_size=97, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=1,
                         intermediate_size=32, num_hidden_layers=1)
    with pytest.raises(ValueError, match="head_dim must be even, got 1"):
        OurLlama(config)


# ----------------------------------------------------------------------------------------------
# Hooks that interpretability and steering code registers
# ----------------------------------------------------------------------------------------------

BACKWARD_HOOKED = {
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.act_fn",
              "model.layers.1.input_layernorm"],
    "gpt2": ["transformer.wpe", "transformer.h.0.ln_1", "transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.act"],
    "bloom": ["transformer.h.0.input_layernorm", "transformer.h.1.mlp.dense_4h_to_h", "transformer.h.0.mlp.gelu_impl"],
    "bart": ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.encoder_attn.k_proj",
             "model.encoder.layers.1.fc2"],
}


@pytest.mark.parametrize("name, module", [(name, m) for name, modules in BACKWARD_HOOKED.items() for m in modules])
def test_a_backward_hook_that_scales_gradients_acts_as_in_stock(family_pairs, name, module):
    """The fused ops computed these modules without calling them: their backward hooks never ran."""
    stock, ours = pair_copy(family_pairs, name)
    calls = []
    for model in (stock, ours):
        model.get_submodule(module).register_full_backward_pre_hook(
            lambda mod, grad_output: calls.append(mod) or tuple(None if g is None else 0.5 * g for g in grad_output)
        )
    batch = batch_for(name, torch.Generator().manual_seed(21))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    assert_same_training_step(stock, ours, batch)
    assert len(calls) == 2, "once per backward in each model"


@pytest.mark.parametrize("recompute", [True, None])
def test_a_hooked_norm_is_not_run_again_in_backward(family_pairs, recompute):
    """Recomputing a norm's output in backward called the module a second time, hooks included (a noise hook
    then gave other gradients)."""
    stock, ours = pair_copy(family_pairs, "llama")
    ours.config.recompute_norm_outputs = recompute
    calls = {"stock": 0, "ours": 0}
    for label, model in (("stock", stock), ("ours", ours)):
        def count_and_shift(module, inputs, output, label=label):
            calls[label] += 1
            return output + 0.01 * calls[label]

        model.model.layers[0].input_layernorm.register_forward_hook(count_and_shift)
    batch = batch_for("llama", torch.Generator().manual_seed(22))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    assert_same_training_step(stock, ours, batch)
    assert calls["ours"] == calls["stock"] == 1


def test_llama_attention_gets_its_hidden_states_by_keyword_as_in_stock(family_pairs):
    stock, ours = pair_copy(family_pairs, "llama")
    shift = 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(23))
    for model in (stock, ours):
        model.model.layers[1].self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + shift}),
            with_kwargs=True,
        )
    batch = batch_for("llama", torch.Generator().manual_seed(24))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    assert_same_training_step(stock, ours, batch)


def test_bloom_blocks_return_stock_tuples_and_steering_hooks_work(family_pairs):
    """Stock BLOOM's block returns ``(hidden, weights)``: a hook's ``output[0]`` was the first row of ours."""
    stock, ours = pair_copy(family_pairs, "bloom")
    vector = 0.2 * torch.randn(32, generator=torch.Generator().manual_seed(25))
    for model in (stock, ours):
        model.transformer.h[0].register_forward_hook(lambda module, args, output: (output[0] + vector, *output[1:]))
    batch = batch_for("bloom", torch.Generator().manual_seed(26))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    stock.eval(), ours.eval()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits, stock(**batch).logits, TOL, "steered logits")
    assert_same_training_step(stock, ours, batch)


@pytest.mark.parametrize("name", ["bloom", "gpt2"])
def test_attention_dropout_is_a_module_that_trainers_can_turn_off(family_pairs, name):
    """TRL's ``disable_dropout_in_model`` sets ``p = 0`` on every ``nn.Dropout``: BLOOM's attention dropout was
    a float in ours, so it stayed on."""
    stock, ours = pair_copy(family_pairs, name)
    for model in (stock, ours):
        model.config.attention_dropout = model.config.attn_pdrop = 0.4
    stock, ours = (type(model)(model.config).eval() for model in (stock, ours))
    ours.load_state_dict(stock.state_dict())
    for model in (stock, ours):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(27)))


# ----------------------------------------------------------------------------------------------
# PyTorch tools around a model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart"])
def test_gradients_of_gradients_are_refused_by_name(family_pairs, name):
    """The fused norms', loss's and chunked attention's backward is not differentiable: a Hessian-vector
    product or gradient penalty came out silently wrong (0.3 to 1.1 relative off)."""
    _, ours = pair_copy(family_pairs, name)
    batch = batch_for(name, torch.Generator().manual_seed(28))
    ours.train()
    parameters = [p for p in ours.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="gradients of gradients"):
        torch.autograd.grad(ours(**batch).loss, parameters, create_graph=True)


@pytest.mark.parametrize("name", ["llama", "bloom", "gpt2"])
def test_a_meta_device_forward_gives_stock_shapes(family_pairs, name):
    """Shape inference on the meta device: ours asked autocast about the meta device, which it refuses."""
    shapes = []
    for model in pair_copy(family_pairs, name):
        ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(29))
        model = model.to("meta").eval()
        with torch.no_grad():
            shapes.append(model(input_ids=ids.to("meta")).logits.shape)
    assert shapes[1] == shapes[0]


def test_bloom_slopes_made_under_fake_tensor_mode_are_not_kept_for_real_steps(family_pairs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    stock, ours = pair_copy(family_pairs, "bloom")
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(30))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_model = copy.deepcopy(ours)
        fake_ids = mode.from_tensor(ids)
        assert fake_model(input_ids=fake_ids).logits.shape == (2, 5, 97)
    assert_same_training_step(stock, ours, dict(input_ids=ids, labels=ids))


def test_bart_position_embeddings_take_stock_arguments_and_give_stock_shapes(family_pairs):
    """Ours took ``(seq_len, past_len)`` and gave ``[seq, dim]``: a hook ablating position 0 (``out[:, 0]``)
    zeroed a feature instead, and a direct call with input ids failed."""
    stock, ours = pair_copy(family_pairs, "bart")
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(32))
    for model in (stock, ours):
        assert model.model.encoder.embed_positions(ids).shape == (2, 11, 32)

        def ablate_first_position(module, args, output):
            output[:, 0] = 0  # in place, as stock's lookup allows: ours handed the hook a view of the table

        model.model.encoder.embed_positions.register_forward_hook(ablate_first_position)
    table = ours.model.encoder.embed_positions.weight.detach().clone()
    batch = batch_for("bart", torch.Generator().manual_seed(33))
    stock.eval(), ours.eval()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits, stock(**batch).logits, TOL, "logits with position 0 ablated")
    assert_same_training_step(stock, ours, batch)
    assert torch.equal(ours.model.encoder.embed_positions.weight, table)  # the hook's edits stayed in its output


def test_bart_position_table_that_only_looks_up_trains_as_stock(family_pairs):
    """A quantized position table (torchao's, which has no slicing) failed: ours read consecutive positions as
    a slice of the table. Such a table is looked up, as stock does."""
    stock, ours = pair_copy(family_pairs, "bart")
    for model in (stock, ours):
        for stack in (model.model.encoder, model.model.decoder):
            table = stack.embed_positions
            table.weight = torch.nn.Parameter(table.weight.detach().clone().as_subclass(LookupOnlyWeight), False)
    assert_same_training_step(stock, ours, batch_for("bart", torch.Generator().manual_seed(34)))


@pytest.mark.parametrize("name", ["llama", "bloom", "bart"])
def test_weights_without_storage_train_with_norm_outputs_recomputed(family_pairs, name):
    """The recompute's saved-tensor hook read the storage of every tensor saved while a norm's output was in
    use: a weight without one (optimum-quanto's) failed there, with ``recompute_norm_outputs`` or a norm output
    of 16 MiB."""
    stock, ours = pair_copy(family_pairs, name)
    for model in (stock, ours):
        for module in model.modules():
            if type(module) is torch.nn.Linear and module is not model.get_output_embeddings():
                module.weight = torch.nn.Parameter(StoragelessWeight(module.weight.detach().clone()), False)
    ours.config.recompute_norm_outputs = True
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(35)))


def test_continuous_batching_keywords_are_refused_by_name():
    """``generate_batch`` hands the model ``cu_seq_lens`` per layer type: an internal message before (which
    transformers only logs, returning empty generations)."""
    from memory_efficient_adapter.attention import packed_documents

    per_layer_type = {"full_attention": torch.tensor([0, 3, 5], dtype=torch.int32)}
    with pytest.raises(NotImplementedError, match="continuous batching"):
        packed_documents(1, 5, "cpu", None, None, None, cu_seq_lens_q=per_layer_type, cu_seq_lens_k=per_layer_type)


def test_qwen_attention_dropout_is_the_original_module_that_trainers_turn_off():
    torch.manual_seed(0)
    model = QWenLMHeadModel(QWenConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       kv_channels=8, intermediate_size=48, seq_length=64, fp32=True,
                                       attn_dropout_prob=0.4)).train()
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(34))
    assert model(ids, labels=ids).loss != model(ids, labels=ids).loss, "dropout on"
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert isinstance(model.transformer.h[0].attn.attn_dropout, torch.nn.Dropout)
    assert model(ids, labels=ids).loss == model(ids, labels=ids).loss, "every dropout off"


PER_ROW_ADAPTERS = {  # PEFT methods whose forward pre-hooks carry per-row state
    "mixed adapter batch": ("eval", lambda peft: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "c_attn",
                            "query_key_value"], init_lora_weights=False), {"use_cache": False}),
    "aLoRA": ("train", lambda peft: peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False,
              target_modules=["q_proj", "v_proj", "c_attn", "query_key_value"], alora_invocation_tokens=[5, 6]), {}),
    "Poly": ("eval", lambda peft: peft.PolyConfig(task_type="CAUSAL_LM", r=4, n_tasks=2, n_skills=2,
             target_modules=["q_proj", "v_proj", "query_key_value"]),
             {"task_ids": torch.tensor([0, 1]), "use_cache": False}),
}


@pytest.mark.parametrize(  # Poly draws router noise in training, and takes no Conv1D (GPT-2)
    "name, case", [(name, case) for name in ("llama", "gpt2", "bloom") for case in PER_ROW_ADAPTERS
                   if not (case == "Poly" and name == "gpt2")]
)
def test_peft_methods_with_per_row_state_keep_a_padded_batch_in_its_rows(family_pairs, name, case):
    """Their hooks hold ``[batch]`` or ``[batch, seq]`` state (adapter names per row, aLoRA's offsets, Poly's task
    ids), which a padded batch packed into one row mismatched: every such forward raised."""
    peft = pytest.importorskip("peft")
    mode, make_config, options = PER_ROW_ADAPTERS[case]
    batch = batch_for(name, torch.Generator().manual_seed(35))
    batch["input_ids"][:, 6:8] = torch.tensor([5, 6])  # aLoRA's invocation tokens
    models = []
    for model in pair_copy(family_pairs, name):
        torch.manual_seed(36)
        model = peft.get_peft_model(model, make_config(peft))
        if case == "mixed adapter batch":
            model.add_adapter("other", make_config(peft))
            options = {**options, "adapter_names": ["default", "other"]}
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    if mode == "train":
        assert_same_training_step(*models, batch, **options)
        return
    kept = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = (model.eval()(**batch, **options).logits[kept] for model in models)
    assert_close_rel(got, expected, TOL, f"{case} logits")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_peft_adaption_prompts_wrap_the_attention_as_on_stock(family_pairs, name):
    """PEFT's wrapper calls the attention with stock's keywords (GPT-2's raised a TypeError at every call) and
    reads stock's attribute names."""
    peft = pytest.importorskip("peft")
    models = []
    for model in pair_copy(family_pairs, name):
        torch.manual_seed(37)
        config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2)
        model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1)  # the gates start at 0, which would leave the prompts out
        models.append(model)
    batch = batch_for(name, torch.Generator().manual_seed(38))
    assert_same_training_step(*models, batch)
    prompt = dict(input_ids=batch["input_ids"][:, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected, got = (model.eval().generate(**prompt) for model in models)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_a_wrapped_head_with_a_spectral_norm_inside_is_called_once_as_stock(family_pairs, name):
    """A wrapped head is called per loss chunk; spectral norm inside it steps its power iteration at each call in
    training, so the gradients were not those of the loss computed (4e-3 off at the default chunk size, 2e-2 at
    4 tokens a chunk). Such a head keeps the stock path."""
    stock, ours = pair_copy(family_pairs, name)
    for model in (stock, ours):
        torch.manual_seed(0)  # spectral norm's first vectors (and in eval mode no step when it is put on)
        head = torch.nn.utils.parametrizations.spectral_norm(copy.deepcopy(model.get_output_embeddings()).eval())
        model.set_output_embeddings(torch.nn.Sequential(head))
    ours.config.loss_chunk_size = 4
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(33)))


BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bloom": "transformer.h", "bart": "model.decoder.layers"}
MLPS = {"llama": "mlp", "gpt2": "mlp"}


class AdapterAroundBlock(torch.nn.Module):
    """A block wrapped by the user: a bottleneck adapter added to its hidden states."""

    def __init__(self, block: torch.nn.Module, hidden: int):
        super().__init__()
        self.block = block
        torch.manual_seed(31)
        self.down, self.up = torch.nn.Linear(hidden, 8), torch.nn.Linear(8, hidden)

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden + self.up(F.relu(self.down(hidden)))
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_a_block_wrapped_in_a_module_of_the_users_trains_as_stock(family_pairs, name):
    """GPT-2 read ``gradient_checkpointing`` of every block: a wrapped one made each training forward fail."""
    def wrap_second_block(model):
        blocks = model.get_submodule(BLOCKS[name])
        blocks[1] = AdapterAroundBlock(blocks[1], model.config.hidden_size)

    stock, ours = modify_both(pair_copy(family_pairs, name), wrap_second_block)
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(24)))


class ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class LearnedConstantMLP(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.value = torch.nn.Parameter(torch.linspace(-0.1, 0.2, hidden))

    def forward(self, x):
        return self.value.expand_as(x) * 1.0


@pytest.mark.parametrize("ablation", ["zeros", "learned constant"])
@pytest.mark.parametrize("name", sorted(MLPS))
def test_an_ablated_mlp_trains_with_sequence_tiles_as_stock(family_pairs, name, ablation):
    """An MLP whose output does not depend on its input: the tiles' backward asked autograd for gradients of an
    output that needs none (zeros) or wrote a missing input gradient (a learned constant), and failed."""
    def ablate(model):
        for block in model.get_submodule(BLOCKS[name]):
            hidden = model.config.hidden_size
            setattr(block, MLPS[name], ZeroMLP() if ablation == "zeros" else LearnedConstantMLP(hidden))
        model.config.sequence_tile_size = 4

    stock, ours = modify_both(pair_copy(family_pairs, name), ablate)
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(25)))


def keep_half_the_heads(model) -> None:
    """Every BART attention's projections cut to the first half of its heads, as a tensor-parallel rank holds
    them (column-wise q/k/v, row-wise out_proj)."""
    for module in model.modules():
        if not (hasattr(module, "q_proj") and hasattr(module, "out_proj")):
            continue
        half = module.q_proj.out_features // 2
        for name in ("q_proj", "k_proj", "v_proj"):
            full = getattr(module, name)
            narrow = torch.nn.Linear(full.in_features, half)
            narrow.weight.data, narrow.bias.data = full.weight.data[:half].clone(), full.bias.data[:half].clone()
            setattr(module, name, narrow)
        full = module.out_proj
        narrow = torch.nn.Linear(half, full.out_features)
        narrow.weight.data, narrow.bias.data = full.weight.data[:, :half].clone(), full.bias.data.clone()
        module.out_proj = narrow


def test_bart_attention_counts_its_heads_from_its_projections_as_stock(family_pairs):
    """A tensor-parallel plan for BART (q/k/v column-wise, out_proj row-wise) leaves each rank half the heads;
    ours viewed the projections with the config's head count and failed, stock counts them from the width."""
    stock, ours = modify_both(pair_copy(family_pairs, "bart"), keep_half_the_heads)
    assert_same_training_step(stock, ours, batch_for("bart", torch.Generator().manual_seed(27)))


def test_input_embeddings_that_shard_the_sequence_are_refused_by_name_for_an_unpadded_batch(family_pairs):
    """A sequence-parallel plan (torch's ``RowwiseParallel(output_layouts=Shard(1))`` on the embeddings) hands
    each rank part of the sequence; packing it against the whole padding mask failed with a shape error."""
    ours = pair_copy(family_pairs, "llama")[1]

    def shard_the_sequence(module, args, output):
        return output[:, : output.shape[1] // 2]

    shard_the_sequence.__module__ = "torch.distributed.tensor.parallel.style"  # where the plan's hooks come from
    ours.model.embed_tokens.register_forward_hook(shard_the_sequence)
    with pytest.raises(ValueError, match=r"the input embeddings gave \[2, 6\] .* config.unpad_batches = False"):
        ours.train()(**batch_for("llama", torch.Generator().manual_seed(28)))


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_wrapped_checkpointed_blocks_refuse_to_continue_a_cache_in_training_by_name(family_pairs, name):
    """The refusal looked for checkpointing on the stack's entries only: with each block wrapped, a training
    forward dropped a filled cache silently (the prefix left out; stock fails on a shape mismatch)."""
    ours = pair_copy(family_pairs, name)[1].eval()
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(29))
    with torch.no_grad():
        cache = ours(ids[:, :5], use_cache=True).past_key_values
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = ours.get_submodule(BLOCKS[name])
    for index in range(len(blocks)):
        blocks[index] = AdapterAroundBlock(blocks[index], ours.config.hidden_size)
    with pytest.raises(ValueError, match="cannot continue a cache: its layers run without past_key_values"):
        ours.train()(ids[:, 5:], past_key_values=cache, labels=ids[:, 5:])
