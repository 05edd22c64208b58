"""STAEformer, the two LSTMs and D2STGNN follow the zoo contract (shared/specs/baselines.md 15-17)."""

import numpy as np
import pytest
import torch

from stfast.models import d2stgnn, lstm, staeformer
from stfast.models.spec import BuildContext

N = 207  # METR-LA


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Small ops on 207 nodes gain little from threads and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_adjacency(num_nodes: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = rng.random((num_nodes, num_nodes)) * (rng.random((num_nodes, num_nodes)) < 0.05)
    np.fill_diagonal(weights, 1.0)
    return weights


CONTEXT = BuildContext(adjacency=random_adjacency())

# name -> (module's SPEC, config, build, published METR-LA parameter count)
MODELS = {
    "staeformer": (staeformer.SPEC, staeformer.config, staeformer.build, 1_258_980),
    "lstm": (lstm.SPEC, lstm.config, lstm.build, 167_489),
    "lstm_largest": (lstm.SPEC_LARGEST, lstm.config_largest, lstm.build_largest, 97_932),
    "d2stgnn": (d2stgnn.SPEC, d2stgnn.config, d2stgnn.build, 391_962),
}


def build(name: str, **overrides) -> torch.nn.Module:
    _, config, build_fn, _ = MODELS[name]
    args = {**config("METR-LA")["model"], **overrides}
    return build_fn(args, CONTEXT)


def make_x(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """[value, tod multiple of 1/288 in [0, 1), dow integer 0..6] restricted to the model's channels."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, 12, N, generator=g)
    slot = (torch.randint(0, 288, (batch, 1, 1), generator=g) + torch.arange(12).view(1, 12, 1)) % 288
    tod = (slot / 288).expand(batch, 12, N)
    dow = torch.randint(0, 7, (batch, 1, 1), generator=g).float().expand(batch, 12, N)
    x = torch.stack([value, tod, dow], dim=-1)
    return x[..., list(MODELS[name][0].x_channels)].contiguous()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dead_weights(model: torch.nn.Module) -> set[str]:
    names = getattr(model, "unused_parameter_names", None)
    return names() if callable(names) else set()


def test_specs_declare_channels_and_graph():
    assert staeformer.SPEC.name == "staeformer" and staeformer.SPEC.x_channels == (0, 1, 2)
    assert lstm.SPEC.name == "lstm" and lstm.SPEC.x_channels == (0,)
    assert lstm.SPEC_LARGEST.name == "lstm_largest" and lstm.SPEC_LARGEST.x_channels == (0, 1, 2)
    assert d2stgnn.SPEC.name == "d2stgnn" and d2stgnn.SPEC.x_channels == (0, 1, 2) and d2stgnn.SPEC.needs_graph
    assert not any(spec.needs_graph for spec in (staeformer.SPEC, lstm.SPEC, lstm.SPEC_LARGEST))


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_spec(name):
    assert count(build(name)) == MODELS[name][3]


@pytest.mark.parametrize("node_hidden, time_emb_dim, tpd, expected", [(12, 12, 288, 396_388), (12, 12, 96, 394_084)])
def test_d2stgnn_largest_settings_count(node_hidden, time_emb_dim, tpd, expected):
    model = build("d2stgnn", node_hidden=node_hidden, time_emb_dim=time_emb_dim, tpd=tpd)
    assert count(model) == expected
    assert count(d2stgnn.build(d2stgnn.largest_model_args(N, tpd), CONTEXT)) == expected


def test_counts_scale_with_nodes_as_the_spec_says():
    assert count(staeformer.STAEformer(num_nodes=325)) == 1_372_260
    pems_bay = BuildContext(adjacency=random_adjacency(325))
    assert count(d2stgnn.build(d2stgnn.largest_model_args(325, tpd=96), pems_bay)) == 396_916
    assert count(lstm.LargeSTLSTM(num_nodes=325)) == 97_932


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_finite_and_gradients_reach_used_parameters(name):
    torch.manual_seed(0)
    model = build(name).train()
    out = model(make_x(name))
    assert out.shape == (2, 12, N, 1)
    assert torch.isfinite(out).all()
    out.abs().mean().backward()
    without_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert without_grad == dead_weights(model)


def test_d2stgnn_dead_weights_are_the_documented_ones():
    model = build("d2stgnn")
    dead = dead_weights(model)
    assert sum(dict(model.named_parameters())[n].numel() for n in dead) == 5 * 64 + (10 * 32 + 32) + (32 * 32 + 32) + 64


@pytest.mark.parametrize("name", MODELS)
def test_one_adam_step_lowers_the_loss_on_the_batch(name):
    torch.manual_seed(0)
    model = build(name, **({} if name == "lstm" else {"dropout": 0.0})).train()  # deterministic loss
    x = make_x(name, seed=1)
    target = torch.randn(2, 12, N, 1, generator=torch.Generator().manual_seed(2))
    # Adam's first step moves every weight by about lr along its gradient's sign; at 1e-3 the wide output
    # layers (1,824 inputs in STAEformer) overshoot, so one step at 1e-4.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    before = (model(x) - target).abs().mean()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = (model(x) - target).abs().mean()
    assert after.item() < before.item()


@pytest.mark.parametrize("name", MODELS)
def test_bad_input_shape_names_x(name):
    model = build(name)
    x = make_x(name)
    with pytest.raises(ValueError, match="x: expected shape"):
        model(x[:, :, :100])
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.cat([x, x[..., :1]], dim=-1))


def test_d2stgnn_needs_the_graph():
    args = d2stgnn.config("METR-LA")["model"]
    with pytest.raises(ValueError, match="graph: "):
        d2stgnn.build(args, BuildContext())
    with pytest.raises(ValueError, match="graph: "):
        d2stgnn.build(args, BuildContext(adjacency=np.ones((10, 10))))


def test_d2stgnn_output_reads_the_day_of_week():
    torch.manual_seed(0)
    model = d2stgnn.build(d2stgnn.largest_model_args(20, tpd=288), BuildContext(adjacency=random_adjacency(20))).eval()
    x = torch.randn(2, 12, 20, 3)
    x[..., 1] = torch.arange(12).view(1, 12, 1) / 288
    x[..., 2] = 3.0
    shifted = x.clone()
    shifted[..., 2] = 4.0
    with torch.no_grad():
        assert not torch.allclose(model(x), model(shifted))


def test_d2stgnn_masks_follow_the_configured_transition_convention():
    adjacency = CONTEXT.adjacency
    basicts = build("d2stgnn").transition_masks
    largest = d2stgnn.build(d2stgnn.largest_model_args(N, 288), CONTEXT).transition_masks
    forward = adjacency / adjacency.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(largest[0].numpy(), forward, rtol=1e-6)
    np.testing.assert_allclose(basicts[0].numpy(), forward.T, rtol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_config_rejects_unknown_datasets_and_backends(name):
    _, config, build_fn, _ = MODELS[name]
    assert config("PEMS08")["model"]["num_nodes"] == 170  # every dataset has a configuration
    with pytest.raises(ValueError, match="dataset: "):
        config("nowhere")
    with pytest.raises(ValueError, match="backend: "):
        build_fn(config("METR-LA")["model"], CONTEXT, backend="triton")
    training = config("METR-LA")["training"]
    assert {"batch_size", "max_epochs", "early_stop", "lr", "eps", "weight_decay", "milestones", "lr_decay_rate",
            "clip_grad", "loss", "in_steps", "out_steps"} <= set(training)
    assert training["loss"] == "masked_mae"


def test_staeformer_embeds_time_of_day_and_day_of_week_by_index():
    model = staeformer.STAEformer(num_nodes=3, in_steps=2, out_steps=2, num_layers=1)
    x = torch.zeros(1, 2, 3, 3)
    x[..., 1] = 5 / 288
    x[..., 2] = 6
    embedded = model._embed(x)
    torch.testing.assert_close(embedded[0, 0, 0, 24:48], model.tod_embedding.weight[5])
    torch.testing.assert_close(embedded[0, 0, 0, 48:72], model.dow_embedding.weight[6])


def test_lstm_decoder_is_autoregressive_per_node():
    torch.manual_seed(0)
    model = lstm.Seq2SeqLSTM(num_nodes=4, num_layers=1, lstm_hidden_dim=8).eval()
    x = torch.randn(1, 12, 4, 1)
    changed = x.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :, [0, 1, 3]], b[:, :, [0, 1, 3]])  # nodes are independent
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])


def test_lstm_largest_sees_day_of_week_as_a_fraction():
    model = lstm.LargeSTLSTM(num_nodes=2)
    x = torch.zeros(1, 12, 2, 3)
    x[..., 2] = 6
    assert model._features(x)[..., 2].eq(6 / 7).all()
