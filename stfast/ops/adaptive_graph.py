"""Propagation through an adaptive graph ``A = softmax(relu(E E^T), dim=-1)`` without building ``A``.

HimNet's decoder (and AGCRN-style models) propagate features through a graph learned from embeddings
``E``: ``(N, D)`` shared, or ``(B, N, D)`` one graph per sample. Built densely, the per-sample graph is a
``(B, N, N)`` tensor that autograd keeps (ReLU's and softmax's outputs) together with its gradient: at
LargeST's CA (N = 8,600) and batch 64, about 95 GB of a 146 GB training step. Here ``y = A x`` is computed
over row chunks of ``A`` (the flash-attention scheme with ReLU scores and ``E`` as both queries and keys):

- ``implicit_support(E)`` computes, once per model forward, each row's log-sum-exp ``lse = log sum_j
  exp(relu(E_i . E_j))`` (the row's maximum is folded into it, computed chunk by chunk) and returns an
  :class:`ImplicitSupport`; every propagation through it (every decoder step, gate and Chebyshev order)
  reuses these statistics, so ``A[i, j] = exp(relu(E_i . E_j) - lse_i)`` is one product and one ``exp``
  per element of a chunk;
- ``ImplicitSupport.propagate(x)`` is the custom op ``stfast::adaptive_propagate``: memory
  ``O(B * chunk * N)``, nothing of size ``N x N`` saved for backward; its backward op
  (``stfast::adaptive_propagate_backward``) recomputes each chunk and returns the full gradient to ``E``
  (through the scores *and* the normalisation, so ``lse`` is a constant cache with no gradient of its
  own) and to ``x``.

The chunk (rows of ``A`` per step) is a pure function of the shapes, the dtype and a byte budget
(:func:`chunk_rows`). Everything is computed in float32 (float64 for float64 inputs); half-precision
inputs are upcast chunk by chunk and the results cast back, like the other ops' fp32 accumulation.
One implementation serves every device (batched GEMMs and elementwise ops of PyTorch); it is not in
the backend registry.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._checks import check_same_device_dtype, check_tensor
from . import _support
from ._autocast import autocast_inputs

__all__ = ["ImplicitSupport", "implicit_support", "adaptive_propagate", "chunk_rows", "compute_dtype",
           "DEFAULT_BUDGET_BYTES"]

DEFAULT_BUDGET_BYTES = 2**30  # chunk buffers of one propagation (backward's two plus a mask): 1 GiB


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the chunks are computed in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_bytes_per_element(dtype: torch.dtype) -> int:
    """Bytes per graph element of the largest set of chunk buffers (backward: the probabilities and
    their gradient in the compute dtype, and the ReLU mask)."""
    return 2 * compute_dtype(dtype).itemsize + 1


def chunk_rows(graphs: int, nodes: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """Rows of the ``(graphs, N, N)`` adaptive graph processed at once: as many as fit ``budget_bytes``
    of chunk buffers, at least 1, at most N."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes: expected an int >= 1, got {budget_bytes!r}")
    per_row = max(1, graphs * nodes * chunk_bytes_per_element(dtype))
    return max(1, min(nodes, budget_bytes // per_row))


# ---------------------------------------------------------------- validation

def _check_embeddings(embeddings) -> None:
    check_tensor("embeddings", embeddings, floating=True)
    if embeddings.dim() not in (2, 3):
        raise ValueError(f"embeddings: expected shape (N, D) or (B, N, D), got {tuple(embeddings.shape)}")


def _check_chunk(chunk) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")


def check_propagate_inputs(embeddings, lse, x, chunk) -> None:
    _check_embeddings(embeddings)
    _check_chunk(chunk)
    nodes = embeddings.shape[-2]
    x_spec = ("B", nodes, "C") if embeddings.dim() == 2 else (embeddings.shape[0], nodes, "C")
    check_tensor("x", x, x_spec, floating=True)
    check_same_device_dtype("embeddings", embeddings, x=x)
    check_tensor("lse", lse, tuple(embeddings.shape[:-1]), dtype=compute_dtype(embeddings.dtype),
                 device=embeddings.device)


# ---------------------------------------------------------------- the chunked computation
# Embeddings (N, D) are one graph shared by the batch: x (B, N, C) is folded to (1, N, B*C) so that every
# function below sees one layout, E (G, N, D) with G graphs and x (G, N, F).

def _as_graphs(embeddings: Tensor, x: Optional[Tensor] = None):
    work = compute_dtype(embeddings.dtype)
    if embeddings.dim() == 3:
        return embeddings.to(work), None if x is None else x.to(work)
    folded = None if x is None else x.to(work).permute(1, 0, 2).reshape(1, x.shape[1], -1)
    return embeddings.to(work)[None], folded


def _rows(start: int, chunk: int, nodes: int) -> slice:
    return slice(start, min(start + chunk, nodes))


def _probabilities_(scores: Tensor, lse_rows: Tensor) -> Tensor:
    """The graph's rows ``exp(relu(scores) - lse_rows)`` from the scores ``E_rows E^T`` (G, c, N), in place."""
    return scores.relu_().sub_(lse_rows[..., None]).exp_()


def _lse_impl(embeddings: Tensor, chunk: int) -> Tensor:
    emb, _ = _as_graphs(embeddings)
    graphs, nodes, _ = emb.shape
    lse = emb.new_empty(graphs, nodes)
    for start in range(0, nodes, chunk):
        rows = _rows(start, chunk, nodes)
        scores = torch.relu_(emb[:, rows] @ emb.transpose(1, 2))
        row_max = scores.amax(dim=-1, keepdim=True)
        lse[:, rows] = (row_max + scores.sub_(row_max).exp_().sum(dim=-1, keepdim=True).log_()).squeeze(-1)
    return lse if embeddings.dim() == 3 else lse[0]


def _propagate_impl(embeddings: Tensor, lse: Tensor, x: Tensor, chunk: int) -> Tensor:
    emb, feats = _as_graphs(embeddings, x)
    lse = lse if embeddings.dim() == 3 else lse[None]
    nodes = emb.shape[1]
    out = torch.empty_like(feats)
    for start in range(0, nodes, chunk):
        rows = _rows(start, chunk, nodes)
        probs = _probabilities_(emb[:, rows] @ emb.transpose(1, 2), lse[:, rows])
        out[:, rows] = probs @ feats
    return _to_layout(out, x, embeddings.dim() == 2)


def _propagate_backward_impl(grad: Tensor, embeddings: Tensor, lse: Tensor, x: Tensor, chunk: int):
    emb, feats = _as_graphs(embeddings, x)
    _, dy = _as_graphs(embeddings, grad)
    lse = lse if embeddings.dim() == 3 else lse[None]
    nodes = emb.shape[1]
    d_emb = torch.zeros_like(emb)
    d_feats = torch.zeros_like(feats)
    for start in range(0, nodes, chunk):
        rows = _rows(start, chunk, nodes)
        scores = emb[:, rows] @ emb.transpose(1, 2)
        inactive = scores <= 0  # relu's zero gradient
        probs = _probabilities_(scores, lse[:, rows])
        dy_rows = dy[:, rows]
        d_feats.baddbmm_(probs.transpose(1, 2), dy_rows)
        # softmax backward: dS = P * (dP - rowsum(P * dP)), rowsum(P * dP) = dy . y with y = P x recomputed
        delta = (dy_rows * (probs @ feats)).sum(dim=-1, keepdim=True)
        d_scores = torch.bmm(dy_rows, feats.transpose(1, 2)).sub_(delta).mul_(probs).masked_fill_(inactive, 0)
        del scores, probs, inactive
        d_emb[:, rows] += d_scores @ emb  # E as queries
        d_emb.baddbmm_(d_scores.transpose(1, 2), emb[:, rows])  # E as keys
    d_emb = d_emb if embeddings.dim() == 3 else d_emb[0]
    return d_emb.to(embeddings.dtype), _to_layout(d_feats, x, embeddings.dim() == 2)


def _to_layout(folded: Tensor, like: Tensor, shared: bool) -> Tensor:
    """A ``(G, N, F)`` result in ``like``'s layout ``(B, N, C)`` and dtype; a shared graph's batch is unfolded."""
    if not shared:
        return folded.to(like.dtype)
    batch, nodes, channels = like.shape
    return folded[0].view(nodes, batch, channels).permute(1, 0, 2).contiguous().to(like.dtype)


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("stfast::adaptive_graph_lse", mutates_args=())
def _lse_op(embeddings: Tensor, chunk: int) -> Tensor:
    _check_embeddings(embeddings)
    _check_chunk(chunk)
    with torch.autocast(embeddings.device.type, enabled=False):
        return _lse_impl(embeddings, chunk)


@_lse_op.register_fake
def _(embeddings, chunk):
    _check_embeddings(embeddings)
    _check_chunk(chunk)
    return embeddings.new_empty(embeddings.shape[:-1], dtype=compute_dtype(embeddings.dtype))


@torch.library.custom_op("stfast::adaptive_propagate", mutates_args=())
def _propagate_op(embeddings: Tensor, lse: Tensor, x: Tensor, chunk: int) -> Tensor:
    check_propagate_inputs(embeddings, lse, x, chunk)
    with torch.autocast(x.device.type, enabled=False):
        return _propagate_impl(embeddings, lse, x, chunk)


@_propagate_op.register_fake
def _(embeddings, lse, x, chunk):
    check_propagate_inputs(embeddings, lse, x, chunk)
    return torch.empty_like(x)


@torch.library.custom_op("stfast::adaptive_propagate_backward", mutates_args=())
def _propagate_backward_op(grad: Tensor, embeddings: Tensor, lse: Tensor, x: Tensor, chunk: int,
                           needs: list[bool]) -> tuple[Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        d_emb, d_x = _propagate_backward_impl(grad, embeddings, lse, x, chunk)
    return (d_emb if needs[0] else x.new_empty(0)), (d_x if needs[1] else x.new_empty(0))


@_propagate_backward_op.register_fake
def _(grad, embeddings, lse, x, chunk, needs):
    return (torch.empty_like(embeddings) if needs[0] else x.new_empty(0)), \
        (torch.empty_like(x) if needs[1] else x.new_empty(0))


def _propagate_setup_context(ctx, inputs, output):
    embeddings, lse, x, chunk = inputs
    ctx.save_for_backward(embeddings, lse, x)
    ctx.chunk = chunk


def _propagate_backward(ctx, grad):
    embeddings, lse, x = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2])]
    d_emb, d_x = _propagate_backward_op(grad.contiguous(), embeddings, lse, x, ctx.chunk, needs)
    # lse is a cache of E's statistics: E's gradient already includes the normalisation
    return (d_emb if needs[0] else None), None, (d_x if needs[1] else None), None


