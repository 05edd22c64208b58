"""HimNet training step, reference vs stfast backends, side by side in one process.

    python bench/himnet_step.py [--dataset METR-LA] [--batch-size 16] [--device cpu|cuda]
                                [--backends reference torch triton] [--warmup 2] [--repeats 5] [--out DIR]
                                [--modes eager compile cuda-graphs] [--precisions fp32 tf32 bf16 fp16]

One training step = forward (teacher forcing on), loss, backward, gradient clipping, Adam step, on
a synthetic batch of the dataset's exact shape, timed by :func:`stfast.profile`. The table gives
time per batch and peak memory with their ratios against the reference (the first row). Every
backend runs in every mode and precision: ``compile`` is ``torch.compile`` (inductor) of the model,
``cuda-graphs`` the same with ``mode="reduce-overhead"``; their one-off compile time (the first
warm-up step, untimed by the profiler) is reported in its own column. Results go to
``bench/results/<device>/himnet_step_<dataset>_b<batch>[_<modes>][_<precisions>].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stfast import models, ops, profile
from stfast.data import synthetic_batch
from stfast.profiler import device_slug

RESULTS = Path(__file__).resolve().parent / "results"


def runnable_backends(requested, device) -> list[str]:
    status = ops.available_backends(device, "meta_gconv")
    chosen = []
    for name in requested:
        if name == "reference" or status.get(name) is True:
            chosen.append(name)
        else:
            print(f"skipping backend {name!r}: {status.get(name, 'unknown backend')}", file=sys.stderr)
    return chosen


def measure(dataset, batch_size, device, backends, warmup, repeats, modes=("eager",), precisions=("fp32",),
            rounds=1) -> list[dict]:
    """Every (backend, mode, precision) variant, ``rounds`` times round-robin (``repeats`` timed steps
    each time), so that a shared machine's load falls on all of them alike: the time per batch is
    the median of the rounds' medians, with the smallest min and largest max."""
    batch, scaler = synthetic_batch(dataset, batch_size, device=device, return_scaler=True)
    variants = [(backend, mode, precision) for backend in backends for mode in modes for precision in precisions]
    forecasters = {variant: build(dataset, *variant[:2]) for variant in variants}
    rows = {}
    for round_index in range(rounds):
        for variant in variants:
            backend, mode, precision = variant
            started = time.perf_counter()
            first_step = []
            first_warmup = max(warmup, 1) if mode != "eager" else warmup  # the compile is never timed
            report = profile(forecasters[variant], batch, scaler=scaler,
                             warmup=first_warmup if round_index == 0 else min(warmup, 1), repeats=repeats,
                             device=device, precision=precision,
                             on_step=lambda phase: first_step.append(time.perf_counter() - started))
            row = rows.setdefault(variant, {"backend": backend, "mode": mode, "first_step_s": first_step[0],
                                            **report.to_dict(), "round_medians_ms": []})
            row["round_medians_ms"].append(report.time_per_batch_ms["median"])
            row["time_per_batch_ms"]["min"] = min(row["time_per_batch_ms"]["min"], report.time_per_batch_ms["min"])
            row["time_per_batch_ms"]["max"] = max(row["time_per_batch_ms"]["max"], report.time_per_batch_ms["max"])
            print(f"round {round_index + 1}: {label(row)}: {report.time_per_batch_ms['median']:.1f} ms, "
                  f"{peak_memory(report.to_dict()):.1f} MB", file=sys.stderr)
    for row in rows.values():
        row["time_per_batch_ms"]["median"] = statistics.median(row["round_medians_ms"])
        row["time_per_batch_ms"]["repeats"] = repeats * rounds
    return list(rows.values())


def build(dataset, backend, mode):
    torch.manual_seed(0)
    forecaster = models.create("himnet", dataset, backend=backend)
    if mode != "eager":
        forecaster.compile(mode="reduce-overhead" if mode == "cuda-graphs" else None)
    return forecaster


def label(row) -> str:
    parts = [row["backend"]]
    if row.get("mode", "eager") != "eager":
        parts.append(row["mode"])
    if row.get("precision", "fp32") != "fp32":
        parts.append(row["precision"])
    return " + ".join(parts)


def markdown(rows, dataset, batch_size) -> str:
    base = next((r for r in rows if r["backend"] == "reference"), rows[0])
    memory_kind = "peak allocated" if "allocated" in base["peak_memory_mb"] else "peak RSS growth"
    lines = [
        f"HimNet training step, {dataset} shape, batch {batch_size}, device: {base['device']}, torch {torch.__version__}",
        "",
        f"| backend | time / batch (ms, median [min, max]) | speed-up | {memory_kind} (MB) | memory ratio "
        "| first step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time_per_batch_ms"]
        speedup = base["time_per_batch_ms"]["median"] / t["median"]
        memory = peak_memory(r)
        ratio = peak_memory(base) / memory if memory > 0 else float("inf")
        first = r.get("first_step_s")
        lines.append(f"| {label(r)} | {t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}] | {speedup:.2f}x | "
                     f"{memory:.1f} | {ratio:.2f}x lower | {'' if first is None else f'{first:.1f}'} |")
    return "\n".join(lines) + "\n"


def peak_memory(row) -> float:
    """Peak allocated (CUDA) or resident-set growth (CPU) of a profile row, in MB."""
    memory = row["peak_memory_mb"]
    return memory.get("allocated", memory.get("rss_growth"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="METR-LA")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["reference", "torch", "triton"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<device>)")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile", "cuda-graphs"],
                        help="eager, compile (torch.compile, inductor), cuda-graphs (mode 'reduce-overhead', CUDA)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--rounds", type=int, default=1, help="round-robin rounds over all variants (default 1)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if "cuda-graphs" in args.modes and device.type != "cuda":
        parser.error(f"--modes cuda-graphs: CUDA graphs need a CUDA device, got {device.type}")
    rows = measure(args.dataset, args.batch_size, device, runnable_backends(args.backends, device),
                   args.warmup, args.repeats, args.modes, args.precisions, args.rounds)
    table = markdown(rows, args.dataset, args.batch_size)
    print(table)
    out = args.out or RESULTS / device_slug(rows[0]["device"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"himnet_step_{args.dataset}_b{args.batch_size}"
    if args.modes != ["eager"]:
        stem += "_" + "-".join(args.modes)
    if args.precisions != ["fp32"]:
        stem += "_" + "-".join(args.precisions)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
