"""Every family's training step with the fused ops, through ``trust_remote_code`` loading: loss and every gradient
against the stock class (or Qwen's reference), with ``num_items_in_batch``, kept logits, eval mode, hidden
states, gradient checkpointing, saving into the stock class, PEFT LoRA, the training cache; a CUDA test checks
bf16 against fp32 stock. The ops themselves are tested in ``test_fused_ops.py``.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from remote_code import TRANSFORMERS_5, assert_close_rel, relative_error
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForCausalLM,
    BartForConditionalGeneration,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from memory_efficient_adapter.families import write_remote_code

TOL = 1e-5
VOCAB = 97


# ----------------------------------------------------------------------------------------------
# Families: loss and every gradient against the stock class, loaded through trust_remote_code
# ----------------------------------------------------------------------------------------------


def llama_config(**overrides) -> LlamaConfig:
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}} if TRANSFORMERS_5 else {}
    values = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, **rope,
    )
    return LlamaConfig(**{**values, **overrides})


STOCK = {
    "llama": (LlamaForCausalLM, llama_config, AutoModelForCausalLM),
    "llama_tied": (LlamaForCausalLM, lambda: llama_config(tie_word_embeddings=True), AutoModelForCausalLM),
    "gpt2": (
        GPT2LMHeadModel,
        lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0),
        AutoModelForCausalLM,
    ),
    "bloom": (
        BloomForCausalLM,
        lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        AutoModelForCausalLM,
    ),
    "bart": (
        BartForConditionalGeneration,
        lambda: BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
        AutoModelForSeq2SeqLM,
    ),
    "bart_causal": (
        BartForCausalLM,
        lambda: BartConfig(vocab_size=VOCAB, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                           decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           is_decoder=True, add_cross_attention=False),
        AutoModelForCausalLM,
    ),
}


def randomize_(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name or "ln" in name else 0.1 * noise)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.copy_(0.5 * torch.randn(model.final_logits_bias.shape, generator=generator))


@pytest.fixture(scope="module")
def family_pairs(tmp_path_factory):
    """(stock model, our model loaded through trust_remote_code) with the same random weights, per family."""
    pairs = {}
    for name, (stock_class, make_config, auto_class) in STOCK.items():
        torch.manual_seed(0)
        stock = stock_class(make_config())
        randomize_(stock)
        folder = tmp_path_factory.mktemp(name)
        stock.save_pretrained(folder)
        write_remote_code(folder, name.split("_")[0])
        ours = auto_class.from_pretrained(folder, trust_remote_code=True)
        assert type(ours).__module__.startswith("transformers_modules"), type(ours).__module__
        pairs[name] = (stock, ours, folder)
    return pairs


def batch_for(name: str, generator: torch.Generator) -> dict:
    ids = torch.randint(3, VOCAB, (2, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2:5] = -100
    if name == "bart":
        target = torch.randint(3, VOCAB, (2, 9), generator=generator)
        target[1, 7:] = -100
        return dict(input_ids=ids, attention_mask=mask, labels=target)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train_step(model, batch: dict, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**batch, **kwargs)
    output.loss.backward()
    return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(stock, ours, batch, tol=TOL, ours_batch=None, **kwargs):
    """``ours_batch``: what our model is given instead of ``batch`` (the same data in another form)."""
    expected, expected_grads = train_step(stock, batch, **kwargs)
    got, grads = train_step(ours, batch if ours_batch is None else ours_batch, **kwargs)
    assert_close_rel(got.loss.detach(), expected.loss.detach(), tol, "loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if name.endswith("k_proj.bias"):  # softmax ignores a key bias: both are rounding noise around 0
            assert grads[name].abs().max() < 1e-8 and grad.abs().max() < 1e-8, name
            continue
        assert_close_rel(grads[name], grad, tol, f"grad of {name}")
    return expected, got


@pytest.mark.parametrize("name", list(STOCK))
def test_family_loss_and_every_gradient_match_stock_without_logits(family_pairs, name):
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(1))
    expected, got = assert_same_training_step(stock, ours, batch)
    assert got.logits is None and expected.logits is not None


@pytest.mark.parametrize(
    "name, given", [("llama", "labels"), ("llama", "shift_labels"), ("gpt2", "labels"), ("bloom", "labels"),
                    ("bart_causal", "labels"), ("bart", "labels")],
)  # fmt: skip
def test_the_labels_of_one_row_without_their_batch_dimension_train_as_stock(family_pairs, name, given):
    """Stock's LM losses take the labels of a batch of one as ``[s]`` (they shift along the last dimension and
    flatten); ours refused them in training (a ValueError naming the shapes), eval mode took them."""
    stock, ours, _ = family_pairs[name]
    batch = {key: value[:1] for key, value in batch_for(name, torch.Generator().manual_seed(12)).items()}
    if name == "bart":  # without them the labels would be shifted into decoder inputs, which needs rows in stock
        batch["decoder_input_ids"] = batch["labels"].clamp_min(3).flip(1)
    batch["labels"] = batch["labels"][0]
    if given == "shift_labels":  # used in place of the shifted labels: other targets
        batch["shift_labels"] = batch["labels"].flip(0)
    assert_same_training_step(stock, ours, batch)
    with torch.no_grad():
        assert_close_rel(ours.eval()(**batch).loss, stock.eval()(**batch).loss, TOL, "eval loss")


@pytest.mark.parametrize("layout", ["flat", "trailing_one"])
def test_bart_seq2seq_labels_in_another_layout_train_as_stock(family_pairs, layout):
    """Stock's seq2seq loss flattens the labels (no shift): ``[batch * s]`` or ``[batch, s, 1]`` labels train as
    rows. Ours refused them in training (eval took them)."""
    stock, ours, _ = family_pairs["bart"]
    batch = batch_for("bart", torch.Generator().manual_seed(13))
    batch["decoder_input_ids"] = batch["labels"].clamp_min(3).flip(1)
    batch["labels"] = batch["labels"].reshape(-1) if layout == "flat" else batch["labels"][..., None]
    assert_same_training_step(stock, ours, batch)
    with torch.no_grad():
        assert_close_rel(ours.eval()(**batch).loss, stock.eval()(**batch).loss, TOL, "eval loss")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart_causal"])
def test_uint8_labels_train_as_stock(family_pairs, name):
    """PyTorch's loss takes uint8 labels (without -100); the fused op's gathers needed int64. Stock's causal LMs
    shift labels by padding them with -100, which uint8 cannot hold: they get the same labels as int64."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(2))
    batch["labels"] = batch["labels"].clamp_min(0)
    small = dict(batch, labels=batch["labels"].to(torch.uint8))
    assert_same_training_step(stock, ours, small if name == "bart_causal" else batch, ours_batch=small)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "gpt2", "bart_causal"])
