#!/usr/bin/env bash
# Run the GPU tests on a CUDA machine that cannot install anything: the package goes on PYTHONPATH.
# With wheels in .whl/ (e.g. an xformers build for another torch) they are installed to /tmp/site first,
# which shows the kernel layer probing a broken backend once, logging it once and skipping it.
#   bash scripts/gpu_tests.sh [pytest args...]     (logs go to $OUT or ./gpu-results)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
pkg=$(mktemp -d)
ln -s "$PWD/modeling" "$pkg/memory_efficient_adapter"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'PY'
import logging, torch, transformers
logging.basicConfig(level=logging.WARNING)
import memory_efficient_adapter as mea
print("torch", torch.__version__, "transformers", transformers.__version__)
print("available backends:", mea.available_backends())
print("asked again (no second warning):", mea.available_backends())
PY
python -m pytest -m gpu -q -rA -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-tests.log" \
    | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|calls checked|max err|rel err"
