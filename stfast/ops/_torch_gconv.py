"""The ``torch`` backend of the graph convolutions: composed PyTorch, forward and backward.

Shapes: ``x (B, N, C)``, supports ``A (N, N) | (B, N, N) | None``, propagated features
``xg (B, N, I)`` with ``I = K*C``, pools ``P (D, I, O)``, ``Pb (D, O)``, ``M = B*N`` rows.
Neither direction ever builds the per-(sample, node) weight ``(B, N, I, O)``; the largest
temporaries are ``(M, D*I)`` or ``(M, D*O)`` (outer product / contraction) or the per-node /
per-sample weight ``(N | B, I, O)`` built once per call for the S and T axes.
"""

from __future__ import annotations

import math

import torch

# Measured on CPU (2 shared threads, fp32) at the METR-LA decoder shape B=16, N=207, C=67, K=2,
# D=16, O=128, forward + backward, median of 20 (`python -m stfast.ops._bench_formulations`;
# the machine was loaded, two runs):
#   S : hoisted 24 / 164 ms   outer 133 / 244 ms   contract 160 / 276 ms
#   T : hoisted  7 / 152 ms   outer 103 / 220 ms   contract 148 / 260 ms
#   ST:                       outer 102 / 190 ms   contract 169 / 264 ms
# so S and T build W = E @ P once per call and use a batched matmul; ST uses the outer-product GEMM.
FORMULATION = {"S": "hoisted", "T": "hoisted", "ST": "outer"}


# ---------------------------------------------------------------- Chebyshev propagation

def chebyshev_features(x, supports, cheb_k: int) -> torch.Tensor:
    """``cat([x, A x, 2 A (A x) - x, ...], -1)``, propagating features (never ``A^2`` or ``T_k``)."""
    terms = [x]
    if cheb_k > 1:
        terms.append(torch.matmul(supports, x))
    for _ in range(2, cheb_k):
        terms.append(torch.matmul(supports, terms[-1]).mul_(2).sub_(terms[-2]))
    return torch.cat(terms, dim=-1) if cheb_k > 1 else x


def chebyshev_backward(grad_xg, xg, supports, cheb_k: int, need_supports: bool):
    """Gradients of ``x`` and of the supports from the gradient of the propagated features."""
    channels = grad_xg.shape[-1] // cheb_k
    grads = [grad_xg[..., k * channels:(k + 1) * channels] for k in range(cheb_k)]  # also for channels == 0
    if cheb_k == 1:  # T_0 = I: the supports do not take part
        return grads[0], torch.zeros_like(supports) if need_supports else None
    adjoint = supports.transpose(-1, -2)
    # Reverse of T_k = 2 A T_{k-1} - T_{k-2} (T_1 = A T_0); grads[k] is final when k is visited.
    for k in range(cheb_k - 1, 0, -1):
        scale = 2 if k >= 2 else 1
        grads[k - 1] = grads[k - 1] + scale * torch.matmul(adjoint, grads[k])
        if k >= 2:
            grads[k - 2] = grads[k - 2] - grads[k]
    grad_supports = None
    if need_supports:
        # d A = sum_k scale_k G_k T_{k-1}^T, as one GEMM over the concatenated terms.
        scaled = torch.cat([grads[1]] + [2 * g for g in grads[2:]], dim=-1)
        previous = xg[..., : (cheb_k - 1) * channels]
        if supports.dim() == 2:
            grad_supports = torch.einsum("bni,bmi->nm", scaled, previous)
        else:
            grad_supports = torch.matmul(scaled, previous.transpose(-1, -2))
    return grads[0], grad_supports


# ---------------------------------------------------------------- epilogue

def apply_activation(pre: torch.Tensor, activation) -> torch.Tensor:
    if activation == "sigmoid":
        return pre.sigmoid_()
    if activation == "tanh":
        return pre.tanh_()
    return pre


def activation_backward(grad_out, out, activation):
    if activation == "sigmoid":
        return grad_out * out * (1 - out)
    if activation == "tanh":
        return grad_out * (1 - out * out)
    return grad_out


# ---------------------------------------------------------------- meta axes

def row_embeddings(embeddings, axis: str, batch: int, nodes: int) -> torch.Tensor:
    """The embedding of every row ``(b, n)`` as a ``(B*N, D)`` view or copy."""
    dim = embeddings.shape[-1]
    if axis == "S":
        embeddings = embeddings.unsqueeze(0).expand(batch, nodes, dim)
    elif axis == "T":
        embeddings = embeddings.unsqueeze(1).expand(batch, nodes, dim)
    return embeddings.reshape(batch * nodes, dim)


