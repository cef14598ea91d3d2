"""Quickstart: tiny random models loaded through trust_remote_code with our modeling files, on every backend.

Runs offline on a CPU (or on a GPU if there is one). It first says which kernel-layer backends can train
here and why the others cannot. Then, for each family, it builds a tiny random model, saves it, copies our
``modeling_<family>.py`` beside it with an ``auto_map``, loads it back with
``from_pretrained(folder, trust_remote_code=True)`` exactly as a user would, and prints one table: the median
time of a few warmed-up training steps, their memory (peak allocated on CUDA; activation memory saved for
backward on a CPU), the memory saved against stock transformers' eager attention, and the largest logit
difference from it (for Qwen, which has no stock class, from our own eager path), then the winner.
On a GPU it ends with the headline: BLOOM at 4k and 8k tokens, stock eager against ours.

    python scripts/quickstart.py [--seq 512] [--families llama,bloom] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
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
HEADLINE_LENGTHS = (4096, 8192)  # where BLOOM's materialized [b, h, q, k] scores and ALiBi bias dominate


def tiny_models(max_length: int) -> dict:
    """family -> (stock config, stock class or None)."""
    h, n, layers, vocab = TINY["hidden"], TINY["heads"], TINY["layers"], TINY["vocab"]
    from memory_efficient_adapter.configuration_qwen import QWenConfig

    return {
        "llama": (
            transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                                     num_attention_heads=n, num_key_value_heads=n // 2,
                                     max_position_embeddings=max_length),
            transformers.LlamaForCausalLM,
        ),
        "gpt2": (
            transformers.GPT2Config(vocab_size=vocab, n_embd=h, n_layer=layers, n_head=n, n_positions=max_length,
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
                                    decoder_ffn_dim=2 * h, max_position_embeddings=max_length, dropout=0.0),
            transformers.BartForConditionalGeneration,
        ),
        "qwen": (
            QWenConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=n,
                       kv_channels=h // n, intermediate_size=4 * h, seq_length=max_length,
                       max_position_embeddings=max_length),
            None,
        ),
    }


def quiet() -> None:
    """No progress bars or advisory warnings between the tables."""
    import huggingface_hub

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def training_backends(device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """The backends that can run a training call (causal, with gradients) here, and why each other one cannot,
    in the kernel layer's own words."""
    available = set(mea.available_backends(device.type))
    runnable, why_not = [], {}
    for name in mea.BACKENDS:
        q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype, requires_grad=True)
        try:
            if name not in available:
                raise ValueError(f"not available on {device.type} in this installation")
            mea.attention(q, q, q, causal=True, backend=name).sum().backward()
        except Exception as error:  # the kernel layer's reason (ValueError), or a kernel that fails to build
            why_not[name] = str(error).split(": ", 1)[-1] if isinstance(error, ValueError) else f"fails: {error}"
            continue
        runnable.append(name)
    return runnable, why_not


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


def training_steps(model, inputs: dict, steps: int, warmup: int) -> tuple[torch.Tensor, float, float]:
    """Logits, the median seconds of ``steps`` forward+backward steps after ``warmup`` untimed ones, and the
    memory of one step in MiB (peak allocated on CUDA, bytes saved for backward elsewhere)."""
    cuda = next(model.parameters()).is_cuda
    for _ in range(warmup):
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    saved_bytes = [0]
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    counted: set = set()

    def pack(tensor):
        """Activation memory: each storage saved for backward once, the weights (saved by every matmul) not."""
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in counted:
            counted.add(storage.data_ptr())
            saved_bytes[0] += storage.nbytes()
        return tensor

    times = []
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        saved_bytes[0] = 0
        counted.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(**inputs)
        out.loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    memory = torch.cuda.max_memory_allocated() if cuda else saved_bytes[0]
    return out.logits.detach(), statistics.median(times), memory / 2**20


def measure_family(family: str, folder: Path, models: dict, backends: list[str], args, device, dtype):
    """Rows (implementation, seconds, MiB, max |logit diff|) and the backends that could not take the model."""
    config, stock_class = models[family]
    torch.manual_seed(0)
    save_checkpoint(folder, family, config, stock_class)
    torch.manual_seed(1)
    rows, refused = [], {}
    if stock_class is not None:
        stock = stock_class.from_pretrained(folder, attn_implementation="eager", dtype=dtype).to(device)
        inputs = model_inputs(stock, args.seq, device)
        reference, seconds, memory = training_steps(stock, inputs, args.steps, args.warmup)
        rows.append(("stock eager", seconds, memory, 0.0))
        del stock
    auto_class = getattr(transformers, main_entry(family).auto_class)
    ours = auto_class.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device)
    if stock_class is None:  # our eager path is the reference, measured once
        inputs = model_inputs(ours, args.seq, device)
        ours.config.attn_backend = "eager"
        reference, seconds, memory = training_steps(ours, inputs, args.steps, args.warmup)
        rows.append(("ours eager (reference)", seconds, memory, 0.0))
    for backend in ["auto"] + [name for name in backends if not (stock_class is None and name == "eager")]:
        ours.config.attn_backend = backend
        try:
            logits, seconds, memory = training_steps(ours, inputs, args.steps, args.warmup)
        except ValueError as error:
            refused[backend] = str(error).split(": ", 1)[-1]
            continue
        rows.append((f"ours {backend}", seconds, memory, (logits.float() - reference.float()).abs().max().item()))
    return rows, refused


