"""ST-WA and PDFormer (shared/specs/baselines.md sections 12 and 14): counts, shapes, training, inputs."""

import numpy as np
import pytest
import torch

from stfast.models import pdformer, stwa
from stfast.models.spec import BuildContext

METR_LA_NODES = 207
SPEC_PARAMS = {"stwa": 375_428, "pdformer": 531_165}


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """These tensors are small: one thread avoids OpenMP barrier spinning when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_adjacency(nodes=METR_LA_NODES, density=0.02, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((nodes, nodes)) * (rng.random((nodes, nodes)) < density)
    np.fill_diagonal(a, 1.0)
    return a


def make_x(batch=2, nodes=METR_LA_NODES, seed=0):
    """(B, 12, N, 3): scaled value, time of day (multiples of 1/288), integer day of week."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, nodes, 3, generator=g)
    x[..., 1] = torch.randint(0, 288, (batch, 12, nodes), generator=g) / 288
    x[..., 2] = torch.randint(0, 7, (batch, 12, nodes), generator=g).float()
    return x


def build_stwa():
    return stwa.build(stwa.config("METR-LA")["model"], BuildContext())


def build_pdformer(**context):
    context.setdefault("adjacency", random_adjacency())
    return pdformer.build(pdformer.config("METR-LA")["model"], BuildContext(**context))


def inputs_for(name, x):
    return x[..., :1] if name == "stwa" else x


BUILDERS = {"stwa": build_stwa, "pdformer": build_pdformer}


@pytest.fixture(scope="module")
def built_models():
    """One METR-LA instance of each model, shared by the tests that do not train it."""
    torch.manual_seed(0)
    return {name: builder() for name, builder in BUILDERS.items()}


@pytest.fixture(params=sorted(BUILDERS))
def named_model(request, built_models):
    return request.param, built_models[request.param]


def count(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- both models

def test_parameter_count_equals_spec(named_model):
    name, model = named_model
    assert count(model) == SPEC_PARAMS[name]


def test_forward_shape_and_finite(named_model):
    name, model = named_model
    model.eval()
    with torch.no_grad():
        out = model(inputs_for(name, make_x()))
    assert out.shape == (2, 12, METR_LA_NODES, 1)
    assert torch.isfinite(out).all()


def test_backward_reaches_every_parameter(named_model):
    name, model = named_model
    model.train()
    model.zero_grad(set_to_none=True)
    model(inputs_for(name, make_x())).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []  # neither model has dead weights


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_one_adam_step_lowers_the_loss_on_the_batch(name):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    x = inputs_for(name, make_x(seed=1))
    target = torch.randn(2, 12, METR_LA_NODES, 1, generator=torch.Generator().manual_seed(2))
    # lr 1e-4: Adam's first step moves every weight by ~lr, and PDFormer's own recipe warms up from 1e-6
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def eval_loss():  # eval mode: no sampling, drop path or sign flips, so the comparison is exact
        model.eval()
        with torch.no_grad():
            return (model(x) - target).abs().mean().item()

    before = eval_loss()
    model.train()
    (model(x) - target).abs().mean().backward()
    optimizer.step()
    assert eval_loss() < before


def test_bad_input_shape_names_x(named_model):
    name, model = named_model
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 12, 207, \d\), got \(2, 12, 206, \d\)"):
        model(inputs_for(name, make_x(nodes=206)))
    with pytest.raises(ValueError, match="x: "):
        model(make_x()[..., :2])


@pytest.mark.parametrize("module", [stwa, pdformer])
def test_config_and_backend_errors(module):
    assert module.config("metr-la")["model"]["num_nodes"] == METR_LA_NODES
    assert module.config("PEMS08")["model"]["num_nodes"] == 170  # every dataset has a configuration
    with pytest.raises(ValueError, match="dataset: "):
        module.config("nowhere")
    with pytest.raises(ValueError, match="backend: .*'cuda'"):
        module.build(module.config("METR-LA")["model"], BuildContext(adjacency=random_adjacency()), backend="cuda")


# ---------------------------------------------------------------------------------- ST-WA

def test_stwa_spec_and_channels():
    assert stwa.SPEC.name == "stwa" and stwa.SPEC.x_channels == (0,) and not stwa.SPEC.needs_graph


def test_stwa_samples_its_latent_in_training_only(built_models):
    model = built_models["stwa"]
    x = make_x()[..., :1]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_stwa_layers_output_12_3_1_steps(built_models):
    model = built_models["stwa"].eval()
    h = model.start_fc(make_x(batch=1)[..., :1])
    z = torch.zeros(1, METR_LA_NODES, 16)
    steps = []
    with torch.no_grad():
        for layer in model.layers:
            h = layer(h, z)
            steps.append(h.shape[1])
    assert steps == [12, 3, 1]


# ---------------------------------------------------------------------------------- PDFormer

def test_pdformer_spec():
    spec = pdformer.SPEC
    assert spec.name == "pdformer" and spec.x_channels == (0, 1, 2) and spec.needs_graph


def test_pdformer_count_does_not_depend_on_nodes():
    args = dict(pdformer.config("METR-LA")["model"], num_nodes=30)
    model = pdformer.build(args, BuildContext(adjacency=random_adjacency(30, density=0.1)))
    assert count(model) == SPEC_PARAMS["pdformer"]


def test_pdformer_needs_the_graph():
    with pytest.raises(ValueError, match="graph: "):
        pdformer.build(pdformer.config("METR-LA")["model"], BuildContext())
    with pytest.raises(ValueError, match="graph: "):
        pdformer.build(pdformer.config("METR-LA")["model"], BuildContext(adjacency=np.eye(5)))


