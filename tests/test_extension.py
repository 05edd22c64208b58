"""The C++/CUDA extension (csrc/): the ``cpu`` backend of ``stfast::meta_gconv`` against a naive
float64 reference and the ``torch`` backend (forward and every gradient, odd shapes, every axis,
support kind and formulation), float64 gradcheck, opcheck with the backend forced to ``cpu``,
bitwise determinism, the TORCH_CHECK messages, the loader's reasons when the extension is missing,
and a compile-only nvcc pass over the CUDA sources. CUDA tests run only on a GPU machine.

If the extension cannot be loaded or built here, the tests that need it are skipped with the reason
(the same one ``stfast.ops.available_backends()`` gives).
"""

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stfast import ops
from stfast.ops import _ext, backends

ROOT = Path(__file__).resolve().parents[1]
STATUS = _ext.load()
needs_ext = pytest.mark.skipif(STATUS is not True, reason=f"stfast extension unavailable: {STATUS}")
CUDA_STATUS = _ext.status("cuda") if torch.cuda.is_available() else "no CUDA device"
needs_cuda_ext = pytest.mark.skipif(CUDA_STATUS is not True, reason=f"cuda backend unavailable: {CUDA_STATUS}")
AXES = ("S", "T", "ST")
NAMES = ("x", "supports", "embeddings", "weights_pool", "bias_pool")


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.set_backend(None)
    yield
    ops.set_backend(None)


# ---------------------------------------------------------------- inputs and the naive reference

def make_inputs(axis, support_kind, cheb_k, batch, nodes, channels=5, dim=3, outputs=6, *, bias=True,
                dtype=torch.float32, device="cpu", seed=0):
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


def naive_meta_gconv(x, supports, e, pool, bias_pool, cheb_k, axis, activation=None):
    """Builds T_k explicitly and materialises every per-row weight: slow and obviously right."""
    n = x.shape[1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    mats = [eye if supports is None else eye.expand_as(supports)]
    if cheb_k > 1:
        mats.append(supports)
    for _ in range(2, cheb_k):
        mats.append(2 * supports @ mats[-1] - mats[-2])
    xg = torch.cat([m @ x for m in mats], dim=-1)
    rows_e = {"S": lambda: e.expand(x.shape[0], n, -1), "T": lambda: e[:, None].expand(-1, n, -1),
              "ST": lambda: e}[axis]()
    weights = torch.einsum("bnd,dio->bnio", rows_e, pool)
    y = torch.einsum("bni,bnio->bno", xg, weights)
    if bias_pool is not None:
        y = y + rows_e @ bias_pool
    return {None: y, "sigmoid": torch.sigmoid(y), "tanh": torch.tanh(y)}[activation]


def run(backend, inputs, cheb_k, activation, axis, grad_out, requires=(True,) * 5):
    inputs = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    with ops.use_backend(backend):
        assert ops.resolve_backend("meta_gconv", inputs[0].device) == backend
        out = ops.meta_gconv(*inputs, cheb_k, activation, axis=axis)
        grads = iter(torch.autograd.grad(out, leaves, grad_out)) if leaves else iter(())
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def expected(inputs, cheb_k, activation, axis, grad_out, requires=(True,) * 5):
    """The naive reference in float64 on the same values."""
    inputs64 = [None if t is None else t.detach().double().requires_grad_(r) for t, r in zip(inputs, requires)]
    out = naive_meta_gconv(*inputs64, cheb_k, axis, activation)
    leaves = [t for t in inputs64 if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True,
                                     materialize_grads=True)) if leaves else iter(())
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in inputs64]


def assert_matches(got, want, rtol, atol):
    out, grads = got
    ref, ref_grads = want
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=rtol, atol=atol)
    for name, g, w in zip(NAMES, grads, ref_grads):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m, n=name: f"d {n}: {m}")


def grad_like(inputs):
    x, pool = inputs[0], inputs[3]
    gen = torch.Generator().manual_seed(1)
    return torch.randn(x.shape[0], x.shape[1], pool.shape[-1], generator=gen, dtype=torch.float64).to(x)


# ---------------------------------------------------------------- cpu backend: values and gradients

