"""The triton backend's formulation choice for ``meta_gconv``: each call, forward and backward, runs
the formulation with fewer FLOPs (``_formulation.call_formulation``): the hoisted torch GEMMs or the
outer-product kernels, and both branches give the torch backend's results (fp32, fp16 and bf16;
under autocast too). On a machine without a GPU the kernels run in the Triton interpreter (see
``_triton_interpreter``); the GPU class checks the METR-LA shapes in fp32 and bf16 on a GPU.
"""

import pytest
import torch
from _triton_interpreter import import_kernels, interpreter_rerun_test, needs_compiled_kernels
from test_meta_gconv_triton import _interpreter_env  # noqa: F401 (the autouse fixture, for these tests too)
from test_meta_gconv_triton import RUNS_HERE, _relative_error, compare, make_inputs, needs_kernels, run

kernels = import_kernels("meta_gconv")

import stfast.ops as ops  # noqa: E402
from stfast.ops import _triton_gconv  # noqa: E402
from stfast.ops._formulation import call_formulation  # noqa: E402


@pytest.fixture
def kernel_calls(monkeypatch):
    """The directions (``"forward"`` / ``"backward"``) in which the glue called the kernels."""
    calls = []

    def spy(direction, launcher):
        def wrapped(*args, **kwargs):
            calls.append(direction)
            return launcher(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "meta_gconv_forward", spy("forward", kernels.meta_gconv_forward))
    monkeypatch.setattr(kernels, "meta_gconv_backward", spy("backward", kernels.meta_gconv_backward))
    return calls


def _chosen(inputs, axis, requires=(True,) * 5):
    x, _, _, pool, bias_pool = inputs
    return (call_formulation(x.shape, pool.shape, bias_pool is not None, axis),
            call_formulation(x.shape, pool.shape, bias_pool is not None, axis, list(requires)))


# Odd shapes (never a block multiple); I = K*C = 10. The last column is what the count picks
# (forward, backward), written out so that both branches are known to be covered.
CASES = [
    # axis, B, N, C, D, O, activation, (forward, backward)
    ("S", 3, 7, 5, 3, 6, "tanh", ("hoisted", "hoisted")),
    ("T", 5, 7, 5, 3, 6, "sigmoid", ("hoisted", "hoisted")),
    ("S", 2, 5, 5, 2, 7, None, ("hoisted", "outer")),      # regenerating W tips the backward
    ("S", 1, 9, 5, 3, 6, "sigmoid", ("outer", "outer")),   # a batch of one
    ("T", 4, 1, 5, 3, 6, "tanh", ("outer", "outer")),      # one node
    ("ST", 2, 5, 5, 3, 6, "tanh", ("outer", "outer")),     # a weight per row
]


@needs_kernels
@pytest.mark.parametrize("axis,batch,nodes,channels,dim,outputs,activation,expected", CASES)
def test_each_direction_runs_the_formulation_the_count_picks(kernel_calls, axis, batch, nodes, channels, dim,
                                                             outputs, activation, expected):
    inputs = make_inputs(axis, "shared", 2, batch, nodes, channels, dim, outputs)
    assert _chosen(inputs, axis) == expected
    compare(inputs, 2, activation, axis)
    assert kernel_calls == [direction for direction, formulation in zip(("forward", "backward"), expected)
                            if formulation == "outer"]


@needs_kernels
def test_the_backward_choice_follows_the_gradients_needed(kernel_calls):
    """Same shape, other gradients: B = 2, D = 2 (S) is outer with every gradient, hoisted for dE alone."""
    inputs = make_inputs("S", "shared", 2, 2, 5, 5, 2, 7)
    requires = (False, False, True, False, False)
    assert _chosen(inputs, "S", requires) == ("hoisted", "hoisted")
    compare(inputs, 2, "sigmoid", "S", requires)
    assert kernel_calls == []


@needs_kernels
@pytest.mark.parametrize("axis", ["S", "T"])
def test_forced_outer_runs_the_kernels_where_hoisted_is_cheaper(monkeypatch, kernel_calls, axis):
    """``FORMULATION = "outer"`` keeps the S / T kernels reachable (tests, benchmarks) on shapes whose
    count says hoisted (the forward; T's backward too): several tiles (M = 74, I = 40, O = 70)."""
    monkeypatch.setattr(_triton_gconv, "FORMULATION", "outer")
    inputs = make_inputs(axis, "shared", 2, 2, 37, 20, 3, 70)
    assert _chosen(inputs, axis) == {"S": ("hoisted", "outer"), "T": ("hoisted", "hoisted")}[axis]
    compare(inputs, 2, "tanh", axis)
    assert kernel_calls == ["forward", "backward"]


