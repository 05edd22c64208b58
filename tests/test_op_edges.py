"""Edges of the ops and modules that must not fail silently (issue 14, items 4, 5, 7, 8 and 10):
NaN propagates through every activation on every backend, a dtype a backend cannot compute is
refused, zero-sized problems give the same (empty, zero or bias-only) result on every backend, a
non-finite scale or alpha is refused, double backward says it is not supported, and HimNet's time
features are checked. The boundary fuzz (``test_fuzz_boundaries.py``) covers the shapes at large.

On a machine without a GPU the triton kernels run in the Triton interpreter (``_triton_interpreter``).
"""

import os

import pytest
import torch
from _triton_interpreter import CHILD_ENV as _CHILD
from _triton_interpreter import (DEVICE, ON_GPU, import_kernels, kernels_run_here, rerun_under_interpreter,
                                 skip_unless_kernels_run)

lora_kernels = import_kernels("node_lora")  # before anything else imports it: see _triton_interpreter
gconv_kernels = import_kernels("meta_gconv")

import stfast.ops as ops  # noqa: E402
from stfast.nn.himnet import HimNet  # noqa: E402
from stfast.nn.stlora import NALL  # noqa: E402
from stfast.ops import backends  # noqa: E402
from stfast.ops.node_lora import dropout_seed  # noqa: E402

RUNS_HERE = kernels_run_here(lora_kernels.node_lora_fwd) and kernels_run_here(gconv_kernels.meta_gconv_fwd)
needs_kernels = skip_unless_kernels_run(lora_kernels.node_lora_fwd, "node_lora")
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", None)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _backend_params():
    """Every backend; each one this machine cannot run is skipped with the reason."""
    status = backends.available_backends(torch.device(DEVICE), "node_lora")
    params = []
    for name in backends.BACKENDS:
        marks = [needs_kernels] if name == "triton" else []
        if name != "triton" and status[name] is not True:
            marks.append(pytest.mark.skip(reason=f"{name}: {status[name]}"))
        params.append(pytest.param(name, marks=marks))
    return params


def lora_inputs(lead, nodes, d_in, d_out, rank, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((*lead, nodes, d_in), (d_out, d_in), (d_out,), (nodes, d_in, rank), (nodes, rank, d_out))
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(DEVICE, dtype) for s in shapes]


def run_lora(backend, inputs, activation, scale=0.5):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with ops.use_backend(backend):
        out = ops.node_lora(*leaves, scale, activation)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out.detach(), grads


# ---------------------------------------------------------------- item 4: NaN is never swallowed

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", _backend_params())
def test_a_nan_adapter_shows_in_the_output_and_gradients_as_on_torch(backend, activation):
    inputs = lora_inputs((4,), 3, 16, 16, 16)
    inputs[3][1, 0, 0] = float("nan")  # node 1's adapter diverged: h is NaN on every row of node 1
    out, grads = run_lora(backend, inputs, activation)
    want_out, want_grads = run_lora("torch", inputs, activation)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2]]).all()
    for name, got, want in zip(("x", "weight", "bias", "lora_a", "lora_b"), grads, want_grads):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name


# ---------------------------------------------------------------- item 5: dtypes a backend cannot compute

@needs_kernels
def test_triton_refuses_float64_naming_the_backends_that_compute_it():
    inputs = lora_inputs((2,), 3, 16, 16, 16, dtype=torch.float64)
    message = r"node_lora(_backward)?: backend 'triton' does not compute float64 .*backends that compute float64: torch, cpu, cuda"
    with pytest.raises(TypeError, match=message):
        run_lora("triton", inputs, "relu")
    grad = torch.ones(2, 3, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match=message):  # the backward op called directly
        torch.ops.stfast.node_lora_backward(grad, *inputs, 0.5, "relu", 0.0, dropout_seed(0, 0, DEVICE), "triton",
                                            [True] * 5)
    x, e, pool = (torch.randn(*s, dtype=torch.float64, device=DEVICE) for s in ((2, 3, 4), (3, 2), (2, 4, 5)))
    with ops.use_backend("triton"), pytest.raises(TypeError, match="meta_gconv: backend 'triton' does not compute"):
        ops.meta_gconv(x, None, e, pool, None, 1)


# ---------------------------------------------------------------- item 7: zero-sized problems

