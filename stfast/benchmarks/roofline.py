"""Roofline model of stfast's kernels: the target every GPU number is measured against.

For each kernel call (``meta_gconv`` forward / backward per meta axis, ``node_lora`` forward /
backward) at each benchmark shape, this computes

- the useful FLOPs of the *cheapest exact formulation* (a multiply-add counts 2), counted by
  ``stfast.ops._formulation`` (the count the ``triton`` and ``cuda`` backends choose by): for the S
  and T axes the hoisted one (generate ``W = E @ P`` once per node / sample, then a batched GEMM) or
  the outer-product GEMM (``K = D*I``), whichever is smaller; for ST always the outer product (per
  (sample, node) weights cost more to generate than to apply). Chebyshev propagation counts as its
  GEMMs with the supports. Elementwise epilogues are not counted (no FLOP/s peak applies to them);
- the minimum bytes: every input read once and every output written once, nothing else (a kernel
  that keeps intermediates on chip); bf16 moves 2 bytes per element, fp32 and TF32 4;
- the arithmetic intensity (FLOP / byte) and the ideal time, ``max(FLOPs / peak, bytes / bandwidth)``,
  on an H100 SXM5 and an H200 SXM for fp32 (CUDA-core FMAs), TF32 and bf16 (tensor cores).

Backward: every GEMM ``C = A B`` of the forward has two in the backward (``dA = dC B^T``,
``dB = A^T dC``) of the same size, so its FLOPs are twice the forward's with every gradient
needed (HimNet's training case); its bytes are the forward's inputs, the upstream gradient and the
forward output (read) plus one gradient per input (written).

GPU benchmarks call :func:`measured_over_ideal` to print how far a measured time is from this
ideal (1.0x = at the hardware limit). ``python bench/roofline.py`` writes the table to
``bench/results/roofline.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stfast.ops._formulation import cheapest_formulation, formulation_flops, weight_count

__all__ = ["PEAKS", "PEAK_SOURCE", "PRECISIONS", "SHAPES", "Work", "benchmark_workloads", "gpu_model",
           "format_ratio", "ideal_seconds", "markdown", "measured_over_ideal", "precision_of", "meta_gconv_work", "node_lora_work", "main"]

# Dense (no structured sparsity) peaks, FLOP/s, and HBM bandwidth, bytes/s. Source: NVIDIA's
# datasheets, "NVIDIA H100 Tensor Core GPU" (H100 SXM column: FP32 67 TFLOPS, TF32 Tensor Core
# 989 TFLOPS, BF16 Tensor Core 1,979 TFLOPS, both quoted "with sparsity", i.e. twice the dense
# rate; GPU memory bandwidth 3.35 TB/s) and "NVIDIA H200 Tensor Core GPU" (H200 SXM: the same
# compute figures, 4.8 TB/s).
PEAKS = {
    "H100": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "bandwidth": 3.35e12},
    "H200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "bandwidth": 4.8e12},
}
PEAK_SOURCE = ("NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5) and NVIDIA H200 Tensor Core GPU datasheet "
               "(H200 SXM): FP32 67 TFLOP/s; TF32 and BF16 tensor cores 989 and 1,979 TFLOP/s with sparsity, "
               "so 494.5 and 989.5 dense; HBM 3.35 TB/s (H100) and 4.8 TB/s (H200)")
PRECISIONS = ("fp32", "tf32", "bf16")
_ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}

# Benchmark shapes: (label, batch, HimNet configuration's dataset). LargeST's CA (8,600 nodes) at
# batch 8 stands for the LargeST-sized case.
SHAPES = (("METR-LA b16", 16, "METR-LA"), ("PEMS08 b16", 16, "PEMS08"), ("PEMS07 b64", 64, "PEMS07"),
          ("LargeST CA b8", 8, "CA"))
STLORA_HIDDEN, STLORA_RANK = 32, 16  # ST-LoRA's NALL layers (stfast.nn.stlora defaults)


@dataclass(frozen=True)
class Work:
    """One kernel call: its useful FLOPs and the fewest tensor elements it must move."""

    kernel: str
    shape: str
    flops: float
    elements: float
    formulation: str = ""

    def bytes(self, precision: str) -> float:
        return self.elements * _ELEMENT_BYTES[precision]

    def intensity(self, precision: str) -> float:
        return self.flops / self.bytes(precision)


def meta_gconv_work(batch, nodes, channels, cheb_k, dim, out, axis, *, per_sample_supports=False,
                    backward=False, kernel="meta_gconv", shape="") -> Work:
    """Useful FLOPs and minimum elements of one ``meta_gconv`` call (``x (B, N, C)``, ``I = K*C``)."""
    inputs = cheb_k * channels
    rows = batch * nodes
    propagation = 2.0 * (cheb_k - 1) * rows * nodes * channels  # A @ x per Chebyshev term
    formulation = cheapest_formulation(axis, batch, nodes, inputs, out, dim)
    forward_flops = propagation + formulation_flops(axis, batch, nodes, inputs, out, dim)[formulation]["forward"]

    supports = batch * nodes * nodes if per_sample_supports else nodes * nodes
    embeddings = weight_count(axis, batch, nodes) * dim  # (N | B | B*N, D)
    operands = rows * channels + (supports if cheb_k > 1 else 0) + embeddings + dim * inputs * out + dim * out
    output = rows * out
    if not backward:
        return Work(f"{kernel} fwd {axis}", shape, forward_flops, operands + output, formulation)
    # grad and the forward output (activation backward) read; one gradient per operand written.
    return Work(f"{kernel} bwd {axis}", shape, 2.0 * forward_flops, 2 * operands + 2 * output, formulation)


def node_lora_work(rows, nodes, d_in, d_out, rank, *, backward=False, shape="") -> Work:
    """``node_lora`` on ``x (M, N, d_in)``: base GEMM plus per-node shrink and expand."""
    tokens = rows * nodes
    forward_flops = 2.0 * tokens * (d_in * d_out + d_in * rank + rank * d_out)
    operands = tokens * d_in + d_out * d_in + d_out + nodes * d_in * rank + nodes * rank * d_out
    output = tokens * d_out
    if not backward:
        return Work("node_lora fwd", shape, forward_flops, operands + output, "grouped by node")
    return Work("node_lora bwd", shape, 2.0 * forward_flops, 2 * operands + output, "grouped by node")


def himnet_calls(label: str, batch: int, dataset: str) -> list[Work]:
    """One call of each HimNet graph convolution (S and T encoders, ST decoder; gate and update) and
    of ST-LoRA's hidden NALL layer at this shape, forward and backward."""
    from stfast import configs

    model = configs.himnet_config(dataset)["model"]
    hidden, nodes, cheb_k = model["hidden_dim"], model["num_nodes"], model["cheb_k"]
    layers = (
        ("S", model["input_dim"] + hidden, model["node_embedding_dim"], False),
        ("T", model["input_dim"] + hidden, model["tod_embedding_dim"] + model["dow_embedding_dim"], False),
        ("ST", model["output_dim"] + model["ycov_dim"] + hidden, model["st_embedding_dim"], True),
    )
    calls = []
    for axis, channels, dim, per_sample in layers:
        for gate, out in (("gate", 2 * hidden), ("update", hidden)):
            for backward in (False, True):
                calls.append(meta_gconv_work(batch, nodes, channels, cheb_k, dim, out, axis,
                                             per_sample_supports=per_sample, backward=backward,
                                             kernel=f"meta_gconv {gate}", shape=label))
    for backward in (False, True):
        calls.append(node_lora_work(batch, nodes, STLORA_HIDDEN, STLORA_HIDDEN, STLORA_RANK, backward=backward,
                                    shape=label))
    return calls


