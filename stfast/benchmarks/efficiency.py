"""``stfast bench efficiency``: the efficiency table of HimNet (KDD 2024) regenerated on this machine.

    stfast bench efficiency [--device auto|cpu|cuda] [--models ...] [--backends ...] [--dataset METR-LA]
                            [--batch-size 16] [--quick] [--repeats N] [--warmup N] [--full-epoch]
                            [--timeout S] [--out DIR | --record]

(``python bench/efficiency.py ...`` in a checkout is the same command.)

Every row is one model with one implementation: the published one ("reference") and, for models
built on stfast's ops (HimNet, AGCRN, ...), every stfast op backend that runs on the device. Each row is
measured in a fresh Python process (:mod:`stfast.benchmarks._worker`) so that memory left by one row
cannot hide the next one's, and a crash or out-of-memory kill becomes an error row instead of ending
the table. The unit timed is :func:`stfast.profile`'s training step (forward in training mode, loss,
backward, clipping, Adam step) on a synthetic batch of the dataset's exact shape.

Columns, side by side:

- the paper's figure (``shared/specs/baselines.md`` section 2: METR-LA, batch 16, GPU not stated);
- what was measured: parameters (a check mark when they round to the paper's figure), time per batch
  (median of ``--repeats`` steps after ``--warmup`` untimed ones, with [min, max]), time per epoch
  (median x the dataset's training batches, as in the paper; with ``--full-epoch`` also one real
  epoch), peak memory: on CUDA the caching allocator's peak allocated and reserved memory and the
  process memory the driver reports (the paper's column appears to be this one); on the CPU the
  growth of the resident set during the timed steps;
- for stfast backends, the speed-up and the memory ratio against the same model's reference
  (memory ratio on peak allocated memory on CUDA, RSS growth on the CPU).

HimNet-Θ′, the paper's variant with one ordinary GCRU per temporal context, node and (context, node)
pair, is not runnable: its row gives the parameter count derived from the configuration
(:func:`himnet_theta_prime_params`, 10,874,347,200 on METR-LA) and N/A elsewhere.

Absolute times are not comparable with the paper's (unknown GPU, and batch-16 steps of small models
are launch-bound on a GPU); ratios between rows are.

Duration: README.md's "How long things take" keeps the measured times (dated, with the machine and
its load); ``--quick`` is STID, AGCRN and HimNet, each with its reference and, where the model has
one, stfast's fastest backend, warm-up 1 and 2 timed steps; the default table has warm-up 3 and 10
timed steps per row. ``--full-epoch`` adds one real epoch per row (1,499 batches on METR-LA at batch
16): hours per row on a CPU.

Outputs in ``--out`` (default: a new ``runs/bench/efficiency-<UTC time>/`` under the current
directory, so a run never replaces the recorded results; ``--record`` writes into them,
``bench/results/<device>/efficiency/`` with ``--quick``, ``efficiency-full/`` without): the markdown
table as ``results.md``, ``results.json``, ``results.csv`` and ``efficiency.png`` (time per batch vs
memory, log axes, one marker per model and backend, an arrow from each reference to its stfast rows,
beside the paper's figures). The terminal gets a narrow summary (model, implementation, ms/batch,
speed-up, memory ratio). The PNG needs matplotlib (``pip install 'stfast[plot]'``); without it the
other files are still written and the run says that the figure was skipped.

ST-LoRA rows (``stlora-<backbone>``: the zoo model wrapped by ``stfast.nn.stlora.wrap_forecaster``
with its default options) are offered only when that function exists in the installed stfast. The
default table adds ST-LoRA on STGCN, GWNet, AGCRN and HimNet, each on its backbone's fastest
implementation, with the time the wrapper adds to that backbone row (the target is at most +10%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from ..profiler import device_slug
from .report import STLORA_PREFIX, csv_text, markdown, primary_memory, summary, write_figure

__all__ = ["PAPER", "TABLE_MODELS", "THETA_PRIME", "add_bench_parser", "add_efficiency_options", "build_parser",
           "himnet_theta_prime_params", "himnet_theta_prime_breakdown", "main", "run", "write_figure"]

# The paper's table (shared/specs/baselines.md section 2), in its order:
# model -> (name in the table, #Params as printed, ms per batch, s per epoch, memory in MB).
PAPER = {
    "stid": ("STID", "118K", 8, 12, 1420),
    "stgcn": ("STGCN", "246K", 23, 34, 1650),
    "gwnet": ("GWNet", "309K", 40, 60, 1994),
    "stnorm": ("STNorm", "224K", 39, 59, 1818),
    "dcrnn": ("DCRNN", "372K", 189, 284, 2134),
    "agcrn": ("AGCRN", "752K", 54, 82, 2492),
    "gts": ("GTS", "38.5M", 114, 171, 4096),
    "megacrn": ("MegaCRN", "389K", 89, 134, 1962),
    "stwa": ("ST-WA", "375K", 135, 203, 2668),
    "pdformer": ("PDFormer", "531K", 173, 260, 6938),
    "himnet_theta": ("HimNet-Θ′", "10.9B", None, None, None),
    "himnet": ("HimNet", "1251K", 97, 144, 6056),
}
THETA_PRIME = "himnet_theta"  # the analytic row's name in --models
TABLE_MODELS = [name for name in PAPER if name != THETA_PRIME]
QUICK_MODELS = ["stid", "agcrn", "himnet"]
QUICK_WARMUP, QUICK_REPEATS = 1, 2
DEFAULT_WARMUP, DEFAULT_REPEATS = 3, 10
# Backbones wrapped with ST-LoRA in the default table once stfast.nn.stlora.wrap_forecaster exists.
STLORA_BACKBONES = ("stgcn", "gwnet", "agcrn", "himnet")


DESCRIPTION = ("The efficiency table of HimNet (KDD 2024) regenerated on this machine: parameters, time per batch "
               "and epoch, and peak memory of the paper's models, paper / reference / stfast side by side.")


class BenchError(ValueError):
    """Bad input to the benchmark (reported with exit code 2)."""


# ----------------------------------------------------------------------------------- HimNet-Θ′


def himnet_theta_prime_breakdown(dataset: str = "METR-LA") -> dict:
    """The terms of :func:`himnet_theta_prime_params` (``shared/specs/baselines.md`` section 13).

    HimNet-Θ′ replaces each meta-parameter pool by one ordinary GCRU per entity it distinguishes:
    the temporal encoder one per temporal context (times of day x 7 days of week), the spatial
    encoder one per node, the decoder one per (temporal context, node) pair. A GCRU with input C,
    hidden H and Chebyshev order K has a gate (C+H -> 2H) and a candidate (C+H -> H) graph
    convolution: 3H * (K * (C + H) + 1) parameters. HimNet's 6,777 parameters outside the pools
    (embeddings, projections) are not added: they do not change the published "10.9B".
    """
    from .. import configs

    info = configs.dataset_info(dataset)
    model = configs.himnet_config(info.name)["model"]
    hidden, order, nodes = model["hidden_dim"], model["cheb_k"], model["num_nodes"]
    contexts = info.steps_per_day * 7

    def gcru(channels: int) -> int:
        return 3 * hidden * (order * (channels + hidden) + 1)

    encoder_cell = gcru(model["input_dim"])
    decoder_cell = gcru(model["output_dim"] + model["ycov_dim"])
    params = encoder_cell * contexts + encoder_cell * nodes + decoder_cell * contexts * nodes
    return {"params": params, "temporal_contexts": contexts, "nodes": nodes, "hidden_dim": hidden, "cheb_k": order,
            "encoder_gcru_params": encoder_cell, "decoder_gcru_params": decoder_cell,
            "gcrus": contexts + nodes + contexts * nodes}


def himnet_theta_prime_params(dataset: str = "METR-LA") -> int:
    """Parameters of HimNet-Θ′ on ``dataset``: 10,874,347,200 on METR-LA (the paper's "10.9B")."""
    return himnet_theta_prime_breakdown(dataset)["params"]


# ------------------------------------------------------------------------------------ helpers


def short_count(count: int) -> str:
    """A parameter count in the paper's style: 117,868 -> "118K", 38,478,291 -> "38.5M"."""
    if count < 10**7:
        return f"{count / 1e3:.0f}K"
    if count < 10**10:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e9:.1f}B"


