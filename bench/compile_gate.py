"""Compile gate: every Triton kernel of stfast, launched exactly as its launcher launches it, compiled
ahead of time for sm_90 (H100 / H200) and sm_80 (A100) on a machine without a GPU.

    python bench/compile_gate.py                     # full resource table -> bench/results/compile-gate/
    python bench/compile_gate.py --ci --out DIR      # the CI sample (tests/test_compile_gate.py)
    python bench/compile_gate.py --cuda              # the CUDA extension's table (nvcc -Xptxas -v, SASS)
    python bench/compile_gate.py --ops meta_gconv --kernels meta_gconv_bwd_dxg_de --precisions fp32 \
        --out /tmp/gate                              # one kernel's launches only (any filter combines)

How: the real launchers (``stfast.kernels.*.node_lora_forward`` ...) run on ``meta`` tensors of each
shape below inside ``recording_launches()``, which records every launch (grid, constexprs,
``num_warps``, ``num_stages``) with its exact arguments instead of running it. Each distinct launch is
then specialised as Triton's runtime would specialise those arguments and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; the Triton wheel ships
``ptxas``, whose ``-v`` report gives registers and spills.

Kernels that tune (``stfast.kernels._utils.choose``) are compiled in every candidate launch of their
set, not only the default: the launchers run once more per candidate under ``forcing_configs``.

A launch fails the gate when it does not compile, needs more shared memory than the target gives one
block, spills more than its bound (``KERNEL_SPILL_BOUNDS`` per kernel, else ``SPILL_BOUND_BYTES``,
``SPILL_BOUND_IEEE_BYTES`` for fp32 products in IEEE precision), or has a grid beyond CUDA's limits. The table records
registers, spill bytes, stack frame, shared memory and whether ``tl.dot`` lowered to tensor-core
instructions (``wgmma`` / ``mma`` in the PTX).

The gate runs in its own process without ``TRITON_INTERPRET`` (the tests run the kernels under the
interpreter, whose kernel objects cannot be compiled). It uses a fresh Triton cache so that every
compile runs ptxas and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compile-gate"

# Shared memory one block may use (the opt-in maximum), by target: CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability": 227 KB for 9.0, 163 KB for 8.0.
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}

# Spill bounds (bytes of spill stores per thread, from ptxas -v) of a kernel without its own entry in
# KERNEL_SPILL_BOUNDS: none today, since every Triton kernel of stfast is spill-free (issue 18). They were
# the regression bounds of the kernels before that work (worst: 356 B on tensor cores, 39,520 B in IEEE
# fp32, node_lora_bwd_rows at R_PAD 128, Triton 3.9) and stay as the bounds a new kernel starts from.
SPILL_BOUND_BYTES = 512
SPILL_BOUND_IEEE_BYTES = 40 * 1024
# The CUDA extension's kernels (nvcc -Xptxas -v, sm_90): worst 8 B (node_lora_bwd_dx, fp16); the meta_gconv
# kernels spill nothing since issue 18.
CUDA_SPILL_BOUND_BYTES = 8


# Kernels whose every candidate launch, at every precision and target, is spill-free (issue 18):
# their bound replaces the two above.
KERNEL_SPILL_BOUNDS = {"meta_gconv_fwd": 0, "meta_gconv_bwd_dxg_de": 0, "meta_gconv_bwd_dp": 0,
                       "node_lora_fwd": 0, "node_lora_bwd_rows": 0, "node_lora_bwd_da": 0, "node_lora_bwd_db": 0,
                       "node_lora_bwd_dw": 0}


def spill_bound(options: dict, kernel: str | None = None) -> int:
    """The spill bound of a launch of ``kernel``: its own (``KERNEL_SPILL_BOUNDS``) if it has one; else
    IEEE fp32 products, which run on FMA units, get their own bound."""
    if kernel in KERNEL_SPILL_BOUNDS:
        return KERNEL_SPILL_BOUNDS[kernel]
    return SPILL_BOUND_IEEE_BYTES if options.get("INPUT_PRECISION") == "ieee" else SPILL_BOUND_BYTES

# (B, N, d_in, d_out, rank): METR-LA (207 nodes) b16, PEMS08 (170) b16, PEMS07 (883) b64 at the ST-LoRA
# benchmark widths (bench/node_lora_op.py), and the extremes: rank 1, N = 1, d = 1, batch 1, the largest
# rank with the largest other tiles.
NODE_LORA_SHAPES = {
    "metr-la-b16": (16, 207, 64, 64, 16),
    "pems08-b16": (16, 170, 128, 128, 16),
    "pems07-b64": (64, 883, 256, 256, 16),
    "rank-1": (16, 207, 64, 64, 1),
    "n-1": (16, 1, 64, 64, 16),
    "d-1": (16, 207, 1, 1, 16),
    "batch-1": (1, 207, 32, 32, 8),
    "rank-32": (16, 207, 64, 64, 32),
    "rank-64": (16, 207, 64, 64, 64),
    "rank-max": (64, 207, 256, 256, None),  # None: kernels.node_lora.MAX_RANK; the largest tiles
    "largest-b8": (8, 8600, 64, 64, 16),  # LargeST's 8,600 nodes (issue 18's largest benchmark shape)
    # Every padded rank at full tiles (batch 64) and the largest rank at 16-row tiles (batch 16), so
    # that each tuning candidate of node_lora compiles at its largest tiles.
    "rank-32-b64": (64, 207, 256, 256, 32),
    "rank-64-b64": (64, 207, 256, 256, 64),
    "rank-max-b16": (16, 207, 64, 64, None),
}
# (B, N, C, K, D, O): HimNet's decoder gate (C = 64 + 3, Chebyshev order 2, D = 16, O = 2 * 64) on the
# same datasets (bench/test_meta_gconv_bench.py), its candidate (O = 64), and the extremes N = 1, D = 1.
META_GCONV_SHAPES = {
    "metr-la-b16": (16, 207, 67, 2, 16, 128),
    "pems08-b16": (16, 170, 67, 2, 16, 128),
    "pems07-b64": (64, 883, 67, 2, 16, 128),
    "candidate-o64": (16, 207, 67, 2, 16, 64),
    "n-1": (16, 1, 67, 2, 16, 128),
    "d-1": (16, 207, 67, 2, 1, 128),
    "d-64": (16, 207, 67, 2, 64, 128),
    "tiny": (1, 1, 1, 1, 1, 1),
    "largest-b8": (8, 8600, 67, 2, 16, 128),  # LargeST's 8,600 nodes (issue 18's largest benchmark shape)
}
# How fp32 / half inputs reach the kernels' tl.dot: input dtype and input_precision.
PRECISIONS = {"fp32": ("float32", "ieee"), "tf32": ("float32", "tf32"), "bf16": ("bfloat16", "tf32"),
              "fp16": ("float16", "tf32")}


@dataclass
class Result:
    kernel: str
    arch: str
    precision: str
    config: str  # constexprs, warps, stages
    shapes: str  # the shapes (op: names) that launch it
    ok: bool
    reason: str = ""
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: str = ""
    compile_s: float = 0.0
    spill_bound: int | None = None


# ---------------------------------------------------------------- the launches

def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype)


def node_lora_inputs(shape, dtype, device="meta"):
    """``(x, weight, bias, lora_a, lora_b, seed, grad)`` of a gate shape (``rank`` None: the largest the
    launcher takes): empty on ``meta``, random elsewhere (``bench/tune_triton.py``)."""
    import torch

    from stfast.kernels.node_lora import MAX_RANK

    batch, nodes, d_in, d_out, rank = shape
    rank = MAX_RANK if rank is None else rank
    gen = torch.Generator().manual_seed(0)

    def tensor(*size, scale=1.0):
        if str(device) == "meta":
            return torch.empty(*size, device="meta", dtype=dtype)
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    seed = torch.tensor([7, 0], dtype=torch.int64).to(device)  # (seed, offset), read by the kernels on the device
    return (tensor(batch, nodes, d_in), tensor(d_out, d_in, scale=d_in**-0.5), tensor(d_out),
            tensor(nodes, d_in, rank, scale=d_in**-0.5), tensor(nodes, rank, d_out, scale=rank**-0.5), seed,
            tensor(batch, nodes, d_out))


def node_lora_step(kernels, shape, tensors, precision) -> list:
    """A training step's launches (forward, then backward with every gradient, and without dx, as the
    first layer has) for leaky_relu with dropout and bias, the ST-LoRA training setting; the outputs."""
    x, w, b, a, bb, seed, g = tensors
    outputs = [kernels.node_lora_forward(x, w, b, a, bb, 0.5, "leaky_relu", 0.1, seed, input_precision=precision)]
    for needs in ((True,) * 5, (False, True, True, True, True)):
        outputs += kernels.node_lora_backward(g, x, w, b, a, bb, 0.5, "leaky_relu", 0.1, seed, needs,
                                              input_precision=precision)
    return outputs


def meta_gconv_inputs(shape, dtype, device="meta"):
    """``(xg, {axis: embeddings}, pool, bias pool, grad)`` of a gate shape: empty on ``meta``, random
    elsewhere (``bench/tune_triton.py`` times and checks the launches on them)."""
    import torch

    batch, nodes, channels, cheb_k, dim, out = shape
    rows, inputs = batch * nodes, channels * cheb_k
    gen = torch.Generator().manual_seed(0)

    def tensor(*size, scale=1.0):
        if str(device) == "meta":
            return torch.empty(*size, device="meta", dtype=dtype)
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    embeddings = {"ST": tensor(batch, nodes, dim), "S": tensor(nodes, dim)}
    return (tensor(rows, inputs), embeddings, tensor(dim, inputs, out, scale=(dim * inputs) ** -0.5),
            tensor(dim, out, scale=dim**-0.5), tensor(rows, out))


def meta_gconv_step(kernels, shape, tensors, precision) -> list:
    """HimNet's gate in training, as the launchers run it: forward (sigmoid) and backward with every
    gradient, for the ST axis (per-sample embeddings) and the S axis (per node); the outputs."""
    nodes = shape[1]
    xg, embeddings, pool, bias, g = tensors
    outputs = []
    for axis, emb in embeddings.items():
        outputs.append(kernels.meta_gconv_forward(xg, emb, axis, nodes, pool, bias, "sigmoid",
                                                  input_precision=precision))
        outputs += kernels.meta_gconv_backward(g, xg, emb, axis, nodes, pool, bias, True, True, True,
                                               input_precision=precision)
    return outputs


# The ops whose launches bench/tune_triton.py times on a GPU: (shape table, inputs, step, kernel module).
TUNABLE = {"meta_gconv": (META_GCONV_SHAPES, meta_gconv_inputs, meta_gconv_step, "meta_gconv"),
           "node_lora": (NODE_LORA_SHAPES, node_lora_inputs, node_lora_step, "node_lora")}


def step_launches(op, shape, dtype, precision, kernels):
    """Every launch of ``op``'s training step (``TUNABLE``) on ``meta`` tensors of ``shape``."""
    import torch

    from stfast.kernels._utils import recording_launches

    _, inputs, step, _ = TUNABLE[op]
    with recording_launches() as launches:
        step(kernels, shape, inputs(shape, getattr(torch, dtype)), precision)
    return launches


