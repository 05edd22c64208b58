"""D2STGNN (Shao et al., VLDB 2022): decoupled diffusion / inherent signals with dynamic graphs.

Written from ``shared/specs/baselines.md`` section 17. Facts and hyper-parameters from
liuxu77/LargeST ``src/models/d2stgnn.py`` and ``experiments/d2stgnn/main.py``, RWLinno/ST-LoRA
``src/__init__.py`` (the ST-LoRA backbone), and the official METR-LA configuration
GestaltCogTeam/BasicTS ``baselines/D2STGNN/METR-LA.py`` (commit c5746bab). Original: zezhishao/D2STGNN.

Input ``(B, 12, N, 3)`` = [value, time of day in [0, 1), day of week 0..6]. The time of day indexes
a ``tpd x time_emb_dim`` table with ``int(tod * tpd)``. LargeST stores the day of week as ``dow / 7``
and indexes its table with ``int(dow * 7)``; stfast stores the integer 0..6, so it indexes the table
directly (the same row).

Parameters at N = 207: 391,962 with the BasicTS METR-LA setting (node_hidden 10, time_emb_dim 10,
tpd 288), 396,388 with LargeST's 12/12 and tpd 288, 394,084 with LargeST's defaults (12/12/96).
Weights that are in the count but never reach the output are kept (two never-called modules, named
``unused_*``, and the last layer's inherent backcast); :meth:`D2STGNN.unused_parameter_names` lists them.

The published curriculum learning on the horizon (BasicTS: one more output step every 6 epochs, no
warm-up; LargeST uses cl_epoch 3, warm_epoch 30) is a training-loop feature, not part of the module:
the config's ``curriculum="horizon", curriculum_epochs=6`` and ``stfast.training.step.curriculum_horizon``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .graph_ops import check_adjacency, double_transition
from .dataset_configs import for_dataset
from .spec import ModelSpec

__all__ = ["BACKENDS", "D2STGNN", "SPEC", "build", "config", "largest_model_args"]

SPEC = ModelSpec("d2stgnn", x_channels=(0, 1, 2), needs_graph=True)
BACKENDS = ("reference",)


def _without_self_loops(graph: torch.Tensor) -> torch.Tensor:
    n = graph.shape[-1]
    return graph * (1 - torch.eye(n, dtype=graph.dtype, device=graph.device))


def _powers_without_self_loops(graph: torch.Tensor, orders: int) -> torch.Tensor:
    """``[G, G^2, ..., G^orders]`` each with its diagonal zeroed, stacked on a new axis -3."""
    powers, power = [_without_self_loops(graph)], graph
    for _ in range(2, orders + 1):
        power = torch.matmul(power, graph)
        powers.append(_without_self_loops(power))
    return torch.stack(powers, dim=-3)


def _tile_over_kernel(graphs: torch.Tensor, k_t: int) -> torch.Tensor:
    """``(..., N, N)`` -> ``(..., N, k_t * N)``: each node reads every step of a k_t-step window."""
    *lead, n, m = graphs.shape
    return graphs.unsqueeze(-2).expand(*lead, n, k_t, m).reshape(*lead, n, k_t * m)


class ResidualDecomposition(nn.Module):
    """``LayerNorm(x - ReLU(backcast))``: removes what a block explained from its input."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, backcast: torch.Tensor) -> torch.Tensor:
        return self.norm(x - F.relu(backcast))


class EstimationGate(nn.Module):
    """Share of the signal that diffuses: sigmoid of an MLP on [tod, dow, E_u, E_d] per step and node."""

    def __init__(self, node_hidden: int, time_emb_dim: int, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(2 * node_hidden + 2 * time_emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, gate_features: torch.Tensor) -> torch.Tensor:
        # The MLP is pointwise, so gating only the last steps equals the published slice after the MLP.
        features = gate_features[:, -x.shape[1]:]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(features))))


