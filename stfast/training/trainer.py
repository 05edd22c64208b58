"""The published training recipe: the optimiser and learning-rate schedule of the model's config
(Adam + MultiStepLR by default; AdamW and a warm-up cosine schedule where published), the horizon
curriculum where published, gradient clipping, early stopping on validation.

Every epoch writes ``last.pt`` atomically (a temporary file, then a rename) with everything needed to
continue exactly where training stopped: weights, optimiser and scheduler, counters, early-stopping
state and every random generator's state. ``best.pt`` holds the weights with the lowest validation
loss; the final test metrics use them.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from .._progress import ProgressBar
from .step import curriculum_horizon, make_optimizer, predict, train_step

__all__ = ["Trainer", "TrainState", "load_checkpoint", "save_atomic"]

CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    batches_seen: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list = field(default_factory=list)


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which one
        raise ValueError(f"checkpoint: {path} is not a readable stfast checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "stfast":
        raise ValueError(f"checkpoint: {path} is not an stfast checkpoint (no 'format': 'stfast' entry)")
    return checkpoint


def _rng_states(shuffle_generator: torch.Generator) -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "shuffle": shuffle_generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict, shuffle_generator: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    shuffle_generator.set_state(states["shuffle"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Trainer:
    """Train a :class:`stfast.models.Forecaster` on a :class:`stfast.data.ForecastData`.

    ``training`` is a config's "training" dict (``stfast.configs.load(...)["training"]``).
    """

    def __init__(self, forecaster, data, training: dict, *, device="cpu", out_dir=None, seed: int = 0,
                 model_name: str | None = None, data_source: dict | None = None, progress: bool = True,
                 verbose: bool | None = None, stream=None):
        self.device = torch.device(device)
        self.forecaster = forecaster.to(self.device)
        self.data = data
        self.training = dict(training)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.model_name = model_name or forecaster.spec.name
        self.data_source = data_source  # how to load the same data again (path or synthetic settings)
        self.progress = progress  # the per-batch progress bar, on stderr
        self.verbose = progress if verbose is None else verbose  # one summary line per epoch, on stdout
        self.stream = stream if stream is not None else sys.stderr
        self.dtype = next(iter(forecaster.parameters()), torch.empty(0)).dtype
        self.loss_fn = metrics.get_loss(self.training["loss"])
        self.trainable = any(p.requires_grad for p in forecaster.parameters())
        self.optimizer, self.scheduler = make_optimizer(forecaster, self.training) if self.trainable else (None, None)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.state = TrainState()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {
            "format": "stfast", "version": CHECKPOINT_VERSION, "model_name": self.model_name,
            "backend": self.forecaster.backend, "dataset": self.data.name,
            "model_args": self.forecaster.config["model"], "training": self.training,
            "scaler": {"mean": self.data.scaler.mean, "std": self.data.scaler.std}, "seed": self.seed,
            "data_source": self.data_source, "stlora": self.forecaster.config.get("stlora"),
        }

    def save_last(self) -> None:
        checkpoint = {
            **self._metadata(), "model": self.forecaster.model.state_dict(), "state": vars(self.state),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": _rng_states(self.shuffle_generator),
        }
        save_atomic(checkpoint, self.out_dir / "last.pt")

    def save_best(self) -> None:
        checkpoint = {**self._metadata(), "model": self.forecaster.model.state_dict(), "epoch": self.state.epoch,
                      "val_loss": self.state.best_val_loss}
        save_atomic(checkpoint, self.out_dir / "best.pt")

    def resume(self) -> bool:
        """Continue from ``out_dir/last.pt``; returns False when there is none."""
        path = self.out_dir / "last.pt" if self.out_dir is not None else None
        if path is None or not path.is_file():
            return False
        checkpoint = load_checkpoint(path)
        mine = self._metadata()
        for key in ("model_name", "dataset", "model_args", "stlora"):
            if checkpoint.get(key) != mine[key]:
                raise ValueError(f"resume: {path} was written for {key}={checkpoint[key]!r}, this run has {mine[key]!r}")
        self.forecaster.model.load_state_dict(checkpoint["model"], strict=True)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state = TrainState(**checkpoint["state"])
        _restore_rng_states(checkpoint["rng"], self.shuffle_generator)
        return True

    # -- loops -------------------------------------------------------------------------------
    def _batches(self, split, shuffle=False):
        return self.data.batches(split, self.training["batch_size"], shuffle=shuffle,
                                 generator=self.shuffle_generator if shuffle else None,
                                 device=self.device, dtype=self.dtype)

    def train_epoch(self) -> float:
        self.forecaster.train()
        total, count = 0.0, 0
        bar = ProgressBar(self.data.num_batches("train", self.training["batch_size"]),
                          f"epoch {self.state.epoch + 1}", stream=self.stream, enabled=self.progress)
        for batch in self._batches("train", shuffle=True):
            horizon = curriculum_horizon(self.training, epoch=self.state.epoch, batches_seen=self.state.batches_seen,
                                         out_steps=self.data.out_steps)
            loss = train_step(self.forecaster, batch, self.optimizer, self.loss_fn, self.data.scaler,
                              batches_seen=self.state.batches_seen, clip_grad=self.training["clip_grad"],
                              horizon=horizon)
            self.state.batches_seen += 1
            total += loss.item() * len(batch)
            count += len(batch)
            bar.update(1, f"loss {total / count:.4f}")
        bar.close(f"loss {total / max(count, 1):.4f}")
        self.scheduler.step()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate_loss(self, split: str) -> float:
        self.forecaster.eval()
        total, count = 0.0, 0
        for batch in self._batches(split):
            total += self.loss_fn(predict(self.forecaster, batch, self.data.scaler), batch.y).item() * len(batch)
            count += len(batch)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict:
        """Masked MAE / RMSE / MAPE at horizons 3, 6, 12 and on average."""
        self.forecaster.eval()
        accumulator = metrics.MetricAccumulator(out_steps=self.data.out_steps)
        for batch in self._batches(split):
            accumulator.update(predict(self.forecaster, batch, self.data.scaler), batch.y)
        return accumulator.compute()

    def fit(self, epochs: int | None = None) -> TrainState:
        """Train until ``epochs`` epochs in total are done or early stopping triggers."""
        epochs = self.training["max_epochs"] if epochs is None else epochs
        patience = self.training["early_stop"]
        if not self.trainable:
            return self.state
        while self.state.epoch < epochs:
            if patience and self.state.epochs_without_improvement >= patience:
                break
            train_loss = self.train_epoch()
            val_loss = self.evaluate_loss("val")
            self.state.epoch += 1
            self._record(train_loss, val_loss)
        return self.state

    def _record(self, train_loss: float, val_loss: float) -> None:
        improved = val_loss < self.state.best_val_loss
        if improved:
            self.state.best_val_loss, self.state.best_epoch = val_loss, self.state.epoch
            self.state.epochs_without_improvement = 0
        else:
            self.state.epochs_without_improvement += 1
        self.state.history.append({"epoch": self.state.epoch, "train_loss": train_loss, "val_loss": val_loss,
                                   "lr": self.optimizer.param_groups[0]["lr"]})
        if self.verbose:
            mark = "  (best)" if improved else ""
            print(f"epoch {self.state.epoch}: train loss {train_loss:.4f}  val loss {val_loss:.4f}{mark}", flush=True)
        if self.out_dir is not None:
            if improved:
                self.save_best()
            self.save_last()

    def load_best(self) -> None:
        """Load the best weights written so far (no-op without an output folder or a best checkpoint)."""
        path = self.out_dir / "best.pt" if self.out_dir is not None else None
        if path is not None and path.is_file():
            self.forecaster.model.load_state_dict(load_checkpoint(path)["model"], strict=True)

    def write_metrics(self, results: dict) -> Path | None:
        if self.out_dir is None:
            return None
        path = self.out_dir / "metrics.json"
        tmp = path.with_name(".metrics.json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
        return path
