"""The fused HimNet's decoder graph, dense ``(B, N, N)`` vs chunked (never built), side by side in one run.

    python bench/adaptive_graph.py [--sizes PEMS08:16 SD:4] [--rounds 3] [--repeats 2] [--out DIR]

Per size (dataset:batch, the model's configuration on that dataset, 12 in / 12 out steps, cpu op backend):

- time of one training step (forward with teacher forcing, loss, backward, clipping, Adam) of the same
  model with ``adaptive_graph="dense"`` and ``"chunked"``: ``rounds`` rounds, the two variants interleaved in
  each (``repeats`` timed steps each), after one untimed warm-up step each; median, min and max over all
  timed steps, and the ratio of medians;
- peak step memory of each variant measured by :func:`stfast.memory.measure_step_memory` and predicted by
  :func:`stfast.memory.estimate_memory` for the same step.

The variant is set through ``stfast.nn.himnet.DEFAULT_ADAPTIVE_GRAPH``, the default of models built without
the argument (as the zoo builds them).

The machine's 1-minute load average is printed and recorded before and after: on a shared machine every
number includes the other processes' load, which interleaving spreads over both variants alike.
Results go to ``bench/results/<device>/adaptive_graph.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import stfast.nn.himnet as fused_himnet
from stfast import models
from stfast.data import synthetic_batch
from stfast.memory import estimate_memory, measure_step_memory
from stfast.metrics import get_loss
from stfast.profiler import describe_device, device_slug
from stfast.training.step import make_optimizer, train_step

VARIANTS = ("dense", "chunked")
BACKEND = "cpu"


@contextlib.contextmanager
def forced(variant: str):
    """Models built inside take ``adaptive_graph=variant``."""
    saved = fused_himnet.DEFAULT_ADAPTIVE_GRAPH
    fused_himnet.DEFAULT_ADAPTIVE_GRAPH = variant
    try:
        yield
    finally:
        fused_himnet.DEFAULT_ADAPTIVE_GRAPH = saved


def build_step(dataset: str, batch_size: int, variant: str):
    torch.manual_seed(0)
    with forced(variant):
        forecaster = models.create("himnet", dataset, backend=BACKEND).train()
    training = forecaster.config["training"]
    optimizer, _ = make_optimizer(forecaster, training)
    batch, scaler = synthetic_batch(dataset, batch_size, return_scaler=True)
    loss = get_loss(training["loss"])

    def step():
        train_step(forecaster, batch, optimizer, loss, scaler, batches_seen=0, clip_grad=training.get("clip_grad", 0.0))

    return step


def time_variants(dataset: str, batch_size: int, rounds: int, repeats: int) -> dict:
    steps = {variant: build_step(dataset, batch_size, variant) for variant in VARIANTS}
    for step in steps.values():
        step()  # warm-up: optimiser state, allocator
    times = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant, step in steps.items():
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times[variant].append(time.perf_counter() - start)
    return times


def memory_variants(dataset: str, batch_size: int) -> dict:
    rows = {}
    for variant in VARIANTS:
        with forced(variant):
            measured = measure_step_memory("himnet", batch_size, dataset, BACKEND)
            predicted = estimate_memory("himnet", batch_size, dataset, BACKEND, device="cpu")
        rows[variant] = dict(measured=measured.step_peak, predicted=predicted.step_peak)
    return rows


def run_size(spec: str, rounds: int, repeats: int) -> dict:
    dataset, batch_size = spec.split(":")
    batch_size = int(batch_size)
    load_before = os.getloadavg()[0]
    times = time_variants(dataset, batch_size, rounds, repeats)
    memory = memory_variants(dataset, batch_size)
    row = dict(dataset=dataset, batch_size=batch_size, load_before=load_before, load_after=os.getloadavg()[0],
               variants={v: dict(times_s=times[v], median_s=statistics.median(times[v]), min_s=min(times[v]),
                                 max_s=max(times[v]), **memory[v]) for v in VARIANTS})
    dense, chunked = (row["variants"][v] for v in VARIANTS)
    row["time_ratio"] = chunked["median_s"] / dense["median_s"]
    row["memory_ratio"] = chunked["measured"] / dense["measured"]
    for v in VARIANTS:
        r = row["variants"][v]
        print(f"{dataset} b{batch_size} {v:8s} step {r['median_s'] * 1e3:8.1f} ms [{r['min_s'] * 1e3:.1f}, "
              f"{r['max_s'] * 1e3:.1f}]  peak {r['measured'] / 2**20:8.1f} MiB (predicted {r['predicted'] / 2**20:.1f})",
              flush=True)
    return row


def markdown(rows, device: str, rounds: int, repeats: int) -> str:
    lines = [
        "# HimNet decoder graph: dense (B, N, N) vs chunked",
        "",
        f"Device: {device}, a machine shared with other processes (1-minute load average in the table). One",
        "training step (forward with teacher forcing, loss, backward, clipping, Adam) of the fused HimNet with its",
        f"configuration on the dataset, cpu op backend; {rounds} interleaved rounds x {repeats} timed steps per",
        "variant after a warm-up step. Peak: `stfast.memory.measure_step_memory` (PyTorch's CPU allocator",
        "events), beside `estimate_memory`'s prediction. MiB = 2^20 bytes. `python bench/adaptive_graph.py`",
        "regenerates this file.",
        "",
        "| dataset | batch | variant | step median (ms) | min-max (ms) | measured peak (MiB) | predicted (MiB) | "
        "chunked/dense time | chunked/dense peak | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        for v in VARIANTS:
            r = row["variants"][v]
            ratios = f"{row['time_ratio']:.2f} | {row['memory_ratio']:.2f}" if v == "chunked" else " | "
            lines.append(f"| {row['dataset']} | {row['batch_size']} | {v} | {r['median_s'] * 1e3:,.0f} | "
                         f"{r['min_s'] * 1e3:,.0f}-{r['max_s'] * 1e3:,.0f} | {r['measured'] / 2**20:,.1f} | "
                         f"{r['predicted'] / 2**20:,.1f} | {ratios} | "
                         f"{row['load_before']:.1f} / {row['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["PEMS08:16", "SD:4"], metavar="DATASET:BATCH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    device = describe_device("cpu")
    rows = [run_size(spec, args.rounds, args.repeats) for spec in args.sizes]
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive_graph.md").write_text(markdown(rows, device, args.rounds, args.repeats), encoding="utf-8")
    payload = dict(device=device, torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
    (out / "adaptive_graph.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'adaptive_graph.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