def test_inputs_embeds_made_under_inference_mode_train_as_stock(family_pairs, name):
    """Frozen features computed under ``torch.inference_mode`` and passed as ``inputs_embeds`` of an unpadded
    batch: autograd refuses to save such a tensor, which our first RMSNorm did (LLaMA and Qwen failed where stock
    trains: its norm saves a tensor of its own)."""
    stock, ours, _ = family_pairs[name]
    ids = batch_for(name, torch.Generator().manual_seed(7))["input_ids"]
    with torch.inference_mode():
        features = stock.get_input_embeddings()(ids)
    assert features.is_inference()
    assert_same_training_step(stock, ours, dict(inputs_embeds=features, labels=ids))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart", "bart_causal"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_narrower_integer_labels_give_stocks_int64_loss_in_training_and_in_evaluation(family_pairs, name, dtype):
    """Stock's cross-entropy refuses int32 labels (a dataset column's type); the fused loss took them, so a model
    trained on them failed at its first evaluation. Both now take them as int64."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(4))
    narrow = dict(batch, labels=batch["labels"].to(dtype))
    assert_same_training_step(stock, ours, batch, ours_batch=narrow)
    with torch.no_grad():
        assert_close_rel(ours.eval()(**narrow).loss, stock.eval()(**batch).loss, TOL, "eval loss")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart_causal"])
def test_a_4d_mask_broadcast_over_the_keys_trains_as_stock(family_pairs, name):
    """``[batch, 1, q, 1]``: SDPA broadcasts a key dimension of one (here each query row kept or hidden
    whole, a 4-D mask replacing causal masking as in transformers); the mask-shape check took it for too short."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(3))
    rows_kept = batch.pop("attention_mask").bool()[:, None, :, None]
    batch["attention_mask"] = rows_kept
    batch["labels"] = batch["labels"].masked_fill(~rows_kept[:, 0, :, 0], -100)
    assert_same_training_step(stock, ours, batch)
    with torch.no_grad():
        expected = stock.eval()(input_ids=batch["input_ids"], attention_mask=rows_kept).logits
        got = ours.eval()(input_ids=batch["input_ids"], attention_mask=rows_kept).logits
    assert_close_rel(got[rows_kept[:, 0, :, 0]], expected[rows_kept[:, 0, :, 0]], TOL, "eval logits")


