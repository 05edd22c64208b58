"""Kernels that the compile gate (bench/compile_gate.py) must reject, one per rule; used by
tests/test_compile_gate.py in a subprocess without the interpreter."""

import triton
import triton.language as tl


@triton.jit
def square_tile(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    """``c = a @ b`` for one ``BLOCK`` x ``BLOCK`` tile: does not compile when ``BLOCK`` is not a power
    of two (24 here: ``tl.arange`` needs one)."""
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


@triton.jit
def running_sum(x_ptr, out_ptr, steps, BLOCK: tl.constexpr):
    """Sums ``steps`` tiles of ``BLOCK`` x ``BLOCK`` in registers: with 256 x 256 on one warp (2048
    values a thread) it spills far beyond the gate's bound."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for step in range(steps):
        acc += tl.load(x_ptr + step * BLOCK * BLOCK + tile)
    tl.store(out_ptr + tile, acc)


@triton.jit
def matmul_tiles(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A pipelined GEMM tile; with 256 x 256 x 128 fp32 tiles its staged operands overflow shared memory."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :])
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * BLOCK_N + offs_n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)
