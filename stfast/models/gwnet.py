"""Graph WaveNet (Wu et al., IJCAI 2019) as the HimNet authors benchmark it.

Written from ``shared/specs/baselines.md`` section 6, which follows XDZhelheim/Torch-MTS
(``models/GraphWaveNet.py``, ``configs/GWNET.yaml`` section METRLA; original nnzhan/Graph-WaveNet).
METR-LA: 309,400 parameters, of which 8,448 are dead weights (below). State-dict keys equal the
published module's, so its checkpoints load with ``strict=True``.

Input speed + time of day, left-padded in time to the receptive field (13). Eight gated dilated
temporal convs (4 blocks x dilations 1, 2); after each, a skip 1x1 conv is summed into the skip
path, and a diffusion graph conv of order 2 over three supports (the two "doubletransition"
random-walk matrices and the adaptive ``softmax(relu(E1 E2))``) plus the residual and BatchNorm
feeds the next layer. The head maps the skip path to the 12 horizons on the channel axis.

Dead weights (no gradient ever reaches them), kept because the published count includes them:
- the published module builds a 1x1 ``residual_convs`` per layer but only applies it when graph
  convolution is off; with it on (the published configuration, the only one here) the 8 convs of
  32 -> 32 (8,448 parameters) never run;
- the last layer's graph conv and BatchNorm (``gconv.7``, ``bn.7``: 7,264 parameters) run, as in
  the published forward (bn.7's running statistics still update), but their output is discarded:
  the head reads only the skip path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .graph_ops import check_adjacency, double_transition
from .dataset_configs import PUBLISHED, for_dataset, mark
from .spec import ModelSpec

__all__ = ["SPEC", "BACKENDS", "GWNET", "config", "build"]

SPEC = ModelSpec("gwnet", x_channels=(0, 1), needs_graph=True)
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/GWNET.yaml"


class PointwiseConv(nn.Module):
    """1x1 conv in its own module, so the state-dict key is the published ``gconv.<i>.mlp.mlp``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.mlp = nn.Conv2d(c_in, c_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` on channels-last ``x (..., C_in)``, as the GEMM it is."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class DiffusionConv(nn.Module):
    """``[x, S_1 x, S_1^2 x, S_2 x, ...]`` concatenated on channels -> 1x1 conv -> dropout.

    Propagation is ``x . S`` over the node axis (node v sends to w with weight ``S[v, w]``).
    """

    def __init__(self, c_in: int, c_out: int, dropout: float, support_len: int = 3, order: int = 2):
        super().__init__()
        self.order, self.dropout = order, dropout
        self.mlp = PointwiseConv((order * support_len + 1) * c_in, c_out)

    def forward(self, x: torch.Tensor, supports_t: torch.Tensor) -> torch.Tensor:
        """``x (N, B, L, C)`` node-major, ``supports_t (K, N, N)`` the supports transposed -> ``(N, B, L, c_out)``.

        Node-major ``x`` is an ``(N, B*L*C)`` matrix, so the first hop over all K supports is one GEMM
        ``(K*N, N) @ (N, B*L*C)`` and each further hop one batched GEMM, with no permute copies.
        """
        num_nodes, c_in = x.shape[0], x.shape[-1]
        k = supports_t.shape[0]
        flat = x.reshape(num_nodes, -1)
        hop = (supports_t.reshape(k * num_nodes, num_nodes) @ flat).view(k, num_nodes, -1)
        hops = [hop]
        for _ in range(2, self.order + 1):
            hops.append(torch.bmm(supports_t, hops[-1]))
        diffused = torch.stack(hops, dim=1).view(k * self.order, -1, c_in)  # blocks ordered (support, hop)
        weight = self.mlp.mlp.weight.flatten(1).view(-1, k * self.order + 1, c_in)  # (c_out, 1 + K*order, c_in)
        h = F.linear(x, weight[:, 0], self.mlp.mlp.bias)
        h = h + torch.bmm(diffused, weight[:, 1:].transpose(0, 1).transpose(1, 2)).sum(0).view_as(h)
        return F.dropout(h, self.dropout, training=self.training)


class GWNET(nn.Module):
    def __init__(self, num_nodes: int, supports, in_dim: int = 2, out_dim: int = 12, dropout: float = 0.3,
                 residual_channels: int = 32, dilation_channels: int = 32, skip_channels: int = 256,
                 end_channels: int = 512, kernel_size: int = 2, blocks: int = 4, layers: int = 2,
                 node_dim: int = 10):
        super().__init__()
        if in_dim != len(SPEC.x_channels):
            raise ValueError(f"in_dim: expected {len(SPEC.x_channels)} (speed, time of day), got {in_dim}")
        self.num_nodes, self.in_dim = num_nodes, in_dim
        supports = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in supports])
        self.register_buffer("supports", supports, persistent=False)

        self.start_conv = nn.Conv2d(in_dim, residual_channels, kernel_size=1)
        self.filter_convs, self.gate_convs = nn.ModuleList(), nn.ModuleList()
        self.residual_convs, self.skip_convs = nn.ModuleList(), nn.ModuleList()
        self.bn, self.gconv = nn.ModuleList(), nn.ModuleList()
        self.receptive_field = 1
        for _ in range(blocks):
            for dilation in (2 ** i for i in range(layers)):
                self.filter_convs.append(nn.Conv2d(residual_channels, dilation_channels, (1, kernel_size),
                                                   dilation=dilation))
                self.gate_convs.append(nn.Conv2d(residual_channels, dilation_channels, (1, kernel_size),
                                                 dilation=dilation))
                self.residual_convs.append(nn.Conv2d(dilation_channels, residual_channels, 1))  # dead weight
                self.skip_convs.append(nn.Conv2d(dilation_channels, skip_channels, 1))
                self.bn.append(nn.BatchNorm2d(residual_channels))
                self.gconv.append(DiffusionConv(dilation_channels, residual_channels, dropout,
                                                support_len=len(supports) + 1))
                self.receptive_field += dilation * (kernel_size - 1)

        self.end_conv_1 = nn.Conv2d(skip_channels, end_channels, kernel_size=1)
        self.end_conv_2 = nn.Conv2d(end_channels, out_dim, kernel_size=1)
        self.nodevec1 = nn.Parameter(torch.randn(num_nodes, node_dim))
        self.nodevec2 = nn.Parameter(torch.randn(node_dim, num_nodes))

    def adaptive_adjacency(self) -> torch.Tensor:
        """Row-stochastic ``softmax(relu(E1 E2))``."""
        return torch.softmax(torch.relu(self.nodevec1 @ self.nodevec2), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", "T_in", self.num_nodes, self.in_dim), floating=True)
        if x.shape[1] > self.receptive_field:
            raise ValueError(f"x: expected at most {self.receptive_field} input steps (the receptive field), "
                             f"got {x.shape[1]}")
        # Node-major, channels-last (N, B, L, C): every 1x1 conv is a GEMM on the last axis and every
        # graph hop a GEMM on the first, where the published (B, C, N, L) layout needs convolutions and
        # permute copies. The same weights and the same arithmetic, in another order of summation.
        h = F.pad(x.permute(2, 0, 1, 3), (0, 0, self.receptive_field - x.shape[1], 0))  # (N, B, 13, C)
        h = _pointwise(self.start_conv, h)
        supports_t = torch.cat([self.supports, self.adaptive_adjacency()[None]]).transpose(1, 2).contiguous()
        skip = 0
        for i in range(len(self.filter_convs)):
            residual = h
            filtered, gate = self._dilated_filter_and_gate(i, residual).chunk(2, dim=-1)
            h = torch.tanh(filtered) * torch.sigmoid(gate)
            s = _pointwise(self.skip_convs[i], h)
            skip = s if i == 0 else s + skip[:, :, -s.shape[2]:]
            h = self.gconv[i](h, supports_t) + residual[:, :, -h.shape[2]:]
            h = self.bn[i](h.reshape(-1, h.shape[-1], 1, 1)).view_as(h)  # statistics over (N, B, L), per channel
        out = _pointwise(self.end_conv_2, torch.relu(_pointwise(self.end_conv_1, torch.relu(skip))))
        return out.permute(1, 3, 0, 2)  # (B, out_dim, N, 1): horizons on the channel axis, as published

    def _dilated_filter_and_gate(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s filter and gate convs (kernel (1, k), dilation d): one GEMM of every tap over the
        contiguous ``h``, then each tap's output shifted by ``tap * d`` steps and summed."""
        filter_conv, gate_conv = self.filter_convs[i], self.gate_convs[i]
        dilation, taps = filter_conv.dilation[1], filter_conv.kernel_size[1]
        length = h.shape[2] - dilation * (taps - 1)
        weight = torch.cat([filter_conv.weight, gate_conv.weight])[:, :, 0]  # (2 D, C, k)
        per_tap = F.linear(h, weight.permute(2, 0, 1).flatten(0, 1))  # (N, B, L, k * 2 D), tap-major
        out = per_tap[:, :, :length, : weight.shape[0]] + torch.cat([filter_conv.bias, gate_conv.bias])
        for tap in range(1, taps):
            start = tap * dilation
            out = out + per_tap[:, :, start:start + length, tap * weight.shape[0]:(tap + 1) * weight.shape[0]]
        return out

    def dead_weights(self) -> list[str]:
        """Names of the parameters no gradient reaches (see the module docstring)."""
        last = len(self.gconv) - 1
        dead = ("residual_convs.", f"gconv.{last}.", f"bn.{last}.")
        return [name for name, _ in self.named_parameters() if name.startswith(dead)]


# XDZhelheim/Torch-MTS configs/GWNET.yaml: what each dataset's section changes from METRLA's.
_PUBLISHED = {
    "METR-LA": {}, "PEMS-BAY": {}, "PEMS03": {}, "PEMS07": {},
    "PEMS04": {"training": {"early_stop": 15, "max_epochs": 500}},
    "PEMS08": {"training": {"early_stop": 15, "max_epochs": 300}},
}


def config(dataset: str) -> dict:
    """Torch-MTS ``configs/GWNET.yaml`` per dataset; unset keys take its trainer's defaults (early stop
    10, eps 1e-8, decay 0.1, no clipping). LargeST's runs on its four datasets."""
    dataset = configs.canonical_dataset(dataset)
    if dataset in configs.LARGEST_DATASETS:
        return mark(_largest_config(dataset), PUBLISHED, "liuxu77/LargeST experiments/gwnet")
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, in_dim=2, out_dim=12, dropout=0.3, residual_channels=32,
                 dilation_channels=32, skip_channels=256, end_channels=512, kernel_size=2, blocks=4, layers=2)
    training = dict(batch_size=64, max_epochs=200, early_stop=10, lr=1e-3, eps=1e-8, weight_decay=1e-4,
                    milestones=[40], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(dataset, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


# LargeST (liuxu77/LargeST experiments/gwnet/run.sh): batch 64, and 44 on CA to fit its 48 GB GPU.
_LARGEST_BATCH = {"SD": 64, "GBA": 64, "GLA": 64, "CA": 44}


def _largest_config(dataset: str) -> dict:
    """LargeST's GWNet run (``experiments/gwnet/main.py``): the METR-LA sizes, 100 epochs, patience 30,
    gradient clipping 5, no LR schedule. LargeST feeds 3 input channels; the zoo's GWNet keeps its 2."""
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, in_dim=2, out_dim=12, dropout=0.3, residual_channels=32,
                 dilation_channels=32, skip_channels=256, end_channels=512, kernel_size=2, blocks=4, layers=2)
    training = dict(batch_size=_LARGEST_BATCH[dataset], max_epochs=100, early_stop=30, lr=1e-3, eps=1e-8,
                    weight_decay=1e-4, milestones=[], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return {"model": model, "training": training}


def build(model_args: dict, context=None, backend: str = "reference") -> GWNET:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for gwnet, got {backend!r}")
    adjacency = check_adjacency(getattr(context, "adjacency", None), model_args["num_nodes"], "gwnet")
    return GWNET(supports=double_transition(adjacency), **model_args)
