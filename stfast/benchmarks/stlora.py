"""``stfast bench stlora``: the efficiency figure of ST-LoRA (its Figure 4) regenerated on this machine.

    stfast bench stlora [--device auto|cpu|cuda] [--backbones ...] [--adapters per_node shared]
                        [--node-lora-backends ...] [--no-loop] [--batch-size 16] [--rounds N]
                        [--warmup N] [--repeats N] [--quick] [--freeze-backbone] [--timeout S]
                        [--record | --out DIR]

For each of the paper's six backbones (LSTM, STGCN, GWNet, AGCRN, STAEformer, D2STGNN) at the
PEMS04 shape (307 nodes, synthetic data of that shape), with ST-LoRA's defaults (rank 16, 4 NALL
layers, one predictor): the backbone alone, then the backbone + ST-LoRA for each adapter form
(``per_node``, the paper's, on each node_lora backend that runs on the device; ``shared``,
:class:`stfast.nn.stlora.SharedNALL`, composed and through node_lora on each fused backend), and the
per-node Python loop (:func:`stfast.nn.stlora.node_lora_loop`)
as the naive baseline. Columns: trainable parameters and the overhead in % of the backbone's, ms per
training batch (:func:`stfast.profile`'s step: forward, loss, backward, Adam) and its overhead in %,
s per epoch (median x the dataset's training batches), peak memory and its overhead.

Every (configuration, round) is measured in a fresh process (:mod:`stfast.benchmarks._worker`), and
the rounds are interleaved (round 1 of every configuration, then round 2, ...) so that a noisy
neighbour slows the backbone and its ST-LoRA variants alike. Times: median over the rounds of each
round's median step, with the [min, max] over every step; the time overhead is the median over the
rounds of the per-round ratio to that round's backbone. Training is joint (backbone and ST-LoRA);
``--freeze-backbone`` times the fine-tuning setting instead (only ST-LoRA trains).

The paper states its figures in words only where we quote them (``PAPER``): "< 1%" parameter
overhead for most backbones and "< 2%" for LSTM, and +0.68 s of training time for D2STGNN; they sit
beside ours in the table and the figure.

Outputs (``--out``, or with ``--record`` ``bench/results/<device>/stlora/``, by default a new folder
under ``runs/bench/``): ``results.md`` (also printed), ``results.json``, ``results.csv`` and
``stlora.png`` (two panels: (a) training-time overhead, (b) parameter overhead, per backbone).
Duration: ``--quick`` (one round, warm-up 1, 2 timed steps, node_lora's fastest backend only, no loop
baseline: 18 worker processes) is a few minutes on a GPU; the default (3 rounds of every backend,
the loop included) is an hour or more on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ..profiler import device_slug
from ._worker import real_data
from .efficiency import BenchError, _load_average, _resolve_device, run_worker

__all__ = ["BACKBONES", "PAPER", "PAPER_SOURCE", "add_stlora_parser", "build_variant", "main", "plan", "run"]

# The paper's six backbones, by zoo name: its LSTM is the LargeST / ST-LoRA one.
BACKBONES = ("lstm_largest", "stgcn", "gwnet", "agcrn", "staeformer", "d2stgnn")
DISPLAY = {"lstm_largest": "LSTM", "lstm": "LSTM (Torch-MTS)", "stgcn": "STGCN", "gwnet": "GWNet", "agcrn": "AGCRN",
           "staeformer": "STAEformer", "d2stgnn": "D2STGNN"}
ADAPTERS = ("per_node", "shared")
PAPER_SOURCE = ("ST-LoRA (Ruan et al., arXiv:2404.07919v2, ECML-PKDD 2025), efficiency study and Figure 4, PEMS04: "
                "'less than 1% additional trainable parameters for most models (below 2% for LSTM)', 'adding a mere "
                "0.68 seconds for D2STGNN'")
# What the paper states per backbone (the figure's bars are not given as numbers).
PAPER = {name: {"params": "< 1% (most models)", "time": None} for name in BACKBONES}
PAPER["lstm_largest"] = {"params": "< 2%", "time": None}
PAPER["d2stgnn"] = {"params": "< 1% (most models)", "time": "+0.68 s"}

QUICK = {"rounds": 1, "warmup": 1, "repeats": 2}
DEFAULT = {"rounds": 3, "warmup": 2, "repeats": 5}
LOOP = "loop"  # the per-node form as a Python loop over nodes: the naive baseline
COMPOSED = "composed"  # the shared form as two shared GEMMs around the node scale (PyTorch ops)


# ---------------------------------------------------------------------------- the variants


def variant_name(variant: dict) -> str:
    if variant["adapter"] is None:
        return "backbone"
    return f"+ST-LoRA {variant['adapter']} ({variant['node_lora']})"


def plan(backbones, adapters, node_lora_backends, loop: bool) -> list[dict]:
    """The variants measured for every backbone: the backbone alone first; the per-node form on
    each node_lora backend; the shared form composed, and through node_lora on each fused backend."""
    variants = [{"adapter": None, "node_lora": None}]
    for adapter in adapters:
        if adapter == "shared":
            variants.append({"adapter": adapter, "node_lora": COMPOSED})
        variants += [{"adapter": adapter, "node_lora": backend} for backend in node_lora_backends
                     if adapter == "per_node" or backend != "torch"]
    if loop:
        variants.append({"adapter": "per_node", "node_lora": LOOP})
    return [{"backbone": backbone, **variant} for backbone in backbones for variant in variants]


def build_variant(spec: dict):
    """The worker's builder (``spec["builder"]``): the backbone with its published configuration on
    the dataset, wrapped with ST-LoRA's defaults when the variant has an adapter."""
    import torch

    from .. import models
    from ..nn.stlora import NALL, SharedNALL, wrap_forecaster

    torch.manual_seed(spec["seed"])
    name = spec["backbone"]
    context = models.build_context(name, spec["dataset"], data=real_data(spec), synthetic_seed=spec["seed"])
    forecaster = models.create(name, spec["dataset"], context=context)
    if spec["adapter"] is None:
        return forecaster
    wrapped = wrap_forecaster(forecaster, adapter=spec["adapter"], freeze_backbone=spec["freeze_backbone"])
    if spec["node_lora"] in (LOOP, COMPOSED):
        for module in wrapped.modules():
            if isinstance(module, (NALL, SharedNALL)):
                module.path = spec["node_lora"]
        return wrapped
    for module in wrapped.modules():
        if isinstance(module, SharedNALL):
            module.path = "op"
    wrapped.model.op_backend = spec["node_lora"]
    return wrapped


