// CUDA kernels of stfast_ext::node_lora_fwd / node_lora_bwd / node_lora_dropout_mask, with raw-pointer
// launchers (see node_lora_kernels.h). No torch headers: this file compiles with plain nvcc.
//
//   y[m, n] = x[m, n] W^T + bias + scale * act(drop(x[m, n]) A[n]) B[n]
//
// Every kernel is a tiled SIMT FMA product on 256 threads (16 x 16); thread (ti, tj) owns the
// outputs (ti + 16 i, tj + 16 j) of its block's tile. The reduction runs kChunk = 32 deep at a time:
// both operands of a chunk are staged in shared memory (transposed where needed, rows padded by one
// against bank conflicts), read with coalesced loads (the staging walks whichever index is
// contiguous in global memory), then multiplied from shared memory into registers. fp16 / bf16 are
// converted to fp32 when staged and accumulated in fp32 (fp64 for fp64); results are rounded once.
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
// Determinism: no atomics; every output element is written by one thread that reduces in a fixed
// order, and the only cross-block reduction (dW / db over row slices) goes through partial buffers
// summed in slice order. Bitwise reproducible for the same inputs, shapes and GPU.
//
// Honest status (first version): SIMT FMA tiles, NOT tensor cores (WMMA / mma.sync for bf16 / fp16
// and TF32 is the next step). Compiled with nvcc (csrc/cuda/compile_check.sh, CI) but not yet run on
// a GPU: tests/test_node_lora_ext_cuda.py checks them on a GPU machine.
#include "node_lora_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "../node_lora_math.h"

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
  return static_cast<A>(stfast_math::dropout_multiplier(d.seed, d.offset + static_cast<uint64_t>(element),
                                                        d.dropout_p, d.inv_keep));
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
  const int64_t c_tiles = ceil_div(C, kColTile);
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) / c_tiles) * kColTile;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) % c_tiles) * kColTile;
  const int64_t slice = blockIdx.y;
  const int64_t begin = slice * rows_per_slice;
  const int64_t end = begin + rows_per_slice < rows ? begin + rows_per_slice : rows;
  const int64_t len = end > begin ? end - begin : 0;

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
  return launch_1d(dtype, dims.N * ceil_div(dims.M, kRowTile), [&](auto tag, dim3 grid) {
    using T = decltype(tag);
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
  const int64_t blocks = dims.N * ceil_div(dims.M, kRowTile) * ceil_div(dims.K, kColTile);
  return launch_1d(dtype, blocks, [&](auto tag, dim3 grid) {
    using T = decltype(tag);
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
