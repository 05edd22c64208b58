"""The ``cuda`` backend of ``stfast::node_lora`` (csrc/cuda/node_lora_*): forward and every gradient
against the ``torch`` backend in fp32 on odd shapes (every activation, 0-2 leading batch axes, with and
without bias, ranks above one rank chunk, more rows than one dW slice), gradient subsets, fp16 / bf16
against an fp32 computation on the same values, float64 gradcheck, bitwise determinism, opcheck, and
dropout: the CUDA mask equals the CPU one bitwise and the op with dropout equals the composition with
that mask.

GPU machines only: every test but the case-list check is skipped, with the reason, where there is
no CUDA device or the extension was built without CUDA kernels (so nothing here loads or builds the
extension on a machine without a GPU).
"""

import pytest
import torch

from stfast import ops
from stfast.ops import _ext, _torch_lora, backends
from stfast.ops.node_lora import ACTIVATIONS, dropout_seed

CUDA_STATUS = _ext.status("cuda") if torch.cuda.is_available() else "no CUDA device"
needs_cuda_ext = pytest.mark.skipif(CUDA_STATUS is not True, reason=f"cuda backend unavailable: {CUDA_STATUS}")

PARAMS = ("x", "weight", "bias", "lora_a", "lora_b")
ALL_GRADS = (True,) * 5


