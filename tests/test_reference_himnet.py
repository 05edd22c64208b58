"""The reference HimNet is a faithful port of the published module: same parameters, same numerics."""

import numpy as np
import pytest
import torch

from stfast import configs
from stfast.reference import HimDecoder, HimEncoder, HimGCN, HimGCRU, HimNet

PUBLISHED_PARAMS = {
    "METR-LA": 1_250_937,
    "PEMS-BAY": 1_252_825,
    "PEMS03": 1_253_353,
    "PEMS04": 1_253_661,
    "PEMS07": 1_261_753,
    "PEMS08": 2_069_573,
}

# State-dict keys and shapes of the published module on METR-LA (shared/specs/baselines.md, 3.4).
PUBLISHED_METR_LA_STATE = {
    "node_embedding": (207, 16),
    "tod_embedding.weight": (288, 8),
    "dow_embedding.weight": (7, 8),
    "out_proj.weight": (1, 64),
    "out_proj.bias": (1,),
    "st_proj.weight": (16, 64),
    "st_proj.bias": (16,),
    **{
        f"{part}.cells.0.{gcn}.{pool}": shape
        for part in ("encoder_s", "encoder_t", "decoder")
        for gcn, pool, shape in (
            ("gate", "weights_pool", (16, 134, 128)),
            ("gate", "bias_pool", (16, 128)),
            ("update", "weights_pool", (16, 134, 64)),
            ("update", "bias_pool", (16, 64)),
        )
    },
}

TINY = dict(num_nodes=5, hidden_dim=4, tod_embedding_dim=3, dow_embedding_dim=2, node_embedding_dim=3,
            st_embedding_dim=2, tf_decay_steps=10)


def tiny_inputs(batch=2, nodes=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, nodes, 3, generator=g, dtype=dtype)
    x[..., 1] = torch.randint(0, 288, (batch, 12, nodes), generator=g) / 288
    x[..., 2] = torch.randint(0, 7, (batch, 12, nodes), generator=g).to(dtype)
    y_cov = torch.stack([x[..., 1], x[..., 2]], dim=-1).flip(1)
    labels = torch.randn(batch, 12, nodes, 1, generator=g, dtype=dtype)
    return x, y_cov, labels


@pytest.mark.parametrize("dataset", sorted(PUBLISHED_PARAMS))
def test_parameter_count_equals_published(dataset):
    model = HimNet(**configs.load("himnet", dataset)["model"])
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[dataset]


def test_state_dict_keys_and_shapes_equal_published():
    model = HimNet(**configs.load("himnet", "METR-LA")["model"])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == PUBLISHED_METR_LA_STATE


def test_published_style_checkpoint_loads_strictly():
    config = configs.load("himnet", "METR-LA")["model"]
    checkpoint = {k: torch.randn(shape) for k, shape in PUBLISHED_METR_LA_STATE.items()}
    model = HimNet(**config)
    model.load_state_dict(checkpoint, strict=True)
    assert torch.equal(model.decoder.cells[0].gate.weights_pool, checkpoint["decoder.cells.0.gate.weights_pool"])


def test_no_dow_embedding_when_its_dim_is_zero():
    model = HimNet(**{**TINY, "dow_embedding_dim": 0})
    assert not hasattr(model, "dow_embedding")
    x, y_cov, _ = tiny_inputs()
    assert model.eval()(x, y_cov).shape == (2, 12, 5, 1)


def naive_meta_gconv(x, support, embeddings, pool, bias_pool, cheb_k, axis):
    """Per (sample, node) loop: y[b, n] = xg[b, n] @ (sum_d E[., d] P[d]) + E[., :] @ Pb."""
    batch, nodes, _ = x.shape
    sup = support if support.dim() == 3 else support.expand(batch, nodes, nodes)
    eye = torch.eye(nodes, dtype=x.dtype)
    graphs = [eye.expand(batch, nodes, nodes), sup][:cheb_k]
    while len(graphs) < cheb_k:
        graphs.append(2 * sup @ graphs[-1] - graphs[-2])
    xg = torch.cat([g @ x for g in graphs], dim=-1)
    out = torch.empty(batch, nodes, pool.shape[-1], dtype=x.dtype)
    for b in range(batch):
        for n in range(nodes):
            e = {"S": lambda: embeddings[n], "T": lambda: embeddings[b], "ST": lambda: embeddings[b, n]}[axis]()
            out[b, n] = xg[b, n] @ torch.einsum("d,dio->io", e, pool) + e @ bias_pool
    return out