def _node_lora_backends(device) -> list[str]:
    from .. import ops

    return [name for name, ok in ops.available_backends(device, "node_lora").items() if ok is True]


def _fastest_node_lora_backend(device) -> str:
    from .. import ops

    with ops.use_backend("auto"):
        return ops.resolve_backend("node_lora", device)


# --------------------------------------------------------------------------- aggregation


def _memory(report: dict) -> float | None:
    memory = report["peak_memory_mb"]
    value = memory.get("allocated", memory.get("rss_growth"))
    return value if isinstance(value, (int, float)) else None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(entry: dict, rounds: list[dict], backbone_rounds: list[dict] | None, train_batches: int) -> dict:
    """One table row from a variant's per-round results (and its backbone's, for the overheads)."""
    row = {"backbone": entry["backbone"], "name": DISPLAY.get(entry["backbone"], entry["backbone"]),
           "adapter": entry["adapter"], "node_lora": entry["node_lora"], "variant": variant_name(entry),
           "config": entry.get("config"),
           "paper": PAPER.get(entry["backbone"]) if entry["adapter"] else None, "status": "ok", "error": None,
           "params": None, "added_params": None, "param_overhead_pct": None, "ms_per_batch": None,
           "ms_per_round": [], "time_overhead_pct": None, "s_per_epoch": None, "added_s_per_epoch": None,
           "memory_mb": None, "memory_overhead_pct": None, "device": None}
    good = [r for r in rounds if r.get("ok")]
    if not good:
        row.update(status="error", error=next((r.get("error") for r in rounds if r.get("error")), "no result"))
        return row
    reports = [r["report"] for r in good]
    medians = [rep["time_per_batch_ms"]["median"] for rep in reports]
    row.update(params=reports[0]["params"], device=reports[0]["device"], ms_per_round=medians,
               ms_per_batch={"median": statistics.median(medians),
                             "min": min(rep["time_per_batch_ms"]["min"] for rep in reports),
                             "max": max(rep["time_per_batch_ms"]["max"] for rep in reports),
                             "rounds": len(reports), "repeats": reports[0]["time_per_batch_ms"]["repeats"]},
               memory_mb=_median(_memory(rep) for rep in reports))
    row["s_per_epoch"] = row["ms_per_batch"]["median"] * train_batches / 1000
    base = [r["report"] if r.get("ok") else None for r in backbone_rounds or []]
    if entry["adapter"] is None or not any(base):
        return row
    backbone_params = next(rep["params"] for rep in base if rep)
    if not entry.get("freeze_backbone"):
        row["added_params"] = row["params"] - backbone_params
    else:  # only the adapters are trainable: all of the count is added
        row["added_params"] = row["params"]
    row["param_overhead_pct"] = 100.0 * row["added_params"] / backbone_params
    ratios = [mine["time_per_batch_ms"]["median"] / theirs["time_per_batch_ms"]["median"]
              for mine, theirs in zip([r["report"] if r.get("ok") else None for r in rounds], base) if mine and theirs]
    if ratios:
        row["time_overhead_pct"] = 100.0 * (statistics.median(ratios) - 1)
    base_ms = statistics.median(rep["time_per_batch_ms"]["median"] for rep in base if rep)
    row["added_s_per_epoch"] = (row["ms_per_batch"]["median"] - base_ms) * train_batches / 1000
    base_memory = _median(_memory(rep) for rep in base if rep)
    if row["memory_mb"] is not None and base_memory:
        row["memory_overhead_pct"] = 100.0 * (row["memory_mb"] / base_memory - 1)
    return row


