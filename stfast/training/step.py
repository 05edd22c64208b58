"""One training step, the unit that the trainer runs and the profiler times."""

from __future__ import annotations

import torch


def predict(forecaster, batch, scaler, *, batches_seen=None):
    """Forward in the model's scaled units, returned in the data's units."""
    labels = scaler.transform(batch.y) if forecaster.training and forecaster.spec.teacher_forcing else None
    return scaler.inverse_transform(forecaster(batch, labels=labels, batches_seen=batches_seen))


def train_step(forecaster, batch, optimizer, loss_fn, scaler, *, batches_seen=0, clip_grad=0.0) -> torch.Tensor:
    """Forward, loss on unscaled values (plus the model's auxiliary loss, if any), backward, gradient
    clipping and optimiser step.

    Returns the loss, detached, without synchronising the device.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(predict(forecaster, batch, scaler, batches_seen=batches_seen), batch.y)
    auxiliary = forecaster.auxiliary_loss()
    if auxiliary is not None:
        loss = loss + auxiliary
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(forecaster.parameters(), clip_grad)
    optimizer.step()
    return loss.detach()


def make_optimizer(forecaster, training: dict):
    """Adam and MultiStepLR with the published settings of ``training`` (a config's "training")."""
    optimizer = torch.optim.Adam(forecaster.parameters(), lr=training["lr"], eps=training["eps"],
                                 weight_decay=training["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=training["milestones"],
                                                     gamma=training["lr_decay_rate"])
    return optimizer, scheduler
