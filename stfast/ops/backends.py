"""Backend registry and selection shared by every op family.

A backend is a name plus, per op, an implementation function registered with
:func:`register_impl`. Adding a backend for an op is one ``register_impl`` call; adding a new
backend also needs its environment probe in ``_PROBES``.

Selection order: an explicit :func:`set_backend` / :func:`use_backend` choice, else the
``STFAST_BACKEND`` environment variable (read whenever no explicit choice is active, so it can be
changed at run time), else ``"auto"``. ``"auto"`` picks, on CPU, the first available backend in
``_AUTO_PREFERENCE``; on a CUDA device, the measured winner for the op and dtype on a device of that
name (``stfast/ops/_auto_table.py``, written by ``bench/auto_table.py`` on a GPU), else ``torch``.
A forced backend that cannot run raises when an op is called, with a message giving every backend
and why it can or cannot run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "available_backends",
    "current_backend",
    "register_impl",
    "resolve_backend",
    "set_backend",
    "tf32_matmul_allowed",
    "use_backend",
    "lookup_impl",
    "implementation",
]

BACKENDS = ("torch", "triton", "cuda", "cpu")
ENV_VAR = "STFAST_BACKEND"
_CHOICES = ("auto",) + BACKENDS

# Fastest first; "auto" takes the first one that can run the op on the device.
# CPU: "cpu" (C++ extension) before "torch", measured with `python bench/ext_ops.py` (meta_gconv,
# METR-LA decoder shape B=16 N=207 C=67 K=2 D=16 O=128, per-sample supports, AMD EPYC, 2 shared
# threads, fp32, median [min] of 21 round-robin rounds, ms; a shared machine, so noisy: an earlier,
# more loaded run gave the same ordering):
#   axis  forward: torch / cpu          forward+backward: torch / cpu
#   S      4.0 [3.4]  /  3.4 [3.0]       22.4 [15.8] / 15.5 [13.0]
#   T      2.1 [2.0]  /  1.9 [1.8]        8.7 [8.3]  /  8.5 [7.9]   (about a tie: same GEMMs)
#   ST    13.7 [13.0] / 12.1 [11.8]      65.6 [56.2] / 40.3 [37.9]
# cpu is never slower, faster for S and ST.
# node_lora (`python bench/node_lora_op.py`, round-robin, median of 11, fp32, leaky_relu, r = 16;
# bench/results/cpu-amd-epyc-2-threads/node_lora_op_float32.md), torch / cpu ms:
#   (B, N, d_in, d_out)   forward          forward+backward
#   (64, 883, 64, 64)     9.2 / 8.3        31.2 / 25.7
#   (64, 883, 128, 128)   20.3 / 18.8      72.9 / 74.2   (a tie; 68.6 / 57.5 in an earlier run)
#   (64, 883, 256, 256)   87.7 / 69.9      261.5 / 187.0
#   (64, 207, 32, 32)     0.76 / 0.56      2.71 / 2.11
#   (64, 207, 64, 64)     1.79 / 1.41      5.78 / 4.84
# cpu is faster or tied everywhere (1.08-1.37x forward, 0.98-1.40x forward+backward). gconv has no
# cpu kernel and falls back to torch.
# CUDA: the measured winner of _auto_table.WINNERS for the device's name, op and dtype (see
# _auto_winner), else "torch": a kernel backend is chosen only where a GPU session measured it faster
# on that device. The order below is the fallback when the winner cannot run there.
_AUTO_PREFERENCE = {
    "cuda": ("torch", "triton", "cuda"),
    "cpu": ("cpu", "torch"),
}

_IMPLS: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS}
_explicit_choice: str | None = None


def register_impl(backend: str, op: str, fn: Callable) -> Callable:
    """Make ``fn`` the ``backend`` implementation of ``op`` (e.g. ``"meta_gconv"``)."""
    _check_name(backend, allow_auto=False)
    _IMPLS[backend][op] = fn
    return fn


def _check_name(name, *, allow_auto: bool = True) -> str:
    valid = _CHOICES if allow_auto else BACKENDS
    if not isinstance(name, str) or name.lower() not in valid:
        raise ValueError(f"backend: expected one of {', '.join(valid)}, got {name!r}")
    return name.lower()


def _probe_torch(device: torch.device) -> bool | str:
    return True


def _probe_triton(device: torch.device) -> bool | str:
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not importable")
    # CPU tensors run only under the Triton interpreter, for tests; "auto" never picks triton on CPU.
    interpreted_cpu = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted_cpu:
        reasons.append(f"needs a CUDA device (or CPU tensors under TRITON_INTERPRET=1, tests only), got {device.type}")
    return "; ".join(reasons) or True


def _extension_status(kind: str) -> bool | str:
    """The C++/CUDA extension's verdict for ``kind`` ("cpu" or "cuda"); loads, or just-in-time
    builds, the extension on the first call only (see ``stfast/ops/_ext.py``)."""
    try:
        from . import _ext
    except ImportError as err:  # pragma: no cover - a broken installation
        return f"the stfast extension loader could not be imported ({err})"
    return _ext.status(kind)


def _probe_cuda(device: torch.device) -> bool | str:
    if device.type != "cuda":
        reason = f"needs a CUDA device, got {device.type}"
        return reason if torch.version.cuda is not None else reason + " (and torch is a CPU-only build)"
    return _extension_status("cuda")


def _probe_cpu(device: torch.device) -> bool | str:
    if device.type != "cpu":
        return f"needs a CPU tensor, got {device.type}"
    return _extension_status("cpu")


_PROBES = {"torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda, "cpu": _probe_cpu}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _availability(name: str, device: torch.device, op: str | None) -> bool | str:
    reasons = []
    if op is not None and op not in _IMPLS[name]:
        reasons.append(f"no {op} kernel yet")
    elif op is None and not _IMPLS[name]:
        reasons.append("no kernels yet")
    probe = _PROBES[name](device)
    if probe is not True:
        reasons.append(probe)
    return "; ".join(reasons) or True


def available_backends(device=None, op: str | None = None) -> dict[str, bool | str]:
    """``{name: True | "why it cannot run"}`` for every backend, on ``device`` (default: CUDA if
    present, else CPU) and, if given, for the op named ``op``."""
    device = torch.device(device) if device is not None else _default_device()
    return {name: _availability(name, device, op) for name in BACKENDS}


def current_backend() -> str:
    """The selected backend name (``"auto"`` or a forced one), not yet resolved for a device."""
    if _explicit_choice is not None:
        return _explicit_choice
    from_env = os.environ.get(ENV_VAR, "").strip()
    if not from_env:
        return "auto"
    try:
        return _check_name(from_env)
    except ValueError as err:
        raise ValueError(f"{ENV_VAR}: {err}") from None


def set_backend(name: str | None) -> None:
    """Force a backend (``"auto"`` to choose per device); ``None`` clears the explicit choice so
    that ``STFAST_BACKEND`` (or ``"auto"``) applies again."""
    global _explicit_choice
    _explicit_choice = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ``with`` block with backend ``name``, restoring the previous choice afterwards."""
    global _explicit_choice
    previous = _explicit_choice
    set_backend(name)
    try:
        yield
    finally:
        _explicit_choice = previous


