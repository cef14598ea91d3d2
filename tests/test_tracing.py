"""Traced and exported models: static caches (eager and compiled), ``torch.export``, ``torch.onnx`` and
``torch.jit.trace`` give stock's results, and the programs they make hold torch's operators only.
Same weights, same inputs, loaded through trust_remote_code. Runs on transformers 5.x and 4.57.x.
"""

from __future__ import annotations

import pytest
import torch

from remote_code import TRANSFORMERS_5, assert_close_rel
from test_stock_behaviour import (
    GENERATIVE_CLASSES, TOL, VOCAB, assert_weights_match, family_config, stock_and_ours, token_inputs,
)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_static_cache_generation_matches_stock(family, tmp_path):
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = token_inputs(family)
    inputs.pop("decoder_input_ids", None)
    options = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(ours.generate(**inputs, **options), stock.generate(**inputs, **options))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_static_cache_without_a_4d_mask_attends_to_the_written_slots_only(family, tmp_path):
    """A ``StaticCache`` hands back its whole buffer from ``update``, unwritten slots included. Without a 4-D mask
    (none, or a 2-D one; ``generate`` passes none for a prompt without padding) only the written slots count:
    the prefill and a decoding step equal stock's forward without a cache, and so does ``generate``."""
    from transformers import DynamicCache, EncoderDecoderCache, StaticCache

    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = token_inputs(family, batch=2, seq=9)
    prefix = "decoder_" if family == "bart" else ""  # BART: the decoder has the cache; the encoder input stays
    ids = inputs.pop(f"{prefix}input_ids")
    if family != "bart":
        del inputs["attention_mask"]
    with torch.no_grad():
        expected = stock(**inputs, **{f"{prefix}input_ids": ids}, use_cache=False).logits
        for mask in (None, torch.ones_like(ids)):
            cache = StaticCache(config=ours.config, max_cache_len=16)
            cache = EncoderDecoderCache(cache, DynamicCache()) if family == "bart" else cache
            prefill, step = {f"{prefix}input_ids": ids[:, :-1]}, {f"{prefix}input_ids": ids[:, -1:]}
            if mask is not None:
                prefill[f"{prefix}attention_mask"], step[f"{prefix}attention_mask"] = mask[:, :-1], mask
            logits = [ours(**inputs, **call, past_key_values=cache, use_cache=True).logits for call in (prefill, step)]
            assert_close_rel(torch.cat(logits, 1), expected, 1e-5, f"static cache, mask {mask is not None}")
    options = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", pad_token_id=0)
    generate_inputs = inputs if family == "bart" else {"input_ids": ids}
    assert torch.equal(ours.generate(**generate_inputs, **options), stock.generate(**generate_inputs, **options))


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_static_cache_attention_weights_cover_the_whole_cache_like_stock(family, padded, tmp_path):
    """``output_attentions`` over a static cache: stock's weights span the whole buffer (zeros at unwritten
    slots) at the prefill and at every decoding step, where ours attend to the written slots only."""
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = token_inputs(family, batch=1, seq=5)
    inputs.pop("decoder_input_ids", None)
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    options = dict(
        max_new_tokens=3, do_sample=False, cache_implementation="static", pad_token_id=0, output_attentions=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    expected, actual = stock.generate(**inputs, **options), ours.generate(**inputs, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    name = "decoder_attentions" if family == "bart" else "attentions"
    assert len(getattr(actual, name)) == len(getattr(expected, name)) == 3
    prompt_rows = inputs["attention_mask"] if family != "bart" else None  # stock's rows of padding are arbitrary
    for step, (ours_step, stock_step) in enumerate(zip(getattr(actual, name), getattr(expected, name))):
        assert_weights_match(ours_step, stock_step, prompt_rows, f"{family} step {step}")


@pytest.mark.skipif(not TRANSFORMERS_5, reason="CompileConfig's all-device switch is transformers 5's")
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
@pytest.mark.parametrize(
    "device, rows",
    [("cpu", "padded"), pytest.param("cuda", "padded", marks=pytest.mark.gpu), pytest.param("cuda", "one", marks=pytest.mark.gpu)],
)
def test_fullgraph_compiled_static_generation_matches_stock(family, device, rows, tmp_path):
    """``generate`` compiles the forward with ``fullgraph=True`` for a static cache (dynamo only, so that it
    runs without a C++ compiler): no graph break, no data-dependent branch on the decoding path, and one graph
    for every decoding step. More steps than dynamo's recompile limit are decoded: an input whose shape grew
    with each token (BLOOM's 2-D mask did) would recompile per step and then fail. On CUDA with an unpadded row
    too (``generate`` drops its all-ones mask): the kernel layer's CUDA paths, and the GPU machine's older torch,
    whose dynamo broke the graph where ours asked a cache for a method with ``getattr(...) or``."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    stock, ours = stock.to(device), ours.to(device)
    inputs = {name: tensor.to(device) for name, tensor in token_inputs(family, batch=2 if rows == "padded" else 1).items()}
    inputs.pop("decoder_input_ids", None)
    if rows == "one":
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True
    recompile_limit = 8  # dynamo's default (other tests may raise it in this process)
    new_tokens = recompile_limit + 4
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=recompile_limit):
        actual = ours.generate(**inputs, **options, compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] == 1, f"decoding compiled {counters['stats']['unique_graphs']} graphs"
    assert torch.equal(actual, stock.generate(**inputs, **options))


def compile_forward(model) -> None:
    """``model.forward = torch.compile(model.forward)`` as transformers' docs do it (dynamo only, whole graph)."""
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=False, fullgraph=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_compiled_forward_with_a_static_cache_generates_stocks_logits(family, tmp_path):
    """``model.forward = torch.compile(model.forward)`` with a static cache (transformers' documented recipe)
    traces the prefill too. One row comes without a mask (``generate`` drops an all-ones one; before transformers
    5.x BART's decoder gets none), where the filled slots cannot be counted: the layers saw the unwritten ones
    (logits up to 1.7x off), caches before transformers 5.4 were written where no position was given, and BLOOM
    counted them on the host (a graph break and a recompile per token). A padded batch's mask says it (BLOOM's,
    which ``generate`` pads to the cache's length: ``test_bloom.py``)."""
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = token_inputs(family, batch=1)
    inputs.pop("decoder_input_ids", None)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = stock.generate(**inputs, **options)
    compile_forward(ours)
    try:
        actual = ours.generate(**inputs, **options, cache_implementation="static")
    finally:
        del ours.forward
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close_rel(got, want, 1e-5, f"{family} logits of step {step}")


@pytest.mark.skipif(not TRANSFORMERS_5, reason="static caches that track their own writes: transformers 5")
@pytest.mark.parametrize(
    "family, compiled", [("llama", False), ("gpt2", False), ("llama", True)], ids=["eager-llama", "eager-gpt2", "compiled"]
)
def test_steps_into_a_static_cache_take_a_2d_mask_as_long_as_the_cache(family, compiled, tmp_path):
    """A 2-D mask padded to the static cache's length, as stock pads it: traced, its length was taken for the
    count of filled slots, so the queries were aligned with the end of the buffer and prompt tokens saw later ones
    (prefill logits up to 0.94 off, no error); eager calls refused it."""
    from transformers import StaticCache

    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path, stock_attn="sdpa")
    inputs = token_inputs(family)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    step = torch.randint(3, VOCAB, (ids.shape[0], 1), generator=torch.Generator().manual_seed(5))

    def prefill_and_step(model):
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 5)
        padded = torch.nn.functional.pad(mask, (0, 5))
        prefill = model(input_ids=ids, attention_mask=padded, position_ids=positions, past_key_values=cache).logits
        padded[:, ids.shape[1]] = 1
        decode = model(input_ids=step, attention_mask=padded, position_ids=positions[:, -1:] + 1, past_key_values=cache)
        return prefill, decode.logits

    with torch.no_grad():
        expected = prefill_and_step(stock)
        if compiled:
            compile_forward(ours)
        actual = prefill_and_step(ours)
    kept = mask.bool()
    assert_close_rel(actual[0][kept], expected[0][kept], 1e-5, f"{family} prefill logits")
    assert_close_rel(actual[1], expected[1], 1e-5, f"{family} decoding step's logits")


