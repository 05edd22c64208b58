// CUDA kernels of stfast_ext::meta_gconv_fwd / meta_gconv_bwd, with raw-pointer launchers (see
// meta_gconv_kernels.h). No torch headers: this file compiles with plain nvcc.
//
// The meta GEMM: with z[m, (d, i)] = E[m, d] * xg[m, i], y = z @ P.reshape(D*I, O), a GEMM with
// K = D*I. z is never stored: a block stages one (rows x BK) tile of xg in shared memory per i-chunk
// and walks d, multiplying the block's partial sums over that chunk by E[m, d] (one FMA per output
// per chunk and d), so the inner loop is a plain xg-tile x P[d]-tile product.
//
// Two paths. The SIMT kernels (64x64 output tiles, 4x4 outputs per thread, shared-memory staging, fp32
// accumulation, fp64 for fp64) run every dtype. The tensor-core kernels (WMMA, tensor_core_tile.cuh)
// run fp16 / bf16 and, as TF32, fp32 when MetaGconvDims::tensor_cores is set (the glue sets it on
// sm_80+, for fp32 only where torch allows TF32 matmuls). Both have been compiled with nvcc (CI) and
// run in the CPU emulation of tests/test_cuda_emulation.py, not yet on a GPU.
//
// Determinism: no atomics. Every output element is written by one thread that reduces in a fixed
// order; the two reductions that span blocks (dE over slices of I, dP over slices of M) write fp32
// partial buffers (in the accumulation type) that sum_parts (cuda_common.cu) adds up in slice order.
#include "meta_gconv_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "tensor_core_tile.cuh"

namespace stfast_cuda {
namespace {

constexpr int kThreads = 256;  // 16 x 16 threads, each owning 4 x 4 outputs of a 64 x 64 tile
constexpr int kTile = 64;
constexpr int kSub = 4;        // outputs per thread along each tile side
constexpr int kLanes = 16;     // threads along each tile side
constexpr int kChunk = 32;     // reduction depth staged per step (BK)

// dtype helpers (Acc, to_acc, Store, ceil_div, dispatch): cuda_common.h
using detail::Acc;
using detail::ceil_div;
using detail::dispatch;
using detail::Store;
using detail::to_acc;

template <typename A>
__device__ __forceinline__ A activate(A v, int activation) {
  if (activation == 1) {
    return A(1) / (A(1) + exp(-v));
  }
  if (activation == 2) {
    return tanh(v);
  }
  return v;
}

__device__ __forceinline__ int64_t embedding_offset(int64_t m, const MetaGconvDims& p) {
  const int64_t b = m / p.nodes;
  const int64_t n = m - b * p.nodes;
  return b * p.stride_eb + n * p.stride_en;
}

// ---------------------------------------------------------------- forward

// Grid (ceil(M / 64), ceil(O / 64)). Thread (tx, ty) owns rows m0 + ty + 16 r and columns
// o0 + tx + 16 c (r, c < 4).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ emb, const T* __restrict__ pool,
                          const T* __restrict__ bias_pool, T* __restrict__ out, MetaGconvDims p) {
  using A = typename Acc<T>::type;
  __shared__ A xs[kChunk][kTile];  // xg tile, transposed: xs[k][row]
  __shared__ A ps[kChunk][kTile];  // P[d] tile: ps[k][col]
  __shared__ A es[kTile];          // E[row, d]
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t I = p.inputs, O = p.outputs;

  A acc[kSub][kSub];
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      acc[r][c] = A(0);
    }
  }

  for (int64_t i0 = 0; i0 < I; i0 += kChunk) {
    __syncthreads();  // every thread is done with the previous xs
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      const int row = idx / kChunk, k = idx % kChunk;
      const int64_t m = m0 + row, i = i0 + k;
      xs[k][row] = (m < p.rows && i < I) ? to_acc(xg[m * I + i]) : A(0);
    }
    for (int64_t d = 0; d < p.dim; ++d) {
      __syncthreads();  // previous ps / es consumed; xs visible
      for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
        const int k = idx / kTile, col = idx % kTile;
        const int64_t i = i0 + k, o = o0 + col;
        ps[k][col] = (i < I && o < O) ? to_acc(pool[(d * I + i) * O + o]) : A(0);
      }
      if (threadIdx.x < kTile) {
        const int64_t m = m0 + threadIdx.x;
        es[threadIdx.x] = m < p.rows ? to_acc(emb[embedding_offset(m, p) + d * p.stride_ed]) : A(0);
      }
      __syncthreads();
      A part[kSub][kSub];
