"""Node-adaptive low-rank linear: ``node_lora``.

``y[..., n, :] = x[..., n, :] W^T + b + scale * act(dropout(x[..., n, :]) A[n]) B[n]``: a shared
base layer plus one low-rank adapter per graph node, the node index being the adapter index
(DESIGN.md, "Node-adaptive low-rank linear"). Dropout acts on the low-rank path only.

A ``torch.library`` custom op (``stfast::node_lora``) with a fake kernel and registered autograd
whose backward is itself a custom op (``stfast::node_lora_backward``); the real kernels are looked
up in the backend registry (:mod:`stfast.ops.backends`) at every call, and the backward runs on the
backend the forward resolved.

Dropout is counter-based: the mask is a function of ``(seed, offset)`` and the element's position,
so the backward draws the same mask again instead of storing it. The ops take ``(seed, offset)`` as
an int64 tensor of shape ``(2,)`` on the input's device (:func:`dropout_seed`), never as host
integers: the default seed is drawn on the device by torch's generator, so no call reads a device
value on the host, a new seed per step recompiles nothing, and ``torch.compile(fullgraph=True)``
(and a CUDA graph) can capture a training step with dropout. The ``triton``, ``cpu`` and ``cuda``
backends draw the same mask from the same seed tensor (in-kernel Philox); the ``torch`` backend draws
its own (a ``torch.Generator`` seeded from the tensor's values, which it reads on the host: the one
backend whose dropout is not CUDA-graph capturable), each reproducible on its own.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._checks import check_same_device_dtype, check_tensor
from . import _support, _torch_lora, backends
from ._autocast import autocast_inputs

__all__ = ["node_lora", "check_node_lora_inputs", "dropout_seed", "ACTIVATIONS"]

ACTIVATIONS = (None, "leaky_relu", "relu", "tanh", "sigmoid")
_SEED_BOUND = 1 << 62


# ---------------------------------------------------------------- validation

def _check_options(scale, activation, dropout_p, seed, offset) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {scale!r}")
    if not math.isfinite(scale):  # a NaN / inf scale would turn every output into NaN / inf, silently
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of None, 'leaky_relu', 'relu', 'tanh', 'sigmoid', got {activation!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if isinstance(seed, Tensor):
        if isinstance(offset, bool) or not isinstance(offset, int) or offset != 0:
            raise ValueError(f"offset: a seed tensor carries its own offset (element 1); expected offset=0, got "
                             f"{offset!r}")
        return
    if seed is None:
        seed = 0
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, torch.SymInt):  # a seed / offset that torch.compile made dynamic
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _SEED_BOUND:
            raise ValueError(f"{name}: expected an int in [0, 2**62), got {value!r}")


def _check_seed_tensor(seed: Tensor, x: Tensor) -> None:
    """An int64 ``(2,)`` tensor on x's device; its values are not read (any bits are a valid seed)."""
    if seed.dtype != torch.int64 or tuple(seed.shape) != (2,):
        raise ValueError(f"seed: expected an int64 tensor of shape (2,) (the seed and the offset of the dropout "
                         f"draw), got dtype {seed.dtype} and shape {tuple(seed.shape)}")
    if seed.device != x.device:
        raise ValueError(f"seed: expected a tensor on x's device {x.device}, got {seed.device}")


