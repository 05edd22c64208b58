"""Helpers shared by the Triton launchers in ``stfast.kernels``.

Pure Python on purpose: importing this module never imports Triton, so it can be used by code
that only wants to ask questions (is a kernel interpreted? which block size?).

Tuning (issue 18): a kernel module offers, per kernel, a small set of candidate launches for the
shapes, and picks one with ``choose``; nothing is timed at run time, so the choice is deterministic
and a CUDA graph can capture it::

    def forward_candidates(rows, ...) -> list[Launch]:   # pure; [0] is the heuristic default
        ...

    def forward_launch(rows, ..., device=None) -> Launch:
        key = ("fwd", bucket(rows), ..., input_precision)    # coarse: the table stays small
        return choose(forward_candidates(rows, ...), key, device)

``choose`` returns the candidate whose ``Launch.config`` (block constexprs, warps, stages) the
committed table ``stfast.kernels._tuned.TUNED`` names for ``(device name, kernel, key)``, else the
first candidate. ``bench/tune_triton.py`` measures the candidates on a GPU and writes that table;
it and the compile gate (which compiles every candidate) enumerate them through
``recording_choices`` and run a given candidate through ``forcing_configs``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

__all__ = ["GRID_LIMITS", "Launch", "block_size", "bucket", "check_launchable", "choose", "device_name", "device_of",
           "distinct_configs", "dot_precision", "forcing_configs", "is_interpreted", "recording_choices", "recording_launches"]

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
    def config(self) -> str:
        """What tuning chooses among, as the table stores it: the block-size constexprs (``BLOCK_*``),
        ``num_warps`` and ``num_stages``; e.g. ``"BLOCK_M=64 BLOCK_O=128 warps=8 stages=3"``."""
        blocks = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} warps={self.num_warps} stages={self.num_stages}".strip()

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


# ---------------------------------------------------------------- tuning: candidates and the choice

@dataclass(frozen=True)
class Choice:
    """One tuning decision as ``recording_choices`` records it."""

    kernel: str
    key: tuple
    candidates: tuple
    chosen: Launch


_choices: list | None = None
_forced: dict | None = None


@contextlib.contextmanager
def recording_choices():
    """Inside the block, every ``choose`` call is recorded as a ``Choice`` in the yielded list (the
    compile gate and the tuner learn each kernel's candidates and keys from the real launchers)."""
    global _choices
    previous, _choices = _choices, []
    try:
        yield _choices
    finally:
        _choices = previous


@contextlib.contextmanager
def forcing_configs(configs: dict):
    """Inside the block, ``choose`` returns the candidate whose ``config`` is ``configs[kernel]`` when
    there is one (else the default as usual): the tuner and the compile gate run one candidate."""
    global _forced
    previous, _forced = _forced, dict(configs)
    try:
        yield
    finally:
        _forced = previous


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device) -> str | None:
    """The name under which the tuned table keys a CUDA device (``torch.cuda.get_device_name``);
    ``None`` for anything else (CPU under the interpreter, ``meta`` in the compile gate)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


def _tuned_table() -> dict:
    from . import _tuned

    return _tuned.TUNED


def choose(candidates, key: tuple, device=None) -> Launch:
    """The launch to run among ``candidates`` (all of one kernel; ``candidates[0]`` the default) for the
    tuning ``key`` on ``device``: the measured winner in ``stfast.kernels._tuned.TUNED`` keyed by
    ``(device name, kernel, key)`` if it is a candidate here, else the default. Pure given the table:
    nothing is timed or synchronised."""
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("choose: no candidate launches")
    kernel = candidates[0].kernel
    wanted = None
    if _forced is not None and kernel in _forced:
        wanted = _forced[kernel]
    else:
        name = device_name(device)
        if name is not None:
            wanted = _tuned_table().get((name, kernel, tuple(key)))
    chosen = next((c for c in candidates if c.config == wanted), candidates[0])
    if _choices is not None:
        _choices.append(Choice(kernel, tuple(key), candidates, chosen))
    return chosen


def bucket(extent: int) -> int:
    """The power of two at or above ``extent`` (0 for 0): coarse tuning keys, so that one measured
    winner serves every shape of its bucket and the table stays small."""
    return 0 if extent <= 0 else 1 << (int(extent) - 1).bit_length()


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


def distinct_configs(launches) -> list[Launch]:
    """``launches`` without repeated configurations (tiles shrunk to a small problem can coincide), in order."""
    seen, out = set(), []
    for launch in launches:
        if launch.config not in seen:
            seen.add(launch.config)
            out.append(launch)
    return out
