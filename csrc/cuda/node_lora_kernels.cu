// CUDA kernels of stfast_ext::node_lora_fwd / node_lora_bwd / node_lora_dropout_mask, with raw-pointer
// launchers (see node_lora_kernels.h). No torch headers: this file compiles with plain nvcc.
//
//   y[m, n] = x[m, n] W^T + bias + scale * act(drop(x[m, n]) A[n]) B[n]
//
// Two paths. The SIMT kernels (every dtype) are tiled FMA products on 256 threads (16 x 16); thread
// (ti, tj) owns the outputs (ti + 16 i, tj + 16 j) of its block's tile. The reduction runs kChunk = 32
// deep at a time: both operands of a chunk are staged in shared memory (transposed where needed, rows
// padded by one against bank conflicts), read with coalesced loads (the staging walks whichever index
// is contiguous in global memory), then multiplied from shared memory into registers. fp16 / bf16 are
// converted to fp32 when staged and accumulated in fp32 (fp64 for fp64); results are rounded once.
// The tensor-core kernels (WMMA, tensor_core_tile.cuh; section "tensor-core kernels" below) replace
// the forward, dx and dW / db for fp16 / bf16 and, as TF32, fp32 when NodeLoraDims::tensor_cores is
// set (the glue sets it on sm_80+, for fp32 only where torch allows TF32 matmuls); the low-rank rows,
// dA and dB (R-wide outputs) are always SIMT.
//
// Forward: one block per (node n, 32 rows m of that node). Per 64-wide output tile it accumulates
// x_tile W^T, then for each chunk of 32 ranks forms h = drop(x_tile) A[n][:, chunk] (fully reduced
// over K), stores scale * act(h) in shared memory (the rank-r intermediate never leaves the chip)
// and adds it times B[n][chunk, tile] into the same accumulator; + bias, one store per output.
// With r <= 32 (one chunk) h is computed once per block and kept for every output tile; with a
// larger rank it is recomputed per output tile (no limit on r, extra work r*K per row and tile).
//
// Backward (dropout mask drawn again from (seed, offset), never stored):
//   lowrank  per (n, 32 rows): grad_h = scale * (g B[n]^T) * act'(h) and scale * act(h) into
//            (M*N, R) buffers in the accumulation type, a 32-rank chunk at a time;
//   dx       per (n, 32 rows, 64 columns of K): mult * (grad_h A[n]^T) + g W;
//   dA       per (n, 64 of K, 32 of R): drop(x_n)^T grad_h_n, reduced over the node's M rows in order;
//   dB       per (n, 32 of R, 64 of O): (scale act(h))_n^T g_n, likewise;
//   dW / db  per (64 of O, 64 columns of [x, 1], row slice): g^T [x, 1] over the slice's rows into a
//            partial buffer, then sum_parts (cuda_common.cu) adds the slices in order.
//
// Tensor-core forward: one block per (node n, 64 rows); per 64-wide output tile acc = x W^T, then
// per chunk of 64 ranks h = drop(x) A[n] on tensor cores as well, scale * act(h) rounded to the MMA
// operand type into shared memory (kept for every output tile when R <= 64), acc += that B[n]. dx: per
// (n, 64 rows, 64 of K), grad_h A[n]^T, times the dropout multipliers through shared memory, then
// += g W in the same accumulators. dW / db: per (64 of O, 64 of [x, 1], row slice), as the SIMT one.
// The MMA operands are rounded (TF32 for fp32; grad_h, kept in fp32, to the storage type), so the
// tensor-core forward's h differs from the one the low-rank backward kernel recomputes in fp32 at that
// rounding level, as with any TF32 / half matmul.
//
// Determinism: no atomics; every output element is reduced in a fixed order by one thread (or one
// warp's MMAs), and the only cross-block reduction (dW / db over row slices) goes through partial
// buffers summed in slice order. Bitwise reproducible for the same inputs, shapes, GPU and path.
//
// Status: both paths compile with nvcc (csrc/cuda/compile_check.sh, CI) and run in the CPU emulation
// of tests/test_cuda_emulation.py (the WMMA calls through tests/cuda_emulation/shim/mma.h); neither
// has run on a GPU yet: tests/test_node_lora_ext_cuda.py checks them on a GPU machine.
#include "node_lora_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../node_lora_math.h"
#include "tensor_core_tile.cuh"

