"""Helpers shared by the Triton launchers in ``stfast.kernels``.

Pure Python on purpose: importing this module never imports Triton, so it can be used by code
that only wants to ask questions (is a kernel interpreted? which block size?).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

__all__ = ["GRID_LIMITS", "Launch", "block_size", "check_launchable", "device_of", "dot_precision", "is_interpreted",
           "recording_launches"]

# CUDA's grid limits per axis (x, y, z), the same on every arch Triton targets.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher makes it: the ``@triton.jit`` function's name in its module, the
    grid, the constexprs and the compile options.

    Each kernel module computes its launches with pure functions of the shapes and flags
    (``node_lora.forward_launch`` ...), which the launchers and the compile gate
    (``bench/compile_gate.py``, ``tests/test_compile_gate.py``) both call: one source of truth for
    what runs on a GPU and what the gate compiles.
    """

    kernel: str
    grid: tuple[int, ...]
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for axis, (extent, limit) in enumerate(zip(self.grid, GRID_LIMITS)):
            if extent > limit:
                raise ValueError(f"{self.kernel}: grid axis {axis} has {extent} programs, above CUDA's limit "
                                 f"of {limit}")

    @property
    def options(self) -> dict:
        """The keyword arguments of the launch: constexprs, ``num_warps`` and ``num_stages``."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __call__(self, module, *args) -> None:
        """Launch ``module.<kernel>`` with ``args`` on this grid (or record it: ``recording_launches``)."""
        if _recorded is not None:
            _recorded.append((self, module, args))
            return
        getattr(module, self.kernel)[self.grid](*args, **self.options)


_recorded: list | None = None


@contextlib.contextmanager
def recording_launches():
    """Inside the block, launches are recorded as ``(launch, module, args)`` in the yielded list
    instead of run, and the launchers accept tensors on the ``meta`` device: the compile gate runs
    the real launchers this way to learn every launch and its exact arguments without a GPU."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def block_size(extent: int, low: int = 16, high: int = 64) -> int:
    """The power of two covering ``extent``, clamped to ``[low, high]``.

    ``low`` is 16 because every ``tl.dot`` dimension must be at least 16 on real GPUs; tiles
    larger than the extent are masked.
    """
    size = 1
    while size < extent:
        size *= 2
    return max(low, min(high, size))


def device_of(tensor: torch.Tensor):
    """A context in which a launch runs on ``tensor``'s GPU: Triton launches on the current CUDA
    device, which on a multi-GPU host need not be the tensors' one."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


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
        if t is None or (t.device.type == "meta" and _recorded is not None):
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

    fp32: ``"ieee"`` unless the caller asks otherwise or the user opted into TF32 through either of
    PyTorch's switches (``torch.set_float32_matmul_precision("high" | "medium")``, or the newer
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``: ``stfast.ops.backends.tf32_matmul_allowed``);
    the interpreter always uses ``"ieee"``. bf16/fp16: the value is ignored by Triton (half inputs go to
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
    from stfast.ops.backends import tf32_matmul_allowed  # either of torch's precision APIs

    return "tf32" if tf32_matmul_allowed() else "ieee"
