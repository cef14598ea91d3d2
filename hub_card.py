"""The model cards (README.md) of the repos that hub_upload.py builds."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from huggingface_hub import ModelCard, ModelCardData

from memory_efficient_adapter.families import FAMILIES, available_entries, family_files, main_entry

if TYPE_CHECKING:
    from hub_upload import RepoConfig, Source

PROJECT_URL = "https://github.com/memory-efficient-adapter/memory-efficient-adapter"
CODE_LICENSE = "apache-2.0"

# The kernel layer's backends (modeling/attention.py), listed on every model card; `backend` options must be one.
BACKENDS: dict[str, str] = {
    "auto": "the fastest backend that can take each call (default)",
    "sdpa": "PyTorch scaled_dot_product_attention (cuDNN / flash / memory-efficient kernels)",
    "cudnn": "cuDNN's graph attention with native ALiBi (BLOOM), when nvidia-cudnn-frontend is installed",
    "flex": "torch flex_attention with ALiBi and masks as score mods (compiles on first use)",
    "flash_attn": "the flash-attn package, when installed",
    "xformers": "xformers memory-efficient attention, when installed and working",
    "chunked": "pure PyTorch, O(n) memory, runs anywhere",
    "eager": "the reference math path (GPT-2: `use_lightsoftmax` / `use_dropmatmul` in the config for Light Attention)",
}
# Backends whose kernels take no ALiBi slopes: BLOOM's attention cannot run on them.
BACKENDS_WITHOUT_ALIBI = ("sdpa", "xformers")
ALIBI_FAMILIES = ("bloom",)


def backends_markdown(default: str | None, families: Iterable[str]) -> str:
    """The card's backend table; what a user can pick depends on whether config.json names a default."""
    alibi = any(family in ALIBI_FAMILIES for family in families)
    no_alibi = " (not BLOOM: it takes no ALiBi slopes)" if alibi else ""
    rows = [f"| `{name}` | {text}{no_alibi * (name in BACKENDS_WITHOUT_ALIBI)} |" for name, text in BACKENDS.items()]
    if default in (None, "auto"):
        choose = ("The default is `auto`. Pick a backend with `from_pretrained(..., attn_backend=\"chunked\")`,"
                  " transformers' `attn_implementation` (\"eager\", \"flash_attention_2\", \"flex_attention\") or the"
                  " `USE_FLASH_ATTN` environment variable (`true`, `false` or a backend name).")
    else:
        choose = (f"This repo's default is `attn_backend = \"{default}\"` (config.json). Pick another with"
                  " `from_pretrained(..., attn_backend=...)`; while `attn_backend` names one, transformers'"
                  " `attn_implementation` and the `USE_FLASH_ATTN` environment variable are not read.")
    return "\n".join(
        [
            f"Attention runs through one kernel layer. {choose}",
            "",
            "| backend | what it is |",
            "|---|---|",
            *rows,
        ]
    )


def model_card(cfg: RepoConfig, source: Source | None, fields: dict,
               third_party: dict[str, str] | None = None) -> ModelCard:
    """The README.md of a target repo, built with huggingface_hub's ModelCard API. ``fields``: the card's license
    and language; ``third_party`` maps the source's own Python files copied into the repo to their sha256."""
    if cfg.publish == "code":
        data = ModelCardData(license=CODE_LICENSE, library_name="transformers",
                             tags=["memory-efficient-adapter", "custom_code"])
        files = [f for family in cfg.families for f in family_files(family)]
        body = code_card_body(cfg, files)
    else:
        data = ModelCardData(
            base_model=hub_origin(source)[0],
            library_name="transformers",
            tags=["memory-efficient-adapter", "custom_code", FAMILIES[cfg.family].model_type],
            **fields,
        )
        body = model_card_body(cfg, source, fields["license"]) + third_party_markdown(source, third_party or {})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def hub_origin(source: Source) -> tuple[str | None, str | None]:
    """The Hub repo id and commit a source comes from: a Hub source's, or a Hugging Face cache snapshot's
    (``models--<org>--<name>/snapshots/<commit>``, the folder `hf download` prints); (None, None) otherwise."""
    if source.is_hub:
        return source.spec, source.commit()
    snapshot = source.local.resolve()
    repo_folder = snapshot.parent.parent.name
    if snapshot.parent.name == "snapshots" and repo_folder.startswith("models--"):
        return repo_folder[len("models--"):].replace("--", "/"), snapshot.name
    return None, None


def model_card_body(cfg: RepoConfig, source: Source, license_: str) -> str:
    entry = main_entry(cfg.family)
    repo, commit = hub_origin(source)
    origin = (
        f"[`{repo}`](https://huggingface.co/{repo}) at commit `{commit}`"
        if repo
        else f"a local checkpoint (`{Path(source.spec).name}`)"
    )
    classes = ", ".join(f"`{e.class_name}` ({e.auto_class})" for e in available_entries(cfg.family))
    return f"""# {cfg.target.split("/")[1]}

The weights, tokenizer and config of {origin}, with modeling code from
[memory-efficient-adapter]({PROJECT_URL}): its attention goes through fused, memory-efficient kernels
(no materialized sequence-by-sequence masks or ALiBi biases). Outputs match the original modeling code
up to floating-point rounding, except where the project's README says otherwise.
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

{backends_markdown(cfg.backend, [cfg.family])}

## License

The weights keep the source's license (`{license_}`; license files are copied
from the source). The modeling files (`{"`, `".join(family_files(cfg.family))}`) are Apache-2.0.
"""


def third_party_markdown(source: Source, third_party: dict[str, str]) -> str:
    """The card section that names the source's own code in the repo, so that a reader can check it."""
    if not third_party:
        return ""
    rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(third_party.items()))
    return f"""
## Third-party code

These Python files come unchanged from `{source.spec}`{f" at commit `{source.commit()}`" if source.is_hub else ""}
and run when `trust_remote_code=True` loads the tokenizer. Read them before you do; their sha256:

| file | sha256 |
|---|---|
{rows}
"""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

`hub_upload.py --reference` in the project writes such a config.json for a given checkpoint (for Qwen-7B, whose
config is custom code that `AutoConfig` would run from the original repo, use that: its `auto_map` takes `AutoConfig`
from this repo too). Or copy a `modeling_<family>.py` next to a checkpoint and set `auto_map` to `"<module>.<Class>"`.

## Attention backends

{backends_markdown(None, cfg.families)}
"""