# Not the full product: each row varies several things, together covering every axis, support kind,
# K in {1, 2, 3}, both formulations of S / T, activations, bias or not, and odd sizes (N = 1, 13, 37;
# B = 1, 3; M = B*N above and below the 32-row tile; C, D, O never powers of two).
CASES = [
    # axis, supports, K, B, N, C, D, O, activation, bias, formulation
    ("ST", "shared", 2, 3, 13, 5, 3, 7, "sigmoid", True, "auto"),
    ("ST", "per_sample", 3, 3, 37, 3, 2, 5, None, True, "outer"),
    ("ST", "none", 1, 1, 13, 4, 5, 3, "tanh", False, "auto"),
    ("ST", "per_sample", 1, 3, 7, 5, 1, 6, "tanh", True, "auto"),
    ("S", "shared", 3, 3, 37, 3, 3, 5, "tanh", True, "grouped"),
    ("S", "per_sample", 2, 1, 13, 5, 4, 7, None, False, "outer"),
    ("S", "none", 1, 3, 1, 6, 2, 3, "sigmoid", True, "grouped"),
    ("T", "shared", 1, 3, 13, 5, 3, 7, None, True, "grouped"),
    ("T", "per_sample", 3, 3, 37, 3, 2, 5, "sigmoid", True, "outer"),
    ("T", "none", 1, 1, 7, 4, 5, 6, "tanh", False, "grouped"),
    ("T", "shared", 2, 3, 13, 5, 3, 7, "tanh", True, "auto"),
]


@needs_ext
@pytest.mark.parametrize("axis,support_kind,cheb_k,batch,nodes,channels,dim,outputs,activation,bias,formulation", CASES)
def test_cpu_matches_naive_and_torch(monkeypatch, axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs,
                                     activation, bias, formulation):
    monkeypatch.setattr(_ext, "FORMULATION", formulation)
    inputs = make_inputs(axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs, bias=bias)
    grad_out = grad_like(inputs)
    got = run("cpu", inputs, cheb_k, activation, axis, grad_out)
    assert_matches(got, expected(inputs, cheb_k, activation, axis, grad_out), rtol=1e-5, atol=1e-5)
    assert_matches(got, run("torch", inputs, cheb_k, activation, axis, grad_out), rtol=1e-5, atol=1e-5)


