// Row-major GEMM on raw pointers for the CPU kernels: C (m x n) = alpha op(A) op(B) + beta C with row
// strides lda, ldb, ldc (strided operands are read and written in place).
//
// It calls the Fortran BLAS that libtorch_cpu exports (sgemm_ / dgemm_: MKL on x86 builds of torch),
// bound as weak symbols: ATen's own cpublas::gemm is not exported to extensions, and at::mm_out on
// per-call tensor views costs microseconds per call, which dominated the per-node GEMMs of node_lora
// (measured: csrc/README.md). Inside an at::parallel_for region the BLAS runs single-threaded. When
// the symbols are missing (another BLAS build of torch), a size exceeds 32 bits, or the environment
// sets STFAST_CPU_GEMM=aten (read once; the tests use it to cover this path), the same product runs
// through at::addmm_out on from_blob views instead.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace stfast_ext {

inline bool fits_int(int64_t v) {
  return v <= std::numeric_limits<int>::max();
}

inline bool fortran_blas_allowed() {
  static const bool allowed = [] {
    const char* choice = std::getenv("STFAST_CPU_GEMM");
    return choice == nullptr || std::strcmp(choice, "aten") != 0;
  }();
  return allowed;
}

// "blas" when the per-node GEMMs call the exported Fortran BLAS, "aten" when they fall back.
inline const char* cpu_gemm_route() {
  return sgemm_ != nullptr && dgemm_ != nullptr && fortran_blas_allowed() ? "blas" : "aten";
}

// The Fortran call on the transposes (column-major C^T = op(B)^T op(A)^T); false if not possible.
inline bool fortran_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                         int ldb, float beta, float* c, int ldc) {
  if (sgemm_ == nullptr || !fortran_blas_allowed()) {
    return false;
  }
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
  return true;
}

inline bool fortran_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                         const double* b, int ldb, double beta, double* c, int ldc) {
  if (dgemm_ == nullptr || !fortran_blas_allowed()) {
    return false;
  }
  dgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
  return true;
}

// A row-major (rows x cols) matrix with row stride ld, read (or transposed) in place.
template <typename T>
at::Tensor strided_view(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  at::Tensor view = at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                                  at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return transpose ? view.t() : view;
}

template <typename T>
void gemm_rows(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  // Fortran BLAS wants every leading dimension >= 1 even for empty operands.
  const int64_t lda1 = lda > 0 ? lda : 1, ldb1 = ldb > 0 ? ldb : 1;
  if (fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda1) && fits_int(ldb1) && fits_int(ldc) &&
      fortran_gemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', static_cast<int>(m), static_cast<int>(n),
                   static_cast<int>(k), alpha, a, static_cast<int>(lda1), b, static_cast<int>(ldb1), beta, c,
                   static_cast<int>(ldc))) {
    return;
  }
  const at::Tensor a_view = trans_a ? strided_view(a, k, m, lda, true) : strided_view(a, m, k, lda, false);
  const at::Tensor b_view = trans_b ? strided_view(b, n, k, ldb, true) : strided_view(b, k, n, ldb, false);
  at::Tensor c_view = strided_view(c, m, n, ldc, false);
  at::addmm_out(c_view, c_view, a_view, b_view, beta, alpha);  // beta == 0 ignores c's contents
}

}  // namespace stfast_ext
