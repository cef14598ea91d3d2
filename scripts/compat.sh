#!/usr/bin/env bash
# The transformers compatibility matrix: the kernel-layer and model tests on transformers 4.57.x and 5.0.x,
# each in a virtual environment layered over the current one (same torch, same package install).
#   bash scripts/compat.sh [VERSION ...]      (default: 4.57.6 5.0.0)
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.57.6 5.0.0)
tests=(tests/test_attention.py tests/test_llama.py tests/test_gpt2.py tests/test_bloom.py tests/test_bart.py tests/test_qwen.py
       tests/test_stock_behaviour.py)
for version in "${versions[@]}"; do
    venv="${TMPDIR:-/tmp}/mea-transformers-$version"
    [ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install -q "transformers==$version"
    echo "== transformers $version =="
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
done
