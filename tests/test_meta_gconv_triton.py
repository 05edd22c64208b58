"""The triton backend of ``stfast::meta_gconv``: forward and every gradient against the torch
backend, opcheck, the backend probe, importing without Triton, and (GPU machines only) fp32 /
TF32 / bf16 / fp16 at the METR-LA decoder shape.

On a machine without a GPU the kernels run in the Triton interpreter (see ``_triton_interpreter``).
"""

import os

import pytest
import torch
from _triton_interpreter import CHILD_ENV as _CHILD
from _triton_interpreter import (DEVICE, ON_GPU, import_kernels, is_interpreted, kernels_run_here,
                                 rerun_under_interpreter, run_without_triton, skip_unless_kernels_run)

kernels = import_kernels("meta_gconv")  # before anything else imports it: see _triton_interpreter

import stfast.ops as ops  # noqa: E402
from stfast.ops import _triton_gconv, backends  # noqa: E402

INTERPRETED = is_interpreted(kernels.meta_gconv_fwd)
RUNS_HERE = kernels_run_here(kernels.meta_gconv_fwd)
needs_kernels = skip_unless_kernels_run(kernels.meta_gconv_fwd, "meta_gconv")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if not ON_GPU and INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# ---------------------------------------------------------------- inputs and comparison

