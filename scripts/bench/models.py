"""Model builders: the benchmark's model sizes, stock and our models built from one config, and FLOP counts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import MODELING_DIR, module_from_file
from .impls import apply_liger, parse_impl

families = module_from_file("mea_bench_families", MODELING_DIR / "families.py")
FAMILIES = tuple(families.FAMILIES)
STOCK_CONFIG = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "bloom": "BloomConfig", "bart": "BartConfig"}


@dataclass(frozen=True)
class Dims:
    layers: int  # BART: per stack (encoder and decoder each)
    hidden: int
    heads: int
    vocab: int
    intermediate: Optional[int] = None


# ~8 layers, hidden 2048, 16 heads (Qwen: Qwen-7B's 4096 x 32 heads, 4 layers). A 32k vocabulary for all, so
# that the LM head does not hide the attention (BLOOM's real 250k vocabulary would dominate memory); --vocab
# sets another (Qwen-7B's 151,936 makes the logits the biggest tensor of a training step).
FULL_DIMS = {
    "llama": Dims(8, 2048, 16, 32000, 5632),
    "gpt2": Dims(8, 2048, 16, 32000),
    "bloom": Dims(8, 2048, 16, 32000),
    "bart": Dims(4, 2048, 16, 32000),
    "qwen": Dims(4, 4096, 32, 32000, 22016),
}
TINY_DIMS = {
    "llama": Dims(2, 64, 4, 256, 128),
    "gpt2": Dims(2, 64, 4, 256),
    "bloom": Dims(2, 64, 4, 256),
    "bart": Dims(1, 64, 4, 256),
    "qwen": Dims(2, 64, 4, 256, 256),
}


def qwen_at_llama_shape(llama: Dims) -> Dims:
    """Qwen's file at the LLaMA-shaped sizes (--qwen-shape llama), so that the two compare at one size. Qwen's
    ``intermediate_size`` counts both of its MLP's input projections, twice LLaMA's MLP width."""
    return dataclasses.replace(llama, intermediate=2 * llama.intermediate)


def family_dims(
    tiny: bool, vocab: Optional[int] = None, layers: Optional[int] = None, qwen_shape: str = "qwen-7b"
) -> dict:
    """Each family's sizes; ``vocab`` (--vocab) replaces every family's vocabulary size, ``layers`` (--layers)
    every family's number of layers (BART: per stack); ``qwen_shape="llama"`` gives Qwen LLaMA's sizes."""
    dims = dict(TINY_DIMS if tiny else FULL_DIMS)
    if qwen_shape == "llama":
        dims["qwen"] = qwen_at_llama_shape(dims["llama"])
    changes = {name: value for name, value in (("vocab", vocab), ("layers", layers)) if value is not None}
    return {family: dataclasses.replace(d, **changes) for family, d in dims.items()}


# Config field names per family: (vocabulary, hidden size, layers, heads, positions); BART's layers and heads
# are set per stack below, and BLOOM (ALiBi) has no position limit.
SIZE_FIELDS = {
    "llama": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"),
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    "bloom": ("vocab_size", "hidden_size", "n_layer", "n_head", None),
    "bart": ("vocab_size", "d_model", None, None, "max_position_embeddings"),
    "qwen": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"),
}
DROPOUT_FIELDS = {
    "llama": ("attention_dropout",),
    "gpt2": ("attn_pdrop", "resid_pdrop", "embd_pdrop"),
    "bloom": ("attention_dropout", "hidden_dropout"),
    "bart": ("dropout", "attention_dropout", "activation_dropout"),
    "qwen": ("emb_dropout_prob", "attn_dropout_prob"),
}
TOKEN_IDS = {
    "llama": {"bos_token_id": 1, "eos_token_id": 2},
    "gpt2": {"bos_token_id": 0, "eos_token_id": 0},
    "bloom": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
    "bart": {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2},
    "qwen": {},
}


def family_extras(family: str, dims: Dims, max_pos: int, dtype: torch.dtype) -> dict:
    """The config fields one family has beyond SIZE_FIELDS, DROPOUT_FIELDS and TOKEN_IDS."""
    if family == "llama":
        return {"intermediate_size": dims.intermediate, "num_key_value_heads": dims.heads, "tie_word_embeddings": False}
    if family == "bart":
        per_stack = {"layers": dims.layers, "attention_heads": dims.heads, "ffn_dim": 4 * dims.hidden}
        stacks = {f"{stack}_{name}": value for stack in ("encoder", "decoder") for name, value in per_stack.items()}
        return {**stacks, "forced_eos_token_id": None}
    if family == "qwen":
        precision = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "fp32": dtype == torch.float32}
        sizes = {"kv_channels": dims.hidden // dims.heads, "intermediate_size": dims.intermediate}
        return {**sizes, "seq_length": max_pos, "use_flash_attn": "auto", **precision}
    return {}


def config_kwargs(family: str, dims: Dims, max_pos: int, dropout: float, dtype: torch.dtype) -> dict:
    """The keyword arguments of ``family``'s config class for these sizes."""
    if family not in SIZE_FIELDS:
        raise ValueError(f"unknown family {family!r}")
    sizes = (dims.vocab, dims.hidden, dims.layers, dims.heads, max_pos)
    kwargs = {name: value for name, value in zip(SIZE_FIELDS[family], sizes, strict=True) if name is not None}
    kwargs.update({name: dropout for name in DROPOUT_FIELDS[family]})
    return {**kwargs, **TOKEN_IDS[family], **family_extras(family, dims, max_pos, dtype)}


