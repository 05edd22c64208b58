"""``node_lora`` side by side: naive per-node loop vs einsum composition vs the ``torch`` backend
vs the kernels (``cpu`` C++, ``cuda`` C++, ``triton``), forward and forward+backward, time and
achieved memory bandwidth.

    python bench/node_lora_op.py [--device cpu|cuda] [--shapes bench metr-la | --shape B N D_IN D_OUT R ...]
                                 [--dtype float32|bfloat16|float16] [--warmup 3] [--repeats 20]
                                 [--methods loop einsum torch cpu cuda cuda_simt triton] [--tf32]
                                 [--stlora-step himnet] [--threads T] [--out DIR]

Methods run round-robin (each round times every method once). Backends that cannot run on the
device are skipped with the reason. ``cuda_simt`` is the ``cuda`` backend with its tensor-core path
turned off (``ops.cuda_tensor_cores``); ``--tf32`` lets every method use TF32 for fp32 products
(``torch.set_float32_matmul_precision("high")``, which the tensor-core kernels follow).

Shapes (issue 4): ``bench`` = B 64, N 883, d 64 / 128 / 256, r 16; ``metr-la`` = B 64, N 207,
d 32 (ST-LoRA's NSP hidden width here) and 64, r 16. ``x`` is ``(B, N, d_in)``.

Achieved bandwidth = the bytes an ideal kernel must move (read ``x``, ``W``, ``b``, ``A``, ``B``,
write ``y``; the backward additionally reads ``dy`` and ``x`` again and writes ``dx``, ``dW``,
``db``, ``dA``, ``dB``) divided by the median time. On a GPU whose name is in ``PEAK_GBPS`` the
fraction of the peak is given too (or pass ``--peak-gbps``).

``--stlora-step MODEL`` adds the ST-LoRA overhead on a zoo backbone's training step: one
``stfast.profile`` of ``MODEL`` (METR-LA shape, batch ``--step-batch``) without and with
``stfast.nn.stlora.wrap_forecaster`` (default options), time and peak memory.

The table is printed; ``--out DIR`` also writes ``DIR/node_lora_op_<dtype>.{md,json}`` (record
results only from a real run, with the device name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import stfast.ops as ops
from stfast.benchmarks import roofline
from stfast.profiler import describe_device

# Peak DRAM bandwidth in GB/s from NVIDIA's product datasheets (H100 SXM5 HBM3: 3.35 TB/s;
# H100 PCIe: 2 TB/s; H200 SXM: 4.8 TB/s).
PEAK_GBPS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0}

SHAPES = {
    "bench": [(64, 883, 64, 64, 16), (64, 883, 128, 128, 16), (64, 883, 256, 256, 16)],
    "metr-la": [(64, 207, 32, 32, 16), (64, 207, 64, 64, 16)],
}
SCALE = 0.5
ACTIVATION = "leaky_relu"


# ---------------------------------------------------------------- formulations

def naive_loop(x, weight, bias, lora_a, lora_b):
    """One node at a time (what a straightforward port writes)."""
    outs = []
    for n, xn in enumerate(x.unbind(1)):  # unbind: its backward is one stack, not N zero-filled copies
        h = torch.nn.functional.leaky_relu(xn @ lora_a[n], 0.01)
        outs.append(torch.addmm(bias, xn, weight.t()) + SCALE * (h @ lora_b[n]))
    return torch.stack(outs, dim=1)


def einsum_composition(x, weight, bias, lora_a, lora_b):
    """Composed einsums with autograd (no per-node full weight either, but no fusion)."""
    h = torch.nn.functional.leaky_relu(torch.einsum("bni,nir->bnr", x, lora_a), 0.01)
    return x @ weight.t() + bias + SCALE * torch.einsum("bnr,nro->bno", h, lora_b)


def op_with(backend, tensor_cores=True):
    def run(x, weight, bias, lora_a, lora_b):
        with ops.use_backend(backend), ops.cuda_tensor_cores(tensor_cores):
            return ops.node_lora(x, weight, bias, lora_a, lora_b, SCALE, ACTIVATION)
    return run


METHODS = {"loop": naive_loop, "einsum": einsum_composition, "torch": op_with("torch"), "cpu": op_with("cpu"),
           "cuda": op_with("cuda"), "cuda_simt": op_with("cuda", tensor_cores=False), "triton": op_with("triton")}
BACKEND_OF = {"torch": "torch", "cpu": "cpu", "cuda": "cuda", "cuda_simt": "cuda", "triton": "triton"}


# ---------------------------------------------------------------- measurement

def make_inputs(shape, device, dtype):
    batch, nodes, d_in, d_out, rank = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    return (rand(batch, nodes, d_in), rand(d_out, d_in, scale=d_in**-0.5), rand(d_out),
            rand(nodes, d_in, rank, scale=d_in**-0.5), rand(nodes, rank, d_out, scale=rank**-0.5))


def ideal_bytes(shape, element_size) -> dict:
    batch, nodes, d_in, d_out, rank = shape
    rows = batch * nodes
    params = d_out * d_in + d_out + nodes * rank * (d_in + d_out)
    forward = rows * d_in + rows * d_out + params
    backward = rows * d_out + rows * d_in + params + rows * d_in + params  # read dy, x, params; write dx, grads
    return {"fwd": forward * element_size, "fwd+bwd": (forward + backward) * element_size}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def time_round_robin(calls: dict, device, warmup, repeats) -> dict[str, list[float]]:
    """Milliseconds per call of each entry of ``calls``, interleaved: every round runs each call once,
    so a slow phase of a shared machine hits every method alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(_timed(fn, device))
    return times