# ----------------------------------------------------------------------------------- output


def _fmt(value, digits=1, suffix=""):
    if value is None:
        return ""
    return f"{value:+,.{digits}f}{suffix}" if suffix == "%" or suffix == " s" else f"{value:,.{digits}f}{suffix}"


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    memory = "peak alloc MB" if meta["device_type"] == "cuda" else "RSS growth MB"
    headers = ["Backbone", "Config", "Variant", "Trainable params", "Added params", "Param overhead",
               "Paper param overhead", "ms/batch median [min, max]", "Time overhead", "s/epoch (est.)",
               "Added s/epoch", "Paper time", memory, "Memory overhead"]
    mode = "frozen backbone (fine-tuning)" if meta["freeze_backbone"] else "joint training"
    data = (f"{meta['dataset']} data from {Path(meta['data']).name}" if meta.get("data") else
            f"{meta['dataset']}-shaped synthetic data")
    lines = [f"ST-LoRA efficiency (paper's Figure 4), {data}, batch "
             f"{meta['batch_size']}, {mode}; {meta['rounds']} interleaved round(s) x (warm-up {meta['warmup']}, "
             f"{meta['repeats']} timed steps), each in a fresh process; device: {meta['device']}; "
             f"torch {meta['torch']}",
             "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | {row['config']} | {row['variant']} | error: {row['error']} |"
                         + " |" * (len(headers) - 4))
            continue
        times = row["ms_per_batch"]
        paper = row["paper"] or {}
        cells = [row["name"], row["config"] or "", row["variant"], f"{row['params']:,}",
                 "" if row["added_params"] is None else f"{row['added_params']:,}",
                 _fmt(row["param_overhead_pct"], 2, "%"), paper.get("params") or "",
                 f"{times['median']:,.1f} [{times['min']:,.1f}, {times['max']:,.1f}]",
                 _fmt(row["time_overhead_pct"], 1, "%"), _fmt(row["s_per_epoch"], 1),
                 _fmt(row["added_s_per_epoch"], 2, " s"), paper.get("time") or "",
                 _fmt(row["memory_mb"], 1), _fmt(row["memory_overhead_pct"], 1, "%")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paper: {PAPER_SOURCE}. The paper's numbers are from its GPU and its code; ours are measured here.",
              f"Load average before/after: {meta['load_average']['before']} / {meta['load_average']['after']} "
              f"({meta['cpu_count']} CPUs)."]
    lines += [f"Note: {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["backbone", "config", "variant", "adapter", "node_lora", "status", "params", "added_params",
              "param_overhead_pct", "paper_param_overhead", "ms_per_batch_median", "ms_per_batch_min",
              "ms_per_batch_max", "rounds", "repeats", "time_overhead_pct", "s_per_epoch", "added_s_per_epoch",
              "paper_time", "memory_mb", "memory_overhead_pct", "device", "error"]


