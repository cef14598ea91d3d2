"""Qwen-7B options and generation settings beyond tests/test_qwen.py's core checks (which this file shares its
reference, helpers and saved model with): scale_attn_weights (ignored, as by the original), the dropouts, no
dynamic NTK or logn in training, logits_to_keep, how stop words given to generate() and chat() take effect, and
chat_stream's worker thread."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tests.remote_code import assert_close_rel, relative_error
from tests.qwen_reference import EOS, CharTokenizer, ReferenceQwen
from tests.test_qwen import load, random_ids, saved  # noqa: F401 - saved: a fixture


def test_scale_attn_weights_false_is_ignored_as_the_original_ignores_it(saved, caplog, monkeypatch):
    """The original's attention sets ``self.scale_attn_weights = True`` whatever the config says and always divides
    the scores by sqrt(kv_channels); ours left them unscaled (logits 0.44 off). Now the same logits, said once."""
    import logging
    import sys

    folder, _, _ = saved
    ids = random_ids(2, 9)
    scaled = load(folder)
    monkeypatch.setattr(sys.modules[type(scaled).__module__], "_logged_messages", set())
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"), torch.no_grad():
        actual = load(folder, scale_attn_weights=False)(ids).logits
        expected = scaled(ids).logits
    assert_close_rel(actual, expected, 1e-6, "logits with scale_attn_weights=False")
    assert sum("scale_attn_weights=False is ignored" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize("switched_off", ["module_in_eval", "identity"])
def test_an_attention_dropout_switched_off_by_its_module_trains_without_dropout(saved, switched_off):
    """The original calls ``attn_dropout`` on the weights, so the module decides: set to eval, or replaced by
    ``nn.Identity``, it drops nothing in training. Ours read its ``p`` by the attention's mode: it dropped in the
    first case and failed on the second (no ``p``)."""
    folder, _, _ = saved
    ids = random_ids(2, 9)
    model, plain = load(folder, attn_dropout_prob=0.5).train(), load(folder).train()
    for block in model.transformer.h:
        if switched_off == "identity":
            block.attn.attn_dropout = torch.nn.Identity()
        else:
            block.attn.attn_dropout.eval()
    with torch.no_grad():
        assert_close_rel(model(ids, labels=ids).loss, plain(ids, labels=ids).loss, 1e-6, "loss")


def test_training_uses_no_dynamic_ntk_or_logn_on_long_inputs(saved):
    """Past seq_length, eval mode would pick NTK alpha 7 and scale queries by logn; training mode does neither."""
    folder, config, state = saved
    model = load(folder).train()
    ids = random_ids(2, 3 * config.seq_length)
    with torch.no_grad():
        actual = model(ids).logits
    expected, _, alphas = ReferenceQwen(config, state).forward(ids, training=True)
    assert alphas == [1.0, 1.0]
    assert_close_rel(actual, expected.float(), 1e-5, "train-mode logits of a long input")


@pytest.mark.parametrize("dropout", ["emb_dropout_prob", "attn_dropout_prob"])
def test_each_dropout_applies_in_training_only(saved, dropout):
    folder, config, state = saved
    model = load(folder, **{dropout: 0.5})
    ids = random_ids(2, 9)
    with torch.no_grad():
        evaluated = model(ids).logits
        trained = model.train()(ids).logits
    expected, _, _ = ReferenceQwen(config, state).forward(ids)
    assert_close_rel(evaluated, expected.float(), 1e-5, f"eval logits with {dropout} set")
    assert relative_error(trained, evaluated) > 1e-2, f"{dropout} had no effect in training"


def test_logits_to_keep_int_and_tensor_select_the_reference_positions(saved):
    """An int keeps the last positions' logits, a 1-D tensor the logits of the positions it lists."""
    folder, config, state = saved
    model = load(folder)
    ids = random_ids(2, 9)
    expected, _, _ = ReferenceQwen(config, state).forward(ids)
    with torch.no_grad():
        for keep, positions in ((2, [7, 8]), (torch.tensor([0, 3, 8]), [0, 3, 8])):
            actual = model(ids, logits_to_keep=keep).logits
            assert_close_rel(actual, expected[:, positions].float(), 1e-5, f"logits_to_keep={keep}")


def first_greedy_tokens(model, ids, count: int = 2) -> list[int]:
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    return plain[0, ids.shape[1] : ids.shape[1] + count].tolist()


def test_a_multi_token_stop_word_ends_the_row_beside_an_eos_stop_word(saved):
    """stop_words_ids=[[EOS], [a, b]]: EOS alone would need no stop-word processor, the two-token word does."""
    model = load(saved[0])
    ids = random_ids(1, 7)
    words = first_greedy_tokens(model, ids)
    with torch.no_grad():
        stopped = model.generate(
            ids, max_new_tokens=4, do_sample=False, stop_words_ids=[[EOS], words], eos_token_id=EOS
        )
    assert stopped[0, 7:].tolist() == words + [EOS], (words, stopped)


