"""Published configurations: the six traffic datasets, LargeST's four, and each model's hyper-parameters.

``load("himnet", "METR-LA")`` returns a fresh dict ``{"model": {...}, "training": {...},
"dataset": DatasetInfo}``. Sources: HimNet (KDD 2024) ``model/HimNet.yaml`` and the data protocol
of its ``lib/data_prepare.py`` / ``scripts/generate_training_data.py`` as summarised in
``shared/specs/himnet.md`` and ``shared/specs/baselines.md`` (sections 1 and 3).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

__all__ = ["DatasetInfo", "DATASETS", "LARGEST_DATASETS", "dataset_info", "canonical_dataset", "load", "himnet_config", "hi_config"]


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about one benchmark dataset.

    ``split`` is (train, val, test) as fractions of the sliding windows (stride 1, ``in_steps``
    inputs then ``out_steps`` targets); train and val are rounded and test takes the rest.
    ``start`` is the timestamp of step 0, from which time of day and day of week are derived when
    a file does not carry them.
    """

    name: str
    num_nodes: int
    num_steps: int
    start: str
    quantity: str  # "speed" or "flow": what channel 0 measures
    split: tuple[float, float, float]
    loss: str  # the published training loss: "masked_mae" or "huber"
    steps_per_day: int = 288

    def num_windows(self, in_steps: int = 12, out_steps: int = 12, num_steps: int | None = None) -> int:
        steps = self.num_steps if num_steps is None else num_steps
        return max(steps - in_steps - out_steps + 1, 0)

    def split_sizes(self, in_steps: int = 12, out_steps: int = 12, num_steps: int | None = None) -> tuple[int, int, int]:
        windows = self.num_windows(in_steps, out_steps, num_steps)
        train = round(windows * self.split[0])
        val = round(windows * self.split[1])
        return train, val, windows - train - val

    def train_batches(self, batch_size: int) -> int:
        """Training batches per epoch of the full dataset (the last one may be partial)."""
        return math.ceil(self.split_sizes()[0] / batch_size)


_SPEED_SPLIT = (0.7, 0.1, 0.2)
_FLOW_SPLIT = (0.6, 0.2, 0.2)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("METR-LA", 207, 34272, "2012-03-01T00:00", "speed", _SPEED_SPLIT, "masked_mae"),
        DatasetInfo("PEMS-BAY", 325, 52116, "2017-01-01T00:00", "speed", _SPEED_SPLIT, "masked_mae"),
        DatasetInfo("PEMS03", 358, 26208, "2018-09-01T00:00", "flow", _FLOW_SPLIT, "huber"),
        DatasetInfo("PEMS04", 307, 16992, "2018-01-01T00:00", "flow", _FLOW_SPLIT, "huber"),
        DatasetInfo("PEMS07", 883, 28224, "2017-05-01T00:00", "flow", _FLOW_SPLIT, "huber"),
        DatasetInfo("PEMS08", 170, 17856, "2016-07-01T00:00", "flow", _FLOW_SPLIT, "huber"),
        # LargeST (Liu et al., NeurIPS 2023 Datasets and Benchmarks; github.com/liuxu77/LargeST): the
        # published protocol uses 2019 only, resampled from 5 to 15 minutes (data/ca/process_ca_his.ipynb),
        # so 365 * 96 = 35,040 steps; 12 in / 12 out, windows split 6:2:2 (data/generate_data_for_training.py);
        # masked MAE for every model (experiments/*/main.py). Node counts: src/utils/dataloader.py.
        *(DatasetInfo(name, nodes, 35040, "2019-01-01T00:00", "flow", _FLOW_SPLIT, "masked_mae", steps_per_day=96)
          for name, nodes in (("SD", 716), ("GBA", 2352), ("GLA", 3834), ("CA", 8600))),
    )
}

LARGEST_DATASETS = ("SD", "GBA", "GLA", "CA")


def _key(name: str) -> str:
    return name.upper().replace("-", "").replace("_", "")


_ALIASES = {_key(name): name for name in DATASETS}


def canonical_dataset(name: str) -> str:
    """``"metr-la"``, ``"METRLA"`` -> ``"METR-LA"``; unknown names raise with the accepted list."""
    if not isinstance(name, str) or _key(name) not in _ALIASES:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)} (case and '-' ignored), got {name!r}")
    return _ALIASES[_key(name)]


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS[canonical_dataset(name)]


# HimNet, model/HimNet.yaml: (hidden, tod dim, dow dim, node dim, st dim, tf_decay, weight decay, milestones)
_HIMNET_TABLE = {
    "METR-LA": (64, 8, 8, 16, 16, 6000, 5e-4, [30, 40]),
    "PEMS-BAY": (64, 8, 8, 16, 16, 6000, 1e-4, [25, 35]),
    "PEMS03": (64, 8, 8, 16, 16, 4000, 3e-4, [30, 50]),
    "PEMS04": (64, 12, 4, 16, 16, 4000, 1e-4, [30, 50]),
    "PEMS07": (64, 8, 8, 16, 16, 6000, 1e-4, [40, 60]),
    "PEMS08": (96, 10, 2, 14, 10, 6000, 0.0, [40, 60, 80]),
    # HimNet publishes nothing for LargeST: these are our choice, its PEMS07 row (the largest graph and a
    # flow dataset), with LargeST's protocol (split, 12/12, masked MAE) from DATASETS.
    **{name: (64, 8, 8, 16, 16, 6000, 1e-4, [40, 60]) for name in LARGEST_DATASETS},
}


def himnet_config(dataset: str) -> dict:
    """HimNet's published configuration on ``dataset`` (``model/HimNet.yaml``)."""
    dataset = canonical_dataset(dataset)
    hidden, tod, dow, node, st, tf_decay, weight_decay, milestones = _HIMNET_TABLE[dataset]
    info = DATASETS[dataset]
    model = dict(
        num_nodes=info.num_nodes, input_dim=3, output_dim=1, out_steps=12, hidden_dim=hidden,
        num_layers=1, cheb_k=2, ycov_dim=2, tod_embedding_dim=tod, dow_embedding_dim=dow,
        node_embedding_dim=node, st_embedding_dim=st, tf_decay_steps=tf_decay, use_teacher_forcing=True,
    )
    training = dict(
        batch_size=16, max_epochs=200, early_stop=20, lr=1e-3, eps=1e-3, weight_decay=weight_decay,
        milestones=list(milestones), lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss,
        in_steps=12, out_steps=12,
    )
    return {"model": model, "training": training}


def hi_config(dataset: str) -> dict:
    """Historical inertia: nothing to train."""
    info = DATASETS[canonical_dataset(dataset)]
    model = dict(num_nodes=info.num_nodes, in_steps=12, out_steps=12)
    training = dict(batch_size=64, max_epochs=0, early_stop=0, lr=0.0, eps=1e-8, weight_decay=0.0,
                    milestones=[], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return {"model": model, "training": training}


def load(model: str, dataset: str) -> dict:
    """The published configuration of ``model`` on ``dataset`` (a fresh, mutable copy).

    Each model's table lives beside its code (``stfast/models/<name>.py``, ``config()``).
    """
    from . import models  # the zoo imports this module, so look it up lazily

    name = canonical_dataset(dataset)
    config = copy.deepcopy(models.model_module(model).config(name))
    config["dataset"] = DATASETS[name]
    return config
