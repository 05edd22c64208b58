"""The tuned launches of the meta_gconv Triton kernels: the split-I dxg/dE grid (per-I-tile dE
partials summed in a fixed order), every candidate launch of every kernel against the torch backend,
and the deterministic choice among candidates (``stfast.kernels._utils.choose``).

On a machine without a GPU the kernels run in the Triton interpreter (see ``_triton_interpreter``).
"""

import os

import pytest
import torch
from _triton_interpreter import CHILD_ENV as _CHILD
from _triton_interpreter import (DEVICE, ON_GPU, import_kernels, is_interpreted, kernels_run_here,
                                 rerun_under_interpreter, skip_unless_kernels_run)

kernels = import_kernels("meta_gconv")  # before anything else imports it: see _triton_interpreter

import stfast.ops as ops  # noqa: E402
from stfast.kernels import _tuned, _utils  # noqa: E402
from stfast.ops import backends  # noqa: E402

INTERPRETED = is_interpreted(kernels.meta_gconv_fwd)
RUNS_HERE = kernels_run_here(kernels.meta_gconv_fwd)
needs_kernels = skip_unless_kernels_run(kernels.meta_gconv_fwd, "meta_gconv")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if not ON_GPU and INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from stfast.ops import _triton_gconv

    if hasattr(_triton_gconv, "FORMULATION"):  # the kernels, also where hoisting S / T would be cheaper
        monkeypatch.setattr(_triton_gconv, "FORMULATION", "outer")
    yield