@pytest.mark.parametrize("axis", ["S", "T", "ST"])
@pytest.mark.parametrize("cheb_k", [1, 2, 3])
@pytest.mark.parametrize("per_sample_support", [False, True])
def test_himgcn_equals_per_node_loop(axis, cheb_k, per_sample_support):
    torch.manual_seed(0)
    batch, nodes, channels, out_dim, embed = 2, 7, 3, 5, 4
    gcn = HimGCN(channels, out_dim, cheb_k, embed, meta_axis=axis).double()
    x = torch.randn(batch, nodes, channels, dtype=torch.float64)
    support_shape = (batch, nodes, nodes) if per_sample_support else (nodes, nodes)
    support = torch.softmax(torch.randn(support_shape, dtype=torch.float64), dim=-1)
    emb_shape = {"S": (nodes, embed), "T": (batch, embed), "ST": (batch, nodes, embed)}[axis]
    embeddings = torch.randn(emb_shape, dtype=torch.float64)
    expected = naive_meta_gconv(x, support, embeddings, gcn.weights_pool, gcn.bias_pool, cheb_k, axis)
    torch.testing.assert_close(gcn(x, support, embeddings), expected, rtol=1e-12, atol=1e-12)


def test_himgcn_without_meta_axis_is_plain_graph_convolution():
    gcn = HimGCN(3, 4, 2, embed_dim=0, meta_axis=None).double()
    assert set(dict(gcn.named_parameters())) == {"weights", "bias"}
    assert torch.count_nonzero(gcn.bias) == 0
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    support = torch.softmax(torch.randn(6, 6, dtype=torch.float64), dim=-1)
    expected = torch.cat([x, support @ x], dim=-1) @ gcn.weights
    torch.testing.assert_close(gcn(x, support, None), expected)


def test_himgcn_rejects_unknown_meta_axis():
    with pytest.raises(ValueError, match="meta_axis: expected one of None, 'S', 'T', 'ST', got 'X'"):
        HimGCN(3, 4, 2, 2, meta_axis="x")


def test_gcru_follows_published_gating():
    torch.manual_seed(0)
    cell = HimGCRU(num_nodes=4, input_dim=2, output_dim=3, cheb_k=2, embed_dim=2, meta_axis="S").double()
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    support = torch.softmax(torch.randn(4, 4, dtype=torch.float64), dim=-1)
    emb = torch.randn(4, 2, dtype=torch.float64)
    gates = torch.sigmoid(cell.gate(torch.cat([x, h], -1), support, emb))
    z, r = gates[..., :3], gates[..., 3:]
    candidate = torch.tanh(cell.update(torch.cat([x, z * h], -1), support, emb))
    torch.testing.assert_close(cell(x, h, support, emb), r * h + (1 - r) * candidate)


