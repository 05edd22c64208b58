"""STID (Shao et al., CIKM 2022): spatial and temporal identity embeddings plus an MLP.

Written from ``shared/specs/baselines.md`` section 4, which follows the HimNet authors' benchmark
framework XDZhelheim/Torch-MTS (``models/STID.py``, ``configs/STID.yaml`` section METRLA; original
model zezhishao/STID). METR-LA: 117,868 parameters. State-dict keys equal the published module's,
so its checkpoints load with ``strict=True``.

Each node's whole 12-step history of all three channels is flattened and embedded by a 1x1 conv,
then concatenated with a learnable node embedding and the time-of-day / day-of-week embedding rows
of the last input step; three residual MLP blocks and a 1x1 regression conv give the 12 horizons
on the channel axis. No graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import PUBLISHED, for_dataset, mark
from .spec import ModelSpec

__all__ = ["SPEC", "BACKENDS", "STID", "config", "build"]

SPEC = ModelSpec("stid", x_channels=(0, 1, 2))
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/STID.yaml"

_TOD, _DOW = 1, 2  # channel indices of x


class ResidualMLP(nn.Module):
    """``x + fc2(dropout(relu(fc1(x))))`` over channels-last ``(B, N, C)``; fc1 and fc2 are the published
    1x1 convs (their state-dict keys), applied as the matrix products they are."""

    def __init__(self, channels: int, dropout: float = 0.15):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.fc2 = nn.Conv2d(channels, channels, kernel_size=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + pointwise(self.fc2, self.drop(self.act(pointwise(self.fc1, x))))


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` on channels-last ``x (..., C_in)``: one GEMM, where ``Conv2d`` on ``(B, C, N, 1)``
    is a slower convolution (forward and, above all, backward) on both CPU and GPU."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class STID(nn.Module):
    def __init__(self, num_nodes: int, input_len: int = 12, output_len: int = 12, input_dim: int = 3,
                 embed_dim: int = 32, node_dim: int = 32, temp_dim_tid: int = 32, temp_dim_diw: int = 32,
                 time_of_day_size: int = 288, day_of_week_size: int = 7, num_layer: int = 3):
        super().__init__()
        if not 1 <= input_dim <= len(SPEC.x_channels):
            raise ValueError(f"input_dim: expected 1..{len(SPEC.x_channels)} (leading channels of x), got {input_dim}")
        self.num_nodes = num_nodes
        self.input_len = input_len
        self.output_len = output_len
        self.input_dim = input_dim
        self.time_of_day_size = time_of_day_size

        self.node_emb = nn.Parameter(torch.empty(num_nodes, node_dim))
        self.time_in_day_emb = nn.Parameter(torch.empty(time_of_day_size, temp_dim_tid))
        self.day_in_week_emb = nn.Parameter(torch.empty(day_of_week_size, temp_dim_diw))
        for table in (self.node_emb, self.time_in_day_emb, self.day_in_week_emb):
            nn.init.xavier_uniform_(table)

        self.time_series_emb_layer = nn.Conv2d(input_dim * input_len, embed_dim, kernel_size=1)
        hidden = embed_dim + node_dim + temp_dim_tid + temp_dim_diw
        self.encoder = nn.Sequential(*[ResidualMLP(hidden) for _ in range(num_layer)])
        self.regression_layer = nn.Conv2d(hidden, output_len, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.input_len, self.num_nodes, len(SPEC.x_channels)), floating=True)
        batch = x.shape[0]
        last = x[:, -1]  # (B, N, 3): the embeddings use the last input step only
        # int() truncation of tod * 288, as the published module does
        tod = self.time_in_day_emb[(last[..., _TOD] * self.time_of_day_size).long()]
        dow = self.day_in_week_emb[last[..., _DOW].long()]
        node = self.node_emb.expand(batch, -1, -1)

        # flatten each node's history time-major ([t0c0, t0c1, t0c2, t1c0, ...]) like the published module
        series = x[..., : self.input_dim].permute(0, 2, 1, 3).reshape(batch, self.num_nodes, -1)
        series = pointwise(self.time_series_emb_layer, series)

        hidden = torch.cat([series, node, tod, dow], dim=-1)  # (B, N, hidden), channels last
        out = pointwise(self.regression_layer, self.encoder(hidden))  # (B, N, output_len)
        return out.transpose(1, 2).unsqueeze(-1)  # (B, output_len, N, 1), the published output layout


# XDZhelheim/Torch-MTS configs/STID.yaml: what each dataset's section changes from METRLA's (the flow
# datasets train on masked MAE, not their default Huber loss).
_PUBLISHED = {"METR-LA": {}, "PEMS-BAY": {},
              **{name: {"training": {"loss": "masked_mae"}} for name in ("PEMS03", "PEMS04", "PEMS07", "PEMS08")}}


def config(dataset: str) -> dict:
    """Torch-MTS ``configs/STID.yaml`` per dataset; unset keys take its trainer's defaults (eps, clip).
    LargeST's runs on its four datasets."""
    dataset = configs.canonical_dataset(dataset)
    if dataset in configs.LARGEST_DATASETS:
        return mark(_largest_config(dataset), PUBLISHED, "liuxu77/LargeST experiments/stid")
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, input_len=12, output_len=12, input_dim=3, embed_dim=32, node_dim=32,
                 temp_dim_tid=32, temp_dim_diw=32, time_of_day_size=info.steps_per_day, day_of_week_size=7,
                 num_layer=3)
    training = dict(batch_size=32, max_epochs=200, early_stop=30, lr=0.002, eps=1e-8, weight_decay=1e-4,
                    milestones=[1, 50, 80], lr_decay_rate=0.5, clip_grad=0.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return for_dataset(dataset, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


def _largest_config(dataset: str) -> dict:
    """LargeST's STID run (liuxu77/LargeST ``experiments/stid/main.py`` and ``run.sh``, same on all four
    subsets): 4 layers, node dim 128, 96 time-of-day slots, batch 32, lr halved every 10 epochs."""
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, input_len=12, output_len=12, input_dim=3, embed_dim=32, node_dim=128,
                 temp_dim_tid=32, temp_dim_diw=32, time_of_day_size=info.steps_per_day, day_of_week_size=7, num_layer=4)
    training = dict(batch_size=32, max_epochs=100, early_stop=30, lr=2e-3, eps=1e-8, weight_decay=1e-4,
                    milestones=list(range(10, 100, 10)), lr_decay_rate=0.5, clip_grad=5.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return {"model": model, "training": training}


def build(model_args: dict, context=None, backend: str = "reference") -> STID:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for stid, got {backend!r}")
    return STID(**model_args)