@pytest.mark.skipif(not TRANSFORMERS_5, reason="static caches that track their own writes: transformers 5")
def test_compiled_steps_into_a_static_cache_take_a_4d_mask_without_positions(tmp_path):
    """A 4-D mask in transformers' static-cache layout and neither ``cache_position`` nor ``position_ids``: the
    positions came from a data-dependent ``arange`` of the cache's count, which the compiled graph cannot size
    (dynamo failed where stock compiles); before transformers 5.4 the caches also wrote such calls at 0."""
    from transformers import StaticCache

    stock, ours = stock_and_ours("llama", GENERATIVE_CLASSES["llama"], tmp_path, stock_attn="sdpa")
    inputs = token_inputs("llama")
    ids, slots = inputs["input_ids"], inputs["input_ids"].shape[1] + 3
    kept = torch.nn.functional.pad(inputs["attention_mask"], (0, 3), value=1).bool()
    step = torch.randint(3, VOCAB, (ids.shape[0], 1), generator=torch.Generator().manual_seed(5))

    def four_d(first: int, count: int) -> torch.Tensor:
        visible = torch.arange(slots)[None, :] <= torch.arange(first, first + count)[:, None]
        return kept[:, None, None, :] & visible

    def prefill_and_step(model):
        cache = StaticCache(config=model.config, max_cache_len=slots)
        prefill = model(input_ids=ids, attention_mask=four_d(0, ids.shape[1]), past_key_values=cache).logits
        return prefill, model(input_ids=step, attention_mask=four_d(ids.shape[1], 1), past_key_values=cache).logits

    with torch.no_grad():
        expected = prefill_and_step(stock)
        compile_forward(ours)
        actual = prefill_and_step(ours)
    rows = inputs["attention_mask"].bool()
    assert_close_rel(actual[0][rows], expected[0][rows], 1e-5, "prefill logits")
    assert_close_rel(actual[1], expected[1], 1e-5, "decoding step's logits")



