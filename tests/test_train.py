"""scripts/train.py and scripts/plot_loss.py on CPU: tiny models, a few steps, in-process and under torchrun."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from remote_code import assert_close_rel

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"mea_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_script("train")
plot_loss = load_script("plot_loss")

TINY = ["--synthetic", "--seq-len", "32", "--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "4",
        "--tiny-vocab", "64", "--lr", "1e-2", "--warmup", "2", "--no-progress", "--device", "cpu"]  # fmt: skip


def run(output_dir: Path, *extra: str) -> list[dict]:
    return train.train(train.parse_args([*TINY, "--output-dir", str(output_dir), *extra]))


def logged(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "loss.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _restore_use_flash_attn():
    """--use_flash_attn writes USE_FLASH_ATTN into this process's environment."""
    before = os.environ.get("USE_FLASH_ATTN")
    yield
    if before is None:
        os.environ.pop("USE_FLASH_ATTN", None)
    else:
        os.environ["USE_FLASH_ATTN"] = before


# ----------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------

MODEL_SETUPS = {
    # our modeling file through trust_remote_code
    "llama-ours": ["--tiny-config", "llama", "--trust_remote_code"],
    # the stock class through the "mea" registry name
    "gpt2-stock-registry": ["--tiny-config", "gpt2", "--attn_implementation", "mea_chunked"],
    # the stock class patched by the original adapter's flag (BLOOM: instance-level forward, ALiBi slopes)
    "bloom-stock-flag": ["--tiny-config", "bloom", "--use_flash_attn", "chunked"],
}
EXPECTED_IMPLEMENTATION = {"gpt2-stock-registry": "mea_chunked", "bloom-stock-flag": "mea_chunked"}


@pytest.mark.parametrize("setup", sorted(MODEL_SETUPS))
def test_training_logs_a_falling_loss_and_saves_checkpoints(setup, tmp_path):
    records = run(tmp_path, *MODEL_SETUPS[setup], "--steps", "10", "--batch-size", "4", "--save-every", "5")
    assert [record["step"] for record in records] == list(range(1, 11))
    assert logged(tmp_path) == records
    losses = [record["loss"] for record in records]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert (tmp_path / "checkpoint-5" / "model.pt").exists() and (tmp_path / "checkpoint-10" / "state.json").exists()

    run_info = json.loads((tmp_path / "run.json").read_text())
    if setup in EXPECTED_IMPLEMENTATION:
        assert run_info["attn_implementation"] == EXPECTED_IMPLEMENTATION[setup]
        assert run_info["model_class"].startswith("transformers.models.")
    else:
        assert run_info["model_class"].startswith("transformers_modules.")

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final", trust_remote_code="ours" in setup)
    checkpoint = torch.load(tmp_path / "checkpoint-10" / "model.pt", weights_only=True)
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), name


def test_resume_continues_from_the_checkpoint_exactly(tmp_path):
    setup = ["--tiny-config", "llama", "--attn_implementation", "mea", "--steps", "8", "--batch-size", "2"]
    straight = run(tmp_path / "straight", *setup)
    first = run(tmp_path / "resumed", *setup, "--stop-at", "3", "--save-every", "2")
    assert [record["step"] for record in first] == [1, 2, 3]
    assert not (tmp_path / "resumed" / "final").exists()
    (tmp_path / "resumed" / "checkpoint-3").rename(tmp_path / "resumed" / "checkpoint-3.lost")  # crash before save
    second = run(tmp_path / "resumed", *setup, "--resume")
    assert [record["step"] for record in second] == list(range(3, 9)), "resumes after checkpoint-2"
    combined = logged(tmp_path / "resumed")
    assert [record["step"] for record in combined] == list(range(1, 9))
    for ours, reference in zip(combined, straight):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6), ours["step"]


RESUMABLE = ["--tiny-config", "llama", "--steps", "6", "--batch-size", "2", "--save-every", "2"]


