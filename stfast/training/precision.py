"""Training precision: ``fp32``, ``tf32``, ``bf16`` or ``fp16``, the way GPU users train.

- ``fp32``: everything in float32, PyTorch's default matmul precision ("highest").
- ``tf32``: float32 tensors, matmuls (and stfast's kernels, which follow the same switch) on TF32
  tensor cores: ``torch.set_float32_matmul_precision("high")`` for the run. CUDA only: TF32 is a
  tensor-core format; on a CPU it would silently mean something else, so it is refused.
- ``bf16`` / ``fp16``: parameters and optimiser state stay float32; forward and loss run under
  ``torch.autocast`` (stfast's ops cast to the autocast dtype and accumulate in fp32, see
  :mod:`stfast.ops._autocast`); ``fp16`` adds a dynamic gradient scaler (its range is too narrow
  for small gradients), ``bf16`` has float32's range and needs none.

The name is what checkpoints and reports record (a plain string).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One of :data:`PRECISIONS` on one device: the autocast region, the matmul precision and the
    gradient scaler a training step needs."""

    def __init__(self, name: str = "fp32", device="cpu"):
        if name not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {name!r}")
        self.name = name
        self.device = torch.device(device)
        if name == "tf32" and self.device.type != "cuda":
            raise ValueError(f"precision: tf32 is a CUDA tensor-core format, got device {self.device.type}; "
                             "use fp32 or bf16 there")
        if name == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported(
                including_emulation=False):
            raise ValueError("precision: bf16 needs a GPU of compute capability >= 8.0; use fp16 or tf32")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES.get(self.name)

    def autocast(self):
        """The region a forward and its loss run in (a no-op for fp32 / tf32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def matmul_precision(self):
        """``tf32``: float32 matmuls on TF32 tensor cores inside the block; the previous setting
        is restored after it."""
        previous = torch.get_float32_matmul_precision()
        if self.name == "tf32":
            torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)

    def grad_scaler(self):
        """A dynamic loss scaler for ``fp16``, else None."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, device={str(self.device)!r})"
