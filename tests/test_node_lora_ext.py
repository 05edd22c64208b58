"""The ``cpu`` backend of ``stfast::node_lora`` (csrc/cpu/node_lora_cpu.cpp) beyond the shared op
tests of test_node_lora.py: agreement with the torch backend at a benchmark-like shape on every
thread, bitwise determinism, fp16 / bf16 computed in fp32, the dropout mask it draws (layout, rate,
the same on every call), and the extension op's own argument checks."""

import os
import subprocess
import sys

import pytest
import torch

from stfast import ops
from stfast.ops import _ext, backends
from stfast.ops.node_lora import dropout_seed

STATUS = _ext.load()
pytestmark = pytest.mark.skipif(STATUS is not True, reason=f"stfast extension unavailable: {STATUS}")
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")


@pytest.fixture(autouse=True)
def _clean_backend(clean_backend):
    yield


def make_inputs(lead, nodes, d_in, d_out, rank, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return (rand(*lead, nodes, d_in), rand(d_out, d_in, scale=d_in**-0.5), rand(d_out),
            rand(nodes, d_in, rank, scale=d_in**-0.5), rand(nodes, rank, d_out, scale=rank**-0.5))


def run(backend, inputs, activation="leaky_relu", dropout_p=0.0, seed=3, grad_dtype=None):
    """Output and every gradient; the output gradient is drawn in float64 and rounded through
    ``grad_dtype`` (default: the output's dtype)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with ops.use_backend(backend):
        out = ops.node_lora(*leaves, 0.5, activation, dropout_p=dropout_p, training=True, seed=seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(grad_dtype or out.dtype).to(out.dtype)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
def test_matches_torch_at_a_benchmark_like_shape(threads, activation):
    """64 rows per node, 83 nodes, d 48 -> 40, rank 16: nodes split over the threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs((4, 16), 83, 48, 40, 16)
        for name, got, want in zip(("y",) + NAMES, run("cpu", inputs, activation), run("torch", inputs, activation)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        torch.set_num_threads(previous)


def test_bitwise_deterministic():
    inputs = make_inputs((8,), 37, 24, 20, 16)
    first, second = run("cpu", inputs, dropout_p=0.3), run("cpu", inputs, dropout_p=0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_is_computed_in_fp32_and_rounded_once(dtype, tol):
    inputs = make_inputs((3,), 5, 24, 20, 16, dtype=dtype)
    got = run("cpu", inputs)
    want = run("cpu", [t.float() for t in inputs], grad_dtype=dtype)  # the same values, in fp32
    for name, g, w in zip(("y",) + NAMES, got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_mask_layout_rate_and_reuse():
    x = torch.empty(6, 50, 40)
    mask = _ext.node_lora_dropout_mask(x, 0.3, seed=7, offset=11)
    assert mask.shape == x.shape and mask.dtype == x.dtype
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs((mask > 0).float().mean().item() - 0.7) < 0.01
    assert torch.equal(mask, _ext.node_lora_dropout_mask(x, 0.3, seed=7, offset=11))
    assert not torch.equal(mask, _ext.node_lora_dropout_mask(x, 0.3, seed=8, offset=11))
    # Counter-based: element (m, n, k) is draw number offset + (m*N + n)*K + k, so a later offset
    # shifts the stream.
    shifted = _ext.node_lora_dropout_mask(x, 0.3, seed=7, offset=11 + 40)
    assert torch.equal(shifted.flatten()[:-40], mask.flatten()[40:])


def test_dropout_mask_is_the_same_for_every_leading_shape_of_the_same_rows():
    mask = _ext.node_lora_dropout_mask(torch.empty(2, 3, 5, 7), 0.5, seed=1, offset=0)
    flat = _ext.node_lora_dropout_mask(torch.empty(6, 5, 7), 0.5, seed=1, offset=0)
    assert torch.equal(mask.reshape(6, 5, 7), flat)


def _fwd(x, weight, bias, lora_a, lora_b, activation="leaky_relu", dropout_p=0.0, seed=None):
    seed = dropout_seed(0, 0, "cpu") if seed is None else seed
    return torch.ops.stfast_ext.node_lora_fwd(x, weight, bias, lora_a, lora_b, 0.5, activation, dropout_p, seed)


BAD = [
    (lambda a: a.update(x=a["x"][0, 0]), r"x: expected shape \(\.\.\., N, d_in\) .*got \[7\]"),
    (lambda a: a.update(x=a["x"].long()), "x: expected dtype float32, float64, float16 or bfloat16, got Long"),
    (lambda a: a.update(weight=a["weight"][:, :6]), r"weight: expected shape \(d_out, d_in\) = \(d_out, 7\), got \[6, 6\]"),
    (lambda a: a.update(weight=a["weight"].double()), "weight: expected dtype float32 .*got float64"),
    (lambda a: a.update(bias=a["bias"][:5]), r"bias: expected shape \(d_out,\) = \(6,\), got \[5\]"),
    (lambda a: a.update(lora_a=a["lora_a"][:4]), r"lora_a: expected shape \(N, d_in, r\) = \(5, 7, r\) .*got \[4, 7, 3\]"),
    (lambda a: a.update(lora_b=a["lora_b"][:, :2]), r"lora_b: expected shape \(N, r, d_out\) = \(5, 3, 6\) .*got \[5, 2, 6\]"),
    (lambda a: a.update(activation="gelu"), "activation: expected None, 'leaky_relu', 'relu', 'tanh' or 'sigmoid', got 'gelu'"),
    (lambda a: a.update(dropout_p=1.0), r"dropout_p: expected a float in \[0, 1\), got 1"),
    (lambda a: a.update(seed=torch.zeros(3, dtype=torch.int64)), r"seed: expected a tensor of shape \(2,\) .*got \[3\]"),
    (lambda a: a.update(seed=torch.zeros(2, dtype=torch.int32)), "seed: expected dtype int64, got Int"),
    (lambda a: a.update(seed=torch.zeros(4, dtype=torch.int64)[::2]), r"seed: expected a contiguous tensor, got strides \[2\]"),
]


@pytest.mark.parametrize("corrupt,match", BAD)
def test_ext_op_names_the_argument_the_expected_and_the_actual(corrupt, match):
    args = dict(zip(NAMES, make_inputs((2,), 5, 7, 6, 3)))
    corrupt(args)
    with pytest.raises((ValueError, TypeError), match=match):
        _fwd(**args)


def test_ext_backward_checks_grad():
    x, weight, bias, lora_a, lora_b = make_inputs((2,), 5, 7, 6, 3)
    with pytest.raises(ValueError, match=r"grad: expected the output's shape \[2, 5, 6\], got \[2, 5, 7\]"):
        torch.ops.stfast_ext.node_lora_bwd(torch.zeros(2, 5, 7), x, weight, bias, lora_a, lora_b, 0.5, None, 0.0,
                                           dropout_seed(0, 0, "cpu"), [True] * 5)


def test_aten_gemm_fallback_gives_the_same_results():
    """Where libtorch_cpu exports no Fortran BLAS, the per-node GEMMs run through ATen instead
    (csrc/cpu/blas.h); STFAST_CPU_GEMM=aten forces that path in a fresh process."""
    script = (
        "import torch, stfast.ops as ops\n"
        "from stfast.ops import _ext\n"
        "assert 'cpu_gemm=aten' in _ext.build_info(), _ext.build_info()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in "
        "((3, 6, 9), (5, 9), (5,), (6, 9, 4), (6, 4, 5))]\n"
        "outs = {}\n"
        "for backend in ('cpu', 'torch'):\n"
        "    with ops.use_backend(backend):\n"
        "        y = ops.node_lora(*args, 0.5, 'tanh', dropout_p=0.0)\n"
        "    outs[backend] = (y, *torch.autograd.grad(y.square().sum(), args))\n"
        "assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(outs['cpu'], outs['torch']))\n"
        "print('ok')\n"
    )
    assert "cpu_gemm=" in _ext.build_info()  # "blas" where torch exports sgemm_ / dgemm_ (x86 builds: MKL)
    env = {**os.environ, "STFAST_CPU_GEMM": "aten"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
