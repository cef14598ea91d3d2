"""scripts/compat.sh layers its environments over the active Python environment (a virtualenv here), not over
the base interpreter that `--system-site-packages` would use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_venv(folder: Path, *options: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *options, str(folder)], check=True, timeout=120)
    return folder / "bin" / "python"


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def imports(python: Path, *modules: str) -> bool:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", f"import {', '.join(modules)}"], env=environment,
                            capture_output=True, text=True, timeout=120)
    return result.returncode == 0


def test_compat_environments_see_the_active_virtualenv(tmp_path):
    active = make_venv(tmp_path / "active")
    site = site_packages(active)
    (site / "mea_probe_package").mkdir()
    (site / "mea_probe_package" / "__init__.py").write_text("")
    (tmp_path / "editable").mkdir()  # an editable install: a .pth file in the active env points at the source
    (tmp_path / "editable" / "mea_probe_editable.py").write_text("")
    (site / "mea_probe_editable.pth").write_text(str(tmp_path / "editable") + "\n")
    assert imports(active, "mea_probe_package", "mea_probe_editable")

    old_way = make_venv(tmp_path / "system-site", "--system-site-packages")  # what compat.sh used to do
    assert not imports(old_way, "mea_probe_package")

    environment = {**os.environ, "PYTHON": str(active)}
    subprocess.run(["bash", str(ROOT / "scripts" / "compat.sh"), "--env-only", str(tmp_path / "compat")],
                   check=True, env=environment, timeout=120)
    compat = tmp_path / "compat" / "bin" / "python"
    assert imports(compat, "mea_probe_package", "mea_probe_editable")
    (site_packages(compat) / "mea_probe_package").mkdir()  # the compat env's own packages come first
    (site_packages(compat) / "mea_probe_package" / "__init__.py").write_text("WHERE = 'compat'\n")
    out = subprocess.run([str(compat), "-c", "import mea_probe_package as m; print(m.WHERE)"], capture_output=True,
                         text=True, check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.stdout.strip() == "compat"
