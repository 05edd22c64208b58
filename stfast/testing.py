"""Check stfast's fast paths against the plain PyTorch they replace: modules and ops.

Public API:

- :func:`compare_modules` runs a candidate module (e.g. the fused :class:`stfast.nn.HimNet`) and
  a reference module (e.g. :class:`stfast.reference.HimNet`) on the same inputs with the same
  weights and seed, forward and backward, and returns a :class:`Report`: one row per output, per
  parameter gradient and per input gradient, with the largest absolute and relative error, the
  tolerance used and pass/fail. ``print(report)`` shows an aligned table, ``report.to_dict()``
  gives JSON-ready data. :func:`assert_close_to_reference` raises ``AssertionError`` carrying the
  table when a row fails.
- :func:`compare_op` does the same for one op (``"meta_gconv"``, ``"gconv"``, ...) on one backend
  against the op's pure-PyTorch definition (:func:`reference_meta_gconv`, :func:`reference_gconv`,
  :func:`reference_node_lora`).
  Ops are looked up in :data:`OP_CASES`; :func:`register_op_case` adds one (an :class:`OpCase`:
  how to build inputs from a shape spec, the reference function, the op function, a sweep grid).

How errors are measured
-----------------------
For ops, the oracle (the op's definition) runs in float64 on the candidate's inputs *after* they
were rounded to the candidate's dtype, so what is left is the candidate's own arithmetic error,
not the rounding of its inputs. For modules, the reference runs by default in the candidate's
precision on the same rounded weights and inputs (a float64 reference is an option, see
:func:`compare_modules` for why it is not the default there). For one tensor with candidate
values ``c`` and oracle values ``r`` (non-finite entries must agree and are then left out):

- ``max abs err = max |c - r|``;
- ``max rel err = max |c - r| / max |r|`` -- relative to the tensor's own scale, not per element:
  gradients are full of entries near zero, where an element-wise ratio means nothing;
- the row passes when ``max |c - r| <= atol + rtol * max |r|``, i.e. ``max rel err <= rtol`` up to
  the absolute floor ``atol`` that only matters for tensors that are (nearly) all zeros.

Gradients are those of ``sum_k <output_k, g_k>`` with fixed random directions ``g_k`` (seeded,
drawn once and rounded to the candidate's dtype, so both sides get the same values).

Default tolerances (:data:`DEFAULT_TOLERANCES`)
-----------------------------------------------
=========  ========  ========  =================================================================
precision  rtol      atol      basis
=========  ========  ========  =================================================================
fp64       1e-10     1e-12     u = 2^-53 = 1.1e-16; reordered sums differ by ~sqrt(K) u ~ 1e-14
fp32       1e-4      1e-6      u = 2^-24 = 6.0e-8; K u = 1.3e-4 for K = 2144 (METR-LA D*K*C)
tf32       1e-2      1e-4      products of inputs rounded to 10 bits, u = 2^-11 = 4.9e-4 each
bf16       5e-2      1e-3      u = 2^-8 = 3.9e-3 per stored tensor, several roundings chained
fp16       1e-2      1e-4      u = 2^-11 = 4.9e-4 per stored tensor, several roundings chained
=========  ========  ========  =================================================================

How they were chosen. The kernels accumulate in fp32 (fp64 for the torch backend in fp64), so
in a dot product of length K the accumulation adds at most ~K u_acc (worst case, all rounding
errors of one sign) and typically ~sqrt(K) u_acc (independent rounding errors). The longest
reduction in HimNet's ops is K = D * cheb_k * C = 16 * 2 * 67 = 2144 (METR-LA; 2772 for PEMS08),
so sqrt(K) ~ 50. In fp32 that gives ~3e-6 typical and 1.3e-4 worst case; ``rtol`` is the worst
case, rounded to 1e-4 -- also the project's fp32 target ("within 1e-4 relative"). Measured on CPU
with this module's metric: the default op sweep (torch and cpu backends, every op, the six
datasets' sizes) stays below 1.7e-6 against the float64 oracle; the whole fused HimNet at METR-LA
size (24 recurrent steps, every parameter gradient, eval and teacher-forced training) below 2.5e-6
against a float64 reference and below 5e-6 against the float32 reference. So the fp32 row has a
margin of 20x or more, while any real bug (a wrong index, a missing term, a gradient off by 1 %)
shows up at 1e-2 and above. In TF32, bf16 and fp16 the error is dominated by rounding the *inputs
of each product* (tf32: 10-bit mantissa) or *every stored intermediate* (bf16, fp16: the Chebyshev
features, the outputs, the incoming gradient, ...): a handful of roundings of u each, i.e. a few u
in the worst element but relative to that tensor's max, which gives about 20 u (tf32, fp16: 1e-2)
and 13 u (bf16: 5e-2) with margin. Measured on CPU (torch backend, small shapes, float64 oracle)
bf16 ops stay near 1.3 u (5e-3, err/tol <= 0.1) and fp16 ops near 1-2 u (err/tol <= 0.11 under
the Triton interpreter). ``atol = rtol / 100`` is the floor for tensors whose reference is all
zeros (inputs are O(1), so O(1) is the natural unit).

The fp32 row is measured on CPU. **The tf32, bf16 and fp16 rows (and fp32 on GPUs) are
provisional until measured on a GPU**: they follow from the reasoning above and agree with the
interpreter's fp16 check of the Triton kernels (< 5e-3), but no GPU run has confirmed them yet.
:data:`BACKEND_TOLERANCES` holds per-backend overrides of this table (none is needed so far: every
backend accumulates in fp32 or better).

Module comparisons in bf16/fp16 run the reference in that precision too (see above), so both
sides carry rounding error and a 24-step recurrence compounds it: treat those rows as provisional
in the same way, and prefer fp32 (or ``reference_dtype=torch.float64`` for modules that do not
derive indices from floats) for a strict check.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = [
    "BACKEND_TOLERANCES",
    "DEFAULT_TOLERANCES",
    "OP_CASES",
    "PRECISIONS",
    "Check",
    "OpCase",
    "Report",
    "Tolerance",
    "assert_close_to_reference",
    "compare_modules",
    "compare_op",
    "compare_tensors",
    "default_tolerance",
    "op_case",
    "parse_precision",
    "precision_name",
    "reference_gconv",
    "reference_meta_gconv",
    "reference_node_lora",
    "register_op_case",
    "resolve_spec",
    "state_dict_differences",
    "unsupported_reason",
]


# ---------------------------------------------------------------- precisions and tolerances

# name -> (storage dtype, TF32 matmuls)
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "fp64": (torch.float64, False),
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
_ALIASES = {
    "fp64": "fp64", "float64": "fp64", "double": "fp64", "f64": "fp64",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32", "ieee": "fp32",
    "tf32": "tf32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
}


def parse_precision(value) -> str:
    """The precision name (``fp64``, ``fp32``, ``tf32``, ``bf16``, ``fp16``) for a name, an alias
    (``float32``, ``half``, ``bfloat16``, ...) or a floating ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        for name, (dtype, tf32) in PRECISIONS.items():
            if dtype == value and not tf32:
                return name
        raise ValueError(f"dtype: expected one of float64, float32, bfloat16, float16, got {value}")
    if isinstance(value, str) and value.strip().lower().replace("torch.", "") in _ALIASES:
        return _ALIASES[value.strip().lower().replace("torch.", "")]
    raise ValueError(f"dtype: expected one of {', '.join(PRECISIONS)} (or a floating torch.dtype), got {value!r}")


