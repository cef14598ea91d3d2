"""Long-context LoRA training of an 8B-shaped model on one GPU: tokens/s and peak memory by length.

    python scripts/long_context_probe.py --output runs/long_context.json --budget-s 200
    python scripts/long_context_probe.py --model qwen-7b --output runs/qwen.json --throughput-len 0 \
        --long-lens 262144

Random bf16 weights of the real shape (``--model``: Llama-3-8B, or Qwen-7B through our Qwen file), built on the
device from our modeling file; PEFT LoRA r=16 on the attention projections (q/k/v/o); bf16 autocast; one
sequence per step (forward, backward, AdamW step). Measured, in this order, each skipped when its length is 0
or empty, or when the time left in ``--budget-s`` cannot hold it (the step time is predicted from the longest
step so far of the same setup):

1. ``--stock-lens`` (Llama only): stock transformers ``LlamaForCausalLM`` (sdpa attention), the same shape,
   LoRA and gradient checkpointing: tokens/s and peak memory. Built, measured and freed first.
2. ``--exactness-len`` tokens: the loss and every LoRA gradient of our model with the long-context options
   (tiled MLP and norms, offloaded checkpoints) against the same model without them, same weights and tokens.
3. ``--throughput-len`` tokens with the tiled MLP, with gradient checkpointing on the device, then with
   offloaded checkpoints (a warm-up step, then a timed one).
4. ``--long-lens`` with the tiled MLP and offloaded checkpoints: one step each, the whole model; then
   ``--throughput-len`` with plain gradient checkpointing (no tiling), as in step 3.
5. ``--shallow-lens`` with the same options on a 2-layer model of the same width and vocabulary: with
   offloaded checkpoints the GPU's peak hardly depends on the depth (one layer is recomputed at a time).

Host memory for the checkpoints is ``layers x tokens x hidden x 2`` bytes (reported beside each offloaded run,
with the pinned host memory the allocator actually holds where PyTorch reports it). Every result is appended
to ``--output`` (JSON) as soon as it is measured, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: seq_len_probe.py
from seq_len_probe import is_out_of_memory, synchronize  # noqa: E402

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # The published Qwen-7B config: intermediate_size 22016 is the sum of w1's and w2's widths (11008 each).
    "qwen-7b": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        kv_channels=128, seq_length=8192, max_position_embeddings=32768, layer_norm_epsilon=1e-6, bf16=True,
    ),
}  # fmt: skip
LORA_TARGETS = {"llama3-8b": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen-7b": r".*\.attn\.(c_attn|c_proj)"}
# The long-context options the exactness check turns on (the tile is set from its length, so tiling happens).
EXACTNESS_TILES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSON file, rewritten after every measurement")
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--shape", default="{}", help="JSON overrides of the model shape (tests use tiny ones)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new steps after this")
    parser.add_argument("--throughput-len", type=int, default=32768, help="0: skip steps 3 and 4's last")
    parser.add_argument("--long-lens", default="131072", help="comma-separated lengths for the whole model")
    parser.add_argument("--shallow-lens", default="", help="comma-separated lengths for the 2-layer model")
    parser.add_argument("--stock-lens", default="", help="comma-separated lengths for stock transformers")
    parser.add_argument("--stock-steps", type=int, default=2, help="steps per stock length (the last is timed)")
    parser.add_argument("--exactness-len", type=int, default=0, help="0: skip the exactness check")
    parser.add_argument("--exactness-noise", action="store_true",
                        help="also measure the bf16 noise: the plain model's LoRA gradients in bf16 against fp32")
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the random weights")
    parser.add_argument("--tile", type=int, default=16384, help="config.sequence_tile_size")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--checkpoints-on-device", type=int, default=0, help="config.checkpoints_on_device")
    args = parser.parse_args(argv)
    args.shape_kwargs = {**SHAPES[args.model], **json.loads(args.shape)}
    if args.stock_lens and args.model != "llama3-8b":
        parser.error("--stock-lens: transformers has no stock Qwen-7B model (it is remote code only)")
    return args


def lengths(text: str) -> list:
    return [int(item) for item in text.split(",") if item]


def _randomize_(model: torch.nn.Module, seed: int, std: float) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def _empty_model(model_class, config, device: str) -> torch.nn.Module:
    """The model with bf16 weights allocated straight on ``device`` (no full-size CPU copy)."""
    with torch.device("meta"):
        model = model_class(config)
    return model.to(torch.bfloat16).to_empty(device=device)


def build_model(args: argparse.Namespace, layers: int, stock: bool = False):
    """Random bf16 weights, PEFT LoRA on the attention projections (A and B random, so every LoRA gradient is
    non-zero), in training mode. ``stock``: transformers' own LlamaForCausalLM with sdpa attention."""
    from peft import LoraConfig, get_peft_model

    shape = {**args.shape_kwargs, "num_hidden_layers": layers}
    if args.model == "qwen-7b":
        from memory_efficient_adapter.configuration_qwen import QWenConfig
        from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

        model = _empty_model(QWenLMHeadModel, QWenConfig(**shape), args.device)  # rotary tables: made per step
    else:
        import transformers

        ours = __import__("memory_efficient_adapter.modeling_llama", fromlist=["LlamaForCausalLM"])
        module = transformers.models.llama.modeling_llama if stock else ours
        config = transformers.LlamaConfig(**shape)
        if stock:
            config._attn_implementation = "sdpa"
        model = _empty_model(module.LlamaForCausalLM, config, args.device)
        model.model.rotary_emb = module.LlamaRotaryEmbedding(config).to(args.device)  # float32 buffers, computed
    _randomize_(model, seed=0, std=args.init_std)
    model.config.use_cache = False
    torch.manual_seed(0)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS[args.model],
                      lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    return get_peft_model(model, lora).train()