_propagate_op.register_autograd(_propagate_backward, setup_context=_propagate_setup_context)
_propagate_backward_op.register_autograd(_support.refuse_double_backward("adaptive_propagate"))


# ---------------------------------------------------------------- public API

class ImplicitSupport(NamedTuple):
    """The adaptive graph ``softmax(relu(E E^T), -1)`` of ``embeddings`` ``(N, D)`` or ``(B, N, D)``,
    never materialised: the embeddings, each row's log-sum-exp ``lse`` (``(N,)`` or ``(B, N)``, computed
    once, no gradient) and the rows per chunk. Build it with :func:`implicit_support`."""

    embeddings: Tensor
    lse: Tensor
    chunk: int

    def propagate(self, x: Tensor) -> Tensor:
        """``A x`` for ``x (B, N, C)``, differentiable in ``x`` and in the embeddings."""
        x, embeddings = autocast_inputs(x, self.embeddings)
        check_propagate_inputs(embeddings, self.lse, x, self.chunk)
        return _propagate_op(embeddings, self.lse, x.contiguous(), self.chunk)

    def chebyshev(self, x: Tensor, cheb_k: int) -> Tensor:
        """``cat([x, A x, 2 A (A x) - x, ...], -1)``: ``(B, N, cheb_k * C)``, the propagated features
        that :func:`stfast.ops.meta_gconv` forms from a dense support."""
        if isinstance(cheb_k, bool) or not isinstance(cheb_k, int) or cheb_k < 1:
            raise ValueError(f"cheb_k: expected an int >= 1, got {cheb_k!r}")
        terms = [x]
        if cheb_k > 1:
            terms.append(self.propagate(x))
        for _ in range(2, cheb_k):
            terms.append(2 * self.propagate(terms[-1]) - terms[-2])
        return torch.cat(terms, dim=-1)

    def dense(self) -> Tensor:
        """The graph itself, ``(N, N)`` or ``(B, N, N)`` (for tests and inspection)."""
        scores = torch.relu(self.embeddings @ self.embeddings.transpose(-1, -2)).to(self.lse.dtype)
        return torch.exp(scores - self.lse[..., None])


