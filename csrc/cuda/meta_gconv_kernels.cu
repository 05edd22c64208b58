// CUDA kernels of stfast_ext::meta_gconv_fwd / meta_gconv_bwd, with raw-pointer launchers (see
// meta_gconv_kernels.h). No torch headers: this file compiles with plain nvcc.
//
// The meta GEMM: with z[m, (d, i)] = E[m, d] * xg[m, i], y = z @ P.reshape(D*I, O), a GEMM with
// K = D*I. z is never stored: a block stages one (rows x BK) tile of xg in shared memory per i-chunk
// and walks d, multiplying the block's partial sums over that chunk by E[m, d] (one FMA per output
// per chunk and d), so the inner loop is a plain xg-tile x P[d]-tile product.
//
// Two paths. The SIMT kernels here (64x64 output tiles, 4x4 outputs per thread, shared-memory staging,
// fp32 accumulation, fp64 for fp64) run every dtype. The tensor-core kernels (WMMA,
// meta_gconv_tc_kernels.cuh on tensor_core_tile.cuh) run fp16 / bf16 and, as TF32, fp32 when
// MetaGconvDims::tensor_cores is set (the glue sets it on sm_80+, for fp32 only where torch allows
// TF32 matmuls). Both have been compiled with nvcc (CI) and run in the CPU emulation of
// tests/test_cuda_emulation.py, not yet on a GPU.
//
// Determinism: no atomics. Every output element is written by one thread that reduces in a fixed
// order; the two reductions that span blocks (dE over slices of I, dP over slices of M) write fp32
// partial buffers (in the accumulation type) that sum_parts (cuda_common.cu) adds up in slice order.
#include "meta_gconv_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "meta_gconv_device.cuh"
#include "meta_gconv_tc_kernels.cuh"

