"""stfast.nn.HimNet is a drop-in for the reference: same parameters, same forecast, same gradients."""

import numpy as np
import pytest
import torch

import stfast.nn
import stfast.reference
from stfast import configs

SMALL = dict(num_nodes=7, hidden_dim=6, tod_embedding_dim=3, dow_embedding_dim=2, node_embedding_dim=4,
             st_embedding_dim=3, tf_decay_steps=10)


def inputs(batch, nodes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, nodes, 3, generator=g, dtype=dtype)
    x[..., 1] = torch.randint(0, 288, (batch, 12, nodes), generator=g) / 288
    x[..., 2] = torch.randint(0, 7, (batch, 12, nodes), generator=g).to(dtype)
    y_cov = torch.stack([x[..., 1], x[..., 2]], dim=-1).flip(1).contiguous()
    labels = torch.randn(batch, 12, nodes, 1, generator=g, dtype=dtype)
    return x, y_cov, labels


def pair(dtype=torch.float32, **config):
    torch.manual_seed(0)
    fused = stfast.nn.HimNet(**config).to(dtype)
    torch.manual_seed(0)
    ref = stfast.reference.HimNet(**config).to(dtype)
    return fused, ref


def run(model, x, y_cov, labels, seed=0, batches_seen=5):
    np.random.seed(seed)
    out = model(x, y_cov, labels=labels, batches_seen=batches_seen)
    model.zero_grad()
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(fused_result, ref_result, rtol, atol):
    (out_f, grads_f), (out_r, grads_r) = fused_result, ref_result
    torch.testing.assert_close(out_f, out_r, rtol=rtol, atol=atol)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=rtol, atol=atol, msg=name)


def test_same_parameters_and_initialisation_under_one_seed():
    fused, ref = pair(**configs.load("himnet", "METR-LA")["model"])
    fused_state, ref_state = fused.state_dict(), ref.state_dict()
    assert list(fused_state) == list(ref_state)
    for name in ref_state:
        assert torch.equal(fused_state[name], ref_state[name]), name


def test_loads_a_reference_state_dict_strictly():
    torch.manual_seed(1)
    ref = stfast.reference.HimNet(**SMALL)
    fused = stfast.nn.HimNet(**SMALL)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x, y_cov, _ = inputs(2, 7)
    torch.testing.assert_close(fused.eval()(x, y_cov), ref.eval()(x, y_cov), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, nodes, layers, cheb_k", [(1, 7, 1, 2), (3, 7, 2, 3), (2, 5, 1, 1), (3, 3, 1, 2)])
def test_eval_mode_matches_reference_forward_and_gradients(batch, nodes, layers, cheb_k):
    config = {**SMALL, "num_nodes": nodes, "num_layers": layers, "cheb_k": cheb_k}
    fused, ref = pair(**config)
    x, y_cov, labels = inputs(batch, nodes)
    assert_same(run(fused.eval(), x, y_cov, labels), run(ref.eval(), x, y_cov, labels), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_training_mode_matches_reference_with_teacher_forcing_off_and_on(teacher_forcing):
    config = {**SMALL, "use_teacher_forcing": teacher_forcing, "tf_decay_steps": 3}
    fused, ref = pair(**config)
    x, y_cov, labels = inputs(2, 7)
    for batches_seen in (0, 4):  # threshold 0.75 then ~0.27: both forced and free steps occur
        assert_same(run(fused.train(), x, y_cov, labels, seed=7, batches_seen=batches_seen),
                    run(ref.train(), x, y_cov, labels, seed=7, batches_seen=batches_seen), rtol=1e-4, atol=1e-5)


def test_float64_matches_reference_tightly():
    fused, ref = pair(torch.float64, **SMALL)
    x, y_cov, labels = inputs(2, 7, dtype=torch.float64)
    assert_same(run(fused.eval(), x, y_cov, labels), run(ref.eval(), x, y_cov, labels), rtol=1e-10, atol=1e-12)


def test_published_configuration_matches_reference_on_a_pems08_batch():
    from stfast.data import synthetic_batch

    fused, ref = pair(**configs.load("himnet", "PEMS08")["model"])
    batch = synthetic_batch("PEMS08", 2)
    labels = batch.y / 100
    assert_same(run(fused.train(), batch.x, batch.y_cov, labels), run(ref.train(), batch.x, batch.y_cov, labels),
                rtol=1e-4, atol=1e-5)


def test_bad_input_gets_the_reference_errors():
    fused, _ = pair(**SMALL)
    x, y_cov, _ = inputs(2, 7)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T_in, 7, 3\), got \(2, 12, 6, 3\)"):
        fused.eval()(x[:, :, :6], y_cov)
