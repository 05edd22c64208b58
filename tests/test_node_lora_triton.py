"""The triton backend of ``stfast::node_lora``: forward and every gradient against the torch
backend (dropout off: the two backends draw different masks), the in-kernel dropout (determinism,
and forward/backward consistency with the mask the kernels draw), opcheck, the backend probe,
importing without Triton, and (GPU machines only) fp32 / TF32 / bf16 / fp16 at the benchmark and
METR-LA shapes.

On a machine without a GPU the kernels run in the Triton interpreter (see ``_triton_interpreter``).
"""

import os

import pytest
import torch
from _triton_interpreter import CHILD_ENV as _CHILD
from _triton_interpreter import (DEVICE, ON_GPU, import_kernels, is_interpreted, kernels_run_here,
                                 rerun_under_interpreter, run_without_triton, skip_unless_kernels_run)

kernels = import_kernels("node_lora")  # before anything else imports it: see _triton_interpreter

import stfast.ops as ops  # noqa: E402
from stfast.ops import _ext, backends  # noqa: E402
from stfast.ops.node_lora import dropout_seed  # noqa: E402

_EXT = _ext.load()

INTERPRETED = is_interpreted(kernels.node_lora_fwd)
RUNS_HERE = kernels_run_here(kernels.node_lora_fwd)
needs_kernels = skip_unless_kernels_run(kernels.node_lora_fwd, "node_lora")
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if not ON_GPU and INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# ---------------------------------------------------------------- inputs and comparison