namespace stfast_cuda {
namespace {

// ---------------------------------------------------------------- forward

// Grid (ceil(M / 64), ceil(O / 64)). Thread (tx, ty) owns rows m0 + ty + 16 r and columns
// o0 + tx + 16 c (r, c < 4).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ emb, const T* __restrict__ pool,
                          const T* __restrict__ bias_pool, T* __restrict__ out, MetaGconvDims p) {
  using A = typename Acc<T>::type;
  __shared__ A xs[kChunk][kTile + 1];  // xg tile, transposed: xs[k][row] (padded: the staging walks k)
  __shared__ A ps[kChunk][kTile];      // P[d] tile: ps[k][col]
  __shared__ A es[kTile];              // E[row, d]
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t I = p.inputs, O = p.outputs;
  // Thread t < 64 loads E[m0 + t, d] for every d: its row's embedding offset, computed once.
  const int e_row = threadIdx.x < kTile && m0 + threadIdx.x < p.rows
                        ? embedding_row(static_cast<int>(m0) + static_cast<int>(threadIdx.x), p)
                        : 0;

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
        es[threadIdx.x] = m < p.rows ? to_acc(emb[e_row + d * p.stride_ed]) : A(0);
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
    const int m_row = embedding_row(static_cast<int>(m), p);
#pragma unroll
    for (int c = 0; c < kSub; ++c) {
      const int64_t o = o0 + tx + kLanes * c;
      if (o >= O) {
        continue;
      }
      A v = acc[r][c];
      if (bias_pool != nullptr) {
        for (int64_t d = 0; d < p.dim; ++d) {
          v = fma(to_acc(emb[m_row + d * p.stride_ed]), to_acc(bias_pool[d * O + o]), v);
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
  // The transposed tiles and red are padded by one: their staging (or writes) walk the first index.
  __shared__ A gs[kChunk][kTile + 1];   // g tile, transposed: gs[k][row]
  __shared__ A pts[kChunk][kTile + 1];  // P[d]^T tile: pts[k][col] = P[d, i0 + col, o0 + k]
  __shared__ A es[kTile];
  __shared__ A red[kLanes][kTile + 1];  // dE partials: red[tx][row]
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t I = p.inputs, O = p.outputs, M = p.rows;
  const bool need_de = de_parts != nullptr;
  const int64_t own_row = m0 + threadIdx.x;
  const int e_row = threadIdx.x < kTile && own_row < M ? embedding_row(static_cast<int>(own_row), p) : 0;

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
        es[threadIdx.x] = m < M ? to_acc(emb[e_row + d * p.stride_ed]) : A(0);
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

constexpr int kDpGroupSimt = 2;  // d per SIMT dP block

// Grid (ceil(I / 64) * ceil(O / 64), ceil(D / kDpGroupSimt), slices): block owns the dP[d] tiles
// (i0.., o0..) of kDpGroupSimt consecutive d and reduces over the rows of its slice in order. Per row
// chunk it stages xg and g once and rescales xg by E[m, d] for each d as it multiplies (the same
// product E[m, d] xg[m, i], rounded as if staged). Thread (tx, ty) owns i = i0 + ty + 16 r,
// o = o0 + tx + 16 c of every d of the group.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    meta_gconv_bwd_dp_kernel(const typename Acc<T>::type* __restrict__ g, const T* __restrict__ xg,
                             const T* __restrict__ emb, typename Acc<T>::type* __restrict__ dp_parts,
                             int64_t rows_per_slice, MetaGconvDims p) {
  using A = typename Acc<T>::type;
  __shared__ A xs[kChunk][kTile];  // xs[k][i] = xg[m, i]
  __shared__ A gs[kChunk][kTile];  // gs[k][o] = g[m, o]
  __shared__ A es[kChunk][kDpGroupSimt];
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t I = p.inputs, O = p.outputs, M = p.rows;
  const int64_t o_tiles = (O + kTile - 1) / kTile;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) / o_tiles) * kTile;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) % o_tiles) * kTile;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kDpGroupSimt;
  const int64_t slice = blockIdx.z;
  const int64_t m_begin = slice * rows_per_slice;
  const int64_t m_end = m_begin + rows_per_slice < M ? m_begin + rows_per_slice : M;

