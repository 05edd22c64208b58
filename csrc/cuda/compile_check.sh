#!/usr/bin/env bash
# Compile-only check of the CUDA sources on a machine without a GPU (CI):
#   1. every csrc/cuda/*.cu with nvcc -c for each arch of $STFAST_NVCC_CHECK_ARCH (default "sm_90
#      sm_75": Hopper, and the oldest arch CUDA 13 supports, which lacks bf16 / TF32 WMMA, so that
#      the tensor-core kernels' arch guards are compiled too);
#   2. the torch glue (csrc/cuda/*.cpp) with the host compiler, -fsyntax-only, against torch's
#      headers and the CUDA runtime headers (a CPU build of torch lacks c10's generated
#      cuda_cmake_macros.h: an empty stand-in is supplied).
# Objects go to a temporary folder that is removed afterwards. Exit status: non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nvcc >/dev/null 2>&1; then
    echo "compile_check: nvcc not found, CUDA sources not compiled"
    exit 0
fi
archs="${STFAST_NVCC_CHECK_ARCH:-sm_90 sm_75}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for arch in $archs; do
    for source in csrc/cuda/*.cu; do
        echo "compile_check: nvcc -c -arch=$arch $source"
        nvcc -c -std=c++17 -O1 -arch="$arch" -DSTFAST_WITH_CUDA -Icsrc "$source" -o "$tmp/$(basename "$source" .cu).o"
    done
done
cuda_include=""
for home in "${CUDA_HOME:-}" "$(python -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")')" \
            "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    if [ -n "$home" ] && [ -f "$home/include/cuda_runtime_api.h" ]; then
        cuda_include="$home/include"
        break
    fi
done
if [ -z "$cuda_include" ]; then
    echo "compile_check: cuda_runtime_api.h not found (set CUDA_HOME)"
    exit 1
fi
mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#pragma once" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_includes="$(python -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem " + p for p in include_paths()))')"
for source in csrc/cuda/*.cpp; do
    echo "compile_check: ${CXX:-c++} -fsyntax-only $source"
    # shellcheck disable=SC2086
    "${CXX:-c++}" -std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -DSTFAST_WITH_CUDA \
        -I"$tmp/stub" $torch_includes -isystem "$cuda_include" -Icsrc "$source"
done
echo "compile_check: CUDA sources OK"
