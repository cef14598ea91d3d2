"""Our heads under the tools users put around them: tuple outputs in training, a checkpoint loaded into another
head, the Trainer's NEFTune hook on the input embeddings, and torch.autocast over a float64 model. Same weights
and inputs as the stock class (loaded through trust_remote_code); Qwen, which has no stock class, against itself.

Runs on transformers 5.x and 4.57.x.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModel

from memory_efficient_adapter.configuration_qwen import QWenConfig
from memory_efficient_adapter.families import write_remote_code
from remote_code import TRANSFORMERS_5, assert_close_rel, relative_error
from test_stock_behaviour import TOL, VOCAB, family_config, head_inputs, randomize_, stock_and_ours, token_inputs

try:
    from transformers.integrations.neftune import neftune_post_forward_hook
except ImportError:  # transformers 4.x keeps it with the Trainer's utilities
    from transformers.trainer_utils import neftune_post_forward_hook

NO_DROPOUT = {
    "llama": {"classifier_dropout": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "classifier_dropout": 0.0},
    "bloom": {"hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0},
}


@pytest.mark.parametrize("family", list(NO_DROPOUT))
def test_token_classification_tuple_in_training_mode_matches_stock(family, tmp_path):
    """return_dict=False in training: (loss, logits, hidden states), as stock, though ours builds no cache there."""
    class_name = {"llama": "LlamaForTokenClassification", "gpt2": "GPT2ForTokenClassification",
                  "bloom": "BloomForTokenClassification"}[family]
    stock, ours = stock_and_ours(family, class_name, tmp_path, family_config(family, **NO_DROPOUT[family]))
    inputs = head_inputs(family, class_name)
    expected = stock.train()(**inputs, output_hidden_states=True, return_dict=False)
    actual = ours.train()(**inputs, output_hidden_states=True, return_dict=False)
    assert len(actual) == len(expected) == 3
    assert_close_rel(actual[0], expected[0], TOL, f"{class_name} loss")
    assert_close_rel(actual[1], expected[1], TOL, f"{class_name} logits")
    assert len(actual[2]) == len(expected[2]) == 4
    for layer, (mine, theirs) in enumerate(zip(actual[2], expected[2])):
        assert_close_rel(mine, theirs, TOL, f"{class_name} hidden state {layer}")


def test_double_heads_model_scores_each_choice_with_one_logit(tmp_path):
    """Stock sets num_labels = 1 before building the choice summary, whatever the config says (default 2), so an
    LM checkpoint (the class's documented starting point) loads into it and scores one logit per choice."""
    stock_lm = transformers.GPT2LMHeadModel(family_config("gpt2", **NO_DROPOUT["gpt2"]))
    randomize_(stock_lm)
    folder = tmp_path / "lm"
    stock_lm.save_pretrained(folder)
    write_remote_code(folder, "gpt2", {"AutoModel": "modeling_gpt2.GPT2DoubleHeadsModel"})
    ours = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    stock = transformers.GPT2DoubleHeadsModel.from_pretrained(folder).eval()
    assert ours.config.num_labels == stock.config.num_labels == 1
    ours.multiple_choice_head.load_state_dict(stock.multiple_choice_head.state_dict())  # freshly drawn in both
    inputs = head_inputs("gpt2", "GPT2DoubleHeadsModel")
    with torch.no_grad():
        expected, actual = stock(**inputs), ours(**inputs)
    assert actual.mc_logits.shape == expected.mc_logits.shape == inputs["mc_token_ids"].shape
    assert_close_rel(actual.mc_logits, expected.mc_logits, TOL, "mc_logits")
    assert_close_rel(actual.mc_loss, expected.mc_loss, TOL, "mc_loss")


CAUSAL_LM = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bloom": "BloomForCausalLM"}


def right_padded_batch(seed: int = 3) -> dict:
    """Three rows of 9 tokens, two of them right-padded, with labels only where a kept token is predicted."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:], mask[2, 4:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def neftune_step(model, inputs: dict) -> tuple[torch.Tensor, list, torch.Tensor]:
    """A training step with the Trainer's NEFTune hook: the loss, the shapes the hook saw, the embedding grad."""
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = 5.0
    seen = []
    hooks = [embeddings.register_forward_hook(neftune_post_forward_hook),
             embeddings.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))]
    torch.manual_seed(11)
    loss = model.train()(**inputs).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss, seen, embeddings.weight.grad