def collect(ops=("node_lora", "meta_gconv"), precisions=tuple(PRECISIONS), shapes=None, kernels=None):
    """``{key: (launch, module, args, [shape names])}`` for every distinct launch, every tuning
    candidate included (``candidate_launches``); ``key`` is the kernel, argument dtypes, constexprs and
    options (the grid and integer values are not part of it). ``shapes`` / ``kernels``: only these names
    (a kernel matches by prefix)."""
    from stfast.kernels import meta_gconv, node_lora

    modules = {"node_lora": node_lora, "meta_gconv": meta_gconv}
    found = {}
    for op in ops:
        table, module = TUNABLE[op][0], modules[op]
        for name, shape in table.items():
            if shapes is not None and name not in shapes:
                continue
            for label in precisions:
                dtype, precision = PRECISIONS[label]
                record = lambda: step_launches(op, shape, dtype, precision, module)  # noqa: E731
                for launch, mod, args in candidate_launches(record):
                    if kernels is not None and not launch.kernel.startswith(tuple(kernels)):
                        continue
                    ints = _int_specialization(getattr(mod, launch.kernel), args)
                    key = (launch.kernel, label, _config(launch), ints)
                    entry = found.setdefault(key, [launch, mod, args, []])
                    entry[3].append(f"{op}:{name}")
    return found