namespace stfast_cuda {
namespace {

using detail::Acc;
using detail::ceil_div;
using detail::dispatch;
using detail::Store;
using detail::to_acc;

constexpr int kThreads = 256;  // 16 x 16 threads
constexpr int kLanes = 16;     // threads along each side of a tile
constexpr int kChunk = 32;     // reduction depth staged per step

constexpr int kRowSub = 2;   // rows (of one node, or of R) per thread: 32-wide tiles
constexpr int kColSub = 4;   // columns per thread: 64-wide tiles
constexpr int kRankSub = 2;  // ranks per thread: 32-wide rank chunks
constexpr int kRowTile = kLanes * kRowSub;    // 32
constexpr int kColTile = kLanes * kColSub;    // 64
constexpr int kRankTile = kLanes * kRankSub;  // 32
static_assert(kRankTile == kChunk, "a chunk of h is exactly one staged reduction chunk of the expand");

constexpr int64_t kMaxBlocks = INT_MAX;  // grid.x limit
constexpr int64_t kRowsPerSlice = 512;   // dW / db: rows per partial slice (at least)
constexpr int64_t kMaxSlices = 64;
constexpr int64_t kTargetBlocks = 1024;  // dW / db: no more slices than needed for about this many blocks

// A staged chunk of an operand W wide: s[k * (W + 1) + w] for k < kChunk, w < W.
template <int W>
struct Staged {
  static constexpr int kPitch = W + 1;
  static constexpr int kSize = kChunk * kPitch;
};

__device__ __forceinline__ int lane_i() { return static_cast<int>(threadIdx.x) / kLanes; }
__device__ __forceinline__ int lane_j() { return static_cast<int>(threadIdx.x) % kLanes; }

// s[k][w] = load(w, k) for the whole chunk. kRedFast: consecutive threads walk k (the operand is
// contiguous along the reduction index in global memory), else they walk w.
template <int W, bool kRedFast, typename A, typename Load>
__device__ __forceinline__ void stage_chunk(A* s, const Load& load) {
  for (int idx = static_cast<int>(threadIdx.x); idx < W * kChunk; idx += kThreads) {
    const int k = kRedFast ? idx % kChunk : idx / W;
    const int w = kRedFast ? idx / kChunk : idx % W;
    s[k * Staged<W>::kPitch + w] = load(w, k);
  }
}

// acc[i][j] += sum_{k < kChunk} ls[k][ti + 16 i] * rs[k][tj + 16 j]; ls is 16*SI wide, rs 16*SJ.
template <int SI, int SJ, typename A>
__device__ __forceinline__ void mma_chunk(A (&acc)[SI][SJ], const A* ls, const A* rs) {
  constexpr int kPitchL = Staged<kLanes * SI>::kPitch;
  constexpr int kPitchR = Staged<kLanes * SJ>::kPitch;
  const int ti = lane_i(), tj = lane_j();
#pragma unroll 8
  for (int k = 0; k < kChunk; ++k) {
    A a[SI], b[SJ];
#pragma unroll
    for (int i = 0; i < SI; ++i) {
      a[i] = ls[k * kPitchL + ti + kLanes * i];
    }
#pragma unroll
    for (int j = 0; j < SJ; ++j) {
      b[j] = rs[k * kPitchR + tj + kLanes * j];
    }
#pragma unroll
    for (int i = 0; i < SI; ++i) {
#pragma unroll
      for (int j = 0; j < SJ; ++j) {
        acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
    }
  }
}

// acc[i][j] += sum_{red < len} L(ti + 16 i, red) * R(red, tj + 16 j) over the block's tile.
// load_l(i, red) / load_r(red, j) take the tile-local i / j and the global reduction index (always
// < len here) and return 0 outside their own bounds. Starts every chunk with a barrier, so the
// caller may reuse ls / rs right before; ends without one (the next staging starts with it). Every
// thread of the block must call it with the same len.
template <int SI, int SJ, bool kLRedFast, bool kRRedFast, typename A, typename LoadL, typename LoadR>
__device__ __forceinline__ void tile_gemm(A (&acc)[SI][SJ], int64_t len, A* ls, A* rs, const LoadL& load_l,
                                          const LoadR& load_r) {
  for (int64_t k0 = 0; k0 < len; k0 += kChunk) {
    __syncthreads();  // the previous chunk (or the caller's use of ls / rs) is consumed
    stage_chunk<kLanes * SI, kLRedFast>(ls, [&](int i, int k) -> A {
      const int64_t red = k0 + k;
      return red < len ? load_l(i, red) : A(0);
    });
    stage_chunk<kLanes * SJ, kRRedFast>(rs, [&](int j, int k) -> A {
      const int64_t red = k0 + k;
      return red < len ? load_r(red, j) : A(0);
    });
    __syncthreads();
    mma_chunk(acc, ls, rs);
  }
}

// The dropout multiplier of flat element `element` = r*K + k of x (1 without dropout).
template <typename A>
__device__ __forceinline__ A dropout_mult(const NodeLoraDims& d, int64_t element) {
  const uint64_t seed = static_cast<uint64_t>(d.seed[0]), offset = static_cast<uint64_t>(d.seed[1]);
  return static_cast<A>(stfast_math::dropout_multiplier(seed, offset + static_cast<uint64_t>(element), d.dropout_p,
                                                        d.inv_keep));
}

// drop(x) at flat element `element`, in the accumulation type.
template <typename A, typename T>
__device__ __forceinline__ A load_dropped(const T* x, int64_t element, const NodeLoraDims& d) {
  const A v = to_acc(x[element]);
  return d.dropout_p > 0.0f ? v * dropout_mult<A>(d, element) : v;
}

// h[i][j] = (drop(x) A[n])[row of m = m0 + ti + 16 i, rank r0 + tj + 16 j], reduced over all of K;
// 0 for ranks >= R and for rows m >= M (their loads are 0).
template <typename A, typename T>
__device__ __forceinline__ void shrink_chunk(A (&h)[kRowSub][kRankSub], const T* x, const T* la, int64_t n,
                                             int64_t m0, int64_t r0, const NodeLoraDims& d, A* ls, A* rs) {
  const int64_t M = d.M, N = d.N, K = d.K, R = d.R;
#pragma unroll
  for (int i = 0; i < kRowSub; ++i) {
#pragma unroll
    for (int j = 0; j < kRankSub; ++j) {
      h[i][j] = A(0);
    }
  }
  tile_gemm<kRowSub, kRankSub, true, false>(
      h, K, ls, rs,
      [&](int i, int64_t k) -> A {
        const int64_t m = m0 + i;
        return m < M ? load_dropped<A>(x, (m * N + n) * K + k, d) : A(0);
      },
      [&](int64_t k, int j) -> A {
        const int64_t r = r0 + j;
        return r < R ? to_acc(la[(n * K + k) * R + r]) : A(0);
      });
}

template <typename A, int SI, int SJ>
__device__ __forceinline__ void zero(A (&acc)[SI][SJ]) {
#pragma unroll
  for (int i = 0; i < SI; ++i) {
#pragma unroll
    for (int j = 0; j < SJ; ++j) {
      acc[i][j] = A(0);
    }
  }
}

// f(gi, gj, i, j) for every element (i, j) this thread owns in an SI x SJ register tile whose global
// position (gi, gj) = (i0 + ti + 16 i, j0 + tj + 16 j) is inside (ni, nj).
template <int SI, int SJ, typename F>
__device__ __forceinline__ void for_owned(int64_t i0, int64_t ni, int64_t j0, int64_t nj, const F& f) {
  const int ti = lane_i(), tj = lane_j();
#pragma unroll
  for (int i = 0; i < SI; ++i) {
    const int64_t gi = i0 + ti + kLanes * i;
#pragma unroll
    for (int j = 0; j < SJ; ++j) {
      const int64_t gj = j0 + tj + kLanes * j;
      if (gi < ni && gj < nj) {
        f(gi, gj, i, j);
      }
    }
  }
}

// ---------------------------------------------------------------- forward

// Grid N * ceil(M / 32): block b owns node n = b / m_tiles and rows m0 .. m0+31 of it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                         const T* __restrict__ la, const T* __restrict__ lb, T* __restrict__ out, NodeLoraDims d) {
  using A = typename Acc<T>::type;
  __shared__ A ls[Staged<kRowTile>::kSize];
  __shared__ A rs[Staged<kColTile>::kSize];  // also holds the 32-wide A[n] chunks of the shrink
  __shared__ A hs[Staged<kRowTile>::kSize];  // hs[r][i] = scale * act(h)[m0 + i, r0 + r]
  const int64_t M = d.M, N = d.N, K = d.K, O = d.O, R = d.R;
  const int64_t m_tiles = ceil_div(M, kRowTile);
  const int64_t n = static_cast<int64_t>(blockIdx.x) / m_tiles;
  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) % m_tiles) * kRowTile;
  const A scale = static_cast<A>(d.scale);
  const int64_t r_chunks = ceil_div(R, kRankTile);

