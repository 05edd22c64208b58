"""stfast.ops.node_lora on the CPU backends (``torch``, and ``cpu`` from the C++ extension): values
and every gradient against a naive per-node loop, gradcheck, dropout determinism and consistency,
opcheck, torch.compile, backend selection and bad-input errors. Every test runs once per backend."""

import itertools

import pytest
import torch

import stfast.ops as ops
from stfast.ops import _ext, _torch_lora, backends
from stfast.ops.node_lora import dropout_seed

EXT = _ext.load()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, params=["torch", "cpu"])
def backend(request, monkeypatch):
    """The backend every op call of the test runs on."""
    if request.param == "cpu" and EXT is not True:
        pytest.skip(f"cpu backend unavailable: {EXT}")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


def drawn_mask(x_shape, dropout_p, seed, offset, dtype=torch.float64):
    """The dropout multiplier the current backend draws for ``x`` of ``x_shape``: the torch backend
    from a ``torch.Generator`` over ``(M, N, d_in)``, the C++ kernels with Triton's Philox."""
    if ops.current_backend() == "cpu":
        return _ext.node_lora_dropout_mask(torch.empty(x_shape, dtype=dtype), dropout_p, seed, offset)
    rows_shape = (-1, *x_shape[-2:])
    flat = torch.empty(x_shape).reshape(rows_shape).shape
    return _torch_lora.dropout_mask(flat, dropout_p, seed, offset, "cpu", dtype).reshape(x_shape)


# ---------------------------------------------------------------- naive oracle

ACT = {
    None: lambda h: h,
    "leaky_relu": lambda h: torch.nn.functional.leaky_relu(h, 0.01),
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def naive_node_lora(x, weight, bias, lora_a, lora_b, scale, activation="leaky_relu", mask=None):
    """One node at a time: ``x[..., n, :] @ W^T + b + scale * act(drop(x[..., n, :]) @ A[n]) @ B[n]``."""
    outs = []
    for n in range(x.shape[-2]):
        xn = x[..., n, :]
        low_in = xn if mask is None else xn * mask[..., n, :]
        y = xn @ weight.t() + scale * ACT[activation](low_in @ lora_a[n]) @ lora_b[n]
        outs.append(y if bias is None else y + bias)
    return torch.stack(outs, dim=-2)


def make_inputs(lead, nodes, d_in, d_out, rank, *, bias=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    x = rand(*lead, nodes, d_in)
    weight = rand(d_out, d_in, scale=d_in**-0.5)
    b = rand(d_out) if bias else None
    lora_a = rand(nodes, d_in, rank, scale=d_in**-0.5)
    lora_b = rand(nodes, rank, d_out, scale=rank**-0.5)
    return x, weight, b, lora_a, lora_b


NAMES = ("x", "weight", "bias", "lora_a", "lora_b")


def compare_to_naive(inputs, scale=0.7, activation="leaky_relu", requires=(True,) * 5, dropout_p=0.0, seed=3,
                     offset=0, rtol=1e-5, atol=1e-5):
    inputs = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    out = ops.node_lora(*inputs, scale, activation, dropout_p=dropout_p, training=True, seed=seed, offset=offset)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out) if leaves else ()
    # The oracle runs in float64 on the same values, so the fp32 op is checked against exact math.
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    mask = drawn_mask(inputs[0].shape, dropout_p, seed, offset) if dropout_p > 0 else None
    expected = naive_node_lora(*inputs64, scale, activation, mask=mask)
    leaves64 = [t for t in inputs64 if t is not None and t.requires_grad]
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double()) if leaves64 else ()
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=rtol, atol=atol)
    names = [n for n, t in zip(NAMES, inputs) if t is not None and t.requires_grad]
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, msg=lambda m, n=name: f"d {n}: {m}")
    return out, dict(zip(names, grads))


# ---------------------------------------------------------------- values and gradients

# N in {1, 5, 37} x rank in {1, 3, 16, 64} x 0, 1 or 2 leading axes; d_in != d_out, neither a power of two.
CASES = list(itertools.product((1, 5, 37), (1, 3, 16, 64), ((), (3,), (2, 3))))


@pytest.mark.parametrize("nodes,rank,lead", CASES)
def test_matches_naive_loop(nodes, rank, lead):
    compare_to_naive(make_inputs(lead, nodes, 7, 11, rank))


@pytest.mark.parametrize("activation", [None, "relu", "tanh", "sigmoid"])
def test_every_activation_matches_naive(activation):
    compare_to_naive(make_inputs((2, 3), 5, 13, 6, 3), activation=activation)
    compare_to_naive(make_inputs((4,), 5, 13, 6, 3, bias=False), scale=2.0, activation=activation)


@pytest.mark.parametrize("requires", [
    (True, False, False, False, False), (False, True, True, False, False), (False, False, False, True, False),
    (False, False, False, False, True), (False, False, False, False, False),
])
def test_gradient_subsets(requires):
    compare_to_naive(make_inputs((3,), 5, 7, 11, 3), requires=requires)


