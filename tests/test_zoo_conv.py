"""Convolutional / MLP zoo models (STID, STGCN, Graph WaveNet, ST-Norm): the zoo contract of
``stfast.models.spec``, the published METR-LA parameter counts (shared/specs/baselines.md sections
4-7) and the behaviour those sections describe."""

import re

import numpy as np
import pytest
import torch

from stfast.models import gwnet, stgcn, stid, stnorm
from stfast.models.graph_ops import double_transition, stgcn_normalized_laplacian
from stfast.models.spec import BuildContext

MODULES = {"stid": stid, "stgcn": stgcn, "gwnet": gwnet, "stnorm": stnorm}
NAMES = sorted(MODULES)
GRAPH_MODELS = ["gwnet", "stgcn"]
N = 207

PUBLISHED_PARAMS = {"stid": 117_868, "stgcn": 246_028, "gwnet": 309_400, "stnorm": 223_756}
X_CHANNELS = {"stid": (0, 1, 2), "stgcn": (0,), "gwnet": (0, 1), "stnorm": (0, 1)}

# Parameters no gradient can reach, and their total size.
DEAD_WEIGHTS = {
    "stid": (None, 0),
    # alignment convs registered but replaced by zero-padding / identity (spec section 5)
    "stgcn": (r"(st_blocks\.\d\.tmp_conv[12]|output\.tmp_conv1)\.align\.align_conv\.", 14_784),
    # residual convs unused with graph conv on (8,448, spec section 6) + last layer's discarded output
    "gwnet": (r"(residual_convs\.\d|gconv\.7|bn\.7)\.", 8_448 + 7_200 + 64),
    # last layer's residual conv: its output is discarded
    "stnorm": (r"residual_convs\.7\.", 1_056),
}