#pragma unroll
      for (int r = 0; r < kSub; ++r) {
#pragma unroll
        for (int c = 0; c < kSub; ++c) {
          part[r][c] = A(0);
        }
      }
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        A a[kSub], b[kSub];
#pragma unroll
        for (int r = 0; r < kSub; ++r) {
          a[r] = xs[k][ty + kLanes * r];
        }
#pragma unroll
        for (int c = 0; c < kSub; ++c) {
          b[c] = ps[k][tx + kLanes * c];
        }
#pragma unroll
        for (int r = 0; r < kSub; ++r) {
#pragma unroll
          for (int c = 0; c < kSub; ++c) {
            part[r][c] = fma(a[r], b[c], part[r][c]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kSub; ++r) {
        const A e = es[ty + kLanes * r];
#pragma unroll
        for (int c = 0; c < kSub; ++c) {
          acc[r][c] = fma(e, part[r][c], acc[r][c]);
        }
      }
    }
  }

  // Epilogue: + E[m, :] @ Pb, activation, one store per output.
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
    const int64_t m = m0 + ty + kLanes * r;
    if (m >= p.rows) {
      continue;
    }
    const int64_t e_row = embedding_offset(m, p);
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      const int64_t o = o0 + tx + kLanes * c;
      if (o >= O) {
        continue;
      }
      A v = acc[r][c];
      if (bias_pool != nullptr) {
        for (int64_t d = 0; d < p.dim; ++d) {
          v = fma(to_acc(emb[e_row + d * p.stride_ed]), to_acc(bias_pool[d * O + o]), v);
        }
      }
      out[m * O + o] = Store<T>::from(activate(v, p.activation));
    }
  }
}

// ---------------------------------------------------------------- backward: dxg and dE

