"""Triton kernels of the node-adaptive low-rank linear (``stfast::node_lora``).

Notation (see DESIGN.md): ``x (M, N, K)`` with ``K = d_in`` (the caller's leading batch axes
flattened into ``M``), base ``W (O, K)`` with ``O = d_out`` and bias ``b (O)``, per node
``A (N, K, R)`` and ``B (N, R, O)``; row ``(m, n)`` of ``x`` is global row ``m*N + n``.

    y[m, n] = x[m, n] W^T + b + scale * act(drop(x[m, n]) A[n]) B[n]

The node index is the adapter index (as in multi-LoRA serving kernels): a program owns one node
and a tile of batch rows, so its rows share one ``A[n]`` and one ``B[n]`` and need no sorting.
The rank is padded to ``R_PAD >= 16`` (a ``tl.dot`` dimension) by masks.

Dropout (low-rank path only) is counter-based: element ``(row, k)`` is kept when
``tl.rand(seed, offset + row*K + k) >= p`` (Philox), so every kernel that needs the mask draws it
again from ``(seed, offset)`` instead of reading a stored one.

Kernels (all deterministic: every output element is written by exactly one program, which
reduces in registers in a fixed order; no atomics):

- ``node_lora_fwd``: grid ``(N * M / BLOCK_M,)`` (one flat axis, node-major). Shrink
  ``h = drop(x) A[n]`` (kept in registers), activation, then per output tile expand ``act(h) B[n]``,
  base GEMM ``x W^T`` and bias in the same accumulator, one store.
- ``node_lora_bwd_rows``: grid ``(N * M / BLOCK_M,)``, as the forward. Recomputes ``h``; writes per row
  ``gh = act'(h) * scale * (g B[n]^T)`` and ``sa = scale * act(h)`` (``R_PAD`` fp32 values each,
  small next to ``x``) and, if wanted, ``dx = g W + drop'(gh A[n]^T)``.
- ``node_lora_bwd_da``: grid ``(N, K / BLOCK_K)``: ``dA[n] = drop(x_n)^T gh_n``, looping over all
  batch tiles of node ``n`` in order.
- ``node_lora_bwd_db``: grid ``(N, O / BLOCK_O)``: ``dB[n] = sa_n^T g_n``, same loop.
- ``node_lora_bwd_dw``: grid ``(O / BLOCK_O, K / BLOCK_K, S)``: split ``s`` of the ``M*N`` rows
  gives partial ``dW = g^T x`` and (first K tile) ``db = sum g``; the launcher sums the ``S``
  partials with ``torch.sum`` (a fixed order, deterministic). ``S`` depends only on the shapes.

``g`` is the gradient of ``y``. Block sizes are fixed (no autotuning yet): see ``_blocks``. Every
launch (grid, constexprs, warps, stages) comes from ``forward_launch`` / ``backward_launches``, pure
functions of the shapes that the compile gate (``bench/compile_gate.py``) compiles for sm_80 / sm_90.
``seed`` and ``offset`` are not specialised on (``do_not_specialize``): a new seed per step does not
recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, block_size, check_launchable, device_of, dot_precision, is_interpreted

__all__ = [
    "ACTIVATION_CODES",
    "LEAKY_RELU_SLOPE",
    "MAX_RANK",
    "backward_launches",
    "check_rank",
    "forward_launch",
    "node_lora_forward",
    "node_lora_backward",
    "dropout_keep_mask",
    "node_lora_fwd",
    "node_lora_bwd_rows",
    "node_lora_bwd_da",
    "node_lora_bwd_db",
    "node_lora_bwd_dw",
]

ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
LEAKY_RELU_SLOPE = 0.01  # as torch.nn.LeakyReLU and the torch backend


# ---------------------------------------------------------------- jitted helpers

@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # relu; a NaN h fails the test and passes through, as torch.relu propagates it
        h = tl.where(h < 0, 0.0, h)
    elif ACTIVATION == 2:  # leaky_relu
        h = tl.where(h > 0, h, h * 0.01)
    elif ACTIVATION == 3:  # tanh, written with exp so that it needs no libdevice; saturates to +-1
        h = 1.0 - 2.0 / (tl.exp(2.0 * h) + 1.0)
    elif ACTIVATION == 4:  # sigmoid
        h = 1.0 / (1.0 + tl.exp(-h))
    return h


@triton.jit
def _activation_grad(h, ACTIVATION: tl.constexpr):
    """``act'(h)`` from the pre-activation."""
    if ACTIVATION == 1:  # ATen's threshold_backward: a NaN h passes the gradient through
        d = tl.where(h <= 0, 0.0, 1.0)
    elif ACTIVATION == 2:
        d = tl.where(h > 0, 1.0, 0.01)
    elif ACTIVATION == 3:
        t = 1.0 - 2.0 / (tl.exp(2.0 * h) + 1.0)
        d = 1.0 - t * t
    elif ACTIVATION == 4:
        s = 1.0 / (1.0 + tl.exp(-h))
        d = s * (1.0 - s)
    else:
        d = tl.full(h.shape, 1.0, tl.float32)
    return d