def _stlora_available() -> bool:
    from ._worker import _wrap_stlora

    return _wrap_stlora() is not None


def _display_name(model: str) -> str:
    if model.startswith(STLORA_PREFIX):
        return "ST-LoRA+" + _display_name(model[len(STLORA_PREFIX):])
    return PAPER[model][0] if model in PAPER else model


def _base_model(model: str) -> str:
    return model[len(STLORA_PREFIX):] if model.startswith(STLORA_PREFIX) else model


# ------------------------------------------------------------------------------ the row plan


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device: expected a device this machine has (cpu), got {name!r}: "
                         f"torch {torch.__version__} sees no CUDA GPU")
    return device


def accepted_models() -> list[str]:
    from .. import models

    names = models.available() + [THETA_PRIME]
    if _stlora_available():
        names += [STLORA_PREFIX + name for name in models.available() if name != "hi"]
    return names


def accepted_backends() -> list[str]:
    from .. import models
    from ..ops.backends import BACKENDS

    names = {"reference", "auto", *BACKENDS}
    for model in models.available():
        names.update(models.backends(model))
    return sorted(names)


def _check_choices(flag: str, values, accepted) -> None:
    unknown = [value for value in values if value not in accepted]
    if unknown:
        got = ", ".join(repr(value) for value in unknown)
        raise BenchError(f"{flag}: expected some of {accepted}, got {got}")


