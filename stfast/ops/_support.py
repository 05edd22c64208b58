"""What a backend's kernels take, beyond the checks every op makes: dtypes, and zero-sized problems.

- Dtypes (:func:`check_dtype`, the one place that decides, for direct calls and under autocast alike):
  every backend computes float32, float16 and bfloat16 (fp32 accumulation). float64 is computed in
  float64 by ``torch``, ``cpu`` and ``cuda``; the ``triton`` kernels accumulate in fp32 and keep fp32
  partial buffers, so they refuse it rather than return fp32-accurate (or, before this check,
  uninitialised) results under a float64 dtype. The triton backend also refuses bfloat16 where its
  ``tl.dot`` cannot compute it: on CPU tensors (the Triton interpreter's bf16 products are wrong) and
  on GPUs below compute capability 8.0.
- Double backward (a gradient of a gradient) is not supported: the backward ops' own autograd
  formula says so instead of torch's generic "no autograd formula was registered".
- A problem with a zero-sized dimension (an empty batch, no nodes, channels, embedding dimensions or
  outputs) has an empty, zero or bias-only result that is the same for every backend; it runs on the
  ``torch`` formulation, so no kernel needs a path (or a launch) for it.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import backends

__all__ = ["check_dtype", "kernel", "refuse_double_backward", "DTYPES"]

_ALL = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPES = {"torch": _ALL, "cpu": _ALL, "cuda": _ALL, "triton": (torch.float32, torch.float16, torch.bfloat16)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtype(backend: str, op: str, dtype: torch.dtype, device: torch.device | None = None) -> None:
    """``TypeError`` naming the dtype and the backends that compute it, if ``backend`` does not compute
    ``dtype`` correctly (on ``device``, when given)."""
    if dtype not in DTYPES.get(backend, _ALL):
        able = ", ".join(name for name, dtypes in DTYPES.items() if dtype in dtypes)
        raise TypeError(
            f"{op}: backend {backend!r} does not compute {_name(dtype)} (it takes "
            f"{', '.join(_name(d) for d in DTYPES[backend])}); backends that compute {_name(dtype)}: {able}"
        )
    if backend == "triton" and dtype == torch.bfloat16 and device is not None:
        _check_triton_bf16(op, torch.device(device))


def _check_triton_bf16(op: str, device: torch.device) -> None:
    if device.type == "cpu":
        raise TypeError(f"{op}: the triton backend cannot compute torch.bfloat16 on CPU tensors (the "
                        "Triton interpreter's bf16 tl.dot is wrong); use the cpu or torch backend, or fp32 / fp16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise TypeError(f"{op}: the triton backend needs compute capability >= 8.0 for bfloat16, got "
                        f"{major}.{minor}; use fp16 or the torch backend")


def kernel(backend: str, op: str, device, dtype: torch.dtype, *, empty: bool) -> Callable:
    """The implementation of ``op`` to run: ``backend``'s, or ``torch``'s when the problem has a
    zero-sized dimension (``empty``)."""
    check_dtype(backend, op, dtype, device)
    return backends.implementation("torch" if empty else backend, op, device)


def refuse_double_backward(op: str) -> Callable:
    """An autograd formula for ``op``'s backward op that refuses, naming what is not supported."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward is not supported (a gradient of its gradient, e.g. torch.autograd.grad("
            "..., create_graph=True) followed by a backward through that gradient, as gradient penalties do)"
        )

    return backward
