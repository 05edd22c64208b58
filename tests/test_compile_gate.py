"""The compile gate (bench/compile_gate.py): every Triton kernel, launched as its launcher launches it
for the benchmark shapes and the extremes, compiles ahead of time for sm_90 and sm_80 within the
targets' shared memory and the stated spill bound, and tl.dot lowers to tensor-core instructions; the
gate rejects a kernel that does not compile, overflows shared memory, spills, or has too large a grid.
Also the launch configuration itself: pure functions of the shapes, CUDA's grid limits, the rank limit.

Compiles run in subprocesses without ``TRITON_INTERPRET`` (this process may hold interpreted kernels).
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _triton_interpreter import import_kernels

node_lora = import_kernels("node_lora")
meta_gconv = import_kernels("meta_gconv")
from stfast.kernels._utils import GRID_LIMITS, Launch, recording_launches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"node_lora_fwd", "node_lora_bwd_rows", "node_lora_bwd_da", "node_lora_bwd_db", "node_lora_bwd_dw",
           "meta_gconv_fwd", "meta_gconv_bwd_dxg_de", "meta_gconv_bwd_dp"}


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("TRITON_INTERPRET", None)
    return env


# ---------------------------------------------------------------- the gate on stfast's kernels

@pytest.fixture(scope="module")
def ci_gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_gate.py"), "--ci", "--jobs", "2",
                           "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    tables = list(out.glob("triton-*.json"))
    return done, json.loads(tables[0].read_text()) if tables else None


def test_every_launch_configuration_compiles_for_sm_90_and_sm_80(ci_gate):
    done, table = ci_gate
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = table["results"]
    assert {r["kernel"] for r in results if r["arch"] == "sm_90"} == KERNELS
    assert {r["kernel"] for r in results if r["arch"] == "sm_80"} == KERNELS
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    for r in results:
        limit = table["targets"][r["arch"]]["shared_limit_bytes"]
        assert r["registers"] is not None and 0 < r["shared_bytes"] <= limit, r
        bounds = table["spill_bound_bytes"]
        bound = bounds["per_kernel"].get(r["kernel"],
                                         bounds["ieee" if "INPUT_PRECISION=ieee" in r["config"] else "tensor_cores"])
        assert r["spill_bound"] == bound and r["spill_bytes"] <= bound, r


def test_every_block_configuration_of_the_shape_grid_was_compiled(ci_gate):
    """The CI sample covers each (kernel, block sizes, warps, stages) that the launchers choose for the
    gate's shapes: the largest rank (MAX_RANK) and the 64-row tiles among them."""
    _, table = ci_gate
    configs = {r["config"] for r in table["results"]}
    assert any(f"R_PAD={node_lora.MAX_RANK}" in c and "BLOCK_M=64" in c for c in configs)
    assert any("BLOCK_M=16 BLOCK_K=16 BLOCK_O=16 R_PAD=16" in c for c in configs)  # N = 1, d = 1 extremes


def test_dot_lowers_to_tensor_cores(ci_gate):
    """fp32 (TF32) and bf16 products lower to wgmma on sm_90 at 64-row tiles and to mma.sync on sm_80."""
    _, table = ci_gate
    sm90 = [r for r in table["results"] if r["arch"] == "sm_90" and "BLOCK_M=64 BLOCK_I=32 BLOCK_O=64" in r["config"]
            and r["kernel"] == "meta_gconv_fwd"]
    assert sm90 and all(r["tensor_cores"] == "wgmma" for r in sm90), sm90
    assert all(r["tensor_cores"] in ("mma", "wgmma") for r in table["results"] if r["arch"] == "sm_90")
    assert all(r["tensor_cores"] == "mma" for r in table["results"] if r["arch"] == "sm_80")


