// CPU kernels of stfast_ext::node_lora_fwd / node_lora_bwd / node_lora_dropout_mask (fp32 and fp64;
// fp16 and bf16 are computed in fp32 and rounded once at the end).
//
// Notation (node_lora_common.h): x (M, N, K), W (O, K), bias (O), A (N, K, R), B (N, R, O);
//   y[m, n] = x[m, n] W^T + bias + scale * act(drop(x[m, n]) A[n]) B[n].
//
// The shared base layer runs over all M*N rows at once (one multi-threaded BLAS GEMM: cutting it per
// node into N small GEMMs was measurably slower). The low-rank path runs per node: the rows of node n,
// x[:, n, :], are a matrix with row stride N*K read in place, and y[:, n, :] one with row stride N*O
// updated in place, so a node is a few small GEMMs on strided operands (gemm_rows, blas.h):
//
//   forward:  y = x W^T + bias (all rows);  per node: h = drop(x_n) A[n]; y_n += scale * act(h) B[n]
//   backward: dx = g W, dW = g^T x, db = colsum g (all rows);  per node: h again;
//             dB[n] = scale act(h)^T g_n; gh = scale (g_n B[n]^T) * act'(h); dA[n] = drop(x_n)^T gh;
//             dx_n += drop'(gh A[n]^T)
//
// No per-node weight (K x O) is ever formed, and no (M, N, O) low-rank output either: the (M, R)
// activations live in a per-thread buffer and are consumed while hot. Dropout multipliers come from
// the counter-based draw of node_lora_math.h (Triton's tl.rand), regenerated in the backward.
//
// Parallelism: at::parallel_for over nodes (each thread a contiguous range of nodes; the BLAS calls
// inside run single-threaded). Determinism: every element of y, dx, dA[n] and dB[n] is written by one
// thread in a fixed order; dW and db come from single ATen calls. Repeated runs with the same thread
// count are bitwise equal (tested).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "../node_lora_common.h"
#include "blas.h"

namespace stfast_ext {
namespace {

// The rows of node n of a (M, N, F) tensor: a (M, F) matrix with row stride N*F, used in place.
template <typename T>
struct NodeRows {
  T* data;
  int64_t ld;
};

template <typename T>
NodeRows<T> node_rows(T* data, int64_t node, int64_t nodes, int64_t width) {
  return {data + node * width, nodes * width};
}

// mult[m, k] = the dropout multiplier of x[m, node, k] and xd = x_n * mult, both (M, K) contiguous.
template <typename T>
void draw_dropout(const LoraShape& s, int64_t node, NodeRows<const T> x_n, T* mult, T* xd) {
  const float p = static_cast<float>(s.dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - s.dropout_p));
  const int64_t rows = s.M, nodes = s.N, width = s.K;
  const uint64_t seed = static_cast<uint64_t>(s.seed[0]), offset = static_cast<uint64_t>(s.seed[1]);
  for (int64_t m = 0; m < rows; ++m) {
    const uint64_t first = offset + static_cast<uint64_t>((m * nodes + node) * width);
    const T* x_row = x_n.data + m * x_n.ld;
    T* mult_row = mult + m * width;
    T* xd_row = xd + m * width;
    for (int64_t k = 0; k < width; ++k) {
      const T keep = static_cast<T>(stfast_math::dropout_multiplier(seed, first + k, p, inv_keep));
      mult_row[k] = keep;
      xd_row[k] = x_row[k] * keep;
    }
  }
}

// Per-thread scratch for one node at a time: (M, K) dropout multipliers and dropped input (with
// dropout), and (M, R) pre-activations h, activations a and low-rank gradient gh.
template <typename T>
struct Workspace {
  std::vector<T> mult, xd, h, a, gh;

