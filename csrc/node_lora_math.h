// Scalar pieces of node_lora shared by the CPU kernels (cpu/node_lora_cpu.cpp) and the CUDA kernels
// (cuda/node_lora_kernels.cu): the activations and their derivatives, and the counter-based dropout
// draw. No torch headers, so that nvcc compiles it alone.
//
// Dropout: element (row, k) of x viewed as (M*N, K) (row = m*N + n) is kept when
// uniform(seed, offset + row*K + k) >= p, where `uniform` is the draw of Triton's tl.rand: Philox4x32
// with 10 rounds, key (seed & 0xffffffff, seed >> 32), counter (lo, hi, 0, 0) of the 64-bit element
// index, and the first output word mapped to [0, 1) as triton.language.random.uint_to_uniform_float
// does. So the cpu, cuda and triton backends draw the same mask from the same (seed, offset).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define STFAST_HD __host__ __device__ __forceinline__
#else
#define STFAST_HD inline
#endif

namespace stfast_math {

// Codes shared by the glue and the kernels (stfast::node_lora's activation argument).
enum LoraActivation : int { kLoraNone = 0, kLoraLeakyRelu = 1, kLoraRelu = 2, kLoraTanh = 3, kLoraSigmoid = 4 };

constexpr double kLeakyReluSlope = 0.01;  // torch.nn.LeakyReLU's default (and the torch / triton backends')

template <typename T>
STFAST_HD T lora_activate(T h, int activation) {
  switch (activation) {
    case kLoraLeakyRelu:  // the product on both sides: a select of constants, so CPU loops vectorise
      return h * (h > T(0) ? T(1) : T(kLeakyReluSlope));
    case kLoraRelu:  // NaN fails the test and passes through, as torch.relu propagates it
      return h < T(0) ? T(0) : h;
    case kLoraTanh:
      return std::tanh(h);
    case kLoraSigmoid:
      return T(1) / (T(1) + std::exp(-h));
    default:
      return h;
  }
}

// d act / d h at the pre-activation h (ATen's conventions: leaky_relu and relu take the slope of
// the negative side at h == 0).
template <typename T>
STFAST_HD T lora_activation_slope(T h, int activation) {
  switch (activation) {
    case kLoraLeakyRelu:
      return h > T(0) ? T(1) : T(kLeakyReluSlope);
    case kLoraRelu:  // ATen's threshold_backward: a NaN h passes the gradient through
      return h <= T(0) ? T(0) : T(1);
    case kLoraTanh: {
      const T t = std::tanh(h);
      return T(1) - t * t;
    }
    case kLoraSigmoid: {
      const T s = T(1) / (T(1) + std::exp(-h));
      return s * (T(1) - s);
    }
    default:
      return T(1);
  }
}

STFAST_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32-10 on counter (c0, c1, 0, 0) and key (k0, k1); returns the first output word.
STFAST_HD uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mul_hi_u32(0xCD9E8D57u, prev_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(0xD2511F53u, prev_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * prev_c2;
    c3 = 0xD2511F53u * prev_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// tl.rand(seed, counter): a float in [0, 1).
STFAST_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  const uint32_t word = philox_first_word(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  int32_t as_int = static_cast<int32_t>(word);
  as_int = as_int < 0 ? ~as_int : as_int;  // -x - 1 without overflow at INT32_MIN
  return static_cast<float>(as_int) * 4.6566127342e-10f;
}

// The dropout multiplier of element `counter - offset`: 1 / (1 - p) if kept, else 0.
STFAST_HD float dropout_multiplier(uint64_t seed, uint64_t counter, float p, float inv_keep) {
  return philox_uniform(seed, counter) >= p ? inv_keep : 0.0f;
}

}  // namespace stfast_math