def tf32_matmul_allowed() -> bool:
    """Whether fp32 matmuls may run as TF32, as the user set it through either of PyTorch's APIs.

    The new API (``torch.backends.cuda.matmul.fp32_precision = "tf32" | "ieee"``, torch >= 2.9) is
    read first: once it is set, the legacy getter ``torch.get_float32_matmul_precision()`` raises
    ("mix of the legacy and new APIs"). Its ``"none"`` defers to ``torch.backends.fp32_precision``,
    then to the legacy setting (``torch.set_float32_matmul_precision("high" | "medium")`` or
    ``torch.backends.cuda.matmul.allow_tf32``, which the new attribute reflects).
    """
    for owner in (torch.backends.cuda.matmul, torch.backends):
        value = getattr(owner, "fp32_precision", None)
        if value is not None and value != "none":
            return value == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # a mixed state the attributes above did not resolve: IEEE, the safe side
        return False


def _auto_winner(op: str, device: torch.device, dtype) -> str | None:
    """The measured winner of ``op`` for ``dtype`` on a CUDA device of this name, or None."""
    from ._auto_table import WINNERS

    if not WINNERS or device.type != "cuda":
        return None
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    dtype_name = str(dtype if dtype is not None else torch.float32).removeprefix("torch.")
    return WINNERS.get(name, {}).get(f"{op}/{dtype_name}")


_DEVICE_NAMES: dict[int, str] = {}


def _device_name(index: int) -> str:
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


# Traced by torch.compile as a constant (as _ext.status): no device query inside a graph.
_auto_winner._dynamo_marked_constant = True


def _describe(status: dict[str, bool | str]) -> str:
    return "; ".join(f"{name}: {'available' if ok is True else ok}" for name, ok in status.items())


def resolve_backend(op: str, device, dtype=None) -> str:
    """The concrete backend that will run ``op`` on ``device`` (inputs of ``dtype``, default fp32)
    under the current selection."""
    device = torch.device(device)
    status = available_backends(device, op)
    choice = current_backend()
    if choice != "auto":
        if status[choice] is not True:
            raise RuntimeError(
                f"backend {choice!r} cannot run {op} on {device.type}: {status[choice]}. "
                f"All backends: {_describe(status)}"
            )
        return choice
    winner = _auto_winner(op, device, dtype)
    if winner is not None and status.get(winner) is True:
        return winner
    for name in _AUTO_PREFERENCE.get(device.type, ("torch",)):
        if status[name] is True:
            return name
    raise RuntimeError(f"no backend can run {op} on {device.type}. All backends: {_describe(status)}")


def lookup_impl(op: str, device, dtype=None) -> Callable:
    """The implementation of ``op`` for ``device`` (and ``dtype``) under the current selection."""
    return _IMPLS[resolve_backend(op, device, dtype)][op]


def implementation(backend: str, op: str, device) -> Callable:
    """``backend``'s implementation of ``op`` (a backend resolved earlier, e.g. by the forward whose
    backward this is), after checking that it can still run on ``device``."""
    status = _availability(backend, torch.device(device), op)
    if status is not True:
        raise RuntimeError(f"backend {backend!r} cannot run {op} on {torch.device(device).type}: {status}")
    return _IMPLS[backend][op]