@pytest.mark.parametrize("shape", ["[batch, 1, seq]", "[batch, seq, 1]", "[batch * seq]", "[seq] for a batch of one"])
def test_gpt2_flattens_a_mask_of_fewer_dimensions_as_stock(family_pairs, shape):
    """Stock GPT-2 views any mask of fewer than 4 dimensions as ``[batch, -1]``."""
    stock, ours, _ = family_pairs["gpt2"]
    batch = batch_for("gpt2", torch.Generator().manual_seed(4))
    mask = batch["attention_mask"]
    if shape == "[seq] for a batch of one":
        batch = {key: value[1:] for key, value in batch.items()}
        batch["attention_mask"] = mask[1]
    else:
        batch["attention_mask"] = {"[batch, 1, seq]": mask[:, None, :], "[batch, seq, 1]": mask[..., None]}.get(
            shape, mask.reshape(-1)
        )
    assert_same_training_step(stock, ours, batch)


def assert_gradients_as_close_to_float64_as_stock(grads: dict, stock_grads: dict, reference: dict) -> None:
    """Each of our half-precision gradients is finite and within twice stock's error against float64 (+1e-3)."""
    for name, want in reference.items():
        assert torch.isfinite(grads[name]).all(), name
        error = relative_error(grads[name].double(), want)
        stock_error = relative_error(stock_grads[name].double(), want)
        assert error <= 2 * stock_error + 1e-3, (name, error, stock_error)


