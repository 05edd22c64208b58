"""Diffusion-convolutional GRU (DCGRU) and its sequence-to-sequence stack, shared by DCRNN and GTS.

Written from ``shared/specs/baselines.md`` sections 8 and 10, which summarise
XDZhelheim/Torch-MTS:models/DCRNN.py and models/GTS.py (originally liyaguang/DCRNN,
chnsh/DCRNN_PyTorch and chaoshangcs/GTS). Facts kept from there:

- gates ``r, u`` come from one diffusion convolution with ``2 * units`` outputs, bias 1.0; the
  candidate from a convolution on ``[input, r * h]`` with ``units`` outputs, bias 0;
  ``h' = u * h + (1 - u) * tanh(c)``; weights Xavier-normal;
- diffusion features: ``x0 = x``, per support ``x1 = S x0``, ``x2 = 2 S x1 - x0``, ..., with the
  recursion variables *carried across supports* (the second support starts from the first
  support's last-but-one term), a quirk of the published code that is reproduced here;
- the weight has ``input_size * num_matrices`` rows ordered feature-major, diffusion index fastest;
- scheduled sampling: after each decoder step one ``np.random.uniform()`` draw (shared by the whole
  batch) decides whether the next decoder input is the ground truth (scaled) of that step, with
  threshold ``tau / (tau + exp(batches_seen / tau))``.

The published cells create their weights lazily on the first forward; here they are created at
construction with the shapes the first forward would give them, so the parameter count is right
from the start.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._checks import check_tensor

__all__ = ["DCGRUCell", "DCGRUSeq2Seq", "DiffusionConv", "diffusion_features", "sampling_threshold"]


def sampling_threshold(batches_seen: int, tau: float) -> float:
    """Probability of feeding the ground truth to the next decoder step: ``tau / (tau + e^(n/tau))``."""
    with np.errstate(over="ignore"):  # late in training exp overflows to inf: the threshold is then 0
        return tau / (tau + np.exp(batches_seen / tau))


def diffusion_features(x: torch.Tensor, supports: torch.Tensor, max_diffusion_step: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, N, C * M)`` with ``M = 1 + len(supports) * max_diffusion_step``.

    Columns are ordered ``c * M + m`` (feature-major). The Chebyshev-style recursion variables are
    carried from one support to the next, as in the published DCGRU.
    """
    batch, nodes, channels = x.shape
    x0 = x.permute(1, 0, 2).reshape(nodes, batch * channels)  # one GEMM per term for the whole batch
    terms = [x0]
    if max_diffusion_step > 0:
        for support in supports:
            x1 = support @ x0
            terms.append(x1)
            for _ in range(2, max_diffusion_step + 1):
                x2 = 2 * (support @ x1) - x0
                terms.append(x2)
                x1, x0 = x2, x1
    stacked = torch.stack(terms, dim=-1).reshape(nodes, batch, channels, len(terms))
    return stacked.permute(1, 0, 2, 3).reshape(batch, nodes, channels * len(terms))