// Grid (ceil(M / 64), ceil(I / 64)): block (bx, by) owns rows m0 .. m0+63 and input columns
// i0 .. i0+63. For every d it forms t = g @ P[d]^T on its tile (reduction over O in chunks), then
// dxg += E[., d] * t and, for dE, the row sums of xg * t over its columns, reduced across the 16
// threads that share a row in a fixed order and written to de_parts[by, m, d].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dxg_de_kernel(const typename Acc<T>::type* __restrict__ g, const T* __restrict__ xg,
                                 const T* __restrict__ emb, const T* __restrict__ pool, T* __restrict__ dxg,
                                 typename Acc<T>::type* __restrict__ de_parts, MetaGconvDims p) {
  using A = typename Acc<T>::type;
  __shared__ A gs[kChunk][kTile];   // g tile, transposed: gs[k][row]
  __shared__ A pts[kChunk][kTile];  // P[d]^T tile: pts[k][col] = P[d, i0 + col, o0 + k]
  __shared__ A es[kTile];
  __shared__ A red[kLanes][kTile];  // dE partials: red[tx][row]
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t I = p.inputs, O = p.outputs, M = p.rows;
  const bool need_de = de_parts != nullptr;

  A dx[kSub][kSub];
  A xv[kSub][kSub];  // this thread's xg values (for dE)
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
    const int64_t m = m0 + ty + kLanes * r;
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      const int64_t i = i0 + tx + kLanes * c;
      dx[r][c] = A(0);
      xv[r][c] = (need_de && m < M && i < I) ? to_acc(xg[m * I + i]) : A(0);
    }
  }

  for (int64_t d = 0; d < p.dim; ++d) {
    A t[kSub][kSub];
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        t[r][c] = A(0);
      }
    }
    for (int64_t o0 = 0; o0 < O; o0 += kChunk) {
      __syncthreads();  // previous gs / pts / es / red consumed
      for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
        const int row = idx / kChunk, k = idx % kChunk;
        const int64_t m = m0 + row, o = o0 + k;
        gs[k][row] = (m < M && o < O) ? g[m * O + o] : A(0);
      }
      for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
        const int col = idx / kChunk, k = idx % kChunk;
        const int64_t i = i0 + col, o = o0 + k;
        pts[k][col] = (i < I && o < O) ? to_acc(pool[(d * I + i) * O + o]) : A(0);
      }
      if (o0 == 0 && threadIdx.x < kTile) {
        const int64_t m = m0 + threadIdx.x;
        es[threadIdx.x] = m < M ? to_acc(emb[embedding_offset(m, p) + d * p.stride_ed]) : A(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        A a[kSub], b[kSub];
#pragma unroll
        for (int r = 0; r < kSub; ++r) {
          a[r] = gs[k][ty + kLanes * r];
        }
#pragma unroll
        for (int c = 0; c < kSub; ++c) {
          b[c] = pts[k][tx + kLanes * c];
        }
#pragma unroll
        for (int r = 0; r < kSub; ++r) {
#pragma unroll
          for (int c = 0; c < kSub; ++c) {
            t[r][c] = fma(a[r], b[c], t[r][c]);
          }
        }
      }
    }
    // Without any O chunk (O == 0) es was never loaded: t is zero, and so is every use below.
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const A e = O > 0 ? es[ty + kLanes * r] : A(0);
      A row_sum = A(0);
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        dx[r][c] = fma(e, t[r][c], dx[r][c]);
        row_sum = fma(xv[r][c], t[r][c], row_sum);
      }
      if (need_de) {
        red[tx][ty + kLanes * r] = row_sum;
      }
    }
    if (need_de) {
      __syncthreads();
      if (threadIdx.x < kTile) {
        const int64_t m = m0 + threadIdx.x;
        A total = A(0);
        for (int j = 0; j < kLanes; ++j) {  // fixed order
          total += red[j][threadIdx.x];
        }
        if (m < M) {
          de_parts[(static_cast<int64_t>(blockIdx.y) * M + m) * p.dim + d] = total;
        }
      }
    }
  }

  if (dxg != nullptr) {
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const int64_t m = m0 + ty + kLanes * r;
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        const int64_t i = i0 + tx + kLanes * c;
        if (m < M && i < I) {
          dxg[m * I + i] = Store<T>::from(dx[r][c]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- backward: dP

constexpr int64_t kRowsPerSlice = 512;  // rows of M per dP slice (more slices: more blocks)
constexpr int64_t kMaxSlices = 64;

// Grid (ceil(I / 64) * ceil(O / 64), D, slices): block owns the dP[d] tile (i0.., o0..) and reduces
// over the rows of its slice in order. Thread (tx, ty) owns i = i0 + ty + 16 r, o = o0 + tx + 16 c.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dp_kernel(const typename Acc<T>::type* __restrict__ g, const T* __restrict__ xg,
                             const T* __restrict__ emb, typename Acc<T>::type* __restrict__ dp_parts,
                             int64_t rows_per_slice, MetaGconvDims p) {
  using A = typename Acc<T>::type;
  __shared__ A zs[kChunk][kTile];  // zs[k][i] = E[m, d] xg[m, i]
  __shared__ A gs[kChunk][kTile];  // gs[k][o] = g[m, o]
  __shared__ A es[kChunk];
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t I = p.inputs, O = p.outputs, M = p.rows;
  const int64_t o_tiles = (O + kTile - 1) / kTile;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) / o_tiles) * kTile;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) % o_tiles) * kTile;
  const int64_t d = blockIdx.y;
  const int64_t slice = blockIdx.z;
  const int64_t m_begin = slice * rows_per_slice;
  const int64_t m_end = m_begin + rows_per_slice < M ? m_begin + rows_per_slice : M;

  A acc[kSub][kSub];
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      acc[r][c] = A(0);
    }
  }
  for (int64_t mc = m_begin; mc < m_end; mc += kChunk) {
    __syncthreads();
    if (threadIdx.x < kChunk) {
      const int64_t m = mc + threadIdx.x;
      es[threadIdx.x] = m < m_end ? to_acc(emb[embedding_offset(m, p) + d * p.stride_ed]) : A(0);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      const int k = idx / kTile, col = idx % kTile;
      const int64_t m = mc + k, i = i0 + col, o = o0 + col;
      zs[k][col] = (m < m_end && i < I) ? es[k] * to_acc(xg[m * I + i]) : A(0);
      gs[k][col] = (m < m_end && o < O) ? g[m * O + o] : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kChunk; ++k) {
      A a[kSub], b[kSub];
#pragma unroll
      for (int r = 0; r < kSub; ++r) {
        a[r] = zs[k][ty + kLanes * r];
      }
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        b[c] = gs[k][tx + kLanes * c];
      }
#pragma unroll
      for (int r = 0; r < kSub; ++r) {
#pragma unroll
        for (int c = 0; c < kSub; ++c) {
          acc[r][c] = fma(a[r], b[c], acc[r][c]);
        }
      }
    }
  }
  A* part = dp_parts + (slice * p.dim + d) * I * O;
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
    const int64_t i = i0 + ty + kLanes * r;
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      const int64_t o = o0 + tx + kLanes * c;
      if (i < I && o < O) {
        part[i * O + o] = acc[r][c];
      }
    }
  }
}


