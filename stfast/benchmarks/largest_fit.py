"""The largest batch whose training step fits a CPU memory budget: predicted, then verified by running it.

For one (model, backend, dataset), :func:`search_largest_fit` predicts with
:func:`stfast.memory.estimate_memory` (CPU: no block rounding) the memory of one training step
(parameters + Adam state + the step's peak) at the candidate batches, the powers of two below the
configuration's batch and that batch itself, and finds the largest whose total is within the budget.
Memory grows with the batch, so a bisection over the candidates traces only a few of them; the
candidate one up from the answer is always among those traced (its prediction says why it is the
boundary).

:func:`verify_fit` then runs that step for real (:func:`stfast.memory.measure_step_memory`: a warm-up
step, then the measured one, on synthetic inputs of the dataset's shape and the synthetic graph) in a
fresh process. That process caps its own address space (``RLIMIT_AS``) at what it holds after its
imports plus the budget and a headroom (:data:`GUARD_HEADROOM` by default), so a wrong prediction ends
that run with an allocation error instead of exhausting the machine. The size one up is predicted only,
never run. The run fits when its measured total (PyTorch's allocations, what the prediction models) is
within the budget; the process's resident-set peak is reported beside it: the interpreter, the
profiler's records and the C allocator's retained pages come on top (measured: about 0.9 GB above the
allocations for STID on SD at batch 32, 0.37 GB of allocations).

    python -m stfast.benchmarks.largest_fit '{"model": ..., "backend": ..., "dataset": ..., "batch_size": ...,
                                              "budget": BYTES, "headroom": BYTES}'

is that process: it prints one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FitSearch", "candidate_batches", "check_budget", "search_largest_fit", "largest_fit", "verify_fit"]

GIB = 2**30
# Address space the verifying process may take above the budget before its cap refuses an allocation: its
# non-tensor growth (profiler records, thread stacks, the C allocator's arenas) measured about 1.2 GiB.
GUARD_HEADROOM = 2 * GIB


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_budget(budget) -> int:
    """``budget`` in bytes: a positive int no larger than this machine's memory, or a ValueError naming it."""
    budget = _positive_int(budget, "budget")
    if budget > machine_memory():
        raise ValueError(f"budget: expected at most this machine's memory ({machine_memory() / GIB:.1f} GiB), "
                         f"got {budget / GIB:.1f} GiB")
    return budget


def candidate_batches(max_batch: int) -> list[int]:
    """The powers of two below ``max_batch``, then ``max_batch`` (a configuration's batch need not be one)."""
    max_batch = _positive_int(max_batch, "max_batch")
    return [2**i for i in range(max_batch.bit_length()) if 2**i < max_batch] + [max_batch]


@dataclass(frozen=True)
class FitSearch:
    """The outcome of :func:`search_largest_fit`; sizes in bytes."""

    budget: int
    candidates: tuple[int, ...]
    batch: int | None  # the largest candidate predicted to fit; None when none does
    predicted: dict[int, int] = field(default_factory=dict)  # total per batch traced
    resting: int = 0  # parameters + optimiser state: what no batch size can shrink

    @property
    def next_up(self) -> int | None:
        """The candidate after :attr:`batch` (predicted not to fit), None when the largest candidate fits."""
        index = -1 if self.batch is None else self.candidates.index(self.batch)
        return self.candidates[index + 1] if index + 1 < len(self.candidates) else None


def search_largest_fit(estimate_at: Callable[[int], object], max_batch: int, budget: int, *,
                       what: str = "the model") -> FitSearch:
    """Bisect :func:`candidate_batches` for the largest batch whose predicted ``total`` is within ``budget``.

    ``estimate_at(batch)`` returns an object with ``total``, ``parameters`` and ``optimizer_state`` (a
    :class:`stfast.memory.MemoryEstimate`). A budget that the parameters and the optimiser state alone
    exceed is refused (``what`` names the model in that error); a budget that only the steps exceed
    gives ``batch=None``.
    """
    budget = _positive_int(budget, "budget")
    candidates = tuple(candidate_batches(max_batch))
    predicted: dict[int, int] = {}
    resting = None

    def fits(index: int) -> bool:
        nonlocal resting
        batch = candidates[index]
        if batch not in predicted:
            estimate = estimate_at(batch)
            predicted[batch] = int(estimate.total)
            if resting is None:
                resting = int(estimate.parameters + estimate.optimizer_state)
                if resting > budget:
                    raise ValueError(f"budget: expected more than the {resting / GIB:.3f} GiB that the parameters "
                                     f"and optimiser state of {what} take alone, got {budget / GIB:.3f} GiB")
        return predicted[batch] <= budget

    fitting, failing = -1, len(candidates)  # candidates[:fitting + 1] fit, candidates[failing:] do not
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return FitSearch(budget, candidates, candidates[fitting] if fitting >= 0 else None, predicted, resting or 0)