def scaled_float16_gradients(model, batch: dict, scale: float, autocast: bool) -> dict:
    """Every gradient of ``(loss * scale).backward()`` of a float16 model (or a float32 one under float16
    autocast), unscaled in float64 (a GradScaler's step)."""
    model = model.float() if autocast else model.half()
    model.train().zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = model(**batch).loss
    (loss * scale).backward()
    return {n: p.grad.double() / scale for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True], ids=["float16 model", "float16 autocast"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_float16_gradients_take_a_gradscaler_loss_scale_as_stock(family_pairs, name, autocast):
    """GradScaler starts at 2**16: the fused loss kept its gradients from forward in float16, scaled by 1 / tokens,
    and multiplied them by the scale there (inf in float16; GradScaler skipped every such step)."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(5))
    _, reference = train_step(copy.deepcopy(stock).double(), batch)
    expected = scaled_float16_gradients(copy.deepcopy(stock), batch, 2.0**16, autocast)
    got = scaled_float16_gradients(copy.deepcopy(ours), batch, 2.0**16, autocast)
    assert got.keys() == expected.keys() == reference.keys()
    assert_gradients_as_close_to_float64_as_stock(got, expected, reference)


def test_bart_with_a_float32_final_logits_bias_in_a_bfloat16_model_trains_as_stock(family_pairs):
    """Stock's logits become float32 where the bias is added; the fused op took the bias into a bf16 matmul
    and raised a dtype error."""
    stock, ours = (copy.deepcopy(model).to(torch.bfloat16) for model in family_pairs["bart"][:2])
    for model in (stock, ours):
        model.final_logits_bias.data = model.final_logits_bias.data.float()
    batch = batch_for("bart", torch.Generator().manual_seed(6))
    reference_loss, reference = train_step(copy.deepcopy(stock).double(), batch)
    (expected, expected_grads), (got, grads) = train_step(stock, batch), train_step(ours, batch)
    assert got.loss.dtype == expected.loss.dtype == torch.float32
    assert_close_rel(got.loss.double(), reference_loss.loss.detach(), 1e-2, "loss")
    assert_gradients_as_close_to_float64_as_stock(grads, expected_grads, reference)


@pytest.mark.parametrize("num_items", [torch.tensor(40), torch.tensor([40]), torch.tensor([[40.0]])], ids=str)
@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_num_items_in_batch_divides_the_summed_loss_like_stock(family_pairs, name, num_items):
    """Also a one-element tensor with dimensions (the Trainer's under DataParallel): the loss takes its shape."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(2))
    assert_same_training_step(stock, ours, batch, num_items_in_batch=num_items)


def test_bart_divides_its_summed_loss_by_num_items_in_batch(family_pairs):
    """Stock BART ignores ``num_items_in_batch`` (so the Trainer summed accumulated micro-batches' means); ours
    divides the summed loss by it, as the causal heads do: stock's mean times the counted tokens over the count."""
    stock, ours, _ = family_pairs["bart"]
    batch = batch_for("bart", torch.Generator().manual_seed(2))
    scale = (batch["labels"] != -100).sum() / 40
    expected, expected_grads = train_step(stock, batch)
    got, grads = train_step(ours, batch, num_items_in_batch=torch.tensor(40))
    assert_close_rel(got.loss.detach(), expected.loss.detach() * scale, TOL, "loss")
    for name in ("model.shared.weight", "model.decoder.layers.1.fc1.weight"):
        assert_close_rel(grads[name], expected_grads[name] * scale, TOL, f"grad of {name}")


def test_keep_logits_in_training_returns_stock_logits(family_pairs):
    stock, ours, _ = family_pairs["llama"]
    batch = batch_for("llama", torch.Generator().manual_seed(3))
    ours.config.keep_logits_in_training = True
    try:
        expected, got = assert_same_training_step(stock, ours, batch)
    finally:
        ours.config.keep_logits_in_training = False
    kept = batch["attention_mask"][..., None]  # a padded batch runs unpadded: zeros at padded positions
    assert_close_rel(got.logits.detach() * kept, expected.logits.detach() * kept, TOL, "logits")


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_eval_mode_with_labels_keeps_logits_and_the_stock_loss(family_pairs, name):
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(4))
    stock.eval(), ours.eval()
    with torch.no_grad():
        expected, got = stock(**batch), ours(**batch)
    assert_close_rel(got.logits, expected.logits, TOL, "logits")
    assert_close_rel(got.loss, expected.loss, TOL, "loss")


def test_hidden_states_and_tuple_output_in_fused_training(family_pairs):
    stock, ours, _ = family_pairs["bloom"]
    batch = batch_for("bloom", torch.Generator().manual_seed(5))
    stock.train(), ours.train()
    expected = stock(**batch, output_hidden_states=True)
    got = ours(**batch, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected.hidden_states)
    kept = batch["attention_mask"][..., None]  # a padded batch runs unpadded: zeros at padded positions
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert_close_rel(a.detach() * kept, b.detach() * kept, TOL, "hidden state")
    as_tuple = ours(**batch, return_dict=False)
    assert_close_rel(as_tuple[0].detach(), expected.loss.detach(), TOL, "loss in the tuple")
    assert not any(t is None for t in as_tuple)


def test_gradient_checkpointing_gives_the_stock_gradients(family_pairs):
    stock, ours, _ = family_pairs["llama"]
    batch = batch_for("llama", torch.Generator().manual_seed(6))
    ours.gradient_checkpointing_enable()
    try:
        assert_same_training_step(stock, ours, batch)
    finally:
        ours.gradient_checkpointing_disable()


def test_trained_model_saves_into_the_stock_class(family_pairs, tmp_path):
    stock, ours, _ = family_pairs["gpt2"]
    train_step(ours, batch_for("gpt2", torch.Generator().manual_seed(7)))
    ours.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.state_dict().keys() == stock.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_a_hooked_head_takes_the_plain_path(family_pairs):
    """A wrapped head without hooks trains without logits too: ``test_wrapped_head_loss.py``."""
    stock, ours, _ = family_pairs["llama"]
    batch = batch_for("llama", torch.Generator().manual_seed(8))
    seen = []
    handle = ours.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        expected, got = assert_same_training_step(stock, ours, batch)
    finally:
        handle.remove()
    assert seen and got.logits is not None


@pytest.mark.parametrize("name", ["llama", "bart"])  # the shifted loss, and the unshifted one with a bias
def test_fused_training_step_compiles_into_one_graph(family_pairs, name):
    """No graph break in a training step without padding (padding masks are the attention layer's business)."""
    _, ours, _ = family_pairs[name]
    assert_training_step_compiles_into_one_graph(ours, batch_for(name, torch.Generator().manual_seed(10)))


def assert_training_step_compiles_into_one_graph(model, batch: dict) -> None:
    """dynamo traces ``model``'s training forward of ``batch`` (without its padding mask) in one graph."""
    batch = {key: value for key, value in batch.items() if key != "attention_mask"}
    model.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: model(**batch).loss)()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------------------------