  for (int64_t o0 = 0; o0 < O; o0 += kColTile) {
    A acc[kRowSub][kColSub];
    zero(acc);
    // Base path: x_tile W^T (W is (O, K): contiguous along the reduction index k).
    tile_gemm<kRowSub, kColSub, true, true>(
        acc, K, ls, rs,
        [&](int i, int64_t k) -> A {
          const int64_t m = m0 + i;
          return m < M ? to_acc(x[(m * N + n) * K + k]) : A(0);
        },
        [&](int64_t k, int j) -> A {
          const int64_t o = o0 + j;
          return o < O ? to_acc(w[o * K + k]) : A(0);
        });
    // Low-rank path, 32 ranks at a time, into the same accumulator.
    for (int64_t rc = 0; rc < r_chunks; ++rc) {
      const int64_t r0 = rc * kRankTile;
      if (o0 == 0 || r_chunks > 1) {  // with one chunk, hs from the first output tile is kept
        A h[kRowSub][kRankSub];
        shrink_chunk(h, x, la, n, m0, r0, d, ls, rs);
        __syncthreads();  // every thread is done reading hs (the previous chunk's expand)
        for_owned<kRowSub, kRankSub>(0, kRowTile, 0, kRankTile, [&](int64_t row, int64_t rank, int i, int j) {
          hs[rank * Staged<kRowTile>::kPitch + row] = scale * stfast_math::lora_activate(h[i][j], d.activation);
        });
      }
      __syncthreads();  // hs written; rs consumed by the previous product
      // B[n][r0 + k, o0 + j]: contiguous along the output index j. Ranks >= R are 0, so the
      // act(0) of the padding ranks in hs contributes nothing.
      stage_chunk<kColTile, false>(rs, [&](int j, int k) -> A {
        const int64_t r = r0 + k, o = o0 + j;
        return (r < R && o < O) ? to_acc(lb[(n * R + r) * O + o]) : A(0);
      });
      __syncthreads();
      mma_chunk(acc, hs, rs);
    }
    for_owned<kRowSub, kColSub>(m0, M, o0, O, [&](int64_t m, int64_t o, int i, int j) {
      const A v = bias != nullptr ? acc[i][j] + to_acc(bias[o]) : acc[i][j];
      out[(m * N + n) * O + o] = Store<T>::from(v);
    });
  }
}

// ---------------------------------------------------------------- backward: low-rank rows

// Grid N * ceil(M / 32), as the forward. Per 32-rank chunk: h (over K) and g B[n]^T (over O), then
// grad_h = scale * (g B^T) * act'(h) and scaled_a = scale * act(h) for the block's rows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_lowrank_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ la,
                                 const T* __restrict__ lb, typename Acc<T>::type* __restrict__ grad_h,
                                 typename Acc<T>::type* __restrict__ scaled_a, NodeLoraDims d) {
  using A = typename Acc<T>::type;
  __shared__ A ls[Staged<kRowTile>::kSize];
  __shared__ A rs[Staged<kRankTile>::kSize];
  const int64_t M = d.M, N = d.N, O = d.O, R = d.R;
  const int64_t m_tiles = ceil_div(M, kRowTile);
  const int64_t n = static_cast<int64_t>(blockIdx.x) / m_tiles;
  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) % m_tiles) * kRowTile;
  const A scale = static_cast<A>(d.scale);

  for (int64_t r0 = 0; r0 < R; r0 += kRankTile) {
    A h[kRowSub][kRankSub];
    shrink_chunk(h, x, la, n, m0, r0, d, ls, rs);
    A gb[kRowSub][kRankSub];
    zero(gb);
    if (grad_h != nullptr) {  // the same for every thread: the barriers inside are safe
      // g[row, o] B[n][r, o]: both contiguous along the reduction index o.
      tile_gemm<kRowSub, kRankSub, true, true>(
          gb, O, ls, rs,
          [&](int i, int64_t o) -> A {
            const int64_t m = m0 + i;
            return m < M ? to_acc(g[(m * N + n) * O + o]) : A(0);
          },
          [&](int64_t o, int j) -> A {
            const int64_t r = r0 + j;
            return r < R ? to_acc(lb[(n * R + r) * O + o]) : A(0);
          });
    }
    for_owned<kRowSub, kRankSub>(m0, M, r0, R, [&](int64_t m, int64_t r, int i, int j) {
      const int64_t e = (m * N + n) * R + r;
      if (grad_h != nullptr) {
        grad_h[e] = (scale * gb[i][j]) * stfast_math::lora_activation_slope(h[i][j], d.activation);
      }
      if (scaled_a != nullptr) {
        scaled_a[e] = scale * stfast_math::lora_activate(h[i][j], d.activation);
      }
    });
  }
}

// ---------------------------------------------------------------- backward: dx

