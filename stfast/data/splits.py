"""Split conventions and the check of a named dataset's length against the published one.

Two conventions are in use for the same datasets, and they give different test sets:

- ``"windows"`` (DCRNN, HimNet, STAEformer, Torch-MTS; stfast's default for its own formats): all
  stride-1 windows of the whole series are cut first, then split chronologically by fractions of the
  *window* count (train and val rounded, test the rest). Windows near a boundary read steps of the
  next split as inputs.
- ``"steps"`` (BasicTS): the *time steps* are split first (train ``int(T * r_train)``, val
  ``int(T * r_val)``, test the rest, as BasicTS 1.x writes its files), then windows are cut inside each
  piece, so no window crosses a boundary and each split has ``in_steps + out_steps - 1`` fewer windows.
  A BasicTS folder fixes its pieces itself (its files, or BasicTS 0.x's rounding for ``data.dat``).
"""

from __future__ import annotations

import warnings

import numpy as np

from stfast.configs import DatasetInfo

__all__ = ["SPLIT_CONVENTIONS", "LENGTH_POLICIES", "DatasetLengthWarning", "step_segments", "step_window_index",
           "check_dataset_length"]

SPLIT_CONVENTIONS = ("windows", "steps")
LENGTH_POLICIES = ("warn", "error", "ignore")


class DatasetLengthWarning(UserWarning):
    """A named dataset's series is not as long as the published one (a prefix, a split file, another version)."""


def step_segments(num_steps: int, fractions) -> tuple[int, int, int]:
    """BasicTS 1.x rounding of a time-step split: train and val truncated, test the rest."""
    train, val = int(num_steps * fractions[0]), int(num_steps * fractions[1])
    return train, val, num_steps - train - val


def step_window_index(segments, in_steps: int, out_steps: int, *, argument: str = "path") -> dict[str, np.ndarray]:
    """Stride-1 windows inside each consecutive piece of ``segments`` (time steps of train, val, test)."""
    index, offset = {}, 0
    for split, length in zip(("train", "val", "test"), segments):
        count = max(length - in_steps - out_steps + 1, 0)
        starts = offset + np.arange(count, dtype=np.int64)
        index[split] = np.stack([starts, starts + in_steps, starts + in_steps + out_steps], axis=1)
        offset += length
    if len(index["train"]) == 0:
        raise ValueError(
            f"{argument}: expected at least {in_steps + out_steps} time steps in the training piece (one window of "
            f"{in_steps} + {out_steps}), got {segments[0]} of {offset}"
        )
    return index


def check_dataset_length(info: DatasetInfo, num_steps: int, where, policy: str) -> None:
    """Warn about (or refuse, or ignore) a series of ``info``'s name that is not its published length."""
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"length_check: expected one of {list(LENGTH_POLICIES)}, got {policy!r}")
    if num_steps == info.num_steps or policy == "ignore":
        return
    message = (
        f"{info.name} has {info.num_steps} time steps in its published version, {where} holds {num_steps}: "
        f"splits, scaler and metrics will not match published results "
        f"(length_check='ignore' to accept a partial series on purpose)"
    )
    if policy == "error":
        raise ValueError(f"path: {message}")
    warnings.warn(message, DatasetLengthWarning, stacklevel=3)
