"""scripts/quickstart.py on CPU: what runs here up front, one table per family with a winner, correct logits."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quickstart():
    spec = importlib.util.spec_from_file_location("mea_quickstart", ROOT / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_quickstart_reports_what_runs_here_and_one_table_per_family(quickstart, capsys):
    assert quickstart.main(["--seq", "32", "--families", "gpt2,bloom", "--steps", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    runnable = re.search(r"training backends here: (.*);", out).group(1).split(", ")
    assert "flex" not in runnable and {"sdpa", "chunked", "eager"} <= set(runnable)
    assert "not here: flex (flex has no backward on CPU)" in out
    assert out.count("winner: fastest ours ") == 2
    assert "not for bloom: sdpa (sdpa cannot take ALiBi" in out
    rows = re.findall(r"^  (stock eager|ours \w+) +([\d.]+) +([\d.]+)x +([\d.]+) +(-?\d+)% +([\d.e+-]+)$", out, re.M)
    assert len(rows) == 2 + 4 + 3  # stock + auto + 3 backends (GPT-2), stock + auto + 2 (BLOOM: no sdpa)
    assert all(float(diff) < 1e-4 for *_, diff in rows), rows
    assert "Writing model shards" not in out


def test_the_median_of_warmed_up_steps_is_reported(quickstart, monkeypatch):
    calls = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))

        def forward(self, input_ids, labels):
            calls.append(len(calls))
            return type("Out", (), {"loss": (self.weight * 2).sum(), "logits": self.weight * 1})()

    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # timed steps of 1, 3 and 2 s
    monkeypatch.setattr(quickstart.time, "perf_counter", lambda: next(clock))
    _, seconds, _ = quickstart.training_steps(Model(), {"input_ids": None, "labels": None}, steps=3, warmup=2)
    assert len(calls) == 5 and seconds == 2.0
