"""Backend selection on GPUs, checked on the CPU: the TF32 switch read through either of PyTorch's
precision APIs, ``auto`` on CUDA from the committed table of measured winners (``torch`` where no
entry matches), and the backend API at the package top level."""

from pathlib import Path

import pytest
import torch

import stfast
import stfast.ops as ops
from stfast.kernels._utils import dot_precision
from stfast.ops import _auto_table, backends

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- TF32: new and legacy APIs

@pytest.fixture
def restore_precision():
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    saved = (matmul.fp32_precision, torch.backends.fp32_precision) if new_api else None
    legacy = torch.get_float32_matmul_precision() if not new_api or saved == ("none", "none") else None
    yield new_api
    if new_api:
        matmul.fp32_precision, torch.backends.fp32_precision = saved
    if legacy is not None:
        torch.set_float32_matmul_precision(legacy)
        if new_api:
            matmul.fp32_precision = saved[0]
    torch.get_float32_matmul_precision()  # the legacy getter works again: no mixed state left behind


def test_new_api_tf32_is_read_where_the_legacy_getter_raises(restore_precision):
    if not restore_precision:
        pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision (torch < 2.9)")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()  # what the triton backend called before
    assert backends.tf32_matmul_allowed()
    assert dot_precision(torch.float32, interpreted=False) == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not backends.tf32_matmul_allowed()
    assert dot_precision(torch.float32, interpreted=False) == "ieee"


def test_generic_new_api_setting_applies_when_matmul_defers(restore_precision):
    if not restore_precision:
        pytest.skip("this torch has no torch.backends.fp32_precision (torch < 2.9)")
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert backends.tf32_matmul_allowed()


def test_legacy_api_tf32_is_read(restore_precision):
    torch.set_float32_matmul_precision("high")
    assert backends.tf32_matmul_allowed()
    assert dot_precision(torch.float32, interpreted=False) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert not backends.tf32_matmul_allowed()
    assert dot_precision(torch.float32, interpreted=False) == "ieee"


def test_half_inputs_and_the_interpreter_ignore_the_switch(restore_precision):
    torch.set_float32_matmul_precision("high")
    assert dot_precision(torch.float32, interpreted=True) == "ieee"
    assert dot_precision(torch.bfloat16, interpreted=False) == "tf32"  # ignored by Triton for half inputs


# ---------------------------------------------------------------- auto on CUDA: measured winners

@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device named "Fake GPU" on which every backend can run, and a table for it."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_explicit_choice", None)
    monkeypatch.setattr(backends, "available_backends",
                        lambda device=None, op=None: {n: True for n in backends.BACKENDS})
    monkeypatch.setattr(backends, "_device_name", lambda index: "Fake GPU")
    monkeypatch.setattr(_auto_table, "WINNERS",
                        {"Fake GPU": {"meta_gconv/float32": "cuda", "node_lora/bfloat16": "triton"}})
    return torch.device("cuda", 0)


def test_auto_takes_the_measured_winner_for_the_device_op_and_dtype(fake_gpu):
    assert backends.resolve_backend("meta_gconv", fake_gpu, torch.float32) == "cuda"
    assert backends.resolve_backend("meta_gconv", fake_gpu) == "cuda"  # dtype defaults to fp32
    assert backends.resolve_backend("node_lora", fake_gpu, torch.bfloat16) == "triton"


def test_auto_is_torch_without_a_matching_entry(fake_gpu, monkeypatch):
    assert backends.resolve_backend("meta_gconv", fake_gpu, torch.bfloat16) == "torch"  # no entry for the dtype
    assert backends.resolve_backend("node_lora", fake_gpu, torch.float32) == "torch"
    monkeypatch.setattr(backends, "_device_name", lambda index: "Another GPU")
    assert backends.resolve_backend("meta_gconv", fake_gpu, torch.float32) == "torch"  # another device


def test_auto_skips_a_winner_that_cannot_run(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "available_backends",
                        lambda device=None, op=None: {n: n != "cuda" or "not built" for n in backends.BACKENDS})
    assert backends.resolve_backend("meta_gconv", fake_gpu, torch.float32) == "torch"


def test_a_forced_backend_overrides_the_table(fake_gpu):
    with ops.use_backend("triton"):
        assert backends.resolve_backend("meta_gconv", fake_gpu, torch.float32) == "triton"


def test_the_committed_table_names_real_ops_dtypes_and_backends():
    for device, winners in _auto_table.WINNERS.items():
        assert isinstance(device, str) and device
        for key, backend in winners.items():
            op, dtype = key.split("/")
            assert op in ("meta_gconv", "node_lora") and isinstance(getattr(torch, dtype), torch.dtype), key
            assert backend in backends.BACKENDS, (key, backend)


def test_auto_on_cpu_is_unchanged_by_the_table(fake_gpu):
    assert backends._auto_winner("meta_gconv", torch.device("cpu"), torch.float32) is None


# ---------------------------------------------------------------- top-level API

def test_backend_api_is_exported_at_the_top_level():
    assert stfast.set_backend is ops.set_backend
    assert stfast.use_backend is ops.use_backend
    assert stfast.available_backends is ops.available_backends
    assert {"set_backend", "use_backend", "available_backends"} <= set(stfast.__all__)
    with stfast.use_backend("torch"):
        assert ops.current_backend() == "torch"
    assert stfast.available_backends("cpu", "node_lora")["torch"] is True


def test_readme_uses_the_top_level_names():
    readme = (ROOT / "README.md").read_text()
    assert "stfast.set_backend(" in readme and "stfast.use_backend(" in readme
    assert "stfast.available_backends()" in readme
    assert "stfast.ops.set_backend" not in readme and "stfast.ops.available_backends" not in readme
