// Torch-side helpers shared by the CUDA glue of every op (meta_gconv_cuda.cpp, node_lora_cuda.cpp):
// the kernels' dtype code for a tensor, the accumulation dtype, the current stream, and the checks
// that turn a launcher's cudaError_t (or a CPU tensor) into a Python exception naming the op.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

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
