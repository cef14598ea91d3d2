"""The model families we ship: which files each one needs and the ``auto_map`` that points a checkpoint at them.

A checkpoint folder whose config.json has an ``auto_map`` naming our classes, with our files beside it, loads
as our code through ``from_pretrained(folder, trust_remote_code=True)``. hub_upload.py, the scripts and the
tests all build such folders from this one table.

Only the standard library is used and modeling files are parsed, never imported, so scripts that run without
the package installed (scripts/benchmark.py) can load this file from its path.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, NamedTuple

MODELING_DIR = Path(__file__).resolve().parent


class AutoEntry(NamedTuple):
    auto_class: str
    file: str
    class_name: str

    def reference(self, code_repo: str | None = None) -> str:
        """The auto_map value: "module.Class", or "<code_repo>--module.Class" to load the code from another repo."""
        prefix = f"{code_repo}--" if code_repo else ""
        return f"{prefix}{Path(self.file).stem}.{self.class_name}"


class Family(NamedTuple):
    model_type: str  # config.json's model_type of the checkpoints this family loads
    entries: tuple[AutoEntry, ...]  # the first model entry is the family's main class


# An entry whose class is not (yet) defined in its file is left out of auto_map.
FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        (
            AutoEntry("AutoModelForCausalLM", "modeling_llama.py", "LlamaForCausalLM"),
            AutoEntry("AutoModel", "modeling_llama.py", "LlamaModel"),
            AutoEntry("AutoModelForSequenceClassification", "modeling_llama.py", "LlamaForSequenceClassification"),
            AutoEntry("AutoModelForQuestionAnswering", "modeling_llama.py", "LlamaForQuestionAnswering"),
            AutoEntry("AutoModelForTokenClassification", "modeling_llama.py", "LlamaForTokenClassification"),
        ),
    ),
    "gpt2": Family(
        "gpt2",
        (
            AutoEntry("AutoModelForCausalLM", "modeling_gpt2.py", "GPT2LMHeadModel"),
            AutoEntry("AutoModel", "modeling_gpt2.py", "GPT2Model"),
            AutoEntry("AutoModelForSequenceClassification", "modeling_gpt2.py", "GPT2ForSequenceClassification"),
            AutoEntry("AutoModelForQuestionAnswering", "modeling_gpt2.py", "GPT2ForQuestionAnswering"),
            AutoEntry("AutoModelForTokenClassification", "modeling_gpt2.py", "GPT2ForTokenClassification"),
            AutoEntry("AutoModelForPreTraining", "modeling_gpt2.py", "GPT2LMHeadModel"),
            AutoEntry("AutoModelWithLMHead", "modeling_gpt2.py", "GPT2LMHeadModel"),  # transformers 4.x
        ),
    ),
    "bloom": Family(
        "bloom",
        (
            AutoEntry("AutoModelForCausalLM", "modeling_bloom.py", "BloomForCausalLM"),
            AutoEntry("AutoModel", "modeling_bloom.py", "BloomModel"),
            AutoEntry("AutoModelForSequenceClassification", "modeling_bloom.py", "BloomForSequenceClassification"),
            AutoEntry("AutoModelForTokenClassification", "modeling_bloom.py", "BloomForTokenClassification"),
            AutoEntry("AutoModelForQuestionAnswering", "modeling_bloom.py", "BloomForQuestionAnswering"),
            AutoEntry("AutoModelForPreTraining", "modeling_bloom.py", "BloomForCausalLM"),
            AutoEntry("AutoModelWithLMHead", "modeling_bloom.py", "BloomForCausalLM"),  # transformers 4.x
        ),
    ),
    "bart": Family(
        "bart",
        (
            AutoEntry("AutoModelForSeq2SeqLM", "modeling_bart.py", "BartForConditionalGeneration"),
            AutoEntry("AutoModel", "modeling_bart.py", "BartModel"),
            AutoEntry("AutoModelForSequenceClassification", "modeling_bart.py", "BartForSequenceClassification"),
            AutoEntry("AutoModelForQuestionAnswering", "modeling_bart.py", "BartForQuestionAnswering"),
            AutoEntry("AutoModelForCausalLM", "modeling_bart.py", "BartForCausalLM"),
            AutoEntry("AutoModelForMaskedLM", "modeling_bart.py", "BartForConditionalGeneration"),
            AutoEntry("AutoModelForPreTraining", "modeling_bart.py", "BartForConditionalGeneration"),
            AutoEntry("AutoModelWithLMHead", "modeling_bart.py", "BartForConditionalGeneration"),  # transformers 4.x
        ),
    ),
    "qwen": Family(
        "qwen",
        (
            AutoEntry("AutoModelForCausalLM", "modeling_qwen.py", "QWenLMHeadModel"),
            AutoEntry("AutoModel", "modeling_qwen.py", "QWenModel"),
            AutoEntry("AutoConfig", "configuration_qwen.py", "QWenConfig"),
        ),
    ),
}


class ModelingFilesError(ValueError):
    """A family's files are not all in the package, so a folder built from them would not load."""


