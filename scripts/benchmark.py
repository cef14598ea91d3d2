#!/usr/bin/env python
"""Memory and speed of our modeling files against stock transformers, and of the kernel layer's backends.

The entry point of the ``scripts/bench`` package (its docstring lists the sections, the output files and
examples; ``python scripts/benchmark.py --help`` the flags):

    python scripts/benchmark.py --section train --family llama --out $OUT/bench
    python scripts/benchmark.py --device cpu --quick --out /tmp/bench
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.cli import main, parse_args  # noqa: E402
from bench.models import FULL_DIMS, TINY_DIMS  # noqa: E402

__all__ = ["FULL_DIMS", "TINY_DIMS", "main", "parse_args"]

if __name__ == "__main__":
    gc.freeze()  # what is imported stays: later collections only walk what the benchmark creates
    sys.exit(main())
