"""Propagation through the adaptive graph ``softmax(relu(E E^T), -1)`` without building it
(``stfast.ops.adaptive_graph``), and the fused HimNet decoder that uses it.

The oracle is the dense graph of the reference (``stfast.reference.himnet.adaptive_support``) times x.
"""

import numpy as np
import pytest
import torch

import stfast.nn
import stfast.nn.himnet as fused_himnet
import stfast.reference
from stfast import ops
from stfast.memory import estimate_memory, measure_step_memory
from stfast.ops import adaptive_graph
from stfast.reference.himnet import adaptive_support


def dense_propagate(embeddings, x):
    return adaptive_support(embeddings) @ x


def random_inputs(embedding_shape, channels, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(*embedding_shape, generator=generator, dtype=dtype).requires_grad_()
    batch = embedding_shape[0] if len(embedding_shape) == 3 else 2
    x = torch.randn(batch, embedding_shape[-2], channels, generator=generator, dtype=dtype).requires_grad_()
    return embeddings, x


def forward_and_grads(fn, embeddings, x, grad):
    out = fn(embeddings, x)
    return (out,) + torch.autograd.grad(out, (embeddings, x), grad)


# (embeddings shape, channels, rows per chunk): N not a multiple of the chunk, one row per chunk, one chunk,
# batch 1, D = 1, a graph shared by the batch (N, D)
CASES = [((3, 13, 4), 5, 4), ((1, 11, 3), 2, 1), ((2, 9, 1), 3, 9), ((4, 10, 6), 1, 3), ((13, 4), 5, 5)]


@pytest.mark.parametrize("embedding_shape, channels, chunk", CASES)
def test_forward_and_backward_equal_the_dense_graph_in_fp32(embedding_shape, channels, chunk):
    embeddings, x = random_inputs(embedding_shape, channels)
    grad = torch.randn(x.shape[0], x.shape[1], channels)
    chunked = forward_and_grads(lambda e, v: ops.adaptive_propagate(e, v, chunk=chunk), embeddings, x, grad)
    dense = forward_and_grads(dense_propagate, embeddings, x, grad)
    # DESIGN.md's fp32 bound (1e-4 relative): E's gradient sums products of both signs (softmax's backward)
    for name, got, expected in zip(("y", "d embeddings", "d x"), chunked, dense):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_statistics_are_computed_once_and_reused_by_every_propagation():
    embeddings, x = random_inputs((2, 11, 3), 4)
    support = ops.implicit_support(embeddings, chunk=4)
    assert support.lse.shape == (2, 11) and not support.lse.requires_grad
    torch.testing.assert_close(support.dense(), adaptive_support(embeddings), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(support.lse, torch.logsumexp(torch.relu(embeddings @ embeddings.mT), -1))
    # Chebyshev terms [x, A x, 2 A (A x) - x] from the same statistics, gradients through all of them
    features = support.chebyshev(x, 3)
    graph = adaptive_support(embeddings)
    expected = torch.cat([x, graph @ x, 2 * graph @ (graph @ x) - x], dim=-1)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(features.square().sum(), (embeddings, x))
    expected_grads = torch.autograd.grad(expected.square().sum(), (embeddings, x))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embedding_shape", [(2, 9, 3), (9, 3)])
def test_gradcheck_in_float64(embedding_shape):
    embeddings, x = random_inputs(embedding_shape, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda e, v: ops.adaptive_propagate(e, v, chunk=4), (embeddings, x))


def test_opcheck_of_the_registered_ops():
    embeddings, x = random_inputs((2, 9, 3), 4)
    support = ops.implicit_support(embeddings, chunk=4)
    grad = torch.randn(2, 9, 4)
    torch.library.opcheck(torch.ops.stfast.adaptive_graph_lse.default, (embeddings.detach(), 4))
    torch.library.opcheck(torch.ops.stfast.adaptive_propagate.default, (embeddings, support.lse, x, 4))
    torch.library.opcheck(torch.ops.stfast.adaptive_propagate_backward.default,
                          (grad, embeddings.detach(), support.lse, x.detach(), 4, [True, True]))


@pytest.mark.parametrize("embedding_shape, channels", [((2, 0, 3), 4), ((0, 5, 3), 4), ((2, 5, 3), 0), ((5, 0), 2)])
def test_zero_sized_problems(embedding_shape, channels):
    # no nodes or no samples: empty results; no channels: y is (B, N, 0) and E gets a zero gradient;
    # D = 0: every score is 0, so the graph is uniform
    embeddings, x = random_inputs(embedding_shape, channels)
    out = ops.adaptive_propagate(embeddings, x, chunk=2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, dense_propagate(embeddings, x))
    d_embeddings, d_x = torch.autograd.grad(out.sum(), (embeddings, x), allow_unused=True, materialize_grads=True)
    assert d_embeddings.shape == embeddings.shape and d_x.shape == x.shape
    assert not d_embeddings.any()


def test_chunk_rows_is_a_function_of_the_shapes_and_the_budget():
    per_row = 64 * 8600 * (2 * 4 + 1)  # backward's fp32 probabilities and gradient and the bool mask
    assert adaptive_graph.chunk_rows(64, 8600, torch.float32, 100 * per_row) == 100
    assert adaptive_graph.chunk_rows(64, 8600, torch.bfloat16, 100 * per_row) == 100  # computed in fp32
    assert adaptive_graph.chunk_rows(64, 8600, torch.float32, 1) == 1
    assert adaptive_graph.chunk_rows(2, 7, torch.float32) == 7
    assert adaptive_graph.chunk_rows(2, 0, torch.float32) == 1
    with pytest.raises(ValueError, match="budget_bytes: expected an int >= 1, got 0"):
        adaptive_graph.chunk_rows(2, 7, torch.float32, 0)


def test_bad_inputs_name_the_argument():
    embeddings, x = random_inputs((2, 9, 3), 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 9, C\), got \(2, 8, 4\)"):
        ops.adaptive_propagate(embeddings, x[:, :8])
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 9, C\), got \(3, 9, 4\)"):
        ops.adaptive_propagate(embeddings, torch.randn(3, 9, 4))
    with pytest.raises(ValueError, match=r"embeddings: expected shape \(N, D\) or \(B, N, D\), got \(9,\)"):
        ops.adaptive_propagate(torch.randn(9), x)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32 .the dtype of embeddings., got torch.float64"):
        ops.adaptive_propagate(embeddings, x.double())
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got torch.int64"):
        ops.adaptive_propagate(embeddings, torch.ones(2, 9, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected device meta .the device of embeddings., got cpu"):
        ops.implicit_support(embeddings.detach().to("meta")).propagate(x)
    with pytest.raises(ValueError, match="chunk: expected an int >= 1, got 0"):
        ops.implicit_support(embeddings, chunk=0)
    support = ops.implicit_support(embeddings)
    with pytest.raises(ValueError, match=r"lse: expected shape \(2, 9\), got \(2, 8\)"):
        support._replace(lse=support.lse[:, :8]).propagate(x)
    with pytest.raises(ValueError, match="cheb_k: expected an int >= 1, got 0"):
        support.chebyshev(x, 0)


def test_double_backward_is_refused():
    embeddings, x = random_inputs((2, 5, 3), 2)
    out = ops.adaptive_propagate(embeddings, x)
    (d_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="adaptive_propagate: double backward is not supported"):
        d_x.sum().backward()


def test_bf16_autocast_is_close_to_fp32():
    embeddings, x = random_inputs((2, 12, 4), 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        support = ops.implicit_support(embeddings, chunk=5)
        out = support.propagate(x)
    assert support.embeddings.dtype == torch.bfloat16 and support.lse.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_propagate(embeddings, x), rtol=0.03, atol=0.03)
    d_embeddings, d_x = torch.autograd.grad(out.float().sum(), (embeddings, x))
    assert d_embeddings.dtype == d_x.dtype == torch.float32  # through autocast's casts
    expected = torch.autograd.grad(dense_propagate(embeddings, x).sum(), (embeddings, x))
    torch.testing.assert_close(d_embeddings, expected[0], rtol=0.05, atol=0.05)
    torch.testing.assert_close(d_x, expected[1], rtol=0.05, atol=0.05)


# -- the fused HimNet's decoder graph ------------------------------------------------------------------------------

HIMNET = dict(hidden_dim=6, tod_embedding_dim=3, dow_embedding_dim=2, node_embedding_dim=4, st_embedding_dim=3,
              tf_decay_steps=3)


def himnet_inputs(batch, nodes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, nodes, 3, generator=generator)
    x[..., 1] = torch.randint(0, 288, (batch, 12, nodes), generator=generator) / 288
    x[..., 2] = torch.randint(0, 7, (batch, 12, nodes), generator=generator).float()
    y_cov = torch.stack([x[..., 1], x[..., 2]], dim=-1).flip(1).contiguous()
    labels = torch.randn(batch, 12, nodes, 1, generator=generator)
    return x, y_cov, labels


def train_step(model, x, y_cov, labels):
    np.random.seed(7)
    out = model(x, y_cov, labels=labels, batches_seen=2)
    grads = torch.autograd.grad(out.square().mean() + out.mean(), list(model.parameters()))
    return out.detach(), grads


@pytest.mark.parametrize("batch, nodes, layers, cheb_k, budget",
                         [(1, 7, 1, 2, 1), (3, 11, 2, 3, 2000), (2, 5, 1, 1, None)])
def test_chunked_himnet_matches_the_reference_forward_and_gradients(batch, nodes, layers, cheb_k, budget):
    config = dict(HIMNET, num_nodes=nodes, num_layers=layers, cheb_k=cheb_k)
    torch.manual_seed(0)
    fused = stfast.nn.HimNet(**config, adaptive_graph="chunked", adaptive_graph_budget=budget).train()
    torch.manual_seed(0)
    reference = stfast.reference.HimNet(**config).train()
    x, y_cov, labels = himnet_inputs(batch, nodes)
    (out, grads), (expected_out, expected_grads) = (train_step(m, x, y_cov, labels) for m in (fused, reference))
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for (name, _), grad, expected in zip(fused.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    assert list(fused.state_dict()) == list(reference.state_dict())  # the option adds no parameter or buffer


def test_auto_takes_the_graph_that_keeps_less_for_backward(monkeypatch):
    # published configuration (24 gate calls of 67 channels, K = 2): dense at SD's 716 nodes, chunked at GBA's 2,352
    published = dict(out_steps=12, hidden_dim=64, cheb_k=2, st_embedding_dim=16)
    embeddings = torch.randn(1, 716, 16)
    small = stfast.nn.HimNet(num_nodes=716, **published)
    assert not small.prefers_chunked() and isinstance(small.decoder_support(embeddings), torch.Tensor)
    large = stfast.nn.HimNet(num_nodes=2352, **published)
    assert large.prefers_chunked()
    assert isinstance(large.decoder_support(torch.randn(1, 2352, 16)), ops.ImplicitSupport)
    forced = stfast.nn.HimNet(num_nodes=716, adaptive_graph="chunked", **published)
    assert isinstance(forced.decoder_support(embeddings), ops.ImplicitSupport)
    monkeypatch.setattr(fused_himnet, "DEFAULT_ADAPTIVE_GRAPH", "chunked")  # models built without the argument
    assert stfast.nn.HimNet(num_nodes=7, **HIMNET).adaptive_graph == "chunked"
    with pytest.raises(ValueError, match=r"adaptive_graph: expected one of \[.auto., .dense., .chunked.\], got 'sparse'"):
        stfast.nn.HimNet(num_nodes=7, adaptive_graph="sparse", **HIMNET)
    with pytest.raises(ValueError, match="adaptive_graph_budget: expected None or an int >= 1"):
        stfast.nn.HimNet(num_nodes=7, adaptive_graph_budget=0, **HIMNET)


def test_chunked_himnet_compiles_without_a_graph_break():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = stfast.nn.HimNet(num_nodes=7, out_steps=2, adaptive_graph="chunked", adaptive_graph_budget=500,
                             **HIMNET).train()
    x, y_cov, labels = himnet_inputs(2, 7)
    forcing = torch.tensor([True, False])

    def loss(x, y_cov, labels):
        return model(x, y_cov[:, :2], labels[:, :2], teacher_forcing=forcing).square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend=CompileCounterWithBackend("aot_eager"))
    params = list(model.parameters())
    expected = torch.autograd.grad(loss(x, y_cov, labels), params)
    got = torch.autograd.grad(compiled(x, y_cov, labels), params)
    for grad, want in zip(got, expected):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_chunked_himnet_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    model = stfast.nn.HimNet(num_nodes=9, out_steps=3, adaptive_graph="chunked", adaptive_graph_budget=2000,
                             **{**HIMNET, "hidden_dim": 16}).train()
    x, y_cov, labels = himnet_inputs(3, 9)
    forcing = torch.tensor([False, True, False])
    params = list(model.parameters())

    def run():
        out = model(x, y_cov[:, :3], labels[:, :3], teacher_forcing=forcing)
        return out, torch.autograd.grad(out.float().square().mean(), params)

    expected_out, expected_grads = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected_out, rtol=0.03, atol=0.03)
    for grad, want in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert (grad - want).norm() <= 0.04 * want.norm() + 1e-6


def test_memory_model_predicts_the_chunked_step(monkeypatch):
    # the chunked decoder graph (several chunks per propagation) on PEMS08's 170 nodes: prediction within the
    # memory model's 10% of the measured CPU step
    monkeypatch.setattr(fused_himnet, "DEFAULT_ADAPTIVE_GRAPH", "chunked")
    monkeypatch.setattr(adaptive_graph, "DEFAULT_BUDGET_BYTES", 2**16)
    args = dict(in_steps=4, out_steps=4, hidden_dim=16)
    predicted = estimate_memory("himnet", 4, "PEMS08", "cpu", device="cpu", **args)
    measured = measure_step_memory("himnet", 4, "PEMS08", "cpu", **args)
    assert measured.step_peak > 5 * 2**20
    assert abs(predicted.step_peak - measured.step_peak) <= 0.10 * measured.step_peak, (
        predicted.step_peak / 2**20, measured.step_peak / 2**20)
