"""stfast.nn.NALL / NSP / STLoRA: fresh wrappers equal their backbone, a training step lowers the
loss, the gate penalty, freezing, the adapter-only state dict, parameter counts, and the zoo
integration (``wrap_forecaster`` around HimNet, the training step and the profiler)."""

import pytest
import torch
from torch import nn

import stfast.ops as ops
from stfast import models, profile
from stfast.data import synthetic_batch
from stfast.metrics import get_loss
from stfast.nn import NALL, NSP, STLoRA
from stfast.nn.stlora import parameter_overhead, wrap_forecaster
from stfast.training.step import make_optimizer, train_step

TINY_HIMNET = dict(hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=2, st_embedding_dim=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _clean_backend(clean_backend):
    yield


class TinyBackbone(nn.Module):
    """``(B, T_in, N, C_in) -> (B, T_out, N, 1)``: one linear map of each node's window."""

    def __init__(self, in_steps=6, out_steps=4, input_dim=2):
        super().__init__()
        self.out_steps = out_steps
        self.proj = nn.Linear(in_steps * input_dim, out_steps)

    def forward(self, x):
        batch, _, nodes, _ = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(batch, nodes, -1)).permute(0, 2, 1).unsqueeze(-1)


def make_wrapper(seed=0, nodes=5, **options):
    torch.manual_seed(seed)
    backbone = TinyBackbone()
    options = {"hidden": 8, "rank": 3, "num_layers": 2, **options}
    return STLoRA(backbone, nodes, in_steps=6, out_steps=4, input_dim=2, output_dim=1, **options)


def make_data(batch=8, nodes=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, nodes, 2, generator=gen)
    y = x[:, -4:, :, :1].flip(1) * 0.5 + 0.3 * torch.randn(batch, 4, nodes, 1, generator=gen)
    return x, y


# ---------------------------------------------------------------- NALL and NSP

def test_fresh_nall_equals_its_base_layer():
    layer = NALL(7, 5, num_nodes=4, rank=3)
    x = torch.randn(2, 3, 4, 7)
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.lora_a) > 0
    torch.testing.assert_close(layer(x), layer.base(x))
    assert layer.lora_a.abs().max() <= 7**-0.5


def test_nall_matches_a_per_node_loop():
    layer = NALL(7, 5, num_nodes=4, rank=3, alpha=6.0, activation="tanh")
    nn.init.normal_(layer.lora_b)
    x = torch.randn(3, 4, 7)
    expected = torch.stack([
        layer.base(x[:, n]) + 2.0 * torch.tanh(x[:, n] @ layer.lora_a[n]) @ layer.lora_b[n] for n in range(4)
    ], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_nall_freeze_base_and_dropout():
    layer = NALL(7, 5, num_nodes=4, rank=3, dropout=0.5, freeze_base=True)
    nn.init.normal_(layer.lora_b)
    x = torch.randn(3, 4, 7)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(0)
    assert torch.equal(first, layer(x)) and not torch.allclose(first, layer(x))
    first.sum().backward()
    assert layer.base.weight.grad is None and layer.lora_a.grad is not None and layer.lora_b.grad is not None


def test_nsp_shape_and_node_locality():
    """Each node's forecast depends only on that node's window and adapters."""
    nsp = NSP(5, in_steps=6, in_dim=2, out_steps=4, out_dim=3, hidden=8, num_layers=2, rank=3).eval()
    x = torch.randn(2, 6, 5, 2)
    out = nsp(x)
    assert out.shape == (2, 4, 5, 3)
    with torch.no_grad():
        nsp.head.lora_b[2].normal_()
        nsp.layers[0].lora_b[2].normal_()
    changed = nsp(x)
    assert not torch.allclose(changed[:, :, 2], out[:, :, 2])
    torch.testing.assert_close(changed[:, :, [0, 1, 3, 4]], out[:, :, [0, 1, 3, 4]])
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 6, 5, 2\), got \(2, 6, 4, 2\)"):
        nsp(x[:, :, :4])