def benchmark_workloads() -> list[Work]:
    return [work for label, batch, dataset in SHAPES for work in himnet_calls(label, batch, dataset)]


def ideal_seconds(work: Work, gpu: str, precision: str) -> float:
    """``max(FLOPs / peak, bytes / bandwidth)`` on ``gpu`` ("H100" / "H200") in ``precision``."""
    if gpu not in PEAKS:
        raise ValueError(f"gpu: expected one of {sorted(PEAKS)}, got {gpu!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    peak = PEAKS[gpu]
    return max(work.flops / peak[precision], work.bytes(precision) / peak["bandwidth"])


def gpu_model(device_name: str) -> str | None:
    """``"H100"`` / ``"H200"`` from a CUDA device name (``torch.cuda.get_device_name()``), else None."""
    for model in PEAKS:
        if model in device_name.upper():
            return model
    return None


def precision_of(dtype, tf32: bool = False) -> str:
    """The roofline precision of a benchmark run: ``torch.float32`` -> "fp32" (or "tf32" with TF32
    products), bf16 / fp16 -> "bf16" (the same tensor-core peak on these GPUs)."""
    name = str(dtype).replace("torch.", "")
    if name == "float32":
        return "tf32" if tf32 else "fp32"
    if name in ("bfloat16", "float16"):
        return "bf16"
    raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")


def measured_over_ideal(measured_seconds: float, works, device_name: str, precision: str) -> float | None:
    """How many times slower than its roofline a measured run of ``works`` (a :class:`Work` or a
    list of them run back to back, e.g. forward and backward) is: 1.0 = at the hardware limit. None
    on a GPU without peak figures here (and on a CPU)."""
    gpu = gpu_model(device_name)
    if gpu is None:
        return None
    works = [works] if isinstance(works, Work) else list(works)
    return measured_seconds / sum(ideal_seconds(work, gpu, precision) for work in works)


def format_ratio(ratio: float | None) -> str:
    """``"12.3x"``, or ``"-"`` where there is no roofline for the device."""
    return "-" if ratio is None else f"{ratio:.1f}x"


def rows(workloads) -> list[dict]:
    table = []
    for work in workloads:
        row = {**asdict(work), "gflop": work.flops / 1e9, "mb_fp32": work.bytes("fp32") / 1e6,
               "intensity_fp32": work.intensity("fp32"), "intensity_bf16": work.intensity("bf16")}
        for gpu in PEAKS:
            for precision in PRECISIONS:
                row[f"ideal_us_{gpu}_{precision}"] = ideal_seconds(work, gpu, precision) * 1e6
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    ideal_columns = [f"{gpu} {precision}" for gpu in PEAKS for precision in PRECISIONS]
    lines = [
        "Roofline of stfast's kernels: useful FLOPs (cheapest exact formulation), minimum bytes, intensity, "
        "ideal time (us) = max(FLOPs / peak, bytes / bandwidth). One call each; HimNet's published "
        "configuration per dataset; ST-LoRA's hidden NALL (d 32, r 16).",
        "",
        f"Peaks: {PEAK_SOURCE}.",
        "",
        "| shape | kernel | formulation | GFLOP | MB (fp32) | FLOP/B fp32 | FLOP/B bf16 | "
        + " | ".join(ideal_columns) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(ideal_columns),
    ]
    for row in table:
        ideals = " | ".join(f"{row[f'ideal_us_{gpu}_{precision}']:.1f}" for gpu in PEAKS for precision in PRECISIONS)
        lines.append(f"| {row['shape']} | {row['kernel']} | {row['formulation']} | {row['gflop']:.3f} | "
                     f"{row['mb_fp32']:.2f} | {row['intensity_fp32']:.1f} | {row['intensity_bf16']:.1f} | {ideals} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Roofline table of stfast's kernels (bench/results/roofline.*)")
    parser.add_argument("--out", type=Path, help="folder for roofline.md and roofline.json "
                                                 "(default: bench/results next to this checkout's bench/)")
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).resolve().parents[2] / "bench" / "results"
    if not out.is_dir():
        parser.error(f"--out: no such folder {out}")
    table = rows(benchmark_workloads())
    text = markdown(table)
    (out / "roofline.md").write_text(text)
    (out / "roofline.json").write_text(json.dumps({"peaks": PEAKS, "source": PEAK_SOURCE, "rows": table},
                                                  indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'roofline.md'} and roofline.json")
    return 0
