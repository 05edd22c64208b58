"""Masked forecasting metrics and training losses.

Conventions of the traffic benchmarks (``shared/specs/himnet.md``, "Data conventions"): an entry
whose target equals ``null_value`` (0 for the speed and flow datasets, or NaN) is a missing
reading and is left out of every metric. The masked mean is ``sum(err * mask) / sum(mask)``, which
equals the published ``mask /= mask.mean(); nan -> 0; mean`` form, and is 0 (not NaN) when no
entry is valid. MAPE is a fraction (0.05 means 5%).

One deliberate difference from the published form: a NaN *prediction* at a valid entry propagates
into the result instead of being silently zeroed, so a diverging model is noticed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "masked_mae", "masked_rmse", "masked_mape", "masked_mae_loss", "huber_loss", "get_loss", "LOSSES",
    "MetricAccumulator", "horizon_metrics", "format_metrics_table",
]


def _valid_mask(target: torch.Tensor, null_value: float) -> torch.Tensor:
    if null_value is None or (isinstance(null_value, float) and math.isnan(null_value)):
        return ~torch.isnan(target)
    return target != null_value


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target: expected the same shape, got pred {tuple(pred.shape)} "
                         f"and target {tuple(target.shape)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() rather than a product, so that NaN targets at masked-out entries cannot leak in.
    # The division happens in at least float32: a bf16 count of valid entries would be rounded.
    dtype = torch.promote_types(values.dtype, torch.float32)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dtype=dtype)
    count = mask.sum().to(dtype)
    return (total / count.clamp_min(1)).to(values.dtype)


def _absolute_percentage_error(pred, target, mask):
    # Masked-out entries divide by 1 so that a zero target cannot produce inf * 0 = NaN there.
    safe_target = torch.where(mask, target.abs(), torch.ones_like(target))
    return (pred - target).abs() / safe_target


def masked_mae(pred: torch.Tensor, target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    """Mean absolute error over entries where ``target != null_value``."""
    _check_same_shape(pred, target)
    return _masked_mean((pred - target).abs(), _valid_mask(target, null_value))


def masked_rmse(pred: torch.Tensor, target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    """Root of the masked mean squared error."""
    _check_same_shape(pred, target)
    return _masked_mean((pred - target).square(), _valid_mask(target, null_value)).sqrt()


def masked_mape(pred: torch.Tensor, target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    """Masked mean of ``|pred - target| / |target|``, as a fraction."""
    _check_same_shape(pred, target)
    mask = _valid_mask(target, null_value)
    return _masked_mean(_absolute_percentage_error(pred, target, mask), mask)


def masked_mae_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The METR-LA / PEMS-BAY training loss: masked MAE with null value 0."""
    return masked_mae(pred, target, 0.0)


def huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """The PEMS03/04/07/08 training loss: ``nn.HuberLoss(delta=delta)`` with mean reduction."""
    _check_same_shape(pred, target)
    return F.huber_loss(pred, target, reduction="mean", delta=delta)


def _mae_loss(pred, target):
    _check_same_shape(pred, target)
    return F.l1_loss(pred, target)