def implicit_support(embeddings: Tensor, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                     chunk: Optional[int] = None) -> ImplicitSupport:
    """The adaptive graph of ``embeddings`` (``(N, D)`` or ``(B, N, D)``) as an :class:`ImplicitSupport`:
    its row statistics are computed here, once, in chunks of ``chunk`` rows (default:
    :func:`chunk_rows` of the shapes and ``budget_bytes``)."""
    (embeddings,) = autocast_inputs(embeddings)
    _check_embeddings(embeddings)
    graphs = embeddings.shape[0] if embeddings.dim() == 3 else 1
    if chunk is None:
        chunk = chunk_rows(graphs, embeddings.shape[-2], embeddings.dtype, budget_bytes)
    _check_chunk(chunk)
    return ImplicitSupport(embeddings, _lse_op(embeddings.detach(), chunk), chunk)


def adaptive_propagate(embeddings: Tensor, x: Tensor, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                       chunk: Optional[int] = None) -> Tensor:
    """``softmax(relu(E E^T), -1) @ x`` for ``E (N, D)`` or ``(B, N, D)`` and ``x (B, N, C)``, without
    the ``N x N`` graph; build :func:`implicit_support` once instead when propagating several times."""
    return implicit_support(embeddings, budget_bytes=budget_bytes, chunk=chunk).propagate(x)
