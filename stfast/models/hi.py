"""HI, historical inertia: the last ``out_steps`` observed values are the forecast.

A zero-parameter sanity baseline: a trained model that does not beat it has learnt nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import PUBLISHED, mark
from .spec import ModelSpec

SPEC = ModelSpec("hi", x_channels=(0,))
BACKENDS = ("reference",)


class HistoricalInertia(nn.Module):
    def __init__(self, num_nodes: int, in_steps: int = 12, out_steps: int = 12, output_dim: int = 1):
        super().__init__()
        if out_steps > in_steps:
            raise ValueError(f"out_steps: expected at most in_steps={in_steps}, got {out_steps}")
        self.num_nodes = num_nodes
        self.in_steps = in_steps
        self.out_steps = out_steps
        self.output_dim = output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.in_steps, self.num_nodes, "C"), floating=True)
        return x[:, -self.out_steps:, :, : self.output_dim]


def config(dataset: str) -> dict:
    """Nothing to choose: the last observed value, repeated (the same on every dataset)."""
    return mark(configs.hi_config(dataset), PUBLISHED, "historical inertia: no hyper-parameters")


def build(model_args: dict, context=None, backend: str = "reference") -> HistoricalInertia:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for hi, got {backend!r}")
    return HistoricalInertia(**model_args)