@triton.jit
def _dropped(x, seed, offset, rows, cols, K, p, inv_keep):
    """``x * keep / (1 - p)`` for the tile of global ``rows`` (as a column) x ``cols`` (as a row);
    ``keep = tl.rand(seed, offset + row*K + col) >= p``. Works for either orientation of the tile
    as long as ``rows`` and ``cols`` are given broadcast to it."""
    r = tl.rand(seed, offset + rows * K + cols)
    return tl.where(r >= p, x * inv_keep, 0.0)


@triton.jit
def _node_and_batch_tile(M, BLOCK_M: tl.constexpr):
    """``(node, batch tile)`` of this program on the flat grid ``N * cdiv(M, BLOCK_M)``, node-major
    (consecutive programs share one node's ``A[n]`` and ``B[n]``)."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    n = pid // m_tiles
    return n, pid - n * m_tiles


@triton.jit
def _shrink(x_ptr, a_ptr, rows, mask_m, n, K, R, seed, offset, p, inv_keep,
            HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """``h = drop(x[rows]) A[n]`` as a ``(BLOCK_M, R_PAD)`` fp32 tile."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _dropped(x.to(tl.float32), seed, offset, rows[:, None], cols[None, :], K, p, inv_keep)
        a = tl.load(a_ptr + n * K * R + cols[:, None] * R + offs_r[None, :],
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        h = tl.dot(x.to(a.dtype), a, h, input_precision=INPUT_PRECISION)
    return h


# ---------------------------------------------------------------- forward

@triton.jit(do_not_specialize=["seed", "offset"])
def node_lora_fwd(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr,
    M, N, K, O, R,
    scale, seed, offset, p, inv_keep,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    R_PAD: tl.constexpr,
):
    n, pid_m = _node_and_batch_tile(M, BLOCK_M)
    batch = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = batch < M
    rows = batch * N + n  # global rows of x / out
    offs_k = tl.arange(0, BLOCK_K)
    offs_o = tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    h = _shrink(x_ptr, a_ptr, rows, mask_m, n, K, R, seed, offset, p, inv_keep,
                HAS_DROPOUT, INPUT_PRECISION, BLOCK_M, BLOCK_K, R_PAD)
    act = (_activate(h, ACTIVATION) * scale).to(b_ptr.dtype.element_ty)  # padded rank columns stay 0

    for o0 in range(0, O, BLOCK_O):
        outs = o0 + offs_o
        mask_o = outs < O
        bn = tl.load(b_ptr + n * R * O + offs_r[:, None] * O + outs[None, :],
                     mask=mask_r[:, None] & mask_o[None, :], other=0.0)
        acc = tl.dot(act, bn, input_precision=INPUT_PRECISION)  # expand
        for k0 in range(0, K, BLOCK_K):  # base GEMM into the same accumulator
            cols = k0 + offs_k
            mask_k = cols < K
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptr + outs[None, :] * K + cols[:, None], mask=mask_k[:, None] & mask_o[None, :], other=0.0)
            acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + outs, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * O + outs[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_o[None, :])


# ---------------------------------------------------------------- backward: per-row terms and dx