# ---------------------------------------------------------------- STLoRA

@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("num_blocks", [1, 2])
def test_fresh_wrapper_returns_the_backbone_output_exactly(training, num_blocks):
    wrapper = make_wrapper(num_blocks=num_blocks, dropout=0.3).train(training)
    x, _ = make_data()
    assert torch.equal(wrapper(x), wrapper.backbone(x))


def _loss(wrapper, x, y):
    return (wrapper(x) - y).abs().mean() + wrapper.regularization()


@pytest.mark.parametrize("frozen", [False, True])
def test_one_training_step_lowers_the_loss(frozen):
    wrapper = make_wrapper()
    if frozen:
        wrapper.freeze_backbone()
    x, y = make_data()
    optimizer = torch.optim.Adam([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    before = _loss(wrapper, x, y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = _loss(wrapper, x, y)
    assert after < before.detach()
    assert torch.count_nonzero(wrapper.gate) > 0
    assert not torch.equal(wrapper(x), wrapper.backbone(x))
    for _ in range(20):  # and it keeps going down once the adapters get gradients through the gate
        optimizer.zero_grad()
        _loss(wrapper, x, y).backward()
        optimizer.step()
    with torch.no_grad():
        assert _loss(wrapper, x, y) < after


def test_regularization_and_auxiliary_loss():
    wrapper = make_wrapper(gate_l2=0.5)
    assert wrapper.regularization().item() == 0.0
    with torch.no_grad():
        wrapper.gate.fill_(2.0)
    assert wrapper.regularization().item() == pytest.approx(0.5 * 4.0 * 5 * 4)
    wrapper.backbone.auxiliary_loss = lambda: torch.tensor(1.5)
    assert wrapper.auxiliary_loss().item() == pytest.approx(40.0 + 1.5)


def test_freeze_backbone():
    wrapper = make_wrapper().freeze_backbone()
    with torch.no_grad():
        wrapper.gate.fill_(0.1)
    x, y = make_data()
    _loss(wrapper, x, y).backward()
    assert all(p.grad is None for p in wrapper.backbone.parameters())
    assert all(p.grad is not None for p in wrapper.adapter_parameters())
    assert wrapper.added_parameters(trainable_only=True) == models.count_parameters(wrapper)
    wrapper.freeze_backbone(False)
    assert all(p.requires_grad for p in wrapper.backbone.parameters())


def test_adapter_state_dict_round_trip():
    trained = make_wrapper(seed=0)
    x, y = make_data()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        _loss(trained, x, y).backward()
        optimizer.step()
    state = trained.adapter_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert sum(v.numel() for v in state.values()) == trained.added_parameters()

    fresh = make_wrapper(seed=5)  # another backbone and other adapters
    fresh.backbone.load_state_dict(trained.backbone.state_dict())
    backbone_before = {k: v.clone() for k, v in fresh.backbone.state_dict().items()}
    fresh.load_adapter_state_dict(state)
    assert torch.equal(fresh(x), trained(x))
    assert all(torch.equal(v, fresh.backbone.state_dict()[k]) for k, v in backbone_before.items())

    with pytest.raises(ValueError, match=r"missing ST-LoRA keys \['gate'\]"):
        fresh.load_adapter_state_dict({k: v for k, v in state.items() if k != "gate"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        fresh.load_adapter_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="expected ST-LoRA entries only, got backbone entries"):
        fresh.load_adapter_state_dict(trained.state_dict())


def test_added_parameters_count():
    wrapper = make_wrapper(num_blocks=2)
    nodes, hidden, rank, layers, steps_in, steps_out = 5, 8, 3, 2, 6 + 4, 4
    nall = hidden * hidden + hidden + nodes * rank * (2 * hidden)
    head = hidden * steps_out + steps_out + nodes * rank * (hidden + steps_out)
    nsp = (steps_in * hidden + hidden) + layers * (nall + hidden) + head
    expected = 2 * nsp + (2 * steps_out * steps_out + steps_out) + nodes * steps_out
    assert wrapper.added_parameters() == expected
    overhead = parameter_overhead(wrapper)
    backbone = 6 * 2 * 4 + 4
    assert overhead == {"added": expected, "backbone": backbone, "percent": pytest.approx(100 * expected / backbone)}


def test_bad_configuration():
    with pytest.raises(ValueError, match="backbone output: expected shape .* = \\(8, 4, 5, 1\\), got \\(8, 4, 5, 2\\)"):
        wrapper = make_wrapper()
        wrapper.backbone = nn.Sequential(wrapper.backbone, nn.Linear(1, 2))
        wrapper(make_data()[0])
    with pytest.raises(ValueError, match="history_channels: expected 1 channel"):
        STLoRA(TinyBackbone(), 5, 6, 4, input_dim=2, history_channels=(2,))
    with pytest.raises(TypeError, match="backbone: expected an nn.Module"):
        STLoRA(lambda x: x, 5)
    with pytest.raises(ValueError, match="rank: expected an int >= 1, got 0"):
        make_wrapper(rank=0)


# ---------------------------------------------------------------- zoo integration (HimNet)

@pytest.fixture(scope="module")
def himnet_batch():
    return synthetic_batch("PEMS08", 2, return_scaler=True)


def test_wrap_forecaster_himnet(himnet_batch):
    batch, scaler = himnet_batch
    torch.manual_seed(0)
    forecaster = models.create("himnet", "PEMS08", backend="torch", **TINY_HIMNET)
    wrapped = wrap_forecaster(forecaster, hidden=8, rank=4, num_layers=1)
    assert isinstance(wrapped, models.Forecaster) and wrapped.model.backbone is forecaster.model
    assert wrapped.spec == forecaster.spec and wrapped.backend == "torch"
    for training in (False, True):
        forecaster.train(training)
        wrapped.train(training)
        torch.manual_seed(3)  # teacher forcing draws from the global generator
        expected = forecaster(batch, labels=scaler.transform(batch.y), batches_seen=5)
        torch.manual_seed(3)
        assert torch.equal(wrapped(batch, labels=scaler.transform(batch.y), batches_seen=5), expected)

    # the config rebuilds the same wrapper
    rebuilt = wrap_forecaster(models.create("himnet", "PEMS08", **TINY_HIMNET), **wrapped.config["stlora"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in wrapped.state_dict().items()}
    overhead = parameter_overhead(wrapped)
    assert overhead["backbone"] == models.count_parameters(forecaster)
    assert overhead["added"] == wrapped.model.added_parameters() > 0

    # train_step adds the gate penalty through auxiliary_loss and moves the gate
    with torch.no_grad():
        wrapped.model.gate.fill_(0.1)
    wrapped.train()
    optimizer, _ = make_optimizer(wrapped, wrapped.config["training"])
    loss_fn = get_loss(wrapped.config["training"]["loss"])
    losses = [train_step(wrapped, batch, optimizer, loss_fn, scaler, batches_seen=i).item() for i in range(4)]
    assert losses[-1] < losses[0]

    with pytest.raises(ValueError, match="already wrapped"):
        wrap_forecaster(wrapped)
    with pytest.raises(ValueError, match=r"\['num_nodes'\] are taken from the forecaster's config"):
        wrap_forecaster(forecaster, num_nodes=3)


def test_profile_a_wrapped_forecaster(himnet_batch):
    batch, scaler = himnet_batch
    torch.manual_seed(0)
    wrapped = wrap_forecaster(models.create("himnet", "PEMS08", **TINY_HIMNET), hidden=8, rank=4, num_layers=1,
                              freeze_backbone=True)
    report = profile(wrapped, batch, scaler=scaler, warmup=0, repeats=1)
    assert report.params == wrapped.model.added_parameters()  # the frozen backbone does not count as trainable
