// Torch glue of the CUDA node_lora kernels: stfast_ext::node_lora_fwd / node_lora_bwd /
// node_lora_dropout_mask for the CUDA dispatch key. Validates (node_lora_common.h), makes the inputs
// contiguous, allocates the outputs and the accumulation-type intermediates, and calls the
// raw-pointer launchers of node_lora_kernels.cu on the current stream. Built only when torch has
// CUDA and nvcc is found (STFAST_WITH_CUDA); compiled but not yet run on a GPU (see csrc/README.md).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "../node_lora_common.h"
#include "cuda_glue.h"
#include "node_lora_kernels.h"

namespace stfast_ext {
namespace {

using cuda_glue::acc_dtype;
using cuda_glue::check_cuda_tensor;
using cuda_glue::check_launch;
using cuda_glue::current_stream;
using cuda_glue::kernel_dtype;

// Dropout threshold and multiplier as the kernels (and Triton's tl.rand convention) use them: p
// rounded to float, 1 / (1 - p) computed in double and rounded to float.
float dropout_threshold(double dropout_p) {
  return static_cast<float>(dropout_p);
}

float dropout_inv_keep(double dropout_p) {
  return static_cast<float>(1.0 / (1.0 - dropout_p));
}

stfast_cuda::NodeLoraDims kernel_dims(const LoraShape& s, at::ScalarType dtype) {
  stfast_cuda::NodeLoraDims dims{};
  dims.M = s.M;
  dims.N = s.N;
  dims.K = s.K;
  dims.O = s.O;
  dims.R = s.R;
  dims.activation = s.activation;
  dims.scale = s.scale;
  dims.dropout_p = dropout_threshold(s.dropout_p);
  dims.inv_keep = dropout_inv_keep(s.dropout_p);
  dims.seed = s.seed;
  dims.tensor_cores = cuda_glue::use_tensor_cores(dtype) ? 1 : 0;
  return dims;
}

void* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

at::Tensor node_lora_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                              std::optional<c10::string_view> activation, double dropout_p,
                              const at::Tensor& seed) {
  constexpr const char* op = "stfast_ext::node_lora_fwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LoraShape s = check_node_lora_inputs(op, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed);
  check_cuda_tensor(op, x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto dtype = kernel_dtype(op, x.scalar_type());

  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = s.has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor la = lora_a.contiguous();
  const at::Tensor lb = lora_b.contiguous();
  at::Tensor out = at::empty(with_last_size(x, s.O), x.options());
  check_launch(op, "node_lora_fwd",
               stfast_cuda::node_lora_forward(dtype, xc.data_ptr(), w.data_ptr(), data_or_null(b), la.data_ptr(),
                                              lb.data_ptr(), out.data_ptr(), kernel_dims(s, x.scalar_type()),
                                              current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> node_lora_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, std::optional<c10::string_view> activation,
    double dropout_p, const at::Tensor& seed, std::array<bool, 5> needs) {
  constexpr const char* op = "stfast_ext::node_lora_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LoraShape s = check_node_lora_inputs(op, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed);
  check_node_lora_grad(op, s, x, grad);
  check_cuda_tensor(op, x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto dtype = kernel_dtype(op, x.scalar_type());
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  const bool need_x = needs[0], need_weight = needs[1], need_bias = needs[2] && s.has_bias, need_a = needs[3],
             need_b = needs[4];

  const at::Tensor xc = x.contiguous();
  const at::Tensor g = grad.contiguous();
  const auto dims = kernel_dims(s, x.scalar_type());
  const cudaStream_t stream = current_stream();
  const at::Tensor empty = x.new_empty({0});
  at::Tensor d_x = empty, d_weight = empty, d_bias = empty, d_a = empty, d_b = empty;

  if (need_x || need_a || need_b) {
    const at::Tensor la = lora_a.contiguous();
    const at::Tensor lb = lora_b.contiguous();
    // Per row, in the accumulation dtype: grad_h = scale * (g B^T) * act'(h) (for dx and dA) and
    // scaled_a = scale * act(h) (for dB). Every element is written by the lowrank kernel.
    const at::Tensor grad_h = (need_x || need_a) ? at::empty({s.rows(), s.R}, acc_options) : at::Tensor();
    const at::Tensor scaled_a = need_b ? at::empty({s.rows(), s.R}, acc_options) : at::Tensor();
    check_launch(op, "node_lora_bwd_lowrank",
                 stfast_cuda::node_lora_backward_lowrank(dtype, g.data_ptr(), xc.data_ptr(), la.data_ptr(),
                                                         lb.data_ptr(), data_or_null(grad_h), data_or_null(scaled_a),
                                                         dims, stream));
    if (need_x) {
      const at::Tensor w = weight.contiguous();
      d_x = at::empty(x.sizes(), x.options());
      check_launch(op, "node_lora_bwd_dx",
                   stfast_cuda::node_lora_backward_dx(dtype, g.data_ptr(), w.data_ptr(), la.data_ptr(),
                                                      grad_h.data_ptr(), d_x.data_ptr(), dims, stream));
    }
    if (need_a) {
      d_a = at::empty({s.N, s.K, s.R}, x.options());
      check_launch(op, "node_lora_bwd_da",
                   stfast_cuda::node_lora_backward_da(dtype, xc.data_ptr(), grad_h.data_ptr(), d_a.data_ptr(), dims,
                                                      stream));
    }
    if (need_b) {
      d_b = at::empty({s.N, s.R, s.O}, x.options());
      check_launch(op, "node_lora_bwd_db",
                   stfast_cuda::node_lora_backward_db(dtype, g.data_ptr(), scaled_a.data_ptr(), d_b.data_ptr(), dims,
                                                      stream));
    }
  }

  if (need_weight || need_bias) {
    // One pass over the rows for both: g^T [x, 1] gives dW in the first K columns and db in the last.
    const int64_t x_columns = need_weight ? s.K : 0;
    const int64_t columns = x_columns + (need_bias ? 1 : 0);
    const int64_t parts = stfast_cuda::node_lora_dw_parts(dims, columns);
    const at::Tensor dw_parts = at::empty({parts, s.O, columns}, acc_options);
    check_launch(op, "node_lora_bwd_dw",
                 stfast_cuda::node_lora_backward_dw(dtype, g.data_ptr(), xc.data_ptr(), dw_parts.data_ptr(),
                                                    x_columns, need_bias, dims, stream));
    at::Tensor summed = at::empty({s.O, columns}, x.options());
    check_launch(op, "sum_parts",
                 stfast_cuda::sum_parts(dtype, dw_parts.data_ptr(), parts, summed.numel(), summed.data_ptr(), stream));
    if (need_weight) {
      d_weight = need_bias ? summed.narrow(1, 0, s.K).contiguous() : summed;
    }
    if (need_bias) {
      d_bias = summed.select(1, x_columns).contiguous();
    }
  }
  return {d_x, d_weight, d_bias, d_a, d_b};
}

at::Tensor node_lora_dropout_mask_cuda(const at::Tensor& x, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "stfast_ext::node_lora_dropout_mask";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dropout_mask_inputs(op, x, dropout_p, seed, offset);
  check_cuda_tensor(op, x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous: flat index i = r*K + k
  check_launch(op, "node_lora_dropout_mask",
               stfast_cuda::node_lora_dropout_mask(kernel_dtype(op, x.scalar_type()), out.data_ptr(), out.numel(),
                                                   dropout_threshold(dropout_p), dropout_inv_keep(dropout_p),
                                                   static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                                   current_stream()));
  return out;
}

}  // namespace
}  // namespace stfast_ext

TORCH_LIBRARY_IMPL(stfast_ext, CUDA, m) {
  m.impl("node_lora_fwd", &stfast_ext::node_lora_fwd_cuda);
  m.impl("node_lora_bwd", &stfast_ext::node_lora_bwd_cuda);
  m.impl("node_lora_dropout_mask", &stfast_ext::node_lora_dropout_mask_cuda);
}