def test_encoder_stacks_layers_and_decoder_steps_each_layer_from_its_state():
    torch.manual_seed(0)
    enc = HimEncoder(4, 3, 5, 2, num_layers=2, embed_dim=2, meta_axis="T")
    assert [c.gate.weights_pool.shape[1] for c in enc.cells] == [2 * (3 + 5), 2 * (5 + 5)]
    x = torch.randn(2, 12, 4, 3)
    support = torch.softmax(torch.randn(4, 4), dim=-1)
    outputs, last_states = enc(x, support, torch.randn(2, 2))
    assert outputs.shape == (2, 12, 4, 5) and len(last_states) == 2
    torch.testing.assert_close(outputs[:, -1], last_states[-1])

    dec = HimDecoder(4, 3, 5, 2, num_layers=2, embed_dim=2)
    st_support = torch.softmax(torch.randn(2, 4, 4), dim=-1)
    st_emb = torch.randn(2, 4, 2)
    out, states = dec(x[:, 0], [torch.zeros(2, 4, 5), torch.ones(2, 4, 5)], st_support, st_emb)
    first = dec.cells[0](x[:, 0], torch.zeros(2, 4, 5), st_support, st_emb)
    torch.testing.assert_close(states[0], first)
    torch.testing.assert_close(out, dec.cells[1](first, torch.ones(2, 4, 5), st_support, st_emb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_shapes(dtype):
    torch.manual_seed(0)
    model = HimNet(**TINY).to(dtype).train()
    x, y_cov, labels = tiny_inputs(dtype=dtype)
    np.random.seed(0)
    out = model(x, y_cov, labels=labels, batches_seen=3)
    assert out.shape == (2, 12, 5, 1) and out.dtype == dtype
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_float64_gradients_match_finite_differences_in_eval_mode():
    torch.manual_seed(0)
    model = HimNet(**{**TINY, "num_nodes": 3, "hidden_dim": 2}).double().eval()
    x, y_cov, _ = tiny_inputs(batch=1, nodes=3, dtype=torch.float64)
    values = x[..., :1].clone().requires_grad_()  # tod/dow are embedding indices, not differentiable
    assert torch.autograd.gradcheck(lambda v: model(torch.cat([v, x[..., 1:]], -1), y_cov), (values,))


def test_teacher_forcing_draws_are_reproducible_under_a_numpy_seed():
    torch.manual_seed(0)
    model = HimNet(**TINY).train()
    x, y_cov, labels = tiny_inputs()
    runs = []
    for _ in range(2):
        np.random.seed(123)
        runs.append(model(x, y_cov, labels=labels, batches_seen=10))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_teacher_forcing_feeds_labels_only_while_training():
    torch.manual_seed(0)
    model = HimNet(**{**TINY, "tf_decay_steps": 10**9})  # threshold ~ 1 - 1e-9 at batches_seen 0
    x, y_cov, labels = tiny_inputs()
    other_labels = labels + 1.0
    np.random.seed(0)
    forced = model.train()(x, y_cov, labels=labels, batches_seen=0)
    np.random.seed(0)
    forced_other = model(x, y_cov, labels=other_labels, batches_seen=0)
    # Step 0 never sees labels; every later step's input is the previous label.
    torch.testing.assert_close(forced[:, 0], forced_other[:, 0])
    assert not torch.allclose(forced[:, 1:], forced_other[:, 1:])
    free = model.eval()(x, y_cov, labels=labels, batches_seen=0)
    torch.testing.assert_close(free, model(x, y_cov))


def test_sampling_threshold_decays_from_one_to_zero():
    model = HimNet(**TINY)
    assert model.compute_sampling_threshold(0) == pytest.approx(10 / 11)
    assert model.compute_sampling_threshold(10**3) < 1e-30


def test_time_embedding_reads_last_step_of_node_zero():
    model = HimNet(**TINY)
    x, _, _ = tiny_inputs()
    x[:, -1, 0, 1] = torch.tensor([0.0, 287 / 288])
    x[:, -1, 0, 2] = torch.tensor([6.0, 0.0])
    emb = model.time_embedding(x)
    expected = torch.cat([model.tod_embedding.weight[[0, 287]], model.dow_embedding.weight[[6, 0]]], dim=-1)
    torch.testing.assert_close(emb, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, y: (x[..., :2], y), r"x: expected shape \(B, T_in, 5, 3\), got \(2, 12, 5, 2\)"),
        (lambda x, y: (x[:, :, :4], y), r"x: expected shape \(B, T_in, 5, 3\), got \(2, 12, 4, 3\)"),
        (lambda x, y: (x[0], y), r"x: expected shape \(B, T_in, 5, 3\), got \(12, 5, 3\)"),
        (lambda x, y: (x, y[:1]), r"y_cov: expected shape \(2, T_out, 5, 2\), got \(1, 12, 5, 2\)"),
        (lambda x, y: (x, y[:, :6]), r"y_cov: expected at least out_steps=12 steps, got 6"),
        (lambda x, y: (x.double(), y.double()), r"x: expected dtype torch.float32 .*got torch.float64"),
        (lambda x, y: (x.long(), y), r"x: expected a floating-point tensor, got torch.int64"),
    ],
)
def test_bad_inputs_name_the_argument_expected_and_actual(change, message):
    model = HimNet(**TINY).eval()
    x, y_cov, _ = tiny_inputs()
    bad_x, bad_y = change(x, y_cov)
    with pytest.raises((ValueError, TypeError), match=message):
        model(bad_x, bad_y)


def test_training_with_teacher_forcing_requires_labels():
    model = HimNet(**TINY).train()
    x, y_cov, _ = tiny_inputs()
    with pytest.raises(ValueError, match="labels and batches_seen: required"):
        model(x, y_cov)