@pytest.mark.parametrize("family", ["llama", "bart"])  # every fused op kind; BART's cross-attention too
def test_an_exported_training_forward_holds_torchs_operators_only_and_trains_as_stock(family, tmp_path):
    """``torch.export`` of a training forward with labels, batch and length dynamic: the program holds no op of
    ours (it loads where our file was never imported, and lowers to runtimes that know torch's operators), runs
    at another shape, and its loss and gradients are stock's. Our custom ops had no autograd formula there
    (backward raised), their names carried the checkpoint's folder, and the dynamic shapes were specialized."""
    from torch.export import Dim

    config = family_config(family)
    for name, value in list(vars(config).items()):
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path, config)
    stock.train(), ours.train()
    batch, length = Dim("batch", min=2, max=8), Dim("length", min=4, max=32)

    def training_inputs(rows: int, seq: int, seed: int) -> dict:
        inputs = token_inputs(family, batch=rows, seq=seq, seed=seed)
        labels = inputs.get("decoder_input_ids", inputs["input_ids"]).clone()
        if family != "bart":  # padding, and the token after it (predicted by a padded query: README)
            mask = inputs["attention_mask"]
            labels[(mask == 0) | (torch.nn.functional.pad(mask, (1, 0), value=1)[:, :-1] == 0)] = -100
        return {**inputs, "labels": labels, "use_cache": False}

    example = training_inputs(2, 9, seed=0)
    dims = {name: {0: batch, 1: length} for name in example if name != "use_cache"}
    if family == "bart":
        dims["decoder_input_ids"] = dims["labels"] = {0: batch, 1: Dim("target", min=2, max=32)}
    program = torch.export.export(ours, (), kwargs=example, dynamic_shapes={**dims, "use_cache": None})
    ours_ops = [str(node.target) for node in program.graph.nodes if "memory_efficient_adapter" in str(node.target)]
    assert not ours_ops, f"the exported program holds our ops: {sorted(set(ours_ops))}"

    inputs = training_inputs(3, 11, seed=1)
    exported = program.module()
    loss = exported(**inputs).loss
    loss.backward()
    stock_loss = stock(**inputs).loss
    stock_loss.backward()
    assert_close_rel(loss, stock_loss, 1e-5, f"{family} exported loss")
    stock_grads = dict(stock.named_parameters())
    names = [name for name, _ in exported.named_parameters()]
    assert names and set(names) <= set(stock_grads)
    gradients = torch.cat([param.grad.flatten() for _, param in exported.named_parameters()])
    assert_close_rel(gradients, torch.cat([stock_grads[name].grad.flatten() for name in names]), 1e-5, "gradients")