@pytest.mark.parametrize("backend", _backend_params())
def test_a_lora_without_input_features_gives_the_bias_and_the_activation_of_zero(backend):
    x, weight, bias, lora_a, lora_b = lora_inputs((2,), 3, 0, 5, 2)
    out, grads = run_lora(backend, [x, weight, bias, lora_a, lora_b], "sigmoid")
    expected = bias + 0.5 * 0.5 * lora_b.sum(1)  # act(0) = 0.5 on every rank column
    torch.testing.assert_close(out, expected.expand(2, 3, 5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[4], torch.full_like(lora_b, 0.5 * 0.5 * 2))  # per node: 2 rows, act 0.5
    assert grads[0].shape == (2, 3, 0) and grads[3].shape == (3, 0, 2)


@pytest.mark.parametrize("axis", ["S", "T", "ST"])
@pytest.mark.parametrize("backend", _backend_params())
def test_a_graph_convolution_without_input_channels_gives_the_generated_bias(backend, axis):
    if backend == "cuda" or (backend == "cpu" and DEVICE != "cpu"):
        pytest.skip("meta_gconv on CPU tensors here")
    g = torch.Generator().manual_seed(0)
    batch, nodes = 2, 3
    x = torch.zeros(batch, nodes, 0, requires_grad=True)
    supports = torch.rand(nodes, nodes, generator=g, requires_grad=True)
    e = torch.randn(*{"S": (nodes, 4), "T": (batch, 4), "ST": (batch, nodes, 4)}[axis], generator=g,
                    requires_grad=True)
    pool, bias_pool = torch.zeros(4, 0, 5, requires_grad=True), torch.randn(4, 5, generator=g, requires_grad=True)
    with ops.use_backend(backend):
        out = ops.meta_gconv(x, supports, e, pool, bias_pool, 2, "tanh", axis=axis)
        out.sum().backward()
    bias = e @ bias_pool
    expected = torch.tanh(bias.unsqueeze(1) if axis == "T" else bias).expand(batch, nodes, 5)
    torch.testing.assert_close(out, expected)
    assert torch.equal(supports.grad, torch.zeros(nodes, nodes)) and x.grad.shape == (batch, nodes, 0)
    assert bias_pool.grad.abs().sum() > 0


# ---------------------------------------------------------------- item 10: options that would poison every output

@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_a_non_finite_scale_or_alpha_is_refused(scale):
    inputs = lora_inputs((2,), 3, 4, 5, 2)
    with pytest.raises(ValueError, match=f"scale: expected a finite float, got {scale}"):
        ops.node_lora(*inputs, scale, "relu")
    with pytest.raises(ValueError, match=f"alpha: expected a finite float \\(or None\\), got {scale}"):
        NALL(4, 5, num_nodes=3, rank=2, alpha=scale)


def test_double_backward_says_it_is_not_supported():
    inputs = [t.requires_grad_() for t in lora_inputs((2,), 3, 4, 5, 2)]
    with ops.use_backend("torch"):
        (d_x,) = torch.autograd.grad(ops.node_lora(*inputs, 0.5, "tanh").sum(), inputs[0], create_graph=True)
        with pytest.raises(RuntimeError, match="node_lora: double backward is not supported"):
            d_x.sum().backward()
        x = torch.randn(2, 3, 4, requires_grad=True)
        out = ops.meta_gconv(x, None, torch.randn(3, 2), torch.randn(2, 4, 5), None, 1, "tanh")
        (d_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="meta_gconv: double backward is not supported"):
            d_x.sum().backward()


# ---------------------------------------------------------------- item 8: HimNet's time features

def himnet_inputs(batch=2, nodes=5):
    x = torch.zeros(batch, 12, nodes, 3)
    x[..., 0] = torch.randn(batch, 12, nodes)
    x[..., 1], x[..., 2] = 0.5, 3.0
    return x, torch.zeros(batch, 12, nodes, 2)


@pytest.fixture(scope="module")
def himnet():
    torch.manual_seed(0)
    return HimNet(num_nodes=5, hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=2,
                  st_embedding_dim=2).eval()


@pytest.mark.parametrize("time_of_day, day_of_week, message", [  # sample 0 keeps 0.5 and 3
    (1.0, 3.0, r"time of day in channel 1 .* in \[0, 1\).*got values in \[0.5, 1\]"),
    (-0.001, 3.0, r"time of day in channel 1 .*got values in \[-0.001, 0.5\]"),  # would map to slot 0
    (float("nan"), 3.0, r"time of day in channel 1 .*got values in \[0.5, 0.5\] and NaN / inf"),
    (0.5, 7.0, r"day of week in channel 2 .* integer 0..6, got values in \[3, 7\]"),
    (0.5, -1.0, r"day of week in channel 2 .*got values in \[-1, 3\]"),
    (0.5, 2.5, r"day of week in channel 2 .*got values in \[2.5, 3\]"),
])
def test_himnet_names_the_time_feature_out_of_range(himnet, time_of_day, day_of_week, message):
    x, y_cov = himnet_inputs()
    x[1, -1, 0, 1], x[1, -1, 0, 2] = time_of_day, day_of_week
    with pytest.raises(ValueError, match="x: expected the " + message):
        himnet(x, y_cov)


def test_himnet_takes_an_empty_batch(himnet):
    x, y_cov = himnet_inputs(batch=0)
    x.requires_grad_()
    out = himnet(x, y_cov)
    out.sum().backward()
    assert out.shape == (0, 12, 5, 1) and x.grad.shape == x.shape


@pytest.mark.skipif(RUNS_HERE or ON_GPU or bool(os.environ.get(_CHILD)),
                    reason="the interpreter tests run in this process")
def test_interpreter_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)
