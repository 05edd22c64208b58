// Stand-in for CUDA's <cuda_runtime_api.h> in the CPU emulation of the kernels: see ../emu_cuda.h.
#pragma once
#include "../emu_cuda.h"
