"""Importing a Triton kernel module the way its tests need it.

Triton decides at decoration time, i.e. when a kernel module is first imported, whether its kernels
run in the interpreter. On a machine without a GPU, :func:`import_kernels` sets
``TRITON_INTERPRET=1`` around that import and removes it again (other test modules expect the usual
environment, e.g. triton reported unavailable on CPU); the test modules set it per test with a
fixture. If the module was already imported without the interpreter in this process, its tests
cannot run here (:func:`kernels_run_here` is False): each test module then re-runs its tests in a
child pytest process marked by ``CHILD_ENV`` instead of losing them.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CHILD_ENV = "STFAST_TRITON_TEST_CHILD"


def import_kernels(name: str):
    """``stfast.kernels.<name>``, decorated under the interpreter when there is no GPU."""
    set_here = not ON_GPU and "TRITON_INTERPRET" not in os.environ
    if not ON_GPU:  # before triton itself is imported: triton.language's own helpers are jitted then too
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        pytest.importorskip("triton")
        return importlib.import_module(f"stfast.kernels.{name}")
    finally:
        if set_here:
            os.environ.pop("TRITON_INTERPRET", None)


def is_interpreted(kernel) -> bool:
    from stfast.kernels._utils import is_interpreted as interpreted

    return interpreted(kernel)


def kernels_run_here(kernel) -> bool:
    """GPU: compiled kernels on CUDA tensors; CPU: interpreted kernels on CPU tensors."""
    interpreted = is_interpreted(kernel)
    return (ON_GPU and not interpreted) or (not ON_GPU and interpreted)


def skip_unless_kernels_run(kernel, module: str):
    """A skip marker for the tests that run ``kernel`` in this process."""
    return pytest.mark.skipif(
        not kernels_run_here(kernel),
        reason=f"stfast.kernels.{module} was imported without TRITON_INTERPRET=1 before this module; "
        "test_interpreter_tests_in_a_subprocess runs these tests in a fresh process",
    )


def run_without_triton(code: str) -> None:
    """Run ``code`` in a fresh interpreter where ``import triton`` fails; assert it succeeds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "import sys; sys.modules['triton'] = None\n" + code
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def rerun_under_interpreter(test_file: str) -> None:
    """Run the test module ``test_file`` again in a child pytest with the interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_ENV: "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider"],
        cwd=Path(test_file).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def interpreter_rerun_test(runs_here: bool, test_file: str):
    """``test_interpreter_tests_in_a_subprocess`` for the module ``test_file``: it reruns the module
    under the interpreter in a child pytest when its kernel tests cannot run in this process."""

    @pytest.mark.skipif(runs_here or ON_GPU or bool(os.environ.get(CHILD_ENV)),
                        reason="the interpreter tests run in this process")
    def test_interpreter_tests_in_a_subprocess():
        rerun_under_interpreter(test_file)

    return test_interpreter_tests_in_a_subprocess


def needs_compiled_kernels(kernel):
    """A skip marker for the tests that need a CUDA GPU running ``kernel`` compiled."""
    return pytest.mark.skipif(not ON_GPU or is_interpreted(kernel), reason="needs a CUDA GPU (compiled Triton kernels)")
