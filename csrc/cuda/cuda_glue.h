// Torch-side helpers shared by the CUDA glue of every op (meta_gconv_cuda.cpp, node_lora_cuda.cpp):
// the kernels' dtype code for a tensor, the accumulation dtype, the current stream, and the checks
// that turn a launcher's cudaError_t (or a CPU tensor) into a Python exception naming the op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/version.h>

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

// Whether torch lets fp32 matmuls run as TF32, read through the API torch itself uses for cuBLAS:
// the new per-backend precision (torch >= 2.9; it also reflects the legacy
// torch.set_float32_matmul_precision / allow_tf32 settings) where it exists. The legacy getter
// allowTF32CuBLAS() throws ("mix of the legacy and new APIs") once the new API has been used.
inline bool tf32_matmul_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().float32Precision("cuda", "matmul") == "tf32";
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

// Whether the kernels take their tensor-core (WMMA) path for inputs of dtype t on the current device:
// where the tensor-core kernels were compiled for the device's code (sm_80+ virtual arch, see
// stfast_cuda::tensor_core_kernels_compiled; not merely an sm_80+ device), always for fp16 / bf16;
// for fp32 (as TF32) only where torch itself allows TF32 matmuls (tf32_matmul_allowed); never for
// fp64. STFAST_CUDA_TENSOR_CORES=0 turns the path off (the SIMT kernels, for comparison).
inline bool use_tensor_cores(at::ScalarType t) {
  const char* env = std::getenv("STFAST_CUDA_TENSOR_CORES");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    return false;
  }
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) {
    return false;
  }
  if (!stfast_cuda::tensor_core_kernels_compiled()) {
    return false;
  }
  return t != at::kFloat || tf32_matmul_allowed();
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