// Grid N * ceil(M / 32) * ceil(K / 64): block owns node n, rows m0.., input columns k0...
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_dx_kernel(const T* __restrict__ g, const T* __restrict__ w, const T* __restrict__ la,
                            const typename Acc<T>::type* __restrict__ grad_h, T* __restrict__ dx, NodeLoraDims d) {
  using A = typename Acc<T>::type;
  __shared__ A ls[Staged<kRowTile>::kSize];
  __shared__ A rs[Staged<kColTile>::kSize];
  const int64_t M = d.M, N = d.N, K = d.K, O = d.O, R = d.R;
  const int64_t m_tiles = ceil_div(M, kRowTile);
  const int64_t k_tiles = ceil_div(K, kColTile);
  const int64_t b = blockIdx.x;
  const int64_t n = b / (m_tiles * k_tiles);
  const int64_t rest = b % (m_tiles * k_tiles);
  const int64_t m0 = (rest / k_tiles) * kRowTile;
  const int64_t k0 = (rest % k_tiles) * kColTile;

  A acc[kRowSub][kColSub];
  zero(acc);
  // grad_h A[n]^T: grad_h[row, r] and A[n][k, r] are both contiguous along the reduction index r.
  tile_gemm<kRowSub, kColSub, true, true>(
      acc, R, ls, rs,
      [&](int i, int64_t r) -> A {
        const int64_t m = m0 + i;
        return m < M ? grad_h[(m * N + n) * R + r] : A(0);
      },
      [&](int64_t r, int j) -> A {
        const int64_t k = k0 + j;
        return k < K ? to_acc(la[(n * K + k) * R + r]) : A(0);
      });
  if (d.dropout_p > 0.0f) {
    for_owned<kRowSub, kColSub>(m0, M, k0, K, [&](int64_t m, int64_t k, int i, int j) {
      acc[i][j] *= dropout_mult<A>(d, (m * N + n) * K + k);
    });
  }
  // + g W: g[row, o] contiguous along o; W[o, k] contiguous along the output column k.
  tile_gemm<kRowSub, kColSub, true, false>(
      acc, O, ls, rs,
      [&](int i, int64_t o) -> A {
        const int64_t m = m0 + i;
        return m < M ? to_acc(g[(m * N + n) * O + o]) : A(0);
      },
      [&](int64_t o, int j) -> A {
        const int64_t k = k0 + j;
        return k < K ? to_acc(w[o * K + k]) : A(0);
      });
  for_owned<kRowSub, kColSub>(m0, M, k0, K, [&](int64_t m, int64_t k, int i, int j) {
    dx[(m * N + n) * K + k] = Store<T>::from(acc[i][j]);
  });
}

// ---------------------------------------------------------------- backward: dA and dB

// Grid N * ceil(K / 64) * ceil(R / 32): block owns dA[n][k0.., r0..], reduced over m = 0 .. M-1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_da_kernel(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ grad_h,
                            T* __restrict__ da, NodeLoraDims d) {
  using A = typename Acc<T>::type;
  __shared__ A ls[Staged<kColTile>::kSize];
  __shared__ A rs[Staged<kRankTile>::kSize];
  const int64_t M = d.M, N = d.N, K = d.K, R = d.R;
  const int64_t k_tiles = ceil_div(K, kColTile);
  const int64_t r_tiles = ceil_div(R, kRankTile);
  const int64_t b = blockIdx.x;
  const int64_t n = b / (k_tiles * r_tiles);
  const int64_t rest = b % (k_tiles * r_tiles);
  const int64_t k0 = (rest / r_tiles) * kColTile;
  const int64_t r0 = (rest % r_tiles) * kRankTile;

  A acc[kColSub][kRankSub];
  zero(acc);
  // drop(x)[row(m), k] contiguous along k (the tile's i); grad_h[row(m), r] contiguous along r (j).
  tile_gemm<kColSub, kRankSub, false, false>(
      acc, M, ls, rs,
      [&](int i, int64_t m) -> A {
        const int64_t k = k0 + i;
        return k < K ? load_dropped<A>(x, (m * N + n) * K + k, d) : A(0);
      },
      [&](int64_t m, int j) -> A {
        const int64_t r = r0 + j;
        return r < R ? grad_h[(m * N + n) * R + r] : A(0);
      });
  for_owned<kColSub, kRankSub>(k0, K, r0, R, [&](int64_t k, int64_t r, int i, int j) {
    da[(n * K + k) * R + r] = Store<T>::from(acc[i][j]);
  });
}

// Grid N * ceil(R / 32) * ceil(O / 64): block owns dB[n][r0.., o0..], reduced over m = 0 .. M-1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_db_kernel(const T* __restrict__ g, const typename Acc<T>::type* __restrict__ scaled_a,
                            T* __restrict__ db, NodeLoraDims d) {
  using A = typename Acc<T>::type;
  __shared__ A ls[Staged<kRankTile>::kSize];
  __shared__ A rs[Staged<kColTile>::kSize];
  const int64_t M = d.M, N = d.N, O = d.O, R = d.R;
  const int64_t r_tiles = ceil_div(R, kRankTile);
  const int64_t o_tiles = ceil_div(O, kColTile);
  const int64_t b = blockIdx.x;
  const int64_t n = b / (r_tiles * o_tiles);
  const int64_t rest = b % (r_tiles * o_tiles);
  const int64_t r0 = (rest / o_tiles) * kRankTile;
  const int64_t o0 = (rest % o_tiles) * kColTile;

  A acc[kRankSub][kColSub];
  zero(acc);
  // scaled_a[row(m), r] contiguous along r (i); g[row(m), o] contiguous along o (j).
  tile_gemm<kRankSub, kColSub, false, false>(
      acc, M, ls, rs,
      [&](int i, int64_t m) -> A {
        const int64_t r = r0 + i;
        return r < R ? scaled_a[(m * N + n) * R + r] : A(0);
      },
      [&](int64_t m, int j) -> A {
        const int64_t o = o0 + j;
        return o < O ? to_acc(g[(m * N + n) * O + o]) : A(0);
      });
  for_owned<kRankSub, kColSub>(r0, R, o0, O, [&](int64_t r, int64_t o, int i, int j) {
    db[(n * R + r) * O + o] = Store<T>::from(acc[i][j]);
  });
}

// ---------------------------------------------------------------- backward: dW and db partials

// The dW / db block's (O, C) tile (blockIdx.x walks the tiles, C fastest) and row slice (blockIdx.y).
struct DwBlock {
  int64_t o0, c0, slice, begin, len;
};
__device__ __forceinline__ DwBlock dw_block(int64_t tile, int64_t C, int64_t rows, int64_t rows_per_slice) {
  const int64_t c_tiles = ceil_div(C, tile);
  DwBlock b;
  b.o0 = (static_cast<int64_t>(blockIdx.x) / c_tiles) * tile;
  b.c0 = (static_cast<int64_t>(blockIdx.x) % c_tiles) * tile;
  b.slice = blockIdx.y;
  b.begin = b.slice * rows_per_slice;
  const int64_t end = b.begin + rows_per_slice < rows ? b.begin + rows_per_slice : rows;
  b.len = end > b.begin ? end - b.begin : 0;
  return b;
}

