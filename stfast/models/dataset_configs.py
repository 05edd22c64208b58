"""Every zoo model on every dataset of :data:`stfast.configs.DATASETS`.

A model's ``config(dataset)`` builds its reference configuration (the published METR-LA one) for
the dataset's shape (node count, published loss; ``num_nodes`` and ``loss`` come from
:class:`stfast.configs.DatasetInfo`), then :func:`for_dataset` applies the changes its published
per-dataset table gives for that dataset. A dataset without a published table keeps the reference
hyper-parameters and is marked: ``config["origin"]`` is :data:`PUBLISHED` or :data:`SHAPE_DEFAULTS`,
``config["source"]`` says where the numbers come from. ``stfast train`` and ``stfast profile``
print the mark in their header.
"""

from __future__ import annotations

import copy

__all__ = ["PUBLISHED", "SHAPE_DEFAULTS", "TORCH_MTS_DATASETS", "for_dataset", "mark"]

PUBLISHED = "published"
SHAPE_DEFAULTS = "defaults with the dataset's shape"
# The datasets XDZhelheim/Torch-MTS configures every model for (its sections METRLA ... PEMS08).
TORCH_MTS_DATASETS = ("METR-LA", "PEMS-BAY", "PEMS03", "PEMS04", "PEMS07", "PEMS08")


def for_dataset(name: str, reference: dict, published: dict[str, dict], source: str,
                reference_dataset: str = "METR-LA") -> dict:
    """``reference`` (``{"model": ..., "training": ...}``, sized for dataset ``name``) with the changes
    ``published[name]`` gives (``{"model": {...}, "training": {...}, "x_channels": (...)}``), marked
    :data:`PUBLISHED`; without an entry for ``name``, unchanged and marked :data:`SHAPE_DEFAULTS`."""
    config = copy.deepcopy(reference)
    if name not in published:
        return mark(config, SHAPE_DEFAULTS, f"no published {name} configuration in {source}: its {reference_dataset} "
                                            f"hyper-parameters with {name}'s node count, loss and split")
    changes = published[name]
    for part in ("model", "training"):
        unknown = sorted(set(changes.get(part, {})) - set(config[part]))
        if unknown:  # a typo in a table must not add an argument the model silently ignores
            raise KeyError(f"{source} ({name}): unknown {part} key(s) {unknown}")
        config[part].update(copy.deepcopy(changes.get(part, {})))
    if "x_channels" in changes:
        config["x_channels"] = tuple(changes["x_channels"])
    return mark(config, PUBLISHED, f"{source} ({name})")


def mark(config: dict, origin: str, source: str) -> dict:
    if origin not in (PUBLISHED, SHAPE_DEFAULTS):
        raise ValueError(f"origin: expected {PUBLISHED!r} or {SHAPE_DEFAULTS!r}, got {origin!r}")
    config.update(origin=origin, source=source)
    return config