# PEFT LoRA on every linear layer
# ----------------------------------------------------------------------------------------------

LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@pytest.mark.parametrize("name,with_head", [(name, False) for name in LORA_TARGETS] + [("llama", True)])
def test_lora_gradients_match_stock_with_peft(tmp_path, name, with_head):
    peft = pytest.importorskip("peft", reason="peft is in the test extra")
    stock_class, make_config, auto_class = STOCK[name]
    torch.manual_seed(0)
    stock = stock_class(make_config())
    randomize_(stock)
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, name)
    ours = auto_class.from_pretrained(tmp_path, trust_remote_code=True)
    targets = LORA_TARGETS[name] + (["lm_head"] if with_head else [])
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(1)
    stock_lora = peft.get_peft_model(stock, peft.LoraConfig(**lora))
    ours_lora = peft.get_peft_model(ours, peft.LoraConfig(**lora))
    ours_lora.load_state_dict(stock_lora.state_dict())
    batch = batch_for(name, torch.Generator().manual_seed(9))
    expected, expected_grads = train_step(stock_lora, batch)
    got, grads = train_step(ours_lora, batch)
    assert_close_rel(got.loss.detach(), expected.loss.detach(), TOL, "loss")
    lora_grads = {n for n in expected_grads if "lora_" in n}
    assert lora_grads and grads.keys() == expected_grads.keys()
    for key in lora_grads:
        assert_close_rel(grads[key], expected_grads[key], TOL, f"grad of {key}")
    assert got.logits is None  # a LoRA-wrapped head is called on chunks of tokens (test_wrapped_head_loss.py)


# ----------------------------------------------------------------------------------------------
# Qwen: against the reference of tests/test_qwen.py
# ----------------------------------------------------------------------------------------------


def assert_cache_only_where_asked(model, inputs: dict) -> None:
    """A training forward with gradients builds no cache unless ``use_cache=True`` is passed; inference (eval
    mode, or no gradients) keeps the config's ``use_cache``; the outputs do not change."""
    cache_class = type(model.eval()(**inputs, use_cache=True).past_key_values)
    assert model.config.use_cache and cache_class is not type(None)
    trained = model.train()(**inputs)
    assert trained.past_key_values is None
    asked = model(**inputs, use_cache=True)
    assert type(asked.past_key_values) is cache_class
    assert_close_rel(asked.loss.detach(), trained.loss.detach(), 1e-6, "loss with and without a cache")
    with torch.no_grad():
        assert type(model(**inputs).past_key_values) is cache_class
    assert type(model.eval()(**inputs).past_key_values) is cache_class


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "bart_causal"])
def test_training_forward_builds_no_cache_unless_asked(family_pairs, name):
    _, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(6))
    del batch["attention_mask"]  # a padded training batch runs unpadded and never returns a cache
    assert_cache_only_where_asked(ours, batch)


def test_qwen_training_forward_builds_no_cache_unless_asked(tmp_path):
    from test_qwen import load, random_ids, random_model, save_qwen

    torch.manual_seed(5)
    ours = load(save_qwen(random_model(), tmp_path))
    ids = random_ids(2, 9)
    assert_cache_only_where_asked(ours, dict(input_ids=ids, labels=ids))