def test_resume_refuses_a_checkpoint_of_a_different_run_naming_each_difference(tmp_path):
    run(tmp_path, *RESUMABLE, "--stop-at", "2")
    log = (tmp_path / "loss.jsonl").read_bytes()
    with pytest.raises(train.TrainError) as refused:
        run(tmp_path, *RESUMABLE, "--resume", "--batch-size", "4", "--seq-len", "16", "--steps", "8")
    message = str(refused.value)
    assert "checkpoint-2 comes from a different run" in message
    for difference in ("batch_size: 2 in checkpoint-2, 4 now", "seq_len: 32 in checkpoint-2, 16 now",
                       "steps: 6 in checkpoint-2, 8 now"):
        assert difference in message
    assert "world_size" not in message and "model" not in message
    state = json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())
    assert state["world_size"] == 1 and state["model"].startswith("tiny llama (hidden 32")
    assert (tmp_path / "loss.jsonl").read_bytes() == log


def test_resume_without_a_checkpoint_is_an_error_and_keeps_the_log(tmp_path):
    with pytest.raises(train.TrainError, match="holds no checkpoint"):
        run(tmp_path / "empty", *RESUMABLE, "--resume")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "loss.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    with pytest.raises(train.TrainError, match="holds no checkpoint"):
        run(tmp_path / "run", *RESUMABLE, "--resume")
    with pytest.raises(train.TrainError, match="already holds a run"):
        run(tmp_path / "run", *RESUMABLE)  # a fresh run would overwrite it
    assert (tmp_path / "run" / "loss.jsonl").read_text() == '{"step": 1, "loss": 4.0}\n'


def test_resume_falls_back_to_the_newest_readable_checkpoint_and_keeps_the_whole_log(tmp_path, capsys):
    first = run(tmp_path, *RESUMABLE, "--stop-at", "4")
    log = (tmp_path / "loss.jsonl").read_text()
    (tmp_path / "checkpoint-4" / "model.pt").write_bytes(b"truncated by a crash")
    second = run(tmp_path, *RESUMABLE, "--resume")
    err = capsys.readouterr().err
    assert "checkpoint-4 is unreadable" in err and "resuming from checkpoint-2" in err
    assert [record["step"] for record in second] == [3, 4, 5, 6]
    assert (tmp_path / "loss.jsonl.before-resume-2").read_text() == log, "the log before the resume is kept whole"
    combined = logged(tmp_path)
    assert [record["step"] for record in combined] == list(range(1, 7))
    assert combined[:2] == first[:2]
    for ours, again in zip(first[2:], second):  # the same steps again from checkpoint-2: the same losses
        assert ours["loss"] == pytest.approx(again["loss"], rel=1e-6, abs=1e-6)


def test_resume_with_no_readable_checkpoint_names_each_one(tmp_path):
    run(tmp_path, *RESUMABLE, "--stop-at", "2")
    (tmp_path / "checkpoint-2" / "state.json").write_text("{not json")
    with pytest.raises(train.TrainError, match=r"no readable checkpoint in .*checkpoint-2 \(JSONDecodeError"):
        run(tmp_path, *RESUMABLE, "--resume")