def test_exporting_with_a_backend_that_would_put_its_own_op_in_the_program_is_refused(tmp_path):
    """A backend named explicitly (``chunked``) put its op into the exported program: no backward there (torch's
    generic error), and a ``.pt2`` that loads only where the modeling file was imported."""
    _, ours = stock_and_ours("llama", GENERATIVE_CLASSES["llama"], tmp_path)
    ours.config.attn_backend = "chunked"
    with pytest.raises(ValueError, match="chunked would put an op of its own into the exported program"):
        torch.export.export(ours, (), kwargs={**token_inputs("llama"), "use_cache": False})


def test_an_export_in_another_thread_leaves_this_threads_training_step_alone(tmp_path):
    """torch flags an export for the whole process: a model training in another thread meanwhile took the export
    paths (logits back, stock's memory) and refused its named backend with an error about exporting."""
    import threading

    stock, exported = stock_and_ours("llama", GENERATIVE_CLASSES["llama"], tmp_path)
    training = type(exported).from_pretrained(tmp_path / "llama-LlamaForCausalLM", trust_remote_code=True).train()
    training.config.attn_backend = "chunked"
    batch = token_inputs("llama")
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    inside, release = threading.Event(), threading.Event()

    def wait_inside_the_export(module, args, output):
        inside.set()
        release.wait(60)

    exported.model.layers[0].register_forward_hook(wait_inside_the_export)
    worker = threading.Thread(target=lambda: torch.export.export(
        exported, (), kwargs={**batch, "use_cache": False}, strict=False
    ))  # fmt: skip
    worker.start()
    try:
        assert inside.wait(120)
        out = training(**batch, labels=batch["input_ids"])
        out.loss.backward()
    finally:
        release.set()
        worker.join()
    assert out.logits is None  # the fused loss ran
    expected = stock.train()(**batch, labels=batch["input_ids"]).loss
    assert_close_rel(out.loss.detach(), expected.detach(), 1e-5, "loss")



class _LogitsOf(torch.nn.Module):
    """A model's logits (with ``loss``: its loss, the inputs as labels) as a function of tensors only, for
    ``torch.jit.trace``."""

    def __init__(self, model, family: str, loss: bool = False):
        super().__init__()
        self.model, self.family, self.loss = model, family, loss

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decoder = {"decoder_input_ids": ids[:, :5]} if self.family == "bart" else {}
        if self.loss:
            labels = decoder.get("decoder_input_ids", ids)
            return self.model(input_ids=ids, attention_mask=mask, labels=labels, **decoder).loss
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False, **decoder).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_jit_traced_model_follows_the_padding_of_its_inputs(family, tmp_path):
    """``torch.jit.trace`` records one run: a decision taken on the host from the example mask (nothing padded,
    or which tokens to keep) would stay in the trace. The traced model follows every other mask, as stock's."""
    _, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    masks = [torch.ones(2, 7, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])]
    masks.append(torch.tensor([[1] * 7, [0, 0, 0, 0, 1, 1, 1]]) if family != "bart" else masks[1].flip(1))
    logits = _LogitsOf(ours, family)
    for example in masks[:2]:
        with torch.no_grad():
            traced = torch.jit.trace(logits, (ids, example), check_trace=False)
            for mask in masks:
                rows = mask.bool()[..., None] if family != "bart" else torch.ones(1, dtype=torch.bool)
                expected, actual = logits(ids, mask), traced(ids, mask)
                what = f"traced with {example.tolist()}, run with {mask.tolist()}"
                assert_close_rel(actual * rows, expected * rows, TOL, what)



