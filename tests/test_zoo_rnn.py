"""The recurrent zoo models (DCRNN, GTS, MegaCRN, AGCRN): published sizes, the module contract, training."""

import numpy as np
import pytest
import torch

from stfast.models import agcrn, dcrnn, gts, megacrn
from stfast.models.dcgru import diffusion_features, sampling_threshold
from stfast.models.spec import BuildContext

MODULES = {"dcrnn": dcrnn, "gts": gts, "megacrn": megacrn, "agcrn": agcrn}
PUBLISHED_PARAMS = {"dcrnn": 372_353, "gts": 38_478_291, "megacrn": 388_761, "agcrn": 751_650}
TEACHER_FORCED = ["dcrnn", "gts", "megacrn"]
METR_LA_NODES = 207
SMALL_NODES = 8
SHORT_SERIES = 48  # graph learner input length of the small GTS variants


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small tensors gain nothing from intra-op threads, and on a shared, loaded machine the
    threads' synchronisation made each tiny GEMM take milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_graph(nodes, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((nodes, nodes)) * (rng.random((nodes, nodes)) < 0.05)
    np.fill_diagonal(a, 1.0)
    return a


def random_series(steps, nodes, seed=0):
    return (60 * np.random.default_rng(seed).random((steps, nodes))).astype(np.float32)


def context(nodes, series_steps=SHORT_SERIES):
    return BuildContext(adjacency=random_graph(nodes), train_series=random_series(series_steps, nodes))


def model_args(name, nodes=METR_LA_NODES, **overrides):
    args = MODULES[name].config("METR-LA")["model"]
    args["num_nodes"] = nodes
    if name == "gts":  # a short training series: its published length only matters for the count
        args.update(train_steps=None, k=min(args["k"], nodes - 1))
    args.update(overrides)
    return args


def small_model(name, seed=0, nodes=SMALL_NODES):
    torch.manual_seed(seed)
    return MODULES[name].build(model_args(name, nodes), context(nodes))


def features(batch, nodes, seed=0):
    """``(B, 24, N, 3)``: standard-normal values, time of day in multiples of 1/288, day of week 0..6."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([
        torch.randn(batch, 24, nodes, generator=g),
        torch.randint(0, 288, (batch, 24, nodes), generator=g) / 288,
        torch.randint(0, 7, (batch, 24, nodes), generator=g).float(),
    ], dim=-1)


def make_inputs(name, batch, nodes, seed=0):
    """``(args, labels)``: the model's positional inputs (x [, y_cov]) and scaled labels."""
    spec = MODULES[name].SPEC
    f = features(batch, nodes, seed)
    args = [f[:, :12, :, list(spec.x_channels)]]
    if spec.takes_y_cov:
        args.append(f[:, 12:, :, [1 + c for c in spec.y_cov_channels]])
    labels = torch.randn(batch, 12, nodes, 1, generator=torch.Generator().manual_seed(seed + 1))
    return args, labels