def test_empty_batch():
    x, weight, bias, lora_a, lora_b = make_inputs((0,), 5, 7, 11, 3)
    out = ops.node_lora(x, weight, bias, lora_a, lora_b, 1.0)
    assert out.shape == (0, 5, 11)
    out.sum().backward()
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_non_contiguous_input():
    x, weight, bias, lora_a, lora_b = make_inputs((5, 3), 4, 7, 6, 3)
    x_t = x.detach().transpose(0, 1).requires_grad_()  # (3, 5, 4, 7) with batch axes swapped
    compare_to_naive((x_t, weight, bias, lora_a, lora_b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    x, weight, bias, lora_a, lora_b = make_inputs((2,), 5, 7, 11, 3, dtype=dtype)
    out = ops.node_lora(x, weight, bias, lora_a, lora_b, 0.5, dropout_p=0.2, training=True, seed=1)
    out.sum().backward()
    assert out.dtype == dtype and x.grad.dtype == dtype and torch.isfinite(lora_a.grad.float()).all()


@pytest.mark.parametrize("activation,dropout_p,lead", [("leaky_relu", 0.0, (2,)), ("tanh", 0.3, (2, 2)),
                                                       ("sigmoid", 0.5, ())])
def test_gradcheck_float64(activation, dropout_p, lead):
    inputs = make_inputs(lead, 3, 4, 5, 2, dtype=torch.float64)

    def fn(*args):
        return ops.node_lora(*args, 0.8, activation, dropout_p=dropout_p, training=True, seed=11, offset=5)

    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------- dropout

def test_dropout_matches_naive_with_the_regenerated_mask():
    """Output and every gradient equal the naive loop with the mask the op draws from (seed, offset):
    the backward regenerates the forward's mask."""
    inputs = make_inputs((2, 3), 5, 7, 11, 3)
    out, _ = compare_to_naive(inputs, dropout_p=0.4, seed=123, offset=17)
    no_dropout = ops.node_lora(*inputs, 0.7, training=True, dropout_p=0.0)
    assert not torch.allclose(out, no_dropout)


def test_dropout_same_seed_same_result():
    inputs = make_inputs((4,), 5, 7, 11, 3)
    runs = []
    for seed, offset in ((5, 0), (5, 0), (6, 0), (5, 1)):
        out = ops.node_lora(*inputs, 0.7, dropout_p=0.5, training=True, seed=seed, offset=offset)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        runs.append((out.detach(), grads))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][0], runs[3][0])


def test_dropout_zero_and_eval_equal_the_plain_path():
    inputs = make_inputs((2, 3), 5, 7, 11, 3)
    plain = ops.node_lora(*inputs, 0.7)
    assert torch.equal(ops.node_lora(*inputs, 0.7, dropout_p=0.0, training=True, seed=9), plain)
    assert torch.equal(ops.node_lora(*inputs, 0.7, dropout_p=0.5, training=False), plain)


def test_dropout_seed_none_follows_torch_manual_seed():
    inputs = make_inputs((4,), 5, 7, 11, 3)
    torch.manual_seed(0)
    first = ops.node_lora(*inputs, 0.7, dropout_p=0.5, training=True)
    second = ops.node_lora(*inputs, 0.7, dropout_p=0.5, training=True)
    torch.manual_seed(0)
    again = ops.node_lora(*inputs, 0.7, dropout_p=0.5, training=True)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_dropout_mask_rate():
    mask = drawn_mask((64, 50, 20), 0.3, 1, 0, torch.float32)
    kept = (mask > 0).float().mean().item()
    assert abs(kept - 0.7) < 0.01
    assert torch.allclose(mask[mask > 0], torch.tensor(1 / 0.7))


# ---------------------------------------------------------------- torch.library integration

@pytest.mark.parametrize("bias,activation,dropout_p,lead", [
    (True, "leaky_relu", 0.0, (2,)), (False, "tanh", 0.3, (2, 3)), (True, None, 0.5, ()),
])
def test_opcheck(backend, bias, activation, dropout_p, lead):
    x, weight, b, lora_a, lora_b = make_inputs(lead, 5, 7, 6, 3, bias=bias)
    torch.library.opcheck(torch.ops.stfast.node_lora.default,
                          (x, weight, b, lora_a, lora_b, 0.5, activation, dropout_p, dropout_seed(7, 2, "cpu"), backend))


def test_opcheck_without_grads(backend):
    x, weight, b, lora_a, lora_b = (t.detach() for t in make_inputs((2,), 5, 7, 6, 3))
    torch.library.opcheck(torch.ops.stfast.node_lora.default,
                          (x, weight, b, lora_a, lora_b, 1.0, "relu", 0.0, dropout_seed(0, 0, "cpu"), backend))


