"""Model zoo with one calling convention: ``Forecaster.forward(batch) -> (B, T_out, N, 1)``.

``create(name, dataset)`` builds a model with its published configuration and wraps it in a
:class:`Forecaster` that knows which inputs the model takes. Predictions are in scaled units (the
trainer inverse-transforms them); teacher-forcing labels are passed scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import configs
from .hi import HistoricalInertia

__all__ = ["Forecaster", "ModelSpec", "available", "backends", "create", "count_parameters"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    takes_y_cov: bool = False  # forward(x, y_cov, ...) with the targets' time features
    teacher_forcing: bool = False  # forward(..., labels=, batches_seen=) while training
    needs_graph: bool = False


class Forecaster(nn.Module):
    """Adapter from a :class:`stfast.data.Batch` to a model's own forward signature.

    The wrapped module is registered as ``model`` so the adapter's state dict is the module's
    prefixed with ``model.``; use ``forecaster.model.state_dict()`` for published checkpoints.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, config: dict, backend: str):
        super().__init__()
        self.model = model
        self.spec = spec
        self.config = config
        self.backend = backend

    def forward(self, batch, labels: torch.Tensor | None = None, batches_seen: int | None = None):
        args = [batch.x]
        if self.spec.takes_y_cov:
            args.append(batch.y_cov)
        if self.spec.teacher_forcing and self.training:
            return self.model(*args, labels=labels, batches_seen=batches_seen)
        return self.model(*args)


def _build_himnet(model_args: dict, backend: str) -> nn.Module:
    if backend != "reference":
        raise ValueError(f"backend: expected one of {backends('himnet')} for himnet, got {backend!r}")
    from ..reference import HimNet

    return HimNet(**model_args)


def _build_hi(model_args: dict, backend: str) -> nn.Module:
    if backend != "reference":
        raise ValueError(f"backend: expected one of {backends('hi')} for hi, got {backend!r}")
    return HistoricalInertia(**model_args)


_REGISTRY = {
    "himnet": (ModelSpec("himnet", takes_y_cov=True, teacher_forcing=True), _build_himnet, ("reference",)),
    "hi": (ModelSpec("hi"), _build_hi, ("reference",)),
}


def available() -> list[str]:
    """Names that :func:`create` accepts."""
    return sorted(_REGISTRY)


def backends(name: str) -> list[str]:
    """Backends :func:`create` accepts for model ``name``."""
    return list(_REGISTRY[_check_name(name)][2])


def _check_name(name: str) -> str:
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"model: expected one of {available()}, got {name!r}")
    return key


def create(name: str, dataset: str = "METR-LA", *, backend: str = "reference", **overrides) -> Forecaster:
    """Build ``name`` with its published configuration on ``dataset``; ``overrides`` replace model args."""
    key = _check_name(name)
    spec, build, _ = _REGISTRY[key]
    config = configs.load(key, dataset)
    unknown = sorted(set(overrides) - set(config["model"]))
    if unknown:
        raise ValueError(f"overrides: unknown argument(s) {unknown} for {key}; expected some of {sorted(config['model'])}")
    config["model"].update(overrides)
    return Forecaster(build(config["model"], backend), spec, config, backend)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