def make_inputs(axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs, *, bias=True,
                dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    x = rand(batch, nodes, channels)
    supports = {
        "shared": lambda: rand(nodes, nodes, scale=nodes**-0.5),
        "per_sample": lambda: rand(batch, nodes, nodes, scale=nodes**-0.5),
        "none": lambda: None,
    }[support_kind]()
    e = rand(*{"S": (nodes, dim), "T": (batch, dim), "ST": (batch, nodes, dim)}[axis])
    pool = rand(dim, cheb_k * channels, outputs, scale=(dim * cheb_k * channels) ** -0.5)
    bias_pool = rand(dim, outputs, scale=dim**-0.5) if bias else None
    return x, supports, e, pool, bias_pool


def run(backend, inputs, cheb_k, activation, axis, grad_out, requires=(True,) * 5):
    """Output and the gradients of the inputs flagged in ``requires`` (None elsewhere)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    with ops.use_backend(backend):
        assert ops.resolve_backend("meta_gconv", inputs[0].device) == backend
        out = ops.meta_gconv(*inputs, cheb_k, activation, axis=axis)
        grads = iter(torch.autograd.grad(out, leaves, grad_out))
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def compare(inputs, cheb_k, activation, axis, requires=(True,) * 5, rtol=1e-5, atol=1e-5):
    grad_out = torch.randn(inputs[0].shape[:2] + (inputs[3].shape[-1],),
                           generator=torch.Generator().manual_seed(1)).to(inputs[0])
    out, grads = run("triton", inputs, cheb_k, activation, axis, grad_out, requires)
    ref, ref_grads = run("torch", inputs, cheb_k, activation, axis, grad_out, requires)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    names = ("x", "supports", "embeddings", "weights_pool", "bias_pool")
    for name, got, want in zip(names, grads, ref_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d {n}: {m}")
    return out, grads


def _relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- values and gradients (tiny shapes)

# Not the cartesian product: each row varies several things at once, together covering every axis,
# support kind, activation, D in {1, 3}, O in {3, 20}, N in {5, 17} (never a block multiple),
# B in {1, 2}, bias or not; I = K*C = 5, 10 or 15 is padded to a 16-wide tile by masks.
CASES = [
    # axis, supports, K, B, N, C, D, O, activation, bias
    ("ST", "shared", 2, 2, 17, 5, 3, 20, "sigmoid", True),
    ("ST", "per_sample", 2, 1, 5, 5, 1, 3, None, False),
    ("ST", "none", 1, 2, 5, 5, 3, 3, "tanh", True),
    ("S", "shared", 2, 2, 17, 5, 3, 3, "tanh", True),
    ("S", "per_sample", 3, 2, 5, 5, 1, 20, None, True),
    ("T", "shared", 2, 2, 17, 5, 3, 20, None, False),
    ("T", "none", 1, 1, 5, 5, 3, 3, "sigmoid", True),
    ("T", "per_sample", 2, 2, 5, 5, 1, 20, "sigmoid", True),
]


@needs_kernels
@pytest.mark.parametrize("axis,support_kind,cheb_k,batch,nodes,channels,dim,outputs,activation,bias", CASES)
def test_matches_torch_backend(axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs, activation, bias):
    inputs = make_inputs(axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs, bias=bias)
    compare(inputs, cheb_k, activation, axis)


# Several tiles in every direction, ragged: M = 74 rows (two 64-row tiles), I = 2*20 = 40 (two
# 32-wide tiles), O = 70 (one 128-wide tile; narrower candidates: test_meta_gconv_tuning), D = 3.
# The subsets of gradients exercise each kernel path: dxg alone (I split across programs), dE
# alone (no dxg), dP alone, and all. The kernels are forced (S / T would be hoisted here:
# test_meta_gconv_triton_formulation.py).
@needs_kernels
@pytest.mark.parametrize("axis,requires", [
    ("ST", (True, True, True, True, True)),
    ("ST", (True, False, False, False, False)),
    ("S", (False, False, True, False, True)),
    ("T", (False, False, False, True, False)),
])
def test_several_tiles_and_gradient_subsets(monkeypatch, axis, requires):
    monkeypatch.setattr(_triton_gconv, "FORMULATION", "outer")
    inputs = make_inputs(axis, "shared", 2, 2, 37, 20, 3, 70)
    compare(inputs, 2, "tanh", axis, requires)


@needs_kernels
@pytest.mark.parametrize("axis", ["ST", "S", "T"])
def test_fp16_against_float64(monkeypatch, axis):
    """Half inputs (fp32 accumulation, half outputs) on the multi-tile shape, in the kernels. fp16
    only: bf16 ``tl.dot`` is wrong in the interpreter, so bf16 is checked by the GPU tests."""
    monkeypatch.setattr(_triton_gconv, "FORMULATION", "outer")
    inputs = make_inputs(axis, "shared", 2, 2, 37, 20, 3, 70, dtype=torch.float16)
    grad_out = torch.randn(2, 37, 70, generator=torch.Generator().manual_seed(1)).to(inputs[0])
    out, grads = run("triton", inputs, 2, "tanh", axis, grad_out)
    ref, ref_grads = run("torch", tuple(t.double() for t in inputs), 2, "tanh", axis, grad_out.double())
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 5e-3, errors


@needs_kernels
def test_deterministic():
    inputs = make_inputs("ST", "shared", 2, 2, 17, 5, 3, 20)
    out1, grads1 = compare(inputs, 2, "sigmoid", "ST")
    grad_out = torch.randn(out1.shape, generator=torch.Generator().manual_seed(1)).to(out1)
    out2, grads2 = run("triton", inputs, 2, "sigmoid", "ST", grad_out)
    out3, grads3 = run("triton", inputs, 2, "sigmoid", "ST", grad_out)
    assert torch.equal(out2, out3)
    assert all(torch.equal(a, b) for a, b in zip(grads2, grads3))


@needs_kernels
def test_opcheck_with_triton_backend():
    """The full opcheck (schema, autograd registration, fake tensor, AOT dispatch), on one case."""
    x, supports, e, pool, bias_pool = (
        t.requires_grad_() for t in make_inputs("ST", "shared", 2, 2, 5, 3, 2, 4)
    )
    op = torch.ops.stfast.meta_gconv.default
    args = (x, supports, e, pool, bias_pool, 2, "sigmoid", "ST")
    if "backend" in [a.name for a in op._schema.arguments]:  # the op carries the resolved backend
        args += ("triton",)
    with ops.use_backend("triton"):
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------- selection and import

def test_probe_allows_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.available_backends("cpu", "meta_gconv")["triton"] is True
    ops.set_backend(None)
    assert ops.resolve_backend("meta_gconv", "cpu") != "triton"  # never picked by auto on CPU
    assert "no gconv kernel yet" in ops.available_backends("cpu", "gconv")["triton"]  # gconv: torch only
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = ops.available_backends("cpu", "meta_gconv")["triton"]
    assert isinstance(reason, str) and "TRITON_INTERPRET=1" in reason


def test_imports_without_triton():
    """``import stfast`` / ``stfast.ops`` / ``stfast.kernels`` work when triton cannot be imported,
    the triton backend then says why, and the torch backend still runs."""
    run_without_triton(
        "import torch, stfast, stfast.kernels, stfast.kernels._utils, stfast.ops as ops\n"
        "reason = ops.available_backends('cuda', 'meta_gconv')['triton']\n"
        "assert 'triton is not importable' in reason, reason\n"
        "x, e, p = torch.randn(2, 3, 4), torch.randn(2, 3, 2), torch.randn(2, 4, 5)\n"
        "assert ops.meta_gconv(x, None, e, p, None, 1).shape == (2, 3, 5)\n"
        "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )


@pytest.mark.skipif(RUNS_HERE or ON_GPU or bool(os.environ.get(_CHILD)),
                    reason="the interpreter tests run in this process")
def test_interpreter_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)


# ---------------------------------------------------------------- GPU: real dtypes, real shape

@pytest.mark.skipif(not ON_GPU or INTERPRETED, reason="needs a CUDA GPU (compiled Triton kernels)")
class TestGPU:
    """METR-LA decoder shape (B=16, N=207, C=67, K=2, D=16, O=128) against the torch backend in
    float64 on the same (rounded) inputs; error = max |diff| / max |reference| per tensor."""

    @pytest.mark.parametrize("axis", ["ST", "S", "T"])
    @pytest.mark.parametrize("dtype,tf32,tol", [
        (torch.float32, False, 1e-4),
        (torch.float32, True, 1e-2),
        (torch.bfloat16, False, 5e-2),
        (torch.float16, False, 1e-2),
    ], ids=["fp32-ieee", "fp32-tf32", "bf16", "fp16"])
    def test_metr_la_decoder_shape(self, axis, dtype, tf32, tol):
        batch, nodes, channels, cheb_k, dim, outputs = 16, 207, 67, 2, 16, 128
        x, _, e, pool, bias_pool = make_inputs(axis, "none", cheb_k, batch, nodes, channels, dim, outputs,
                                               dtype=dtype, device="cuda")
        gen = torch.Generator().manual_seed(2)
        supports = torch.softmax(torch.randn(nodes, nodes, generator=gen), -1).to("cuda", dtype)
        inputs = (x, supports, e, pool, bias_pool)
        grad_out = torch.randn(batch, nodes, outputs, generator=gen).to("cuda", dtype)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            out, grads = run("triton", inputs, cheb_k, "sigmoid", axis, grad_out)
        finally:
            torch.set_float32_matmul_precision(previous)
        inputs64 = tuple(t.double() for t in inputs)
        ref, ref_grads = run("torch", inputs64, cheb_k, "sigmoid", axis, grad_out.double())
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        errors = {"out": _relative_error(out, ref)}
        for name, got, want in zip(("x", "supports", "embeddings", "weights_pool", "bias_pool"), grads, ref_grads):
            errors[name] = _relative_error(got, want)
        assert max(errors.values()) <= tol, errors
