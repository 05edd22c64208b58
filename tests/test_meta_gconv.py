"""stfast.ops.meta_gconv / gconv: values and gradients against a naive materialising einsum,
gradcheck, opcheck, torch.compile, the backend selection API and bad-input errors."""

import itertools

import pytest
import torch

import stfast.ops as ops
from stfast.ops import _torch_gconv, backends

AXES = ("S", "T", "ST")


# ---------------------------------------------------------------- naive oracle

def naive_chebyshev(supports, cheb_k, n, dtype):
    """The T_k matrices, built explicitly."""
    eye = torch.eye(n, dtype=dtype)
    if supports is None:
        return [eye]
    eye = eye.expand_as(supports)
    mats = [eye, supports][:cheb_k]
    for _ in range(2, cheb_k):
        mats.append(2 * supports @ mats[-1] - mats[-2])
    return mats


def naive_meta_gconv(x, supports, e, pool, bias_pool, cheb_k, axis, activation=None):
    mats = naive_chebyshev(supports, cheb_k, x.shape[1], x.dtype)
    pattern = "bnm,bmc->bnc" if mats[0].dim() == 3 else "nm,bmc->bnc"
    xg = torch.cat([torch.einsum(pattern, t, x) for t in mats], dim=-1)
    if axis == "S":
        y = torch.einsum("bni,nio->bno", xg, torch.einsum("nd,dio->nio", e, pool))
    elif axis == "T":
        y = torch.einsum("bni,bio->bno", xg, torch.einsum("bd,dio->bio", e, pool))
    else:
        y = torch.einsum("bni,bnio->bno", xg, torch.einsum("bnd,dio->bnio", e, pool))
    if bias_pool is not None:
        bias = e @ bias_pool
        y = y + (bias[:, None] if axis == "T" else bias)
    return {None: y, "sigmoid": torch.sigmoid(y), "tanh": torch.tanh(y)}[activation]


def make_inputs(axis, support_kind, cheb_k, batch, nodes, channels=5, dim=4, outputs=3, dtype=torch.float32,
                bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    x = rand(batch, nodes, channels)
    supports = {
        "shared": lambda: rand(nodes, nodes, scale=1 / nodes**0.5),
        "per_sample": lambda: rand(batch, nodes, nodes, scale=1 / nodes**0.5),
        "none": lambda: None,
    }[support_kind]()
    e = rand(*{"S": (nodes, dim), "T": (batch, dim), "ST": (batch, nodes, dim)}[axis])
    pool = rand(dim, cheb_k * channels, outputs, scale=0.3)
    bias_pool = rand(dim, outputs) if bias else None
    return x, supports, e, pool, bias_pool


def leaves(*tensors):
    return [t for t in tensors if t is not None]


def compare_to_naive(axis, support_kind, cheb_k, batch, nodes, activation=None, bias=True):
    x, supports, e, pool, bias_pool = make_inputs(axis, support_kind, cheb_k, batch, nodes, bias=bias)
    inputs = leaves(x, supports, e, pool, bias_pool)
    out = ops.meta_gconv(x, supports, e, pool, bias_pool, cheb_k, activation, axis=axis)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    # The oracle runs in float64 on the same values, so the fp32 op is checked against exact math.
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(inputs64)
    args64 = [next(it) if t is not None else None for t in (x, supports, e, pool, bias_pool)]
    expected = naive_meta_gconv(*args64, cheb_k, axis, activation)
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double(), allow_unused=True,
                                         materialize_grads=True)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


CASES = [
    (axis, kind, k, b, n)
    for axis, (kind, k), b, n in itertools.product(
        AXES, [("shared", 1), ("shared", 2), ("shared", 3), ("per_sample", 1), ("per_sample", 2),
               ("per_sample", 3), ("none", 1)], (1, 3), (1, 7, 37)
    )
]


@pytest.mark.parametrize("axis,support_kind,cheb_k,batch,nodes", CASES)
def test_meta_gconv_matches_naive(axis, support_kind, cheb_k, batch, nodes):
    compare_to_naive(axis, support_kind, cheb_k, batch, nodes)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("axis", AXES)
