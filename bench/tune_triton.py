"""Tune the Triton kernels on this GPU: time every candidate launch of every kernel at the benchmark
shapes and write the winners as ``stfast/kernels/_tuned.py`` (read by ``stfast.kernels._utils.choose``).

    python bench/tune_triton.py --out DIR [--precisions fp32 tf32 bf16] [--shapes metr-la-b16 ...]
                                [--rounds 5] [--warmup-ms 10] [--rep-ms 25]
    python bench/tune_triton.py --list          # the candidates and tuning keys, no GPU needed

What runs is what the launchers run: the training step of each op (``bench/compile_gate.py``'s
``TUNABLE``: forward and backward of every gradient), first on ``meta`` tensors to learn each kernel's
tuning choices (``recording_choices``: kernel, bucketed key, candidates), then on CUDA tensors:

1. correctness first: the op's outputs with each candidate forced (``forcing_configs``) against the
   default candidate's, max |diff| / max |default| per output within ``TOLERANCE[precision]``; a
   candidate that fails is never chosen (and fails the run);
2. time: each candidate's launch alone (recorded with its exact arguments, then replayed), with
   ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call; median of its calls), in
   ``--rounds`` interleaved rounds whose candidate order rotates; per candidate the median and the
   spread (min..max) of the round medians, summed over the shapes that share a tuning key;
3. the winner of a key is the fastest correct candidate if its median beats the default's by more
   than ``MARGIN`` (noise), else the default; only winners other than the default enter the table.

``--out DIR`` receives ``tune_triton.md`` / ``tune_triton.json`` (every candidate's numbers) and
``_tuned.py`` (the committed table with this device's measured keys replaced): copy it to
``kernels/_tuned.py`` and commit. The files are rewritten after each kernel, so a run cut short keeps
what it measured. Without a CUDA GPU the script refuses (exit 2), except ``--list``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pprint
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE_MODULE = ROOT / "kernels" / "_tuned.py"
# Issue 18's benchmark shapes: METR-LA b16, PEMS08 b16, PEMS07 b64, LargeST (8,600 nodes) b8.
SHAPES = ("metr-la-b16", "pems08-b16", "pems07-b64", "largest-b8")
# Candidates against the default, max |diff| / max |default| over every output: they differ only in
# the order of fp32 accumulation (and, for half outputs, in the last rounding).
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}
MARGIN = 0.03  # a candidate replaces the default only when more than 3% faster
EMPTY_NOTE = " Empty: no GPU measurement has been committed yet,\nso every launch is its kernel's heuristic default."


def _gate():
    sys.path.insert(0, str(ROOT))
    from bench import compile_gate

    return compile_gate


def choice_groups(ops, shapes, precisions) -> dict:
    """``{(op, precision, kernel, key): {"candidates": [config...], "shapes": [name...]}}`` from the
    launchers run on ``meta`` tensors (no GPU)."""
    from stfast.kernels._utils import recording_choices, recording_launches

    gate = _gate()
    groups = {}
    for op in ops:
        table, make_inputs, step, module_name = gate.TUNABLE[op]
        kernels = importlib.import_module(f"stfast.kernels.{module_name}")
        for name in shapes:
            for label in precisions:
                dtype, precision = gate.PRECISIONS[label]
                tensors = make_inputs(table[name], getattr(torch, dtype))
                with recording_choices() as choices, recording_launches():
                    step(kernels, table[name], tensors, precision)
                for choice in choices:
                    group = groups.setdefault((op, label, choice.kernel, choice.key),
                                              {"candidates": [c.config for c in choice.candidates], "shapes": []})
                    if name not in group["shapes"]:
                        group["shapes"].append(name)
    return groups


def _relative_error(got, want) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    want = want.double()
    scale = want.abs().max().clamp_min(1e-30) if want.numel() else torch.tensor(1.0)
    return ((got.double() - want).abs().max() / scale).item() if want.numel() else 0.0


class Case:
    """One shape of one op at one precision on the GPU: its inputs and how to run or record its step."""

    def __init__(self, op, shape_name, label, device):
        gate = _gate()
        table, make_inputs, self._step, module_name = gate.TUNABLE[op]
        self.kernels = importlib.import_module(f"stfast.kernels.{module_name}")
        self.shape = table[shape_name]
        dtype, self.precision = gate.PRECISIONS[label]
        self.tensors = make_inputs(self.shape, getattr(torch, dtype), device)

    def outputs(self, kernel, config) -> list:
        from stfast.kernels._utils import forcing_configs

        with forcing_configs({kernel: config}):
            return self._step(self.kernels, self.shape, self.tensors, self.precision)

    def launch(self, kernel, key, config):
        """The step's first launch of ``kernel`` chosen under tuning ``key``, with ``config`` forced, as a
        call that replays it (with the arguments the launcher gave it)."""
        from stfast.kernels._utils import forcing_configs, recording_choices, recording_launches

        with forcing_configs({kernel: config}), recording_choices() as choices, recording_launches() as recorded:
            self._step(self.kernels, self.shape, self.tensors, self.precision)
        chosen = next(c.chosen for c in choices if c.kernel == kernel and c.key == key)
        launch, module, args = next(r for r in recorded if r[0] is chosen)
        assert launch.config == config, (launch.config, config)
        return lambda: launch(module, *args)


def do_bench_timer(warmup_ms, rep_ms):
    """``timer(kernel, config, call) -> ms``: ``triton.testing.do_bench``'s median (CUDA events, L2
    flushed before each call)."""
    from triton.testing import do_bench

    return lambda kernel, config, call: do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def measure_group(op, label, kernel, key, group, device, rounds, timer) -> dict:
    """Correctness, then interleaved timing (``timer(kernel, config, call) -> ms``) of every candidate of one
    tuning key (see the module docstring)."""
    configs = group["candidates"]
    default = configs[0]
    errors = {config: 0.0 for config in configs}
    samples = {config: {name: [] for name in group["shapes"]} for config in configs}
    for name in group["shapes"]:
        case = Case(op, name, label, device)
        reference = case.outputs(kernel, default)
        for config in configs[1:]:
            got = case.outputs(kernel, config)
            errors[config] = max(errors[config], max(_relative_error(g, w) for g, w in zip(got, reference)))
        calls = {config: case.launch(kernel, key, config) for config in configs}
        for r in range(rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for config in order:
                samples[config][name].append(timer(kernel, config, calls[config]))
        del case, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for config in configs:
        per_round = [sum(samples[config][name][r] for name in group["shapes"]) for r in range(rounds)]
        rows.append({"config": config, "default": config == default, "median_ms": statistics.median(per_round),
                     "min_ms": min(per_round), "max_ms": max(per_round), "max_rel_error": errors[config],
                     "correct": errors[config] <= TOLERANCE[label]})
    base = rows[0]["median_ms"]
    for row in rows:
        row["vs_default"] = row["median_ms"] / base if base else float("nan")
    fastest = min((row for row in rows if row["correct"]), key=lambda row: row["median_ms"])
    winner = fastest["config"] if fastest["median_ms"] < (1 - MARGIN) * base else default
    return {"rows": rows, "winner": winner}


def tune(groups: dict, device, label: str, rounds: int, timer, out: Path, table: dict, settings: str):
    """Measure every group (``choice_groups``) on ``device``, named ``label`` in the table; rewrite the
    reports in ``out`` after each. Returns ``(results, table entries, wrong candidates)``: ``table``'s
    entries with this device's measured keys replaced by the new winners (default winners: no entry)."""
    measured_keys = {(kernel, key) for (_, _, kernel, key) in groups}
    entries = {k: v for k, v in table.items() if k[0] != label or k[1:] not in measured_keys}
    results, wrong = [], 0
    for (op, precision, kernel, key), group in groups.items():
        measured = measure_group(op, precision, kernel, key, group, device, rounds, timer)
        results.append({"op": op, "precision": precision, "kernel": kernel, "key": key, "shapes": group["shapes"],
                        **measured})
        if measured["winner"] != group["candidates"][0]:
            entries[(label, kernel, key)] = measured["winner"]
        wrong += sum(not row["correct"] for row in measured["rows"])
        best = min(measured["rows"], key=lambda row: row["median_ms"])
        print(f"{precision} {kernel} {key}: default {measured['rows'][0]['median_ms']:.4f} ms, fastest "
              f"{best['median_ms']:.4f} ms ({best['config']}); winner {measured['winner']}", flush=True)
        write_reports(out, label, results, entries, settings)
    return results, entries, wrong


