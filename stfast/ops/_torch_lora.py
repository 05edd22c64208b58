"""The ``torch`` backend of ``node_lora``: composed PyTorch, forward and backward.

Shapes: ``x (M, N, d_in)`` (the caller's leading batch axes flattened into ``M``), base
``W (d_out, d_in)`` and bias ``b (d_out)``, per-node ``A (N, d_in, r)`` and ``B (N, r, d_out)``.

    y[m, n] = x[m, n] W^T + b + scale * act(drop(x[m, n]) A[n]) B[n]

Rows are grouped by node with no copy of the weights: ``x`` is read node-major through a
transposed view ``(N, M, d_in)``, so the low-rank path is two batched matmuls with the node as the
batch index (``(N, M, d_in) @ (N, d_in, r)`` then ``(N, M, r) @ (N, r, d_out)``); the base path is
one GEMM over all ``M*N`` rows. No per-node full weight ``(N, d_in, d_out)`` is ever formed; the
largest temporaries are the ``(N, M, r)`` activations and the ``(N, M, d_out)`` low-rank output.

Dropout on the low-rank path: the keep-mask is drawn from a ``torch.Generator`` seeded from
``(seed, offset)`` (see :func:`dropout_mask`), the values of the op's seed tensor, read on the host
(free for CPU tensors; for CUDA tensors a synchronisation, which a CUDA graph cannot capture: the
kernel backends read the seed on the device instead). The backward draws the same mask again instead
of keeping it, so nothing of ``x``'s size is saved besides ``x`` itself. The ``triton`` backend draws
its mask in-kernel with Philox: both are Bernoulli(1 - p) masks scaled by ``1 / (1 - p)``, but for
the same seed they are different masks.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LEAKY_RELU_SLOPE", "activate", "activation_grad", "dropout_mask", "mix_seed",
           "node_lora_forward", "node_lora_backward"]

LEAKY_RELU_SLOPE = 0.01  # torch.nn.LeakyReLU's default, also used by the triton kernels

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, offset: int) -> int:
    """One 63-bit generator seed from ``(seed, offset)`` (splitmix64 finaliser on their combination),
    so that nearby seeds / offsets give unrelated streams."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(offset) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def dropout_mask(shape, p: float, seed: int, offset: int, device, dtype) -> torch.Tensor:
    """The torch backend's dropout multiplier for the low-rank path: ``keep / (1 - p)`` with
    ``keep ~ Bernoulli(1 - p)``, drawn from a generator seeded by :func:`mix_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, offset))
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


def activate(h: torch.Tensor, activation) -> torch.Tensor:
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(h, LEAKY_RELU_SLOPE)
    if activation == "relu":
        return torch.relu(h)
    if activation == "tanh":
        return torch.tanh(h)
    if activation == "sigmoid":
        return torch.sigmoid(h)
    return h


def activation_grad(grad: torch.Tensor, h: torch.Tensor, activation) -> torch.Tensor:
    """``grad * act'(h)`` from the pre-activation ``h`` (ATen's fused activation backwards)."""
    aten = torch.ops.aten
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(grad, h, LEAKY_RELU_SLOPE, False)
    if activation == "relu":
        return aten.threshold_backward(grad, h, 0)
    if activation == "tanh":
        return aten.tanh_backward(grad, torch.tanh(h))
    if activation == "sigmoid":
        return aten.sigmoid_backward(grad, torch.sigmoid(h))
    return grad


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., N, F)`` as ``(M, N, F)`` (M spelled out: a -1 is ambiguous when x is empty)."""
    return x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])


def _low_rank_input(x3, dropout_p, seed):
    """``(drop(x) as (M, N, d_in), the multiplier or None)``; ``seed``: the op's int64 ``(seed, offset)``
    tensor."""
    if dropout_p <= 0.0:
        return x3, None
    seed_value, offset = seed.tolist()
    mask = dropout_mask(x3.shape, dropout_p, seed_value, offset, x3.device, x3.dtype)
    return x3 * mask, mask


def node_lora_forward(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed):
    x3 = _as_rows(x)
    rows, nodes, d_in = x3.shape
    d_out = weight.shape[0]
    flat = x3.reshape(rows * nodes, d_in)
    out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
    low_in, _ = _low_rank_input(x3, dropout_p, seed)
    h = torch.bmm(low_in.transpose(0, 1), lora_a)  # (N, M, r)
    low = torch.bmm(activate(h, activation), lora_b)  # (N, M, d_out)
    out.view(rows, nodes, d_out).add_(low.transpose(0, 1), alpha=scale)
    return out.view(*x.shape[:-1], d_out)


def node_lora_backward(grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, needs):
    """``(dx, dW, db, dA, dB)``, ``None`` where ``needs`` (same order) is false."""
    need_x, need_weight, need_bias, need_a, need_b = needs
    x3 = _as_rows(x)
    rows, nodes, d_in = x3.shape
    d_out = weight.shape[0]
    g3 = grad.reshape(rows, nodes, d_out)
    g_flat = g3.reshape(rows * nodes, d_out)
    d_x = d_weight = d_bias = d_a = d_b = None
    if need_bias and bias is not None:
        d_bias = g_flat.sum(0)
    if need_weight:
        d_weight = g_flat.t() @ x3.reshape(rows * nodes, d_in)
    if need_x or need_a or need_b:
        low_in, mask = _low_rank_input(x3, dropout_p, seed)  # the forward's mask, drawn again
        low_in = low_in.transpose(0, 1)  # (N, M, d_in)
        g_nodes = g3.transpose(0, 1)  # (N, M, d_out)
        h = torch.bmm(low_in, lora_a)  # (N, M, r), recomputed: r is small
        if need_b:
            d_b = torch.bmm(activate(h, activation).transpose(1, 2), g_nodes).mul_(scale)
        if need_x or need_a:
            grad_h = activation_grad(torch.bmm(g_nodes, lora_b.transpose(1, 2)).mul_(scale), h, activation)
            if need_a:
                d_a = torch.bmm(low_in.transpose(1, 2), grad_h)
            if need_x:
                d_low = torch.bmm(grad_h, lora_a.transpose(1, 2)).transpose(0, 1)  # (M, N, d_in)
                if mask is not None:
                    d_low = d_low * mask
                d_x = torch.addmm(d_low.reshape(rows * nodes, d_in), g_flat, weight).view(x.shape)
    return d_x, d_weight, d_bias, d_a, d_b
