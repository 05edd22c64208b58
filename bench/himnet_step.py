"""HimNet training step, reference vs stfast backends, side by side in one process.

    python bench/himnet_step.py [--dataset METR-LA] [--batch-size 16] [--device cpu|cuda]
                                [--backends reference torch triton] [--warmup 2] [--repeats 5] [--out DIR]

One training step = forward (teacher forcing on), loss, backward, gradient clipping, Adam step, on
a synthetic batch of the dataset's exact shape, timed by :func:`stfast.profile`. The table gives
time per batch and peak memory with their ratios against the reference. Results go to
``bench/results/<device>/himnet_step_<dataset>_b<batch>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from stfast import models, ops, profile
from stfast.data import synthetic_batch

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


def measure(dataset, batch_size, device, backends, warmup, repeats) -> list[dict]:
    batch, scaler = synthetic_batch(dataset, batch_size, device=device, return_scaler=True)
    rows = []
    for backend in backends:
        torch.manual_seed(0)
        forecaster = models.create("himnet", dataset, backend=backend)
        report = profile(forecaster, batch, scaler=scaler, warmup=warmup, repeats=repeats, device=device)
        rows.append({"backend": backend, **report.to_dict()})
        print(f"{backend}: {report.time_per_batch_ms['median']:.1f} ms, {peak_memory(rows[-1]):.1f} MB", file=sys.stderr)
    return rows


def markdown(rows, dataset, batch_size) -> str:
    base = next((r for r in rows if r["backend"] == "reference"), rows[0])
    memory_kind = "peak allocated" if "allocated" in base["peak_memory_mb"] else "peak RSS growth"
    lines = [
        f"HimNet training step, {dataset} shape, batch {batch_size}, device: {base['device']}",
        "",
        f"| backend | time / batch (ms, median [min, max]) | speed-up | {memory_kind} (MB) | memory ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time_per_batch_ms"]
        speedup = base["time_per_batch_ms"]["median"] / t["median"]
        memory = peak_memory(r)
        ratio = peak_memory(base) / memory if memory > 0 else float("inf")
        lines.append(f"| {r['backend']} | {t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}] | {speedup:.2f}x | "
                     f"{memory:.1f} | {ratio:.2f}x lower |")
    return "\n".join(lines) + "\n"


def peak_memory(row) -> float:
    """Peak allocated (CUDA) or resident-set growth (CPU) of a profile row, in MB."""
    memory = row["peak_memory_mb"]
    return memory.get("allocated", memory.get("rss_growth"))


def device_slug(description: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", description.lower()).strip("-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="METR-LA")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["reference", "torch", "triton"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    rows = measure(args.dataset, args.batch_size, device, runnable_backends(args.backends, device),
                   args.warmup, args.repeats)
    table = markdown(rows, args.dataset, args.batch_size)
    print(table)
    out = args.out or RESULTS / device_slug(rows[0]["device"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"himnet_step_{args.dataset}_b{args.batch_size}"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
