#!/usr/bin/env python
"""Load what hub_upload.py wrote or pushed with trust_remote_code and run a few tokens through it.

A model repo may hold the source checkpoint's own Python files (a tokenizer's), so it is loaded from a local
folder in a child process that has no Hub token and no network (``verify_model_folder``):

    python hub_verify.py FOLDER --family bloom       # what that child process runs; exit code 1 on failure

A code repo holds only our modeling files and is loaded in the calling process (``verify_code``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from memory_efficient_adapter.families import FAMILIES, available_entries, main_entry

logger = logging.getLogger("hub_upload")

# Environment variables that hand a token to huggingface_hub; the verifying child process gets none of them.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


class VerifyError(RuntimeError):
    """What was published does not load or run as our remote code."""


def check_remote_class(cls: type, expected_name: str) -> None:
    if cls.__name__ != expected_name or not cls.__module__.startswith("transformers_modules"):
        raise VerifyError(f"loaded {cls.__module__}.{cls.__name__}, not our remote-code {expected_name}")


def verify_code(families: list[str], repo: str, revision: str | None = None, token: str | None = None) -> str:
    """Every class of ``families`` loads from ``repo`` (a Hub code repo, or a local folder) as remote code."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with tempfile.TemporaryDirectory(prefix="hub-upload-verify-") as cache_dir:  # a fresh cache: really download
        for family in families:
            for entry in available_entries(family):
                ref = entry.reference(None if Path(repo).is_dir() else repo)  # a Hub repo: the cross-repo form
                cls = get_class_from_dynamic_module(ref, repo, code_revision=revision, token=token,
                                                    cache_dir=cache_dir)
                check_remote_class(cls, entry.class_name)
    return f"verified: every class loads from {repo}"


def verify_model(family: str, folder: Path) -> str:
    """Load a model folder as our remote code and check that a few tokens give finite logits."""
    import torch
    import transformers

    entry = main_entry(family)
    auto_cls = getattr(transformers, entry.auto_class)
    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = auto_cls.from_pretrained(folder, trust_remote_code=True, **{dtype_kwarg: "auto"})
    except OSError as error:  # transformers' wording for files it could not get
        raise VerifyError(f"{folder} does not load: {error}") from error
    check_remote_class(type(model), entry.class_name)
    input_ids = sample_input_ids(folder, model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    if not torch.isfinite(logits).all():
        raise VerifyError(f"{folder}: non-finite logits from {type(model).__name__}")
    return f"verified: {type(model).__name__} from {folder} gives finite logits {list(logits.shape)}"


def sample_input_ids(folder: Path, vocab_size: int):
    """A few tokens: from the folder's tokenizer when it has one, else fixed ids."""
    import torch
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        return tokenizer("Memory-efficient attention", return_tensors="pt")["input_ids"]
    return torch.arange(1, 9).remainder(vocab_size).unsqueeze(0)


def verify_model_folder(family: str, folder: Path, what: str) -> None:
    """Run ``verify_model`` in a child process with no token in its environment and the Hub switched off.

    ``what`` names the repo in the error message.
    """
    environment = {key: value for key, value in os.environ.items() if key not in TOKEN_VARIABLES}
    environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
                       HF_TOKEN_PATH=os.devnull)
    command = [sys.executable, str(Path(__file__).resolve()), str(folder), "--family", family]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        logger.info("%s", line)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise VerifyError(f"{what} ({folder}) does not load as our {family} code:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model repo folder written by hub_upload.py")
    parser.add_argument("--family", required=True, choices=list(FAMILIES))
    args = parser.parse_args(argv)
    try:
        print(verify_model(args.family, args.folder))
    except VerifyError as error:
        print(f"hub_verify: verification failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
