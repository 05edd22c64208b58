"""ST-Norm (Deng et al., KDD 2021): a WaveNet-style gated TCN with temporal and spatial normalisation.

Written from ``shared/specs/baselines.md`` section 7, which follows XDZhelheim/Torch-MTS
(``models/STNorm.py``, ``configs/STNorm.yaml`` and the METR-LA log of 2024-04-22, whose printed
config gives the accuracy-run settings; original JLDeng/ST-Norm). METR-LA: 223,756 parameters.
State-dict keys equal the published module's, so its checkpoints load with ``strict=True``.

Input speed + time of day, left-padded in time to the receptive field (13). Each of the 8 layers
(4 blocks x dilations 1, 2) concatenates ``[x, TNorm(x), SNorm(x)]`` on channels, applies a gated
dilated conv (tanh filter times sigmoid gate), adds a skip 1x1 conv into the skip path and a
residual 1x1 conv plus the input to the next layer. No graph.

Dead weight: the last layer's residual conv (``residual_convs.7``, 1,056 parameters) runs, as in
the published forward, but its output is discarded (the head reads only the skip path), so no
gradient reaches it. It is kept because the published count includes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import for_dataset
from .spec import ModelSpec

__all__ = ["SPEC", "BACKENDS", "TNorm", "SNorm", "STNorm", "config", "build"]

SPEC = ModelSpec("stnorm", x_channels=(0, 1))
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/STNorm.yaml"

_EPS = 1e-5


class SNorm(nn.Module):
    """Per (sample, channel, time): normalise across nodes (unbiased variance), per-channel affine."""

    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(channels))
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, N, T)``."""
        mean = x.mean(2, keepdim=True)
        var = x.var(2, keepdim=True, unbiased=True)
        x_norm = (x - mean) / (var + _EPS) ** 0.5
        return x_norm * self.gamma[:, None, None] + self.beta[:, None, None]


class TNorm(nn.Module):
    """Per (channel, node): normalise over batch and time, BatchNorm-like running statistics.

    Training normalises with the batch's biased variance and updates the running variance with the
    unbiased one (factor n / (n - 1), n = B * T); eval uses the running statistics.
    """

    def __init__(self, num_nodes: int, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.beta = nn.Parameter(torch.zeros(1, channels, num_nodes, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, num_nodes, 1))
        self.register_buffer("running_mean", torch.zeros(1, channels, num_nodes, 1))
        self.register_buffer("running_var", torch.ones(1, channels, num_nodes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, N, T)``."""
        if self.training:
            mean = x.mean((0, 3), keepdim=True)
            var = x.var((0, 3), keepdim=True, unbiased=False)
            self._update_running_stats(mean, var, n=x.shape[0] * x.shape[3])
        else:
            mean, var = self.running_mean, self.running_var
        x_norm = (x - mean) / (var + _EPS) ** 0.5
        return x_norm * self.gamma + self.beta

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        # n == 1 (one sample, one step) has no unbiased variance; the published module divides by zero
        unbiased = var * n / (n - 1) if n > 1 else var
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(unbiased, self.momentum)


class STNorm(nn.Module):
    def __init__(self, num_nodes: int, tnorm_bool: bool = True, snorm_bool: bool = True, in_dim: int = 2,
                 out_dim: int = 12, channels: int = 32, kernel_size: int = 2, blocks: int = 4, layers: int = 2):
        super().__init__()
        if in_dim != len(SPEC.x_channels):
            raise ValueError(f"in_dim: expected {len(SPEC.x_channels)} (speed, time of day), got {in_dim}")
        self.num_nodes, self.in_dim = num_nodes, in_dim
        self.tnorm_bool, self.snorm_bool = tnorm_bool, snorm_bool
        views = 1 + int(tnorm_bool) + int(snorm_bool)

        self.start_conv = nn.Conv2d(in_dim, channels, kernel_size=1)
        if tnorm_bool:
            self.tn = nn.ModuleList()
        if snorm_bool:
            self.sn = nn.ModuleList()
        self.filter_convs, self.gate_convs = nn.ModuleList(), nn.ModuleList()
        self.residual_convs, self.skip_convs = nn.ModuleList(), nn.ModuleList()
        self.receptive_field = 1
        for _ in range(blocks):
            for dilation in (2 ** i for i in range(layers)):
                if tnorm_bool:
                    self.tn.append(TNorm(num_nodes, channels))
                if snorm_bool:
                    self.sn.append(SNorm(channels))
                self.filter_convs.append(nn.Conv2d(views * channels, channels, (1, kernel_size), dilation=dilation))
                self.gate_convs.append(nn.Conv2d(views * channels, channels, (1, kernel_size), dilation=dilation))
                self.residual_convs.append(nn.Conv2d(channels, channels, kernel_size=1))
                self.skip_convs.append(nn.Conv2d(channels, channels, kernel_size=1))
                self.receptive_field += dilation * (kernel_size - 1)

        self.end_conv_1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.end_conv_2 = nn.Conv2d(channels, out_dim, kernel_size=1)

    def normalised_views(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """``[h, TNorm(h), SNorm(h)]`` (those switched on) on the channel axis."""
        views = [h]
        if self.tnorm_bool:
            views.append(self.tn[i](h))
        if self.snorm_bool:
            views.append(self.sn[i](h))
        return torch.cat(views, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", "T_in", self.num_nodes, self.in_dim), floating=True)
        if x.shape[1] > self.receptive_field:
            raise ValueError(f"x: expected at most {self.receptive_field} input steps (the receptive field), "
                             f"got {x.shape[1]}")
        h = F.pad(x.permute(0, 3, 2, 1), (self.receptive_field - x.shape[1], 0))  # (B, C, N, 13)
        h = self.start_conv(h)
        skip = 0
        for i in range(len(self.filter_convs)):
            residual = h
            views = self.normalised_views(i, h)
            h = torch.tanh(self.filter_convs[i](views)) * torch.sigmoid(self.gate_convs[i](views))
            s = self.skip_convs[i](h)
            skip = s if i == 0 else s + skip[..., -s.shape[-1]:]
            h = self.residual_convs[i](h) + residual[..., -h.shape[-1]:]
        out = self.end_conv_2(torch.relu(self.end_conv_1(torch.relu(skip))))
        return out  # (B, out_dim, N, 1): horizons on the channel axis

    def dead_weights(self) -> list[str]:
        """Names of the parameters no gradient reaches (see the module docstring)."""
        last = f"residual_convs.{len(self.residual_convs) - 1}."
        return [name for name, _ in self.named_parameters() if name.startswith(last)]


# XDZhelheim/Torch-MTS configs/STNorm.yaml: what each dataset's section changes from METRLA's.
_PUBLISHED = {"METR-LA": {}, "PEMS-BAY": {},
              **{name: {"training": {"lr": 0.01}} for name in ("PEMS03", "PEMS04", "PEMS07", "PEMS08")}}


def config(dataset: str) -> dict:
    """Torch-MTS ``configs/STNorm.yaml`` per dataset (METR-LA: as the 2024-04-22 run's log prints it);
    unset keys take the trainer's defaults (early stop 10, eps 1e-8, decay 0.1)."""
    dataset = configs.canonical_dataset(dataset)
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, tnorm_bool=True, snorm_bool=True, in_dim=2, out_dim=12, channels=32,
                 kernel_size=2, blocks=4, layers=2)
    training = dict(batch_size=64, max_epochs=200, early_stop=10, lr=1e-3, eps=1e-8, weight_decay=1e-4,
                    milestones=[10, 30], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(dataset, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> STNorm:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for stnorm, got {backend!r}")
    return STNorm(**model_args)
