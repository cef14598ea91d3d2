"""Importing the package is cheap: the patching API and transformers' modeling stack load only when used,
and our attention implementations still reach transformers' registry before any model reads them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("memory_efficient_adapter.patch", "transformers.modeling_utils", "transformers.masking_utils")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_the_package_loads_no_heavy_module():
    out = run_python(f"""
        import sys
        import memory_efficient_adapter as mea
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        print(callable(mea.attention), mea.attention.__module__)
    """)
    loaded, function = out.splitlines()
    assert loaded == "[]", f"the package import loaded {loaded}"
    assert function == "True memory_efficient_adapter.attention", "mea.attention is the function"


def test_the_registry_gets_our_names_whichever_is_imported_first():
    for order in ("import memory_efficient_adapter\nimport transformers.modeling_utils",
                  "import transformers.modeling_utils\nimport memory_efficient_adapter"):
        out = run_python(order + """
from transformers import AttentionInterface
print(sorted(name for name in AttentionInterface._global_mapping if name.startswith("mea")))
""")
        assert "'mea'" in out and "'mea_chunked'" in out, (order, out)


def test_the_patching_api_loads_on_first_use():
    out = run_python("""
        import sys
        import memory_efficient_adapter as mea
        patch = mea.apply_attention_patch
        print(patch.__module__, "memory_efficient_adapter.patch" in sys.modules, "apply_attention_patch" in dir(mea))
    """)
    assert out.split() == ["memory_efficient_adapter.patch", "True", "True"]