@pytest.fixture(autouse=True)
def _fp32_torch_reference(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    ops.set_backend(None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch backend's GEMMs in true fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ops.set_backend(None)


def make_inputs(lead, nodes, d_in, d_out, rank, *, bias=True, dtype=torch.float32, seed=0, requires_grad=False):
    """``(x, weight, bias or None, lora_a, lora_b)`` on the GPU, drawn in float64 on the CPU."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to("cuda", dtype)
        return t.requires_grad_(requires_grad)

    return (rand(*lead, nodes, d_in), rand(d_out, d_in, scale=d_in**-0.5), rand(d_out) if bias else None,
            rand(nodes, d_in, rank, scale=d_in**-0.5), rand(nodes, rank, d_out, scale=rank**-0.5))


def grad_like(inputs, dtype=None):
    x, weight = inputs[0], inputs[1]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(*x.shape[:-1], weight.shape[0], generator=gen, dtype=torch.float64)
    return g.to("cuda", dtype or x.dtype)


def run(backend, inputs, scale, activation, grad_out, requires=ALL_GRADS, dropout_p=0.0, seed=3, offset=0):
    """Output and the gradients of the leaves that require one (None for the others)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with ops.use_backend(backend):
        assert ops.resolve_backend("node_lora", leaves[0].device) == backend
        out = ops.node_lora(*leaves, scale, activation, dropout_p=dropout_p, training=True, seed=seed, offset=offset)
        found = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
    return out.detach(), [next(found) if t is not None and t.requires_grad else None for t in leaves]


def composed(inputs, scale, activation, mask, grad_out):
    """The op written out in float64 with autograd, dropout as ``x * mask`` on the low-rank path."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    x, weight, bias, lora_a, lora_b = leaves
    h = torch.einsum("...nk,nkr->...nr", x * mask.double(), lora_a)
    y = x @ weight.t() + scale * torch.einsum("...nr,nro->...no", _torch_lora.activate(h, activation), lora_b)
    if bias is not None:
        y = y + bias
    present = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(y, present, grad_out.double()))
    return y.detach(), [None if t is None else next(found) for t in leaves]


def assert_matches(got, want, rtol, atol):
    (out, grads), (ref, ref_grads) = got, want
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    for name, g, w in zip(PARAMS, grads, ref_grads):
        assert (g is None) == (w is None), name
        if w is not None:
            assert g.shape == w.shape, name
            torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"d {n}: {m}")


# ---------------------------------------------------------------- fp32 against the torch backend

# (lead, nodes, d_in, d_out, rank, activation, bias): N = 1, 5, 37; ranks 1, 3, 16, 64 (64: two rank
# chunks, h recomputed per output tile); d_in != d_out, not powers of two, some above one 64-wide
# tile; rows per node above one 32-row tile (40, 70); 666 and 2368 rows (several dW / db slices).
CASES = [
    ((), 1, 7, 5, 1, None, True),
    ((3,), 5, 13, 70, 3, "leaky_relu", False),
    ((2, 3), 37, 67, 29, 16, "relu", True),
    ((40,), 5, 33, 130, 64, "tanh", True),
    ((2, 9), 37, 19, 23, 3, "sigmoid", False),
    ((70,), 1, 100, 3, 16, "sigmoid", True),
    ((4,), 37, 5, 66, 64, None, False),
    ((4, 16), 37, 9, 11, 1, "leaky_relu", True),
]


@needs_cuda_ext
@pytest.mark.parametrize("lead,nodes,d_in,d_out,rank,activation,bias", CASES)
def test_cuda_matches_torch_fp32(lead, nodes, d_in, d_out, rank, activation, bias):
    inputs = make_inputs(lead, nodes, d_in, d_out, rank, bias=bias)
    grad_out = grad_like(inputs)
    got = run("cuda", inputs, 0.7, activation, grad_out)
    assert_matches(got, run("torch", inputs, 0.7, activation, grad_out), rtol=1e-4, atol=1e-4)


def test_cases_cover_every_activation_rank_and_node_count():
    assert {c[5] for c in CASES} == set(ACTIVATIONS)
    assert {1, 3, 16, 64} <= {c[4] for c in CASES}
    assert {1, 5, 37} <= {c[1] for c in CASES}
    assert {0, 1, 2} <= {len(c[0]) for c in CASES}
    assert {True, False} == {c[6] for c in CASES}


# Each gradient alone (its own path through the launchers: dW without db, db alone, ...), dW with db,
# and the low-rank gradients together.
SUBSETS = [tuple(i == j for j in range(5)) for i in range(5)] + [
    (False, True, True, False, False), (True, False, False, True, True)]


@needs_cuda_ext
@pytest.mark.parametrize("requires", SUBSETS, ids=lambda r: "+".join(n for n, on in zip(PARAMS, r) if on))
def test_cuda_gradient_subsets(requires):
    inputs = make_inputs((3,), 5, 67, 70, 3)
    grad_out = grad_like(inputs)
    got = run("cuda", inputs, 0.5, "tanh", grad_out, requires, dropout_p=0.2, seed=4, offset=1)
    mask = torch.ops.stfast_ext.node_lora_dropout_mask(inputs[0], 0.2, 4, 1)
    ref, ref_grads = composed(inputs, 0.5, "tanh", mask, grad_out)
    want = (ref, [w if r else None for w, r in zip(ref_grads, requires)])
    assert_matches(got, want, rtol=1e-4, atol=1e-4)


@needs_cuda_ext
def test_cuda_empty_batch():
    inputs = make_inputs((0,), 5, 7, 6, 3)
    grad_out = grad_like(inputs)
    got = run("cuda", inputs, 0.5, "sigmoid", grad_out)
    assert got[0].shape == (0, 5, 6)
    assert_matches(got, run("torch", inputs, 0.5, "sigmoid", grad_out), rtol=0, atol=0)


@needs_cuda_ext
def test_ext_op_accepts_non_contiguous_inputs():
    x, weight, bias, lora_a, lora_b = make_inputs((4,), 5, 7, 6, 3)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    weight_t = weight.t().contiguous().t()
    assert not x_t.is_contiguous() and not weight_t.is_contiguous()
    args = (bias, lora_a, lora_b, 0.5, "relu", 0.1, dropout_seed(3, 0, x.device))
    want = torch.ops.stfast_ext.node_lora_fwd(x, weight, *args)
    assert torch.equal(torch.ops.stfast_ext.node_lora_fwd(x_t, weight_t, *args), want)


# ---------------------------------------------------------------- half precision, float64, determinism

@needs_cuda_ext
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor_cores", "simt"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid"])
def test_cuda_half_precision_accumulates_in_fp32(dtype, tol, activation, tensor_cores):
    inputs = make_inputs((3,), 37, 67, 70, 16, dtype=dtype)
    grad_out = grad_like(inputs)
    with ops.cuda_tensor_cores(tensor_cores):
        got = run("cuda", inputs, 0.5, activation, grad_out)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1] if g is not None)
    fp32 = [None if t is None else t.float() for t in inputs]  # the same values, computed in fp32
    want = run("torch", fp32, 0.5, activation, grad_out.float())
    assert_matches(got, want, rtol=tol, atol=tol)


@needs_cuda_ext
def test_cuda_fp32_uses_tf32_only_where_torch_allows_it():
    inputs = make_inputs((4, 16), 37, 67, 70, 16)  # 2368 rows: several dW / db slices
    grad_out = grad_like(inputs)
    ieee = run("cuda", inputs, 0.5, "tanh", grad_out, dropout_p=0.2)  # the fixture turned TF32 off
    with ops.cuda_tensor_cores(False):
        simt = run("cuda", inputs, 0.5, "tanh", grad_out, dropout_p=0.2)
    assert torch.equal(ieee[0], simt[0]) and all(torch.equal(a, b) for a, b in zip(ieee[1], simt[1]))
    torch.backends.cuda.matmul.allow_tf32 = True  # the fixture restores it
    tf32 = run("cuda", inputs, 0.5, "tanh", grad_out, dropout_p=0.2)
    again = run("cuda", inputs, 0.5, "tanh", grad_out, dropout_p=0.2)
    assert torch.equal(tf32[0], again[0]) and all(torch.equal(a, b) for a, b in zip(tf32[1], again[1]))
    assert_matches(tf32, ieee, rtol=1e-2, atol=1e-2)
    if torch.cuda.get_device_capability()[0] >= 8:  # the tensor-core path ran: TF32 rounding shows
        assert not torch.equal(tf32[0], ieee[0])


@needs_cuda_ext
@pytest.mark.parametrize("activation,dropout_p,lead", [
    ("leaky_relu", 0.0, (2,)), ("tanh", 0.3, (2, 2)), ("sigmoid", 0.0, ()), (None, 0.5, (3,)),
])
def test_cuda_gradcheck_float64(activation, dropout_p, lead):
    inputs = make_inputs(lead, 5, 7, 6, 3, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        with ops.use_backend("cuda"):
            return ops.node_lora(*args, 0.7, activation, dropout_p=dropout_p, training=True, seed=11, offset=5)

    assert torch.autograd.gradcheck(fn, inputs)


@needs_cuda_ext
def test_cuda_is_bitwise_deterministic():
    inputs = make_inputs((4, 16), 37, 67, 70, 16)  # 2368 rows: several dW / db slices
    grad_out = grad_like(inputs)
    first = run("cuda", inputs, 0.5, "tanh", grad_out, dropout_p=0.2, seed=5, offset=9)
    again = run("cuda", inputs, 0.5, "tanh", grad_out, dropout_p=0.2, seed=5, offset=9)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


@needs_cuda_ext
@pytest.mark.parametrize("bias,activation,dropout_p,lead", [
    (True, "leaky_relu", 0.0, (2,)), (False, "tanh", 0.25, (2, 3)), (True, None, 0.0, ()),
])
def test_opcheck_with_cuda_backend(bias, activation, dropout_p, lead):
    x, weight, b, lora_a, lora_b = make_inputs(lead, 5, 7, 6, 3, bias=bias, requires_grad=True)
    torch.library.opcheck(torch.ops.stfast.node_lora.default,
                          (x, weight, b, lora_a, lora_b, 0.5, activation, dropout_p, dropout_seed(7, 2, x.device),
                           "cuda"))


# ---------------------------------------------------------------- dropout

@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,seed,offset", [(0.3, 7, 0), (0.5, 2**40 + 3, 2**33 - 5), (0.0, 1, 2)])
def test_dropout_mask_equals_the_cpu_mask_bitwise(dtype, p, seed, offset):
    x = torch.randn(3, 37, 67, dtype=torch.float64).to(dtype)
    got = torch.ops.stfast_ext.node_lora_dropout_mask(x.cuda(), p, seed, offset)
    want = torch.ops.stfast_ext.node_lora_dropout_mask(x, p, seed, offset)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.cpu(), want)
    kept = got != 0
    assert got[kept].unique().numel() == 1  # 1 / (1 - p), rounded to float32 then to the dtype
    torch.testing.assert_close(got[kept][0].double().cpu(), torch.tensor(1.0 / (1.0 - p), dtype=torch.float64),
                               rtol=4e-3, atol=0)
    assert abs(kept.double().mean().item() - (1.0 - p)) < 0.03


@needs_cuda_ext
@pytest.mark.parametrize("activation,bias,lead", [("leaky_relu", True, (2, 3)), ("sigmoid", False, (40,))])
def test_dropout_matches_the_composition_with_the_mask(activation, bias, lead):
    inputs = make_inputs(lead, 37, 67, 29, 16, bias=bias)
    p, seed, offset = 0.3, 12345, 77
    grad_out = grad_like(inputs)
    got = run("cuda", inputs, 0.6, activation, grad_out, dropout_p=p, seed=seed, offset=offset)
    mask = torch.ops.stfast_ext.node_lora_dropout_mask(inputs[0], p, seed, offset)
    assert_matches(got, composed(inputs, 0.6, activation, mask, grad_out), rtol=1e-4, atol=1e-4)
    # another offset draws another mask
    other = run("cuda", inputs, 0.6, activation, grad_out, dropout_p=p, seed=seed, offset=offset + 1)
    assert not torch.equal(got[0], other[0])
