"""Every zoo model through one door: create() with its published configuration, one adapter."""

import pytest
import torch

from stfast import models
from stfast.data import synthetic_batch

# METR-LA parameter counts of the published implementations (shared/specs/baselines.md).
PUBLISHED_METR_LA = {
    "hi": 0,
    "himnet": 1_250_937,
    "stid": 117_868,
    "stgcn": 246_028,
    "gwnet": 309_400,
    "stnorm": 223_756,
    "dcrnn": 372_353,
    "agcrn": 751_650,
    "gts": 38_478_291,
    "megacrn": 388_761,
    "stwa": 375_428,
    "pdformer": 531_165,
    "staeformer": 1_258_980,
    "lstm": 167_489,
    "lstm_largest": 97_932,
    "d2stgnn": 391_962,
}


def create(name):
    torch.manual_seed(0)
    return models.create(name, "METR-LA", context=models.build_context(name, "METR-LA"))


def test_available_lists_exactly_the_models_create_accepts():
    assert set(models.available()) == set(PUBLISHED_METR_LA)
    with pytest.raises(ValueError, match=r"model: expected one of \[.*'himnet'.*\], got 'nope'"):
        models.create("nope")


@pytest.mark.parametrize("name", sorted(PUBLISHED_METR_LA))
def test_parameter_count_equals_the_published_one(name):
    assert models.count_parameters(create(name)) == PUBLISHED_METR_LA[name]


CHEAP_FORWARD = sorted(set(PUBLISHED_METR_LA) - {"gts"})  # GTS re-learns its graph from 23,990 steps per call


@pytest.mark.parametrize("name", CHEAP_FORWARD)
def test_adapter_feeds_every_model_a_batch_and_gets_the_forecast_shape(name):
    forecaster = create(name).eval()
    batch = synthetic_batch("METR-LA", 2)
    with torch.no_grad():
        out = forecaster(batch)
    assert out.shape == (2, 12, 207, 1) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["stgcn", "dcrnn", "gwnet", "d2stgnn"])
def test_graph_models_without_a_graph_fail_clearly(name):
    with pytest.raises(ValueError, match=f"graph: {name} needs the road graph"):
        models.create(name, "METR-LA")


def test_real_data_without_a_graph_asks_for_one():
    from stfast.data import load_dataset

    data = load_dataset("METR-LA", synthetic=True, num_steps=100)
    data.adjacency, data.synthetic = None, False  # as if loaded from a file without --graph
    with pytest.raises(ValueError, match="graph: stgcn needs the road graph of METR-LA; pass --graph FILE"):
        models.build_context("stgcn", "METR-LA", data=data)


def test_overrides_must_name_model_arguments():
    with pytest.raises(ValueError, match=r"overrides: unknown argument\(s\) \['hidden'\] for himnet"):
        models.create("himnet", "METR-LA", hidden=3)


@pytest.mark.parametrize("name", ["agcrn", "himnet"])
def test_models_on_stfast_ops_match_their_published_formulation(name):
    """The fused backend computes what the published formulation computes: forecast and every gradient."""
    from stfast.data import synthetic_batch

    torch.manual_seed(0)
    fused = models.create(name, "METR-LA", backend="torch")
    reference = models.create(name, "METR-LA", backend="reference")
    reference.load_state_dict(fused.state_dict(), strict=True)
    batch = synthetic_batch("METR-LA", 2)
    results = []
    for forecaster in (fused, reference):
        out = forecaster.eval()(batch)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad for k, p in forecaster.named_parameters()}))
    (out_f, grads_f), (out_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    for key in grads_r:
        torch.testing.assert_close(grads_f[key], grads_r[key], rtol=1e-4, atol=1e-5, msg=key)