def reduce_to_axis(rows, axis: str, batch: int, nodes: int) -> torch.Tensor:
    """Sum a ``(B*N, F)`` per-row tensor onto the embedding's leading shape."""
    rows = rows.reshape(batch, nodes, rows.shape[-1])
    if axis == "S":
        return rows.sum(0)
    if axis == "T":
        return rows.sum(1)
    return rows


# Every reshape below spells its sizes out: a -1 is ambiguous (an error) when a tensor is empty.

def _outer_forward(xg, e_rows, pool):
    rows, dim = e_rows.shape
    z = (e_rows.unsqueeze(2) * xg.unsqueeze(1)).reshape(rows, dim * xg.shape[-1])
    return z @ _pool_rows(pool)


def _pool_rows(pool):
    """``P (D, I, O)`` as ``(D*I, O)``."""
    dim, inputs, outputs = pool.shape
    return pool.reshape(dim * inputs, outputs)


def _outer_backward(grad, xg, e_rows, pool, need):
    rows, dim = e_rows.shape
    d_xg = d_e = d_pool = None
    if need["pool"]:
        z = (e_rows.unsqueeze(2) * xg.unsqueeze(1)).reshape(rows, dim * xg.shape[-1])
        d_pool = (z.t() @ grad).reshape(pool.shape)
    if need["xg"] or need["e"]:
        d_z = (grad @ _pool_rows(pool).t()).reshape(rows, dim, xg.shape[-1])
        if need["e"]:
            d_e = torch.bmm(d_z, xg.unsqueeze(2)).squeeze(2)
        if need["xg"]:
            d_xg = torch.bmm(e_rows.unsqueeze(1), d_z).squeeze(1)
    return d_xg, d_e, d_pool


def _pool_by_input(pool):
    """``P (D, I, O)`` as ``(I, D*O)``."""
    dim, inputs, outputs = pool.shape
    return pool.permute(1, 0, 2).reshape(inputs, dim * outputs)


def _contract_forward(xg, e_rows, pool):
    rows, dim = e_rows.shape
    u = (xg @ _pool_by_input(pool)).reshape(rows, dim, pool.shape[-1])
    return torch.bmm(e_rows.unsqueeze(1), u).squeeze(1)


def _contract_backward(grad, xg, e_rows, pool, need):
    rows, dim = e_rows.shape
    pool_by_input = _pool_by_input(pool)
    d_xg = d_e = d_pool = None
    if need["e"]:
        u = (xg @ pool_by_input).reshape(rows, dim, pool.shape[-1])
        d_e = torch.bmm(u, grad.unsqueeze(2)).squeeze(2)
    if need["xg"] or need["pool"]:
        d_u = (e_rows.unsqueeze(2) * grad.unsqueeze(1)).reshape(rows, dim * pool.shape[-1])
        if need["xg"]:
            d_xg = d_u @ pool_by_input.t()
        if need["pool"]:
            d_pool = (xg.t() @ d_u).reshape(pool.shape[1], dim, pool.shape[-1]).permute(1, 0, 2)
    return d_xg, d_e, d_pool


def _meta_major(t, axis: str):
    """``(B, N, F)`` with the meta index first: nodes for S, samples for T."""
    return t.transpose(0, 1) if axis == "S" else t


def _hoisted_weights(embeddings, pool):
    dim, inputs, outputs = pool.shape
    return (embeddings @ pool.reshape(dim, inputs * outputs)).reshape(embeddings.shape[0], inputs, outputs)


def _hoisted_forward(xg, embeddings, pool, axis):
    weights = _hoisted_weights(embeddings, pool)
    return _meta_major(torch.bmm(_meta_major(xg, axis), weights), axis)


def _hoisted_backward(grad, xg, embeddings, pool, axis, need):
    dim, inputs, outputs = pool.shape
    grad_major = _meta_major(grad, axis)
    d_xg = d_e = d_pool = None
    if need["xg"]:
        weights = _hoisted_weights(embeddings, pool)
        d_xg = _meta_major(torch.bmm(grad_major, weights.transpose(1, 2)), axis)
    if need["e"] or need["pool"]:
        d_weights = torch.bmm(_meta_major(xg, axis).transpose(1, 2), grad_major)
        d_weights = d_weights.reshape(d_weights.shape[0], inputs * outputs)
        if need["e"]:
            d_e = d_weights @ pool.reshape(dim, inputs * outputs).t()
        if need["pool"]:
            d_pool = (embeddings.t() @ d_weights).reshape(pool.shape)
    return d_xg, d_e, d_pool


