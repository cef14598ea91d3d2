"""modeling_bart.py against stock transformers BART with the same weights, loaded through trust_remote_code."""

from __future__ import annotations

import inspect
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from remote_code import assert_close_rel, relative_error, save_with_remote_code
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BartForCausalLM,
    BartForConditionalGeneration,
    BartForQuestionAnswering,
    BartForSequenceClassification,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.bart.modeling_bart import shift_tokens_right

CPU_BACKENDS = ["sdpa", "chunked", "eager"]
PAD, BOS, EOS = 1, 0, 2
VOCAB = 67
AUTO_MAP = {
    "AutoModel": "modeling_bart.BartModel",
    "AutoModelForSeq2SeqLM": "modeling_bart.BartForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_bart.BartForSequenceClassification",
    "AutoModelForQuestionAnswering": "modeling_bart.BartForQuestionAnswering",
    "AutoModelForCausalLM": "modeling_bart.BartForCausalLM",
}


def tiny_config(**overrides) -> BartConfig:
    """Two layers each side, 4 heads of 8 dims, no dropout; init_std large enough for varied tokens."""
    values = dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.3,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_eos_token_id=None,
        num_labels=3,
    )
    values.update(overrides)
    return BartConfig(**values)


def stock_seq2seq(**overrides) -> BartForConditionalGeneration:
    model = BartForConditionalGeneration(tiny_config(**overrides))
    with torch.no_grad():
        # A non-zero bias checks that the buffer loads; the extra push on <eos> ends beams at different lengths.
        model.final_logits_bias.normal_(0.0, 1.0)
        model.final_logits_bias[0, EOS] += 6.0
    return model.eval()


@pytest.fixture(scope="module")
def seq2seq_folder(tmp_path_factory):
    torch.manual_seed(1234)
    folder = tmp_path_factory.mktemp("bart-seq2seq")
    return save_with_remote_code(stock_seq2seq(), folder, ["modeling_bart.py"], AUTO_MAP)


def save_stock(folder, model_class, **overrides):
    """A stock ``model_class`` on ``tiny_config(**overrides)`` with random weights, saved with our remote code."""
    torch.manual_seed(7)
    return save_with_remote_code(model_class(tiny_config(**overrides)), folder, ["modeling_bart.py"], AUTO_MAP)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    return save_stock(tmp_path_factory.mktemp("bart-classifier"), BartForSequenceClassification)


