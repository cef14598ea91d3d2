#!/usr/bin/env python
"""Build and publish Hugging Face Hub repos that carry our modeling files (loaded with trust_remote_code).

Each file in configs/ describes one repo (see configs/README.md). A `model` repo holds our
`modeling_<family>.py` (+ `configuration_qwen.py` and `qwen_generation_utils.py` for Qwen), the source
checkpoint's config.json with `auto_map` pointing at our classes, its weights as safetensors, its tokenizer,
generation and license files, and a model card. A `code` repo holds only our modeling files, for `auto_map`
references from other repos.

    python hub_upload.py configs/bloom-560m.yaml --dry-run           # print the plan, write nothing
    python hub_upload.py configs/bloom-560m.yaml --local-dir out/b   # write the folder, push nothing
    python hub_upload.py configs/*.yaml --verify                     # push (needs a token), then load back
    python hub_upload.py --reference bigscience/bloom-560m --family bloom \\
        --code-repo memory-efficient-adapter/mea-modeling --local-dir out/bloom-ref   # config.json

The token comes from --token, HF_TOKEN or `hf auth login`; prefer the last two, since a command-line
argument can end up in shell history. It is only ever handed to huggingface_hub, never printed or written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from memory_efficient_adapter.families import (
    FAMILIES,
    ModelingFilesError,
    auto_map,
    available_entries,
    copy_modeling_files,
    family_files,
    main_entry,
)

PROJECT_URL = "https://github.com/memory-efficient-adapter/memory-efficient-adapter"
CODE_LICENSE = "apache-2.0"

logger = logging.getLogger("hub_upload")

ALL_FAMILIES = "all"  # `family: all` in a code config publishes every family's files

# The kernel layer's backends (modeling/attention.py), listed on every model card; `backend` options must be one.
BACKENDS: dict[str, str] = {
    "auto": "the fastest backend that can take each call (default)",
    "sdpa": "PyTorch scaled_dot_product_attention (cuDNN / flash / memory-efficient kernels)",
    "cudnn": "cuDNN's graph attention with native ALiBi (BLOOM), when nvidia-cudnn-frontend is installed",
    "flex": "torch flex_attention with ALiBi and masks as score mods (compiles on first use)",
    "flash_attn": "the flash-attn package, when installed",
    "xformers": "xformers memory-efficient attention, when installed and working",
    "chunked": "pure PyTorch, O(n) memory, runs anywhere",
    "eager": "the reference math path (GPT-2: light softmax, fused dropout-matmul)",
}

WEIGHT_INDEXES = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
# Files copied verbatim from the source checkpoint when present (top level only).
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
COPIED_PATTERNS = ("tokenization_*.py", "*.tiktoken", "LICENSE*", "NOTICE*", "USE_POLICY*")
# Remote weights that a re-upload replaces; deleted in the same commit when our folder no longer has them.
STALE_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
CARD_FIELDS = ("license", "license_name", "license_link", "language", "pipeline_tag")


class ConfigError(ValueError):
    """A configs/ file or command line that cannot work; reported without a traceback."""


class VerifyError(RuntimeError):
    """What was published does not load or run as our remote code."""


# --------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class RepoConfig:
    name: str  # where it came from, for messages
    family: str
    target: str
    publish: str  # "model" | "code"
    source: str | None = None
    source_revision: str | None = None
    backend: str | None = None
    revision: str = "main"
    private: bool = False
    license: str | None = None

    @property
    def families(self) -> list[str]:
        return list(FAMILIES) if self.family == ALL_FAMILIES else [self.family]


_TOP_KEYS = {"family", "source", "source_revision", "target", "publish", "options"}
_OPTION_KEYS = {"backend", "revision", "private", "license"}


def load_config(path: str | Path) -> RepoConfig:
    """Read and validate one configs/ file (YAML, or JSON for a .json name)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return parse_config(raw, name=str(path))


def checked_target(target: Any, name: str) -> str:
    if not isinstance(target, str) or target.count("/") != 1:
        raise ConfigError(f"{name}: `target` must be '<org>/<name>', not {target!r}")
    try:
        validate_repo_id(target)
    except HFValidationError as error:
        raise ConfigError(f"{name}: `target` is not a Hub repo id: {error}") from None
    return target


