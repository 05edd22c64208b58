// A CPU stand-in for the small part of CUDA that csrc/cuda/*.cu use, so that the kernels' logic runs
// (and is tested, tests/test_cuda_emulation.py) on a machine without a GPU.
//
// The .cu files are compiled unchanged by the host compiler (-x c++ -D__CUDACC__) with the headers
// of shim/ standing in for <cuda_runtime.h>, <cuda_runtime_api.h>, <cuda_fp16.h>, <cuda_bf16.h>,
// <cuda_pipeline.h> and <mma.h>;
// they all include this file. The only source rewrite (done by the test, in a temporary folder) is
// of the launch syntax, which no macro can express:
//     kernel<T><<<grid, block, shmem, stream>>>(args...)
//       ->  emu::Launch(grid, block, shmem, stream)(kernel<T>, args...)
//
// What it emulates:
//   - launches: blocks run one after another (grid.z outermost, grid.x innermost); the threads of a block
//     are cooperative fibers (ucontext) on private stacks, so each has its own registers / locals;
//     1-D blocks of at most 1024 threads, 3-D grids (grid.x < 2^31, grid.y and grid.z <= 65535); a bad
//     configuration sets the error that cudaGetLastError() returns, as a real launch does;
//   - __shared__: a function-local static, i.e. one array per kernel instantiation, shared by the
//     threads of the running block (blocks never overlap, so this is per-block memory);
//   - __syncthreads(): the thread yields; once every thread of the block has reached a barrier (or
//     returned), the scheduler resumes them. It checks that barriers are block-uniform: all live
//     threads wait at the same __syncthreads (same source line) and have passed the same number of
//     barriers, and no thread returns while others wait. A violation aborts with a message;
//   - thread order: within each barrier interval the threads run one at a time, to completion of
//     the interval, in the order set by emu::set_order(): forward, reversed or shuffled (a fresh
//     permutation per interval, seeded). A missing barrier (a thread reading shared memory another
//     thread has not yet written, or overwriting what another has not yet read) then shows up as a
//     result that depends on the order; the tests compare the three orders bitwise;
//   - warp-collective calls (the WMMA API of shim/mma.h): the lanes of a warp (threads 32w .. 32w+31)
//     must make the same sequence of collective calls with the same arguments (pointer, leading
//     dimension, layout); a mismatch, or lanes of one warp ending a block with different numbers of
//     calls, aborts. Checked per block; such blocks must consist of whole warps;
//   - asynchronous copies global -> shared (<cuda_pipeline.h>: __pipeline_memcpy_async / _commit /
//     _wait_prior, i.e. cp.async): at the call the destination is filled with 0xff bytes (a NaN in
//     every float type: its contents are undefined while the copy is in flight) and checked for the
//     size (4, 8, 16 bytes) and alignment of both addresses; the data lands when the issuing thread
//     waits for its group (__pipeline_wait_prior(n) completes all but its newest n committed groups).
//     So a read before the wait sees NaNs, and a copy issued into a buffer that another thread may
//     still read (a missing barrier or too few buffers) changes that thread's result in some thread
//     order. A thread that returns with copies it never waited for aborts. It cannot catch a source
//     changed between the issue and the wait (the emulator reads it at the wait), nor say anything
//     about the overlap the copies buy on a GPU;
//   - threadIdx / blockIdx / blockDim / gridDim, cudaError_t, cudaStream_t (ignored), dim3, the
//     device qualifiers (no-ops), __half / __nv_bfloat16 storage types with round-to-nearest-even
//     conversions, and the float overloads of the math functions (fma, exp, tanh, ...).
//
// What it does NOT emulate, and so cannot catch:
//   - warp-level behaviour beyond the collective check above: no lockstep, no __shfl / __ballot /
//     __syncwarp / atomics (the kernels use none; using one fails to compile here); a race that real
//     warps happen to hide or expose is only caught through the thread orders above;
//   - the memory model: every write is immediately visible to every thread (no caches, no fences,
//     no register / shared-memory reordering), and shared memory keeps its contents from one block
//     to the next (on a GPU it starts undefined), so a read of never-written shared memory is not
//     flagged;
//   - resources and timing: no limit on shared memory or registers per block, no occupancy, no
//     __launch_bounds__ check, nothing about speed or bank conflicts;
//   - device arithmetic: host float math (x87 is not used on x86-64: SSE, so fp32 stays fp32),
//     host libm for exp / tanh (not CUDA's ulp bounds); the compiler may contract or not differently
//     from nvcc (the kernels call fma() explicitly where it matters);
//   - out-of-bounds accesses: plain host memory (the harness surrounds its buffers with canaries).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