// ---------------------------------------------------------------- tensor-core kernels
//
// The same three products on tensor cores (tensor_core_tile.cuh): 256 threads, a 64 x 64 fp32 tile
// per block, operands staged kTcDepth deep in shared memory in the MMA operand type (fp16 / bf16 as
// themselves, fp32 rounded to TF32), the accumulator tile stored to shared memory for the epilogue.
// Where the SIMT kernels scale partial sums by E[m, d], these stage z = E[m, d] * xg[m, i] (rounded
// once to the operand type) so that the reduction over (d, i) is one plain GEMM with K = D*I.

#if STFAST_TENSOR_CORES

using detail::kAccumulatorPad;
using detail::kOperandPad;
using detail::TensorCoreTile;

constexpr int kTcDepth = 32;  // reduction depth staged per step: 2 (fp16 / bf16) or 4 (TF32) MMA steps

// Shared-memory bytes of a kernel that stages a (64 x kTcDepth) and a (kTcDepth x 64) operand tile and
// later (never at the same time) holds the 64 x 64 accumulator tile.
template <typename Operand>
constexpr int kTcOperandBytes = 2 * kTile * (kTcDepth + kOperandPad<Operand>) * static_cast<int>(sizeof(Operand));
constexpr int kTcAccumulatorBytes = kTile * (kTile + kAccumulatorPad) * static_cast<int>(sizeof(float));
template <typename Operand>
constexpr int kTcSharedBytes =
    kTcOperandBytes<Operand> > kTcAccumulatorBytes ? kTcOperandBytes<Operand> : kTcAccumulatorBytes;

#endif  // STFAST_TENSOR_CORES