# Each subset of gradients takes its own path through the kernels (dxg without dE, dE alone, dP alone...).
@needs_ext
@pytest.mark.parametrize("axis,formulation", [("ST", "outer"), ("S", "grouped"), ("T", "grouped"), ("S", "outer")])
@pytest.mark.parametrize("requires", [
    (True, False, False, False, False),
    (False, True, False, False, False),
    (False, False, True, False, False),
    (False, False, False, True, False),
    (False, False, False, False, True),
    (False, False, False, False, False),
], ids=["x", "supports", "embeddings", "weights_pool", "bias_pool", "none"])
def test_cpu_gradient_subsets(monkeypatch, axis, formulation, requires):
    monkeypatch.setattr(_ext, "FORMULATION", formulation)
    inputs = make_inputs(axis, "per_sample", 2, 3, 37, 4, 3, 5)
    grad_out = grad_like(inputs)
    got = run("cpu", inputs, 2, "sigmoid", axis, grad_out, requires)
    assert_matches(got, expected(inputs, 2, "sigmoid", axis, grad_out, requires), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("axis,formulation", [("S", "grouped"), ("S", "outer"), ("T", "grouped"), ("T", "outer"),
                                              ("ST", "outer")])
def test_cpu_gradcheck_float64(monkeypatch, axis, formulation):
    monkeypatch.setattr(_ext, "FORMULATION", formulation)
    inputs = make_inputs(axis, "per_sample", 3, 2, 3, channels=2, dim=2, outputs=2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in inputs]

    def fn(*args):
        with ops.use_backend("cpu"):
            return ops.meta_gconv(*args, 3, "tanh", axis=axis)

    assert torch.autograd.gradcheck(fn, inputs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_computes_in_fp32(dtype):
    inputs = make_inputs("ST", "per_sample", 2, 2, 7, dtype=dtype)
    grad_out = grad_like(inputs)
    out, grads = run("cpu", inputs, 2, "sigmoid", "ST", grad_out)
    ref, ref_grads = run("cpu", [None if t is None else t.float() for t in inputs], 2, "sigmoid", "ST",
                         grad_out.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert torch.equal(out, ref.to(dtype))  # fp32 compute, one rounding at the end
    for g, w in zip(grads, ref_grads):  # the saved output is rounded, so act' differs slightly
        torch.testing.assert_close(g, w.to(dtype), rtol=5e-2, atol=1e-2)


# ---------------------------------------------------------------- torch.library integration

@needs_ext
@pytest.mark.parametrize("axis,support_kind,cheb_k,activation,bias", [
    ("S", "shared", 2, None, True), ("T", "per_sample", 3, "sigmoid", True), ("ST", "per_sample", 2, "tanh", False),
    ("ST", "none", 1, None, True),
])
def test_opcheck_with_cpu_backend(axis, support_kind, cheb_k, activation, bias):
    inputs = [None if t is None else t.requires_grad_() for t in make_inputs(axis, support_kind, cheb_k, 2, 5,
                                                                              bias=bias)]
    torch.library.opcheck(torch.ops.stfast.meta_gconv.default, (*inputs, cheb_k, activation, axis, "cpu"))


@needs_ext
def test_torch_compile_fullgraph_with_cpu_backend():
    torch._dynamo.reset()
    x, supports, e, pool, bias_pool = make_inputs("ST", "per_sample", 2, 2, 7)
    pool = torch.nn.Parameter(pool)

    def layer(x, supports, e):
        return ops.meta_gconv(x, supports, e, pool, bias_pool, 2, "sigmoid") * 2

    with ops.use_backend("cpu"):
        out = torch.compile(layer, fullgraph=True)(x, supports, e)
        out.sum().backward()
        torch.testing.assert_close(out, layer(x, supports, e))
    expected_grad = torch.autograd.grad(layer(x, supports, e).sum(), pool)[0]
    torch.testing.assert_close(pool.grad, expected_grad)


@needs_ext
def test_ext_ops_are_registered_for_cpu():
    info = _ext.build_info()
    assert "openmp=1" in info, info  # at::parallel_for is serial without OpenMP
    for op in _ext._OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stfast_ext::{op}", "CPU"), op


# ---------------------------------------------------------------- determinism

@needs_ext
@pytest.mark.parametrize("axis", AXES)
def test_cpu_is_bitwise_deterministic(axis):
    # M = 4 * 97 = 388 rows: a dozen row tiles, several reduction parts on two threads.
    inputs = make_inputs(axis, "per_sample", 2, 4, 97, channels=7, dim=5, outputs=33)
    grad_out = grad_like(inputs)
    first = run("cpu", inputs, 2, "tanh", axis, grad_out)
    for _ in range(2):
        again = run("cpu", inputs, 2, "tanh", axis, grad_out)
        assert torch.equal(again[0], first[0])
        for name, g, w in zip(NAMES, again[1], first[1]):
            assert torch.equal(g, w), name


# ---------------------------------------------------------------- bad input: TORCH_CHECK messages

def _call_fwd(x, supports, e, pool, bias_pool, cheb_k=2, activation=None, axis="ST", formulation="auto"):
    return torch.ops.stfast_ext.meta_gconv_fwd(x, supports, e, pool, bias_pool, cheb_k, activation, axis, formulation)


@needs_ext
@pytest.mark.parametrize("change,error,message", [
    (lambda a: a.update(x=a["x"][0]), ValueError, r"x: expected shape \(B, N, C\), got \[7, 5\]"),
    (lambda a: a.update(x=a["x"].int()), TypeError,
     r"x: expected dtype float32, float64, float16 or bfloat16, got Int"),
    (lambda a: a.update(supports=a["supports"][:, :6]), ValueError,
     r"supports: expected shape \(N, N\) = \(7, 7\) or \(B, N, N\) = \(2, 7, 7\), got \[2, 6, 7\]"),
    (lambda a: a.update(supports=None), ValueError, r"cheb_k: supports is None .* expected cheb_k 1, got 2"),
    (lambda a: a.update(cheb_k=0), ValueError, r"cheb_k: expected an int >= 1, got 0"),
    (lambda a: a.update(e=a["e"][:, :5]), ValueError,
     r"embeddings: expected shape \(B, N, D\) with B = 2, N = 7 for axis 'ST', got \[2, 5, 3\]"),
    (lambda a: a.update(axis="S"), ValueError, r"embeddings: expected shape \(N, D\) .* for axis 'S', got \[2, 7, 3\]"),
    (lambda a: a.update(pool=a["pool"][:, :9]), ValueError,
     r"weights_pool: expected shape \(D, cheb_k\*C, O\) = \(3, 10, O\), got \[3, 9, 6\]"),
    (lambda a: a.update(bias_pool=a["bias_pool"][:, :4]), ValueError,
     r"bias_pool: expected shape \(D, O\) = \(3, 6\), got \[3, 4\]"),
    (lambda a: a.update(pool=a["pool"].double()), TypeError,
     r"weights_pool: expected dtype float32 \(the dtype of x\), got float64"),
    (lambda a: a.update(activation="relu"), ValueError, r"activation: expected None, 'sigmoid' or 'tanh', got 'relu'"),
    (lambda a: a.update(axis="N"), ValueError, r"axis: expected 'S', 'T' or 'ST', got 'N'"),
    (lambda a: a.update(formulation="fast"), ValueError, r"formulation: expected 'auto', 'outer' or 'grouped'"),
    (lambda a: a.update(formulation="grouped"), ValueError, r"formulation: 'grouped' needs axis 'S' or 'T'"),
])
def test_forward_checks_name_argument_expected_and_actual(change, error, message):
    x, supports, e, pool, bias_pool = make_inputs("ST", "per_sample", 2, 2, 7)
    args = {"x": x, "supports": supports, "e": e, "pool": pool, "bias_pool": bias_pool}
    change(args)
    with pytest.raises(error, match=r"stfast_ext::meta_gconv_fwd: " + message):
        _call_fwd(**args)


@needs_ext
def test_backward_checks_grad_and_out():
    x, supports, e, pool, bias_pool = make_inputs("ST", "per_sample", 2, 2, 7)
    grad = torch.randn(2, 7, 6)
    needs = [True] * 5
    with pytest.raises(ValueError, match=r"stfast_ext::meta_gconv_bwd: grad: expected shape \(B, N, O\) = "
                                         r"\(2, 7, 6\), got \[2, 7, 5\]"):
        torch.ops.stfast_ext.meta_gconv_bwd(grad[..., :5], None, x, supports, e, pool, bias_pool, 2, None, "ST",
                                            needs, "auto")
    with pytest.raises(ValueError, match=r"stfast_ext::meta_gconv_bwd: out: expected the forward output .* "
                                         r"because activation is not None, got None"):
        torch.ops.stfast_ext.meta_gconv_bwd(grad, None, x, supports, e, pool, bias_pool, 2, "tanh", "ST", needs,
                                            "auto")


@needs_ext
def test_noncontiguous_inputs_are_accepted_by_the_ext_op():
    x, supports, e, pool, bias_pool = make_inputs("ST", "per_sample", 2, 2, 7)
    pool_t = pool.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    e_t = e.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(_call_fwd(x, supports, e_t, pool_t, bias_pool),
                               _call_fwd(x, supports, e, pool, bias_pool))


# ---------------------------------------------------------------- loader, selection, reasons

def test_available_backends_explains_cpu_and_cuda():
    status = ops.available_backends("cpu", "meta_gconv")
    assert status["cpu"] is True or "extension" in status["cpu"]
    assert status["cpu"] == STATUS
    assert isinstance(status["cuda"], str) and "CUDA device" in status["cuda"]
    assert ops.available_backends("cpu", "node_lora")["cpu"] == STATUS
    assert ops.available_backends("cpu", "gconv")["cpu"] == "no gconv kernel yet" + (
        "" if STATUS is True else f"; {STATUS}")


def test_auto_follows_the_measured_preference():
    first = next(name for name in backends._AUTO_PREFERENCE["cpu"]
                 if ops.available_backends("cpu", "meta_gconv")[name] is True)
    assert ops.resolve_backend("meta_gconv", "cpu") == first


def test_failed_load_is_reported_and_torch_still_works(monkeypatch):
    monkeypatch.setattr(_ext, "_state", None)
    monkeypatch.setattr(_ext, "_registered", lambda: False)
    monkeypatch.setattr(_ext, "_load_installed", lambda: "stfast._C is not installed")
    monkeypatch.setattr(_ext, "_load_jit", lambda: "just-in-time build of csrc/ failed (c++: not found)")
    status = ops.available_backends("cpu", "meta_gconv")
    assert "stfast._C is not installed" in status["cpu"] and "c++: not found" in status["cpu"]
    assert ops.resolve_backend("meta_gconv", "cpu") == "torch"
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run meta_gconv on cpu: .*c\+\+: not found"), \
            ops.use_backend("cpu"):
        ops.meta_gconv(*make_inputs("ST", "shared", 2, 2, 5), 2)


def test_short_error_keeps_the_compiler_errors():
    err = RuntimeError("Error building extension 'x'\n[1/2] c++ ...\nfoo.cpp:3:1: error: 'bar' was not declared\n"
                       "ninja: build stopped")
    short = _ext._short_error(err)
    assert "error: 'bar' was not declared" in short and len(short) <= 600


def test_skip_env_disables_the_extension_and_everything_else_works():
    code = (
        "import torch, stfast.ops as ops\n"
        "s = ops.available_backends('cpu', 'meta_gconv')\n"
        "assert 'STFAST_SKIP_EXT=1' in s['cpu'], s\n"
        "x = torch.randn(2, 5, 3); e = torch.randn(2, 5, 4); p = torch.randn(4, 3, 2)\n"
        "assert ops.resolve_backend('meta_gconv', 'cpu') == 'torch'\n"
        "ops.meta_gconv(x, None, e, p, None, 1).sum()\n"
        "print(s['cpu'])\n"
    )
    env = dict(os.environ, STFAST_SKIP_EXT="1")
    env.pop(backends.ENV_VAR, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "disabled" in done.stdout


def test_sources_hash_and_jit_folder_depend_on_sources(tmp_path):
    root = tmp_path / "csrc"
    (root / "cpu").mkdir(parents=True)
    (root / "stfast_ext.cpp").write_text("// a\n")
    (root / "cpu" / "k.cpp").write_text("// b\n")
    (root / "cuda").mkdir()
    (root / "cuda" / "k.cu").write_text("// c\n")
    before = _ext.sources_hash(root)
    assert [p.name for p in _ext.source_files(root, cuda=False)] == ["stfast_ext.cpp", "k.cpp"]
    assert [p.name for p in _ext.source_files(root, cuda=True)][-1] == "k.cu"
    (root / "cpu" / "k.cpp").write_text("// changed\n")
    assert _ext.sources_hash(root) != before
    assert _ext.jit_build_dir(root, False)[1] != _ext.jit_build_dir(root, True)[1]


# ---------------------------------------------------------------- CUDA sources: compile only

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    arch = os.environ.get("STFAST_NVCC_CHECK_ARCH", "sm_90").split()[0]  # csrc/cuda/compile_check.sh does them all
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        target = tmp_path / (source.stem + ".o")
        done = subprocess.run(
            ["nvcc", "-c", "-std=c++17", f"-arch={arch}", "-O1", str(source), "-o", str(target)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert done.returncode == 0, f"{source.name}:\n{done.stderr[-4000:]}"


# ---------------------------------------------------------------- CUDA kernels (GPU machines only)

CUDA_CASES = [
    ("ST", "per_sample", 2, 2, 67, 5, 3, 70, "sigmoid", True),
    ("S", "shared", 3, 3, 37, 3, 2, 5, "tanh", True),
    ("T", "none", 1, 2, 13, 7, 4, 9, None, False),
    ("T", "per_sample", 2, 3, 100, 40, 3, 130, None, True),
]


@needs_cuda_ext
@pytest.mark.parametrize("axis,support_kind,cheb_k,batch,nodes,channels,dim,outputs,activation,bias", CUDA_CASES)
def test_cuda_matches_torch_fp32(axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs, activation, bias):
    inputs = make_inputs(axis, support_kind, cheb_k, batch, nodes, channels, dim, outputs, bias=bias, device="cuda")
    grad_out = grad_like(inputs)
    torch.backends.cuda.matmul.allow_tf32 = False
    got = run("cuda", inputs, cheb_k, activation, axis, grad_out)
    assert_matches(got, run("torch", inputs, cheb_k, activation, axis, grad_out), rtol=1e-4, atol=1e-4)


@needs_cuda_ext
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor_cores", "simt"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_cuda_half_precision_accumulates_in_fp32(dtype, tol, tensor_cores):
    inputs = make_inputs("ST", "per_sample", 2, 2, 67, 5, 3, 70, device="cuda", dtype=dtype)
    grad_out = grad_like(inputs)
    with ops.cuda_tensor_cores(tensor_cores):
        got = run("cuda", inputs, 2, "tanh", "ST", grad_out)
    want = expected(inputs, 2, "tanh", "ST", grad_out)
    assert_matches(got, want, rtol=tol, atol=tol)


@needs_cuda_ext
def test_cuda_fp32_uses_tf32_only_where_torch_allows_it(monkeypatch):
    inputs = make_inputs("ST", "per_sample", 2, 2, 67, 5, 3, 70, device="cuda")
    grad_out = grad_like(inputs)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ieee = run("cuda", inputs, 2, "tanh", "ST", grad_out)
    with ops.cuda_tensor_cores(False):
        simt = run("cuda", inputs, 2, "tanh", "ST", grad_out)
    assert torch.equal(ieee[0], simt[0]) and all(torch.equal(a, b) for a, b in zip(ieee[1], simt[1]) if a is not None)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = run("cuda", inputs, 2, "tanh", "ST", grad_out)
    assert_matches(tf32, expected(inputs, 2, "tanh", "ST", grad_out), rtol=1e-2, atol=1e-2)
    if torch.cuda.get_device_capability()[0] >= 8:  # the tensor-core path ran: TF32 rounding shows
        assert not torch.equal(tf32[0], ieee[0])


@needs_cuda_ext
@pytest.mark.parametrize("axis", AXES)
def test_cuda_gradcheck_float64_and_determinism(axis):
    inputs = [t.requires_grad_() for t in make_inputs(axis, "per_sample", 2, 2, 3, channels=2, dim=2, outputs=2,
                                                      dtype=torch.float64, device="cuda")]

    def fn(*args):
        with ops.use_backend("cuda"):
            return ops.meta_gconv(*args, 2, "sigmoid", axis=axis)

    assert torch.autograd.gradcheck(fn, inputs)
    big = make_inputs(axis, "per_sample", 2, 4, 300, 7, 5, 33, device="cuda")
    grad_out = grad_like(big)
    first = run("cuda", big, 2, "tanh", axis, grad_out)
    again = run("cuda", big, 2, "tanh", axis, grad_out)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


@needs_cuda_ext
def test_opcheck_with_cuda_backend():
    inputs = [t.requires_grad_() for t in make_inputs("ST", "per_sample", 2, 2, 5, device="cuda")]
    torch.library.opcheck(torch.ops.stfast.meta_gconv.default, (*inputs, 2, "tanh", "ST", "cuda"))


def test_cuda_tensor_cores_switch_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.delenv(_ext.TENSOR_CORES_ENV, raising=False)
    with ops.cuda_tensor_cores(False):
        assert os.environ[_ext.TENSOR_CORES_ENV] == "0"
        with ops.cuda_tensor_cores(True):
            assert os.environ[_ext.TENSOR_CORES_ENV] == "1"
        assert os.environ[_ext.TENSOR_CORES_ENV] == "0"
    assert _ext.TENSOR_CORES_ENV not in os.environ
    monkeypatch.setenv(_ext.TENSOR_CORES_ENV, "0")
    with pytest.raises(RuntimeError, match="inside"), ops.cuda_tensor_cores(True):
        raise RuntimeError("inside")
    assert os.environ[_ext.TENSOR_CORES_ENV] == "0"
    with pytest.raises(TypeError, match="enabled: expected a bool, got int"), ops.cuda_tensor_cores(1):
        pass


def test_every_case_list_covers_every_axis_and_support_kind():
    for axis, kind in itertools.product(AXES, ("shared", "per_sample", "none")):
        assert any(c[0] == axis and c[1] == kind for c in CASES), (axis, kind)