def precision_name(dtype: torch.dtype, tf32: bool = False) -> str:
    """``fp32``/``tf32``/... for a storage dtype and whether TF32 matmuls are on."""
    name = parse_precision(dtype)
    return "tf32" if tf32 and name == "fp32" else name


@dataclass(frozen=True)
class Tolerance:
    """A row passes when ``max|c - r| <= atol + rtol * max|r|``; ``basis`` says why these values."""

    atol: float
    rtol: float
    basis: str = ""
    provisional: bool = False  # True: derived, not yet confirmed by a measurement on the hardware

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp64": Tolerance(1e-12, 1e-10, "u=2^-53; reordered fp64 sums differ by ~sqrt(K)u ~ 1e-14; 1e4x margin"),
    "fp32": Tolerance(1e-6, 1e-4, "u=2^-24; worst-case K*u = 1.3e-4 at K=D*cheb_k*C=2144; measured <= 3e-6 on CPU"),
    "tf32": Tolerance(1e-4, 1e-2, "product inputs rounded to 10 bits (u=2^-11=4.9e-4), fp32 accumulation; ~20u",
                      provisional=True),
    "bf16": Tolerance(1e-3, 5e-2, "u=2^-8=3.9e-3 per stored tensor, a few chained roundings; ~13u",
                      provisional=True),
    "fp16": Tolerance(1e-4, 1e-2, "u=2^-11=4.9e-4 per stored tensor, a few chained roundings; ~20u",
                      provisional=True),
}

# (backend, precision) -> Tolerance, where a backend needs other values than its precision's row.
BACKEND_TOLERANCES: dict[tuple[str, str], Tolerance] = {}


def default_tolerance(precision, backend: str | None = None, device=None) -> Tolerance:
    """The tolerance for ``precision`` (a name or dtype) on ``backend``: the backend's override if
    there is one, else :data:`DEFAULT_TOLERANCES`. On a CUDA device every row is provisional until
    the GPU measurements are recorded."""
    name = parse_precision(precision)
    tol = BACKEND_TOLERANCES.get((backend, name), DEFAULT_TOLERANCES[name]) if backend else DEFAULT_TOLERANCES[name]
    if device is not None and torch.device(device).type == "cuda" and not tol.provisional:
        tol = dataclasses.replace(tol, provisional=True)
    return tol


def unsupported_reason(backend: str, precision: str, device) -> str | None:
    """Why ``backend`` is not checked in ``precision`` on ``device`` (None: it is)."""
    device = torch.device(device)
    if precision == "tf32" and device.type != "cuda":
        return "TF32 is a CUDA tensor-core mode; on CPU it would be plain fp32"
    if backend == "triton" and precision == "fp64":
        return f"the {backend} kernels accumulate in fp32: fp64 is not one of their precisions"
    if backend == "triton" and device.type == "cpu" and precision == "bf16":
        return "bf16 tl.dot is wrong in the Triton interpreter; bf16 is checked on GPUs"
    return None


