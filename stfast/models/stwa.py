"""ST-WA: spatio-temporal aware window attention with a stochastic latent (375,428 parameters on METR-LA).

Written from ``shared/specs/baselines.md`` section 12, which summarises the Torch-MTS port
(XDZhelheim/Torch-MTS:models/STWA.py, configs/STWA.yaml) that produced the HimNet efficiency
table's count. The model sees the speed only.

Shape of the computation, per layer: node-specific key/value weights are generated from a latent
``z = z_data + z_node`` (both reparameterised Gaussians); learnable proxies summarise each window of
``cut_size`` steps by temporal attention over ``[proxies; window]``, mix across nodes by spatial
attention, and are gated and summed into one step. Layers produce 12, 3 and 1 steps; a skip
projection of each feeds the output MLP.

Kept quirks of the source: layer 1 has 12 cuts of width 6 over a 12-step input, so cuts 3..12 see an
empty window and attend over their proxies only; the output MLP ignores ``output_dim`` (one value
per horizon step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import TORCH_MTS_DATASETS, for_dataset
from .spec import ModelSpec

SPEC = ModelSpec("stwa", x_channels=(0,))
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/STWA.yaml"

# (cuts, cut_size) of the three layers (Torch-MTS STWA); each layer outputs `cuts` steps.
LAYER_CUTS = ((12, 6), (3, 4), (1, 3))
NUM_HEADS = 8
SKIP_DIM = 256
END_DIM = 512
ESTIMATOR_HIDDEN = 32
GENERATOR_HIDDEN = (32, 5)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, sample: bool) -> torch.Tensor:
    """``mu + eps * exp(logvar / 2)`` when sampling; the mean otherwise.

    The source samples in evaluation too; the spec is silent, so evaluation uses the mean here to
    make predictions deterministic.
    """
    if not sample:
        return mu
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def apply_generated(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x (B, T, N, C) @ weight + bias`` with per-(sample, node) weights (B, N, C, C) or one shared (C, C)."""
    if weight.dim() == 2:
        return x @ weight + bias
    return torch.einsum("btnc,bncd->btnd", x, weight) + bias.unsqueeze(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the second-last axis; leading axes folded into 4-D for the fused kernels."""
    lead = q.shape[:-3]
    out = F.scaled_dot_product_attention(q.flatten(0, -4), k.flatten(0, -4), v.flatten(0, -4))
    return out.unflatten(0, lead)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, N, C) -> (B, heads, T, N, C / heads); head k holds channels [k*h, (k+1)*h)."""
    b, t, n, c = x.shape
    return x.reshape(b, t, n, num_heads, c // num_heads).permute(0, 3, 1, 2, 4)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, N, h) -> (B, T, N, heads * h)."""
    b, heads, t, n, h = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(b, t, n, heads * h)


class ParameterGenerator(nn.Module):
    """A (C x C) weight and a (C) bias per sample and node, generated from the latent by two MLPs."""

    def __init__(self, memory_size: int, channels: int, dynamic: bool):
        super().__init__()
        self.channels = channels
        self.dynamic = dynamic
        if dynamic:
            self.weight_generator = self._mlp(memory_size, channels * channels)
            self.bias_generator = self._mlp(memory_size, channels)
        else:
            self.weight = nn.Parameter(torch.rand(channels, channels))
            self.bias = nn.Parameter(torch.rand(channels))

    @staticmethod
    def _mlp(memory_size: int, out_features: int) -> nn.Sequential:
        hidden1, hidden2 = GENERATOR_HIDDEN
        return nn.Sequential(nn.Linear(memory_size, hidden1), nn.ReLU(), nn.Linear(hidden1, hidden2), nn.ReLU(),
                             nn.Linear(hidden2, out_features))

    def forward(self, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dynamic:
            return self.weight, self.bias
        weight = self.weight_generator(z).unflatten(-1, (self.channels, self.channels))
        return weight, self.bias_generator(z)


class TemporalAttention(nn.Module):
    """Queries (B, P, N, C) attend along time over tokens (B, S, N, C); keys/values use generated weights."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % NUM_HEADS:
            raise ValueError(f"channels: expected a multiple of {NUM_HEADS} heads, got {channels}")
        self.projection1 = nn.Linear(channels, channels)
        self.projection2 = nn.Linear(channels, channels)

    def forward(self, query, tokens, key_params, value_params):
        key = apply_generated(tokens, *key_params)
        value = apply_generated(tokens, *value_params)
        # heads then node before time: attention runs over the time axis of each node
        q, k, v = (split_heads(t, NUM_HEADS).transpose(2, 3) for t in (query, key, value))
        out = attention(q, k, v).transpose(2, 3)
        return self.projection2(torch.tanh(self.projection1(merge_heads(out))))


class SpatialAttention(nn.Module):
    """Each step's nodes attend to all nodes; the query is the input itself (no projection)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % NUM_HEADS:
            raise ValueError(f"channels: expected a multiple of {NUM_HEADS} heads, got {channels}")
        self.projection1 = nn.Linear(channels, channels)
        self.projection2 = nn.Linear(channels, channels)

    def forward(self, x, key_params, value_params):
        key = apply_generated(x, *key_params)
        value = apply_generated(x, *value_params)
        q, k, v = (split_heads(t, NUM_HEADS) for t in (x, key, value))
        out = attention(q, k, v)
        return self.projection2(torch.relu(self.projection1(merge_heads(out))))


class WindowAttentionLayer(nn.Module):
    """One ST-WA layer: ``cuts`` windows of ``cut_size`` steps, each summarised into one step."""

    def __init__(self, num_nodes: int, channels: int, cuts: int, cut_size: int, memory_size: int,
                 num_proxies: int = 2, dynamic: bool = True):
        super().__init__()
        self.cuts = cuts
        self.cut_size = cut_size
        self.num_proxies = num_proxies
        self.dynamic = dynamic
        self.proxies = nn.Parameter(torch.randn(1, cuts * num_proxies, num_nodes, channels))
        if dynamic:
            self.mu = nn.Parameter(torch.randn(num_nodes, memory_size))
            self.logvar = nn.Parameter(torch.randn(num_nodes, memory_size))
        self.temporal_att = TemporalAttention(channels)
        self.spatial_att = SpatialAttention(channels)
        self.temporal_parameter_generators = nn.ModuleList(
            [ParameterGenerator(memory_size, channels, dynamic) for _ in range(2)])
        self.spatial_parameter_generators = nn.ModuleList(
            [ParameterGenerator(memory_size, channels, dynamic) for _ in range(2)])
        self.aggregator = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels),
                                        nn.Sigmoid())

    def forward(self, x: torch.Tensor, z_data: torch.Tensor | None) -> torch.Tensor:
        z = z_data + reparameterize(self.mu, self.logvar, self.training) if self.dynamic else None
        temporal_params = [generator(z) for generator in self.temporal_parameter_generators]
        spatial_params = [generator(z) for generator in self.spatial_parameter_generators]
        batch = x.shape[0]
        out = 0.0
        steps = []
        for cut in range(self.cuts):
            # an empty slice past the input's end is the source's behaviour in layer 1 (kept)
            window = x[:, cut * self.cut_size:(cut + 1) * self.cut_size]
            proxies = self.proxies[:, cut * self.num_proxies:(cut + 1) * self.num_proxies]
            queries = proxies.expand(batch, -1, -1, -1) + out
            out = self.temporal_att(queries, torch.cat([queries, window], dim=1), *temporal_params)
            out = self.spatial_att(out, *spatial_params)
            out = (self.aggregator(out) * out).sum(dim=1, keepdim=True)
            steps.append(out)
        return torch.cat(steps, dim=1)


class STWA(nn.Module):
    def __init__(self, num_nodes: int, input_dim: int = 1, output_dim: int = 1, channels: int = 16,
                 dynamic: bool = True, lag: int = 12, horizon: int = 12, memory_size: int = 16):
        super().__init__()
        if output_dim != 1:
            raise ValueError(f"output_dim: expected 1 (ST-WA predicts one value per step), got {output_dim}")
        if lag < LAYER_CUTS[1][0] * LAYER_CUTS[1][1]:
            raise ValueError(f"lag: expected at least {LAYER_CUTS[1][0] * LAYER_CUTS[1][1]} steps, got {lag}")
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.lag = lag
        self.horizon = horizon
        self.dynamic = dynamic
        self.start_fc = nn.Linear(input_dim, channels)
        self.layers = nn.ModuleList([
            WindowAttentionLayer(num_nodes, channels, cuts, cut_size, memory_size, dynamic=dynamic)
            for cuts, cut_size in LAYER_CUTS])
        self.skip_layers = nn.ModuleList([nn.Linear(cuts * channels, SKIP_DIM) for cuts, _ in LAYER_CUTS])
        self.projections = nn.Sequential(nn.Linear(SKIP_DIM, END_DIM), nn.ReLU(), nn.Linear(END_DIM, horizon))
        if dynamic:
            self.mu_estimator = self._estimator(input_dim * lag, memory_size)
            self.logvar_estimator = self._estimator(input_dim * lag, memory_size)

    @staticmethod
    def _estimator(in_features: int, memory_size: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_features, ESTIMATOR_HIDDEN), nn.Tanh(),
                             nn.Linear(ESTIMATOR_HIDDEN, ESTIMATOR_HIDDEN), nn.Tanh(),
                             nn.Linear(ESTIMATOR_HIDDEN, memory_size))

    def data_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, memory_size) latent of each node's whole input window."""
        history = x.permute(0, 2, 3, 1).flatten(2)  # (B, N, C * lag), channel-major
        return reparameterize(self.mu_estimator(history), self.logvar_estimator(history), self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.lag, self.num_nodes, self.input_dim), floating=True)
        z_data = self.data_latent(x) if self.dynamic else None
        h = self.start_fc(x)
        batch = x.shape[0]
        skip = 0.0
        for layer, skip_layer in zip(self.layers, self.skip_layers):
            h = layer(h, z_data)
            skip = skip + skip_layer(h.transpose(1, 2).reshape(batch, self.num_nodes, -1))
        out = self.projections(torch.relu(skip))  # (B, N, horizon)
        return out.transpose(1, 2).unsqueeze(-1)


def config(dataset: str) -> dict:
    """XDZhelheim/Torch-MTS:configs/STWA.yaml: the same settings on all six datasets."""
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, input_dim=1, output_dim=1, channels=16, dynamic=True, lag=12,
                 horizon=12, memory_size=16)
    # Torch-MTS defaults fill what the YAML leaves out: Adam eps 1e-8, no weight decay.
    training = dict(batch_size=16, max_epochs=200, early_stop=15, lr=1e-3, eps=1e-8, weight_decay=0.0,
                    milestones=[], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, dict.fromkeys(TORCH_MTS_DATASETS, {}),
                       TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> STWA:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for stwa, got {backend!r}")
    return STWA(**model_args)
