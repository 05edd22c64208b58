// Torch glue of the CUDA kernels: stfast_ext::meta_gconv_fwd / meta_gconv_bwd for the CUDA dispatch
// key. Validates, runs the Chebyshev propagation with ATen (cuBLAS), and calls the raw-pointer
// launchers of meta_gconv_kernels.cu on the current stream. Built only when torch has CUDA and nvcc
// is found (STFAST_WITH_CUDA); not yet run on a GPU (see csrc/README.md).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../meta_gconv_common.h"
#include "cuda_glue.h"
#include "meta_gconv_kernels.h"

namespace stfast_ext {
namespace {

using cuda_glue::acc_dtype;
using cuda_glue::acc_kernel_dtype;
using cuda_glue::check_launch;
using cuda_glue::current_stream;
using cuda_glue::kernel_dtype;

stfast_cuda::MetaGconvDims kernel_dims(const MetaShape& s, at::ScalarType dtype) {
  stfast_cuda::MetaGconvDims dims{};
  dims.rows = s.rows();
  dims.nodes = s.N;
  dims.inputs = s.I;
  dims.outputs = s.O;
  dims.dim = s.D;
  // Strides of the contiguous embedding, read in place for every row (b, n).
  switch (s.axis) {
    case Axis::kST:
      dims.stride_eb = s.N * s.D;
      dims.stride_en = s.D;
      break;
    case Axis::kS:
      dims.stride_eb = 0;
      dims.stride_en = s.D;
      break;
    case Axis::kT:
      dims.stride_eb = s.D;
      dims.stride_en = 0;
      break;
  }
  dims.stride_ed = 1;
  dims.activation = static_cast<int>(s.activation);
  dims.tensor_cores = cuda_glue::use_tensor_cores(dtype) ? 1 : 0;
  return dims;
}

// The kernels index within tiles, a P[d] matrix and the embedding in 32 bits.
stfast_cuda::MetaGconvDims checked_kernel_dims(const char* op, const MetaShape& s, at::ScalarType dtype) {
  const stfast_cuda::MetaGconvDims dims = kernel_dims(s, dtype);
  TORCH_CHECK_VALUE(stfast_cuda::meta_gconv_extents_supported(dims), op,
                    ": extents beyond the CUDA kernels' 32-bit indexing (they need B*N < 2^31 - 64, 64*I, 64*O, "
                    "I*O and D*O below 2^31, and fewer than 2^31 embedding elements); got B=", s.B, ", N=", s.N,
                    ", I=", s.I, ", O=", s.O, ", D=", s.D);
  return dims;
}

void check_cuda_inputs(const char* op, const at::Tensor& x, Formulation formulation) {
  cuda_glue::check_cuda_tensor(op, x);
  TORCH_CHECK_VALUE(formulation != Formulation::kGrouped, op,
                    ": formulation: the CUDA kernels implement 'outer' (or 'auto'), got 'grouped'");
}

at::Tensor meta_gconv_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& supports,
                               const at::Tensor& embeddings, const at::Tensor& weights_pool,
                               const std::optional<at::Tensor>& bias_pool, int64_t cheb_k,
                               std::optional<c10::string_view> activation, c10::string_view axis,
                               c10::string_view formulation) {
  constexpr const char* op = "stfast_ext::meta_gconv_fwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(op, activation);
  const Axis ax = parse_axis(op, axis);
  const Formulation form = parse_formulation(op, formulation);
  const MetaShape s = check_meta_gconv_inputs(op, x, supports, embeddings, weights_pool, bias_pool, cheb_k, act, ax);
  check_cuda_inputs(op, x, form);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto dtype = kernel_dtype(op, x.scalar_type());
  const auto dims = checked_kernel_dims(op, s, x.scalar_type());

  const at::Tensor xg = chebyshev_features(x, supports, cheb_k).reshape({s.rows(), s.I}).contiguous();
  const at::Tensor emb = embeddings.contiguous();
  const at::Tensor pool = weights_pool.contiguous();
  const at::Tensor pb = s.has_bias ? bias_pool->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.rows(), s.O}, x.options());
  const cudaStream_t stream = current_stream();
  check_launch(op, "meta_gconv_fwd",
               stfast_cuda::meta_gconv_forward(dtype, xg.data_ptr(), emb.data_ptr(), pool.data_ptr(),
                                               s.has_bias ? pb.data_ptr() : nullptr, out.data_ptr(), dims, stream));
  return out.view({s.B, s.N, s.O});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_gconv_bwd_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const std::optional<at::Tensor>& supports, const at::Tensor& embeddings, const at::Tensor& weights_pool,
    const std::optional<at::Tensor>& bias_pool, int64_t cheb_k, std::optional<c10::string_view> activation,
    c10::string_view axis, std::array<bool, 5> needs, c10::string_view formulation) {
  constexpr const char* op = "stfast_ext::meta_gconv_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(op, activation);
  const Axis ax = parse_axis(op, axis);
  const Formulation form = parse_formulation(op, formulation);
  const MetaShape s = check_meta_gconv_inputs(op, x, supports, embeddings, weights_pool, bias_pool, cheb_k, act, ax);
  check_meta_gconv_backward_inputs(op, s, x, grad, out);
  check_cuda_inputs(op, x, form);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto dtype = kernel_dtype(op, x.scalar_type());
  const auto acc = acc_dtype(x.scalar_type());
  const auto dims = checked_kernel_dims(op, s, x.scalar_type());
  const bool has_supports = supports.has_value() && supports->defined();
  const bool need_x = needs[0], need_supports = needs[1] && has_supports, need_e = needs[2], need_pool = needs[3],
             need_bias = needs[4] && s.has_bias;
  const bool need_xg = need_x || need_supports;

  const at::Tensor xg3 = chebyshev_features(x, supports, cheb_k);  // recomputed, as in the torch backend
  const at::Tensor xg = xg3.reshape({s.rows(), s.I}).contiguous();
  const at::Tensor emb = embeddings.contiguous();
  const at::Tensor pool = weights_pool.contiguous();
  // g = dy * act'(y) in the accumulation dtype.
  const std::optional<at::Tensor> out_acc =
      act != Activation::kNone ? std::optional<at::Tensor>(out->to(acc)) : std::nullopt;
  const at::Tensor g = activation_backward(grad.to(acc), out_acc, act).reshape({s.rows(), s.O}).contiguous();
  const cudaStream_t stream = current_stream();
  const at::Tensor empty = x.new_empty({0});

  at::Tensor d_xg = need_xg ? at::empty({s.rows(), s.I}, x.options()) : at::Tensor();
  at::Tensor d_e = empty;
  if (need_xg || need_e) {
    at::Tensor de_parts;
    if (need_e) {
      de_parts = at::zeros({stfast_cuda::meta_gconv_de_parts(dims), s.rows(), s.D}, x.options().dtype(acc));
    }
    check_launch(op, "meta_gconv_bwd_dxg_de",
                 stfast_cuda::meta_gconv_backward_dxg_de(dtype, g.data_ptr(), xg.data_ptr(), emb.data_ptr(),
                                                         pool.data_ptr(), need_xg ? d_xg.data_ptr() : nullptr,
                                                         need_e ? de_parts.data_ptr() : nullptr, dims, stream));
    if (need_e) {
      at::Tensor de_rows = at::empty({s.rows(), s.D}, x.options().dtype(acc));
      check_launch(op, "sum_parts",
                   stfast_cuda::sum_parts(acc_kernel_dtype(x.scalar_type()), de_parts.data_ptr(), de_parts.size(0),
                                          de_rows.numel(), de_rows.data_ptr(), stream));
      if (s.has_bias) {  // + g @ Pb^T
        de_rows.addmm_(g, bias_pool->to(acc).t());
      }
      d_e = reduce_to_axis(de_rows, ax, s.B, s.N).reshape(embeddings.sizes()).to(x.scalar_type()).contiguous();
    }
  }

  at::Tensor d_pool = empty;
  if (need_pool) {
    d_pool = at::empty({s.D, s.I, s.O}, x.options());
    const int64_t parts = stfast_cuda::meta_gconv_dp_parts(dims);
    at::Tensor dp_parts = at::empty({parts, s.D, s.I, s.O}, x.options().dtype(acc));
    check_launch(op, "meta_gconv_bwd_dp",
                 stfast_cuda::meta_gconv_backward_dp(dtype, g.data_ptr(), xg.data_ptr(), emb.data_ptr(),
                                                     dp_parts.data_ptr(), dims, stream));
    check_launch(op, "sum_parts",
                 stfast_cuda::sum_parts(dtype, dp_parts.data_ptr(), parts, d_pool.numel(), d_pool.data_ptr(), stream));
  }

  at::Tensor d_bias = empty;
  if (need_bias) {  // dPb = E^T (g reduced onto the embedding's rows): a small cuBLAS GEMM
    const at::Tensor g_axis = reduce_to_axis(g, ax, s.B, s.N).reshape({-1, s.O});
    d_bias = at::mm(emb.reshape({-1, s.D}).to(acc).t(), g_axis).to(x.scalar_type());
  }

  at::Tensor d_x = empty, d_supports = empty;
  if (need_xg) {
    auto dx_ds = chebyshev_backward(d_xg.view({s.B, s.N, s.I}), xg3, supports, cheb_k, need_supports);
    if (need_x) {
      d_x = dx_ds[0].contiguous();
    }
    if (need_supports) {
      d_supports = dx_ds[1];
    }
  }
  return {d_x, d_supports, d_e, d_pool, d_bias};
}

}  // namespace
}  // namespace stfast_ext

TORCH_LIBRARY_IMPL(stfast_ext, CUDA, m) {
  m.impl("meta_gconv_fwd", &stfast_ext::meta_gconv_fwd_cuda);
  m.impl("meta_gconv_bwd", &stfast_ext::meta_gconv_bwd_cuda);
}