def test_the_calls_stop_words_win_over_the_generation_configs(saved):
    model = load(saved[0])
    ids = random_ids(1, 7)
    words = first_greedy_tokens(model, ids)
    never = [[99, 98, 97]]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=EOS, pad_token_id=0, stop_words_ids=never)
    with torch.no_grad():
        stopped = model.generate(ids, generation_config=config, stop_words_ids=[words])
        unstopped = model.generate(ids, generation_config=config)
    assert stopped[0, 7:].tolist() == words + [EOS], (words, stopped)
    assert unstopped[0, 7:9].tolist() == words and EOS not in unstopped[0, 7:].tolist(), (words, unstopped)


def test_chat_and_chat_stream_stop_on_the_chatml_stop_words(saved, monkeypatch):
    """chat() and chat_stream() pass <|im_end|> and <|im_start|> (the original's get_stop_words_ids) to generate(),
    besides the caller's own stop words. A random model rarely emits them, and chat()'s text hides what follows
    them, so the test records what generate() is given."""
    model = load(saved[0])
    model.generation_config.chat_format = "chatml"
    model.generation_config.max_new_tokens = 2
    model.generation_config.eos_token_id = EOS
    tokenizer = CharTokenizer()
    seen = []
    real_generate = type(model).generate

    def recording_generate(self, *args, **kwargs):
        seen.append(kwargs.get("stop_words_ids"))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", recording_generate)
    model.chat(tokenizer, "hi", history=None, stop_words_ids=[[50, 51]])
    list(model.chat_stream(tokenizer, "hi", history=None))
    assert len(seen) == 2 and [50, 51] in seen[0], seen
    for words in seen:
        assert [tokenizer.im_end_id] in words and [tokenizer.im_start_id] in words, words


def chatting_model(folder, max_new_tokens: int):
    """Our Qwen in ChatML mode that never ends a reply early (the stop and special ids suppressed)."""
    model = load(folder)
    model.generation_config.chat_format = "chatml"
    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.eos_token_id = EOS
    model.generation_config.suppress_tokens = list(range(10))
    return model


def test_chat_stream_stops_generating_once_its_reader_stops(saved):
    """The original's chat_stream is a generator in the reader's thread: nothing runs unread. Ours generates in a
    worker thread, which before went on to max_new_tokens after a ``break`` (and a script exiting meanwhile
    aborted in torch's teardown); now it waits for the reader and ends once the generator is closed."""
    import threading
    import time

    model = chatting_model(saved[0], max_new_tokens=200)
    forwards = []
    model.transformer.register_forward_pre_hook(lambda *args: forwards.append(1))
    stream = model.chat_stream(CharTokenizer(), "hi", history=None)
    for chunks, _ in enumerate(stream, start=1):
        if chunks == 3:
            break
    time.sleep(0.5)  # the generator is still held: the worker waits for the reader, a token or two ahead at most
    assert len(forwards) <= chunks + 3, len(forwards)
    stream.close()
    workers = [thread for thread in threading.enumerate() if thread.name.endswith("(run)")]
    assert not workers and len(forwards) <= chunks + 3, (workers, len(forwards))


def test_chat_stream_samples_only_while_its_reader_waits(saved):
    """The original's chat_stream samples inside ``next()``: a reader drawing from torch's generator between reads
    gets the same text on every run with one seed. Ours did not: its worker sampled the next token meanwhile."""
    import time

    model = chatting_model(saved[0], max_new_tokens=10)
    model.generation_config.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)

    def read(pause: float) -> str:
        torch.manual_seed(0)
        text = ""
        for text in model.chat_stream(CharTokenizer(), "hi", history=None):
            time.sleep(pause)
            torch.rand(1)  # the reader's own use of the generator
        return text

    texts = {read(pause) for pause in (0.0, 0.0, 0.01, 0.0, 0.02, 0.0)}
    assert len(texts) == 1, texts


def test_chat_stream_generates_in_the_readers_autocast(saved):
    """Autocast is per thread: the worker thread enters the regions its reader is in at the first ``next()``, as
    the original's chat_stream (computing in the reader's thread when read) and chat() compute under them."""
    model = chatting_model(saved[0], max_new_tokens=3)
    head_dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        streamed = list(model.chat_stream(CharTokenizer(), "hi", history=None))
        made_here = model.chat_stream(CharTokenizer(), "hi", history=None)
    assert streamed and head_dtypes == [torch.bfloat16] * 3, head_dtypes
    assert list(made_here) and head_dtypes[3:] == [torch.float32] * 3, head_dtypes  # read outside autocast


def test_a_cache_passed_with_use_cache_false_is_read_and_comes_back_updated_as_stock(saved):
    """The past keys are attended to, and the cache object, which the step updates (as stock's caches are), comes
    back as stock returns it: ours updated it and returned None, so a caller who kept the prompt's cache to score
    several continuations found it grown without being told (the original's tuple cache is never written)."""
    folder, _, _ = saved
    model = load(folder)
    ids = random_ids(2, 9)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values
        rest = model(ids[:, 6:], past_key_values=cache, use_cache=False)
        full = model(ids).logits
    assert rest.past_key_values is cache and cache.get_seq_length() == 9
    assert_close_rel(rest.logits, full[:, 6:], 1e-5, "logits of the tokens after a passed cache")