def measure(shape, methods, device, dtype, warmup, repeats) -> list[dict]:
    inputs = make_inputs(shape, device, dtype)
    grad_out = torch.randn(shape[0], shape[1], shape[3], device=device, dtype=dtype)
    nbytes = ideal_bytes(shape, inputs[0].element_size())

    def forward(fn):
        def call():
            with torch.no_grad():
                fn(*inputs)
        return call

    def forward_backward(fn):
        return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)

    rows = {name: {"shape": list(shape), "method": name} for name in methods}
    for mode, wrap in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = time_round_robin({name: wrap(METHODS[name]) for name in methods}, device, warmup, repeats)
        for name, samples in times.items():
            median = statistics.median(samples)
            rows[name][mode] = {"median_ms": median, "min_ms": min(samples), "max_ms": max(samples),
                                "gbps": nbytes[mode] / median / 1e6}
    for row in rows.values():
        print(f"{shape} {row['method']}: fwd {row['fwd']['median_ms']:.3f} ms, "
              f"fwd+bwd {row['fwd+bwd']['median_ms']:.3f} ms", file=sys.stderr)
    return list(rows.values())


def stlora_step(model, batch_size, device, warmup, repeats) -> list[dict]:
    from stfast import models, profile
    from stfast.data import synthetic_batch
    from stfast.nn.stlora import parameter_overhead, wrap_forecaster

    batch, scaler = synthetic_batch("METR-LA", batch_size, device=device, return_scaler=True)
    rows = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        forecaster = models.create(model, "METR-LA")
        if wrapped:
            forecaster = wrap_forecaster(forecaster)
        report = profile(forecaster, batch, scaler=scaler, warmup=warmup, repeats=repeats, device=device)
        row = {"model": model, "stlora": wrapped, **report.to_dict()}
        if wrapped:
            row["overhead"] = parameter_overhead(forecaster)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report

