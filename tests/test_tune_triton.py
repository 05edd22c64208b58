"""bench/tune_triton.py's measuring logic without a GPU: under the Triton interpreter, on toy shapes of both ops,
with a stand-in timer (the one thing that needs CUDA). Every candidate is checked against the default
and replayed; the fastest correct candidate beyond the noise margin becomes the table entry, keyed by
(device, kernel, bucketed key); a default winner adds none; the written _tuned.py is the table."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from bench import compile_gate as gate, tune_triton as tt

gate.META_GCONV_SHAPES["toy"] = (2, 10, 9, 2, 2, 70)  # M = 20, I = 18, O = 70, D = 2: distinct candidates
gate.NODE_LORA_SHAPES["toy"] = (1, 3, 40, 40, 4)
groups = tt.choice_groups(["meta_gconv", "node_lora"], ["toy"], ["fp32"])
by_kernel = {{k[2]: (k, g) for k, g in groups.items()}}
assert {{"meta_gconv_bwd_dp", "meta_gconv_bwd_dxg_de", "meta_gconv_fwd", "node_lora_fwd"}} <= set(by_kernel), groups
(fwd_key, fwd), (dp_key, dp) = by_kernel["meta_gconv_fwd"], by_kernel["meta_gconv_bwd_dp"]
assert len(fwd["candidates"]) == 3, fwd
fast, slightly_faster = fwd["candidates"][-1], dp["candidates"][-1]
calls = []

def timer(kernel, config, call):
    call()  # the recorded launch replays
    calls.append(config)
    if kernel == "meta_gconv_fwd" and config == fast:
        return 0.5
    return 0.99 if kernel == "meta_gconv_bwd_dp" and config == slightly_faster else 1.0

old = {{("Fake GPU", "meta_gconv_fwd", ("unmeasured",)): "kept: not measured now",
        ("Other GPU", "meta_gconv_fwd", fwd_key[3]): "kept: another device",
        ("Fake GPU", "meta_gconv_bwd_dp", dp_key[3]): "dropped: the default wins now"}}
results, entries, wrong = tt.tune(groups, torch.device("cpu"), "Fake GPU", 2, timer, Path({out!r}), old, "test")
assert wrong == 0 and all(row["correct"] and row["max_rel_error"] <= 1e-4 for r in results for row in r["rows"])
assert len(calls) == 2 * sum(len(g["candidates"]) for g in groups.values())  # every candidate, every round
assert entries == {{("Fake GPU", "meta_gconv_fwd", ("unmeasured",)): "kept: not measured now",
                    ("Other GPU", "meta_gconv_fwd", fwd_key[3]): "kept: another device",
                    ("Fake GPU", "meta_gconv_fwd", fwd_key[3]): fast}}, entries  # dp: 1% is noise
namespace = {{}}
exec(open({out!r} + "/_tuned.py").read(), namespace)
assert namespace["TUNED"] == entries
print("ok")
"""


def test_tuner_checks_times_and_tables_every_candidate(tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), out=out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "out" / "tune_triton.md").read_text()
    assert "| meta_gconv | fp32 | meta_gconv_bwd_dxg_de |" in report and "default" in report
