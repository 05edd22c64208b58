"""The FLOP count of the meta GEMM's formulations (``stfast.ops._formulation``) and the choices that
follow it: which formulation is cheaper per axis, shape and direction, and where the ``cuda``
backend's glue sends a call (``_ext.cuda_route``), tested on CPU by calling the pure functions and
by forcing the route for CPU tensors. The triton glue's choice is tested under the Triton
interpreter in ``test_meta_gconv_triton_formulation.py``."""

import pytest
import torch

import stfast.ops as ops
from stfast import configs
from stfast.ops import _ext, _torch_gconv
from stfast.ops._formulation import NEEDS, call_formulation, cheapest_formulation, formulation_flops

# ---------------------------------------------------------------- the count


@pytest.mark.parametrize("axis,weights", [("S", 7), ("T", 3), ("ST", 21)])
def test_forward_count_is_the_products_of_each_formulation(axis, weights):
    batch, nodes, inputs, outputs, dim = 3, 7, 10, 6, 5
    rows = batch * nodes
    counts = formulation_flops(axis, batch, nodes, inputs, outputs, dim)
    assert counts["outer"]["forward"] == 2 * rows * dim * (inputs + 1) * outputs  # K = D*I, bias rank-1 per row
    assert counts["hoisted"]["forward"] == 2 * weights * dim * (inputs + 1) * outputs + 2 * rows * inputs * outputs
    no_bias = formulation_flops(axis, batch, nodes, inputs, outputs, dim, has_bias=False)
    assert no_bias["outer"]["forward"] == 2 * rows * dim * inputs * outputs
    assert no_bias["hoisted"]["forward"] == 2 * weights * dim * inputs * outputs + 2 * rows * inputs * outputs


def test_backward_count_with_every_gradient():
    """Two products per forward product; the hoisted backward also regenerates W for d xg."""
    batch, nodes, inputs, outputs, dim = 3, 7, 10, 6, 5
    counts = formulation_flops("S", batch, nodes, inputs, outputs, dim)
    assert counts["outer"]["backward"] == 2 * counts["outer"]["forward"]
    assert counts["hoisted"]["backward"] == 2 * counts["hoisted"]["forward"] + 2 * nodes * dim * inputs * outputs
    assert formulation_flops("S", batch, nodes, inputs, outputs, dim, needs=())["hoisted"]["backward"] == 0


def _torch_path_flops(fn) -> int:
    # Imported here: torch.utils.flop_counter imports triton, which must first be imported under
    # TRITON_INTERPRET=1 when the interpreter tests run in this process (_triton_interpreter).
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("axis", ["S", "T"])
@pytest.mark.parametrize("needs", [NEEDS, ("xg",), ("e",), ("pool",), ("bias",), ("e", "pool")],
                         ids=lambda n: "+".join(n))
def test_hoisted_count_is_what_the_hoisted_path_executes(axis, needs):
    """torch's own FLOP counter on ``_torch_gconv``'s hoisted forward and backward (the path the GPU
    backends take when it is cheaper) agrees with the count, for every subset of gradients."""
    batch, nodes, inputs, outputs, dim = 3, 7, 10, 6, 5
    gen = torch.Generator().manual_seed(0)
    xg = torch.randn(batch, nodes, inputs, generator=gen)
    e = torch.randn({"S": nodes, "T": batch}[axis], dim, generator=gen)
    pool, bias_pool = torch.randn(dim, inputs, outputs, generator=gen), torch.randn(dim, outputs, generator=gen)
    grad = torch.randn(batch, nodes, outputs, generator=gen)
    need = {name: name in needs for name in NEEDS}
    counts = formulation_flops(axis, batch, nodes, inputs, outputs, dim, needs=needs)["hoisted"]
    assert _torch_path_flops(lambda: _torch_gconv.meta_linear_forward(
        xg, e, pool, bias_pool, axis, "hoisted")) == counts["forward"]
    assert _torch_path_flops(lambda: _torch_gconv.meta_linear_backward(
        grad, xg, e, pool, bias_pool, axis, need, "hoisted")) == counts["backward"]


def test_needs_are_checked():
    with pytest.raises(ValueError, match="needs: expected names among"):
        formulation_flops("S", 2, 3, 4, 5, 6, needs=("x",))
    with pytest.raises(ValueError, match="axis: expected 'S', 'T' or 'ST', got 'Q'"):
        formulation_flops("Q", 2, 3, 4, 5, 6)


# ---------------------------------------------------------------- the choice

@pytest.mark.parametrize("batch,nodes,dim", [(1, 1, 1), (2, 5, 3), (16, 207, 16), (64, 883, 16), (1, 300, 24)])
def test_st_is_always_outer(batch, nodes, dim):
    """One weight per row: generating it costs more than applying it."""
    for backward in (False, True):
        assert cheapest_formulation("ST", batch, nodes, 10, 7, dim, backward=backward) == "outer"


