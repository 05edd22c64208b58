"""STGCN (Yu et al., IJCAI 2018), Chebyshev variant as the HimNet authors benchmark it.

Written from ``shared/specs/baselines.md`` section 5, which follows XDZhelheim/Torch-MTS
(``models/STGCN.py``, itself after hazdzz/STGCN, BasicTS and DL-Traff-Graph; ``configs/STGCN.yaml``
section METRLA). METR-LA: 246,028 parameters, of which 14,784 are dead weights (below).
State-dict keys equal the published module's, so its checkpoints load with ``strict=True``.

Structure "TGTND TGTND TNFF": two spatio-temporal blocks (gated temporal conv, Chebyshev graph conv,
ReLU, gated temporal conv, LayerNorm over (N, C), dropout) shorten time 12 -> 8 -> 4; the output
block's temporal conv (kernel 4) collapses time, then LayerNorm and two Linears give 12 horizons.
The graph operator is Torch-MTS's "normlap" ``I - D^-1/2 A^T D^-1/2`` (no rescaling), applied by
left multiplication over the node axis. Input: speed only.

Dead weights: every channel-alignment module registers a 1x1 conv, but only uses it when it has
to shrink channels (c_in > c_out); when it widens it zero-pads and when c_in == c_out it passes
through. Unused on METR-LA: 1->64 (128), 16->64 (1,088) twice, 64->64 (4,160), 64->128 (8,320)
= 14,784 parameters, kept because the published count includes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .graph_ops import check_adjacency, stgcn_normalized_laplacian
from .dataset_configs import for_dataset
from .spec import ModelSpec

__all__ = ["SPEC", "BACKENDS", "STGCN", "config", "build"]

SPEC = ModelSpec("stgcn", x_channels=(0,), needs_graph=True)
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/STGCN.yaml"


class Align(nn.Module):
    """Match ``c_in`` to ``c_out`` on ``(B, C, T, N)``: 1x1 conv to shrink, zero-padding to widen."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.align_conv = nn.Conv2d(c_in, c_out, kernel_size=1)  # dead weight unless c_in > c_out

    @property
    def uses_conv(self) -> bool:
        return self.c_in > self.c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_conv:
            return self.align_conv(x)
        if self.c_in < self.c_out:
            return F.pad(x, (0, 0, 0, 0, 0, self.c_out - self.c_in))
        return x


class TemporalGatedConv(nn.Module):
    """GLU temporal conv, no padding: ``(P + aligned input) * sigmoid(Q)``, time shrinks by ``Kt - 1``."""

    def __init__(self, Kt: int, c_in: int, c_out: int):
        super().__init__()
        self.Kt, self.c_out = Kt, c_out
        self.align = Align(c_in, c_out)
        self.causal_conv = nn.Conv2d(c_in, 2 * c_out, kernel_size=(Kt, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.align(x)[:, :, self.Kt - 1:]
        p, q = self.causal_conv(x).split(self.c_out, dim=1)
        return (p + residual) * torch.sigmoid(q)


class ChebGraphConv(nn.Module):
    """``sum_k T_k(L) X W_k + b`` with ``T_0 = I, T_1 = L, T_k = 2 L T_{k-1} - T_{k-2}``."""

    def __init__(self, channels: int, Ks: int, bias: bool = True):
        super().__init__()
        if Ks < 1:
            raise ValueError(f"Ks: expected a positive Chebyshev order, got {Ks}")
        self.weight = nn.Parameter(torch.empty(Ks, channels, channels))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            # torch's fan-in of a (Ks, c_in, c_out) tensor is c_in * c_out; the published init uses it
            fan_in = self.weight.shape[1] * self.weight.shape[2]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, gso: torch.Tensor) -> torch.Tensor:
        """``x (B, T, N, C)`` -> ``(B, T, N, C)``."""
        terms = [x]
        if len(self.weight) > 1:
            terms.append(torch.einsum("hi,btic->bthc", gso, x))
        for _ in range(2, len(self.weight)):
            terms.append(2 * torch.einsum("hi,btic->bthc", gso, terms[-1]) - terms[-2])
        out = torch.einsum("bktnc,kcd->btnd", torch.stack(terms, dim=1), self.weight)
        return out if self.bias is None else out + self.bias


class GraphConvLayer(nn.Module):
    """Align to ``c_out``, Chebyshev graph conv, plus the aligned input."""

    def __init__(self, c_in: int, c_out: int, Ks: int, bias: bool):
        super().__init__()
        self.align = Align(c_in, c_out)
        self.cheb_graph_conv = ChebGraphConv(c_out, Ks, bias)

    def forward(self, x: torch.Tensor, gso: torch.Tensor) -> torch.Tensor:
        aligned = self.align(x)  # (B, C, T, N)
        out = self.cheb_graph_conv(aligned.permute(0, 2, 3, 1), gso).permute(0, 3, 1, 2)
        return out + aligned


class STConvBlock(nn.Module):
    def __init__(self, Kt: int, Ks: int, num_nodes: int, c_in: int, channels, bias: bool, dropout: float):
        super().__init__()
        self.tmp_conv1 = TemporalGatedConv(Kt, c_in, channels[0])
        self.graph_conv = GraphConvLayer(channels[0], channels[1], Ks, bias)
        self.tmp_conv2 = TemporalGatedConv(Kt, channels[1], channels[2])
        self.tc2_ln = nn.LayerNorm([num_nodes, channels[2]])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, gso: torch.Tensor) -> torch.Tensor:
        x = self.tmp_conv2(torch.relu(self.graph_conv(self.tmp_conv1(x), gso)))
        x = self.tc2_ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.dropout(x)