def _concrete_op_backends(model: str, device) -> dict[str, bool | str]:
    """``{backend: True | why not}`` for each op backend of ``model`` other than "auto"."""
    from .. import models, ops

    names = [name for name in models.backends(_base_model(model)) if name not in ("reference", "auto")]
    if not names:  # probing the backends may build the C++ extension: only when a model has op backends
        return {}
    status = ops.available_backends(device, "meta_gconv")
    return {name: status.get(name, "unknown backend") for name in names}


def _auto_backend(device) -> str | None:
    from .. import ops

    try:
        with ops.use_backend("auto"):
            return ops.resolve_backend("meta_gconv", device)
    except RuntimeError:
        return None


def plan_rows(models_: list[str], backends: list[str] | None, device,
              quick: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """The (model, backend) pairs to measure, in table order, and notes on what was left out."""
    from .. import models as zoo

    plan, notes = [], []
    for model in models_:
        if model == THETA_PRIME:
            plan.append((model, "analytic"))
            continue
        offered = zoo.backends(_base_model(model))
        op_status = _concrete_op_backends(model, device)
        if backends is None:  # defaults: reference and every op backend that runs here
            chosen = ["reference"] if "reference" in offered else []
            auto = _auto_backend(device) if "auto" in offered else None
            if quick or model.startswith(STLORA_PREFIX):
                # the fastest one only (what "auto" picks, by its own name when the model has it); ST-LoRA
                # rows measure the wrapper's overhead on the backbone's fastest implementation only
                if auto and model.startswith(STLORA_PREFIX):
                    chosen = []
                chosen += [auto if auto in op_status else "auto"] if auto else []
            else:
                chosen += [name for name, ok in op_status.items() if ok is True]
                if auto and auto not in op_status:  # e.g. the C++ kernels, reachable only through "auto"
                    chosen.append("auto")
        else:
            chosen = []
            for name in backends:
                if name not in offered:
                    hint = "; 'auto' reaches the fastest op backend" if "auto" in offered else ""
                    notes.append(f"{_display_name(model)}: no {name!r} backend (it has {offered}{hint})")
                elif name in op_status and op_status[name] is not True:
                    notes.append(f"{_display_name(model)}: backend {name!r} skipped on {device.type}: "
                                 f"{op_status[name]}")
                else:
                    chosen.append(name)
        plan += [(model, name) for name in chosen]
    return plan, notes


def _default_models(quick: bool) -> list[str]:
    if quick:
        return QUICK_MODELS + [THETA_PRIME]
    names = list(PAPER)
    if _stlora_available():
        names += [STLORA_PREFIX + name for name in STLORA_BACKBONES]
    return names


def _ordered(models_: list[str]) -> list[str]:
    """Table order: the paper's rows first (HimNet-Θ′ before HimNet when both are asked for), then
    the others as given; duplicates dropped."""
    unique = list(dict.fromkeys(models_))
    paper = [name for name in PAPER if name in unique]
    return paper + [name for name in unique if name not in PAPER]


# ------------------------------------------------------------------------------- measurement


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int) -> str:
    """Why a worker ended without a result, from its exit status."""
    if returncode < 0:
        name = _signal_name(-returncode)
        hint = " (likely killed for lack of memory)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with status {returncode} without a result"


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def run_worker(spec: dict, timeout: float | None = None, stream=None) -> dict:
    """Measure one row in a fresh process; its output is forwarded, indented, to ``stream``."""
    stream = sys.stderr if stream is None else stream
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="stfast-bench-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "stfast.benchmarks._worker", str(spec_path), str(result_path)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        timer = None
        timed_out = threading.Event()
        if timeout is not None:
            def kill():
                timed_out.set()
                process.kill()
            timer = threading.Timer(timeout, kill)
            timer.start()
        tail = deque(maxlen=20)
        try:
            for line in process.stdout:
                tail.append(line.rstrip())
                stream.write("    " + line if not line.startswith("    ") else line)
                stream.flush()
            returncode = process.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        if timed_out.is_set():
            return {"ok": False, "error": f"timed out after {timeout:g} s (--timeout)"}
        if result_path.is_file():
            try:
                return json.loads(result_path.read_text())
            except json.JSONDecodeError:
                pass
        detail = "; ".join(line for line in list(tail)[-3:] if line)
        return {"ok": False, "error": describe_exit(returncode) + (f": {detail}" if detail else "")}


