// Device-agnostic pieces of the stfast_ext meta_gconv ops, shared by the CPU and CUDA glue:
// argument parsing and validation (TORCH_CHECK messages name the argument, what was expected and
// what came), and the Chebyshev propagation of the graph features with ATen GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>

namespace stfast_ext {

enum class Activation { kNone = 0, kSigmoid = 1, kTanh = 2 };
enum class Axis { kS = 0, kT = 1, kST = 2 };
// How the CPU kernels organise the meta GEMM (see csrc/README.md); CUDA always uses kOuter.
enum class Formulation { kAuto = 0, kOuter = 1, kGrouped = 2 };

// Parse the string options; an unknown value raises ValueError prefixed with `op`.
Activation parse_activation(const char* op, const std::optional<c10::string_view>& activation);
Axis parse_axis(const char* op, c10::string_view axis);
Formulation parse_formulation(const char* op, c10::string_view formulation);

// "float32", "float64", "float16", "bfloat16" (torch's Python names), else c10's name.
std::string dtype_name(at::ScalarType t);

// float32, float64, float16 or bfloat16: the dtypes every stfast_ext op takes.
bool supported_dtype(at::ScalarType t);

// Every size of `name` (laid out as `layout`, e.g. "(B, N, C)") is at least 1, else ValueError prefixed
// with `op`: the kernels take no zero-sized dimension (the Python ops route such problems to torch).
void check_no_zero_size(const char* op, const char* name, const char* layout, at::IntArrayRef sizes);

// `name` has x's dtype and device, else TypeError / ValueError prefixed with `op`.
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x);

// Sizes of one meta_gconv problem: M = B*N rows, I = K*C propagated channels.
struct MetaShape {
  int64_t B, N, C, K, I, D, O;
  Axis axis;
  Activation activation;
  bool has_bias;
  int64_t rows() const { return B * N; }
};

// Validates every input of meta_gconv_fwd (and the shared ones of meta_gconv_bwd) and returns the
// sizes. `op` prefixes the messages.
MetaShape check_meta_gconv_inputs(
    const char* op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& supports,
    const at::Tensor& embeddings,
    const at::Tensor& weights_pool,
    const std::optional<at::Tensor>& bias_pool,
    int64_t cheb_k,
    Activation activation,
    Axis axis);

// The extra inputs of meta_gconv_bwd: grad (B, N, O) and, with an activation, out (B, N, O).
void check_meta_gconv_backward_inputs(
    const char* op,
    const MetaShape& shape,
    const at::Tensor& x,
    const at::Tensor& grad,
    const std::optional<at::Tensor>& out);

// cat([x, A x, 2 A (A x) - x, ...], -1), propagating features (never A^2).
at::Tensor chebyshev_features(const at::Tensor& x, const std::optional<at::Tensor>& supports, int64_t cheb_k);

// Gradients of x and (if need_supports) of the supports from the gradient of the propagated
// features; the second tensor is undefined when not needed.
std::array<at::Tensor, 2> chebyshev_backward(
    const at::Tensor& grad_xg,
    const at::Tensor& xg,
    const std::optional<at::Tensor>& supports,
    int64_t cheb_k,
    bool need_supports);

// Sum a (B*N, F) per-row tensor onto the embedding's leading shape: S -> (N, F), T -> (B, F),
// ST -> (B, N, F).
at::Tensor reduce_to_axis(const at::Tensor& rows, Axis axis, int64_t batch, int64_t nodes);

// g = grad * act'(out), as ATen ops (used by the CUDA glue; the CPU kernels fuse it per tile).
at::Tensor activation_backward(const at::Tensor& grad, const std::optional<at::Tensor>& out, Activation activation);

}  // namespace stfast_ext
