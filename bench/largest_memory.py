"""Memory of one training step at LargeST sizes: predicted for every size, measured where the CPU can run it.

    python bench/largest_memory.py [--datasets METR-LA SD GBA GLA CA] [--batch-sizes config 64]
                                   [--measure MODEL:BACKEND:DATASET:BATCH ...] [--out DIR]

Predictions come from :func:`stfast.profiler.estimate_memory` (one step traced on fake tensors, see
``stfast/memory.py``) with CUDA's 512-byte blocks, for the reference implementation and for stfast's
fused ops (HimNet, AGCRN; traced with the ``cpu`` backend: every fused backend shares the op's autograd,
so what a step keeps is the same, and the kernels' work buffers are modelled from the glue code).
``total`` = parameters + Adam state + the step's peak; "fits" compares it with 80 GB and 141 GB (CUDA
context and allocator fragmentation not included: keep a few GB of margin).

``--measure`` runs those steps for real on this CPU (:func:`stfast.profiler.measure_step_memory`,
PyTorch's allocator events) and prints them beside a CPU prediction. Results go to
``bench/results/<device>/largest_memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stfast import configs
from stfast.profiler import describe_device, device_slug, estimate_memory, measure_step_memory
from stfast.memory import GPU_CAPACITIES

MODELS = {"himnet": ("reference", "cpu"), "agcrn": ("reference", "cpu"), "stid": ("reference",),
          "gwnet": ("reference",)}
_GB = 1e9


def _label(backend: str) -> str:
    return "stfast (fused)" if backend != "reference" else "reference"


def _batch(model: str, dataset: str, choice: str) -> int:
    return configs.load(model, dataset)["training"]["batch_size"] if choice == "config" else int(choice)


def predict_rows(datasets, batch_choices) -> list[dict]:
    rows = []
    for dataset in datasets:
        for model, model_backends in MODELS.items():
            for batch in sorted({_batch(model, dataset, choice) for choice in batch_choices}):
                for backend in model_backends:
                    start = time.perf_counter()
                    estimate = estimate_memory(model, batch, dataset, backend, device="cuda")
                    row = dict(estimate.to_dict(), implementation=_label(backend),
                               fits={name: estimate.fits(cap) for name, cap in GPU_CAPACITIES.items()})
                    rows.append(row)
                    print(f"{dataset:8s} {model:7s} {_label(backend):15s} b{batch:<3d} total {estimate.total / _GB:8.2f} GB "
                          f"({time.perf_counter() - start:.1f} s)", flush=True)
    return rows


def measure_rows(specs) -> list[dict]:
    rows = []
    for spec in specs:
        model, backend, dataset, batch = spec.split(":")
        batch = int(batch)
        predicted = estimate_memory(model, batch, dataset, backend, device="cpu")
        start = time.perf_counter()
        measured = measure_step_memory(model, batch, dataset, backend)
        ratio = predicted.step_peak / measured.step_peak
        rows.append(dict(model=model, implementation=_label(backend), backend=backend, dataset=measured.dataset,
                         batch_size=batch, predicted_step_peak=predicted.step_peak,
                         measured_step_peak=measured.step_peak, ratio=ratio,
                         seconds=round(time.perf_counter() - start, 1)))
        print(f"measured {spec}: {measured.step_peak / 2**20:,.1f} MiB, predicted {predicted.step_peak / 2**20:,.1f} MiB "
              f"(x{ratio:.3f})", flush=True)
    return rows


def markdown(predicted, measured, device: str) -> str:
    capacities = list(GPU_CAPACITIES)
    lines = [
        "# Memory of one training step at LargeST sizes",
        "",
        "Predicted by `stfast.profiler.estimate_memory` (fake-tensor trace of forward, loss, backward, clipping",
        "and Adam; CUDA 512-byte blocks). GB = 10^9 bytes. `total` = parameters + Adam state + the step's peak;",
        "CUDA context and allocator fragmentation are not included. Batch: each model's LargeST configuration",
        "(`configs.load`) and 64. `python bench/largest_memory.py` regenerates this file.",
        "",
        "| dataset | N | model | implementation | batch | step peak (GB) | total (GB) | "
        + " | ".join(f"fits {c}" for c in capacities) + " |",
        "|---|---:|---|---|---:|---:|---:|" + "---|" * len(capacities),
    ]
    for row in predicted:
        nodes = configs.dataset_info(row["dataset"]).num_nodes
        fits = " | ".join("yes" if row["fits"][c] else "**no**" for c in capacities)
        lines.append(f"| {row['dataset']} | {nodes:,} | {row['model']} | {row['implementation']} | {row['batch_size']} | "
                     f"{row['step_peak'] / _GB:,.2f} | {row['total'] / _GB:,.2f} | {fits} |")
    if measured:
        lines += [
            "",
            f"## Measured on {device}",
            "",
            "One real training step after a warm-up step; peak of PyTorch's CPU allocations during the step",
            "(`stfast.profiler.measure_step_memory`), beside the prediction for the same step on the CPU (no",
            "block rounding). MiB = 2^20 bytes.",
            "",
            "| dataset | model | implementation | batch | measured (MiB) | predicted (MiB) | predicted / measured |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for row in measured:
            lines.append(f"| {row['dataset']} | {row['model']} | {row['implementation']} | {row['batch_size']} | "
                         f"{row['measured_step_peak'] / 2**20:,.1f} | {row['predicted_step_peak'] / 2**20:,.1f} | "
                         f"{row['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["METR-LA", *configs.LARGEST_DATASETS])
    parser.add_argument("--batch-sizes", nargs="+", default=["config", "64"],
                        help="'config' (the model's configured batch) and/or integers")
    parser.add_argument("--measure", nargs="*", default=[], metavar="MODEL:BACKEND:DATASET:BATCH",
                        help="steps to run for real on this CPU, e.g. himnet:cpu:SD:2")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    device = describe_device("cpu")
    predicted = predict_rows([configs.canonical_dataset(d) for d in args.datasets], args.batch_sizes)
    measured = measure_rows(args.measure)
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "largest_memory.md").write_text(markdown(predicted, measured, device), encoding="utf-8")
    payload = dict(device=device, torch=torch.__version__, predicted=predicted, measured=measured)
    (out / "largest_memory.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'largest_memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
