"""HimNet in the zoo: the published configuration, the fused module, and the reference oracle."""

from __future__ import annotations

from .. import configs
from .dataset_configs import PUBLISHED, SHAPE_DEFAULTS, TORCH_MTS_DATASETS, mark
from .spec import ModelSpec

SPEC = ModelSpec("himnet", x_channels=(0, 1, 2), takes_y_cov=True, teacher_forcing=True)
# "reference" is the faithful port; every other name is an op backend for the fused stfast.nn.HimNet.
BACKENDS = ("auto", "reference", "torch", "triton", "cpu", "cuda")
DEFAULT_BACKEND = "auto"


def config(dataset: str) -> dict:
    """XDZhelheim/HimNet ``model/HimNet.yaml`` on its six datasets; elsewhere marked as not published."""
    name = configs.canonical_dataset(dataset)
    if name in TORCH_MTS_DATASETS:
        return mark(configs.himnet_config(name), PUBLISHED, f"XDZhelheim/HimNet model/HimNet.yaml ({name})")
    return mark(configs.himnet_config(name), SHAPE_DEFAULTS,
                f"no published {name} configuration: HimNet.yaml's PEMS07 hyper-parameters with {name}'s shape")


def build(model_args: dict, context=None, backend: str = DEFAULT_BACKEND):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for himnet, got {backend!r}")
    if backend == "reference":
        from ..reference import HimNet
    else:
        from ..nn import HimNet
    return HimNet(**model_args)