def _paper_figures(model: str) -> dict | None:
    if model not in PAPER:
        return None
    _, params, ms, seconds, memory = PAPER[model]
    return {"params": params, "ms_per_batch": ms, "s_per_epoch": seconds, "memory_mb": memory}


def _implementation(backend: str, resolved: str | None = None) -> str:
    if backend in ("reference", "analytic"):
        return backend
    return f"stfast {backend}" + (f" ({resolved})" if resolved and resolved != backend else "")


def _row(model: str, backend: str, result: dict, dataset: str, wall_s: float | None) -> dict:
    row = {
        "model": model, "name": _display_name(model), "backend": backend, "implementation": _implementation(backend),
        "resolved_backend": None, "status": "ok",
        "paper": _paper_figures(model) if backend in ("reference", "analytic") else None,
        "params": None, "params_match_paper": None, "time_per_batch_ms": None, "time_per_epoch_s": None,
        "full_epoch_s": None, "peak_memory_mb": None, "speedup_vs_reference": None,
        "memory_ratio_vs_reference": None, "process_memory_ratio_vs_reference": None,
        "stlora_time_overhead": None, "stlora_memory_overhead": None, "device": None,
        "error": None, "note": None, "wall_s": wall_s,
    }
    if backend == "analytic":
        breakdown = himnet_theta_prime_breakdown(dataset)
        row.update(status="analytic", params=breakdown["params"], analytic=breakdown,
                   note=f"not runnable: {breakdown['gcrus']:,} ordinary GCRUs (one per temporal context, node and "
                        f"(context, node) pair) of {breakdown['decoder_gcru_params']:,} parameters each; "
                        "time and memory N/A")
    elif result.get("ok"):
        report = result["report"]
        row.update(resolved_backend=result.get("resolved_backend"), params=report["params"],
                   implementation=_implementation(backend, result.get("resolved_backend")),
                   time_per_batch_ms=report["time_per_batch_ms"], time_per_epoch_s=report["time_per_epoch_s"],
                   peak_memory_mb=report["peak_memory_mb"], device=report["device"])
        if result.get("full_epoch"):
            row["full_epoch_s"] = result["full_epoch"]["seconds"]
    else:
        row.update(status="error", error=result.get("error", "unknown error"))
    if row["params"] is not None and row["paper"] is not None:
        row["params_match_paper"] = short_count(row["params"]) == row["paper"]["params"]
    return row


