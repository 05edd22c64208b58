"""Mixed precision: ``torch.autocast`` around stfast's ops and the fused HimNet / ST-LoRA.

Inside ``torch.autocast("cpu", torch.bfloat16)`` every custom op casts its fp32 inputs to bf16,
accumulates in fp32 and returns bf16; gradients reach the fp32 leaves in fp32. The bf16 results
are compared with the fp32 ones on the same (bf16-representable) inputs: bf16 keeps 8 significant
bits (relative rounding 2**-9 = 0.2% per stored value), and intermediates and outputs are stored in
bf16, so the stated tolerances are

- ops: output max error <= 2% of the output's largest magnitude, each gradient within 3% of its
  fp32 norm (measured: at most 0.8% and 0.8%);
- fused HimNet (two encoders over 3 steps, 3 decoder steps, GRU recurrences): output within 3%,
  every parameter's gradient within 4% (measured: 0.75% and 1.1%).

A backend that cannot compute a dtype refuses it with a TypeError naming the backend.
"""

import pytest
import torch

from stfast import ops
from stfast.nn import HimNet
from stfast.nn.stlora import NALL
from stfast.ops._support import check_dtype

BACKENDS = ["torch", "cpu"]
OUTPUT_TOL = 0.02
GRAD_TOL = 0.03


def relative_max_error(actual, expected):
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def relative_norm_error(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


def run(fn, leaves, autocast_dtype=None):
    """``fn()`` and the gradients of ``sum(out * weights)`` w.r.t. ``leaves``, optionally under CPU autocast."""
    if autocast_dtype is None:
        out = fn()
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = fn()
    # Weights with a non-zero mean, so that no gradient (a bias's: their sum) is a near-cancellation.
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
    return out, grads


def assert_close_to_fp32(fn, leaves, output_tol=OUTPUT_TOL, grad_tol=GRAD_TOL):
    out32, grads32 = run(fn, leaves)
    out16, grads16 = run(fn, leaves, torch.bfloat16)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert relative_max_error(out16, out32) <= output_tol
    for leaf, g16, g32 in zip(leaves, grads16, grads32):
        assert g16.dtype == leaf.dtype == torch.float32  # the cast is differentiable: fp32 leaves, fp32 grads
        assert relative_norm_error(g16, g32) <= grad_tol


def leaf(*shape, scale=1.0):
    # bf16-representable values: the comparison then measures the arithmetic (fp32 accumulation, bf16
    # intermediates), not the rounding of the inputs, which would flip the sign of pre-activations
    # near zero and with it leaky_relu's slope (x100): an input effect, no property of the kernels.
    return (torch.randn(*shape) * scale).bfloat16().float().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["S", "T", "ST"])
def test_meta_gconv_bf16_autocast_is_close_to_fp32(backend, axis):
    torch.manual_seed(0)
    batch, nodes, channels, dim, out = 3, 11, 5, 4, 9
    x = leaf(batch, nodes, channels)
    supports = torch.softmax(torch.randn(batch, nodes, nodes), -1).bfloat16().float().requires_grad_()
    embeddings = leaf(*{"S": (nodes, dim), "T": (batch, dim), "ST": (batch, nodes, dim)}[axis])
    pool, bias_pool = leaf(dim, 2 * channels, out, scale=0.3), leaf(dim, out, scale=0.3)
    leaves = [x, supports, embeddings, pool, bias_pool]
    with ops.use_backend(backend):
        assert_close_to_fp32(lambda: ops.meta_gconv(x, supports, embeddings, pool, bias_pool, 2, "tanh", axis=axis),
                             leaves)