def test_meta_gconv_epilogue_matches_naive(axis, activation):
    compare_to_naive(axis, "per_sample", 3, 3, 7, activation=activation)
    compare_to_naive(axis, "shared", 2, 3, 7, activation=activation, bias=False)


# Hoisted weights exist only for the S and T axes (for ST they would be the per-(sample, node) weights).
@pytest.mark.parametrize("axis, formulation", [(a, f) for a in AXES for f in ("outer", "contract", "hoisted")
                                               if (a, f) != ("ST", "hoisted")])
def test_every_formulation_matches_naive(monkeypatch, axis, formulation):
    monkeypatch.setitem(_torch_gconv.FORMULATION, axis, formulation)
    compare_to_naive(axis, "shared", 3, 3, 7)
    compare_to_naive(axis, "per_sample", 2, 3, 7, activation="tanh")


@pytest.mark.parametrize("axis", AXES)
def test_meta_gconv_gradcheck_float64(axis):
    x, supports, e, pool, bias_pool = make_inputs(axis, "per_sample", 3, 2, 3, channels=2, dim=2, outputs=2,
                                                  dtype=torch.float64)

    def fn(*args):
        return ops.meta_gconv(*args, 3, "tanh", axis=axis)

    assert torch.autograd.gradcheck(fn, (x, supports, e, pool, bias_pool))


def test_gconv_gradcheck_and_values():
    gen = torch.Generator().manual_seed(1)
    x, supports = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64), torch.randn(2, 4, 4, generator=gen,
                                                                                         dtype=torch.float64)
    weight, bias = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen,
                                                                                       dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, supports, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: ops.gconv(*a, 3, "sigmoid"), args)
    mats = naive_chebyshev(supports, 3, 4, torch.float64)
    xg = torch.cat([m @ x for m in mats], dim=-1)
    torch.testing.assert_close(ops.gconv(x, supports, weight, bias, 3), xg @ weight + bias)
    torch.testing.assert_close(ops.gconv(x, None, weight[:3], None, 1), x @ weight[:3])


def test_axis_is_inferred_from_the_embeddings():
    x, supports, e, pool, bias_pool = make_inputs("T", "shared", 2, 3, 7)
    torch.testing.assert_close(ops.meta_gconv(x, supports, e, pool, bias_pool, 2),
                               naive_meta_gconv(x, supports, e, pool, bias_pool, 2, "T"), rtol=1e-5, atol=1e-5)
    x, supports, e, pool, bias_pool = make_inputs("S", "shared", 2, 3, 7)
    torch.testing.assert_close(ops.meta_gconv(x, supports, e, pool, bias_pool, 2),
                               naive_meta_gconv(x, supports, e, pool, bias_pool, 2, "S"), rtol=1e-5, atol=1e-5)


def test_ambiguous_embeddings_need_an_axis():
    x, supports, e, pool, bias_pool = make_inputs("S", "shared", 2, 4, 4)
    with pytest.raises(ValueError, match=r"axis: .*B == N == 4.*axis='S'"):
        ops.meta_gconv(x, supports, e, pool, bias_pool, 2)
    for axis in ("S", "T"):
        expected = naive_meta_gconv(x, supports, e, pool, bias_pool, 2, axis)
        torch.testing.assert_close(ops.meta_gconv(x, supports, e, pool, bias_pool, 2, axis=axis), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    x, supports, e, pool, bias_pool = make_inputs("ST", "per_sample", 2, 2, 7, dtype=dtype)
    out = ops.meta_gconv(x, supports, e, pool, bias_pool, 2, "sigmoid")
    out.sum().backward()
    assert out.dtype == dtype and x.grad.dtype == dtype and torch.isfinite(pool.grad.float()).all()


# ---------------------------------------------------------------- torch.library integration

@pytest.mark.parametrize("axis,support_kind,cheb_k,activation", [
    ("S", "shared", 2, None), ("T", "per_sample", 3, "sigmoid"), ("ST", "per_sample", 2, "tanh"),
    ("ST", "none", 1, None),
])
def test_opcheck_meta_gconv(axis, support_kind, cheb_k, activation):
    x, supports, e, pool, bias_pool = make_inputs(axis, support_kind, cheb_k, 2, 5)
    torch.library.opcheck(torch.ops.stfast.meta_gconv.default,
                          (x, supports, e, pool, bias_pool, cheb_k, activation, axis, "torch"))


def test_opcheck_meta_gconv_without_bias_or_grads():
    x, supports, e, pool, _ = make_inputs("ST", "shared", 2, 2, 5)
    torch.library.opcheck(torch.ops.stfast.meta_gconv.default, (x, supports.detach(), e, pool, None, 2, None, "ST", "torch"))


def test_opcheck_gconv():
    x = torch.randn(2, 5, 3, requires_grad=True)
    supports = torch.randn(5, 5, requires_grad=True)
    weight, bias = torch.randn(6, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.stfast.gconv.default, (x, supports, weight, bias, 2, "tanh", "torch"))


class TinyMetaLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.Parameter(torch.randn(4, 10, 3) * 0.3)
        self.bias_pool = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x, supports, e):
        return ops.meta_gconv(x, supports, e, self.pool, self.bias_pool, 2, "sigmoid") * 2


