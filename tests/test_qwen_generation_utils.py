"""modeling/qwen_generation_utils.py: the ChatML prompt, response decoding and stop words that modeling_qwen.py's
chat(), chat_stream() and stop_words_ids use, and a folder holding only our three files loading and chatting."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from memory_efficient_adapter.qwen_generation_utils import (
    FORCED_EOS_SCORE,
    StopWordsLogitsProcessor,
    decode_tokens,
    get_stop_words_ids,
    make_context,
)
from tests.remote_code import MODELING_DIR, save_with_remote_code
from tests.test_qwen import AUTO_MAP, load, random_model

OUR_FILES = ["modeling_qwen.py", "configuration_qwen.py", "qwen_generation_utils.py"]
SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


class FakeQwenTokenizer:
    """QWenTokenizer's interface over a tiny vocabulary: its three special tokens (encoded from text only where
    ``allowed_special`` allows, as Qwen's does), single characters and a few longer pieces, matched greedily
    longest first. "\\nhi" is one piece, so tokenizing "user\\nhi" in one go is not the same as tokenizing
    "user", "\\n" and "hi" apart."""

    eod_id, im_start_id, im_end_id = SPECIAL.values()
    PIECES = ["\n", *map(chr, range(32, 127)), "user", "assistant", "system", "\nhi", "Human"]

    def __init__(self):
        self.vocab = {**SPECIAL, **{piece: len(SPECIAL) + i for i, piece in enumerate(self.PIECES)}}
        self.pieces = {token: piece for piece, token in self.vocab.items()}
        self.vocab_size = len(self.vocab)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        known = [*self.PIECES, *(SPECIAL if allowed_special == "all" else allowed_special)]
        tokens, start = [], 0
        while start < len(text):
            piece = max((p for p in known if text.startswith(p, start)), key=len)
            tokens.append(self.vocab[piece])
            start += len(piece)
        return tokens

    def decode(self, tokens, skip_special_tokens: bool = False, errors: str = "strict") -> str:
        tokens = [int(t) for t in tokens]
        return "".join(self.pieces[t] for t in tokens if not (skip_special_tokens and t in SPECIAL.values()))


@pytest.fixture
def tokenizer() -> FakeQwenTokenizer:
    return FakeQwenTokenizer()


def message(tokenizer: FakeQwenTokenizer, role: str, content: str) -> list[int]:
    """One ChatML message as the original builds it: role and content tokenized apart, content as plain text."""
    newline = tokenizer.encode("\n")
    content_tokens = tokenizer.encode(content, allowed_special=set())
    return [tokenizer.im_start_id, *tokenizer.encode(role), *newline, *content_tokens, tokenizer.im_end_id]


# ------------------------------------------------------------------------------------------------ make_context
def test_make_context_lays_out_chatml_tokens_and_text(tokenizer):
    history = [("hi", "hello <|im_end|> there"), ("2+2?", "4")]
    raw_text, tokens = make_context(tokenizer, "hi again", history=history, system="Be brief.")

    assert raw_text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello <|im_end|> there<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nhi again<|im_end|>\n<|im_start|>assistant\n"
    )
    nl = tokenizer.encode("\n")
    expected = message(tokenizer, "system", "Be brief.")
    for query, response in history:
        expected += nl + message(tokenizer, "user", query) + nl + message(tokenizer, "assistant", response)
    expected += nl + message(tokenizer, "user", "hi again") + nl
    expected += [tokenizer.im_start_id, *tokenizer.encode("assistant"), *nl]
    assert tokens == expected
    # the "\nhi" piece is not used across a role/content boundary, and "<|im_end|>" typed in a message is text
    assert tokenizer.vocab["\nhi"] not in tokens
    assert tokens.count(tokenizer.im_end_id) == 2 * len(history) + 2
    assert tokenizer.decode(tokens) == raw_text


def test_make_context_without_history_and_with_defaults(tokenizer):
    raw_text, tokens = make_context(tokenizer, "hi")
    assert raw_text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    nl = tokenizer.encode("\n")
    assert tokens == (
        message(tokenizer, "system", "") + nl + message(tokenizer, "user", "hi") + nl
        + [tokenizer.im_start_id, *tokenizer.encode("assistant"), *nl]
    )
    assert make_context(tokenizer, "hi", history=[]) == (raw_text, tokens)


def test_make_context_drops_the_oldest_turns_that_do_not_fit(tokenizer):
    def turn_size(turn):
        return len(make_context(tokenizer, "q", [turn], max_window_size=None)[1]) - len(
            make_context(tokenizer, "q", [], max_window_size=None)[1]
        )

    old, big, new = ("old", "short"), ("big", "a much longer answer than the others"), ("new", "fine")
    history = [old, big, new]
    system = "sys"
    query = "a long query that is not counted against the window " * 3
    system_size = len(make_context(tokenizer, "", [], system=system)[1]) - len(make_context(tokenizer, "", [])[1])
    system_size += len(message(tokenizer, "system", ""))

    def context(max_window_size, kept):
        truncated = make_context(tokenizer, query, history, system=system, max_window_size=max_window_size)
        assert truncated == make_context(tokenizer, query, kept, system=system, max_window_size=None)

    everything = system_size + sum(map(turn_size, history))
    context(everything + 1, history)  # strictly below the window: all kept
    context(everything, [big, new])  # reaching it drops the oldest
    context(system_size + turn_size(new) + turn_size(big), [new])
    # `old` alone would fit beside `new`, but the first turn that does not fit drops every older one too
    assert turn_size(old) < turn_size(big)
    context(system_size + turn_size(new) + turn_size(old) + 1, [new])
    context(system_size + turn_size(new), [])
    context(None, history)


def test_make_context_raw_format_is_the_query_alone(tokenizer):
    raw_text, tokens = make_context(tokenizer, "Human: hi", history=[("a", "b")], system="x", chat_format="raw")
    assert raw_text == "Human: hi" and tokens == tokenizer.encode("Human: hi")
    with pytest.raises(NotImplementedError, match="chat format"):
        make_context(tokenizer, "hi", chat_format="alpaca")


# ------------------------------------------------------------------------------------------------ decode_tokens
@pytest.mark.parametrize("end", ["im_end_id", "im_start_id", "eod_id"])
def test_decode_tokens_strips_the_prompt_and_stops_at_the_first_end_token(tokenizer, end):
    raw_text, context = make_context(tokenizer, "hi", history=[("a", "b")], system="S")
    end_id = getattr(tokenizer, end)
    generated = tokenizer.encode(" Hello, <|im_end|>  world \n", allowed_special=set())
    tokens = torch.tensor(context + generated + [end_id] + tokenizer.encode("after") + [tokenizer.eod_id])

    response, reason = decode_tokens(tokens, tokenizer, len(raw_text), len(context), "chatml", return_end_reason=True)
    assert response == "Hello, <|im_end|>  world"
    assert reason == f"Gen {tokenizer.decode([end_id])!r}"
    # the original's way (decode everything, drop the prompt's characters) gives the same text here
    assert response == tokenizer.decode(tokens[: len(context) + len(generated)])[len(raw_text) :].strip()
    assert decode_tokens(tokens.tolist(), tokenizer, len(raw_text), len(context), "chatml") == response


def test_decode_tokens_without_an_end_token_keeps_every_generated_token(tokenizer, capsys):
    raw_text, context = make_context(tokenizer, "hi")
    tokens = context + tokenizer.encode("all of it")
    response, reason = decode_tokens(tokens, tokenizer, len(raw_text), len(context), "chatml", verbose=True,
                                     return_end_reason=True)
    assert response == "all of it" and reason == f"Gen length {len(tokens)}"
    assert "all of it" in capsys.readouterr().out


def test_decode_tokens_raw_format_stops_at_end_of_text_and_im_end(tokenizer):
    raw_text, context = make_context(tokenizer, "Human: hi\nAssistant:", chat_format="raw")
    for end_id in (tokenizer.eod_id, tokenizer.im_end_id):
        tokens = context + tokenizer.encode(" yes") + [end_id] + tokenizer.encode("no")
        assert decode_tokens(tokens, tokenizer, len(raw_text), len(context), "raw") == "yes"
    tokens = context + tokenizer.encode(" yes") + [tokenizer.im_start_id] + tokenizer.encode("no")
    assert decode_tokens(tokens, tokenizer, len(raw_text), len(context), "raw") == "yes<|im_start|>no"


# ------------------------------------------------------------------------------------------------ stop words
def test_get_stop_words_ids(tokenizer):
    assert get_stop_words_ids("chatml", tokenizer) == [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    human = tokenizer.encode("Human:")
    assert len(human) == 2  # "Human" + ":"
    assert get_stop_words_ids("raw", tokenizer) == [human, [tokenizer.eod_id]]
    with pytest.raises(NotImplementedError, match="chat format"):
        get_stop_words_ids("alpaca", tokenizer)


def test_stop_words_processor_forces_eos_exactly_on_rows_ending_with_a_stop_word():
    eos, vocab = 0, 11
    processor = StopWordsLogitsProcessor([[2], [5, 6, 7], [eos]], eos_token_id=eos)
    input_ids = torch.tensor(
        [
            [9, 9, 9, 2],  # one-token stop word
            [9, 5, 6, 7],  # three-token stop word
            [9, 9, 6, 7],  # only its tail
            [5, 6, 7, 9],  # the stop word, but not at the end
            [9, 9, 9, eos],  # [eos] is dropped: such a sequence has ended already
            [2, 9, 9, 9],
        ]
    )
    scores = torch.randn(len(input_ids), vocab)
    before = scores.clone()
    out = processor(input_ids, scores)

    assert processor.stop_words_ids == [[2], [5, 6, 7]]
    assert torch.equal(scores, before)  # not modified in place
    stopped = torch.tensor([True, True, False, False, False, False])
    assert torch.equal(out[:, eos] == FORCED_EOS_SCORE, stopped)
    assert torch.equal(out.argmax(-1)[stopped], torch.full((2,), eos))
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[stopped, eos] = False
    assert torch.equal(out[keep], before[keep])


def test_stop_words_processor_short_inputs_and_several_eos_ids():
    processor = StopWordsLogitsProcessor([[4, 5, 6], [3]], eos_token_id=[0, 1])
    out = processor(torch.tensor([[5, 6], [4, 3]]), torch.zeros(2, 8))  # shorter than the three-token stop word
    assert out[0].eq(0).all()
    assert out[1, :2].eq(FORCED_EOS_SCORE).all() and out[1, 2:].eq(0).all()


def test_stop_words_processor_names_an_eos_id_outside_the_vocabulary():
    processor = StopWordsLogitsProcessor([[3]], eos_token_id=[1, 9])
    with pytest.raises(ValueError, match=r"eos_token_id \[9\] lies outside the 6 scores"):
        processor(torch.tensor([[4, 5]]), torch.zeros(1, 6))


@pytest.mark.parametrize("stop_words_ids", [[], [[]], [[-1]], [[1.5]], "stop", [3]])
def test_stop_words_processor_rejects_malformed_stop_words(stop_words_ids):
    with pytest.raises(ValueError, match="stop"):
        StopWordsLogitsProcessor(stop_words_ids, eos_token_id=0)


# ------------------------------------------------------------------------------------------------ end to end
def test_a_folder_with_only_our_files_loads_and_chats(tmp_path, tokenizer):
    torch.manual_seed(7)
    model = random_model(vocab_size=tokenizer.vocab_size)
    model.generation_config = GenerationConfig(
        chat_format="chatml", eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.eod_id, max_window_size=6144,
        max_new_tokens=8, do_sample=False,
    )
    model.config.bf16 = model.config.fp16 = model.config.fp32 = False
    # a folder name of its own: transformers names the module package after it, and other tests' "qwen" folders
    # hold the stand-in helpers
    folder = save_with_remote_code(model, tmp_path / "qwen-with-our-helpers", OUR_FILES, AUTO_MAP)
    assert {p.name for p in folder.glob("*.py")} == set(OUR_FILES)

    loaded = load(folder)
    package = type(loaded).__module__.rsplit(".", 1)[0]
    helpers = importlib.import_module(f"{package}.qwen_generation_utils")
    assert Path(helpers.__file__).read_bytes() == (MODELING_DIR / "qwen_generation_utils.py").read_bytes()

    ends = {tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id}

    def greedy_reply(query: str, history=None) -> tuple[list[int], list[int]]:
        """The chat prompt (chat()'s default system message) and 8 greedy tokens after it, stop words ignored."""
        _, context = make_context(tokenizer, query, history, system="You are a helpful assistant.")
        with torch.no_grad():
            generated = loaded.generate(torch.tensor([context]), max_new_tokens=8, do_sample=False)
        return context, generated[0, len(context) :].tolist()

    def until_end(tokens: list[int]) -> list[int]:
        return tokens[: next((i for i, token in enumerate(tokens) if token in ends), len(tokens))]

    with torch.no_grad():  # make the random model close its reply: <|im_end|> outscores its fourth token there
        loaded.lm_head.weight[tokenizer.im_end_id] = 1.01 * loaded.lm_head.weight[greedy_reply("hi")[1][3]]
    context, plain = greedy_reply("hi")
    assert until_end(plain) == plain[:3] and plain[3] == tokenizer.im_end_id, plain

    response, history = loaded.chat(tokenizer, "hi", history=None)
    assert response == tokenizer.decode(until_end(plain)).strip() != ""
    assert history == [("hi", response)]
    _, follow_up = greedy_reply("more", history)
    second, longer = loaded.chat(tokenizer, "more", history=history)
    assert second == tokenizer.decode(until_end(follow_up)).strip()
    assert longer == [("hi", response), ("more", second)] and len(history) == 1

    # a two-token stop word of our own: EOS right after its first occurrence, which the response keeps
    stop_word = plain[:2]
    sequence = context + plain
    stop = next(i for i in range(len(context), len(sequence)) if sequence[i - 1 : i + 1] == stop_word)
    response, _ = loaded.chat(tokenizer, "hi", history=None, stop_words_ids=[stop_word])
    assert response == tokenizer.decode(plain[: stop - len(context) + 1]).strip()
