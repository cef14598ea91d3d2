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

Every config is checked (source reachable, files present, backend fits the family, revision pinned) before
anything is written or pushed, and a summary of what was pushed and what failed ends every run. With
--verify a push goes to a staging branch first, is loaded back there, and only then is committed to its
target branch: a failed verification leaves the target branch untouched.

The token comes from --token, HF_TOKEN or `hf auth login`; prefer the last two, since a command-line
argument can end up in shell history. It is only ever handed to huggingface_hub, never printed or written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import yaml
from huggingface_hub import HfApi, ModelCard, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from hub_card import ALIBI_FAMILIES, BACKENDS, BACKENDS_WITHOUT_ALIBI, CODE_LICENSE, file_sha256, model_card
from hub_verify import VerifyError, verify_code, verify_model_folder
from memory_efficient_adapter.families import FAMILIES, ModelingFilesError, auto_map, copy_modeling_files, family_files

logger = logging.getLogger("hub_upload")

ALL_FAMILIES = "all"  # `family: all` in a code config publishes every family's files

PINNED_REVISION = re.compile(r"[0-9a-f]{40}")

WEIGHT_INDEXES = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
# Files copied verbatim from the source checkpoint when present (top level only).
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
COPIED_PATTERNS = ("tokenization_*.py", "*.tiktoken", "LICENSE*", "NOTICE*", "USE_POLICY*")
# Remote weights that a re-upload replaces; deleted in the same commit when our folder no longer has them.
STALE_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
CARD_FIELDS = ("license", "license_name", "license_link", "language", "pipeline_tag")


class ConfigError(ValueError):
    """A configs/ file or command line that cannot work; reported without a traceback."""


class HubUnreachable(ConnectionError):
    """The Hub could not be reached for a named repo (offline, DNS, refused connection)."""


def check_backend(family: str, backend: str | None, name: str) -> None:
    """Refuse a default backend that cannot run the family's attention (it would fail at every forward)."""
    if backend in BACKENDS_WITHOUT_ALIBI and family in ALIBI_FAMILIES:
        raise ConfigError(f"{name}: backend {backend!r} cannot run {family} (its attention uses ALiBi slopes, which "
                          f"{backend} cannot take); use auto, which picks a backend that takes them for every call")


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
_OPTION_TYPES: dict[str, tuple[type, str]] = {  # option -> (its type, what its value must be)
    "backend": (str, f"one of {list(BACKENDS)}"),
    "revision": (str, "a branch name (a string; quote it if it looks like a number)"),
    "private": (bool, "true or false"),
    "license": (str, "a license id string such as apache-2.0"),
}


