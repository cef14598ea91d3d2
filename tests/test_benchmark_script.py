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
    """6·N·T + 3·A counted by hand from the tiny config (weights only; the encoder and the decoder's cross-attention
    keys/values see the source tokens, the other decoder weights the target tokens)."""
    dims = run["module"].TINY_DIMS["bart"]
    h, ffn, layers, vocab = dims.hidden, 4 * dims.hidden, dims.layers, dims.vocab
    encoder_weights = layers * (4 * h * h + 2 * h * ffn)
    cross_keys_values = layers * 2 * h * h
    decoder_weights = layers * (6 * h * h + 2 * h * ffn) + h * vocab  # self attention, cross q/o, MLP, LM head
    for r in by(run["records"], section="train", family="bart", status="ok"):
        src, tgt = r["seq"], r["tgt_len"]
        assert (src, tgt) == (32, 16)
        attention = 4 * h * layers * (src * src + 0.5 * tgt * tgt + tgt * src)
        expected = 6 * ((encoder_weights + cross_keys_values) * src + decoder_weights * tgt) + 3 * attention
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


def test_variant_runs_get_their_own_tables_and_stay_out_of_the_targets():
    """LoRA, packed or deeper runs appended to one results file must not replace or judge the default ones."""
    report = load_script("bench_report")
    base = {"section": "train", "batch": 1, "seq": 8192, "status": "ok", "dtype": "bfloat16", "family": "llama"}
    records = [
        {**base, "impl": "stock:sdpa", "step_ms": 190.0, "peak_mem_mb": 8000.0},
        {**base, "impl": "ours:auto", "step_ms": 200.0, "peak_mem_mb": 8000.0},
        {**base, "impl": "ours:auto", "step_ms": 100.0, "peak_mem_mb": 3000.0, "lora": "q_proj,v_proj"},
        {**base, "impl": "ours:auto", "step_ms": 90.0, "peak_mem_mb": 3000.0, "train_mask": "packed"},
        {**base, "impl": "ours:auto", "step_ms": 80.0, "peak_mem_mb": 3000.0, "layers": 4},
    ]
    current = report.latest(records)
    assert len(current) == 5
    assert [report.variant(r) for r in current[2:]] == [(("lora", "q_proj,v_proj"),), (("train_mask", "packed"),),
                                                        (("layers", 4),)]
    assert report.variant({**base, "qwen_shape": "llama"}) == ()  # shapes Qwen only
    assert report.variant({**base, "family": "qwen", "qwen_shape": "llama"}) == (("qwen_shape", "llama"),)
    llama = next(row for row in report.target_rows(current, 8192) if row[0].startswith("llama"))
    assert llama[1].startswith("0.950× its speed") and llama[2] == "no"  # 190 / 200: the default run only
    markdown = report.train_tables(current)
    assert "#### train: llama, batch 1, lora q_proj,v_proj" in markdown
    assert "#### train: llama, batch 1, train mask packed" in markdown
    assert all(f"{ms}.0 ms" in markdown for ms in (200, 100, 90, 80)) and "#### train: llama, batch 1, layers 4" in markdown


def test_compare_and_infer_records_name_their_options(cpu_bench, monkeypatch):
    """A compare run with --optimizer/--train-mask/--layers is not the default step: its records must say so."""
    compare, infer = bench_module("compare"), bench_module("infer")
    cpu_bench.args.optimizer, cpu_bench.args.layers, cpu_bench.args.seq = "adamw", 3, [16]
    seen = []
    monkeypatch.setattr(compare, "run_train_family", lambda *args, **kwargs: seen.append(kwargs["extra_record"]))
    compare.run_compare(cpu_bench)
    assert seen == [{"optimizer": "adamw", "layers": 3}] * 2
    cpu_bench.args.family, cpu_bench.args.batch, cpu_bench.args.new_tokens = ["gpt2"], [1], 2
    cpu_bench.dims = bench_module("models").family_dims(True, None, 3)
    infer.run_infer(cpu_bench)
    records = cpu_bench.rec.run_records
    assert records and all(r["layers"] == 3 and r["section"] == "infer" for r in records)


