"""One training step, the unit that the trainer runs and the profiler times, and the published
optimisation recipe around it (optimiser, learning-rate schedule, horizon curriculum)."""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["WarmupCosine", "curriculum_horizon", "make_optimizer", "predict", "train_step"]


def predict(forecaster, batch, scaler, *, batches_seen=None):
    """Forward in the model's scaled units, returned in the data's units."""
    labels = scaler.transform(batch.y) if forecaster.training and forecaster.spec.teacher_forcing else None
    prediction = forecaster(batch, labels=labels, batches_seen=batches_seen)
    # Under autocast the model returns bf16 / fp16: unscale in the data's dtype (bf16 has 8
    # significant bits, a step of 2 vehicles at 400).
    return scaler.inverse_transform(prediction.to(batch.y.dtype))


def train_step(forecaster, batch, optimizer, loss_fn, scaler, *, batches_seen=0, clip_grad=0.0,
               horizon=None, precision=None, grad_scaler=None) -> torch.Tensor:
    """Forward, loss on unscaled values (plus the model's auxiliary loss, if any), backward, gradient
    clipping and optimiser step. ``horizon``: the loss covers only the first ``horizon`` output
    steps (curriculum learning); None covers all of them. ``precision``: a
    :class:`stfast.training.precision.Precision` whose autocast region the forward and loss run in
    (None: fp32); ``grad_scaler``: its loss scaler (fp16).

    Returns the loss, detached, without synchronising the device.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        prediction = predict(forecaster, batch, scaler, batches_seen=batches_seen)
        target = batch.y
        if horizon is not None:
            prediction, target = prediction[:, :horizon], target[:, :horizon]
        loss = loss_fn(prediction, target)
        auxiliary = forecaster.auxiliary_loss()
        if auxiliary is not None:
            loss = loss + auxiliary.to(loss.dtype)
    if grad_scaler is None:
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(forecaster.parameters(), clip_grad)
        optimizer.step()
        return loss.detach()
    grad_scaler.scale(loss).backward()
    if clip_grad:
        grad_scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(forecaster.parameters(), clip_grad)
    grad_scaler.step(optimizer)  # skipped when the scaled gradients overflowed
    grad_scaler.update()
    return loss.detach()


class WarmupCosine:
    """Learning-rate factor per epoch for ``LambdaLR``: linear warm-up from ``warmup_lr_init`` to the
    base rate over ``warmup_epochs``, then cosine annealing to ``eta_min`` over ``max_epochs`` counted
    from epoch 0 (PDFormer's schedule: a cosine scheduler with warm-up, no warm-up prefix)."""

    def __init__(self, lr: float, max_epochs: int, warmup_epochs: int = 0, warmup_lr_init: float = 0.0,
                 eta_min: float = 0.0):
        self.lr, self.max_epochs, self.warmup_epochs = lr, max_epochs, warmup_epochs
        self.warmup_lr_init, self.eta_min = warmup_lr_init, eta_min

    def rate(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr_init + epoch * (self.lr - self.warmup_lr_init) / self.warmup_epochs
        progress = min(epoch, self.max_epochs) / max(self.max_epochs, 1)
        return self.eta_min + 0.5 * (self.lr - self.eta_min) * (1 + math.cos(math.pi * progress))

    def __call__(self, epoch: int) -> float:
        return self.rate(epoch) / self.lr


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(forecaster, training: dict):
    """The optimiser and per-epoch scheduler of ``training`` (a config's "training"): ``optimizer``
    "adam" (default) or "adamw"; ``lr_schedule`` "multistep" (default: ``milestones`` x
    ``lr_decay_rate``) or "cosine" (:class:`WarmupCosine` with ``warmup_epochs``,
    ``warmup_lr_init``, ``eta_min``)."""
    name = training.get("optimizer", "adam")
    if name not in _OPTIMIZERS:
        raise ValueError(f"training optimizer: expected one of {sorted(_OPTIMIZERS)}, got {name!r}")
    optimizer = _OPTIMIZERS[name](forecaster.parameters(), lr=training["lr"], eps=training["eps"],
                                  weight_decay=training["weight_decay"])
    schedule = training.get("lr_schedule", "multistep")
    if schedule == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=training["milestones"],
                                                         gamma=training["lr_decay_rate"])
    elif schedule == "cosine":
        factor = WarmupCosine(training["lr"], training["max_epochs"], training.get("warmup_epochs", 0),
                              training.get("warmup_lr_init", 0.0), training.get("eta_min", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        raise ValueError(f"training lr_schedule: expected 'multistep' or 'cosine', got {schedule!r}")
    return optimizer, scheduler


def curriculum_horizon(training: dict, *, epoch: int, batches_seen: int, out_steps: int):
    """How many output steps the training loss covers under the recipe's horizon curriculum, or None
    (all of them, no curriculum). ``curriculum_step_size``: one more step every that many batches
    (PDFormer); ``curriculum_epochs``: one more every that many epochs (D2STGNN, BasicTS)."""
    if training.get("curriculum") is None:
        return None
    if training["curriculum"] != "horizon":
        raise ValueError(f"training curriculum: expected None or 'horizon', got {training['curriculum']!r}")
    if training.get("curriculum_step_size"):
        level = 1 + batches_seen // training["curriculum_step_size"]
    elif training.get("curriculum_epochs"):
        level = 1 + epoch // training["curriculum_epochs"]
    else:
        raise ValueError("training curriculum 'horizon' needs curriculum_step_size (batches) or curriculum_epochs")
    return min(level, out_steps)
