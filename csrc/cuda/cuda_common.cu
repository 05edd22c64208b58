// The shared CUDA kernel of cuda_common.h: the fixed-order sum of per-slice partial buffers that
// the deterministic cross-block reductions of every op end with. Compiled (CI) but not yet run on a
// GPU (see csrc/README.md).
#include "cuda_common.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

namespace stfast_cuda {
namespace {

using detail::Acc;
using detail::Store;

constexpr int kSumThreads = 256;

template <typename T>
__global__ void sum_parts_kernel(const typename Acc<T>::type* __restrict__ in, int64_t parts, int64_t count,
                                 T* __restrict__ out) {
  using A = typename Acc<T>::type;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A total = A(0);
    for (int64_t s = 0; s < parts; ++s) {
      total += in[s * count + j];
    }
    out[j] = Store<T>::from(total);
  }
}

// Empty: only its compiled attributes matter (tensor_core_kernels_compiled). It is built with the same
// arch flags as every kernel of the extension.
__global__ void arch_probe_kernel() {}

}  // namespace

bool tensor_core_kernels_compiled() {
  constexpr int kMaxDevices = 64;
  static std::atomic<signed char> cached[kMaxDevices];  // 0: unknown, 1: yes, -1: no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) {
    (void)cudaGetLastError();
    return false;
  }
  if (device < kMaxDevices && cached[device].load() != 0) {
    return cached[device].load() > 0;
  }
  cudaFuncAttributes attributes{};
  bool compiled = false;
  if (cudaFuncGetAttributes(&attributes, arch_probe_kernel) == cudaSuccess) {
    compiled = attributes.ptxVersion >= 80;  // the virtual arch the running code was compiled from, x10
  } else {
    (void)cudaGetLastError();
  }
  if (device < kMaxDevices) {
    cached[device].store(compiled ? 1 : -1);
  }
  return compiled;
}

cudaError_t sum_parts(DType dtype, const void* in, int64_t parts, int64_t count, void* out, cudaStream_t stream) {
  if (count == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(detail::ceil_div(count, kSumThreads), 4096));
  return detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    sum_parts_kernel<T><<<blocks, kSumThreads, 0, stream>>>(static_cast<const A*>(in), parts, count,
                                                             static_cast<T*>(out));
  });
}

}  // namespace stfast_cuda