def csv_text(result: dict) -> str:
    import csv

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in result["rows"]:
        times, paper = row["ms_per_batch"] or {}, row["paper"] or {}
        record = {key: row.get(key) for key in CSV_FIELDS if key in row}
        record.update(paper_param_overhead=paper.get("params"), paper_time=paper.get("time"),
                      ms_per_batch_median=times.get("median"), ms_per_batch_min=times.get("min"),
                      ms_per_batch_max=times.get("max"), rounds=times.get("rounds"), repeats=times.get("repeats"))
        writer.writerow({key: "" if record.get(key) is None else record.get(key) for key in CSV_FIELDS})
    return out.getvalue()


def write_figure(result: dict, path: Path) -> str | None:
    """The paper's two panels: (a) training-time overhead, (b) parameter overhead, per backbone,
    one bar per ST-LoRA variant; the paper's stated bounds as dashed lines. None, or why skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'stfast[plot]')"
    rows = [row for row in result["rows"] if row["status"] == "ok" and row["adapter"] is not None]
    backbones = list(dict.fromkeys(row["backbone"] for row in result["rows"]))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        by_backbone = {row["backbone"]: row for row in rows if row["variant"] == variant}
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(backbones))]
        for axes, key in ((left, "time_overhead_pct"), (right, "param_overhead_pct")):
            values = [by_backbone[b][key] if b in by_backbone and by_backbone[b][key] is not None else float("nan")
                      for b in backbones]
            bars = axes.bar(xs, values, width, label=variant, color=plt.cm.tab10(i % 10))
            axes.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    right.axhline(1.0, color="black", linestyle="--", linewidth=1, label="paper: < 1% (most models)")
    right.axhline(2.0, color="grey", linestyle=":", linewidth=1, label="paper: < 2% (LSTM)")
    right.set_yscale("log")  # overheads span 0.1% to 1000%: the per-node form dwarfs small backbones
    meta = result["meta"]
    names = [DISPLAY.get(b, b) for b in backbones]
    for axes, title, label in ((left, "(a) training-time overhead", "time per training batch vs backbone (%)"),
                               (right, "(b) parameter overhead", "added trainable parameters vs backbone (%)")):
        axes.set_xticks(range(len(backbones)), names)
        axes.set(title=f"{title}\n{meta['device']}, {meta['dataset']} shape, batch {meta['batch_size']}", ylabel=label)
        axes.grid(True, axis="y", alpha=0.3)
    left.axhline(0.0, color="black", linewidth=0.5)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.text(0.5, 0.005, "paper: " + PAPER_SOURCE, ha="center", fontsize=6, wrap=True)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# -------------------------------------------------------------------------------------- run


def _settings(args) -> dict:
    base = QUICK if args.quick else DEFAULT
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in base.items()}
    for flag, key, minimum in (("--rounds", "rounds", 1), ("--warmup", "warmup", 0), ("--repeats", "repeats", 1)):
        if settings[key] < minimum:
            raise BenchError(f"{flag}: expected an integer >= {minimum}, got {settings[key]}")
    if args.batch_size < 1:
        raise BenchError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.timeout is not None and args.timeout <= 0:
        raise BenchError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    return settings


def _choices(flag: str, values, accepted) -> list[str]:
    unknown = [value for value in values if value not in accepted]
    if unknown:
        raise BenchError(f"{flag}: expected some of {list(accepted)}, got {', '.join(map(repr, unknown))}")
    return list(dict.fromkeys(values))


def output_folder(args, description: str) -> Path:
    if args.out:
        return Path(args.out)
    if args.record:
        return Path("bench") / "results" / device_slug(description) / "stlora"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("runs") / "bench" / f"stlora-{stamp}"


def run(args, stdout=None, stderr=None) -> int:
    """``stfast bench stlora`` with parsed ``args``; raises :class:`BenchError` on bad input."""
    import torch

    from .. import __version__, configs, models
    from ..profiler import describe_device

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    settings = _settings(args)
    device = _resolve_device(args.device)
    dataset = configs.canonical_dataset(args.dataset)
    source = _data_source(args)
    backbones = _choices("--backbones", args.backbones or BACKBONES, models.available())
    adapters = _choices("--adapters", args.adapters or ADAPTERS, ADAPTERS)
    available = _node_lora_backends(device)
    default = [_fastest_node_lora_backend(device)] if args.quick else available
    backends = _choices("--node-lora-backends", args.node_lora_backends or default, available)
    loop = not (args.no_loop or args.quick)
    entries = plan(backbones, adapters, backends, loop)
    description = describe_device(device)
    out = output_folder(args, description)
    train_batches = configs.dataset_info(dataset).train_batches(args.batch_size)

    started, load_before = time.perf_counter(), _load_average()
    results = {index: [] for index in range(len(entries))}
    total = settings["rounds"] * len(entries)
    for round_index in range(settings["rounds"]):  # interleaved: every configuration once per round
        for index, entry in enumerate(entries):
            count = round_index * len(entries) + index + 1
            print(f"[{count}/{total}] round {round_index + 1}: {DISPLAY.get(entry['backbone'], entry['backbone'])} "
                  f"{variant_name(entry)} ...", file=stderr, flush=True)
            spec = {**entry, "builder": "stfast.benchmarks.stlora:build_variant", "model": entry["backbone"],
                    "backend": models.model_module(entry["backbone"]).DEFAULT_BACKEND, "dataset": dataset,
                    "batch_size": args.batch_size, "device": str(device), "warmup": settings["warmup"],
                    "repeats": settings["repeats"], "seed": 0, "freeze_backbone": bool(args.freeze_backbone),
                    "data": source["data"], "graph": source["graph"]}
            outcome = run_worker(spec, timeout=args.timeout, stream=stderr)
            results[index].append(outcome)
            if outcome.get("ok"):
                print(f"    {outcome['report']['time_per_batch_ms']['median']:,.1f} ms/batch", file=stderr, flush=True)
            else:
                print(f"    error: {outcome.get('error')}", file=stderr, flush=True)

    rows = []
    for index, entry in enumerate(entries):
        backbone_index = next(i for i, e in enumerate(entries) if e["backbone"] == entry["backbone"] and
                              e["adapter"] is None)
        origin = configs.load(entry["backbone"], dataset).get("origin", "published")
        described = {**entry, "freeze_backbone": bool(args.freeze_backbone), "config": origin}
        rows.append(aggregate(described, results[index], results[backbone_index], train_batches))
    notes = []
    if device.type == "cpu":
        notes.append("CPU timings on a shared machine are noisy; compare rows of one run (interleaved rounds), "
                     "not absolute times with the paper's GPU")
    meta = {"command": " ".join(["stfast", *sys.argv[1:]]) if getattr(args, "argv", None) is None else
            " ".join(["stfast bench stlora", *args.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "stfast": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": next((row["device"] for row in rows if row["device"]), description), "device_type": device.type,
            "dataset": dataset, "batch_size": args.batch_size, "train_batches": train_batches, **settings,
            "data": source["data"], "graph": source["graph"],
            "freeze_backbone": bool(args.freeze_backbone), "backbones": backbones, "adapters": adapters,
            "node_lora_backends": backends, "loop_baseline": loop, "duration_s": time.perf_counter() - started,
            "cpu_count": os.cpu_count(), "load_average": {"before": load_before, "after": _load_average()},
            "paper_source": PAPER_SOURCE, "notes": notes, "figure": None}
    result = {"meta": meta, "rows": rows, "raw": [{"entry": entries[i], "rounds": results[i]} for i in results]}
    out.mkdir(parents=True, exist_ok=True)
    skipped = write_figure(result, out / "stlora.png")
    if skipped:
        notes.append(f"stlora.png skipped: {skipped}")
    else:
        meta["figure"] = "stlora.png"
    table = markdown(result)
    stdout.write(table)
    stdout.flush()
    (out / "results.md").write_text(table, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "results.csv").write_text(csv_text(result), encoding="utf-8")
    print(f"wrote results.md, results.json, results.csv{'' if skipped else ', stlora.png'} in {out} "
          f"({meta['duration_s']:.0f} s)", file=stderr)
    return 1 if all(row["status"] == "error" for row in rows) else 0


# ---------------------------------------------------------------------------------- parsers


def add_stlora_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("--backbones", nargs="+", metavar="MODEL",
                        help=f"zoo models to wrap (default: the paper's six, {', '.join(BACKBONES)})")
    parser.add_argument("--adapters", nargs="+", metavar="FORM", help="per_node and/or shared (default: both)")
    parser.add_argument("--node-lora-backends", nargs="+", metavar="BACKEND",
                        help="node_lora backends for the adapters (default: every one that runs on the device; "
                             "with --quick the fastest)")
    parser.add_argument("--no-loop", action="store_true", help="leave out the per-node loop baseline")
    parser.add_argument("--dataset", default="PEMS04",
                        help="dataset whose shape the synthetic data has, or that --data holds (default PEMS04)")
    parser.add_argument("--data", help="time real batches of this dataset file or folder (its first training "
                                       "batch; default: synthetic data of the dataset's shape)")
    parser.add_argument("--graph", help="road graph file for --data (adj_mx.pkl or a distance .csv), for the "
                                        "backbones that need one")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds, each configuration in a fresh process per "
                                                   f"round (default {DEFAULT['rounds']}, quick {QUICK['rounds']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per round (default {DEFAULT['warmup']}, quick "
                                                   f"{QUICK['warmup']})")
    parser.add_argument("--repeats", type=int, help=f"timed steps per round (default {DEFAULT['repeats']}, quick "
                                                    f"{QUICK['repeats']})")
    parser.add_argument("--quick", action="store_true", help="one round, warm-up 1, 2 timed steps, node_lora's "
                                                             "fastest backend only, no loop baseline")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="time fine-tuning (only ST-LoRA trains) instead of joint training")
    parser.add_argument("--timeout", type=float, help="seconds after which one measurement is stopped (an error row)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--record", action="store_true", help="write to bench/results/<device>/stlora/ (tracked)")
    where.add_argument("--out", help="output folder (default: a new folder under runs/bench/)")
    return parser


def _data_source(args) -> dict:
    """Absolute paths of --data / --graph (workers run elsewhere), checked before anything runs."""
    if args.graph and not args.data:
        raise ValueError("--graph: only with --data (synthetic data brings its own graph)")
    source = {}
    for flag in ("data", "graph"):
        path = getattr(args, flag)
        if path and not Path(path).exists():
            raise ValueError(f"--{flag}: {path} does not exist")
        source[flag] = str(Path(path).resolve()) if path else None
    return source


def _cmd(args) -> int:
    return run(args)


DESCRIPTION = ("The efficiency figure of ST-LoRA (its Figure 4) regenerated on this machine: trainable parameters, "
               "time per batch and epoch, and peak memory of six backbones alone and with ST-LoRA's adapters.")


def add_stlora_parser(commands) -> argparse.ArgumentParser:
    """Add ``stlora`` to the ``stfast bench`` sub-commands."""
    parser = commands.add_parser("stlora", help="ST-LoRA's efficiency figure: parameter and time overhead of its "
                                                "adapter forms on six backbones", description=DESCRIPTION)
    add_stlora_options(parser)
    parser.set_defaults(func=_cmd)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = add_stlora_options(argparse.ArgumentParser(prog="stfast bench stlora",
                                                        description=DESCRIPTION))
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except (ValueError, TypeError, ImportError) as error:
        print(f"stfast bench stlora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
