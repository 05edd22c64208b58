"""Run logs: every training step in steps.csv, every epoch in epochs.csv, TensorBoard scalars when
``torch.utils.tensorboard`` imports, the resolved configuration in run_config.json, and a resumed run
that continues the logs without repeating or losing a step."""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest

from stfast import models, seed_everything
from stfast.data import load_dataset
from stfast.training.runlog import EPOCH_COLUMNS, STEP_COLUMNS, RunLog
from stfast.training.trainer import Trainer

MAX_BATCHES = 2  # batches per split and epoch: enough for steps to cross epochs, cheap on 2 cores
TINY_HIMNET = dict(hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=2, st_embedding_dim=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("PEMS08", synthetic=True, num_steps=150, seed=1)


def make_trainer(data, out_dir, **training_overrides):
    seed_everything(0)
    forecaster = models.create("himnet", "PEMS08", **TINY_HIMNET)
    training = {**forecaster.config["training"], "batch_size": 32, "lr": 5e-3, **training_overrides}
    return Trainer(forecaster, data, training, out_dir=out_dir, seed=0, progress=False, verbose=False,
                   data_source={"synthetic": True, "num_steps": 150, "seed": 1}, max_batches=MAX_BATCHES)


def read_rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_every_step_and_epoch_and_the_resolved_config_are_saved_beside_the_checkpoints(data, tmp_path):
    trainer = make_trainer(data, tmp_path, weight_decay=0.0)
    state = trainer.fit(epochs=2)
    per_epoch = MAX_BATCHES

    columns, steps = read_rows(tmp_path / "steps.csv")
    assert tuple(columns) == STEP_COLUMNS
    assert [int(r["step"]) for r in steps] == list(range(1, 2 * per_epoch + 1))
    assert [int(r["epoch"]) for r in steps] == [1] * per_epoch + [2] * per_epoch
    assert all(float(r["loss"]) > 0 and float(r["lr"]) == 5e-3 and float(r["seconds"]) > 0 for r in steps)
    assert all(r["horizon"] == "" for r in steps)  # HimNet trains on every horizon from the start

    columns, epochs = read_rows(tmp_path / "epochs.csv")
    assert tuple(columns) == EPOCH_COLUMNS
    for row, history in zip(epochs, state.history):
        assert int(row["epoch"]) == history["epoch"]
        assert float(row["train_loss"]) == history["train_loss"] and float(row["val_loss"]) == history["val_loss"]
    assert [int(r["best"]) for r in epochs][0] == 1

    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["model_name"] == "himnet" and config["dataset"] == "PEMS08"
    assert config["training"]["lr"] == 5e-3 and config["training"]["weight_decay"] == 0.0
    assert config["model_args"]["hidden_dim"] == 4
    assert config["data_source"] == {"synthetic": True, "num_steps": 150, "seed": 1}
    assert config["scaler"]["mean"] == pytest.approx(float(data.scaler.mean))


def test_a_resumed_run_continues_the_logs_without_repeats_and_a_new_run_restarts_them(data, tmp_path):
    make_trainer(data, tmp_path).fit(epochs=1)
    per_epoch = MAX_BATCHES
    with open(tmp_path / "steps.csv", "a", newline="") as handle:  # logged after last.pt, then interrupted
        csv.writer(handle).writerow([per_epoch + 1, 2, 0.5, 5e-3, "", 0.1])
    resumed = make_trainer(data, tmp_path)
    assert resumed.resume()
    resumed.fit(epochs=2)
    _, steps = read_rows(tmp_path / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 2 * per_epoch + 1))
    _, epochs = read_rows(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2]

    make_trainer(data, tmp_path).fit(epochs=1)  # a new run (not resumed) in the same folder: fresh logs
    _, steps = read_rows(tmp_path / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, per_epoch + 1))


def test_tensorboard_gets_the_same_scalars_when_it_is_installed(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = RunLog(tmp_path)
    assert log.tensorboard
    log.step(1, 1, 0.25, 1e-3, None, 0.01)
    log.epoch(1, 0.25, 0.5, 1e-3, True)
    log.close()
    assert calls == [("open", str(tmp_path / "tensorboard")), ("train/loss", 0.25, 1), ("train/lr", 1e-3, 1),
                     ("epoch/train_loss", 0.25, 1), ("epoch/val_loss", 0.5, 1), ("close",)]


def test_without_tensorboard_only_the_csv_logs_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    log = RunLog(tmp_path)
    assert not log.tensorboard
    log.step(1, 1, float("nan"), 1e-3, 6, 0.01)  # a diverged step is logged as it is
    log.close()
    _, rows = read_rows(tmp_path / "steps.csv")
    assert rows[0]["loss"] == "nan" and rows[0]["horizon"] == "6"
    assert not (tmp_path / "tensorboard").exists()
