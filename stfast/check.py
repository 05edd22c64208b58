"""``stfast check``: prove on this machine that the fast paths compute what the PyTorch modules compute.

Without ``--model`` it sweeps every op of :data:`stfast.testing.OP_CASES` on every backend that can
run it here (or the ``--backends`` given), in every ``--dtypes`` precision, over a grid of shapes
(odd node counts, batch 1, a single node, rank-1 embeddings, several tiles, and HimNet's layers at
the six benchmarks' real node counts), forward and backward, each against the op's pure-PyTorch
definition in float64 (:func:`stfast.testing.compare_op`). ``--quick`` runs a few cases of each.

With ``--model NAME`` it compares the model's fused module (``stfast.models.create(NAME, DATASET)``,
default backend or each of ``--backends``) with its reference implementation (``backend="reference"``)
sharing one set of weights (``--checkpoint`` if given, else the reference's initialisation), on
synthetic batches of the dataset's shape or on the first batches of ``--data``'s test split: in
eval mode, then in training mode with teacher forcing under one seed (``batches_seen`` set so the
sampling threshold is 0.5, i.e. both teacher-forced and free-running steps occur), printing the
error of every output and every parameter gradient (:func:`stfast.testing.compare_modules`).

Prints a summary table, writes ``--json`` if asked, and returns 0 when everything checked passed,
1 when something failed; bad usage raises ``ValueError`` (exit code 2 through ``stfast.cli``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import testing
from .profiler import describe_device

__all__ = ["add_check_parser", "main", "run_check"]

_DEFAULT_PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32", "tf32", "bf16", "fp16")}


def add_check_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "check", help="check the fused ops and modules against the reference PyTorch implementation",
        description="Check every fused op (or one model's fused module) against its pure-PyTorch reference, "
                    "forward and backward, and print the errors against documented tolerances "
                    "(stfast.testing.DEFAULT_TOLERANCES). Exit code 0: all passed; 1: a check failed; 2: bad usage.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="op backends to check (torch, triton, cuda, cpu); default: every backend that can run "
                             "here. With --model: the fused module's backends (default: the model's default)")
    parser.add_argument("--dtypes", nargs="+", metavar="NAME",
                        help=f"precisions among {', '.join(testing.PRECISIONS)}; default: fp32 on cpu, "
                             "fp32 tf32 bf16 fp16 on cuda")
    parser.add_argument("--ops", nargs="+", metavar="NAME", help="ops to sweep (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few shapes per op (seconds on a CPU)")
    parser.add_argument("--model", help="check this model's fused module against its reference (e.g. himnet)")
    parser.add_argument("--checkpoint", type=Path,
                        help="with --model: weights to check with (an stfast checkpoint or a raw state dict file)")
    parser.add_argument("--dataset", help="with --model: dataset whose shape and configuration to use "
                                          "(default: the checkpoint's, else METR-LA)")
    parser.add_argument("--data", type=Path, help="with --model: compare on the first batches of this data's test "
                                                  "split instead of synthetic batches")
    parser.add_argument("--batch-size", type=int, help="with --model: samples per batch (default 2)")
    parser.add_argument("--batches", type=int, help="with --model: number of batches compared (default 1)")
    parser.add_argument("--reference-dtype", default="same", choices=["same", "float64"],
                        help="with --model: the precision the reference runs in: the checked one (default) or "
                             "float64 (the error is then the fused path's own, but float64 can round time-of-day "
                             "indices differently from the checked precision; see stfast.testing.compare_modules)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every result to this JSON file")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the table of every case, not only "
                                                                      "of the failed ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_check)
    return parser


# ---------------------------------------------------------------- results

@dataclass
class Case:
    """One unit of work: an op on one backend, precision and shape, or a model in one mode."""

    kind: str  # "op" | "model"
    name: str  # op or model name
    backend: str
    precision: str
    label: str
    run: Callable[[], testing.Report] | None = None
    skip_reason: str | None = None
    report: testing.Report | None = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.skip_reason:
            return "skipped"
        if self.error or self.report is None or not self.report.passed:
            return "failed"
        return "passed"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "backend": self.backend, "precision": self.precision,
                "label": self.label, "status": self.status, "reason": self.skip_reason or self.error,
                "seconds": round(self.seconds, 3), **testing._jsonable(self.extra),
                "report": self.report.to_dict() if self.report is not None else None}


def _table(header, rows, left=2) -> str:
    """Aligned text table: the first ``left`` columns and the last one left-aligned, numbers right-aligned."""
    lines = [tuple(map(str, header))] + [tuple(map(str, row)) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    last = len(header) - 1
    return "\n".join("  " + "  ".join(cell.ljust(w) if i < left or i == last else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


def _ratio_text(value: float) -> str:
    return f"{value:.2g}" if math.isfinite(value) else str(value)


# ---------------------------------------------------------------- arguments

def _device(name: str) -> torch.device:
    from .cli import resolve_device  # imported here: stfast.cli imports this module

    return resolve_device(name)


def _precisions(args, device: torch.device) -> list[str]:
    if not args.dtypes:
        return list(_DEFAULT_PRECISIONS.get(device.type, ("fp32",)))
    names = []
    for value in args.dtypes:
        try:
            name = testing.parse_precision(value)
        except ValueError:
            raise ValueError(f"--dtypes: expected names among {', '.join(testing.PRECISIONS)}, got {value!r}") from None
        if name not in names:
            names.append(name)
    return names


def _positive(flag: str, value, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value}")
    return value


def _model_only_flags(args) -> None:
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--dataset", args.dataset),
                                      ("--data", args.data), ("--batch-size", args.batch_size),
                                      ("--batches", args.batches)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only used with --model NAME (the op sweep uses its own shapes)")


# ---------------------------------------------------------------- the op sweep

def _op_cases(args, device: torch.device) -> tuple[list[Case], dict[str, str]]:
    from . import ops
    from .ops.backends import BACKENDS

    names = args.ops or list(testing.OP_CASES)
    for name in names:
        testing.op_case(name)  # ValueError naming the known ops
    precisions = _precisions(args, device)
    status = {name: ops.available_backends(device, testing.OP_CASES[name].kernel) for name in names}
    if args.backends:
        unknown = [b for b in args.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"--backends: expected names among {', '.join(BACKENDS)}, got {', '.join(unknown)}")
        backends = list(dict.fromkeys(args.backends))
        for backend in backends:
            if not any(status[name][backend] is True for name in names):
                reasons = "; ".join(f"{name}: {status[name][backend]}" for name in names)
                raise ValueError(f"--backends: {backend} cannot run any of the checked ops on {device.type} ({reasons})")
    else:
        backends = [b for b in BACKENDS if any(status[name][b] is True for name in names)]
    environment = ops.available_backends(device)  # why a backend cannot run at all here
    not_checked = {b: str(environment[b]) if environment[b] is not True else
                   "; ".join(f"{name}: {status[name][b]}" for name in names)
                   for b in BACKENDS if b not in backends and not any(status[name][b] is True for name in names)}

    cases = []
    for backend in backends:
        for precision in precisions:
            for name in names:
                case = testing.OP_CASES[name]
                available = status[name][backend]
                unsupported = testing.unsupported_reason(backend, precision, device)
                for spec in case.grid(args.quick):
                    spec = testing.resolve_spec(case, spec)
                    label = case.label(spec)
                    reason = (available if available is not True else None) or unsupported
                    if reason is None and backend == "triton" and device.type == "cpu" and spec.get("dataset"):
                        reason = "real dataset sizes are too slow in the Triton interpreter; they run on GPUs"
                    run = None if reason else _op_runner(name, backend, spec, precision, device, args.seed)
                    cases.append(Case("op", name, backend, precision, label, run=run, skip_reason=reason,
                                      extra={"spec": spec}))
    return cases, not_checked


def _op_runner(name, backend, spec, precision, device, seed):
    return lambda: testing.compare_op(name, backend, spec, precision, device, seed=seed)


def _op_summary(cases: list[Case]) -> tuple[list, list]:
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault((case.name, case.backend, case.precision), []).append(case)
    rows, json_rows = [], []
    for (name, backend, precision), members in groups.items():
        ran = [c for c in members if c.status != "skipped"]
        failed = [c for c in ran if c.status == "failed"]
        skipped = len(members) - len(ran)
        worst_case, worst = None, -1.0
        worst_rel = max((row.max_rel for c in ran if c.report for row in c.report.rows if row.max_rel is not None),
                        default=None)
        for c in ran:
            ratio = math.inf if c.report is None else (c.report.worst.ratio if c.report.worst else math.inf)
            ratio = math.inf if math.isnan(ratio) else ratio
            if ratio > worst:
                worst_case, worst = c, ratio
        tol = testing.default_tolerance(precision, backend)
        result = "FAIL" if failed else ("skipped" if not ran else "pass")
        reasons = sorted({c.skip_reason for c in members if c.skip_reason})
        if reasons:
            result += f" ({'; '.join(reasons)})" if not ran else f" ({skipped} skipped: {'; '.join(reasons)})"
        rows.append((name, backend, precision, f"{tol.rtol:.0e}", len(ran) - len(failed), len(failed), skipped,
                     testing._fmt(worst_rel), _ratio_text(worst) if ran else "-", result))
        json_rows.append({"op": name, "backend": backend, "precision": precision, "rtol": tol.rtol, "atol": tol.atol,
                          "passed": len(ran) - len(failed), "failed": len(failed), "skipped": skipped,
                          "skip_reasons": reasons, "worst_rel_err": testing._json_float(worst_rel),
                          "worst_err_over_tol": testing._json_float(worst) if ran else None,
                          "worst_case": worst_case.label if worst_case else None, "result": result.split(" ")[0]})
    return rows, json_rows


# ---------------------------------------------------------------- the model check

def _load_weights(path: Path, model_name: str):
    """``(state_dict, checkpoint or None)`` from an stfast checkpoint or a raw state dict file."""
    from .training.trainer import load_checkpoint

    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file {path}")
    try:
        checkpoint = load_checkpoint(path)
    except ValueError:
        checkpoint = None
    if checkpoint is not None:
        if str(checkpoint.get("model_name", "")).lower() != model_name.lower():
            raise ValueError(f"--checkpoint: {path} holds a {checkpoint.get('model_name')!r} model, not {model_name!r}")
        return checkpoint["model"], checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or truncated file: say which one
        raise ValueError(f"--checkpoint: {path} is neither an stfast checkpoint nor a state dict ({error})") from error
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint: {path} is neither an stfast checkpoint nor a state dict of tensors")
    if all(k.startswith("model.") for k in state):  # a whole Forecaster's state dict
        state = {k[len("model."):]: v for k, v in state.items()}
    return state, None


def _model_cases(args, device: torch.device) -> tuple[list[Case], dict, torch.nn.Module]:
    """The model check's cases, what to print about them, and the reference they share."""

    from . import configs, models, ops

    name = args.model.lower()
    module = models.model_module(name)  # ValueError naming the zoo's models
    fused = [b for b in module.BACKENDS if b != "reference"]
    if not fused:
        with_fused = [m for m in models.available() if any(b != "reference" for b in models.backends(m))]
        raise ValueError(f"--model {name}: there is no fused module to check yet: {name} runs only as its reference "
                         f"implementation (backend 'reference'). Models with a fused module: {', '.join(with_fused)}")
    if args.backends:
        unknown = [b for b in args.backends if b not in fused]
        if unknown:
            raise ValueError(f"--backends: {name}'s fused module runs on {', '.join(fused)}, got {', '.join(unknown)}")
        backends = list(dict.fromkeys(args.backends))
    else:
        backends = [module.DEFAULT_BACKEND]
    if args.ops:
        raise ValueError("--ops: only used without --model")
    precisions = _precisions(args, device)
    batch_size = _positive("--batch-size", args.batch_size, 2)
    num_batches = _positive("--batches", args.batches, 1)

    state, checkpoint = (None, None)
    if args.checkpoint is not None:
        state, checkpoint = _load_weights(args.checkpoint, name)
    dataset = args.dataset or (checkpoint["dataset"] if checkpoint else "METR-LA")
    dataset = configs.canonical_dataset(dataset)
    if checkpoint and configs.canonical_dataset(checkpoint["dataset"]) != dataset:
        raise ValueError(f"--dataset: the checkpoint was trained on {checkpoint['dataset']}, got {dataset}")
    overrides = dict(checkpoint.get("model_args", {})) if checkpoint else {}

    data = None
    if args.data is not None:
        from .data import load_dataset

        data = load_dataset(dataset, args.data)
    context = models.build_context(name, dataset, data=data, synthetic_seed=args.seed)
    reference = models.create(name, dataset, backend="reference", context=context, **overrides)
    if state is not None:
        problems = testing.state_dict_differences(reference.model.state_dict(), state, f"{name} on {dataset}",
                                                  "checkpoint")
        if problems:
            raise ValueError(f"--checkpoint: {args.checkpoint} does not fit {name} on {dataset}:\n  "
                             + "\n  ".join(problems))
        reference.model.load_state_dict(state, strict=True)
    reference = reference.to(device)

    batches = _model_batches(name, dataset, data, batch_size, num_batches, args.seed, device)
    tf_decay = getattr(reference.model, "tf_decay_steps", None)
    batches_seen = round(tf_decay * math.log(tf_decay)) if tf_decay and tf_decay > 1 else 0
    threshold = (reference.model.compute_sampling_threshold(batches_seen)
                 if hasattr(reference.model, "compute_sampling_threshold") else None)
    reference_dtype = torch.float64 if args.reference_dtype == "float64" else None
    source = f"{args.data} (test split)" if data is not None else f"synthetic {dataset}-shaped data"
    info = {"model": name, "dataset": dataset, "batch_size": batch_size, "batches": num_batches, "data": source,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None, "batches_seen": batches_seen,
            "sampling_threshold": threshold, "seed": args.seed, "reference_dtype": args.reference_dtype}

    available = ops.available_backends(device)
    cases = []
    candidates: dict[str, object] = {}
    for backend in backends:
        reason = None
        if backend != "auto" and available.get(backend, True) is not True:
            reason = available[backend]
            if args.backends:
                raise ValueError(f"--backends: {backend} cannot run on {device.type}: {reason}")
        for precision in precisions:
            unsupported = reason or testing.unsupported_reason(backend, precision, device)
            for mode in ("eval", "train"):
                for index, (batch, labels) in enumerate(batches):
                    label = f"{name} on {dataset}, {mode} mode" + (f", batch {index}" if num_batches > 1 else "")
                    run = None if unsupported else _model_runner(
                        name, dataset, backend, context, overrides, candidates, reference, device, mode, batch,
                        labels, batches_seen, precision, reference_dtype, args.seed, label)
                    cases.append(Case("model", name, backend, precision, label, run=run, skip_reason=unsupported,
                                      extra={"mode": mode, "batch": index}))
    info["resolved_backends"] = {b: _resolved(b, device) for b in backends}
    return cases, info, reference


