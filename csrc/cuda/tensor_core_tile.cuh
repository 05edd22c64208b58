// Tensor-core (WMMA) pieces shared by the kernels: the operand type each storage dtype multiplies in,
// the 64 x 64 fp32 tile a 256-thread block accumulates from operand tiles in shared memory
// (TensorCoreTile: 16 x 32 per warp, node_lora), and a warp's 32 x 32 tile (WarpTile: 2 x 2 fragments,
// meta_gconv).
//
// Operands: fp16 and bf16 as themselves (m16n16k16), fp32 as TF32 (m16n16k8: 10 mantissa bits, the
// operands rounded with __float_to_tf32 when staged); accumulation in fp32. fp64 has no path here.
// The glue decides when these kernels run (sm_80+; fp32 only where torch allows TF32 matmuls).
#pragma once

#include <mma.h>

#include <type_traits>

#include "cuda_common.h"

// bf16 and TF32 WMMA need sm_80: compiled for an older arch, the tensor-core kernels' bodies are
// empty (the glue never launches them there).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define STFAST_TENSOR_CORES 1
#else
#define STFAST_TENSOR_CORES 0
#endif

#if STFAST_TENSOR_CORES

namespace stfast_cuda {
namespace detail {

namespace wmma = nvcuda::wmma;

template <typename T>
struct MmaOperand;
template <>
struct MmaOperand<__half> {
  using type = __half;
  using fragment_type = __half;
  static constexpr int kDepth = 16;
  __device__ __forceinline__ static type from(float v) { return __float2half_rn(v); }
};
template <>
struct MmaOperand<__nv_bfloat16> {
  using type = __nv_bfloat16;
  using fragment_type = __nv_bfloat16;
  static constexpr int kDepth = 16;
  __device__ __forceinline__ static type from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct MmaOperand<float> {
  using type = float;
  using fragment_type = wmma::precision::tf32;
  static constexpr int kDepth = 8;
  __device__ __forceinline__ static type from(float v) { return wmma::__float_to_tf32(v); }
};

// A fragment loaded from operands staged as they are stored (fp32 not yet rounded), rounded to the
// MMA operand type: TF32 for fp32, nothing to do for fp16 / bf16.
template <typename T, typename Fragment>
__device__ __forceinline__ void round_to_operand(Fragment& f) {
  if constexpr (std::is_same<T, float>::value) {
    for (int e = 0; e < f.num_elements; ++e) {
      f.x[e] = wmma::__float_to_tf32(f.x[e]);
    }
  }
}

// Row padding of the staged operand tiles, in elements: 16 bytes keeps every fragment pointer
// 256-bit aligned (tile rows are 16-element multiples apart) and shifts consecutive rows across
// shared-memory banks.
template <typename Operand>
constexpr int kOperandPad = 16 / static_cast<int>(sizeof(Operand));
constexpr int kAccumulatorPad = 4;  // floats, same reasons

// A 64 x 64 fp32 tile of a 256-thread block: warp w owns rows 16 (w % 4) .. +15 and columns
// 32 (w / 4) .. +31, two 16 x 16 accumulator fragments.
template <typename T>
struct TensorCoreTile {
  using Operand = typename MmaOperand<T>::type;
  using FragmentType = typename MmaOperand<T>::fragment_type;
  static constexpr int kDepth = MmaOperand<T>::kDepth;

  wmma::fragment<wmma::accumulator, 16, 16, kDepth, float> acc[2];

  __device__ __forceinline__ int row0() const { return 16 * ((threadIdx.x / 32) % 4); }
  __device__ __forceinline__ int col0() const { return 32 * ((threadIdx.x / 32) / 4); }

  __device__ __forceinline__ void zero() {
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
  }

