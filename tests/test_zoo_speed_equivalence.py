"""The faster GWNet and STID forwards compute what the former (published-layout) forwards computed.

The former forwards live in ``bench/zoo_speed.py`` (the "before" columns of the benchmark); here they
are the oracle: same module, same weights, outputs and every gradient in float64 to round-off, fp32
to 1e-5, on odd shapes (batch 3, fewer input steps than the receptive field, an odd node count),
in eval and in train mode (BatchNorm batch statistics and running-statistic updates). The state dict
keys and parameter counts stay the published ones.
"""

from __future__ import annotations

import pytest
import torch

from bench.zoo_speed import FORMULATIONS, gwnet_published_layout, stid_published_layout
from stfast import models
from stfast.models.graph_ops import double_transition
from stfast.models.gwnet import GWNET
from stfast.models.stid import STID

ODD_NODES = 13


def small_gwnet(dtype) -> GWNET:
    torch.manual_seed(0)
    adjacency = (torch.rand(ODD_NODES, ODD_NODES) < 0.3).float() + torch.eye(ODD_NODES)
    model = GWNET(ODD_NODES, double_transition(adjacency.numpy()), dropout=0.0, skip_channels=24, end_channels=20,
                  residual_channels=8, dilation_channels=8, out_dim=5)
    return model.to(dtype)


def small_stid(dtype) -> STID:
    torch.manual_seed(0)
    return STID(ODD_NODES, input_len=7, output_len=5, embed_dim=6, node_dim=5, temp_dim_tid=3, temp_dim_diw=4,
                time_of_day_size=48, num_layer=2).to(dtype)


def inputs(model, steps: int, channels: int, dtype, slots: int = 288) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, steps, model.num_nodes, channels, generator=generator, dtype=dtype)
    x[..., 1] = torch.randint(0, slots, x.shape[:3], generator=generator).to(dtype) / slots
    if channels == 3:
        x[..., 2] = torch.randint(0, 7, x.shape[:3], generator=generator).to(dtype)
    return x


def outputs_and_grads(forward, model, x):
    model.zero_grad(set_to_none=True)
    out = forward(model, x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(before, after, tol):
    torch.testing.assert_close(after[0], before[0], rtol=tol, atol=tol)
    assert before[1].keys() == after[1].keys()
    for name in before[1]:
        torch.testing.assert_close(after[1][name], before[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype, tol, train", [(torch.float64, 1e-10, False), (torch.float64, 1e-10, True),
                                               (torch.float32, 1e-5, True)])
def test_gwnet_forward_and_gradients_match_the_published_layout(dtype, tol, train):
    model = small_gwnet(dtype).train(train)
    x = inputs(model, 10, 2, dtype)  # 10 steps, left-padded to the receptive field of 13
    stats = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn.")}
    before = outputs_and_grads(gwnet_published_layout, model, x)
    stats_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn.")}
    model.load_state_dict({**model.state_dict(), **stats})  # the same running statistics for the second pass
    after = outputs_and_grads(lambda m, t: m(t), model, x)
    assert_same(before, after, tol)
    for key, value in model.state_dict().items():
        if key.startswith("bn."):
            torch.testing.assert_close(value, stats_before[key], rtol=tol, atol=tol, msg=key)


def test_gwnet_per_support_formulation_agrees_too():
    model = small_gwnet(torch.float64).eval()
    x = inputs(model, 13, 2, torch.float64)
    assert_same(outputs_and_grads(gwnet_published_layout, model, x),
                outputs_and_grads(FORMULATIONS["gwnet"]["per-support"], model, x), 1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_stid_forward_and_gradients_match_the_published_layout(dtype, tol):
    model = small_stid(dtype).train()
    model.encoder[0].drop.p = 0.0  # dropout draws differ between layouts; everything else must not
    model.encoder[1].drop.p = 0.0
    x = inputs(model, 7, 3, dtype, slots=48)
    assert_same(outputs_and_grads(stid_published_layout, model, x),
                outputs_and_grads(lambda m, t: m(t), model, x), tol)


def test_published_keys_and_counts_are_unchanged():
    counts = {"gwnet": 309_400, "stid": 117_868}  # the module docstrings' published METR-LA counts
    for name, count in counts.items():
        context = models.build_context(name, "METR-LA", synthetic_seed=0)
        model = models.create(name, "METR-LA", context=context).model
        assert sum(p.numel() for p in model.parameters()) == count
    gwnet_keys = models.create("gwnet", "METR-LA", context=models.build_context("gwnet", "METR-LA")).model.state_dict()
    assert "gconv.3.mlp.mlp.weight" in gwnet_keys and "filter_convs.7.weight" in gwnet_keys
    assert gwnet_keys["filter_convs.7.weight"].shape == (32, 32, 1, 2)
