"""Model zoo with one calling convention: ``Forecaster.forward(batch) -> (B, T_out, N, 1)``.

``create(name, dataset)`` builds a model with its published configuration and wraps it in a
:class:`Forecaster` that feeds it the inputs its :class:`ModelSpec` declares. Predictions are in
scaled units (the trainer inverse-transforms them); teacher-forcing labels are passed scaled.
Each model's module (``stfast/models/<name>.py``) follows the contract in :mod:`.spec`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import torch
from torch import nn

from .spec import BuildContext, ModelSpec

__all__ = ["Forecaster", "ModelSpec", "BuildContext", "available", "backends", "build_context", "create",
           "count_parameters", "model_module"]

# name -> (module under stfast.models, suffix of its SPEC / config / build names)
_MODULES = {
    "himnet": ("himnet", ""),
    "hi": ("hi", ""),
    "stid": ("stid", ""),
    "stgcn": ("stgcn", ""),
    "gwnet": ("gwnet", ""),
    "stnorm": ("stnorm", ""),
    "dcrnn": ("dcrnn", ""),
    "agcrn": ("agcrn", ""),
    "gts": ("gts", ""),
    "megacrn": ("megacrn", ""),
    "stwa": ("stwa", ""),
    "pdformer": ("pdformer", ""),
    "staeformer": ("staeformer", ""),
    "lstm": ("lstm", ""),
    "lstm_largest": ("lstm", "_largest"),  # the LargeST / ST-LoRA LSTM
    "d2stgnn": ("d2stgnn", ""),
}


def available() -> list[str]:
    """Names that :func:`create` accepts."""
    return sorted(_MODULES)


def model_module(name: str) -> SimpleNamespace:
    """Model ``name``'s ``SPEC``, ``config``, ``build`` and ``BACKENDS`` from the module defining it."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _MODULES:
        raise ValueError(f"model: expected one of {available()}, got {name!r}")
    module_name, suffix = _MODULES[key]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return SimpleNamespace(SPEC=getattr(module, "SPEC" + suffix.upper()), config=getattr(module, "config" + suffix),
                           build=getattr(module, "build" + suffix), BACKENDS=getattr(module, "BACKENDS", ("reference",)),
                           DEFAULT_BACKEND=getattr(module, "DEFAULT_BACKEND", "reference"))


def backends(name: str) -> list[str]:
    """Backends :func:`create` accepts for model ``name``."""
    return list(model_module(name).BACKENDS)


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
        self.compiled = None  # see compile(); a plain attribute, so the state dict stays the model's

    def compile(self, *, mode: str | None = None, fullgraph: bool = False, backend="inductor") -> "Forecaster":
        """Run the model through ``torch.compile`` from now on (``mode="reduce-overhead"``: CUDA
        graphs). The fused HimNet's teacher-forcing draws are then made here, outside the graph, and
        applied on the device, so that its training step is one static graph. Returns ``self``."""
        object.__setattr__(self, "compiled", torch.compile(self.model, mode=mode, fullgraph=fullgraph,
                                                           backend=backend))
        return self

    def forward(self, batch, labels: torch.Tensor | None = None, batches_seen: int | None = None):
        args = [_select_channels(batch.x, self.spec.x_channels)]
        if self.spec.takes_y_cov:
            args.append(_select_channels(batch.y_cov, self.spec.y_cov_channels))
        kwargs = {"labels": labels, "batches_seen": batches_seen} if self.spec.teacher_forcing and self.training else {}
        model = self.model if self.compiled is None else self.compiled
        drawer = _teacher_forcing_drawer(self.model)
        if kwargs and self.compiled is not None and drawer is not None:
            kwargs = {"labels": labels, "teacher_forcing": drawer(batches_seen).to(batch.x.device)}
        if self.backend == "reference":
            return model(*args, **kwargs)
        from .. import ops

        with ops.use_backend(self.backend):  # the ops' backward runs on the backend the forward chose
            return model(*args, **kwargs)

    def auxiliary_loss(self):
        """The model's training-only extra loss term for the last forward, or None."""
        extra = getattr(self.model, "auxiliary_loss", None)
        return extra() if callable(extra) else None


def _teacher_forcing_drawer(model: nn.Module):
    """The model's (or an ST-LoRA wrapper's backbone's) ``draw_teacher_forcing``, if it has one."""
    for candidate in (model, getattr(model, "backbone", None)):
        drawer = getattr(candidate, "draw_teacher_forcing", None)
        if callable(drawer):
            return drawer
    return None


def _select_channels(t: torch.Tensor, channels: tuple[int, ...]) -> torch.Tensor:
    if channels == tuple(range(t.shape[-1])):
        return t
    return t[..., list(channels)]


def create(name: str, dataset: str = "METR-LA", *, backend: str | None = None, context: BuildContext | None = None,
           **overrides) -> Forecaster:
    """Build ``name`` with its published configuration on ``dataset``; ``overrides`` replace model args.

    ``backend``: ``"reference"`` for the published implementation; for models built on stfast's ops
    (HimNet) an op backend (``"auto"``, ``"torch"``, ``"triton"``); default: the model's fastest.
    """
    from .. import configs

    module = model_module(name)
    backend = module.DEFAULT_BACKEND if backend is None else backend
    config = configs.load(name, dataset)
    unknown = sorted(set(overrides) - set(config["model"]))
    if unknown:
        raise ValueError(f"overrides: unknown argument(s) {unknown} for {module.SPEC.name}; "
                         f"expected some of {sorted(config['model'])}")
    config["model"].update(overrides)
    model = module.build(config["model"], context or BuildContext(), backend=backend)
    spec = module.SPEC  # a dataset's published inputs may differ (AGCRN takes no time of day on PEMS0x)
    if "x_channels" in config:
        spec = dataclasses.replace(spec, x_channels=tuple(config["x_channels"]))
    return Forecaster(model, spec, config, backend)


def build_context(name: str, dataset: str, *, data=None, graph=None, synthetic_seed: int = 0) -> BuildContext:
    """The graph and training series model ``name`` needs, from ``graph`` (a file), ``data`` (a
    :class:`stfast.data.ForecastData`), or, without data, the synthetic dataset of that shape."""
    from .. import configs
    from ..data import load_adjacency, synthetic_adjacency, synthetic_series

    spec = model_module(name).SPEC
    info = configs.dataset_info(dataset)
    adjacency = load_adjacency(graph, info.num_nodes) if graph is not None else getattr(data, "adjacency", None)
    if spec.needs_graph and adjacency is None:
        if data is not None:
            raise ValueError(f"graph: {spec.name} needs the road graph of {info.name}; pass --graph FILE "
                             "(adj_mx.pkl or a distance .csv), got none")
        adjacency = synthetic_adjacency(info.name, seed=synthetic_seed)
    train_series = None
    if spec.needs_train_series:
        series = data.series if data is not None else synthetic_series(info.name, seed=synthetic_seed)
        train_series = series[: round(len(series) * info.split[0]), :, 0]
    return BuildContext(adjacency=adjacency, train_series=train_series)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