def test_gate_rejects_broken_kernels():
    """One deliberately broken launch per rule: a block size that is not a power of two (does not
    compile), tiles whose pipelined operands overflow sm_90's shared memory, a register tile that
    spills past a bound, a grid axis past CUDA's limit."""
    script = """
import json, os, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import torch
from bench.compile_gate import check, _meta
import _broken_kernels as k
t = lambda: _meta(1, dtype=torch.float32)
print(json.dumps({
    "not_compiling": check(k.square_tile, [t(), t(), t()], dict(BLOCK=24, num_warps=4, num_stages=3), (1,), "sm_90"),
    "shared": check(k.matmul_tiles, [t(), t(), t(), 1024], dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4,
                    num_stages=4), (1,), "sm_90"),
    "spills": check(k.running_sum, [t(), t(), 7], dict(BLOCK=128, num_warps=2, num_stages=1), (1,), "sm_90",
                    bound=256),
    "grid": check(k.square_tile, [t(), t(), t()], {"BLOCK": 16, "num_warps": 4, "num_stages": 3}, (1, 70000), "sm_80"),
    "fine": check(k.square_tile, [t(), t(), t()], {"BLOCK": 16, "num_warps": 4, "num_stages": 3}, (1, 65535), "sm_80"),
}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    assert not verdicts["not_compiling"]["ok"]
    assert "does not compile: arange's range must be a power of 2" in verdicts["not_compiling"]["reason"]
    assert not verdicts["shared"]["ok"] and verdicts["shared"]["shared_bytes"] > 227 * 1024
    assert "shared memory" in verdicts["shared"]["reason"] and "above sm_90's 232448 B" in verdicts["shared"]["reason"]
    assert not verdicts["spills"]["ok"] and verdicts["spills"]["spill_bytes"] > 256
    assert "above the bound of 256 B" in verdicts["spills"]["reason"]
    assert not verdicts["grid"]["ok"] and "grid axis 1 has 70000 programs (limit 65535)" in verdicts["grid"]["reason"]
    assert verdicts["fine"]["ok"], verdicts["fine"]


# ---------------------------------------------------------------- launch configuration (pure, no compile)

def test_gate_collects_every_tuning_candidate_not_only_the_default():
    """The gate compiles each candidate launch of each tuned kernel (here meta_gconv at METR-LA b16):
    the launchers run once more per candidate under ``forcing_configs``."""
    sys.path.insert(0, str(ROOT))
    from bench.compile_gate import META_GCONV_SHAPES, candidate_launches, step_launches
    from stfast.kernels._utils import recording_choices

    with recording_choices() as choices:
        recorded = candidate_launches(lambda: step_launches("meta_gconv", META_GCONV_SHAPES["metr-la-b16"], "float32",
                                                            "tf32", meta_gconv))
    collected = {(launch.kernel, launch.config) for launch, *_ in recorded}
    wanted = {(c.kernel, candidate.config) for c in choices for candidate in c.candidates}
    assert {kernel for kernel, _ in wanted} == {"meta_gconv_fwd", "meta_gconv_bwd_dxg_de", "meta_gconv_bwd_dp"}
    assert len(wanted) >= 9 and wanted <= collected


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_node_lora_grid_stays_inside_cuda_limits_for_millions_of_rows():
    """~5M flattened leading rows: 78,125 batch tiles of 64; a second grid axis would pass 65,535."""
    launch = node_lora.forward_launch(5_000_000, 3, 64, 64, 16, has_bias=True, dropout_p=0.0, activation="relu",
                                      input_precision="tf32")
    assert launch.grid == (3 * 78_125,) and launch.grid[0] <= GRID_LIMITS[0]
    rows = node_lora.backward_launches(5_000_000, 3, 64, 64, 16, needs=(True,) * 5, has_bias=True, dropout_p=0.0,
                                       activation="relu", input_precision="tf32")
    for launch in rows.values():
        assert all(extent <= limit for extent, limit in zip(launch.grid, GRID_LIMITS)), launch


def test_launch_refuses_a_grid_past_cuda_limits():
    with pytest.raises(ValueError, match="grid axis 1 has 70000 programs, above CUDA's limit of 65535"):
        Launch("k", (1, 70_000), {})


def test_rank_above_the_triton_limit_is_refused_before_launch():
    x, w = _meta(4, 3, 8), _meta(5, 8)
    rank = node_lora.MAX_RANK + 1
    a, b = _meta(3, 8, rank), _meta(3, rank, 5)
    with pytest.raises(ValueError, match=rf"lora_a: rank {rank} is above the triton backend's limit of "
                                         rf"{node_lora.MAX_RANK}.*torch, cpu and cuda backends take any rank"):
        with recording_launches():
            node_lora.node_lora_forward(x, w, None, a, b, 1.0, "relu", 0.0, _meta(2, dtype=torch.int64))


def test_launchers_launch_exactly_the_configuration_functions():
    """The launchers' recorded launches are the pure functions' results for the same shapes."""
    x, w, bias = _meta(70, 2, 33), _meta(20, 33), _meta(20)
    a, b, g = _meta(2, 33, 5), _meta(2, 5, 20), _meta(70, 2, 20)
    with recording_launches() as recorded:
        seed = _meta(2, dtype=torch.int64)
        node_lora.node_lora_forward(x, w, bias, a, b, 0.5, "tanh", 0.1, seed, input_precision="ieee")
        node_lora.node_lora_backward(g, x, w, bias, a, b, 0.5, "tanh", 0.1, seed, (True,) * 5, input_precision="ieee")
    expected = [node_lora.forward_launch(70, 2, 33, 20, 5, has_bias=True, dropout_p=0.1, activation="tanh",
                                         input_precision="ieee")]
    expected += list(node_lora.backward_launches(70, 2, 33, 20, 5, needs=(True,) * 5, has_bias=True, dropout_p=0.1,
                                                 activation="tanh", input_precision="ieee").values())
    assert [(r[0].kernel, r[0].grid, r[0].options) for r in recorded] == \
        [(e.kernel, e.grid, e.options) for e in expected]

    xg, emb, pool, pb, grad = _meta(140, 12), _meta(2, 4), _meta(4, 12, 9), _meta(4, 9), _meta(140, 9)
    with recording_launches() as recorded:
        meta_gconv.meta_gconv_forward(xg, emb, "S", 2, pool, pb, "sigmoid", input_precision="ieee")
        meta_gconv.meta_gconv_backward(grad, xg, emb, "S", 2, pool, pb, True, True, True, input_precision="ieee")
    expected = [meta_gconv.forward_launch(140, 12, 9, 4, has_bias=True, activation="sigmoid", input_precision="ieee")]
    expected += list(meta_gconv.backward_launches(140, 12, 9, 4, need_xg=True, need_e=True, need_pool=True,
                                                  has_bias=True, input_precision="ieee").values())
    assert [(r[0].kernel, r[0].grid, r[0].options) for r in recorded] == \
        [(e.kernel, e.grid, e.options) for e in expected]


def test_weight_and_bias_gradient_launch_has_a_program_when_d_in_is_zero():
    """d_in = 0: the dW / db kernel still gets one K tile, whose programs write the bias gradient."""
    launches = node_lora.backward_launches(4, 3, 0, 5, 2, needs=(False, True, True, False, False), has_bias=True,
                                           dropout_p=0.0, activation=None, input_precision="ieee")
    assert launches["dw"].grid[1] == 1


@pytest.mark.parametrize("name", ["node_lora_fwd", "node_lora_bwd_rows", "node_lora_bwd_da"])
def test_dropout_seed_is_read_from_device_memory(name):
    """A fresh seed per step neither recompiles nor needs a host value (a CUDA graph can capture the step):
    the kernels take a pointer to the int64 (seed, offset), no integer seed or offset argument."""
    params = inspect.signature(getattr(node_lora, name).fn).parameters  # JITFunction and InterpretedFunction
    assert "seed_ptr" in params and not {"seed", "offset"} & set(params)


def test_bias_gradient_is_written_when_d_in_is_zero():
    """The triton launcher with d_in = 0 (under the interpreter, in a fresh process): db = sum of the
    output gradient over rows, dW empty; before, the dW / db grid had no program and db was garbage."""
    script = """
import torch
from stfast.kernels import node_lora
g = torch.randn(6, 3, 5)
x, w, b = torch.empty(6, 3, 0), torch.empty(5, 0), torch.zeros(5)
a, bb = torch.empty(3, 0, 2), torch.randn(3, 2, 5)
for _ in range(3):  # uninitialised memory would differ between calls
    seed = torch.zeros(2, dtype=torch.int64)
    dx, dw, db, da, dB = node_lora.node_lora_backward(g, x, w, b, a, bb, 1.0, None, 0.0, seed, (True,) * 5)
    torch.testing.assert_close(db, g.sum((0, 1)))
    assert dw.shape == (5, 0) and dx.shape == (6, 3, 0) and da.shape == (3, 0, 2)
    torch.testing.assert_close(dB, torch.zeros(3, 2, 5))  # h = 0 without inputs
print("ok")
"""
    env = {**_env(), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
