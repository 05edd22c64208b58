// Validation and Chebyshev propagation shared by the CPU and CUDA glue (see meta_gconv_common.h).
#include "meta_gconv_common.h"

#include <vector>

namespace stfast_ext {

Activation parse_activation(const char* op, const std::optional<c10::string_view>& activation) {
  if (!activation.has_value()) {
    return Activation::kNone;
  }
  if (*activation == "sigmoid") {
    return Activation::kSigmoid;
  }
  if (*activation == "tanh") {
    return Activation::kTanh;
  }
  TORCH_CHECK_VALUE(false, op, ": activation: expected None, 'sigmoid' or 'tanh', got '", std::string(*activation), "'");
}

Axis parse_axis(const char* op, c10::string_view axis) {
  if (axis == "S") {
    return Axis::kS;
  }
  if (axis == "T") {
    return Axis::kT;
  }
  if (axis == "ST") {
    return Axis::kST;
  }
  TORCH_CHECK_VALUE(false, op, ": axis: expected 'S', 'T' or 'ST', got '", std::string(axis), "'");
}

Formulation parse_formulation(const char* op, c10::string_view formulation) {
  if (formulation == "auto") {
    return Formulation::kAuto;
  }
  if (formulation == "outer") {
    return Formulation::kOuter;
  }
  if (formulation == "grouped") {
    return Formulation::kGrouped;
  }
  TORCH_CHECK_VALUE(false, op, ": formulation: expected 'auto', 'outer' or 'grouped', got '", std::string(formulation), "'");
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return c10::toString(t);
  }
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_no_zero_size(const char* op, const char* name, const char* layout, at::IntArrayRef sizes) {
  for (const int64_t size : sizes) {
    TORCH_CHECK_VALUE(size > 0, op, ": ", name, ": expected every size of ", layout, " to be at least 1, got ", sizes,
                      " (the stfast.ops functions compute problems with a zero-sized dimension on the torch backend)");
  }
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, ": expected dtype ",
                   dtype_name(x.scalar_type()), " (the dtype of x), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, ": expected device ", x.device(),
              " (the device of x), got ", t.device());
}

namespace {

const char* axis_shape(Axis axis) {
  switch (axis) {
    case Axis::kS:
      return "(N, D)";
    case Axis::kT:
      return "(B, D)";
    default:
      return "(B, N, D)";
  }
}

}  // namespace