@contextlib.contextmanager
def _matmul_precision(tf32: bool):
    """Inside the block, float32 matmuls and cuDNN convolutions use TF32 exactly when ``tf32``
    (``torch.set_float32_matmul_precision("high")``, which the Triton launchers read too, and
    ``torch.backends.cudnn.allow_tf32``); otherwise IEEE fp32, whatever the caller set globally, so
    that "fp32" means fp32. The previous settings are restored afterwards."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


# ---------------------------------------------------------------- rows and reports

def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.2e}"


def _json_float(value: float | None):
    if value is None or not math.isfinite(value):
        return None if value is None else str(value)  # "inf" / "nan": strict JSON has no such number
    return value


@dataclass
class Check:
    """One compared tensor: an output, a parameter gradient or an input gradient."""

    name: str
    kind: str  # "output" | "param grad" | "input grad"
    shape: tuple
    max_abs: float | None  # None: not compared
    max_rel: float | None
    atol: float
    rtol: float
    passed: bool
    ratio: float = 0.0  # max_abs / (atol + rtol * max|r|): <= 1 passes
    note: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "max_abs_err": _json_float(self.max_abs), "max_rel_err": _json_float(self.max_rel),
                "atol": self.atol, "rtol": self.rtol, "err_over_tol": _json_float(self.ratio),
                "passed": self.passed, "note": self.note}


@dataclass
class Report:
    """The rows of one comparison; ``passed`` when there is at least one row and every row passed."""

    title: str = ""
    rows: list[Check] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[Check]:
        return [row for row in self.rows if not row.passed]

    @property
    def worst(self) -> Check | None:
        """The row closest to (or furthest past) its tolerance."""
        return max(self.rows, key=lambda row: (not row.passed, _sortable(row.ratio)), default=None)

    def __str__(self) -> str:
        header = ("check", "shape", "max abs err", "max rel err", "atol", "rtol", "err/tol", "result")
        lines = [header] + [
            (row.name, "x".join(map(str, row.shape)) or "scalar", _fmt(row.max_abs), _fmt(row.max_rel),
             f"{row.atol:.0e}", f"{row.rtol:.0e}", f"{row.ratio:.2g}" if math.isfinite(row.ratio) else str(row.ratio),
             ("ok" if row.passed else "FAIL") + (f" ({row.note})" if row.note else ""))
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        text = [self.title] if self.title else []
        for line in lines:
            cells = [cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in
                     enumerate(zip(line, widths))]
            text.append("  " + "  ".join(cells) + "  " + line[-1])
        failed = len(self.failures)
        text.append(f"  {len(self.rows)} checks: {len(self.rows) - failed} passed, {failed} failed"
                    + (" -> PASS" if self.passed else " -> FAIL"))
        return "\n".join(text)

    def to_dict(self) -> dict:
        return {"title": self.title, "passed": self.passed, "meta": _jsonable(self.meta),
                "rows": [row.to_dict() for row in self.rows]}


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, float):
        return _json_float(value)
    return value


def compare_tensors(name: str, got: torch.Tensor | None, want: torch.Tensor | None, tol: Tolerance, *,
                    kind: str = "output") -> Check:
    """One :class:`Check` row for candidate ``got`` against oracle ``want`` (None: no gradient,
    compared as zeros when only one side has none)."""
    if got is None and want is None:
        return Check(name, kind, (), 0.0, 0.0, tol.atol, tol.rtol, True, 0.0, "no gradient on either side")
    note = ""
    if got is None:
        got, note = torch.zeros_like(want), "candidate has no gradient"
    elif want is None:
        want, note = torch.zeros_like(got), "reference has no gradient"
    shape = tuple(want.shape)
    if tuple(got.shape) != shape:
        return Check(name, kind, shape, math.inf, math.inf, tol.atol, tol.rtol, False, math.inf,
                     f"shape {tuple(got.shape)} != reference {shape}")
    c = got.detach().to(torch.float64)
    r = want.detach().to(device=c.device, dtype=torch.float64)
    finite_c, finite_r = torch.isfinite(c), torch.isfinite(r)
    both = finite_c & finite_r
    # Non-finite entries must agree (same inf, or nan against nan); they are then left out.
    same_special = ~finite_c & ~finite_r & ((c == r) | (torch.isnan(c) & torch.isnan(r)))
    special_mismatch = int((~both & ~same_special).sum())
    if both.any():
        max_abs = float((c - r).abs()[both].max())
        scale = float(r.abs()[both].max())
    else:
        max_abs = scale = 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    bound = tol.bound(scale)
    ratio = max_abs / bound if bound > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = max_abs <= bound and special_mismatch == 0
    if special_mismatch:
        ratio = math.inf
        note = "; ".join(filter(None, [note, f"{special_mismatch} non-finite value(s) differ"]))
    elif scale == 0 and max_abs > 0:
        note = "; ".join(filter(None, [note, "reference is all zeros"]))
    return Check(name, kind, shape, max_abs, max_rel, tol.atol, tol.rtol, passed, ratio, note)


# ---------------------------------------------------------------- nested inputs and outputs

def _map_tensors(obj, fn):
    """``obj`` with every tensor ``t`` inside (tuples, lists, dicts, dataclasses) replaced by ``fn(t)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **values)
    return obj


