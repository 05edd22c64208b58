// Launchers of the CUDA meta_gconv kernels (meta_gconv_kernels.cu). Plain C++ with raw pointers and
// no torch headers, so that the kernels compile with nvcc alone (CI compiles them on a machine
// without a GPU or a CUDA build of torch); the torch glue is meta_gconv_cuda.cpp.
//
// Layouts (all row-major, contiguous unless said otherwise): M = B*N rows; xg (M, I); pool P
// (D, I, O); bias_pool Pb (D, O); out (M, O). "acc" is the accumulation type: fp64 for fp64 inputs,
// fp32 for fp32 / fp16 / bf16; g = dy * act'(y) (M, O) and the partial buffers are in it. The embedding of row m = (b, n) is
// read in place at emb[b*stride_eb + n*stride_en + d*stride_ed]: (N*D, D, 1) for ST (B, N, D),
// (0, D, 1) for S (N, D), (D, 0, 1) for T (B, D).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_common.h"  // DType, sum_parts

namespace stfast_cuda {

struct MetaGconvDims {
  int64_t rows;     // M = B*N
  int64_t nodes;    // N
  int64_t inputs;   // I = K*C
  int64_t outputs;  // O
  int64_t dim;      // D
  int64_t stride_eb, stride_en, stride_ed;
  int activation;   // 0 none, 1 sigmoid, 2 tanh
  // Non-zero: the tensor-core (WMMA) kernels for fp32 (as TF32) / fp16 / bf16 (sm_80+; the glue
  // decides); fp64 always runs the SIMT kernels.
  int tensor_cores;
};

// Whether the kernels can index these extents: they use 32-bit integers within a block's tiles, a
// P[d] matrix and the embedding, so they need M < 2^31 - 64, 64 I, 64 O, I O and D O < 2^31, and every
// embedding offset below 2^31. The launchers return cudaErrorInvalidValue otherwise (the glue checks
// first, with a message).
bool meta_gconv_extents_supported(const MetaGconvDims& dims);

// out = act(sum_d E[m, d] (xg[m] @ P[d] + Pb[d])); bias_pool may be null.
cudaError_t meta_gconv_forward(DType dtype, const void* xg, const void* emb, const void* pool, const void* bias_pool,
                               void* out, const MetaGconvDims& dims, cudaStream_t stream);

// Number of column slices of I the dxg/dE kernel uses: the length of de_parts' first axis.
int64_t meta_gconv_de_parts(const MetaGconvDims& dims);

// From g (acc, (M, O)): dxg[m, i] = sum_d E[m, d] (g @ P[d]^T)[m, i] (if dxg is not null, dtype
// `dtype`) and de_parts[s, m, d] = sum_{i in slice s} xg[m, i] (g @ P[d]^T)[m, i] (if de_parts is not
// null, acc, (meta_gconv_de_parts, M, D)); the bias term g @ Pb^T is the caller's.
cudaError_t meta_gconv_backward_dxg_de(DType dtype, const void* g, const void* xg, const void* emb, const void* pool,
                                       void* dxg, void* de_parts, const MetaGconvDims& dims, cudaStream_t stream);

// Number of row slices the dP kernel uses: the length of dp_parts' first axis.
int64_t meta_gconv_dp_parts(const MetaGconvDims& dims);

// dp_parts[s, d, i, o] = sum_{m in row slice s} E[m, d] xg[m, i] g[m, o] (acc; every element of
// every slice is written, so the buffer needs no zeroing).
cudaError_t meta_gconv_backward_dp(DType dtype, const void* g, const void* xg, const void* emb, void* dp_parts,
                                   const MetaGconvDims& dims, cudaStream_t stream);

}  // namespace stfast_cuda
