"""CPU smoke test of scripts/benchmark.py (every section at tiny size) and scripts/plot_benchmarks.py.

One run of the benchmark (module-scoped fixture) feeds every test: the JSON lines it writes, the markdown
tables, a ``--resume`` re-run, and the plotting script. The real measurements run on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
STATUSES = {"ok", "oom", "unsupported", "skipped", "timeout", "error"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"mea_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ARGV = [
    "--device", "cpu", "--quick",
    "--section", "train,infer,kernel,light,compare",
    "--family", "bart,qwen",
    "--seq", "32", "--batch", "1",
    "--impl", "core",
    "--kernel-modes", "fwdbwd",
    "--profile",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()  # the script pins the CPU to one thread; give the others theirs back
    benchmark = load_script("benchmark")
    out = tmp_path_factory.mktemp("bench")
    try:
        assert benchmark.main(ARGV + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = (out / "results.jsonl").read_text().splitlines()
    return {"module": benchmark, "out": out, "lines": lines, "records": [json.loads(line) for line in lines]}


def by(records, **fields):
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


def test_profile_writes_a_table_per_configuration(run):
    trained = by(run["records"], section="train", status="ok")
    inferred = by(run["records"], section="infer", status="ok")
    assert trained and inferred
    files = [(r, "") for r in trained] + [(r, f"_{part}") for r in inferred for part in ("prefill", "decode")]
    for record, part in files:
        table = (run["out"] / record["profile_file" + part]).read_text()
        assert record["family"] in record["profile_file" + part] and "sorted by self_cpu_time_total" in table
        assert record["profile_wall_ms" + part] > 0 and ("aten::addmm" in table or "aten::mm" in table)


def test_every_section_wrote_records_and_none_failed(run):
    records = run["records"]
    assert by(records, section="env")[0]["torch"] == torch.__version__
    for section in ("train", "infer", "kernel", "light", "compare"):
        assert by(records, section=section), f"no {section} records"
    assert {r["status"] for r in records if r["section"] != "env"} <= STATUSES
    failures = [r for r in records if r.get("status") in ("error", "timeout", "skipped")]
    assert not failures, failures
    unsupported = [r for r in records if r.get("status") == "unsupported"]
    # sdpa cannot take ALiBi: our sdpa backend refuses BLOOM-style calls; everything else runs on the CPU
    assert unsupported and all(r["impl"] == "ours:sdpa" and r.get("mask") == "alibi" for r in unsupported)


def test_train_records_hold_consistent_numbers(run):
    records = by(run["records"], section="train", status="ok")
    assert {r["family"] for r in records} == {"bart", "qwen"}
    assert {r["impl"] for r in by(records, family="qwen")} == {"ours:auto", "ours:eager"}
    assert {r["impl"] for r in by(records, family="bart")} == {"stock:sdpa", "stock:eager", "ours:auto", "ours:eager"}
    for r in records:
        assert r["step_ms"] > 0 and len(r["step_ms_all"]) == r["iters"] >= 1
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["step_ms"] / 1e3), rel=1e-9)
        assert r["tflops"] == pytest.approx(r["flops"] / (r["step_ms"] / 1e3) / 1e12, rel=1e-9)
        # random weights: the loss starts near ln(vocab)
        assert math.isfinite(r["loss"]) and abs(r["loss"] - math.log(256)) < 1.5, r["loss"]
        assert r["mfu"] is None and r["peak_mem_mb"] is None  # CPU: no peak rate, no allocator statistics


def test_bart_training_flops_follow_the_stated_formula(run):
    """6·N·T + 3·A counted by hand from the tiny config (weights only; encoder × source, decoder × target)."""
    dims = run["module"].TINY_DIMS["bart"]
    h, ffn, layers, vocab = dims.hidden, 4 * dims.hidden, dims.layers, dims.vocab
    encoder_weights = layers * (4 * h * h + 2 * h * ffn)
    decoder_weights = layers * (8 * h * h + 2 * h * ffn) + h * vocab  # self + cross attention, MLP, LM head
    for r in by(run["records"], section="train", family="bart", status="ok"):
        src, tgt = r["seq"], r["tgt_len"]
        assert (src, tgt) == (32, 16)
        attention = 4 * h * layers * (src * src + 0.5 * tgt * tgt + tgt * src)
        expected = 6 * (encoder_weights * src + decoder_weights * tgt) + 3 * attention
        assert r["flops"] == pytest.approx(expected, rel=1e-12)
        assert r["tokens"] == src + tgt


def test_infer_records(run):
    records = by(run["records"], section="infer")
    assert {(r["family"], r["impl"]) for r in records} == {
        ("bart", "stock:sdpa"), ("bart", "stock:eager"), ("bart", "ours:auto"),
        ("qwen", "ours:eager"), ("qwen", "ours:auto"),
    }  # fmt: skip
    for r in records:
        assert r["status"] == "ok"
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["new_tokens"] == 4
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 4 / (r["decode_ms"] / 1e3), rel=1e-9)


def test_kernel_records_name_the_backend_and_the_overhead(run):
    records = by(run["records"], section="kernel")
    causal_auto = by(records, impl="ours:auto", mask="causal")[0]
    assert causal_auto["status"] == "ok"
    assert causal_auto["backend_used"] == "sdpa" and causal_auto["reference"] == "torch:sdpa"
    direct = by(records, impl="torch:sdpa", mask="causal")[0]
    assert causal_auto["overhead_pct"] == pytest.approx(100 * (causal_auto["ms"] / direct["ms"] - 1), rel=1e-9)
    assert by(records, impl="ours:auto", mask="alibi")[0]["backend_used"] in ("chunked", "eager")
    for r in by(records, status="ok"):
        assert r["head_dim"] == 32 and r["heads"] == 4 and r["batch"] * r["seq"] == 256
        # causal forward + backward: 3.5 x (4 b h s^2 d / 2)
        assert r["flops"] == pytest.approx(3.5 * 2 * r["batch"] * r["heads"] * r["seq"] ** 2 * r["head_dim"])


def test_light_and_compare_records(run):
    light = by(run["records"], section="light")
    assert [r["impl"] for r in light] == [
        "stock:eager",
        "ours:eager",
        "ours:eager+lightsoftmax+dropmatmul",
        "ours:auto",
    ]
    assert all(r["status"] == "ok" and r["dtype"] == "float32" and r["dropout"] == 0.1 for r in light)
    compare = by(run["records"], section="compare", status="ok")
    assert {(r["family"], r["impl"]) for r in compare} == {
        ("bloom", "stock:eager"), ("bloom", "ours:auto"), ("llama", "stock:sdpa"), ("llama", "ours:auto"),
    }  # fmt: skip


def test_markdown_has_every_table(run):
    markdown = (run["out"] / "results.md").read_text()
    for heading in (
        "#### Environment",
        "#### Training-step targets",
        "#### train: bart, batch 1",
        "#### train: qwen, batch 1",
        "#### compare: bloom, batch 1",
        "#### infer: qwen",
        "#### kernel: head_dim 32, causal, fwdbwd",
        "#### Light Attention table",
        "How FLOPs are counted",
    ):
        assert heading in markdown, heading
    assert "| ours:auto vs torch:sdpa |" in markdown


def test_resume_skips_what_is_recorded(run):
    threads = torch.get_num_threads()
    try:
        assert run["module"].main(ARGV + ["--out", str(run["out"]), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = (run["out"] / "results.jsonl").read_text().splitlines()
    added = [json.loads(line) for line in lines[len(run["lines"]) :]]
    assert [r["section"] for r in added] == ["env"]


def test_latest_record_wins_and_targets_are_judged():
    report = load_script("bench_report")
    base = {"section": "train", "batch": 1, "seq": 8192, "status": "ok", "dtype": "bfloat16", "device_name": "GPU"}
    records = [
        {**base, "family": "bloom", "impl": "stock:eager", "step_ms": 1000.0, "peak_mem_mb": 60000.0},
        {**base, "family": "bloom", "impl": "ours:auto", "step_ms": 500.0, "peak_mem_mb": 9000.0},
        {**base, "family": "bloom", "impl": "ours:auto", "step_ms": 200.0, "peak_mem_mb": 9000.0},  # a re-run
        {**base, "family": "llama", "impl": "stock:sdpa", "step_ms": 190.0, "peak_mem_mb": 8000.0},
        {**base, "family": "llama", "impl": "stock:eager", "step_ms": 400.0, "peak_mem_mb": 30000.0},
        {**base, "family": "llama", "impl": "ours:auto", "step_ms": 200.0, "peak_mem_mb": 8000.0},
    ]
    current = report.latest(records)
    assert len(current) == 5 and by(current, family="bloom", impl="ours:auto")[0]["step_ms"] == 200.0
    rows = {row[0].split(":")[0]: row for row in report.target_rows(current, 8192)}
    assert rows["BLOOM"][2] == "yes"  # 5x faster, 6.7x less memory
    bloom_vs_llama = next(row for row in report.target_rows(current, 8192) if "LLaMA" in row[0])
    assert bloom_vs_llama[2] == "yes"  # 200 / 190 = 1.053 <= 1.10
    assert rows["llama"][2] == "no"  # slower than stock sdpa


def test_plot_script_writes_markdown_without_matplotlib(run, tmp_path):
    plot = load_script("plot_benchmarks")
    assert plot.main([str(run["out"] / "results.jsonl"), "--out", str(tmp_path), "--no-plots"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "#### train: bart, batch 1" in readme and "#### Light Attention table" in readme
    assert "![" not in readme and not list(tmp_path.glob("*.png"))


def test_plot_script_writes_pngs(run, tmp_path):
    pytest.importorskip("matplotlib")  # the `bench` extra
    plot = load_script("plot_benchmarks")
    assert plot.main([str(run["out"] / "results.jsonl"), "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"train_bart.png", "train_qwen.png", "infer_bart.png", "kernel_d32.png"} <= set(pngs)
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    assert "![train_bart](train_bart.png)" in (tmp_path / "README.md").read_text()