def test_unknown_impl_names_are_refused(tmp_path, capsys):
    cli = bench_module("cli")
    for bad in ("foo", "ours:auto+compil", "torch:sdpa-flashy"):
        with pytest.raises(SystemExit) as stop:
            cli.parse_args(["--device", "cpu", "--impl", f"ours:auto,{bad}"])
        assert stop.value.code == 2 and f"impl '{bad}'" in capsys.readouterr().err
    for good in ("core", "direct", "torch:sdpa-cudnn", "ours:eager+lightsoftmax", "stock:sdpa+liger", "base:auto"):
        assert cli.parse_args(["--device", "cpu", "--impl", good]).impl == [good]
    threads = torch.get_num_threads()
    try:
        argv = ["--device", "cpu", "--quick", "--section", "train", "--family", "gpt2", "--impl", "ours:nonesuch"]
        assert cli.main(argv + ["--out", str(tmp_path)]) == 1
    finally:
        torch.set_num_threads(threads)
    assert "no configuration ran: --impl ours:nonesuch" in capsys.readouterr().out


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


# ----------------------------------------------------------------------------------------------
# The parts of the bench package that run without a GPU: impl names, sizes, MFU, Liger, compile
# ----------------------------------------------------------------------------------------------


def bench_module(name: str):
    """A module of the scripts/bench package, imported as benchmark.py imports it."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(f"bench.{name}")


@pytest.fixture
def cpu_bench(tmp_path):
    cli, core = bench_module("cli"), bench_module("core")
    args = cli.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    return core.Bench(args, core.Recorder(tmp_path, {"device": "cpu"}, resume=False))


def test_benchmark_py_is_the_entry_point_of_the_package():
    assert len((SCRIPTS / "benchmark.py").read_text().splitlines()) < 40
    assert all(len(path.read_text().splitlines()) <= 900 for path in (SCRIPTS / "bench").glob("*.py"))
    args = load_script("benchmark").parse_args(["--device", "cpu", "--section", "all", "--vocab", "151936"])
    assert args.section == ["train", "infer", "kernel", "light", "compare", "padded"] and args.vocab == 151936


def test_impl_names_parse_into_attention_and_modifiers():
    impls = bench_module("impls")
    assert impls.parse_impl("stock:sdpa") == impls.Impl("stock", "sdpa")
    assert impls.parse_impl("stock:sdpa+liger") == impls.Impl("stock", "sdpa", liger=True)
    assert impls.parse_impl("ours:chunked+compile") == impls.Impl("ours", "chunked", compile=True)
    assert impls.parse_impl("stock:eager+liger+compile") == impls.Impl("stock", "eager", True, True)
    base = impls.parse_impl("base:auto+compile")
    assert base == impls.Impl("base", "auto", compile=True) and base.ours
    assert impls.parse_impl("stock:sdpa+cudagraphs") == impls.Impl("stock", "sdpa", cudagraphs=True)
    for bad, message in (
        ("ours:auto+compile+cudagraphs", "name one of"),
        ("sdpa", "expected stock:"),
        ("mine:sdpa", "expected stock:"),
        ("ours:", "expected stock:"),
        ("ours:auto+compil", "modifiers are"),
        ("ours:auto+compile+compile", "at most once"),
        ("ours:auto+liger", "stock transformers classes only"),
        ("base:auto+liger", "stock transformers classes only"),
    ):
        with pytest.raises(ValueError, match=message):
            impls.parse_impl(bad)


def test_config_kwargs_give_each_stock_family_its_sizes():
    import transformers

    models = bench_module("models")
    dims = models.family_dims(tiny=True, vocab=1000)
    assert {d.vocab for d in dims.values()} == {1000} and dims["llama"].hidden == models.TINY_DIMS["llama"].hidden
    for family, config_class in models.STOCK_CONFIG.items():
        d = dims[family]
        config = getattr(transformers, config_class)(**models.config_kwargs(family, d, 2048, 0.1, torch.float32))
        layers = config.encoder_layers if family == "bart" else config.num_hidden_layers
        heads = config.encoder_attention_heads if family == "bart" else config.num_attention_heads
        assert (config.vocab_size, config.hidden_size, layers, heads) == (1000, d.hidden, d.layers, d.heads), family


def test_qwen_at_the_llama_shape_has_the_llama_shaped_models_weights():
    """--qwen-shape llama: our Qwen file at the LLaMA-shaped sizes, the same matmul weights as LLaMA's."""
    models = bench_module("models")
    dims = models.family_dims(tiny=True, vocab=1000, qwen_shape="llama")
    assert dims["qwen"].layers == dims["llama"].layers and dims["qwen"].hidden == dims["llama"].hidden
    assert models.family_dims(tiny=True)["qwen"] == models.TINY_DIMS["qwen"]
    factory = models.ModelFactory(torch.device("cpu"), flex_static_shapes=2)
    built = {}
    for family in ("llama", "qwen"):
        kwargs = models.config_kwargs(family, dims[family], 256, 0.0, torch.float32)
        built[family] = factory.build(family, "ours:auto", kwargs, torch.float32)
    llama_mlp = built["llama"].model.layers[0].mlp
    qwen_mlp = built["qwen"].transformer.h[0].mlp
    assert qwen_mlp.w1.weight.shape == llama_mlp.up_proj.weight.shape
    assert qwen_mlp.c_proj.weight.shape == llama_mlp.down_proj.weight.shape
    counts = {family: models.matmul_weights(model, family) for family, model in built.items()}
    assert sum(counts["qwen"].values()) == sum(counts["llama"].values()) > 0


