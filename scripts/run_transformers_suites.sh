#!/usr/bin/env bash
# transformers' common model tests (ModelTesterMixin, from the transformers sdist on PyPI) on our LLaMA, GPT-2,
# BLOOM and BART classes and on stock's, with the same configs and inputs; prints the counts side by side.
#   bash scripts/run_transformers_suites.sh [VERSION] [PYTEST ARGS...]     (default version: the installed one)
#   MEA_SUITE_IMPLS="ours" MEA_SUITES="GPT2Suite" bash scripts/run_transformers_suites.sh   (a subset)
# The sdist ships the common mixins but not the per-model test files nor the generation/export mixins, so the
# per-family testers are ours (scripts/transformers_suites/test_families.py) and generation tests do not run
# (test_generation_tester_mixin_inheritance, which only checks that a test class has that mixin, is left out).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
version="${1:-$(python -c 'import transformers; print(transformers.__version__)')}"
shift || true
work="${TMPDIR:-/tmp}/mea-transformers-suites-$version"
if [ ! -f "$work/tests/test_modeling_common.py" ]; then
    mkdir -p "$work/sdist"
    python -m pip download -q --no-binary :all: --no-deps "transformers==$version" -d "$work/sdist"
    tar -xzf "$work/sdist/transformers-$version.tar.gz" -C "$work" --strip-components=1 "transformers-$version/tests"
fi
for package in generation exporters; do mkdir -p "$work/tests/$package" && touch "$work/tests/$package/__init__.py"; done
touch "$work/tests/__init__.py"
cp scripts/transformers_suites/stubs.py "$work/tests/generation/test_utils.py"
cp scripts/transformers_suites/stubs.py "$work/tests/exporters/test_export.py"
cp scripts/transformers_suites/test_families.py "$work/tests/test_mea_families.py"
# test_modeling_common.py needs `parameterized`; installed beside the tests, not into the environment
python -c "import parameterized" 2>/dev/null || [ -d "$work/site/parameterized" ] ||
    python -m pip install -q --target "$work/site" parameterized
export PYTHONPATH="$work:$work/site:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for impl in ${MEA_SUITE_IMPLS:-stock ours}; do
    for suite in ${MEA_SUITES:-LlamaSuite GPT2Suite BloomSuite BartSuite}; do
        log="$work/$impl-$suite.log"
        (cd "$work" && MEA_SUITE_IMPL=$impl python -m pytest -q -p no:cacheprovider -p no:randomly \
            -k "not test_generation_tester_mixin_inheritance" "tests/test_mea_families.py::$suite" "$@" \
            > "$log" 2>&1) || true
        echo "$impl $suite: $(tail -n 1 "$log")"
    done
done
echo "logs: $work/*.log (repository: $repo)"