// ---------------------------------------------------------------- CUDA runtime surface

enum cudaError_t : int {  // the codes of the real runtime
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
typedef dim3 uint3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// The float overloads CUDA's math headers provide in the global namespace.
using std::exp;
using std::fma;
using std::fmax;
using std::fmin;
using std::log;
using std::sqrt;
using std::tanh;

// Storage-only half types (the kernels convert to fp32 to compute), rounded to nearest even.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  float magnitude;
  if (exponent == 0x1f) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  std::memcpy(&magnitude, &bits, 4);
  return magnitude;
}

inline __half __float2half_rn(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const float a = std::fabs(f);
  if (std::isnan(f)) return __half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a == 0.0f) return __half{sign};
  if (a >= 65520.0f) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to infinity
  int e;
  std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  // quantum of the result: 2^(e - 11) for normals, 2^-24 for subnormals
  const int q = std::max(e - 11, -24);
  const float units = std::nearbyint(std::ldexp(a, -q));  // default rounding mode: to nearest even
  const uint32_t n = static_cast<uint32_t>(units);       // < 2^11 (may carry into the next binade)
  if (q == -24 && n < 0x400u) return __half{static_cast<uint16_t>(sign | n)};
  // normal: n = 2^10 + mantissa (or 2^11 after a carry), value n 2^q
  const int shift = n >= 0x800u ? 1 : 0;
  const uint32_t biased = static_cast<uint32_t>(q + 10 + shift + 15);
  const uint32_t mantissa = (n >> shift) & 0x3ffu;
  return __half{static_cast<uint16_t>(sign | (biased << 10) | mantissa)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even on the dropped 16 bits
  return __nv_bfloat16{static_cast<uint16_t>(bits >> 16)};
}

// ---------------------------------------------------------------- the emulator