def load_ours(folder, backend: str, auto_class=AutoModelForSeq2SeqLM, **config_changes):
    config = AutoConfig.from_pretrained(folder)
    config.attn_backend = backend
    for name, value in config_changes.items():
        setattr(config, name, value)
    model = auto_class.from_pretrained(folder, config=config, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    return model.eval()


def load_stock(folder, model_class=BartForConditionalGeneration, **config_changes):
    return model_class.from_pretrained(folder, **config_changes).eval()


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows: unpadded, right-padded, left-padded; odd lengths on both sides."""
    input_ids = torch.randint(3, VOCAB, (3, 11))
    attention_mask = torch.ones(3, 11, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, :3] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    decoder_input_ids = torch.randint(3, VOCAB, (3, 9))
    decoder_input_ids[:, 0] = EOS
    decoder_attention_mask = torch.ones(3, 9, dtype=torch.long)
    decoder_attention_mask[1, 6:] = 0
    decoder_attention_mask[2, :2] = 0
    decoder_input_ids = decoder_input_ids.masked_fill(decoder_attention_mask == 0, PAD)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )


def classification_batch() -> dict[str, torch.Tensor]:
    """padded_batch()'s encoder side with two <eos> in every row: one ending its real tokens, one earlier (the
    classification head pools the last)."""
    batch = padded_batch()
    input_ids, attention_mask = batch["input_ids"].clone(), batch["attention_mask"]
    last_real = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)
    input_ids[torch.arange(3), last_real] = EOS
    input_ids[torch.arange(3), torch.tensor([1, 2, 4])] = EOS
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


def assert_same_gradients(ours, stock, tol: float) -> None:
    ours_grads, stock_grads = gradients(ours), gradients(stock)
    assert ours_grads.keys() == stock_grads.keys()
    assert len(ours_grads) == sum(1 for _ in stock.parameters())
    largest = max(grad.norm() for grad in stock_grads.values())
    for name, grad in stock_grads.items():
        if name.endswith("k_proj.bias"):
            # Softmax ignores a constant per query row, so the key bias gets a zero gradient (up to rounding).
            assert ours_grads[name].norm() <= 1e-5 * largest and grad.norm() <= 1e-5 * largest, name
        else:
            assert_close_rel(ours_grads[name], grad, tol, f"grad of {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_and_hidden_states_match_stock_with_padding(seq2seq_folder, backend):
    ours, stock = load_ours(seq2seq_folder, backend), load_stock(seq2seq_folder)
    batch = padded_batch()
    with torch.no_grad():
        expected = stock(**batch, output_hidden_states=True)
        actual = ours(**batch, output_hidden_states=True)
    encoder_keep = batch["attention_mask"].bool()
    decoder_keep = batch["decoder_attention_mask"].bool()
    assert_close_rel(actual.logits[decoder_keep], expected.logits[decoder_keep], 1e-5, "logits")
    assert_close_rel(
        actual.encoder_last_hidden_state[encoder_keep], expected.encoder_last_hidden_state[encoder_keep], 1e-5, "enc"
    )
    assert len(actual.decoder_hidden_states) == len(expected.decoder_hidden_states) == 3
    for layer, (ours_h, stock_h) in enumerate(zip(actual.decoder_hidden_states, expected.decoder_hidden_states)):
        assert_close_rel(ours_h[decoder_keep], stock_h[decoder_keep], 1e-5, f"decoder hidden state {layer}")
    for layer, (ours_h, stock_h) in enumerate(zip(actual.encoder_hidden_states, expected.encoder_hidden_states)):
        assert_close_rel(ours_h[encoder_keep], stock_h[encoder_keep], 1e-5, f"encoder hidden state {layer}")


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_scale_embedding_scales_every_token_embedding_as_stock(seq2seq_folder, scale_embedding):
    """``config.scale_embedding`` multiplies the token embeddings by sqrt(d_model): the encoder's, the decoder's
    and ``model.shared`` (``get_input_embeddings()``, which callers use to build ``inputs_embeds``)."""
    ours = load_ours(seq2seq_folder, "sdpa", scale_embedding=scale_embedding)
    stock = load_stock(seq2seq_folder, scale_embedding=scale_embedding)
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits[keep], stock(**batch).logits[keep], 1e-5, "logits")
        for name in ("shared", "encoder.embed_tokens", "decoder.embed_tokens"):
            ours_embeddings = ours.model.get_submodule(name)(batch["input_ids"])
            stock_embeddings = stock.model.get_submodule(name)(batch["input_ids"])
            assert_close_rel(ours_embeddings, stock_embeddings, 1e-6, f"model.{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_and_all_gradients_match_stock(seq2seq_folder, backend):
    ours, stock = load_ours(seq2seq_folder, backend).train(), load_stock(seq2seq_folder).train()
    batch = padded_batch()
    labels = torch.randint(3, VOCAB, (3, 9))
    labels[1, 6:] = -100
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    expected, actual = stock(**inputs), ours(**inputs)
    assert_close_rel(actual.loss, expected.loss, 1e-5, "loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_same_gradients(ours, stock, 1e-4)


def test_labels_shift_into_stocks_decoder_inputs_with_ignored_labels_read_as_padding(seq2seq_folder):
    """Without decoder_input_ids the decoder reads the labels shifted right, with -100 mapped to the pad token
    (stock's shift_tokens_right): an ignored label mid-row is a pad token at the next decoder position. Both loss
    paths: the fused head + loss (``keep_logits_in_training`` False, no logits returned) and the logits one."""
    ours, stock = load_ours(seq2seq_folder, "sdpa").train(), load_stock(seq2seq_folder).train()
    batch = padded_batch()
    labels = torch.randint(3, VOCAB, (3, 9))
    labels[0, 3] = -100
    labels[1, 6:] = -100
    labels[2, :2] = -100
    ours_shift = sys.modules[type(ours).__module__].shift_tokens_right
    assert torch.equal(ours_shift(labels, PAD, EOS), shift_tokens_right(labels, PAD, EOS))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    with torch.no_grad():
        expected = stock(**inputs).loss
        for keep_logits in (False, True):
            ours.config.keep_logits_in_training = keep_logits
            actual = ours(**inputs)
            assert (actual.logits is not None) == keep_logits
            assert_close_rel(actual.loss, expected, 1e-5, f"loss (keep_logits_in_training={keep_logits})")


def test_learned_positions_are_read_as_a_slice_with_the_lookups_values_and_gradient(seq2seq_folder):
    """Consecutive positions are a slice of the table (backward copies into those rows; no index lookup whose
    backward sorts and scatters); the rows and the gradient are exactly the stock lookup's, with and without a
    cached past, and a tensor past length (a static cache) still looks the positions up."""
    from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding as StockPositions

    table = load_ours(seq2seq_folder, "sdpa").model.decoder.embed_positions
    stock = StockPositions(table.num_embeddings - table.offset, table.embedding_dim)
    stock.load_state_dict(table.state_dict())
    for past_len, seq_len in [(0, 11), (5, 1), (3, 9)]:
        grad = torch.randn(seq_len, table.embedding_dim)
        table.zero_grad(), stock.zero_grad()
        rows = table(torch.zeros(1, seq_len), past_len)[0]  # stock's call
        expected = stock(torch.zeros(1, seq_len), past_key_values_length=past_len)[0]
        assert rows.untyped_storage().data_ptr() == table.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
        rows.backward(grad), expected.backward(grad)
        torch.testing.assert_close(table.weight.grad, stock.weight.grad, rtol=0, atol=0)
        assert table.weight.grad.count_nonzero() == seq_len * table.embedding_dim
    looked_up = table(torch.zeros(2, 4), torch.tensor(2))
    assert looked_up.untyped_storage().data_ptr() != table.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(looked_up, table.weight[4:8].expand(2, 4, -1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_position_embeddings = 64 positions, but this call needs 65"):
        table(torch.zeros(1, 6), 59)


def test_explicit_position_ids_read_the_same_learned_rows_as_stock(seq2seq_folder):
    """position_ids given to the learned positions are offset by 2 (the table's first two rows are unused)."""
    ours, stock = load_ours(seq2seq_folder, "sdpa"), load_stock(seq2seq_folder)
    position_ids = torch.tensor([0, 1, 2, 5, 9])
    with torch.no_grad():
        for part in ("encoder", "decoder"):
            ours_table = getattr(ours.model, part).embed_positions
            stock_table = getattr(stock.model, part).embed_positions
            expected = stock_table(torch.zeros(3, 5), position_ids=position_ids)
            assert torch.equal(ours_table(torch.zeros(3, 5), position_ids=position_ids), expected), part


def test_gradient_checkpointing_keeps_loss_and_gradients(seq2seq_folder):
    ours, stock = load_ours(seq2seq_folder, "chunked").train(), load_stock(seq2seq_folder).train()
    # transformers 5.23 renamed gradient_checkpointing_enable (still there, deprecated) to activation_checkpointing_enable.
    getattr(ours, "activation_checkpointing_enable", ours.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in ours.model.decoder.layers)
    batch = padded_batch()
    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
        # Padded decoder positions carry no loss: a query that sees no key is left undefined by stock BART.
        labels=torch.randint(3, VOCAB, (3, 9)).masked_fill(batch["decoder_attention_mask"] == 0, -100),
    )
    expected, actual = stock(**inputs), ours(**inputs)
    assert_close_rel(actual.loss, expected.loss, 1e-5, "loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_same_gradients(ours, stock, 1e-4)


def test_layerdrop_skips_the_same_layers_as_stock(seq2seq_folder):
    drop = dict(encoder_layerdrop=0.5, decoder_layerdrop=0.5)
    ours = load_ours(seq2seq_folder, "sdpa", **drop).train()
    stock = load_stock(seq2seq_folder, **drop).train()
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    dropped_some = False
    with torch.no_grad():
        full = ours.eval()(**batch).logits
        ours.train()
        for seed in range(4):
            torch.manual_seed(seed)
            expected = stock(**batch).logits
            torch.manual_seed(seed)
            actual = ours(**batch).logits
            assert_close_rel(actual[keep], expected[keep], 1e-5, f"logits with layerdrop, seed {seed}")
            if relative_error(actual[keep], full[keep]) > 1e-3:
                dropped_some = True
    assert dropped_some, "layerdrop never dropped a layer"


@pytest.mark.parametrize("dropout", ["attention_dropout", "dropout", "activation_dropout"])
def test_each_dropout_is_applied_in_training_only(seq2seq_folder, dropout):
    """Each of BART's dropouts set alone (on the attention probabilities; on the embeddings and every residual
    branch; inside the feed-forward block) changes the logits in train mode and leaves eval mode's untouched."""
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        with_dropout = load_ours(seq2seq_folder, "sdpa", **{dropout: 0.5})
        evaluated = with_dropout(**batch).logits
        trained = with_dropout.train()(**batch).logits
        without_dropout = load_ours(seq2seq_folder, "sdpa").train()(**batch).logits
    assert relative_error(trained[keep], evaluated[keep]) > 1e-2, f"{dropout} had no effect in training"
    assert_close_rel(without_dropout[keep], evaluated[keep], 1e-6, f"eval mode with {dropout} vs no dropout")


GENERATION_SETTINGS = {
    "beam": dict(num_beams=3, length_penalty=0.6, no_repeat_ngram_size=2, forced_bos_token_id=BOS),
    "beam_forced_eos": dict(num_beams=4, length_penalty=1.5, forced_eos_token_id=EOS, early_stopping=True),
    "greedy": dict(num_beams=1, no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_generate_matches_stock_token_for_token(seq2seq_folder, backend):
    ours, stock = load_ours(seq2seq_folder, backend), load_stock(seq2seq_folder)
    batch = padded_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=14)
    ended_early = False
    for name, settings in GENERATION_SETTINGS.items():
        with torch.no_grad():
            expected = stock.generate(**inputs, **settings)
            actual = ours.generate(**inputs, **settings)
        assert torch.equal(actual, expected), f"{name}:\n{actual}\n!=\n{expected}"
        ended_early |= bool((expected == PAD).any())
        if "forced_bos_token_id" in settings:
            assert (expected[:, 1] == BOS).all()
    assert ended_early, "no sequence ended before max_new_tokens: length_penalty was not exercised"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_incremental_decoding_matches_a_full_decoder_pass(seq2seq_folder, backend):
    ours = load_ours(seq2seq_folder, backend)
    batch = padded_batch()
    ids, mask = batch["decoder_input_ids"], batch["decoder_attention_mask"]
    with torch.no_grad():
        encoder_outputs = ours.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        common = dict(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"])
        full = ours(**common, decoder_input_ids=ids, decoder_attention_mask=mask, use_cache=False).logits

        cross_projections = []
        for layer in ours.model.decoder.layers:
            layer.encoder_attn.k_proj.register_forward_hook(lambda *_: cross_projections.append(1))
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        prefill = 3
        steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]
        for start, stop in steps:
            out = ours(
                **common,
                decoder_input_ids=ids[:, start:stop],
                decoder_attention_mask=mask[:, :stop],
                past_key_values=cache,
                use_cache=True,
            )
            assert out.past_key_values is cache
            keep = mask[:, start:stop].bool()
            assert_close_rel(out.logits[keep], full[:, start:stop][keep], 1e-5, f"positions {start}..{stop - 1}")
    assert cache.get_seq_length() == ids.shape[1]
    assert len(cross_projections) == len(ours.model.decoder.layers), "encoder keys were projected more than once"
    assert all(cache.is_updated[i] for i in range(len(ours.model.decoder.layers)))
    assert cache.cross_attention_cache.get_seq_length() == batch["input_ids"].shape[1]


def test_saved_weights_load_into_the_stock_class(seq2seq_folder, tmp_path):
    ours = load_ours(seq2seq_folder, "sdpa")
    shared = ours.model.shared.weight
    assert ours.lm_head.weight is shared
    assert ours.model.encoder.embed_tokens.weight is shared and ours.model.decoder.embed_tokens.weight is shared
    ours.save_pretrained(tmp_path)
    stock, info = BartForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert stock.state_dict().keys() == ours.state_dict().keys()
    original = load_stock(seq2seq_folder)
    for name, tensor in original.state_dict().items():
        assert torch.equal(stock.state_dict()[name], tensor), name
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits[keep], stock.eval()(**batch).logits[keep], 1e-5, "logits")


def test_embeddings_stored_only_under_the_decoder_are_tied(seq2seq_folder, tmp_path):
    """Some checkpoints (facebook/bart-large-cnn) keep the shared matrix only as model.decoder.embed_tokens."""
    from safetensors.torch import load_file, save_file

    for path in seq2seq_folder.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, tmp_path / path.name)
    weights = load_file(seq2seq_folder / "model.safetensors")
    assert "model.shared.weight" in weights and "model.decoder.embed_tokens.weight" not in weights
    weights["model.decoder.embed_tokens.weight"] = weights.pop("model.shared.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    ours, stock = load_ours(tmp_path, "sdpa"), load_stock(seq2seq_folder)
    shared = ours.model.shared.weight
    assert ours.lm_head.weight is shared and ours.model.encoder.embed_tokens.weight is shared
    assert torch.equal(shared, stock.model.shared.weight)
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits[keep], stock(**batch).logits[keep], 1e-5, "logits")


def test_untied_embeddings_load_each_of_their_matrices_as_stock(tmp_path):
    """``tie_word_embeddings=False``: the shared, encoder and decoder embeddings and the head are four matrices,
    each loaded from the checkpoint (transformers 4.x calls every module's ``_tie_weights``, whatever the config
    says: ours tied the encoder's and decoder's to ``shared``, and their saved matrices were never read)."""
    torch.manual_seed(11)
    stock = stock_seq2seq(tie_word_embeddings=False)
    embeddings = (stock.model.shared, stock.model.encoder.embed_tokens, stock.model.decoder.embed_tokens, stock.lm_head)
    for module in embeddings:
        module.weight = torch.nn.Parameter(0.5 * torch.randn_like(module.weight))
    folder = save_with_remote_code(stock, tmp_path, ["modeling_bart.py"], AUTO_MAP)
    ours, stock = load_ours(folder, "sdpa"), load_stock(folder)
    for name in ("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"):
        assert torch.equal(ours.get_submodule(name).weight, stock.get_submodule(name).weight), name
    assert not torch.equal(ours.model.encoder.embed_tokens.weight, ours.model.shared.weight)
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits[keep], stock(**batch).logits[keep], 1e-5, "logits")