def _add_ratios(rows: list[dict]) -> None:
    references = {row["model"]: row for row in rows if row["backend"] == "reference" and row["status"] == "ok"}
    for row in rows:
        base = references.get(row["model"])
        if row["status"] != "ok" or row["backend"] == "reference" or base is None:
            continue
        row["speedup_vs_reference"] = base["time_per_batch_ms"]["median"] / row["time_per_batch_ms"]["median"]
        mine, theirs = primary_memory(row["peak_memory_mb"]), primary_memory(base["peak_memory_mb"])
        if mine and theirs is not None:
            row["memory_ratio_vs_reference"] = theirs / mine
        mine, theirs = row["peak_memory_mb"].get("process"), base["peak_memory_mb"].get("process")
        if mine and theirs:
            row["process_memory_ratio_vs_reference"] = theirs / mine
    # ST-LoRA rows: what the wrapper adds to its backbone with the same backend (the target is <= 10% time).
    plain = {(row["model"], row["backend"]): row for row in rows if row["status"] == "ok"}
    for row in rows:
        backbone = plain.get((_base_model(row["model"]), row["backend"]))
        if row["status"] != "ok" or not row["model"].startswith(STLORA_PREFIX) or backbone is None:
            continue
        row["stlora_time_overhead"] = row["time_per_batch_ms"]["median"] / backbone["time_per_batch_ms"]["median"] - 1
        mine, theirs = primary_memory(row["peak_memory_mb"]), primary_memory(backbone["peak_memory_mb"])
        if mine is not None and theirs:
            row["stlora_memory_overhead"] = mine / theirs - 1


# --------------------------------------------------------------------------------------- run


def _check_counts(args) -> None:
    for flag, value, minimum in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                                 ("--warmup", args.warmup, 0)):
        if value is not None and value < minimum:
            raise BenchError(f"{flag}: expected an integer >= {minimum}, got {value}")
    if args.timeout is not None and args.timeout <= 0:
        raise BenchError(f"--timeout: expected a positive number of seconds, got {args.timeout}")


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages: other work on the machine inflates CPU timings."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _command_line(args) -> str:
    argv = getattr(args, "argv", None)
    if argv is None:  # through the stfast command line
        return " ".join(["stfast", *sys.argv[1:]])
    return " ".join(["stfast bench efficiency", *argv])


def output_folder(args, device_description: str) -> Path:
    """Where a run writes: ``--out``; with ``--record`` the recorded results under ``bench/results/``
    (tracked files: only on request); by default a new per-run folder under ``runs/bench/``."""
    if args.out:
        return Path(args.out)
    if getattr(args, "record", False):
        return Path("bench") / "results" / device_slug(device_description) / (
            "efficiency" if args.quick else "efficiency-full")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("runs") / "bench" / f"efficiency-{stamp}"


