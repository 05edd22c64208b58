"""Helpers shared by the Triton launchers in ``stfast.kernels``.

Pure Python on purpose: importing this module never imports Triton, so it can be used by code
that only wants to ask questions (is a kernel interpreted? which block size?).
"""

from __future__ import annotations

import torch

__all__ = ["block_size", "check_launchable", "dot_precision", "is_interpreted"]


def block_size(extent: int, low: int = 16, high: int = 64) -> int:
    """The power of two covering ``extent``, clamped to ``[low, high]``.

    ``low`` is 16 because every ``tl.dot`` dimension must be at least 16 on real GPUs; tiles
    larger than the extent are masked.
    """
    size = 1
    while size < extent:
        size *= 2
    return max(low, min(high, size))


def is_interpreted(kernel) -> bool:
    """Whether a ``@triton.jit`` kernel was decorated under ``TRITON_INTERPRET=1``.

    Triton decides at decoration time (when the kernel module is imported), so this is a property
    of the kernel object, not of the current environment.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error instead of a crash inside Triton when ``kernel`` cannot take ``tensors``."""
    interpreted = is_interpreted(kernel)
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpreted:
            raise RuntimeError(
                "the triton backend got CPU tensors, but its kernels were compiled for a GPU: CPU "
                "tensors need the Triton interpreter, i.e. TRITON_INTERPRET=1 set before "
                "stfast.kernels is first imported (tests only)"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"the triton backend needs CUDA tensors, got a {t.device.type} tensor")


def dot_precision(dtype: torch.dtype, interpreted: bool, requested: str | None = None) -> str:
    """The ``input_precision`` of every ``tl.dot`` for inputs of ``dtype``.

    fp32: ``"ieee"`` unless the caller asks otherwise or the user opted into TF32 with
    ``torch.set_float32_matmul_precision("high" | "medium")`` (the standard PyTorch switch); the
    interpreter always uses ``"ieee"``. bf16/fp16: the value is ignored by Triton (half inputs go to
    the tensor cores with fp32 accumulation); Triton's default ``"tf32"`` is passed.
    """
    if requested is not None:
        if requested not in ("ieee", "tf32"):
            raise ValueError(f"input_precision: expected None, 'ieee' or 'tf32', got {requested!r}")
        return "ieee" if interpreted else requested
    if dtype != torch.float32:
        return "tf32"
    if interpreted:
        return "ieee"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"