class ModelFactory:
    """Builds stock models from a config and ours through trust_remote_code from a folder of our files."""

    def __init__(self, device: torch.device, flex_static_shapes: int, baseline_modeling: Optional[Path] = None):
        self.device = device
        self.flex_static_shapes = flex_static_shapes
        self.baseline_modeling = baseline_modeling
        self._folder = tempfile.TemporaryDirectory(prefix="mea-bench-models-")  # removed with the factory
        self.root = Path(self._folder.name)
        self.undo: list = []
        self.adapter: Optional[dict] = None  # PEFT LoraConfig options every model is wrapped with (--lora)
        self.loss_chunk_size: Optional[int] = None  # config.loss_chunk_size of our models (--loss-chunk-size)

    def config(self, family: str, kwargs: dict, ours: bool, baseline: bool = False):
        import transformers

        if not ours:
            if family not in STOCK_CONFIG:
                raise ValueError(f"{family} has no stock transformers class (not supported)")
            return getattr(transformers, STOCK_CONFIG[family])(**kwargs)
        # ours are loaded as users load them: copied next to a config.json whose auto_map points at them
        folder = self.root / (f"mea_base_{family}" if baseline else f"mea_bench_{family}")
        folder.mkdir(parents=True, exist_ok=True)
        if family in STOCK_CONFIG:
            getattr(transformers, STOCK_CONFIG[family])(**kwargs).save_pretrained(folder)
        else:
            data = {
                "model_type": families.FAMILIES[family].model_type,
                "architectures": [families.main_entry(family).class_name],
                **kwargs,
            }
            (folder / "config.json").write_text(json.dumps(data, indent=2))
        families.write_remote_code(folder, family)
        if baseline:
            self.copy_baseline_files(folder, family)
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)

    def copy_baseline_files(self, folder: Path, family: str) -> None:
        """Replace our files in ``folder`` by the baseline folder's (the base:<backend> impls)."""
        if self.baseline_modeling is None:
            raise ValueError("base:<backend> impls need --baseline-modeling DIR (a modeling/ folder of our files)")
        for name in families.family_files(family):
            source = self.baseline_modeling / name
            if not source.is_file():
                raise FileNotFoundError(f"the baseline folder has no {name}")
            (folder / name).write_bytes(source.read_bytes())

    def build(self, family: str, impl: str, kwargs: dict, dtype: torch.dtype):
        """A model of ``family`` as ``impl`` names it (see impls.py), on the device, in ``dtype``."""
        import transformers

        spec = parse_impl(impl)
        config = self.config(family, kwargs, spec.ours, baseline=spec.kind == "base")
        auto = getattr(transformers, families.main_entry(family).auto_class)
        if spec.liger:
            self.undo.append(apply_liger(family))  # before the model is built: it patches the classes
        torch.manual_seed(0)
        with torch.device(self.device):
            if spec.ours:
                config.attn_backend = spec.attention
                config.loss_chunk_size = self.loss_chunk_size
                model = auto.from_config(config, trust_remote_code=True, dtype=dtype)
                if not type(model).__module__.startswith("transformers_modules"):
                    raise RuntimeError(f"expected our class through trust_remote_code, got {type(model).__module__}")
                sys.modules[type(model).__module__].set_flex_static_shapes(self.flex_static_shapes)
            else:
                model = auto.from_config(config, attn_implementation=spec.attention, dtype=dtype)
        model = model.to(self.device)
        if self.adapter is not None:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(1)
            model = get_peft_model(model, LoraConfig(**self.adapter))
        if spec.cudagraphs:
            model.compile(mode="reduce-overhead")
        elif spec.compile:
            model.compile()
        return model

    def release(self) -> None:
        """Undo what the last build patched outside its model (Liger), once that model is dropped."""
        while self.undo:
            self.undo.pop()()