// Grid (ceil(O / 64) * ceil(C / 64), slices): block owns parts[slice][o0.., c0..] and reduces over
// the rows of its slice in order. Column c < x_columns is x[:, c]; c == x_columns (with
// ones_column) is 1, which makes that column the row sum of g: db.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_dw_kernel(const T* __restrict__ g, const T* __restrict__ x,
                            typename Acc<T>::type* __restrict__ parts, int64_t x_columns, bool ones_column,
                            int64_t rows_per_slice, NodeLoraDims d) {
  using A = typename Acc<T>::type;
  __shared__ A ls[Staged<kColTile>::kSize];
  __shared__ A rs[Staged<kColTile>::kSize];
  const int64_t O = d.O, K = d.K, rows = d.M * d.N;
  const int64_t C = x_columns + (ones_column ? 1 : 0);
  const DwBlock blk = dw_block(kColTile, C, rows, rows_per_slice);
  const int64_t o0 = blk.o0, c0 = blk.c0, slice = blk.slice, begin = blk.begin, len = blk.len;

  A acc[kColSub][kColSub];
  zero(acc);
  // g[row, o] contiguous along o (i); x[row, c] contiguous along c (j).
  tile_gemm<kColSub, kColSub, false, false>(
      acc, len, ls, rs,
      [&](int i, int64_t t) -> A {
        const int64_t o = o0 + i;
        return o < O ? to_acc(g[(begin + t) * O + o]) : A(0);
      },
      [&](int64_t t, int j) -> A {
        const int64_t c = c0 + j;
        if (c < x_columns) {
          return to_acc(x[(begin + t) * K + c]);
        }
        return (ones_column && c == x_columns) ? A(1) : A(0);
      });
  A* part = parts + slice * O * C;
  for_owned<kColSub, kColSub>(o0, O, c0, C, [&](int64_t o, int64_t c, int i, int j) { part[o * C + c] = acc[i][j]; });
}

// ---------------------------------------------------------------- tensor-core kernels
//
// The forward, dx and dW / db products on tensor cores (tensor_core_tile.cuh): a 256-thread block
// accumulates a 64 x 64 fp32 tile from operands staged kTcDepth deep in shared memory in the MMA operand
// type (fp16 / bf16 as themselves, fp32 rounded to TF32); the tile goes through shared memory (aliasing
// the staging buffers) for the epilogue. Each step multiplies only as deep as the remaining reduction
// rounded up to the MMA depth, so a rank-1 expand costs one 8- (TF32) or 16-deep step, not 32.

constexpr int kTcTile = 64;   // TensorCoreTile's side: rows of a node per block, 64 outputs / ranks

#if STFAST_TENSOR_CORES

using detail::kAccumulatorPad;
using detail::kOperandPad;
using detail::TensorCoreTile;
namespace wmma = detail::wmma;

constexpr int kTcDepth = 32;  // reduction depth staged per step: 2 (fp16 / bf16) or 4 (TF32) MMA steps

constexpr int kTcLdc = kTcTile + kAccumulatorPad;

// Leading dimensions of a staged 64 x kTcDepth operand (row-major) and of a kTcDepth x 64 one (also
// of the 64 x 64 intermediate of the forward).
template <typename Operand>
constexpr int kTcLdShort = kTcDepth + kOperandPad<Operand>;
template <typename Operand>
constexpr int kTcLdLong = kTcTile + kOperandPad<Operand>;

// Shared-memory bytes of the staging buffers (ls: 64 x kTcLdShort, then rs: kTcDepth x kTcLdLong; a
// kTcDepth x 64 operand fits in ls too), which the accumulator tile (64 x kTcLdc fp32) aliases.
template <typename Operand>
constexpr int kTcStagingBytes =
    (kTcTile * kTcLdShort<Operand> + kTcDepth * kTcLdLong<Operand>) * static_cast<int>(sizeof(Operand));
constexpr int kTcAccumulatorBytes = kTcTile * kTcLdc * static_cast<int>(sizeof(float));
template <typename Operand>
constexpr int kTcSharedBytes =
    kTcStagingBytes<Operand> > kTcAccumulatorBytes ? kTcStagingBytes<Operand> : kTcAccumulatorBytes;
// The forward's scale * act(h) tile (64 rows x 64 ranks), kept next to the staging buffers.
template <typename Operand>
constexpr int kTcLowRankBytes = kTcTile * kTcLdLong<Operand> * static_cast<int>(sizeof(Operand));
static_assert(kTcSharedBytes<float> % 32 == 0 && kTcSharedBytes<__half> % 32 == 0, "hs is 256-bit aligned");

template <typename T>
using TcOperand = typename TensorCoreTile<T>::Operand;

// MMA depth of a step with `remaining` (> 0) reduction indices left: at most kTcDepth, a multiple of
// the MMA's k (the staged operands are zero beyond the reduction's end).
template <typename T>
__device__ __forceinline__ int tc_depth(int64_t remaining) {
  constexpr int k = TensorCoreTile<T>::kDepth;
  return remaining >= kTcDepth ? kTcDepth : static_cast<int>((remaining + k - 1) / k * k);
}

// s[i * ld + j] = load(i, j) rounded to the operand type, for i < Rows, j < Cols. kColsFast:
// consecutive threads walk j (the operand is contiguous along j in global memory), else i.
template <typename T, int Rows, int Cols, bool kColsFast, typename Load>
__device__ __forceinline__ void tc_stage(TcOperand<T>* s, int ld, const Load& load) {
  for (int idx = static_cast<int>(threadIdx.x); idx < Rows * Cols; idx += kThreads) {
    const int i = kColsFast ? idx / Cols : idx % Rows;
    const int j = kColsFast ? idx % Cols : idx / Rows;
    s[i * ld + j] = detail::MmaOperand<T>::from(load(i, j));
  }
}

// tile += L R over the reduction index red < len, kTcDepth at a time. L (64 x len) is staged into ls
// row-major (ls[i * kTcLdShort + k]) or, with LLayout col_major, as ls[k * kTcLdLong + i]; R (len x 64)
// into rs[k * kTcLdLong + j]. load_l(i, red) / load_r(red, j) take tile-local i / j and the global
// reduction index and return 0 outside their own bounds (in fp32). kLRedFast / kRRedFast: the operand
// is contiguous along red in global memory. Barrier first in every step (the caller may use the buffers
// right before), none at the end. Block-uniform: every thread calls it with the same len.
template <typename T, typename LLayout, bool kLRedFast, bool kRRedFast, typename LoadL, typename LoadR>
__device__ __forceinline__ void tc_gemm(TensorCoreTile<T>& tile, int64_t len, TcOperand<T>* ls, TcOperand<T>* rs,
                                        const LoadL& load_l, const LoadR& load_r) {
  constexpr bool kLRowMajor = std::is_same<LLayout, wmma::row_major>::value;
  constexpr int lda = kLRowMajor ? kTcLdShort<TcOperand<T>> : kTcLdLong<TcOperand<T>>;
  constexpr int ldb = kTcLdLong<TcOperand<T>>;
  for (int64_t k0 = 0; k0 < len; k0 += kTcDepth) {
    __syncthreads();  // the previous step's operands (or the caller's use of the buffers) are consumed
    if constexpr (kLRowMajor) {
      tc_stage<T, kTcTile, kTcDepth, kLRedFast>(ls, lda, [&](int i, int k) -> float {
        return k0 + k < len ? load_l(i, k0 + k) : 0.0f;
      });
    } else {
      tc_stage<T, kTcDepth, kTcTile, !kLRedFast>(ls, lda, [&](int k, int i) -> float {
        return k0 + k < len ? load_l(i, k0 + k) : 0.0f;
      });
    }
    tc_stage<T, kTcDepth, kTcTile, !kRRedFast>(rs, ldb, [&](int k, int j) -> float {
      return k0 + k < len ? load_r(k0 + k, j) : 0.0f;
    });
    __syncthreads();
    tile.template multiply<LLayout>(ls, lda, rs, ldb, tc_depth<T>(len - k0));
  }
}