@pytest.mark.parametrize("path", ["model.encoder.layers.1.self_attn", "model.decoder.layers.1.encoder_attn"])
def test_a_stock_attention_module_put_in_a_layer_is_refused_by_name(seq2seq_folder, path):
    """Our layers pass the padding mask as ``keep_mask``: stock's BartAttention, put in by hand, took it among its
    ``**kwargs`` and attended to padding without a word. A wrapper that forwards attributes to ours still runs."""
    import copy

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ours, stock = load_ours(seq2seq_folder, "sdpa"), load_stock(seq2seq_folder)
    batch = padded_batch()
    parent, _, child = path.rpartition(".")
    wrapped = copy.deepcopy(ours)
    setattr(wrapped.get_submodule(parent), child, checkpoint_wrapper(ours.get_submodule(path)))
    with torch.no_grad():
        assert_close_rel(wrapped(**batch).logits, ours(**batch).logits, 1e-6, "logits through a checkpoint wrapper")
    setattr(ours.get_submodule(parent), child, copy.deepcopy(stock.get_submodule(path)))
    with pytest.raises(TypeError, match=f"{child} is a BartAttention: this layer passes its padding mask as keep_mask"):
        ours(**batch)


def test_fresh_token_embeddings_have_a_zero_padding_row_as_stock(seq2seq_folder):
    """A model built from its config (trained from scratch) starts with a zero embedding for the pad token."""
    config = AutoConfig.from_pretrained(seq2seq_folder)
    ours = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=True)
    assert type(ours).__module__.startswith("transformers_modules"), type(ours).__module__
    for model in (ours, BartForConditionalGeneration(config)):
        for name in ("shared", "encoder.embed_tokens", "decoder.embed_tokens"):
            weight = model.model.get_submodule(name).weight
            assert torch.count_nonzero(weight[PAD]) == 0, f"{type(model).__module__}: model.{name}"
            assert abs(weight[PAD + 1 :].std().item() / config.init_std - 1) < 0.1, name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_resized_embeddings_grow_final_logits_bias_as_stock(seq2seq_folder, dtype, tol):
    """resize_token_embeddings grows final_logits_bias with zeros (in the default dtype, as stock: a bfloat16
    bias becomes float32, and so do the logits); with the (randomly drawn) new embedding rows copied over, the
    logits and the training loss over the grown vocabulary are stock's."""
    ours, stock = load_ours(seq2seq_folder, "sdpa").to(dtype), load_stock(seq2seq_folder).to(dtype)
    for model in (ours, stock):
        model.resize_token_embeddings(VOCAB + 5)
    assert ours.final_logits_bias.dtype == stock.final_logits_bias.dtype == torch.float32
    torch.testing.assert_close(ours.final_logits_bias, stock.final_logits_bias, rtol=0, atol=0)
    assert stock.final_logits_bias.shape == (1, VOCAB + 5)
    batch = padded_batch()
    keep = batch["decoder_attention_mask"].bool()
    labels = batch["decoder_input_ids"].masked_fill(~keep, -100)
    with torch.no_grad():
        stock.model.shared.weight.copy_(ours.model.shared.weight)
        actual, expected = ours(**batch).logits, stock(**batch).logits
        assert actual.dtype == expected.dtype
        assert_close_rel(actual[keep], expected[keep], tol, "logits after resizing")
        losses = [model.train()(**batch, labels=labels).loss for model in (ours, stock)]
    assert_close_rel(losses[0], losses[1], tol / 10, "loss after resizing")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequence_classification_matches_stock(classifier_folder, backend):
    ours = load_ours(classifier_folder, backend, AutoModelForSequenceClassification)
    stock = load_stock(classifier_folder, BartForSequenceClassification)
    batch = classification_batch()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = stock(**batch, labels=labels)
        actual = ours(**batch, labels=labels)
    assert_close_rel(actual.logits, expected.logits, 1e-5, "classification logits")
    assert_close_rel(actual.loss, expected.loss, 1e-5, "classification loss")


