"""Graph convolution ops: ``meta_gconv`` (meta-parameter weights) and plain ``gconv``.

Both are ``torch.library`` custom ops (``stfast::meta_gconv``, ``stfast::gconv``) with fake
kernels and registered autograd whose backward is itself a custom op
(``stfast::meta_gconv_backward``, ``stfast::gconv_backward``). The real kernels are looked up in
the backend registry (:mod:`stfast.ops.backends`) at every call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_same_device_dtype, check_tensor
from . import _support, _torch_gconv, backends
from ._autocast import autocast_inputs

__all__ = ["meta_gconv", "gconv", "resolve_axis", "ACTIVATIONS", "AXES"]

ACTIVATIONS = (None, "sigmoid", "tanh")
AXES = ("S", "T", "ST")


# ---------------------------------------------------------------- validation

def _check_options(cheb_k, activation) -> None:
    if isinstance(cheb_k, bool) or not isinstance(cheb_k, int):
        raise TypeError(f"cheb_k: expected an int >= 1, got {cheb_k!r}")
    if cheb_k < 1:
        raise ValueError(f"cheb_k: expected an int >= 1, got {cheb_k}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of None, 'sigmoid', 'tanh', got {activation!r}")


def _check_x_and_supports(x, supports, cheb_k) -> None:
    check_tensor("x", x, ("B", "N", "C"), floating=True)
    if not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous tensor, got strides {tuple(x.stride())} for shape {tuple(x.shape)}")
    batch, nodes, _ = x.shape
    if supports is None:
        if cheb_k != 1:
            raise ValueError(f"cheb_k: supports is None (no propagation), so expected cheb_k 1, got {cheb_k}")
        return
    check_tensor("supports", supports)
    if supports.dim() not in (2, 3):
        raise ValueError(
            f"supports: expected shape (N, N) = ({nodes}, {nodes}) or (B, N, N) = ({batch}, {nodes}, {nodes}), "
            f"got {tuple(supports.shape)}"
        )
    check_tensor("supports", supports, (nodes, nodes) if supports.dim() == 2 else (batch, nodes, nodes))


def _embedding_spec(axis: str, batch, nodes):
    return {"S": (nodes, "D"), "T": (batch, "D"), "ST": (batch, nodes, "D")}[axis]


def check_meta_gconv_inputs(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis) -> None:
    _check_options(cheb_k, activation)
    if axis not in AXES:
        raise ValueError(f"axis: expected one of 'S', 'T', 'ST', got {axis!r}")
    _check_x_and_supports(x, supports, cheb_k)
    batch, nodes, channels = x.shape
    check_tensor("embeddings", embeddings, _embedding_spec(axis, batch, nodes))
    dim = embeddings.shape[-1]
    check_tensor("weights_pool", weights_pool, (dim, cheb_k * channels, "O"))
    if bias_pool is not None:
        check_tensor("bias_pool", bias_pool, (dim, weights_pool.shape[-1]))
    check_same_device_dtype(
        "x", x, supports=supports, embeddings=embeddings, weights_pool=weights_pool, bias_pool=bias_pool
    )


def check_gconv_inputs(x, supports, weight, bias, cheb_k, activation) -> None:
    _check_options(cheb_k, activation)
    _check_x_and_supports(x, supports, cheb_k)
    check_tensor("weight", weight, (cheb_k * x.shape[-1], "O"))
    if bias is not None:
        check_tensor("bias", bias, (weight.shape[-1],))
    check_same_device_dtype("x", x, supports=supports, weight=weight, bias=bias)


def resolve_axis(x: Tensor, embeddings: Tensor, axis: Optional[str] = None) -> str:
    """The meta axis named by the embeddings' shape (``(N, D)`` S, ``(B, D)`` T, ``(B, N, D)`` ST),
    or the explicit ``axis`` (required for a 2-D embedding when B == N)."""
    check_tensor("x", x, ("B", "N", "C"))
    check_tensor("embeddings", embeddings)
    if axis is not None:
        if not isinstance(axis, str) or axis.upper() not in AXES:
            raise ValueError(f"axis: expected one of None, 'S', 'T', 'ST', got {axis!r}")
        return axis.upper()
    batch, nodes, _ = x.shape
    if embeddings.dim() == 3:
        return "ST"
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings: expected shape (N, D), (B, D) or (B, N, D) with B={batch}, N={nodes}, "
            f"got {tuple(embeddings.shape)}"
        )
    if batch == nodes:
        raise ValueError(
            f"axis: embeddings of shape {tuple(embeddings.shape)} can be (N, D) or (B, D) because "
            f"B == N == {batch}; pass axis='S' (per node) or axis='T' (per sample)"
        )
    if embeddings.shape[0] == nodes:
        return "S"
    if embeddings.shape[0] == batch:
        return "T"
    raise ValueError(
        f"embeddings: expected shape (N, D) = ({nodes}, D) or (B, D) = ({batch}, D), got {tuple(embeddings.shape)}"
    )


def _is_empty(x: Tensor, weights: Tensor) -> bool:
    """A zero-sized B, N, C (x) or D, cheb_k*C, O (the weights): the torch formulation computes it."""
    return x.numel() == 0 or weights.numel() == 0


def _empty_unless(grad, needed: bool, like: Tensor) -> Tensor:
    # Custom ops return Tensors, not None: an unneeded gradient is an empty tensor.
    return grad if needed and grad is not None else like.new_empty(0)


# ---------------------------------------------------------------- meta_gconv op

@torch.library.custom_op("stfast::meta_gconv", mutates_args=())
def _meta_gconv_op(
    x: Tensor,
    supports: Optional[Tensor],
    embeddings: Tensor,
    weights_pool: Tensor,
    bias_pool: Optional[Tensor],
    cheb_k: int,
    activation: Optional[str],
    axis: str,
    backend: str,
) -> Tensor:
    check_meta_gconv_inputs(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis)
    impl = _support.kernel(backend, "meta_gconv", x.device, x.dtype, empty=_is_empty(x, weights_pool))
    return impl(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis)


@_meta_gconv_op.register_fake
def _(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis, backend):
    check_meta_gconv_inputs(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis)
    return x.new_empty(x.shape[0], x.shape[1], weights_pool.shape[-1])


@torch.library.custom_op("stfast::meta_gconv_backward", mutates_args=())
def _meta_gconv_backward_op(
    grad: Tensor,
    out: Optional[Tensor],
    x: Tensor,
    supports: Optional[Tensor],
    embeddings: Tensor,
    weights_pool: Tensor,
    bias_pool: Optional[Tensor],
    cheb_k: int,
    activation: Optional[str],
    axis: str,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _support.kernel(backend, "meta_gconv_backward", x.device, x.dtype, empty=_is_empty(x, weights_pool))
    grads = impl(grad, out, x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis, needs)
    return tuple(_empty_unless(g, need, x) for g, need in zip(grads, needs))


@_meta_gconv_backward_op.register_fake
def _(grad, out, x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis, backend, needs):
    inputs = (x, supports, embeddings, weights_pool, bias_pool)
    return tuple(
        t.new_empty(t.shape) if need and t is not None else x.new_empty(0) for t, need in zip(inputs, needs)
    )


def _meta_gconv_setup_context(ctx, inputs, output):
    x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis, backend = inputs
    ctx.save_for_backward(x, supports, embeddings, weights_pool, bias_pool, output if activation else None)
    ctx.options = (cheb_k, activation, axis, backend)  # backward runs on the forward's backend


def _meta_gconv_backward(ctx, grad):
    x, supports, embeddings, weights_pool, bias_pool, out = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _meta_gconv_backward_op(
        grad, out, x, supports, embeddings, weights_pool, bias_pool, *ctx.options, needs
    )
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None, None)


_meta_gconv_op.register_autograd(_meta_gconv_backward, setup_context=_meta_gconv_setup_context)
_meta_gconv_backward_op.register_autograd(_support.refuse_double_backward("meta_gconv"))


def meta_gconv(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation=None, *, axis=None):
    """Graph convolution with weights generated from embeddings, never materialising them.

    ``x (B, N, C)``; ``supports (N, N)``, ``(B, N, N)`` or ``None`` (no propagation, ``cheb_k``
    must be 1); ``embeddings`` ``(N, D)`` spatial, ``(B, D)`` temporal or ``(B, N, D)``
    spatio-temporal (``axis='S' | 'T' | 'ST'`` overrides the inference, and is required for a
    2-D embedding when B == N); ``weights_pool (D, cheb_k*C, O)``; ``bias_pool (D, O)`` or
    ``None``; ``activation`` None, ``"sigmoid"`` or ``"tanh"``. Returns ``(B, N, O)``.
    """
    axis = resolve_axis(x, embeddings, axis)
    x, supports, embeddings, weights_pool, bias_pool = autocast_inputs(
        x, supports, embeddings, weights_pool, bias_pool)
    check_meta_gconv_inputs(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis)
    backend = backends.resolve_backend("meta_gconv", x.device, x.dtype)
    return _meta_gconv_op(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation, axis, backend)


# ---------------------------------------------------------------- gconv op

@torch.library.custom_op("stfast::gconv", mutates_args=())
def _gconv_op(
    x: Tensor, supports: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], cheb_k: int,
    activation: Optional[str], backend: str,
) -> Tensor:
    check_gconv_inputs(x, supports, weight, bias, cheb_k, activation)
    impl = _support.kernel(backend, "gconv", x.device, x.dtype, empty=_is_empty(x, weight))
    return impl(x, supports, weight, bias, cheb_k, activation)


@_gconv_op.register_fake
def _(x, supports, weight, bias, cheb_k, activation, backend):
    check_gconv_inputs(x, supports, weight, bias, cheb_k, activation)
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[-1])


@torch.library.custom_op("stfast::gconv_backward", mutates_args=())
def _gconv_backward_op(
    grad: Tensor,
    out: Optional[Tensor],
    x: Tensor,
    supports: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    cheb_k: int,
    activation: Optional[str],
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _support.kernel(backend, "gconv_backward", x.device, x.dtype, empty=_is_empty(x, weight))
    grads = impl(grad, out, x, supports, weight, bias, cheb_k, activation, needs)
    return tuple(_empty_unless(g, need, x) for g, need in zip(grads, needs))


@_gconv_backward_op.register_fake
def _(grad, out, x, supports, weight, bias, cheb_k, activation, backend, needs):
    inputs = (x, supports, weight, bias)
    return tuple(
        t.new_empty(t.shape) if need and t is not None else x.new_empty(0) for t, need in zip(inputs, needs)
    )


def _gconv_setup_context(ctx, inputs, output):
    x, supports, weight, bias, cheb_k, activation, backend = inputs
    ctx.save_for_backward(x, supports, weight, bias, output if activation else None)
    ctx.options = (cheb_k, activation, backend)


def _gconv_backward(ctx, grad):
    x, supports, weight, bias, out = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = _gconv_backward_op(grad, out, x, supports, weight, bias, *ctx.options, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None)


_gconv_op.register_autograd(_gconv_backward, setup_context=_gconv_setup_context)
_gconv_backward_op.register_autograd(_support.refuse_double_backward("gconv"))


def gconv(x, supports, weight, bias, cheb_k, activation=None):
    """Plain Chebyshev graph convolution ``act(cat_k(T_k x) @ weight + bias)``.

    ``x (B, N, C)``; ``supports (N, N)``, ``(B, N, N)`` or ``None`` (``cheb_k`` must then be 1);
    ``weight (cheb_k*C, O)``; ``bias (O,)`` or ``None``. Returns ``(B, N, O)``.
    """
    x, supports, weight, bias = autocast_inputs(x, supports, weight, bias)
    check_gconv_inputs(x, supports, weight, bias, cheb_k, activation)
    backend = backends.resolve_backend("gconv", x.device)
    return _gconv_op(x, supports, weight, bias, cheb_k, activation, backend)


backends.register_impl("torch", "meta_gconv", _torch_gconv.meta_gconv_forward)
backends.register_impl("torch", "meta_gconv_backward", _torch_gconv.meta_gconv_backward)
backends.register_impl("torch", "gconv", _torch_gconv.gconv_forward)
backends.register_impl("torch", "gconv_backward", _torch_gconv.gconv_backward)

try:  # registers the triton backend; the module imports triton lazily, so this never needs it
    from . import _triton_gconv  # noqa: F401,E402
except ImportError:  # pragma: no cover
    pass

try:  # registers the cpu and cuda backends (csrc/ extension); loading is deferred to the first probe
    from . import _ext  # noqa: F401,E402
except ImportError:  # pragma: no cover
    pass
