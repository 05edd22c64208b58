// Validation shared by the CPU and CUDA glue of node_lora (see node_lora_common.h).
#include "node_lora_common.h"

#include <cmath>
#include <string>
#include <vector>

namespace stfast_ext {

int parse_lora_activation(const char* op, const std::optional<c10::string_view>& activation) {
  if (!activation.has_value()) {
    return stfast_math::kLoraNone;
  }
  if (*activation == "leaky_relu") {
    return stfast_math::kLoraLeakyRelu;
  }
  if (*activation == "relu") {
    return stfast_math::kLoraRelu;
  }
  if (*activation == "tanh") {
    return stfast_math::kLoraTanh;
  }
  if (*activation == "sigmoid") {
    return stfast_math::kLoraSigmoid;
  }
  TORCH_CHECK_VALUE(false, op, ": activation: expected None, 'leaky_relu', 'relu', 'tanh' or 'sigmoid', got '",
                    std::string(*activation), "'");
}

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
    const at::Tensor& seed) {
  check_dropout_mask_inputs(op, x, dropout_p, 0, 0);
  check_dropout_seed(op, seed, x);
  check_no_zero_size(op, "x", "(..., N, d_in)", x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale: expected a finite float, got ", scale);
  LoraShape s{};
  s.N = x.size(-2);
  s.K = x.size(-1);
  s.M = 1;  // the product of the leading (batch) sizes
  for (int64_t d = 0; d + 2 < x.dim(); ++d) {
    s.M *= x.size(d);
  }
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2 && weight.size(1) == s.K, op,
                    ": weight: expected shape (d_out, d_in) = (d_out, ", s.K, "), got ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  check_like_x(op, "weight", weight, x);
  check_no_zero_size(op, "weight", "(d_out, d_in)", weight.sizes());
  s.O = weight.size(0);
  s.has_bias = bias.has_value() && bias->defined();
  if (s.has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.O, op, ": bias: expected shape (d_out,) = (", s.O,
                      ",), got ", bias->sizes());
    check_like_x(op, "bias", *bias, x);
  }
  TORCH_CHECK_VALUE(lora_a.defined() && lora_a.dim() == 3 && lora_a.size(0) == s.N && lora_a.size(1) == s.K &&
                        lora_a.size(2) >= 1,
                    op, ": lora_a: expected shape (N, d_in, r) = (", s.N, ", ", s.K,
                    ", r) with r >= 1 (N from x's node axis -2), got ", lora_a.defined() ? lora_a.sizes() : at::IntArrayRef{});
  check_like_x(op, "lora_a", lora_a, x);
  s.R = lora_a.size(2);
  TORCH_CHECK_VALUE(lora_b.defined() && lora_b.dim() == 3 && lora_b.size(0) == s.N && lora_b.size(1) == s.R &&
                        lora_b.size(2) == s.O,
                    op, ": lora_b: expected shape (N, r, d_out) = (", s.N, ", ", s.R, ", ", s.O,
                    ") (N from x, r from lora_a, d_out from weight), got ",
                    lora_b.defined() ? lora_b.sizes() : at::IntArrayRef{});
  check_like_x(op, "lora_b", lora_b, x);
  s.activation = parse_lora_activation(op, activation);
  s.scale = scale;
  s.dropout_p = dropout_p;
  s.seed = seed.data_ptr<int64_t>();
  return s;
}

void check_dropout_seed(const char* op, const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK_VALUE(seed.defined() && seed.dim() == 1 && seed.size(0) == 2, op,
                    ": seed: expected a tensor of shape (2,) (the seed and the offset of the dropout draw), got ",
                    seed.defined() ? seed.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed: expected dtype int64, got ",
                   c10::toString(seed.scalar_type()));
  TORCH_CHECK_VALUE(seed.device() == x.device(), op, ": seed: expected a tensor on x's device ", x.device(),
                    ", got ", seed.device());
  TORCH_CHECK_VALUE(seed.is_contiguous(), op, ": seed: expected a contiguous tensor, got strides ", seed.strides());
}

void check_dropout_mask_inputs(const char* op, const at::Tensor& x, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 2, op, ": x: expected shape (..., N, d_in) with the node axis at -2, got ",
                    x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(supported_dtype(x.scalar_type()), op,
                   ": x: expected dtype float32, float64, float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p: expected a float in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed: expected an int >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset: expected an int >= 0, got ", offset);
}

void check_node_lora_grad(const char* op, const LoraShape& s, const at::Tensor& x, const at::Tensor& grad) {
  const std::vector<int64_t> expected = with_last_size(x, s.O);
  TORCH_CHECK_VALUE(grad.defined() && grad.sizes() == at::IntArrayRef(expected), op,
                    ": grad: expected the output's shape ", at::IntArrayRef(expected), ", got ",
                    grad.defined() ? grad.sizes() : at::IntArrayRef{});
  check_like_x(op, "grad", grad, x);
}

std::vector<int64_t> with_last_size(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = last;
  return sizes;
}

}  // namespace stfast_ext
