"""The trainer follows the published recipe, checkpoints atomically and resumes exactly."""

import json

import pytest
import torch

from stfast import models, seed_everything
from stfast.data import load_dataset
import math

from stfast.training import trainer as trainer_module
from stfast.training.step import WarmupCosine, curriculum_horizon, predict, train_step
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
    # no temporary files left; .lock is the run folder's lock file (stfast.training.checkpoint.RunLock)
    # steps.csv, epochs.csv, run_config.json: the run logs (stfast.training.runlog)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "best.pt", "epochs.csv", "last.pt",
                                                          "run_config.json", "steps.csv"]
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


def test_adamw_with_a_warmup_cosine_schedule(data):
    """PDFormer's recipe: AdamW, linear warm-up from warmup_lr_init, then cosine annealing to eta_min."""
    trainer = make_trainer(data, optimizer="adamw", lr_schedule="cosine", lr=1e-2, max_epochs=10, warmup_epochs=2,
                           warmup_lr_init=1e-4, eta_min=1e-3)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # epoch 0: the warm-up's start
    trainer.fit(epochs=4)
    cosine = [1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * e / 10)) for e in (2, 3, 4)]
    assert [h["lr"] for h in trainer.state.history] == pytest.approx([1e-4 + 0.5 * (1e-2 - 1e-4), *cosine])
    assert WarmupCosine(1e-2, 10, 2, 1e-4, 1e-3).rate(10) == pytest.approx(1e-3)


def test_unknown_optimizer_or_schedule_is_refused(data):
    with pytest.raises(ValueError, match="training optimizer: expected one of .*got 'sgd'"):
        make_trainer(data, optimizer="sgd")
    with pytest.raises(ValueError, match="training lr_schedule: expected 'multistep' or 'cosine', got 'step'"):
        make_trainer(data, lr_schedule="step")


def test_curriculum_horizon_grows_by_batches_or_by_epochs():
    by_batches = {"curriculum": "horizon", "curriculum_step_size": 3}
    assert [curriculum_horizon(by_batches, epoch=0, batches_seen=b, out_steps=2) for b in range(8)] == [1, 1, 1, 2, 2,
                                                                                                          2, 2, 2]
    by_epochs = {"curriculum": "horizon", "curriculum_epochs": 6}
    assert [curriculum_horizon(by_epochs, epoch=e, batches_seen=0, out_steps=12) for e in (0, 5, 6, 66, 100)] == [
        1, 1, 2, 12, 12]
    assert curriculum_horizon({}, epoch=3, batches_seen=9, out_steps=12) is None
    with pytest.raises(ValueError, match="needs curriculum_step_size"):
        curriculum_horizon({"curriculum": "horizon"}, epoch=0, batches_seen=0, out_steps=12)


def test_the_trainer_trains_on_the_curriculum_horizon(data, monkeypatch):
    horizons = []

    def recording_step(*args, horizon=None, **kwargs):
        horizons.append(horizon)
        return train_step(*args, horizon=horizon, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", recording_step)
    trainer = make_trainer(data, curriculum="horizon", curriculum_step_size=2)
    trainer.fit(epochs=1)
    assert horizons == [min(1 + b // 2, data.out_steps) for b in range(len(horizons))] and len(horizons) >= 3


def test_a_horizon_limited_step_scores_only_the_first_steps(data):
    trainer = make_trainer(data, lr=0.0)
    batch = next(trainer._batches("train"))
    seed_everything(5)
    loss = train_step(trainer.forecaster, batch, trainer.optimizer, trainer.loss_fn, data.scaler, horizon=2)
    seed_everything(5)  # the same teacher-forcing draws
    with torch.no_grad():
        prediction = predict(trainer.forecaster, batch, data.scaler, batches_seen=0)
    assert loss.item() == pytest.approx(trainer.loss_fn(prediction[:, :2], batch.y[:, :2]).item(), rel=1e-6)


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