def check_node_lora_inputs(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed=None,
                           offset=0) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the argument, what was expected and what came.
    ``seed``: ``None``, an int in ``[0, 2**62)`` or a seed tensor (``dropout_seed``)."""
    _check_options(scale, activation, dropout_p, seed, offset)
    check_tensor("x", x, floating=True)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., N, d_in) with the node axis at -2, got {tuple(x.shape)}")
    nodes, d_in = x.shape[-2:]
    check_tensor("weight", weight, ("d_out", d_in))
    d_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (d_out,))
    check_tensor("lora_a", lora_a)
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a: expected shape (N, d_in, r) = ({nodes}, {d_in}, r), got {tuple(lora_a.shape)}")
    if lora_a.shape[0] != nodes:
        raise ValueError(
            f"lora_a: expected one adapter per node, N = {nodes} (the size of x's node axis -2), "
            f"got {lora_a.shape[0]} (lora_a of shape {tuple(lora_a.shape)}, x of shape {tuple(x.shape)})"
        )
    if lora_a.shape[1] != d_in:
        raise ValueError(f"lora_a: expected shape (N, d_in, r) = ({nodes}, {d_in}, r), got {tuple(lora_a.shape)}")
    rank = lora_a.shape[2]
    if rank < 1:
        raise ValueError(f"lora_a: expected a rank r >= 1, got shape {tuple(lora_a.shape)}")
    check_tensor("lora_b", lora_b)
    if tuple(lora_b.shape) != (nodes, rank, d_out):
        detail = f" (rank {lora_b.shape[1]} != lora_a's rank {rank})" if lora_b.dim() == 3 and lora_b.shape[1] != rank else ""
        raise ValueError(
            f"lora_b: expected shape (N, r, d_out) = ({nodes}, {rank}, {d_out}) (N from x, r from lora_a, "
            f"d_out from weight), got {tuple(lora_b.shape)}{detail}"
        )
    check_same_device_dtype("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if isinstance(seed, Tensor):
        _check_seed_tensor(seed, x)


def dropout_seed(seed: int, offset: int, device) -> Tensor:
    """The seed tensor of ``stfast::node_lora``'s dropout for an explicit ``(seed, offset)``: int64,
    shape ``(2,)``, on ``device``."""
    _check_options(1.0, None, 0.0, seed, offset)
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _seed_tensor(seed, offset, device, dropout: bool) -> Tensor:
    """The op's seed tensor: ``seed`` itself if a tensor; without dropout zeros (never read); the
    default seed drawn on ``device`` from torch's generator (no host read, so ``torch.compile``
    traces it and a CUDA graph replays a fresh draw)."""
    if isinstance(seed, Tensor):
        return seed.contiguous()
    if seed is not None:
        return dropout_seed(seed, offset, device)
    if not dropout:
        return torch.zeros(2, dtype=torch.int64, device=device)
    drawn = torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64, device=device)
    return torch.cat((drawn, torch.full((1,), offset, dtype=torch.int64, device=device)))


def _is_empty(x: Tensor, weight: Tensor) -> bool:
    """A zero-sized batch, N or d_in (x) or d_out (weight): the torch formulation computes it."""
    return x.numel() == 0 or weight.numel() == 0


def _empty_unless(grad, needed: bool, like: Tensor) -> Tensor:
    # Custom ops return Tensors, not None: an unneeded gradient is an empty tensor.
    return grad if needed and grad is not None else like.new_empty(0)


# ---------------------------------------------------------------- node_lora op

@torch.library.custom_op("stfast::node_lora", mutates_args=())
def _node_lora_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    activation: Optional[str],
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> Tensor:
    check_node_lora_inputs(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed)
    impl = _support.kernel(backend, "node_lora", x.device, x.dtype, empty=_is_empty(x, weight))
    return impl(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed)


@_node_lora_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, backend):
    check_node_lora_inputs(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("stfast::node_lora_backward", mutates_args=())
def _node_lora_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    activation: Optional[str],
    dropout_p: float,
    seed: Tensor,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _support.kernel(backend, "node_lora_backward", x.device, x.dtype, empty=_is_empty(x, weight))
    grads = impl(grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, needs)
    return tuple(_empty_unless(g, need, x) for g, need in zip(grads, needs))


@_node_lora_backward_op.register_fake
def _(grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, backend, needs):
    inputs = (x, weight, bias, lora_a, lora_b)
    return tuple(
        t.new_empty(t.shape) if need and t is not None else x.new_empty(0) for t, need in zip(inputs, needs)
    )


def _node_lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, seed)  # h and the dropout mask are recomputed
    ctx.options = (scale, activation, dropout_p)
    ctx.backend = backend  # the backward runs on the forward's backend


def _node_lora_backward(ctx, grad):
    x, weight, bias, lora_a, lora_b, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _node_lora_backward_op(grad.contiguous(), x, weight, bias, lora_a, lora_b, *ctx.options, seed,
                                   ctx.backend, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 5


_node_lora_op.register_autograd(_node_lora_backward, setup_context=_node_lora_setup_context)
_node_lora_backward_op.register_autograd(_support.refuse_double_backward("node_lora"))


def node_lora(x, weight, bias, lora_a, lora_b, scale, activation="leaky_relu", dropout_p=0.0, training=False,
              seed=None, offset=0):
    """Shared linear layer plus a per-node low-rank adapter, never building per-node weights.

    ``x (..., N, d_in)`` (node axis at -2, any number of leading batch axes), ``weight (d_out, d_in)``,
    ``bias (d_out,)`` or ``None``, ``lora_a (N, d_in, r)``, ``lora_b (N, r, d_out)``; returns
    ``(..., N, d_out)``::

        y[..., n, :] = x[..., n, :] @ weight.T + bias + scale * act(dropout(x[..., n, :]) @ lora_a[n]) @ lora_b[n]

    ``activation``: ``"leaky_relu"`` (slope 0.01), ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``None``.
    Dropout (probability ``dropout_p``, only when ``training``) acts on the low-rank path; its mask
    is a function of ``(seed, offset)`` (same seed and offset, same mask, on one backend) and is
    drawn again in the backward rather than stored. ``seed``: an int in ``[0, 2**62)`` (with
    ``offset``), a seed tensor (int64 ``(2,)`` = ``(seed, offset)`` on x's device, see
    :func:`dropout_seed`; ``offset`` must then be 0), or ``None``: a seed drawn on x's device from
    torch's generator (``torch.manual_seed`` makes runs reproducible), with no host read, so that
    ``torch.compile(fullgraph=True)`` and CUDA graphs capture it.
    """
    effective_p = float(dropout_p) if training else 0.0
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    check_node_lora_inputs(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, offset)
    backend = backends.resolve_backend("node_lora", x.device, x.dtype)
    seed = _seed_tensor(seed, offset, x.device, effective_p > 0.0)
    return _node_lora_op(x, weight, bias, lora_a, lora_b, float(scale), activation, effective_p, seed, backend)


backends.register_impl("torch", "node_lora", _torch_lora.node_lora_forward)
backends.register_impl("torch", "node_lora_backward", _torch_lora.node_lora_backward)

try:  # registers the triton backend; the module imports triton lazily, so this never needs it
    from . import _triton_lora  # noqa: F401,E402
except ImportError:  # pragma: no cover
    pass