def render_table(entries: dict) -> str:
    head = TABLE_MODULE.read_text().split("\nTUNED")[0] + "\n" if TABLE_MODULE.is_file() else '"""Tuned."""\n\n'
    head = head.replace(EMPTY_NOTE, "") if entries else head
    return head + "TUNED: dict[tuple, str] = " + pprint.pformat(entries, width=110) + "\n"


def write_reports(out: Path, device_label: str, results: list, entries: dict, settings: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_triton.json").write_text(json.dumps({"device": device_label, "settings": settings,
                                                      "results": results}, indent=1, default=str) + "\n")
    lines = [f"# Triton launch tuning on {device_label}", "",
             f"`python bench/tune_triton.py` ({settings}). Per tuning key (bucketed shapes), every candidate "
             "launch alone: triton.testing.do_bench median (CUDA events, L2 flushed), summed over the shapes "
             "sharing the key; median and min..max of the interleaved rounds; `vs default` = median / the "
             f"default's; error = max |diff| / max |default| of the op's outputs. Winner: fastest correct "
             f"candidate if > {MARGIN:.0%} faster than the default.", "",
             "| op | precision | kernel | key | shapes | config | median ms | min..max ms | vs default | error | |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"]:
            mark = "**winner**" if row["config"] == result["winner"] else ("default" if row["default"] else "")
            if not row["correct"]:
                mark = "**WRONG**"
            lines.append(f"| {result['op']} | {result['precision']} | {result['kernel']} | {result['key']} | "
                         f"{', '.join(result['shapes'])} | {row['config']} | {row['median_ms']:.4f} | "
                         f"{row['min_ms']:.4f}..{row['max_ms']:.4f} | {row['vs_default']:.3f} | "
                         f"{row['max_rel_error']:.1e} | {mark} |")
    (out / "tune_triton.md").write_text("\n".join(lines) + "\n")
    (out / "_tuned.py").write_text(render_table(entries))