def _resolved(backend: str, device: torch.device):
    """The op backend that ``backend`` (e.g. ``auto``) picks for ``meta_gconv`` on ``device``."""
    from . import ops

    try:
        with ops.use_backend(backend):
            return ops.resolve_backend("meta_gconv", device)
    except (RuntimeError, ValueError):
        return None


def _model_batches(name, dataset, data, batch_size, num_batches, seed, device):
    from .data import synthetic_batch

    out = []
    if data is not None:
        for batch in data.batches("test", batch_size):
            out.append((batch.to(device), data.scaler.transform(batch.y).to(device)))
            if len(out) == num_batches:
                break
        return out
    for index in range(num_batches):
        batch, scaler = synthetic_batch(dataset, batch_size, seed=seed + index, device=device, return_scaler=True)
        out.append((batch, scaler.transform(batch.y)))
    return out


def _model_runner(name, dataset, backend, context, overrides, candidates, reference, device, mode, batch, labels,
                  batches_seen, precision, reference_dtype, seed, label):
    def run() -> testing.Report:
        from . import models

        if backend not in candidates:
            candidates[backend] = models.create(name, dataset, backend=backend, context=context, **overrides).to(device)
        candidate = candidates[backend]
        candidate.train(mode == "train")
        reference.train(mode == "train")
        inputs = {"args": (batch,)}
        if mode == "train" and reference.spec.teacher_forcing:
            inputs["kwargs"] = {"labels": labels, "batches_seen": batches_seen}
        tol = testing.default_tolerance(precision, backend, device)
        oracle = "float64" if reference_dtype is not None else precision
        resolved = _resolved(backend, device)
        shown = f"{backend} -> {resolved}" if resolved and resolved != backend else backend
        return testing.compare_modules(
            candidate, reference, inputs, dtype=precision, reference_dtype=reference_dtype, seed=seed, tolerance=tol,
            title=f"{label}: fused ({shown} backend) vs reference ({oracle}), {precision} on {device.type}")
    return run


