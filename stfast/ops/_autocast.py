"""``torch.autocast`` behaviour of stfast's custom ops.

Inside ``with torch.autocast(device_type, dtype):`` the forward ops (``stfast::meta_gconv``,
``stfast::gconv``, ``stfast::node_lora``) cast their floating-point tensor inputs (not float64,
as torch's own autocast leaves double alone) to the autocast dtype, run with autocast disabled and
so return that dtype; every backend accumulates in fp32 (the C++/CUDA kernels in an fp32 working
type, Triton's ``tl.dot`` and PyTorch's half-precision GEMMs with fp32 accumulators). The casts are
recorded by autograd, so fp32 parameters receive fp32 gradients, and the backward ops see the
forward's half-precision tensors (they need no autocast rule of their own).

This is what ``torch.library.register_autocast`` does, except that the target dtype is read from
the active autocast region (bf16 or fp16) instead of being fixed at registration.

A backend that cannot compute the autocast dtype correctly is refused with a clear error before any
cast, by the same rule as direct calls (``_support.check_dtype``).
"""

from __future__ import annotations

import torch

from ._support import check_dtype

__all__ = ["AUTOCAST_OPS", "autocast_inputs", "register_autocast_rules"]

AUTOCAST_OPS = ("meta_gconv", "gconv", "node_lora")
_DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}

_lib = torch.library.Library("stfast", "FRAGMENT")


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def autocast_inputs(*tensors):
    """``tensors`` as the op will see them: cast to the autocast dtype inside an autocast region of
    the first tensor's device type, unchanged otherwise (or when the first is no tensor: the input
    checks then say what is wrong). The public wrappers validate these, since an autocast region
    legitimately hands an op a mix of fp32 and bf16 tensors."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in _DEVICE_KEYS:
        return tensors
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(_cast(t, dtype) for t in tensors)


def _autocast_kernel(op_name: str, device_type: str):
    dispatch_key = getattr(torch._C.DispatchKey, _DEVICE_KEYS[device_type])
    op = getattr(torch.ops.stfast, op_name).default

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        check_dtype(args[-1], op_name, dtype, args[0].device)  # the backend is every op's last argument
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return op(*(_cast(arg, dtype) for arg in args))

    return kernel


def register_autocast_rules() -> None:
    """Register the rule for every op of ``AUTOCAST_OPS`` (once, from ``stfast.ops``, after the ops
    are defined)."""
    for op_name in AUTOCAST_OPS:
        for device_type, key in _DEVICE_KEYS.items():
            _lib.impl(op_name, _autocast_kernel(op_name, device_type), key, with_keyset=True)

