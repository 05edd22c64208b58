// Schemas of the stfast_ext operator namespace, defined once here; the CPU kernels
// (cpu/meta_gconv_cpu.cpp) and CUDA kernels (cuda/meta_gconv_cuda.cpp) register implementations
// for them. The public ops (stfast::meta_gconv, ...) stay defined once, in Python
// (stfast/ops/meta_gconv.py); stfast/ops/_ext.py wraps these ops as the `cpu` and `cuda` backends.
// See csrc/README.md.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/blas.h"

namespace stfast_ext {

bool has_cuda() {
#ifdef STFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string build_info() {
  std::string info = "cuda=";
  info += has_cuda() ? "1" : "0";
  info += " cpu_gemm=";
  info += cpu_gemm_route();
  info += " openmp=";
#ifdef _OPENMP
  info += "1";
#else
  info += "0";
#endif
#ifdef STFAST_SOURCES_HASH  // passed unquoted (-DSTFAST_SOURCES_HASH=abc123) by setup.py and the JIT loader
#define STFAST_STRINGIFY_(x) #x
#define STFAST_STRINGIFY(x) STFAST_STRINGIFY_(x)
  info += " sources=" STFAST_STRINGIFY(STFAST_SOURCES_HASH);
#endif
  return info;
}

}  // namespace stfast_ext

TORCH_LIBRARY(stfast_ext, m) {
  // Forward of stfast::meta_gconv: act(sum_d E[., d] (xg @ P[d] + Pb[d])) with
  // xg = [x, A x, 2 A (A x) - x, ...]. activation: None, "sigmoid", "tanh"; axis: "S", "T", "ST";
  // formulation: "auto", "outer" or "grouped" (CPU only; see csrc/README.md).
  m.def(
      "meta_gconv_fwd(Tensor x, Tensor? supports, Tensor embeddings, Tensor weights_pool, Tensor? bias_pool, "
      "int cheb_k, str? activation, str axis, str formulation) -> Tensor");
  // Backward: (dx, d supports, d embeddings, d weights_pool, d bias_pool); a gradient that is not
  // in `needs` (same order) comes back as an empty tensor. `out` is the forward output (needed
  // with an activation).
  m.def(
      "meta_gconv_bwd(Tensor grad, Tensor? out, Tensor x, Tensor? supports, Tensor embeddings, "
      "Tensor weights_pool, Tensor? bias_pool, int cheb_k, str? activation, str axis, bool[5] needs, "
      "str formulation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Forward of stfast::node_lora: x W^T + b + scale * act(drop(x) A[n]) B[n] for x (..., N, d_in),
  // weight (d_out, d_in), bias (d_out), lora_a (N, d_in, r), lora_b (N, r, d_out). activation: None,
  // "leaky_relu", "relu", "tanh", "sigmoid". Dropout (dropout_p > 0) draws Triton's tl.rand mask from
  // (seed, offset) = the int64 tensor `seed` of shape (2,) on x's device (csrc/node_lora_math.h), so
  // cpu, cuda and triton agree; the CUDA kernels read it from device memory (no host sync).
  m.def(
      "node_lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "str? activation, float dropout_p, Tensor seed) -> Tensor");
  // Backward: (dx, d weight, d bias, d lora_a, d lora_b); a gradient not in `needs` (same order), and
  // d bias without a bias, comes back as an empty tensor.
  m.def(
      "node_lora_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, str? activation, float dropout_p, Tensor seed, bool[5] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The dropout multiplier node_lora draws for x (keep / (1 - p), x's shape and dtype): for tests.
  m.def("node_lora_dropout_mask(Tensor x, float dropout_p, int seed, int offset) -> Tensor");
  m.def("has_cuda() -> bool", &stfast_ext::has_cuda);
  m.def("build_info() -> str", &stfast_ext::build_info);
}

// Importable as the Python module stfast._C (setup.py build); importing it runs the registrations
// above. The JIT build loads the same library with torch.ops.load_library instead.
static struct PyModuleDef stfast_ext_module = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&stfast_ext_module);
}
