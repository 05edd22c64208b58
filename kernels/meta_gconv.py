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

- ``meta_gconv_fwd``: ``act(z @ P + E @ Pb)``; grid ``(M / BLOCK_M, O / BLOCK_O)``. With
  ``BLOCK_O = 128`` all of O <= 128 (HimNet's gates) is one tile, so each program reads the weight
  pool once for its rows instead of once per 64-column tile.
- ``meta_gconv_bwd_dxg_de``: ``dxg[m, i] = sum_d E[m, d] (g @ P[d]^T)[m, i]`` and the per-row
  ``dE[m, d] = sum_i xg[m, i] (g @ P[d]^T)[m, i] + g[m] . Pb[d]``; grid ``(M / BLOCK_M, I / BLOCK_I)``
  with or without dE, so the grid scales with I (METR-LA b16 on tensor cores: 52 x 5 = 260
  programs, where one program per row tile gave 52). A program finishes its I tile's contribution
  to ``dE[:, d]`` inside the ``d`` loop and stores it as that tile's partial, ``(I tiles, M, D)`` in
  fp32; the launcher sums the partials over tiles (a torch reduction, the same order every run). No
  ``(BLOCK_M, D)`` accumulator lives in registers (at D = 64 it spilled), at the price of writing and
  reading ``I tiles x M x D x 4`` bytes (PEMS07 b64, TF32: 18 MB against ~90 MB the kernel moves
  anyway). With all of O in one tile (``ONE_O_TILE``) ``g`` is loaded once per program.
- ``meta_gconv_bwd_dp``: ``dP[d] = sum_m (E[m, d] xg[m])^T g[m]``; grid
  ``(D, I / BLOCK_I, O / BLOCK_O)``, each program loops over all of ``M``.

Here ``g = dy * act'(y)``. Every launch (grid, constexprs, warps, stages) comes from pure functions of
the shapes: ``forward_candidates`` / ``dxg_de_candidates`` / ``dp_candidates`` list a few tile
configurations per kernel (the heuristic default first), and ``forward_launch`` / ``backward_launches``
choose one deterministically (``stfast.kernels._utils.choose``: the measured winner for the device and
the bucketed shapes in ``stfast.kernels._tuned``, written by ``bench/tune_triton.py``, else the
default). Why these tiles: every candidate compiles without register spills at sm_90 and sm_80 in
every precision (the compile gate, ``bench/compile_gate.py``, compiles them all; spill bound 0).
Tensor-core products (TF32, bf16, fp16) default to 64-row tiles with all of O <= 128 in one tile on
8 warps; IEEE fp32 products run on FMA units, whose ``tl.dot`` holds both operands in registers, so
their tiles are 32 rows by 16-wide I steps on 4 warps (8-warp FMA tiles spilled kilobytes).
``BLOCK_I`` of 16 or 32 pads HimNet's I = 134 little; never below 16 (the ``tl.dot`` minimum). The
launchers take contiguous tensors and return fp32 per-row ``dE``
(reduced to the embedding's shape by the caller, see ``stfast/ops/_triton_gconv.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (Launch, block_size, bucket, check_launchable, choose, device_of, distinct_configs,
                     dot_precision, is_interpreted)

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
    M, N, I, O, D,
    stride_eb, stride_en, stride_ed,
    NEED_DXG: tl.constexpr,
    NEED_DE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_O_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # Program (pid_m, pid_i) owns rows [pid_m*BLOCK_M, +BLOCK_M) and the I tile [pid_i*BLOCK_I, +BLOCK_I):
    # that tile of dxg and, when dE is wanted, the tile's partial of dE, de_ptr[pid_i, rows, d] in fp32,
    # finished per d (d is the outer loop) and stored at once: no (BLOCK_M, D) accumulator in
    # registers. The launcher sums the partials over tiles in a fixed order; the bias term
    # g @ Pb^T goes into tile 0's partial.
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < M
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = cols < I
    offs_o = tl.arange(0, BLOCK_O)
    e_rows = e_ptr + _row_embedding_offsets(rows, N, stride_eb, stride_en)
    g_rows = g_ptr + rows[:, None] * O
    # P[d]^T tiles (BLOCK_O, BLOCK_I), read transposed through their pointers.
    pt_tile = p_ptr + cols[None, :] * O + offs_o[:, None]
    if NEED_DE:
        x = tl.load(xg_ptr + rows[:, None] * I + cols[None, :],
                    mask=mask_m[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        de_rows = de_ptr + pid_i.to(tl.int64) * M * D + rows * D
    if ONE_O_TILE:  # all of O in one tile: g is loaded once, not once per d
        mask_o = offs_o < O
        g = tl.load(g_rows + offs_o[None, :], mask=mask_m[:, None] & mask_o[None, :], other=0.0)

    dxg_acc = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    for d in range(D):
        bias_part = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if ONE_O_TILE:
            pt = tl.load(pt_tile + d * I * O, mask=mask_o[:, None] & mask_i[None, :], other=0.0)
            t = tl.dot(g, pt, input_precision=INPUT_PRECISION)  # (g @ P[d]^T) tile, fp32
            if HAS_BIAS and NEED_DE:
                if pid_i == 0:
                    pb = tl.load(pb_ptr + d * O + offs_o, mask=mask_o, other=0.0).to(tl.float32)
                    bias_part = tl.sum(g.to(tl.float32) * pb[None, :], axis=1)
        else:
            t = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
            for o0 in range(0, O, BLOCK_O):
                outs = o0 + offs_o
                mask_o = outs < O
                g = tl.load(g_rows + outs[None, :], mask=mask_m[:, None] & mask_o[None, :], other=0.0)
                pt = tl.load(pt_tile + o0 + d * I * O, mask=mask_o[:, None] & mask_i[None, :], other=0.0)
                t = tl.dot(g, pt, t, input_precision=INPUT_PRECISION)
                if HAS_BIAS and NEED_DE:
                    if pid_i == 0:
                        pb = tl.load(pb_ptr + d * O + outs, mask=mask_o, other=0.0).to(tl.float32)
                        bias_part += tl.sum(g.to(tl.float32) * pb[None, :], axis=1)
        if NEED_DXG:
            e = tl.load(e_rows + d * stride_ed, mask=mask_m, other=0.0).to(tl.float32)
            dxg_acc += e[:, None] * t
        if NEED_DE:
            tl.store(de_rows + d, tl.sum(x * t, axis=1) + bias_part, mask=mask_m)
    if NEED_DXG:
        tl.store(dxg_ptr + rows[:, None] * I + cols[None, :], dxg_acc.to(dxg_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_i[None, :])


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

# Small problems shrink the tiles (``_shrunk``, down to 16) so that the interpreter stays fast on tiny
# tests.
NUM_STAGES = 3


def _tile(extent: int, high: int) -> int:
    return block_size(extent, 16, high)


def _launch(kernel, grid, flags, blocks, warps, stages=NUM_STAGES) -> Launch:
    return Launch(kernel, grid, {**flags, **blocks}, warps, stages)


# Candidate tiles (BLOCK_M, BLOCK_I, BLOCK_O, num_warps) per kernel and dot path, default first. Each
# one, also as ``_shrunk`` shrinks it for small shapes, compiles without spills at sm_90 and sm_80 in
# the compile gate. Tensor cores: all of O <= 128 in one tile on 8 warps. FMA (IEEE fp32): ``tl.dot``
# holds both operands in registers, so 32-row tiles on 4 warps; 8-warp FMA tiles spilled KBs.
FORWARD_CONFIGS = {
    "tensor_cores": [(64, 32, 128, 8), (64, 32, 64, 4), (128, 32, 128, 8), (64, 16, 128, 4)],
    "fma": [(32, 16, 128, 4), (32, 32, 64, 4), (32, 16, 64, 4)],
}
DXG_DE_CONFIGS = {  # (64, 32|16, 64, 4) spilled at sm_80 when O > 64 (the o loop): not candidates
    "tensor_cores": [(64, 32, 128, 8), (128, 32, 128, 8), (64, 16, 128, 4)],
    "fma": [(32, 16, 128, 4), (32, 32, 64, 4), (32, 16, 64, 4)],
}
DP_CONFIGS = {
    "tensor_cores": [(64, 32, 64, 4), (64, 32, 128, 8), (128, 32, 64, 4), (32, 32, 64, 4)],
    "fma": [(64, 16, 64, 4), (32, 32, 64, 4), (64, 16, 128, 8), (32, 32, 128, 4)],
}


def _path(dtype: torch.dtype, input_precision: str) -> str:
    """Where ``tl.dot`` runs: IEEE fp32 products on FMA units (register-hungry), the rest on tensor cores."""
    return "fma" if dtype == torch.float32 and input_precision == "ieee" else "tensor_cores"


def _key(rows, inputs, outputs, dim, dtype, input_precision) -> tuple:
    return (bucket(rows), bucket(inputs), bucket(outputs), bucket(dim), str(dtype).removeprefix("torch."),
            input_precision)


def forward_candidates(rows: int, inputs: int, outputs: int, dim: int, *, has_bias: bool, activation,
                       input_precision: str, dtype: torch.dtype = torch.float32) -> list[Launch]:
    """The ``meta_gconv_fwd`` launches tuning chooses among for ``xg (rows, inputs)``, ``outputs``
    columns and embedding width ``dim``; the first is the default."""
    flags = dict(HAS_BIAS=has_bias, ACTIVATION=ACTIVATION_CODES[activation], INPUT_PRECISION=input_precision)
    configs = FORWARD_CONFIGS[_path(dtype, input_precision)]
    return distinct_configs(
        _launch("meta_gconv_fwd", (triton.cdiv(rows, bm), triton.cdiv(outputs, bo)), flags,
                dict(BLOCK_M=bm, BLOCK_I=bi, BLOCK_O=bo), warps)
        for bm, bi, bo, warps in _shrunk(configs, rows, inputs, outputs))


def forward_launch(rows: int, inputs: int, outputs: int, dim: int, *, has_bias: bool, activation,
                   input_precision: str, dtype: torch.dtype = torch.float32, device=None) -> Launch:
    """The ``meta_gconv_fwd`` launch that runs (``choose`` among ``forward_candidates``)."""
    candidates = forward_candidates(rows, inputs, outputs, dim, has_bias=has_bias, activation=activation,
                                    input_precision=input_precision, dtype=dtype)
    return choose(candidates, _key(rows, inputs, outputs, dim, dtype, input_precision), device)


def _shrunk(configs, rows, inputs, outputs):
    """``(BLOCK_M, BLOCK_I, BLOCK_O, warps)`` tiles no larger than the problem needs (down to 16), and
    fewer warps for tiles too small to give 8 warps work."""
    for bm, bi, bo, warps in configs:
        bm, bi, bo = _tile(rows, bm), _tile(inputs, bi), _tile(outputs, bo)
        yield bm, bi, bo, warps if bm * bo >= 64 * 128 else min(warps, 4)



def dxg_de_candidates(rows: int, inputs: int, outputs: int, dim: int, *, need_xg: bool, need_e: bool,
                      has_bias: bool, input_precision: str, dtype: torch.dtype = torch.float32) -> list[Launch]:
    """The ``meta_gconv_bwd_dxg_de`` launches tuning chooses among; the first is the default. Grid
    ``(row tiles, I tiles)`` with or without dE (see the kernel: dE partials per I tile)."""
    configs = DXG_DE_CONFIGS[_path(dtype, input_precision)]
    launches = []
    for bm, bi, bo, warps in _shrunk(configs, rows, inputs, outputs):
        flags = dict(NEED_DXG=bool(need_xg), NEED_DE=bool(need_e), HAS_BIAS=has_bias, ONE_O_TILE=outputs <= bo,
                     INPUT_PRECISION=input_precision)
        launches.append(_launch("meta_gconv_bwd_dxg_de", (triton.cdiv(rows, bm), max(1, triton.cdiv(inputs, bi))),
                                flags, dict(BLOCK_M=bm, BLOCK_I=bi, BLOCK_O=bo), warps))
    return distinct_configs(launches)


def dp_candidates(rows: int, inputs: int, outputs: int, dim: int, *, input_precision: str,
                  dtype: torch.dtype = torch.float32) -> list[Launch]:
    """The ``meta_gconv_bwd_dp`` launches tuning chooses among; the first is the default."""
    flags = dict(INPUT_PRECISION=input_precision)
    configs = DP_CONFIGS[_path(dtype, input_precision)]
    return distinct_configs(
        _launch("meta_gconv_bwd_dp", (dim, triton.cdiv(inputs, bi), triton.cdiv(outputs, bo)), flags,
                dict(BLOCK_M=bm, BLOCK_I=bi, BLOCK_O=bo), warps)
        for bm, bi, bo, warps in _shrunk(configs, rows, inputs, outputs))


def backward_launches(rows: int, inputs: int, outputs: int, dim: int, *, need_xg: bool, need_e: bool,
                      need_pool: bool, has_bias: bool, input_precision: str, dtype: torch.dtype = torch.float32,
                      device=None) -> dict[str, Launch]:
    """The backward's launches by role (``dxg_de``, ``dp``), only those that run for these shapes
    and needs (each ``choose`` among its candidates)."""
    key = _key(rows, inputs, outputs, dim, dtype, input_precision)
    launches = {}
    if (need_xg or need_e) and rows and (need_e or inputs):
        launches["dxg_de"] = choose(dxg_de_candidates(
            rows, inputs, outputs, dim, need_xg=need_xg, need_e=need_e, has_bias=has_bias,
            input_precision=input_precision, dtype=dtype), key + (bool(need_xg), bool(need_e)), device)
    if need_pool and dim * inputs * outputs:
        launches["dp"] = choose(dp_candidates(rows, inputs, outputs, dim, input_precision=input_precision,
                                              dtype=dtype), key, device)
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
        input_precision=dot_precision(xg.dtype, is_interpreted(meta_gconv_fwd), input_precision),
        dtype=xg.dtype, device=xg.device)
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
        input_precision=dot_precision(xg.dtype, is_interpreted(meta_gconv_bwd_dp), input_precision),
        dtype=xg.dtype, device=xg.device)
    strides = embedding_strides(embeddings, axis)
    module = _module()
    d_xg = torch.empty_like(xg) if need_xg else None
    d_pool = torch.empty_like(pool) if need_pool else None
    d_e = None
    if need_e and "dxg_de" not in launches:  # no rows
        d_e = torch.zeros(rows, dim, device=xg.device, dtype=torch.float32)

    with device_of(xg):
        if "dxg_de" in launches:
            launch = launches["dxg_de"]
            # dE partials per I tile (tiles, rows, dim), summed below in a fixed order.
            partials = torch.empty(launch.grid[1], rows, dim, device=xg.device, dtype=torch.float32) if need_e else None
            launch(module, grad, xg, embeddings, pool, bias_pool if bias_pool is not None else pool,
                   d_xg if d_xg is not None else xg, partials if partials is not None else grad,
                   rows, nodes, inputs, outputs, dim, *strides)
            if need_e:
                d_e = partials[0] if partials.shape[0] == 1 else partials.sum(0)
        if "dp" in launches:
            launches["dp"](module, grad, xg, embeddings, d_pool, rows, nodes, inputs, outputs, *strides)
    return d_xg, d_e, d_pool