@triton.jit(do_not_specialize=["seed", "offset"])
def node_lora_bwd_rows(
    g_ptr, x_ptr, w_ptr, a_ptr, b_ptr, gh_ptr, sa_ptr, dx_ptr,
    M, N, K, O, R,
    scale, seed, offset, p, inv_keep,
    NEED_GH: tl.constexpr,
    NEED_SA: tl.constexpr,
    NEED_DX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    R_PAD: tl.constexpr,
):
    n, pid_m = _node_and_batch_tile(M, BLOCK_M)
    batch = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = batch < M
    rows = batch * N + n
    offs_k = tl.arange(0, BLOCK_K)
    offs_o = tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    # The scratch rows are written over their whole padded width (padded rank columns are 0) so
    # that the dA / dB kernels never read uninitialised memory.
    mask_rows = mask_m[:, None] & (offs_r < R_PAD)[None, :]

    h = _shrink(x_ptr, a_ptr, rows, mask_m, n, K, R, seed, offset, p, inv_keep,
                HAS_DROPOUT, INPUT_PRECISION, BLOCK_M, BLOCK_K, R_PAD)
    if NEED_SA:
        sa = tl.where(mask_r[None, :], _activate(h, ACTIVATION) * scale, 0.0)
        tl.store(sa_ptr + rows[:, None] * R_PAD + offs_r[None, :], sa, mask=mask_rows)
    if NEED_GH:
        ga = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for o0 in range(0, O, BLOCK_O):
            outs = o0 + offs_o
            mask_o = outs < O
            g = tl.load(g_ptr + rows[:, None] * O + outs[None, :], mask=mask_m[:, None] & mask_o[None, :], other=0.0)
            bt = tl.load(b_ptr + n * R * O + offs_r[None, :] * O + outs[:, None],  # B[n]^T tile (BLOCK_O, R_PAD)
                         mask=mask_o[:, None] & mask_r[None, :], other=0.0)
            ga = tl.dot(g, bt, ga, input_precision=INPUT_PRECISION)
        gh = ga * scale * _activation_grad(h, ACTIVATION)
        tl.store(gh_ptr + rows[:, None] * R_PAD + offs_r[None, :], gh, mask=mask_rows)  # padded columns: 0

        if NEED_DX:
            gh_in = gh.to(a_ptr.dtype.element_ty)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + offs_k
                mask_k = cols < K
                at = tl.load(a_ptr + n * K * R + cols[None, :] * R + offs_r[:, None],  # A[n]^T tile (R_PAD, BLOCK_K)
                             mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                low = tl.dot(gh_in, at, input_precision=INPUT_PRECISION)
                if HAS_DROPOUT:
                    low = _dropped(low, seed, offset, rows[:, None], cols[None, :], K, p, inv_keep)
                acc = low
                for o0 in range(0, O, BLOCK_O):  # + g W
                    outs = o0 + offs_o
                    mask_o = outs < O
                    g = tl.load(g_ptr + rows[:, None] * O + outs[None, :],
                                mask=mask_m[:, None] & mask_o[None, :], other=0.0)
                    w = tl.load(w_ptr + outs[:, None] * K + cols[None, :], mask=mask_o[:, None] & mask_k[None, :],
                                other=0.0)
                    acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
                tl.store(dx_ptr + rows[:, None] * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
                         mask=mask_m[:, None] & mask_k[None, :])


# ---------------------------------------------------------------- backward: dA and dB (per node)

@triton.jit(do_not_specialize=["seed", "offset"])
def node_lora_bwd_da(
    x_ptr, gh_ptr, da_ptr,
    M, N, K, R,
    seed, offset, p, inv_keep,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
):
    n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = cols < K
    offs_r = tl.arange(0, R_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        batch = (m0 + offs_m).to(tl.int64)
        mask_m = batch < M
        rows = batch * N + n
        # drop(x)^T tile (BLOCK_K, BLOCK_M), read transposed through its pointers
        xt = tl.load(x_ptr + rows[None, :] * K + cols[:, None], mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = _dropped(xt.to(tl.float32), seed, offset, rows[None, :], cols[:, None], K, p, inv_keep)
        gh = tl.load(gh_ptr + rows[:, None] * R_PAD + offs_r[None, :], mask=mask_m[:, None], other=0.0)
        acc = tl.dot(xt.to(da_ptr.dtype.element_ty), gh.to(da_ptr.dtype.element_ty), acc,
                     input_precision=INPUT_PRECISION)
    tl.store(da_ptr + n * K * R + cols[:, None] * R + offs_r[None, :], acc.to(da_ptr.dtype.element_ty),
             mask=mask_k[:, None] & (offs_r < R)[None, :])


@triton.jit
def node_lora_bwd_db(
    g_ptr, sa_ptr, db_ptr,
    M, N, O, R,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    R_PAD: tl.constexpr,
):
    n = tl.program_id(0)
    pid_o = tl.program_id(1)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = outs < O
    offs_r = tl.arange(0, R_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((R_PAD, BLOCK_O), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        batch = (m0 + offs_m).to(tl.int64)
        mask_m = batch < M
        rows = batch * N + n
        sat = tl.load(sa_ptr + rows[None, :] * R_PAD + offs_r[:, None], mask=mask_m[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * O + outs[None, :], mask=mask_m[:, None] & mask_o[None, :], other=0.0)
        acc = tl.dot(sat.to(g.dtype), g, acc, input_precision=INPUT_PRECISION)
    tl.store(db_ptr + n * R * O + offs_r[:, None] * O + outs[None, :], acc.to(db_ptr.dtype.element_ty),
             mask=(offs_r < R)[:, None] & mask_o[None, :])


# ---------------------------------------------------------------- backward: dW and db (split rows)

@triton.jit
def node_lora_bwd_dw(
    g_ptr, x_ptr, dw_ptr, dbias_ptr,
    ROWS, K, O, ROWS_PER_SPLIT,
    NEED_DW: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_o = outs < O
    mask_k = cols < K
    offs = tl.arange(0, BLOCK_ROWS)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = split.to(tl.int64) * ROWS_PER_SPLIT
    for r0 in range(0, ROWS_PER_SPLIT, BLOCK_ROWS):
        rows = start + r0 + offs
        mask_rows = rows < ROWS
        gt = tl.load(g_ptr + rows[None, :] * O + outs[:, None], mask=mask_o[:, None] & mask_rows[None, :], other=0.0)
        if NEED_DW:
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask_rows[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(gt, x, acc, input_precision=INPUT_PRECISION)
        if NEED_DBIAS:
            bias_acc += tl.sum(gt.to(tl.float32), axis=1)
    if NEED_DW:
        tl.store(dw_ptr + split * O * K + outs[:, None] * K + cols[None, :], acc,
                 mask=mask_o[:, None] & mask_k[None, :])
    if NEED_DBIAS:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if pid_k == 0:  # the first K tile's programs own db
            tl.store(dbias_ptr + split * O + outs, bias_acc, mask=mask_o)


# ---------------------------------------------------------------- dropout mask (tests, debugging)

@triton.jit(do_not_specialize=["seed", "offset"])
def _dropout_keep_kernel(out_ptr, ROWS, K, seed, offset, p, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < ROWS)[:, None] & (cols < K)[None, :]
    one = tl.full((BLOCK_ROWS, BLOCK_K), 1.0, tl.float32)
    keep = _dropped(one, seed, offset, rows[:, None], cols[None, :], K, p, 1.0)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep, mask=mask)


def dropout_keep_mask(rows: int, k: int, p: float, seed: int, offset: int, device) -> torch.Tensor:
    """The ``(rows, k)`` 0/1 keep-mask (fp32) the kernels draw for ``x (M, N, K)`` viewed as
    ``(M*N, K)``, from ``(seed, offset)``."""
    out = torch.empty(rows, k, device=device, dtype=torch.float32)
    check_launchable(_dropout_keep_kernel, out)
    if out.numel():
        grid = (triton.cdiv(rows, 32), triton.cdiv(k, 32))
        _dropout_keep_kernel[grid](out, rows, k, seed, offset, float(p), BLOCK_ROWS=32, BLOCK_K=32)
    return out


# ---------------------------------------------------------------- launch configuration

# Block sizes (fixed until autotuning lands):
# - BLOCK_M <= 64 batch rows per program: one node's rows; B = 64 in the benchmark gives one tile
#   per node and N programs (883 for the benchmark, 207 for METR-LA), enough to fill a GPU.
# - BLOCK_K, BLOCK_O <= 64: d_in / d_out are 32..256; larger tiles would spill with the
#   (BLOCK_M, R_PAD) low-rank tile held across the output loop.
# - R_PAD: the rank rounded up to a power of two, at least 16 (a tl.dot dimension), at most
#   MAX_RANK: the padded rank lives in registers and shared memory whole (no rank tiling), and the
#   compile gate (bench/compile_gate.py) shows the kernels fitting sm_80's and sm_90's shared memory
#   up to that rank.
# Small problems shrink the tiles (down to 16) so that the interpreter stays fast on tiny tests.
NUM_WARPS = 4
NUM_STAGES = 3
MAX_RANK = 128


def _blocks(batch: int, k: int, o: int, rank: int) -> tuple[int, int, int, int]:
    return (block_size(batch, 16, 64), block_size(k, 16, 64), block_size(o, 16, 64),
            block_size(rank, 16, MAX_RANK))


def check_rank(rank: int) -> None:
    """Refuse a rank the kernels cannot hold (see ``MAX_RANK``) before anything is launched."""
    if rank > MAX_RANK:
        raise ValueError(
            f"lora_a: rank {rank} is above the triton backend's limit of {MAX_RANK} (its kernels keep the "
            f"padded rank whole in registers and shared memory); the torch, cpu and cuda backends take any rank")


def _splits(rows: int, tiles: int, block_rows: int) -> int:
    """How many row splits the dW / db reduction uses: enough programs to fill a GPU (~512 with the
    (O, K) tiles), never a split shorter than 8 row blocks. A function of the shapes only."""
    wanted = max(1, 512 // max(tiles, 1))
    return max(1, min(wanted, triton.cdiv(rows, 8 * block_rows)))


def _row_grid(batch: int, nodes: int, block_m: int) -> tuple[int]:
    # One flat axis (limit 2**31 - 1) for (node, batch tile): a second grid axis would stop at 65535
    # batch tiles, i.e. about 4.2M flattened leading rows.
    return (nodes * triton.cdiv(batch, block_m),)


def forward_launch(batch: int, nodes: int, k: int, o: int, rank: int, *, has_bias: bool, dropout_p: float,
                   activation, input_precision: str) -> Launch:
    """The ``node_lora_fwd`` launch for ``x (batch, nodes, k)``, ``o`` outputs and rank ``rank``."""
    check_rank(rank)
    block_m, block_k, block_o, r_pad = _blocks(batch, k, o, rank)
    return Launch("node_lora_fwd", _row_grid(batch, nodes, block_m), dict(
        HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0, ACTIVATION=ACTIVATION_CODES[activation],
        INPUT_PRECISION=input_precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_O=block_o, R_PAD=r_pad,
    ), NUM_WARPS, NUM_STAGES)


def dw_rows_per_split(batch: int, nodes: int, k: int, o: int, rank: int) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of the dW / db reduction over the ``batch * nodes`` rows."""
    _, block_k, block_o, _ = _blocks(batch, k, o, rank)
    rows = batch * nodes
    block_rows = block_size(rows, 16, 64)
    splits = _splits(rows, triton.cdiv(o, block_o) * triton.cdiv(k, block_k), block_rows)
    return splits, triton.cdiv(triton.cdiv(rows, splits), block_rows) * block_rows


def backward_launches(batch: int, nodes: int, k: int, o: int, rank: int, *, needs, has_bias: bool,
                      dropout_p: float, activation, input_precision: str) -> dict[str, Launch]:
    """The backward's launches by role (``rows``, ``da``, ``db``, ``dw``), only those ``needs``
    (``(x, weight, bias, lora_a, lora_b)``) calls for."""
    check_rank(rank)
    need_x, need_weight, need_bias, need_a, need_b = (bool(n) for n in needs)
    need_bias = need_bias and has_bias
    need_gh = need_x or need_a
    block_m, block_k, block_o, r_pad = _blocks(batch, k, o, rank)
    has_dropout = dropout_p > 0
    launches = {}
    if (need_gh or need_b) and batch * nodes:
        launches["rows"] = Launch("node_lora_bwd_rows", _row_grid(batch, nodes, block_m), dict(
            NEED_GH=need_gh, NEED_SA=need_b, NEED_DX=need_x, HAS_DROPOUT=has_dropout,
            ACTIVATION=ACTIVATION_CODES[activation], INPUT_PRECISION=input_precision,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_O=block_o, R_PAD=r_pad,
        ), NUM_WARPS, NUM_STAGES)
    if need_a:
        launches["da"] = Launch("node_lora_bwd_da", (nodes, triton.cdiv(k, block_k)), dict(
            HAS_DROPOUT=has_dropout, INPUT_PRECISION=input_precision, BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad,
        ), NUM_WARPS, NUM_STAGES)
    if need_b:
        launches["db"] = Launch("node_lora_bwd_db", (nodes, triton.cdiv(o, block_o)), dict(
            INPUT_PRECISION=input_precision, BLOCK_M=block_m, BLOCK_O=block_o, R_PAD=r_pad,
        ), NUM_WARPS, NUM_STAGES)
    if need_weight or need_bias:
        splits, _ = dw_rows_per_split(batch, nodes, k, o, rank)
        # At least one K tile even when d_in == 0: its programs own db (an empty grid would leave the
        # bias gradient's partials unwritten).
        k_tiles = max(1, triton.cdiv(k, block_k))
        launches["dw"] = Launch("node_lora_bwd_dw", (triton.cdiv(o, block_o), k_tiles, splits), dict(
            NEED_DW=need_weight, NEED_DBIAS=need_bias, INPUT_PRECISION=input_precision,
            BLOCK_ROWS=block_size(batch * nodes, 16, 64), BLOCK_K=block_k, BLOCK_O=block_o,
        ), NUM_WARPS, NUM_STAGES)
    return launches


# ---------------------------------------------------------------- launchers

def _check_contiguous(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: the triton launchers expect a contiguous tensor")


def _dropout_args(dropout_p: float):
    return float(dropout_p), (1.0 / (1.0 - dropout_p)) if dropout_p > 0 else 1.0


def _module():
    import sys

    return sys.modules[__name__]


def node_lora_forward(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, offset,
                      input_precision=None):
    """``x (M, N, K)`` -> ``(M, N, O)``; all tensors contiguous, one dtype. ``input_precision``: see
    ``dot_precision``."""
    _check_contiguous(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    check_launchable(node_lora_fwd, x, weight, bias, lora_a, lora_b)
    batch, nodes, k = x.shape
    o, rank = weight.shape[0], lora_a.shape[-1]
    launch = forward_launch(
        batch, nodes, k, o, rank, has_bias=bias is not None, dropout_p=dropout_p, activation=activation,
        input_precision=dot_precision(x.dtype, is_interpreted(node_lora_fwd), input_precision))
    out = torch.empty(batch, nodes, o, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    p, inv_keep = _dropout_args(dropout_p)
    with device_of(x):
        launch(_module(), x, weight, bias if bias is not None else weight, lora_a, lora_b, out,
               batch, nodes, k, o, rank, float(scale), seed, offset, p, inv_keep)
    return out


def node_lora_backward(grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, offset, needs,
                       input_precision=None):
    """``(dx, dW, db, dA, dB)`` from ``grad (M, N, O)``; ``None`` where ``needs`` is false."""
    need_x, need_weight, need_bias, need_a, need_b = needs
    need_bias = need_bias and bias is not None
    _check_contiguous(grad=grad, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    check_launchable(node_lora_bwd_rows, grad, x, weight, bias, lora_a, lora_b)
    batch, nodes, k = x.shape
    o, rank = weight.shape[0], lora_a.shape[-1]
    launches = backward_launches(
        batch, nodes, k, o, rank, needs=needs, has_bias=bias is not None, dropout_p=dropout_p, activation=activation,
        input_precision=dot_precision(x.dtype, is_interpreted(node_lora_bwd_rows), input_precision))
    r_pad = _blocks(batch, k, o, rank)[3]
    p, inv_keep = _dropout_args(dropout_p)
    rows = batch * nodes
    module = _module()
    d_x = d_weight = d_bias = d_a = d_b = None

    with device_of(x):
        need_gh = need_x or need_a
        gh = torch.empty(rows, r_pad, device=x.device, dtype=torch.float32) if need_gh else None
        sa = torch.empty(rows, r_pad, device=x.device, dtype=torch.float32) if need_b else None
        d_x = torch.empty_like(x) if need_x else None
        if "rows" in launches:
            launches["rows"](module, grad, x, weight, lora_a, lora_b,
                             gh if gh is not None else grad, sa if sa is not None else grad,
                             d_x if d_x is not None else x,
                             batch, nodes, k, o, rank, float(scale), seed, offset, p, inv_keep)
        if "da" in launches:
            d_a = torch.empty_like(lora_a)
            launches["da"](module, x, gh, d_a, batch, nodes, k, rank, seed, offset, p, inv_keep)
        if "db" in launches:
            d_b = torch.empty_like(lora_b)
            launches["db"](module, grad, sa, d_b, batch, nodes, o, rank)
        if "dw" in launches:
            splits, rows_per_split = dw_rows_per_split(batch, nodes, k, o, rank)
            partial_w = torch.empty(splits, o, k, device=x.device, dtype=torch.float32) if need_weight else None
            partial_b = torch.empty(splits, o, device=x.device, dtype=torch.float32) if need_bias else None
            launches["dw"](module, grad, x, partial_w if partial_w is not None else grad,
                           partial_b if partial_b is not None else grad, rows, k, o, rows_per_split)
            if need_weight:
                d_weight = partial_w.sum(0).to(weight.dtype)
            if need_bias:
                d_bias = partial_b.sum(0).to(bias.dtype)
    return d_x, d_weight, d_bias, d_a, d_b
