"""meta_gconv on the C++ extension's ``cpu`` backend vs ``torch`` vs the published reference.

    python bench/ext_ops.py [--repeats 15] [--warmup 2] [--axes S T ST] [--threads N]
                            [--backends reference torch cpu] [--formulation auto|outer|grouped]
                            [--dtype float32|bfloat16|float16] [--tf32] [--out FILE.md]

Shape: HimNet's decoder gate convolution on METR-LA at batch 16 (B=16, N=207, C=67 input channels,
K=2, D=16, O=128, per-sample supports (B, N, N)). Modes: ``forward`` (under ``torch.no_grad``,
inference) and ``forward+backward`` (every input requires grad; ``out.sum().backward()``).

The candidates are timed round-robin (one call of each per round, ``--repeats`` rounds) so that load
from other processes on a shared machine hits them alike; the table gives the median and the
[min, max] over rounds, in milliseconds, and the speed-ups against ``torch`` and the reference.
On a GPU machine (CUDA tensors) the candidates are ``reference torch triton triton_outer cuda cuda_outer
cuda_simt``: ``cuda_simt`` is the ``cuda`` backend with its tensor-core path turned off
(``ops.cuda_tensor_cores``), so that the two CUDA paths are compared in the same run; ``*_outer`` is
the backend with S / T kept on its outer-product kernels, where by default it runs the hoisted
GEMMs because they cost fewer FLOPs (``stfast/ops/_formulation.py``): the measurement that checks
that choice. ``--tf32`` lets every candidate use TF32 for
fp32 products (``torch.set_float32_matmul_precision("high")``: cuBLAS, Triton's ``tl.dot`` and the
``cuda`` tensor-core kernels all follow it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfast import ops
from stfast.benchmarks import roofline
from stfast.ops import _ext, _triton_gconv
from stfast.profiler import describe_device
from stfast.reference.himnet import HimGCN

SHAPE = {"B": 16, "N": 207, "C": 67, "K": 2, "D": 16, "O": 128}  # METR-LA decoder gate, batch 16
AXES = ("S", "T", "ST")
MODES = ("forward", "forward+backward")


def make_inputs(axis: str, device: torch.device, dtype: torch.dtype = torch.float32):
    b, n, c, k, d, o = (SHAPE[key] for key in "BNCKDO")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, c, generator=gen)
    supports = torch.softmax(torch.randn(b, n, n, generator=gen), -1)
    embeddings = torch.randn({"S": (n, d), "T": (b, d), "ST": (b, n, d)}[axis], generator=gen)
    gcn = HimGCN(c, o, k, d, meta_axis=axis).to(device, dtype)
    return gcn, [t.to(device, dtype) for t in (x, supports, embeddings)]


VARIANTS = ("cuda_simt", "triton_outer", "cuda_outer")  # a backend run with one setting changed


@contextlib.contextmanager
def outer_kernels(enabled: bool):
    """S / T on the GPU backends' outer-product kernels even where the hoisted GEMMs cost fewer FLOPs."""
    saved = _triton_gconv.FORMULATION, _ext.FORMULATION
    if enabled:
        _triton_gconv.FORMULATION = _ext.FORMULATION = "outer"
    try:
        yield
    finally:
        _triton_gconv.FORMULATION, _ext.FORMULATION = saved


def candidate(name: str, gcn: HimGCN):
    if name == "reference":
        return lambda x, supports, e: gcn(x, supports, e)
    backend = name.split("_")[0] if name in VARIANTS else name

    def run(x, supports, e):
        with ops.use_backend(backend), ops.cuda_tensor_cores(name != "cuda_simt"), outer_kernels(
                name.endswith("_outer")):
            return ops.meta_gconv(x, supports, e, gcn.weights_pool, gcn.bias_pool, gcn.cheb_k, axis=gcn.meta_axis)

    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(fn, inputs, mode, device, gcn):
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(*inputs)
            sync(device)
    else:
        leaves = [t.detach().requires_grad_() for t in inputs]

        def step():
            for p in gcn.parameters():
                p.grad = None
            fn(*leaves).sum().backward()
            sync(device)
    return step


