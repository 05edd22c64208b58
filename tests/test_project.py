"""What the README promises a newcomer is what CI runs."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_commands():
    section = REPO.joinpath("README.md").read_text().split("## Set-up commands for a fresh machine")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_gives_exactly_two_setup_commands_main_job_then_tests():
    main_job, tests = setup_commands()
    assert main_job.endswith("stfast bench efficiency --quick")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    test_command = setup_commands()[1].split("&&")[-1].strip()
    ci_lines = [line.strip() for line in REPO.joinpath(".ci/run").read_text().splitlines()]
    assert test_command in ci_lines


def test_wheel_installs_the_kernels_as_stfast_kernels_only(tmp_path):
    # The layout is the point, not the C++ build (minutes on a busy machine; CI builds it separately), and
    # no wall-clock limit: a slow machine must not fail this test.
    env = {**os.environ, "STFAST_SKIP_EXT": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("stfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"stfast"}
    assert "stfast/kernels/__init__.py" in names
