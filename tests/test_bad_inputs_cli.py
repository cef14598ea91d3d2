"""Bad command lines and bad files for hub_upload.py and scripts/train.py: each one gets an error that names the
problem (no traceback), and leaves nothing behind: no output folder, no partial file, no truncated log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_train import TINY, load_script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hub_upload  # noqa: E402

train = load_script("train")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(main, argv: list[str], capsys, folder: Path, message: str) -> None:
    """``main(argv)`` exits non-zero (a return code or argparse's SystemExit) with ``message`` on stderr, no
    traceback, and ``folder`` exactly as it was."""
    before = snapshot(folder)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"accepted: {argv}"
    assert message in err, err
    assert "Traceback" not in err
    assert snapshot(folder) == before, "a bad input changed files"


# ------------------------------------------------------------------------------------------- hub_upload.py
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


GOOD = {"family": "gpt2", "source": "openai-community/gpt2", "target": "org/gpt2-mea"}

HUB_CASES = {
    "missing config": (lambda d: [str(d / "nope.yaml"), "--dry-run"], "nope.yaml: no such config file"),
    "broken yaml": (lambda d: [write(d / "c.yaml", "family: [gpt2\n"), "--dry-run"], "not valid YAML"),
    "broken json": (lambda d: [write(d / "c.json", "{'family': 1}"), "--dry-run"], "not valid JSON"),
    "not a mapping": (lambda d: [write(d / "c.yaml", "- gpt2\n"), "--dry-run"], "expected a mapping"),
    "unknown key": (lambda d: [write(d / "c.yaml", yaml.safe_dump({**GOOD, "tagret": "x/y"})), "--dry-run"],
                    "unknown keys ['tagret']"),
    "unknown family": (lambda d: [write(d / "c.yaml", yaml.safe_dump({**GOOD, "family": "falcon"})), "--dry-run"],
                       "`family` must be one of"),
    "bloom on sdpa": (lambda d: [write(d / "c.yaml", yaml.safe_dump({**GOOD, "family": "bloom",
                                                                      "options": {"backend": "sdpa"}})),
                                 "--local-dir", str(d / "out")], "backend 'sdpa' cannot run bloom"),
    "numeric revision": (lambda d: [write(d / "c.yaml", yaml.safe_dump({**GOOD, "source_revision": 1234})),
                                    "--dry-run"], "`source_revision` must be a string"),
    "bad target": (lambda d: [write(d / "c.yaml", yaml.safe_dump({**GOOD, "target": "a/b/c"})), "--dry-run"],
                   "`target` must be '<org>/<name>'"),
    "bad --target": (lambda d: [write(d / "c.yaml", yaml.safe_dump(GOOD)), "--dry-run", "--target", "no org"],
                     "--target"),
    "no source": (lambda d: [write(d / "c.yaml", yaml.safe_dump({**GOOD, "source": str(d / "x" / "y" / "z")})),
                             "--dry-run"], "is neither a folder nor a Hub repo id"),
    "no configs": (lambda d: ["--dry-run"], "give at least one config file"),
    "--target with two configs": (lambda d: ["a.yaml", "b.yaml", "--target", "o/t"], "--target needs exactly one"),
    "--dry-run with --local-dir": (lambda d: ["a.yaml", "--dry-run", "--local-dir", str(d / "out")],
                                   "--dry-run writes nothing"),
    "--create-pr with --local-dir": (lambda d: ["a.yaml", "--create-pr", "--local-dir", str(d / "out")],
                                     "push-only flags with --local-dir, which pushes nothing: --create-pr"),
    "--create-pr with --dry-run": (lambda d: ["a.yaml", "--create-pr", "--dry-run"], "--create-pr is for pushes"),
    "push flags with --local-dir": (lambda d: ["a.yaml", "--private", "--revision", "dev", "--allow-unpinned",
                                               "--local-dir", str(d / "out")],
                                    "which pushes nothing: --private, --revision, --allow-unpinned"),
    # were accepted and ignored: --source-revision built the folder from the source's current files
    "reference flags without --reference": (lambda d: ["a.yaml", "--source-revision", "0" * 40, "--backend", "eager",
                                                       "--local-dir", str(d / "out")],
                                            "reference-mode flags without --reference: --source-revision, --backend"),
    "--reference without --family": (lambda d: ["--reference", "a/b", "--code-repo", "o/c", "--local-dir", "x"],
                                     "--reference needs --family"),
    "unknown --backend": (lambda d: ["--reference", "a/b", "--family", "bloom", "--code-repo", "o/c",
                                     "--local-dir", "x", "--backend", "fast"], "invalid choice: 'fast'"),
    "--create-pr on a branch": (lambda d: [write(d / "c.yaml", yaml.safe_dump(GOOD)), "--create-pr", "--revision",
                                           "dev", "--token", "hf_x"], "opens the pull request against main"),
    "unpinned hub source": (lambda d: [write(d / "c.yaml", yaml.safe_dump(GOOD)), "--token", "hf_x"],
                            "must pin a 40-hex commit of openai-community/gpt2"),
}


@pytest.mark.parametrize("case", sorted(HUB_CASES))
def test_hub_upload_bad_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = HUB_CASES[case]
    argv = argv(tmp_path)
    fails_cleanly(hub_upload.main, argv, capsys, tmp_path, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_hub_upload_refuses_a_local_dir_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    config = write(tmp_path / "c.yaml", yaml.safe_dump({"family": "gpt2", "publish": "code", "target": "o/c"}))
    fails_cleanly(hub_upload.main, [config, "--local-dir", str(tmp_path / "out")], capsys, tmp_path,
                  "is not an empty folder")


# ------------------------------------------------------------------------------------------------ train.py
def train_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, "--tiny-config", "llama", "--steps", "2", "--batch-size", "2",
            "--output-dir", str(tmp_path / "run"), *extra]


def data_file(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content)
    return str(path)


def without_synthetic(argv: list[str]) -> list[str]:
    return [arg for arg in argv if arg != "--synthetic"]


TRAIN_ARGUMENT_CASES = {
    "--steps 0": (["--steps", "0"], "--steps must be at least 1, got 0"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "--grad-accum 0": (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    "--seq-len 1": (["--seq-len", "1"], "--seq-len must be at least 2"),
    "--lr 0": (["--lr", "0"], "--lr must be positive"),
    "--warmup -1": (["--warmup", "-1"], "--warmup must be at least 0"),
    "--stop-at past --steps": (["--stop-at", "5"], "--stop-at must be between 1 and --steps"),
    "--use_flash_attn garbage": (["--use_flash_attn", "garbage"], "--use_flash_attn 'garbage' is not"),
    "--steps abc": (["--steps", "abc"], "invalid int value: 'abc'"),
    "--lr inf": (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    "--max-grad-norm -1": (["--max-grad-norm", "-1"], "--max-grad-norm must be positive"),
    "--min-lr-ratio -2": (["--min-lr-ratio", "-2"], "--min-lr-ratio must be between 0 and 1"),
    "--weight-decay -1": (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    "--tiny-hidden 30": (["--tiny-hidden", "30"], "--tiny-hidden 30 must be a multiple of --tiny-heads 4"),
    "--sequence-tile-size, stock class": (["--sequence-tile-size", "4"], "need our modeling files"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_ARGUMENT_CASES))
def test_train_bad_argument(case, tmp_path, capsys):
    extra, message = TRAIN_ARGUMENT_CASES[case]
    fails_cleanly(train.main, train_argv(tmp_path, *extra), capsys, tmp_path, message)
    assert not (tmp_path / "run").exists()


TRAIN_DATA_CASES = {
    "bad json line": ("docs.jsonl", "[5, 6, 7]\n[8, 9\n", "docs.jsonl:2: not valid JSON"),
    "object without input_ids": ("docs.jsonl", '[5, 6]\n\n{"ids": [1]}\n', "docs.jsonl:3: expected a list"),
    "string tokens": ("docs.jsonl", '["a", "b"]\n', "docs.jsonl:1: expected a list of integer token ids"),
    "ids past the vocabulary": ("docs.jsonl", json.dumps(list(range(60, 130))) + "\n", "must lie in [0, 64)"),
    "float array": ("tokens.npy", np.ones(100, dtype=np.float32), "expected integer token ids, got dtype float32"),
    "too few tokens": ("docs.jsonl", "[5, 6, 7]\n", "fewer than one block of 32"),
    "text on a small vocabulary": ("corpus.txt", "hello " * 50, "needs a vocabulary of at least 256"),
    "wrong suffix": ("tokens.csv", "1,2,3\n", "--data must be a .txt, .npy or .jsonl file"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_DATA_CASES))
def test_train_bad_data_names_the_file_and_line(case, tmp_path, capsys):
    name, content, message = TRAIN_DATA_CASES[case]
    argv = without_synthetic(train_argv(tmp_path, "--data", data_file(tmp_path, name, content)))
    fails_cleanly(train.main, argv, capsys, tmp_path, message)
    assert not (tmp_path / "run").exists(), "bad data is found before anything is written"


def test_train_missing_inputs(tmp_path, capsys):
    argv = without_synthetic(train_argv(tmp_path, "--data", str(tmp_path / "missing.jsonl")))
    fails_cleanly(train.main, argv, capsys, tmp_path, "missing.jsonl: no such file")
    argv = [arg for arg in train_argv(tmp_path) if arg not in ("--tiny-config", "llama")]
    fails_cleanly(train.main, [*argv, "--model", str(tmp_path / "no-model")], capsys, tmp_path,
                  "no-model: not a model folder")
    assert not (tmp_path / "run").exists()


def test_train_resume_problems_leave_the_run_as_it_was(tmp_path, capsys):
    fails_cleanly(train.main, train_argv(tmp_path, "--resume"), capsys, tmp_path, "holds no checkpoint")
    assert train.main(train_argv(tmp_path, "--stop-at", "1")) == 0
    fails_cleanly(train.main, train_argv(tmp_path), capsys, tmp_path, "already holds a run")
    fails_cleanly(train.main, train_argv(tmp_path, "--resume", "--seq-len", "16"), capsys, tmp_path,
                  "seq_len: 32 in checkpoint-1, 16 now")
    (tmp_path / "run" / "checkpoint-1" / "optimizer.pt").write_bytes(b"\x80\x02corrupt")
    fails_cleanly(train.main, train_argv(tmp_path, "--resume"), capsys, tmp_path, "no readable checkpoint")
