"""Causal-LM fine-tuning with the kernel layer: one process, or many with torchrun (DDP or FSDP2).

    python scripts/train.py --model PATH --data corpus.txt --output-dir runs/ft --bf16
    torchrun --nproc_per_node=2 scripts/train.py --model PATH --data tokens.npy --fsdp --output-dir runs/ft
    python scripts/train.py --tiny-config llama --trust_remote_code --synthetic --steps 300 --output-dir runs/tiny

A plain PyTorch loop (no Trainer, no accelerate): AdamW, linear warm-up then cosine decay, gradient
accumulation and clipping, bf16 autocast over fp32 weights, gradient checkpointing, DDP or FSDP2 under
torchrun (NCCL on GPUs, gloo on CPUs).

Data (``--data``), cut into ``--seq-len`` blocks of one token stream:
  * ``.txt``: UTF-8 text, tokenized with the model folder's tokenizer; without one (``--tiny-config``), its
    UTF-8 bytes are the tokens.
  * ``.npy``: an integer array of token ids (any shape, read in order), loaded with ``allow_pickle=False``.
  * ``.jsonl``: one document per line, a JSON list of token ids or an object with an ``"input_ids"`` list.
  * ``--synthetic``: a copy task from ``--seed`` (Zipf-distributed random segments, each followed by its
    repeat): the loss falls to the unigram entropy, then further only through attention. For loss parity.
Step ``s`` always trains on the same blocks (a seeded shuffle per epoch, split across ranks and accumulation
micro-steps), so a run resumed from a checkpoint, or run on N GPUs with 1/N of the per-device batch, sees
the same data as an uninterrupted single-device run.

Outputs in ``--output-dir``: ``run.json`` (arguments, versions, world size), ``loss.jsonl`` (one line per step:
step, loss, lr, grad_norm, tokens, time_s), ``checkpoint-<step>/`` (``model.pt``, ``optimizer.pt``,
``state.json``; loaded with ``weights_only=True``) every ``--save-every`` steps and at the end, and
``final/`` (``save_pretrained``). ``--resume`` continues from the newest readable checkpoint there (an unreadable
newer one is reported and skipped) after checking that it comes from the same run: model, batch size, gradient
accumulation, sequence length, step count, data, seed and world size must match ``state.json``. A resume never
truncates ``loss.jsonl``: when it holds steps past the checkpoint, the file is kept as
``loss.jsonl.before-resume-<step>`` and a copy without those steps continues. Without ``--resume``, an output
folder that already holds a run is refused.

Long context (our modeling files): ``--sequence-tile-size N`` runs the MLP and norms over tiles of N tokens,
``--offload-checkpoints`` checkpoints every layer with its input in pinned host memory, ``--lora`` trains PEFT
LoRA adapters (``--lora-rank``, ``--lora-alpha``, ``--lora-targets``) over frozen weights (kept in bf16 with
``--bf16``). ``--max-seq-len-probe`` trains no run: it doubles ``--seq-len`` until a step runs out of memory (or
past ``--probe-time-limit``), bisects, and writes every trial and the largest length that trains, with its
tokens/s and peak memory, to ``probe.json`` in ``--output-dir`` (rewritten after each trial).

Attention: ``--attn_implementation`` is passed to ``from_pretrained`` (``eager``, ``sdpa``, ``mea``, ``mea_chunked``,
...). ``--use_flash_attn true|false|<backend>`` (the original adapter's flag) sets ``USE_FLASH_ATTN`` for the
kernel layer and, unless false, also routes a stock transformers model through it with
``apply_attention_patch``; without the flag the ``USE_FLASH_ATTN`` environment variable applies as usual.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: train_resume.py, seq_len_probe.py
from seq_len_probe import SeqLenProbe, probe_step  # noqa: E402
from train_resume import (  # noqa: E402
    LossLog,
    TrainError,
    check_fresh_output,
    checkpoint_to_resume,
    run_identity,
)

# family: config class (transformers'; Qwen, which has no stock class, ours: load it with --trust_remote_code)
TINY_FAMILIES = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "bloom": "BloomConfig", "qwen": "QWenConfig"}
FALSE_VALUES = ("false", "0", "no", "off")
TRUE_VALUES = ("true", "1", "yes", "on", "auto")



# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local model folder (a from_pretrained path)")
    source.add_argument("--tiny-config", choices=sorted(TINY_FAMILIES), help="train a tiny random model of a family")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="load the folder's own modeling code "
        "(for --tiny-config: our modeling file; without it the stock transformers class)",
    )
    parser.add_argument("--attn_implementation", help="eager, sdpa, mea, mea_<backend>, flash_attention_2, ...")
    parser.add_argument(
        "--use_flash_attn",
        nargs="?",
        const="true",
        help="true (the bare flag too, as in the original adapter), false or a backend name (sets USE_FLASH_ATTN)",
    )

    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="a .txt, .npy or .jsonl file (see the module docstring)")
    data.add_argument("--synthetic", action="store_true", help="a seeded copy-task token stream")

    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in the whole run")
    parser.add_argument("--stop-at", type=int, help="exit after this step, as an interrupted run would (then --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per device per micro-step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--pack",
        action="store_true",
        help="keep document boundaries (.jsonl lines, synthetic segments): each document in a row attends only to "
        "itself, with positions restarting at 0 (position_ids) and no target across a boundary",
    )
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at lr x this")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights and optimizer")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per decoder layer) instead of DDP")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--tiny-hidden", type=int, default=128)
    parser.add_argument("--tiny-layers", type=int, default=4)
    parser.add_argument("--tiny-heads", type=int, default=4)
    parser.add_argument("--tiny-vocab", type=int, default=512)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_long_context_arguments(parser)
    args = parser.parse_args(argv)
    for problem in argument_problems(args):
        parser.error(problem)
    if args.sequence_tile_size < 0 or args.lora_rank < 1 or args.probe_resolution < 1:
        parser.error("--sequence-tile-size must be >= 0, --lora-rank and --probe-resolution >= 1")
    return args


def argument_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the command line, found before anything is written."""
    problems = [f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}"
                for name, least in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 2),
                                    ("warmup", 0), ("save_every", 0), ("tiny_hidden", 1), ("tiny_layers", 1),
                                    ("tiny_heads", 1), ("tiny_vocab", 8))
                if getattr(args, name) < least]
    for name in ("lr", "max_grad_norm"):  # a negative clipping norm would turn the gradients around
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"--{name.replace('_', '-')} must be positive and finite, got {value}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        problems.append(f"--min-lr-ratio must be between 0 and 1, got {args.min_lr_ratio}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        problems.append(f"--weight-decay must be at least 0, got {args.weight_decay}")
    if args.tiny_config and args.tiny_heads >= 1 and args.tiny_hidden % args.tiny_heads:
        problems.append(f"--tiny-hidden {args.tiny_hidden} must be a multiple of --tiny-heads {args.tiny_heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: this machine has no CUDA device torch can use")
    if (args.sequence_tile_size or args.offload_checkpoints) and not args.trust_remote_code:
        problems.append("--sequence-tile-size and --offload-checkpoints need our modeling files (--trust_remote_code)")
    if args.data and Path(args.data).suffix not in (".txt", ".npy", ".jsonl"):
        problems.append(f"--data must be a .txt, .npy or .jsonl file, got {args.data}")
    elif args.data and not Path(args.data).is_file():
        problems.append(f"--data {args.data}: no such file")
    if args.model and not (Path(args.model) / "config.json").is_file():
        problems.append(f"--model {args.model}: not a model folder (no config.json in it)")
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        problems.append("--stop-at must be between 1 and --steps")
    if args.use_flash_attn is not None and (reason := use_flash_attn_problem(args.use_flash_attn)):
        problems.append(reason)
    return problems