class LocalizedSTConv(nn.Module):
    """Graph convolution over k_t-step windows: each node aggregates all nodes at all window steps."""

    def __init__(self, hidden: int, k_t: int, num_supports: int, dropout: float):
        super().__init__()
        self.k_t = k_t
        self.temporal_fc = nn.Linear(k_t * hidden, k_t * hidden, bias=False)
        self.graph_fc = nn.Linear(hidden * (num_supports + 1), hidden)
        # Dead weight: the published module registers this BatchNorm2d (64 parameters in the count)
        # and never calls it.
        self.unused_bn = nn.BatchNorm2d(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        """``x (B, L, N, D)``, ``supports (B, N, S, k_t * N)`` -> ``(B, L - k_t + 1, N, D)``."""
        windows = x.unfold(1, self.k_t, 1).transpose(-1, -2)  # (B, L', N, k_t, D)
        batch, steps, nodes, kernel, hidden = windows.shape
        h = F.relu(self.temporal_fc(windows.reshape(batch, steps, nodes, kernel * hidden)))
        h = h.view(batch, steps, nodes, kernel, hidden)
        self_term = h.mean(dim=-2)
        # All supports in one matmul: (B, N*S, k_t*N) @ (B, k_t*N, L'*D), window index k*N + m.
        window_nodes = h.permute(0, 3, 2, 1, 4).reshape(batch, kernel * nodes, steps * hidden)
        aggregated = torch.matmul(supports.flatten(1, 2), window_nodes)
        aggregated = aggregated.view(batch, nodes, -1, steps, hidden).permute(0, 3, 1, 2, 4).flatten(-2)
        return self.dropout(self.graph_fc(torch.cat([self_term, aggregated], dim=-1)))


class DiffusionBlock(nn.Module):
    def __init__(self, hidden: int, forecast_dim: int, k_t: int, num_supports: int, num_chunks: int,
                 dropout: float):
        super().__init__()
        self.k_t = k_t
        self.num_chunks = num_chunks
        self.conv = LocalizedSTConv(hidden, k_t, num_supports, dropout)
        self.forecast_fc = nn.Linear(hidden, forecast_dim)
        self.backcast_fc = nn.Linear(hidden, hidden)
        self.decompose = ResidualDecomposition(hidden)

    def _autoregress(self, gated: torch.Tensor, hidden: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        """One hidden state per future chunk; windows are topped up with the last gated inputs."""
        steps = [hidden[:, -1:]]
        for _ in range(self.num_chunks - 1):
            recent = steps[-self.k_t:]
            missing = self.k_t - len(recent)
            window = torch.cat(([gated[:, -missing:]] if missing else []) + recent, dim=1)
            steps.append(self.conv(window, supports))
        return torch.cat(steps, dim=1)

    def forward(self, x, gated, supports):
        hidden = self.conv(gated, supports)
        forecast = self.forecast_fc(self._autoregress(gated, hidden, supports))
        residual = self.decompose(x[:, -hidden.shape[1]:], self.backcast_fc(hidden))
        return residual, forecast


def _positional_encoding(length: int, hidden: int) -> torch.Tensor:
    """Sinusoidal encoding ``(length, 1, hidden)``: sin on even, cos on odd features."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float32) * (-math.log(10000.0) / hidden))
    encoding = torch.zeros(length, 1, hidden)
    encoding[:, 0, 0::2] = torch.sin(position * frequency)
    encoding[:, 0, 1::2] = torch.cos(position * frequency)
    return encoding


class InherentBlock(nn.Module):
    """GRU over time + positional encoding + self-attention along time, per node."""

    def __init__(self, hidden: int, forecast_dim: int, num_heads: int, num_chunks: int, max_steps: int,
                 dropout: float):
        super().__init__()
        self.num_chunks = num_chunks
        self.gru = nn.GRUCell(hidden, hidden)
        self.rnn_dropout = nn.Dropout(dropout)
        self.attention = nn.MultiheadAttention(hidden, num_heads, dropout=dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.position_dropout = nn.Dropout(dropout)
        self.register_buffer("positions", _positional_encoding(max_steps, hidden), persistent=False)
        self.forecast_fc = nn.Linear(hidden, forecast_dim)
        self.backcast_fc = nn.Linear(hidden, hidden)
        self.decompose = ResidualDecomposition(hidden)

    def _encode_positions(self, states: torch.Tensor) -> torch.Tensor:
        return self.position_dropout(states + self.positions[: states.shape[0]])

    def _attend(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attention_dropout(self.attention(query, memory, memory, need_weights=False)[0])

    def _recur(self, sequences: torch.Tensor) -> torch.Tensor:
        """``(B*N, L, D)`` -> GRU states ``(L, B*N, D)`` from a zero state."""
        state, states = torch.zeros_like(sequences[:, 0]), []
        for t in range(sequences.shape[1]):
            state = self.gru(sequences[:, t], state)
            states.append(state)
        return self.rnn_dropout(torch.stack(states, dim=0))

    def _autoregress(self, states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        steps = [attended[-1:]]
        for _ in range(self.num_chunks - 1):
            new_state = self.gru(steps[-1][0], states[-1]).unsqueeze(0)
            # As published: the encoding is added again to all states (already encoded ones included).
            states = self._encode_positions(torch.cat([states, new_state], dim=0))
            steps.append(self._attend(new_state, states))
        return torch.cat(steps, dim=0)

    def forward(self, x: torch.Tensor):
        batch, steps, nodes, hidden = x.shape
        states = self._encode_positions(self._recur(x.transpose(1, 2).reshape(batch * nodes, steps, hidden)))
        attended = self._attend(states, states)  # (L, B*N, D)
        future = self._autoregress(states, attended).reshape(-1, batch, nodes, hidden).transpose(0, 1)
        backcast = self.backcast_fc(attended.reshape(steps, batch, nodes, hidden).transpose(0, 1))
        return self.decompose(x, backcast), self.forecast_fc(future)


class DecoupledLayer(nn.Module):
    def __init__(self, hidden, forecast_dim, node_hidden, time_emb_dim, k_t, num_supports, num_chunks,
                 num_heads, max_steps, dropout):
        super().__init__()
        self.gate = EstimationGate(node_hidden, time_emb_dim)
        self.diffusion = DiffusionBlock(hidden, forecast_dim, k_t, num_supports, num_chunks, dropout)
        self.inherent = InherentBlock(hidden, forecast_dim, num_heads, num_chunks, max_steps, dropout)

    def forward(self, x, supports, gate_features):
        diffusion_residual, diffusion_forecast = self.diffusion(x, self.gate(x, gate_features), supports)
        inherent_residual, inherent_forecast = self.inherent(diffusion_residual)
        return inherent_residual, diffusion_forecast + inherent_forecast


class DynamicGraphLearner(nn.Module):
    """Two per-sample graphs from the input series, the last step's time embeddings and E_d / E_u."""

    def __init__(self, in_steps, hidden, node_hidden, time_emb_dim, k_s, k_t, dropout):
        super().__init__()
        self.k_s = k_s
        self.k_t = k_t
        self.hidden = hidden
        self.series_fc1 = nn.Linear(in_steps, 2 * hidden)
        self.series_bn = nn.BatchNorm1d(2 * hidden)
        self.series_fc2 = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        # Dead weight: registered by the published module (in the count), never called.
        self.unused_time_slot_fc = nn.Linear(time_emb_dim, hidden)
        features = hidden + node_hidden + 2 * time_emb_dim
        self.query = nn.Linear(features, hidden, bias=False)
        self.key = nn.Linear(features, hidden, bias=False)

    def _series_features(self, value: torch.Tensor) -> torch.Tensor:
        batch, steps, nodes = value.shape
        h = F.relu(self.series_fc1(value.transpose(1, 2).reshape(batch * nodes, steps)))
        return self.series_fc2(self.dropout(self.series_bn(h))).view(batch, nodes, self.hidden)

    def _similarities(self, value, tod_last, dow_last, node_embeddings) -> torch.Tensor:
        """Scaled dot-product softmax, one graph per node embedding: ``(B, 2, N, N)``."""
        shared = torch.cat([self._series_features(value), tod_last, dow_last], dim=-1)
        batch, nodes, _ = shared.shape
        modalities = node_embeddings.shape[0]
        features = torch.cat([shared.unsqueeze(1).expand(batch, modalities, nodes, -1),
                              node_embeddings.expand(batch, -1, -1, -1)], dim=-1)
        scores = self.query(features) @ self.key(features).transpose(-1, -2) / math.sqrt(self.hidden)
        return torch.softmax(scores, dim=-1)

    def forward(self, value, tod_last, dow_last, node_embeddings, masks) -> torch.Tensor:
        """-> ``(B, 2 * k_s, N, k_t * N)``, ordered (graph 0: orders 1..k_s, graph 1: orders 1..k_s)."""
        graphs = self._similarities(value, tod_last, dow_last, node_embeddings) * (masks + 1e-7)
        inverse_degree = 1.0 / graphs.sum(dim=-1, keepdim=True)
        graphs = graphs * torch.where(torch.isfinite(inverse_degree), inverse_degree, torch.zeros_like(inverse_degree))
        powers = _powers_without_self_loops(graphs, self.k_s)  # (B, 2, k_s, N, N)
        return _tile_over_kernel(powers.flatten(1, 2), self.k_t)


class D2STGNN(nn.Module):
    def __init__(self, num_nodes: int, transition_masks, in_steps: int = 12, out_steps: int = 12,
                 num_hidden: int = 32, node_hidden: int = 10, time_emb_dim: int = 10, tpd: int = 288,
                 num_layers: int = 5, k_t: int = 3, k_s: int = 2, gap: int = 3, num_heads: int = 4,
                 forecast_dim: int = 256, output_hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        if out_steps % gap:
            raise ValueError(f"gap: expected a divisor of out_steps={out_steps}, got {gap}")
        if in_steps < num_layers * (k_t - 1) + 1:
            raise ValueError(f"in_steps: expected at least num_layers * (k_t - 1) + 1 = {num_layers * (k_t - 1) + 1} "
                             f"(each layer's convolution drops k_t - 1 steps), got {in_steps}")
        masks = torch.as_tensor(np.asarray(transition_masks), dtype=torch.float32)
        if masks.shape != (2, num_nodes, num_nodes):
            raise ValueError(f"transition_masks: expected shape (2, {num_nodes}, {num_nodes}), "
                             f"got {tuple(masks.shape)}")
        self.num_nodes, self.in_steps, self.out_steps, self.gap = num_nodes, in_steps, out_steps, gap
        self.tpd, self.k_s, self.k_t = tpd, k_s, k_t
        num_chunks = out_steps // gap
        num_supports = (2 + 1) * k_s  # two dynamic graphs and the static one, orders 1..k_s each

        self.register_buffer("transition_masks", masks, persistent=False)
        self.embedding = nn.Linear(1, num_hidden)
        self.node_emb_u = nn.Parameter(torch.empty(num_nodes, node_hidden))
        self.node_emb_d = nn.Parameter(torch.empty(num_nodes, node_hidden))
        self.tod_emb = nn.Parameter(torch.empty(tpd, time_emb_dim))
        self.dow_emb = nn.Parameter(torch.empty(7, time_emb_dim))
        self.layers = nn.ModuleList(
            DecoupledLayer(num_hidden, forecast_dim, node_hidden, time_emb_dim, k_t, num_supports, num_chunks,
                           num_heads, in_steps + num_chunks, dropout)
            for _ in range(num_layers)
        )
        self.graph_learner = DynamicGraphLearner(in_steps, num_hidden, node_hidden, time_emb_dim, k_s, k_t, dropout)
        self.out_fc1 = nn.Linear(forecast_dim, output_hidden)
        self.out_fc2 = nn.Linear(output_hidden, gap)
        for table in (self.node_emb_u, self.node_emb_d, self.tod_emb, self.dow_emb):
            nn.init.xavier_uniform_(table)

    def unused_parameter_names(self) -> set[str]:
        """Parameters in the published count that never receive a gradient.

        The never-called BatchNorm2d of every localized convolution, the never-called time-slot Linear
        of the graph learner, and the last layer's inherent backcast (its residual feeds no later layer).
        """
        last = f"layers.{len(self.layers) - 1}.inherent"
        prefixes = [f"layers.{i}.diffusion.conv.unused_bn." for i in range(len(self.layers))]
        prefixes += ["graph_learner.unused_time_slot_fc.", f"{last}.backcast_fc.", f"{last}.decompose."]
        return {name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))}

    def _static_supports(self) -> torch.Tensor:
        # The published code names the embeddings crosswise here: softmax(ReLU(E_u E_d^T)) in our names.
        static = torch.softmax(F.relu(self.node_emb_u @ self.node_emb_d.T), dim=1)
        return _tile_over_kernel(_powers_without_self_loops(static, self.k_s), self.k_t)  # (k_s, N, k_t N)

    def _supports(self, value, tod, dow) -> torch.Tensor:
        """Dynamic then static supports (the published order), laid out ``(B, N, 3 * k_s, k_t * N)``."""
        node_embeddings = torch.stack([self.node_emb_d, self.node_emb_u])  # graph 0 reads E_d, graph 1 E_u
        dynamic = self.graph_learner(value, tod[:, -1], dow[:, -1], node_embeddings, self.transition_masks)
        static = self._static_supports().expand(value.shape[0], -1, -1, -1)
        return torch.cat([dynamic, static], dim=1).transpose(1, 2).contiguous()

    def _time_embeddings(self, x: torch.Tensor):
        tod = self.tod_emb[(x[..., 1] * self.tpd).long()]  # truncation, as published
        dow = self.dow_emb[x[..., 2].long()]  # stfast's integer day of week (LargeST: int(dow/7 * 7))
        return tod, dow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.in_steps, self.num_nodes, 3), floating=True)
        batch = x.shape[0]
        value = x[..., :1]
        tod, dow = self._time_embeddings(x)
        supports = self._supports(value[..., 0], tod, dow)
        node_embeddings = torch.cat([self.node_emb_u, self.node_emb_d], dim=-1).expand(batch, self.in_steps, -1, -1)
        gate_features = torch.cat([tod, dow, node_embeddings], dim=-1)

        h, forecast_hidden = self.embedding(value), 0
        for layer in self.layers:
            h, layer_forecast = layer(h, supports, gate_features)
            forecast_hidden = forecast_hidden + layer_forecast
        chunks = self.out_fc2(F.relu(self.out_fc1(F.relu(forecast_hidden))))  # (B, chunks, N, gap)
        out = chunks.transpose(1, 2).reshape(batch, self.num_nodes, self.out_steps)
        return out.transpose(1, 2).unsqueeze(-1)