# A few state-dict entries of the published modules (Torch-MTS), so their checkpoints load.
PUBLISHED_KEYS = {
    "stid": {"node_emb": (207, 32), "time_in_day_emb": (288, 32), "day_in_week_emb": (7, 32),
             "time_series_emb_layer.weight": (32, 36, 1, 1), "encoder.2.fc2.weight": (128, 128, 1, 1),
             "regression_layer.weight": (12, 128, 1, 1)},
    "stgcn": {"st_blocks.0.tmp_conv1.causal_conv.weight": (128, 1, 3, 1),
              "st_blocks.1.graph_conv.cheb_graph_conv.weight": (3, 16, 16),
              "st_blocks.1.tc2_ln.weight": (207, 64), "output.tmp_conv1.causal_conv.weight": (256, 64, 4, 1),
              "output.tc1_ln.bias": (207, 128), "output.fc2.weight": (12, 128)},
    "gwnet": {"start_conv.weight": (32, 2, 1, 1), "filter_convs.7.weight": (32, 32, 1, 2),
              "gconv.3.mlp.mlp.weight": (32, 224, 1, 1), "bn.0.running_var": (32,),
              "skip_convs.5.weight": (256, 32, 1, 1), "end_conv_2.weight": (12, 512, 1, 1),
              "nodevec1": (207, 10), "nodevec2": (10, 207)},
    "stnorm": {"tn.0.gamma": (1, 32, 207, 1), "tn.7.running_var": (1, 32, 207, 1), "sn.3.beta": (32,),
               "filter_convs.0.weight": (32, 96, 1, 2), "residual_convs.7.weight": (32, 32, 1, 1),
               "end_conv_2.weight": (12, 32, 1, 1)},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-2 models are too small to gain from threads; on a busy 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_graph(n=N, seed=0):
    """Nonnegative sparse weighted adjacency with self loops (like METR-LA's Gaussian kernel graph)."""
    rng = np.random.default_rng(seed)
    a = (rng.random((n, n)) < 0.05) * rng.random((n, n))
    np.fill_diagonal(a, 1.0)
    return a


def make_x(name, batch=2, n=N, seed=0):
    """``(batch, 12, n, C)`` with the model's channels of [z-scored speed, tod in k/288, dow 0..6]."""
    g = torch.Generator().manual_seed(seed)
    full = torch.stack([
        torch.randn(batch, 12, n, generator=g),
        torch.randint(0, 288, (batch, 12, n), generator=g) / 288,
        torch.randint(0, 7, (batch, 12, n), generator=g).float(),
    ], dim=-1)
    return full[..., list(MODULES[name].SPEC.x_channels)]


def build(name, seed=0, adjacency=None):
    torch.manual_seed(seed)
    module = MODULES[name]
    adjacency = random_graph() if adjacency is None else adjacency
    return module.build(module.config("METR-LA")["model"], BuildContext(adjacency=adjacency))


def count(model):
    return sum(p.numel() for p in model.parameters())


def dead_names(name, model):
    pattern, _ = DEAD_WEIGHTS[name]
    return {k for k, _ in model.named_parameters() if pattern and re.match(pattern, k)}


def mae_after_forward(model, x, target, seed=1):
    torch.manual_seed(seed)  # same dropout masks for every call
    return (model(x) - target).abs().mean()


# ------------------------------------------------------------------------------------ contract

@pytest.mark.parametrize("name", NAMES)
def test_spec_declares_channels_and_graph(name):
    spec = MODULES[name].SPEC
    assert spec.name == name
    assert spec.x_channels == X_CHANNELS[name]
    assert spec.needs_graph == (name in GRAPH_MODELS)
    assert not spec.takes_y_cov and not spec.teacher_forcing
    assert MODULES[name].BACKENDS == ("reference",)


@pytest.mark.parametrize("name", NAMES)
def test_config_metr_la_uses_dataset_facts(name):
    cfg = MODULES[name].config("metr-la")
    assert cfg["model"]["num_nodes"] == N
    training = cfg["training"]
    assert training["loss"] == "masked_mae"
    assert (training["in_steps"], training["out_steps"]) == (12, 12)
    assert {"batch_size", "max_epochs", "early_stop", "lr", "eps", "weight_decay", "milestones",
            "lr_decay_rate", "clip_grad"} <= set(training)


def test_config_accuracy_run_settings():
    assert stid.config("METR-LA")["training"]["lr"] == 0.002
    assert stid.config("METR-LA")["training"]["milestones"] == [1, 50, 80]
    assert stid.config("METR-LA")["training"]["batch_size"] == 32
    assert stgcn.config("METR-LA")["training"]["clip_grad"] == 5
    assert gwnet.config("METR-LA")["training"]["milestones"] == [40]
    assert stnorm.config("METR-LA")["training"]["milestones"] == [10, 30]


@pytest.mark.parametrize("name", NAMES)
def test_config_unknown_dataset_raises(name):
    with pytest.raises(ValueError, match="dataset: expected"):
        MODULES[name].config("no-such-data")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_backend_raises(name):
    with pytest.raises(ValueError, match="backend: expected"):
        MODULES[name].build(MODULES[name].config("METR-LA")["model"], BuildContext(adjacency=random_graph()),
                            backend="triton")


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_graph_models_fail_clearly_without_graph(name):
    args = MODULES[name].config("METR-LA")["model"]
    with pytest.raises(ValueError, match="graph: "):
        MODULES[name].build(args, BuildContext())
    with pytest.raises(ValueError, match="graph: "):
        MODULES[name].build(args, None)
    with pytest.raises(ValueError, match=r"graph: .*\(207, 207\)"):
        MODULES[name].build(args, BuildContext(adjacency=np.eye(5)))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_published(name):
    model = build(name)
    assert count(model) == PUBLISHED_PARAMS[name]
    assert all(p.device.type != "meta" for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_equal_published(name):
    state = build(name).state_dict()
    for key, shape in PUBLISHED_KEYS[name].items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k in state for k in ("gso", "supports"))  # graph operators are rebuilt, not stored


@pytest.mark.parametrize("name", NAMES)
def test_dead_weights_are_documented_with_their_size(name):
    model = build(name)
    dead = dead_names(name, model)
    assert sum(p.numel() for k, p in model.named_parameters() if k in dead) == DEAD_WEIGHTS[name][1]
    if hasattr(model, "dead_weights"):
        assert set(model.dead_weights()) == dead


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_finite(name):
    model = build(name)
    x = make_x(name)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, 12, N, 1)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_used_parameter(name):
    model = build(name)
    model(make_x(name)).square().mean().backward()
    no_grad = {k for k, p in model.named_parameters() if p.grad is None}
    assert no_grad == dead_names(name, model)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_adam_steps_lower_the_loss_on_the_batch(name):
    model = build(name).train()
    x = make_x(name)
    target = torch.randn(2, 12, N, 1, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = mae_after_forward(model, x, target)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses.append(mae_after_forward(model, x, target).item())
    assert losses[1] < losses[0]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_shape_raises_naming_x(name):
    model = build(name)
    x = make_x(name)
    with pytest.raises(ValueError, match=r"x: expected shape .*207"):
        model(x[:, :, :-1])
    with pytest.raises(ValueError, match=r"x: expected shape"):
        model(torch.cat([x, x[..., :1]], dim=-1))
    with pytest.raises(ValueError, match=r"x: expected"):
        model(torch.cat([x, x], dim=1))  # 24 input steps
    with pytest.raises(TypeError, match="x: "):
        model(x.numpy())


# ------------------------------------------------------------------------------------ behaviour

def test_stid_embeds_time_of_day_and_day_of_week_of_the_last_step_only():
    model = build("stid").eval()
    with torch.no_grad():
        model.time_series_emb_layer.weight.zero_()  # leave only the identity embeddings
    x = make_x("stid")
    base = model(x)
    earlier = x.clone()
    earlier[:, :-1, :, 1:] = torch.flip(earlier[:, :-1, :, 1:], dims=[1])
    assert torch.equal(model(earlier), base)
    last = x.clone()
    last[:, -1, :, 1] = (last[:, -1, :, 1] + 1 / 288) % 1
    assert not torch.allclose(model(last), base)
    dow = x.clone()
    dow[:, -1, :, 2] = (dow[:, -1, :, 2] + 1) % 7
    assert not torch.allclose(model(dow), base)


def test_stgcn_uses_the_normlap_operator_of_the_graph():
    adjacency = random_graph(seed=3)
    model = build("stgcn", adjacency=adjacency)
    assert torch.equal(model.gso, torch.from_numpy(stgcn_normalized_laplacian(adjacency)))


def test_stgcn_chebyshev_conv_equals_explicit_polynomials():
    conv = stgcn.ChebGraphConv(channels=4, Ks=3)
    g = torch.Generator().manual_seed(0)
    lap = torch.randn(6, 6, generator=g)
    x = torch.randn(2, 5, 6, 4, generator=g)  # (B, T, N, C)
    polys = [torch.eye(6), lap, 2 * lap @ lap - torch.eye(6)]
    expected = sum(torch.einsum("hi,btic,cd->bthd", p, x, w) for p, w in zip(polys, conv.weight)) + conv.bias
    torch.testing.assert_close(conv(x, lap), expected, rtol=1e-5, atol=1e-5)


def test_stgcn_temporal_gate_pads_channels_with_zeros_when_widening():
    layer = stgcn.TemporalGatedConv(Kt=3, c_in=2, c_out=4)
    x = torch.randn(1, 2, 5, 3)
    p, q = layer.causal_conv(x).split(4, dim=1)
    aligned = torch.cat([x, torch.zeros(1, 2, 5, 3)], dim=1)[:, :, 2:]
    torch.testing.assert_close(layer(x), (p + aligned) * torch.sigmoid(q))


def test_gwnet_supports_are_double_transition_plus_adaptive():
    adjacency = random_graph(seed=4)
    model = build("gwnet", adjacency=adjacency)
    expected = np.stack(double_transition(adjacency))
    assert torch.equal(model.supports, torch.from_numpy(expected))
    adaptive = model.adaptive_adjacency()
    torch.testing.assert_close(adaptive.sum(dim=1), torch.ones(N))
    assert (adaptive >= 0).all()


def test_gwnet_diffusion_concatenates_hops_per_support_in_order():
    conv = gwnet.DiffusionConv(c_in=3, c_out=5, dropout=0.3, support_len=2, order=2).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, generator=g)  # (B, C, N, L)
    supports = torch.rand(2, 4, 4, generator=g)
    hops = [x]
    for s in supports:
        one = torch.einsum("bcvl,vw->bcwl", x, s)
        hops += [one, torch.einsum("bcvl,vw->bcwl", one, s)]
    # the module works node-major, channels-last (N, B, L, C) on the transposed supports
    out = conv(x.permute(2, 0, 3, 1), supports.transpose(1, 2).contiguous()).permute(1, 3, 0, 2)
    torch.testing.assert_close(out, conv.mlp.mlp(torch.cat(hops, dim=1)), rtol=1e-5, atol=1e-5)