MetaShape check_meta_gconv_inputs(
    const char* op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& supports,
    const at::Tensor& embeddings,
    const at::Tensor& weights_pool,
    const std::optional<at::Tensor>& bias_pool,
    int64_t cheb_k,
    Activation activation,
    Axis axis) {
  TORCH_CHECK_VALUE(x.defined(), op, ": x: expected a tensor of shape (B, N, C), got an undefined tensor");
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x: expected shape (B, N, C), got ", x.sizes());
  TORCH_CHECK_TYPE(supported_dtype(x.scalar_type()), op,
              ": x: expected dtype float32, float64, float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(cheb_k >= 1, op, ": cheb_k: expected an int >= 1, got ", cheb_k);
  MetaShape s{};
  s.B = x.size(0);
  s.N = x.size(1);
  s.C = x.size(2);
  s.K = cheb_k;
  s.I = cheb_k * s.C;
  s.axis = axis;
  s.activation = activation;

  const bool has_supports = supports.has_value() && supports->defined();
  if (has_supports) {
    const at::Tensor& a = *supports;
    const bool shared = a.dim() == 2 && a.size(0) == s.N && a.size(1) == s.N;
    const bool per_sample = a.dim() == 3 && a.size(0) == s.B && a.size(1) == s.N && a.size(2) == s.N;
    TORCH_CHECK_VALUE(shared || per_sample, op, ": supports: expected shape (N, N) = (", s.N, ", ", s.N,
                ") or (B, N, N) = (", s.B, ", ", s.N, ", ", s.N, "), got ", a.sizes());
    check_like_x(op, "supports", a, x);
  } else {
    TORCH_CHECK_VALUE(cheb_k == 1, op, ": cheb_k: supports is None (no propagation), so expected cheb_k 1, got ",
                cheb_k);
  }

  TORCH_CHECK_VALUE(embeddings.defined(), op, ": embeddings: expected a tensor of shape ", axis_shape(axis),
              ", got an undefined tensor");
  bool emb_ok = false;
  switch (axis) {
    case Axis::kS:
      emb_ok = embeddings.dim() == 2 && embeddings.size(0) == s.N;
      break;
    case Axis::kT:
      emb_ok = embeddings.dim() == 2 && embeddings.size(0) == s.B;
      break;
    case Axis::kST:
      emb_ok = embeddings.dim() == 3 && embeddings.size(0) == s.B && embeddings.size(1) == s.N;
      break;
  }
  TORCH_CHECK_VALUE(emb_ok, op, ": embeddings: expected shape ", axis_shape(axis), " with B = ", s.B, ", N = ", s.N,
              " for axis ", axis == Axis::kS ? "'S'" : (axis == Axis::kT ? "'T'" : "'ST'"), ", got ",
              embeddings.sizes());
  check_like_x(op, "embeddings", embeddings, x);
  s.D = embeddings.size(-1);

  TORCH_CHECK_VALUE(weights_pool.defined() && weights_pool.dim() == 3 && weights_pool.size(0) == s.D &&
                  weights_pool.size(1) == s.I,
              op, ": weights_pool: expected shape (D, cheb_k*C, O) = (", s.D, ", ", s.I, ", O), got ",
              weights_pool.defined() ? weights_pool.sizes() : at::IntArrayRef{});
  check_like_x(op, "weights_pool", weights_pool, x);
  s.O = weights_pool.size(2);

  check_no_zero_size(op, "x", "(B, N, C)", x.sizes());
  check_no_zero_size(op, "embeddings", axis_shape(axis), embeddings.sizes());
  check_no_zero_size(op, "weights_pool", "(D, cheb_k*C, O)", weights_pool.sizes());

  s.has_bias = bias_pool.has_value() && bias_pool->defined();
  if (s.has_bias) {
    const at::Tensor& pb = *bias_pool;
    TORCH_CHECK_VALUE(pb.dim() == 2 && pb.size(0) == s.D && pb.size(1) == s.O, op,
                ": bias_pool: expected shape (D, O) = (", s.D, ", ", s.O, "), got ", pb.sizes());
    check_like_x(op, "bias_pool", pb, x);
  }
  return s;
}

void check_meta_gconv_backward_inputs(
    const char* op,
    const MetaShape& s,
    const at::Tensor& x,
    const at::Tensor& grad,
    const std::optional<at::Tensor>& out) {
  TORCH_CHECK_VALUE(grad.defined() && grad.dim() == 3 && grad.size(0) == s.B && grad.size(1) == s.N &&
                  grad.size(2) == s.O,
              op, ": grad: expected shape (B, N, O) = (", s.B, ", ", s.N, ", ", s.O, "), got ",
              grad.defined() ? grad.sizes() : at::IntArrayRef{});
  check_like_x(op, "grad", grad, x);
  const bool has_out = out.has_value() && out->defined();
  if (s.activation != Activation::kNone) {
    TORCH_CHECK_VALUE(has_out, op, ": out: expected the forward output (B, N, O) = (", s.B, ", ", s.N, ", ", s.O,
                ") because activation is not None, got None");
  }
  if (has_out) {
    TORCH_CHECK_VALUE(out->dim() == 3 && out->size(0) == s.B && out->size(1) == s.N && out->size(2) == s.O, op,
                ": out: expected shape (B, N, O) = (", s.B, ", ", s.N, ", ", s.O, "), got ", out->sizes());
    check_like_x(op, "out", *out, x);
  }
}

at::Tensor chebyshev_features(const at::Tensor& x, const std::optional<at::Tensor>& supports, int64_t cheb_k) {
  if (cheb_k == 1) {
    return x;
  }
  const at::Tensor& a = *supports;
  std::vector<at::Tensor> terms;
  terms.reserve(cheb_k);
  terms.push_back(x);
  terms.push_back(at::matmul(a, x));
  for (int64_t k = 2; k < cheb_k; ++k) {
    terms.push_back(at::matmul(a, terms[k - 1]).mul_(2).sub_(terms[k - 2]));
  }
  return at::cat(terms, -1);
}

std::array<at::Tensor, 2> chebyshev_backward(
    const at::Tensor& grad_xg,
    const at::Tensor& xg,
    const std::optional<at::Tensor>& supports,
    int64_t cheb_k,
    bool need_supports) {
  const int64_t channels = grad_xg.size(-1) / cheb_k;
  // One slice per Chebyshev term, cheb_k of them whatever `channels` is (split(0) would not give cheb_k).
  std::vector<at::Tensor> grads;
  grads.reserve(cheb_k);
  for (int64_t k = 0; k < cheb_k; ++k) {
    grads.push_back(grad_xg.narrow(-1, k * channels, channels));
  }
  if (cheb_k == 1) {  // T_0 = I: the supports take no part
    return {grads[0], need_supports ? at::zeros_like(*supports) : at::Tensor()};
  }
  const at::Tensor& a = *supports;
  const at::Tensor adjoint = a.transpose(-1, -2);
  // Reverse of T_k = 2 A T_{k-1} - T_{k-2} (T_1 = A T_0); grads[k] is final when k is visited.
  for (int64_t k = cheb_k - 1; k >= 1; --k) {
    const double scale = k >= 2 ? 2.0 : 1.0;
    grads[k - 1] = grads[k - 1] + at::matmul(adjoint, grads[k]) * scale;
    if (k >= 2) {
      grads[k - 2] = grads[k - 2] - grads[k];
    }
  }
  at::Tensor grad_supports;
  if (need_supports) {
    // dA = sum_k scale_k G_k T_{k-1}^T, as one GEMM over the concatenated terms.
    std::vector<at::Tensor> scaled{grads[1]};
    for (int64_t k = 2; k < cheb_k; ++k) {
      scaled.push_back(grads[k] * 2);
    }
    const at::Tensor lhs = at::cat(scaled, -1);
    const at::Tensor previous = xg.narrow(-1, 0, (cheb_k - 1) * channels);
    if (a.dim() == 2) {
      // sum over samples of lhs[b] @ previous[b]^T, as one (N, B*F) @ (B*F, N) GEMM.
      const int64_t nodes = lhs.size(1);
      const int64_t columns = lhs.size(0) * lhs.size(2);  // explicit: a -1 is ambiguous for empty tensors
      grad_supports = at::mm(lhs.transpose(0, 1).reshape({nodes, columns}),
                             previous.transpose(0, 1).reshape({nodes, columns}).t());
    } else {
      grad_supports = at::matmul(lhs, previous.transpose(-1, -2));
    }
  }
  return {grads[0], grad_supports};
}

at::Tensor reduce_to_axis(const at::Tensor& rows, Axis axis, int64_t batch, int64_t nodes) {
  const at::Tensor r = rows.reshape({batch, nodes, rows.size(-1)});
  switch (axis) {
    case Axis::kS:
      return r.sum(0);
    case Axis::kT:
      return r.sum(1);
    default:
      return r;
  }
}

at::Tensor activation_backward(const at::Tensor& grad, const std::optional<at::Tensor>& out, Activation activation) {
  switch (activation) {
    case Activation::kSigmoid:
      return grad * *out * (1 - *out);
    case Activation::kTanh:
      return grad * (1 - *out * *out);
    default:
      return grad;
  }
}

}  // namespace stfast_ext
