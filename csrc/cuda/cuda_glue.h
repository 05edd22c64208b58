// Torch-side helpers shared by the CUDA glue of every op (meta_gconv_cuda.cpp, node_lora_cuda.cpp):
// the kernels' dtype code for a tensor, the accumulation dtype, the current stream, and the checks
// that turn a launcher's cudaError_t (or a CPU tensor) into a Python exception naming the op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "../meta_gconv_common.h"  // dtype_name
#include "cuda_common.h"

namespace stfast_ext {
namespace cuda_glue {

inline stfast_cuda::DType kernel_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return stfast_cuda::DType::kFloat32;
    case at::kDouble:
      return stfast_cuda::DType::kFloat64;
    case at::kHalf:
      return stfast_cuda::DType::kFloat16;
    case at::kBFloat16:
      return stfast_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": x: expected dtype float32, float64, float16 or bfloat16, got ", dtype_name(t));
  }
}

// Accumulation dtype of the kernels: fp64 for fp64, fp32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels' dtype code of acc_dtype(t) (for sum_parts into an accumulation-type buffer).
inline stfast_cuda::DType acc_kernel_dtype(at::ScalarType t) {
  return t == at::kDouble ? stfast_cuda::DType::kFloat64 : stfast_cuda::DType::kFloat32;
}

// Whether the kernels take their tensor-core (WMMA) path for inputs of dtype t on the current device:
// on sm_80+, always for fp16 / bf16; for fp32 (as TF32) only where torch itself allows TF32 matmuls
// (torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision("high" / "medium"));
// never for fp64. STFAST_CUDA_TENSOR_CORES=0 turns the path off (the SIMT kernels, for comparison).
inline bool use_tensor_cores(at::ScalarType t) {
  const char* env = std::getenv("STFAST_CUDA_TENSOR_CORES");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    return false;
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c10::cuda::current_device()) != cudaSuccess ||
      major < 8) {
    return false;
  }
  switch (t) {
    case at::kHalf:
    case at::kBFloat16:
      return true;
    case at::kFloat:
      return at::globalContext().allowTF32CuBLAS();
    default:
      return false;
  }
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

inline void check_launch(const char* op, const char* kernel, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel ", kernel, " failed: ", cudaGetErrorString(err));
}

inline void check_cuda_tensor(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
}

}  // namespace cuda_glue
}  // namespace stfast_ext