@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_jit_traced_model_holds_torchs_operators_only(family, tmp_path):
    """``torch.jit.save`` refuses a trace holding Python calls (``prim::PythonOp``): our autograd Functions (RoPE,
    norms, MLP, chunked attention; the fused loss in training) were traced as such, so transformers' TorchScript
    recipe (trace, then save) failed. While ``torch.jit.trace`` runs, our code computes as stock's."""
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    if family == "bart":
        mask = mask.flip(1)
    with torch.no_grad():
        traced = torch.jit.trace(_LogitsOf(ours, family), (ids, mask), check_trace=False)
        expected = _LogitsOf(stock, family)(ids, mask)
        actual = traced(ids, mask)
    trained = torch.jit.trace(_LogitsOf(ours.train(), family, loss=True), (ids, mask), check_trace=False)
    for program in (traced, trained):
        assert not program.inlined_graph.findAllNodes("prim::PythonOp")
    rows = mask.bool()[..., None] if family != "bart" else torch.ones(1, dtype=torch.bool)
    assert_close_rel(actual * rows, expected * rows, TOL, f"{family} traced logits")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_onnx_export_without_dynamo_runs_stocks_attention(family, tmp_path):
    """``torch.onnx.export(dynamo=False)`` traces with TorchScript, and its conversion dropped what the chunked
    backend (``auto``'s CPU choice for a padded batch) writes into its output slice by slice: attention came
    out as a constant (ONNX Runtime's logits 0.3 to 1.4 off stock's). While torch.onnx exports, our code
    computes as stock's, as under torch.export. Run by ONNX Runtime at another shape (dynamic axes)."""
    import onnxruntime

    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    path = str(tmp_path / "ours.onnx")
    axes = {"ids": {0: "batch", 1: "length"}, "mask": {0: "batch", 1: "length"}}
    with torch.no_grad():
        torch.onnx.export(
            _LogitsOf(ours, family), (ids, mask), path, dynamo=False, input_names=["ids", "mask"], dynamic_axes=axes
        )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9, [0] + [1] * 8])
    if family == "bart":
        mask = mask.flip(1)
    (actual,) = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = _LogitsOf(stock, family)(ids, mask)
    rows = mask.bool()[..., None] if family != "bart" else torch.ones(1, dtype=torch.bool)
    assert_close_rel(torch.from_numpy(actual) * rows, expected * rows, TOL, f"{family} ONNX Runtime logits")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_a_torchscript_config_returns_what_stock_returns(family, tmp_path):
    """On transformers 4.x a ``torchscript`` config makes stock's GPT-2, BLOOM and BART heads (not LLaMA's) return
    tuples when the call leaves ``return_dict`` unset (their ``use_return_dict``), as ``torch.jit.trace`` needs;
    5.x returns ModelOutput. Ours return what stock returns, with the same first element."""
    stock, ours = stock_and_ours(family, GENERATIVE_CLASSES[family], tmp_path)
    inputs = token_inputs(family)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])  # padded positions' values differ
    for model in (stock, ours):
        model.config.torchscript = True
    with torch.no_grad():
        expected, actual = stock(**inputs, use_cache=False), ours(**inputs, use_cache=False)
        expected_base = stock.base_model(**inputs, use_cache=False)
        actual_base = ours.base_model(**inputs, use_cache=False)
    assert isinstance(actual, tuple) == isinstance(expected, tuple)
    assert isinstance(actual_base, tuple) == isinstance(expected_base, tuple)
    assert isinstance(expected, tuple) == (family != "llama" and not TRANSFORMERS_5)
    assert_close_rel(actual[0], expected[0], TOL, "first output")