def test_dummy_inputs_run_the_classification_head_as_stock(classifier_folder):
    """Before, ours had transformers' generic dummy inputs (rows without eos tokens): the classification head
    refused them where stock's run."""
    ours = load_ours(classifier_folder, "sdpa", AutoModelForSequenceClassification)
    stock = load_stock(classifier_folder, BartForSequenceClassification)
    eos = ours.config.eos_token_id
    assert all((row == eos).sum() == 1 for row in ours.dummy_inputs["input_ids"])
    with torch.no_grad():
        actual, expected = ours(**ours.dummy_inputs).logits, stock(**ours.dummy_inputs).logits
    assert_close_rel(actual, expected, 1e-5, "classification logits of the dummy inputs")


@pytest.mark.parametrize("num_labels, problem_type", [(1, None), (3, "multi_label_classification"), (3, "regression")])
def test_sequence_classification_regression_and_multi_label_losses_match_stock(
    classifier_folder, tmp_path, num_labels, problem_type
):
    """One label means regression: MSE over the squeezed [batch, 1] logits; multi-label takes BCE with logits."""
    folder = classifier_folder if num_labels == 3 else save_stock(tmp_path, BartForSequenceClassification, num_labels=1)
    ours = load_ours(folder, "sdpa", AutoModelForSequenceClassification, problem_type=problem_type)
    stock = load_stock(folder, BartForSequenceClassification, problem_type=problem_type)
    batch = classification_batch()
    labels = torch.rand(3, num_labels) if problem_type == "multi_label_classification" else torch.randn(3, num_labels)
    labels = labels.squeeze(-1)
    with torch.no_grad():
        expected = stock(**batch, labels=labels)
        actual = ours(**batch, labels=labels)
    assert_close_rel(actual.logits, expected.logits, 1e-5, "classification logits")
    assert_close_rel(actual.loss, expected.loss, 1e-5, f"{problem_type} loss")