  // acc += A B over `depth` (a multiple of kDepth). A is 64 x depth, at a[r * lda + k] when ALayout is
  // wmma::row_major and at a[k * lda + r] when it is wmma::col_major; B is depth x 64 at b[k * ldb + c].
  template <typename ALayout>
  __device__ __forceinline__ void multiply(const Operand* a, int lda, const Operand* b, int ldb, int depth) {
    constexpr bool a_row_major = std::is_same<ALayout, wmma::row_major>::value;
    const int r0 = row0(), c0 = col0();
    for (int k = 0; k < depth; k += kDepth) {
      wmma::fragment<wmma::matrix_a, 16, 16, kDepth, FragmentType, ALayout> fa;
      wmma::load_matrix_sync(fa, a_row_major ? a + r0 * lda + k : a + k * lda + r0, lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, kDepth, FragmentType, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b + k * ldb + c0 + 16 * j, ldb);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }

  // The tile from shared memory, row-major (what store wrote, possibly changed in between).
  __device__ __forceinline__ void load(const float* c, int ldc) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::load_matrix_sync(acc[j], c + row0() * ldc + col0() + 16 * j, ldc, wmma::mem_row_major);
    }
  }

  // The tile into shared memory, row-major: c[r * ldc + col].
  __device__ __forceinline__ void store(float* c, int ldc) const {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(c + row0() * ldc + col0() + 16 * j, acc[j], ldc, wmma::mem_row_major);
    }
  }
};

// A 32 x 32 fp32 tile of one warp, 2 x 2 accumulator fragments: each loaded A fragment feeds two MMAs
// and so does each B fragment (one fragment load per MMA, against 1.5 for TensorCoreTile's 16 x 32).
// Pointers are at the warp's own origin: a at (row 0, k 0) of its 32 rows, b at (k 0, column 0) of its
// 32 columns, c at its (row 0, column 0).
template <typename T>
struct WarpTile {
  using Operand = typename MmaOperand<T>::type;
  using FragmentType = typename MmaOperand<T>::fragment_type;
  using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, MmaOperand<T>::kDepth, float>;
  static constexpr int kDepth = MmaOperand<T>::kDepth;

  Accumulator acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fill_fragment(acc[i][j], 0.0f);
      }
    }
  }

  // acc += A B over `depth` (a multiple of kDepth). A (32 x depth) is at a[r * lda + k] when ALayout is
  // wmma::row_major, at a[k * lda + r] when wmma::col_major; B (depth x 32) at b[k * ldb + c] when
  // BLayout is wmma::row_major, at b[c * ldb + k] when wmma::col_major. kRoundB: B is staged as stored
  // (round_to_operand after each load).
  template <typename ALayout, typename BLayout, bool kRoundB = false>
  __device__ __forceinline__ void multiply(const Operand* a, int lda, const Operand* b, int ldb, int depth) {
    constexpr bool a_rows = std::is_same<ALayout, wmma::row_major>::value;
    constexpr bool b_rows = std::is_same<BLayout, wmma::row_major>::value;
    for (int k = 0; k < depth; k += kDepth) {
      wmma::fragment<wmma::matrix_a, 16, 16, kDepth, FragmentType, ALayout> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kDepth, FragmentType, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], a_rows ? a + 16 * i * lda + k : a + k * lda + 16 * i, lda);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], b_rows ? b + k * ldb + 16 * j : b + 16 * j * ldb + k, ldb);
        if constexpr (kRoundB) {
          round_to_operand<T>(fb[j]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
      }
    }
  }

  // acc += the 32 x 32 tile at c (row-major), element by element: fragments of one type share their
  // element-to-lane mapping, so the sum needs no knowledge of it.
  __device__ __forceinline__ void add(const float* c, int ldc) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        Accumulator other;
        wmma::load_matrix_sync(other, c + 16 * i * ldc + 16 * j, ldc, wmma::mem_row_major);
        for (int e = 0; e < other.num_elements; ++e) {
          acc[i][j].x[e] += other.x[e];
        }
      }
    }
  }

  // The tile into shared memory, row-major: c[r * ldc + col].
  __device__ __forceinline__ void store(float* c, int ldc) const {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(c + 16 * i * ldc + 16 * j, acc[i][j], ldc, wmma::mem_row_major);
      }
    }
  }
};

}  // namespace detail
}  // namespace stfast_cuda

#endif  // STFAST_TENSOR_CORES