class TinyAdapter(torch.nn.Module):
    def __init__(self, nodes=5, d_in=7, d_out=6, rank=3):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.lora_a = torch.nn.Parameter(torch.randn(nodes, d_in, rank) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(nodes, rank, d_out) * 0.3)

    def forward(self, x):
        return ops.node_lora(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, 0.5,
                             dropout_p=0.25, training=self.training, seed=4).relu() * 2


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(training):
    """Default inductor backend (a C compiler is available here)."""
    torch._dynamo.reset()
    layer = TinyAdapter().train(training)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 5, 7)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_a.grad.shape == layer.lora_a.shape


# ---------------------------------------------------------------- backend selection

def test_available_backends_for_node_lora():
    status = ops.available_backends("cpu", "node_lora")
    assert status["torch"] is True and status["cpu"] == EXT
    with ops.use_backend("auto"):  # the C++ kernels when built: faster than torch (bench/node_lora_op.py)
        assert ops.resolve_backend("node_lora", "cpu") == ("cpu" if EXT is True else "torch")
    for name in ("triton", "cuda"):
        assert isinstance(status[name], str) and status[name]


@pytest.mark.parametrize("forced", ["triton", "cuda", "cpu"])
def test_forcing_an_unavailable_backend_explains_every_backend(forced):
    if forced == "cpu" and EXT is True:
        pytest.skip("the cpu backend is available here")
    inputs = make_inputs((2,), 5, 7, 6, 3)
    with ops.use_backend(forced), pytest.raises(RuntimeError) as info:
        ops.node_lora(*inputs, 1.0)
    message = str(info.value)
    assert f"backend {forced!r} cannot run node_lora" in message
    for name in ("torch: available", "triton:", "cuda:", "cpu:"):
        assert name in message


# ---------------------------------------------------------------- bad input

def _good():
    x, weight, bias, lora_a, lora_b = (t.detach() for t in make_inputs((2,), 5, 7, 6, 3))
    return dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, scale=1.0)


BAD = [
    ("x", lambda a: a["x"][0, 0], ValueError, r"x: expected shape \(\.\.\., N, d_in\) .*got \(7,\)"),
    ("x", lambda a: a["x"].long(), TypeError, "x: expected a floating-point tensor"),
    ("x", lambda a: a["x"].numpy(), TypeError, "x: expected a torch.Tensor, got ndarray"),
    ("lora_a", lambda a: a["lora_a"][:4], ValueError,
     r"lora_a: expected one adapter per node, N = 5 \(the size of x's node axis -2\), got 4"),
    ("lora_a", lambda a: a["lora_a"][:, :6], ValueError, r"lora_a: expected shape \(N, d_in, r\) = \(5, 7, r\), got \(5, 6, 3\)"),
    ("lora_a", lambda a: a["lora_a"][0], ValueError, r"lora_a: expected shape \(N, d_in, r\) = \(5, 7, r\), got \(7, 3\)"),
    ("lora_a", lambda a: a["lora_a"][..., :0], ValueError, r"lora_a: expected a rank r >= 1"),
    ("lora_b", lambda a: a["lora_b"][:, :2], ValueError,
     r"lora_b: expected shape \(N, r, d_out\) = \(5, 3, 6\) .*got \(5, 2, 6\) \(rank 2 != lora_a's rank 3\)"),
    ("lora_b", lambda a: a["lora_b"][:4], ValueError, r"lora_b: expected shape \(N, r, d_out\) = \(5, 3, 6\)"),
    ("lora_b", lambda a: a["lora_b"][..., :5], ValueError, r"lora_b: expected shape .* = \(5, 3, 6\)"),
    ("lora_b", lambda a: a["lora_b"].double(), TypeError, "lora_b: expected dtype torch.float32 .*got torch.float64"),
    ("lora_a", lambda a: a["lora_a"].to("meta"), ValueError, "lora_a: expected device cpu .*got meta"),
    ("weight", lambda a: a["weight"][:, :6], ValueError, r"weight: expected shape \(d_out, 7\), got \(6, 6\)"),
    ("weight", lambda a: a["weight"].half(), TypeError, "weight: expected dtype torch.float32"),
    ("bias", lambda a: a["bias"][:5], ValueError, r"bias: expected shape \(6\), got \(5,\)"),
    ("scale", lambda a: "1", TypeError, "scale: expected a float, got '1'"),
]


@pytest.mark.parametrize("name,corrupt,error,match", BAD)
def test_bad_input(name, corrupt, error, match):
    args = _good()
    args[name] = corrupt(args)
    with pytest.raises(error, match=match):
        ops.node_lora(**args)


def test_bad_options():
    args = _good()
    with pytest.raises(ValueError, match="activation: expected one of None, 'leaky_relu', .*got 'gelu'"):
        ops.node_lora(**args, activation="gelu")
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\), got 1.0"):
        ops.node_lora(**args, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\), got -0.1"):
        ops.node_lora(**args, dropout_p=-0.1)
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*62\), got -1"):
        ops.node_lora(**args, dropout_p=0.1, training=True, seed=-1)
    with pytest.raises(ValueError, match=r"offset: expected an int in \[0, 2\*\*62\), got 1.5"):
        ops.node_lora(**args, offset=1.5)