def _named_tensors(obj, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor inside ``obj``, paths like ``output[0]`` or ``args[0].x``."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{prefix}[{k!r}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _named_tensors(getattr(obj, f.name), f"{prefix}.{f.name}")


def _split_inputs(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        unknown = set(inputs) - {"args", "kwargs"}
        if unknown or not inputs:
            raise ValueError(
                "inputs: expected a tuple of positional arguments or a dict with 'args' (a tuple) and/or "
                f"'kwargs' (a dict), got a dict with keys {sorted(map(str, inputs))}; to pass a dict as the only "
                "positional argument, write (the_dict,)"
            )
        args, kwargs = inputs.get("args", ()), inputs.get("kwargs", {})
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise TypeError(f"inputs: expected 'args' a tuple and 'kwargs' a dict, got {type(args).__name__} "
                             f"and {type(kwargs).__name__}")
        return tuple(args), dict(kwargs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}  # one positional argument (a tensor, a stfast.data.Batch, ...)


# ---------------------------------------------------------------- seeds

@contextlib.contextmanager
def _preserved_rng():
    """Restore Python's, NumPy's and PyTorch's global generators after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device


def _directions(outputs: list[tuple[str, torch.Tensor]], seed: int) -> list[torch.Tensor]:
    """One fixed random direction per output, in float64 on the CPU (independent of global RNGs)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _, t in outputs]


def _grads(loss_terms, targets: list[torch.Tensor]) -> list[torch.Tensor | None]:
    if not targets or not loss_terms:
        return [None] * len(targets)
    loss = sum(loss_terms)
    return list(torch.autograd.grad(loss, targets, allow_unused=True))


# ---------------------------------------------------------------- modules

def _first_floating_dtype(module: nn.Module, args, kwargs) -> torch.dtype | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    for _, t in _named_tensors((args, kwargs), ""):
        if t.is_floating_point():
            return t.dtype
    return None


def state_dict_differences(target: dict, source: dict, target_name: str = "candidate",
                           source_name: str = "reference") -> list[str]:
    """What stops ``source`` from loading into a module whose state dict is ``target`` with
    ``strict=True``: lines naming the missing keys (in ``target`` only), the unexpected keys (in
    ``source`` only) and the shape mismatches; empty when it loads."""
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    shapes = [f"{k}: {target_name} {tuple(target[k].shape)} vs {source_name} {tuple(source[k].shape)}"
              for k in target if k in source and tuple(target[k].shape) != tuple(getattr(source[k], "shape", ()))]
    lines = []
    if missing:
        lines.append(f"missing keys (in the {target_name}, not in the {source_name}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"unexpected keys (in the {source_name}, not in the {target_name}): {', '.join(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches: {'; '.join(shapes)}")
    return lines


def _check_state_dicts(candidate: nn.Module, reference: nn.Module) -> None:
    problems = state_dict_differences(candidate.state_dict(), reference.state_dict())
    if problems:
        header = ("candidate and reference state dicts differ, so the reference's weights cannot be copied into "
                  "the candidate (pass copy_weights=False to compare modules whose weights you set yourself)")
        raise ValueError("\n  ".join([header, *problems]))


def compare_modules(candidate: nn.Module, reference: nn.Module, inputs, *, grad: bool = True, dtype=None,
                    atol: float | None = None, rtol: float | None = None, seed: int = 0,
                    reference_dtype=None, copy_weights: bool = True, title: str | None = None,
                    tolerance: Tolerance | None = None) -> Report:
    """Compare ``candidate`` with ``reference`` on ``inputs``, forward and (``grad``) backward.

    ``inputs``: a tuple (or list) of positional arguments, or a dict ``{"args": (...), "kwargs":
    {...}}`` (either key may be left out); anything else is taken as the one positional argument.
    Tensors may be nested in tuples, lists, dicts and dataclasses (e.g. a :class:`stfast.data.Batch`).
    Floating tensors that ``requires_grad`` get an input-gradient row.

    Steps: (1) unless ``copy_weights=False``, check that the state dicts have the same keys and
    shapes (``ValueError`` naming the missing and unexpected keys and the shape mismatches
    otherwise) and load the reference's weights into ``candidate`` (it keeps them); (2) run the
    candidate in ``dtype`` (a ``torch.dtype`` or a precision name incl. ``"tf32"``; default: its
    own dtype; a cast copy runs, ``candidate`` itself keeps its dtype), its floating inputs cast to
    that dtype; (3) run a copy of the reference holding the *same* weights on the *same* inputs
    (the candidate's rounded values), in ``reference_dtype``: by default (None or ``"same"``) the
    candidate's storage dtype with TF32 off; (4) before each run seed Python, NumPy and PyTorch
    with ``seed`` (so teacher forcing and dropout draw the same numbers, provided both modules
    consume the generators in the same order), restoring the caller's generator states afterwards.
    Both modules run in their current mode (``.train()``/``.eval()``), which must agree.

    ``reference_dtype=torch.float64`` makes the error the candidate's own (as :func:`compare_op`
    does), but only suits modules that never turn floating inputs into indices: HimNet, STID and
    STAEformer look up time-of-day embeddings at ``int(tod * 288)``, and float64 arithmetic can
    pick a neighbouring index where float32 does not, which is a difference of the oracle, not of
    the candidate. Hence the same-precision default for modules.

    ``atol``/``rtol`` (or a whole ``tolerance``) replace :func:`default_tolerance` for the
    candidate's precision. Returns a :class:`Report` (rows: every floating output, then with
    ``grad`` every parameter gradient, then every input gradient).
    """
    if not isinstance(candidate, nn.Module) or not isinstance(reference, nn.Module):
        raise TypeError(f"candidate and reference: expected torch.nn.Module, got {type(candidate).__name__} "
                        f"and {type(reference).__name__}")
    if candidate.training != reference.training:
        raise ValueError(f"candidate is in {'training' if candidate.training else 'eval'} mode but the reference is "
                         f"in {'training' if reference.training else 'eval'} mode; call .train() or .eval() on both")
    args, kwargs = _split_inputs(inputs)
    if copy_weights:
        _check_state_dicts(candidate, reference)
        with torch.no_grad():
            candidate.load_state_dict(reference.state_dict(), strict=True)

    own_dtype = _first_floating_dtype(candidate, args, kwargs) or torch.float32
    precision = parse_precision(dtype) if dtype is not None else precision_name(own_dtype)
    run_dtype, tf32 = PRECISIONS[precision]
    same = reference_dtype is None or (isinstance(reference_dtype, str) and reference_dtype.lower() == "same")
    oracle_dtype = run_dtype if same else _dtype_of(reference_dtype)
    cand = candidate if run_dtype == own_dtype else copy.deepcopy(candidate).to(run_dtype)
    reference_own = _first_floating_dtype(reference, (), {})
    if not copy_weights and reference_own in (None, oracle_dtype):
        oracle = reference
    else:
        oracle = copy.deepcopy(reference).to(oracle_dtype)
        if copy_weights:
            with torch.no_grad():
                oracle.load_state_dict(cand.state_dict(), strict=True)  # the candidate's (rounded) weights

    def cast(t, dtype_):
        if not t.is_floating_point():
            return t
        return t.detach().to(dtype_).requires_grad_(t.requires_grad)

    cand_inputs = _map_tensors((args, kwargs), lambda t: cast(t, run_dtype))
    oracle_inputs = _map_tensors(cand_inputs, lambda t: cast(t, oracle_dtype))

    tol = tolerance or default_tolerance(precision, device=_module_device(candidate))
    if atol is not None or rtol is not None:
        tol = Tolerance(tol.atol if atol is None else atol, tol.rtol if rtol is None else rtol, "given by the caller")

    cand_result = _run(cand, cand_inputs, grad, seed, tf32)
    oracle_result = _run(oracle, oracle_inputs, grad, seed, False, directions_from=cand_result)

    rows = _rows(cand_result, oracle_result, tol)
    oracle_name = str(oracle_dtype).replace("torch.", "")
    meta = {"precision": precision, "candidate_dtype": str(run_dtype), "reference_dtype": str(oracle_dtype),
            "mode": "train" if candidate.training else "eval", "seed": seed, "grad": grad,
            "candidate": type(candidate).__name__, "reference": type(reference).__name__,
            "tolerance_basis": tol.basis, "provisional_tolerance": tol.provisional}
    return Report(title or f"{type(candidate).__name__} vs {type(reference).__name__} ({precision}, "
                           f"{meta['mode']} mode, reference in {oracle_name})", rows, meta)


def _dtype_of(value) -> torch.dtype:
    return PRECISIONS[parse_precision(value)][0]


def _module_device(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


@dataclass
class _RunResult:
    outputs: list  # [(name, tensor)]
    params: list  # [(name, grad or None)]
    inputs: list  # [(name, grad or None)]
    directions: list  # the gradient directions used, one per output


def _run(module: nn.Module, inputs, grad: bool, seed: int, tf32: bool, directions_from=None) -> _RunResult:
    args, kwargs = inputs
    named_inputs = list(_named_tensors(tuple(args), "args")) + list(_named_tensors(kwargs, "kwargs"))
    leaves = [(f"input {name}", t) for name, t in named_inputs if t.requires_grad]
    params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    with _preserved_rng(), _matmul_precision(tf32), torch.set_grad_enabled(grad):
        _seed_all(seed)
        out = module(*args, **kwargs)
        outputs = [(name, t) for name, t in _named_tensors(out, "output") if t.is_floating_point()]
        if directions_from is None:
            directions = [d.to(device=t.device, dtype=t.dtype) for d, (_, t) in zip(_directions(outputs, seed), outputs)]
        else:  # the candidate's directions, i.e. the same (rounded) values
            directions = [d.to(device=t.device, dtype=t.dtype) for d, (_, t) in
                          zip(directions_from.directions, outputs)]
        param_grads: list = [None] * len(params)
        input_grads: list = [None] * len(leaves)
        if grad:
            terms = [(t * d).sum() for (_, t), d in zip(outputs, directions) if t.requires_grad]
            grads = _grads(terms, [p for _, p in params] + [t for _, t in leaves])
            param_grads, input_grads = grads[:len(params)], grads[len(params):]
    if not grad:
        params, leaves = [], []
    return _RunResult([(n, t.detach()) for n, t in outputs],
                      [(n, g) for (n, _), g in zip(params, param_grads)],
                      [(n, g) for (n, _), g in zip(leaves, input_grads)], directions)


def _rows(cand: _RunResult, oracle: _RunResult, tol: Tolerance) -> list[Check]:
    rows = []
    for kind, got_list, want_list, label in (("output", cand.outputs, oracle.outputs, ""),
                                             ("param grad", cand.params, oracle.params, "grad "),
                                             ("input grad", cand.inputs, oracle.inputs, "grad ")):
        got, want = dict(got_list), dict(want_list)
        for name in list(want) + [n for n in got if n not in want]:
            if name not in got or name not in want:
                if kind == "param grad":  # different layouts (copy_weights=False): nothing to pair it with
                    side = "candidate" if name in got else "reference"
                    rows.append(Check(label + name, kind, (), None, None, tol.atol, tol.rtol, True, 0.0,
                                      f"only in the {side}: not compared"))
                    continue
                side = "candidate" if name not in got else "reference"
                rows.append(Check(label + name, kind, (), math.inf, math.inf, tol.atol, tol.rtol, False, math.inf,
                                  f"the {side} has no {kind} {name!r}"))
                continue
            rows.append(compare_tensors(label + name, got[name], want[name], tol, kind=kind))
    return rows


def assert_close_to_reference(candidate: nn.Module, reference: nn.Module, inputs, **kwargs) -> Report:
    """:func:`compare_modules`, raising ``AssertionError`` with the report's table when a row fails;
    returns the report when every row passes."""
    report = compare_modules(candidate, reference, inputs, **kwargs)
    if not report.passed:
        names = ", ".join(row.name for row in report.failures) or "no rows were compared"
        raise AssertionError(f"candidate differs from the reference ({names}):\n{report}")
    return report


# ---------------------------------------------------------------- op definitions (the oracles)

def _reference_propagation(x: torch.Tensor, supports: torch.Tensor | None, cheb_k: int) -> torch.Tensor:
    from .reference.himnet import chebyshev_supports

    if supports is None:
        if cheb_k != 1:
            raise ValueError(f"cheb_k: supports is None, so expected cheb_k 1, got {cheb_k}")
        return x
    pattern = "nm,bmc->bnc" if supports.dim() == 2 else "bnm,bmc->bnc"
    return torch.cat([torch.einsum(pattern, t, x) for t in chebyshev_supports(supports, cheb_k)], dim=-1)


def _reference_activation(y: torch.Tensor, activation) -> torch.Tensor:
    if activation is None:
        return y
    return {"sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation](y)


def reference_meta_gconv(x, supports, embeddings, weights_pool, bias_pool, cheb_k, activation=None, *, axis=None):
    """Pure-PyTorch definition of :func:`stfast.ops.meta_gconv`: the published HimGCN's einsums.

    The Chebyshev matrices ``T_k`` are built explicitly by
    :func:`stfast.reference.himnet.chebyshev_supports` (``supports=None``: ``[I]``, ``cheb_k=1``),
    the propagated features ``cat_k(T_k x)`` multiply the per-node / per-sample / per-(sample, node)
    weights ``E @ P``, which are materialised as the published code does, plus ``E @ Pb``, then the
    optional activation. Same arguments as the op.
    """
    from .ops.meta_gconv import resolve_axis

    axis = resolve_axis(x, embeddings, axis)
    x_g = _reference_propagation(x, supports, cheb_k)
    if axis == "T":
        y = torch.einsum("bni,bio->bno", x_g, torch.einsum("bd,dio->bio", embeddings, weights_pool))
        bias = None if bias_pool is None else torch.matmul(embeddings, bias_pool)[:, None, :]
    elif axis == "S":
        y = torch.einsum("bni,nio->bno", x_g, torch.einsum("nd,dio->nio", embeddings, weights_pool))
        bias = None if bias_pool is None else torch.matmul(embeddings, bias_pool)
    else:
        y = torch.einsum("bni,bnio->bno", x_g, torch.einsum("bnd,dio->bnio", embeddings, weights_pool))
        bias = None if bias_pool is None else torch.einsum("bnd,do->bno", embeddings, bias_pool)
    return _reference_activation(y if bias is None else y + bias, activation)


def reference_gconv(x, supports, weight, bias, cheb_k, activation=None):
    """Pure-PyTorch definition of :func:`stfast.ops.gconv` (the published HimGCN without a meta axis)."""
    y = torch.einsum("bni,io->bno", _reference_propagation(x, supports, cheb_k), weight)
    return _reference_activation(y if bias is None else y + bias, activation)


def reference_node_lora(x, weight, bias, lora_a, lora_b, scale, activation="leaky_relu", dropout_p=0.0,
                        training=False, seed=None, offset=0):
    """Pure-PyTorch definition of :func:`stfast.ops.node_lora` (ST-LoRA's node-adaptive low-rank layer):
    ``x W^T + b + scale * act(x @ A[n]) @ B[n]`` per node ``n``, as two einsums over the node axis.

    Without dropout only: the backends draw their own dropout masks (a ``torch.Generator`` or
    in-kernel Philox), which no definition can reproduce, so ``dropout_p > 0`` with ``training``
    raises ``ValueError``.
    """
    if training and dropout_p > 0:
        raise ValueError("dropout_p: the reference has no dropout (each backend draws its own masks); compare with "
                         f"dropout_p=0 or training=False, got dropout_p={dropout_p} while training")
    low = torch.einsum("...nd,ndr->...nr", x, lora_a)
    if activation == "leaky_relu":
        low = torch.nn.functional.leaky_relu(low, 0.01)  # torch.nn.LeakyReLU's default slope, as published
    elif activation is not None:
        low = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation](low)
    return torch.nn.functional.linear(x, weight, bias) + scale * torch.einsum("...nr,nro->...no", low, lora_b)


# ---------------------------------------------------------------- op cases

@dataclass(frozen=True)
class OpCase:
    """How to check one op: everything :func:`compare_op` and ``stfast check`` need.

    ``make_inputs(spec, generator)`` returns ``(args, kwargs)`` for a shape spec (a dict of
    ``defaults`` overridden by the caller): ``args`` a list of ``(name, value)`` in call order whose
    tensors are float64 on the CPU (they are rounded to the checked dtype and moved to the device;
    every floating tensor gets a gradient row), ``kwargs`` non-tensor keyword arguments.
    ``function`` (the stfast op) and ``reference`` (its pure-PyTorch definition) are both called as
    ``f(*args, **kwargs)``. ``kernel`` is the backend-registry name whose availability decides
    whether a backend can run it. ``grid(quick)`` lists the specs of the ``stfast check`` sweep;
    ``label(spec)`` a short description of a spec.
    """

    name: str
    kernel: str
    function: Callable
    reference: Callable
    make_inputs: Callable[[dict, torch.Generator], tuple[list, dict]]
    defaults: dict
    grid: Callable[[bool], list[dict]]
    label: Callable[[dict], str] = field(default=lambda spec: ", ".join(f"{k}={v}" for k, v in spec.items()))


OP_CASES: dict[str, OpCase] = {}


def register_op_case(case: OpCase) -> OpCase:
    """Add (or replace) the op case named ``case.name``."""
    OP_CASES[case.name] = case
    return case


def _randn(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _make_supports(gen, kind: str, batch: int, nodes: int):
    scale = nodes ** -0.5  # spectral radius ~1, so Chebyshev terms stay O(1)
    if kind == "shared":
        return _randn(gen, nodes, nodes, scale=scale)
    if kind == "per_sample":
        return _randn(gen, batch, nodes, nodes, scale=scale)
    if kind == "none":
        return None
    raise ValueError(f"supports: expected 'shared', 'per_sample' or 'none', got {kind!r}")


def _meta_gconv_inputs(spec: dict, gen: torch.Generator):
    axis, batch, nodes, channels = spec["axis"], spec["batch"], spec["nodes"], spec["channels"]
    dim, cheb_k, outputs = spec["dim"], spec["cheb_k"], spec["outputs"]
    embedding_shape = {"S": (nodes, dim), "T": (batch, dim), "ST": (batch, nodes, dim)}
    if axis not in embedding_shape:
        raise ValueError(f"axis: expected 'S', 'T' or 'ST', got {axis!r}")
    args = [
        ("x", _randn(gen, batch, nodes, channels)),
        ("supports", _make_supports(gen, spec["supports"], batch, nodes)),
        ("embeddings", _randn(gen, *embedding_shape[axis])),
        ("weights_pool", _randn(gen, dim, cheb_k * channels, outputs, scale=(dim * cheb_k * channels) ** -0.5)),
        ("bias_pool", _randn(gen, dim, outputs, scale=dim ** -0.5) if spec["bias"] else None),
        ("cheb_k", cheb_k),
        ("activation", spec["activation"]),
    ]
    return args, {"axis": axis}


def _gconv_inputs(spec: dict, gen: torch.Generator):
    batch, nodes, channels, cheb_k, outputs = spec["batch"], spec["nodes"], spec["channels"], spec["cheb_k"], \
        spec["outputs"]
    args = [
        ("x", _randn(gen, batch, nodes, channels)),
        ("supports", _make_supports(gen, spec["supports"], batch, nodes)),
        ("weight", _randn(gen, cheb_k * channels, outputs, scale=(cheb_k * channels) ** -0.5)),
        ("bias", _randn(gen, outputs) if spec["bias"] else None),
        ("cheb_k", cheb_k),
        ("activation", spec["activation"]),
    ]
    return args, {}


def _spec_label(keys: tuple[str, ...]):
    def label(spec: dict) -> str:
        text = " ".join(f"{k}={spec[k]}" for k in keys if k in spec)
        return text + (f" ({spec['tag']})" if spec.get("tag") else "")
    return label


_GCONV_KEYS = ("supports", "cheb_k", "batch", "nodes", "channels", "outputs", "activation", "bias")
_META_KEYS = ("axis",) + _GCONV_KEYS[:4] + ("channels", "dim", "outputs", "activation", "bias")


def _meta_gconv_grid(quick: bool) -> list[dict]:
    # Not a cartesian product: together the rows cover every axis, support kind, cheb_k 1-3, batch 1,
    # a single node, odd node counts that are never a tile multiple, D = 1 (rank-1 embeddings), both
    # activations, with and without bias, and a shape of several tiles in every direction.
    small = [
        # axis, supports, K, B, N, C, D, O, activation, bias
        ("S", "shared", 2, 1, 7, 5, 4, 3, None, True),
        ("T", "per_sample", 2, 1, 37, 5, 1, 3, None, False),
        ("ST", "per_sample", 3, 1, 7, 5, 1, 3, "sigmoid", True),
        ("ST", "none", 1, 2, 5, 5, 3, 3, "tanh", True),
        ("S", "per_sample", 3, 3, 7, 5, 1, 3, "tanh", True),
        ("S", "none", 1, 2, 5, 5, 3, 20, "sigmoid", False),
        ("T", "shared", 3, 3, 17, 5, 4, 6, "sigmoid", True),
        ("T", "none", 1, 3, 7, 5, 2, 20, "tanh", True),
        ("ST", "shared", 1, 1, 1, 3, 2, 3, None, True),
        ("ST", "per_sample", 2, 2, 17, 5, 3, 20, None, False),
        ("ST", "shared", 2, 3, 37, 20, 3, 70, "tanh", True),
        ("S", "shared", 2, 2, 37, 20, 3, 70, "tanh", True),
        ("T", "shared", 2, 2, 37, 20, 3, 70, "sigmoid", True),
    ]
    keys = ("axis", "supports", "cheb_k", "batch", "nodes", "channels", "dim", "outputs", "activation", "bias")
    specs = [dict(zip(keys, row)) for row in (small[:4] if quick else small)]
    datasets = ["METR-LA"] if quick else None
    return specs + _meta_gconv_dataset_specs(datasets, quick)


def _meta_gconv_dataset_specs(datasets, quick: bool) -> list[dict]:
    """HimNet's layers at each benchmark's real size, batch 1: the ST decoder gate (per-sample
    supports), the S encoder gate and the T encoder candidate (shared supports)."""
    from .configs import DATASETS, himnet_config

    specs = []
    for name in datasets or list(DATASETS):
        m = himnet_config(name)["model"]
        hidden, cheb_k, nodes = m["hidden_dim"], m["cheb_k"], m["num_nodes"]
        common = dict(cheb_k=cheb_k, batch=1, nodes=nodes, bias=True, dataset=name)
        decoder_channels = m["output_dim"] + m["ycov_dim"] + hidden
        specs.append(dict(common, axis="ST", supports="per_sample", channels=decoder_channels,
                          dim=m["st_embedding_dim"], outputs=2 * hidden, activation="sigmoid",
                          tag=f"{name} decoder gate"))
        if quick:
            continue
        specs.append(dict(common, axis="S", supports="shared", channels=m["input_dim"] + hidden,
                          dim=m["node_embedding_dim"], outputs=2 * hidden, activation="sigmoid",
                          tag=f"{name} S-encoder gate"))
        specs.append(dict(common, axis="T", supports="shared", channels=m["input_dim"] + hidden,
                          dim=m["tod_embedding_dim"] + m["dow_embedding_dim"], outputs=hidden, activation="tanh",
                          tag=f"{name} T-encoder candidate"))
    return specs


def _gconv_grid(quick: bool) -> list[dict]:
    rows = [
        # supports, K, B, N, C, O, activation, bias
        ("shared", 2, 1, 7, 5, 3, None, True),
        ("per_sample", 3, 2, 17, 4, 6, "tanh", False),
        ("none", 1, 3, 5, 5, 20, "sigmoid", True),
        ("shared", 3, 2, 37, 20, 70, "sigmoid", True),
        ("per_sample", 1, 1, 1, 3, 2, None, True),
    ]
    keys = ("supports", "cheb_k", "batch", "nodes", "channels", "outputs", "activation", "bias")
    return [dict(zip(keys, row)) for row in (rows[:2] if quick else rows)]


def _node_lora_inputs(spec: dict, gen: torch.Generator):
    lead, nodes, d_in, d_out, rank = tuple(spec["lead"]), spec["nodes"], spec["d_in"], spec["d_out"], spec["rank"]
    args = [
        ("x", _randn(gen, *lead, nodes, d_in)),
        ("weight", _randn(gen, d_out, d_in, scale=d_in ** -0.5)),
        ("bias", _randn(gen, d_out) if spec["bias"] else None),
        ("lora_a", _randn(gen, nodes, d_in, rank, scale=d_in ** -0.5)),
        # random, not the zero initialisation of a fresh layer: zero B would hide every gradient of A
        ("lora_b", _randn(gen, nodes, rank, d_out, scale=rank ** -0.5)),
        ("scale", float(spec["scale"])),
        ("activation", spec["activation"]),
    ]
    return args, {}


def _node_lora_grid(quick: bool) -> list[dict]:
    rows = [
        # leading axes, N, d_in, d_out, r, activation, bias, scale
        ((), 7, 5, 3, 1, "leaky_relu", True, 2.0),  # no batch axis, rank 1
        ((1,), 1, 4, 4, 2, "relu", False, 1.0),  # batch 1, a single node
        ((3,), 17, 20, 70, 8, "tanh", True, 0.5),
        ((2, 3), 5, 6, 5, 4, "sigmoid", True, 1.0),  # (B, T, N, d_in)
        ((2,), 37, 33, 17, 16, None, True, 1.0),
    ]
    keys = ("lead", "nodes", "d_in", "d_out", "rank", "activation", "bias", "scale")
    specs = [dict(zip(keys, row)) for row in (rows[:3] if quick else rows)]
    from .configs import DATASETS

    # ST-LoRA's NALL layers at each benchmark's node count: hidden 64, the paper's rank 16, batch 1.
    for name in ["METR-LA"] if quick else list(DATASETS):
        specs.append(dict(lead=(1,), nodes=DATASETS[name].num_nodes, d_in=64, d_out=64, rank=16,
                          activation="leaky_relu", bias=True, scale=1.0, dataset=name, tag=f"{name} NALL"))
    return specs


_NODE_LORA_KEYS = ("lead", "nodes", "d_in", "d_out", "rank", "activation", "bias", "scale")


def _register_builtin_cases() -> None:
    from . import ops

    register_op_case(OpCase(
        name="meta_gconv", kernel="meta_gconv", function=ops.meta_gconv, reference=reference_meta_gconv,
        make_inputs=_meta_gconv_inputs,
        defaults=dict(axis="ST", supports="shared", cheb_k=2, batch=2, nodes=7, channels=5, dim=3, outputs=4,
                      activation=None, bias=True, tag="", dataset=None),
        grid=_meta_gconv_grid, label=_spec_label(_META_KEYS)))
    register_op_case(OpCase(
        name="gconv", kernel="gconv", function=ops.gconv, reference=reference_gconv, make_inputs=_gconv_inputs,
        defaults=dict(supports="shared", cheb_k=2, batch=2, nodes=7, channels=5, outputs=4, activation=None,
                      bias=True, tag="", dataset=None),
        grid=_gconv_grid, label=_spec_label(_GCONV_KEYS)))
    if hasattr(ops, "node_lora"):  # the node-LoRA family, where this version of stfast.ops has it
        register_op_case(OpCase(
            name="node_lora", kernel="node_lora", function=ops.node_lora, reference=reference_node_lora,
            make_inputs=_node_lora_inputs,
            defaults=dict(lead=(2,), nodes=7, d_in=5, d_out=4, rank=2, activation="leaky_relu", bias=True,
                          scale=1.0, tag="", dataset=None),
            grid=_node_lora_grid, label=_spec_label(_NODE_LORA_KEYS)))


_register_builtin_cases()


def op_case(name: str) -> OpCase:
    if name not in OP_CASES:
        raise ValueError(f"op: expected one of {sorted(OP_CASES)}, got {name!r}")
    return OP_CASES[name]


def resolve_spec(case: OpCase, shapes: dict | None) -> dict:
    """``case.defaults`` updated with ``shapes`` (unknown keys are an error)."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(case.defaults))
    if unknown:
        raise ValueError(f"shapes: unknown key(s) {unknown} for {case.name}; expected some of {sorted(case.defaults)}")
    return {**case.defaults, **shapes}


def compare_op(name: str, backend: str, shapes: dict | None = None, dtype=torch.float32, device="cpu", *,
               seed: int = 0, atol: float | None = None, rtol: float | None = None,
               grad: bool = True) -> Report:
    """Compare op ``name`` run by ``backend`` with its pure-PyTorch definition, forward and backward.

    ``shapes``: a dict overriding the op case's defaults (``OP_CASES[name].defaults``), e.g. for
    ``meta_gconv`` ``{"axis": "ST", "supports": "per_sample", "batch": 1, "nodes": 207, ...}``.
    ``dtype``: a floating ``torch.dtype`` or a precision name (``"fp32"``, ``"tf32"``, ``"bf16"``,
    ...). Inputs are drawn in float64 from ``seed``, rounded to ``dtype`` and put on ``device``;
    the definition runs in float64 on those rounded values. One row for the output and one per
    floating input's gradient, against :func:`default_tolerance` (or ``atol``/``rtol``).
    Raises ``ValueError`` when the backend cannot run the op there or does not support the precision.
    """
    from . import ops

    case = op_case(name)
    spec = resolve_spec(case, shapes)
    precision = parse_precision(dtype)
    run_dtype, tf32 = PRECISIONS[precision]
    device = torch.device(device)
    status = ops.available_backends(device, case.kernel).get(backend)
    if status is None:
        raise ValueError(f"backend: expected one of {list(ops.available_backends(device, case.kernel))}, "
                         f"got {backend!r}")
    if status is not True:
        raise ValueError(f"backend {backend!r} cannot run {case.kernel} on {device.type}: {status}")
    reason = unsupported_reason(backend, precision, device)
    if reason:
        raise ValueError(f"{backend} in {precision} on {device.type}: {reason}")

    gen = torch.Generator().manual_seed(seed)
    args64, kwargs = case.make_inputs(spec, gen)
    names = [n for n, _ in args64]

    def prepare(value, dtype_):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().to(device=device, dtype=dtype_).requires_grad_(grad)
        return value.to(device) if isinstance(value, torch.Tensor) else value

    cand_args = [prepare(v, run_dtype) for _, v in args64]
    oracle_args = [prepare(v.detach(), torch.float64) if isinstance(v, torch.Tensor) else v for v in cand_args]
    cand_leaves = [(n, v) for n, v in zip(names, cand_args) if isinstance(v, torch.Tensor) and v.requires_grad]
    oracle_leaves = [v for n, v in zip(names, oracle_args) if isinstance(v, torch.Tensor) and v.requires_grad]

    with ops.use_backend(backend), _matmul_precision(tf32), torch.set_grad_enabled(grad):
        out = case.function(*cand_args, **kwargs)
        direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1),
                                dtype=torch.float64).to(device=device, dtype=out.dtype)
        cand_grads = _grads([(out * direction).sum()], [v for _, v in cand_leaves]) if grad else []
    with torch.set_grad_enabled(grad):
        ref = case.reference(*oracle_args, **kwargs)
        oracle_grads = _grads([(ref * direction.to(torch.float64)).sum()], oracle_leaves) if grad else []

    tol = default_tolerance(precision, backend, device)
    if atol is not None or rtol is not None:
        tol = Tolerance(tol.atol if atol is None else atol, tol.rtol if rtol is None else rtol, "given by the caller")
    rows = [compare_tensors("out", out, ref, tol)]
    rows += [compare_tensors(f"grad {n}", g, r, tol, kind="input grad")
             for (n, _), g, r in zip(cand_leaves, cand_grads, oracle_grads)]
    if out.dtype != run_dtype:
        rows.append(Check("out dtype", "output", tuple(out.shape), math.inf, math.inf, tol.atol, tol.rtol, False,
                          math.inf, f"{out.dtype}, expected {run_dtype}"))
    meta = {"op": name, "backend": backend, "precision": precision, "device": str(device), "spec": spec,
            "label": case.label(spec), "tolerance_basis": tol.basis, "provisional_tolerance": tol.provisional}
    return Report(f"{name} [{backend}, {precision}, {device.type}] {case.label(spec)}", rows, meta)