def test_classification_head_applies_both_its_dropouts_in_training(classifier_folder):
    """The head's two dropouts (before ``dense`` and before ``out_proj``, as stock's): its output is replayed from
    its input and the random state it was called with (stock's own draw order differs between releases)."""
    ours = load_ours(classifier_folder, "sdpa", AutoModelForSequenceClassification, classifier_dropout=0.5)
    head = ours.classification_head
    seen = {}

    def note_input_and_random_state(module, args):
        seen["input"], seen["state"] = args[0], torch.get_rng_state()

    hook = head.register_forward_pre_hook(note_input_and_random_state)
    try:
        with torch.no_grad():
            evaluated = ours(**classification_batch()).logits
            torch.manual_seed(11)
            trained = ours.train()(**classification_batch()).logits
            torch.set_rng_state(seen["state"])
            dense = torch.tanh(head.dense(F.dropout(seen["input"], 0.5)))
            expected = head.out_proj(F.dropout(dense, 0.5))
    finally:
        hook.remove()
        ours.eval()
    assert relative_error(trained, evaluated) > 1e-2
    assert_close_rel(trained, expected, 1e-6, "train-mode logits with classifier dropout")


def test_question_answering_matches_stock(tmp_path):
    folder = save_stock(tmp_path, BartForQuestionAnswering)
    ours = load_ours(folder, "sdpa", AutoModelForQuestionAnswering)
    stock = load_stock(folder, BartForQuestionAnswering)
    batch = padded_batch()
    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        start_positions=torch.tensor([1, 2, 5]),
        end_positions=torch.tensor([3, 6, 8]),
    )
    with torch.no_grad():
        expected, actual = stock(**inputs), ours(**inputs)
    assert_close_rel(actual.start_logits, expected.start_logits, 1e-5, "start logits")
    assert_close_rel(actual.end_logits, expected.end_logits, 1e-5, "end logits")
    assert_close_rel(actual.loss, expected.loss, 1e-5, "loss")


