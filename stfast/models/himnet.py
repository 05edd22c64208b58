"""HimNet in the zoo: the published configuration and the module for a backend."""

from __future__ import annotations

from .. import configs
from .spec import ModelSpec

SPEC = ModelSpec("himnet", x_channels=(0, 1, 2), takes_y_cov=True, teacher_forcing=True)
BACKENDS = ("reference",)


def config(dataset: str) -> dict:
    return configs.himnet_config(dataset)


def build(model_args: dict, context=None, backend: str = "reference"):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for himnet, got {backend!r}")
    from ..reference import HimNet

    return HimNet(**model_args)