// tile += H R over len <= 64 ranks, H already in shared memory (hs[i * kTcLdLong + r], 64 ranks wide,
// zero beyond the rank's end); R staged from load_r(r, j) (contiguous along j), as tc_gemm.
template <typename T, typename LoadR>
__device__ __forceinline__ void tc_expand(TensorCoreTile<T>& tile, int64_t len, const TcOperand<T>* hs,
                                          TcOperand<T>* rs, const LoadR& load_r) {
  constexpr int ld = kTcLdLong<TcOperand<T>>;
  for (int64_t k0 = 0; k0 < len; k0 += kTcDepth) {
    __syncthreads();
    tc_stage<T, kTcDepth, kTcTile, true>(rs, ld, [&](int k, int j) -> float {
      return k0 + k < len ? load_r(k0 + k, j) : 0.0f;
    });
    __syncthreads();
    tile.template multiply<wmma::row_major>(hs + k0, ld, rs, ld, tc_depth<T>(len - k0));
  }
}

// f(i, j) for every element of a 64 x 64 tile whose global position (i0 + i, j0 + j) is inside (ni, nj),
// spread over the block's threads.
template <typename F>
__device__ __forceinline__ void tc_for_tile(int64_t i0, int64_t ni, int64_t j0, int64_t nj, const F& f) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTcTile * kTcTile; idx += kThreads) {
    const int i = idx / kTcTile, j = idx % kTcTile;
    if (i0 + i < ni && j0 + j < nj) {
      f(i, j);
    }
  }
}

// Barrier, tile into cs, barrier: cs aliases the staging buffers, which every warp must be done with.
template <typename T>
__device__ __forceinline__ void tc_store(const TensorCoreTile<T>& tile, float* cs) {
  __syncthreads();
  tile.store(cs, kTcLdc);
  __syncthreads();
}

#endif  // STFAST_TENSOR_CORES

