"""The published training recipe: the optimiser and learning-rate schedule of the model's config
(Adam + MultiStepLR by default; AdamW and a warm-up cosine schedule where published), the horizon
curriculum where published, gradient clipping, early stopping on validation.

Every epoch writes ``last.pt`` atomically (a temporary file, then a rename) with everything needed to
continue exactly where training stopped: weights, optimiser and scheduler, counters, early-stopping
state and every random generator's state. ``best.pt`` holds the weights with the lowest validation
loss; the final test metrics use them. Checkpoints hold only tensors and plain values and are read
with ``torch.load(weights_only=True)``; one run at a time writes an output folder (both in
:mod:`stfast.training.checkpoint`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import metrics
from .._progress import ProgressBar
from .checkpoint import (CHECKPOINT_VERSION, RunLock, check_keys, load_checkpoint, load_weights, restore_rng_states,
                         rng_states, save_atomic, write_text_atomic)
from .precision import Precision
from .runlog import RunLog, write_run_config
from .step import curriculum_horizon, make_optimizer, predict, train_step

__all__ = ["Trainer", "TrainState", "load_checkpoint", "save_atomic"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    batches_seen: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list = field(default_factory=list)


# What --resume needs besides the metadata (model_name, dataset, model_args) it compares.
_RESUME_KEYS = ("model_name", "dataset", "model_args", "model", "optimizer", "scheduler", "state", "rng")


class Trainer:
    """Train a :class:`stfast.models.Forecaster` on a :class:`stfast.data.ForecastData`.

    ``training`` is a config's "training" dict (``stfast.configs.load(...)["training"]``).
    """

    def __init__(self, forecaster, data, training: dict, *, device="cpu", out_dir=None, seed: int = 0,
                 model_name: str | None = None, data_source: dict | None = None, progress: bool = True,
                 verbose: bool | None = None, stream=None, max_batches: int | None = None, precision: str = "fp32"):
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
        # A shortened run (smoke tests, first tries): at most this many batches per split and epoch.
        self.max_batches = None if max_batches is None else _positive_int(max_batches, "max_batches")
        self.dtype = next(iter(forecaster.parameters()), torch.empty(0)).dtype
        self.precision = Precision(precision, self.device)  # fp32 / tf32 / bf16 / fp16 (precision.py)
        self.grad_scaler = self.precision.grad_scaler()
        self.loss_fn = metrics.get_loss(self.training["loss"])
        self.trainable = any(p.requires_grad for p in forecaster.parameters())
        self.optimizer, self.scheduler = make_optimizer(forecaster, self.training) if self.trainable else (None, None)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.state = TrainState()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._run_lock = RunLock(self.out_dir) if self.out_dir is not None else None
        self._held = False  # hold_out_dir() was called
        self._run_log = None  # steps.csv / epochs.csv / TensorBoard while fit() runs (runlog.py)
        self.step_module = self.forecaster  # what train_step runs: DistributedTrainer puts DDP here

    # -- checkpoints -------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {
            "format": "stfast", "version": CHECKPOINT_VERSION, "model_name": self.model_name,
            "backend": self.forecaster.backend, "dataset": self.data.name,
            "model_args": self.forecaster.config["model"], "training": self.training,
            "scaler": {"mean": float(self.data.scaler.mean), "std": float(self.data.scaler.std)}, "seed": self.seed,
            "data_source": self.data_source, "stlora": self.forecaster.config.get("stlora"),
            "precision": self.precision.name,
        }

    def save_last(self) -> None:
        checkpoint = {
            **self._metadata(), "model": self.forecaster.model.state_dict(), "state": vars(self.state),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_states(self.shuffle_generator),
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
        }
        save_atomic(checkpoint, self.out_dir / "last.pt")

    def save_best(self) -> None:
        checkpoint = {**self._metadata(), "model": self.forecaster.model.state_dict(), "epoch": self.state.epoch,
                      "val_loss": self.state.best_val_loss}
        save_atomic(checkpoint, self.out_dir / "best.pt")

    def resume(self, *, allow_unsafe: bool = False) -> bool:
        """Continue from ``out_dir/last.pt``; returns False when there is none. ``allow_unsafe``: see
        :func:`stfast.training.checkpoint.load_checkpoint` (checkpoints of format version 1)."""
        path = self.out_dir / "last.pt" if self.out_dir is not None else None
        if path is None or not path.is_file():
            return False
        with self._out_dir_lock():
            checkpoint = load_checkpoint(path, allow_unsafe=allow_unsafe)
            check_keys(checkpoint, _RESUME_KEYS, path, "resume training")
            differences = self._differences(checkpoint)
            if differences:
                raise ValueError(f"resume: {path} was written for {'; '.join(differences)}. Resume with the settings "
                                 "of that run, or start a new run in another folder")
            load_weights(self.forecaster.model, checkpoint["model"], path)
            self._restore_training_state(checkpoint, path)
        return True

    def _differences(self, checkpoint: dict) -> list[str]:
        """``"key=<checkpoint's> (this run: <mine>)"`` for every setting that must match to resume."""
        mine = self._metadata()
        pairs = [(key, checkpoint.get(key), mine[key])
                 for key in ("model_name", "dataset", "model_args", "stlora", "seed", "data_source")]
        pairs.append(("batch_size", (checkpoint.get("training") or {}).get("batch_size"), self.training["batch_size"]))
        return [f"{key}={theirs!r} (this run: {ours!r})" for key, theirs, ours in pairs if theirs != ours]

    def _restore_training_state(self, checkpoint: dict, path) -> None:
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if self.grad_scaler is not None and checkpoint.get("grad_scaler") is not None:
                self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
            state = TrainState(**checkpoint["state"])
            restore_rng_states(checkpoint["rng"], self.shuffle_generator)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as error:
            raise ValueError(f"resume: {path}: its optimiser, schedule, counters or generator states do not fit "
                             f"this run ({type(error).__name__}: {error})") from error
        self.state = state

    # -- the output folder -------------------------------------------------------------------
    def _out_dir_lock(self):
        """The run folder's lock for a ``with`` block (re-entrant); a no-op without an output folder."""
        return self._run_lock if self._run_lock is not None else contextlib.nullcontext()

    def hold_out_dir(self) -> None:
        """Lock the output folder until :meth:`close` or the end of the process (the command line does
        this for a whole ``train``); ``fit``, ``resume`` and ``write_metrics`` lock it for themselves."""
        if self._run_lock is not None and not self._held:
            self._run_lock.acquire()
            self._held = True

    def close(self) -> None:
        """Release the output folder taken by :meth:`hold_out_dir`."""
        if self._held:
            self._run_lock.release()
            self._held = False

    # -- loops -------------------------------------------------------------------------------
    def _batches(self, split, shuffle=False, shard=(0, 1)):
        """The batches of ``split`` (``shard``: see :meth:`ForecastData.batches`), the first ``max_batches``
        of the whole pass counted."""
        batches = self.data.batches(split, self.training["batch_size"], shuffle=shuffle,
                                    generator=self.shuffle_generator if shuffle else None,
                                    device=self.device, dtype=self.dtype, shard=shard)
        if self.max_batches is None:
            return batches
        index, count = shard
        return itertools.islice(batches, len(range(index, self.max_batches, count)))

    def _evaluation_batches(self, split):
        """The batches of ``split`` this process evaluates: all of them (a DDP rank takes its share)."""
        return self._batches(split)

    def _sum_over_processes(self, sums: torch.Tensor) -> torch.Tensor:
        """Evaluation sums added up over the processes of the job: this one alone (DDP all-reduces them)."""
        return sums

    def num_batches(self, split: str) -> int:
        """Batches of ``split`` one pass visits (``max_batches`` included)."""
        count = self.data.num_batches(split, self.training["batch_size"])
        return count if self.max_batches is None else min(count, self.max_batches)

    def train_epoch(self) -> float:
        self.forecaster.train()
        total, count = 0.0, 0
        bar = ProgressBar(self.num_batches("train"),
                          f"epoch {self.state.epoch + 1}", stream=self.stream, enabled=self.progress)
        for batch in self._batches("train", shuffle=True):
            started = time.perf_counter()
            horizon = curriculum_horizon(self.training, epoch=self.state.epoch, batches_seen=self.state.batches_seen,
                                         out_steps=self.data.out_steps)
            loss = train_step(self.step_module, batch, self.optimizer, self.loss_fn, self.data.scaler,
                              batches_seen=self.state.batches_seen, clip_grad=self.training["clip_grad"],
                              horizon=horizon, precision=self.precision, grad_scaler=self.grad_scaler)
            self.state.batches_seen += 1
            total += loss.item() * len(batch)
            count += len(batch)
            if self._run_log is not None:
                self._run_log.step(self.state.batches_seen, self.state.epoch + 1, loss.item(),
                                   self.optimizer.param_groups[0]["lr"], horizon, time.perf_counter() - started)
            bar.update(1, f"loss {total / count:.4f}")
        bar.close(f"loss {total / max(count, 1):.4f}")
        self.scheduler.step()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate_loss(self, split: str) -> float:
        self.forecaster.eval()
        total, count = 0.0, 0
        for batch in self._evaluation_batches(split):
            with self._inference_numerics():
                prediction = predict(self.forecaster, batch, self.data.scaler)
            total += self.loss_fn(prediction, batch.y).item() * len(batch)
            count += len(batch)
        total, count = self._sum_over_processes(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict:
        """Masked MAE / RMSE / MAPE at horizons 3, 6, 12 and on average."""
        self.forecaster.eval()
        accumulator = metrics.MetricAccumulator(out_steps=self.data.out_steps)
        for batch in self._evaluation_batches(split):
            with self._inference_numerics():
                prediction = predict(self.forecaster, batch, self.data.scaler)
            accumulator.update(prediction, batch.y)
        accumulator.sums = self._sum_over_processes(accumulator.sums)
        return accumulator.compute()

    def fit(self, epochs: int | None = None) -> TrainState:
        """Train until ``epochs`` epochs in total are done or early stopping triggers, holding the
        output folder's lock (another run writing there is refused with its pid)."""
        with self._out_dir_lock(), self._run_logs():
            return self._fit(epochs)

    def run_config(self) -> dict:
        """The resolved configuration of this run (``run_config.json``): what to pass to run it again."""
        return {key: value for key, value in self._metadata().items() if key not in ("format", "version")}

    @contextlib.contextmanager
    def _run_logs(self):
        """``run_config.json`` and the step / epoch logs in the output folder, continued after a resume."""
        if self.out_dir is None:
            yield
            return
        write_run_config(self.out_dir, self.run_config())
        self._run_log = RunLog(self.out_dir, resume_step=self.state.batches_seen, resume_epoch=self.state.epoch)
        try:
            yield
        finally:
            self._run_log.close()
            self._run_log = None

    def _fit(self, epochs: int | None) -> TrainState:
        epochs = self.training["max_epochs"] if epochs is None else epochs
        patience = self.training["early_stop"]
        if not self.trainable:
            return self.state
        while self.state.epoch < epochs:
            if patience and self.state.epochs_without_improvement >= patience:
                break
            with self.precision.matmul_precision():
                train_loss = self.train_epoch()
            val_loss = self.evaluate_loss("val")
            self.state.epoch += 1
            self._record(train_loss, val_loss)
        return self.state

    @contextlib.contextmanager
    def _inference_numerics(self):
        """Evaluation in the run's precision (its autocast region and matmul precision)."""
        with self.precision.matmul_precision(), self.precision.autocast():
            yield

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
        if self._run_log is not None:
            self._run_log.epoch(self.state.epoch, train_loss, val_loss, self.optimizer.param_groups[0]["lr"], improved)
        if self.out_dir is not None:
            if improved:
                self.save_best()
            self.save_last()

    def load_best(self) -> None:
        """Load the best weights written so far (no-op without an output folder or a best checkpoint)."""
        path = self.out_dir / "best.pt" if self.out_dir is not None else None
        if path is not None and path.is_file():
            checkpoint = load_checkpoint(path)
            check_keys(checkpoint, ("model",), path, "load the best weights")
            load_weights(self.forecaster.model, checkpoint["model"], path)

    def write_metrics(self, results: dict) -> Path | None:
        if self.out_dir is None:
            return None
        path = self.out_dir / "metrics.json"
        with self._out_dir_lock():
            write_text_atomic(json.dumps(results, indent=2) + "\n", path)
        return path