// y tile (64 rows, 64 outputs) = z @ P.reshape(D*I, O): for each chunk of I and each d, A = z
// (64 x kTcDepth, row-major) and B = P[d] chunk (kTcDepth x 64). Epilogue as the SIMT kernel's.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_fwd_tc_kernel(const T* __restrict__ xg, const T* __restrict__ emb, const T* __restrict__ pool,
                             const T* __restrict__ bias_pool, T* __restrict__ out, MetaGconvDims p) {
#if STFAST_TENSOR_CORES
  using Tile = TensorCoreTile<T>;
  using Operand = typename Tile::Operand;
  using Op = detail::MmaOperand<T>;
  constexpr int lda = kTcDepth + kOperandPad<Operand>, ldb = kTile + kOperandPad<Operand>;
  constexpr int ldc = kTile + kAccumulatorPad;
  __shared__ __align__(128) unsigned char shared[kTcSharedBytes<Operand>];
  Operand* zs = reinterpret_cast<Operand*>(shared);  // zs[row * lda + k]
  Operand* ps = zs + kTile * lda;                      // ps[k * ldb + col]
  float* cs = reinterpret_cast<float*>(shared);        // after the main loop: cs[row * ldc + col]
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t I = p.inputs, O = p.outputs;

  Tile tile;
  tile.zero();
  for (int64_t i0 = 0; i0 < I; i0 += kTcDepth) {
    for (int64_t d = 0; d < p.dim; ++d) {
      __syncthreads();  // every warp is done with the previous operands
      for (int idx = threadIdx.x; idx < kTile * kTcDepth; idx += kThreads) {
        const int row = idx / kTcDepth, k = idx % kTcDepth;
        const int64_t m = m0 + row, i = i0 + k;
        const float z = (m < p.rows && i < I)
                            ? to_acc(emb[embedding_offset(m, p) + d * p.stride_ed]) * to_acc(xg[m * I + i])
                            : 0.0f;
        zs[row * lda + k] = Op::from(z);
      }
      for (int idx = threadIdx.x; idx < kTile * kTcDepth; idx += kThreads) {
        const int k = idx / kTile, col = idx % kTile;
        const int64_t i = i0 + k, o = o0 + col;
        ps[k * ldb + col] = Op::from((i < I && o < O) ? to_acc(pool[(d * I + i) * O + o]) : 0.0f);
      }
      __syncthreads();
      tile.template multiply<detail::wmma::row_major>(zs, lda, ps, ldb, kTcDepth);
    }
  }
  __syncthreads();  // the operands are consumed before the accumulators overwrite them
  tile.store(cs, ldc);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const int row = idx / kTile, col = idx % kTile;
    const int64_t m = m0 + row, o = o0 + col;
    if (m >= p.rows || o >= O) {
      continue;
    }
    float v = cs[row * ldc + col];
    if (bias_pool != nullptr) {
      const int64_t e_row = embedding_offset(m, p);
      for (int64_t d = 0; d < p.dim; ++d) {
        v = fma(to_acc(emb[e_row + d * p.stride_ed]), to_acc(bias_pool[d * O + o]), v);
      }
    }
    out[m * O + o] = Store<T>::from(activate(v, p.activation));
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// Block (64 rows, 64 columns of I), as the SIMT kernel: for every d, t = g @ P[d]^T over O on tensor
// cores (A = g tile, B = P[d]^T tile), then t goes through shared memory to the thread that owns each
// (row, column) for dxg += E[., d] t and the dE row sums (fixed-order reduction, as the SIMT kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dxg_de_tc_kernel(const float* __restrict__ g, const T* __restrict__ xg, const T* __restrict__ emb,
                                    const T* __restrict__ pool, T* __restrict__ dxg, float* __restrict__ de_parts,
                                    MetaGconvDims p) {
#if STFAST_TENSOR_CORES
  using Tile = TensorCoreTile<T>;
  using Operand = typename Tile::Operand;
  using Op = detail::MmaOperand<T>;
  constexpr int lda = kTcDepth + kOperandPad<Operand>, ldb = kTile + kOperandPad<Operand>;
  constexpr int ldc = kTile + kAccumulatorPad;
  __shared__ __align__(128) unsigned char shared[kTcSharedBytes<Operand>];
  __shared__ float red[kLanes][kTile];  // dE partials: red[tx][row]
  Operand* gs = reinterpret_cast<Operand*>(shared);  // gs[row * lda + k] = g[m, o0 + k]
  Operand* pts = gs + kTile * lda;                     // pts[k * ldb + col] = P[d, i0 + col, o0 + k]
  float* cs = reinterpret_cast<float*>(shared);        // t tile: cs[row * ldc + col]
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t I = p.inputs, O = p.outputs, M = p.rows;
  const bool need_de = de_parts != nullptr;

  float dx[kSub][kSub];
  float xv[kSub][kSub];  // this thread's xg values (for dE)
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
    const int64_t m = m0 + ty + kLanes * r;
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      const int64_t i = i0 + tx + kLanes * c;
      dx[r][c] = 0.0f;
      xv[r][c] = (need_de && m < M && i < I) ? to_acc(xg[m * I + i]) : 0.0f;
    }
  }

  Tile tile;
  for (int64_t d = 0; d < p.dim; ++d) {
    tile.zero();
    for (int64_t o0 = 0; o0 < O; o0 += kTcDepth) {
      __syncthreads();  // the previous operands (or t tile, or dE partials) are consumed
      for (int idx = threadIdx.x; idx < kTile * kTcDepth; idx += kThreads) {
        const int row = idx / kTcDepth, k = idx % kTcDepth;
        const int64_t m = m0 + row, o = o0 + k;
        gs[row * lda + k] = Op::from((m < M && o < O) ? g[m * O + o] : 0.0f);
      }
      for (int idx = threadIdx.x; idx < kTile * kTcDepth; idx += kThreads) {
        const int col = idx / kTcDepth, k = idx % kTcDepth;
        const int64_t i = i0 + col, o = o0 + k;
        pts[k * ldb + col] = Op::from((i < I && o < O) ? to_acc(pool[(d * I + i) * O + o]) : 0.0f);
      }
      __syncthreads();
      tile.template multiply<detail::wmma::row_major>(gs, lda, pts, ldb, kTcDepth);
    }
    __syncthreads();  // the operands are consumed before t overwrites them
    tile.store(cs, ldc);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const int row = ty + kLanes * r;
      const int64_t m = m0 + row;
      const float e = m < M ? to_acc(emb[embedding_offset(m, p) + d * p.stride_ed]) : 0.0f;
      float row_sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        const float t = cs[row * ldc + tx + kLanes * c];
        dx[r][c] = fma(e, t, dx[r][c]);
        row_sum = fma(xv[r][c], t, row_sum);
      }
      if (need_de) {
        red[tx][row] = row_sum;
      }
    }
    if (need_de) {
      __syncthreads();
      if (threadIdx.x < kTile) {
        const int64_t m = m0 + threadIdx.x;
        float total = 0.0f;
        for (int j = 0; j < kLanes; ++j) {  // fixed order
          total += red[j][threadIdx.x];
        }
        if (m < M) {
          de_parts[(static_cast<int64_t>(blockIdx.y) * M + m) * p.dim + d] = total;
        }
      }
    }
  }

  if (dxg != nullptr) {
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const int64_t m = m0 + ty + kLanes * r;
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        const int64_t i = i0 + tx + kLanes * c;
        if (m < M && i < I) {
          dxg[m * I + i] = Store<T>::from(dx[r][c]);
        }
      }
    }
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// Block (dP[d] tile (64 of I, 64 of O), row slice), as the SIMT kernel: over the slice's rows in
// chunks, A = z^T (z staged row-major as zs[m][i], read column-major) and B = g chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dp_tc_kernel(const float* __restrict__ g, const T* __restrict__ xg, const T* __restrict__ emb,
                                float* __restrict__ dp_parts, int64_t rows_per_slice, MetaGconvDims p) {
#if STFAST_TENSOR_CORES
  using Tile = TensorCoreTile<T>;
  using Operand = typename Tile::Operand;
  using Op = detail::MmaOperand<T>;
  constexpr int ld = kTile + kOperandPad<Operand>;
  constexpr int ldc = kTile + kAccumulatorPad;
  __shared__ __align__(128) unsigned char shared[kTcSharedBytes<Operand>];
  Operand* zs = reinterpret_cast<Operand*>(shared);  // zs[k * ld + col] = E[m, d] xg[m, i0 + col], m = mc + k
  Operand* gs = zs + kTcDepth * ld;                    // gs[k * ld + col] = g[m, o0 + col]
  float* cs = reinterpret_cast<float*>(shared);
  const int64_t I = p.inputs, O = p.outputs, M = p.rows;
  const int64_t o_tiles = (O + kTile - 1) / kTile;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) / o_tiles) * kTile;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) % o_tiles) * kTile;
  const int64_t d = blockIdx.y;
  const int64_t slice = blockIdx.z;
  const int64_t m_begin = slice * rows_per_slice;
  const int64_t m_end = m_begin + rows_per_slice < M ? m_begin + rows_per_slice : M;

  Tile tile;
  tile.zero();
  for (int64_t mc = m_begin; mc < m_end; mc += kTcDepth) {
    __syncthreads();  // every warp is done with the previous operands
    for (int idx = threadIdx.x; idx < kTile * kTcDepth; idx += kThreads) {
      const int k = idx / kTile, col = idx % kTile;
      const int64_t m = mc + k, i = i0 + col, o = o0 + col;
      const float z = (m < m_end && i < I) ? to_acc(emb[embedding_offset(m, p) + d * p.stride_ed]) * to_acc(xg[m * I + i])
                                           : 0.0f;
      zs[k * ld + col] = Op::from(z);
      gs[k * ld + col] = Op::from((m < m_end && o < O) ? g[m * O + o] : 0.0f);
    }
    __syncthreads();
    tile.template multiply<detail::wmma::col_major>(zs, ld, gs, ld, kTcDepth);
  }
  __syncthreads();  // the operands are consumed before the accumulators overwrite them
  tile.store(cs, ldc);
  __syncthreads();
  float* part = dp_parts + (slice * p.dim + d) * I * O;
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const int row = idx / kTile, col = idx % kTile;
    const int64_t i = i0 + row, o = o0 + col;
    if (i < I && o < O) {
      part[i * O + o] = cs[row * ldc + col];
    }
  }