def largest_fit(model: str, backend: str, dataset: str, budget: int) -> FitSearch:
    """:func:`search_largest_fit` with :func:`stfast.memory.estimate_memory` on the CPU, up to the batch of
    ``model``'s configuration on ``dataset``."""
    from .. import configs
    from ..memory import estimate_memory

    budget = check_budget(budget)
    max_batch = configs.load(model, dataset)["training"]["batch_size"]
    return search_largest_fit(lambda batch: estimate_memory(model, batch, dataset, backend, device="cpu"),
                              max_batch, budget, what=f"{model} ({backend}) on {dataset}")


# -- verification in a process of its own --------------------------------------------------------------------------

def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def verify_fit(model: str, backend: str, dataset: str, batch_size: int, budget: int, *,
               timeout: float | None = None, headroom: int = GUARD_HEADROOM) -> dict:
    """Run one measured training step in a fresh process whose address space may grow by at most
    ``budget + headroom`` bytes after its imports (see the module docstring).

    Returns the process's JSON: ``ok``, and when it ran ``parameters``, ``optimizer_state``, ``step_peak``,
    ``total`` (bytes, PyTorch's allocations), ``baseline_rss`` and ``max_rss`` (the process's resident set
    after its imports and at its peak), ``address_limit`` and ``seconds``; else ``error``.
    """
    if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
        raise ValueError(f"headroom: expected a non-negative int of bytes, got {headroom!r}")
    spec = dict(model=model, backend=backend, dataset=dataset, batch_size=_positive_int(batch_size, "batch_size"),
                budget=check_budget(budget), headroom=headroom)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "stfast.benchmarks.largest_fit", json.dumps(spec)]
    started = time.perf_counter()
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {timeout:.0f} s", seconds=round(time.perf_counter() - started))
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = " | ".join(process.stderr.strip().splitlines()[-3:])
        return dict(ok=False, error=f"exited with status {process.returncode} without a result: {tail}")
    return json.loads(lines[-1])


def _status_bytes(field_name: str) -> int:
    """``VmSize`` / ``VmRSS`` ... of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _cap_address_space(extra: int) -> int:
    import resource

    limit = _status_bytes("VmSize") + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def _measure(spec: dict) -> dict:
    import resource

    import torch  # noqa: F401  (imported before the cap: the baseline holds the libraries)

    from ..memory import measure_step_memory
    from ..models import model_module

    model_module(spec["model"])  # the model's code and what it imports (kernels, extension) are in the baseline
    baseline_rss = _status_bytes("VmRSS")
    limit = _cap_address_space(spec["budget"] + spec.get("headroom", GUARD_HEADROOM))
    started = time.perf_counter()
    try:
        measured = measure_step_memory(spec["model"], spec["batch_size"], spec["dataset"], spec["backend"])
    except (MemoryError, RuntimeError) as error:
        refused = isinstance(error, MemoryError) or "can't allocate memory" in str(error)
        reason = "an allocation refused by the address-space cap" if refused else type(error).__name__
        return dict(ok=False, error=f"{reason}: {str(error)[:300]}", address_limit=limit,
                    seconds=round(time.perf_counter() - started, 1))
    return dict(ok=True, parameters=measured.parameters, optimizer_state=measured.optimizer_state,
                step_peak=measured.step_peak, total=measured.total, baseline_rss=baseline_rss,
                max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, address_limit=limit,
                seconds=round(time.perf_counter() - started, 1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(_measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