def candidate_launches(record) -> list:
    """``record()`` (recorded launches of the real launchers) once as they choose, then once per
    candidate of every tuning choice they make (``forcing_configs``): every launch any tuned table
    could make them run."""
    from stfast.kernels._utils import forcing_configs, recording_choices

    with recording_choices() as choices:
        launches = list(record())
    for choice in choices:
        for candidate in choice.candidates:
            if candidate is not choice.chosen:
                with forcing_configs({choice.kernel: candidate.config}):
                    launches += record()
    return launches


def _int_specialization(fn, args) -> str:
    """How Triton's runtime specialises the integer arguments (``1``: the value 1, a constant; ``D``:
    divisible by 16; ``.``: neither), in argument order: launches that differ here compile apart."""
    marks = []
    for param, arg in zip(fn.params, args):
        if isinstance(arg, bool) or not isinstance(arg, int) or param.do_not_specialize:
            continue
        marks.append("1" if arg == 1 else "D" if arg % 16 == 0 else ".")
    return "".join(marks)


def _config(launch) -> str:
    consts = " ".join(f"{k}={v}" for k, v in launch.constexprs.items())
    return f"{consts} warps={launch.num_warps} stages={launch.num_stages}"


# ---------------------------------------------------------------- compiling one launch

def _mock(arg):
    import torch
    from triton.runtime.jit import MockTensor

    return MockTensor(arg.dtype) if isinstance(arg, torch.Tensor) else arg


