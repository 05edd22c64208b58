"""Input validation with messages that name the argument, the expected and the actual value."""

from __future__ import annotations

import torch

__all__ = ["check_tensor", "check_same_device_dtype"]


def _format_shape(spec) -> str:
    return "(" + ", ".join(str(s) for s in spec) + ")"


def check_tensor(name: str, t, spec=None, *, dtype=None, floating: bool = False, device=None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``t`` is a tensor matching ``spec``.

    ``spec`` is a tuple whose entries are ints (that exact size) or strings (a named free size,
    shown in the message), e.g. ``("B", "T_in", 207, 3)``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if spec is not None:
        matches = t.dim() == len(spec) and all(
            isinstance(s, str) or size == s for size, s in zip(t.shape, spec)
        )
        if not matches:
            raise ValueError(f"{name}: expected shape {_format_shape(spec)}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {torch.device(device)}, got {t.device}")


def check_same_device_dtype(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` has ``reference``'s dtype and device (no silent casts)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != reference.dtype:
            raise TypeError(f"{name}: expected dtype {reference.dtype} (the dtype of {reference_name}), got {t.dtype}")
        if t.device != reference.device:
            raise ValueError(f"{name}: expected device {reference.device} (the device of {reference_name}), got {t.device}")
