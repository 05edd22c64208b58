"""HimNet on stfast's ops: a drop-in for :class:`stfast.reference.HimNet`.

Same constructor, forward signature, parameters (names, shapes, initialisation order) and
teacher-forcing draws as the reference, so a reference state dict or a published checkpoint loads
with ``strict=True`` and, from the same state and seed, both compute the same forecast. What changes
is where the work goes (``shared/specs/himnet.md``, "Where the time goes"):

- the spatio-temporal decoder runs on :func:`stfast.ops.meta_gconv`, which never materialises the
  ``(B, N, K*C, O)`` per-(sample, node) weights; gate and candidate activations are fused epilogues;
- the S and T encoders build their per-node / per-sample weights once per forward instead of at
  every step, and split each gate into an input part and a state part: the input part (including
  its graph propagation) of all input steps is one batched product up front, only the state part
  ``A h_t`` is recurrent;
- adaptive supports are built once per forward (as in the reference); the decoder's per-sample graph
  ``softmax(relu(E E^T))`` of ``E (B, N, D)`` is, above a size (``adaptive_graph="auto"``), never
  built: its rows' statistics are computed once per forward and every propagation runs over row
  chunks (:mod:`stfast.ops.adaptive_graph`), so no ``(B, N, N)`` tensor is kept for backward.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..ops import adaptive_graph as _adaptive_graph
from ..reference import himnet as reference

__all__ = ["HimGCN", "HimGCRU", "HimEncoder", "HimDecoder", "HimNet", "ADAPTIVE_GRAPHS", "DEFAULT_ADAPTIVE_GRAPH"]

ADAPTIVE_GRAPHS = ("auto", "dense", "chunked")
DEFAULT_ADAPTIVE_GRAPH = "auto"  # for models built without the argument (the zoo, the CLI, the memory model)
# "auto" weighs per (sample, node) what each way keeps for backward: the dense graph about five rows of N
# (ReLU's and softmax's outputs, the graph's gradient and its temporaries); the chunked one, at every gate
# call, the propagated features the pool reads (cheb_k x C, C the gate's input channels) and the
# propagations' inputs, about (cheb_k + 2) x C in all. Both constants fit the memory model's predictions
# for the published configuration (K = 2, C = 67, 24 gate calls) at batch 64: chunked keeps 0.35 GB more
# at SD (N = 716) and 3.7 GB less at GBA (N = 2,352), so the switch falls near N = 1,300.
DENSE_GRAPH_ROWS = 5


def propagate(x: torch.Tensor, support: torch.Tensor, cheb_k: int) -> torch.Tensor:
    """``cat([x, A x, 2 A (A x) - x, ...], -1)`` for ``x (..., N, C)`` and ``A (N, N)``, by the
    recurrence on features (never forming ``A^k``)."""
    terms = [x]
    if cheb_k > 1:
        terms.append(support @ x)
    for _ in range(2, cheb_k):
        terms.append(2 * (support @ terms[-1]) - terms[-2])
    return torch.cat(terms, dim=-1)


class HimGCN(reference.HimGCN):
    """The reference graph convolution's parameters, computed by :func:`stfast.ops.meta_gconv`."""

    def forward(self, x, support, embeddings, activation=None):
        if isinstance(support, ops.ImplicitSupport):  # propagate first, then a pool over the concatenation
            xg = support.chebyshev(x, self.cheb_k)
            return ops.meta_gconv(xg, None, embeddings, self.weights_pool, self.bias_pool, 1, activation,
                                  axis=self.meta_axis)
        if self.meta_axis is None:
            return ops.gconv(x.contiguous(), support, self.weights, self.bias, self.cheb_k, activation)
        return ops.meta_gconv(x.contiguous(), support, embeddings, self.weights_pool, self.bias_pool, self.cheb_k,
                              activation, axis=self.meta_axis)

    def split_pool(self, input_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's rows acting on the input channels and on the state channels:
        ``(D, K*C, O)`` and ``(D, K*H, O)`` (rows are ordered Chebyshev term, then channel)."""
        dim, rows, out = self.weights_pool.shape
        per_term = self.weights_pool.view(dim, self.cheb_k, rows // self.cheb_k, out)
        state_dim = rows // self.cheb_k - input_dim
        return (per_term[:, :, :input_dim].reshape(dim, self.cheb_k * input_dim, out),
                per_term[:, :, input_dim:].reshape(dim, self.cheb_k * state_dim, out))


class HimGCRU(reference.HimGCRU):
    gcn_class = HimGCN

    def forward(self, x, state, support, embeddings):
        z_r = self.gate(torch.cat((x, state), dim=-1), support, embeddings, activation="sigmoid")
        z, r = torch.split(z_r, self.hidden_dim, dim=-1)
        hc = self.update(torch.cat((x, z * state), dim=-1), support, embeddings, activation="tanh")
        return r * state + (1 - r) * hc

    def run_sequence(self, inputs, support, embeddings):
        """All steps of ``inputs (B, T, N, C)`` from a zero state, for the S and T axes (shared
        ``(N, N)`` support): returns the states ``(B, T, N, H)``."""
        batch, _, nodes, channels = inputs.shape
        axis = self.gate.meta_axis
        # Weights once per sequence (per node for S, per sample for T), input parts for all steps at once.
        gate_x, gate_h = (_generate(embeddings, p) for p in self.gate.split_pool(channels))
        update_x, update_h = (_generate(embeddings, p) for p in self.update.split_pool(channels))
        xg = propagate(inputs, support, self.gate.cheb_k)
        gate_in = _apply(xg, gate_x, axis) + _bias(embeddings, self.gate.bias_pool, axis)
        update_in = _apply(xg, update_x, axis) + _bias(embeddings, self.update.bias_pool, axis)

        state = inputs.new_zeros(batch, nodes, self.hidden_dim)
        states = []
        # unbind, not [:, t]: the backward of one unbind is one stack, while every [:, t] would give a
        # zero-filled (B, T, N, F) gradient plus an add (measured: 14% of the fused step on CPU).
        for gate_t, update_t in zip(gate_in.unbind(1), update_in.unbind(1)):
            hg = propagate(state, support, self.gate.cheb_k)
            z, r = torch.split(torch.sigmoid(gate_t + _apply(hg, gate_h, axis)), self.hidden_dim, dim=-1)
            zg = propagate(z * state, support, self.update.cheb_k)
            hc = torch.tanh(update_t + _apply(zg, update_h, axis))
            state = r * state + (1 - r) * hc
            states.append(state)
        return torch.stack(states, dim=1)


def _generate(embeddings, pool):
    """``W = E @ P``: ``(N or B, I, O)`` from ``E (N or B, D)`` and ``P (D, I, O)``."""
    dim, rows, out = pool.shape
    return (embeddings @ pool.reshape(dim, rows * out)).view(embeddings.shape[0], rows, out)


def _apply(xg, weights, axis):
    """``xg (B, [T,] N, I)`` times per-node (S) or per-sample (T) weights ``(N or B, I, O)``."""
    if axis == "S":
        return torch.einsum("...ni,nio->...no", xg, weights)
    if xg.dim() == 4:  # (B, T, N, I): one weight per sample for all its steps and nodes
        batch, steps, nodes, rows = xg.shape
        return torch.bmm(xg.reshape(batch, steps * nodes, rows), weights).view(batch, steps, nodes, weights.shape[-1])
    return torch.bmm(xg, weights)


def _bias(embeddings, bias_pool, axis):
    bias = embeddings @ bias_pool  # (N, O) for S, (B, O) for T
    return bias if axis == "S" else bias[:, None, None, :]


class HimEncoder(reference.HimEncoder):
    cell_class = HimGCRU

    def forward(self, x, support, embeddings):
        current_input = x
        output_hidden = []
        for cell in self.cells:
            current_input = cell.run_sequence(current_input, support, embeddings)
            output_hidden.append(current_input[:, -1])
        return current_input, output_hidden


class HimDecoder(reference.HimDecoder):
    cell_class = HimGCRU


class HimNet(reference.HimNet):
    """Drop-in fused HimNet; see the module docstring.

    ``forward`` also takes ``teacher_forcing``: a bool tensor ``(out_steps,)`` of the decoder steps
    that feed the label instead of the prediction. Left ``None`` while training, the steps are drawn
    with NumPy as published (:meth:`draw_teacher_forcing`), a host-side choice that
    ``torch.compile(fullgraph=True)`` and CUDA graphs cannot capture; passed in, the choice is a
    device-side select and the whole forward and backward are one static graph.
    """

    encoder_class = HimEncoder
    decoder_class = HimDecoder

    def __init__(self, *args, adaptive_graph: str | None = None, adaptive_graph_budget: int | None = None, **kwargs):
        """The reference's arguments, and how the decoder's per-sample graph is propagated (neither is a
        parameter or a buffer: the state dict is the reference's):

        ``adaptive_graph``: ``"dense"`` builds the ``(B, N, N)`` graph as the reference does;
        ``"chunked"`` never builds it (:func:`stfast.ops.implicit_support`); ``"auto"`` takes the one
        that keeps less for backward (:meth:`prefers_chunked`); None: :data:`DEFAULT_ADAPTIVE_GRAPH`.
        ``adaptive_graph_budget``: bytes of chunk buffers per propagation (default
        :data:`stfast.ops.adaptive_graph.DEFAULT_BUDGET_BYTES`); the rows per chunk follow from it and
        the shapes.
        """
        adaptive_graph = DEFAULT_ADAPTIVE_GRAPH if adaptive_graph is None else adaptive_graph
        if adaptive_graph not in ADAPTIVE_GRAPHS:
            raise ValueError(f"adaptive_graph: expected one of {list(ADAPTIVE_GRAPHS)}, got {adaptive_graph!r}")
        budget = adaptive_graph_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"adaptive_graph_budget: expected None or an int >= 1 (bytes), got {budget!r}")
        super().__init__(*args, **kwargs)
        self.adaptive_graph = adaptive_graph
        self.adaptive_graph_budget = adaptive_graph_budget

    def decoder_support(self, st_embedding: torch.Tensor):
        """The decoder's per-sample graph of ``st_embedding (B, N, D)``: dense ``(B, N, N)`` or an
        :class:`stfast.ops.ImplicitSupport`, as ``adaptive_graph`` says."""
        if self.adaptive_graph == "dense" or (self.adaptive_graph == "auto" and not self.prefers_chunked()):
            return reference.adaptive_support(st_embedding)
        budget = self.adaptive_graph_budget or _adaptive_graph.DEFAULT_BUDGET_BYTES
        return ops.implicit_support(st_embedding, budget_bytes=budget)

    def prefers_chunked(self) -> bool:
        """Whether the chunked decoder graph keeps less for backward than the dense one (both grow with
        the batch: a matter of N against the decoder's channels and gate calls)."""
        gate_channels = self.output_dim + self.ycov_dim + self.hidden_dim
        gate_calls = 2 * self.num_layers * self.out_steps
        return DENSE_GRAPH_ROWS * self.num_nodes > gate_calls * (self.cheb_k + 2) * gate_channels

    def draw_teacher_forcing(self, batches_seen) -> torch.Tensor:
        """The published per-step draws (``np.random.uniform() < threshold``, in decoding order and
        from the same NumPy stream as the reference) as a bool tensor ``(out_steps,)``."""
        draws = np.random.uniform(0, 1, size=self.out_steps)
        return torch.from_numpy(draws < self.compute_sampling_threshold(batches_seen))

    def forward(self, x, y_cov, labels=None, batches_seen=None, teacher_forcing=None):
        forcing = self.training and self.use_teacher_forcing
        self.check_inputs(x, y_cov, labels, batches_seen if teacher_forcing is None else 0)
        if forcing:
            _check_teacher_forcing(teacher_forcing, self.out_steps, x.device)
        time_embedding = self.time_embedding(x)
        support = reference.adaptive_support(self.node_embedding)
        h_s, _ = self.encoder_s(x, support, self.node_embedding)
        h_t, _ = self.encoder_t(x, support, time_embedding)
        h_last = (h_s + h_t)[:, -1]

        st_embedding = self.st_proj(h_last)
        st_support = self.decoder_support(st_embedding)

        states = [h_last] * self.num_layers
        go = x.new_zeros(x.shape[0], self.num_nodes, self.output_dim)
        out = []
        for t in range(self.out_steps):
            h_de, states = self.decoder(torch.cat([go, y_cov[:, t]], dim=-1), states, st_support, st_embedding)
            go = self.out_proj(h_de)
            out.append(go)
            if not forcing:
                continue
            if teacher_forcing is None:  # the published host-side draw, one per step
                if np.random.uniform(0, 1) < self.compute_sampling_threshold(batches_seen):
                    go = labels[:, t]
            else:
                go = torch.where(teacher_forcing[t], labels[:, t].to(go.dtype), go)
        return torch.stack(out, dim=1)


def _check_teacher_forcing(teacher_forcing, out_steps, device) -> None:
    if teacher_forcing is None:
        return
    if not isinstance(teacher_forcing, torch.Tensor) or teacher_forcing.dtype != torch.bool:
        raise TypeError(f"teacher_forcing: expected a bool tensor of shape ({out_steps},), got {teacher_forcing!r}")
    if tuple(teacher_forcing.shape) != (out_steps,) or teacher_forcing.device != device:
        raise ValueError(f"teacher_forcing: expected a bool tensor of shape ({out_steps},) on {device}, got shape "
                         f"{tuple(teacher_forcing.shape)} on {teacher_forcing.device}")
