"""ST-LoRA's two adapter forms: the paper's per-node NALL (``A (N, d_in, r)``, ``B (N, r, d_out)``)
and the shared form (``A (d_in, r)``, ``B (r, d_out)``, a per-node scale ``e (N, r)``). Each is
checked against a naive loop over nodes, forward and backward, on every path that computes it; the
parameter formulas of the docstrings; and freezing (base layers, and a frozen backbone that stays
bitwise unchanged through training, batch-norm statistics included)."""

import pytest
import torch
from torch import nn

import stfast.ops as ops
from stfast.nn.stlora import ADAPTERS, NALL, NSP, STLoRA, SharedNALL, node_lora_loop, parameter_overhead

NODES, D_IN, D_OUT, RANK = 5, 7, 6, 3  # odd sizes on purpose


@pytest.fixture(autouse=True)
def _clean_backend(clean_backend):
    yield


def _op_backends():
    status = ops.available_backends("cpu", "node_lora")
    return [name for name in ("torch", "cpu") if status.get(name) is True]


def _activate(h, activation):
    functions = {"leaky_relu": lambda t: nn.functional.leaky_relu(t, 0.01), "tanh": torch.tanh, None: lambda t: t}
    return functions[activation](h)


def naive_shared(layer: SharedNALL, x):
    """The shared form written node by node, from its docstring's formula."""
    rows = []
    for n in range(layer.num_nodes):
        h = _activate((x[..., n, :] @ layer.lora_a) * layer.node_scale[n], layer.activation)
        rows.append(layer.base(x[..., n, :]) + layer.scale * h @ layer.lora_b)
    return torch.stack(rows, dim=-2)


def naive_per_node(layer: NALL, x):
    rows = [layer.base(x[..., n, :]) + layer.scale * _activate(x[..., n, :] @ layer.lora_a[n], layer.activation)
            @ layer.lora_b[n] for n in range(layer.num_nodes)]
    return torch.stack(rows, dim=-2)


def _randomised(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _forward_backward(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    return y.detach(), x.grad, grads


def _assert_matches(layer, reference, x, tol=1e-5):
    y, dx, grads = _forward_backward(layer, x)
    y_ref, dx_ref, grads_ref = _forward_backward(reference, x)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=tol, atol=tol, msg=name)


class _Naive(nn.Module):
    def __init__(self, layer, fn):
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self, x):
        return self.fn(self.layer, x)

    def named_parameters(self, *args, **kwargs):
        return self.layer.named_parameters(*args, **kwargs)


# ---------------------------------------------------------------- shared form


def test_fresh_shared_nall_equals_its_base_layer():
    layer = SharedNALL(D_IN, D_OUT, NODES, rank=RANK)
    x = torch.randn(2, 3, NODES, D_IN)
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.equal(layer.node_scale, torch.ones(NODES, RANK))
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh", None])
@pytest.mark.parametrize("path", ["composed", "op"])
def test_shared_nall_matches_a_node_loop(path, activation):
    for backend in _op_backends() if path == "op" else ["torch"]:
        layer = _randomised(SharedNALL(D_IN, D_OUT, NODES, rank=RANK, alpha=2.0, activation=activation, path=path))
        x = torch.randn(2, 3, NODES, D_IN)
        with ops.use_backend(backend):
            _assert_matches(layer, _Naive(layer, naive_shared), x)


def test_shared_nall_gradcheck_float64():
    layer = _randomised(SharedNALL(D_IN, D_OUT, NODES, rank=RANK, activation="tanh", path="composed").double())
    x = torch.randn(2, NODES, D_IN, dtype=torch.float64, requires_grad=True)
    params = (layer.lora_a, layer.lora_b, layer.node_scale, layer.base.weight)
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), (x, *params))


