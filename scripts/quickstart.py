"""Quickstart: tiny random models loaded through trust_remote_code with our modeling files, on every backend.

Runs offline on a CPU (or on a GPU if there is one). For each family it builds a tiny random model,
saves it, copies our ``modeling_<family>.py`` beside it with an ``auto_map``, loads it back with
``from_pretrained(folder, trust_remote_code=True)`` exactly as a user would, checks that every backend
gives the same logits as stock transformers (or, for Qwen, as our eager path), and prints the time of a
training step and its memory: peak allocated on CUDA, activation memory saved for backward on a CPU.

    python scripts/quickstart.py [--seq 1024] [--families llama,bloom]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory_efficient_adapter as mea  # noqa: E402
from memory_efficient_adapter.families import main_entry, write_remote_code  # noqa: E402

TINY = dict(hidden=256, heads=4, layers=2, vocab=1000)


def tiny_models() -> dict:
    """family -> (stock config, stock class or None)."""
    h, n, layers, vocab = TINY["hidden"], TINY["heads"], TINY["layers"], TINY["vocab"]
    from memory_efficient_adapter.configuration_qwen import QWenConfig

    return {
        "llama": (
            transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                                     num_attention_heads=n, num_key_value_heads=n // 2),
            transformers.LlamaForCausalLM,
        ),
        "gpt2": (
            transformers.GPT2Config(vocab_size=vocab, n_embd=h, n_layer=layers, n_head=n, n_positions=4096,
                                    bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
            transformers.GPT2LMHeadModel,
        ),
        "bloom": (
            transformers.BloomConfig(vocab_size=vocab, hidden_size=h, n_layer=layers, n_head=n),
            transformers.BloomForCausalLM,
        ),
        "bart": (
            transformers.BartConfig(vocab_size=vocab, d_model=h, encoder_layers=layers, decoder_layers=layers,
                                    encoder_attention_heads=n, decoder_attention_heads=n, encoder_ffn_dim=2 * h,
                                    decoder_ffn_dim=2 * h, max_position_embeddings=4096, dropout=0.0),
            transformers.BartForConditionalGeneration,
        ),
        "qwen": (
            QWenConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=n,
                       kv_channels=h // n, intermediate_size=4 * h, seq_length=8192, max_position_embeddings=8192),
            None,
        ),
    }


def save_checkpoint(folder: Path, family: str, config, stock_class) -> None:
    if stock_class is not None:
        stock_class(config).save_pretrained(folder)
    else:  # Qwen has no stock class: the random weights come from ours
        from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

        QWenLMHeadModel(config).save_pretrained(folder)
    write_remote_code(folder, family)


def model_inputs(model, seq: int, device) -> dict:
    ids = torch.randint(0, TINY["vocab"], (1, seq), device=device)
    if model.config.is_encoder_decoder:
        return dict(input_ids=ids, labels=ids[:, : max(seq // 4, 8)])
    return dict(input_ids=ids, labels=ids)


def training_step(model, inputs: dict) -> tuple[torch.Tensor, float, float]:
    """Logits, seconds and memory (MiB) of one forward+backward, after one warm-up step."""
    model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    saved_bytes = [0]

    def pack(tensor):
        saved_bytes[0] += tensor.numel() * tensor.element_size()
        return tensor

    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(**inputs)
    out.loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() if cuda else saved_bytes[0]
    return out.logits.detach(), seconds, memory / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--families", default="llama,gpt2,bloom,bart,qwen")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    memory_label = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    print(f"device {device}, {dtype}, {args.seq} tokens; kernel-layer backends here: {mea.available_backends()}")
    print(f"{'family':8} {'implementation':22} {'step s':>8} {memory_label:>24} {'max |logit diff|':>18}")
    models = tiny_models()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            config, stock_class = models[family]
            folder = Path(tmp) / family
            torch.manual_seed(0)
            save_checkpoint(folder, family, config, stock_class)
            torch.manual_seed(1)
            rows = []
            if stock_class is not None:
                stock = stock_class.from_pretrained(folder, attn_implementation="eager", dtype=dtype).to(device)
                inputs = model_inputs(stock, args.seq, device)
                reference, seconds, memory = training_step(stock, inputs)
                rows.append(("stock eager", seconds, memory, 0.0))
                del stock
            auto_class = getattr(transformers, main_entry(family).auto_class)
            ours = auto_class.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device)
            if stock_class is None:
                inputs = model_inputs(ours, args.seq, device)
                ours.config.attn_backend = "eager"
                reference, seconds, memory = training_step(ours, inputs)
                rows.append(("ours eager", seconds, memory, 0.0))
            measured = {"eager"} if stock_class is None else set()
            for backend in ["auto"] + [name for name in mea.available_backends() if name not in measured]:
                ours.config.attn_backend = backend
                try:
                    logits, seconds, memory = training_step(ours, inputs)
                except ValueError as error:
                    print(f"{family:8} {'ours ' + backend:22} cannot take it: {error}")
                    continue
                rows.append((f"ours {backend}", seconds, memory, (logits.float() - reference.float()).abs().max().item()))
            for name, seconds, memory, diff in rows:
                print(f"{family:8} {name:22} {seconds:8.3f} {memory:24.1f} {diff:18.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
