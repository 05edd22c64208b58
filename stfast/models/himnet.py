"""HimNet in the zoo: the published configuration, the fused module, and the reference oracle."""

from __future__ import annotations

from .. import configs
from .spec import ModelSpec

SPEC = ModelSpec("himnet", x_channels=(0, 1, 2), takes_y_cov=True, teacher_forcing=True)
# "reference" is the faithful port; every other name is an op backend for the fused stfast.nn.HimNet.
BACKENDS = ("auto", "reference", "torch", "triton", "cpu", "cuda")
DEFAULT_BACKEND = "auto"


def config(dataset: str) -> dict:
    return configs.himnet_config(dataset)


def build(model_args: dict, context=None, backend: str = DEFAULT_BACKEND):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for himnet, got {backend!r}")
    if backend == "reference":
        from ..reference import HimNet
    else:
        from ..nn import HimNet
    return HimNet(**model_args)