def load_config(path: str | Path) -> RepoConfig:
    """Read and validate one configs/ file (YAML, or JSON for a .json name)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it: {error}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
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
    if unknown := set(raw) - _TOP_KEYS:
        raise fail(f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    options = checked_options(raw.get("options"), name)

    publish = raw.get("publish", "model")
    if publish not in ("model", "code"):
        raise fail(f"`publish` must be 'model' or 'code', not {publish!r}")
    family = raw.get("family")
    allowed_families = [*FAMILIES, ALL_FAMILIES] if publish == "code" else list(FAMILIES)
    if family not in allowed_families:
        raise fail(f"`family` must be one of {allowed_families}, not {family!r}")
    source = raw.get("source")
    if source is not None and not isinstance(source, str):
        raise fail(f"`source` must be a string (a Hub repo id or a folder), not {source!r}")
    if publish == "model" and not source:
        raise fail("a `model` repo needs a `source` (Hub repo id or local folder)")
    if publish == "code" and (options.get("backend") or options.get("license")):
        raise fail(f"a `code` repo takes no `backend` or `license`: it holds only our files ({CODE_LICENSE})")
    if publish == "code" and (source or raw.get("source_revision")):
        raise fail("a `code` repo takes no `source`: it holds only our files")
    backend = options.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise fail(f"`backend` must be one of {list(BACKENDS)}, not {backend!r}")
    if publish == "model":
        check_backend(family, backend, name)
    source_revision = raw.get("source_revision")
    if source_revision is not None and not isinstance(source_revision, str):
        raise fail(f"`source_revision` must be a string (quote a commit hash), not {source_revision!r}")
    return RepoConfig(
        name=name,
        family=family,
        target=checked_target(raw.get("target"), name),
        publish=publish,
        source=source or None,
        source_revision=source_revision,
        backend=backend,
        revision=options.get("revision", "main"),
        private=options.get("private", False),
        license=options.get("license"),
    )


def checked_options(options: Any, name: str) -> dict[str, Any]:
    """`options`, each value of its option's type (null too is refused: leave the key out for the default)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"{name}: `options` must be a mapping, not {options!r}")
    if unknown := set(options) - set(_OPTION_TYPES):
        raise ConfigError(f"{name}: unknown options {sorted(unknown)}; allowed: {sorted(_OPTION_TYPES)}")
    for key, value in options.items():
        kind, expected = _OPTION_TYPES[key]
        if not isinstance(value, kind) or (kind is str and not value.strip()):
            raise ConfigError(f"{name}: `options.{key}` must be {expected}, not {value!r}")
    return options


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
            with reaching(f"source {self.spec}"):
                self._commit = HfApi(token=self.token).repo_info(self.spec, revision=self.revision).sha
        return self._commit

    def _allowed_roots(self) -> list[Path]:
        """Where the local source's files may resolve: the folder itself, and, for a snapshot folder of the
        Hugging Face cache, that repo's blobs/ (the cache keeps files as links into it)."""
        root = self.local.resolve()
        roots = [root]
        if root.parent.name == "snapshots":
            roots.append(root.parent.parent / "blobs")
        return roots

    def _check_inside(self, names: Iterable[str]) -> None:
        roots = self._allowed_roots()
        for name in names:
            target = (self.local / name).resolve()
            if not any(target.is_relative_to(root) for root in roots):
                raise ConfigError(f"{self.spec}: {name} is a link to {target}, outside the source folder; "
                                  "refusing to publish it (copy the file in if it belongs there)")

    def sizes(self) -> dict[str, int]:
        """Top-level file names and sizes in bytes."""
        if self._sizes is None:
            if self.local is not None:
                self._sizes = {p.name: p.stat().st_size for p in sorted(self.local.iterdir()) if p.is_file()}
            else:
                api = HfApi(token=self.token)
                with reaching(f"source {self.spec}"):
                    entries = list(api.list_repo_tree(self.spec, revision=self.commit(), recursive=False))
                self._sizes = {e.path: e.size for e in entries if isinstance(e, RepoFile)}
        return self._sizes

    def fetch(self, names: Iterable[str]) -> Path:
        """A folder that holds ``names`` (downloaded into the Hub cache for a Hub source)."""
        names = list(names)
        if missing := [name for name in names if name not in self.sizes()]:
            raise ConfigError(f"source {self.spec} has no {', '.join(missing)}"
                              + (f" at {self.commit()}" if self.is_hub else ""))
        if self.local is not None:
            self._check_inside(names)
            return self.local
        logger.info("downloading %d file(s) from %s@%s", len(names), self.spec, self.commit()[:10])
        with reaching(f"source {self.spec}"):
            folder = snapshot_download(self.spec, revision=self.commit(), allow_patterns=names, token=self.token)
        return Path(folder)

    def read_json(self, name: str) -> dict:
        """A JSON object file of the source (config.json, a weight index)."""
        path = self.fetch([name]) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{self.spec}/{name}: not readable as JSON: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.spec}/{name}: expected a JSON object, not a {type(data).__name__}")
        return data


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
            weight_map = source.read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{source.spec}/{index}: no `weight_map` mapping")
            shards = tuple(sorted(set(weight_map.values())))
            for shard in shards:
                check_shard_name(shard, f"{source.spec}/{index}")
            if missing := [shard for shard in shards if shard not in names]:
                raise ConfigError(f"{source.spec}/{index}: names shards that the source does not have: {missing}")
            return Weights(fmt, shards, index)
        if single in names:
            return Weights(fmt, (single,), None)
    raise ConfigError(f"{source.spec}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def check_shard_name(shard: Any, where: str) -> None:
    """A shard named by an index must be a plain file name beside it: the name becomes a path we read and write."""
    if (not isinstance(shard, str) or not shard or shard in (".", "..") or "/" in shard or "\\" in shard
            or os.path.isabs(shard) or shard.startswith("~")):
        raise ConfigError(f"{where}: shard name {shard!r} is not a plain file name (no '/', '..' or absolute "
                          "paths); refusing to use it as a path")


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


def card_fields(cfg: RepoConfig, source_fields: dict) -> dict:
    """The model card's license and language fields: the source card's, with `options.license` overriding."""
    fields = dict(source_fields)
    if cfg.license:
        fields = {k: v for k, v in fields.items() if not k.startswith("license")} | {"license": cfg.license}
    if "license" not in fields:
        raise ConfigError(f"{cfg.name}: the source card names no license; set `options.license`")
    return fields


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
    fields: dict = {}
    third_party: dict[str, str] = {}
    if cfg.publish == "model":
        config = model_config(cfg, source)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        add("config.json", f"{source.spec}/config.json + auto_map" + (" + attn_backend" if cfg.backend else ""))
        copied = copied_files(source.sizes())
        source_dir = source.fetch(copied) if copied else None
        for name in copied:
            link_or_copy(source_dir / name, out_dir / name)
            if name.endswith(".py"):
                third_party[name] = file_sha256(out_dir / name)
            add(name, f"copied from {source.spec}" + (" (third-party code, sha256 in the card)"
                                                      if name in third_party else ""))
        planned += weight_plan(cfg, out_dir, source, include_weights)
        fields = source_card_data(source)
    model_card(cfg, source, card_fields(cfg, fields) if cfg.publish == "model" else {}, third_party).save(
        out_dir / "README.md")
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
@contextmanager
def reaching(what: str):
    """Report a Hub that cannot be reached (offline mode included) with the repo we were trying to reach."""
    try:
        yield
    except (HfHubHTTPError, HubUnreachable):  # the Hub answered (an HTTP error is also a transport error), or
        raise  # an inner reaching() has already named what it could not reach
    except RuntimeError as error:  # huggingface_hub wraps failed LFS uploads; report the error under it
        if isinstance(error.__cause__, (HfHubHTTPError, *transport_errors())):
            logger.error("%s", error)
            with reaching(what):
                raise error.__cause__ from error
        raise
    except transport_errors() as error:
        raise HubUnreachable(f"could not reach the Hub for {what}: {type(error).__name__}: {error}") from error


def prepare_target(api: HfApi, cfg: RepoConfig) -> str:
    """create_repo(exist_ok) and the target branch; returns the branch's head commit."""
    api.create_repo(cfg.target, private=cfg.private, exist_ok=True)
    if cfg.revision != "main":
        api.create_branch(cfg.target, branch=cfg.revision, exist_ok=True)
    return api.repo_info(cfg.target, revision=cfg.revision).sha


def commit_folder(api: HfApi, cfg: RepoConfig, folder: Path, branch: str, *, create_pr: bool = False,
                  parent_commit: str | None = None) -> tuple[str, str]:
    """One upload_folder commit to ``branch`` (none when nothing changed: huggingface_hub skips files whose
    remote hash matches); returns (the revision that holds the files, its commit)."""
    before = api.repo_info(cfg.target, revision=branch).sha
    logger.info("uploading %s to %s@%s", folder, cfg.target, branch)
    info = api.upload_folder(
        repo_id=cfg.target,
        folder_path=folder,
        revision=None if create_pr else branch,
        create_pr=create_pr,
        parent_commit=parent_commit,
        commit_message=f"Upload {cfg.family} {cfg.publish} repo (memory-efficient-adapter)",
        commit_description=f"Built by hub_upload.py from {Path(cfg.name).name}.",
        delete_patterns=STALE_PATTERNS if cfg.publish == "model" else None,
    )
    if info.oid == before and not info.pr_url:
        logger.info("%s@%s: nothing changed, no new commit (still %s)", cfg.target, branch, before[:10])
        return branch, before
    logger.info("%s: committed %s%s", cfg.target, info.oid[:10], f" as {info.pr_url}" if info.pr_url else "")
    return info.pr_revision or branch, info.oid


def push_folder(cfg: RepoConfig, folder: Path, token: str, create_pr: bool, verify_push: bool) -> str:
    """Push ``folder`` to the target; returns what happened, for the summary.

    With ``verify_push`` the folder is first committed to a staging branch made from the target branch's head
    and loaded back from there; only then is it committed to the target branch (on top of that same head, so
    a concurrent commit fails the push instead of being overwritten) and the staging branch deleted. A failed
    verification leaves the target branch untouched and the staging branch for inspection. A pull request
    (``create_pr``) is verified where it is and left open for review.
    """
    api = HfApi(token=token)
    with reaching(cfg.target):
        base = prepare_target(api, cfg)
        if create_pr or not verify_push:
            revision, oid = commit_folder(api, cfg, folder, cfg.revision, create_pr=create_pr)
            if verify_push:
                verify_hub(cfg, revision, token)
            return f"{'pull request ' + revision if create_pr else 'pushed to ' + cfg.target + '@' + revision} " \
                   f"(commit {oid[:10]}){', verified' if verify_push else ''}"
        staging = f"hub-upload-verify-{uuid.uuid4().hex[:8]}"
        api.create_branch(cfg.target, branch=staging, revision=base)
        commit_folder(api, cfg, folder, staging)
        try:
            verify_hub(cfg, staging, token)
        except VerifyError as error:
            raise VerifyError(f"{error}\n{cfg.target}@{cfg.revision} is untouched; the files that failed are on "
                              f"branch {staging!r}") from error
        _, oid = commit_folder(api, cfg, folder, cfg.revision, parent_commit=base)
        api.delete_branch(cfg.target, branch=staging)
    return f"pushed to {cfg.target}@{cfg.revision} (commit {oid[:10]}), verified"


# ---------------------------------------------------------------------------------------------- verifying
def verify_hub(cfg: RepoConfig, revision: str, token: str | None) -> None:
    """Verify what ``revision`` of the target holds. A model repo is downloaded (no code runs here) and loaded
    in a child process without the token; a code repo holds only our files and loads here."""
    if cfg.publish == "code":
        logger.info("%s", verify_code(cfg.families, cfg.target, revision=revision, token=token))
        return
    with tempfile.TemporaryDirectory(prefix="hub-upload-verify-") as cache_dir:  # a fresh cache: really download
        folder = snapshot_download(cfg.target, revision=revision, token=token, cache_dir=cache_dir)
        verify_model_folder(cfg.family, Path(folder), f"{cfg.target}@{revision}")


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
    check_backend(family, backend, "--backend")
    cfg = RepoConfig(name="--reference", family=family, target=code_repo, publish="model", source=source,
                     backend=backend)
    return model_config(cfg, Source(source, source_revision, token), code_repo=code_repo)


def write_reference_config(source: str, family: str, code_repo: str, out_dir: str | Path, **kwargs) -> Path:
    """Write the reference config.json into ``out_dir``; nothing is written unless the config could be made."""
    out_dir = Path(out_dir)
    check_creatable(out_dir)
    config = reference_config(source, family, code_repo, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------- CLI
_REFERENCE_FLAGS = ("family", "code_repo", "source_revision", "backend")
_PUSH_FLAGS = ("private", "revision", "allow_unpinned", "create_pr")


def flags_given(args: argparse.Namespace, names: tuple) -> str:
    return ", ".join(f"--{name.replace('_', '-')}" for name in names if getattr(args, name))


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
    parser.add_argument("--verify", action="store_true",
                        help="load what was written/pushed and run a few tokens (pushes: on a staging branch first)")
    parser.add_argument("--allow-unpinned", action="store_true",
                        help="push from a Hub source without a 40-hex `source_revision` (its main branch)")
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
    reference_flags, push_flags = flags_given(args, _REFERENCE_FLAGS), flags_given(args, _PUSH_FLAGS)
    if reference_flags and not args.reference:
        parser.error(f"reference-mode flags without --reference: {reference_flags} (a config file names its own "
                     "source_revision and options.backend)")
    if push_flags and args.local_dir:
        parser.error(f"push-only flags with --local-dir, which pushes nothing: {push_flags}")
    if args.create_pr and args.dry_run:
        parser.error("--create-pr is for pushes: drop --dry-run")
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


def check_pinned(cfg: RepoConfig, allow_unpinned: bool) -> None:
    """A push from a Hub source must name the exact commit it publishes (and whose tokenizer code it copies)."""
    if cfg.source is None or Path(cfg.source).expanduser().is_dir() or allow_unpinned:
        return
    if not PINNED_REVISION.fullmatch(cfg.source_revision or ""):
        raise ConfigError(f"{cfg.name}: `source_revision` must pin a 40-hex commit of {cfg.source} to push "
                          f"(got {cfg.source_revision!r}); find it with `hf download {cfg.source} config.json` or "
                          "on the repo's commit list, or pass --allow-unpinned to publish its current main")


def local_folder(cfg: RepoConfig, args: argparse.Namespace) -> Path:
    """Where --local-dir writes this config's repo (a sub-folder per config when there are several)."""
    return args.local_dir if len(args.configs) == 1 else args.local_dir / cfg.target.split("/")[1]


def check_creatable(folder: Path) -> None:
    """``folder`` is a folder, or can be made one: its nearest existing parent is a folder, not a file."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ConfigError(f"cannot make the folder {folder}: {existing} is a file, not a folder")


def check_free(folder: Path) -> None:
    check_creatable(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} is not an empty folder; pick an empty or new one")


def claim_local_folder(cfg: RepoConfig, folder: Path, claimed: dict[Path, RepoConfig]) -> None:
    """``folder`` is free and no earlier config of this run writes it (targets org1/x and org2/x both get x/)."""
    check_free(folder)
    if first := claimed.get(folder):
        raise ConfigError(f"{cfg.name}: {folder} is where {first.name} is written too ({cfg.target} and "
                          f"{first.target} share the repo name); build them with separate --local-dir runs")
    claimed[folder] = cfg


def write_local(cfg: RepoConfig, folder: Path, source: Source | None) -> list[PlannedFile]:
    """Build the repo in a temporary folder beside ``folder`` and move it into place only once it is complete,
    so that a failure leaves nothing behind and a retry starts clean."""
    check_free(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        planned = build_folder(cfg, staging, source)
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return planned


@dataclass
class Run:
    """What happened to each config, for the summary at the end."""

    done: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (config, message, exit code)

    def fail(self, name: str, error: BaseException) -> None:
        message, code = describe_failure(error)
        print(f"hub_upload: {'verification failed' if isinstance(error, VerifyError) else 'error'}: {message}",
              file=sys.stderr)
        self.failed.append((name, message.splitlines()[0], code))

    def summary(self, verb: str) -> int:
        print(f"summary: {len(self.done)} {verb}, {len(self.failed)} failed")
        for name, what in self.done:
            print(f"  ok      {name}: {what}")
        for name, message, _ in self.failed:
            print(f"  FAILED  {name}: {message}")
        return max((code for _, _, code in self.failed), default=0)


def describe_failure(error: BaseException) -> tuple[str, int]:
    """The message and exit code of an expected failure (2: the config or command line, 1: the Hub or the
    published repo)."""
    if isinstance(error, (ConfigError, ModelingFilesError)):
        return str(error), 2
    if isinstance(error, HfHubHTTPError):  # huggingface_hub has already retried what it retries
        status = error.response.status_code if error.response is not None else "?"
        details = "\n".join(f"    {line}" for line in str(error).splitlines() if line.strip())
        return f"the Hub answered HTTP {status}:\n{details}", 1
    if isinstance(error, HubUnreachable):
        return str(error), 1
    if isinstance(error, transport_errors()):
        return f"could not reach the Hub: {type(error).__name__}: {error}", 1
    return str(error), 1


def expected_failures() -> tuple[type[BaseException], ...]:
    return (ConfigError, ModelingFilesError, VerifyError, HfHubHTTPError, *transport_errors())


def check_configs(configs: list[RepoConfig], args: argparse.Namespace, token: str | None, pushing: bool,
                  run: Run) -> dict[str, Source | None]:
    """Plan every config before anything is written or pushed: sources reachable, their files present and
    consistent, revisions pinned, output folders free. The --dry-run plan is printed from here."""
    sources: dict[str, Source | None] = {}
    local_folders: dict[Path, RepoConfig] = {}
    for cfg in configs:
        try:
            if pushing:
                check_pinned(cfg, args.allow_unpinned)
            if args.local_dir:
                claim_local_folder(cfg, local_folder(cfg, args), local_folders)
            source = Source(cfg.source, cfg.source_revision, token) if cfg.source else None
            with tempfile.TemporaryDirectory(prefix="hub-upload-plan-") as tmp:
                planned = build_folder(cfg, Path(tmp), source, include_weights=False)
            if args.dry_run:
                print_plan(cfg, planned, f"-> {cfg.target}@{cfg.revision}" + (" (private)" if cfg.private else ""))
                run.done.append((cfg.name, f"planned for {cfg.target}@{cfg.revision}"))
            sources[cfg.name] = source
        except expected_failures() as error:
            run.fail(cfg.name, error)
    return sources


def run_config(cfg: RepoConfig, source: Source | None, args: argparse.Namespace, token: str | None,
               pushing: bool) -> str:
    """Write or push one checked config; returns what happened."""
    if not pushing:
        folder = local_folder(cfg, args)
        print_plan(cfg, write_local(cfg, folder, source), f"written to {folder}")
        if args.verify and cfg.publish == "code":  # only our files: loaded here
            logger.info("%s", verify_code(cfg.families, str(folder)))
        elif args.verify:
            verify_model_folder(cfg.family, folder, str(folder))
        return f"written to {folder}" + (", verified" if args.verify else "")
    with tempfile.TemporaryDirectory(prefix="hub-upload-") as tmp:
        print_plan(cfg, build_folder(cfg, Path(tmp), source), f"-> {cfg.target}@{cfg.revision}")
        return push_folder(cfg, Path(tmp), token, args.create_pr, args.verify)


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
    run = Run()
    if args.reference:
        try:
            path = write_reference_config(args.reference, args.family, args.code_repo, args.local_dir,
                                          source_revision=args.source_revision, backend=args.backend, token=token)
        except expected_failures() as error:
            run.fail("--reference", error)
            return run.failed[0][2]
        print(f"wrote {path}: auto_map -> {args.code_repo}")
        return 0
    configs = []
    for path in args.configs:
        try:
            configs.append(with_overrides(load_config(path), args))
        except ConfigError as error:
            run.fail(str(path), error)
    sources = check_configs(configs, args, token, pushing, run) if not run.failed else {}
    if args.dry_run or run.failed:
        if run.failed and not args.dry_run:
            print("hub_upload: nothing was written or pushed: fix the configs above first", file=sys.stderr)
        return run.summary("planned" if args.dry_run else "done")
    for cfg in configs:
        try:
            run.done.append((cfg.name, run_config(cfg, sources[cfg.name], args, token, pushing)))
        except expected_failures() as error:
            run.fail(cfg.name, error)
    return run.summary("pushed" if pushing else "written")


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    sys.exit(main())