def test_gconv_bf16_autocast_is_close_to_fp32():
    backend = "torch"  # the only gconv backend on CPU
    torch.manual_seed(1)
    x, supports = leaf(2, 13, 6), torch.softmax(torch.randn(13, 13), -1).bfloat16().float().requires_grad_()
    weight, bias = leaf(18, 7, scale=0.3), leaf(7)
    with ops.use_backend(backend):
        assert_close_to_fp32(lambda: ops.gconv(x, supports, weight, bias, 3, "sigmoid"), [x, supports, weight, bias])


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_lora_bf16_autocast_is_close_to_fp32(backend):
    torch.manual_seed(2)
    x = leaf(3, 2, 11, 24)
    weight, bias = leaf(17, 24, scale=0.2), leaf(17)
    lora_a, lora_b = leaf(11, 24, 5, scale=0.2), leaf(11, 5, 17, scale=0.2)
    leaves = [x, weight, bias, lora_a, lora_b]
    with ops.use_backend(backend):
        assert_close_to_fp32(lambda: ops.node_lora(x, weight, bias, lora_a, lora_b, 0.5, "leaky_relu"), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_autocast_returns_fp16(backend):
    x, weight, lora_a, lora_b = torch.randn(4, 7, 8), torch.randn(5, 8), torch.randn(7, 8, 2), torch.randn(7, 2, 5)
    with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
        out = ops.node_lora(x, weight, None, lora_a, lora_b, 1.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ops.node_lora(x, weight, None, lora_a, lora_b, 1.0), rtol=1e-2, atol=1e-2)


def test_outside_autocast_and_for_float64_nothing_is_cast():
    x, supports = torch.randn(2, 5, 3, dtype=torch.float64), torch.rand(5, 5, dtype=torch.float64)
    weight = torch.randn(6, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.gconv(x, supports, weight, None, 2).dtype == torch.float64  # as torch's autocast: double stays
    assert ops.gconv(x.float(), supports.float(), weight.float(), None, 2).dtype == torch.float32


def test_the_registered_op_itself_follows_autocast():
    # torch.ops.stfast.* called directly (as a compiled graph does) cast too, not only the Python wrappers.
    x, supports, weight = torch.randn(2, 5, 3), torch.rand(5, 5), torch.randn(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.stfast.gconv(x, supports, weight, None, 2, None, "torch")
    assert out.dtype == torch.bfloat16


def test_triton_refuses_bf16_on_cpu_tensors_with_or_without_autocast(monkeypatch):
    with pytest.raises(TypeError, match="triton backend cannot compute torch.bfloat16 on CPU"):
        check_dtype("triton", "node_lora", torch.bfloat16, torch.device("cpu"))
    check_dtype("triton", "node_lora", torch.float32, torch.device("cpu"))  # fp32 stays allowed
    check_dtype("triton", "node_lora", torch.float16, torch.device("cpu"))  # the interpreter computes fp16
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend can then be forced for CPU tensors
    x, weight, lora_a, lora_b = torch.randn(4, 7, 16), torch.randn(16, 16), torch.randn(7, 16, 16), torch.randn(7, 16, 16)
    with ops.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="triton backend cannot compute"):
            ops.node_lora(x, weight, None, lora_a, lora_b, 1.0)
    with ops.use_backend("triton"), pytest.raises(TypeError, match="node_lora: the triton backend cannot compute"):
        ops.node_lora(*(t.bfloat16() for t in (x, weight)), None, *(t.bfloat16() for t in (lora_a, lora_b)), 1.0)


SMALL_HIMNET = dict(num_nodes=9, input_dim=3, output_dim=1, out_steps=3, hidden_dim=16, cheb_k=2, ycov_dim=2,
                    tod_embedding_dim=4, dow_embedding_dim=4, node_embedding_dim=6, st_embedding_dim=6)


def himnet_inputs(batch=3, steps=3, nodes=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, nodes, 3, generator=generator)
    x[..., 1] = torch.rand(batch, steps, nodes, generator=generator)  # time of day in [0, 1)
    x[..., 2] = torch.randint(0, 7, (batch, steps, nodes), generator=generator).float()
    y_cov = torch.rand(batch, 3, nodes, 2, generator=generator)
    labels = torch.randn(batch, 3, nodes, 1, generator=generator)
    return x, y_cov, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_himnet_training_step_bf16_autocast_is_close_to_fp32(backend):
    torch.manual_seed(0)
    model = HimNet(**SMALL_HIMNET).train()
    x, y_cov, labels = himnet_inputs()
    forcing = torch.tensor([False, True, False])
    params = list(model.parameters())
    with ops.use_backend(backend):
        assert_close_to_fp32(lambda: model(x, y_cov, labels, teacher_forcing=forcing), params,
                             output_tol=0.03, grad_tol=0.04)


def test_stlora_layer_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(3)
    layer = NALL(24, 12, num_nodes=10, rank=4)
    torch.nn.init.normal_(layer.lora_b, std=0.2)  # a trained adapter, not the zero start
    x = leaf(2, 3, 10, 24)
    assert_close_to_fp32(lambda: layer(x), [x, *layer.parameters()])