def qwen_model() -> torch.nn.Module:
    from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

    torch.manual_seed(0)
    config = QWenConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
                        intermediate_size=64, seq_length=32, max_position_embeddings=32, fp32=True)
    model = QWenLMHeadModel(config)
    randomize_(model)
    return model


@pytest.mark.parametrize("family", [*CAUSAL_LM, "qwen"])
def test_neftune_noise_matches_stock_on_a_padded_batch(family, tmp_path):
    """NEFTune scales its noise by the embedding output's shape: our heads run a padded batch as one packed row
    of its kept tokens, so a hooked embedding is run on the padded batch first, giving stock's shape and noise
    (Qwen: the same as its own run at full rows, ``config.unpad_batches = False``)."""
    inputs = right_padded_batch()
    if family == "qwen":
        ours = qwen_model()
        ours.config.unpad_batches = False
        expected_loss, expected_shapes, expected_grad = neftune_step(ours, inputs)
        ours.config.unpad_batches, ours.transformer.wte.weight.grad = None, None
    else:
        config = family_config(family, **NO_DROPOUT[family])
        stock, ours = stock_and_ours(family, CAUSAL_LM[family], tmp_path, config)
        expected_loss, expected_shapes, expected_grad = neftune_step(stock, inputs)
    loss, shapes, grad = neftune_step(ours, inputs)
    assert shapes == expected_shapes == [(3, 9, ours.config.hidden_size)]
    assert_close_rel(loss, expected_loss, TOL, f"{family} loss with NEFTune")
    assert_close_rel(grad, expected_grad, 1e-4, f"{family} embedding gradient with NEFTune")
    torch.manual_seed(11)
    with torch.no_grad():
        plain = ours(**inputs).loss
    assert (plain - loss).abs() > 1e-4  # the noise was there