def main(argv=None) -> int:
    gate = _gate()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(gate.TUNABLE), choices=list(gate.TUNABLE))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=list(gate.PRECISIONS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=25)
    parser.add_argument("--out", type=Path, help="folder of tune_triton.{md,json} and _tuned.py")
    parser.add_argument("--list", action="store_true", help="print the candidates per tuning key (no GPU needed)")
    args = parser.parse_args(argv)
    for op in args.ops:
        unknown = sorted(set(args.shapes) - set(gate.TUNABLE[op][0]))
        if unknown:
            parser.error(f"--shapes: {unknown} not in {op}'s shapes {sorted(gate.TUNABLE[op][0])}")

    if args.list:
        for (op, label, kernel, key), group in choice_groups(args.ops, args.shapes, args.precisions).items():
            print(f"{op} {label} {kernel} key={key} shapes={','.join(group['shapes'])}")
            for i, config in enumerate(group["candidates"]):
                print(f"    {'default ' if i == 0 else 'candidate'} {config}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("tune_triton: needs a CUDA GPU (it times compiled kernels; torch.cuda.is_available() is "
              f"{torch.cuda.is_available()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}); "
              "--list shows the candidates without one", file=sys.stderr)
        return 2
    if args.out is None:
        parser.error("--out is required when tuning")

    from stfast.kernels import _tuned
    from stfast.kernels._utils import device_name

    device = torch.device("cuda")
    label = device_name(device)
    settings = (f"{args.rounds} rounds, do_bench warmup {args.warmup_ms} ms, rep {args.rep_ms} ms, "
                f"torch {torch.__version__}")
    groups = choice_groups(args.ops, args.shapes, args.precisions)
    results, entries, wrong = tune(groups, device, label, args.rounds, do_bench_timer(args.warmup_ms, args.rep_ms),
                                   args.out, _tuned.TUNED, settings)
    print(f"tune_triton: {len(results)} keys, {len(entries)} table entries, {wrong} wrong candidate(s); "
          f"wrote {args.out}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