def test_stnorm_tnorm_batch_statistics_and_running_update():
    norm = stnorm.TNorm(num_nodes=3, channels=2)
    x = torch.randn(4, 2, 3, 5) * 3 + 1  # (B, C, N, T)
    y = norm(x)
    torch.testing.assert_close(y.mean((0, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((0, 3), unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)
    n = 4 * 5
    torch.testing.assert_close(norm.running_mean, 0.1 * x.mean((0, 3), keepdim=True))
    torch.testing.assert_close(norm.running_var,
                               0.9 + 0.1 * x.var((0, 3), keepdim=True, unbiased=False) * n / (n - 1))
    norm.eval()
    expected = (x - norm.running_mean) / (norm.running_var + 1e-5) ** 0.5
    torch.testing.assert_close(norm(x), expected)


def test_stnorm_snorm_normalises_across_nodes():
    norm = stnorm.SNorm(channels=2)
    x = torch.randn(3, 2, 10, 4) * 5 - 2  # (B, C, N, T)
    y = norm(x)
    torch.testing.assert_close(y.mean(2), torch.zeros(3, 2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(2, unbiased=True), torch.ones(3, 2, 4), atol=1e-3, rtol=0)


def test_stnorm_ablation_switches_change_the_filter_width():
    model = stnorm.build(dict(stnorm.config("METR-LA")["model"], tnorm_bool=False))
    assert model.filter_convs[0].in_channels == 64 and not hasattr(model, "tn")
    assert model(make_x("stnorm")).shape == (2, 12, N, 1)
