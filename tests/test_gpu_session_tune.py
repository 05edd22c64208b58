"""The ``tune`` step of bench/gpu_session.sh and bench/tune_triton.py without a GPU: the CPU dry run
lists every kernel's candidate launches per tuning key into the results, and tuning proper (which
times compiled kernels) refuses clearly."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from test_gpu_session import pytestmark, run_session  # noqa: F401 - the same requirements (bash, timeout)

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_the_candidates_of_every_meta_gconv_kernel(tmp_path):
    done, out = run_session(tmp_path, steps="tune")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| tune | ok |" in (out / "summary.md").read_text()
    with tarfile.open(out / "results.tar.gz") as archive:
        listing = archive.extractfile("results/tune/candidates.txt").read().decode()
    for kernel in ("meta_gconv_fwd", "meta_gconv_bwd_dxg_de", "meta_gconv_bwd_dp"):
        assert f"meta_gconv tf32 {kernel} key=(4096, 256, 128, 16, 'float32', 'tf32'" in listing, listing[:2000]
    assert "shapes=metr-la-b16,pems08-b16" in listing and "largest-b8" in listing
    assert "default  BLOCK_M=64 BLOCK_I=32 BLOCK_O=128 warps=8 stages=3" in listing


def test_tuning_refuses_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even on a GPU machine
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "tune_triton.py"), "--out", str(tmp_path / "t")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "tune_triton: needs a CUDA GPU" in done.stderr and "--list shows the candidates" in done.stderr
    assert not (tmp_path / "t").exists()