def test_qwen_training_keeps_no_part_of_the_fused_qkv_projection_for_backward(tmp_path):
    """Query and key are rotated into new tensors; the value is copied out of c_attn's output in training, so
    that no tensor kept for backward holds that [tokens, 3 x hidden] output (a view would hold all of it)."""
    from test_qwen import load, random_ids, random_model, save_qwen

    torch.manual_seed(7)
    ours = load(save_qwen(random_model(), tmp_path)).train()
    outputs, kept = [], set()  # the outputs themselves: their memory is not reused while the step runs
    for block in ours.transformer.h:
        block.attn.c_attn.register_forward_hook(lambda module, args, output: outputs.append(output))

    def pack(tensor):
        kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    ids = random_ids(2, 9)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ours(input_ids=ids, labels=ids).loss
    projected = {output.untyped_storage().data_ptr() for output in outputs}
    assert len(projected) == len(ours.transformer.h) and not projected & kept
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_qwen_fused_loss_and_gradients_match_reference_with_num_items(tmp_path):
    from qwen_reference import ReferenceQwen
    from test_qwen import load, random_ids, random_model, save_qwen

    torch.manual_seed(4)
    model = random_model(rotary_pct=0.5, no_bias=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = load(save_qwen(model, tmp_path)).train()
    ours.config.loss_chunk_size = 5
    ids = random_ids(2, 11)
    labels = ids.clone()
    labels[1, :3] = -100
    output = ours(ids, labels=labels, num_items_in_batch=25)
    output.loss.backward()
    assert output.logits is None
    torch._dynamo.reset()
    assert torch._dynamo.explain(lambda: ours(ids, labels=labels).loss)().graph_break_count == 0
    reference = ReferenceQwen(model.config, state, requires_grad=True)
    logits, _, _ = reference.forward(ids, training=True)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    expected = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), reduction="sum") / 25
    expected.backward()
    assert_close_rel(output.loss.detach(), expected.detach().float(), TOL, "loss")
    grads = dict(ours.named_parameters())
    for name, param in reference.params.items():
        assert_close_rel(grads[name].grad, param.grad.float(), 2e-5, f"grad of {name}")


# ----------------------------------------------------------------------------------------------
# GPU: bf16 against fp32 stock
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_step_on_cuda_is_as_close_to_fp32_stock_as_bf16_stock(tmp_path):
    """Ours in bf16 (the compiled fused ops) against stock in fp32: within twice stock bf16's own error."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(llama_config(vocab_size=1000, hidden_size=256, intermediate_size=688,
                                              num_attention_heads=8, num_key_value_heads=4))
    randomize_(reference)
    reference.save_pretrained(tmp_path)
    write_remote_code(tmp_path, "llama")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16).cuda()
    stock_bf16 = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()
    reference = reference.cuda()
    ours.config.loss_chunk_size = 300  # several chunks and a remainder
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 512), generator=generator)
    labels = ids.clone()
    labels[0, :100] = -100
    batch = dict(input_ids=ids.cuda(), labels=labels.cuda())
    expected, expected_grads = train_step(reference, batch)
    baseline, baseline_grads = train_step(stock_bf16, batch)
    got, grads = train_step(ours, batch)
    assert got.logits is None
    assert not sys.modules[type(ours).__module__]._compile_failed, "the compiled GPU path fell back to eager"
    loss_error = abs(got.loss.item() - expected.loss.item()) / expected.loss.item()
    baseline_error = abs(baseline.loss.item() - expected.loss.item()) / expected.loss.item()
    assert loss_error <= 2 * baseline_error + 1e-3, (loss_error, baseline_error)
    for name, grad in expected_grads.items():
        limit = 2 * relative_error(baseline_grads[name].float(), grad) + 1e-2
        assert_close_rel(grads[name].float(), grad, limit, f"bf16 grad of {name}")


@pytest.mark.parametrize("name, width", [("llama", {"intermediate_size": 0}),
                                         ("bart", {"encoder_ffn_dim": 0, "decoder_ffn_dim": 0})])
def test_an_mlp_of_width_zero_trains_like_stock(tmp_path, name, width):
    """Stock trains a model whose MLP has no hidden units (the block passes its input through): so do we."""
    stock_class, make_config, auto_class = STOCK[name]
    config = make_config()
    for field, value in width.items():
        setattr(config, field, value)
    torch.manual_seed(0)
    stock = stock_class(config)
    randomize_(stock)
    stock.save_pretrained(tmp_path)
    write_remote_code(tmp_path, name)
    ours = auto_class.from_pretrained(tmp_path, trust_remote_code=True)
    assert_same_training_step(stock, ours, batch_for(name, torch.Generator().manual_seed(6)))