def compile_launch(fn, args, options: dict, arch: int):
    """``triton.compile`` of ``fn`` for ``sm_<arch>`` with ``args`` specialised as Triton's runtime
    specialises them (pointers 16-byte aligned, integers by value) and ``options`` (constexprs,
    ``num_warps``, ``num_stages``). Returns ``(compiled kernel, ptxas log)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(*[_mock(a) for a in args], **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, parsed)
    log = io.StringIO()
    previous = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = previous
    report = log.getvalue()
    if "registers" not in report:  # a cache hit ran no ptxas: assemble the PTX again for the report
        report = _ptxas_report(kernel.asm["ptx"], arch)
    return kernel, report


def _ptxas_report(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(source), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    return done.stdout + done.stderr


def ptxas_resources(log: str) -> dict:
    """Registers, spill-store bytes and stack frame from a ``ptxas -v`` report (one kernel)."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def tensor_core_instructions(ptx: str) -> str:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "none"


def check(fn, args, launch_options: dict, grid, arch_name: str, bound: int | None = None) -> dict:
    """Compile one launch for ``arch_name`` and judge it (``judge``); the fields of a ``Result``
    (without the labels). ``bound``: the spill bound, default ``spill_bound(launch_options)``."""
    arch = TARGETS[arch_name][0]
    start = time.perf_counter()
    try:
        kernel, log = compile_launch(fn, args, launch_options, arch)
    except Exception as err:  # noqa: BLE001 - any compile failure fails the gate, with its message
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        where = f" ({lines[0]})" if len(lines) > 1 else ""
        return {"ok": False, "reason": f"does not compile: {lines[-1]}{where}"[:400],
                "compile_s": time.perf_counter() - start}
    info = ptxas_resources(log)
    info.update(shared_bytes=kernel.metadata.shared, tensor_cores=tensor_core_instructions(kernel.asm["ptx"]),
                compile_s=time.perf_counter() - start)
    bound = spill_bound(launch_options, _kernel_name(fn)) if bound is None else bound
    reasons = judge(info, arch_name, bound, grid)
    info.update(ok=not reasons, reason="; ".join(reasons), spill_bound=bound)
    return info