def test_torch_compile_fullgraph():
    """Default inductor backend (a C compiler is available here)."""
    torch._dynamo.reset()
    layer = TinyMetaLayer()
    compiled = torch.compile(layer, fullgraph=True)
    x, supports, e = torch.randn(3, 7, 5), torch.rand(3, 7, 7), torch.randn(3, 7, 4)
    out = compiled(x, supports, e)
    torch.testing.assert_close(out, layer(x, supports, e))
    out.sum().backward()
    assert layer.pool.grad is not None and layer.pool.grad.shape == layer.pool.shape


# ---------------------------------------------------------------- backend selection

@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter makes triton runnable on CPU
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def test_available_backends_lists_every_backend(clean_backend):
    status = ops.available_backends("cpu")
    assert set(status) == {"torch", "triton", "cuda", "cpu"}
    assert status["torch"] is True
    for name in ("triton", "cuda"):
        assert isinstance(status[name], str) and status[name]
    assert "CUDA device" in status["cuda"]
    # cpu: the C++ extension when it built here, else the reason it did not
    assert status["cpu"] is True or "extension" in status["cpu"]


def test_set_and_use_backend(clean_backend):
    assert ops.current_backend() == "auto"
    expected_auto = "cpu" if ops.available_backends("cpu", "meta_gconv")["cpu"] is True else "torch"
    assert ops.resolve_backend("meta_gconv", "cpu") == expected_auto
    ops.set_backend("torch")
    assert ops.current_backend() == "torch"
    with ops.use_backend("triton"):
        assert ops.current_backend() == "triton"
    assert ops.current_backend() == "torch"
    ops.set_backend("auto")
    assert ops.current_backend() == "auto"