def lora_adapter(targets: list, modules_to_save: list) -> Optional[dict]:
    """PEFT ``LoraConfig`` options for ``--lora`` (rank 16, alpha 32, no dropout), or None without it."""
    if not targets:
        return None
    return dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, modules_to_save=modules_to_save or None)


def matmul_weights(model, family: str) -> dict:
    """Weights of every matmul layer by the tokens they see: BART's encoder and its decoder's cross-attention
    keys/values (source tokens), and the rest (target tokens; every weight of a decoder-only model). Embeddings
    are lookups."""
    conv1d = None
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D as conv1d
    counts = {"encoder": 0, "cross_kv": 0, "decoder": 0}
    for name, module in model.named_modules():
        is_matmul = isinstance(module, torch.nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
        if not is_matmul:
            continue
        counts[_matmul_part(family, name)] += module.weight.numel()
    return counts


def _matmul_part(family: str, name: str) -> str:
    if family != "bart":
        return "decoder"
    if ".encoder." in f".{name}.":
        return "encoder"
    return "cross_kv" if name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj")) else "decoder"


def attention_geometry(model, family: str) -> tuple:
    """(layers, d_attn) of the self-attention stack(s); BART: (encoder layers, decoder layers, d_attn)."""
    c = model.config
    if family == "bart":
        return c.encoder_layers, c.decoder_layers, c.d_model
    if family == "gpt2":
        return c.n_layer, c.n_embd
    if family == "bloom":
        return c.n_layer, c.hidden_size
    if family == "qwen":
        return c.num_hidden_layers, c.num_attention_heads * c.kv_channels
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_attention_heads * head_dim


def attention_forward_flops(model, family: str, batch: int, seq: int, tgt: Optional[int] = None) -> float:
    if family == "bart":
        enc_layers, dec_layers, d = attention_geometry(model, family)
        return 4.0 * batch * d * (enc_layers * seq * seq + dec_layers * (0.5 * tgt * tgt + tgt * seq))
    layers, d = attention_geometry(model, family)
    return 4.0 * batch * d * layers * 0.5 * seq * seq


def training_flops(
    model, family: str, batch: int, seq: int, tgt: Optional[int], attention_share: float = 1.0
) -> float:
    """``6·N·T + 3·A``; ``attention_share`` scales A for packed rows (documents attend only to themselves)."""
    w = matmul_weights(model, family)
    if family == "bart":
        tokens_mm = (w["encoder"] + w["cross_kv"]) * batch * seq + w["decoder"] * batch * tgt
    else:
        tokens_mm = w["decoder"] * batch * seq
    return 6.0 * tokens_mm + 3.0 * attention_share * attention_forward_flops(model, family, batch, seq, tgt)


def packed_attention_share(position_ids: torch.Tensor) -> float:
    """Causal attention FLOPs of rows packed from documents (positions restarting at 0) over those of whole
    rows: the mean over rows of sum(document length²) / row length²."""
    shares = []
    for row in position_ids.cpu():
        starts = torch.nonzero(row == 0).flatten().tolist() + [row.numel()]
        lengths = [end - start for start, end in zip(starts[:-1], starts[1:])]
        shares.append(sum(length * length for length in lengths) / row.numel() ** 2)
    return sum(shares) / len(shares)


def prefill_flops(model, family: str, batch: int, seq: int) -> float:
    w = matmul_weights(model, family)
    if family == "bart":
        source = (w["encoder"] + w["cross_kv"]) * batch * seq
        return 2.0 * (source + w["decoder"] * batch) + attention_forward_flops(model, family, batch, seq, 1)
    return 2.0 * w["decoder"] * batch * seq + attention_forward_flops(model, family, batch, seq)


def model_flops_utilisation(flops: float, step_ms: float, peak_tflops: Optional[float]) -> Optional[float]:
    """MFU: the FLOP rate a step achieves over the device's peak (None where the peak is unknown)."""
    if not peak_tflops:
        return None
    return flops / (step_ms / 1e3) / 1e12 / peak_tflops


def half_precision(model) -> bool:
    """MFU is against the bf16/fp16 tensor-core peak; for fp32 runs (the light table) it is not reported."""
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


def random_ids(vocab: int, batch: int, seq: int, device) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, seq), device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


# ----------------------------------------------------------------------------------------------
# One configuration, shared by the train-like sections