def test_select_impls_adds_the_variants_asked_for(cpu_bench, capsys):
    train = bench_module("train")
    cpu_bench.args.impl = ["stock:sdpa", "ours:auto+compile", "stock:sdpa+liger", "ours:nonesuch+compile", "base:sdpa"]
    impls = train.train_impls(cpu_bench, "llama")
    assert impls == ["stock:sdpa", "ours:auto+compile", "stock:sdpa+liger", "base:sdpa"]  # base mirrors ours:sdpa
    assert "impl ours:nonesuch+compile does not run here" in capsys.readouterr().out
    cpu_bench.args.impl = None
    defaults = train.train_impls(cpu_bench, "llama")
    assert "ours:auto" in defaults and not any("+compile" in i for i in defaults)  # compile: CUDA default only


def test_mfu_counts_6nt_plus_attention_against_the_device_peak():
    """The LLaMA-shaped model of issue 15 at 8k tokens and Qwen-7B's vocabulary, counted by hand."""
    import transformers

    core, models = bench_module("core"), bench_module("models")
    assert core.peak_bf16_tflops("NVIDIA H200") == core.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    d = models.family_dims(tiny=False, vocab=151936)["llama"]
    config = transformers.LlamaConfig(**models.config_kwargs("llama", d, 8192, 0.0, torch.bfloat16))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    h, i, layers, seq = d.hidden, d.intermediate, d.layers, 8192
    weights = layers * (4 * h * h + 3 * h * i) + h * d.vocab  # q, k, v, o; gate, up, down; LM head
    attention = 4 * h * layers * seq * seq / 2  # causal: half the scores
    flops = models.training_flops(model, "llama", 1, seq, None)
    assert flops == pytest.approx(6 * weights * seq + 3 * attention, rel=1e-12)
    step_ms = 100.0
    assert models.model_flops_utilisation(flops, step_ms, 989.0) == pytest.approx(flops / 0.1 / 989e12, rel=1e-12)
    assert models.model_flops_utilisation(flops, step_ms, None) is None