def test_pdformer_training_recipe_is_recorded():
    training = pdformer.config("METR-LA")["training"]
    assert training["optimizer"] == "adamw" and training["lr_schedule"] == "cosine"
    assert (training["warmup_epochs"], training["eta_min"], training["weight_decay"]) == (5, 1e-4, 0.05)
    assert (training["batch_size"], training["clip_grad"], training["early_stop"]) == (16, 5.0, 50)


def test_hop_distances_are_directed_and_unreachable_is_511():
    chain = np.eye(4) + np.eye(4, k=1)  # 0 -> 1 -> 2 -> 3
    hops = pdformer.hop_distances(chain)
    assert hops[0].tolist() == [0, 1, 2, 3]
    assert hops[3, 0] == 511


def test_geographic_mask_blocks_far_nodes():
    path = np.eye(8) + np.eye(8, k=1) + np.eye(8, k=-1)
    mask = pdformer.geographic_mask(pdformer.hop_distances(path), far_mask_delta=5)
    i, j = np.indices((8, 8))
    assert np.array_equal(mask, np.abs(i - j) >= 5)
    # query i sees key j when j reaches i in fewer than 5 hops (the original's transposed hop matrix)
    chain = np.eye(8) + np.eye(8, k=1)
    mask = pdformer.geographic_mask(pdformer.hop_distances(chain), far_mask_delta=5)
    assert not mask[6, 2] and mask[2, 6] and mask[7, 0]


def test_laplacian_encoding_is_orthonormal_and_non_trivial():
    adjacency = random_adjacency(40, density=0.15, seed=3)
    pe = pdformer.laplacian_positional_encoding(adjacency, 8)
    assert pe.shape == (40, 8)
    np.testing.assert_allclose(pe.T @ pe, np.eye(8), atol=1e-5)
    sym = np.maximum(adjacency, adjacency.T)
    trivial = np.sqrt(sym.sum(axis=1))
    np.testing.assert_allclose(pe.T @ (trivial / np.linalg.norm(trivial)), 0.0, atol=1e-5)
    assert pdformer.laplacian_positional_encoding(np.eye(3) + np.eye(3, k=1), 8).shape == (3, 8)


def grouped_series(nodes=20, days=3, seed=0):
    """Nodes n and n + 4k share a daily profile (5 nodes per group), plus small noise."""
    rng = np.random.default_rng(seed)
    profiles = rng.random((288, 4)) * 50
    daily = profiles[:, np.arange(nodes) % 4]
    return np.tile(daily, (days, 1)) + rng.normal(0, 0.01, (288 * days, nodes))


def test_semantic_mask_from_training_profiles():
    series = grouped_series()
    model = pdformer.build(dict(pdformer.config("METR-LA")["model"], num_nodes=20),
                           BuildContext(adjacency=random_adjacency(20, density=0.2), train_series=series))
    visible = ~model.sem_mask.numpy()
    assert (visible.sum(axis=1) == 5).all()
    assert all(set(np.flatnonzero(row)) == set(range(n % 4, 20, 4)) for n, row in enumerate(visible))
    assert "stand-in for DTW" in model.derived_inputs["semantic"]


def test_semantic_mask_falls_back_to_geographic_neighbours():
    path = np.eye(10) + np.eye(10, k=1) + np.eye(10, k=-1)
    model = pdformer.build(dict(pdformer.config("METR-LA")["model"], num_nodes=10), BuildContext(adjacency=path))
    assert np.flatnonzero(~model.sem_mask[5].numpy()).tolist() == [3, 4, 5, 6, 7]
    assert "hop distance" in model.derived_inputs["semantic"]


def test_pattern_keys_sources():
    args = dict(pdformer.config("METR-LA")["model"], num_nodes=20)
    adjacency = random_adjacency(20, density=0.2)
    given = np.arange(30, dtype=np.float32).reshape(10, 3, 1)
    model = pdformer.build(args, BuildContext(adjacency=adjacency, extras={"pattern_keys": given}))
    assert torch.equal(model.pattern_keys, torch.from_numpy(given[..., 0]))

    model = pdformer.build(args, BuildContext(adjacency=adjacency, train_series=grouped_series()))
    keys = model.pattern_keys.numpy()
    assert keys.shape == (16, 3) and np.isfinite(keys).all()
    np.testing.assert_allclose(keys.mean(axis=1), 0.0, atol=1e-5)  # centroids of z-normalised patterns
    assert "stand-in for k-Shape" in model.derived_inputs["pattern_keys"]

    first, second = (pdformer.build(args, BuildContext(adjacency=adjacency)) for _ in range(2))
    assert torch.equal(first.pattern_keys, second.pattern_keys)
    assert "seeded random" in first.derived_inputs["pattern_keys"]
    with pytest.raises(ValueError, match="pattern_keys: "):
        pdformer.build(args, BuildContext(adjacency=adjacency, extras={"pattern_keys": np.zeros((4, 5))}))


def test_pdformer_recent_patterns_are_zero_padded_windows(built_models):
    model = built_models["pdformer"]
    value = torch.arange(1.0, 13.0).reshape(1, 12, 1)
    patterns = model.recent_patterns(value)[0, :, 0]
    assert patterns[0].tolist() == [0.0, 0.0, 1.0]
    assert patterns[11].tolist() == [10.0, 11.0, 12.0]


def test_pdformer_eval_is_deterministic_and_day_of_week_matters(built_models):
    model = built_models["pdformer"].eval()
    x = make_x(batch=1)
    shifted = x.clone()
    shifted[..., 2] = (shifted[..., 2] + 1) % 7
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))
        assert not torch.allclose(out, model(shifted))
