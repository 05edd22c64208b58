// The tensor-core (WMMA) meta_gconv kernels: forward, backward dxg / dE and dP. Launched by
// meta_gconv_kernels.cu (its only includer, hence the anonymous namespace), which holds the SIMT
// kernels of the same products and the launchers.
#pragma once

#include <cuda_pipeline.h>

#include <cstdint>
#include <type_traits>

#include "meta_gconv_device.cuh"
#include "tensor_core_tile.cuh"

namespace stfast_cuda {
namespace {

// ---------------------------------------------------------------- tensor-core kernels
//
// The same three products on tensor cores (tensor_core_tile.cuh): 256 threads (8 warps) per 64 x 64 fp32
// tile, operands staged kTcDepth deep in shared memory in the MMA operand type (fp16 / bf16 as
// themselves, fp32 rounded to TF32). Where the SIMT kernels scale partial sums by E[m, d], these stage
// z = E[m, d] * xg[m, i] (formed in fp32, rounded once to the operand type) so that the reduction over
// (d, i) is one plain GEMM with K = D*I.
//
// Feeding the tensor cores:
//   - the xg elements a thread stages stay in its registers for a whole i-chunk (forward) or row chunk
//     (dP) and are rescaled by E[m, d] for every d: xg is read from global memory once, not D times;
//   - embedding row offsets are computed once per block (forward, dxg / dE) or once per row and row
//     chunk (dP), never per staged element, in 32-bit integers like every in-tile index
//     (meta_gconv_extents_supported: no 64-bit division or multiply in the staging loops);
//   - warp tiles are 32 x 32 (WarpTile, 2 x 2 fragments). Forward and dxg / dE: warps 0-3 and 4-7 cover
//     the same 64 x 64 tile, each group one half of every staged depth ("sliced K"), and the halves are
//     added in a fixed order (group 0 + group 1). dP: each group owns different d of the block's group
//     of kDpGroup, whose z tiles are formed from one staged xg and g chunk;
//   - forward and dxg / dE double-buffer their operand tiles: one barrier per staged step (the buffer a
//     step writes was last read two steps before, behind the previous step's barrier). The forward
//     copies its P chunks with cp.async one step ahead, into three buffers (stage_block).

constexpr int kDpGroup = 4;  // d per tensor-core dP block, kDpGroup / 2 per warp group

#if STFAST_TENSOR_CORES

using detail::kAccumulatorPad;
using detail::kOperandPad;
using detail::WarpTile;

constexpr int kTcDepth = 32;                              // reduction depth staged per step
constexpr int kTcSliceDepth = kTcDepth / 2;               // a warp group's half of it (sliced K)
constexpr int kStagedPerThread = kTile * kTcDepth / kThreads;  // 8 elements of a 64 x 32 tile per thread
constexpr int kWarpRowsStep = kThreads / 32;              // thread (warp w, lane l) stages rows w + 8 j
constexpr int kTcLdc = kTile + kAccumulatorPad;
constexpr int kTcTileBytes = kTile * kTcLdc * static_cast<int>(sizeof(float));
template <typename Operand>
constexpr int kTcLdShort = kTcDepth + kOperandPad<Operand>;  // rows kTcDepth wide
template <typename Operand>
constexpr int kTcLdLong = kTile + kOperandPad<Operand>;      // rows kTile wide
constexpr int max_bytes(int a, int b) { return a > b ? a : b; }

// Forward: two z buffers (64 x kTcDepth, row-major), then three P[d] chunk buffers (kTcDepth x 64, in
// the storage type: the copy for step s + 1 is in flight during step s, so it must not land in the
// buffer step s - 1 may still be reading); afterwards the accumulator tile.
template <typename Operand>
constexpr int kFwdZ = kTile * kTcLdShort<Operand>;
template <typename Operand>
constexpr int kFwdP = kTcDepth * kTcLdLong<Operand>;
constexpr int kFwdPBuffers = 3;
template <typename Operand>
constexpr int kFwdSharedBytes =
    max_bytes((2 * kFwdZ<Operand> + kFwdPBuffers * kFwdP<Operand>) * static_cast<int>(sizeof(Operand)), kTcTileBytes);
// dxg / dE: two buffers of [g chunk (64 x kTcDepth) | P[d]^T chunk, stored as its 64 rows of P
// (column-major B)], both converted to the operand type as staged, synchronously (g is fp32 for every
// dtype; a variant copying P with cp.async took 214 registers in fp32, 175 in fp16, against 128 here);
// between the d, the two groups' t tiles.
template <typename Operand>
constexpr int kDxgStage = 2 * kTile * kTcLdShort<Operand>;
template <typename Operand>
constexpr int kDxgSharedBytes = max_bytes(2 * kDxgStage<Operand> * static_cast<int>(sizeof(Operand)), 2 * kTcTileBytes);
// dP: kDpGroup z chunks (kTcDepth x 64 each) and the g chunk (kTcDepth x 64); afterwards two d tiles.
template <typename Operand>
constexpr int kDpSharedBytes =
    max_bytes((kDpGroup + 1) * kTcDepth * kTcLdLong<Operand> * static_cast<int>(sizeof(Operand)), 2 * kTcTileBytes);

// A kRows x kCols block of a row-major matrix in global memory (src at its first element, rows ld_src
// apart; `rows` rows and `cols` columns of it exist, zeros beyond) into dst[r * ld_dst + c], as stored
// (fp32 is rounded to TF32 at the fragment loads). `async` (cols, ld_src and src multiples of 16
// bytes): 16-byte cp.async copies that run while the block computes, which the caller commits and waits
// for (__pipeline_wait_prior) before the barrier that publishes them; else plain loads.
template <int kRows, int kCols, typename T>
__device__ __forceinline__ void stage_block(T* dst, int ld_dst, const T* src, int ld_src, int rows, int cols,
                                            bool async) {
  constexpr int kVector = 16 / static_cast<int>(sizeof(T));
  const T zero = Store<T>::from(0.0f);
  if (async) {
    constexpr int kVectorsPerRow = kCols / kVector;
    for (int idx = static_cast<int>(threadIdx.x); idx < kRows * kVectorsPerRow; idx += kThreads) {
      const int r = idx / kVectorsPerRow, c = idx % kVectorsPerRow * kVector;
      T* const to = dst + r * ld_dst + c;
      if (r < rows && c < cols) {  // cols is a multiple of kVector: a vector is all in or all out
        __pipeline_memcpy_async(to, src + r * ld_src + c, 16);
      } else {
#pragma unroll
        for (int v = 0; v < kVector; ++v) {
          to[v] = zero;
        }
      }
    }
    return;
  }
  static_assert(kThreads % kCols == 0 && kRows * kCols % kThreads == 0, "whole rows per pass of the block");
#pragma unroll
  for (int j = 0; j < kRows * kCols / kThreads; ++j) {
    const int r = static_cast<int>(threadIdx.x) / kCols + (kThreads / kCols) * j;  // compile-time strides
    const int c = static_cast<int>(threadIdx.x) % kCols;
    dst[r * ld_dst + c] = (r < rows && c < cols) ? src[r * ld_src + c] : zero;
  }
}

// The forward's P[d] chunk: rows i0 .. i0+31, columns o0 .. o0+63 of P[d], into ps[k * ldb + col].
template <typename T>
__device__ __forceinline__ void stage_pool_chunk(T* ps, const T* pool, int d, int i0, int o0, int I, int O,
                                                 bool async) {
  stage_block<kTcDepth, kTile>(ps, kTcLdLong<T>, pool + (static_cast<int64_t>(d) * I + i0) * O + o0, O, I - i0,
                               O - o0, async);
}

// Warp w's place in the block's 64 x 64 tile: quadrant w % 4 (32 x 32 at row0, col0), group w / 4.
struct WarpPlace {
  int row0, col0, group;
};
__device__ __forceinline__ WarpPlace warp_place() {
  const int w = static_cast<int>(threadIdx.x) / 32;
  return {32 * ((w % 4) / 2), 32 * (w % 2), w / 4};
}

#endif  // STFAST_TENSOR_CORES

// y tile (64 rows, 64 outputs) = z @ P.reshape(D*I, O): for each chunk of I and each d, A = z
// (64 x kTcDepth, row-major) and B = P[d] chunk (kTcDepth x 64). Epilogue as the SIMT kernel's.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_fwd_tc_kernel(const T* __restrict__ xg, const T* __restrict__ emb, const T* __restrict__ pool,
                             const T* __restrict__ bias_pool, T* __restrict__ out, MetaGconvDims p, bool async_pool) {
#if STFAST_TENSOR_CORES
  using Tile = WarpTile<T>;
  using Operand = typename Tile::Operand;
  using Op = detail::MmaOperand<T>;
  static_assert(std::is_same<Operand, T>::value, "P is staged as stored and rounded at the fragment loads");
  constexpr int lda = kTcLdShort<Operand>, ldb = kTcLdLong<Operand>;
  __shared__ __align__(128) unsigned char shared[kFwdSharedBytes<Operand>];
  __shared__ int rows_e[kTile];  // embedding offset of each row of the tile (-1 past the last row)
  Operand* const z_buffers = reinterpret_cast<Operand*>(shared);  // z of step s at z_buffers + (s % 2) * kFwdZ
  Operand* const p_buffers = z_buffers + 2 * kFwdZ<Operand>;      // P chunk of step s at + (s % 3) * kFwdP
  float* const cs = reinterpret_cast<float*>(shared);            // after the main loop: cs[row * ldc + col]
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int M = static_cast<int>(p.rows), I = static_cast<int>(p.inputs), O = static_cast<int>(p.outputs);
  const int D = static_cast<int>(p.dim), sed = static_cast<int>(p.stride_ed);
  const int m0 = static_cast<int>(blockIdx.x) * kTile, o0 = static_cast<int>(blockIdx.y) * kTile;
  const T* const xg_tile = xg + static_cast<int64_t>(m0) * I;
  const WarpPlace place = warp_place();

  if (threadIdx.x < kTile) {
    const int m = m0 + static_cast<int>(threadIdx.x);
    rows_e[threadIdx.x] = m < M ? embedding_row(m, p) : -1;
  }
  __syncthreads();
  int e_row[kStagedPerThread];  // the rows this thread stages: warp + 8 j
#pragma unroll
  for (int j = 0; j < kStagedPerThread; ++j) {
    e_row[j] = rows_e[warp + kWarpRowsStep * j];
  }

  // Steps s = (i-chunk, d), d fastest. The P chunk of step s + 1 is staged (in flight, if async) while
  // step s forms z and multiplies.
  const int steps = static_cast<int>(ceil_div(I, kTcDepth)) * D;
  if (steps > 0) {
    stage_pool_chunk(p_buffers, pool, 0, 0, o0, I, O, async_pool);
  }
  __pipeline_commit();
  Tile tile;
  tile.zero();
  float x[kStagedPerThread];  // xg[m0 + warp + 8 j, i0 + lane], rescaled for every d of the i-chunk
  int i0 = 0, d = 0;
  for (int s = 0; s < steps; ++s) {
    const int next_d = d + 1 < D ? d + 1 : 0;
    const int next_i0 = d + 1 < D ? i0 : i0 + kTcDepth;
    if (s + 1 < steps) {
      stage_pool_chunk(p_buffers + ((s + 1) % kFwdPBuffers) * kFwdP<Operand>, pool, next_d, next_i0, o0, I, O,
                       async_pool);
    }
    __pipeline_commit();
    if (d == 0) {
#pragma unroll
      for (int j = 0; j < kStagedPerThread; ++j) {
        const int i = i0 + lane;
        x[j] = (e_row[j] >= 0 && i < I) ? to_acc(xg_tile[(warp + kWarpRowsStep * j) * I + i]) : 0.0f;
      }
    }
    Operand* const zs = z_buffers + (s % 2) * kFwdZ<Operand>;
#pragma unroll
    for (int j = 0; j < kStagedPerThread; ++j) {
      const float e = e_row[j] >= 0 ? to_acc(emb[e_row[j] + d * sed]) : 0.0f;
      zs[(warp + kWarpRowsStep * j) * lda + lane] = Op::from(e * x[j]);
    }
    __pipeline_wait_prior(1);  // this thread's copies of step s's P chunk have landed
    __syncthreads();           // step s's operands are visible; step s - 2's readers are done
    const Operand* const ps = p_buffers + (s % kFwdPBuffers) * kFwdP<Operand>;
    const int k0 = kTcSliceDepth * place.group;
    tile.template multiply<detail::wmma::row_major, detail::wmma::row_major, true>(
        zs + place.row0 * lda + k0, lda, ps + k0 * ldb + place.col0, ldb, kTcSliceDepth);
    d = next_d;
    i0 = next_i0;
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // the operands are consumed before the accumulators overwrite them
  float* const warp_c = cs + place.row0 * kTcLdc + place.col0;
  if (place.group == 1) {
    tile.store(warp_c, kTcLdc);
  }
  __syncthreads();
  if (place.group == 0) {  // the two halves of K, in a fixed order
    tile.add(warp_c, kTcLdc);
    tile.store(warp_c, kTcLdc);
  }
  __syncthreads();
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * kTile; idx += kThreads) {
    const int row = idx / kTile, col = idx % kTile;
    const int m = m0 + row, o = o0 + col;
    if (m >= M || o >= O) {
      continue;
    }
    float v = cs[row * kTcLdc + col];
    if (bias_pool != nullptr) {
      const int e = rows_e[row];
      for (int d = 0; d < D; ++d) {
        v = fma(to_acc(emb[e + d * sed]), to_acc(bias_pool[d * O + o]), v);
      }
    }
    out[static_cast<int64_t>(m) * O + o] = Store<T>::from(activate(v, p.activation));
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// Block (64 rows, 64 columns of I), as the SIMT kernel: for every d, t = g @ P[d]^T over O on tensor
// cores (A = g chunk, B = P[d]^T chunk, staged as P[d]'s rows: column-major B), then t goes through
// shared memory to the thread that owns each (row, column) for dxg += E[., d] t and the dE row sums
// (fixed-order reduction, as the SIMT kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dxg_de_tc_kernel(const float* __restrict__ g, const T* __restrict__ xg, const T* __restrict__ emb,
                                    const T* __restrict__ pool, T* __restrict__ dxg, float* __restrict__ de_parts,
                                    MetaGconvDims p) {
#if STFAST_TENSOR_CORES
  using Tile = WarpTile<T>;
  using Operand = typename Tile::Operand;
  using Op = detail::MmaOperand<T>;
  constexpr int ld = kTcLdShort<Operand>;
  __shared__ __align__(128) unsigned char shared[kDxgSharedBytes<Operand>];
  __shared__ float red[kLanes][kTile + 1];  // dE partials: red[tx][row] (padded: the writes walk tx)
  __shared__ int rows_e[kTile];
  Operand* const stages = reinterpret_cast<Operand*>(shared);  // buffer s: gs[row * ld + k], then pts[col * ld + k]
  float* const cs = reinterpret_cast<float*>(shared);         // group h's t tile at cs + h * kTile * ldc
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int tx = static_cast<int>(threadIdx.x) % kLanes, ty = static_cast<int>(threadIdx.x) / kLanes;
  const int M = static_cast<int>(p.rows), I = static_cast<int>(p.inputs), O = static_cast<int>(p.outputs);
  const int D = static_cast<int>(p.dim), sed = static_cast<int>(p.stride_ed);
  const int m0 = static_cast<int>(blockIdx.x) * kTile, i0 = static_cast<int>(blockIdx.y) * kTile;
  const float* const g_tile = g + static_cast<int64_t>(m0) * O;
  const bool need_de = de_parts != nullptr;
  const WarpPlace place = warp_place();

  if (threadIdx.x < kTile) {
    const int m = m0 + static_cast<int>(threadIdx.x);
    rows_e[threadIdx.x] = m < M ? embedding_row(m, p) : -1;
  }
  float dx[kSub][kSub];
  T xv[kSub][kSub];  // this thread's xg values (for dE), in the storage type: fewer registers for fp16 / bf16
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
    const int m = m0 + ty + kLanes * r;
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      const int i = i0 + tx + kLanes * c;
      dx[r][c] = 0.0f;
      xv[r][c] = (need_de && m < M && i < I) ? xg[static_cast<int64_t>(m) * I + i] : Store<T>::from(0.0f);
    }
  }

