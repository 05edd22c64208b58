"""The ``stfast`` command line as a user runs it: in a subprocess, with exit codes and files."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stfast(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # No wall-clock limit: on a busy machine a command may take minutes, and that is not a failure.
    return subprocess.run([sys.executable, "-m", "stfast", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_profile_reports_the_published_parameter_count_and_a_measured_time(tmp_path):
    out = tmp_path / "out.json"
    result = stfast("profile", "--model", "himnet", "--dataset", "METR-LA", "--batch-size", "2", "--device", "cpu",
                    "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"params", "time_per_batch_ms", "time_per_epoch_s", "peak_memory_mb", "device", "precision"}
    assert report["precision"] == "fp32"
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
        # Arguments are checked before any data is read: these name a file that does not exist.
        (["train", "--model", "himnet", "--dataset", "PEMS08", "--data", "/no/such.npz", "--epochs", "-3"],
         "--epochs: expected a positive integer, got -3"),
        (["train", "--model", "himnet", "--dataset", "PEMS08", "--data", "/no/such.npz", "--epochs", "0"],
         "--epochs: expected a positive integer, got 0"),
        (["train", "--model", "stid", "--dataset", "PEMS08", "--data", "/no/such.npz", "--backend", "torch"],
         "--backend: expected one of ['reference'] for stid, got 'torch'"),
        (["train", "--model", "himnet", "--dataset", "PEMS08", "--data", "/no/such.npz",
          "--max-batches-per-epoch", "0"], "--max-batches-per-epoch: expected a positive integer, got 0"),
        (["profile", "--json", "/no/such/folder/x.json"], "--json: the folder /no/such/folder does not exist"),
        (["profile", "--model", "himnet", "--stlora", "--stlora-rank", "0"], "--stlora-rank: expected a positive"),
        (["profile", "--epoch-batches", "0"], "--epoch-batches: expected a positive integer, got 0"),
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


@pytest.mark.parametrize("command", ["train", "profile"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_gpu_backend_on_a_machine_without_one_is_refused_before_anything_loads(command, backend, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = ["--data", "/no/such.npz", "--out", str(tmp_path)] if command == "train" else []
    result = stfast(command, "--model", "himnet", "--dataset", "PEMS08", "--backend", backend, "--device", "cpu", *data)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--backend: '{backend}' cannot run meta_gconv on cpu here (" in result.stderr
    assert "backends that can: auto, reference, torch" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help_texts():
    from stfast import __version__
    from stfast.cli import build_parser

    result = stfast("--version")
    assert result.returncode == 0 and result.stdout.startswith(f"stfast {__version__} (torch ")
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and ":mod:" not in text, name  # plain text, no reST
    assert "``" not in parser.format_help()
    for bench in subcommands["bench"]._subparsers._group_actions[0].choices.values():
        assert "``" not in bench.format_help() and ":class:" not in bench.format_help(), bench.prog
    for name in ("train", "eval", "profile"):
        silent = [action.option_strings for action in subcommands[name]._actions if not action.help]
        assert not silent, (name, silent)  # every flag says what it does
    train = subcommands["train"].format_help()
    for name in ("auto", "torch", "triton", "cuda", "cpu", "reference"):
        assert name in " ".join(train.split()), name  # --backend lists every backend
    assert "written by `stfast train`" in " ".join(subcommands["eval"].format_help().split())


def test_any_zoo_model_trains_on_pems08_in_a_shortened_run(tmp_path):
    result = stfast("train", "--model", "agcrn", "--dataset", "PEMS08", "--synthetic", "--num-steps", "60",
                    "--batch-size", "2", "--epochs", "1", "--max-batches-per-epoch", "2", "--device", "cpu",
                    "--stlora", "--stlora-rank", "2", "--stlora-layers", "1", "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    # what runs: the model, ST-LoRA's options and the backend "auto" chose
    assert re.match(r"agcrn \+ ST-LoRA \(rank 2, 1 layers\) \(auto -> (cpu|torch)\) on PEMS08: ", header), header
    assert "at most 2 batch(es) per split and epoch" in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["average"]["mae"] > 0


def test_max_batches_caps_every_split_of_a_trainer():
    from stfast import models
    from stfast.data import load_dataset
    from stfast.training.trainer import Trainer

    data = load_dataset("PEMS08", synthetic=True, num_steps=200)
    forecaster = models.create("hi", "PEMS08")
    training = dict(forecaster.config["training"], batch_size=4)
    trainer = Trainer(forecaster, data, training, progress=False, max_batches=3)
    for split in ("train", "val", "test"):
        assert data.num_batches(split, 4) > 3
        assert trainer.num_batches(split) == 3 and len(list(trainer._batches(split))) == 3
    with pytest.raises(ValueError, match="max_batches: expected a positive integer, got 0"):
        Trainer(forecaster, data, training, progress=False, max_batches=0)


def test_profile_marks_an_unpublished_configuration_and_shows_progress(tmp_path):
    result = stfast("profile", "--model", "lstm_largest", "--dataset", "METR-LA", "--batch-size", "1", "--warmup", "1",
                    "--repeats", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header.startswith("lstm_largest (reference) [defaults with the dataset's shape] on METR-LA-shaped synthetic")
    assert "x 23,974 training batches, the full METR-LA training split" in header  # the epoch time's basis, stated
    assert "profile [" in result.stderr and "2/2" in result.stderr  # a progress line while it measures


def test_check_summary_adds_up():
    from stfast.check import summary_line

    assert summary_line(94, 0, 5, 1.0) == "94 case(s) in 1.0s: 89 checked (89 passed, 0 failed), 5 skipped -> PASS"
    assert summary_line(3, 1, 0, 2.0) == "3 case(s) in 2.0s: 3 checked (2 passed, 1 failed) -> FAIL"


def test_a_graph_with_many_isolated_nodes_is_flagged(tmp_path):
    import numpy as np

    from stfast.data import load_adjacency

    adjacency = np.zeros((40, 40), dtype=np.float32)
    adjacency[np.arange(9), np.arange(1, 10)] = 1.0  # a path on nodes 0..9: nodes 10..39 have no edge
    np.save(tmp_path / "graph.npy", adjacency)
    with pytest.warns(UserWarning, match="graph: 30 of 40 nodes have no edge"):
        load_adjacency(tmp_path / "graph.npy", 40)
    np.save(tmp_path / "own.npy", adjacency[:10, :10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_adjacency(tmp_path / "own.npy", 10).shape == (10, 10)


def test_auto_backend_is_accepted_with_stlora():
    import torch

    from stfast.cli import check_backend

    check_backend("himnet", "auto", torch.device("cpu"), stlora=True)  # auto resolves per op: nothing to refuse
    with pytest.raises(ValueError, match="--backend: expected one of"):
        check_backend("himnet", "no-such-backend", torch.device("cpu"), stlora=True)