def configure(model, *, tile: int, offload: bool, checkpointing: bool, on_device: int = 0) -> None:
    base = model.get_base_model()
    base.config.sequence_tile_size = tile
    base.config.offload_checkpoints = offload
    base.config.checkpoints_on_device = on_device
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def loss_and_backward(model, seq_len: int, seed: int = 0, autocast: bool = True) -> torch.Tensor:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, seq_len), generator=generator).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss {loss.item()} at {seq_len} tokens")
    return loss.detach().float()


def train_step(model, optimizer, seq_len: int) -> float:
    device = next(model.parameters()).device
    synchronize(device)
    started = time.perf_counter()
    loss_and_backward(model, seq_len)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def lora_gradients(model) -> dict:
    grads = {name: param.grad.float().clone() for name, param in model.named_parameters() if param.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _differences(loss, grads: dict, expected_loss, expected: dict, prefix: str) -> dict:
    """Relative differences of the loss and of each LoRA gradient (by norm): the largest, where, the mean."""
    if grads.keys() != expected.keys() or any(grad.abs().sum() == 0 for grad in expected.values()):
        raise AssertionError("the LoRA gradients are missing or zero: the comparison would prove nothing")
    errors = {name: ((grads[name] - grad).norm() / grad.norm()).item() for name, grad in expected.items()}
    worst = max(errors, key=errors.get)
    return {
        f"{prefix}loss_rel_diff": abs(loss.item() - expected_loss.item()) / abs(expected_loss.item()),
        f"{prefix}grad_rel_diff_max": errors[worst], f"{prefix}grad_rel_diff_worst": worst,
        f"{prefix}grad_rel_diff_mean": sum(errors.values()) / len(errors),
    }  # fmt: skip


def exactness(model, seq_len: int, noise: bool = False) -> dict:
    """Loss and LoRA gradients with the long-context options (tiles of ``seq_len / EXACTNESS_TILES`` tokens,
    offloaded checkpoints) against the model without them (no checkpointing at all): relative differences.
    ``noise``: also the plain model in bf16 against the same weights in fp32 without autocast (``noise_*``), the
    yardstick of what bf16 alone changes."""
    configure(model, tile=0, offload=False, checkpointing=False)
    expected_loss = loss_and_backward(model, seq_len, seed=1)
    expected = lora_gradients(model)
    tile = max(1, seq_len // EXACTNESS_TILES)
    configure(model, tile=tile, offload=True, checkpointing=True)
    loss = loss_and_backward(model, seq_len, seed=1)
    grads = lora_gradients(model)
    record = {"tile": tile, "loss_without": round(expected_loss.item(), 6), "loss_with": round(loss.item(), 6),
              "lora_tensors": len(expected), **_differences(loss, grads, expected_loss, expected, "")}  # fmt: skip
    if noise:
        configure(model, tile=0, offload=False, checkpointing=False)
        frozen = [param for param in model.parameters() if not param.requires_grad]
        dtype = frozen[0].dtype
        for param in frozen:  # bf16 -> fp32 -> bf16 is exact: the weights come back unchanged
            param.data = param.data.float()
        fp32_loss = loss_and_backward(model, seq_len, seed=1, autocast=False)
        fp32 = lora_gradients(model)
        for param in frozen:
            param.data = param.data.to(dtype)
        record.update(_differences(expected_loss, expected, fp32_loss, fp32, "noise_"))
    return record


def host_peak_rss_gib() -> float | None:
    """The process's peak resident host memory (pinned checkpoint buffers included), where Linux reports it."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return None


def memory_record(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    record = {
        "host_peak_rss_gib": host_peak_rss_gib(),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
    }
    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    if host_stats is not None:  # the pinned-memory pool of the caching host allocator (PyTorch >= 2.6)
        for key, value in host_stats().items():  # the keys differ between PyTorch versions: all byte counts
            if "bytes" in key and key.endswith((".current", ".peak")):
                record[f"pinned_host_{key.replace('.', '_')}_gib"] = round(value / 2**30, 2)
    return record


def _reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        reset_host = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
        if reset_host is not None:
            reset_host()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Probe:
    def __init__(self, args: argparse.Namespace):
        self.args, self.started, self.device = args, time.perf_counter(), torch.device(args.device)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        self.results = {"device": name, "torch": torch.__version__, "model": args.model,
                        "shape": args.shape_kwargs, "runs": []}  # fmt: skip
        self.step_seconds: dict = {}  # (label, layers, tokens) -> seconds, for predictions

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def predicted_s(self, label: str, layers: int, seq_len: int) -> float:
        """From the longest step so far of the same setup: linear in layers, quadratic in tokens (attention
        dominates long steps). 0 when there is none."""
        known = {key: seconds for key, seconds in self.step_seconds.items() if key[0] == label}
        if not known:
            return 0.0
        (_, known_layers, known_len), seconds = max(known.items(), key=lambda item: item[0][2])
        return seconds * (layers / known_layers) * (seq_len / known_len) ** 2

    def measure(self, model, layers: int, seq_len: int, label: str, steps: int, **options) -> None:
        record = {"label": label, "layers": layers, "seq_len": seq_len, **options}
        predicted = self.predicted_s(label, layers, seq_len) * steps
        if predicted > self.left_s():
            record.update(ok=False, error=f"skipped: predicted {predicted:.0f} s > {self.left_s():.0f} s left")
            return self.write(record)
        configure(model, **options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        _reset_peaks(self.device)
        try:
            seconds = [train_step(model, optimizer, seq_len) for _ in range(steps)]
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            record.update(ok=False, error="out of memory", **memory_record(self.device))
        else:
            self.step_seconds[(label, layers, seq_len)] = seconds[-1]
            record.update(ok=True, steps=steps, step_s=round(seconds[-1], 3),
                          tokens_per_s=round(seq_len / seconds[-1], 1), **memory_record(self.device))  # fmt: skip
            if options["offload"]:
                offloaded = layers - min(layers, options.get("on_device", 0))
                hidden = self.args.shape_kwargs["hidden_size"]
                record["host_checkpoint_gib"] = round(offloaded * seq_len * hidden * 2 / 2**30, 2)
        del optimizer
        model.zero_grad(set_to_none=True)
        _release(self.device)
        self.write(record)

    def write(self, record: dict) -> None:
        record["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.results["runs"].append(record)
        print(json.dumps(record), flush=True)
        Path(self.args.output).write_text(json.dumps(self.results, indent=2))


def run_stock(probe: Probe, args: argparse.Namespace) -> None:
    stock_lens = lengths(args.stock_lens)
    if not stock_lens:
        return
    layers = args.shape_kwargs["num_hidden_layers"]
    model = build_model(args, layers, stock=True)
    for seq_len in stock_lens:
        probe.measure(model, layers, seq_len, "stock sdpa, checkpointing", steps=args.stock_steps, tile=0,
                      offload=False, checkpointing=True)  # fmt: skip
    del model
    _release(probe.device)


def run_ours(probe: Probe, args: argparse.Namespace) -> None:
    layers = args.shape_kwargs["num_hidden_layers"]
    model = build_model(args, layers)
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    probe.write({"label": "built", "layers": layers, "trainable": trainable})
    if args.exactness_len:
        result = exactness(model, args.exactness_len, args.exactness_noise)
        probe.write({"label": "exactness", "seq_len": args.exactness_len, **result})
        _release(probe.device)
    n = args.throughput_len
    tiled = dict(tile=args.tile, checkpointing=True)
    if n:
        probe.measure(model, layers, n, "checkpointing+tiled", steps=2, offload=False, **tiled)
        probe.measure(model, layers, n, "offloaded+tiled", steps=2, offload=True, **tiled)
    for seq_len in lengths(args.long_lens):
        probe.measure(model, layers, seq_len, "offloaded+tiled", steps=1, offload=True,
                      on_device=args.checkpoints_on_device, **tiled)  # fmt: skip
    if n:
        probe.measure(model, layers, n, "checkpointing", steps=2, tile=0, offload=False, checkpointing=True)
    del model
    _release(probe.device)
    shallow_lens = lengths(args.shallow_lens)
    if shallow_lens:
        shallow = build_model(args, 2)
        for seq_len in shallow_lens:
            probe.measure(shallow, 2, seq_len, "offloaded+tiled", steps=1, offload=True, **tiled)


def main(argv=None) -> int:
    args = parse_args(argv)
    probe = Probe(args)
    run_stock(probe, args)
    run_ours(probe, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
