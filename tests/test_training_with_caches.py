"""Training forwards that continue a cache (a cached prompt, a loss on the continuation, as RL code runs them),
and masks that must cover the cached and new tokens (a longer one read as stock reads it).

transformers' checkpointed layers run without the cache (a recompute in backward would write it twice): a
training forward with checkpointed layers (``gradient_checkpointing_enable`` or ``config.offload_checkpoints``)
that continues a filled cache is refused by name, where it silently left the cached tokens out (stock fails on a
shape mismatch with gradient checkpointing, and has no offloaded checkpoints). ``generate()`` on such a model left
in train mode would build a cache the layers never fill: refused by name at its first step (stock generates from
the newest token alone after the first step, silently).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from remote_code import assert_close_rel
from test_fused_models import TOL, assert_same_training_step, batch_for, family_pairs  # noqa: F401 - a fixture
from test_qwen import random_model
from transformers import DynamicCache, StaticCache

CAUSAL = ["llama", "gpt2", "bloom", "bart_causal"]


def prompt_and_answer(vocab: int = 97) -> tuple:
    generator = torch.Generator().manual_seed(21)
    return torch.randint(3, vocab, (2, 5), generator=generator), torch.randint(3, vocab, (2, 4), generator=generator)


def with_checkpointing(model, checkpointing: str):
    """``model`` with its layers checkpointed as ``checkpointing`` names ("gradient_checkpointing",
    "offload_checkpoints", or "" for neither)."""
    if checkpointing == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.offload_checkpoints = checkpointing == "offload_checkpoints"
    return model


def continued_loss(model, prompt, answer, checkpointing: str = "") -> torch.Tensor:
    """The training loss of ``answer`` after ``prompt``'s cache (built in eval mode, without gradients)."""
    return continued_step(model, prompt, answer, checkpointing).loss


def continued_step(model, prompt, answer, checkpointing: str = ""):
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    with_checkpointing(model, checkpointing)
    mask = torch.ones(answer.shape[0], prompt.shape[1] + answer.shape[1], dtype=torch.long)
    return model.train()(input_ids=answer, attention_mask=mask, past_key_values=cache, labels=answer)


@pytest.mark.parametrize("name", CAUSAL)
def test_a_training_forward_continuing_a_cache_matches_stock_and_returns_it(family_pairs, name):
    """With ``use_cache`` unset, the passed cache comes back holding prompt and answer, as stock's does (GPT-2
    returned none: our training forwards build no cache unless asked, and a passed one was not taken as asking)."""
    stock, ours, _ = family_pairs[name]
    prompt, answer = prompt_and_answer()
    expected = continued_step(copy.deepcopy(stock), prompt, answer)
    got = continued_step(copy.deepcopy(ours), prompt, answer)
    assert_close_rel(got.loss, expected.loss.detach(), TOL, "loss")
    assert got.past_key_values.get_seq_length() == expected.past_key_values.get_seq_length() == 9


@pytest.mark.parametrize("checkpointing", ["gradient_checkpointing", "offload_checkpoints"])
@pytest.mark.parametrize("name", CAUSAL)
def test_checkpointed_layers_refuse_to_continue_a_cache(family_pairs, name, checkpointing):
    """Ran with the cached tokens left out (the loss of the answer alone), silently."""
    _, ours, _ = family_pairs[name]
    prompt, answer = prompt_and_answer()
    with pytest.raises(ValueError, match="checkpointed layers .* cannot continue a cache: .* holds 5 tokens"):
        continued_loss(copy.deepcopy(ours), prompt, answer, checkpointing)


@pytest.mark.parametrize("checkpointing", ["gradient_checkpointing", "offload_checkpoints"])
def test_qwen_checkpointed_layers_refuse_to_continue_a_cache(checkpointing):
    prompt, answer = prompt_and_answer(vocab=101)
    with pytest.raises(ValueError, match="cannot continue a cache"):
        continued_loss(random_model(), prompt, answer, checkpointing)