def test_an_unknown_formulation_setting_is_refused(monkeypatch):
    monkeypatch.setattr(_triton_gconv, "FORMULATION", "grouped")
    x, supports, e, pool, bias_pool = make_inputs("S", "shared", 2, 3, 7, 5, 3, 6, device="cpu")
    with pytest.raises(ValueError, match="FORMULATION: expected 'auto' or 'outer', got 'grouped'"):
        _triton_gconv.meta_gconv_forward(x, supports, e, pool, bias_pool, 2, None, "S")


@needs_kernels
@pytest.mark.parametrize("axis", ["S", "T"])
def test_fp16_hoisted_against_float64(kernel_calls, axis):
    inputs = make_inputs(axis, "shared", 2, 3, 7, 5, 3, 6, dtype=torch.float16)
    grad_out = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1)).to(inputs[0])
    out, grads = run("triton", inputs, 2, "tanh", axis, grad_out)
    ref, ref_grads = run("torch", tuple(t.double() for t in inputs), 2, "tanh", axis, grad_out.double())
    assert kernel_calls == [] and out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 5e-3, errors


@pytest.mark.parametrize("axis", ["S", "T"])
def test_bf16_hoisted_glue_against_float64(axis):
    """bf16 on the hoisted branch, calling the glue directly: the op refuses bf16 for CPU tensors
    (the interpreter's bf16 ``tl.dot`` is wrong), but this branch runs no kernel, so it is checked
    here; the outer branch's bf16 is checked by the GPU tests."""
    x, supports, e, pool, bias_pool = make_inputs(axis, "shared", 2, 3, 7, 5, 3, 6, dtype=torch.bfloat16,
                                                  device="cpu")
    grad = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    inputs = (x, supports, e, pool, bias_pool)
    assert _chosen(inputs, axis) == ("hoisted", "hoisted")
    out = _triton_gconv.meta_gconv_forward(*inputs, 2, "sigmoid", axis)
    grads = _triton_gconv.meta_gconv_backward(grad, out, *inputs, 2, "sigmoid", axis, [True] * 5)
    ref, ref_grads = run("torch", tuple(t.double() for t in inputs), 2, "sigmoid", axis, grad.double())
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 3e-2, errors


@needs_kernels
@pytest.mark.parametrize("axis", ["S", "T"])
def test_autocast_on_the_hoisted_branch(kernel_calls, axis):
    """fp16 autocast: fp16 output, fp32 gradients for fp32 leaves, close to fp32; bf16 autocast is
    refused for CPU tensors before any formulation is chosen."""
    inputs = make_inputs(axis, "shared", 2, 3, 7, 5, 3, 6)
    grad_out = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in inputs]
    with ops.use_backend("triton"):
        with torch.autocast("cpu", dtype=torch.float16):
            out = ops.meta_gconv(*leaves, 2, "tanh", axis=axis)
        grads = torch.autograd.grad(out, leaves, grad_out.half())
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="cannot compute"):
            ops.meta_gconv(*inputs, 2, "tanh", axis=axis)
    ref, ref_grads = run("torch", inputs, 2, "tanh", axis, grad_out)
    assert kernel_calls == [] and out.dtype == torch.float16 and all(g.dtype == torch.float32 for g in grads)
    errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 5e-3, errors


@needs_kernels
def test_opcheck_on_the_hoisted_branch():
    x, supports, e, pool, bias_pool = (t.requires_grad_() for t in make_inputs("S", "shared", 2, 3, 7, 5, 3, 6))
    assert call_formulation(x.shape, pool.shape, True, "S") == "hoisted"
    with ops.use_backend("triton"):
        torch.library.opcheck(torch.ops.stfast.meta_gconv.default,
                              (x, supports, e, pool, bias_pool, 2, "sigmoid", "S", "triton"))


test_interpreter_tests_in_a_subprocess = interpreter_rerun_test(RUNS_HERE, __file__)


@needs_compiled_kernels(kernels.meta_gconv_fwd)
class TestGPU:
    """METR-LA S / T encoder gates (B=16, N=207, C=67, K=2, O=128) in both branches against the torch
    backend in float64; error = max |diff| / max |reference| per tensor."""

    @pytest.mark.parametrize("formulation", ["auto", "outer"])
    @pytest.mark.parametrize("axis,dim", [("S", 16), ("T", 16)])
    @pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
    def test_metr_la_encoder_shape(self, monkeypatch, kernel_calls, formulation, axis, dim, dtype, tol):
        monkeypatch.setattr(_triton_gconv, "FORMULATION", formulation)
        inputs = make_inputs(axis, "shared", 2, 16, 207, 67, dim, 128, dtype=dtype, device="cuda")
        grad_out = torch.randn(16, 207, 128, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            out, grads = run("triton", inputs, 2, "sigmoid", axis, grad_out)
        finally:
            torch.set_float32_matmul_precision(previous)
        ref, ref_grads = run("torch", tuple(t.double() for t in inputs), 2, "sigmoid", axis, grad_out.double())
        assert kernel_calls == ([] if formulation == "auto" else ["forward", "backward"])
        errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
        assert max(errors) <= tol, errors