  A acc[kDpGroupSimt][kSub][kSub];
#pragma unroll
  for (int dl = 0; dl < kDpGroupSimt; ++dl) {
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        acc[dl][r][c] = A(0);
      }
    }
  }
  for (int64_t mc = m_begin; mc < m_end; mc += kChunk) {
    __syncthreads();  // the previous chunk is consumed
    if (threadIdx.x < kChunk) {
      const int64_t m = mc + threadIdx.x;
      const int e_row = m < m_end ? embedding_row(static_cast<int>(m), p) : 0;
#pragma unroll
      for (int dl = 0; dl < kDpGroupSimt; ++dl) {
        es[threadIdx.x][dl] = (m < m_end && d0 + dl < p.dim) ? to_acc(emb[e_row + (d0 + dl) * p.stride_ed]) : A(0);
      }
    }
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      const int k = idx / kTile, col = idx % kTile;
      const int64_t m = mc + k, i = i0 + col, o = o0 + col;
      xs[k][col] = (m < m_end && i < I) ? to_acc(xg[m * I + i]) : A(0);
      gs[k][col] = (m < m_end && o < O) ? g[m * O + o] : A(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      A x[kSub], b[kSub];
#pragma unroll
      for (int r = 0; r < kSub; ++r) {
        x[r] = xs[k][ty + kLanes * r];
      }
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        b[c] = gs[k][tx + kLanes * c];
      }
#pragma unroll
      for (int dl = 0; dl < kDpGroupSimt; ++dl) {
        const A e = es[k][dl];
#pragma unroll
        for (int r = 0; r < kSub; ++r) {
          const A z = e * x[r];
#pragma unroll
          for (int c = 0; c < kSub; ++c) {
            acc[dl][r][c] = fma(z, b[c], acc[dl][r][c]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int dl = 0; dl < kDpGroupSimt; ++dl) {
    if (d0 + dl >= p.dim) {
      continue;
    }
    A* part = dp_parts + (slice * p.dim + d0 + dl) * I * O;
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
      const int64_t i = i0 + ty + kLanes * r;
#pragma unroll
      for (int c = 0; c < kSub; ++c) {
        const int64_t o = o0 + tx + kLanes * c;
        if (i < I && o < O) {
          part[i * O + o] = acc[dl][r][c];
        }
      }
    }
  }
}


// Whether the tensor-core forward stages P with cp.async, in 16-byte vectors: O a multiple
// of one, the pool aligned to one.
template <typename T>
bool stages_pool_async(const void* pool, const MetaGconvDims& dims) {
  return dims.outputs % (16 / static_cast<int64_t>(sizeof(T))) == 0 && reinterpret_cast<uintptr_t>(pool) % 16 == 0;
}

// The tensor-core kernels exist for fp32 (TF32), fp16 and bf16 (their bodies are compiled for sm_80+).
template <typename T>
constexpr bool has_tensor_core_path() {
  return !std::is_same<T, double>::value;
}

}  // namespace

bool meta_gconv_extents_supported(const MetaGconvDims& dims) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  if (dims.rows < 0 || dims.inputs < 0 || dims.outputs < 0 || dims.dim < 0 || (dims.rows > 0 && dims.nodes <= 0)) {
    return false;
  }
  int64_t last_embedding = 0;  // offset of the last embedding element a row reads
  if (dims.rows > 0 && dims.dim > 0) {
    last_embedding = (ceil_div(dims.rows, dims.nodes) - 1) * dims.stride_eb + (dims.nodes - 1) * dims.stride_en +
                     (dims.dim - 1) * dims.stride_ed;
  }
  return dims.rows < kLimit - kTile && kTile * dims.inputs < kLimit && kTile * dims.outputs < kLimit &&
         dims.inputs * dims.outputs < kLimit && dims.dim * dims.outputs < kLimit && last_embedding < kLimit;
}

cudaError_t meta_gconv_forward(DType dtype, const void* xg, const void* emb, const void* pool, const void* bias_pool,
                               void* out, const MetaGconvDims& dims, cudaStream_t stream) {
  if (!meta_gconv_extents_supported(dims)) {
    return cudaErrorInvalidValue;
  }
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
            static_cast<const T*>(bias_pool), static_cast<T*>(out), dims, stages_pool_async<T>(pool, dims));
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
  if (!meta_gconv_extents_supported(dims)) {
    return cudaErrorInvalidValue;
  }
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
  if (!meta_gconv_extents_supported(dims)) {
    return cudaErrorInvalidValue;
  }
  if (dims.inputs == 0 || dims.outputs == 0 || dims.dim == 0) {
    return cudaSuccess;
  }
  const int64_t slices = meta_gconv_dp_parts(dims);
  const int64_t rows_per_slice = std::max<int64_t>(1, ceil_div(dims.rows, slices));
  const unsigned tiles = static_cast<unsigned>(ceil_div(dims.inputs, kTile) * ceil_div(dims.outputs, kTile));
  // kDpGroupSimt (SIMT) or kDpGroup (tensor cores) d per block.
  const dim3 grid(tiles, static_cast<unsigned>(ceil_div(dims.dim, kDpGroupSimt)), static_cast<unsigned>(slices));
  const dim3 tc_grid(tiles, static_cast<unsigned>(ceil_div(dims.dim, kDpGroup)), static_cast<unsigned>(slices));
  if (dims.dim > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    if constexpr (has_tensor_core_path<T>()) {
      if (dims.tensor_cores) {
        meta_gconv_bwd_dp_tc_kernel<T><<<tc_grid, kThreads, 0, stream>>>(static_cast<const A*>(g),
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