@pytest.mark.skipif(
    "logits_to_keep" not in inspect.signature(BartForCausalLM.forward).parameters,
    reason="this transformers' BartForCausalLM has no logits_to_keep to compare with",
)
def test_causal_lm_logits_to_keep_matches_stock(tmp_path):
    """BartForCausalLM (the decoder alone): an int keeps the last positions' logits, a tensor those positions'."""
    folder = save_stock(tmp_path, BartForCausalLM)
    ours = load_ours(folder, "sdpa", AutoModelForCausalLM)
    stock = load_stock(folder, BartForCausalLM)
    input_ids = torch.randint(3, VOCAB, (3, 11))
    with torch.no_grad():
        for keep in (0, 3, torch.tensor([0, 4, 7])):
            expected = stock(input_ids, logits_to_keep=keep).logits
            assert_close_rel(ours(input_ids, logits_to_keep=keep).logits, expected, 1e-5, f"logits_to_keep={keep}")


def test_backend_is_read_from_the_config_at_every_forward(seq2seq_folder):
    ours = load_ours(seq2seq_folder, "eager")
    batch = padded_batch()
    with torch.no_grad():
        ours(**batch)
        ours.config.attn_backend = "no-such-backend"
        with pytest.raises(ValueError, match="no-such-backend"):
            ours(**batch)