def use_flash_attn_problem(value: str) -> str | None:
    """Why ``--use_flash_attn`` cannot be used (None when it can): caught here, not at the first forward."""
    from memory_efficient_adapter.attention import BACKENDS

    if value.strip().lower() in (*TRUE_VALUES, *FALSE_VALUES, *BACKENDS):
        return None
    return (f"--use_flash_attn {value!r} is not true/false/1/0/yes/no/on/off/auto or a kernel-layer backend "
            f"({', '.join(BACKENDS)})")


def add_long_context_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("long context")
    group.add_argument("--sequence-tile-size", type=int, default=0, help="tokens per MLP/norm tile (0: off)")
    group.add_argument("--offload-checkpoints", action="store_true", help="checkpoint each layer, input on the host")
    group.add_argument("--lora", action="store_true", help="train PEFT LoRA adapters over frozen weights")
    group.add_argument("--lora-rank", type=int, default=16)
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    group.add_argument("--lora-targets", help="comma-separated module names (default: the attention projections)")
    group.add_argument("--max-seq-len-probe", action="store_true", help="find the longest --seq-len that trains")
    group.add_argument("--probe-max-seq-len", type=int, default=1 << 22, help="the probe goes no longer than this")
    group.add_argument("--probe-resolution", type=int, default=1024, help="the probe bisects down to this many tokens")
    group.add_argument("--probe-time-limit", type=float, help="seconds: a longer (or predicted longer) step fails")