class LengthScaledEmbedding(torch.nn.Embedding):
    """An embedding whose output depends on the shape it is given (as NEFTune written as a subclass would)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * 4.0 / input_ids.shape[-1] ** 0.5


def loss_and_embedding_grad(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    loss = model.train()(**inputs).loss
    loss.backward()
    return loss, model.get_input_embeddings().weight.grad


@pytest.mark.parametrize("family", [*CAUSAL_LM, "qwen"])
def test_an_embedding_subclass_sees_the_padded_batch_as_in_stock(family, tmp_path):
    """A padded batch runs as one packed row of its kept tokens, but only a bare ``nn.Embedding`` may embed the
    packed ids: any other input-embedding module is given the padded ``[b, s]`` ids, as in stock (Qwen: as in
    its own run at full rows)."""
    inputs = right_padded_batch()
    if family == "qwen":
        ours = qwen_model()
        stock = qwen_model()
        stock.config.unpad_batches = False
    else:
        stock, ours = stock_and_ours(family, CAUSAL_LM[family], tmp_path, family_config(family, **NO_DROPOUT[family]))
    torch.manual_seed(5)
    embedding = LengthScaledEmbedding(VOCAB, ours.config.hidden_size)
    stock.set_input_embeddings(copy.deepcopy(embedding))
    ours.set_input_embeddings(embedding)
    expected_loss, expected_grad = loss_and_embedding_grad(stock, inputs)
    loss, grad = loss_and_embedding_grad(ours, inputs)
    assert_close_rel(loss, expected_loss, TOL, f"{family} loss with a subclassed embedding")
    assert_close_rel(grad, expected_grad, 1e-4, f"{family} embedding gradient with a subclassed embedding")


def float64_loss_and_grads(model, inputs: dict, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.train()(**inputs).loss
        with torch.no_grad():
            logits = model.eval()(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    loss.backward()
    return loss, logits, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart", "qwen"])
def test_autocast_leaves_a_float64_model_in_float64(family, tmp_path):
    """Autocast casts float32/16 tensors only: a float64 model under it runs in float64 as without it (stock
    does), in training (the fused loss, MLP and norms) and in eval (attention)."""
    if family == "qwen":
        ours = qwen_model()
    else:
        lm = {**CAUSAL_LM, "bart": "BartForConditionalGeneration"}[family]
        no_dropout = {"bart": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}, **NO_DROPOUT}
        stock, ours = stock_and_ours(family, lm, tmp_path, family_config(family, **no_dropout[family]))
    ours = ours.double()
    inputs = right_padded_batch()
    if family == "bart":
        inputs.pop("labels")
        inputs["labels"] = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    loss, logits, grads = float64_loss_and_grads(ours, inputs, autocast=True)
    expected_loss, expected_logits, expected_grads = float64_loss_and_grads(ours, inputs, autocast=False)
    assert loss.dtype == logits.dtype == torch.float64
    assert_close_rel(loss, expected_loss, 1e-12, f"{family} loss")
    assert_close_rel(logits, expected_logits, 1e-12, f"{family} logits")
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == torch.float64 and torch.allclose(grad, expected_grads[name], rtol=1e-10, atol=1e-14), name


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_one_source_scored_against_several_targets_broadcasts_like_stock(family, tmp_path):
    """Encoder states of batch 1 with a decoder batch of 3: stock's attention broadcasts the source over every
    decoder row; so do we (BART's decoder, GPT-2 with cross-attention), with the source's gradient summed."""
    if family == "bart":
        config = family_config("bart", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        stock, ours = stock_and_ours("bart", "BartForCausalLM", tmp_path, config)
    else:
        config = family_config("gpt2", add_cross_attention=True, **NO_DROPOUT["gpt2"])
        stock, ours = stock_and_ours("gpt2", "GPT2LMHeadModel", tmp_path, config)
    generator = torch.Generator().manual_seed(8)
    targets = torch.randint(3, VOCAB, (3, 6), generator=generator)
    source = torch.randn(1, 5, 32, generator=generator)
    source_mask = torch.tensor([[1, 1, 1, 1, 0]])
    results = []
    for model, rows in ((stock, 3), (ours, 1)):  # stock given the source expanded (older stock cannot broadcast)
        states = source.clone().requires_grad_()
        output = model(input_ids=targets, encoder_hidden_states=states.expand(rows, -1, -1).contiguous(),
                       encoder_attention_mask=source_mask.expand(rows, -1))
        output.logits.square().sum().backward()
        results.append((output.logits.detach(), states.grad))
    (expected, expected_grad), (actual, grad) = results
    assert actual.shape == expected.shape == (3, 6, VOCAB)
    assert_close_rel(actual, expected, TOL, f"{family} logits")
    assert_close_rel(grad, expected_grad, 1e-4, f"{family} source gradient")


GPT2_HEADS = ["GPT2ForSequenceClassification", "GPT2ForTokenClassification", "GPT2ForQuestionAnswering",
              "GPT2DoubleHeadsModel"]


@pytest.mark.parametrize("class_name", GPT2_HEADS)
def test_gpt2_heads_hand_their_keywords_to_the_base_model(class_name, tmp_path):
    """Stock GPT-2 heads pass what their signature does not name (encoder states, a cache) on to GPT2Model (from
    transformers 5.x; older ones drop it): with cross-attention, the heads' outputs depend on the encoder states,
    equal to stock's where stock reads them."""
    config = family_config("gpt2", add_cross_attention=True, **NO_DROPOUT["gpt2"])
    stock, ours = stock_and_ours("gpt2", class_name, tmp_path, config)
    inputs = {k: v for k, v in head_inputs("gpt2", class_name).items() if "labels" not in k and "positions" not in k}
    source = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        actual, unconditioned = ours(**inputs, encoder_hidden_states=source), ours(**inputs)
        stock_unconditioned = stock(**inputs)
        try:
            expected = stock(**inputs, encoder_hidden_states=source)
        except TypeError:  # transformers 4.x heads take no other keywords
            expected = stock_unconditioned
    names = [name for name in ("logits", "mc_logits", "start_logits", "end_logits") if name in expected]
    assert names
    for name in names:
        assert not torch.allclose(getattr(actual, name), getattr(unconditioned, name), atol=1e-4), name
        if not torch.equal(getattr(expected, name), getattr(stock_unconditioned, name)):  # stock read the states
            assert_close_rel(getattr(actual, name), getattr(expected, name), TOL, f"{class_name}.{name}")


@pytest.mark.parametrize("family", ["gpt2", "bloom", "bart"])
def test_an_unknown_problem_type_gives_no_loss_as_stock(family, tmp_path):
    class_name = f"{dict(gpt2='GPT2', bloom='Bloom', bart='Bart')[family]}ForSequenceClassification"
    stock, ours = stock_and_ours(family, class_name, tmp_path)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4)),
              "labels": torch.rand(2, 2, generator=torch.Generator().manual_seed(5))}
    if family == "bart":
        inputs["input_ids"][:, -1] = stock.config.eos_token_id
    for model in (stock, ours):  # not one of the three stock knows (transformers 5.17's config refuses to set it)
        vars(model.config)["problem_type"] = "multi_label"
    expected, actual = stock(**inputs), ours(**inputs)
    assert expected.loss is None and actual.loss is None
    assert_close_rel(actual.logits, expected.logits, TOL, f"{class_name} logits")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "bart"])
