#!/usr/bin/env bash
# The compatibility matrix: the kernel-layer and model tests on the older transformers releases we support
# (4.57.x, 5.0.x) and on the oldest torch we support (2.9), each in a virtual environment layered over the
# *active* Python environment (a virtualenv, a conda env or a system Python): same test tools, same install of
# this package; only the one package (and what it pins) differs.
#   bash scripts/compat.sh [VERSION ...]      (default: 4.57.6 5.0.0 torch==2.9.1; a bare VERSION is transformers')
#   bash scripts/compat.sh --prepare [VERSION ...]  (only build the environments: CI downloads torch meanwhile)
#   bash scripts/compat.sh --env-only DIR     (only make DIR such an environment, without pip; for the tests)
#
# `python -m venv --system-site-packages` would layer the environment over the base interpreter, which inside
# a virtualenv or conda env is not where torch is installed. Instead each environment gets a .pth file that
# adds the active environment's site directories (processing their own .pth files, so an editable install of
# this package is seen too), after its own site-packages, so that its own transformers or torch comes first.
# torch from PyPI is a CUDA build (about 3 GB with its NVIDIA libraries); it runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
prepare_only=false
if [ "${1:-}" = "--prepare" ]; then
    prepare_only=true
    shift
fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.57.6 5.0.0 torch==2.9.1)
tests=(tests/test_attention.py tests/test_attention_edges.py tests/test_backend_selection.py
       tests/test_attention_gpu.py tests/test_llama.py tests/test_gpt2.py tests/test_bloom.py tests/test_bart.py
       tests/test_qwen.py tests/test_qwen_cache.py tests/test_stock_behaviour.py tests/test_trainer_loss.py
       tests/test_tracing.py tests/test_user_tools.py tests/test_patch.py tests/test_patch_state.py
       tests/test_training_with_caches.py tests/test_weight_init.py
       tests/test_torch_modes.py)
# On the oldest torch: the kernel layer, compiled and exported models, and what reaches torch's less stable
# corners (torch.func, autocast's weight cache, saved-tensor hooks, context parallel).
torch_tests=(tests/test_attention.py tests/test_attention_edges.py tests/test_tracing.py tests/test_llama.py
             tests/test_gpt2.py tests/test_bloom.py tests/test_torch_modes.py tests/test_function_transforms.py
             tests/test_fused_ops_settings.py tests/test_bad_inputs.py tests/test_norm_recompute.py
             tests/test_gradient_observers.py)

# One line of Python for the .pth file: site.addsitedir() for every site directory of the active environment.
layer_line=$("$python" - <<'EOF'
import site, sys, sysconfig
dirs = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
dirs += [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dict.fromkeys(dirs)))
EOF
)

# make_layered_env DIR [venv options]: a virtual environment at DIR that sees the active environment.
make_layered_env() {
    local venv=$1
    shift
    [ -x "$venv/bin/python" ] || "$python" -m venv "$@" "$venv"
    local site_dir
    site_dir=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    printf '%s\n' "$layer_line" > "$site_dir/_mea_active_environment.pth"
}

if [ "${1:-}" = "--env-only" ]; then
    make_layered_env "$2" --without-pip
    exit 0
fi

active_torch=$("$python" -c "import torch; print(torch.__version__)")
active_transformers=$("$python" -c "import transformers; print(transformers.__version__)")
active_prefix=$("$python" -c 'import sys; print(sys.prefix)')

# package_of VERSION / number_of VERSION: "torch==2.9.1" -> torch / 2.9.1; a bare "4.57.6" is transformers'.
package_of() { [[ $1 == *==* ]] && echo "${1%%==*}" || echo transformers; }
number_of() { echo "${1#*==}"; }

for version in "${versions[@]}"; do
    package=$(package_of "$version") number=$(number_of "$version")
    venv="${TMPDIR:-/tmp}/mea-$package-$number"
    make_layered_env "$venv"
    "$venv/bin/python" -m pip install -q "$package==$number"
    # Fail loudly, before the tests, if the environment does not see the active one.
    seen=$("$venv/bin/python" -c "import torch, transformers, pytest, memory_efficient_adapter; print(torch.__version__.split('+')[0], transformers.__version__)") || {
        echo "compat.sh: $venv does not see the active environment's torch/pytest/memory_efficient_adapter" >&2
        echo "compat.sh: active interpreter: $("$python" -c 'import sys; print(sys.executable)')" >&2
        exit 1
    }
    expected="${active_torch%%+*} $number"
    [ "$package" = transformers ] || expected="$number $active_transformers"
    if [ "$seen" != "$expected" ]; then
        echo "compat.sh: $venv has torch/transformers '$seen', expected '$expected'" >&2
        exit 1
    fi
done

if $prepare_only; then
    exit 0
fi

# The versions' runs are independent (one thread each: tests/conftest.py), so they run side by side; each
# one's output is printed whole, in order, once they have all finished.
logs=() pids=()
for version in "${versions[@]}"; do
    package=$(package_of "$version") number=$(number_of "$version")
    run_tests=("${tests[@]}")
    [ "$package" = transformers ] || run_tests=("${torch_tests[@]}")
    logs+=("$(mktemp)")
    {
        echo "== $package $number (over $active_prefix: torch $active_torch, transformers $active_transformers) =="
        "${TMPDIR:-/tmp}/mea-$package-$number/bin/python" -m pytest -q -p no:cacheprovider "${run_tests[@]}"
    } > "${logs[-1]}" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    cat "${logs[$i]}"
    rm -f "${logs[$i]}"
done
exit "$status"
