"""Measure which backend wins each op and dtype on this GPU, for ``auto`` (stfast/ops/_auto_table.py).

    python bench/auto_table.py [--device cuda] [--dtypes float32 bfloat16 float16] [--rounds 5]
                               [--out DIR] [--write]

For each op (``meta_gconv`` at HimNet's METR-LA decoder shape, axes S, T and ST; ``node_lora`` at the
ST-LoRA benchmark shapes) and dtype, every backend that runs on the device times forward+backward
side by side: ``--rounds`` interleaved rounds (the backends' order rotates each round), each a
warm-up then ``--repeats`` timed calls, timed with CUDA events (wall clock on CPU). A backend's time
is the sum over the op's shapes of its median per-call time; the winner is the smallest. fp32 is
measured in IEEE fp32 (TF32 off), as torch's default.

``--out DIR`` writes ``DIR/auto_table.{md,json}`` and ``DIR/_auto_table.py`` (the module with this
device's winners merged into the committed ones); ``--write`` also replaces
``stfast/ops/_auto_table.py``. Only CUDA devices' entries are used by ``auto``; on a CPU this runs
as a dry run (tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import pprint
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE_MODULE = ROOT / "stfast" / "ops" / "_auto_table.py"
CANDIDATES = ("torch", "triton", "cuda", "cpu")

# (B, N, C, K, D, O): HimNet's decoder gate, METR-LA, batch 16 (bench/test_meta_gconv_bench.py).
META_GCONV_SHAPES = {"cuda": [(16, 207, 67, 2, 16, 128)], "cpu": [(2, 7, 5, 2, 3, 8)]}
# (B, N, d_in, d_out, r): bench/node_lora_op.py's ST-LoRA benchmark and METR-LA shapes.
NODE_LORA_SHAPES = {"cuda": [(64, 883, 128, 128, 16), (64, 207, 64, 64, 16)], "cpu": [(2, 7, 8, 8, 4)]}


def meta_gconv_cases(device, dtype):
    from stfast import ops

    for batch, nodes, channels, cheb_k, dim, out in META_GCONV_SHAPES[device.type]:
        for axis, emb_shape in (("S", (nodes, dim)), ("T", (batch, dim)), ("ST", (batch, nodes, dim))):
            leaves = [torch.randn(batch, nodes, channels), torch.softmax(torch.randn(batch, nodes, nodes), -1),
                      torch.randn(*emb_shape), torch.randn(dim, cheb_k * channels, out) * 0.1, torch.randn(dim, out)]
            leaves = [t.to(device, dtype).requires_grad_() for t in leaves]

            def call(leaves=leaves, axis=axis):
                return ops.meta_gconv(*leaves[:3], leaves[3], leaves[4], cheb_k=cheb_k, activation="sigmoid", axis=axis)

            yield f"B{batch} N{nodes} C{channels} K{cheb_k} D{dim} O{out} {axis}", leaves, call


def node_lora_cases(device, dtype):
    from stfast import ops

    for batch, nodes, d_in, d_out, rank in NODE_LORA_SHAPES[device.type]:
        leaves = [torch.randn(batch, nodes, d_in), torch.randn(d_out, d_in) * d_in**-0.5, torch.randn(d_out),
                  torch.randn(nodes, d_in, rank) * d_in**-0.5, torch.randn(nodes, rank, d_out) * rank**-0.5]
        leaves = [t.to(device, dtype).requires_grad_() for t in leaves]

        def call(leaves=leaves):
            return ops.node_lora(*leaves, 0.5, "leaky_relu")

        yield f"B{batch} N{nodes} d{d_in}->{d_out} r{rank}", leaves, call


CASES = {"meta_gconv": meta_gconv_cases, "node_lora": node_lora_cases}


def _timer(device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            begin = time.perf_counter()
            fn()
            return (time.perf_counter() - begin) * 1e3
    return timed


def measure_op(op, device, dtype, backends, rounds, warmup, repeats) -> dict:
    """``{backend: total median ms over the op's cases}`` (forward+backward), plus per-case medians."""
    from stfast import ops

    timed = _timer(device)
    per_case = {}
    for case, leaves, call in CASES[op](device, dtype):
        grad = None

        def step():
            out = call()
            out.backward(grad)
            for leaf in leaves:
                leaf.grad = None

        with ops.use_backend("torch"):
            grad = torch.randn_like(call())
        samples = {name: [] for name in backends}
        for r in range(rounds):
            order = backends[r % len(backends):] + backends[:r % len(backends)]
            for name in order:
                with ops.use_backend(name):
                    for _ in range(warmup):
                        step()
                    samples[name].extend(timed(step) for _ in range(repeats))
        per_case[case] = {name: statistics.median(values) for name, values in samples.items()}
    totals = {name: sum(case[name] for case in per_case.values()) for name in backends}
    return {"total_ms": totals, "cases_ms": per_case}


def device_label(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def render_module(winners: dict) -> str:
    head = TABLE_MODULE.read_text().split("WINNERS")[0] if TABLE_MODULE.is_file() else '"""Measured winners."""\n\n'
    head = head.replace("Empty: no GPU session has measured the kernels yet.\n", "")
    return head + "WINNERS: dict[str, dict[str, str]] = " + pprint.pformat(winners, width=100) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write auto_table.{md,json} and _auto_table.py there")
    parser.add_argument("--write", action="store_true", help="replace stfast/ops/_auto_table.py (CUDA only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as IEEE fp32, torch's default

    from stfast import ops
    from stfast.ops import _auto_table

    label = device_label(device)
    rows, winners = [], {}
    for op in args.ops:
        status = ops.available_backends(device, op)
        backends = [name for name in CANDIDATES if status[name] is True]
        for dtype_name in args.dtypes:
            if device.type == "cpu" and dtype_name != "float32":
                continue
            result = measure_op(op, device, getattr(torch, dtype_name), backends, args.rounds, args.warmup,
                                args.repeats)
            winner = min(result["total_ms"], key=result["total_ms"].get)
            winners[f"{op}/{dtype_name}"] = winner
            rows.append({"op": op, "dtype": dtype_name, "winner": winner, **result})
            times = ", ".join(f"{k} {v:.3f}" for k, v in result["total_ms"].items())
            print(f"{op} {dtype_name}: {times} ms -> {winner}", flush=True)

    merged = {**_auto_table.WINNERS, label: winners} if device.type == "cuda" else dict(_auto_table.WINNERS)
    lines = [f"# auto backend winners on {label}", "",
             f"`python bench/auto_table.py`: forward+backward, sum over the op's shapes of the median of "
             f"{args.rounds} interleaved rounds x {args.repeats} calls, ms.", "",
             "| op | dtype | " + " | ".join(CANDIDATES) + " | winner |", "|---|---|" + "---|" * (len(CANDIDATES) + 1)]
    for row in rows:
        cells = [f"{row['total_ms'][n]:.3f}" if n in row["total_ms"] else "-" for n in CANDIDATES]
        lines.append(f"| {row['op']} | {row['dtype']} | " + " | ".join(cells) + f" | {row['winner']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "auto_table.md").write_text(table)
        (args.out / "auto_table.json").write_text(json.dumps({"device": label, "rows": rows}, indent=1) + "\n")
        (args.out / "_auto_table.py").write_text(render_module(merged))
    if args.write:
        if device.type != "cuda":
            print("--write: only a CUDA device's winners are recorded", file=sys.stderr)
            return 2
        TABLE_MODULE.write_text(render_module(merged))
        print(f"wrote {TABLE_MODULE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