# ---------------------------------------------------------------- running and reporting

def summary_line(total: int, failed: int, skipped: int, elapsed: float) -> str:
    """``"94 case(s) in 12.3s: 89 checked (89 passed, 0 failed), 5 skipped -> PASS"``: the parts add up."""
    checked = total - skipped
    return (f"{total} case(s) in {elapsed:.1f}s: {checked} checked ({checked - failed} passed, {failed} failed)"
            + (f", {skipped} skipped" if skipped else "") + (" -> FAIL" if failed else " -> PASS"))


def _versions() -> dict:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or not importable
        triton_version = None
    return {"stfast": __version__, "torch": torch.__version__, "triton": triton_version}


def _run_cases(cases: list[Case], progress: bool) -> None:
    from ._progress import ProgressBar

    todo = [c for c in cases if c.run is not None]
    bar = ProgressBar(len(todo), "stfast check", enabled=progress and bool(todo))
    failed = 0
    for case in todo:
        start = time.perf_counter()
        try:
            case.report = case.run()
        except Exception as error:  # a crash of the checked code is a failed check, not a usage error
            case.error = f"{type(error).__name__}: {error}"
        case.seconds = time.perf_counter() - start
        failed += case.status == "failed"
        bar.update(1, f"{case.name} {case.backend} {case.precision}" + (f", {failed} failed" if failed else ""))
    bar.close(f"done, {failed} failed" if failed else "done, all passed")


