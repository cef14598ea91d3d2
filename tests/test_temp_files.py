"""The test suite leaves nothing in $TMPDIR: checkpoints go to pytest's tmp_path, and the session's private
Hugging Face folders (tests/conftest.py) are removed when it ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tests_that_save_checkpoints_leave_nothing_in_tmpdir(tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in ("HF_HOME", "HF_MODULES_CACHE")}
    environment["TMPDIR"] = str(tmpdir)
    selection = "state_dict_keys_and_saving_back or forced_sdpa_backend or copied_over_a_qwen_snapshot"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'basetemp'}",
         "tests/test_bloom.py", "tests/test_qwen.py", "-k", selection],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "deselected" in result.stdout
    left = sorted(path.name for path in tmpdir.iterdir() if not path.name.startswith("torchinductor_"))
    assert left == [], "torch's own compile cache aside, the tests left these in $TMPDIR"
