"""meta_gconv alone: the published einsum formulation vs stfast's backends, forward and forward+backward.

    pytest bench/test_meta_gconv_bench.py --benchmark-only --benchmark-json bench/results/<device>/meta_gconv_op.json

Shapes are HimNet's gate convolution (C + H = 67 input channels, K = 2, D = 16, O = 2H = 128) on
METR-LA (N = 207) and PEMS07 (N = 883) at batch 16. ``extra_info`` carries the useful FLOPs
(:func:`useful_flops` forward, twice that again backward) and the achieved GFLOP/s.
"""

import pytest
import torch

import stfast.ops as ops
from stfast.profiler import describe_device
from stfast.reference.himnet import HimGCN

from .conftest import synchronize

SHAPES = {  # name: (B, N, C, K, D, O)
    "METR-LA": (16, 207, 67, 2, 16, 128),
    "PEMS07": (16, 883, 67, 2, 16, 128),
}
AXES = ("S", "T", "ST")
CANDIDATES = ("reference", "torch", "cpu", "triton", "cuda")


def make_inputs(shape, axis, device):
    batch, nodes, channels, cheb_k, dim, out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, nodes, channels, generator=g).to(device).requires_grad_()
    supports = torch.softmax(torch.randn(batch, nodes, nodes, generator=g), -1).to(device).requires_grad_()
    emb_shape = {"S": (nodes, dim), "T": (batch, dim), "ST": (batch, nodes, dim)}[axis]
    embeddings = torch.randn(emb_shape, generator=g).to(device).requires_grad_()
    gcn = HimGCN(channels, out, cheb_k, dim, meta_axis=axis).to(device)
    return gcn, (x, supports, embeddings)


def useful_flops(shape, axis) -> int:
    """Forward FLOPs of the cheapest exact formulation: for ST every (sample, node) row needs its own
    D-term combination (2 M D I O); for S / T the weights are built once per node / sample
    (2 N D I O or 2 B D I O) and applied per row (2 B N I O). The graph propagation (2 B N^2 C per
    Chebyshev term, with per-sample supports) is not counted: at PEMS07 it dominates the S and T cases."""
    batch, nodes, channels, cheb_k, dim, out = shape
    rows, inputs = batch * nodes, cheb_k * channels
    if axis == "ST":
        return 2 * rows * dim * inputs * out
    owners = nodes if axis == "S" else batch
    return 2 * owners * dim * inputs * out + 2 * rows * inputs * out


def candidate_fn(candidate, gcn, device):
    if candidate == "reference":
        return gcn
    status = ops.available_backends(device, "meta_gconv")[candidate]
    if status is not True:
        pytest.skip(f"{candidate}: {status}")

    def run(x, supports, embeddings):
        with ops.use_backend(candidate):
            return ops.meta_gconv(x, supports, embeddings, gcn.weights_pool, gcn.bias_pool, gcn.cheb_k,
                                  axis=gcn.meta_axis)
    return run


@pytest.mark.parametrize("dataset", list(SHAPES))
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_meta_gconv(benchmark, device, dataset, axis, candidate, mode):
    shape = SHAPES[dataset]
    if device.type == "cpu" and dataset == "PEMS07" and candidate == "reference" and axis == "ST":
        pytest.skip("the reference materialises 1 GB of ST weights per call: too slow on a CPU")
    gcn, inputs = make_inputs(shape, axis, device)
    fn = candidate_fn(candidate, gcn, device)

    def step():
        y = fn(*inputs)
        if mode == "forward+backward":
            y.sum().backward()
        synchronize(device)

    benchmark.pedantic(step, rounds=5 if device.type == "cpu" else 50, warmup_rounds=1)
    flops = useful_flops(shape, axis) * (3 if mode == "forward+backward" else 1)
    benchmark.extra_info.update(device=describe_device(device), flops=flops,
                                gflops_per_s=flops / benchmark.stats["median"] / 1e9)