def _kernel_name(fn) -> str | None:
    inner = getattr(fn, "fn", None)
    return getattr(inner, "__name__", None) or getattr(fn, "__name__", None)


def judge(info: dict, arch_name: str, bound: int, grid=()) -> list[str]:
    """Why a compiled launch fails the gate (empty: it passes)."""
    from stfast.kernels._utils import GRID_LIMITS

    shared_limit = TARGETS[arch_name][1]
    reasons = []
    if info["registers"] is None:
        reasons.append("no ptxas report")
    if info["shared_bytes"] > shared_limit:
        reasons.append(f"shared memory {info['shared_bytes']} B above {arch_name}'s {shared_limit} B per block")
    if (info["spill_bytes"] or 0) > bound:
        reasons.append(f"spills {info['spill_bytes']} B, above the bound of {bound} B")
    for axis, (extent, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if extent > limit:
            reasons.append(f"grid axis {axis} has {extent} programs (limit {limit})")
    return reasons


def _portable(arg):
    import torch

    return ("tensor", str(arg.dtype).removeprefix("torch.")) if isinstance(arg, torch.Tensor) else arg


def _check_job(job):
    """``check`` in a worker process: ``job`` holds only picklable values."""
    module_name, kernel, args, options, grid, arch = job
    import importlib

    import torch

    fn = getattr(importlib.import_module(module_name), kernel)
    args = [_meta(1, dtype=getattr(torch, a[1])) if isinstance(a, tuple) and a[:1] == ("tensor",) else a for a in args]
    return check(fn, args, options, grid, arch)


def run_gate(found: dict, jobs: list[tuple], workers: int = 1) -> list[Result]:
    """Compile ``jobs`` (``(key of found, arch)``) with ``workers`` processes; one ``Result`` each."""
    payloads = []
    for key, arch in jobs:
        launch, module, args, _ = found[key]
        args = [_portable(a) for a in args]
        payloads.append((module.__name__, launch.kernel, args, launch.options, launch.grid, arch))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            infos = list(pool.map(_check_job, payloads))
    else:
        infos = [_check_job(p) for p in payloads]
    results = []
    for (key, arch), info in zip(jobs, infos):
        kernel, label, config, ints = key
        shapes = found[key][3]
        results.append(Result(kernel=kernel, arch=arch, precision=label, config=f"{config} ints={ints}",
                              shapes=", ".join(sorted(set(shapes))), **info))
        status = "ok" if info["ok"] else "FAIL " + info["reason"]
        print(f"{arch} {label:4s} {kernel:22s} {config}: {status} ({info['compile_s']:.1f} s)", flush=True)
    return results


def block_config(launch) -> tuple:
    """The launch configuration proper: kernel, the block-size constexprs, warps and stages."""
    blocks = tuple((k, v) for k, v in launch.constexprs.items() if k.startswith("BLOCK") or k == "R_PAD")
    return launch.kernel, blocks, launch.num_warps, launch.num_stages


def ci_sample(found: dict) -> list[tuple]:
    """The CI's ``(key, arch)`` compiles: every launch configuration (``block_config``) that the
    shapes above make the launchers choose, once, at tf32 (fp32 inputs on tensor cores) for sm_90;
    per kernel, the configuration with the largest tiles also at bf16 for sm_90 and at tf32 (fp32
    tiles: the most shared memory) for sm_80. The full table (``full_table``) compiles every
    precision for both targets."""
    by_config, largest = {}, {}
    for key in sorted(found):
        launch = found[key][0]
        if key[1] != "tf32":
            continue
        by_config.setdefault(block_config(launch), key)
        volume = _tile_volume(launch.constexprs)
        if volume > largest.get(key[0], (0, None))[0]:
            largest[key[0]] = (volume, key)
    chosen = [(key, "sm_90") for key in by_config.values()]
    for _, key in largest.values():
        chosen.append((key, "sm_80"))
        bf16 = next((k for k in sorted(found) if k[0] == key[0] and k[1] == "bf16" and k[2] == key[2]), None)
        if bf16 is not None:
            chosen.append((bf16, "sm_90"))
    return chosen


def full_table(found: dict, every_specialisation: bool = False) -> list[tuple]:
    """Every launch configuration with its flags, at every precision, for both targets (one integer
    specialisation each: the first shape's; every one with ``every_specialisation``)."""
    first = {}
    for key in sorted(found):
        first.setdefault(key if every_specialisation else key[:3], key)
    return [(key, arch) for key in first.values() for arch in TARGETS]


def _tile_volume(constexprs: dict) -> int:
    volume = 1
    for name, value in constexprs.items():
        if (name.startswith("BLOCK") or name == "R_PAD") and isinstance(value, int):
            volume *= value
    return volume


# ---------------------------------------------------------------- tables

def write_tables(results: list[Result], out: Path, title: str) -> None:
    import triton

    out.mkdir(parents=True, exist_ok=True)
    stem = f"triton-{triton.__version__}"
    payload = {"triton": triton.__version__,
               "spill_bound_bytes": {"tensor_cores": SPILL_BOUND_BYTES, "ieee": SPILL_BOUND_IEEE_BYTES,
                                     "per_kernel": KERNEL_SPILL_BOUNDS},
               "targets": {k: {"arch": a, "shared_limit_bytes": s} for k, (a, s) in TARGETS.items()},
               "results": [asdict(r) for r in results]}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# {title}", "",
             f"Triton {triton.__version__}, compiled ahead of time (no GPU) by `python bench/compile_gate.py`; "
             "spill bounds: " + ", ".join(f"{k} {v} B" for k, v in KERNEL_SPILL_BOUNDS.items())
             + f"; other kernels {SPILL_BOUND_BYTES} B (tensor-core precisions), {SPILL_BOUND_IEEE_BYTES} B "
             "(fp32 IEEE, FMA), regression bounds at today's worst (issue 18 lowers them); every tuning "
             "candidate is compiled; shared-memory limits "
             + ", ".join(f"{k} {s} B" for k, (_, s) in TARGETS.items()) + ". "
             "`tc`: tensor-core instructions in the PTX (wgmma: Hopper warpgroup MMA; mma: mma.sync; none: FMA).",
             "",
             "| arch | precision | kernel | configuration | regs | spill B | stack B | shared B | tc | ok | shapes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = "yes" if r.ok else f"**no**: {r.reason}"
        lines.append(f"| {r.arch} | {r.precision} | {r.kernel} | {r.config} | {r.registers} | {r.spill_bytes} | "
                     f"{r.stack_bytes} | {r.shared_bytes} | {r.tensor_cores} | {ok} | {r.shapes} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .json")


# ---------------------------------------------------------------- the CUDA extension

CUDA_SOURCES = ("cuda_common.cu", "meta_gconv_kernels.cu", "node_lora_kernels.cu")


def cuda_table(out: Path, arch: str = "sm_90") -> bool:
    """Compile csrc/cuda/*.cu for ``arch`` with ``nvcc -Xptxas -v``, disassemble with ``cuobjdump
    --dump-sass``; table of registers, spills, shared memory and HMMA count per kernel. False if a
    tensor-core kernel (``*_tc_kernel``) has no HMMA or a kernel spills past ``CUDA_SPILL_BOUND_BYTES``."""
    nvcc = shutil.which("nvcc")
    cuobjdump = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        print("cuda table: nvcc or cuobjdump not found")
        return False
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for source in CUDA_SOURCES:
            obj = Path(tmp) / (Path(source).stem + ".o")
            cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-gencode=arch=compute_{arch[3:]},code={arch}",
                   "-Xptxas", "-v", "-DSTFAST_WITH_CUDA", f"-I{ROOT / 'csrc'}",
                   str(ROOT / "csrc" / "cuda" / source), "-o", str(obj)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:])
                return False
            sass = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True).stdout
            hmma = _hmma_per_function(sass)
            for name, res in _ptxas_per_function(done.stderr).items():
                pretty = _demangle(name)
                count = hmma.get(name, 0)
                tc = "_tc_kernel" in pretty
                row_ok = (count > 0 or not tc) and res["spill_bytes"] <= CUDA_SPILL_BOUND_BYTES
                ok &= row_ok
                rows.append((source, pretty, res, count, row_ok))
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# CUDA extension kernels, {arch} (nvcc -Xptxas -v, cuobjdump --dump-sass)", "",
             "`python bench/compile_gate.py --cuda`; compiled, not run. A `*_tc_kernel` must contain HMMA "
             f"(tensor-core) instructions; spills within {CUDA_SPILL_BOUND_BYTES} B (a regression bound at "
             "today's worst, node_lora_bwd_dx in fp16; the meta_gconv kernels spill nothing).", "",
             "| source | kernel | regs | spill B | stack B | static shared B | HMMA | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for source, pretty, res, count, row_ok in sorted(rows, key=lambda r: (r[0], r[1])):
        lines.append(f"| {source} | `{pretty}` | {res['registers']} | {res['spill_bytes']} | {res['stack_bytes']} | "
                     f"{res['shared_bytes']} | {count} | {'yes' if row_ok else '**no**'} |")
    (out / f"cuda-{arch}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'cuda-{arch}.md'} ({len(rows)} kernels, {'ok' if ok else 'FAILED'})")
    return ok


