"""The largest batch whose training step fits a CPU memory budget, per model, backend and LargeST dataset.

    python bench/largest_fit.py [--budget-gib 16] [--models himnet agcrn stid gwnet] [--datasets SD GBA GLA CA]
                                [--backends reference cpu torch] [--no-verify] [--verify-timeout S] [--out DIR]

For every (model, backend, dataset), :func:`stfast.benchmarks.largest_fit.largest_fit` predicts with
``estimate_memory`` (CPU) the largest batch among the powers of two below the configuration's batch and
that batch whose one training step (parameters + Adam state + the step's peak) fits ``--budget-gib``;
the candidate one up is predicted not to fit. Then, one at a time, that step runs for real in a fresh,
address-space-capped process (``verify_fit``: ``measure_step_memory`` on synthetic inputs of the dataset's
shape) and its measured total is compared with the budget and the prediction. Backends: ``reference``
for every model, and stfast's fused ops (``cpu``: the C++ extension; ``torch``: the ops' PyTorch
composition) for the models built on them.

Rows are merged into ``bench/results/<device>/largest_fit.{json,md}`` (keyed by model, backend, dataset
and budget), so the table can be filled in several runs; each row records the code it measured (the
commit, whether ``stfast/nn/himnet.py`` had uncommitted changes, the C++ extension's build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from stfast import configs, models
from stfast.benchmarks.largest_fit import GIB, GUARD_HEADROOM, check_budget, largest_fit, verify_fit
from stfast.profiler import describe_device, device_slug

MODELS = ("himnet", "agcrn", "stid", "gwnet")
BACKENDS = ("reference", "cpu", "torch")
ROOT = Path(__file__).resolve().parents[1]
_KEY = ("model", "backend", "dataset", "budget")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_state(model: str, backend: str) -> dict:
    """What was measured: the commit, uncommitted changes to the model's module, the extension's build."""
    from stfast.ops import _ext

    source = ROOT / "stfast" / "nn" / "himnet.py"
    state = {"commit": _git("rev-parse", "--short", "HEAD"),
             "himnet_py_modified": bool(_git("status", "--porcelain", "--", str(source))),
             "himnet_py_sha256": hashlib.sha256(source.read_bytes()).hexdigest()[:12]}
    if backend == "cpu":
        info = _ext.build_info()
        built = dict(part.split("=", 1) for part in info.split() if "=" in part).get("sources")
        root = _ext.csrc_dir()
        state["extension"] = info
        state["extension_stale"] = None if root is None or built is None else built != _ext.sources_hash(root)
    return state


def backends_of(model: str, wanted) -> list[str]:
    return [backend for backend in wanted if backend in models.backends(model)]


def measure_row(model: str, backend: str, dataset: str, budget: int, *, verify: bool, timeout: float) -> dict:
    started = time.perf_counter()
    search = largest_fit(model, backend, dataset, budget)
    row = dict(model=model, backend=backend, dataset=dataset, num_nodes=configs.dataset_info(dataset).num_nodes,
               budget=budget, config_batch=search.candidates[-1], batch=search.batch,
               resting=search.resting, predicted={str(b): t for b, t in sorted(search.predicted.items())},
               next_up=search.next_up, search_seconds=round(time.perf_counter() - started, 1),
               code=code_state(model, backend))
    print(f"{dataset:4s} {model:7s} {backend:9s} largest batch predicted to fit {search.batch} "
          f"(of {list(search.candidates)}); one up: {search.next_up}", flush=True)
    if verify and search.batch is not None:
        row["load_average"] = list(os.getloadavg())  # the machine may be shared: the wall time is no speed result
        result = verify_fit(model, backend, dataset, search.batch, budget, timeout=timeout)
        row["measured"] = result
        row["verified"] = bool(result.get("ok")) and result["total"] <= budget
        if result.get("ok"):
            print(f"    measured total {result['total'] / GIB:.2f} GiB (predicted "
                  f"{search.predicted[search.batch] / GIB:.2f}), peak resident set {result['max_rss'] / GIB:.2f} GiB, "
                  f"{result['seconds']} s", flush=True)
        else:
            print(f"    not verified: {result['error']}", flush=True)
    return row


def _gib(value) -> str:
    return "" if value is None else f"{value / GIB:,.2f}"


def _table_row(row: dict) -> str:
    batch, predicted = row["batch"], row["predicted"]
    predicted_total = predicted.get(str(batch)) if batch is not None else None
    up = row["next_up"]
    up_cell = f"{up}: {_gib(predicted[str(up)])}" if up is not None else "(config batch fits)"
    measured = row.get("measured") or {}
    if measured.get("ok"):
        ratio = (predicted_total - row["resting"]) / measured["step_peak"]
        cells = [_gib(measured["total"]), f"{ratio:.3f}", _gib(measured["max_rss"]),
                 "yes" if row["verified"] else "**no**", f"{measured['seconds']:.0f}"]
    else:
        note = measured.get("error", "not run")[:60].replace("|", "/") if row["batch"] is not None else "-"
        cells = ["", "", "", note, ""]
    code = row["code"]
    code_cell = code["commit"] + (" + himnet.py diff" if code["himnet_py_modified"] and row["model"] == "himnet" else "")
    if code.get("extension_stale"):
        code_cell += " (stale _C)"
    return (f"| {row['dataset']} | {row['num_nodes']:,} | {row['model']} | {row['backend']} | {row['config_batch']} | "
            f"{'none' if batch is None else batch} | {_gib(predicted_total)} | {up_cell} | " + " | ".join(cells)
            + f" | {code_cell} |")


def markdown(rows: list[dict], device: str) -> str:
    budgets = sorted({row["budget"] for row in rows})
    lines = [
        "# The largest batch whose training step fits a CPU memory budget",
        "",
        f"Device: {device}. Budget(s): {', '.join(f'{b / GIB:g} GiB' for b in budgets)}. GiB = 2^30 bytes.",
        "Candidates: the powers of two below each model's LargeST configuration batch, and that batch. **batch**:",
        "the largest predicted by `estimate_memory` (CPU, parameters + Adam state + the step's peak) to fit;",
        "**one up**: the next candidate and its predicted total (predicted not to fit, never run). **measured**:",
        "that step run for real (`measure_step_memory`: a warm-up step then the measured one, synthetic inputs of",
        "the dataset's shape and the synthetic graph, PyTorch's allocations) in a fresh process whose address",
        f"space is capped at its size after imports + the budget + {GUARD_HEADROOM / GIB:g} GiB; **ratio**: predicted",
        "/ measured step peak; **peak RSS**: the whole process's resident-set peak (interpreter, profiler records,",
        "retained C-allocator pages on top); **fits** = the measured total is within the budget. **code**: the",
        "commit, `+ himnet.py diff` when `stfast/nn/himnet.py` had uncommitted changes (HimNet rows), `stale _C`",
        "when the C++ extension was built from other csrc/ sources. **seconds**: the verifying process's wall time",
        "(its load average is in the JSON; not a speed result). `python bench/largest_fit.py` regenerates this file.",
        "",
        "| dataset | N | model | backend | config batch | batch | predicted (GiB) | one up: predicted (GiB) | "
        "measured (GiB) | ratio | peak RSS (GiB) | fits | seconds | code |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|",
    ]
    order = {name: i for i, name in enumerate((*MODELS, *BACKENDS, *configs.LARGEST_DATASETS))}
    for row in sorted(rows, key=lambda r: (r["budget"], order.get(r["dataset"], 99), order.get(r["model"], 99),
                                           order.get(r["backend"], 99))):
        lines.append(_table_row(row))
    verified = sum(bool(row.get("verified")) for row in rows)
    runnable = sum(row["batch"] is not None for row in rows)
    lines += ["", f"{verified} of the {runnable} rows with a batch that fits were run and fit; `not run`: predicted only."]
    return "\n".join(lines) + "\n"


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    rows = {tuple(row[k] for k in _KEY): row for row in old}
    rows.update({tuple(row[k] for k in _KEY): row for row in new})
    return list(rows.values())


def _budget_bytes(text: str) -> int:
    try:
        gib = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not gib > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}")
    return int(gib * GIB)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-gib", type=_budget_bytes, default=16 * GIB, dest="budget",
                        help="CPU memory budget of one training step, in GiB (default 16)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--datasets", nargs="+", default=list(configs.LARGEST_DATASETS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--no-verify", action="store_true", help="predict only; run nothing")
    parser.add_argument("--verify-timeout", type=float, default=1800.0, metavar="S",
                        help="seconds one verification may run (default 1800)")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    try:
        budget = check_budget(args.budget)
        datasets = [configs.canonical_dataset(d) for d in args.datasets]
    except ValueError as error:
        parser.error(str(error))
    device = describe_device("cpu")
    out = args.out or ROOT / "bench" / "results" / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "largest_fit.json"
    for dataset in datasets:
        for model in args.models:
            for backend in backends_of(model, args.backends):
                row = measure_row(model, backend, dataset, budget, verify=not args.no_verify,
                                  timeout=args.verify_timeout)
                rows = merge(json.loads(path.read_text())["rows"] if path.is_file() else [], [row])
                # written after every row: a long run interrupted keeps what it measured
                path.write_text(json.dumps(dict(device=device, torch=torch.__version__, rows=rows), indent=2) + "\n")
                (out / "largest_fit.md").write_text(markdown(rows, device), encoding="utf-8")
    print(f"wrote {out / 'largest_fit.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