// Grid N * ceil(M / 64): block b owns node n = b / m_tiles and rows m0 .. m0+63 of it. Per 64-wide output
// tile: acc = x W^T (over K); then per chunk of 64 ranks h = drop(x) A[n][:, chunk] on tensor cores
// (over K, its own tile), scale * act(h) rounded to the operand type into hs (shared memory; with
// R <= 64 computed once per block and kept for every output tile), acc += hs B[n][chunk, tile]; + bias.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_fwd_tc_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                            const T* __restrict__ la, const T* __restrict__ lb, T* __restrict__ out, NodeLoraDims d) {
#if STFAST_TENSOR_CORES
  using Tile = TensorCoreTile<T>;
  using Operand = TcOperand<T>;
  constexpr int ldh = kTcLdLong<Operand>;
  __shared__ __align__(128) unsigned char shared[kTcSharedBytes<Operand> + kTcLowRankBytes<Operand>];
  Operand* ls = reinterpret_cast<Operand*>(shared);
  Operand* rs = ls + kTcTile * kTcLdShort<Operand>;
  float* cs = reinterpret_cast<float*>(shared);                             // a tile: cs[row * kTcLdc + col]
  Operand* hs = reinterpret_cast<Operand*>(shared + kTcSharedBytes<Operand>);  // hs[row * ldh + rank]
  const int64_t M = d.M, N = d.N, K = d.K, O = d.O, R = d.R;
  const int64_t m_tiles = ceil_div(M, kTcTile);
  const int64_t n = static_cast<int64_t>(blockIdx.x) / m_tiles;
  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) % m_tiles) * kTcTile;
  const float scale = static_cast<float>(d.scale);
  const int64_t r_chunks = ceil_div(R, kTcTile);
  const auto x_row = [&](int i) { return ((m0 + i) * N + n) * K; };

  Tile acc, h;
  for (int64_t o0 = 0; o0 < O; o0 += kTcTile) {
    acc.zero();
    // Base path: x_tile W^T, both contiguous along k.
    tc_gemm<T, wmma::row_major, true, true>(
        acc, K, ls, rs, [&](int i, int64_t k) { return m0 + i < M ? to_acc(x[x_row(i) + k]) : 0.0f; },
        [&](int64_t k, int j) { return o0 + j < O ? to_acc(w[(o0 + j) * K + k]) : 0.0f; });
    for (int64_t rc = 0; rc < r_chunks; ++rc) {
      const int64_t r0 = rc * kTcTile;
      if (o0 == 0 || r_chunks > 1) {
        // h = drop(x_tile) A[n][:, r0..]: x contiguous along k, A[n][k, r] along r.
        h.zero();
        tc_gemm<T, wmma::row_major, true, false>(
            h, K, ls, rs, [&](int i, int64_t k) { return m0 + i < M ? load_dropped<float>(x, x_row(i) + k, d) : 0.0f; },
            [&](int64_t k, int j) { return r0 + j < R ? to_acc(la[(n * K + k) * R + r0 + j]) : 0.0f; });
        tc_store(h, cs);  // (every thread is done with hs too: the shrink's barriers follow the last expand)
        for (int idx = static_cast<int>(threadIdx.x); idx < kTcTile * kTcTile; idx += kThreads) {
          const int i = idx / kTcTile, r = idx % kTcTile;
          const float v = r0 + r < R ? scale * stfast_math::lora_activate(cs[i * kTcLdc + r], d.activation) : 0.0f;
          hs[i * ldh + r] = detail::MmaOperand<T>::from(v);
        }
      }
      // acc += hs B[n][r0.., o0..] (B contiguous along the output index); the first step's barrier
      // publishes hs.
      tc_expand<T>(acc, R - r0 < kTcTile ? R - r0 : kTcTile, hs, rs, [&](int64_t r, int j) {
        return o0 + j < O ? to_acc(lb[(n * R + r0 + r) * O + o0 + j]) : 0.0f;
      });
    }
    tc_store(acc, cs);
    tc_for_tile(m0, M, o0, O, [&](int i, int j) {
      const float v = cs[i * kTcLdc + j];
      out[((m0 + i) * N + n) * O + o0 + j] = Store<T>::from(bias != nullptr ? v + to_acc(bias[o0 + j]) : v);
    });
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// Grid N * ceil(M / 64) * ceil(K / 64): block owns node n, rows m0.., input columns k0... As the SIMT
// kernel: tile = grad_h A[n]^T (over R), times the dropout multipliers (through shared memory: a
// fragment's layout is unspecified), then += g W (over O) in the same accumulators.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_dx_tc_kernel(const T* __restrict__ g, const T* __restrict__ w, const T* __restrict__ la,
                               const float* __restrict__ grad_h, T* __restrict__ dx, NodeLoraDims d) {
#if STFAST_TENSOR_CORES
  using Tile = TensorCoreTile<T>;
  using Operand = TcOperand<T>;
  __shared__ __align__(128) unsigned char shared[kTcSharedBytes<Operand>];
  Operand* ls = reinterpret_cast<Operand*>(shared);
  Operand* rs = ls + kTcTile * kTcLdShort<Operand>;
  float* cs = reinterpret_cast<float*>(shared);
  const int64_t M = d.M, N = d.N, K = d.K, O = d.O, R = d.R;
  const int64_t m_tiles = ceil_div(M, kTcTile);
  const int64_t k_tiles = ceil_div(K, kTcTile);
  const int64_t b = blockIdx.x;
  const int64_t n = b / (m_tiles * k_tiles);
  const int64_t rest = b % (m_tiles * k_tiles);
  const int64_t m0 = (rest / k_tiles) * kTcTile;
  const int64_t k0 = (rest % k_tiles) * kTcTile;
  const auto row = [&](int i) { return (m0 + i) * N + n; };

  Tile tile;
  tile.zero();
  // grad_h[row, r] and A[n][k, r]: both contiguous along r.
  tc_gemm<T, wmma::row_major, true, true>(
      tile, R, ls, rs, [&](int i, int64_t r) { return m0 + i < M ? grad_h[row(i) * R + r] : 0.0f; },
      [&](int64_t r, int j) { return k0 + j < K ? to_acc(la[(n * K + k0 + j) * R + r]) : 0.0f; });
  if (d.dropout_p > 0.0f) {
    tc_store(tile, cs);
    tc_for_tile(m0, M, k0, K, [&](int i, int j) {
      cs[i * kTcLdc + j] *= dropout_mult<float>(d, row(i) * K + k0 + j);
    });
    __syncthreads();
    tile.load(cs, kTcLdc);  // the next staging starts with a barrier: every warp has loaded by then
  }
  // g[row, o] contiguous along o; W[o, k] along the output column k.
  tc_gemm<T, wmma::row_major, true, false>(
      tile, O, ls, rs, [&](int i, int64_t o) { return m0 + i < M ? to_acc(g[row(i) * O + o]) : 0.0f; },
      [&](int64_t o, int j) { return k0 + j < K ? to_acc(w[o * K + k0 + j]) : 0.0f; });
  tc_store(tile, cs);
  tc_for_tile(m0, M, k0, K, [&](int i, int j) { dx[row(i) * K + k0 + j] = Store<T>::from(cs[i * kTcLdc + j]); });
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// Grid (ceil(O / 64) * ceil(C / 64), slices), as the SIMT kernel: block owns parts[slice][o0.., c0..]
// = g^T z over its slice's rows, A = g chunk read column-major, B = z = [x, 1] chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    node_lora_bwd_dw_tc_kernel(const T* __restrict__ g, const T* __restrict__ x, float* __restrict__ parts,
                               int64_t x_columns, bool ones_column, int64_t rows_per_slice, NodeLoraDims d) {
#if STFAST_TENSOR_CORES
  using Tile = TensorCoreTile<T>;
  using Operand = TcOperand<T>;
  __shared__ __align__(128) unsigned char shared[kTcSharedBytes<Operand>];
  Operand* ls = reinterpret_cast<Operand*>(shared);
  Operand* rs = ls + kTcTile * kTcLdShort<Operand>;
  float* cs = reinterpret_cast<float*>(shared);
  const int64_t O = d.O, K = d.K, rows = d.M * d.N;
  const int64_t C = x_columns + (ones_column ? 1 : 0);
  const DwBlock blk = dw_block(kTcTile, C, rows, rows_per_slice);
  const int64_t o0 = blk.o0, c0 = blk.c0, slice = blk.slice, begin = blk.begin, len = blk.len;

  Tile tile;
  tile.zero();
  // g[row, o] contiguous along o (the tile's rows); x[row, c] along c.
  tc_gemm<T, wmma::col_major, false, false>(
      tile, len, ls, rs, [&](int i, int64_t t) { return o0 + i < O ? to_acc(g[(begin + t) * O + o0 + i]) : 0.0f; },
      [&](int64_t t, int j) {
        const int64_t c = c0 + j;
        if (c < x_columns) {
          return to_acc(x[(begin + t) * K + c]);
        }
        return (ones_column && c == x_columns) ? 1.0f : 0.0f;
      });
  tc_store(tile, cs);
  float* part = parts + slice * O * C;
  tc_for_tile(o0, O, c0, C, [&](int i, int j) { part[(o0 + i) * C + c0 + j] = cs[i * kTcLdc + j]; });
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// The tensor-core kernels exist for fp32 (TF32), fp16 and bf16 (their bodies are compiled for sm_80+).
template <typename T>
constexpr bool has_tensor_core_path() {
  return !std::is_same<T, double>::value;
}

bool tensor_core_launch(DType dtype, const NodeLoraDims& dims) {
  return dims.tensor_cores != 0 && dtype != DType::kFloat64;
}

// ---------------------------------------------------------------- dropout mask

template <typename T>
__global__ void node_lora_dropout_mask_kernel(T* __restrict__ out, int64_t count, float dropout_p, float inv_keep,
                                              uint64_t seed, uint64_t offset) {
  using A = typename Acc<T>::type;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float mult =
        stfast_math::dropout_multiplier(seed, offset + static_cast<uint64_t>(j), dropout_p, inv_keep);
    out[j] = Store<T>::from(static_cast<A>(mult));
  }
}

