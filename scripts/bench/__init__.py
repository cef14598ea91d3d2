"""Memory and speed of our modeling files against stock transformers, and of the kernel layer's backends.

One script, split into sections that each fit in a few minutes of GPU time:

    train    training step (forward + backward of the model's loss) per family: peak allocated memory,
             step time, tokens/s and model FLOP utilisation at 1k .. 32k tokens (batch 1) until OOM, for
             stock transformers with each attn_implementation the class takes and ours with every backend;
             on CUDA also stock:sdpa+compile and ours:auto+compile (model.compile()), and stock:sdpa+liger
             (Liger-Kernel's patcher; LLaMA, where liger_kernel is installed). --vocab sets the vocabulary
    infer    prefill latency and decode tokens/s with the KV cache (batch 1 and 16, prompts 1k and 2k)
    kernel   forward and forward+backward TFLOP/s of each kernel-layer backend against the kernel called
             directly (SDPA, compiled FlexAttention ...), causal and ALiBi, head dims 64 and 128, and our
             dispatch overhead
    light    the Light Attention table: GPT-2 small (12 x 768), batch 4 x 1024 tokens, fp32, dropout 0.1,
             training mode: max memory allocated of stock eager, our eager with/without light softmax and
             fused dropout-matmul, and our fused path
    compare  BLOOM (ours, auto) against a LLaMA of the same size on stock sdpa, and against stock BLOOM, at
             8k tokens: issue 4's targets

Every measurement is one JSON line appended to ``<out>/results.jsonl`` (safe to append several runs to one
file; a later record with the same key wins); ``<out>/results.md`` is rewritten from that file after each
family/section, and ``<out>/log.txt`` holds the progress and any tracebacks. PNG plots and the tables under
docs/benchmarks/ come from ``scripts/plot_benchmarks.py``. A failing configuration records its error (OOM,
unsupported, error, timeout) and the run goes on; a run stops starting new configurations once
``--budget-s`` is spent (they are recorded as skipped), and ``--resume`` skips what is already recorded.
``--profile`` adds a torch.profiler table per configuration (``<out>/profile-*.txt``) with the device's busy
time, which tells a host-bound step (small sizes, decoding) from a kernel-bound one. Our flex backend gets a
static-shape kernel for every size of a sweep, as a run at one fixed size does (see set_flex_static_shapes).

Examples (GPU):

    python scripts/benchmark.py --section kernel --out $OUT/bench
    python scripts/benchmark.py --section train --family llama --out $OUT/bench
    python scripts/benchmark.py --section light,compare --out $OUT/bench
    python scripts/benchmark.py --section train --family llama --seq 8k --vocab 151936 \
        --impl stock:sdpa,stock:sdpa+liger,ours:auto,ours:auto+compile --out $OUT/bench

CPU smoke run (tiny models, float32): ``python scripts/benchmark.py --device cpu --quick --out /tmp/bench``.
The FLOP formulas are in ``scripts/bench_report.py`` (FLOP_FORMULAS) and in every results.md.

The package: ``models`` (sizes, configs, stock and our models, FLOP counts), ``impls`` (impl names:
``stock:<attn>[+liger][+compile]``, ``ours:<backend>[+compile]``), ``core`` (recording, timing, memory,
budget, one configuration run whatever happens), ``profiling``, a module per section, and ``cli``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

# before torch and transformers are imported by any module of the package
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_MODULES_CACHE" not in os.environ:  # a module cache of this run only, removed when it ends
    _MODULES_CACHE = tempfile.TemporaryDirectory(prefix="mea-bench-modules-")
    os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE.name

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
ROOT = SCRIPTS_DIR.parent
MODELING_DIR = ROOT / "modeling"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))  # bench_report, shared with plot_benchmarks.py


def module_from_file(name: str, path: Path):
    """A module of modeling/ loaded from its file: the benchmark runs where the package is not installed."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