class OutputBlock(nn.Module):
    """Temporal conv over the remaining ``Ko`` steps, LayerNorm, Linear, ReLU, Linear.

    The published block also registers a dropout it never applies; it has no weights, so it is left out.
    """

    def __init__(self, Ko: int, c_in: int, channels, end_channel: int, num_nodes: int, bias: bool):
        super().__init__()
        self.tmp_conv1 = TemporalGatedConv(Ko, c_in, channels[0])
        self.tc1_ln = nn.LayerNorm([num_nodes, channels[0]])
        self.fc1 = nn.Linear(channels[0], channels[1], bias=bias)
        self.fc2 = nn.Linear(channels[1], end_channel, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Ko, N)`` -> ``(B, 1, N, end_channel)``."""
        x = self.tc1_ln(self.tmp_conv1(x).permute(0, 2, 3, 1))
        return self.fc2(torch.relu(self.fc1(x)))


class STGCN(nn.Module):
    def __init__(self, num_nodes: int, gso, Kt: int = 3, Ks: int = 3, blocks=None, T: int = 12,
                 bias: bool = True, dropout: float = 0.5):
        super().__init__()
        blocks = [[1], [64, 16, 64], [64, 16, 64], [128, 128], [12]] if blocks is None else blocks
        if list(blocks[0]) != [len(SPEC.x_channels)]:
            raise ValueError(f"blocks: expected the input block [{len(SPEC.x_channels)}] (speed only), got {blocks[0]}")
        num_st = len(blocks) - 3
        Ko = T - num_st * 2 * (Kt - 1)
        if Ko < 1:
            raise ValueError(f"T: expected more than {num_st * 2 * (Kt - 1)} input steps for {num_st} blocks "
                             f"with Kt={Kt}, got {T}")
        self.num_nodes, self.T = num_nodes, T
        self.register_buffer("gso", torch.as_tensor(gso, dtype=torch.float32), persistent=False)
        self.st_blocks = nn.ModuleList(
            STConvBlock(Kt, Ks, num_nodes, blocks[i][-1], blocks[i + 1], bias, dropout) for i in range(num_st))
        self.output = OutputBlock(Ko, blocks[-3][-1], blocks[-2], blocks[-1][0], num_nodes, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.T, self.num_nodes, len(SPEC.x_channels)), floating=True)
        h = x.permute(0, 3, 1, 2)  # (B, C, T, N)
        for block in self.st_blocks:
            h = block(h, self.gso)
        out = self.output(h)  # (B, 1, N, 12): horizons on the last axis
        return out.permute(0, 3, 2, 1)

    def dead_weights(self) -> list[str]:
        """Names of the registered parameters that forward never uses (alignment convs)."""
        return [f"{name}.align_conv.{p}" for name, m in self.named_modules()
                if isinstance(m, Align) and not m.uses_conv for p in ("weight", "bias")]


# XDZhelheim/Torch-MTS configs/STGCN.yaml: what each dataset's section changes from METRLA's.
_PUBLISHED = {"METR-LA": {}, **{name: {"training": {"milestones": [30, 50]}}
                                for name in ("PEMS-BAY", "PEMS03", "PEMS04", "PEMS07", "PEMS08")}}


def config(dataset: str) -> dict:
    """Torch-MTS ``configs/STGCN.yaml`` per dataset; unset keys take its trainer's defaults (eps, decay 0.1)."""
    dataset = configs.canonical_dataset(dataset)
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, Kt=3, Ks=3, blocks=[[1], [64, 16, 64], [64, 16, 64], [128, 128], [12]],
                 T=12, bias=True, dropout=0.5)
    training = dict(batch_size=64, max_epochs=200, early_stop=20, lr=1e-3, eps=1e-8, weight_decay=1e-4,
                    milestones=[50], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(dataset, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> STGCN:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for stgcn, got {backend!r}")
    adjacency = check_adjacency(getattr(context, "adjacency", None), model_args["num_nodes"], "stgcn")
    return STGCN(gso=stgcn_normalized_laplacian(adjacency), **model_args)