def make_inputs(axis, cheb_k, batch, nodes, channels, dim, outputs, dtype=torch.float32, seed=0):
    """x, shared supports, embeddings of ``axis``, pools (fp32 unless ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)

    e = rand(*{"S": (nodes, dim), "T": (batch, dim), "ST": (batch, nodes, dim)}[axis])
    return (rand(batch, nodes, channels), rand(nodes, nodes, scale=nodes**-0.5), e,
            rand(dim, cheb_k * channels, outputs, scale=(dim * cheb_k * channels) ** -0.5),
            rand(dim, outputs, scale=dim**-0.5))


def run(backend, inputs, cheb_k, axis, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with ops.use_backend(backend):
        out = ops.meta_gconv(*leaves, cheb_k, "tanh", axis=axis)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def triton_against_torch(inputs, cheb_k, axis, rtol=1e-5, atol=1e-5):
    """The triton backend's output and gradients, after checking them against the torch backend's."""
    x, _, _, pool, _ = inputs
    grad_out = torch.randn(x.shape[:2] + pool.shape[-1:], generator=torch.Generator().manual_seed(1)).to(x)
    got = run("triton", inputs, cheb_k, axis, grad_out)
    want = run("torch", inputs, cheb_k, axis, grad_out)
    for name, a, b in zip(("out", "x", "supports", "embeddings", "weights_pool", "bias_pool"), got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return got


def dxg_de_launch(rows, inputs, outputs, dim, input_precision="ieee"):
    return kernels.backward_launches(rows, inputs, outputs, dim, need_xg=True, need_e=True, need_pool=True,
                                     has_bias=True, input_precision=input_precision)["dxg_de"]


# ---------------------------------------------------------------- split-I dxg / dE

# (name, axis, B, N, C, K, D, O): M = B*N rows never a multiple of BLOCK_M; I = K*C spans several
# BLOCK_I tiles (one dE partial each), the last one ragged.
SPLIT_CASES = [
    ("ragged-last-tile", "ST", 2, 35, 35, 2, 3, 20),    # I = 70: tiles of 32, 32, 6
    ("d-1", "S", 2, 37, 20, 2, 1, 20),                  # a single dE column; I = 40: 32 + 8
    ("several-o-tiles", "T", 2, 37, 20, 2, 4, 150),     # O = 150 > BLOCK_O: the o loop
]


@needs_kernels
@pytest.mark.parametrize("name,axis,batch,nodes,channels,cheb_k,dim,outputs", SPLIT_CASES,
                         ids=[c[0] for c in SPLIT_CASES])
def test_split_i_de_matches_torch_and_is_bitwise_deterministic(name, axis, batch, nodes, channels, cheb_k, dim,
                                                                 outputs):
    rows, inputs_i = batch * nodes, cheb_k * channels
    launch = dxg_de_launch(rows, inputs_i, outputs, dim)
    block_m, block_i = launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_I"]
    assert launch.grid == (-(-rows // block_m), -(-inputs_i // block_i)) and launch.grid[1] > 1
    assert rows % block_m and inputs_i % block_i
    assert launch.constexprs["ONE_O_TILE"] == (outputs <= launch.constexprs["BLOCK_O"])

    inputs = make_inputs(axis, cheb_k, batch, nodes, channels, dim, outputs)
    with _utils.recording_choices() as choices:
        first = triton_against_torch(inputs, cheb_k, axis)
    assert [c.chosen for c in choices if c.kernel == "meta_gconv_bwd_dxg_de"] == [launch]  # the kernel ran
    grad_out = torch.randn(batch, nodes, outputs, generator=torch.Generator().manual_seed(1)).to(first[0])
    again = run("triton", inputs, cheb_k, axis, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_de_grid_scales_with_i():
    """METR-LA b16 (M = 3312, I = 134) with dE: 52 row tiles x 5 I tiles = 260 programs on tensor
    cores (TF32), not 52; 104 x 9 in IEEE fp32 (32 x 16 tiles)."""
    assert dxg_de_launch(3312, 134, 128, 16, "tf32").grid == (52, 5)
    assert dxg_de_launch(64 * 883, 134, 128, 16, "tf32").grid == (883, 5)
    assert dxg_de_launch(3312, 134, 128, 16, "ieee").grid == (104, 9)
    without_de = kernels.backward_launches(3312, 134, 128, 16, need_xg=True, need_e=False, need_pool=False,
                                           has_bias=True, input_precision="tf32")["dxg_de"]
    assert without_de.grid == (52, 5)
    only_de_no_inputs = kernels.backward_launches(3312, 0, 128, 16, need_xg=False, need_e=True, need_pool=False,
                                                  has_bias=True, input_precision="tf32")["dxg_de"]
    assert only_de_no_inputs.grid == (52, 1)  # I = 0: one program per row tile writes the bias term


# ---------------------------------------------------------------- every candidate launch

def _candidates(rows, inputs, outputs, dim, dtype):
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return {
        "meta_gconv_fwd": kernels.forward_candidates(rows, inputs, outputs, dim, has_bias=True, activation="tanh",
                                                     input_precision=precision, dtype=dtype),
        "meta_gconv_bwd_dxg_de": kernels.dxg_de_candidates(rows, inputs, outputs, dim, need_xg=True, need_e=True,
                                                           has_bias=True, input_precision=precision, dtype=dtype),
        "meta_gconv_bwd_dp": kernels.dp_candidates(rows, inputs, outputs, dim, input_precision=precision, dtype=dtype),
    }


def _relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-fma", "fp16-tensor-cores"])
def test_every_candidate_matches_torch(dtype):
    """Each candidate launch of each kernel (forced; the other kernels at their default) on a shape of
    several ragged tiles (M = 74, I = 40, O = 70, D = 3): fp32 (the FMA candidates) against the torch
    backend in fp32; fp16 (the tensor-core candidates; bf16 tl.dot is wrong in the interpreter) against
    it in float64."""
    inputs = make_inputs("ST", 2, 2, 37, 20, 3, 70, dtype=dtype)
    candidates = _candidates(74, 40, 70, 3, dtype)
    assert all(len(c) > 1 for c in candidates.values())
    if dtype == torch.float16:
        grad_out = torch.randn(2, 37, 70, generator=torch.Generator().manual_seed(1)).to(inputs[0])
        want = run("torch", tuple(t.double() for t in inputs), 2, "ST", grad_out.double())
    for kernel, launches in candidates.items():
        for launch in launches:
            with _utils.forcing_configs({kernel: launch.config}), _utils.recording_choices() as choices:
                if dtype == torch.float32:
                    triton_against_torch(inputs, 2, "ST")
                else:
                    errors = [_relative_error(g, w) for g, w in zip(run("triton", inputs, 2, "ST", grad_out), want)]
                    assert max(errors) < 5e-3, (launch.config, errors)
            assert any(c.kernel == kernel and c.chosen.config == launch.config for c in choices), launch


# ---------------------------------------------------------------- the choice

def test_choose_takes_the_tabled_winner_for_the_device_else_the_default(monkeypatch):
    launches = kernels.forward_candidates(3312, 134, 128, 16, has_bias=True, activation="sigmoid",
                                          input_precision="tf32")
    default, other = launches[0], launches[2]
    key = ("some", "key")
    monkeypatch.setattr(_tuned, "TUNED", {("NVIDIA H200", "meta_gconv_fwd", key): other.config})
    monkeypatch.setattr(_utils, "device_name", lambda device: "NVIDIA H200" if device == "gpu0" else None)
    assert _utils.choose(launches, key, "gpu0") is other
    assert _utils.choose(launches, key, "cpu") is default  # no device name: no table lookup
    assert _utils.choose(launches, ("other",), "gpu0") is default  # key not tabled
    assert _utils.choose([default, launches[1]], key, "gpu0") is default  # winner not a candidate here
    with _utils.forcing_configs({"meta_gconv_fwd": launches[1].config}), _utils.recording_choices() as choices:
        assert _utils.choose(launches, key, "gpu0") is launches[1]
    assert [(c.kernel, c.key, c.chosen) for c in choices] == [("meta_gconv_fwd", key, launches[1])]
    with pytest.raises(ValueError, match="no candidate launches"):
        _utils.choose([], key)


def test_launchers_choose_with_the_tensor_device_and_a_bucketed_key():
    """The launchers pass their tensors' device and a key of bucketed shapes (small table), which is
    the same for every shape of one bucket."""
    key = kernels._key(3312, 134, 128, 16, torch.float32, "ieee")
    assert key == (4096, 256, 128, 16, "float32", "ieee") == kernels._key(2100, 200, 100, 9, torch.float32, "ieee")
    assert [_utils.bucket(n) for n in (0, 1, 2, 3, 64, 65)] == [0, 1, 2, 4, 64, 128]
    xg, emb, pool = torch.empty(3312, 134, device="meta"), torch.empty(16, 207, 16, device="meta"), \
        torch.empty(16, 134, 128, device="meta")
    with _utils.recording_launches(), _utils.recording_choices() as choices:
        kernels.meta_gconv_forward(xg, emb, "ST", 207, pool, None, "sigmoid", input_precision="ieee")
    assert [(c.kernel, c.key) for c in choices] == [("meta_gconv_fwd", key)]


def test_candidate_configs_are_distinct_and_name_their_tiles():
    for dtype in (torch.float32, torch.bfloat16):
        for kernel, launches in _candidates(3312, 134, 128, 16, dtype).items():
            configs = [launch.config for launch in launches]
            assert len(set(configs)) == len(configs) >= 3, (kernel, configs)
            assert all(c.startswith("BLOCK_M=") and " warps=" in c and " stages=" in c for c in configs)


@pytest.mark.skipif(RUNS_HERE or ON_GPU or bool(os.environ.get(_CHILD)),
                    reason="the interpreter tests run in this process")
def test_interpreter_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)