@pytest.mark.parametrize("axis,batch,nodes,dim,has_bias", [
    ("S", 1, 50, 16, True),   # a batch of one: every node's weight is used once
    ("T", 50, 1, 16, True),   # one node: every sample's weight is used once
    ("S", 16, 50, 1, False),  # D = 1: the outer GEMM has K = I, nothing to save
    ("T", 16, 50, 1, False),
    ("S", 11, 50, 1, True),   # D = 1 with a bias: outer while B <= I + 1 (see the next test)
])
def test_outer_where_hoisting_saves_nothing(axis, batch, nodes, dim, has_bias):
    for backward in (False, True):
        assert cheapest_formulation(axis, batch, nodes, 10, 7, dim, has_bias, backward=backward) == "outer"


def test_d_one_with_a_bias_hoists_for_large_batches():
    """Hoisted, the bias ``E @ Pb`` is computed once per weight instead of once per row: with D = 1
    it saves ``2 (M - W) O`` FLOPs and costs ``2 W I O`` (generating W), so S hoists when B > I + 1."""
    assert cheapest_formulation("S", 12, 50, 10, 7, 1) == "hoisted"


@pytest.mark.parametrize("dataset,batch", [("METR-LA", 16), ("PEMS08", 16), ("PEMS07", 64), ("CA", 8)])
def test_himnet_encoders_are_hoisted_and_save_a_factor_near_d(dataset, batch):
    """outer / hoisted = M D (I+1) / (W D (I+1) + M I), between 1 / (W/M + 1/D) (that is
    1 / (1/B + 1/D) for S, 1 / (1/N + 1/D) for T) and D (I+1) / I."""
    model = configs.himnet_config(dataset)["model"]
    nodes, inputs = model["num_nodes"], model["cheb_k"] * (model["input_dim"] + model["hidden_dim"])
    dims = {"S": model["node_embedding_dim"], "T": model["tod_embedding_dim"] + model["dow_embedding_dim"]}
    for axis, dim in dims.items():
        for backward in (False, True):
            assert cheapest_formulation(axis, batch, nodes, inputs, 2 * model["hidden_dim"], dim,
                                        backward=backward) == "hoisted"
        counts = formulation_flops(axis, batch, nodes, inputs, 2 * model["hidden_dim"], dim)
        weights_per_row = (nodes if axis == "S" else batch) / (batch * nodes)
        ratio = counts["outer"]["forward"] / counts["hoisted"]["forward"]
        assert 1 / (weights_per_row + 1 / dim) < ratio < dim * (inputs + 1) / inputs


def test_direction_can_differ():
    """B = 2, D = 2 (S): forward hoisted; backward outer (regenerating W tips it)."""
    assert cheapest_formulation("S", 2, 5, 10, 7, 2) == "hoisted"
    assert cheapest_formulation("S", 2, 5, 10, 7, 2, backward=True) == "outer"


def test_call_formulation_maps_the_op_gradients():
    """``needs`` are the op's (dx, d supports, dE, dP, dPb): dx or d supports need d xg."""
    x_shape, pool_shape = (2, 5, 4), (2, 8, 7)  # B 2, N 5, C 4, K 2, D 2, O 7
    assert call_formulation(x_shape, pool_shape, True, "S") == cheapest_formulation("S", 2, 5, 8, 7, 2)
    for op_needs, names in [([True, False, False, False, False], {"xg"}), ([False, True, False, False, False], {"xg"}),
                            ([False, False, True, True, False], {"e", "pool"}),
                            ([False, False, False, False, True], {"bias"})]:
        assert call_formulation(x_shape, pool_shape, True, "S", op_needs) == cheapest_formulation(
            "S", 2, 5, 8, 7, 2, backward=True, needs=names)
    assert call_formulation(x_shape, pool_shape, True, "S", [True] * 5) == "outer"  # as test_direction_can_differ
    assert call_formulation(x_shape, pool_shape, True, "S", [False, False, True, False, False]) == "hoisted"  # dE only


# ---------------------------------------------------------------- the cuda glue's route

METR_LA_S = ((16, 207, 67), (16, 134, 128))  # x (B, N, C), P (D, K*C, O) of HimNet's S encoder gate


def test_cuda_route_sends_cheaper_hoisted_calls_to_the_torch_gemms():
    x_shape, pool_shape = METR_LA_S
    assert _ext.cuda_route("cuda", "auto", x_shape, pool_shape, True, "S") == "hoisted"
    assert _ext.cuda_route("cuda", "auto", x_shape, pool_shape, True, "T", [True] * 5) == "hoisted"
    assert _ext.cuda_route("cuda", "auto", (16, 207, 67), (1, 134, 128), True, "S") == "kernel"  # D = 1
    assert _ext.cuda_route("cuda", "auto", (1, 207, 67), pool_shape, True, "S", [True] * 5) == "kernel"  # B = 1
    assert _ext.cuda_route("cuda", "auto", x_shape, pool_shape, True, "ST") == "kernel"