def parse_config(raw: Any, name: str = "<config>") -> RepoConfig:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{name}: {message}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping at the top level")
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise fail("`options` must be a mapping")
    if unknown := set(raw) - _TOP_KEYS:
        raise fail(f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if unknown := set(options) - _OPTION_KEYS:
        raise fail(f"unknown options {sorted(unknown)}; allowed: {sorted(_OPTION_KEYS)}")

    publish = raw.get("publish", "model")
    if publish not in ("model", "code"):
        raise fail(f"`publish` must be 'model' or 'code', not {publish!r}")
    family = raw.get("family")
    allowed_families = [*FAMILIES, ALL_FAMILIES] if publish == "code" else list(FAMILIES)
    if family not in allowed_families:
        raise fail(f"`family` must be one of {allowed_families}, not {family!r}")
    source = raw.get("source")
    if publish == "model" and not source:
        raise fail("a `model` repo needs a `source` (Hub repo id or local folder)")
    if publish == "code" and options.get("backend"):
        raise fail("a `code` repo takes no `backend`")
    if publish == "code" and (source or raw.get("source_revision")):
        raise fail("a `code` repo takes no `source`: it holds only our files")
    backend = options.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise fail(f"`backend` must be one of {list(BACKENDS)}, not {backend!r}")
    private = options.get("private", False)
    if not isinstance(private, bool):
        raise fail("`private` must be true or false")
    return RepoConfig(
        name=name,
        family=family,
        target=checked_target(raw.get("target"), name),
        publish=publish,
        source=str(source) if source else None,
        source_revision=raw.get("source_revision"),
        backend=backend,
        revision=str(options.get("revision", "main")),
        private=private,
        license=options.get("license"),
    )


# ------------------------------------------------------------------------------------------------ sources
class Source:
    """A checkpoint to publish: a local folder or a Hub repo (read at one revision)."""

    def __init__(self, spec: str, revision: str | None = None, token: str | None = None):
        self.spec = spec
        self.token = token
        self.local = Path(spec).expanduser() if Path(spec).expanduser().is_dir() else None
        if self.local is None:
            try:
                validate_repo_id(spec)
            except HFValidationError:
                raise ConfigError(f"source {spec!r} is neither a folder nor a Hub repo id") from None
        self.revision = revision
        self._sizes: dict[str, int] | None = None
        self._commit: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.local is None

    def commit(self) -> str | None:
        """The Hub commit the source is read at (None for a local folder)."""
        if self.is_hub and self._commit is None:
            self._commit = HfApi(token=self.token).repo_info(self.spec, revision=self.revision).sha
        return self._commit

    def sizes(self) -> dict[str, int]:
        """Top-level file names and sizes in bytes."""
        if self._sizes is None:
            if self.local is not None:
                self._sizes = {p.name: p.stat().st_size for p in sorted(self.local.iterdir()) if p.is_file()}
            else:
                api = HfApi(token=self.token)
                entries = api.list_repo_tree(self.spec, revision=self.commit(), recursive=False)
                self._sizes = {e.path: e.size for e in entries if isinstance(e, RepoFile)}
        return self._sizes

    def fetch(self, names: Iterable[str]) -> Path:
        """A folder that holds ``names`` (downloaded into the Hub cache for a Hub source)."""
        names = list(names)
        if self.local is not None:
            return self.local
        missing = [name for name in names if name not in self.sizes()]
        if missing:
            raise ConfigError(f"{self.spec}: no {missing} at {self.commit()}")
        logger.info("downloading %d file(s) from %s@%s", len(names), self.spec, self.commit()[:10])
        folder = snapshot_download(self.spec, revision=self.commit(), allow_patterns=names, token=self.token)
        return Path(folder)

    def read_json(self, name: str) -> dict:
        return json.loads((self.fetch([name]) / name).read_text(encoding="utf-8"))


def copied_files(names: Iterable[str]) -> list[str]:
    """The source's tokenizer, generation-config and license files (copied verbatim)."""
    return [
        name
        for name in sorted(names)
        if name in COPIED_FILES or any(Path(name).match(pattern) for pattern in COPIED_PATTERNS)
    ]


@dataclass(frozen=True)
class Weights:
    format: str  # "safetensors" | "bin"
    shards: tuple[str, ...]
    index: str | None


def select_weights(source: Source) -> Weights:
    """Pick the source's weights: safetensors when it has them, else pytorch .bin files (to convert)."""
    names = source.sizes()
    for fmt, single in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        index = WEIGHT_INDEXES[fmt]
        if index in names:
            weight_map = source.read_json(index)["weight_map"]
            return Weights(fmt, tuple(sorted(set(weight_map.values()))), index)
        if single in names:
            return Weights(fmt, (single,), None)
    raise ConfigError(f"{source.spec}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def safetensors_name(bin_name: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors"""
    return bin_name.replace("pytorch_model", "model", 1).removesuffix(".bin") + ".safetensors"


# ------------------------------------------------------------------------------------- weight conversion
def storable_tensors(state_dict: dict) -> tuple[dict, dict[str, str]]:
    """Tensors that safetensors can store, and {dropped name: kept name} for tied duplicates.

    A pickled state dict keeps tied parameters (GPT-2's lm_head and wte, BART's shared embeddings) as one
    storage under several names; safetensors refuses shared storage. The first name of an identical view is
    kept and later ones are dropped: tensors only share storage in a saved state dict because the model ties
    them, so it re-ties them on load (as save_pretrained does). Other views of an already-used storage, and
    non-contiguous tensors, get their own copy.
    """
    import torch

    kept: dict = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    used_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        storage = tensor.untyped_storage().data_ptr()
        view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() > 0 and view in views:
            aliases[name] = views[view]
            continue
        if tensor.numel() > 0:
            views[view] = name
        if storage in used_storages or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        used_storages.add(tensor.untyped_storage().data_ptr())
        kept[name] = tensor
    return kept, aliases


def convert_bin_to_safetensors(bin_path: Path, out_path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Convert one pickled PyTorch checkpoint shard; returns ({tensor: nbytes}, {dropped alias: kept name})."""
    import torch
    from safetensors.torch import save_file

    logger.info("converting %s -> %s (torch.load with weights_only=True: tensors only, no code)", bin_path.name,
                out_path.name)
    # weights_only=True: the unpickler only rebuilds tensors and plain containers, so a malicious .bin cannot
    # run code here. mmap keeps large shards out of RAM; checkpoints in the pre-1.6 format cannot be mapped.
    try:
        state_dict = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state_dict = torch.load(bin_path, map_location="cpu", weights_only=True)
    tensors, aliases = storable_tensors(state_dict)
    for alias, name in aliases.items():
        logger.info("  %s shares %s's storage (tied): stored once as %s", alias, name, name)
    save_file(tensors, str(out_path), metadata={"format": "pt"})
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}, aliases


def write_weights(weights: Weights, source_dir: Path, out_dir: Path) -> None:
    if weights.format == "safetensors":
        for name in (*weights.shards, *([weights.index] if weights.index else [])):
            link_or_copy(source_dir / name, out_dir / name)
        return
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard in weights.shards:
        sizes, _ = convert_bin_to_safetensors(source_dir / shard, out_dir / safetensors_name(shard))
        weight_map.update({name: safetensors_name(shard) for name in sizes})
        total_size += sum(sizes.values())
    if weights.index:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / WEIGHT_INDEXES["safetensors"]).write_text(json.dumps(index, indent=2) + "\n")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (cheap for multi-GB shards) or copy; Hub cache entries are symlinks to blobs."""
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------------------- model card
def source_card_data(source: Source) -> dict:
    if "README.md" not in source.sizes():
        return {}
    card = ModelCard.load(source.fetch(["README.md"]) / "README.md", ignore_metadata_errors=True)
    data = card.data.to_dict()
    return {key: data[key] for key in CARD_FIELDS if data.get(key) is not None}


def backends_markdown(default: str | None) -> str:
    rows = [f"| `{name}` | {text} |" for name, text in BACKENDS.items()]
    return "\n".join(
        [
            f"Attention runs through one kernel layer; this repo's default is `attn_backend = \"{default or 'auto'}\"`"
            " (config.json). Pick another with `from_pretrained(..., attn_backend=\"chunked\")`, transformers'"
            " `attn_implementation` (\"eager\", \"sdpa\", \"flash_attention_2\", \"flex_attention\") or the"
            " `USE_FLASH_ATTN` environment variable (`true`, `false` or a backend name).",
            "",
            "| backend | what it is |",
            "|---|---|",
            *rows,
        ]
    )


def model_card(cfg: RepoConfig, source: Source | None, source_fields: dict) -> ModelCard:
    """The README.md of a target repo, built with huggingface_hub's ModelCard API."""
    if cfg.publish == "code":
        data = ModelCardData(license=CODE_LICENSE, library_name="transformers",
                             tags=["memory-efficient-adapter", "custom_code"])
        files = [f for family in cfg.families for f in family_files(family)]
        body = code_card_body(cfg, files)
    else:
        fields = dict(source_fields)
        if cfg.license:
            fields = {k: v for k, v in fields.items() if not k.startswith("license")} | {"license": cfg.license}
        if "license" not in fields:
            raise ConfigError(f"{cfg.name}: the source card names no license; set `options.license`")
        data = ModelCardData(
            base_model=source.spec if source.is_hub else None,
            library_name="transformers",
            tags=["memory-efficient-adapter", "custom_code", FAMILIES[cfg.family].model_type],
            **fields,
        )
        body = model_card_body(cfg, source, fields["license"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def model_card_body(cfg: RepoConfig, source: Source, license_: str) -> str:
    entry = main_entry(cfg.family)
    origin = (
        f"[`{source.spec}`](https://huggingface.co/{source.spec}) at commit `{source.commit()}`"
        if source.is_hub
        else f"a local checkpoint (`{Path(source.spec).name}`)"
    )
    classes = ", ".join(f"`{e.class_name}` ({e.auto_class})" for e in available_entries(cfg.family))
    return f"""# {cfg.target.split("/")[1]}

The weights, tokenizer and config of {origin}, with modeling code from
[memory-efficient-adapter]({PROJECT_URL}): its attention goes through fused, memory-efficient kernels
(no materialized sequence-by-sequence masks or ALiBi biases). Outputs match the original modeling code
up to floating-point rounding.
Classes: {classes}.

## Usage

```python
import torch
from transformers import {entry.auto_class}, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{cfg.target}", trust_remote_code=True)
model = {entry.auto_class}.from_pretrained("{cfg.target}", trust_remote_code=True, dtype=torch.bfloat16)
inputs = tokenizer("Memory-efficient attention", return_tensors="pt")
outputs = model(**inputs)
```

## Attention backends

{backends_markdown(cfg.backend)}

## License

The weights keep the source's license (`{license_}`; license files are copied
from the source). The modeling files (`{"`, `".join(family_files(cfg.family))}`) are Apache-2.0.
"""


def code_card_body(cfg: RepoConfig, files: list[str]) -> str:
    family = "bloom" if "bloom" in cfg.families else cfg.families[0]
    entry = main_entry(family)
    module = Path(entry.file).stem
    return f"""# {cfg.target.split("/")[1]}

Modeling code from [memory-efficient-adapter]({PROJECT_URL}) only (no weights): {", ".join(f"`{f}`" for f in files)}.
Each file is self-contained and routes attention through fused, memory-efficient kernels.

## Usage: keep the original weights, load our code

Point a config's `auto_map` at this repo (`"<this repo>--<module>.<Class>"`); the weights still come from
the original repo:

```python
from transformers import AutoConfig, {entry.auto_class}

config = AutoConfig.from_pretrained("<original repo>")
config.auto_map = {{"{entry.auto_class}": "{cfg.target}--{module}.{entry.class_name}"}}
model = {entry.auto_class}.from_pretrained("<original repo>", config=config, trust_remote_code=True)
```

`hub_upload.py --reference` in the project writes such a config.json for a given checkpoint. Or copy a
`modeling_<family>.py` next to a checkpoint and set `auto_map` to `"<module>.<Class>"`.

## Attention backends

{backends_markdown(None)}
"""


# -------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class PlannedFile:
    path: str  # in the target repo
    size: int  # bytes
    origin: str


def model_config(cfg: RepoConfig, source: Source, code_repo: str | None = None) -> dict:
    """The source config.json with auto_map (and attn_backend) pointing at our classes."""
    config = source.read_json("config.json")
    expected = FAMILIES[cfg.family].model_type
    if config.get("model_type") != expected:
        raise ConfigError(
            f"{cfg.name}: {source.spec} has model_type {config.get('model_type')!r}, family {cfg.family!r} "
            f"needs {expected!r}"
        )
    config["auto_map"] = auto_map(cfg.family, code_repo)
    if cfg.backend:
        config["attn_backend"] = cfg.backend
    return config


def build_folder(
    cfg: RepoConfig, out_dir: Path, source: Source | None, include_weights: bool = True
) -> list[PlannedFile]:
    """Write the target repo's files into ``out_dir``; returns every file of the repo.

    With ``include_weights=False`` (--dry-run) weights are listed from the source, not written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; pick an empty or new folder")
    planned: list[PlannedFile] = []

    def add(path: str, origin: str, size: int | None = None) -> None:
        planned.append(PlannedFile(path, size if size is not None else (out_dir / path).stat().st_size, origin))

    files = [name for family in cfg.families for name in family_files(family)]
    copy_modeling_files(out_dir, files)
    for name in files:
        add(name, f"ours: modeling/{name}")
    fields = {}
    if cfg.publish == "model":
        config = model_config(cfg, source)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        add("config.json", f"{source.spec}/config.json + auto_map" + (" + attn_backend" if cfg.backend else ""))
        copied = copied_files(source.sizes())
        source_dir = source.fetch(copied) if copied else None
        for name in copied:
            link_or_copy(source_dir / name, out_dir / name)
            add(name, f"copied from {source.spec}")
        planned += weight_plan(cfg, out_dir, source, include_weights)
        fields = source_card_data(source)
    model_card(cfg, source, fields).save(out_dir / "README.md")
    add("README.md", "model card (generated)")
    return planned


def weight_plan(cfg: RepoConfig, out_dir: Path, source: Source, include_weights: bool) -> list[PlannedFile]:
    weights = select_weights(source)
    sizes = source.sizes()
    if include_weights:
        write_weights(weights, source.fetch([*weights.shards, *([weights.index] if weights.index else [])]), out_dir)
    planned = []
    for shard in weights.shards:
        if weights.format == "safetensors":
            path, origin = shard, f"copied from {source.spec}"
        else:
            path, origin = safetensors_name(shard), f"converted from {shard} (size shown is the .bin's)"
        size = (out_dir / path).stat().st_size if include_weights else sizes[shard]
        planned.append(PlannedFile(path, size, origin))
    if weights.index:
        path = WEIGHT_INDEXES["safetensors"]
        size = (out_dir / path).stat().st_size if include_weights else sizes[weights.index]
        planned.append(PlannedFile(path, size, f"from {source.spec}/{weights.index}"))
    return planned


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def print_plan(cfg: RepoConfig, planned: list[PlannedFile], where: str) -> None:
    print(f"{cfg.name}: {cfg.publish} repo {where}")
    width = max(len(p.path) for p in planned)
    for p in planned:
        print(f"  {p.path:<{width}}  {human_size(p.size):>9}  {p.origin}")
    print(f"  {len(planned)} files, {human_size(sum(p.size for p in planned))}")


# ---------------------------------------------------------------------------------------------- pushing
def push_folder(cfg: RepoConfig, folder: Path, token: str, create_pr: bool) -> str:
    """create_repo(exist_ok) + one upload_folder commit (none when nothing changed); returns the revision that
    holds the files (the pull request's ref with --create-pr).

    huggingface_hub skips files whose remote hash already matches, so an unchanged folder makes no commit.
    """
    api = HfApi(token=token)
    api.create_repo(cfg.target, private=cfg.private, exist_ok=True)
    if cfg.revision != "main":
        api.create_branch(cfg.target, branch=cfg.revision, exist_ok=True)
    before = api.repo_info(cfg.target, revision=cfg.revision).sha
    logger.info("uploading %s to %s@%s", folder, cfg.target, cfg.revision)
    try:
        info = api.upload_folder(
            repo_id=cfg.target,
            folder_path=folder,
            revision=None if create_pr else cfg.revision,
            create_pr=create_pr,
            commit_message=f"Upload {cfg.family} {cfg.publish} repo (memory-efficient-adapter)",
            commit_description=f"Built by hub_upload.py from {Path(cfg.name).name}.",
            delete_patterns=STALE_PATTERNS if cfg.publish == "model" else None,
        )
    except RuntimeError as error:  # huggingface_hub wraps failed LFS uploads; report the HTTP error under it
        if isinstance(error.__cause__, (HfHubHTTPError, *transport_errors())):
            logger.error("%s", error)
            raise error.__cause__ from error
        raise
    if info.oid == before and not info.pr_url:
        logger.info("%s@%s: nothing changed, no new commit (still %s)", cfg.target, cfg.revision, before[:10])
        return cfg.revision
    logger.info("%s: committed %s%s", cfg.target, info.oid[:10], f" as {info.pr_url}" if info.pr_url else "")
    return info.pr_revision or cfg.revision


# ---------------------------------------------------------------------------------------------- verifying
def verify(cfg: RepoConfig, repo: str, revision: str | None = None, token: str | None = None) -> None:
    """Load what was published (a Hub repo or a local folder) with trust_remote_code and run a few tokens."""
    import torch
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with tempfile.TemporaryDirectory(prefix="hub-upload-verify-") as cache_dir:  # a fresh cache: really download
        hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir}
        if cfg.publish == "code":
            for family in cfg.families:
                for entry in available_entries(family):
                    ref = entry.reference(None if Path(repo).is_dir() else repo)  # a Hub repo: the cross-repo form
                    cls = get_class_from_dynamic_module(ref, repo, code_revision=revision, token=token,
                                                        cache_dir=cache_dir)
                    check_remote_class(cls, entry.class_name)
            logger.info("verified: every class loads from %s", repo)
            return
        entry = main_entry(cfg.family)
        auto_cls = getattr(transformers, entry.auto_class)
        dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            model = auto_cls.from_pretrained(repo, trust_remote_code=True, **{dtype_kwarg: "auto"}, **hub_kwargs)
        except OSError as error:  # transformers' wording for files it could not get
            raise VerifyError(f"{repo}@{revision or 'main'} does not load: {error}") from error
        check_remote_class(type(model), entry.class_name)
        input_ids = sample_input_ids(repo, model.config.vocab_size, hub_kwargs)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        if not torch.isfinite(logits).all():
            raise VerifyError(f"{repo}: non-finite logits from {type(model).__name__}")
        logger.info("verified: %s from %s gives finite logits %s", type(model).__name__, repo,
                    list(logits.shape))


def check_remote_class(cls: type, expected_name: str) -> None:
    if cls.__name__ != expected_name or not cls.__module__.startswith("transformers_modules"):
        raise VerifyError(f"loaded {cls.__module__}.{cls.__name__}, not our remote-code {expected_name}")


def sample_input_ids(repo: str, vocab_size: int, hub_kwargs: dict):
    """A few tokens: from the repo's tokenizer when it has one, else fixed ids."""
    import torch
    from transformers import AutoTokenizer

    files = os.listdir(repo) if Path(repo).is_dir() else HfApi(token=hub_kwargs["token"]).list_repo_files(
        repo, revision=hub_kwargs["revision"])
    if "tokenizer_config.json" in files or "tokenizer.json" in files:
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True, **hub_kwargs)
        return tokenizer("Memory-efficient attention", return_tensors="pt")["input_ids"]
    return torch.arange(1, 9).remainder(vocab_size).unsqueeze(0)


# -------------------------------------------------------------------------------------- reference configs
def reference_config(source: str, family: str, code_repo: str, *, source_revision: str | None = None,
                     backend: str | None = None, token: str | None = None) -> dict:
    """A source's config.json whose auto_map points at our code in ``code_repo`` ("<code_repo>--module.Class").

    Loading the source's weights with this config runs our code without re-uploading the weights.
    """
    try:
        validate_repo_id(code_repo)
    except HFValidationError as error:
        raise ConfigError(f"--code-repo: {error}") from None
    if family not in FAMILIES or (backend is not None and backend not in BACKENDS):
        raise ConfigError(f"family must be one of {list(FAMILIES)} and backend one of {list(BACKENDS)}")
    cfg = RepoConfig(name="--reference", family=family, target=code_repo, publish="model", source=source,
                     backend=backend)
    return model_config(cfg, Source(source, source_revision, token), code_repo=code_repo)


def write_reference_config(source: str, family: str, code_repo: str, out_dir: str | Path, **kwargs) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.json"
    path.write_text(json.dumps(reference_config(source, family, code_repo, **kwargs), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="configs/*.yaml files")
    parser.add_argument("--target", help="override the target repo id (one config only)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, target); write nothing")
    parser.add_argument("--local-dir", type=Path, help="write the repo folder here and do not push")
    parser.add_argument("--private", action="store_true", help="create the target repo private")
    parser.add_argument("--revision", help="target branch (default: the config's, else main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login; prefer those)")
    parser.add_argument("--verify", action="store_true", help="load what was written/pushed and run a few tokens")
    ref = parser.add_argument_group("reference mode: write a config.json whose auto_map points at a code repo")
    ref.add_argument("--reference", metavar="SOURCE", help="source checkpoint (Hub repo id or folder)")
    ref.add_argument("--family", choices=list(FAMILIES))
    ref.add_argument("--code-repo", help="the repo holding our modeling files (a `code` config's target)")
    ref.add_argument("--source-revision")
    ref.add_argument("--backend", choices=list(BACKENDS), help="written as attn_backend")
    args = parser.parse_args(argv)
    if args.reference:
        if not (args.family and args.code_repo and args.local_dir) or args.configs or args.dry_run or args.verify:
            parser.error("--reference needs --family, --code-repo and --local-dir (no configs, --dry-run, --verify)")
    elif not args.configs:
        parser.error("give at least one config file (or --reference)")
    if args.target and len(args.configs) != 1:
        parser.error("--target needs exactly one config")
    if args.dry_run and (args.local_dir or args.verify):
        parser.error("--dry-run writes nothing: drop --local-dir / --verify")
    return args


def with_overrides(cfg: RepoConfig, args: argparse.Namespace) -> RepoConfig:
    changes = {}
    if args.target:
        changes["target"] = checked_target(args.target, "--target")
    if args.revision:
        changes["revision"] = args.revision
    if args.private:
        changes["private"] = True
    cfg = replace(cfg, **changes)
    if args.create_pr and cfg.revision != "main":
        raise ConfigError(f"{cfg.name}: --create-pr opens the pull request against main, not {cfg.revision!r}")
    return cfg


def run_config(cfg: RepoConfig, args: argparse.Namespace, token: str | None, pushing: bool) -> None:
    source = Source(cfg.source, cfg.source_revision, token) if cfg.source else None
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="hub-upload-plan-") as tmp:
            planned = build_folder(cfg, Path(tmp), source, include_weights=False)
        print_plan(cfg, planned, f"-> {cfg.target}@{cfg.revision}" + (" (private)" if cfg.private else ""))
        return
    if not pushing:
        folder = args.local_dir if len(args.configs) == 1 else args.local_dir / cfg.target.split("/")[1]
        print_plan(cfg, build_folder(cfg, folder, source), f"written to {folder}")
        if args.verify:
            verify(cfg, str(folder))
        return
    with tempfile.TemporaryDirectory(prefix="hub-upload-") as tmp:
        print_plan(cfg, build_folder(cfg, Path(tmp), source), f"-> {cfg.target}@{cfg.revision}")
        revision = push_folder(cfg, Path(tmp), token, args.create_pr)
    if args.verify:
        verify(cfg, cfg.target, revision=revision, token=token)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions for a Hub that could not be reached, across huggingface_hub's HTTP stacks."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger.setLevel(logging.INFO)
    pushing = not (args.dry_run or args.local_dir or args.reference)
    token = args.token or get_token()
    if pushing and not token:
        print("hub_upload: error: pushing needs a Hugging Face token with write access: set HF_TOKEN, run "
              "`hf auth login`, or pass --token (use --dry-run or --local-dir to work without one)", file=sys.stderr)
        return 2
    try:
        if args.reference:
            path = write_reference_config(args.reference, args.family, args.code_repo, args.local_dir,
                                          source_revision=args.source_revision, backend=args.backend, token=token)
            print(f"wrote {path}: auto_map -> {args.code_repo}")
            return 0
        configs = [with_overrides(load_config(path), args) for path in args.configs]
        for cfg in configs:
            run_config(cfg, args, token, pushing)
    except (ConfigError, ModelingFilesError) as error:
        print(f"hub_upload: error: {error}", file=sys.stderr)
        return 2
    except VerifyError as error:
        print(f"hub_upload: verification failed: {error}", file=sys.stderr)
        return 1
    except HfHubHTTPError as error:  # huggingface_hub has already retried what it retries (5xx, 429, timeouts)
        status = error.response.status_code if error.response is not None else "?"
        details = "\n".join(f"    {line}" for line in str(error).splitlines() if line.strip())
        print(f"hub_upload: error: the Hub answered HTTP {status}:\n{details}", file=sys.stderr)
        return 1
    except transport_errors() as error:
        print(f"hub_upload: error: could not reach the Hub: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    sys.exit(main())