@pytest.mark.parametrize("checkpointing", ["gradient_checkpointing", "offload_checkpoints"])
def test_checkpointed_training_without_a_cache_still_trains_like_stock(family_pairs, checkpointing):
    stock, ours, _ = family_pairs["llama"]
    ours = with_checkpointing(copy.deepcopy(ours), checkpointing)
    _, answer = prompt_and_answer()
    expected = stock.train()(input_ids=answer, labels=answer, use_cache=True).loss
    got = ours.train()(input_ids=answer, labels=answer, use_cache=True)
    assert_close_rel(got.loss, expected.detach(), TOL, "loss")


def checkpointed_in_train_mode(model, checkpointing: str):
    return with_checkpointing(copy.deepcopy(model), checkpointing).train()


def greedy(model, prompt, **kwargs) -> torch.Tensor:
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    return model.generate(
        input_ids=prompt, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=1,
        **kwargs,
    )


@pytest.mark.parametrize("checkpointing", ["gradient_checkpointing", "offload_checkpoints"])
@pytest.mark.parametrize("name", [*CAUSAL, "bart", "qwen"])
def test_generate_in_train_mode_with_checkpointed_layers_is_refused_by_name_and_runs_without_a_cache(
    family_pairs, name, checkpointing
):
    """Ours failed at the second step on a mask shape; without a cache (``use_cache=False``) it generates what eval
    mode generates (every dropout of these models is 0). transformers 5.0's ``generate`` passes BART no cache
    and every decoder token at each step: that runs, and generates as eval mode does."""
    model = random_model() if name == "qwen" else family_pairs[name][1]
    prompt, _ = prompt_and_answer()
    expected = greedy(copy.deepcopy(model).eval(), prompt)
    training = checkpointed_in_train_mode(model, checkpointing)
    try:
        assert torch.equal(greedy(training, prompt), expected)
    except ValueError as error:
        assert re.search(r"model in train mode whose layers are checkpointed .* Call model.eval\(\)", str(error))
    else:
        assert name == "bart" and transformers.__version__.startswith("5.0.")
    assert torch.equal(greedy(training, prompt, use_cache=False), expected)
    assert training.training


@pytest.mark.parametrize("checkpointing", ["gradient_checkpointing", "offload_checkpoints"])
@pytest.mark.parametrize("name", [*CAUSAL, "bart", "qwen"])
def test_checkpointed_layers_in_train_mode_return_no_cache_and_refuse_a_decode_loop(family_pairs, name, checkpointing):
    """An empty cache came back from ``use_cache=True`` (offloaded checkpoints; BART with either): continued in eval
    mode, it silently left the prompt out (stock returns None). A step of a no-gradient decode loop in train mode
    passing a cache, and one whose mask covers earlier tokens without cached ones (transformers 5.0's ``generate``
    passes no cache at first, a decode loop an empty one), ran on the new tokens alone. An empty cache in a
    training forward with gradients is one that happens to be passed: it runs, as on stock."""
    model = checkpointed_in_train_mode(random_model() if name == "qwen" else family_pairs[name][1], checkpointing)
    prompt, answer = prompt_and_answer()
    extra = {"decoder_input_ids": answer} if name == "bart" else {}
    for gradients in (True, False):
        with torch.set_grad_enabled(gradients):
            assert model(input_ids=prompt, use_cache=True, **extra).past_key_values is None
    expected = model(input_ids=prompt, labels=answer if name == "bart" else prompt).loss
    given = model(input_ids=prompt, labels=answer if name == "bart" else prompt, past_key_values=DynamicCache())
    assert torch.equal(given.loss, expected)
    step = dict(decoder_input_ids=answer[:, :1], input_ids=prompt) if name == "bart" else dict(input_ids=answer[:, :1])
    with torch.no_grad(), pytest.raises(ValueError, match=r"given a cache .* model in train mode whose layers are"):
        model(**step, past_key_values=DynamicCache(config=model.config))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask_name = "decoder_attention_mask" if name == "bart" else "attention_mask"
    with pytest.raises(ValueError, match=r"attention_mask covers 6 tokens, 1 of them new, with no cached ones"):
        model(**step, **{mask_name: mask})