def test_missing_liger_gives_a_clear_unsupported_record(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel raises ImportError
    impls, core = bench_module("impls"), bench_module("core")
    with pytest.raises(ImportError, match="pip install liger-kernel") as missing:
        impls.apply_liger("llama")
    with pytest.raises(ValueError, match="no patcher for bloom") as no_patcher:
        impls.apply_liger("bloom")
    assert core.classify(missing.value) == core.classify(no_patcher.value) == "unsupported"
    argv = ["--device", "cpu", "--quick", "--section", "train", "--family", "llama", "--seq", "32", "--batch", "1"]
    argv += ["--impl", "stock:sdpa,stock:sdpa+liger", "--vocab", "512", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert load_script("benchmark").main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    sdpa, liger = (by(records, section="train", impl=impl)[0] for impl in ("stock:sdpa", "stock:sdpa+liger"))
    assert liger["status"] == "unsupported" and "pip install liger-kernel" in liger["error"]
    assert sdpa["status"] == "ok" and sdpa["vocab"] == 512 and abs(sdpa["loss"] - math.log(512)) < 1.5
    assert "vocabulary" not in (tmp_path / "results.md").read_text()  # one vocabulary: no vocabulary titles



@pytest.mark.parametrize("train_mask", ["ones", "packed"])
def test_train_mask_hands_every_step_the_collators_inputs(tmp_path, monkeypatch, train_mask):
    """``ones``: the Trainer's all-ones attention mask; ``packed``: DataCollatorWithFlattening's position ids
    (restarting per document, no mask) and labels (-100 at document starts). Both models see the same inputs
    and, with the same weights (seeded), get the same loss."""
    train = bench_module("train")
    seen, original = [], train.train_step_fn
    monkeypatch.setattr(train, "train_step_fn", lambda model, inputs, opt: seen.append(inputs) or original(model, inputs, opt))
    argv = ["--device", "cpu", "--quick", "--section", "train", "--family", "llama", "--seq", "64", "--batch", "2"]
    argv += ["--impl", "stock:sdpa,ours:auto", "--vocab", "512", "--train-mask", train_mask, "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert load_script("benchmark").main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    records = by([json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()], section="train")
    assert len(records) == 2 and all(r["status"] == "ok" and r["train_mask"] == train_mask for r in records)
    assert len(seen) == 2 and torch.equal(seen[0]["input_ids"], seen[1]["input_ids"])
    for inputs in seen:
        assert inputs["input_ids"].shape == (2, 64)
        if train_mask == "ones":
            assert torch.equal(inputs["attention_mask"], torch.ones(2, 64, dtype=torch.long))
            continue
        positions = inputs["position_ids"]
        starts = positions == 0
        assert "attention_mask" not in inputs and positions.shape == (2, 64) and torch.all(starts[:, 0])
        assert 2 < starts.sum() <= 2 * 16 and torch.all(positions[:, 1:][~starts[:, 1:]] == positions[:, :-1][~starts[:, 1:]] + 1)
        assert torch.equal(inputs["labels"] == -100, starts)
    assert abs(records[0]["loss"] - records[1]["loss"]) < 1e-4


def test_train_mask_packed_refuses_families_without_position_ids(capsys):
    argv = ["--device", "cpu", "--quick", "--section", "train", "--family", "llama,bloom", "--train-mask", "packed"]
    with pytest.raises(SystemExit):
        bench_module("cli").parse_args(argv)
    assert "bloom do not take" in capsys.readouterr().err

def test_lora_wraps_every_model_in_peft_and_reports_no_mfu(tmp_path):
    """--lora / --modules-to-save: stock and ours are the same PEFT model (same loss), named in the records."""
    pytest.importorskip("peft", reason="peft is in the test extra")
    argv = ["--device", "cpu", "--quick", "--section", "train", "--family", "llama", "--seq", "48", "--batch", "1"]
    argv += ["--impl", "stock:sdpa,ours:auto", "--lora", "q_proj,v_proj", "--modules-to-save", "lm_head"]
    threads = torch.get_num_threads()
    try:
        assert load_script("benchmark").main(argv + ["--out", str(tmp_path / "lora")]) == 0
        assert load_script("benchmark").main(argv[:-4] + ["--out", str(tmp_path / "plain")]) == 0
    finally:
        torch.set_num_threads(threads)
    records, plain = (
        by([json.loads(line) for line in (tmp_path / run / "results.jsonl").read_text().splitlines()], section="train")
        for run in ("lora", "plain")
    )
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert all(r["lora"] == "q_proj,v_proj,save:lm_head" and r["mfu"] is None and r["flops"] is None for r in records)
    assert abs(records[0]["loss"] - records[1]["loss"]) < 1e-4
    head = 256 * 64  # the tiny LLaMA's vocab x hidden: modules_to_save's trainable copy of lm_head, plus the adapters
    assert all(r["n_params"] > p["n_params"] + head and "lora" not in p for r, p in zip(records, plain, strict=True))
    with pytest.raises(SystemExit):
        bench_module("cli").parse_args(["--device", "cpu", "--modules-to-save", "lm_head"])


def test_loss_chunk_size_reaches_our_models_config(cpu_bench):
    models = bench_module("models")
    kwargs = models.config_kwargs("llama", models.TINY_DIMS["llama"], 64, 0.0, torch.float32)
    cpu_bench.factory.loss_chunk_size = 16
    assert cpu_bench.factory.build("llama", "ours:auto", kwargs, torch.float32).config.loss_chunk_size == 16


def test_liger_patches_the_stock_class_until_its_model_is_dropped(cpu_bench, monkeypatch):
    """A stand-in for liger_kernel.transformers that patches the way Liger does (module attributes and the
    CausalLM forward): the model built with +liger uses the patch, and stock is stock again afterwards."""
    import types

    from transformers.models.llama import modeling_llama

    original_norm, original_forward = modeling_llama.LlamaRMSNorm, modeling_llama.LlamaForCausalLM.forward

    class PatchedNorm(original_norm):
        pass

    def apply_liger_kernel_to_llama():
        modeling_llama.LlamaRMSNorm = PatchedNorm
        modeling_llama.LlamaForCausalLM.forward = lambda self, *a, **k: original_forward(self, *a, **k)

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    models = bench_module("models")
    kwargs = models.config_kwargs("llama", models.TINY_DIMS["llama"], 64, 0.0, torch.float32)
    patched = cpu_bench.factory.build("llama", "stock:sdpa+liger", kwargs, torch.float32)
    assert isinstance(patched.model.norm, PatchedNorm)
    assert modeling_llama.LlamaForCausalLM.forward is not original_forward
    del patched
    cpu_bench.factory.release()
    assert modeling_llama.LlamaRMSNorm is original_norm and modeling_llama.LlamaForCausalLM.forward is original_forward
    stock = cpu_bench.factory.build("llama", "stock:sdpa", kwargs, torch.float32)
    assert type(stock.model.norm) is original_norm


def test_compile_impls_compile_the_model(cpu_bench):
    models = bench_module("models")
    kwargs = models.config_kwargs("gpt2", models.TINY_DIMS["gpt2"], 64, 0.0, torch.float32)
    plain = cpu_bench.factory.build("gpt2", "ours:auto", kwargs, torch.float32)
    compiled = cpu_bench.factory.build("gpt2", "ours:auto+compile", kwargs, torch.float32)
    assert plain._compiled_call_impl is None and compiled._compiled_call_impl is not None
    assert type(compiled).__module__.startswith("transformers_modules")


def test_cudagraphs_impls_compile_in_reduce_overhead_mode(cpu_bench, monkeypatch):
    models = bench_module("models")
    kwargs = models.config_kwargs("gpt2", models.TINY_DIMS["gpt2"], 64, 0.0, torch.float32)
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: modes.append(options))
    for impl in ("ours:auto+cudagraphs", "stock:sdpa+cudagraphs", "ours:auto+compile", "ours:auto"):
        cpu_bench.factory.build("gpt2", impl, kwargs, torch.float32)
    assert modes == [{"mode": "reduce-overhead"}, {"mode": "reduce-overhead"}, {}]


def test_a_failed_build_is_recorded_for_every_size(cpu_bench):
    core = bench_module("core")

    def build():
        raise RuntimeError("the model cannot be built here")

    sweep = core.ImplSweep(cpu_bench, build)
    for seq in (32, 64):
        record = core.config_record("train", "llama", "ours:auto", seq, 1, torch.float32)
        sweep.run(record, seq, 1, measure=lambda model: pytest.fail("measured without a model"), cost_ms=len)
    sweep.close()
    first, second = cpu_bench.rec.run_records
    assert first["status"] == second["status"] == "error" and "model build: RuntimeError" in first["error"]
    assert second.get("implied") and not first.get("implied") and (first["seq"], second["seq"]) == (32, 64)


def test_train_tables_split_by_vocabulary_when_a_family_has_two():
    report = load_script("bench_report")
    base = {"section": "train", "family": "llama", "impl": "ours:auto", "batch": 1, "seq": 8192, "status": "ok"}
    records = [
        {**base, "vocab": 32000, "step_ms": 76.0, "peak_mem_mb": 9000.0, "tokens_per_s": 107789.5},
        {**base, "vocab": 151936, "step_ms": 106.0, "peak_mem_mb": 22000.0, "tokens_per_s": 77283.0},
    ]
    tables = report.train_tables(report.latest(records))
    small, large = tables.split("#### train: llama, batch 1, vocabulary 151,936")
    assert "#### train: llama, batch 1, vocabulary 32,000" in small and "76.0 ms" in small and "106.0" not in small
    assert "106.0 ms · 21.48 GB · 77.3k tok/s" in large


def test_plots_split_by_vocabulary_when_a_family_has_two(tmp_path):
    pytest.importorskip("matplotlib")  # the `bench` extra
    plot = load_script("plot_benchmarks")
    base = {"section": "train", "family": "llama", "batch": 1, "status": "ok", "dtype": "bfloat16"}
    records = [
        {**base, "impl": impl, "seq": seq, "vocab": vocab, "step_ms": 50.0 + seq / 1e3, "peak_mem_mb": 9000.0}
        for impl in ("stock:sdpa", "stock:sdpa+liger", "ours:auto+compile")
        for seq in (4096, 8192)
        for vocab in (32000, 151936)
    ]
    written = {path.name for path in plot.plot_train(records, tmp_path)}
    assert written == {"train_llama_vocab32000.png", "train_llama_vocab151936.png"}
    one = [r for r in records if r["vocab"] == 32000]
    (tmp_path / "one").mkdir()
    assert {path.name for path in plot.plot_train(one, tmp_path / "one")} == {"train_llama.png"}


def test_targets_are_judged_at_the_default_vocabulary():
    report = load_script("bench_report")
    base = {"section": "train", "family": "llama", "batch": 1, "seq": 8192, "status": "ok", "peak_mem_mb": 9000.0}
    records = [
        {**base, "impl": "stock:sdpa", "vocab": 32000, "step_ms": 60.0},
        {**base, "impl": "ours:auto", "vocab": 151936, "step_ms": 100.0},  # another vocabulary: not comparable
        {**base, "impl": "ours:auto", "vocab": 32000, "step_ms": 50.0},
    ]
    (row,) = report.target_rows(report.latest(records), 8192)
    assert row[1].startswith("1.200× its speed") and row[2] == "yes"


def test_static_cache_infer_times_compiled_generate_decoding(cpu_bench, monkeypatch):
    """--static-cache: decoding through ``generate(cache_implementation="static")`` (compiled by transformers on
    CUDA), exactly ``new_tokens`` tokens, for stock and our classes alike; the prefill-only call is subtracted."""
    infer, models = bench_module("infer"), bench_module("models")
    cpu_bench.args.static_cache = True
    kwargs = models.config_kwargs("gpt2", models.TINY_DIMS["gpt2"], 64, 0.0, torch.float32)
    for impl in ("stock:sdpa", "ours:auto"):
        model = cpu_bench.factory.build("gpt2", impl, kwargs, torch.float32)
        calls = []
        real_generate = model.generate

        def spy(*args, **options):
            output = real_generate(*args, **options)
            calls.append((options["cache_implementation"], options["max_new_tokens"], output.shape[1]))
            return output

        monkeypatch.setattr(model, "generate", spy)
        result = infer.measure_infer(cpu_bench, model, "gpt2", batch=1, seq=12, vocab=256, new_tokens=5)
        assert {cache for cache, _, _ in calls} == {"static"}
        assert {(new, length) for _, new, length in calls} == {(5, 17), (1, 13)}
        assert result["decode_ms"] == pytest.approx(result["generate_ms"] - result["prefill_ms"])
        assert result["decode_tokens_per_s"] == pytest.approx(4 / (result["decode_ms"] / 1e3))


def test_base_impls_load_our_files_from_the_baseline_folder(cpu_bench, tmp_path):
    """base:<backend> builds the same family from another modeling/ folder (e.g. an earlier commit's)."""
    import shutil

    models = bench_module("models")
    baseline = tmp_path / "baseline_modeling"
    shutil.copytree(SCRIPTS.parent / "modeling", baseline)
    with open(baseline / "modeling_gpt2.py", "a", encoding="utf-8") as handle:
        handle.write("\nBASELINE_MARKER = 'the baseline copy'\n")
    kwargs = models.config_kwargs("gpt2", models.TINY_DIMS["gpt2"], 64, 0.0, torch.float32)
    with pytest.raises(ValueError, match="--baseline-modeling"):
        cpu_bench.factory.build("gpt2", "base:auto", kwargs, torch.float32)
    cpu_bench.factory.baseline_modeling = baseline
    base = cpu_bench.factory.build("gpt2", "base:auto", kwargs, torch.float32)
    ours = cpu_bench.factory.build("gpt2", "ours:auto", kwargs, torch.float32)
    assert getattr(sys.modules[type(base).__module__], "BASELINE_MARKER", None) == "the baseline copy"
    assert not hasattr(sys.modules[type(ours).__module__], "BASELINE_MARKER")
    assert type(base).__module__ != type(ours).__module__


def test_fused_ops_report_gives_ratios_against_liger_and_base(tmp_path):
    report = load_script("fused_ops_report")

    def record(impl, step_ms, peak_mb, family="llama"):
        return {"section": "train", "status": "ok", "family": family, "vocab": 32000, "seq": 8192, "impl": impl,
                "step_ms": step_ms, "peak_mem_mb": peak_mb, "mfu": 0.5}

    results = tmp_path / "results.jsonl"
    rows = [record("stock:sdpa+liger", 60.0, 5000.0), record("ours:auto", 57.0, 4500.0),
            record("base:auto", 80.0, 9000.0, "gpt2"), record("ours:auto", 60.0, 4500.0, "gpt2"),
            {**record("ours:auto", 1.0, 1.0), "status": "oom"}]
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = tmp_path / "summary.txt"
    summary.write_text("# printed\nbloom 32000 base:auto ok 70.0 8.0 0.44\nbloom 32000 ours:auto ok 63.0 4.0 0.49\n")
    assert report.main([str(results), "--summary", str(summary), "--out", str(tmp_path / "table"), "--no-plot"]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| llama 8k | 32,000 | ours | 57.0 ms | 4.39 GiB | 50.0% | 0.95x time, 0.90x memory | - |" in table
    assert "| gpt2 8k | 32,000 | ours | 60.0 ms | 4.39 GiB | 50.0% | - | 0.75x time, 0.50x memory |" in table
    assert "| bloom 8k | 32,000 | ours | 63.0 ms | 4.00 GiB | 49.0% | - | 0.90x time, 0.50x memory |" in table
    assert table.index("| llama") < table.index("| gpt2") < table.index("| bloom")  # the family order


def test_fused_ops_report_sets_like_runs_against_each_other(tmp_path):
    """Qwen at the LLaMA shape, LoRA or batch 2 runs are other models: each gets its own rows and ratios."""
    report = load_script("fused_ops_report")
    base = {"section": "train", "status": "ok", "family": "qwen", "vocab": 151936, "seq": 8192, "batch": 1,
            "mfu": 0.5}
    rows = [{**base, "impl": "base:auto", "step_ms": 200.0, "peak_mem_mb": 8192.0},
            {**base, "impl": "ours:auto", "step_ms": 100.0, "peak_mem_mb": 4096.0},
            {**base, "impl": "base:auto", "step_ms": 50.0, "peak_mem_mb": 2048.0, "qwen_shape": "llama"},
            {**base, "impl": "ours:auto", "step_ms": 40.0, "peak_mem_mb": 1024.0, "qwen_shape": "llama"},
            {**base, "impl": "ours:auto", "step_ms": 80.0, "peak_mem_mb": 2048.0, "batch": 2}]
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report.main([str(results), "--out", str(tmp_path / "table"), "--no-plot"]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| qwen 8k | 151,936 | ours | 100.0 ms | 4.00 GiB | 50.0% | - | 0.50x time, 0.50x memory |" in table
    assert "| qwen 8k qwen shape llama | 151,936 | ours | 40.0 ms | 1.00 GiB | 50.0% | - | 0.80x time, 0.50x memory |" in table
    assert "| qwen 8k batch 2 | 151,936 | ours | 80.0 ms | 2.00 GiB | 50.0% | - | - |" in table


def test_packed_rows_count_attention_flops_per_document():
    """``--train-mask packed``: documents attend only to themselves, so A is Σ length² over the row's documents."""
    models = bench_module("models")
    rows = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    assert models.packed_attention_share(rows) == pytest.approx(((9 + 4) / 25 + 1.0) / 2)