def run(model, name, args, labels, batches_seen=0, seed=0):
    """A forward with fixed NumPy (scheduled sampling) and torch (Gumbel noise) random draws."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    if MODULES[name].SPEC.teacher_forcing and model.training:
        return model(*args, labels=labels, batches_seen=batches_seen)
    return model(*args)


def objective(model, name, args, target, batches_seen=0):
    loss = (run(model, name, args, target, batches_seen) - target).abs().mean()
    auxiliary = model.auxiliary_loss() if hasattr(model, "auxiliary_loss") else None
    return loss if auxiliary is None else loss + auxiliary


# ---------------------------------------------------------------- published sizes, METR-LA shapes

@pytest.mark.parametrize("name", sorted(MODULES))
def test_parameter_count_equals_published(name):
    steps = 23_990 if name == "gts" else SHORT_SERIES  # GTS's count depends on the series length
    model = MODULES[name].build(MODULES[name].config("METR-LA")["model"], context(METR_LA_NODES, steps))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_forward_at_metr_la_shape_is_finite(name):
    torch.manual_seed(0)
    model = MODULES[name].build(model_args(name), context(METR_LA_NODES)).eval()
    args, labels = make_inputs(name, 2, METR_LA_NODES)
    with torch.no_grad():
        out = run(model, name, args, labels)
    assert out.shape == (2, 12, METR_LA_NODES, 1)
    assert torch.isfinite(out).all()


def test_specs_declare_inputs():
    assert dcrnn.SPEC.x_channels == (0, 1) and dcrnn.SPEC.needs_graph and dcrnn.SPEC.teacher_forcing
    assert gts.SPEC.x_channels == (0, 1) and gts.SPEC.needs_train_series and gts.SPEC.teacher_forcing
    assert megacrn.SPEC.x_channels == (0,) and megacrn.SPEC.takes_y_cov and megacrn.SPEC.y_cov_channels == (0,)
    assert agcrn.SPEC.x_channels == (0, 1) and not agcrn.SPEC.teacher_forcing


@pytest.mark.parametrize("name", sorted(MODULES))
def test_config_has_training_keys_and_rejects_unknown_datasets(name):
    config = MODULES[name].config("metr-la")
    assert config["model"]["num_nodes"] == METR_LA_NODES
    assert {"batch_size", "max_epochs", "early_stop", "lr", "eps", "weight_decay", "milestones", "lr_decay_rate",
            "clip_grad", "loss", "in_steps", "out_steps"} <= set(config["training"])
    with pytest.raises(ValueError, match="dataset: "):
        MODULES[name].config("nowhere")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_build_rejects_unknown_backend(name):
    with pytest.raises(ValueError, match="backend: .*'fast'"):
        MODULES[name].build(model_args(name, SMALL_NODES), context(SMALL_NODES), backend="fast")


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("name", sorted(MODULES))
def test_adam_steps_lower_the_loss_on_a_batch(name):
    model = small_model(name).train()
    args, target = make_inputs(name, 4, SMALL_NODES, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = objective(model, name, args, target).item()
    for _ in range(3):
        optimizer.zero_grad()
        objective(model, name, args, target).backward()
        optimizer.step()
    after = objective(model, name, args, target).item()
    assert after < before


@pytest.mark.parametrize("name", sorted(MODULES))
def test_backward_reaches_every_parameter(name):
    model = small_model(name).train()
    args, target = make_inputs(name, 2, SMALL_NODES)
    objective(model, name, args, target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", TEACHER_FORCED)
def test_scheduled_sampling_feeds_labels_early_in_training_only(name):
    model = small_model(name).train()
    args, labels = make_inputs(name, 2, SMALL_NODES)
    other = labels + 1.0
    early = [run(model, name, args, y, batches_seen=0) for y in (labels, other)]
    late = [run(model, name, args, y, batches_seen=10**7) for y in (labels, other)]
    assert torch.equal(early[0][:, 0], early[1][:, 0])  # the first step never sees a label
    assert not torch.allclose(early[0][:, 1:], early[1][:, 1:])
    assert torch.equal(late[0], late[1])


def test_sampling_threshold_decays_from_near_one():
    assert sampling_threshold(0, 2000) == pytest.approx(2000 / 2001)
    assert sampling_threshold(40_000, 2000) < 1e-5


@pytest.mark.parametrize("name", TEACHER_FORCED)
def test_training_forward_requires_labels(name):
    model = small_model(name).train()
    args, _ = make_inputs(name, 2, SMALL_NODES)
    with pytest.raises(ValueError, match="labels and batches_seen"):
        model(*args)
    with pytest.raises(ValueError, match="labels: "):
        model(*args, labels=torch.zeros(2, 12, SMALL_NODES + 1, 1), batches_seen=0)


@pytest.mark.parametrize("name", ["gts", "megacrn"])
def test_auxiliary_loss_only_after_a_training_forward(name):
    model = small_model(name)
    assert model.auxiliary_loss() is None
    args, labels = make_inputs(name, 2, SMALL_NODES)
    run(model.train(), name, args, labels)
    auxiliary = model.auxiliary_loss()
    assert auxiliary.dim() == 0 and torch.isfinite(auxiliary) and auxiliary.requires_grad
    with torch.no_grad():
        run(model.eval(), name, args, labels)
    assert model.auxiliary_loss() is None


@pytest.mark.parametrize("name", ["dcrnn", "agcrn"])
def test_models_without_an_extra_loss_term_declare_none(name):
    assert getattr(small_model(name), "auxiliary_loss", None) is None


# ---------------------------------------------------------------- clear errors

def test_graph_models_fail_clearly_without_their_graph_inputs():
    with pytest.raises(ValueError, match="graph: "):
        dcrnn.build(model_args("dcrnn", SMALL_NODES), BuildContext())
    with pytest.raises(ValueError, match="graph: .*shape"):
        dcrnn.build(model_args("dcrnn", SMALL_NODES), BuildContext(adjacency=np.eye(SMALL_NODES + 1)))
    with pytest.raises(ValueError, match="train_series: .*None"):
        gts.build(model_args("gts", SMALL_NODES), BuildContext())
    with pytest.raises(ValueError, match="train_series: .*23990"):
        gts.build(gts.config("METR-LA")["model"], context(METR_LA_NODES, 100))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_bad_input_shape_names_the_argument(name):
    model = small_model(name).eval()
    args, _ = make_inputs(name, 2, SMALL_NODES + 1)
    with pytest.raises(ValueError, match="x: expected shape"):
        model(*args)
    if MODULES[name].SPEC.takes_y_cov:
        good, _ = make_inputs(name, 2, SMALL_NODES)
        with pytest.raises(ValueError, match="y_cov: expected shape"):
            model(good[0], args[1])


# ---------------------------------------------------------------- building blocks

def test_diffusion_features_carry_the_recursion_across_supports():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g)
    s1, s2 = torch.rand(4, 4, generator=g), torch.rand(4, 4, generator=g)
    out = diffusion_features(x, torch.stack([s1, s2]), 2)
    t1 = s1 @ x
    t2 = 2 * s1 @ t1 - x
    u1 = s2 @ t1  # the second support starts from the first one's T_1, as published
    u2 = 2 * s2 @ u1 - t1
    expected = torch.stack([x, t1, t2, u1, u2], dim=-1).reshape(2, 4, 15)  # feature-major, matrix fastest
    torch.testing.assert_close(out, expected)


def test_dcrnn_supports_are_transposed_random_walks_of_a_and_its_transpose():
    a = random_graph(6) + np.random.default_rng(1).random((6, 6)) * 0.1
    supports = dcrnn.diffusion_supports(a, "dual_random_walk")
    forward = a / a.sum(1, keepdims=True)
    backward = a.T / a.T.sum(1, keepdims=True)
    np.testing.assert_allclose(supports, np.stack([forward.T, backward.T]), rtol=1e-6)
    with pytest.raises(ValueError, match="filter_type: "):
        dcrnn.diffusion_supports(a, "chebyshev")


def test_node_adaptive_gconv_uses_one_weight_per_node():
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(3, 5, 4, generator=g), torch.randn(5, 2, generator=g)
    pool, bias_pool = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 6, generator=g)
    a = agcrn.adaptive_support(e)
    cheb = [torch.eye(5), a, 2 * a @ a - torch.eye(5)]
    expected = torch.zeros(3, 5, 6)
    for n in range(5):
        w_n = torch.einsum("d,dkio->kio", e[n], pool)
        for k in range(3):
            expected[:, n] += (cheb[k] @ x)[:, n] @ w_n[k]
        expected[:, n] += e[n] @ bias_pool
    torch.testing.assert_close(agcrn.node_adaptive_gconv(x, a, e, pool, bias_pool), expected)


def test_megacrn_graph_conv_stacks_chebyshev_terms_per_support():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g)
    supports = [torch.softmax(torch.randn(5, 5, generator=g), -1) for _ in range(2)]
    expected = torch.cat([t @ x for s in supports for t in (torch.eye(5), s, 2 * s @ s - torch.eye(5))], dim=-1)
    torch.testing.assert_close(megacrn.chebyshev_propagate(x, supports, 3), expected)


def test_knn_prior_graph_links_each_node_to_its_k_cosine_nearest_others():
    series = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.05]])
    graph = gts.knn_prior_graph(series, 1)
    assert graph.dtype == np.float32 and np.all(np.diag(graph) == 0) and np.all(graph.sum(1) == 1)
    assert graph[0, 1] == graph[1, 0] == graph[2, 3] == graph[3, 2] == 1
    assert gts.knn_prior_graph(series, 3).sum(1).tolist() == [3] * 5
    with pytest.raises(ValueError, match="k: "):
        gts.knn_prior_graph(series, 5)


def test_gts_graph_learner_reads_the_first_train_steps():
    series = random_series(70, SMALL_NODES)
    args = model_args("gts", SMALL_NODES, train_steps=60)
    model = gts.build(args, BuildContext(train_series=series))
    assert model.graph_learner.fc.in_features == 16 * (60 - 18)
    np.testing.assert_allclose(model.node_series.numpy(), gts.standardize(series[:60]).T, rtol=1e-5, atol=1e-6)
    assert abs(float(model.node_series.mean())) < 1e-5


def test_gts_edge_logits_equal_the_mlp_on_concatenated_pairs():
    learner = small_model("gts").graph_learner.eval()
    node_series = torch.randn(SMALL_NODES, SHORT_SERIES)
    h = learner.node_features(node_series)
    i, j = 2, 5  # entry (i, j) sees [h_j, h_i], the published one-hot pair order
    expected = learner.fc_cat(torch.relu(learner.fc_out(torch.cat([h[j], h[i]]))))
    torch.testing.assert_close(learner(node_series)[i, j], expected)


def test_gts_learnt_graph_has_no_self_loops_and_rows_of_a_random_walk():
    model = small_model("gts")
    adjacency = model.sample_graph(model.graph_learner(model.node_series))
    assert torch.all(adjacency.diagonal() == 0) and set(adjacency.unique().tolist()) <= {0.0, 1.0}
    support = gts.random_walk_support(adjacency)[0]
    torch.testing.assert_close(support.sum(0), torch.ones(SMALL_NODES))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_train_step_through_the_zoo_adapter(name):
    from stfast.data.batch import Batch, StandardScaler
    from stfast.models import Forecaster
    from stfast.training.step import train_step

    module = MODULES[name]
    forecaster = Forecaster(small_model(name), module.SPEC, module.config("METR-LA"), "reference").train()
    f = features(2, SMALL_NODES)
    y = 50 + 10 * torch.rand(2, 12, SMALL_NODES, 1, generator=torch.Generator().manual_seed(0))
    batch = Batch(f[:, :12], y, f[:, 12:, :, 1:])
    optimizer = torch.optim.Adam(forecaster.parameters(), lr=1e-3)
    loss = train_step(forecaster, batch, optimizer, lambda p, t: (p - t).abs().mean(), StandardScaler(55.0, 5.0),
                      batches_seen=0, clip_grad=5.0)
    assert torch.isfinite(loss)