def defined_classes(path: Path) -> set[str]:
    """Names of the classes defined at the top level of a Python file (parsed, not imported)."""
    return set(_top_level_classes(path.read_text(encoding="utf-8"), str(path)))


@functools.lru_cache(maxsize=16)
def _top_level_classes(text: str, filename: str) -> frozenset[str]:
    """Parsing a 7,000-line modeling file takes about 0.1 s, at every folder written: once per text instead."""
    tree = ast.parse(text, filename=filename)
    return frozenset(node.name for node in tree.body if isinstance(node, ast.ClassDef))


def relative_imports(path: Path) -> set[str]:
    """Modules a file imports relatively, found the way transformers' remote-code loader finds them: by text,
    even inside functions or try blocks. Each one must sit next to the file, or loading fails."""
    text = path.read_text(encoding="utf-8")
    return set(re.findall(r"^\s*import\s+\.(\S+)\s*$", text, flags=re.MULTILINE)) | set(
        re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE)
    )


def family_files(family: str) -> list[str]:
    """The files a family ships from the package: the table's, in order, then every module they import
    relatively (transformers needs those next to them; Qwen: qwen_generation_utils.py)."""
    files = list(dict.fromkeys(entry.file for entry in FAMILIES[family].entries))
    for name in files:
        if not (MODELING_DIR / name).is_file():
            raise ModelingFilesError(f"{MODELING_DIR / name} does not exist (family {family!r} not written yet?)")
    for name in files:  # grows while iterating: imports of imported modules
        for module in sorted(relative_imports(MODELING_DIR / name)):
            if not (MODELING_DIR / f"{module}.py").is_file():
                raise ModelingFilesError(f"{name} imports .{module}, so transformers needs {module}.py next to it, "
                                         f"and {MODELING_DIR} has none")
            if f"{module}.py" not in files:
                files.append(f"{module}.py")
    return files


def available_entries(family: str) -> list[AutoEntry]:
    """The family's table entries whose class is defined in its file."""
    classes = {name: defined_classes(MODELING_DIR / name) for name in family_files(family)}
    entries = [entry for entry in FAMILIES[family].entries if entry.class_name in classes[entry.file]]
    if not any(entry.auto_class != "AutoConfig" for entry in entries):
        raise ModelingFilesError(f"no model class of family {family!r} is defined in {family_files(family)}")
    return entries


def main_entry(family: str) -> AutoEntry:
    """The family's main model class (a causal or seq2seq LM) and the Auto class that loads it."""
    return next(e for e in available_entries(family) if e.auto_class != "AutoConfig")


def auto_map(family: str, code_repo: str | None = None) -> dict[str, str]:
    """auto_map entries for every class of a family: "module.Class", or "<code_repo>--module.Class"."""
    return {e.auto_class: e.reference(code_repo) for e in available_entries(family)}


_family_auto_map = auto_map  # write_remote_code's parameter of the same name hides it there


def copy_modeling_files(folder: str | Path, files: Iterable[str]) -> None:
    """Copy our ``files`` from the package into ``folder``."""
    for name in files:
        shutil.copyfile(MODELING_DIR / name, Path(folder) / name)


def set_auto_map(folder: str | Path, auto_map: dict[str, str]) -> None:
    """Point ``folder/config.json``'s auto_map at our classes (replacing any it had)."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_remote_code(folder: str | Path, family: str, auto_map: dict[str, str] | None = None) -> Path:
    """Copy a family's files into a saved checkpoint ``folder`` and point its config.json's auto_map at them
    (every class of the family unless ``auto_map`` is given)."""
    folder = Path(folder)
    copy_modeling_files(folder, family_files(family))
    set_auto_map(folder, _family_auto_map(family) if auto_map is None else auto_map)
    return folder