def _flat_rows(t):
    """``(..., F)`` as ``(prod(...), F)``."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def meta_linear_forward(xg, embeddings, pool, bias_pool, axis: str, formulation=None):
    """``y[b,n] = sum_d E[.,d] (xg[b,n] @ P[d] + Pb[d])`` without per-row weights."""
    batch, nodes, inputs = xg.shape
    formulation = formulation or FORMULATION[axis]
    if formulation == "hoisted":
        out = _hoisted_forward(xg, embeddings, pool, axis)
    else:
        e_rows = row_embeddings(embeddings, axis, batch, nodes)
        forward = _outer_forward if formulation == "outer" else _contract_forward
        out = forward(xg.reshape(batch * nodes, inputs), e_rows, pool).reshape(batch, nodes, pool.shape[-1])
    if bias_pool is not None:
        bias = embeddings @ bias_pool
        out = out + (bias.unsqueeze(1) if axis == "T" else bias)
    return out.contiguous()


def meta_linear_backward(grad, xg, embeddings, pool, bias_pool, axis: str, need, formulation=None):
    """Gradients ``(d xg, d E, d P, d Pb)`` of :func:`meta_linear_forward`; ``need`` maps
    ``xg``/``e``/``pool``/``bias`` to whether that gradient is wanted (else ``None``)."""
    batch, nodes, inputs = xg.shape
    formulation = formulation or FORMULATION[axis]
    if formulation == "hoisted":
        d_xg, d_e, d_pool = _hoisted_backward(grad, xg, embeddings, pool, axis, need)
    else:
        e_rows = row_embeddings(embeddings, axis, batch, nodes)
        backward = _outer_backward if formulation == "outer" else _contract_backward
        grad_rows = grad.reshape(batch * nodes, grad.shape[-1])
        d_xg, d_e, d_pool = backward(grad_rows, xg.reshape(batch * nodes, inputs), e_rows, pool, need)
        d_xg = None if d_xg is None else d_xg.reshape(batch, nodes, inputs)
        d_e = None if d_e is None else reduce_to_axis(d_e, axis, batch, nodes)
    d_bias = None
    if bias_pool is not None and (need["e"] or need["bias"]):
        grad_axis = reduce_to_axis(grad.reshape(batch * nodes, grad.shape[-1]), axis, batch, nodes)
        if need["e"]:
            d_e = d_e + grad_axis @ bias_pool.t()
        if need["bias"]:
            d_bias = _flat_rows(embeddings).t() @ _flat_rows(grad_axis)
    return d_xg, d_e, d_pool, d_bias


# ---------------------------------------------------------------- whole ops

def meta_gconv_forward(x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis, *, formulation=None):
    """``formulation``: None (this backend's ``FORMULATION``), "hoisted" (the GPU backends' S / T
    path, ``_formulation``), "outer" or "contract"."""
    xg = chebyshev_features(x, supports, cheb_k)
    out = meta_linear_forward(xg, embeddings, pool, bias_pool, axis, formulation)
    return apply_activation(out, activation)


def meta_gconv_backward(grad, out, x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis, needs, *,
                        formulation=None):
    """``(dx, d supports, dE, dP, dPb)``, ``None`` where ``needs`` (same order) is false."""
    need_x, need_supports, need_e, need_pool, need_bias = needs
    need_supports = need_supports and supports is not None
    grad = activation_backward(grad.contiguous(), out, activation)
    xg = chebyshev_features(x, supports, cheb_k)  # recomputed: cheaper than keeping (B, N, K*C)
    need = {"xg": need_x or need_supports, "e": need_e, "pool": need_pool, "bias": need_bias}
    d_xg, d_e, d_pool, d_bias = meta_linear_backward(grad, xg, embeddings, pool, bias_pool, axis, need, formulation)
    d_x = d_supports = None
    if need["xg"]:
        d_x, d_supports = chebyshev_backward(d_xg, xg, supports, cheb_k, need_supports)
    return d_x, d_supports, d_e, d_pool, d_bias


def gconv_forward(x, supports, weight, bias, cheb_k, activation):
    xg = chebyshev_features(x, supports, cheb_k)
    out = xg @ weight
    if bias is not None:
        out = out + bias
    return apply_activation(out, activation)


def gconv_backward(grad, out, x, supports, weight, bias, cheb_k, activation, needs):
    """``(dx, d supports, d weight, d bias)``, ``None`` where ``needs`` (same order) is false."""
    need_x, need_supports, need_weight, need_bias = needs
    need_supports = need_supports and supports is not None
    grad = activation_backward(grad.contiguous(), out, activation)
    xg = chebyshev_features(x, supports, cheb_k)
    rows = _flat_rows(grad)
    d_weight = _flat_rows(xg).t() @ rows if need_weight else None
    d_bias = rows.sum(0) if need_bias and bias is not None else None
    d_x = d_supports = None
    if need_x or need_supports:
        d_x, d_supports = chebyshev_backward(grad @ weight.t(), xg, supports, cheb_k, need_supports)
    return d_x, d_supports, d_weight, d_bias