def test_a_saved_model_carries_our_code_and_reloads_as_ours(family, tmp_path):
    """transformers 4.57 and 5.0 register a remote-code class for saving only where they have no class of that
    model type: our LLaMA, GPT-2, BLOOM and BART saved an ``auto_map`` naming a modeling file they did not write."""
    class_name = {**CAUSAL_LM, "bart": "BartForConditionalGeneration"}[family]
    stock, ours = stock_and_ours(family, class_name, tmp_path / "first", family_config(family))
    ours.save_pretrained(tmp_path / "saved")
    module_file = f"{type(ours).__module__.rsplit('.', 1)[-1]}.py"
    assert (tmp_path / "saved" / module_file).is_file()
    reloaded = AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules") and type(reloaded).__name__ == class_name
    inputs = head_inputs(family, class_name)
    with torch.no_grad():
        assert_close_rel(reloaded(**inputs).logits, stock(**inputs).logits, TOL, f"{class_name} reloaded")


def test_an_auto_map_entry_this_transformers_lacks_does_not_stop_saving(tmp_path, monkeypatch):
    """Saving registers the first Auto class of the config's ``auto_map`` naming the model's class that this
    transformers has (``AutoModelWithLMHead`` is gone from 5.x: registering it raised)."""
    from memory_efficient_adapter.modeling_gpt2 import GPT2LMHeadModel

    monkeypatch.setattr(GPT2LMHeadModel, "_auto_class", None)  # the class attribute registering sets
    model = GPT2LMHeadModel(family_config("gpt2"))
    entry = "modeling_gpt2.GPT2LMHeadModel"
    model.config.auto_map = {"AutoModelOfNoKind": entry, "AutoModelForCausalLM": entry}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_gpt2.py").is_file()
    assert GPT2LMHeadModel._auto_class == "AutoModelForCausalLM"


HEAD_MASKED = {"gpt2": "GPT2LMHeadModel", "bloom": "BloomForCausalLM", "bart": "BartForConditionalGeneration"}


@pytest.mark.parametrize("family", sorted(HEAD_MASKED))
def test_a_head_mask_is_refused_where_stock_applies_it_and_ignored_where_stock_ignores_it(family, tmp_path):
    """transformers 4.x's stock eager attention applies a head mask (BLOOM's always); ours took it in ``**kwargs``
    and ignored it (BLOOM's logits 13% off stock's). There ours refuse it by name; transformers 5 ignores head
    masks, and so do ours."""
    stock, ours = stock_and_ours(family, HEAD_MASKED[family], tmp_path)
    inputs = token_inputs(family)
    inputs.pop("attention_mask")
    config = ours.config
    layers, heads = (config.encoder_layers, config.encoder_attention_heads) if family == "bart" else (
        config.num_hidden_layers, config.num_attention_heads)
    head_mask = torch.ones(layers, heads)
    head_mask[0, 1] = head_mask[layers - 1, 0] = 0.0
    with torch.no_grad():
        stock_logits, stock_masked = (stock(**inputs, **extra).logits for extra in ({}, {"head_mask": head_mask}))
        if TRANSFORMERS_5:
            assert torch.equal(stock_masked, stock_logits)
            assert torch.equal(ours(**inputs, head_mask=head_mask).logits, ours(**inputs).logits)
            return
        assert relative_error(stock_masked, stock_logits) > 1e-3
        with pytest.raises(ValueError, match="head_mask is not supported: the fused attention kernels"):
            ours(**inputs, head_mask=head_mask)