# ----------------------------------------------------------------------------------------------
# torchrun: DDP and FSDP2 over gloo against the single-process run with the same global batch
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(mode, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    setup = ["--tiny-config", "llama", "--trust_remote_code", "--steps", "4", "--grad-accum", "2"]
    single = run(tmp_path / "single", *setup, "--batch-size", "4")
    command = [
        torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", str(ROOT / "scripts" / "train.py"),
        *TINY, *setup, "--batch-size", "2", "--output-dir", str(tmp_path / mode), *(["--fsdp"] if mode == "fsdp" else []),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = logged(tmp_path / mode)
    assert [record["step"] for record in distributed] == [1, 2, 3, 4]
    assert json.loads((tmp_path / mode / "run.json").read_text())["world_size"] == 2
    for ours, reference in zip(distributed, single):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5), ours["step"]
        assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), ours["step"]
    assert (tmp_path / mode / "final" / "modeling_llama.py").exists(), "save_pretrained saw the FSDP class"


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_flat_parameters_train_every_weight_and_a_wrapped_head_runs_once(tmp_path, use_orig_params):
    """FSDP1's default (``use_orig_params=False``) gives inner modules views of a flat parameter: the tiles'
    backward gave those weights no gradient (now they run untiled, logged; with ``use_orig_params=True`` the
    views are registered and the tiles stay), and a head wrapped as its own unit was called once per loss chunk,
    a different number of gathers per rank (a collective mismatch or a hang)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memory_efficient_adapter.families import write_remote_code

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    write_remote_code(tmp_path, "llama")
    output = tmp_path / "updates.pt"
    command = [sys.executable, str(ROOT / "tests" / "fsdp1_worker.py"), str(tmp_path), str(output), str(int(use_orig_params))]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    refused = "sequence_tile_size is off for modules whose weights are made from a parameter" in result.stderr
    assert refused is not use_orig_params
    updates = torch.load(output, weights_only=True)
    assert updates["ours"].keys() == updates["stock"].keys()
    for name, expected in updates["stock"].items():
        assert expected.norm() > 0, name
        assert_close_rel(updates["ours"][name], expected, 1e-5, name)


# ----------------------------------------------------------------------------------------------
# Data and flags
# ----------------------------------------------------------------------------------------------


def test_token_files_are_read_without_pickle(tmp_path):
    ids = np.arange(3, 43, dtype=np.int32).reshape(4, 10)
    np.save(tmp_path / "tokens.npy", ids)
    assert torch.equal(train.read_token_file(tmp_path / "tokens.npy", None, 64), torch.arange(3, 43))

    np.save(tmp_path / "objects.npy", np.array([[1, 2], "x"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        train.read_token_file(tmp_path / "objects.npy", None, 64)

    (tmp_path / "docs.jsonl").write_text('[5, 6, 7]\n\n{"input_ids": [8, 9]}\n')
    assert train.read_token_file(tmp_path / "docs.jsonl", None, 64).tolist() == [5, 6, 7, 8, 9]
    (tmp_path / "bad.jsonl").write_text("[5, 99]\n")
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        train.read_token_file(tmp_path / "bad.jsonl", None, 64)

    (tmp_path / "text.txt").write_text("héllo", encoding="utf-8")
    assert train.read_token_file(tmp_path / "text.txt", None, 256).tolist() == list("héllo".encode())


def test_a_text_file_trains_the_tiny_model_on_its_bytes(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["--tiny-config", "gpt2", "--attn_implementation", "mea", "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--tiny-vocab", "256", "--no-progress", "--output-dir", str(tmp_path / "run"),
            "--data", str(tmp_path / "corpus.txt")]  # fmt: skip
    records = train.train(train.parse_args(args))
    assert len(records) == 2 and all(math.isfinite(record["loss"]) for record in records)


def test_each_step_sees_the_same_blocks_whatever_the_split():
    tokens = train.synthetic_tokens(64 * 8, 50, 8, seed=3)
    one = train.BlockSchedule(tokens, 8, per_device=4, grad_accum=1, world_size=1, seed=1)
    split = train.BlockSchedule(tokens, 8, per_device=1, grad_accum=2, world_size=2, seed=1)
    for step in range(20):  # crosses epochs (64 blocks, 4 per step)
        parts = [split.micro_batch(step, micro, rank) for micro in range(2) for rank in range(2)]
        assert torch.equal(torch.cat(parts), one.micro_batch(step, 0, 0))
    epoch = torch.cat([one.micro_batch(step, 0, 0) for step in range(16)])
    assert torch.equal(epoch.sort(dim=0).values, one.blocks.sort(dim=0).values), "one epoch visits every block once"


def test_synthetic_data_is_a_seeded_copy_task():
    tokens = train.synthetic_tokens(4000, 100, 64, seed=5)
    assert torch.equal(tokens, train.synthetic_tokens(4000, 100, 64, seed=5))
    assert not torch.equal(tokens, train.synthetic_tokens(4000, 100, 64, seed=6))
    assert int(tokens.min()) >= 3 and int(tokens.max()) < 100
    counts = torch.bincount(tokens, minlength=100).float()
    assert counts.max() > 10 * counts[counts > 0].median(), "Zipf-distributed, not uniform"


def test_use_flash_attn_flag_sets_the_environment_and_the_patch_backend(monkeypatch):
    monkeypatch.delenv("USE_FLASH_ATTN", raising=False)
    assert train.apply_use_flash_attn(None) is None and "USE_FLASH_ATTN" not in os.environ
    assert train.apply_use_flash_attn("False") is None and os.environ["USE_FLASH_ATTN"] == "false"
    assert train.apply_use_flash_attn("true") == "auto" and os.environ["USE_FLASH_ATTN"] == "true"
    assert train.apply_use_flash_attn("chunked") == "chunked" and os.environ["USE_FLASH_ATTN"] == "chunked"


# ----------------------------------------------------------------------------------------------
# plot_loss.py
# ----------------------------------------------------------------------------------------------


def write_log(path: Path, losses) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": i + 1, "loss": float(v)}) + "\n" for i, v in enumerate(losses)))
    return path


def test_plot_loss_draws_both_runs_and_gates_on_the_difference(tmp_path, capsys):
    reference = 5.0 - np.log1p(np.arange(30))
    first = write_log(tmp_path / "a" / "loss.jsonl", reference)
    second = write_log(tmp_path / "b" / "loss.jsonl", reference + 0.02)
    out = tmp_path / "plot.png"
    assert plot_loss.main([str(first), str(second), "--out", str(out), "--window", "5", "--max-diff", "0.05"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(capsys.readouterr().out)
    assert [run["label"] for run in summary["runs"]] == ["a", "b"]
    assert summary["runs"][1]["max_abs_diff"] == pytest.approx(0.02)
    assert plot_loss.main([str(first), str(second), "--out", str(out), "--max-diff", "0.01"]) == 1
    failed_run = write_log(tmp_path / "c" / "loss.jsonl", [])
    with pytest.raises(ValueError, match="no steps logged"):
        plot_loss.main([str(first), str(failed_run), "--out", str(out)])


def test_packed_rows_accumulated_over_micro_batches_train_as_one_batch(tmp_path):
    """Packed micro-batches hold different numbers of targets: each step's loss is the mean over all of them
    (num_items_in_batch, as the Trainer passes it), so batch 2 x 2 micro-steps logs what batch 4 logs."""
    setup = ["--tiny-config", "llama", "--trust_remote_code", "--pack", "--steps", "3", "--seed", "5"]
    whole = run(tmp_path / "whole", *setup, "--batch-size", "4")
    split = run(tmp_path / "split", *setup, "--batch-size", "2", "--grad-accum", "2")
    for one, accumulated in zip(whole, split, strict=True):
        assert accumulated["loss"] == pytest.approx(one["loss"], rel=1e-6), one["step"]
        assert accumulated["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5), one["step"]


def test_a_fresh_run_writes_its_own_tiny_model_over_one_a_failed_run_left(tmp_path):
    with pytest.raises(train.TrainError, match="--lora-targets nope"):
        run(tmp_path, "--tiny-config", "llama", "--lora", "--lora-targets", "nope", "--steps", "1")
    run(tmp_path, "--tiny-config", "llama", "--steps", "1", "--tiny-hidden", "48")
    assert json.loads((tmp_path / "tiny-llama" / "config.json").read_text())["hidden_size"] == 48


def test_resume_refuses_a_run_with_other_packing_lora_or_schedule(tmp_path):
    run(tmp_path, *RESUMABLE, "--stop-at", "2")
    for extra, named in ((["--pack"], "pack: False"), (["--lora"], "lora: None"), (["--lr", "0.5"], "lr_schedule")):
        with pytest.raises(train.TrainError, match=named):
            run(tmp_path, *RESUMABLE, "--resume", *extra)