def make_inputs(lead, nodes, d_in, d_out, rank, *, bias=True, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    return (rand(*lead, nodes, d_in), rand(d_out, d_in, scale=d_in**-0.5), rand(d_out) if bias else None,
            rand(nodes, d_in, rank, scale=d_in**-0.5), rand(nodes, rank, d_out, scale=rank**-0.5))


def run(backend, inputs, activation, grad_out, requires=(True,) * 5, scale=0.7, dropout_p=0.0, seed=3, offset=0):
    """Output and the gradients of the inputs flagged in ``requires`` (None elsewhere)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    with ops.use_backend(backend):
        assert ops.resolve_backend("node_lora", inputs[0].device) == backend
        out = ops.node_lora(*inputs, scale, activation, dropout_p=dropout_p, training=True, seed=seed, offset=offset)
        grads = iter(torch.autograd.grad(out, leaves, grad_out) if leaves else ())
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def _grad_out(inputs):
    shape = inputs[0].shape[:-1] + (inputs[1].shape[0],)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(inputs[0])


def compare(inputs, activation, requires=(True,) * 5, rtol=1e-5, atol=1e-5):
    grad_out = _grad_out(inputs)
    out, grads = run("triton", inputs, activation, grad_out, requires)
    ref, ref_grads = run("torch", inputs, activation, grad_out, requires)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d {n}: {m}")
    return out, grads


def _relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- values and gradients (tiny shapes)

# Not the cartesian product: each row varies several things at once, together covering 0, 1 and 2
# leading axes, N in {1, 5, 17}, rank in {1, 3, 16, 17, 64} (padded to 16 / 32 / 64), d_in != d_out
# (never a power of two), every activation, bias or not.
CASES = [
    # lead, N, d_in, d_out, rank, activation, bias
    ((3,), 5, 7, 11, 3, "leaky_relu", True),
    ((), 5, 13, 6, 1, "relu", False),
    ((2, 3), 1, 7, 11, 16, "tanh", True),
    ((2,), 17, 6, 5, 17, "sigmoid", True),
    ((2, 2), 5, 9, 7, 64, None, True),
    ((1,), 5, 20, 3, 3, "leaky_relu", False),
]


@needs_kernels
@pytest.mark.parametrize("lead,nodes,d_in,d_out,rank,activation,bias", CASES)
def test_matches_torch_backend(lead, nodes, d_in, d_out, rank, activation, bias):
    compare(make_inputs(lead, nodes, d_in, d_out, rank, bias=bias), activation)


# Several tiles in every direction, ragged: 70 batch rows (two 64-row tiles per node), d_in 70 and
# d_out 66 (two 64-wide tiles each). The subsets of gradients exercise each kernel path.
@needs_kernels
@pytest.mark.parametrize("requires", [
    (True, True, True, True, True),
    (True, False, False, False, False),
    (False, True, False, True, False),
    (False, False, True, False, True),
])
def test_several_tiles_and_gradient_subsets(requires):
    compare(make_inputs((70,), 2, 70, 66, 5), "leaky_relu", requires)


@needs_kernels
def test_every_tuning_candidate_gives_the_default_results():
    """Each kernel's candidate launches (a tuned table may pick any of them) compute what the default
    does, dropout included: at this shape every kernel has two candidates with different tiles."""
    from stfast.kernels._utils import forcing_configs, recording_choices

    inputs = make_inputs((70,), 2, 70, 66, 5)
    grad_out = _grad_out(inputs)
    with recording_choices() as choices:
        want = run("triton", inputs, "tanh", grad_out, dropout_p=0.3)
    candidates = {c.kernel: [launch.config for launch in c.candidates] for c in choices}
    assert set(candidates) == {"node_lora_fwd", "node_lora_bwd_rows", "node_lora_bwd_da", "node_lora_bwd_db",
                               "node_lora_bwd_dw"}
    assert all(len(configs) == 2 for configs in candidates.values()), candidates
    with forcing_configs({kernel: configs[1] for kernel, configs in candidates.items()}):
        got = run("triton", inputs, "tanh", grad_out, dropout_p=0.3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, g, w in zip(NAMES, got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")


@needs_kernels
def test_split_row_reduction_for_weight_and_bias():
    """M*N = 650 rows: the dW / db reduction runs in two row splits, summed in order."""
    inputs = make_inputs((130,), 5, 6, 7, 2)
    assert kernels._splits(130 * 5, 1, 64) == 2
    compare(inputs, "tanh", (False, True, True, False, False))


@needs_kernels
def test_fp16_against_float64():
    """Half inputs (fp32 accumulation, half outputs). fp16 only: bf16 ``tl.dot`` is wrong in the
    interpreter, so bf16 is checked by the GPU tests."""
    inputs = make_inputs((37,), 3, 20, 24, 4, dtype=torch.float16)
    grad_out = _grad_out(inputs)
    out, grads = run("triton", inputs, "leaky_relu", grad_out)
    ref, ref_grads = run("torch", tuple(t.double() for t in inputs), "leaky_relu", grad_out.double())
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 5e-3, errors


@needs_kernels
def test_deterministic():
    inputs = make_inputs((3,), 5, 7, 11, 3)
    grad_out = _grad_out(inputs)
    first = run("triton", inputs, "leaky_relu", grad_out, dropout_p=0.3)
    second = run("triton", inputs, "leaky_relu", grad_out, dropout_p=0.3)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


# ---------------------------------------------------------------- in-kernel dropout

def naive_node_lora(x, weight, bias, lora_a, lora_b, scale, activation, mask):
    act = {"leaky_relu": lambda h: torch.nn.functional.leaky_relu(h, 0.01), "tanh": torch.tanh}[activation]
    outs = []
    for n in range(x.shape[-2]):
        xn = x[..., n, :]
        y = xn @ weight.t() + scale * act((xn * mask[..., n, :]) @ lora_a[n]) @ lora_b[n]
        outs.append(y if bias is None else y + bias)
    return torch.stack(outs, dim=-2)


@needs_kernels
@pytest.mark.parametrize("activation,lead", [("leaky_relu", (2, 3)), ("tanh", (4,))])
def test_dropout_forward_and_backward_use_the_kernel_mask(activation, lead):
    """Output and every gradient equal a float64 per-node loop that uses the mask the kernels draw
    from (seed, offset): the backward kernels regenerate the forward's mask."""
    p, seed, offset = 0.4, 1234, 77
    inputs = make_inputs(lead, 5, 7, 11, 3)
    grad_out = _grad_out(inputs)
    out, grads = run("triton", inputs, activation, grad_out, dropout_p=p, seed=seed, offset=offset)
    x = inputs[0]
    keep = kernels.dropout_keep_mask(x.numel() // x.shape[-1], x.shape[-1], p, seed, offset, x.device)
    assert set(keep.unique().tolist()) == {0.0, 1.0} and 0.4 < keep.mean().item() < 0.8
    mask = (keep.double() / (1 - p)).reshape(x.shape)
    inputs64 = [t.double().requires_grad_() for t in inputs]
    expected = naive_node_lora(*inputs64, 0.7, activation, mask)
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, grads, expected_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")


@needs_kernels
def test_dropout_seed_offset_and_zero():
    inputs = make_inputs((4,), 5, 7, 11, 3)
    grad_out = _grad_out(inputs)
    outs = {key: run("triton", inputs, "leaky_relu", grad_out, dropout_p=0.5, seed=key[0], offset=key[1])[0]
            for key in ((5, 0), (6, 0), (5, 1))}
    assert torch.equal(outs[5, 0], run("triton", inputs, "leaky_relu", grad_out, dropout_p=0.5, seed=5)[0])
    assert not torch.equal(outs[5, 0], outs[6, 0]) and not torch.equal(outs[5, 0], outs[5, 1])
    with ops.use_backend("triton"):
        plain = ops.node_lora(*inputs, 0.7)
        assert torch.equal(ops.node_lora(*inputs, 0.7, dropout_p=0.0, training=True, seed=9), plain)
        assert torch.equal(ops.node_lora(*inputs, 0.7, dropout_p=0.5, training=False), plain)
    keep = kernels.dropout_keep_mask(200, 50, 0.3, 1, 0, DEVICE)
    assert abs(keep.mean().item() - 0.7) < 0.02


@needs_kernels
@pytest.mark.skipif(_EXT is not True, reason=f"stfast extension unavailable: {_EXT}")
@pytest.mark.parametrize("seed,offset", [(0, 0), (5, 3), (2**40 + 7, 12345), (2**61, 2**33)])
def test_dropout_mask_equals_the_cpu_extension_mask(seed, offset):
    """The C++ kernels draw Triton's tl.rand (csrc/node_lora_math.h): the same keep-mask bit for bit,
    64-bit seeds and offsets included, so the triton, cpu and cuda backends drop the same elements."""
    x = torch.empty(3, 7, 19)
    keep = kernels.dropout_keep_mask(21, 19, 0.3, seed, offset, DEVICE).cpu()
    assert torch.equal(keep.view(3, 7, 19), (_ext.node_lora_dropout_mask(x, 0.3, seed, offset) > 0).float())


@needs_kernels
@pytest.mark.skipif(_EXT is not True or ON_GPU, reason="CPU tensors: the cpu backend under the interpreter")
def test_dropout_results_equal_the_cpu_backend():
    inputs = make_inputs((2, 3), 5, 7, 11, 3)
    grad_out = _grad_out(inputs)
    got = run("triton", inputs, "tanh", grad_out, dropout_p=0.4, seed=9, offset=4)
    want = run("cpu", inputs, "tanh", grad_out, dropout_p=0.4, seed=9, offset=4)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, g, w in zip(NAMES, got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")


@needs_kernels
@pytest.mark.skipif(_EXT is not True or ON_GPU, reason="CPU tensors: the cpu backend under the interpreter")
def test_compiled_training_step_with_the_default_seed_draws_the_cpu_backends_mask():
    """``torch.compile(fullgraph=True)`` of a training step with dropout and the default seed (drawn on
    the device: no graph break); from the same generator state the compiled triton step and the eager
    cpu step draw the same seed tensor, hence the same mask: equal outputs and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    inputs = [t.requires_grad_() for t in make_inputs((2,), 3, 5, 6, 2)]

    def step(backend):
        def loss(*inputs):
            with ops.use_backend(backend):
                return ops.node_lora(*inputs, 0.5, "tanh", dropout_p=0.4, training=True).square().sum()

        return loss

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step("triton"), fullgraph=True, backend=counter)
    for draw in (1, 2):
        torch.manual_seed(draw)
        got = compiled(*inputs)
        got_grads = torch.autograd.grad(got, inputs)
        torch.manual_seed(draw)
        want = step("cpu")(*inputs)
        want_grads = torch.autograd.grad(want, inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name, g, w in zip(NAMES, got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")
    assert counter.frame_count == 1


@needs_kernels
def test_opcheck_with_triton_backend():
    """The full opcheck (schema, autograd registration, fake tensor, AOT dispatch), with dropout."""
    x, weight, bias, lora_a, lora_b = (t.requires_grad_() for t in make_inputs((2,), 3, 5, 6, 2))
    with ops.use_backend("triton"):
        torch.library.opcheck(torch.ops.stfast.node_lora.default,
                              (x, weight, bias, lora_a, lora_b, 0.5, "leaky_relu", 0.25, dropout_seed(7, 3, DEVICE),
                               "triton"))


# ---------------------------------------------------------------- selection and import

def test_probe_allows_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.available_backends("cpu", "node_lora")["triton"] is True
    ops.set_backend(None)
    assert ops.resolve_backend("node_lora", "cpu") != "triton"  # never picked by auto on CPU
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = ops.available_backends("cpu", "node_lora")["triton"]
    assert isinstance(reason, str) and "TRITON_INTERPRET=1" in reason


def test_imports_without_triton():
    """``node_lora`` runs on the torch backend when triton cannot be imported, and the triton
    backend then says why."""
    run_without_triton(
        "import torch, stfast.ops as ops\n"
        "reason = ops.available_backends('cuda', 'node_lora')['triton']\n"
        "assert 'triton is not importable' in reason, reason\n"
        "x, w, a, b = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(3, 4, 2), torch.randn(3, 2, 5)\n"
        "assert ops.node_lora(x, w, None, a, b, 1.0).shape == (2, 3, 5)\n"
        "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )


@pytest.mark.skipif(RUNS_HERE or ON_GPU or bool(os.environ.get(_CHILD)),
                    reason="the interpreter tests run in this process")
def test_interpreter_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)


# ---------------------------------------------------------------- GPU: real dtypes, real shapes

@pytest.mark.skipif(not ON_GPU or INTERPRETED, reason="needs a CUDA GPU (compiled Triton kernels)")
class TestGPU:
    """The benchmark shape (B=64, N=883, d=128, r=16) and METR-LA's (B=16*12 rows per node, N=207,
    d=64, r=16) against the torch backend in float64 on the same (rounded) inputs; error =
    max |diff| / max |reference| per tensor."""

    @pytest.mark.parametrize("lead,nodes,d_in,d_out,rank", [((64,), 883, 128, 128, 16), ((16, 12), 207, 64, 96, 16)],
                             ids=["bench-d128", "metr-la"])
    @pytest.mark.parametrize("dtype,tf32,tol", [
        (torch.float32, False, 1e-4),
        (torch.float32, True, 1e-2),
        (torch.bfloat16, False, 5e-2),
        (torch.float16, False, 1e-2),
    ], ids=["fp32-ieee", "fp32-tf32", "bf16", "fp16"])
    def test_against_float64(self, lead, nodes, d_in, d_out, rank, dtype, tf32, tol):
        inputs = make_inputs(lead, nodes, d_in, d_out, rank, dtype=dtype, device="cuda")
        grad_out = _grad_out(inputs)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            out, grads = run("triton", inputs, "leaky_relu", grad_out)
        finally:
            torch.set_float32_matmul_precision(previous)
        ref, ref_grads = run("torch", tuple(t.double() for t in inputs), "leaky_relu", grad_out.double())
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        errors = {"out": _relative_error(out, ref)}
        for name, got, want in zip(NAMES, grads, ref_grads):
            errors[name] = _relative_error(got, want)
        assert max(errors.values()) <= tol, errors

    def test_dropout_deterministic_on_gpu(self):
        inputs = make_inputs((64,), 883, 64, 64, 16, device="cuda")
        grad_out = _grad_out(inputs)
        first = run("triton", inputs, "leaky_relu", grad_out, dropout_p=0.1, seed=5)
        second = run("triton", inputs, "leaky_relu", grad_out, dropout_p=0.1, seed=5)
        assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