def test_a_3d_decoder_mask_is_refused(seq2seq_folder):
    """2-D padding masks and 4-D attention masks are taken (tests/test_stock_behaviour.py); nothing between."""
    ours = load_ours(seq2seq_folder, "sdpa")
    batch = padded_batch()
    batch["decoder_attention_mask"] = torch.ones(3, 9, 9)
    with pytest.raises(ValueError, match="2-D padding mask"):
        ours(**batch)


@pytest.mark.gpu
def test_bf16_backends_on_cuda_match_fp32_stock(tmp_path):
    from memory_efficient_adapter.attention import available_backends

    torch.manual_seed(3)
    # head_dim 16 so that flex and flash_attn can take the call; a checkpoint-like init_std, at which stock
    # BART itself stays well inside the bf16 tolerance.
    config = tiny_config(d_model=64, max_position_embeddings=128, vocab_size=128, init_std=0.05)
    stock = BartForConditionalGeneration(config)
    save_with_remote_code(stock, tmp_path, ["modeling_bart.py"], AUTO_MAP)
    stock = stock.cuda().eval()
    input_ids = torch.randint(3, 128, (3, 77), device="cuda")
    attention_mask = torch.ones(3, 77, dtype=torch.long, device="cuda")
    attention_mask[1, 50:] = 0
    attention_mask[2, :20] = 0
    decoder_input_ids = torch.randint(3, 128, (3, 41), device="cuda")
    decoder_attention_mask = torch.ones(3, 41, dtype=torch.long, device="cuda")
    decoder_attention_mask[1, 30:] = 0
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )
    keep = decoder_attention_mask.bool()
    with torch.no_grad():
        expected = stock(**batch).logits[keep]
    ran = []
    for backend in available_backends("cuda"):
        config = AutoConfig.from_pretrained(tmp_path)
        config.attn_backend = backend
        ours = AutoModelForSeq2SeqLM.from_pretrained(
            tmp_path, config=config, trust_remote_code=True, dtype=torch.bfloat16
        )
        ours = ours.cuda().eval()
        try:
            with torch.no_grad():
                actual = ours(**batch).logits[keep]
        except ValueError as error:
            if "cannot take this call" not in str(error):
                raise
            continue
        assert actual.dtype == torch.bfloat16
        assert_close_rel(actual.float(), expected, 2e-2, f"bf16 {backend}")
        ran.append(backend)
    assert "sdpa" in ran, ran