def print_table(family: str, rows: list, refused: dict, memory_label: str) -> None:
    baseline_seconds, baseline_memory = rows[0][1], rows[0][2]
    print(f"\n{family}  (against {rows[0][0]})")
    print(f"  {'implementation':24} {'median step s':>13} {'speed-up':>9} {memory_label:>16} {'memory saved':>13} "
          f"{'max |logit diff|':>17}")
    for name, seconds, memory, diff in rows:
        saved = round(1.0 - memory / baseline_memory, 2) + 0.0 if baseline_memory else 0.0  # + 0.0: no "-0%"
        print(f"  {name:24} {seconds:13.4f} {baseline_seconds / seconds:8.2f}x {memory:16.1f} {saved:12.0%} "
              f"{diff:17.2e}")
    ours = rows[1:]
    fastest = min(ours, key=lambda row: row[1])
    leanest = min(ours, key=lambda row: row[2])
    print(f"  winner: fastest {fastest[0]} ({baseline_seconds / fastest[1]:.2f}x {rows[0][0]}), least memory "
          f"{leanest[0]} ({1.0 - leanest[2] / baseline_memory:.0%} saved)")
    for backend, reason in refused.items():
        print(f"  not for {family}: {backend} ({reason})")


def headline(device: torch.device, dtype: torch.dtype, steps: int, warmup: int) -> None:
    """BLOOM (ALiBi: stock transformers runs it on eager attention only) at lengths where attention dominates."""
    print("\nheadline: BLOOM training step, stock eager against ours (auto)")
    print(f"  {'tokens':>7} {'stock s':>9} {'stock GiB':>10} {'ours s':>9} {'ours GiB':>9}")
    config = transformers.BloomConfig(vocab_size=TINY["vocab"], hidden_size=1024, n_layer=4, n_head=16)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(Path(tmp), "bloom", config, transformers.BloomForCausalLM)
        for seq in HEADLINE_LENGTHS:
            cells = []
            for load in ({"attn_implementation": "eager"}, {"trust_remote_code": True}):
                cls = transformers.BloomForCausalLM if "attn_implementation" in load else transformers.AutoModelForCausalLM
                model = cls.from_pretrained(tmp, dtype=dtype, **load).to(device)
                inputs = model_inputs(model, seq, device)
                try:
                    _, seconds, memory = training_steps(model, inputs, steps, warmup)
                    cells.append(f"{seconds:9.3f} {memory / 1024:9.2f}")
                except torch.cuda.OutOfMemoryError:
                    cells.append(f"{'OOM':>9} {'-':>9}")
                del model, inputs
                torch.cuda.empty_cache()
            print(f"  {seq:>7} {cells[0]} {cells[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--families", default="llama,gpt2,bloom,bart,qwen")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (the median is shown)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--no-headline", action="store_true", help="skip the long-sequence BLOOM run on a GPU")
    args = parser.parse_args(argv)
    models = tiny_models(max(args.seq, 128))
    unknown = [family for family in args.families.split(",") if family not in models]
    if unknown or args.seq < 8 or args.steps < 1 or args.warmup < 0:
        parser.error(f"--families takes {','.join(models)}; --seq >= 8, --steps >= 1, --warmup >= 0")
    quiet()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends, why_not = training_backends(device, dtype)
    print(f"device {device}, {dtype}, {args.seq} tokens, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"training backends here: {', '.join(backends)}; auto picks the first that takes each call of "
          f"{', '.join(mea.AUTO_ORDER.get(device.type, ()))}")
    for name, reason in why_not.items():
        print(f"  not here: {name} ({reason})")
    memory_label = "peak MiB" if device.type == "cuda" else "saved MiB"
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            rows, refused = measure_family(family, Path(tmp) / family, models, backends, args, device, dtype)
            print_table(family, rows, refused, memory_label)
    if device.type == "cuda" and not args.no_headline:
        headline(device, dtype, args.steps, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