namespace emu {

enum class Order { kForward, kReversed, kShuffled };

[[noreturn]] inline void fail(const char* what);

struct State {
  Order order = Order::kForward;
  std::mt19937 rng{12345};
  cudaError_t last_error = cudaSuccess;
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  long barriers = 0;  // barrier arrivals, all threads, since the start (for statistics)
  long async_copies = 0;  // asynchronous copies issued since the start (for statistics)
};
inline State state;

inline void set_order(Order order, unsigned seed = 12345) {
  state.order = order;
  state.rng.seed(seed);
}

namespace detail {

constexpr size_t kStackBytes = 128 * 1024;

// One asynchronous copy: `bytes` from src, then zeros up to `size` (the zfill of cp.async).
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes, size;
};

struct Fiber {
  std::vector<AsyncCopy> open;                   // issued, not yet committed
  std::vector<std::vector<AsyncCopy>> committed;  // committed groups, oldest first
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // allocated once, reused by every block (never zero-filled)
  bool done = false;
  long barriers = 0;         // barriers this thread has passed in the current block
  size_t collectives = 0;    // warp-collective calls this thread has made in the current block
  const char* file = nullptr;  // where it waits
  int line = 0;
};

// One warp-collective call, as the first lane of the warp to reach it made it.
struct Collective {
  const char* what;
  const void* pointer;
  unsigned ldm;
  int layout;
};

struct Block {
  std::vector<Fiber> fibers;  // grows to the largest block size seen, then reused
  std::vector<std::vector<Collective>> warps;  // per warp of the running block, its collective calls
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
};
inline Block block;

inline void fiber_main() {
  (*block.body)();
  block.fibers[block.current].done = true;  // uc_link returns to the scheduler
}

inline void report(const char* what) {
  std::fprintf(stderr, "EMU: %s (block (%u, %u, %u), thread %u)\n", what, state.block_idx.x, state.block_idx.y,
               state.block_idx.z, state.thread_idx.x);
}

// Runs `body` as `threads` cooperative threads to completion, checking barrier uniformity.
inline void run_block(unsigned threads, const std::function<void()>& body) {
  if (block.fibers.size() < threads) block.fibers.resize(threads);
  block.body = &body;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.done = false;
    f.barriers = 0;
    f.collectives = 0;
    f.file = nullptr;
    f.line = 0;
    f.open.clear();
    f.committed.clear();
    if (getcontext(&f.context) != 0) fail("getcontext failed");
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  block.warps.assign((threads + 31) / 32, {});
  std::vector<unsigned> order(threads);
  for (;;) {  // one barrier interval per pass
    for (unsigned t = 0; t < threads; ++t) order[t] = t;
    if (state.order == Order::kReversed) std::reverse(order.begin(), order.end());
    if (state.order == Order::kShuffled) std::shuffle(order.begin(), order.end(), state.rng);
    bool live = false;
    for (unsigned t : order) {
      if (block.fibers[t].done) continue;
      live = true;
      block.current = static_cast<int>(t);
      state.thread_idx = uint3(t, 0, 0);
      if (swapcontext(&block.scheduler, &block.fibers[t].context) != 0) fail("swapcontext failed");
    }
    if (!live) break;
    // Every thread has either returned or stopped at a barrier: they must agree.
    const Fiber* first_waiting = nullptr;
    bool some_done = false;
    for (unsigned t = 0; t < threads; ++t) {
      const Fiber& f = block.fibers[t];
      state.thread_idx = uint3(t, 0, 0);
      if (f.done) {
        some_done = true;
        continue;
      }
      if (first_waiting == nullptr) {
        first_waiting = &f;
      } else if (f.barriers != first_waiting->barriers || f.line != first_waiting->line ||
                 std::strcmp(f.file, first_waiting->file) != 0) {
        std::fprintf(stderr, "EMU: %s:%d (barrier %ld) vs %s:%d (barrier %ld)\n", f.file, f.line, f.barriers,
                     first_waiting->file, first_waiting->line, first_waiting->barriers);
        report("threads wait at different __syncthreads");
        std::abort();
      }
    }
    if (some_done && first_waiting != nullptr) {
      std::fprintf(stderr, "EMU: waiting at %s:%d\n", first_waiting->file, first_waiting->line);
      report("some threads returned while others wait at __syncthreads");
      std::abort();
    }
  }
  for (unsigned t = 0; t < threads; ++t) {
    state.thread_idx = uint3(t, 0, 0);
    bool pending = !block.fibers[t].open.empty();
    for (const auto& group : block.fibers[t].committed) pending |= !group.empty();
    if (pending) {
      report("a thread returned with asynchronous copies it never waited for");
      std::abort();
    }
    if (block.fibers[t].collectives != block.warps[t / 32].size()) {
      report("lanes of one warp made different numbers of warp-collective calls");
      std::abort();
    }
  }
  block.body = nullptr;
  block.current = -1;
}

}  // namespace detail

[[noreturn]] inline void fail(const char* what) {
  detail::report(what);
  std::abort();
}

// __syncthreads(): back to the scheduler until every thread of the block has arrived.
inline void sync(const char* file, int line) {
  if (detail::block.current < 0) fail("__syncthreads outside a kernel");
  detail::Fiber& f = detail::block.fibers[detail::block.current];
  ++f.barriers;
  ++state.barriers;
  f.file = file;
  f.line = line;
  if (swapcontext(&f.context, &detail::block.scheduler) != 0) fail("swapcontext failed");
}