def run_check(args) -> int:
    """Run ``stfast check`` for parsed ``args``; 0 if every check passed, 1 if one failed.

    Bad arguments raise ``ValueError`` (``stfast.cli`` turns it into exit code 2)."""
    device = _device(args.device)
    torch.manual_seed(args.seed)
    if args.model is None:
        _model_only_flags(args)
        cases, not_checked = _op_cases(args, device)
        info = {}
    else:
        cases, info, _ = _model_cases(args, device)
        not_checked = {}
    if not any(c.run is not None for c in cases):
        reasons = sorted({c.skip_reason for c in cases if c.skip_reason})
        raise ValueError("nothing to check with these --backends/--dtypes on "
                         f"{device.type}: {'; '.join(reasons) or 'no cases'}")
    print(f"stfast check on {describe_device(device)}: "
          + (f"{info['model']} on {info['dataset']} ({info['data']}, batch size {info['batch_size']})"
             if args.model else f"ops {', '.join(dict.fromkeys(c.name for c in cases))}"
             + (" (quick grid)" if args.quick else "")), flush=True)
    started = time.perf_counter()
    _run_cases(cases, progress=not args.no_progress)
    elapsed = time.perf_counter() - started

    failed = [c for c in cases if c.status == "failed"]
    if args.model:
        summary_json = _print_model(cases, info, args.verbose)
    else:
        summary_json = _print_ops(cases, not_checked, args.verbose)
    ran = sum(c.status != "skipped" for c in cases)
    skipped = len(cases) - ran
    print(summary_line(len(cases), len(failed), skipped, elapsed))
    provisional = {c.precision for c in cases if c.report and c.report.meta.get("provisional_tolerance")}
    if provisional:
        print(f"note: the {', '.join(sorted(provisional))} tolerances on this device are provisional until measured "
              "on a GPU (see stfast.testing.DEFAULT_TOLERANCES)")

    if args.json:
        payload = {"command": "model" if args.model else "ops", "device": describe_device(device), **_versions(),
                   "quick": bool(args.quick), "passed": not failed, "seconds": round(elapsed, 2),
                   "tolerances": {k: {"atol": t.atol, "rtol": t.rtol, "basis": t.basis, "provisional": t.provisional}
                                  for k, t in testing.DEFAULT_TOLERANCES.items()},
                   **({"model": info} if args.model else {"not_checked": not_checked}),
                   "summary": summary_json, "cases": [c.to_dict() for c in cases]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _print_ops(cases: list[Case], not_checked: dict, verbose: bool) -> list:
    for case in cases:
        if case.status == "failed" or (verbose and case.report is not None):
            print()
            print(case.report if case.report is not None else f"{case.name} [{case.backend}, {case.precision}] "
                                                              f"{case.label}: {case.error}")
    rows, json_rows = _op_summary(cases)
    print()
    print(_table(("op", "backend", "precision", "rtol", "passed", "failed", "skipped", "worst rel err",
                  "worst err/tol", "result"),
                 rows, left=3))
    for backend, reason in not_checked.items():
        print(f"  not checked: {backend} ({reason})")
    return json_rows


def _print_model(cases: list[Case], info: dict, verbose: bool) -> list:
    if info.get("sampling_threshold") is not None:
        print(f"training mode: teacher forcing with batches_seen={info['batches_seen']} (sampling threshold "
              f"{info['sampling_threshold']:.2f}), NumPy and PyTorch seeded with {info['seed']} before each run")
    rows, json_rows = [], []
    for case in cases:
        print()
        if case.report is not None:
            print(case.report)
        elif case.skip_reason:
            print(f"{case.label} [{case.backend}, {case.precision}]: skipped ({case.skip_reason})")
        else:
            print(f"{case.label} [{case.backend}, {case.precision}]: {case.error}")
        report = case.report
        worst = report.worst if report is not None else None
        result = {"passed": "pass", "failed": "FAIL", "skipped": "skipped"}[case.status]
        rows.append((case.label, case.backend, case.precision,
                     f"{report.rows[0].rtol:.0e}" if report and report.rows else "-",
                     len(report.rows) if report else 0, len(report.failures) if report else 0,
                     _ratio_text(worst.ratio) if worst else "-", worst.name if worst else "-",
                     result + (f" ({case.skip_reason or case.error})" if case.status != "passed" and not report else "")))
        json_rows.append({"label": case.label, "backend": case.backend, "precision": case.precision,
                          "mode": case.extra.get("mode"), "checks": len(report.rows) if report else 0,
                          "failed": len(report.failures) if report else 0,
                          "worst_err_over_tol": testing._json_float(worst.ratio) if worst else None,
                          "worst_check": worst.name if worst else None, "result": case.status})
    print()
    print(_table(("case", "backend", "precision", "rtol", "checks", "failed", "worst err/tol", "worst check",
                  "result"), rows, left=3))
    return json_rows


def main(argv=None) -> int:
    """``python -m stfast.check ...``: the subcommand on its own, with ``stfast``'s exit codes."""
    from .cli import USER_ERRORS

    parser = argparse.ArgumentParser(prog="stfast")
    add_check_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_check(args)
    except USER_ERRORS as error:
        print(f"stfast check: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
