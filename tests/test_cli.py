"""The ``stfast`` command line as a user runs it: in a subprocess, with exit codes and files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stfast(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stfast", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_profile_reports_the_published_parameter_count_and_a_measured_time(tmp_path):
    out = tmp_path / "out.json"
    result = stfast("profile", "--model", "himnet", "--dataset", "METR-LA", "--batch-size", "2", "--device", "cpu",
                    "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"params", "time_per_batch_ms", "time_per_epoch_s", "peak_memory_mb", "device"}
    assert report["params"] == 1_250_937
    assert report["time_per_batch_ms"]["median"] > 0
    assert report["device"].startswith("cpu")
    assert "1,250,937" in result.stdout


def test_train_then_eval_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    train = stfast("train", "--model", "himnet", "--dataset", "PEMS08", "--synthetic", "--num-steps", "40",
                   "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--out", str(out))
    assert train.returncode == 0, train.stderr
    assert re.search(r"average\s+\d", train.stdout.lower()), train.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["horizon_3", "horizon_6", "horizon_12", "average"]

    again = stfast("train", "--model", "himnet", "--dataset", "PEMS08", "--synthetic", "--num-steps", "40",
                   "--batch-size", "4", "--epochs", "2", "--device", "cpu", "--out", str(out), "--resume",
                   "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "after epoch 1" in again.stdout
    assert "epoch 2:" in again.stdout and "epoch 1:" not in again.stdout

    evaluated = stfast("eval", "--checkpoint", str(out / "best.pt"), "--device", "cpu", "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads((tmp_path / "e.json").read_text())) == set(metrics)


def test_historical_inertia_on_the_real_pems08_prefix(tmp_path, pems08_prefix):
    result = stfast("train", "--model", "hi", "--dataset", "PEMS08", "--data", str(pems08_prefix), "--out",
                    str(tmp_path))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # Persistence on real flows is a weak but meaningful forecaster: errors of tens of vehicles / 5 min.
    assert 5 < metrics["average"]["mae"] < 100
    assert metrics["horizon_3"]["mae"] < metrics["horizon_12"]["mae"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "nope", "--dataset", "PEMS08", "--synthetic"], "model: expected one of"),
        (["train", "--model", "himnet", "--dataset", "PEMS09", "--synthetic"], "dataset: expected one of"),
        (["train", "--model", "himnet", "--dataset", "PEMS08"], "--data PATH or --synthetic: expected one of them"),
        (["train", "--model", "himnet", "--dataset", "PEMS08", "--data", "x.npz", "--synthetic"], "got both"),
        (["train", "--model", "himnet", "--dataset", "PEMS08", "--data", "/no/such/PEMS08.npz"], "/no/such/PEMS08.npz"),
        (["train", "--model", "himnet", "--dataset", "PEMS08", "--synthetic", "--batch-size", "0"],
         "--batch-size: expected a positive integer, got 0"),
        (["profile", "--device", "cuda"], "--device: expected a device this machine has"),
        (["eval", "--checkpoint", "/no/such.pt"], "checkpoint: no such file /no/such.pt"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message, tmp_path):
    if "--device" in args and "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    result = stfast(*args, "--out", str(tmp_path)) if args[0] == "train" else stfast(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_stlora_wraps_any_model_for_training_evaluation_and_profiling(tmp_path):
    out = tmp_path / "run"
    common = ["--model", "stid", "--dataset", "METR-LA", "--device", "cpu", "--stlora", "--stlora-rank", "2",
              "--stlora-layers", "1"]
    train = stfast("train", *common, "--synthetic", "--num-steps", "40", "--batch-size", "4", "--epochs", "1",
                   "--out", str(out), "--no-progress")
    assert train.returncode == 0, train.stderr
    evaluated = stfast("eval", "--checkpoint", str(out / "best.pt"), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr  # the checkpoint rebuilds the wrapper
    profiled = stfast("profile", *common, "--batch-size", "2", "--warmup", "0", "--repeats", "1")
    assert profiled.returncode == 0, profiled.stderr
    assert re.search(r"stlora\s+\+[\d,]+ parameters \([\d.]+% of the backbone's 117,868\)", profiled.stdout)


def test_check_command_is_wired(tmp_path):
    result = stfast("check", "--quick", "--device", "cpu", "--json", str(tmp_path / "check.json"), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "check.json").read_text())
