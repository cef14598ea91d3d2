"""Weights drawn by our classes as stock draws them: from one seed, and when users call ``_init_weights`` on parts
of a model (re-initialising layers before fine-tuning). The stock classes are transformers' own; Qwen's scheme is
the original's (``c_proj`` drawn again at the scaled std when its attention or MLP module is passed)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, GPT2Config
from transformers import BartForConditionalGeneration, GPT2LMHeadModel

from memory_efficient_adapter.configuration_qwen import QWenConfig
from memory_efficient_adapter.families import write_remote_code
from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel


def our_class_for(stock_model, family: str, auto_class, tmp_path):
    """Our class as a user gets it: a config saved with our files, read back through ``trust_remote_code``."""
    folder = tmp_path / family
    stock_model.save_pretrained(folder)
    write_remote_code(folder, family)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = auto_class.from_config(config, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    return type(model), config


def filled(model):
    """Every parameter set to one value, so that whatever a re-initialisation leaves alone shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.5)
    return model


gpt2_stock_scheme = pytest.mark.skipif(
    transformers.__version__.startswith("5.0."), reason="transformers 5.0's stock GPT-2 never scales c_proj"
)


def gpt2_pair(tmp_path):
    config = GPT2Config(vocab_size=101, n_embd=64, n_layer=8, n_head=4, n_positions=64)
    ours_class, ours_config = our_class_for(GPT2LMHeadModel(config), "gpt2", AutoModelForCausalLM, tmp_path)
    return filled(ours_class(ours_config)), filled(GPT2LMHeadModel(config))


@gpt2_stock_scheme
@pytest.mark.parametrize("call", ["attention and MLP", "every module of a block, parents first"])
def test_gpt2_init_weights_on_parts_of_a_block_draws_what_stock_draws(call, tmp_path):
    """Stock draws the scaled ``c_proj`` when its attention or MLP module is passed; ours drew it when the
    projection itself was passed, so re-initialising ``block.attn`` left the old weights (std 0 here) and
    walking ``block.modules()`` (parents first) gave the scaled std where stock ends on the plain one."""
    ours, stock = gpt2_pair(tmp_path)
    for model in (ours, stock):
        block = model.transformer.h[2]
        modules = [block.attn, block.mlp] if call == "attention and MLP" else list(block.modules())
        torch.manual_seed(5)
        for module in modules:
            model._init_weights(module)
    assert ours.transformer.h[2].attn.c_proj.weight.std() > 0
    for name, tensor in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


@gpt2_stock_scheme
def test_gpt2_init_weights_applied_to_a_block_scales_its_projections_as_stock(tmp_path):
    ours, stock = gpt2_pair(tmp_path)
    for model in (ours, stock):
        torch.manual_seed(6)
        model.transformer.h[1].apply(model._init_weights)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert abs(ours.transformer.h[1].mlp.c_proj.weight.std().item() / scaled - 1) < 0.1
    for name, tensor in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def qwen_model(**overrides) -> QWenLMHeadModel:
    config = QWenConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=8,
                        intermediate_size=128, seq_length=64, initializer_range=0.02, fp32=True, **overrides)
    return QWenLMHeadModel(config)


def test_qwen_init_weights_on_attention_and_mlp_draws_their_projection_again_at_the_scaled_std():
    """The original's ``_init_weights`` draws ``c_proj.weight`` at 0.02 / sqrt(2 * layers) when given the module
    that holds it; ours did nothing there."""
    model = filled(qwen_model())
    block = model.transformer.h[3]
    model._init_weights(block.attn)
    model._init_weights(block.mlp)
    scaled = 0.02 / math.sqrt(2 * 8)
    for name, param in block.named_parameters():
        if name in ("attn.c_proj.weight", "mlp.c_proj.weight"):
            assert abs(param.std().item() / scaled - 1) < 0.1, (name, param.std().item())
        else:
            assert torch.equal(param, torch.full_like(param, 0.5)), name


def original_qwen_init(module: torch.nn.Module, std: float, layers: int) -> None:
    """The original's per-module scheme, as written out in its ``_init_weights``: plain draws, then every
    ``c_proj.weight`` directly under the module drawn again at the scaled std."""
    if isinstance(module, torch.nn.Linear):
        module.weight.data.normal_(mean=0.0, std=std)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, torch.nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=std)
    elif type(module).__name__ == "RMSNorm":
        module.weight.data.fill_(1.0)
    for name, param in module.named_parameters():
        if name == "c_proj.weight":
            param.data.normal_(mean=0.0, std=std / math.sqrt(2 * layers))


def test_qwen_init_over_every_module_draws_as_the_original():
    """One seed, every module passed children first (``apply``, as transformers does): the same draws, in the same
    order, as the original's scheme (ours drew each ``c_proj`` once, at the scaled std)."""
    ours, original = filled(qwen_model()), filled(qwen_model())
    torch.manual_seed(7)
    ours.apply(ours._init_weights)
    torch.manual_seed(7)
    original.apply(lambda module: original_qwen_init(module, 0.02, 8))
    for name, tensor in original.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def bart_config(**overrides) -> BartConfig:
    settings = dict(vocab_size=90, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return BartConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {"init_std": 0.02, "initializer_range": 0.3},  # transformers 5 draws at initializer_range, 4.x at init_std
        {"tie_word_embeddings": False},  # 4.x shares one matrix between the stacks, whatever the config says
    ],
    ids=["initializer_range", "untied"],
)
def test_bart_from_one_seed_gives_stocks_weights_and_sharing(overrides, tmp_path):
    config = bart_config(**overrides)
    ours_class, ours_config = our_class_for(
        BartForConditionalGeneration(config), "bart", AutoModelForSeq2SeqLM, tmp_path
    )
    torch.manual_seed(8)
    ours = ours_class(ours_config)
    torch.manual_seed(8)
    stock = BartForConditionalGeneration(config)
    assert list(ours.state_dict()) == list(stock.state_dict())
    for name, tensor in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert ours.num_parameters() == stock.num_parameters()
    for name in ("encoder.embed_tokens", "decoder.embed_tokens"):
        shares = stock.model.get_submodule(name).weight is stock.model.shared.weight
        assert (ours.model.get_submodule(name).weight is ours.model.shared.weight) == shares, name
