"""transformers' common model tests (``ModelTesterMixin`` of the transformers sdist) on our classes or on stock's.

``MEA_SUITE_IMPL=ours`` (default) runs them on the classes of ``memory_efficient_adapter.modeling_<family>``,
``MEA_SUITE_IMPL=stock`` on transformers' own, with the same configs and inputs, so the two counts compare.
Run through ``scripts/run_transformers_suites.sh``, which lays this file out next to the sdist's tests.
"""

from __future__ import annotations

import importlib
import os
import unittest

import torch
import transformers
from transformers import BartConfig, BloomConfig, GPT2Config, LlamaConfig

from .test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

IMPL = os.environ.get("MEA_SUITE_IMPL", "ours")


def family_classes(family: str, names: tuple) -> tuple:
    """The classes under test: ours from our modeling file, or transformers' own."""
    module = transformers if IMPL == "stock" else importlib.import_module(f"memory_efficient_adapter.modeling_{family}")
    classes = tuple(getattr(module, name) for name in names)
    for cls in classes:
        is_stock = cls.__module__.startswith("transformers.")
        if is_stock != (IMPL == "stock"):
            raise RuntimeError(f"{cls.__module__}.{cls.__name__} is not the {IMPL} class")
    return classes


class FamilyTester:
    """Builds the tiny config and inputs transformers' per-model testers build (batch 13, 7 tokens, 2 layers)."""

    batch_size = 13
    seq_length = 7
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    is_training = True
    pad_token_id = 0

    def __init__(self, parent, family: str):
        self.parent = parent
        self.family = family

    def get_config(self):
        common = dict(vocab_size=self.vocab_size, pad_token_id=self.pad_token_id)
        if self.family == "llama":
            return LlamaConfig(
                hidden_size=self.hidden_size, intermediate_size=37, num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads, num_key_value_heads=2, max_position_embeddings=512,
                **common,
            )
        if self.family == "gpt2":
            return GPT2Config(
                n_embd=self.hidden_size, n_layer=self.num_hidden_layers, n_head=self.num_attention_heads, n_inner=37,
                n_positions=512, bos_token_id=self.vocab_size - 1, eos_token_id=self.vocab_size - 1, **common,
            )
        if self.family == "bloom":
            return BloomConfig(hidden_size=self.hidden_size, n_layer=self.num_hidden_layers,
                               n_head=self.num_attention_heads, **common)
        return BartConfig(
            d_model=16, encoder_layers=self.num_hidden_layers, decoder_layers=self.num_hidden_layers,
            encoder_attention_heads=self.num_attention_heads, decoder_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=4, decoder_ffn_dim=4, max_position_embeddings=20, eos_token_id=2, bos_token_id=0,
            decoder_start_token_id=2, vocab_size=self.vocab_size, pad_token_id=1,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        if self.family != "bart":
            return config, {"input_ids": input_ids, "attention_mask": random_attention_mask(input_ids.shape)}
        input_ids[:, -1] = config.eos_token_id
        decoder_input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        return config, {
            "input_ids": input_ids,
            "decoder_input_ids": decoder_input_ids,
            "attention_mask": input_ids.ne(config.pad_token_id),
            "decoder_attention_mask": decoder_input_ids.ne(config.pad_token_id),
        }


class FamilyTest(ModelTesterMixin):
    family = ""

    def setUp(self):
        self.model_tester = FamilyTester(self, self.family)


class LlamaSuite(FamilyTest, unittest.TestCase):
    family = "llama"
    all_model_classes = family_classes(
        "llama",
        ("LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForQuestionAnswering",
         "LlamaForTokenClassification"),
    )


class GPT2Suite(FamilyTest, unittest.TestCase):
    family = "gpt2"
    all_model_classes = family_classes(
        "gpt2",
        ("GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForQuestionAnswering",
         "GPT2ForTokenClassification"),
    )


class BloomSuite(FamilyTest, unittest.TestCase):
    family = "bloom"
    all_model_classes = family_classes(
        "bloom",
        ("BloomModel", "BloomForCausalLM", "BloomForSequenceClassification", "BloomForTokenClassification",
         "BloomForQuestionAnswering"),
    )


class BartSuite(FamilyTest, unittest.TestCase):
    family = "bart"
    is_encoder_decoder = True
    all_model_classes = family_classes(
        "bart", ("BartModel", "BartForConditionalGeneration", "BartForSequenceClassification", "BartForQuestionAnswering")
    )


torch.manual_seed(0)
