"""The ``triton`` backend of ``node_lora``: registration and the glue around the kernels.

Same signatures and semantics as ``_torch_lora.node_lora_forward`` / ``node_lora_backward``,
except for the dropout mask: the kernels draw it in-kernel with Philox from the ``(seed, offset)``
they read from the device tensor ``seed`` (``stfast.kernels.node_lora``): the cpu and cuda backends'
mask, not the torch backend's (each backend is reproducible on its own and consistent between its
forward and backward).

The glue flattens the leading batch axes into ``(M, N, d_in)``, makes the tensors contiguous and
restores the caller's shape; everything else (forward, every gradient, the deterministic
reductions) runs in the kernels.

This module never imports Triton itself: the kernel module is imported on the first call, so
``import stfast`` works (and stays light) without Triton. Under ``TRITON_INTERPRET=1`` (tests),
that first import must happen with the variable set: Triton decides at decoration time.
"""

from __future__ import annotations

from . import backends

__all__ = ["node_lora_forward", "node_lora_backward"]


def _kernels():
    from stfast.kernels import node_lora as kernels  # imports triton; first call only

    return kernels


def _rows(x):
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _contiguous(t):
    return None if t is None else t.contiguous()


def node_lora_forward(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed):
    out = _kernels().node_lora_forward(
        _rows(x), weight.contiguous(), _contiguous(bias), lora_a.contiguous(), lora_b.contiguous(),
        scale, activation, dropout_p, seed.contiguous(),
    )
    return out.view(*x.shape[:-1], weight.shape[0])


def node_lora_backward(grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, needs):
    """``(dx, dW, db, dA, dB)``, ``None`` where ``needs`` (same order) is false."""
    d_x, d_weight, d_bias, d_a, d_b = _kernels().node_lora_backward(
        _rows(grad), _rows(x), weight.contiguous(), _contiguous(bias), lora_a.contiguous(), lora_b.contiguous(),
        scale, activation, dropout_p, seed.contiguous(), needs,
    )
    if d_x is not None:
        d_x = d_x.view(x.shape)
    return d_x, d_weight, d_bias, d_a, d_b


backends.register_impl("triton", "node_lora", node_lora_forward)
backends.register_impl("triton", "node_lora_backward", node_lora_backward)
