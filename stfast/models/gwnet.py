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
from .spec import ModelSpec

__all__ = ["SPEC", "BACKENDS", "GWNET", "config", "build"]

SPEC = ModelSpec("gwnet", x_channels=(0, 1), needs_graph=True)
BACKENDS = ("reference",)


class PointwiseConv(nn.Module):
    """1x1 conv in its own module, so the state-dict key is the published ``gconv.<i>.mlp.mlp``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.mlp = nn.Conv2d(c_in, c_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class DiffusionConv(nn.Module):
    """``[x, S_1 x, S_1^2 x, S_2 x, ...]`` concatenated on channels -> 1x1 conv -> dropout.

    Propagation is ``x . S`` over the node axis (node v sends to w with weight ``S[v, w]``).
    """

    def __init__(self, c_in: int, c_out: int, dropout: float, support_len: int = 3, order: int = 2):
        super().__init__()
        self.order, self.dropout = order, dropout
        self.mlp = PointwiseConv((order * support_len + 1) * c_in, c_out)

    def forward(self, x: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        """``x (B, C, N, L)``, ``supports (K, N, N)`` -> ``(B, c_out, N, L)``."""
        hops = [torch.einsum("bcvl,kvw->bkcwl", x, supports)]
        for _ in range(2, self.order + 1):
            hops.append(torch.einsum("bkcvl,kvw->bkcwl", hops[-1], supports))
        diffused = torch.stack(hops, dim=2).flatten(1, 3)  # channels ordered (support, hop, c)
        h = self.mlp(torch.cat([x, diffused], dim=1))
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
        h = F.pad(x.permute(0, 3, 2, 1), (self.receptive_field - x.shape[1], 0))  # (B, C, N, 13)
        h = self.start_conv(h)
        supports = torch.cat([self.supports, self.adaptive_adjacency()[None]])
        skip = 0
        for i in range(len(self.filter_convs)):
            residual = h
            h = torch.tanh(self.filter_convs[i](residual)) * torch.sigmoid(self.gate_convs[i](residual))
            s = self.skip_convs[i](h)
            skip = s if i == 0 else s + skip[..., -s.shape[-1]:]
            h = self.gconv[i](h, supports) + residual[..., -h.shape[-1]:]
            h = self.bn[i](h)
        out = self.end_conv_2(torch.relu(self.end_conv_1(torch.relu(skip))))
        return out  # (B, out_dim, N, 1): horizons on the channel axis

    def dead_weights(self) -> list[str]:
        """Names of the parameters no gradient reaches (see the module docstring)."""
        last = len(self.gconv) - 1
        dead = ("residual_convs.", f"gconv.{last}.", f"bn.{last}.")
        return [name for name, _ in self.named_parameters() if name.startswith(dead)]


_PUBLISHED = ("METR-LA",)


def config(dataset: str) -> dict:
    """Torch-MTS ``configs/GWNET.yaml`` (METRLA); unset keys take its trainer's defaults
    (early stop 10, eps 1e-8, decay 0.1, no clipping)."""
    dataset = configs.canonical_dataset(dataset)
    if dataset not in _PUBLISHED:
        raise ValueError(f"dataset: expected one of {list(_PUBLISHED)} for gwnet (spec gives no other), "
                         f"got {dataset!r}")
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, in_dim=2, out_dim=12, dropout=0.3, residual_channels=32,
                 dilation_channels=32, skip_channels=256, end_channels=512, kernel_size=2, blocks=4, layers=2)
    training = dict(batch_size=64, max_epochs=200, early_stop=10, lr=1e-3, eps=1e-8, weight_decay=1e-4,
                    milestones=[40], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return {"model": model, "training": training}


def build(model_args: dict, context=None, backend: str = "reference") -> GWNET:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for gwnet, got {backend!r}")
    adjacency = check_adjacency(getattr(context, "adjacency", None), model_args["num_nodes"], "gwnet")
    return GWNET(supports=double_transition(adjacency), **model_args)