def peak_gbps(name: str, override):
    if override:
        return override
    for key in sorted(PEAK_GBPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_GBPS[key]
    return None


def add_roofline(rows, device_name: str, precision: str) -> None:
    """``x_ideal`` per mode: measured time / the roofline's ideal time (stfast.benchmarks.roofline)."""
    for row in rows:
        batch, nodes, d_in, d_out, rank = row["shape"]
        works = {"fwd": [roofline.node_lora_work(batch, nodes, d_in, d_out, rank)]}
        works["fwd+bwd"] = works["fwd"] + [roofline.node_lora_work(batch, nodes, d_in, d_out, rank, backward=True)]
        for mode, work in works.items():
            row[mode]["x_ideal"] = roofline.measured_over_ideal(row[mode]["median_ms"] / 1e3, work, device_name,
                                                                precision)


def markdown(rows, device, dtype, peak) -> str:
    lines = [f"node_lora, {dtype}, device: {device}" + (f" (peak {peak:,.0f} GB/s)" if peak else ""), ""]
    header = ("| shape (B, N, d_in, d_out, r) | method | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s "
              "| speed-up vs loop (fwd / fwd+bwd) | vs torch (fwd / fwd+bwd) | measured / ideal (fwd / fwd+bwd) |")
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def speedup(mode, base_method, row=row):
            base = next((r for r in rows if r["shape"] == row["shape"] and r["method"] == base_method), None)
            return f"{base[mode]['median_ms'] / row[mode]['median_ms']:.2f}x" if base else "-"

        def gbps(mode, row=row):
            value = row[mode]["gbps"]
            return f"{value:,.1f}" + (f" ({100 * value / peak:.0f}%)" if peak else "")

        lines.append(f"| {tuple(row['shape'])} | {row['method']} | {row['fwd']['median_ms']:.3f} | {gbps('fwd')} | "
                     f"{row['fwd+bwd']['median_ms']:.3f} | {gbps('fwd+bwd')} | "
                     f"{speedup('fwd', 'loop')} / {speedup('fwd+bwd', 'loop')} | "
                     f"{speedup('fwd', 'torch')} / {speedup('fwd+bwd', 'torch')} | "
                     f"{roofline.format_ratio(row['fwd'].get('x_ideal'))} / "
                     f"{roofline.format_ratio(row['fwd+bwd'].get('x_ideal'))} |")
    return "\n".join(lines) + "\n"


def markdown_step(rows) -> str:
    lines = ["", "ST-LoRA overhead on the training step (METR-LA shape)", "",
             "| model | ST-LoRA | params | time / batch (ms, median) | peak memory (MB) |", "|---|---|---|---|---|"]
    for row in rows:
        memory = row["peak_memory_mb"]
        peak = memory.get("allocated", memory.get("rss_growth"))
        lines.append(f"| {row['model']} | {'yes' if row['stlora'] else 'no'} | {row['params']:,} | "
                     f"{row['time_per_batch_ms']['median']:.1f} | {peak:.1f} |")
    if len(rows) == 2:
        base, wrapped = rows
        overhead = wrapped["overhead"]
        lines.append("")
        lines.append(f"added parameters {overhead['added']:,} ({overhead['percent']:.1f}% of the backbone), "
                     f"time +{100 * (wrapped['time_per_batch_ms']['median'] / base['time_per_batch_ms']['median'] - 1):.1f}%")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=["bench", "metr-la"], choices=sorted(SHAPES))
    parser.add_argument("--shape", nargs=5, type=int, action="append", metavar=("B", "N", "D_IN", "D_OUT", "R"),
                        help="a custom shape instead of --shapes (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbps", type=float, help="the device's peak memory bandwidth, for the %% column")
    parser.add_argument("--stlora-step", metavar="MODEL", help="also time MODEL's training step with/without ST-LoRA")
    parser.add_argument("--step-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tf32", action="store_true", help="fp32 products in TF32 for every method")
    parser.add_argument("--out", type=Path, help="write node_lora_op_<dtype>.{md,json} there")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    status = ops.available_backends(device, "node_lora")
    methods = []
    for name in args.methods:
        if name in BACKEND_OF and status[BACKEND_OF[name]] is not True:
            print(f"skipping {name}: {status[BACKEND_OF[name]]}", file=sys.stderr)
        else:
            methods.append(name)
    shapes = [tuple(s) for s in args.shape] if args.shape else [s for key in args.shapes for s in SHAPES[key]]
    rows = [row for shape in shapes for row in measure(shape, methods, device, dtype, args.warmup, args.repeats)]
    name = describe_device(device)
    peak = peak_gbps(name, args.peak_gbps) if device.type == "cuda" else args.peak_gbps
    tf32 = args.tf32 and dtype == torch.float32 and device.type == "cuda"  # TF32 is a CUDA mode
    precision = "float32 with TF32 products" if tf32 else args.dtype
    add_roofline(rows, name if device.type == "cuda" else "", roofline.precision_of(dtype, tf32))
    table = markdown(rows, name, precision, peak)
    step_rows = stlora_step(args.stlora_step, args.step_batch, device, 2, 5) if args.stlora_step else []
    if step_rows:
        table += markdown_step(step_rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"node_lora_op_{args.dtype}{'_tf32' if tf32 else ''}"
        stem.with_suffix(".md").write_text(table)
        stem.with_suffix(".json").write_text(json.dumps(
            {"device": name, "torch": torch.__version__, "rows": rows, "stlora_step": step_rows}, indent=2) + "\n")
        print(f"wrote {stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
