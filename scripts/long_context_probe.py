"""Long-context LoRA training of a Llama-3-8B-shaped model on one GPU: tokens/s and peak memory by length.

    python scripts/long_context_probe.py --output runs/long_context.json --budget-s 200

Random bf16 weights of the real shape (32 layers, hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
vocabulary 128,256), built on the GPU from our modeling file; PEFT LoRA r=16 on q/k/v/o; bf16 autocast; one
sequence per step (forward, backward, AdamW step). Measured, in this order, each skipped when the time left in
``--budget-s`` cannot hold it (the step time is predicted from the steps so far):

1. ``--throughput-len`` tokens (32k) with the tiled MLP, with gradient checkpointing on the GPU, then with
   offloaded checkpoints: tokens/s and peak memory (a warm-up step, then a timed one).
2. ``--long-lens`` with the tiled MLP and offloaded checkpoints: one step each, the whole model; then
   ``--throughput-len`` with plain gradient checkpointing (no tiling), as in step 1.
3. ``--shallow-lens`` with the same options on a 2-layer model of the same width and vocabulary: with
   offloaded checkpoints the GPU's peak hardly depends on the depth (one layer is recomputed at a time), so
   it shows the GPU memory of lengths whose 32-layer step does not fit the time budget. The host memory the
   checkpoints need (layers x tokens x hidden x 2 bytes) is reported beside it.

Every result is appended to ``--output`` (JSON) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSON file, rewritten after every measurement")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new steps after this")
    parser.add_argument("--throughput-len", type=int, default=32768)
    parser.add_argument("--long-lens", default="131072", help="comma-separated lengths for the 32-layer model")
    parser.add_argument("--shallow-lens", default="524288", help="comma-separated lengths for the 2-layer model")
    parser.add_argument("--tile", type=int, default=16384, help="config.sequence_tile_size")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--checkpoints-on-device", type=int, default=0, help="config.checkpoints_on_device")
    return parser.parse_args(argv)


def build_model(layers: int, rank: int):
    """Our LlamaForCausalLM with random bf16 weights (made on the GPU, no CPU copy), LoRA on q/k/v/o."""
    from memory_efficient_adapter.modeling_llama import LlamaForCausalLM, LlamaRotaryEmbedding
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to("cuda")  # its float32 frequency buffers, computed
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.config.use_cache = False
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, lora)
    return model.train()


def configure(model, *, tile: int, offload: bool, checkpointing: bool, on_device: int = 0) -> None:
    base = model.get_base_model()
    base.config.sequence_tile_size = tile
    base.config.offload_checkpoints = offload
    base.config.checkpoints_on_device = on_device
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def train_step(model, optimizer, seq_len: int) -> float:
    ids = torch.randint(model.config.vocab_size, (1, seq_len), device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss {loss.item()} at {seq_len} tokens")
    return time.perf_counter() - started


class Probe:
    def __init__(self, args: argparse.Namespace):
        self.args, self.started = args, time.perf_counter()
        self.results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
        self.step_seconds: dict = {}  # (layers, tokens) -> seconds, for predictions

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def predicted_s(self, layers: int, seq_len: int) -> float:
        """From the longest step so far: linear in layers, quadratic in tokens (attention dominates long steps)."""
        if not self.step_seconds:
            return 0.0
        (known_layers, known_len), seconds = max(self.step_seconds.items(), key=lambda item: item[0][1])
        return seconds * (layers / known_layers) * (seq_len / known_len) ** 2

    def measure(self, model, layers: int, seq_len: int, label: str, steps: int, **options) -> None:
        record = {"label": label, "layers": layers, "seq_len": seq_len, **options}
        predicted = self.predicted_s(layers, seq_len) * steps
        if predicted > self.left_s():
            record.update(ok=False, error=f"skipped: predicted {predicted:.0f} s > {self.left_s():.0f} s left")
            return self.write(record)
        configure(model, **options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        torch.cuda.reset_peak_memory_stats()
        try:
            seconds = [train_step(model, optimizer, seq_len) for _ in range(steps)]
        except torch.cuda.OutOfMemoryError:
            record.update(ok=False, error="out of memory")
        else:
            self.step_seconds[(layers, seq_len)] = seconds[-1]
            record.update(ok=True, step_s=round(seconds[-1], 3), tokens_per_s=round(seq_len / seconds[-1], 1))
            record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            if options["offload"]:
                offloaded = layers - min(layers, options.get("on_device", 0))
                record["host_checkpoint_gib"] = round(offloaded * seq_len * LLAMA3_8B["hidden_size"] * 2 / 2**30, 2)
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()
        self.write(record)

    def write(self, record: dict) -> None:
        record["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.results["runs"].append(record)
        print(json.dumps(record), flush=True)
        Path(self.args.output).write_text(json.dumps(self.results, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    probe = Probe(args)
    model = build_model(32, args.lora_rank)
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    probe.write({"label": "built", "layers": 32, "trainable": trainable})
    n = args.throughput_len
    for label, options in (
        ("checkpointing+tiled", dict(tile=args.tile, offload=False, checkpointing=True)),
        ("offloaded+tiled", dict(tile=args.tile, offload=True, checkpointing=True)),
    ):
        probe.measure(model, 32, n, label, steps=2, **options)
    for seq_len in [int(x) for x in args.long_lens.split(",") if x]:
        options = dict(tile=args.tile, offload=True, checkpointing=True, on_device=args.checkpoints_on_device)
        probe.measure(model, 32, seq_len, "offloaded+tiled", steps=1, **options)
    probe.measure(model, 32, n, "checkpointing", steps=2, tile=0, offload=False, checkpointing=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    shallow = build_model(2, args.lora_rank)
    for seq_len in [int(x) for x in args.shallow_lens.split(",") if x]:
        probe.measure(shallow, 2, seq_len, "offloaded+tiled", steps=1, tile=args.tile, offload=True, checkpointing=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
