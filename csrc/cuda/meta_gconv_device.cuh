// Device-side pieces shared by the SIMT (meta_gconv_kernels.cu) and tensor-core
// (meta_gconv_tc_kernels.cuh) meta_gconv kernels: block shape, activation, embedding row offsets.
// Internal to meta_gconv_kernels.cu, its only includer (hence the anonymous namespace).
#pragma once

#include "cuda_common.h"
#include "meta_gconv_kernels.h"

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

// Offset of E[m, 0] for row m = (b, n): 32-bit integer math (one inline division, not the 64-bit
// division routine), valid under meta_gconv_extents_supported. Callers compute it once per row.
__device__ __forceinline__ int embedding_row(int m, const MetaGconvDims& p) {
  const int nodes = static_cast<int>(p.nodes);
  const int b = m / nodes;
  const int n = m - b * nodes;
  return b * static_cast<int>(p.stride_eb) + n * static_cast<int>(p.stride_en);
}

}  // namespace
}  // namespace stfast_cuda
