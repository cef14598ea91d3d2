"""The reference the Qwen tests compare against, written from /work/shared/qwen7b.md, not from the modeling file.

``ReferenceQwen`` is a small eager Qwen-7B (float64 by default): absolute positions, rotary "rotate half" over
``rotary_pct`` of the channels, per-sample dynamic NTK chosen at prefill, logn query scaling, an explicit causal +
padding mask and its own tuple cache laid out [b, s, heads, head_dim]. Beside it: a beam search over full forwards,
a stand-in for the checkpoints' ``qwen_generation_utils.py`` and a character tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from memory_efficient_adapter.configuration_qwen import QWenConfig

EOS = 1

# ----------------------------------------------------------------------------------------------
# Reference implementation (from the architecture facts, not from the modeling file)
# ----------------------------------------------------------------------------------------------


def reference_ntk_alpha(length: int, seq_length: int) -> float:
    return max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1)


class ReferenceQwen:
    """Eager Qwen-7B over a dict of weights; ``forward`` returns (logits, cache, ntk_alphas)."""

    def __init__(self, config: QWenConfig, state_dict: dict, dtype=torch.float64, requires_grad=False, device="cpu"):
        self.config = config
        self.params = {
            name: tensor.detach().to(device=device, dtype=dtype).clone().requires_grad_(requires_grad)
            for name, tensor in state_dict.items()
        }

    def linear(self, x, name, bias=True):
        y = x @ self.params[f"{name}.weight"].T
        return y + self.params[f"{name}.bias"] if bias and f"{name}.bias" in self.params else y

    def rms_norm(self, x, name):
        x_float = x.float() if x.dtype != torch.float64 else x
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.config.layer_norm_epsilon)
        return normed.to(x.dtype) * self.params[f"{name}.weight"]

    def alphas_at_prefill(self, attention_mask, total, batch, training):
        cfg = self.config
        if training or not cfg.use_dynamic_ntk:
            return [1.0] * batch
        if attention_mask is not None and total > cfg.seq_length:
            return [reference_ntk_alpha(int(n), cfg.seq_length) for n in attention_mask.sum(-1)]
        return [reference_ntk_alpha(total, cfg.seq_length)] * batch

    def rotate(self, x, positions, alphas):
        """x [b, s, heads, d]: rotate-half rotary over the first kv_channels * rotary_pct channels, per sample."""
        dim = int(self.config.kv_channels * self.config.rotary_pct)
        rows = []
        for row, alpha in zip(x, alphas):
            base = self.config.rotary_emb_base * alpha ** (dim / (dim - 2))
            inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
            angles = torch.outer(positions.double(), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)[:, None, :]
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
            rot, rest = row[..., :dim], row[..., dim:]
            x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
            rows.append(torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1))
        return torch.stack(rows)

    def forward(self, input_ids, attention_mask=None, past=None, alphas=None, training=False):
        cfg = self.config
        batch, q_len = input_ids.shape
        heads, dim = cfg.num_attention_heads, cfg.kv_channels
        past_len = 0 if past is None else past[0][0].shape[1]
        total = past_len + q_len
        if alphas is None:
            assert past is None, "decode steps reuse the alphas chosen at prefill"
            alphas = self.alphas_at_prefill(attention_mask, total, batch, training)
        positions = torch.arange(past_len, total, device=input_ids.device)

        logn = None
        if not training and cfg.use_logn_attn and total > cfg.seq_length:
            p1 = (positions + 1).double()
            factor = torch.where(p1 > cfg.seq_length, p1.log() / math.log(cfg.seq_length), torch.ones_like(p1))
            logn = factor[None, :, None, None]

        causal = torch.arange(total, device=input_ids.device)[None, :] <= positions[:, None]
        keep = causal[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, None, :]

        x = self.params["transformer.wte.weight"][input_ids]
        present = []
        for layer in range(cfg.num_hidden_layers):
            prefix = f"transformer.h.{layer}"
            h = self.rms_norm(x, f"{prefix}.ln_1")
            q, k, v = self.linear(h, f"{prefix}.attn.c_attn").split(heads * dim, dim=-1)
            q, k, v = (t.reshape(batch, q_len, heads, dim) for t in (q, k, v))
            q, k = self.rotate(q, positions, alphas), self.rotate(k, positions, alphas)
            if logn is not None:
                q = q * logn.to(q.dtype)
            if past is not None:
                k, v = torch.cat((past[layer][0], k), dim=1), torch.cat((past[layer][1], v), dim=1)
            present.append((k, v))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, q_len, heads * dim)
            x = x + self.linear(attn, f"{prefix}.attn.c_proj")
            h = self.rms_norm(x, f"{prefix}.ln_2")
            mlp = self.linear(h, f"{prefix}.mlp.w1") * torch.nn.functional.silu(self.linear(h, f"{prefix}.mlp.w2"))
            x = x + self.linear(mlp, f"{prefix}.mlp.c_proj")
        x = self.rms_norm(x, "transformer.ln_f")
        return x @ self.params["lm_head.weight"].T, tuple(present), alphas

    def loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    def greedy(self, input_ids, attention_mask, steps, processor=None, eos=None):
        """Greedy decoding with the tuple cache; a row stops (pads with eos) once it produced eos."""
        logits, past, alphas = self.forward(input_ids, attention_mask)
        sequences, mask = input_ids, attention_mask
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        for _ in range(steps):
            scores = logits[:, -1].float()
            if processor is not None:
                scores = processor(sequences, scores)
            token = scores.argmax(-1)
            if eos is not None:
                token = torch.where(done, torch.full_like(token, eos), token)
                done = done | (token == eos)
            sequences = torch.cat((sequences, token[:, None]), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            if eos is not None and bool(done.all()):
                break
            logits, past, _ = self.forward(token[:, None], mask, past, alphas)
        return sequences


def reference_beam_search(reference: ReferenceQwen, input_ids, attention_mask, num_beams, steps):
    """Beam search without EOS (every beam has the same length, so the length penalty cannot reorder them),
    recomputing full forwards with the NTK alphas chosen at prefill."""
    _, _, alphas = reference.forward(input_ids, attention_mask)
    best = []
    for row in range(len(input_ids)):
        beams = [(input_ids[row], 0.0)]
        row_mask = attention_mask[row : row + 1]
        for step in range(steps):
            mask = torch.cat((row_mask, torch.ones(1, step, dtype=row_mask.dtype)), dim=1)
            candidates = []
            for sequence, score in beams:
                logits, _, _ = reference.forward(sequence[None], mask, alphas=[alphas[row]])
                log_probs = torch.log_softmax(logits[0, -1], dim=-1)
                top = torch.topk(log_probs, num_beams)
                candidates += [(score + lp.item(), sequence, token) for lp, token in zip(top.values, top.indices)]
            candidates.sort(key=lambda c: c[0], reverse=True)
            beams = [(torch.cat((seq, token[None])), score) for score, seq, token in candidates[:num_beams]]
        best.append(beams[0][0])
    return torch.stack(best)


# ----------------------------------------------------------------------------------------------
# A stand-in for the checkpoints' qwen_generation_utils.py and a tiny tokenizer
# ----------------------------------------------------------------------------------------------

GENERATION_UTILS = '''\
"""Stand-in for Qwen's qwen_generation_utils.py (the four names modeling_qwen.py uses)."""
import torch
from transformers import LogitsProcessor


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml"):
    turns = [("system", system)]
    for user, assistant in history or []:
        turns += [("user", user), ("assistant", assistant)]
    turns.append(("user", query))
    raw_text, tokens = "", []
    for role, text in turns:
        raw_text += f"<|im_start|>{role}\\n{text}<|im_end|>\\n"
        tokens += [tokenizer.im_start_id] + tokenizer.encode(f"{role}\\n{text}") + [tokenizer.im_end_id]
        tokens += tokenizer.encode("\\n")
    raw_text += "<|im_start|>assistant\\n"
    tokens += [tokenizer.im_start_id] + tokenizer.encode("assistant\\n")
    return raw_text, tokens