// Runs launch(T{}, grid) for a 1-D grid of `blocks` blocks (an error if that is above grid.x's limit).
template <typename F>
cudaError_t launch_1d(DType dtype, int64_t blocks, F&& launch) {
  if (blocks > kMaxBlocks) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(blocks));
  return dispatch(dtype, [&](auto tag) { launch(tag, grid); });
}

}  // namespace

cudaError_t node_lora_forward(DType dtype, const void* x, const void* weight, const void* bias, const void* lora_a,
                              const void* lora_b, void* out, const NodeLoraDims& dims, cudaStream_t stream) {
  if (dims.M == 0 || dims.N == 0 || dims.O == 0) {
    return cudaSuccess;
  }
  const int64_t row_tile = tensor_core_launch(dtype, dims) ? kTcTile : kRowTile;
  return launch_1d(dtype, dims.N * ceil_div(dims.M, row_tile), [&](auto tag, dim3 grid) {
    using T = decltype(tag);
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        node_lora_fwd_tc_kernel<T><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
            static_cast<const T*>(lora_a), static_cast<const T*>(lora_b), static_cast<T*>(out), dims);
        return;
      }
    }
    node_lora_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
        static_cast<const T*>(lora_a), static_cast<const T*>(lora_b), static_cast<T*>(out), dims);
  });
}

cudaError_t node_lora_backward_lowrank(DType dtype, const void* grad, const void* x, const void* lora_a,
                                       const void* lora_b, void* grad_h, void* scaled_a, const NodeLoraDims& dims,
                                       cudaStream_t stream) {
  if (dims.M == 0 || dims.N == 0 || (grad_h == nullptr && scaled_a == nullptr)) {
    return cudaSuccess;
  }
  return launch_1d(dtype, dims.N * ceil_div(dims.M, kRowTile), [&](auto tag, dim3 grid) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    node_lora_bwd_lowrank_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(lora_a),
        static_cast<const T*>(lora_b), static_cast<A*>(grad_h), static_cast<A*>(scaled_a), dims);
  });
}

cudaError_t node_lora_backward_dx(DType dtype, const void* grad, const void* weight, const void* lora_a,
                                  const void* grad_h, void* dx, const NodeLoraDims& dims, cudaStream_t stream) {
  if (dims.M == 0 || dims.N == 0 || dims.K == 0) {
    return cudaSuccess;
  }
  const bool tc = tensor_core_launch(dtype, dims);
  const int64_t blocks =
      dims.N * ceil_div(dims.M, tc ? kTcTile : kRowTile) * ceil_div(dims.K, tc ? kTcTile : kColTile);
  return launch_1d(dtype, blocks, [&](auto tag, dim3 grid) {
    using T = decltype(tag);
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        node_lora_bwd_dx_tc_kernel<T><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(grad), static_cast<const T*>(weight), static_cast<const T*>(lora_a),
            static_cast<const float*>(grad_h), static_cast<T*>(dx), dims);
        return;
      }
    }
    node_lora_bwd_dx_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(weight), static_cast<const T*>(lora_a),
        static_cast<const typename Acc<T>::type*>(grad_h), static_cast<T*>(dx), dims);
  });
}

// dA and dB: M == 0 still runs (the kernels then write zeros).
cudaError_t node_lora_backward_da(DType dtype, const void* x, const void* grad_h, void* d_lora_a,
                                  const NodeLoraDims& dims, cudaStream_t stream) {
  if (dims.N == 0 || dims.K == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = dims.N * ceil_div(dims.K, kColTile) * ceil_div(dims.R, kRankTile);
  return launch_1d(dtype, blocks, [&](auto tag, dim3 grid) {
    using T = decltype(tag);
    node_lora_bwd_da_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const typename Acc<T>::type*>(grad_h), static_cast<T*>(d_lora_a), dims);
  });
}

cudaError_t node_lora_backward_db(DType dtype, const void* grad, const void* scaled_a, void* d_lora_b,
                                  const NodeLoraDims& dims, cudaStream_t stream) {
  if (dims.N == 0 || dims.O == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = dims.N * ceil_div(dims.R, kRankTile) * ceil_div(dims.O, kColTile);
  return launch_1d(dtype, blocks, [&](auto tag, dim3 grid) {
    using T = decltype(tag);
    node_lora_bwd_db_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const typename Acc<T>::type*>(scaled_a), static_cast<T*>(d_lora_b),
        dims);
  });
}

int64_t node_lora_dw_parts(const NodeLoraDims& dims, int64_t columns) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(dims.O, kColTile) * ceil_div(columns, kColTile));
  const int64_t by_rows = ceil_div(dims.M * dims.N, kRowsPerSlice);
  const int64_t by_blocks = ceil_div(kTargetBlocks, tiles);
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSlices, std::min<int64_t>(by_rows, by_blocks)));
}

cudaError_t node_lora_backward_dw(DType dtype, const void* grad, const void* x, void* dw_parts, int64_t x_columns,
                                  bool ones_column, const NodeLoraDims& dims, cudaStream_t stream) {
  const int64_t columns = x_columns + (ones_column ? 1 : 0);
  if (dims.O == 0 || columns == 0) {
    return cudaSuccess;
  }
  const int64_t slices = node_lora_dw_parts(dims, columns);
  const int64_t rows_per_slice = std::max<int64_t>(1, ceil_div(dims.M * dims.N, slices));
  const int64_t tiles = ceil_div(dims.O, kColTile) * ceil_div(columns, kColTile);
  if (tiles > kMaxBlocks) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slices));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        node_lora_bwd_dw_tc_kernel<T><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<float*>(dw_parts), x_columns,
            ones_column, rows_per_slice, dims);
        return;
      }
    }
    node_lora_bwd_dw_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                                               static_cast<A*>(dw_parts), x_columns, ones_column,
                                                               rows_per_slice, dims);
  });
}

cudaError_t node_lora_dropout_mask(DType dtype, void* out, int64_t count, float dropout_p, float inv_keep,
                                   uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (count == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(count, kThreads), 4096));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    node_lora_dropout_mask_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(out), count, dropout_p,
                                                                       inv_keep, seed, offset);
  });
}

}  // namespace stfast_cuda
