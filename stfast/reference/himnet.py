"""Faithful pure-PyTorch port of HimNet (KDD 2024), written from ``shared/specs/himnet.md``.

This is the correctness oracle and the "before" column of every benchmark, so it keeps the
published algorithm as it is, inefficiencies included: per-(sample, node) weights are materialised
with einsum, the Chebyshev supports and the S/T weights are rebuilt at every recurrent step.
Constructor arguments, forward signature and state-dict keys equal the published module's, so its
checkpoints load with ``strict=True``. Two deliberate differences, neither changing float32
numerics: identity supports and zero states take the input's dtype and device (so float64 works),
and ``cheb_k=1`` means ``[I]`` (the published code cannot run it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._checks import check_same_device_dtype, check_tensor

__all__ = ["HimGCN", "HimGCRU", "HimEncoder", "HimDecoder", "HimNet"]

_META_AXES = (None, "S", "T", "ST")


def chebyshev_supports(support: torch.Tensor, cheb_k: int) -> list[torch.Tensor]:
    """``[I, A, 2 A T_{k-1} - T_{k-2}, ...]`` (length ``cheb_k``) for ``(N, N)`` or ``(B, N, N)``."""
    n = support.shape[-1]
    eye = torch.eye(n, dtype=support.dtype, device=support.device).expand_as(support)
    graphs = [eye, support][:cheb_k]
    for _ in range(2, cheb_k):
        graphs.append(torch.matmul(2 * support, graphs[-1]) - graphs[-2])
    return graphs


class HimGCN(nn.Module):
    """Graph convolution whose weight is generated from an embedding along ``meta_axis``."""

    def __init__(self, input_dim, output_dim, cheb_k, embed_dim, meta_axis=None):
        super().__init__()
        meta_axis = meta_axis.upper() if meta_axis else None
        if meta_axis not in _META_AXES:
            raise ValueError(f"meta_axis: expected one of None, 'S', 'T', 'ST', got {meta_axis!r}")
        self.cheb_k = cheb_k
        self.meta_axis = meta_axis
        if meta_axis:
            self.weights_pool = nn.Parameter(torch.empty(embed_dim, cheb_k * input_dim, output_dim))
            self.bias_pool = nn.Parameter(torch.empty(embed_dim, output_dim))
            nn.init.xavier_normal_(self.weights_pool)
            nn.init.xavier_normal_(self.bias_pool)
        else:
            self.weights = nn.Parameter(torch.empty(cheb_k * input_dim, output_dim))
            self.bias = nn.Parameter(torch.zeros(output_dim))
            nn.init.xavier_normal_(self.weights)

    def forward(self, x, support, embeddings):
        if support.dim() == 2:
            x_g = [torch.einsum("nm,bmc->bnc", g, x) for g in chebyshev_supports(support, self.cheb_k)]
        else:
            x_g = [torch.einsum("bnm,bmc->bnc", g, x) for g in chebyshev_supports(support, self.cheb_k)]
        x_g = torch.cat(x_g, dim=-1)

        if self.meta_axis == "T":
            weights = torch.einsum("bd,dio->bio", embeddings, self.weights_pool)
            bias = torch.matmul(embeddings, self.bias_pool)
            return torch.einsum("bni,bio->bno", x_g, weights) + bias[:, None, :]
        if self.meta_axis == "S":
            weights = torch.einsum("nd,dio->nio", embeddings, self.weights_pool)
            bias = torch.matmul(embeddings, self.bias_pool)
            return torch.einsum("bni,nio->bno", x_g, weights) + bias
        if self.meta_axis == "ST":
            weights = torch.einsum("bnd,dio->bnio", embeddings, self.weights_pool)
            bias = torch.einsum("bnd,do->bno", embeddings, self.bias_pool)
            return torch.einsum("bni,bnio->bno", x_g, weights) + bias
        return torch.einsum("bni,io->bno", x_g, self.weights) + self.bias


class HimGCRU(nn.Module):
    """Graph-convolutional GRU cell; ``z`` resets the state in the candidate, ``r`` blends."""

    gcn_class = HimGCN  # the fused cell swaps in its own graph convolution (same parameters)

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis="S"):
        super().__init__()
        self.num_nodes = num_nodes
        self.hidden_dim = output_dim
        self.gate = self.gcn_class(input_dim + output_dim, 2 * output_dim, cheb_k, embed_dim, meta_axis)
        self.update = self.gcn_class(input_dim + output_dim, output_dim, cheb_k, embed_dim, meta_axis)

    def forward(self, x, state, support, embeddings):
        z_r = torch.sigmoid(self.gate(torch.cat((x, state), dim=-1), support, embeddings))
        z, r = torch.split(z_r, self.hidden_dim, dim=-1)
        hc = torch.tanh(self.update(torch.cat((x, z * state), dim=-1), support, embeddings))
        return r * state + (1 - r) * hc

    def init_hidden_state(self, batch_size, dtype=None, device=None):
        return torch.zeros(batch_size, self.num_nodes, self.hidden_dim, dtype=dtype, device=device)


def _cell_stack(cell_class, num_nodes, input_dim, hidden_dim, cheb_k, num_layers, embed_dim, meta_axis):
    dims = [input_dim] + [hidden_dim] * (num_layers - 1)
    return nn.ModuleList(cell_class(num_nodes, d, hidden_dim, cheb_k, embed_dim, meta_axis) for d in dims)


class HimEncoder(nn.Module):
    """Stack of GCRU layers run over all input steps from a zero state."""

    cell_class = HimGCRU

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="S"):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.cells = _cell_stack(self.cell_class, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim,
                                 meta_axis)

    def forward(self, x, support, embeddings):
        current_input = x
        output_hidden = []
        for cell in self.cells:
            state = cell.init_hidden_state(x.shape[0], dtype=x.dtype, device=x.device)
            inner_states = []
            for t in range(x.shape[1]):
                state = cell(current_input[:, t], state, support, embeddings)
                inner_states.append(state)
            output_hidden.append(state)
            current_input = torch.stack(inner_states, dim=1)
        return current_input, output_hidden


class HimDecoder(nn.Module):
    """One decoding step through the GCRU stack, each layer from its own state."""

    cell_class = HimGCRU

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="ST"):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.cells = _cell_stack(self.cell_class, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim,
                                 meta_axis)

    def forward(self, xt, init_state, support, embeddings):
        current_input = xt
        output_hidden = []
        for cell, state in zip(self.cells, init_state):
            current_input = cell(current_input, state, support, embeddings)
            output_hidden.append(current_input)
        return current_input, output_hidden


def adaptive_support(embeddings: torch.Tensor) -> torch.Tensor:
    """Row-softmax of ``relu(E E^T)`` for ``(N, D)`` or ``(B, N, D)`` embeddings."""
    return torch.softmax(torch.relu(embeddings @ embeddings.transpose(-1, -2)), dim=-1)


def _value_range(values) -> str:
    finite = values[torch.isfinite(values)]
    if not finite.numel():
        return "NaN / inf only"
    spread = f"values in [{finite.min().item():g}, {finite.max().item():g}]"
    return spread + (" and NaN / inf" if finite.numel() < values.numel() else "")


def check_time_features(time_of_day, day_of_week=None) -> None:
    """``ValueError`` unless time of day (x's channel 1) is a fraction of the day in [0, 1) and day of
    week (channel 2) an integer in 0..6: the embedding lookups would fail with a bare IndexError, or
    silently map a value in (-1/288, 0) to slot 0."""
    if not (torch.isfinite(time_of_day).all() and (time_of_day >= 0).all() and (time_of_day < 1).all()):
        raise ValueError("x: expected the time of day in channel 1 (x[..., 1], read at the last input step) in "
                         f"[0, 1), a fraction of the day (288 five-minute slots), got "
                         f"{_value_range(time_of_day)}")
    if day_of_week is None:
        return
    valid = torch.isfinite(day_of_week) & (day_of_week >= 0) & (day_of_week <= 6) & (day_of_week == day_of_week.floor())
    if not valid.all():
        raise ValueError("x: expected the day of week in channel 2 (x[..., 2], read at the last input step) as an "
                         f"integer 0..6, got {_value_range(day_of_week)}")


class HimNet(nn.Module):
    """HimNet encoder-decoder: S and T meta encoders, an ST meta decoder with scheduled sampling.

    ``forward(x (B, T_in, N, input_dim), y_cov (B, T_out, N, ycov_dim), labels=None,
    batches_seen=None) -> (B, T_out, N, output_dim)`` in scaled units. While training with teacher
    forcing, each decoder step draws ``np.random.uniform()`` once for the whole batch (as published),
    so seeding NumPy makes the draws reproducible.
    """

    encoder_class = HimEncoder  # the fused model swaps in its own encoder and decoder (same parameters)
    decoder_class = HimDecoder

    def __init__(self, num_nodes, input_dim=3, output_dim=1, out_steps=12, hidden_dim=64, num_layers=1,
                 cheb_k=2, ycov_dim=2, tod_embedding_dim=8, dow_embedding_dim=8, node_embedding_dim=16,
                 st_embedding_dim=16, tf_decay_steps=4000, use_teacher_forcing=True):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.out_steps = out_steps
        self.num_layers = num_layers
        self.cheb_k = cheb_k
        self.ycov_dim = ycov_dim
        self.tod_embedding_dim = tod_embedding_dim
        self.dow_embedding_dim = dow_embedding_dim
        self.node_embedding_dim = node_embedding_dim
        self.st_embedding_dim = st_embedding_dim
        self.tf_decay_steps = tf_decay_steps
        self.use_teacher_forcing = use_teacher_forcing

        time_dim = tod_embedding_dim + dow_embedding_dim
        encoder, decoder = self.encoder_class, self.decoder_class
        self.encoder_s = encoder(num_nodes, input_dim, hidden_dim, cheb_k, num_layers, node_embedding_dim, "S")
        self.encoder_t = encoder(num_nodes, input_dim, hidden_dim, cheb_k, num_layers, time_dim, "T")
        self.decoder = decoder(num_nodes, output_dim + ycov_dim, hidden_dim, cheb_k, num_layers, st_embedding_dim, "ST")
        self.out_proj = nn.Linear(hidden_dim, output_dim)
        self.tod_embedding = nn.Embedding(288, tod_embedding_dim)
        if dow_embedding_dim > 0:
            self.dow_embedding = nn.Embedding(7, dow_embedding_dim)
        self.node_embedding = nn.Parameter(torch.empty(num_nodes, node_embedding_dim))
        nn.init.xavier_normal_(self.node_embedding)
        self.st_proj = nn.Linear(hidden_dim, st_embedding_dim)

    def compute_sampling_threshold(self, batches_seen):
        return self.tf_decay_steps / (self.tf_decay_steps + np.exp(batches_seen / self.tf_decay_steps))

    def time_embedding(self, x):
        """``[Emb_tod(floor(tod * 288)), Emb_dow(dow)]`` of the last input step at node 0: ``(B, D_t)``."""
        time_of_day = x[:, -1, 0, 1]
        day_of_week = x[:, -1, 0, 2] if self.dow_embedding_dim > 0 else None
        if not torch.compiler.is_compiling():  # a data-dependent check: eager only, no graph break
            check_time_features(time_of_day, day_of_week)
        tod_emb = self.tod_embedding((time_of_day * 288).long())
        if day_of_week is None:
            return tod_emb
        return torch.cat([tod_emb, self.dow_embedding(day_of_week.long())], dim=-1)

    def check_inputs(self, x, y_cov, labels=None, batches_seen=None):
        """Clear errors for inputs the published module would mis-handle or fail on obscurely."""
        check_tensor("x", x, ("B", "T_in", self.num_nodes, self.input_dim), floating=True)
        check_tensor("y_cov", y_cov, (x.shape[0], "T_out", self.num_nodes, self.ycov_dim))
        if y_cov.shape[1] < self.out_steps:
            raise ValueError(f"y_cov: expected at least out_steps={self.out_steps} steps, got {y_cov.shape[1]}")
        param = self.node_embedding
        check_same_device_dtype("the model's parameters", param, x=x, y_cov=y_cov, labels=labels)
        if self.training and self.use_teacher_forcing:
            if labels is None or batches_seen is None:
                raise ValueError("labels and batches_seen: required while training with teacher forcing, got None")
            check_tensor("labels", labels, (x.shape[0], "T_out", self.num_nodes, self.output_dim))

    def forward(self, x, y_cov, labels=None, batches_seen=None):
        self.check_inputs(x, y_cov, labels, batches_seen)
        time_embedding = self.time_embedding(x)
        support = adaptive_support(self.node_embedding)
        h_s, _ = self.encoder_s(x, support, self.node_embedding)
        h_t, _ = self.encoder_t(x, support, time_embedding)
        h_last = (h_s + h_t)[:, -1]

        st_embedding = self.st_proj(h_last)
        st_support = adaptive_support(st_embedding)

        states = [h_last] * self.num_layers
        go = torch.zeros(x.shape[0], self.num_nodes, self.output_dim, dtype=x.dtype, device=x.device)
        out = []
        for t in range(self.out_steps):
            h_de, states = self.decoder(torch.cat([go, y_cov[:, t]], dim=-1), states, st_support, st_embedding)
            go = self.out_proj(h_de)
            out.append(go)
            if self.training and self.use_teacher_forcing:
                if np.random.uniform(0, 1) < self.compute_sampling_threshold(batches_seen):
                    go = labels[:, t]
        return torch.stack(out, dim=1)