def get_stop_words_ids(chat_format, tokenizer):
    return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


def decode_tokens(tokens, tokenizer, raw_text_len, context_length, chat_format, verbose=False, errors="replace"):
    generated = [int(t) for t in tokens[context_length:]]
    for stop in (tokenizer.eod_id, tokenizer.im_end_id, tokenizer.im_start_id):
        if stop in generated:
            generated = generated[: generated.index(stop)]
    return tokenizer.decode(generated, errors=errors)


class StopWordsLogitsProcessor(LogitsProcessor):
    def __init__(self, stop_words_ids, eos_token_id):
        self.stop_words_ids = [list(words) for words in stop_words_ids]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        for row, sequence in enumerate(input_ids.tolist()):
            if any(sequence[-len(words):] == words for words in self.stop_words_ids):
                scores[row, self.eos_token_id] = 2**15
        return scores
'''


class CharTokenizer:
    """Printable ASCII <-> ids 10..99; ids 1, 2, 3 are <|endoftext|>, <|im_start|>, <|im_end|>."""

    eod_id, im_start_id, im_end_id = EOS, 2, 3

    def encode(self, text: str) -> list[int]:
        return [10 + min(max(ord(c) - 32, 0), 89) for c in text]

    def decode(self, tokens, skip_special_tokens: bool = False, errors: str = "strict") -> str:
        pieces = []
        for token in (int(t) for t in tokens):
            if 10 <= token < 100:
                pieces.append(chr(32 + token - 10))
            elif not skip_special_tokens:
                pieces.append(f"<|{token}|>")
        return "".join(pieces)


def stand_in_generation_utils():
    """The stand-in module, imported from a temporary file (for driving the reference with its processor)."""
    import importlib.util
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qwen-utils-") as folder:  # removed once the module is loaded
        path = Path(folder) / "qwen_generation_utils.py"
        path.write_text(GENERATION_UTILS)
        spec = importlib.util.spec_from_file_location("qwen_generation_utils_stand_in", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