def test_env_var_applies_without_explicit_choice(clean_backend, monkeypatch):
    monkeypatch.setenv("STFAST_BACKEND", "cuda")
    assert ops.current_backend() == "cuda"
    ops.set_backend("torch")
    assert ops.current_backend() == "torch"
    ops.set_backend(None)
    monkeypatch.setenv("STFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="STFAST_BACKEND: backend: expected one of auto, torch"):
        ops.current_backend()


@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_forcing_an_unavailable_backend_explains_every_backend(clean_backend, forced):
    x, supports, e, pool, bias_pool = make_inputs("S", "shared", 2, 3, 7)
    with ops.use_backend(forced), pytest.raises(RuntimeError) as info:
        ops.meta_gconv(x, supports, e, pool, bias_pool, 2)
    message = str(info.value)
    assert f"backend {forced!r} cannot run meta_gconv" in message
    for name in ("torch: available", "triton:", "cuda:", "cpu:"):
        assert name in message


def test_unknown_backend_name(clean_backend):
    with pytest.raises(ValueError, match="backend: expected one of auto, torch, triton, cuda, cpu, got 'tpu'"):
        ops.set_backend("tpu")


# ---------------------------------------------------------------- bad input

def _good():
    x, supports, e, pool, bias_pool = make_inputs("ST", "shared", 2, 3, 7)
    return dict(x=x.detach(), supports=supports.detach(), embeddings=e.detach(), weights_pool=pool.detach(),
                bias_pool=bias_pool.detach(), cheb_k=2)


BAD_META = [
    ("x", lambda a: a["x"][0], ValueError, r"x: expected shape \(B, N, C\), got \(7, 5\)"),
    ("x", lambda a: a["x"].transpose(0, 1).contiguous().transpose(0, 1), ValueError, "x: expected a contiguous"),
    ("x", lambda a: a["x"].long(), TypeError, "x: expected a floating-point tensor"),
    ("supports", lambda a: a["supports"][:5, :5], ValueError, r"supports: expected shape \(7, 7\), got \(5, 5\)"),
    ("supports", lambda a: a["supports"][None, None], ValueError, r"supports: expected shape \(N, N\)"),
    ("supports", lambda a: torch.rand(2, 7, 7), ValueError, r"supports: expected shape \(3, 7, 7\)"),
    ("supports", lambda a: a["supports"].double(), TypeError, "supports: expected dtype torch.float32"),
    ("supports", lambda a: None, ValueError, "cheb_k: supports is None .* expected cheb_k 1, got 2"),
    ("embeddings", lambda a: a["embeddings"][:, :5], ValueError, r"embeddings: expected shape \(3, 7, D\)"),
    ("embeddings", lambda a: a["embeddings"].double(), TypeError, "embeddings: expected dtype torch.float32"),
    ("weights_pool", lambda a: a["weights_pool"][:3], ValueError, r"weights_pool: expected shape \(4, 10, O\)"),
    ("weights_pool", lambda a: a["weights_pool"][:, :9], ValueError, r"weights_pool: expected shape \(4, 10, O\)"),
    ("bias_pool", lambda a: a["bias_pool"][:, :2], ValueError, r"bias_pool: expected shape \(4, 3\), got \(4, 2\)"),
    ("bias_pool", lambda a: a["bias_pool"].half(), TypeError, "bias_pool: expected dtype torch.float32"),
    ("cheb_k", lambda a: 0, ValueError, "cheb_k: expected an int >= 1, got 0"),
    ("cheb_k", lambda a: 2.0, TypeError, "cheb_k: expected an int >= 1, got 2.0"),
]


@pytest.mark.parametrize("name,corrupt,error,match", BAD_META)
def test_meta_gconv_bad_input(name, corrupt, error, match):
    args = _good()
    args[name] = corrupt(args)
    with pytest.raises(error, match=match):
        ops.meta_gconv(**args)


def test_meta_gconv_bad_options():
    args = _good()
    with pytest.raises(ValueError, match="activation: expected one of None, 'sigmoid', 'tanh', got 'relu'"):
        ops.meta_gconv(**args, activation="relu")
    with pytest.raises(ValueError, match="axis: expected one of None, 'S', 'T', 'ST', got 'X'"):
        ops.meta_gconv(**args, axis="X")
    with pytest.raises(ValueError, match=r"embeddings: expected shape \(7, D\)"):
        ops.meta_gconv(**args, axis="S")
    args["embeddings"] = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"embeddings: expected shape \(N, D\) = \(7, D\) or \(B, D\) = \(3, D\)"):
        ops.meta_gconv(**args)


def test_meta_gconv_bad_device():
    args = _good()
    args["embeddings"] = args["embeddings"].to("meta")
    with pytest.raises(ValueError, match="embeddings: expected device cpu"):
        ops.meta_gconv(**args)


def test_gconv_bad_input():
    x, supports = torch.randn(3, 7, 5), torch.rand(7, 7)
    with pytest.raises(ValueError, match=r"weight: expected shape \(10, O\), got \(9, 4\)"):
        ops.gconv(x, supports, torch.randn(9, 4), None, 2)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4\), got \(3,\)"):
        ops.gconv(x, supports, torch.randn(10, 4), torch.randn(3), 2)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        ops.gconv(x, supports, torch.randn(10, 4, dtype=torch.float64), None, 2)
