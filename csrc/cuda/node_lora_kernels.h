// Launchers of the CUDA node_lora kernels (node_lora_kernels.cu). Plain C++ with raw pointers and no
// torch headers, so that the kernels compile with nvcc alone; the torch glue is node_lora_cuda.cpp.
//
// Layouts (row-major, contiguous): x (M, N, K) with row r = m*N + n at x + r*K; y and grad (M, N, O);
// weight W (O, K); bias (O); lora_a A (N, K, R); lora_b B (N, R, O). "acc" is the accumulation
// type: fp64 for fp64 inputs, fp32 for fp32 / fp16 / bf16; the backward's intermediate (M*N, R)
// buffers and the dW / db partials are in it.
//
//   y[m, n] = x[m, n] W^T + bias + scale * act(drop(x[m, n]) A[n]) B[n]
//
// Dropout multiplier of element (r, k): stfast_math::dropout_multiplier(seed, offset + r*K + k,
// dropout_p, inv_keep) (csrc/node_lora_math.h), drawn again wherever it is needed; (seed, offset) is
// read from device memory (NodeLoraDims::seed), so a captured CUDA graph draws a new mask per replay
// when the seed tensor is refilled on the device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_common.h"  // DType, sum_parts

namespace stfast_cuda {

struct NodeLoraDims {
  int64_t M;        // rows per node: the product of x's leading (batch) sizes
  int64_t N;        // nodes
  int64_t K;        // d_in
  int64_t O;        // d_out
  int64_t R;        // rank (>= 1)
  int activation;   // stfast_math::LoraActivation
  double scale;
  float dropout_p;  // 0: no dropout (the multiplier is then 1 everywhere)
  float inv_keep;   // 1 / (1 - p) computed in double and rounded to float (Triton's convention)
  const int64_t* seed;  // device memory: (seed, offset); read only when dropout_p > 0
  // Non-zero: the tensor-core (WMMA) kernels for the forward, dx and dW / db with fp32 (as TF32) /
  // fp16 / bf16 (sm_80+; the glue decides); fp64 always runs the SIMT kernels.
  int tensor_cores;
};

// y (M, N, O) in `dtype`; bias may be null.
cudaError_t node_lora_forward(DType dtype, const void* x, const void* weight, const void* bias, const void* lora_a,
                              const void* lora_b, void* out, const NodeLoraDims& dims, cudaStream_t stream);

// Backward step 1, per row: with h = drop(x) A[n] and g = grad,
//   grad_h[r, :] = scale * (g[r] B[n]^T) * act'(h[r])   (if grad_h is not null; acc, (M*N, R))
//   scaled_a[r, :] = scale * act(h[r])                   (if scaled_a is not null; acc, (M*N, R))
cudaError_t node_lora_backward_lowrank(DType dtype, const void* grad, const void* x, const void* lora_a,
                                       const void* lora_b, void* grad_h, void* scaled_a, const NodeLoraDims& dims,
                                       cudaStream_t stream);

// dx = g W + mult * (grad_h A[n]^T)   (M, N, K) in `dtype`; grad_h from node_lora_backward_lowrank.
cudaError_t node_lora_backward_dx(DType dtype, const void* grad, const void* weight, const void* lora_a,
                                  const void* grad_h, void* dx, const NodeLoraDims& dims, cudaStream_t stream);

// dA[n] = drop(x_n)^T grad_h_n   (N, K, R) in `dtype`, reduced over the node's M rows in order.
cudaError_t node_lora_backward_da(DType dtype, const void* x, const void* grad_h, void* d_lora_a,
                                  const NodeLoraDims& dims, cudaStream_t stream);

// dB[n] = scaled_a_n^T g_n   (N, R, O) in `dtype`, reduced over the node's M rows in order.
cudaError_t node_lora_backward_db(DType dtype, const void* grad, const void* scaled_a, void* d_lora_b,
                                  const NodeLoraDims& dims, cudaStream_t stream);

// Number of row slices of the dW / db kernel: the length of dw_parts' first axis.
int64_t node_lora_dw_parts(const NodeLoraDims& dims, int64_t columns);

// dw_parts[s, o, c] = sum_{rows r in slice s} g[r, o] z[r, c] (acc, (node_lora_dw_parts, O, C)) with
// z = [x[:, :x_columns], 1 if ones_column], C = x_columns + ones_column: x_columns = K gives dW, the
// ones column gives db (column C - 1). x_columns is K or 0. Every element of every slice is written
// (zeros for an empty slice), so the buffer needs no zeroing; sum_parts then adds the slices in order.
cudaError_t node_lora_backward_dw(DType dtype, const void* grad, const void* x, void* dw_parts, int64_t x_columns,
                                  bool ones_column, const NodeLoraDims& dims, cudaStream_t stream);

// out[i] = dropout_multiplier(seed, offset + i, dropout_p, inv_keep) for the `count` flat elements of
// a contiguous x (i = r*K + k), in `dtype`.
cudaError_t node_lora_dropout_mask(DType dtype, void* out, int64_t count, float dropout_p, float inv_keep,
                                   uint64_t seed, uint64_t offset, cudaStream_t stream);

}  // namespace stfast_cuda