#else
  __trap();  // never launched: the glue runs tensor-core kernels on sm_80+ only
#endif
}

// The tensor-core kernels exist for fp32 (TF32), fp16 and bf16 (their bodies are compiled for sm_80+).
template <typename T>
constexpr bool has_tensor_core_path() {
  return !std::is_same<T, double>::value;
}

}  // namespace

cudaError_t meta_gconv_forward(DType dtype, const void* xg, const void* emb, const void* pool, const void* bias_pool,
                               void* out, const MetaGconvDims& dims, cudaStream_t stream) {
  if (dims.rows == 0 || dims.outputs == 0) {
    return cudaSuccess;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(dims.rows, kTile)), static_cast<unsigned>(ceil_div(dims.outputs, kTile)));
  if (grid.y > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        meta_gconv_fwd_tc_kernel<T><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(xg), static_cast<const T*>(emb), static_cast<const T*>(pool),
            static_cast<const T*>(bias_pool), static_cast<T*>(out), dims);
        return;
      }
    }
    meta_gconv_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(xg), static_cast<const T*>(emb), static_cast<const T*>(pool),
        static_cast<const T*>(bias_pool), static_cast<T*>(out), dims);
  });
}

int64_t meta_gconv_de_parts(const MetaGconvDims& dims) {
  return std::max<int64_t>(1, ceil_div(dims.inputs, kTile));
}

