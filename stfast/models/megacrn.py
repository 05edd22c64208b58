"""MegaCRN (Jiang et al., AAAI 2023) in the zoo: a meta-graph learnt from a memory bank, GCRU seq2seq.

Written from ``shared/specs/baselines.md`` section 11 (sources there: XDZhelheim/Torch-MTS
models/MegaCRN.py, runners/MegaCRNRunner.py, lib/losses.py (MegaCRNLoss), configs/MegaCRN.yaml;
originally deepkashiwa20/MegaCRN). METR-LA: 388,761 parameters.

- Memory ``M (mem_num, mem_dim)``, query projection ``Wq (rnn_units, mem_dim)``, ``We1, We2
  (N, mem_num)``, all Xavier-normal. ``E1 = We1 M``, ``E2 = We2 M``; supports
  ``g1 = softmax(relu(E1 E2^T))``, ``g2 = softmax(relu(E2 E1^T))`` (row-wise).
- Graph convolution with one shared weight: per support the Chebyshev terms ``[I, g, 2 g T_1 - I,
  ...]`` (``cheb_k`` of them), support-major, concatenated on channels -> ``(2 * cheb_k * C, O)``.
- Encoder: GCRU (AGCRN gating) over the input speed; the last hidden state queries the memory;
  the decoder (``rnn_units + mem_dim`` units) starts from ``[h, memory value]`` and steps on
  ``[previous output, future time of day]`` with scheduled sampling (tau = 2000).
- Auxiliary loss (training only): ``0.01 * triplet(q, pos, neg; margin 1) + 0.01 * MSE(q, pos)``,
  ``pos``/``neg`` = the most / second most attended memory rows, detached.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dcgru import sampling_threshold
from .dataset_configs import TORCH_MTS_DATASETS, for_dataset
from .spec import ModelSpec

SPEC = ModelSpec("megacrn", x_channels=(0,), takes_y_cov=True, y_cov_channels=(0,), teacher_forcing=True)
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/MegaCRN.yaml"

SEPARATE_LOSS_WEIGHT = 0.01  # triplet margin loss
COMPACT_LOSS_WEIGHT = 0.01  # MSE between query and its nearest memory row


def chebyshev_propagate(x: torch.Tensor, supports: list[torch.Tensor], cheb_k: int) -> torch.Tensor:
    """``cat([T_k(g) x for g in supports for k < cheb_k], -1)`` with ``T_0 = I, T_1 = g,
    T_k = 2 g T_{k-1} - T_{k-2}``, computed on the features (``T_k x``) instead of the matrices."""
    terms = []
    for g in supports:
        ks = [x, g @ x][:cheb_k]
        for _ in range(2, cheb_k):
            ks.append(2 * (g @ ks[-1]) - ks[-2])
        terms.extend(ks)
    return torch.cat(terms, dim=-1)


class SharedGraphConv(nn.Module):
    """``chebyshev_propagate(x) @ W + b`` with one weight for all nodes (Xavier-normal W, zero b)."""

    def __init__(self, input_dim: int, output_dim: int, cheb_k: int, num_supports: int = 2):
        super().__init__()
        self.cheb_k = cheb_k
        self.weights = nn.Parameter(torch.empty(num_supports * cheb_k * input_dim, output_dim))
        self.bias = nn.Parameter(torch.zeros(output_dim))
        nn.init.xavier_normal_(self.weights)

    def forward(self, x, supports):
        return chebyshev_propagate(x, supports, self.cheb_k) @ self.weights + self.bias


class GCRUCell(nn.Module):
    """AGCRN-style gating: ``z, r = sigma(gate([x, h]))``, ``h' = r h + (1 - r) tanh(update([x, z h]))``."""

    def __init__(self, input_dim: int, hidden_dim: int, cheb_k: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate = SharedGraphConv(input_dim + hidden_dim, 2 * hidden_dim, cheb_k)
        self.update = SharedGraphConv(input_dim + hidden_dim, hidden_dim, cheb_k)

    def forward(self, x, state, supports):
        z, r = torch.split(torch.sigmoid(self.gate(torch.cat([x, state], dim=-1), supports)), self.hidden_dim, dim=-1)
        candidate = torch.tanh(self.update(torch.cat([x, z * state], dim=-1), supports))
        return r * state + (1 - r) * candidate


def _cell_stack(input_dim, hidden_dim, cheb_k, num_layers) -> nn.ModuleList:
    dims = [input_dim] + [hidden_dim] * (num_layers - 1)
    return nn.ModuleList(GCRUCell(d, hidden_dim, cheb_k) for d in dims)


class MegaCRN(nn.Module):
    """``forward(x (B, T_in, N, input_dim), y_cov (B, >=horizon, N, ycov_dim), labels=None, batches_seen=None)
    -> (B, horizon, N, output_dim)``; ``labels`` (scaled) and ``batches_seen`` while training with teacher forcing.
    """

    def __init__(self, num_nodes, input_dim=1, output_dim=1, horizon=12, rnn_units=64, num_layers=1, cheb_k=3,
                 ycov_dim=1, mem_num=20, mem_dim=64, tf_decay_steps=2000, use_teacher_forcing=True):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.horizon = horizon
        self.rnn_units = rnn_units
        self.ycov_dim = ycov_dim
        self.tf_decay_steps = tf_decay_steps
        self.use_teacher_forcing = use_teacher_forcing
        self.memory = nn.ParameterDict({
            "Memory": nn.Parameter(torch.empty(mem_num, mem_dim)),
            "Wq": nn.Parameter(torch.empty(rnn_units, mem_dim)),
            "We1": nn.Parameter(torch.empty(num_nodes, mem_num)),
            "We2": nn.Parameter(torch.empty(num_nodes, mem_num)),
        })
        for p in self.memory.values():
            nn.init.xavier_normal_(p)
        self.encoder = _cell_stack(input_dim, rnn_units, cheb_k, num_layers)
        self.decoder = _cell_stack(output_dim + ycov_dim, rnn_units + mem_dim, cheb_k, num_layers)
        self.proj = nn.Linear(rnn_units + mem_dim, output_dim)
        self._auxiliary_loss = None

    @property
    def teacher_forcing_active(self) -> bool:
        return self.training and self.use_teacher_forcing

    def check_inputs(self, x, y_cov, labels, batches_seen) -> None:
        check_tensor("x", x, ("B", "T_in", self.num_nodes, self.input_dim), floating=True)
        check_tensor("y_cov", y_cov, (x.shape[0], "T_out", self.num_nodes, self.ycov_dim), floating=True)
        if y_cov.shape[1] < self.horizon:
            raise ValueError(f"y_cov: expected at least horizon={self.horizon} steps, got {y_cov.shape[1]}")
        if not self.teacher_forcing_active:
            return
        if labels is None or batches_seen is None:
            raise ValueError("labels and batches_seen: required while training with teacher forcing, got None")
        check_tensor("labels", labels, (x.shape[0], self.horizon, self.num_nodes, self.output_dim), floating=True)

    def meta_graphs(self) -> list[torch.Tensor]:
        e1 = self.memory["We1"] @ self.memory["Memory"]
        e2 = self.memory["We2"] @ self.memory["Memory"]
        return [torch.softmax(F.relu(e1 @ e2.t()), dim=-1), torch.softmax(F.relu(e2 @ e1.t()), dim=-1)]

    def query_memory(self, h: torch.Tensor):
        """``(value, query, pos, neg)``, each ``(B, N, mem_dim)``."""
        memory = self.memory["Memory"]
        query = h @ self.memory["Wq"]
        attention = torch.softmax(query @ memory.t(), dim=-1)
        top2 = torch.topk(attention, k=2, dim=-1).indices
        return attention @ memory, query, memory[top2[..., 0]], memory[top2[..., 1]]

    def encode(self, x, supports) -> torch.Tensor:
        layer_input = x
        for cell in self.encoder:
            state = x.new_zeros(x.shape[0], self.num_nodes, self.rnn_units)
            outputs = []
            for t in range(x.shape[1]):
                state = cell(layer_input[:, t], state, supports)
                outputs.append(state)
            layer_input = torch.stack(outputs, dim=1)
        return layer_input[:, -1]

    def decode(self, state, y_cov, supports, labels, batches_seen) -> torch.Tensor:
        states = [state] * len(self.decoder)
        go = state.new_zeros(state.shape[0], self.num_nodes, self.output_dim)
        outputs = []
        for t in range(self.horizon):
            layer_input = torch.cat([go, y_cov[:, t]], dim=-1)
            for i, cell in enumerate(self.decoder):
                states[i] = cell(layer_input, states[i], supports)
                layer_input = states[i]
            go = self.proj(layer_input)
            outputs.append(go)
            if self.teacher_forcing_active and np.random.uniform(0, 1) < sampling_threshold(
                    batches_seen, self.tf_decay_steps):
                go = labels[:, t]
        return torch.stack(outputs, dim=1)

    def forward(self, x, y_cov, labels=None, batches_seen=None):
        self.check_inputs(x, y_cov, labels, batches_seen)
        supports = [g.to(x.dtype) for g in self.meta_graphs()]
        h = self.encode(x, supports)
        value, query, pos, neg = self.query_memory(h)
        output = self.decode(torch.cat([h, value], dim=-1), y_cov, supports, labels, batches_seen)
        self._auxiliary_loss = self.memory_loss(query, pos, neg) if self.training else None
        return output

    @staticmethod
    def memory_loss(query, pos, neg) -> torch.Tensor:
        pos, neg = pos.detach(), neg.detach()
        separate = F.triplet_margin_loss(query, pos, neg, margin=1.0)
        compact = F.mse_loss(query, pos)
        return SEPARATE_LOSS_WEIGHT * separate + COMPACT_LOSS_WEIGHT * compact

    def auxiliary_loss(self):
        """The memory loss of the last training forward; None in eval mode or before any forward."""
        return self._auxiliary_loss if self.training else None


def config(dataset: str) -> dict:
    """Torch-MTS configs/MegaCRN.yaml (spec section 11): the same settings on all six datasets."""
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, input_dim=1, output_dim=1, horizon=12, rnn_units=64, num_layers=1,
                 cheb_k=3, ycov_dim=1, mem_num=20, mem_dim=64, tf_decay_steps=2000, use_teacher_forcing=True)
    # weight_decay 0 and lr_decay_rate 0.1 are the Torch-MTS training-script defaults (not in the yaml).
    training = dict(batch_size=64, max_epochs=200, early_stop=20, lr=0.01, eps=1e-3, weight_decay=0.0,
                    milestones=[50, 100], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, dict.fromkeys(TORCH_MTS_DATASETS, {}),
                       TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> MegaCRN:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for megacrn, got {backend!r}")
    return MegaCRN(**model_args)
