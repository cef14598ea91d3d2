"""The kernel layer's dispatcher: the auto order, explicit backends that cannot take a call, clear errors for bad
input, USE_FLASH_ATTN, probing of optional packages (once, logged once, also under torch.compile), fallbacks
in auto, backend selection from the config, keep-masks and ALiBi slopes."""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest
import torch
from test_attention import CPU_BACKENDS, kernel_layer, kernel_unavailable, mea, reference_attention


# ----------------------------------------------------------------------------------------------
# Dispatcher: choices, errors, probing, USE_FLASH_ATTN
# ----------------------------------------------------------------------------------------------


def describe(**overrides):
    q = torch.randn(1, 4, 8, 16, requires_grad=overrides.pop("grad", False))
    k = v = torch.randn(1, overrides.pop("kv_heads", 4), 8, 16)
    return kernel_layer._describe(q, k, v, overrides.pop("causal", True), overrides.pop("mask", None),
                                  overrides.pop("slopes", None), overrides.pop("dropout_p", 0.0))


def test_auto_order_on_cpu():
    assert mea.select_backend(describe()) == "sdpa"
    assert mea.select_backend(describe(slopes=torch.rand(4))) == "chunked"
    assert kernel_layer.AUTO_ORDER["cpu"] == ("sdpa", "chunked", "eager")


@pytest.mark.parametrize(
    "backend, call, message",
    [
        ("sdpa", dict(slopes=torch.rand(4)), "ALiBi"),
        ("flex", dict(grad=True), "no backward on CPU"),
        ("flex", dict(dropout_p=0.1), "dropout"),
        ("flash_attn", dict(), "flash_attn"),
        ("xformers", dict(), "xformers"),
        ("nonsense", dict(), "unknown attention backend"),
    ],
)
def test_explicit_backend_that_cannot_take_the_call_raises(backend, call, message):
    with pytest.raises(ValueError, match=message):
        mea.select_backend(describe(**call), backend)


def test_flex_takes_small_heads_on_the_cpu_but_not_on_cuda():
    """CUDA's flex runs Triton templates with no tiles under head_dim 32; the CPU's runs any head size."""
    call = describe()
    assert call.head_dim == 16 and mea.select_backend(call, "flex") == "flex"
    q, k, v = (torch.randn(2, 4, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    actual = kernel_layer.attention(q, k, v, causal=True, backend="flex")
    assert torch.allclose(actual.double(), reference_attention(q, k, v, causal=True), atol=1e-6)
    on_cuda = dataclasses.replace(call, device_type="cuda", dtype=torch.bfloat16)
    assert "flex needs head_dim >= 32 on CUDA" in kernel_layer._CANNOT["flex"](on_cuda)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_mask=torch.ones(2, 9, dtype=torch.bool)), r"\[batch, k_len\] = \[2, 8\]"),
        (dict(attention_mask=torch.ones(2, 8)), "bool keep-mask"),
        (dict(attention_mask=torch.ones(2, 8, 8, dtype=torch.bool)), "3 dimensions"),
        (dict(attention_mask=torch.ones(2, 3, 8, 8, dtype=torch.bool)), "dimension heads"),
        (dict(attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.int64)), "bool .* or floating"),
        (dict(alibi_slopes=torch.rand(3)), "alibi_slopes must have shape"),
        (dict(dropout_p=1.0), "dropout_p"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match=message):
        mea.attention(q, q, q, **kwargs)


def test_bad_shapes_and_dtypes_get_clear_errors():
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        mea.attention(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    with pytest.raises(ValueError, match="floating dtype"):
        mea.attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="4-D"):
        mea.attention(q[0], q[0], q[0])


@pytest.mark.parametrize(
    "value, expected", [("true", "sdpa"), ("1", "sdpa"), ("false", "eager"), ("0", "eager"), ("chunked", "chunked")]
)
def test_use_flash_attn_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("USE_FLASH_ATTN", value)
    chosen = []
    original = dict(kernel_layer._RUN)
    for name in original:
        monkeypatch.setitem(kernel_layer._RUN, name, lambda *a, _n=name, **kw: chosen.append(_n) or original[_n](*a, **kw))
    q = torch.randn(1, 2, 5, 16)
    out = mea.attention(q, q, q, causal=True)
    assert chosen == [expected]
    assert torch.allclose(out.double(), reference_attention(q, q, q, causal=True), atol=1e-5)
    assert mea.attention(q, q, q, causal=True, backend="eager") is not None and chosen[-1] == "eager"