def measure(axes, names, device, repeats, warmup, dtype=torch.float32):
    rows = []
    for axis in axes:
        gcn, inputs = make_inputs(axis, device, dtype)
        for mode in MODES:
            steps = {name: step_fn(candidate(name, gcn), inputs, mode, device, gcn) for name in names}
            for _ in range(warmup):
                for step in steps.values():
                    step()
            times = {name: [] for name in names}
            for _ in range(repeats):  # round-robin: shared-machine load hits every candidate alike
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - start) * 1e3)
            rows.append({"axis": axis, "mode": mode, "times": times})
            print(f"{axis} {mode}: " + ", ".join(f"{n} {statistics.median(t):.1f} ms" for n, t in times.items()),
                  file=sys.stderr)
    return rows


def roofline_works(axis: str, mode: str) -> list:
    b, n, c, k, d, o = (SHAPE[key] for key in "BNCKDO")
    forward = roofline.meta_gconv_work(b, n, c, k, d, o, axis, per_sample_supports=True)
    if mode == "forward":
        return [forward]
    return [forward, roofline.meta_gconv_work(b, n, c, k, d, o, axis, per_sample_supports=True, backward=True)]


def markdown(rows, names, device, repeats, skipped, precision="float32", roofline_precision="fp32") -> str:
    s = SHAPE
    title = (f"meta_gconv, METR-LA decoder shape (B={s['B']}, N={s['N']}, C={s['C']}, K={s['K']}, D={s['D']}, "
             f"O={s['O']}, per-sample supports), {precision}, device: {describe_device(device)}, "
             f"torch {torch.__version__}, median [min, max] of {repeats} round-robin rounds, ms")
    lines = [
        title,
        "",
        ("| axis | mode | " + " | ".join(names) + " | "
         + " | ".join(f"{n} vs torch" for n in names if n not in ("reference", "torch"))
         + " | best vs reference | best: measured / ideal |"),
        "|---|---|" + "---|" * (len(names) + len([n for n in names if n not in ("reference", "torch")]) + 2),
    ]
    for row in rows:
        med = {n: statistics.median(t) for n, t in row["times"].items()}
        cells = [f"{med[n]:.1f} [{min(t):.1f}, {max(t):.1f}]" for n, t in row["times"].items()]
        ratios = [f"{med['torch'] / med[n]:.2f}x" if "torch" in med else "n/a"
                  for n in names if n not in ("reference", "torch")]
        fast = min((v, n) for n, v in med.items() if n != "reference")
        best = f"{med['reference'] / fast[0]:.1f}x ({fast[1]})" if "reference" in med else "n/a"
        ideal = roofline.measured_over_ideal(fast[0] / 1e3, roofline_works(row["axis"], row["mode"]),
                                             describe_device(device) if device.type == "cuda" else "",
                                             roofline_precision)
        lines.append(f"| {row['axis']} | {row['mode']} | " + " | ".join(cells + ratios)
                     + f" | {best} | {roofline.format_ratio(ideal)} |")
    for name, why in skipped.items():
        lines.append(f"\n{name}: not run ({why})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--axes", nargs="+", default=list(AXES), choices=AXES)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--formulation", default=None, choices=("auto", "outer", "grouped"),
                        help="CPU kernels' meta GEMM formulation (default: the backend's own choice); on CUDA, "
                             "outer / grouped keep S / T on the kernels instead of the hoisted GEMMs")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tf32", action="store_true", help="fp32 products in TF32 for every candidate")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.formulation:
        _ext.FORMULATION = args.formulation
    device = torch.device(args.device)
    requested = args.backends or (["reference", "torch", "cpu"] if device.type == "cpu"
                                  else ["reference", "torch", "triton", "triton_outer", "cuda", "cuda_outer",
                                        "cuda_simt"])
    status = ops.available_backends(device, "meta_gconv")
    status.update({variant: status[variant.split("_")[0]] for variant in VARIANTS})
    names, skipped = [], {}
    for name in requested:
        if name == "reference" or status.get(name) is True:
            names.append(name)
        else:
            skipped[name] = status.get(name, "unknown backend")
    dtype = getattr(torch, args.dtype)
    rows = measure(args.axes, names, device, args.repeats, args.warmup, dtype)
    tf32 = args.tf32 and dtype == torch.float32 and device.type == "cuda"  # TF32 is a CUDA mode
    precision = "float32 with TF32 products" if tf32 else args.dtype
    table = markdown(rows, names, device, args.repeats, skipped, precision, roofline.precision_of(dtype, tf32))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