  Tile tile;
  for (int d = 0; d < D; ++d) {
    tile.zero();
    const T* const pool_rows = pool + (static_cast<int64_t>(d) * I + i0) * O;  // P[d, i0, 0]
    __syncthreads();  // the previous t tiles and dE partials are consumed
    int step = 0;
    for (int o0 = 0; o0 < O; o0 += kTcDepth, ++step) {
      Operand* const gs = stages + (step % 2) * kDxgStage<Operand>;
      Operand* const pts = gs + kTile * ld;
      const int o = o0 + lane;
#pragma unroll
      for (int j = 0; j < kStagedPerThread; ++j) {
        const int row = warp + kWarpRowsStep * j;  // also the column of I for pts
        gs[row * ld + lane] = Op::from((m0 + row < M && o < O) ? g_tile[row * O + o] : 0.0f);
        pts[row * ld + lane] = Op::from((i0 + row < I && o < O) ? to_acc(pool_rows[row * O + o]) : 0.0f);
      }
      __syncthreads();  // this step's operands are visible (and the other buffer's readers are done)
      const int k0 = kTcSliceDepth * place.group;
      tile.template multiply<detail::wmma::row_major, detail::wmma::col_major>(
          gs + place.row0 * ld + k0, ld, pts + place.col0 * ld + k0, ld, kTcSliceDepth);
    }
    __syncthreads();  // the operands are consumed before t overwrites them
    tile.store(cs + place.group * kTile * kTcLdc + place.row0 * kTcLdc + place.col0, kTcLdc);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const int row = ty + kLanes * r;
      const int e_row = rows_e[row];
      const float e = e_row >= 0 ? to_acc(emb[e_row + d * sed]) : 0.0f;
      float row_sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        const int at = row * kTcLdc + tx + kLanes * c;
        const float t = cs[at] + cs[kTile * kTcLdc + at];  // the two halves of O, in a fixed order
        dx[r][c] = fma(e, t, dx[r][c]);
        row_sum = fma(to_acc(xv[r][c]), t, row_sum);
      }
      if (need_de) {
        red[tx][row] = row_sum;
      }
    }
    if (need_de) {
      __syncthreads();
      if (threadIdx.x < kTile) {
        const int m = m0 + static_cast<int>(threadIdx.x);
        float total = 0.0f;
        for (int j = 0; j < kLanes; ++j) {  // fixed order
          total += red[j][threadIdx.x];
        }
        if (m < M) {
          de_parts[(static_cast<int64_t>(blockIdx.y) * M + m) * D + d] = total;
        }
      }
    }
  }

  if (dxg != nullptr) {
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const int m = m0 + ty + kLanes * r;
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        const int i = i0 + tx + kLanes * c;
        if (m < M && i < I) {
          dxg[static_cast<int64_t>(m) * I + i] = Store<T>::from(dx[r][c]);
        }
      }
    }
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// Block (dP tile (64 of I, 64 of O), group of kDpGroup d, row slice): over the slice's rows in chunks
// of kTcDepth, the xg and g chunks are read once and the z chunk of every d of the group is formed from
// them (A = z^T, z staged as zs[m][i] and read column-major; B = g chunk). Warp group h accumulates
// d = d0 + h + 2 j, each output reduced over the slice's rows in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dp_tc_kernel(const float* __restrict__ g, const T* __restrict__ xg, const T* __restrict__ emb,
                                float* __restrict__ dp_parts, int64_t rows_per_slice, MetaGconvDims p) {
#if STFAST_TENSOR_CORES
  using Tile = WarpTile<T>;
  using Operand = typename Tile::Operand;
  using Op = detail::MmaOperand<T>;
  constexpr int ld = kTcLdLong<Operand>;
  constexpr int kPerGroup = kDpGroup / 2;
  __shared__ __align__(128) unsigned char shared[kDpSharedBytes<Operand>];
  __shared__ float es[2][kTcDepth][kDpGroup];  // E[m, d0 + dl] of a row chunk, loaded one chunk ahead
  Operand* const zs = reinterpret_cast<Operand*>(shared);  // z chunk of d0 + dl at zs + dl * kTcDepth * ld
  Operand* const gs = zs + kDpGroup * kTcDepth * ld;       // gs[k * ld + o]
  float* const cs = reinterpret_cast<float*>(shared);      // at the end: group h's tile at cs + h * kTile * ldc
  const int M = static_cast<int>(p.rows), I = static_cast<int>(p.inputs), O = static_cast<int>(p.outputs);
  const int D = static_cast<int>(p.dim), sed = static_cast<int>(p.stride_ed);
  const int o_tiles = static_cast<int>(ceil_div(O, kTile));
  const int i0 = static_cast<int>(blockIdx.x) / o_tiles * kTile, o0 = static_cast<int>(blockIdx.x) % o_tiles * kTile;
  const int d0 = static_cast<int>(blockIdx.y) * kDpGroup;
  const int slice = static_cast<int>(blockIdx.z);
  const int m_begin = static_cast<int>(slice * rows_per_slice);
  const int m_end = m_begin + rows_per_slice < M ? static_cast<int>(m_begin + rows_per_slice) : M;
  const int col = static_cast<int>(threadIdx.x) % kTile;  // thread stages column col of rows k = t / 64 + 4 j
  const int k_first = static_cast<int>(threadIdx.x) / kTile;
  const WarpPlace place = warp_place();

  // es[buf] for the chunk at mc: one embedding row offset per row, by the first kTcDepth threads.
  auto load_embedding = [&](int mc, int buf) {
    if (threadIdx.x < kTcDepth) {
      const int m = mc + static_cast<int>(threadIdx.x);
      const int e = m < m_end ? embedding_row(m, p) : -1;
#pragma unroll
      for (int dl = 0; dl < kDpGroup; ++dl) {
        es[buf][threadIdx.x][dl] = (e >= 0 && d0 + dl < D) ? to_acc(emb[e + (d0 + dl) * sed]) : 0.0f;
      }
    }
  };

  Tile tile[kPerGroup];
#pragma unroll
  for (int j = 0; j < kPerGroup; ++j) {
    tile[j].zero();
  }
  load_embedding(m_begin, 0);
  int buf = 0;
  for (int mc = m_begin; mc < m_end; mc += kTcDepth, buf ^= 1) {
    __syncthreads();  // es[buf] is visible; the previous chunk's operands (and es[buf ^ 1]) are consumed
    load_embedding(mc + kTcDepth, buf ^ 1);
    const T* const x_chunk = xg + static_cast<int64_t>(mc) * I + i0;
    const float* const g_chunk = g + static_cast<int64_t>(mc) * O + o0;
#pragma unroll
    for (int j = 0; j < kStagedPerThread; ++j) {
      const int k = k_first + (kThreads / kTile) * j;
      const bool row_in = mc + k < m_end;
      const float x = (row_in && i0 + col < I) ? to_acc(x_chunk[k * I + col]) : 0.0f;
#pragma unroll
      for (int dl = 0; dl < kDpGroup; ++dl) {
        zs[(dl * kTcDepth + k) * ld + col] = Op::from(es[buf][k][dl] * x);
      }
      gs[k * ld + col] = Op::from((row_in && o0 + col < O) ? g_chunk[k * O + col] : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPerGroup; ++j) {
      const int dl = place.group + 2 * j;
      tile[j].template multiply<detail::wmma::col_major, detail::wmma::row_major>(
          zs + dl * kTcDepth * ld + place.row0, ld, gs + place.col0, ld, kTcDepth);
    }
  }
  // Two d tiles at a time (one per group) through shared memory to the partial buffer.
#pragma unroll
  for (int j = 0; j < kPerGroup; ++j) {
    __syncthreads();  // the operands, or the previous tiles, are consumed
    tile[j].store(cs + place.group * kTile * kTcLdc + place.row0 * kTcLdc + place.col0, kTcLdc);
    __syncthreads();
    for (int h = 0; h < 2; ++h) {
      const int d = d0 + h + 2 * j;
      if (d >= D) {
        continue;
      }
      float* const part = dp_parts + (static_cast<int64_t>(slice) * D + d) * I * O;
      for (int idx = static_cast<int>(threadIdx.x); idx < kTile * kTile; idx += kThreads) {
        const int row = idx / kTile, c = idx % kTile;
        if (i0 + row < I && o0 + c < O) {
          part[(i0 + row) * O + o0 + c] = cs[h * kTile * kTcLdc + row * kTcLdc + c];
        }
      }
    }
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

}  // namespace
}  // namespace stfast_cuda