def test_cuda_route_leaves_cpu_tensors_and_forced_formulations_to_the_kernels():
    x_shape, pool_shape = METR_LA_S
    for formulation in ("auto", "outer", "grouped"):
        assert _ext.cuda_route("cpu", formulation, x_shape, pool_shape, True, "S") == "kernel"
    for formulation in ("outer", "grouped"):  # a forced formulation is the kernels' (tests, benchmarks)
        assert _ext.cuda_route("cuda", formulation, x_shape, pool_shape, True, "S", [True] * 5) == "kernel"


needs_ext = pytest.mark.skipif(_ext.status("cpu") is not True, reason=f"extension unavailable: {_ext.status('cpu')}")


@needs_ext
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("axis", ["S", "T"])
def test_cuda_glue_runs_the_hoisted_path_where_routed(monkeypatch, axis, autocast):
    """The route forced to "hoisted" for CPU tensors: the ``cpu``/``cuda`` glue then computes forward
    and every gradient with the torch backend's hoisted path, equal to the torch backend (bitwise:
    the same GEMMs), in fp32 and under bf16 autocast (bf16 output, fp32 gradients)."""
    routed, hoisted_calls = [], []
    real_route = _ext.cuda_route

    def route(device_type, formulation, *args):
        routed.append(real_route("cuda", formulation, *args))
        return "hoisted"

    def spy(real):
        def wrapped(*args, **kwargs):
            hoisted_calls.append(kwargs["formulation"])
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(_ext, "cuda_route", route)
    monkeypatch.setattr(_torch_gconv, "meta_gconv_forward", spy(_torch_gconv.meta_gconv_forward))
    monkeypatch.setattr(_torch_gconv, "meta_gconv_backward", spy(_torch_gconv.meta_gconv_backward))
    gen = torch.Generator().manual_seed(0)
    batch, nodes, channels, dim, outputs = 3, 7, 5, 4, 6
    inputs = [torch.randn(batch, nodes, channels, generator=gen), torch.randn(nodes, nodes, generator=gen) / 3,
              torch.randn({"S": nodes, "T": batch}[axis], dim, generator=gen),
              torch.randn(dim, 2 * channels, outputs, generator=gen) / 5, torch.randn(dim, outputs, generator=gen)]
    grad_out = torch.randn(batch, nodes, outputs, generator=gen)
    results = {}
    for backend in ("cpu", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with ops.use_backend(backend):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = ops.meta_gconv(*leaves, 2, "tanh", axis=axis)
            results[backend] = (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))
    assert hoisted_calls == ["hoisted", "hoisted"] and routed == ["hoisted", "hoisted"]
    assert results["cpu"][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert all(g.dtype == torch.float32 for g in results["cpu"][1:])
    for got, want in zip(results["cpu"], results["torch"]):
        assert torch.equal(got, want)


CUDA_STATUS = _ext.status("cuda") if torch.cuda.is_available() else "no CUDA device"


@pytest.mark.skipif(CUDA_STATUS is not True, reason=f"cuda backend unavailable: {CUDA_STATUS}")
@pytest.mark.parametrize("formulation", ["auto", "outer"])
@pytest.mark.parametrize("axis", ["S", "T"])
def test_cuda_backend_on_both_routes_matches_float64(monkeypatch, formulation, axis):
    """METR-LA's S / T encoder gate on a GPU: "auto" takes the hoisted GEMMs, "outer" the kernels."""
    monkeypatch.setattr(_ext, "FORMULATION", formulation)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hoisted_calls = []
    real_forward = _torch_gconv.meta_gconv_forward

    def spy(*args, **kwargs):
        hoisted_calls.append(kwargs["formulation"])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(_torch_gconv, "meta_gconv_forward", spy)
    gen = torch.Generator().manual_seed(0)
    (batch, nodes, channels), (dim, width, outputs) = METR_LA_S
    supports = torch.softmax(torch.randn(nodes, nodes, generator=gen), -1)
    inputs = [torch.randn(batch, nodes, channels, generator=gen), supports,
              torch.randn({"S": nodes, "T": batch}[axis], dim, generator=gen),
              torch.randn(dim, width, outputs, generator=gen) / width**0.5, torch.randn(dim, outputs, generator=gen)]
    grad_out = torch.randn(batch, nodes, outputs, generator=gen)
    results = {}
    for backend, dtype in (("cuda", torch.float32), ("torch", torch.float64)):
        leaves = [t.to("cuda", dtype).requires_grad_() for t in inputs]
        with ops.use_backend(backend):
            out = ops.meta_gconv(*leaves, 2, "sigmoid", axis=axis)
            results[backend] = (out, *torch.autograd.grad(out, leaves, grad_out.to("cuda", dtype)))
    assert hoisted_calls == (["hoisted"] if formulation == "auto" else [])
    for got, want in zip(results["cuda"], results["torch"]):
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error < 1e-4, error
