// Device-agnostic pieces of the stfast_ext node_lora ops, shared by the CPU and CUDA glue: option
// parsing and input validation (TORCH_CHECK messages name the argument, what was expected and what
// came). Notation: x (..., N, K) viewed as (M, N, K), weight W (O, K), bias (O), lora_a A (N, K, R),
// lora_b B (N, R, O); y = x W^T + b + scale * act(drop(x) A[n]) B[n].
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>

#include "meta_gconv_common.h"
#include "node_lora_math.h"

namespace stfast_ext {

struct LoraShape {
  int64_t M, N, K, O, R;
  int activation;  // stfast_math::LoraActivation
  bool has_bias;
  double scale;
  double dropout_p;
  // (seed, offset) of the dropout draw: the seed tensor's memory, on x's device (host memory for CPU
  // tensors, read by the CPU kernels; device memory for CUDA tensors, read by the CUDA kernels).
  const int64_t* seed;
  int64_t rows() const { return M * N; }
};

// None, "leaky_relu", "relu", "tanh" or "sigmoid"; else ValueError prefixed with `op`.
int parse_lora_activation(const char* op, const std::optional<c10::string_view>& activation);

// Validates every input of node_lora_fwd (and the shared ones of node_lora_bwd) and returns the sizes.
LoraShape check_node_lora_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    double scale,
    const std::optional<c10::string_view>& activation,
    double dropout_p,
    const at::Tensor& seed);

// The dropout seed of node_lora_fwd / node_lora_bwd: an int64 tensor of shape (2,), (seed, offset), on
// x's device, contiguous. Its values are not checked (that would read device memory): any bits are a
// valid seed.
void check_dropout_seed(const char* op, const at::Tensor& seed, const at::Tensor& x);

// The inputs of node_lora_dropout_mask (x of shape (..., N, d_in) in a supported dtype, dropout_p in
// [0, 1), seed and offset >= 0), the checks node_lora_fwd makes of them.
void check_dropout_mask_inputs(const char* op, const at::Tensor& x, double dropout_p, int64_t seed, int64_t offset);

// grad: the shape of the output, (..., N, O), and x's dtype and device.
void check_node_lora_grad(const char* op, const LoraShape& shape, const at::Tensor& x, const at::Tensor& grad);

// x's shape with the last size replaced by `last`.
std::vector<int64_t> with_last_size(const at::Tensor& x, int64_t last);

}  // namespace stfast_ext
