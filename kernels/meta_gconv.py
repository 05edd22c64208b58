"""Triton kernels of the meta-parameter graph convolution (``stfast::meta_gconv``).

Notation (see DESIGN.md): ``M = B*N`` rows, propagated features ``xg (M, I)`` with ``I = K*C``,
row embeddings ``E[m, :]`` (``D`` wide), pools ``P (D, I, O)`` and ``Pb (D, O)``. With
``z[m, (d, i)] = E[m, d] * xg[m, i]`` the layer is ``y = z @ P.reshape(D*I, O)``: one dense GEMM
whose K dimension is ``D*I``. The kernels never store ``z`` (nor any per-row weight): each
``(BLOCK_M, BLOCK_I)`` tile of ``xg`` is loaded once and rescaled by one column of ``E`` per ``d``
in registers right before its ``tl.dot``.

Meta axes: the embedding of row ``m = (b, n)`` is read in the kernel through three strides
``(stride_eb, stride_en, stride_ed)``: ``(N*D, D, 1)`` for ST ``(B, N, D)``, ``(0, D, 1)`` for S
``(N, D)`` and ``(D, 0, 1)`` for T ``(B, D)``; nothing is expanded in memory.

Kernels (all deterministic: every output element is written by exactly one program, which
reduces in registers in a fixed order; no atomics):

- ``meta_gconv_fwd``: ``act(z @ P + E @ Pb)``; grid ``(M / BLOCK_M, O / BLOCK_O)``.
- ``meta_gconv_bwd_dxg_de``: ``dxg[m, i] = sum_d E[m, d] (g @ P[d]^T)[m, i]`` and the per-row
  ``dE[m, d] = sum_i xg[m, i] (g @ P[d]^T)[m, i] + g[m] . Pb[d]``; grid ``(M / BLOCK_M, 1)``
  when dE is wanted (the program owns whole rows and loops over every i-tile), else
  ``(M / BLOCK_M, I / BLOCK_I)``.
- ``meta_gconv_bwd_dp``: ``dP[d] = sum_m (E[m, d] xg[m])^T g[m]``; grid
  ``(D, I / BLOCK_I, O / BLOCK_O)``, each program loops over all of ``M``.

Here ``g = dy * act'(y)``. Block sizes are fixed (no autotuning yet): see ``_blocks``. Every launch
(grid, constexprs, warps, stages) comes from ``forward_launch`` / ``backward_launches``, pure
functions of the shapes that the compile gate (``bench/compile_gate.py``) compiles for sm_80 / sm_90.
The launchers take contiguous tensors and return fp32 per-row ``dE`` (reduced to the embedding's
shape by the caller, see ``stfast/ops/_triton_gconv.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, block_size, check_launchable, device_of, dot_precision, is_interpreted

__all__ = [
    "ACTIVATION_CODES",
    "backward_launches",
    "embedding_strides",
    "forward_launch",
    "meta_gconv_forward",
    "meta_gconv_backward",
    "meta_gconv_fwd",
    "meta_gconv_bwd_dxg_de",
    "meta_gconv_bwd_dp",
]

ACTIVATION_CODES = {None: 0, "sigmoid": 1, "tanh": 2}


# ---------------------------------------------------------------- jitted helpers

@triton.jit
def _row_embedding_offsets(rows, N, stride_eb, stride_en):
    # Row m = (b, n) of the (B*N) rows reads embedding E[b*stride_eb + n*stride_en + d*stride_ed].
    b = rows // N
    n = rows - b * N
    return b * stride_eb + n * stride_en


@triton.jit
def _activate(acc, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # sigmoid
        acc = 1.0 / (1.0 + tl.exp(-acc))
    elif ACTIVATION == 2:  # tanh, written with exp so that it needs no libdevice; saturates to +-1
        acc = 1.0 - 2.0 / (tl.exp(2.0 * acc) + 1.0)
    return acc


# ---------------------------------------------------------------- forward

@triton.jit
def meta_gconv_fwd(
    xg_ptr, e_ptr, p_ptr, pb_ptr, out_ptr,
    M, N, I, O, D,
    stride_eb, stride_en, stride_ed,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    mask_m = rows < M
    mask_o = offs_o < O
    e_rows = e_ptr + _row_embedding_offsets(rows, N, stride_eb, stride_en)

    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    # K = D*I walked as (i-tile, d): the xg tile is loaded once per i-tile and rescaled per d.
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + offs_i
        mask_i = cols < I
        x = tl.load(xg_ptr + rows[:, None] * I + cols[None, :],
                    mask=mask_m[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        p_tile = p_ptr + cols[:, None] * O + offs_o[None, :]
        mask_p = mask_i[:, None] & mask_o[None, :]
        for d in range(D):
            e = tl.load(e_rows + d * stride_ed, mask=mask_m, other=0.0).to(tl.float32)
            z = (x * e[:, None]).to(p_ptr.dtype.element_ty)  # the outer-product tile, registers only
            p = tl.load(p_tile + d * I * O, mask=mask_p, other=0.0)
            acc = tl.dot(z, p, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:  # E[m, :] @ Pb: D rank-1 updates, negligible next to the GEMM
        for d in range(D):
            e = tl.load(e_rows + d * stride_ed, mask=mask_m, other=0.0).to(tl.float32)
            pb = tl.load(pb_ptr + d * O + offs_o, mask=mask_o, other=0.0).to(tl.float32)
            acc += e[:, None] * pb[None, :]
    acc = _activate(acc, ACTIVATION)
    tl.store(out_ptr + rows[:, None] * O + offs_o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_o[None, :])


# ---------------------------------------------------------------- backward: dxg and dE

@triton.jit
def meta_gconv_bwd_dxg_de(
    g_ptr, xg_ptr, e_ptr, p_ptr, pb_ptr, dxg_ptr, de_ptr,
    M, N, I, O, D, I_SPAN,
    stride_eb, stride_en, stride_ed,
    NEED_DXG: tl.constexpr,
    NEED_DE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (pid_m, pid_i) owns rows [pid_m*BLOCK_M, +BLOCK_M) and columns [pid_i*I_SPAN, +I_SPAN)
    # of dxg. When dE is wanted I_SPAN covers all of I, so the program also owns whole rows of dE
    # and reduces them in registers (de_acc) without atomics.
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < M
    offs_i = tl.arange(0, BLOCK_I)
    offs_o = tl.arange(0, BLOCK_O)
    offs_d = tl.arange(0, BLOCK_D)
    e_rows = e_ptr + _row_embedding_offsets(rows, N, stride_eb, stride_en)

    de_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    i_lo = pid_i * I_SPAN
    for i0 in range(i_lo, i_lo + I_SPAN, BLOCK_I):
        cols = i0 + offs_i
        mask_i = cols < I
        if NEED_DE:
            x = tl.load(xg_ptr + rows[:, None] * I + cols[None, :],
                        mask=mask_m[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        dxg_acc = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        for o0 in range(0, O, BLOCK_O):
            outs = o0 + offs_o
            mask_o = outs < O
            g = tl.load(g_ptr + rows[:, None] * O + outs[None, :],
                        mask=mask_m[:, None] & mask_o[None, :], other=0.0)
            # P[d]^T tile (BLOCK_O, BLOCK_I), read transposed through its pointers.
            pt_tile = p_ptr + cols[None, :] * O + outs[:, None]
            mask_pt = mask_o[:, None] & mask_i[None, :]
            for d in range(D):
                pt = tl.load(pt_tile + d * I * O, mask=mask_pt, other=0.0)
                t = tl.dot(g, pt, input_precision=INPUT_PRECISION)  # (g @ P[d]^T) tile, fp32
                if NEED_DXG:
                    e = tl.load(e_rows + d * stride_ed, mask=mask_m, other=0.0).to(tl.float32)
                    dxg_acc += e[:, None] * t
                if NEED_DE:
                    part = tl.sum(x * t, axis=1)
                    de_acc += tl.where(offs_d[None, :] == d, part[:, None], 0.0)
        if NEED_DXG:
            tl.store(dxg_ptr + rows[:, None] * I + cols[None, :], dxg_acc.to(dxg_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & mask_i[None, :])

    if NEED_DE:
        mask_d = offs_d < D
        if HAS_BIAS:  # + g[m, :] @ Pb^T, as dots with the (BLOCK_O, BLOCK_D) tile of Pb^T
            for o0 in range(0, O, BLOCK_O):
                outs = o0 + offs_o
                mask_o = outs < O
                g = tl.load(g_ptr + rows[:, None] * O + outs[None, :],
                            mask=mask_m[:, None] & mask_o[None, :], other=0.0)
                pbt = tl.load(pb_ptr + offs_d[None, :] * O + outs[:, None],
                              mask=mask_o[:, None] & mask_d[None, :], other=0.0)
                de_acc = tl.dot(g, pbt, de_acc, input_precision=INPUT_PRECISION)
        tl.store(de_ptr + rows[:, None] * D + offs_d[None, :], de_acc,
                 mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------- backward: dP

@triton.jit
def meta_gconv_bwd_dp(
    g_ptr, xg_ptr, e_ptr, dp_ptr,
    M, N, I, O,
    stride_eb, stride_en, stride_ed,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # Program (d, pid_i, pid_o) owns the dP[d] tile and reduces over every row in order.
    d = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_o = tl.program_id(2)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_i = cols < I
    mask_o = outs < O
    offs_m = tl.arange(0, BLOCK_M)

    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        mask_m = rows < M
        e = tl.load(e_ptr + _row_embedding_offsets(rows, N, stride_eb, stride_en) + d * stride_ed,
                    mask=mask_m, other=0.0).to(tl.float32)
        # z^T tile (BLOCK_I, BLOCK_M): xg read transposed through its pointers, scaled per column.
        xt = tl.load(xg_ptr + rows[None, :] * I + cols[:, None],
                     mask=mask_i[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
        zt = (xt * e[None, :]).to(g_ptr.dtype.element_ty)
        g = tl.load(g_ptr + rows[:, None] * O + outs[None, :],
                    mask=mask_m[:, None] & mask_o[None, :], other=0.0)
        acc = tl.dot(zt, g, acc, input_precision=INPUT_PRECISION)
    tl.store(dp_ptr + d * I * O + cols[:, None] * O + outs[None, :], acc.to(dp_ptr.dtype.element_ty),
             mask=mask_i[:, None] & mask_o[None, :])


# ---------------------------------------------------------------- launch configuration

# Block sizes (fixed until autotuning lands):
# - BLOCK_M 64 rows: enough rows per program to feed tensor cores and reuse each P tile 64 times;
#   M = B*N is in the thousands in practice.
# - BLOCK_I <= 32: I = K*C is small and not a multiple of 16 (HimNet's decoder: 134); tiles pad
#   per d, so 32 wastes 16% there where 64 would waste 30%. Never below 16 (tl.dot minimum).
# - BLOCK_O <= 64: O is 64..128 for HimNet's gates; two column tiles double the forward grid.
# - BLOCK_D (dE only) covers all of D in one register tile, at least 16 (it is a tl.dot dim).
# Small problems shrink the tiles (down to 16) so that the interpreter stays fast on tiny tests.
NUM_WARPS = 4
NUM_STAGES = 3


def _blocks(rows: int, inputs: int, outputs: int) -> tuple[int, int, int]:
    return block_size(rows, 16, 64), block_size(inputs, 16, 32), block_size(outputs, 16, 64)


def forward_launch(rows: int, inputs: int, outputs: int, dim: int, *, has_bias: bool, activation,
                   input_precision: str) -> Launch:
    """The ``meta_gconv_fwd`` launch for ``xg (rows, inputs)``, ``outputs`` columns and embedding
    width ``dim``."""
    block_m, block_i, block_o = _blocks(rows, inputs, outputs)
    return Launch("meta_gconv_fwd", (triton.cdiv(rows, block_m), triton.cdiv(outputs, block_o)), dict(
        HAS_BIAS=has_bias, ACTIVATION=ACTIVATION_CODES[activation], INPUT_PRECISION=input_precision,
        BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_O=block_o,
    ), NUM_WARPS, NUM_STAGES)


def dxg_de_span(inputs: int, outputs: int, rows: int, need_e: bool) -> int:
    """Columns of ``dxg`` per program: all of ``I`` (rounded up to tiles) when dE is wanted (whole
    rows per program, no atomics), else one ``BLOCK_I`` tile."""
    block_i = _blocks(rows, inputs, outputs)[1]
    return triton.cdiv(inputs, block_i) * block_i if need_e else block_i


def backward_launches(rows: int, inputs: int, outputs: int, dim: int, *, need_xg: bool, need_e: bool,
                      need_pool: bool, has_bias: bool, input_precision: str) -> dict[str, Launch]:
    """The backward's launches by role (``dxg_de``, ``dp``), only those that run for these shapes
    and needs."""
    block_m, block_i, block_o = _blocks(rows, inputs, outputs)
    launches = {}
    if (need_xg or need_e) and rows and (need_e or inputs):
        grid = (triton.cdiv(rows, block_m), 1 if need_e else triton.cdiv(inputs, block_i))
        launches["dxg_de"] = Launch("meta_gconv_bwd_dxg_de", grid, dict(
            NEED_DXG=bool(need_xg), NEED_DE=bool(need_e), HAS_BIAS=has_bias, INPUT_PRECISION=input_precision,
            BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_O=block_o, BLOCK_D=block_size(dim, 16, 1 << 30),
        ), NUM_WARPS, NUM_STAGES)
    if need_pool and dim * inputs * outputs:
        grid = (dim, triton.cdiv(inputs, block_i), triton.cdiv(outputs, block_o))
        launches["dp"] = Launch("meta_gconv_bwd_dp", grid, dict(
            INPUT_PRECISION=input_precision, BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_O=block_o,
        ), NUM_WARPS, NUM_STAGES)
    return launches


# ---------------------------------------------------------------- launchers

def embedding_strides(embeddings: torch.Tensor, axis: str) -> tuple[int, int, int]:
    """``(stride_eb, stride_en, stride_ed)`` reading the embedding of row ``(b, n)`` in place."""
    if axis == "ST":
        return embeddings.stride(0), embeddings.stride(1), embeddings.stride(2)
    if axis == "S":
        return 0, embeddings.stride(0), embeddings.stride(1)
    if axis == "T":
        return embeddings.stride(0), 0, embeddings.stride(1)
    raise ValueError(f"axis: expected 'S', 'T' or 'ST', got {axis!r}")


def _check_contiguous(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: the triton launchers expect a contiguous tensor")


def _module():
    import sys

    return sys.modules[__name__]


def meta_gconv_forward(xg, embeddings, axis, nodes, pool, bias_pool, activation, input_precision=None):
    """``act(sum_d E[m, d] (xg[m] @ P[d] + Pb[d]))`` for ``xg (M, I)``; returns ``(M, O)``.

    ``embeddings`` is ``(N, D)``, ``(B, D)`` or ``(B, N, D)`` for ``axis`` S, T or ST with
    ``M = B*N`` and ``nodes = N``; any strides. ``input_precision``: see ``dot_precision``.
    """
    _check_contiguous(xg=xg, weights_pool=pool, bias_pool=bias_pool)
    check_launchable(meta_gconv_fwd, xg, embeddings, pool, bias_pool)
    rows, inputs = xg.shape
    dim, _, outputs = pool.shape
    out = torch.empty(rows, outputs, device=xg.device, dtype=xg.dtype)
    if rows == 0 or outputs == 0:
        return out
    launch = forward_launch(
        rows, inputs, outputs, dim, has_bias=bias_pool is not None, activation=activation,
        input_precision=dot_precision(xg.dtype, is_interpreted(meta_gconv_fwd), input_precision))
    with device_of(xg):
        launch(_module(), xg, embeddings, pool, bias_pool if bias_pool is not None else pool, out,
               rows, nodes, inputs, outputs, dim, *embedding_strides(embeddings, axis))
    return out


def meta_gconv_backward(grad, xg, embeddings, axis, nodes, pool, bias_pool, need_xg, need_e, need_pool,
                        input_precision=None):
    """``(d xg (M, I), per-row dE (M, D) in fp32, dP (D, I, O))`` from ``grad = g (M, O)``, the
    gradient of the pre-activation; ``None`` for what is not needed. ``dE`` includes the bias term
    ``g @ Pb^T``; ``dPb`` is left to the caller (a small GEMM)."""
    _check_contiguous(grad=grad, xg=xg, weights_pool=pool, bias_pool=bias_pool)
    check_launchable(meta_gconv_bwd_dp, grad, xg, embeddings, pool, bias_pool)
    rows, inputs = xg.shape
    dim, _, outputs = pool.shape
    launches = backward_launches(
        rows, inputs, outputs, dim, need_xg=need_xg, need_e=need_e, need_pool=need_pool,
        has_bias=bias_pool is not None,
        input_precision=dot_precision(xg.dtype, is_interpreted(meta_gconv_bwd_dp), input_precision))
    strides = embedding_strides(embeddings, axis)
    module = _module()
    d_xg = torch.empty_like(xg) if need_xg else None
    d_e = torch.empty(rows, dim, device=xg.device, dtype=torch.float32) if need_e else None
    d_pool = torch.empty_like(pool) if need_pool else None

    with device_of(xg):
        if "dxg_de" in launches:
            launches["dxg_de"](module, grad, xg, embeddings, pool, bias_pool if bias_pool is not None else pool,
                               d_xg if d_xg is not None else xg, d_e if d_e is not None else grad,
                               rows, nodes, inputs, outputs, dim, dxg_de_span(inputs, outputs, rows, need_e), *strides)
        elif d_e is not None:
            d_e.zero_()
        if "dp" in launches:
            launches["dp"](module, grad, xg, embeddings, d_pool, rows, nodes, inputs, outputs, *strides)
    return d_xg, d_e, d_pool