def test_use_flash_attn_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("USE_FLASH_ATTN", "fastest")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="USE_FLASH_ATTN"):
        mea.attention(q, q, q)


def test_broken_optional_package_is_probed_once_logged_once_and_skipped(monkeypatch, caplog):
    class BrokenOps:
        calls = 0

        def memory_efficient_attention(self, *args, **kwargs):
            BrokenOps.calls += 1
            raise NotImplementedError("No operator found for memory_efficient_attention_forward")

    monkeypatch.setattr(kernel_layer, "_xformers_ops", lambda: BrokenOps())
    monkeypatch.setattr(kernel_layer, "_probe_results", {})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.empty(shape[:4]).normal_())
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        for _ in range(3):
            reason = kernel_layer._probe("xformers", "cuda")
    assert "installed but does not run here" in reason and "No operator found" in reason
    assert BrokenOps.calls == 1
    assert sum("xformers" in record.getMessage() for record in caplog.records) == 1
    assert "xformers" not in mea.available_backends("cuda")


def forget_imports(monkeypatch, package: str) -> None:
    """``package`` and its submodules out of ``sys.modules`` for the test, so that importing it looks again."""
    for name in [name for name in sys.modules if name.split(".")[0] == package]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize(
    "package, source, named",
    [
        ("flash_attn", "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda')", "undefined symbol"),
        ("flash_attn", "def flash_attn_func(*args, **kwargs):\n    return None", "flash_attn_varlen_func"),
        ("flash_attn", "import flash_attn_2_cuda", "flash_attn_2_cuda"),
        ("xformers", "raise ImportError('xformers was built for another torch')", "another torch"),
        ("cudnn", "raise ImportError('libcudnn.so.9: cannot open shared object file')", "libcudnn"),
    ],
)
def test_an_optional_package_that_fails_to_import_is_logged_as_broken_not_missing(
    tmp_path, monkeypatch, caplog, package, source, named
):
    """An ImportError from inside an installed package (a wheel for another torch, a missing function or
    extension) read as "not installed": nothing logged, and an explicit backend said it was not installed."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(source + "\n")
    (tmp_path / package / "ops.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_imports(monkeypatch, package)
    monkeypatch.setattr(kernel_layer, "_probe_results", {})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        reasons = {kernel_layer._probe(package, "cpu") for _ in range(2)}
    (reason,) = reasons
    assert reason.startswith(f"{package} is installed but does not run here") and named in reason
    assert sum(reason in record.getMessage() for record in caplog.records) == 1
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="installed but does not run here"):
        mea.attention(q, q, q, backend=package)


@pytest.mark.parametrize("package", ["flash_attn", "xformers", "cudnn"])
def test_a_missing_optional_package_is_said_to_be_not_installed(tmp_path, monkeypatch, package):
    monkeypatch.setattr(kernel_layer, "_probe_results", {})
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # an empty folder: no package can be found
    forget_imports(monkeypatch, package)
    reason = kernel_layer._probe(package, "cpu")
    assert reason.startswith(f"{package} ") and reason.endswith("is not installed")


def test_probes_run_as_written_while_torch_compile_traces(monkeypatch):
    """A probe runs real kernels and may take locks (cuDNN's plan cache), which Dynamo cannot trace: under
    torch.compile (fullgraph) the probe runs once while tracing, and its answer steers the compiled code."""
    import threading

    lock, calls = threading.Lock(), []

    def locked_probe(device_type: str):
        with lock:
            calls.append(device_type)
            return f"probed on {device_type} ({float(torch.ones(2).sum()):.0f} ones)"

    monkeypatch.setitem(kernel_layer._PROBES, "xformers", locked_probe)
    monkeypatch.setattr(kernel_layer, "_probe_results", {})

    def answer(x):
        reason = kernel_layer._probe("xformers", "cuda")
        return x + 1 if reason is not None and reason.startswith("probed on cuda (2 ones)") else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(answer, fullgraph=True)
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3)) and calls == ["cuda"]
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3)) and calls == ["cuda"]


def test_backend_failure_in_auto_demotes_that_kind_of_call_only(monkeypatch, caplog):
    """sdpa without a kernel for one kind of call: auto falls back for that kind, logs once, keeps sdpa for others."""
    real_sdpa = kernel_layer._RUN["sdpa"]

    def sdpa_without_kernel_for_masks(q, k, v, call, mask, *args, **kwargs):
        if call.mask_kind != "none":
            kernel_unavailable()
        return real_sdpa(q, k, v, call, mask, *args, **kwargs)

    ran = []
    monkeypatch.setitem(kernel_layer._RUN, "sdpa", lambda *a, **kw: ran.append("sdpa") or sdpa_without_kernel_for_masks(*a, **kw))
    monkeypatch.setattr(kernel_layer, "_demoted", {})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    q = torch.randn(2, 2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, :3] = False
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):  # an encoder-like call: auto picks sdpa
        first = mea.attention(q, q, q, attention_mask=keep)
        second = mea.attention(q, q, q, attention_mask=keep)
    expected = reference_attention(q, q, q, mask=keep)
    assert torch.allclose(first.double(), expected, atol=1e-5) and torch.equal(first, second)
    assert ran == ["sdpa"]  # tried once, then skipped for this kind of call
    assert sum("No available kernel" in r.getMessage() for r in caplog.records) == 1
    assert [entry[0] for entry in mea.demoted_backends()] == ["sdpa"]
    unmasked = mea.attention(q, q, q, causal=True)  # another kind of call keeps its fastest kernel
    assert ran == ["sdpa", "sdpa"] and torch.allclose(unmasked.double(), reference_attention(q, q, q, causal=True), atol=1e-5)
    with pytest.raises(RuntimeError, match="No available kernel"):
        mea.attention(q, q, q, attention_mask=keep, backend="sdpa")  # an explicit choice is never replaced
    kernel_layer._demoted.clear()  # deliberate: the conftest check fails any test that leaves a demotion behind


def test_other_errors_in_auto_are_raised_and_demote_nothing(monkeypatch):
    """A failure that is not about kernel availability (a bug, a caller's mistake) must surface, not be hidden."""

    def exploding(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(kernel_layer._RUN, "sdpa", exploding)
    q = torch.randn(1, 2, 7, 16)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="kernel exploded"):
            mea.attention(q, q, q, causal=True)
    assert mea.demoted_backends() == []


def test_when_every_backend_fails_the_first_failure_is_raised(monkeypatch):
    monkeypatch.setattr(kernel_layer, "_demoted", {})
    for name, text in (("sdpa", "No available kernel (sdpa)"), ("chunked", "not compiled with chunks"), ("eager", "No operator found")):
        monkeypatch.setitem(kernel_layer._RUN, name, lambda *a, _t=text, **kw: (_ for _ in ()).throw(RuntimeError(_t)))
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match=r"No available kernel \(sdpa\)"):
        mea.attention(q, q, q)
    assert sorted(entry[0] for entry in mea.demoted_backends()) == ["chunked", "eager", "sdpa"]
    kernel_layer._demoted.clear()


def test_a_mask_on_the_wrong_device_is_refused_before_any_backend_runs(monkeypatch):
    """The review's case: one such call used to demote sdpa, chunked and eager for the whole process."""
    ran = []
    for name in CPU_BACKENDS:
        original = kernel_layer._RUN[name]
        monkeypatch.setitem(kernel_layer._RUN, name, lambda *a, _n=name, _o=original, **kw: ran.append(_n) or _o(*a, **kw))
    q = torch.randn(2, 2, 6, 16)
    with pytest.raises(ValueError, match="attention_mask is on meta, but q, k and v are on cpu"):
        mea.attention(q, q, q, causal=True, attention_mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="alibi_slopes is on meta"):
        mea.attention(q, q, q, causal=True, alibi_slopes=torch.rand(2, device="meta"))
    assert ran == [] and mea.demoted_backends() == []
    out = mea.attention(q, q, q, causal=True)
    assert ran == ["sdpa"] and torch.allclose(out.double(), reference_attention(q, q, q, causal=True), atol=1e-5)


def test_available_backends_on_cpu():
    names = mea.available_backends("cpu")
    assert {"sdpa", "chunked", "eager"} <= set(names)
    assert "flash_attn" not in names and "xformers" not in names


class FakeConfig:
    def __init__(self, implementation=None, attn_backend=None, use_flash_attn="auto"):
        self._attn_implementation = implementation
        self.use_flash_attn = use_flash_attn
        if attn_backend is not None:
            self.attn_backend = attn_backend


@pytest.mark.parametrize(
    "implementation, attn_backend, environment, use_flash_attn, expected",
    [
        (None, None, None, "auto", "auto"),
        ("sdpa", None, None, "auto", "auto"),  # transformers' default names nothing
        ("eager", None, None, "auto", "eager"),
        ("flash_attention_2", None, None, "auto", "flash_attn"),
        # transformers' other names (Hub kernels, export variants, flash_attention_4) compute the usual math: auto
        ("flash_attention_4", None, None, "auto", "auto"),
        ("kernels-community/flash-attn2", None, None, "auto", "auto"),
        ("sdpa_without_vmap", None, None, "auto", "auto"),
        ("flex_attention", None, None, "auto", "flex"),
        ("mea_chunked", None, None, "auto", "chunked"),
        ("mea", None, None, "auto", "auto"),
        # 1. config.attn_backend over everything below it
        ("eager", "chunked", "flex", False, "chunked"),
        # "auto" in attn_backend names nothing: the next source decides
        ("eager", "auto", None, "auto", "eager"),
        # 2. attn_implementation over the environment and use_flash_attn
        ("eager", None, "chunked", False, "eager"),
        # 3. the environment over Qwen's use_flash_attn
        ("sdpa", None, "chunked", False, "chunked"),
        ("sdpa", None, "true", False, "auto"),
        ("sdpa", None, "false", True, "eager"),
        # 4. Qwen's use_flash_attn=False means eager, True/"auto" name nothing
        ("sdpa", None, None, False, "eager"),
        ("sdpa", None, None, True, "auto"),
        ("sdpa", "auto", None, False, "eager"),
    ],
)
def test_backend_selection_precedence(monkeypatch, implementation, attn_backend, environment, use_flash_attn, expected):
    if environment is not None:
        monkeypatch.setenv("USE_FLASH_ATTN", environment)
    config = FakeConfig(implementation, attn_backend, use_flash_attn)
    assert mea.backend_from_config(config) == expected
    assert mea.attention_options(config)["backend"] == expected
    assert mea.backend_from_config(config, "eager") == "eager"  # a call's own choice comes first


def test_backend_selection_without_a_config_applies_only_the_environment(monkeypatch):
    assert mea.backend_from_config() == "auto" and mea.backend_from_config(None, "chunked") == "chunked"
    monkeypatch.setenv("USE_FLASH_ATTN", "0")
    assert mea.backend_from_config() == "eager" and mea.backend_from_config(None, "sdpa") == "sdpa"


@pytest.mark.parametrize(
    "config, environment, message",
    [
        (FakeConfig(None, "fastest"), None, "config.attn_backend='fastest'"),
        (FakeConfig(None, ""), None, "config.attn_backend=''"),  # unset is None; an empty or false value is not
        (FakeConfig(None, False), None, "config.attn_backend=False"),
        (FakeConfig("mea_fastest"), None, "attn_implementation='fastest'"),
        (FakeConfig("sdpa_paged"), None, "'sdpa_paged': transformers' continuous batching"),
        (FakeConfig(), "fastest", "USE_FLASH_ATTN='fastest'"),
    ],
)
def test_backend_selection_rejects_unknown_names(monkeypatch, config, environment, message):
    if environment is not None:
        monkeypatch.setenv("USE_FLASH_ATTN", environment)
    with pytest.raises(ValueError, match=message):
        mea.backend_from_config(config)


def test_only_attention_registered_by_others_than_transformers_is_refused():
    """A Hub kernel's name, or transformers' own function under another name (also as a partial), computes the usual
    attention, which auto runs; a function a user or an engine registered cannot be called by the kernel layer."""
    import functools

    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def users_attention(module, query, key, value, attention_mask, **kwargs):
        return query, None

    registered = {
        "kernels-org/some-attention-kernel": users_attention,
        "transformers_sdpa_as_partial": functools.partial(sdpa_attention_forward, dropout=0.0),
        "users_attention": users_attention,
    }
    for name, function in registered.items():
        transformers.AttentionInterface.register(name, function)
    assert mea.backend_from_config(FakeConfig("kernels-org/some-attention-kernel")) == "auto"
    assert mea.backend_from_config(FakeConfig("transformers_sdpa_as_partial")) == "auto"
    with pytest.raises(ValueError, match=r"'users_attention' names '.*users_attention' \(from test_backend_selection"):
        mea.backend_from_config(FakeConfig("users_attention"))


def test_keep_mask_from_padding():
    assert mea.keep_mask_from_padding(torch.ones(2, 5, dtype=torch.long)) is None
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(mea.keep_mask_from_padding(mask), mask.bool())
    with pytest.raises(ValueError, match="2-D padding mask"):
        mea.keep_mask_from_padding(torch.ones(1, 1, 3, 3))


def test_keep_mask_from_padding_makes_no_data_dependent_branch_while_compiling():
    """The all-ones shortcut reads the mask on the host; under torch.compile(fullgraph=True) it must not run."""
    compiled = torch.compile(mea.keep_mask_from_padding, fullgraph=True, backend="eager")
    ones, padded = torch.ones(2, 5, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(compiled(ones), ones.bool()) and torch.equal(compiled(padded), padded.bool())


def test_alibi_slopes_of_no_heads_says_so():
    with pytest.raises(ValueError, match="positive number of attention heads, got num_heads=0"):
        mea.alibi_slopes(0)


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)  # slope * position
    assert torch.allclose(mea.alibi_slopes(heads), alibi[:, 0, 1], rtol=1e-6)


def test_alibi_slopes_are_built_once_per_device_and_rebuilt_after_a_change(monkeypatch):
    """A BLOOM forward asks for its slopes every time; on a GPU building them copies from host memory (a host
    sync), and checking them for cuDNN reads them back (another). Both happen once, not once per forward."""
    first = mea.alibi_slopes(12)
    assert mea.alibi_slopes(12) is first and kernel_layer._are_bloom_slopes(first)
    expected = first.clone()
    reads = []
    monkeypatch.setattr(torch, "allclose", lambda *a, **kw: reads.append(1) or True)
    assert kernel_layer._are_bloom_slopes(mea.alibi_slopes(12)) and reads == []  # not read again
    assert kernel_layer._are_bloom_slopes(expected) and reads == [1]  # another tensor is read
    monkeypatch.undo()
    first.mul_(2.0)  # a caller changed it in place: a fresh, correct tensor comes next
    again = mea.alibi_slopes(12)
    assert again is not first and torch.equal(again, expected)
    assert not kernel_layer._are_bloom_slopes(first)
    assert not kernel_layer._are_bloom_slopes(mea.alibi_slopes(12) * 1.5)
    with torch.inference_mode():  # not kept: an inference tensor has no version counter to check later
        made_in_inference = mea.alibi_slopes(5)
    assert mea.alibi_slopes(5) is not made_in_inference and mea.alibi_slopes(5) is mea.alibi_slopes(5)


@pytest.mark.parametrize("context", ["torch.func.grad", "FakeTensorMode"])
def test_a_probe_first_asked_under_a_transform_or_a_mode_runs_on_real_tensors(monkeypatch, caplog, context):
    """The first attention call of a process may come under ``torch.func.grad`` (on CUDA, every cuDNN probe
    failed there: its tensors have no storage) or a dispatch mode such as FakeTensorMode: the probe runs outside
    them, so a working backend is not recorded as broken for the rest of the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def probe_touching_storage(device_type: str):
        q = torch.randn(1, 8, 2, 64)
        q.data_ptr()
        return None if float(q.square().sum()) > 0 else "no kernel ran"

    monkeypatch.setitem(kernel_layer._PROBES, "xformers", probe_touching_storage)
    monkeypatch.setattr(kernel_layer, "_probe_results", {})
    monkeypatch.setattr(kernel_layer, "_logged_messages", set())
    with caplog.at_level(logging.WARNING, logger="memory_efficient_adapter"):
        if context == "FakeTensorMode":
            with FakeTensorMode():
                reason = kernel_layer._probe("xformers", "cuda")
        else:
            answers = []
            torch.func.grad(lambda x: answers.append(kernel_layer._probe("xformers", "cuda")) or x.square().sum())(
                torch.randn(3)
            )
            reason = answers[0]
    assert reason is None and kernel_layer._probe_results == {("xformers", "cuda"): None}
    assert not [record for record in caplog.records if "does not run here" in record.getMessage()]