def _triton_tool(name: str) -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else None


def _ptxas_per_function(log: str) -> dict:
    found, current = {}, None
    for line in log.splitlines():
        head = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)", line)
        if head:
            current = head.group(1).strip("'")
            found.setdefault(current, {"registers": None, "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 0})
            continue
        if current is None:
            continue
        entry = found[current]
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line):
            entry["stack_bytes"], entry["spill_bytes"] = int(m.group(1)), int(m.group(2))
        if m := re.search(r"Used (\d+) registers", line):
            entry["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                entry["shared_bytes"] = int(s.group(1))
    return {name: res for name, res in found.items() if res["registers"] is not None}


def _hmma_per_function(sass: str) -> dict:
    counts, current = {}, None
    for line in sass.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = m.group(1)
            counts[current] = 0
        elif current is not None and re.search(r"\bHMMA\b", line):
            counts[current] += 1
    return counts


def _demangle(name: str) -> str:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


# ---------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="compile the CI sample (see ci_sample), not every precision")
    parser.add_argument("--arch", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--ops", nargs="+", default=["node_lora", "meta_gconv"], choices=["node_lora", "meta_gconv"])
    parser.add_argument("--kernels", nargs="+", help="only kernels whose name starts with one of these")
    parser.add_argument("--shapes", nargs="+", help="only these shape names (of NODE_LORA_SHAPES / META_GCONV_SHAPES)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--every-specialisation", action="store_true",
                        help="compile every integer specialisation the shapes make, not one per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the tables")
    parser.add_argument("--cuda", action="store_true", help="also the CUDA extension's table (nvcc, sm_90)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="compiling processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_gate: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    ok = True
    if not args.no_triton:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # every compile runs ptxas (and reports)
            os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
            found = collect(args.ops, args.precisions, args.shapes, args.kernels)
            jobs = ci_sample(found) if args.ci else full_table(found, args.every_specialisation)
            jobs = [(key, arch) for key, arch in jobs if arch in args.arch]
            print(f"compile_gate: {len(found)} distinct launches; {len(jobs)} compiles, {args.jobs} processes")
            start = time.perf_counter()
            results = run_gate(found, jobs, args.jobs)
            print(f"compile_gate: {len(results)} compiles in {time.perf_counter() - start:.0f} s")
        write_tables(results, args.out, "Triton kernels: resources at sm_90 and sm_80"
                     + (" (CI sample)" if args.ci else ""))
        failed = [r for r in results if not r.ok]
        for r in failed:
            print(f"FAILED {r.arch} {r.precision} {r.kernel} {r.config}: {r.reason}")
        ok &= not failed
    if args.cuda:
        ok &= cuda_table(args.out)
    print("compile_gate:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
