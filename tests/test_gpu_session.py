"""bench/gpu_session.sh, the one-call GPU session: its CPU dry run (STFAST_SESSION_DEVICE=cpu) on tiny
settings, and that a failed install or a failed import stops it with a clear message instead of
running zero tests.

The dry run here takes the cheap steps (imports, gpu_tests, node_lora, auto_table); the others
(check, himnet_step, meta_gconv, stlora, efficiency) run the same machinery with commands that take
minutes on a CPU: ``STFAST_SESSION_DEVICE=cpu bash bench/gpu_session.sh`` runs them all.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_session(tmp_path, python=sys.executable, steps="imports gpu_tests node_lora auto_table", install="0",
                budget="3000", scale="20"):
    """The script's CPU dry run; its step limits are stretched so that a slow machine cannot fail it."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python), "STFAST_SESSION_DEVICE": "cpu",
           "STFAST_SESSION_INSTALL": install, "STFAST_SESSION_STEPS": steps, "STFAST_SESSION_BUDGET_S": budget,
           "STFAST_SESSION_STEP_SCALE": scale}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True)
    return done, out


def fake_python(tmp_path, body: str) -> Path:
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_dry_run_writes_each_step_into_out(tmp_path):
    done, out = run_session(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt", "results.tar.gz", "session.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    for name in ("imports", "gpu_tests", "node_lora", "auto_table"):
        assert f"| {name} | ok |" in summary, summary
        assert f"===== {name}: ok" in (out / "session.log").read_text()
    assert "passed" in (out / "session.log").read_text()  # the tests step ran tests
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
    assert "results/node_lora/node_lora_op_float32.json" in names
    assert "results/auto_table/_auto_table.py" in names
    assert "torch" in (out / "environment.txt").read_text()
    assert done.stdout.rstrip().splitlines()[-1].startswith("gpu_session: 0 step(s) failed")


def test_a_failing_step_is_reported_and_the_session_goes_on(tmp_path):
    """A step that fails (here a stand-in for the node_lora benchmark exiting with 7) is recorded and
    the later steps still run; the session's exit status says that one failed."""
    python = fake_python(tmp_path, 'case "$1" in bench/node_lora_op.py) exit 7;; bench/auto_table.py) exit 0;; esac\n'
                                   'exit 99\n')
    done, out = run_session(tmp_path, python=python, steps="node_lora auto_table")
    summary = (out / "summary.md").read_text()
    assert done.returncode == 1
    assert "| node_lora | FAILED (exit 7) |" in summary and "| auto_table | ok |" in summary, summary


def test_step_limited_by_the_session_budget_times_out(tmp_path):
    """A step's limit is cut to the budget left (11 s here), and a step that outlives it is killed
    and reported, with the later steps skipped once the budget is spent."""
    python = fake_python(tmp_path, 'case "$1" in bench/node_lora_op.py) sleep 60;; esac\nexit 0\n')
    done, out = run_session(tmp_path, python=python, steps="node_lora auto_table", budget="11")
    summary = (out / "summary.md").read_text()
    assert done.returncode == 1
    assert "| node_lora | TIMEOUT after 11 s |" in summary, summary
    assert "| auto_table | skipped: session budget spent |" in summary, summary


def test_failed_install_stops_the_session(tmp_path):
    python = fake_python(tmp_path, 'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "ERROR: no wheel" >&2; exit 1; fi\n'
                                   f'exec "{sys.executable}" "$@"\n')
    done, out = run_session(tmp_path, python=python, install="1", steps="install imports gpu_tests")
    assert done.returncode == 3
    assert "gpu_session: STOP: pip install -e . failed" in done.stdout
    summary = (out / "summary.md").read_text()
    assert "| install | FAILED (exit 1) |" in summary and "gpu_tests" not in summary, summary
    assert "ERROR: no wheel" in (out / "session.log").read_text()


def test_failed_import_of_the_kernels_stops_the_session(tmp_path):
    """A Python where ``stfast.kernels`` is missing (the package not installed, the failure the old
    script ran into): the session stops before the tests instead of collecting none."""
    hide_kernels = ('import sys; sys.modules["stfast.kernels"] = None; sys.argv = sys.argv[1:]; '
                    'exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})')
    python = fake_python(tmp_path, f'if [ "$1" = - ]; then exec "{sys.executable}" -c \'{hide_kernels}\' "$@"; fi\n'
                                   f'exec "{sys.executable}" "$@"\n')
    done, out = run_session(tmp_path, python=python, steps="imports gpu_tests")
    assert done.returncode == 3
    assert "gpu_session: STOP: stfast is not usable here" in done.stdout
    log = (out / "session.log").read_text()
    assert "stfast.kernels does not import" in log and "is the package installed" in log, log
    assert "gpu_tests" not in (out / "summary.md").read_text()


def test_missing_extension_fails_the_import_step_and_the_session_goes_on(tmp_path, monkeypatch):
    """Without the C++/CUDA extension the triton steps can still run: the imports step fails (exit 4,
    the reason logged) and the session continues."""
    monkeypatch.setenv("STFAST_SKIP_EXT", "1")
    python = fake_python(tmp_path, f'case "$1" in bench/node_lora_op.py) exit 0;; esac\nexec "{sys.executable}" "$@"\n')
    done, out = run_session(tmp_path, python=python, steps="imports node_lora")
    summary = (out / "summary.md").read_text()
    assert done.returncode == 1
    assert "| imports | FAILED (exit 4) |" in summary and "| node_lora | ok |" in summary, summary
    assert "the stfast extension cannot run on cpu" in (out / "session.log").read_text()


def test_stlora_step_is_skipped_with_a_note_without_the_subcommand(tmp_path):
    python = fake_python(tmp_path, 'if [ "$3" = bench ] && [ "$4" = stlora ]; then exit 2; fi\nexit 0\n')
    done, out = run_session(tmp_path, python=python, steps="stlora auto_table")
    summary = (out / "summary.md").read_text()
    assert done.returncode == 0
    assert "| stlora | skipped: `stfast bench stlora` does not exist in this tree |" in summary, summary
    assert "| auto_table | ok |" in summary


def test_unknown_device_is_refused(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "STFAST_SESSION_DEVICE": "tpu"}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "must be cuda or cpu, got 'tpu'" in done.stdout