  Workspace(const LoraShape& s, bool backward) {
    if (s.dropout_p > 0) {
      mult.resize(s.M * s.K);
      xd.resize(s.M * s.K);
    }
    h.resize(s.M * s.R);
    a.resize(s.M * s.R);
    if (backward) {
      gh.resize(s.M * s.R);
    }
  }
};

// h = drop(x_n) A[n] into ws.h; returns the low-rank input (x_n itself, or ws.xd with dropout).
template <typename T>
NodeRows<const T> shrink(const LoraShape& s, int64_t node, NodeRows<const T> x_n, const T* lora_a, Workspace<T>& ws) {
  NodeRows<const T> input = x_n;
  if (s.dropout_p > 0) {
    draw_dropout(s, node, x_n, ws.mult.data(), ws.xd.data());
    input = {ws.xd.data(), s.K};
  }
  gemm_rows<T>(false, false, s.M, s.R, s.K, T(1), input.data, input.ld, lora_a + node * s.K * s.R, s.R, T(0),
               ws.h.data(), s.R);
  return input;
}

// The per-element loops over an (M, R) tile, with the activation a template argument so that the
// loops vectorise (leaky_relu / relu become selects; a scalar branch mispredicts on every other
// element of random-signed data). Counts are locals and the pointers restrict: Python's build flags
// include -fno-strict-aliasing, under which a bound read through `s` blocks vectorisation.
template <int Act, typename T>
void activate_tile(int64_t count, const T* __restrict h, T* __restrict a) {
  for (int64_t j = 0; j < count; ++j) {
    a[j] = stfast_math::lora_activate(h[j], Act);
  }
}

template <int Act, typename T>
void times_slope_tile(int64_t count, const T* __restrict h, T* __restrict gh) {
  for (int64_t j = 0; j < count; ++j) {
    gh[j] *= stfast_math::lora_activation_slope(h[j], Act);
  }
}

// Calls f(std::integral_constant<int, activation>{}): one instantiation of the loop per activation.
template <typename F>
void with_activation(int activation, const F& f) {
  switch (activation) {
    case stfast_math::kLoraLeakyRelu:
      return f(std::integral_constant<int, stfast_math::kLoraLeakyRelu>{});
    case stfast_math::kLoraRelu:
      return f(std::integral_constant<int, stfast_math::kLoraRelu>{});
    case stfast_math::kLoraTanh:
      return f(std::integral_constant<int, stfast_math::kLoraTanh>{});
    case stfast_math::kLoraSigmoid:
      return f(std::integral_constant<int, stfast_math::kLoraSigmoid>{});
    default:
      return f(std::integral_constant<int, stfast_math::kLoraNone>{});
  }
}

// a = act(h) over the (M, R) tile.
template <typename T>
void activate(const LoraShape& s, const T* h, T* a) {
  with_activation(s.activation, [&](auto act) { activate_tile<decltype(act)::value>(s.M * s.R, h, a); });
}

// gh *= act'(h) over the (M, R) tile.
template <typename T>
void times_activation_slope(const LoraShape& s, const T* h, T* gh) {
  if (s.activation != stfast_math::kLoraNone) {
    with_activation(s.activation, [&](auto act) { times_slope_tile<decltype(act)::value>(s.M * s.R, h, gh); });
  }
}

// The low-rank path of the nodes [node_begin, node_end), added to y in place.
template <typename T>
void forward_low_rank(const LoraShape& s, const T* x, const T* lora_a, const T* lora_b, T* y, int64_t node_begin,
                      int64_t node_end) {
  Workspace<T> ws(s, /*backward=*/false);
  for (int64_t n = node_begin; n < node_end; ++n) {
    const NodeRows<T> y_n = node_rows(y, n, s.N, s.O);
    shrink(s, n, node_rows(x, n, s.N, s.K), lora_a, ws);
    activate(s, ws.h.data(), ws.a.data());
    gemm_rows<T>(false, false, s.M, s.O, s.R, static_cast<T>(s.scale), ws.a.data(), s.R, lora_b + n * s.R * s.O, s.O,
                 T(1), y_n.data, y_n.ld);
  }
}

struct Needs {
  bool x, weight, bias, a, b;
};

// The low-rank path's gradients of the nodes [node_begin, node_end): dA[n], dB[n], and dx_n += its
// low-rank part (dx already holds g W).
template <typename T>
void backward_low_rank(const LoraShape& s, const Needs& needs, const T* g, const T* x, const T* lora_a,
                       const T* lora_b, T* dx, T* d_a, T* d_b, int64_t node_begin, int64_t node_end) {
  Workspace<T> ws(s, /*backward=*/true);
  const T scale = static_cast<T>(s.scale);
  for (int64_t n = node_begin; n < node_end; ++n) {
    const NodeRows<const T> g_n = node_rows(g, n, s.N, s.O);
    const T* a_n = lora_a + n * s.K * s.R;
    const NodeRows<const T> input = shrink(s, n, node_rows(x, n, s.N, s.K), lora_a, ws);
    if (needs.b) {
      activate(s, ws.h.data(), ws.a.data());
      gemm_rows<T>(true, false, s.R, s.O, s.M, scale, ws.a.data(), s.R, g_n.data, g_n.ld, T(0), d_b + n * s.R * s.O,
                   s.O);
    }
    if (!needs.x && !needs.a) {
      continue;
    }
    T* gh = ws.gh.data();
    gemm_rows<T>(false, true, s.M, s.R, s.O, scale, g_n.data, g_n.ld, lora_b + n * s.R * s.O, s.O, T(0), gh, s.R);
    times_activation_slope(s, ws.h.data(), gh);
    if (needs.a) {
      gemm_rows<T>(true, false, s.K, s.R, s.M, T(1), input.data, input.ld, gh, s.R, T(0), d_a + n * s.K * s.R, s.R);
    }
    if (needs.x) {
      const NodeRows<T> dx_n = node_rows(dx, n, s.N, s.K);
      if (s.dropout_p > 0) {  // the low-rank part passes the dropout multiplier: via ws.xd (no longer needed)
        T* low = ws.xd.data();
        gemm_rows<T>(false, true, s.M, s.K, s.R, T(1), gh, s.R, a_n, s.R, T(0), low, s.K);
        const int64_t width = s.K;
        const T* mult = ws.mult.data();
        for (int64_t m = 0; m < s.M; ++m) {
          T* dx_row = dx_n.data + m * dx_n.ld;
          const T* low_row = low + m * width;
          const T* mult_row = mult + m * width;
          for (int64_t k = 0; k < width; ++k) {
            dx_row[k] += low_row[k] * mult_row[k];
          }
        }
      } else {
        gemm_rows<T>(false, true, s.M, s.K, s.R, T(1), gh, s.R, a_n, s.R, T(1), dx_n.data, dx_n.ld);
      }
    }
  }
}

// fp16 / bf16 run the fp32 kernels: the working dtype of `t`.
at::ScalarType work_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_work(const at::Tensor& t, at::ScalarType work) {
  return t.to(work).contiguous();
}

std::optional<at::Tensor> as_work(const std::optional<at::Tensor>& t, at::ScalarType work) {
  if (!t.has_value() || !t->defined()) {
    return std::nullopt;
  }
  return as_work(*t, work);
}

at::Tensor node_lora_fwd_cpu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    double scale,
    std::optional<c10::string_view> activation,
    double dropout_p,
    const at::Tensor& seed) {
  const char* op = "stfast_ext::node_lora_fwd";
  const LoraShape s = check_node_lora_inputs(op, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed);
  const at::ScalarType work = work_dtype(x.scalar_type());
  const at::Tensor xw = as_work(x, work), ww = as_work(weight, work), aw = as_work(lora_a, work),
                   bw = as_work(lora_b, work);
  const std::optional<at::Tensor> biasw = as_work(bias, work);
  at::Tensor y = at::empty(with_last_size(x, s.O), xw.options());
  if (y.numel() > 0) {
    // The shared base layer over all M*N rows at once: one multi-threaded BLAS GEMM.
    at::Tensor y_rows = y.view({s.rows(), s.O});
    const at::Tensor x_rows = xw.view({s.rows(), s.K});
    if (biasw.has_value()) {
      at::addmm_out(y_rows, *biasw, x_rows, ww.t());
    } else {
      at::mm_out(y_rows, x_rows, ww.t());
    }
    AT_DISPATCH_FLOATING_TYPES(work, "node_lora_fwd_cpu", [&] {
      at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: for the ATen fallback GEMM
        forward_low_rank<scalar_t>(s, xw.data_ptr<scalar_t>(), aw.data_ptr<scalar_t>(), bw.data_ptr<scalar_t>(),
                                   y.data_ptr<scalar_t>(), n0, n1);
      });
    });
  }
  return y.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> node_lora_bwd_cpu(
    const at::Tensor& grad,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    double scale,
    std::optional<c10::string_view> activation,
    double dropout_p,
    const at::Tensor& seed,
    std::array<bool, 5> needs_in) {
  const char* op = "stfast_ext::node_lora_bwd";
  const LoraShape s = check_node_lora_inputs(op, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed);
  check_node_lora_grad(op, s, x, grad);
  const Needs needs{needs_in[0], needs_in[1], needs_in[2] && s.has_bias, needs_in[3], needs_in[4]};
  const at::ScalarType work = work_dtype(x.scalar_type());
  const at::Tensor gw = as_work(grad, work), xw = as_work(x, work), ww = as_work(weight, work),
                   aw = as_work(lora_a, work), bw = as_work(lora_b, work);
  const at::Tensor empty = x.new_empty({0});
  const at::Tensor g_rows = gw.view({s.rows(), s.O}), x_rows = xw.view({s.rows(), s.K});
  // The shared base layer over all M*N rows at once: multi-threaded BLAS GEMMs and one column sum.
  at::Tensor dx = needs.x ? at::mm(g_rows, ww).view(xw.sizes()) : empty;
  at::Tensor d_weight = needs.weight ? at::mm(g_rows.t(), x_rows) : empty;
  at::Tensor d_bias = needs.bias ? g_rows.sum(0) : empty;
  // dA, dB: sums over the M rows of a node, zero when there are none.
  at::Tensor d_a = needs.a ? (s.M == 0 ? at::zeros_like(aw) : at::empty_like(aw)) : empty;
  at::Tensor d_b = needs.b ? (s.M == 0 ? at::zeros_like(bw) : at::empty_like(bw)) : empty;
  if ((needs.x || needs.a || needs.b) && s.rows() > 0) {
    AT_DISPATCH_FLOATING_TYPES(work, "node_lora_bwd_cpu", [&] {
      at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: for the ATen fallback GEMM
        backward_low_rank<scalar_t>(s, needs, gw.data_ptr<scalar_t>(), xw.data_ptr<scalar_t>(),
                                    aw.data_ptr<scalar_t>(), bw.data_ptr<scalar_t>(),
                                    needs.x ? dx.data_ptr<scalar_t>() : nullptr,
                                    needs.a ? d_a.data_ptr<scalar_t>() : nullptr,
                                    needs.b ? d_b.data_ptr<scalar_t>() : nullptr, n0, n1);
      });
    });
  }
  const auto back = [&](const at::Tensor& t, bool needed) { return needed ? t.to(x.scalar_type()) : empty; };
  return {back(dx, needs.x), back(d_weight, needs.weight), back(d_bias, needs.bias), back(d_a, needs.a),
          back(d_b, needs.b)};
}

at::Tensor node_lora_dropout_mask_cpu(const at::Tensor& x, double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "stfast_ext::node_lora_dropout_mask";
  check_dropout_mask_inputs(op, x, dropout_p, seed, offset);
  at::Tensor mult = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  float* out = mult.data_ptr<float>();
  const float p = static_cast<float>(dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  at::parallel_for(0, mult.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = stfast_math::dropout_multiplier(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + i), p,
                                               inv_keep);
    }
  });
  return mult.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(stfast_ext, CPU, m) {
  m.impl("node_lora_fwd", &node_lora_fwd_cpu);
  m.impl("node_lora_bwd", &node_lora_bwd_cpu);
  m.impl("node_lora_dropout_mask", &node_lora_dropout_mask_cpu);
}

}  // namespace stfast_ext
