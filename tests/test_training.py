"""The trainer follows the published recipe, checkpoints atomically and resumes exactly."""

import json

import pytest
import torch

from stfast import models, seed_everything
from stfast.data import load_dataset
from stfast.training.trainer import Trainer, load_checkpoint

TINY_HIMNET = dict(hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=2, st_embedding_dim=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("PEMS08", synthetic=True, num_steps=150, seed=1)


def make_trainer(data, out_dir=None, seed=0, **training_overrides):
    seed_everything(seed)
    forecaster = models.create("himnet", "PEMS08", **TINY_HIMNET)
    training = {**forecaster.config["training"], "batch_size": 32, **training_overrides}
    return Trainer(forecaster, data, training, out_dir=out_dir, seed=seed, progress=False)


def test_training_lowers_the_loss_and_writes_checkpoints(data, tmp_path):
    trainer = make_trainer(data, tmp_path, lr=1e-2)
    before = trainer.evaluate_loss("train")
    state = trainer.fit(epochs=2)
    assert state.epoch == 2 and state.batches_seen == 2 * data.num_batches("train", 32)
    assert trainer.evaluate_loss("train") < before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["model_name"] == "himnet" and last["dataset"] == "PEMS08" and last["state"]["epoch"] == 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == state.best_epoch


def test_resume_continues_exactly_where_training_stopped(data, tmp_path):
    straight = make_trainer(data, tmp_path / "straight")
    straight.fit(epochs=2)

    interrupted = make_trainer(data, tmp_path / "resumed")
    interrupted.fit(epochs=1)
    seed_everything(999)  # a new process would start from other random states
    resumed = make_trainer(data, tmp_path / "resumed", seed=0)
    assert resumed.resume() and resumed.state.epoch == 1
    resumed.fit(epochs=2)

    assert resumed.state.history == straight.state.history
    for (name, a), b in zip(straight.forecaster.state_dict().items(), resumed.forecaster.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_a_checkpoint_of_another_model(data, tmp_path):
    make_trainer(data, tmp_path).fit(epochs=1)
    seed_everything(0)
    other = models.create("himnet", "PEMS08", **{**TINY_HIMNET, "hidden_dim": 6})
    trainer = Trainer(other, data, other.config["training"], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="resume: .* was written for model_args="):
        trainer.resume()


def test_early_stopping_after_patience_epochs_without_improvement(data):
    trainer = make_trainer(data, lr=0.0, early_stop=2)  # lr 0: the validation loss never improves
    state = trainer.fit(epochs=10)
    assert state.epoch == 3 and state.best_epoch == 1


def test_learning_rate_follows_the_milestones(data):
    trainer = make_trainer(data, milestones=[1, 2], lr_decay_rate=0.1)
    trainer.fit(epochs=3)
    assert [round(h["lr"], 8) for h in trainer.state.history] == [1e-4, 1e-5, 1e-5]


def test_test_metrics_have_the_published_horizons(data, tmp_path):
    trainer = make_trainer(data, tmp_path)
    results = trainer.evaluate("test")
    assert list(results) == ["horizon_3", "horizon_6", "horizon_12", "average"]
    assert all(set(v) == {"mae", "rmse", "mape"} for v in results.values())
    path = trainer.write_metrics(results)
    assert json.loads(path.read_text()) == results


def test_historical_inertia_needs_no_training_and_forecasts_the_inputs(data):
    forecaster = models.create("hi", "PEMS08")
    trainer = Trainer(forecaster, data, forecaster.config["training"], progress=False)
    assert trainer.fit().epoch == 0
    batch = next(data.batches("test", 4))
    starts = data.index["test"][:4, 0]
    observed = torch.stack([torch.from_numpy(data.series[s : s + 12, :, :1]) for s in starts])
    forecast = data.scaler.inverse_transform(forecaster(batch))
    torch.testing.assert_close(forecast, observed, rtol=1e-5, atol=1e-3)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint: {corrupt} is not a readable stfast checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ValueError, match="is not an stfast checkpoint"):
        load_checkpoint(foreign)
