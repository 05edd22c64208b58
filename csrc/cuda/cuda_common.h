// Pieces shared by the CUDA kernels of every op (meta_gconv_kernels.cu, node_lora_kernels.cu) and
// their torch glue. No torch headers, so that plain nvcc compiles the kernels.
//
// Host part (any compiler): the DType code the glue passes to the launchers, and sum_parts (the
// fixed-order sum of per-slice partial buffers, cuda_common.cu). Device part (nvcc only, namespace
// stfast_cuda::detail): the accumulation type, conversions to and from it, and the dtype dispatch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace stfast_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// out[j] = sum_{p = 0 .. parts-1} in[p * count + j], summed in p order; `in` is in the accumulation
// type of `dtype` (fp64 for fp64, fp32 otherwise), `out` in `dtype`.
cudaError_t sum_parts(DType dtype, const void* in, int64_t parts, int64_t count, void* out, cudaStream_t stream);

// Whether the tensor-core kernels' bodies were compiled for the current device: the code that runs
// there (its SASS, or the PTX the driver compiles at load) comes from an sm_80+ virtual arch. An
// extension built for an older arch only (plus its PTX) runs its __trap() stubs there, so the glue
// must not launch them even on an sm_90 device. Cached per device.
bool tensor_core_kernels_compiled();

}  // namespace stfast_cuda

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stfast_cuda {
namespace detail {

// Accumulation type: fp64 for fp64 inputs, fp32 for fp32 / fp16 / bf16.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Store<T>::from(acc): the accumulator rounded once to the storage type.
template <typename T>
struct Store;
template <>
struct Store<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Store<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Store<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Calls launch(T{}) with the storage type of `dtype`, then returns the error of that launch. An error
// pending from earlier (another library's, not checked there) is cleared first, so that it is
// neither reported as this launch's nor left to be blamed on a later one; sticky errors (a crashed
// context) persist and fail this launch too.
template <typename F>
cudaError_t dispatch(DType dtype, F&& launch) {
  (void)cudaGetLastError();
  switch (dtype) {
    case DType::kFloat32:
      launch(float{});
      break;
    case DType::kFloat64:
      launch(double{});
      break;
    case DType::kFloat16:
      launch(__half{});
      break;
    case DType::kBFloat16:
      launch(__nv_bfloat16{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace stfast_cuda

#endif  // __CUDACC__
