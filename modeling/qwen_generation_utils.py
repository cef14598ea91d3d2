"""Chat helpers for Qwen-7B (first generation): the ChatML prompt, response decoding and stop words.

``modeling_qwen.py`` imports these four names for ``chat()``, ``chat_stream()`` and ``stop_words_ids``. They
take the same arguments and give the same prompts and stop words as the ``qwen_generation_utils.py`` that
the Qwen-7B checkpoints ship, so either file can sit next to ``modeling_qwen.py``. transformers' remote-code
loader finds that import by scanning the text, so a folder holding ``modeling_qwen.py`` must hold this file too.

The tokenizer is Qwen's (``QWenTokenizer``) or anything with its interface: ``encode(text, allowed_special=...)``,
``decode(tokens, errors=...)`` and the ids ``im_start_id``, ``im_end_id`` and ``eod_id``.
"""

from numbers import Integral
from typing import Iterable, Optional, Union

import torch
from transformers import LogitsProcessor, PreTrainedTokenizer

HistoryType = list[tuple[str, str]]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The EOS score for a row that just ended with a stop word: far above any real logit, and finite in fp16.
FORCED_EOS_SCORE = float(2**15)


# ------------------------------------------------------------------------------------------------ prompts
def _encode_plain(tokenizer: PreTrainedTokenizer, text: str) -> list[int]:
    """Tokens of ``text`` with special-token strings in it (say a user typing "<|im_end|>") kept as plain text."""
    return tokenizer.encode(text, allowed_special=set())


def _chatml_message(
    tokenizer: PreTrainedTokenizer, role: str, content: str, newline: list[int]
) -> tuple[str, list[int]]:
    """``<|im_start|>{role}\\n{content}<|im_end|>`` as text and as tokens; the role and the content are
    tokenized apart and joined by ``newline`` (the tokens of "\\n")."""
    tokens = [
        tokenizer.im_start_id,
        *_encode_plain(tokenizer, role),
        *newline,
        *_encode_plain(tokenizer, content),
        tokenizer.im_end_id,
    ]
    return f"{IM_START}{role}\n{content}{IM_END}", tokens


def _chatml_context(
    tokenizer: PreTrainedTokenizer, query: str, history: HistoryType, system: str, max_window_size: Optional[int]
) -> tuple[str, list[int]]:
    newline = tokenizer.encode("\n")
    system_text, system_tokens = _chatml_message(tokenizer, "system", system, newline)
    history_text, history_tokens = "", []
    for past_query, past_response in reversed(history):  # newest first, so truncation drops the oldest turns
        query_text, query_tokens = _chatml_message(tokenizer, "user", past_query, newline)
        response_text, response_tokens = _chatml_message(tokenizer, "assistant", past_response, newline)
        turn_tokens = newline + query_tokens + newline + response_tokens
        size = len(system_tokens) + len(turn_tokens) + len(history_tokens)
        if max_window_size is not None and size >= max_window_size:
            break
        history_text = f"\n{query_text}\n{response_text}{history_text}"
        history_tokens = turn_tokens + history_tokens

    query_text, query_tokens = _chatml_message(tokenizer, "user", query, newline)
    raw_text = f"{system_text}{history_text}\n{query_text}\n{IM_START}assistant\n"
    assistant_tokens = [tokenizer.im_start_id, *_encode_plain(tokenizer, "assistant"), *newline]
    context_tokens = system_tokens + history_tokens + newline + query_tokens + newline + assistant_tokens
    return raw_text, context_tokens