def test_shared_nall_dropout_only_on_the_low_rank_path():
    layer = _randomised(SharedNALL(D_IN, D_OUT, NODES, rank=RANK, dropout=0.5, path="composed"))
    x = torch.randn(4, NODES, D_IN)
    layer.eval()
    torch.testing.assert_close(layer(x), naive_shared(layer, x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(0)
    assert torch.equal(first, layer(x)) and not torch.allclose(first, naive_shared(layer, x))
    with torch.no_grad():
        layer.lora_b.zero_()  # no low-rank path left: dropout has nothing to act on
    torch.testing.assert_close(layer(x), layer.base(x))


def test_shared_nall_bad_input():
    layer = SharedNALL(D_IN, D_OUT, NODES, rank=RANK, path="composed")
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 5, 7\), got \(2, 4, 7\)"):
        layer(torch.randn(2, 4, D_IN))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(2, NODES, D_IN, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"path: expected one of \('composed', 'op'\), got 'loop'"):
        SharedNALL(D_IN, D_OUT, NODES, path="loop")


# ---------------------------------------------------------------- per-node form and the naive loop


@pytest.mark.parametrize("path", ["op", "loop"])
def test_per_node_nall_matches_a_node_loop(path):
    for backend in _op_backends():
        layer = _randomised(NALL(D_IN, D_OUT, NODES, rank=RANK, alpha=2.0, path=path))
        with ops.use_backend(backend):
            _assert_matches(layer, _Naive(layer, naive_per_node), torch.randn(2, 3, NODES, D_IN))


def test_node_lora_loop_equals_the_op():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, NODES, D_IN), torch.randn(D_OUT, D_IN), torch.randn(D_OUT)
    a, bb = torch.randn(NODES, D_IN, RANK), torch.randn(NODES, RANK, D_OUT)
    torch.testing.assert_close(node_lora_loop(x, w, b, a, bb, 0.5, "relu"),
                               ops.node_lora(x, w, b, a, bb, 0.5, "relu"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- parameter formulas


def _adapter_params(adapter, d_in, d_out, nodes=NODES, rank=RANK):
    return nodes * rank * (d_in + d_out) if adapter == "per_node" else rank * (d_in + d_out) + nodes * rank


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_layer_parameter_formula(adapter):
    layer = ADAPTERS[adapter](D_IN, D_OUT, NODES, rank=RANK)
    assert sum(p.numel() for p in layer.parameters()) == D_OUT * (D_IN + 1) + _adapter_params(adapter, D_IN, D_OUT)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_nsp_and_wrapper_parameter_formula(adapter):
    hidden, layers, in_steps, out_steps = 8, 2, 6, 4
    nsp = NSP(NODES, in_steps, 1, out_steps, 1, hidden=hidden, num_layers=layers, rank=RANK, adapter=adapter)
    t, p = in_steps, out_steps
    expected = (hidden * (t + 1) + layers * (hidden * (hidden + 1) + _adapter_params(adapter, hidden, hidden) + hidden)
                + p * (hidden + 1) + _adapter_params(adapter, hidden, p))
    assert sum(q.numel() for q in nsp.parameters()) == expected

    backbone = nn.Linear(1, 1)
    wrapper = STLoRA(backbone, NODES, in_steps=2, out_steps=p, hidden=hidden, num_layers=layers, rank=RANK,
                     adapter=adapter)
    block = NSP(NODES, 2 + p, 1, p, 1, hidden=hidden, num_layers=layers, rank=RANK, adapter=adapter)
    assert wrapper.added_parameters() == sum(q.numel() for q in block.parameters()) + p * (2 * p + 1) + NODES * p


@pytest.mark.parametrize("adapter, added", [("per_node", 1_483_132), ("shared", 38_892)])
def test_paper_defaults_on_pems04(adapter, added):
    """The counts the STLoRA docstring states (rank 16, 4 layers, hidden 32, one block, N = 307)."""
    wrapper = STLoRA(nn.Linear(10, 10), 307, adapter=adapter)
    assert wrapper.added_parameters() == added
    assert parameter_overhead(wrapper)["percent"] == pytest.approx(100 * added / 110)


def test_unknown_adapter():
    with pytest.raises(ValueError, match=r"adapter: expected one of \['per_node', 'shared'\], got 'full'"):
        STLoRA(nn.Linear(1, 1), NODES, adapter="full")


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_freeze_base_trains_only_the_adapters(adapter):
    layer = _randomised(ADAPTERS[adapter](D_IN, D_OUT, NODES, rank=RANK, freeze_base=True))
    layer(torch.randn(2, NODES, D_IN)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(p.grad is not None for name, p in layer.named_parameters() if not name.startswith("base."))


class _NormBackbone(nn.Module):
    """``(B, 6, N, 1) -> (B, 4, N, 1)`` with batch norm and dropout, the kind of backbone a
    frozen fine-tuning must leave alone (its running statistics are buffers, not parameters)."""

    def __init__(self):
        super().__init__()
        self.norm, self.drop, self.proj = nn.BatchNorm2d(6), nn.Dropout(0.5), nn.Linear(6, 4)

    def forward(self, x):
        h = self.drop(self.norm(x)).squeeze(-1).transpose(1, 2)  # (B, N, 6)
        return self.proj(h).transpose(1, 2).unsqueeze(-1)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_frozen_backbone_stays_bitwise_unchanged_through_training(adapter):
    torch.manual_seed(0)
    wrapper = STLoRA(_NormBackbone(), NODES, in_steps=6, out_steps=4, hidden=8, num_layers=2, rank=RANK,
                     dropout=0.1, adapter=adapter).freeze_backbone()
    before = {k: v.clone() for k, v in wrapper.backbone.state_dict().items()}
    adapters_before = {k: v.clone() for k, v in wrapper.adapter_state_dict().items()}
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=1e-2, weight_decay=1e-3)
    wrapper.train()
    assert not wrapper.backbone.training and wrapper.blocks.training
    x, y = torch.randn(8, 6, NODES, 1), torch.randn(8, 4, NODES, 1)
    for _ in range(3):
        optimizer.zero_grad()
        ((wrapper(x) - y).abs().mean() + wrapper.regularization()).backward()
        optimizer.step()
    after = wrapper.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running mean/var and counts included
    assert any(not torch.equal(v, wrapper.adapter_state_dict()[k]) for k, v in adapters_before.items())
    wrapper.freeze_backbone(False).train()
    assert wrapper.backbone.training and all(p.requires_grad for p in wrapper.backbone.parameters())
