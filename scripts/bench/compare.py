"""The compare section: BLOOM against a same-size LLaMA and against stock BLOOM at 8k tokens (issue 4's targets)."""

from __future__ import annotations

import bench_report

from .core import Bench
from .train import run_train_family, select_impls, train_record_fields


def run_compare(bench: Bench) -> None:
    """BLOOM (ours, auto; stock eager) against a same-size LLaMA (stock sdpa; ours auto): issue 4's targets."""
    args = bench.args
    seqs, batches = args.seq_for("compare"), [1]
    plan = [("bloom", ["stock:eager", "ours:auto"]), ("llama", ["stock:sdpa", "ours:auto"])]
    for family, impls in plan:
        impls = select_impls(bench, impls) if args.impl else impls
        bench.rec.say(f"== compare {family}: {', '.join(impls)}")
        run_train_family(
            bench,
            "compare",
            family,
            impls,
            seqs,
            batches,
            bench.dims[family],
            bench.dtype,
            extra_record=train_record_fields(args) or None,
        )
    bench.rec.write_markdown()
    records = bench_report.latest(bench_report.load_records([bench.rec.path]))
    for seq in seqs:
        for target, measured, met in bench_report.target_rows(records, seq):
            bench.rec.say(f"target @ {seq}: {target}: {measured} -> {met}")