def largest_model_args(num_nodes: int, tpd: int = 96) -> dict:
    """Model arguments of the LargeST / ST-LoRA D2STGNN (12/12 embeddings, dropout 0.1)."""
    return dict(num_nodes=num_nodes, in_steps=12, out_steps=12, num_hidden=32, node_hidden=12, time_emb_dim=12,
                tpd=tpd, num_layers=5, k_t=3, k_s=2, gap=3, num_heads=4, forecast_dim=256, output_hidden=512,
                dropout=0.1, transpose_masks=False)


def config(dataset: str) -> dict:
    """The official METR-LA configuration (GestaltCogTeam/BasicTS ``baselines/D2STGNN/METR-LA.py``);
    on other datasets the same hyper-parameters with the dataset's shape (marked as such).

    BasicTS trains 100 epochs without early stopping; its adjacency "doubletransition" is
    ``[(D^-1 A)^T, (D'^-1 A^T)^T]`` (``transpose_masks=True``), LargeST's is ``[D^-1 A, D'^-1 A^T]``.
    BasicTS's PEMS-BAY and PEMS0x files start the horizon curriculum after 30 warm-up epochs, which
    stfast's trainer does not do, so those are not offered as published.
    """
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, in_steps=12, out_steps=12, num_hidden=32, node_hidden=10, time_emb_dim=10,
                 tpd=info.steps_per_day, num_layers=5, k_t=3, k_s=2, gap=3, num_heads=4, forecast_dim=256,
                 output_hidden=512, dropout=0.1, transpose_masks=True)
    training = dict(batch_size=32, max_epochs=100, early_stop=0, lr=2e-3, eps=1e-8, weight_decay=1e-5,
                    milestones=[1, 30, 38, 46, 54, 62, 70, 80], lr_decay_rate=0.5, clip_grad=5.0, loss=info.loss,
                    in_steps=12, out_steps=12, curriculum="horizon", curriculum_epochs=6)
    return for_dataset(name, {"model": model, "training": training}, {"METR-LA": {}},
                       "GestaltCogTeam/BasicTS baselines/D2STGNN")


def build(model_args: dict, context=None, backend: str = "reference") -> D2STGNN:
    """``context.adjacency`` gives the two transition matrices that mask the dynamic graphs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for d2stgnn, got {backend!r}")
    args = dict(model_args)
    transpose = args.pop("transpose_masks", False)
    adjacency = check_adjacency(getattr(context, "adjacency", None), args["num_nodes"], "d2stgnn")
    masks = [m.T if transpose else m for m in double_transition(adjacency)]
    return D2STGNN(transition_masks=np.stack(masks), **args)
