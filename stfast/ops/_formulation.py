"""FLOP counts of the exact formulations of the meta GEMM, and the choice between them.

The meta GEMM of ``meta_gconv`` (DESIGN.md: ``y[m] = sum_d E[m, d] (xg[m] @ P[d] + Pb[d])`` over
``M = B*N`` rows) has two exact formulations on a GPU:

- **outer**: ``z[m, (d, i)] = E[m, d] xg[m, i]`` formed on the fly, then one GEMM with ``K = D*I``
  (the ``triton`` and ``cuda`` kernels); the bias is ``E[m] @ Pb``, ``D`` rank-1 updates per row.
  Every row pays for all ``D`` embedding columns: ``2 M D (I + 1) O`` FLOPs.
- **hoisted**: generate each distinct weight once, ``W = E @ P`` (and ``E @ Pb``), then apply it
  with a batched GEMM (``_torch_gconv``'s hoisted helpers, cuBLAS on a GPU):
  ``2 W D (I + 1) O + 2 M I O`` FLOPs, where ``W`` is the number of distinct weights: ``N`` for the
  S axis (one per node), ``B`` for T (one per sample), ``M`` for ST (one per row).

So ``hoisted / outer ~ W / M + 1 / D``: for S that is ``1/B + 1/D``, for T ``1/N + 1/D``. At HimNet's
shapes (``D = 16``, batches of 8 to 64) hoisting the S and T axes does 5 to 16 times fewer FLOPs
(PEMS07 b64, S encoder gate: 31 GFLOP outer against 2.4 hoisted). With ``B = 1`` (S), ``N = 1``
(T) or ``D = 1`` (without a bias; with one, while ``M / W <= I + 1``) the outer kernel is the
cheaper one, and for ST it always is (``W = M``: generating a weight per row costs more than
applying it). :func:`cheapest_formulation` picks by the count, per axis, shape and direction; the
``triton`` and ``cuda`` backends follow it (:func:`call_formulation`), and
``stfast.benchmarks.roofline`` counts its useful FLOPs here. The hoisted form's price is memory
held only during the call: the ``(W, I, O)`` weights (and their gradient in the backward), e.g.
0.59 GB each in fp32 for the S axis of LargeST's CA (N = 8600, I = 134, O = 128); nothing more is
kept for the backward.

Counting rule: a multiply-add is 2 FLOPs; only products are counted (``count`` independent
``(m, k) @ (k, n)`` products cost ``2 count m k n``); elementwise work (forming ``z``, the
activation, bias additions, sums over rows) is not. Backward: each forward product ``C = A B``
contributes one product of its own size per operand whose gradient is needed (``dA = dC B^T``,
``dB = A^T dC``); the hoisted backward also regenerates ``W`` when ``d xg`` is needed (the forward
does not keep it: it is ``(W, I, O)``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORMULATIONS", "NEEDS", "call_formulation", "cheapest_formulation", "formulation_flops", "weight_count"]

FORMULATIONS = ("hoisted", "outer")
NEEDS = ("xg", "e", "pool", "bias")  # the gradients of the meta GEMM: d xg, dE, dP, dPb


@dataclass(frozen=True)
class _Product:
    """``count`` products ``(m, k) @ (k, n)``; the gradient of the left (right) operand is needed when
    any of ``left`` (``right``) is."""

    count: int
    m: int
    k: int
    n: int
    left: tuple[str, ...]
    right: tuple[str, ...]

    @property
    def flops(self) -> float:
        return 2.0 * self.count * self.m * self.k * self.n


def weight_count(axis: str, batch: int, nodes: int) -> int:
    """How many distinct weight matrices the meta axis generates: N (S), B (T) or B*N (ST)."""
    if axis not in ("S", "T", "ST"):
        raise ValueError(f"axis: expected 'S', 'T' or 'ST', got {axis!r}")
    return {"S": nodes, "T": batch, "ST": batch * nodes}[axis]


def _products(formulation, axis, batch, nodes, inputs, outputs, dim, has_bias) -> list[_Product]:
    rows = batch * nodes
    weights = weight_count(axis, batch, nodes)
    if formulation == "outer":
        products = [_Product(1, rows, dim * inputs, outputs, ("xg", "e"), ("pool",))]
        bias = _Product(rows, 1, dim, outputs, ("e",), ("bias",))
    else:
        rows_per_weight = rows // weights if weights else 0
        products = [_Product(1, weights, dim, inputs * outputs, ("e",), ("pool",)),  # W = E @ P
                    _Product(weights, rows_per_weight, inputs, outputs, ("xg",), ("e", "pool"))]  # xg @ W
        bias = _Product(1, weights, dim, outputs, ("e",), ("bias",))  # E @ Pb
    return products + ([bias] if has_bias else [])


def _backward_flops(formulation, products, needs) -> float:
    flops = sum(p.flops * (bool(needs & set(p.left)) + bool(needs & set(p.right))) for p in products)
    if formulation == "hoisted" and "xg" in needs:
        flops += products[0].flops  # W regenerated for d xg = g @ W^T
    return flops


def _needs(needs) -> set[str]:
    if needs is None:
        return set(NEEDS)
    needs = set(needs)
    if not needs <= set(NEEDS):
        raise ValueError(f"needs: expected names among {list(NEEDS)}, got {sorted(needs)}")
    return needs


def formulation_flops(axis: str, batch: int, nodes: int, inputs: int, outputs: int, dim: int,
                      has_bias: bool = True, *, needs=None) -> dict[str, dict[str, float]]:
    """``{"hoisted": {"forward": F, "backward": F}, "outer": {...}}``: the FLOPs of the meta GEMM of
    ``xg (batch*nodes, inputs)`` with ``P (dim, inputs, outputs)`` (and ``Pb (dim, outputs)`` when
    ``has_bias``) in each formulation, forward and backward. ``needs`` names the gradients the
    backward computes (among ``NEEDS``; default: all)."""
    wanted = _needs(needs)
    counts = {}
    for formulation in FORMULATIONS:
        products = _products(formulation, axis, batch, nodes, inputs, outputs, dim, has_bias)
        counts[formulation] = {"forward": sum(p.flops for p in products),
                               "backward": _backward_flops(formulation, products, wanted)}
    return counts


def cheapest_formulation(axis: str, batch: int, nodes: int, inputs: int, outputs: int, dim: int,
                         has_bias: bool = True, *, backward: bool = False, needs=None) -> str:
    """``"hoisted"`` or ``"outer"``, whichever costs fewer FLOPs in that direction (a tie goes to
    ``"outer"``: one kernel, no ``(W, I, O)`` temporary)."""
    direction = "backward" if backward else "forward"
    counts = formulation_flops(axis, batch, nodes, inputs, outputs, dim, has_bias, needs=needs)
    return "hoisted" if counts["hoisted"][direction] < counts["outer"][direction] else "outer"


def call_formulation(x_shape, pool_shape, has_bias: bool, axis: str, needs=None) -> str:
    """:func:`cheapest_formulation` of a ``meta_gconv`` call from its shapes, ``x (B, N, C)`` and
    ``P (D, K*C, O)``: of the forward when ``needs`` is None, else of the backward computing the
    gradients flagged in ``needs`` (``dx, d supports, dE, dP, dPb``, as the backends receive them).
    The ``triton`` and ``cuda`` backends run their outer-product kernels where this says ``"outer"``
    and the hoisted torch GEMMs where it says ``"hoisted"``."""
    batch, nodes, _ = x_shape
    dim, inputs, outputs = pool_shape
    if needs is None:
        return cheapest_formulation(axis, batch, nodes, inputs, outputs, dim, has_bias)
    need_x, need_supports, need_e, need_pool, need_bias = needs
    wanted = {"xg": need_x or need_supports, "e": need_e, "pool": need_pool, "bias": need_bias and has_bias}
    return cheapest_formulation(axis, batch, nodes, inputs, outputs, dim, has_bias, backward=True,
                                needs={name for name, need in wanted.items() if need})
