"""Checkpoints and run folders: files load without running code, runs never share a folder, resume
and eval say what does not fit (issue 14, items 1, 6 and 9)."""

import os
import pickle
import random
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from stfast import models, seed_everything
from stfast.data import load_dataset
from stfast.training import checkpoint as ckpt
from stfast.training.trainer import Trainer, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_HIMNET = dict(hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=2, st_embedding_dim=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("PEMS08", synthetic=True, num_steps=150, seed=1)


def make_trainer(data, out_dir, seed=0, batch_size=32, **model_args):
    seed_everything(seed)
    forecaster = models.create("himnet", "PEMS08", **{**TINY_HIMNET, **model_args})
    training = {**forecaster.config["training"], "batch_size": batch_size}
    source = {"path": None, "synthetic": True, "num_steps": 150, "seed": 1, "graph": None}
    return Trainer(forecaster, data, training, out_dir=out_dir, seed=seed, progress=False, data_source=source)


class _WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any code a file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": "stfast", "version": 2, "payload": _WritesMarker(marker)}, path)
    return path


def version_1_checkpoint(trainer: Trainer, path: Path) -> Path:
    """What stfast wrote before format version 2: the generator states as pickled Python objects."""
    trainer.save_last()
    checkpoint = torch.load(trainer.out_dir / "last.pt", weights_only=True)
    checkpoint["version"] = 1
    checkpoint["rng"] = {**checkpoint["rng"], "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(checkpoint, path)
    return path


# ---------------------------------------------------------------- item 1: no code runs from a checkpoint

def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match=r"safe loader .* refuses .*--trust-checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_refuses_a_crafted_last_pt_and_runs_nothing(data, tmp_path):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    crafted_checkpoint(run / "last.pt", marker)
    with pytest.raises(ValueError, match="safe loader"):
        make_trainer(data, run).resume()
    assert not marker.exists()


def test_eval_refuses_a_crafted_checkpoint_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "stfast", "eval", "--checkpoint", str(path), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "--trust-checkpoint" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_checkpoints_load_with_weights_only_and_restore_every_generator(data, tmp_path):
    trainer = make_trainer(data, tmp_path)
    trainer.save_last()
    trainer.save_best()
    for name in ("last.pt", "best.pt"):
        assert torch.load(tmp_path / name, weights_only=True)["version"] == ckpt.CHECKPOINT_VERSION
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=trainer.shuffle_generator))
    for _ in range(3):  # move every generator on
        random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=trainer.shuffle_generator)
    assert trainer.resume()
    got = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=trainer.shuffle_generator))
    assert got == expected


def test_version_1_checkpoints_load_only_when_trusted(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run")
    old = version_1_checkpoint(trainer, tmp_path / "v1.pt")
    with pytest.raises(ValueError, match="format version 1 .*--trust-checkpoint"):
        load_checkpoint(old)
    expected = (random.random(), np.random.rand())
    loaded = load_checkpoint(old, allow_unsafe=True)
    os.replace(old, trainer.out_dir / "last.pt")
    with pytest.raises(ValueError, match="safe loader"):
        trainer.resume()
    assert trainer.resume(allow_unsafe=True)
    assert (random.random(), np.random.rand()) == expected
    assert isinstance(loaded["rng"]["python"]["state"], torch.Tensor)


# ---------------------------------------------------------------- item 6: one run per folder

def _hold_lock_in_child(folder: Path) -> subprocess.Popen:
    code = ("import sys; from stfast.training.checkpoint import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_on_a_busy_folder_is_refused_with_the_holders_pid(data, tmp_path):
    child = _hold_lock_in_child(tmp_path)
    try:
        trainer = make_trainer(data, tmp_path)
        for attempt in (lambda: trainer.fit(1), trainer.hold_out_dir, lambda: trainer.write_metrics({})):
            with pytest.raises(ckpt.RunFolderBusyError, match=f"in use by another run \\(pid {child.pid}\\)"):
                attempt()
        assert not (tmp_path / "metrics.json").exists()
    finally:
        child.communicate("")
    assert trainer.write_metrics({"average": {}}) == tmp_path / "metrics.json"  # free once the holder ended


def test_the_lock_nests_within_one_holder_and_refuses_another():
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"stfast-lock-test-{os.getpid()}"
    first, second = ckpt.RunLock(folder), ckpt.RunLock(folder)
    with first:
        with first:
            with pytest.raises(ckpt.RunFolderBusyError, match=f"pid {os.getpid()}"):
                second.acquire()
        assert first.held
        with pytest.raises(ckpt.RunFolderBusyError):
            second.acquire()
    assert not first.held
    with second:
        assert second.held


def test_temporary_files_have_unique_names(data, tmp_path, monkeypatch):
    sources = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (sources.append(Path(src).name), replace(src, dst)))
    trainer = make_trainer(data, tmp_path)
    trainer.write_metrics({"a": 1})
    trainer.write_metrics({"a": 2})
    trainer.save_last()
    trainer.save_last()
    assert len(sources) == 4 and len(set(sources)) == 4, sources
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "last.pt", "metrics.json"]


# ---------------------------------------------------------------- item 9: resume and eval explain mismatches

def test_resume_names_every_setting_that_differs(data, tmp_path):
    make_trainer(data, tmp_path, seed=0, batch_size=32).save_last()
    other = make_trainer(data, tmp_path, seed=1, batch_size=16)
    with pytest.raises(ValueError, match=r"seed=0 \(this run: 1\); batch_size=32 \(this run: 16\)"):
        other.resume()
    other.data_source = {**other.data_source, "seed": 7}
    with pytest.raises(ValueError, match=r"data_source=.*'seed': 1.*\(this run: .*'seed': 7"):
        other.resume()


def test_resume_says_which_keys_a_checkpoint_lacks(data, tmp_path):
    trainer = make_trainer(data, tmp_path)
    trainer.save_last()
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    del checkpoint["optimizer"], checkpoint["rng"]
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"lacks 'optimizer', 'rng', needed to resume training"):
        trainer.resume()


def test_weights_of_another_model_are_refused_with_a_summary(data, tmp_path):
    make_trainer(data, tmp_path).save_last()
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    wider = make_trainer(data, tmp_path / "wider", hidden_dim=6).forecaster.model
    with pytest.raises(ValueError, match=r"weights of another model: \d+ of another shape \(.*: \(.*\) vs the model's"):
        ckpt.load_weights(wider, checkpoint["model"], "last.pt")
    del checkpoint["model"][next(iter(checkpoint["model"]))]
    checkpoint["model"]["extra.weight"] = torch.zeros(1)
    own = make_trainer(data, tmp_path / "own").forecaster.model
    with pytest.raises(ValueError, match=r"1 missing \(.*\); 1 unexpected \(extra.weight\)"):
        ckpt.load_weights(own, checkpoint["model"], "last.pt")


def test_the_cli_stores_data_paths_absolute(tmp_path, monkeypatch):
    from stfast.cli import _data_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "series.npz").write_bytes(b"")
    (tmp_path / "graph.csv").write_text("0,1,1\n")
    args = Namespace(data=Path("series.npz"), synthetic=False, num_steps=None, data_seed=0, graph=Path("graph.csv"))
    source = _data_source(args)
    assert source["path"] == str(tmp_path / "series.npz") and source["graph"] == str(tmp_path / "graph.csv")


def test_eval_of_a_checkpoint_without_weights_says_so(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"format": "stfast", "version": 2, "model_name": "himnet", "dataset": "PEMS08"}, path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "stfast", "eval", "--checkpoint", str(path), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "lacks 'model_args', 'model', 'training', 'backend', needed to evaluate it" in result.stderr
