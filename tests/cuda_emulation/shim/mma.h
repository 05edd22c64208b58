// Stand-in for CUDA's <mma.h> (the WMMA API, nvcuda::wmma) in the CPU emulation of the kernels: see
// ../emu_cuda.h. Only what csrc/cuda uses: fragments of shape 16x16x16 (__half, __nv_bfloat16) and
// 16x16x8 (precision::tf32) with float accumulators; fill / load (operands and accumulators) / store /
// mma_sync; __float_to_tf32.
//
// On a GPU a fragment's elements are spread over the 32 lanes of a warp in an unspecified layout. Here
// every lane holds the whole tile and computes the whole product (fp32 fma in k order), so a lane's
// result does not depend on the others. What it checks, as a GPU requires (CUDA C++ Programming
// Guide, "Warp Matrix Functions"):
//   - every call is warp-collective: all lanes make it, with the same arguments (emu::warp_collective);
//   - load / store pointers are 256-bit aligned and the leading dimension is a multiple of 16 bytes;
//   - tf32 operands were rounded with __float_to_tf32 (their low 13 mantissa bits are zero).
// A store writes only the lane's share of the tile (element e by lane e % 32), so a lane that reads a
// stored tile before a barrier sees other lanes' elements missing and the thread-order comparison of
// the tests flags it.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "../emu_cuda.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {

template <typename T>
struct Element {
  using type = T;
};
template <>
struct Element<precision::tf32> {
  using type = float;
};

inline float widen(float v) { return v; }
inline float widen(__half v) { return __half2float(v); }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

inline bool is_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return (bits & 0x1fffu) == 0u;
}

template <typename E>
void check_memory(const char* what, const void* pointer, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) emu::fail((std::string(what) + ": pointer not 256-bit aligned").c_str());
  if ((ldm * sizeof(E)) % 16 != 0) emu::fail((std::string(what) + ": ldm not a multiple of 16 bytes").c_str());
}

inline unsigned lane() { return emu::state.thread_idx.x % 32; }

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr bool kColMajor = std::is_same<Layout, col_major>::value;
  using element_type = typename detail::Element<T>::type;
  enum : int { num_elements = kRows * kCols };
  element_type x[num_elements];  // row-major (r, c) -> x[r * kCols + c], held whole by every lane

  element_type& at(int r, int c) { return x[r * kCols + c]; }
  const element_type& at(int r, int c) const { return x[r * kCols + c]; }
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  emu::warp_collective("fill_fragment", nullptr, 0, 0);
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(value);
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* pointer, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout_t");
  static_assert(std::is_same<E, typename F::element_type>::value, "load from memory of the fragment's element type");
  emu::warp_collective("load_matrix_sync", pointer, ldm, F::kColMajor ? 1 : 0);
  detail::check_memory<E>("load_matrix_sync", pointer, ldm);
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) f.at(r, c) = F::kColMajor ? pointer[c * ldm + r] : pointer[r * ldm + c];
  }
}

// accumulator: the memory layout is the call's. Every lane reads the whole tile.
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* pointer, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  emu::warp_collective("load_matrix_sync", pointer, ldm, layout);
  detail::check_memory<float>("load_matrix_sync", pointer, ldm);
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      f.at(r, c) = layout == mem_col_major ? pointer[c * ldm + r] : pointer[r * ldm + c];
    }
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  emu::warp_collective("store_matrix_sync", pointer, ldm, layout);
  detail::check_memory<float>("store_matrix_sync", pointer, ldm);
  for (int e = static_cast<int>(detail::lane()); e < F::num_elements; e += 32) {  // this lane's share
    const int r = e / F::kCols, c = e % F::kCols;
    (layout == mem_col_major ? pointer[c * ldm + r] : pointer[r * ldm + c]) = f.x[e];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  emu::warp_collective("mma_sync", nullptr, 0, 0);
  if (std::is_same<T, precision::tf32>::value) {
    for (const auto& v : a.x) {
      if (!detail::is_tf32(detail::widen(v))) emu::fail("mma_sync: a tf32 operand was not rounded by __float_to_tf32");
    }
    for (const auto& v : b.x) {
      if (!detail::is_tf32(detail::widen(v))) emu::fail("mma_sync: a tf32 operand was not rounded by __float_to_tf32");
    }
  }
  fragment<accumulator, M, N, K, float> out;
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.at(i, j);
      for (int k = 0; k < K; ++k) acc = std::fma(detail::widen(a.at(i, k)), detail::widen(b.at(k, j)), acc);
      out.at(i, j) = acc;
    }
  }
  d = out;
}

// Rounds to tf32 (10 mantissa bits), to nearest with ties away from zero, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace wmma
}  // namespace nvcuda
