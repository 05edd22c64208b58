"""Mini-batches, the z-score scaler, and the window gather shared by real and synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "StandardScaler", "gather_batch", "positive_int"]


@dataclass
class Batch:
    """One mini-batch; all tensors share one device and one floating dtype.

    ``x`` (B, T_in, N, 3): z-scored value, time of day in [0, 1), day of week 0..6 (as float).
    ``y`` (B, T_out, N, 1): the raw, unscaled target value.
    ``y_cov`` (B, T_out, N, 2): time of day and day of week of the target steps.
    """

    x: torch.Tensor
    y: torch.Tensor
    y_cov: torch.Tensor

    def __post_init__(self) -> None:
        for field, tensor, channels in (("x", self.x, 3), ("y", self.y, 1), ("y_cov", self.y_cov, 2)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[-1] != channels:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{field}: expected a 4-d tensor (B, T, N, {channels}), got {shape}")
        if self.y.shape[:3] != self.y_cov.shape[:3] or (self.x.shape[0], self.x.shape[2]) != (
            self.y.shape[0], self.y.shape[2]
        ):
            raise ValueError(
                f"Batch: x {tuple(self.x.shape)}, y {tuple(self.y.shape)} and y_cov {tuple(self.y_cov.shape)} "
                "must agree on batch size and number of nodes (and y/y_cov on steps)"
            )

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Batch":
        return Batch(*(t.to(device=device, dtype=dtype) for t in (self.x, self.y, self.y_cov)))

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.x.shape[2]


@dataclass(frozen=True)
class StandardScaler:
    """One scalar mean and standard deviation; works on numpy arrays and torch tensors alike."""

    mean: float
    std: float

    def transform(self, value):
        return (value - self.mean) / self.std

    def inverse_transform(self, value):
        return value * self.std + self.mean

    @classmethod
    def fit_windows(cls, series_value: np.ndarray, starts: np.ndarray, length: int) -> "StandardScaler":
        """Mean and population std of ``series_value[s:s+length]`` stacked over every ``s`` in ``starts``.

        Equal to stacking the windows and calling ``.mean()`` / ``.std()``, without building them:
        each time step is weighted by the number of windows that cover it.
        """
        series_value = np.asarray(series_value)
        if series_value.ndim != 2:
            raise ValueError(f"series_value: expected shape (T, N), got {series_value.shape}")
        coverage = window_coverage(series_value.shape[0], starts, length)
        count = float(coverage.sum()) * series_value.shape[1]
        step_sums = series_value.sum(axis=1, dtype=np.float64)
        mean = float(coverage @ step_sums) / count
        std = float(np.sqrt(float(coverage @ _step_squared_deviations(series_value, mean)) / count))
        if not std > 0:
            raise ValueError(f"series_value: the training windows have standard deviation {std}; cannot scale")
        return cls(mean, std)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def window_coverage(num_steps: int, starts: np.ndarray, length: int) -> np.ndarray:
    """How many of the windows ``[s, s+length)`` contain each step, as float64 of shape (num_steps,)."""
    starts = np.asarray(starts)
    if starts.ndim != 1 or starts.size == 0 or not np.issubdtype(starts.dtype, np.integer):
        raise ValueError(f"starts: expected a non-empty 1-d integer array, got {starts.dtype} {starts.shape}")
    length = positive_int(length, "length")
    if starts.min() < 0 or starts.max() + length > num_steps:
        raise ValueError(
            f"starts: expected windows inside [0, {num_steps}), got starts in "
            f"[{starts.min()}, {starts.max()}] with length {length}"
        )
    edges = np.bincount(starts, minlength=num_steps + 1) - np.bincount(starts + length, minlength=num_steps + 1)
    return np.cumsum(edges[:num_steps]).astype(np.float64)


def _step_squared_deviations(series_value: np.ndarray, mean: float, chunk: int = 4096) -> np.ndarray:
    """sum over nodes of (v - mean)^2 per step, in float64, a block of steps at a time to bound memory."""
    out = np.empty(series_value.shape[0], dtype=np.float64)
    for lo in range(0, series_value.shape[0], chunk):
        block = series_value[lo:lo + chunk].astype(np.float64) - mean
        out[lo:lo + chunk] = np.einsum("tn,tn->t", block, block)
    return out


def gather_batch(
    series: np.ndarray, x_starts: np.ndarray, scaler: StandardScaler, in_steps: int, out_steps: int,
    device=None, dtype: torch.dtype = torch.float32,
) -> Batch:
    """Cut the windows starting at ``x_starts`` out of one (T, N, 3) series: x scaled, y raw."""
    x_steps = x_starts[:, None] + np.arange(in_steps)
    y_steps = x_starts[:, None] + in_steps + np.arange(out_steps)
    x = series[x_steps]  # fancy indexing copies only this batch
    x[..., 0] = scaler.transform(x[..., 0])
    target = series[y_steps]
    tensors = (x, target[..., :1], target[..., 1:])
    return Batch(*(torch.from_numpy(np.ascontiguousarray(t)).to(device=device, dtype=dtype) for t in tensors))