cudaError_t meta_gconv_backward_dxg_de(DType dtype, const void* g, const void* xg, const void* emb, const void* pool,
                                       void* dxg, void* de_parts, const MetaGconvDims& dims, cudaStream_t stream) {
  if (dims.rows == 0 || (dxg == nullptr && de_parts == nullptr)) {
    return cudaSuccess;
  }
  if (dims.inputs == 0) {  // no columns: dE is zero (the caller zero-fills its partial buffer)
    return cudaSuccess;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(dims.rows, kTile)), static_cast<unsigned>(meta_gconv_de_parts(dims)));
  if (grid.y > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        meta_gconv_bwd_dxg_de_tc_kernel<T><<<grid, kThreads, 0, stream>>>(
            static_cast<const A*>(g), static_cast<const T*>(xg), static_cast<const T*>(emb),
            static_cast<const T*>(pool), static_cast<T*>(dxg), static_cast<A*>(de_parts), dims);
        return;
      }
    }
    meta_gconv_bwd_dxg_de_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const A*>(g), static_cast<const T*>(xg), static_cast<const T*>(emb), static_cast<const T*>(pool),
        static_cast<T*>(dxg), static_cast<A*>(de_parts), dims);
  });
}

int64_t meta_gconv_dp_parts(const MetaGconvDims& dims) {
  return std::min<int64_t>(kMaxSlices, std::max<int64_t>(1, ceil_div(dims.rows, kRowsPerSlice)));
}

cudaError_t meta_gconv_backward_dp(DType dtype, const void* g, const void* xg, const void* emb, void* dp_parts,
                                   const MetaGconvDims& dims, cudaStream_t stream) {
  if (dims.inputs == 0 || dims.outputs == 0 || dims.dim == 0) {
    return cudaSuccess;
  }
  const int64_t slices = meta_gconv_dp_parts(dims);
  const int64_t rows_per_slice = std::max<int64_t>(1, ceil_div(dims.rows, slices));
  const dim3 grid(static_cast<unsigned>(ceil_div(dims.inputs, kTile) * ceil_div(dims.outputs, kTile)),
                  static_cast<unsigned>(dims.dim), static_cast<unsigned>(slices));
  if (dims.dim > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        meta_gconv_bwd_dp_tc_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const A*>(g),
                                                                       static_cast<const T*>(xg),
                                                                       static_cast<const T*>(emb),
                                                                       static_cast<A*>(dp_parts), rows_per_slice, dims);
        return;
      }
    }
    meta_gconv_bwd_dp_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const A*>(g), static_cast<const T*>(xg),
                                                                static_cast<const T*>(emb), static_cast<A*>(dp_parts),
                                                                rows_per_slice, dims);
  });
}

}  // namespace stfast_cuda