// A warp-collective call (WMMA load / store / mma): every lane of the warp must make the same calls,
// in the same order, with the same arguments.
inline void warp_collective(const char* what, const void* pointer, unsigned ldm, int layout) {
  if (detail::block.current < 0) fail("warp-collective call outside a kernel");
  if (state.block_dim.x % 32 != 0) fail("warp-collective call in a block that is not whole warps");
  detail::Fiber& f = detail::block.fibers[detail::block.current];
  std::vector<detail::Collective>& calls = detail::block.warps[state.thread_idx.x / 32];
  const detail::Collective mine{what, pointer, ldm, layout};
  if (f.collectives == calls.size()) {
    calls.push_back(mine);
  } else {
    const detail::Collective& first = calls[f.collectives];
    if (std::strcmp(first.what, what) != 0 || first.pointer != pointer || first.ldm != ldm || first.layout != layout) {
      std::fprintf(stderr, "EMU: warp-collective call %zu: %s(%p, ldm %u, layout %d) vs another lane's %s(%p, ldm %u, layout %d)\n",
                   f.collectives, what, pointer, ldm, layout, first.what, first.pointer, first.ldm, first.layout);
      fail("lanes of one warp disagree on a warp-collective call");
    }
  }
  ++f.collectives;
}

// __pipeline_memcpy_async: the destination is undefined (0xff bytes) until the issuing thread waits.
inline void memcpy_async(void* dst, const void* src, size_t size, size_t zfill) {
  if (detail::block.current < 0) fail("asynchronous copy outside a kernel");
  if (size != 4 && size != 8 && size != 16) fail("__pipeline_memcpy_async: size_and_align must be 4, 8 or 16");
  if (zfill > size) fail("__pipeline_memcpy_async: zfill larger than the copy");
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0) {
    fail("__pipeline_memcpy_async: an address not aligned to the copy size");
  }
  std::memset(dst, 0xff, size);
  ++state.async_copies;
  detail::block.fibers[detail::block.current].open.push_back({dst, src, size - zfill, size});
}

inline void pipeline_commit() {
  if (detail::block.current < 0) fail("__pipeline_commit outside a kernel");
  detail::Fiber& f = detail::block.fibers[detail::block.current];
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}

// Lands every committed group of the calling thread but the newest `prior`.
inline void pipeline_wait_prior(size_t prior) {
  if (detail::block.current < 0) fail("__pipeline_wait_prior outside a kernel");
  detail::Fiber& f = detail::block.fibers[detail::block.current];
  while (f.committed.size() > prior) {
    for (const detail::AsyncCopy& c : f.committed.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset(static_cast<char*>(c.dst) + c.bytes, 0, c.size - c.bytes);
    }
    f.committed.erase(f.committed.begin());
  }
}

// emu::Launch(grid, block, shared_bytes, stream)(kernel, args...): the rewritten kernel<<<...>>>(args...).
struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}

  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, Args... args) const {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.x > 0x7fffffffu ||
        grid.y > 65535 || grid.z > 65535) {
      state.last_error = cudaErrorInvalidConfiguration;
      return;
    }
    if (block.y != 1 || block.z != 1) fail("only 1-D blocks are emulated");
    state.block_dim = block;
    state.grid_dim = grid;
    const std::function<void()> body = [&] { kernel(args...); };  // each thread copies the arguments
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          state.block_idx = uint3(bx, by, bz);
          detail::run_block(block.x, body);
        }
      }
    }
  }
};

}  // namespace emu

#define threadIdx (emu::state.thread_idx)
#define blockIdx (emu::state.block_idx)
#define blockDim (emu::state.block_dim)
#define gridDim (emu::state.grid_dim)
#define __syncthreads() emu::sync(__FILE__, __LINE__)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::state.last_error;
  emu::state.last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::state.last_error; }

// One emulated device whose code counts as compiled for sm_90 (no __CUDA_ARCH__ is defined here, so
// the tensor-core kernels' bodies are compiled in).
struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
};
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  attributes->binaryVersion = 90;
  attributes->ptxVersion = 90;
  return cudaSuccess;
}