def make_context(
    tokenizer: PreTrainedTokenizer,
    query: str,
    history: Optional[HistoryType] = None,
    system: str = "",
    max_window_size: Optional[int] = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """The prompt for ``query`` as ``(raw_text, context_tokens)``.

    ``chatml``: the system message, the ``history`` turns (oldest first) and the query as ChatML messages
    joined by newlines, ending with an open ``<|im_start|>assistant\\n``. History turns are kept newest first
    while the system message and the kept turns stay under ``max_window_size`` tokens (the query is not
    counted, as in the original); the first turn that does not fit drops itself and every older one. None
    keeps them all. ``raw``: the query alone, history and system ignored.
    """
    if chat_format == "chatml":
        return _chatml_context(tokenizer, query, history or [], system, max_window_size)
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    raise NotImplementedError(f"unknown chat format {chat_format!r}")


# ------------------------------------------------------------------------------------------------ decoding
def _end_token_ids(chat_format: str, tokenizer: PreTrainedTokenizer) -> set[int]:
    """Tokens that end a response: any ChatML control token or end of text; in raw text, end of text or im_end."""
    if chat_format == "chatml":
        return {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
    if chat_format == "raw":
        return {tokenizer.eod_id, tokenizer.im_end_id}
    raise NotImplementedError(f"unknown chat format {chat_format!r}")


def decode_tokens(
    tokens: Union[torch.Tensor, list[int]],
    tokenizer: PreTrainedTokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> Union[str, tuple[str, str]]:
    """The response in ``tokens`` (the prompt followed by what was generated): the generated tokens up to the
    first end token (``_end_token_ids``), decoded and stripped of surrounding whitespace.

    The prompt is removed by its token count, ``context_length``. ``raw_text_len`` (the prompt's length in
    characters) is accepted for compatibility: the original removes that many characters from the decoded
    text instead, which is the same for Qwen's tokenizer (it decodes the prompt back to exactly the raw text)
    and would be wrong for a tokenizer that does not. ``return_end_reason`` adds why the response ended:
    "Gen '<token>'" for an end token, else "Gen length N". Unlike the original, a ChatML response also ends at
    ``<|endoftext|>`` (rather than showing it as text), one without an end token keeps its last token, and a
    raw-format response ends at ``<|endoftext|>`` or ``<|im_end|>`` (the original deletes the first and shows
    the second as text, so it never ends there).
    """
    tokens = tokens.tolist() if torch.is_tensor(tokens) else [int(token) for token in tokens]
    generated = tokens[context_length:]
    end_ids = _end_token_ids(chat_format, tokenizer)
    end = next((i for i, token in enumerate(generated) if token in end_ids), None)
    if end is None:
        end_reason = f"Gen length {len(tokens)}"
    else:
        end_reason = f"Gen {tokenizer.decode([generated[end]])!r}"
        generated = generated[:end]
    response = tokenizer.decode(generated, errors=errors).strip()
    if verbose:
        print(f"\nRaw generate: {tokenizer.decode(tokens[context_length:], errors=errors)}")
        print(f"\nEnd reason: {end_reason}")
        print(f"\nGenerate: {response}")
    return (response, end_reason) if return_end_reason else response


# ------------------------------------------------------------------------------------------------ stop words
def get_stop_words_ids(chat_format: str, tokenizer: PreTrainedTokenizer) -> list[list[int]]:
    """Token sequences that end a reply: ChatML control tokens, or in raw text the next "Human:" turn and EOD."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise NotImplementedError(f"unknown chat format {chat_format!r}")


def _checked_stop_words(stop_words_ids: object) -> list[list[int]]:
    """``stop_words_ids`` as lists of ints; a ValueError unless it is a non-empty list of non-empty lists of
    non-negative integers."""
    if not isinstance(stop_words_ids, list) or not stop_words_ids:
        raise ValueError(f"stop_words_ids must be a non-empty list of token-id lists, not {stop_words_ids!r}")
    for words in stop_words_ids:
        if not isinstance(words, list) or not words:
            raise ValueError(f"each stop word must be a non-empty list of token ids, not {words!r}")
        if any(isinstance(token, bool) or not isinstance(token, Integral) or token < 0 for token in words):
            raise ValueError(f"stop word token ids must be non-negative integers, not {words!r}")
    return [[int(token) for token in words] for words in stop_words_ids]


class StopWordsLogitsProcessor(LogitsProcessor):
    """Ends each sequence whose last tokens form one of ``stop_words_ids`` (token-id lists, several tokens
    long or one): that row's EOS score is set to ``FORCED_EOS_SCORE`` so EOS comes next. Other scores are
    left as they are. ``eos_token_id`` may be one id or several (each is raised)."""

    def __init__(self, stop_words_ids: list[list[int]], eos_token_id: Union[int, Iterable[int]]):
        if eos_token_id is None:
            raise ValueError("StopWordsLogitsProcessor needs an eos_token_id to force")
        self.eos_token_id = eos_token_id
        eos_ids = [eos_token_id] if isinstance(eos_token_id, Integral) else eos_token_id
        self.eos_token_ids = [int(token) for token in eos_ids]
        eos_words = [[token] for token in self.eos_token_ids]  # a sequence that just produced EOS is over anyway
        self.stop_words_ids = [words for words in _checked_stop_words(stop_words_ids) if words not in eos_words]

    def stopped_rows(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """[batch] True where ``input_ids`` ends with a stop word."""
        stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for words in self.stop_words_ids:
            if len(words) <= input_ids.shape[1]:
                tail = input_ids[:, -len(words) :]
                stopped |= (tail == torch.tensor(words, device=input_ids.device)).all(dim=-1)
        return stopped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        outside = [token for token in self.eos_token_ids if not 0 <= token < scores.shape[-1]]
        if outside:
            raise ValueError(f"eos_token_id {outside} lies outside the {scores.shape[-1]} scores of the vocabulary")
        eos_columns = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        eos_columns[self.eos_token_ids] = True
        forced = self.stopped_rows(input_ids).to(scores.device)[:, None] & eos_columns[None, :]
        return scores.masked_fill(forced, FORCED_EOS_SCORE)