def _mse_loss(pred, target):
    _check_same_shape(pred, target)
    return F.mse_loss(pred, target)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "masked_mae": masked_mae_loss, "huber": huber_loss, "mae": _mae_loss, "mse": _mse_loss,
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function called ``name`` (one of :data:`LOSSES`), taking ``(pred, target)``."""
    if not isinstance(name, str) or name.lower() not in LOSSES:
        raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name.lower()]


class MetricAccumulator:
    """Streaming masked MAE / RMSE / MAPE per horizon step, summed in float64.

    ``update(pred, target)`` takes ``(B, T, ...)`` batches (usually ``(B, T, N, C)``) with
    ``T == out_steps``; only four sums per step are kept, so a whole test set never has to be held
    in memory. The sums stay on the device of the first batch (no synchronisation per update).
    """

    def __init__(self, out_steps: int = 12, null_value: float = 0.0):
        if not isinstance(out_steps, int) or out_steps < 1:
            raise ValueError(f"out_steps: expected a positive int, got {out_steps!r}")
        self.out_steps = out_steps
        self.null_value = null_value
        self.reset()

    def reset(self) -> None:
        # Rows: sum |err|, sum err^2, sum |err|/|target|, count of valid entries; one column per step.
        self._sums: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        _check_same_shape(pred, target)
        if pred.dim() < 2 or pred.shape[1] != self.out_steps:
            raise ValueError(f"pred: expected shape (B, T={self.out_steps}, ...), got {tuple(pred.shape)}")
        batch_sums = self._step_sums(pred.detach().double(), target.detach().double())
        if self._sums is None:
            self._sums = batch_sums
        else:
            self._sums += batch_sums.to(self._sums.device)

    @property
    def sums(self) -> torch.Tensor:
        """The float64 ``(4, out_steps)`` sums every metric is computed from (zeros before any update):
        rows sum |err|, sum err^2, sum |err|/|target|, count of valid entries. Sums of disjoint parts of a
        split add up to the sums of the whole (how sharded evaluation combines its processes)."""
        return torch.zeros(4, self.out_steps, dtype=torch.float64) if self._sums is None else self._sums

    @sums.setter
    def sums(self, value: torch.Tensor) -> None:
        expected = (4, self.out_steps)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected or value.dtype != torch.float64:
            got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                   else type(value).__name__)
            raise ValueError(f"sums: expected a float64 tensor of shape {expected}, got {got}")
        self._sums = value.clone()

    def _step_sums(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = _valid_mask(target, self.null_value)
        zeros = torch.zeros_like(pred)
        abs_err = (pred - target).abs()
        per_entry = torch.stack([
            torch.where(mask, abs_err, zeros),
            torch.where(mask, abs_err.square(), zeros),
            torch.where(mask, _absolute_percentage_error(pred, target, mask), zeros),
            mask.to(pred.dtype),
        ])
        step_first = per_entry.transpose(1, 2).reshape(4, self.out_steps, -1)
        return step_first.sum(dim=-1)

    def compute(self, horizons: Sequence[int] = (3, 6, 12)) -> dict[str, dict[str, float]]:
        """``{"horizon_h": {"mae", "rmse", "mape"}, ..., "average": {...}}`` as Python floats.

        Horizon ``h`` is step index ``h - 1``; "average" pools every step (the masked metric of the
        whole concatenated array). Steps without any valid entry report 0.
        """
        _check_horizons(horizons, self.out_steps)
        sums = np.zeros((4, self.out_steps)) if self._sums is None else self._sums.cpu().numpy()
        result = {f"horizon_{h}": _metrics_from_sums(sums[:, h - 1]) for h in horizons}
        result["average"] = _metrics_from_sums(sums.sum(axis=1))
        return result


def _check_horizons(horizons: Sequence[int], out_steps: int) -> None:
    bad = [h for h in horizons if not isinstance(h, (int, np.integer)) or not 1 <= h <= out_steps]
    if bad:
        raise ValueError(f"horizons: expected ints in [1, {out_steps}], got {list(horizons)}")


def _metrics_from_sums(sums: np.ndarray) -> dict[str, float]:
    abs_sum, sq_sum, ape_sum, count = (float(v) for v in sums)
    count = max(count, 1.0)
    return {"mae": abs_sum / count, "rmse": math.sqrt(sq_sum / count), "mape": ape_sum / count}


def horizon_metrics(pred, target, horizons: Sequence[int] = (3, 6, 12),
                    null_value: float = 0.0) -> dict[str, dict[str, float]]:
    """:meth:`MetricAccumulator.compute` of whole ``(S, T, N, C)`` arrays (tensors or NumPy)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.dim() < 2:
        raise ValueError(f"pred: expected shape (S, T, ...), got {tuple(pred.shape)}")
    accumulator = MetricAccumulator(out_steps=pred.shape[1], null_value=null_value)
    accumulator.update(pred, target)
    return accumulator.compute(horizons)


def _row_label(key: str) -> str:
    return key.replace("horizon_", "horizon ") if key.startswith("horizon_") else key


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """An aligned text table: one row per entry of ``metrics``, columns MAE, RMSE, MAPE (in %)."""
    rows = [(_row_label(key), f"{m['mae']:.4f}", f"{m['rmse']:.4f}", f"{100 * m['mape']:.2f}%")
            for key, m in metrics.items()]
    header = ("", "MAE", "RMSE", "MAPE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)
