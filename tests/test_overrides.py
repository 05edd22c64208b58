"""``--set key=value``: configuration overrides are typed, checked against the published configuration,
applied to the model and the training recipe, and recorded in run_config.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stfast import configs
from stfast.overrides import apply_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def himnet():
    return configs.load("himnet", "PEMS08")


def test_values_are_read_as_json_and_keep_their_section(himnet):
    overrides = apply_overrides(himnet, ["training.lr=5e-4", "model.hidden_dim=32", "milestones=[10, 20]",
                                         "use_teacher_forcing=false", "training.weight_decay=0"])
    assert overrides == {"model": {"hidden_dim": 32, "use_teacher_forcing": False},
                         "training": {"lr": 5e-4, "milestones": [10, 20], "weight_decay": 0.0}}
    assert isinstance(overrides["training"]["weight_decay"], float)  # an integer is accepted for a float
    assert himnet["training"]["lr"] == 1e-3  # the configuration itself is not modified


def test_strings_need_no_quotes(himnet):
    assert apply_overrides(himnet, ["training.loss=masked_mae"])["training"] == {"loss": "masked_mae"}


@pytest.mark.parametrize("assignment, message", [
    ("training.lr", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("training.learning_rate=1", r"expected one of \['training.batch_size'"),
    ("hidden=3", "expected one of"),
    ("model.hidden_dim=32.5", "expected int for model.hidden_dim"),
    ("model.hidden_dim=true", "expected int for model.hidden_dim"),
    ("training.lr=fast", "expected a JSON value for training.lr"),
    ("use_teacher_forcing=1", "expected bool"),
    ("training.milestones=10", "expected list for training.milestones"),
])
def test_bad_assignments_are_refused_with_the_key(himnet, assignment, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(himnet, [assignment])


def test_a_key_in_both_sections_must_be_qualified():
    config = {"model": {"out_steps": 12}, "training": {"out_steps": 12}}
    with pytest.raises(ValueError, match="in both sections; expected model.out_steps or training.out_steps"):
        apply_overrides(config, ["out_steps=6"])


def stfast(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stfast", *args], capture_output=True, text=True, env=env)


def test_train_applies_the_overrides_and_records_them(tmp_path):
    out = tmp_path / "run"
    result = stfast("train", "--model", "himnet", "--dataset", "PEMS08", "--synthetic", "--num-steps", "40",
                    "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--out", str(out), "--no-progress",
                    "--set", "training.lr=0.004", "--set", "model.hidden_dim=8")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["lr"] == 0.004 and config["model_args"]["hidden_dim"] == 8
    steps = (out / "steps.csv").read_text().splitlines()
    assert steps[0] == "step,epoch,loss,lr,horizon,seconds" and len(steps) > 1
    assert all(float(line.split(",")[3]) == 0.004 for line in steps[1:])

    bad = stfast("train", "--model", "himnet", "--dataset", "PEMS08", "--synthetic", "--out", str(tmp_path / "b"),
                 "--set", "training.lr=fast")
    assert bad.returncode == 2 and "--set: expected a JSON value for training.lr" in bad.stderr
