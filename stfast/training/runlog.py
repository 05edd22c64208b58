"""What a run leaves beside its checkpoints besides weights: per-step and per-epoch CSV logs, TensorBoard
events when ``tensorboard`` is installed, and the resolved run configuration.

- ``steps.csv``: one row per training batch: ``step`` (batches seen, from 1), ``epoch`` (from 1),
  ``loss`` (the batch's training loss), ``lr``, ``horizon`` (the curriculum's, empty without one),
  ``seconds`` (wall time of the step).
- ``epochs.csv``: one row per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``lr``, ``best`` (1 when
  the validation loss improved).
- ``tensorboard/``: the same scalars (``train/loss``, ``train/lr`` per step; ``epoch/train_loss``,
  ``epoch/val_loss`` per epoch) when ``torch.utils.tensorboard`` can be imported; nothing otherwise.
- ``run_config.json``: model name and arguments, training settings after every override, dataset,
  data source, seed, backend, precision: everything needed to run the same thing again.

A resumed run continues the logs: rows past the checkpoint's step or epoch (written after the last
checkpoint, before an interruption) are dropped first, so every step appears once.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

__all__ = ["RunLog", "write_run_config", "STEP_COLUMNS", "EPOCH_COLUMNS"]

STEP_COLUMNS = ("step", "epoch", "loss", "lr", "horizon", "seconds")
EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "best")


class RunLog:
    """Append-only CSV logs in ``out_dir`` (plus TensorBoard when available), resumable at a step."""

    def __init__(self, out_dir, *, resume_step: int = 0, resume_epoch: int = 0, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.steps_file = self.out_dir / "steps.csv"
        self.epochs_file = self.out_dir / "epochs.csv"
        _start(self.steps_file, STEP_COLUMNS, "step", resume_step)
        _start(self.epochs_file, EPOCH_COLUMNS, "epoch", resume_epoch)
        self._steps = open(self.steps_file, "a", newline="")
        self._epochs = open(self.epochs_file, "a", newline="")
        self._writer = _tensorboard_writer(self.out_dir / "tensorboard") if tensorboard else None

    @property
    def tensorboard(self) -> bool:
        return self._writer is not None

    def step(self, step: int, epoch: int, loss: float, lr: float, horizon: int | None, seconds: float) -> None:
        _write_row(self._steps, (step, epoch, _number(loss), _number(lr), "" if horizon is None else horizon,
                                 f"{seconds:.6f}"))
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)

    def epoch(self, epoch: int, train_loss: float, val_loss: float, lr: float, best: bool) -> None:
        _write_row(self._epochs, (epoch, _number(train_loss), _number(val_loss), _number(lr), int(best)))
        if self._writer is not None:
            self._writer.add_scalar("epoch/train_loss", train_loss, epoch)
            self._writer.add_scalar("epoch/val_loss", val_loss, epoch)
            self._writer.flush()

    def close(self) -> None:
        for handle in (self._steps, self._epochs):
            if not handle.closed:
                handle.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_run_config(out_dir, config: dict) -> Path:
    """``run_config.json`` in ``out_dir``, written atomically (values JSON cannot hold become strings)."""
    path = Path(out_dir) / "run_config.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _start(file: Path, columns, key: str, keep_up_to: int) -> None:
    """A header-only file for a new run; for a resumed one, the rows with ``key <= keep_up_to``."""
    kept = []
    if keep_up_to > 0 and file.is_file():
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) == tuple(columns):
                kept = [row for row in reader if _is_int(row.get(key)) and int(row[key]) <= keep_up_to]
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, file)


def _write_row(handle, values) -> None:
    csv.writer(handle).writerow(values)
    handle.flush()  # a crash loses at most the row being written


def _number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(float(value))


def _is_int(text) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is not a dependency; the CSV logs are always written
        return None
    return SummaryWriter(log_dir=str(folder))
