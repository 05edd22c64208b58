"""STAEformer (Liu et al., CIKM 2023): a vanilla transformer on spatio-temporal adaptive embeddings.

Written from ``shared/specs/baselines.md`` section 15. Facts and hyper-parameters from
XDZhelheim/STAEformer ``model/STAEformer.yaml`` (METR-LA) and XDZhelheim/Torch-MTS
``models/STAEformer.py`` / ``configs/STAEformer.yaml``; also ST-LoRA's "STAE" backbone.

Input ``(B, 12, N, 3)`` = [value, time of day in [0, 1), day of week 0..6]. The input projection
sees all three raw channels (``input_dim`` 3 in the published config), the time of day indexes a
``steps_per_day`` table with ``int(tod * steps_per_day)`` and the day of week indexes a 7-row table
with the integer itself (stfast's convention, the same as Torch-MTS's). With an adaptive embedding
``(T, N, 80)`` the model dimension is 152; 3 post-norm layers attend along time, then 3 across
nodes; a mixed projection maps each node's ``T x 152`` features to the horizon.
Parameters at N = 207: 1,258,980 (1,372,260 at N = 325).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import for_dataset
from .spec import ModelSpec

__all__ = ["BACKENDS", "SPEC", "STAEformer", "build", "config"]

SPEC = ModelSpec("staeformer", x_channels=(0, 1, 2))
BACKENDS = ("reference",)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention along the second-to-last axis of ``(..., L, D)``; no attention dropout."""

    def __init__(self, model_dim: int, num_heads: int):
        super().__init__()
        if model_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of model_dim={model_dim}, got {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(model_dim, model_dim)
        self.key = nn.Linear(model_dim, model_dim)
        self.value = nn.Linear(model_dim, model_dim)
        self.out = nn.Linear(model_dim, model_dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # (..., H, L, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.out(attended.transpose(-3, -2).flatten(-2))


class SelfAttentionLayer(nn.Module):
    """Post-norm transformer layer: attention and a ReLU FFN, each with dropout, residual, LayerNorm."""

    def __init__(self, model_dim: int, feed_forward_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention = MultiHeadSelfAttention(model_dim, num_heads)
        self.feed_forward = nn.Sequential(
            nn.Linear(model_dim, feed_forward_dim), nn.ReLU(), nn.Linear(feed_forward_dim, model_dim)
        )
        self.norm1 = nn.LayerNorm(model_dim)
        self.norm2 = nn.LayerNorm(model_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        x = x.transpose(axis, -2)
        x = self.norm1(x + self.dropout1(self.attention(x)))
        x = self.norm2(x + self.dropout2(self.feed_forward(x)))
        return x.transpose(axis, -2)


class STAEformer(nn.Module):
    def __init__(self, num_nodes: int, in_steps: int = 12, out_steps: int = 12, steps_per_day: int = 288,
                 input_dim: int = 3, output_dim: int = 1, input_embedding_dim: int = 24,
                 tod_embedding_dim: int = 24, dow_embedding_dim: int = 24, adaptive_embedding_dim: int = 80,
                 feed_forward_dim: int = 256, num_heads: int = 4, num_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        if not 1 <= input_dim <= 3:
            raise ValueError(f"input_dim: expected 1, 2 or 3 raw channels to project, got {input_dim}")
        self.num_nodes = num_nodes
        self.in_steps = in_steps
        self.out_steps = out_steps
        self.steps_per_day = steps_per_day
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.model_dim = input_embedding_dim + tod_embedding_dim + dow_embedding_dim + adaptive_embedding_dim

        self.input_proj = nn.Linear(input_dim, input_embedding_dim)
        self.tod_embedding = nn.Embedding(steps_per_day, tod_embedding_dim)
        self.dow_embedding = nn.Embedding(7, dow_embedding_dim)
        self.adaptive_embedding = nn.Parameter(torch.empty(in_steps, num_nodes, adaptive_embedding_dim))
        nn.init.xavier_uniform_(self.adaptive_embedding)
        self.temporal_layers = self._stack(num_layers, feed_forward_dim, num_heads, dropout)
        self.spatial_layers = self._stack(num_layers, feed_forward_dim, num_heads, dropout)
        self.output_proj = nn.Linear(in_steps * self.model_dim, out_steps * output_dim)

    def _stack(self, num_layers, feed_forward_dim, num_heads, dropout) -> nn.ModuleList:
        return nn.ModuleList(
            SelfAttentionLayer(self.model_dim, feed_forward_dim, num_heads, dropout) for _ in range(num_layers)
        )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        tod_index = (x[..., 1] * self.steps_per_day).long()  # truncation, as published
        dow_index = x[..., 2].long()
        adaptive = self.adaptive_embedding.expand(x.shape[0], *self.adaptive_embedding.shape)
        features = [self.input_proj(x[..., : self.input_dim]), self.tod_embedding(tod_index),
                    self.dow_embedding(dow_index), adaptive]
        return torch.cat(features, dim=-1)  # (B, T, N, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.in_steps, self.num_nodes, 3), floating=True)
        h = self._embed(x)
        for layer in self.temporal_layers:
            h = layer(h, axis=1)
        for layer in self.spatial_layers:
            h = layer(h, axis=2)
        batch = x.shape[0]
        per_node = h.transpose(1, 2).reshape(batch, self.num_nodes, self.in_steps * self.model_dim)
        out = self.output_proj(per_node).view(batch, self.num_nodes, self.out_steps, self.output_dim)
        return out.transpose(1, 2)


# XDZhelheim/STAEformer model/STAEformer.yaml: what each dataset's section changes from METRLA's.
_PUBLISHED = {
    "METR-LA": {},
    "PEMS-BAY": {"training": {"weight_decay": 1e-4, "milestones": [10, 30], "max_epochs": 300, "early_stop": 20}},
    "PEMS03": {"training": {"weight_decay": 5e-4, "milestones": [15, 30, 40], "max_epochs": 300, "early_stop": 20}},
    "PEMS04": {"training": {"weight_decay": 5e-4, "milestones": [15, 30, 50], "max_epochs": 300, "early_stop": 20}},
    "PEMS07": {"training": {"weight_decay": 1e-3, "milestones": [15, 35, 50], "max_epochs": 300, "early_stop": 20}},
    "PEMS08": {"training": {"weight_decay": 1.5e-3, "milestones": [25, 45, 65], "max_epochs": 300}},
}


def config(dataset: str) -> dict:
    """The official configuration (XDZhelheim/STAEformer ``model/STAEformer.yaml``), per dataset."""
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, in_steps=12, out_steps=12, steps_per_day=info.steps_per_day, input_dim=3,
                 output_dim=1, input_embedding_dim=24, tod_embedding_dim=24, dow_embedding_dim=24,
                 adaptive_embedding_dim=80, feed_forward_dim=256, num_heads=4, num_layers=3, dropout=0.1)
    # clip_grad is commented out in the official yaml; eps is the Torch-MTS / Adam default.
    training = dict(batch_size=16, max_epochs=200, early_stop=30, lr=1e-3, eps=1e-8, weight_decay=3e-4,
                    milestones=[20, 30], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, _PUBLISHED,
                       "XDZhelheim/STAEformer model/STAEformer.yaml")


def build(model_args: dict, context=None, backend: str = "reference") -> STAEformer:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for staeformer, got {backend!r}")
    return STAEformer(**model_args)
