"""Shared pytest set-up: offline Hub, a private module cache, the `gpu` marker, and no demoted backend left behind."""

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _private_folder(prefix: str) -> str:
    """A folder for this test session only, removed when it ends (set before transformers is imported)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = _private_folder("mea-hf-home-")
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = _private_folder("mea-hf-modules-")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """The test models are tiny: intra-op threads only add overhead, and on a busy 2-core runner their
    spinning slows small ops down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _import_scan_once_per_file_content():
    """transformers parses a remote-code file's whole syntax tree at every load to list its imports (about 0.4 s
    for one of our 7,000-line files, over a second per test that loads three models). The list depends only on the
    file's text: each text is scanned once per session, with transformers' own function."""
    from transformers import dynamic_module_utils

    scan = dynamic_module_utils.get_imports
    scanned: dict[str, list] = {}

    def get_imports(filename) -> list:
        digest = hashlib.sha256(Path(filename).read_bytes()).hexdigest()
        if digest not in scanned:
            scanned[digest] = scan(filename)
        return list(scanned[digest])

    dynamic_module_utils.get_imports = get_imports
    yield
    dynamic_module_utils.get_imports = scan


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """Tests start without USE_FLASH_ATTN so that a developer's shell cannot change their result."""
    monkeypatch.delenv("USE_FLASH_ATTN", raising=False)
    torch.manual_seed(0)


def kernel_layers() -> list:
    """Every loaded copy of the kernel layer: the package's module and each remote-code modeling module."""
    return [
        module
        for name, module in list(sys.modules.items())
        # vars(), not getattr(): a lazy module (transformers') would import its submodules to answer
        if module is not None and callable(vars(module).get("demoted_backends")) and "_demoted" in vars(module)
    ]


def demotions() -> list:
    """``(module, backend, signature, reason)`` for every backend some kernel layer's ``auto`` now skips."""
    return [(module.__name__, *entry) for module in kernel_layers() for entry in module.demoted_backends()]


@pytest.fixture(autouse=True)
def _no_backend_left_demoted():
    """A test that leaves a backend demoted would hide a broken kernel from every later test: fail it."""
    yield
    left = demotions()
    for module in kernel_layers():
        module._demoted.clear()
    assert not left, f"the test left attention backends demoted: {left}"
