// Stand-in for CUDA's <cuda_pipeline.h> (the cp.async primitives) in the CPU emulation of the kernels:
// see ../emu_cuda.h for how the copies are modelled (undefined until the issuing thread waits) and
// what that can and cannot catch.
#pragma once

#include <cstddef>

#include "../emu_cuda.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  emu::memcpy_async(dst_shared, src_global, size_and_align, zfill);
}
inline void __pipeline_commit() { emu::pipeline_commit(); }
inline void __pipeline_wait_prior(size_t prior) { emu::pipeline_wait_prior(prior); }
