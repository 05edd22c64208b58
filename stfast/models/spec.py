"""What every model of the zoo declares, so one adapter can feed all of them.

A zoo model lives in ``stfast/models/<name>.py`` and exports:

- ``SPEC``: a :class:`ModelSpec`;
- ``config(dataset) -> {"model": {...}, "training": {...}, "origin": ..., "source": ...}``: the
  configuration on any dataset of ``stfast.configs.DATASETS`` (model keyword arguments incl.
  ``num_nodes``; training keys as in ``stfast.configs``): the published one where there is one, else
  the model's reference hyper-parameters with the dataset's shape, ``origin`` saying which (see
  :mod:`.dataset_configs`); an optional ``"x_channels"`` replaces ``SPEC.x_channels`` where a
  dataset's published inputs differ;
- ``build(model_args, context) -> nn.Module``: ``context`` is a :class:`BuildContext` (graph and
  training series for the models that need them; a model that needs one raises a clear error
  naming it when it is missing).

The module's ``forward`` takes ``x (B, T_in, N, len(x_channels))`` (channels picked from
``[value, time of day, day of week]`` in ``x_channels`` order), then ``y_cov (B, T_out, N, 2)`` when
``takes_y_cov``, then ``labels=, batches_seen=`` keywords while training when ``teacher_forcing``,
and returns ``(B, T_out, N, 1)`` in scaled units. A model with a training-only extra loss term
(GTS, MegaCRN) exposes it as ``auxiliary_loss()`` for the last forward; the training step adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    name: str
    x_channels: tuple[int, ...] = (0, 1, 2)  # indices into [value, time of day, day of week]
    takes_y_cov: bool = False  # forward(x, y_cov, ...) with the targets' time features
    y_cov_channels: tuple[int, ...] = (0, 1)  # indices into y_cov's [time of day, day of week]
    teacher_forcing: bool = False  # forward(..., labels=, batches_seen=) while training
    needs_graph: bool = False  # build() needs context.adjacency
    needs_train_series: bool = False  # build() needs context.train_series


@dataclass
class BuildContext:
    """Data-dependent inputs of a model's constructor."""

    adjacency: np.ndarray | None = None  # (N, N) road graph
    train_series: np.ndarray | None = None  # (T_train, N) raw channel-0 values of the training split
    extras: dict = field(default_factory=dict)
