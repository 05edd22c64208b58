"""The ``triton`` backend of ``meta_gconv``: registration and the glue around the kernels.

Same signatures and semantics as ``_torch_gconv.meta_gconv_forward`` / ``meta_gconv_backward``.

Formulation: the kernels compute the meta GEMM in the "outer" formulation (``K = D*I``). For the S
and T axes the "hoisted" one (``W = E @ P`` once per node / sample, then a batched GEMM) costs
about ``D`` times fewer FLOPs at HimNet's shapes, so each call (forward, and backward for the
gradients it needs) runs the formulation with fewer FLOPs by ``_formulation.call_formulation``:
hoisted is the torch backend's hoisted path (cuBLAS GEMMs on a GPU), outer the kernels. ST is
always outer (a weight per row); so are S / T where hoisting saves nothing: a batch of one (S), one
node (T), ``D = 1`` without a bias (``_formulation`` has the count).

The kernels (``stfast.kernels.meta_gconv``) do the outer meta-parameter GEMMs; around them, with torch:

- Chebyshev propagation ``xg = [x, A x, 2 A (A x) - x, ...]`` and its backward (plain GEMMs with
  the supports, helpers from ``_torch_gconv``). Fusing the propagation into the meta GEMM (so
  ``xg`` is never written) is a later step.
- ``g = dy * act'(y)``, the reduction of per-row ``dE`` onto the S / T embedding's shape (a
  deterministic sum) and ``dPb = E^T g`` (a small GEMM).

Only ``meta_gconv`` is registered: the plain ``gconv`` (one ordinary GEMM after propagation)
stays on the torch backend, so forcing ``triton`` for ``gconv`` reports "no gconv kernel yet".

This module never imports Triton itself: the kernel module is imported on the first call, so
``import stfast`` works (and stays light) without Triton. Under ``TRITON_INTERPRET=1`` (tests),
that first import must happen with the variable set: Triton decides at decoration time.
"""

from __future__ import annotations

from . import _torch_gconv, backends
from ._formulation import call_formulation
from ._torch_gconv import activation_backward, chebyshev_backward, chebyshev_features, reduce_to_axis

__all__ = ["meta_gconv_forward", "meta_gconv_backward"]


# "auto": each call runs the formulation with fewer FLOPs (see the module docstring); "outer": always
# the kernels (tests and benchmarks compare them with the hoisted path this way).
FORMULATION = "auto"


def _formulation(x, pool, bias_pool, axis, needs=None) -> str:
    if FORMULATION == "outer":
        return "outer"
    if FORMULATION != "auto":
        raise ValueError(f"_triton_gconv.FORMULATION: expected 'auto' or 'outer', got {FORMULATION!r}")
    return call_formulation(x.shape, pool.shape, bias_pool is not None, axis, needs)


def _kernels():
    from stfast.kernels import meta_gconv as kernels  # imports triton; first call only

    return kernels


def meta_gconv_forward(x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis):
    if _formulation(x, pool, bias_pool, axis) == "hoisted":
        return _torch_gconv.meta_gconv_forward(x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis,
                                               formulation="hoisted")
    kernels = _kernels()
    batch, nodes, _ = x.shape
    xg = chebyshev_features(x, supports, cheb_k)  # torch GEMMs for now (see the module docstring)
    xg = xg.reshape(batch * nodes, -1).contiguous()
    out = kernels.meta_gconv_forward(
        xg, embeddings, axis, nodes, pool.contiguous(),
        None if bias_pool is None else bias_pool.contiguous(), activation,
    )
    return out.reshape(batch, nodes, -1)


def meta_gconv_backward(grad, out, x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis, needs):
    """``(dx, d supports, dE, dP, dPb)``, ``None`` where ``needs`` (same order) is false."""
    if _formulation(x, pool, bias_pool, axis, needs) == "hoisted":
        return _torch_gconv.meta_gconv_backward(grad, out, x, supports, embeddings, pool, bias_pool, cheb_k,
                                                activation, axis, needs, formulation="hoisted")
    kernels = _kernels()
    need_x, need_supports, need_e, need_pool, need_bias = needs
    need_supports = need_supports and supports is not None
    need_xg = need_x or need_supports
    need_bias = need_bias and bias_pool is not None
    batch, nodes, _ = x.shape
    dim = embeddings.shape[-1]

    grad = activation_backward(grad.contiguous(), out, activation).reshape(batch * nodes, -1).contiguous()
    xg = chebyshev_features(x, supports, cheb_k)  # recomputed, as in the torch backend
    inputs = xg.shape[-1]
    d_xg, d_e, d_pool = kernels.meta_gconv_backward(
        grad, xg.reshape(batch * nodes, inputs).contiguous(), embeddings, axis, nodes, pool.contiguous(),
        None if bias_pool is None else bias_pool.contiguous(), need_xg, need_e, need_pool,
    )
    if d_e is not None:  # per-row fp32 -> the embedding's shape (S: sum over samples, T: over nodes)
        d_e = reduce_to_axis(d_e, axis, batch, nodes).to(embeddings.dtype)
    d_bias = None
    if need_bias:
        grad_axis = reduce_to_axis(grad, axis, batch, nodes).reshape(-1, grad.shape[-1])
        d_bias = embeddings.reshape(-1, dim).t() @ grad_axis
    d_x = d_supports = None
    if need_xg:
        d_x, d_supports = chebyshev_backward(d_xg.reshape(batch, nodes, inputs), xg, supports, cheb_k, need_supports)
    return d_x, d_supports, d_e, d_pool, d_bias


backends.register_impl("triton", "meta_gconv", meta_gconv_forward)
backends.register_impl("triton", "meta_gconv_backward", meta_gconv_backward)