def _check_precision(precision: str, device) -> None:
    from ..training.precision import Precision

    try:
        Precision(precision, device)
    except ValueError as error:
        raise BenchError(f"--{error}") from None


def run(args, stdout=None, stderr=None) -> int:
    """``stfast bench efficiency`` with parsed ``args``; raises :class:`BenchError` on bad input."""
    import torch

    from .. import __version__, configs
    from ..profiler import describe_device

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    _check_counts(args)
    dataset = configs.canonical_dataset(args.dataset) if args.dataset else "METR-LA"
    device = _resolve_device(args.device)
    models_ = args.models if args.models else _default_models(args.quick)
    _check_choices("--models", models_, accepted_models())
    if args.backends:
        _check_choices("--backends", args.backends, accepted_backends())
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    _check_precision(args.precision, device)
    plan, notes = plan_rows(_ordered(models_), args.backends, device, args.quick)
    if not plan:
        raise BenchError("--models/--backends: expected at least one (model, backend) pair to run, got none: "
                         + "; ".join(notes))
    description = describe_device(device)
    out = output_folder(args, description)
    if args.full_epoch:
        print("--full-epoch: each row also trains one full epoch on synthetic data; on a CPU that is hours "
              "per recurrent model", file=stderr)

    load_before = _load_average()
    started = time.perf_counter()
    rows = []
    measured = [pair for pair in plan if pair[1] != "analytic"]
    for model, backend in plan:
        if backend == "analytic":
            rows.append(_row(model, backend, {}, dataset, None))
            continue
        index = measured.index((model, backend)) + 1
        print(f"[{index}/{len(measured)}] {_display_name(model)} ({_implementation(backend)}) ...", file=stderr,
              flush=True)
        spec = {"model": model, "backend": backend, "dataset": dataset, "batch_size": args.batch_size,
                "device": str(device), "warmup": warmup, "repeats": repeats, "full_epoch": bool(args.full_epoch),
                "seed": 0, "precision": args.precision}
        row_start = time.perf_counter()
        outcome = run_worker(spec, timeout=args.timeout, stream=stderr)
        row = _row(model, backend, outcome, dataset, time.perf_counter() - row_start)
        rows.append(row)
        if row["status"] == "ok":
            print(f"    {row['time_per_batch_ms']['median']:,.1f} ms/batch, "
                  f"memory {primary_memory(row['peak_memory_mb']):,.1f} MB, {row['wall_s']:.0f} s", file=stderr,
                  flush=True)
        else:
            print(f"    error: {row['error']}", file=stderr, flush=True)
    _add_ratios(rows)
    reported = next((row["device"] for row in rows if row["device"]), description)
    meta = {
        "command": _command_line(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stfast": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": reported, "device_type": device.type, "dataset": dataset, "batch_size": args.batch_size,
        "train_batches": configs.dataset_info(dataset).train_batches(args.batch_size),
        "models": list(dict.fromkeys(model for model, _ in plan)),
        "warmup": warmup, "repeats": repeats, "quick": bool(args.quick), "full_epoch": bool(args.full_epoch),
        "precision": args.precision, "duration_s": time.perf_counter() - started, "cpu_count": os.cpu_count(),
        "load_average": {"before": load_before, "after": _load_average()}, "notes": notes,
        "figure": None, "figure_skipped": None,
    }
    result = {"meta": meta, "rows": rows}

    out.mkdir(parents=True, exist_ok=True)
    skipped = write_figure(result, out / "efficiency.png")
    if skipped:
        meta["figure_skipped"] = skipped
        meta["notes"].append(f"efficiency.png skipped: {skipped}")
    else:
        meta["figure"] = "efficiency.png"
    table = markdown(result)
    stdout.write(summary(result))
    stdout.flush()
    (out / "results.md").write_text(table, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.csv").write_text(csv_text(result), encoding="utf-8")
    written = ["results.md", "results.json", "results.csv"] + ([] if skipped else ["efficiency.png"])
    print(f"wrote {', '.join(written)} in {out} ({meta['duration_s']:.0f} s); the full table is "
          f"{out / 'results.md'}", file=stderr)
    if skipped:
        print(f"efficiency.png skipped: {skipped}", file=stderr)
    failed = [row for row in rows if row["status"] == "error"]
    if failed and len(failed) == len(measured):
        print("no row could be measured (see the errors above)", file=stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------- parsers


def add_efficiency_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help=f"default: the paper's table ({', '.join(PAPER)}; {THETA_PRIME} is the analytic "
                             f"HimNet-Θ′ row) and, when stfast.nn.stlora exists, ST-LoRA on "
                             f"{', '.join(STLORA_BACKBONES)}; any zoo model is accepted, and stlora-<model> for "
                             f"ST-LoRA on it; with --quick: {', '.join(QUICK_MODELS)}")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND",
                        help="implementations to measure where a model has them: 'reference' (the published one) "
                             "and stfast op backends (auto, torch, triton, ...). Default: reference plus every op "
                             "backend that runs on the device (with --quick: the fastest one)")
    parser.add_argument("--dataset", default="METR-LA", help="dataset whose shape the synthetic data has")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help=f"the short table: {', '.join(QUICK_MODELS)} (reference and stfast's fastest backend), "
                             f"warm-up {QUICK_WARMUP}, {QUICK_REPEATS} repeats")
    parser.add_argument("--warmup", type=int, help=f"untimed steps (default {DEFAULT_WARMUP}, quick {QUICK_WARMUP})")
    parser.add_argument("--repeats", type=int, help=f"timed steps (default {DEFAULT_REPEATS}, quick {QUICK_REPEATS})")
    parser.add_argument("--full-epoch", action="store_true",
                        help="also train one real epoch per row on synthetic data of the dataset's full shape "
                             "(long: minutes per row on a GPU, hours per recurrent model on a CPU)")
    parser.add_argument("--timeout", type=float, help="seconds after which a row is stopped and reported as an error")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"],
                        help="training precision of every row (default fp32; tf32 on CUDA only; bf16 / fp16: "
                             "autocast, fp16 with a gradient scaler)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder (default: a new runs/bench/efficiency-<UTC time> under the "
                                     "current directory)")
    where.add_argument("--record", action="store_true",
                       help="write into the recorded results, bench/results/<device>/efficiency (or efficiency-full "
                            "without --quick), replacing what is there")
    return parser