class DiffusionConv(nn.Module):
    """Diffusion convolution ``diffusion_features(x) @ W + b`` on ``(B, N, input_size)``."""

    def __init__(self, input_size: int, output_size: int, num_supports: int, max_diffusion_step: int,
                 bias_start: float = 0.0):
        super().__init__()
        self.max_diffusion_step = max_diffusion_step
        num_matrices = num_supports * max_diffusion_step + 1
        self.weight = nn.Parameter(torch.empty(input_size * num_matrices, output_size))
        self.bias = nn.Parameter(torch.full((output_size,), float(bias_start)))
        nn.init.xavier_normal_(self.weight)

    def forward(self, x: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        return diffusion_features(x, supports, self.max_diffusion_step) @ self.weight + self.bias


class DCGRUCell(nn.Module):
    """GRU whose transforms are diffusion convolutions; ``forward(x (B,N,C), h (B,N,H), supports)``."""

    def __init__(self, input_dim: int, num_units: int, num_supports: int, max_diffusion_step: int):
        super().__init__()
        self.num_units = num_units
        size = input_dim + num_units
        self.gates = DiffusionConv(size, 2 * num_units, num_supports, max_diffusion_step, bias_start=1.0)
        self.candidate = DiffusionConv(size, num_units, num_supports, max_diffusion_step, bias_start=0.0)

    def forward(self, x: torch.Tensor, state: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        value = torch.sigmoid(self.gates(torch.cat([x, state], dim=-1), supports))
        r, u = torch.split(value, self.num_units, dim=-1)
        c = torch.tanh(self.candidate(torch.cat([x, r * state], dim=-1), supports))
        return u * state + (1.0 - u) * c


def _cell_stack(input_dim, num_units, num_layers, num_supports, max_diffusion_step) -> nn.ModuleList:
    dims = [input_dim] + [num_units] * (num_layers - 1)
    return nn.ModuleList(DCGRUCell(d, num_units, num_supports, max_diffusion_step) for d in dims)


class DCGRUSeq2Seq(nn.Module):
    """Encoder and decoder DCGRU stacks (separate weights), projection ``Linear(units -> output_dim)``.

    ``forward(x (B, seq_len, N, input_dim), supports (S, N, N), labels=None, batches_seen=None)
    -> (B, horizon, N, output_dim)``. The encoder starts from zero states; the decoder starts from
    the encoder's last states with a zero GO symbol and feeds back its own prediction, or the
    label of that step under scheduled sampling (training with teacher forcing only).
    """

    def __init__(self, num_nodes, input_dim, output_dim, seq_len, horizon, rnn_units, num_rnn_layers,
                 num_supports, max_diffusion_step, tf_decay_steps, use_teacher_forcing):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.seq_len = seq_len
        self.horizon = horizon
        self.rnn_units = rnn_units
        self.tf_decay_steps = tf_decay_steps
        self.use_teacher_forcing = use_teacher_forcing
        self.encoder_cells = _cell_stack(input_dim, rnn_units, num_rnn_layers, num_supports, max_diffusion_step)
        self.decoder_cells = _cell_stack(output_dim, rnn_units, num_rnn_layers, num_supports, max_diffusion_step)
        self.projection = nn.Linear(rnn_units, output_dim)

    @property
    def teacher_forcing_active(self) -> bool:
        return self.training and self.use_teacher_forcing

    def check_inputs(self, x, labels, batches_seen) -> None:
        check_tensor("x", x, ("B", self.seq_len, self.num_nodes, self.input_dim), floating=True)
        if not self.teacher_forcing_active:
            return
        if labels is None or batches_seen is None:
            raise ValueError("labels and batches_seen: required while training with teacher forcing, got None")
        check_tensor("labels", labels, (x.shape[0], self.horizon, self.num_nodes, self.output_dim), floating=True)

    def encode(self, x: torch.Tensor, supports: torch.Tensor) -> list[torch.Tensor]:
        shape = (x.shape[0], self.num_nodes, self.rnn_units)
        states = [x.new_zeros(shape) for _ in self.encoder_cells]
        for t in range(self.seq_len):
            layer_input = x[:, t]
            for i, cell in enumerate(self.encoder_cells):
                states[i] = cell(layer_input, states[i], supports)
                layer_input = states[i]
        return states

    def decode(self, states, supports, labels=None, batches_seen=None) -> torch.Tensor:
        go = states[0].new_zeros(states[0].shape[0], self.num_nodes, self.output_dim)
        states = list(states)
        outputs = []
        for t in range(self.horizon):
            layer_input = go
            for i, cell in enumerate(self.decoder_cells):
                states[i] = cell(layer_input, states[i], supports)
                layer_input = states[i]
            go = self.projection(layer_input)
            outputs.append(go)
            if self.teacher_forcing_active and np.random.uniform(0, 1) < sampling_threshold(
                    batches_seen, self.tf_decay_steps):
                go = labels[:, t]
        return torch.stack(outputs, dim=1)

    def forward(self, x, supports, labels=None, batches_seen=None) -> torch.Tensor:
        self.check_inputs(x, labels, batches_seen)
        return self.decode(self.encode(x, supports), supports, labels, batches_seen)