def test_layers_in_eval_mode_under_a_training_model_generate_as_eval(family_pairs):
    """transformers' layers checkpoint only in training: with every layer in eval mode nothing is refused."""
    model = checkpointed_in_train_mode(family_pairs["llama"][1], "gradient_checkpointing")
    prompt, _ = prompt_and_answer()
    for layer in model.model.layers:
        layer.eval()
    assert torch.equal(greedy(model, prompt), greedy(copy.deepcopy(model).eval(), prompt))


def test_bloom_refuses_a_mask_longer_than_the_cached_and_new_tokens(family_pairs):
    """It read the mask's first columns (stock raises): a mask for a cache the forward was not given, say."""
    stock, ours, _ = family_pairs["bloom"]
    prompt, answer = prompt_and_answer()
    mask = torch.ones(2, prompt.shape[1] + answer.shape[1], dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(RuntimeError):
        stock.eval()(input_ids=answer, attention_mask=mask)
    with pytest.raises(ValueError, match=r"2-D padding mask \[batch, past \+ current length\] = \[2, 4\], got shape \[2, 9\]"):
        ours.eval()(input_ids=answer, attention_mask=mask)


def test_bloom_takes_a_mask_as_long_as_a_fixed_size_cache_and_no_longer(family_pairs):
    """``generate`` sizes a fixed-size cache's mask to the cache; longer than the cache is refused."""
    _, ours, _ = family_pairs["bloom"]
    prompt, answer = prompt_and_answer()

    def step_logits(mask_length: int) -> torch.Tensor:
        cache = StaticCache(config=ours.config, max_cache_len=16)
        with torch.no_grad():
            ours.eval()(input_ids=prompt, past_key_values=cache, use_cache=True)
            mask = torch.ones(2, mask_length, dtype=torch.long)
            return ours(input_ids=answer[:, :1], attention_mask=mask, past_key_values=cache, use_cache=True).logits

    assert_close_rel(step_logits(16), step_logits(6), TOL, "a mask as long as the cache")
    with pytest.raises(ValueError, match=r"= \[2, 6\], got shape \[2, 20\]"):
        step_logits(20)


def step_inputs(name: str, tokens, new, mask) -> dict:
    """A forward's inputs: ``new`` tokens with ``mask`` (BART's seq2seq head: as the decoder's, after ``tokens``)."""
    if name == "bart":
        return dict(input_ids=tokens, decoder_input_ids=new, decoder_attention_mask=mask)
    return dict(input_ids=new, attention_mask=mask)


def decode_with_the_whole_mask(model, name: str, tokens, mask, steps=(5, 2, 1, 1)) -> tuple:
    """Logits and cache of a decode loop into a ``DynamicCache`` that passes the whole sequence's mask at every
    step."""
    cache, logits, start = None, [], 0
    with torch.no_grad():
        for step in steps:
            inputs = step_inputs(name, tokens, tokens[:, start : start + step], mask)
            output = model.eval()(**inputs, past_key_values=cache, use_cache=True)
            cache, start = output.past_key_values, start + step
            logits.append(output.logits)
    return torch.cat(logits, dim=1), cache


def left_padded_tokens() -> tuple:
    tokens = torch.cat(prompt_and_answer(), dim=1)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    return tokens, mask


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart", "bart_causal"])
def test_a_mask_longer_than_the_keys_is_read_as_stock_reads_it(family_pairs, name):
    """Stock reads the first cached + new columns of a longer 2-D mask (a loop may pass the whole sequence's mask
    at every step); ours refused it when it held a zero and took it when it was all ones."""
    stock, ours, _ = family_pairs[name]
    tokens, mask = left_padded_tokens()
    kept = mask.bool()
    expected, _ = decode_with_the_whole_mask(stock, name, tokens, mask)
    got, _ = decode_with_the_whole_mask(ours, name, tokens, mask)
    assert_close_rel(got[kept], expected[kept], TOL, "logits")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart_causal"])
def test_a_training_batch_with_a_longer_mask_trains_as_stock(family_pairs, name):
    """The same read without a cache: the padded batch's mask with extra columns (zeros among them)."""
    stock, ours, _ = family_pairs[name]
    batch = batch_for(name, torch.Generator().manual_seed(4))
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.tensor([[1, 0, 1], [0, 1, 1]])], dim=1)
    assert_same_training_step(stock, ours, batch)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart", "bart_causal"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_mask_of_the_new_tokens_alone_is_refused_after_a_cache(family_pairs, name, padded):
    """Stock pads such a mask with zeros (the newest keys hidden: a wrong result). Ours refused it when it held a
    zero and silently took it when it was all ones (the new tokens then saw the cached prompt's padding)."""
    _, ours, _ = family_pairs[name]
    tokens, mask = left_padded_tokens()
    _, cache = decode_with_the_whole_mask(ours, name, tokens, mask[:, :5], steps=(5,))
    new_mask = torch.ones(2, 2, dtype=torch.long)
    new_mask[0, 0] = 0 if padded else 1
    with pytest.raises(ValueError, match=r"cover the cached and the new tokens \(5 \+ 2 = 7 positions\), got 2"):
        ours(**step_inputs(name, tokens, tokens[:, 5:7], new_mask), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_mask_of_the_new_tokens_alone_is_refused_with_a_fixed_size_cache(family_pairs, name):
    """Into a ``StaticCache`` an all-ones one passed too (the new tokens saw the cached prompt's padding)."""
    _, ours, _ = family_pairs[name]
    tokens, mask = left_padded_tokens()
    cache = StaticCache(config=ours.config, max_cache_len=16)
    with torch.no_grad():
        ours.eval()(input_ids=tokens[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"cover the cached and the new tokens \(5 \+ 2 = 7 positions\), got 2"):
            ours(input_ids=tokens[:, 5:7], attention_mask=torch.ones(2, 2).long(), past_key_values=cache)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart_causal"])
def test_a_traced_decode_step_reads_a_longer_mask_as_eager_does(family_pairs, name):
    """``torch.jit.trace`` of a prefill and a step into a ``DynamicCache``, both given the whole sequence's mask
    (the cache's length is a shape, so the cut is traced; it was left out while tracing, and the trace failed)."""
    _, ours, _ = family_pairs[name]
    tokens, mask = left_padded_tokens()

    def prefill_and_step(tokens, mask):
        cache = DynamicCache(config=ours.config)
        first = ours(input_ids=tokens[:, :5], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        second = ours(input_ids=tokens[:, 5:7], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        return torch.cat([first, second], dim=1)

    ours.eval().requires_grad_(False)
    try:
        with torch.no_grad():
            expected = prefill_and_step(tokens, mask)
            traced = torch.jit.trace(prefill_and_step, (tokens, mask), check_trace=False)
            kept = mask[:, :7].bool()
            assert_close_rel(traced(tokens, mask)[kept], expected[kept], TOL, "traced logits")
    finally:
        ours.requires_grad_(True)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_step_past_a_full_fixed_size_cache_is_refused_by_name(family_pairs, name):
    """A mask as long as the full cache was refused as too short, one a column longer as longer than the cache
    (stock fails on an index error): either way the message says the cache is full."""
    _, ours, _ = family_pairs[name]
    tokens, mask = left_padded_tokens()
    cache = StaticCache(config=ours.config, max_cache_len=5)
    with torch.no_grad():
        ours.eval()(input_ids=tokens[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
        for length in (5, 6):
            step_mask = torch.ones(2, length, dtype=torch.long)
            with pytest.raises(ValueError, match=r"the cache has 5 slots: 5 cached and 1 new tokens do not fit"):
                ours(input_ids=tokens[:, 5:6], attention_mask=step_mask, past_key_values=cache)