# ----------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------


class Distributed:
    """Rank, world size and device of this process; a single process when not started by torchrun."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=self.device if use_cuda else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def tiny_config(args: argparse.Namespace):
    """A small random config of ``args.tiny_config``'s family (GQA for LLaMA)."""
    config_class = family_class(TINY_FAMILIES[args.tiny_config])
    hidden, layers, heads, vocab = args.tiny_hidden, args.tiny_layers, args.tiny_heads, args.tiny_vocab
    if args.tiny_config == "qwen":  # its MLP is intermediate_size // 2 wide; logn scaling past seq_length only
        return config_class(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            kv_channels=hidden // heads, intermediate_size=4 * hidden, seq_length=max(args.seq_len, 128))
    if args.tiny_config == "llama":
        kv_heads = heads // 2 if heads % 2 == 0 else heads
        return config_class(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(args.seq_len, 128),
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    if args.tiny_config == "gpt2":
        return config_class(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max(args.seq_len, 128),
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    return config_class(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)  # fmt: skip


def family_class(name: str) -> type:
    """transformers' class of that name, else ours (Qwen's)."""
    import transformers
    from memory_efficient_adapter import modeling_qwen

    return getattr(transformers, name, None) or getattr(modeling_qwen, name)


def write_tiny_model(args: argparse.Namespace, folder: Path) -> None:
    """A seeded random stock checkpoint plus our modeling file and an auto_map pointing at it.

    Loading it with ``--trust_remote_code`` gives our class, without it the stock class: same weights either way.
    """
    from memory_efficient_adapter.families import available_entries, main_entry, write_remote_code

    entry = main_entry(args.tiny_config)  # our causal LM keeps the stock class's name
    torch.manual_seed(args.seed)
    model = family_class(entry.class_name)(tiny_config(args))
    model.save_pretrained(folder)
    configs = [e for e in available_entries(args.tiny_config) if e.auto_class == "AutoConfig"]  # Qwen's
    write_remote_code(folder, args.tiny_config, {e.auto_class: e.reference() for e in [entry, *configs]})


def model_folder(args: argparse.Namespace, dist_info: Distributed) -> Path:
    if args.model:
        return Path(args.model)
    folder = Path(args.output_dir) / f"tiny-{args.tiny_config}"
    if dist_info.is_main and (not args.resume or not (folder / "config.json").exists()):
        write_tiny_model(args, folder)  # a fresh run writes its own (a failed run may have left another one)
    dist_info.barrier()
    return folder


def is_kernel_layer_model(model: torch.nn.Module) -> bool:
    """A model from one of our modeling files (they carry the kernel layer)."""
    return hasattr(sys.modules.get(type(model).__module__), "backend_from_config")


def apply_use_flash_attn(value: str | None) -> str | None:
    """Set USE_FLASH_ATTN from ``--use_flash_attn``; return the backend to patch stock models with, or None.

    The value is read back through the kernel layer's one selection rule (``backend_from_config``), so a
    bad value fails here, before any model is loaded; ``false`` leaves stock models on their own attention.
    """
    if value is None:
        return None
    from memory_efficient_adapter import backend_from_config

    value = value.strip().lower()
    previous = os.environ.get("USE_FLASH_ATTN")
    os.environ["USE_FLASH_ATTN"] = value
    try:
        backend = backend_from_config()
    except ValueError:
        if previous is None:
            del os.environ["USE_FLASH_ATTN"]
        else:
            os.environ["USE_FLASH_ATTN"] = previous
        raise
    return None if value in FALSE_VALUES else backend


def load_model(args: argparse.Namespace, folder: Path, patch_backend: str | None) -> torch.nn.Module:
    import memory_efficient_adapter  # registers the "mea" / "mea_<backend>" attention implementations
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.float()
    if type(model).__module__.startswith("transformers_modules") and type(model)._auto_class is None:
        # transformers 4.57 skips this when it also has a class of that name: then save_pretrained would
        # write an auto_map without the code it points to
        type(model).register_for_auto_class("AutoModelForCausalLM")
    if patch_backend is not None and not is_kernel_layer_model(model):
        memory_efficient_adapter.apply_attention_patch(model, backend=patch_backend)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, dist_info: Distributed) -> torch.nn.Module:
    """DDP or FSDP2 under torchrun; the model itself otherwise. FSDP2 shards in place (no wrapper)."""
    model.to(dist_info.device)
    if dist_info.world_size == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_names:
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def synthetic_tokens(n_tokens: int, vocab_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """A copy task from ``seed``: segments of 3 to seq_len/4 tokens, each followed by its repeat.

    Segment tokens follow a Zipf law over a seeded shuffle of the vocabulary (ids 0-2 are left for
    pad/bos/eos), so the loss first falls to the unigram entropy and then further only through attention.
    """
    return torch.cat(synthetic_documents(n_tokens, vocab_size, seq_len, seed))[:n_tokens]


def synthetic_documents(n_tokens: int, vocab_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """The copy task's documents (a segment followed by its repeat), at least ``n_tokens`` tokens in all."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randperm(vocab_size - 3, generator=generator) + 3
    zipf = 1.0 / torch.arange(1, vocab_size - 2, dtype=torch.float64)
    longest = max(4, seq_len // 4)
    documents, total = [], 0
    while total < n_tokens:
        length = int(torch.randint(3, longest + 1, (1,), generator=generator))
        segment = token_ids[torch.multinomial(zipf, length, replacement=True, generator=generator)]
        documents.append(torch.cat((segment, segment)))
        total += 2 * length
    return documents


def read_token_file(path: Path, folder: Path | None, vocab_size: int | None) -> torch.Tensor:
    """A 1-D token stream from a .txt, .npy or .jsonl file (no pickle anywhere); ids are checked against
    ``vocab_size`` unless it is None (then call ``check_token_range`` once the model is known)."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if not np.issubdtype(array.dtype, np.integer):
                raise TrainError(f"{path}: expected integer token ids, got dtype {array.dtype}")
            tokens = torch.from_numpy(array.astype(np.int64).reshape(-1))
        elif path.suffix == ".jsonl":
            tokens = torch.tensor([token for document in jsonl_documents(path) for token in document],
                                  dtype=torch.int64)
        else:
            tokens = tokenize_text(path.read_text(encoding="utf-8"), folder, vocab_size)
    except (OSError, UnicodeDecodeError) as error:
        raise TrainError(f"{path}: cannot read it: {error}") from None
    except ValueError as error:
        if isinstance(error, TrainError):
            raise
        raise TrainError(f"{path}: {error}") from None
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, path)
    return tokens


def jsonl_documents(path: Path) -> list[list[int]]:
    """The documents of a .jsonl file: one per non-empty line, a list of token ids or {"input_ids": [...]}."""
    documents: list[list[int]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TrainError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            document = record.get("input_ids") if isinstance(record, dict) else record
            if not isinstance(document, list) or not all(
                isinstance(token, int) and not isinstance(token, bool) for token in document
            ):
                raise TrainError(f"{path}:{number}: expected a list of integer token ids or an object with an "
                                 "\"input_ids\" list")
            documents.append(document)
    return documents


def check_token_range(tokens: torch.Tensor, vocab_size: int, path: Path | str) -> None:
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise TrainError(
            f"{path}: token ids must lie in [0, {vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )


def tokenize_text(text: str, folder: Path | None, vocab_size: int | None) -> torch.Tensor:
    """With the folder's tokenizer when there is one; else UTF-8 bytes (needs a vocabulary of at least 256)."""
    if folder is not None and any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return torch.tensor(AutoTokenizer.from_pretrained(folder)(text)["input_ids"], dtype=torch.int64)
    if vocab_size is not None and vocab_size < 256:
        raise TrainError("byte-level text needs a vocabulary of at least 256 tokens (--tiny-vocab 256)")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


class BlockSchedule:
    """Which ``seq_len`` blocks each rank trains on at each step: a fixed function of (seed, step)."""

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        per_device: int,
        grad_accum: int,
        world_size: int,
        seed: int,
        starts: torch.Tensor | None = None,
    ):
        n_blocks = tokens.numel() // seq_len
        if n_blocks == 0:
            raise TrainError(f"the data holds {tokens.numel()} tokens, fewer than one block of {seq_len}")
        self.blocks = tokens[: n_blocks * seq_len].view(n_blocks, seq_len)
        self.starts = None if starts is None else starts[: n_blocks * seq_len].view(n_blocks, seq_len)
        self.per_device, self.grad_accum, self.world_size, self.seed = per_device, grad_accum, world_size, seed
        self._epoch, self._order = -1, None

    @property
    def global_batch(self) -> int:
        return self.per_device * self.grad_accum * self.world_size

    def _block(self, sample: int) -> int:
        epoch, position = divmod(sample, self.blocks.shape[0])
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.blocks.shape[0], generator=generator)
        return int(self._order[position])

    def _micro_blocks(self, step: int, micro_step: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro_step * self.world_size + rank) * self.per_device
        return [self._block(sample) for sample in range(start, start + self.per_device)]

    def micro_batch(self, step: int, micro_step: int, rank: int) -> torch.Tensor:
        return self.blocks[self._micro_blocks(step, micro_step, rank)]

    def model_inputs(self, step: int, micro_step: int, rank: int) -> dict:
        """input_ids and labels of a micro-batch; packed rows (``starts`` given) also get position_ids."""
        blocks = self._micro_blocks(step, micro_step, rank)
        if self.starts is None:
            return {"input_ids": self.blocks[blocks], "labels": self.blocks[blocks]}
        return packed_inputs(self.blocks[blocks], self.starts[blocks])


def document_starts(args: argparse.Namespace, n_tokens: int, vocab_size: int, world_size: int) -> torch.Tensor:
    """For --pack: a bool [n_tokens] that is True where a document begins (a .txt or .npy is one document)."""
    if args.synthetic:
        n_wanted = args.steps * args.batch_size * args.grad_accum * world_size * args.seq_len
        lengths = [len(d) for d in synthetic_documents(n_wanted, vocab_size, args.seq_len, args.seed)]
    elif args.data.endswith(".jsonl"):
        lengths = [len(d) for d in jsonl_documents(Path(args.data))]
    else:
        lengths = [n_tokens]
    starts = torch.zeros(n_tokens, dtype=torch.bool)
    offsets = torch.tensor([0] + lengths[:-1]).cumsum(0)
    starts[offsets[offsets < n_tokens]] = True
    return starts


def packed_inputs(ids: torch.Tensor, starts: torch.Tensor) -> dict:
    """Model inputs of packed rows: position_ids restart at every document start (and at each row's start),
    and the first token of a document is no target (it is not predicted from the document before it)."""
    index = torch.arange(ids.shape[1]).expand_as(ids)
    starts = starts.clone()
    starts[:, 0] = True
    position_ids = index - torch.where(starts, index, 0).cummax(dim=-1).values
    return {"input_ids": ids, "position_ids": position_ids, "labels": ids.masked_fill(starts, -100)}


def load_tokens(args: argparse.Namespace, folder: Path | None, vocab_size: int, world_size: int) -> torch.Tensor:
    if args.synthetic:
        n_tokens = args.steps * args.batch_size * args.grad_accum * world_size * args.seq_len
        return synthetic_tokens(n_tokens, vocab_size, args.seq_len, args.seed)
    return read_token_file(Path(args.data), folder, vocab_size)


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(model, optimizer, step: int, args, dist_info: Distributed) -> Path:
    """Full (gathered) model and optimizer state on rank 0; works for a plain model, DDP and FSDP2 alike."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=_state_dict_options())
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_state_dict_options())
    folder = Path(args.output_dir) / f"checkpoint-{step}"
    if dist_info.is_main:
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save(model_state, partial / "model.pt")
        torch.save(optimizer_state, partial / "optimizer.pt")
        state = {"step": step, **run_identity(args, dist_info.world_size)}
        (partial / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    dist_info.barrier()
    return folder


def save_final(model, args, dist_info: Distributed) -> None:
    """``save_pretrained`` of the gathered weights into ``final/`` (the model's own files, custom code included)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_dict_options())
    if dist_info.is_main:
        with _unsharded_class(model):
            model.save_pretrained(Path(args.output_dir) / "final", state_dict=state)
    dist_info.barrier()


@contextmanager
def _unsharded_class(model: torch.nn.Module):
    """FSDP2 gives a sharded model a generated subclass; save_pretrained must see the model's own class
    (it copies the source file of the class for custom code)."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(base for base in sharded_class.__bases__ if base is not FSDPModule)
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def write_run_info(args, dist_info: Distributed, model) -> None:
    import memory_efficient_adapter
    import transformers

    info = {
        "args": vars(args),
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "USE_FLASH_ATTN": os.environ.get("USE_FLASH_ATTN"),
        "kernel_backends": memory_efficient_adapter.available_backends(dist_info.device.type),
    }
    (Path(args.output_dir) / "run.json").write_text(json.dumps(info, indent=2))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> list[dict]:
    """Run (or resume) training; returns this process's log records of the steps it ran."""
    dist_info = Distributed(args.device)
    try:
        return _train(args, dist_info)
    finally:
        dist_info.close()


def _train(args: argparse.Namespace, dist_info: Distributed) -> list[dict]:
    output_dir = Path(args.output_dir)
    # Everything that can be wrong with the request is found before anything is written.
    if args.resume:
        checkpoint = checkpoint_to_resume(output_dir, run_identity(args, dist_info.world_size))
    else:
        check_fresh_output(output_dir)
        checkpoint = None
    file_tokens = None
    if not args.synthetic:
        early_vocab = args.tiny_vocab if args.tiny_config else None  # a --model's vocabulary is known once loaded
        file_tokens = read_token_file(Path(args.data), Path(args.model) if args.model else None, early_vocab)
        BlockSchedule(file_tokens, args.seq_len, args.batch_size, args.grad_accum, dist_info.world_size, args.seed)
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    dist_info.barrier()
    patch_backend = apply_use_flash_attn(args.use_flash_attn)
    folder = model_folder(args, dist_info)
    model = apply_long_context(load_model(args, folder, patch_backend), args)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if file_tokens is None:
        file_tokens = load_tokens(args, folder, vocab_size, dist_info.world_size)
    check_token_range(file_tokens, vocab_size, args.data or "--synthetic")
    starts = document_starts(args, file_tokens.numel(), vocab_size, dist_info.world_size) if args.pack else None
    schedule = BlockSchedule(
        file_tokens, args.seq_len, args.batch_size, args.grad_accum, dist_info.world_size, args.seed, starts
    )
    core = model
    takes_loss_kwargs = accepts_loss_kwargs(core)
    model = wrap_model(model, args, dist_info)
    optimizer = torch.optim.AdamW(core.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    start_step = checkpoint.restore(core, optimizer) if checkpoint is not None else 0
    del checkpoint  # its state dicts are in the model and optimizer now
    if dist_info.is_main:
        write_run_info(args, dist_info, core)
    log = LossLog(output_dir / "loss.jsonl", start_step, dist_info.is_main)
    last_step = args.stop_at or args.steps
    autocast = torch.autocast(dist_info.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    progress = _progress_bar(args, dist_info, start_step)
    records, started = [], time.time()

    model.train()
    for step in range(start_step, last_step):
        torch.manual_seed(args.seed + 1_000_003 * (step + 1) + dist_info.rank)  # dropout, identical after resume
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        micro_batches = [schedule.model_inputs(step, micro, dist_info.rank) for micro in range(args.grad_accum)]
        loss_kwargs = step_loss_kwargs(micro_batches, dist_info) if takes_loss_kwargs else {}
        for micro_step, inputs in enumerate(micro_batches):
            inputs = {name: value.to(dist_info.device) for name, value in inputs.items()}
            sync = micro_step == args.grad_accum - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync():  # DDP: all-reduce once, after the last micro-step
                with autocast:
                    loss = model(**inputs, **loss_kwargs).loss
                    loss = loss if loss_kwargs else loss / args.grad_accum
                loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        record = {
            "step": step + 1,
            "loss": dist_info.mean(loss_sum),
            "lr": lr,
            "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
            "tokens": (step + 1) * schedule.global_batch * args.seq_len,
            "time_s": round(time.time() - started, 3),
        }
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became {record['loss']} at step {step + 1}")
        log.write(**record)
        records.append(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == last_step:
            save_checkpoint(core, optimizer, step + 1, args, dist_info)

    if progress is not None:
        progress.close()
    if last_step == args.steps:
        save_final(core, args, dist_info)
    return records


def accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes the loss keywords (``num_items_in_batch``), as the Trainer checks: a
    ``**kwargs`` (every transformers 5 causal LM, ours; PEFT's wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters.values()
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def step_loss_kwargs(micro_batches: list[dict], dist_info: Distributed) -> dict:
    """``num_items_in_batch`` for every micro-batch of a step: the targets of the whole step over all ranks,
    per rank (DDP averages the ranks' gradients). Each micro-batch's loss is then its summed loss over that,
    and the step's loss the mean over every target, however the micro-batches split them (packed rows do)."""
    targets = sum(int((inputs["labels"][:, 1:] != -100).sum()) for inputs in micro_batches)
    return {"num_items_in_batch": dist_info.mean(float(targets))}


def _progress_bar(args, dist_info: Distributed, start_step: int):
    if args.no_progress or not dist_info.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=args.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Long context: tiling, offloaded checkpoints, LoRA, and the longest length that trains
# ----------------------------------------------------------------------------------------------

LORA_ATTENTION_TARGETS = {  # model_type: the attention projections, as PEFT matches module names
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen": ["c_attn", "attn.c_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "bloom": ["query_key_value", "self_attention.dense"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def apply_long_context(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """Set the long-context options on the config (read at every forward) and wrap the model with LoRA."""
    if args.sequence_tile_size or args.offload_checkpoints:
        if not is_kernel_layer_model(model):
            raise TrainError("--sequence-tile-size/--offload-checkpoints need our modeling file (--trust_remote_code)")
        model.config.sequence_tile_size = args.sequence_tile_size
        model.config.offload_checkpoints = args.offload_checkpoints
    if not args.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = args.lora_targets.split(",") if args.lora_targets else LORA_ATTENTION_TARGETS.get(model.config.model_type)
    if not targets:
        raise TrainError(f"no default LoRA targets for model_type {model.config.model_type!r}; pass --lora-targets")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    lora = LoraConfig(r=args.lora_rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:  # PEFT's "target modules not found"
        raise TrainError(f"--lora-targets {','.join(targets)}: {str(error).splitlines()[0]}") from error
    if args.bf16:  # frozen weights need no fp32 master copy
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


def probe_max_seq_len(args: argparse.Namespace) -> dict:
    """``--max-seq-len-probe``: the model set up as for training, then ``SeqLenProbe`` over one-sequence steps."""
    import gc

    dist_info = Distributed(args.device)
    if dist_info.world_size != 1:
        raise ValueError("--max-seq-len-probe runs in one process")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args, dist_info)
    model = apply_long_context(load_model(args, folder, apply_use_flash_attn(args.use_flash_attn)), args)
    model.to(dist_info.device).train()
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    vocab_size = model.get_input_embeddings().weight.shape[0]

    def run_step(seq_len: int) -> dict:
        return probe_step(model, optimizer, seq_len, vocab_size, dist_info.device, args)

    def cleanup() -> None:
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if dist_info.device.type == "cuda":
            torch.cuda.empty_cache()

    info = {"args": vars(args), "device": str(dist_info.device), "trainable": sum(p.numel() for p in trainable)}
    return SeqLenProbe(run_step, cleanup, args, output_dir / "probe.json", info).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.max_seq_len_probe:
            result = probe_max_seq_len(args)
            print(json.dumps({key: result[key] for key in ("max_seq_len", "best")}))
            return 0
        train(args)
    except TrainError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