def _epilog() -> str:
    return ("Each row runs in a fresh process. How long a run takes depends on the device and on what else runs "
            "there: README.md ('How long things take') gives measured, dated durations with the machine and its "
            "load. --full-epoch adds one real epoch per row: hours per recurrent model on a CPU.")


def _cmd(args) -> int:
    return run(args)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with its sub-command ``efficiency``) to a ``stfast`` sub-parser set."""
    bench = subparsers.add_parser("bench", help="benchmarks: the HimNet paper's efficiency table on this machine")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    efficiency = commands.add_parser("efficiency", help="params, time per batch/epoch and peak memory of the paper's "
                                                        "models: paper, reference and stfast side by side",
                                     description=DESCRIPTION, epilog=_epilog())
    add_efficiency_options(efficiency)
    efficiency.set_defaults(func=_cmd)
    from .stlora import add_stlora_parser  # imported here: stlora builds on this module's worker machinery

    add_stlora_parser(commands)
    return bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stfast bench efficiency", description=DESCRIPTION,
                                     epilog=_epilog())
    return add_efficiency_options(parser)


def main(argv=None) -> int:
    """``stfast bench efficiency`` on its own (``argv`` without the ``bench efficiency`` words)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except (ValueError, TypeError, ImportError) as error:
        print(f"stfast bench efficiency: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stfast bench efficiency: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
