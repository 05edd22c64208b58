"""LargeST (Liu et al., NeurIPS 2023 Datasets and Benchmarks): its released files as one (T, N, 3) series.

File layout, from the public repository liuxu77/LargeST (README section 1, ``data/ca/process_ca_his.ipynb``,
``data/{sd,gba,gla}/generate_*_dataset.ipynb``, ``src/utils/dataloader.py``); no code taken from it:

- ``ca/ca_his_raw_<year>.h5`` (the Kaggle release, 2017-2021): a pandas DataFrame of traffic flow indexed
  by 5-minute timestamps, one column per sensor (all 8,600), NaN where a reading is missing. The
  benchmark resamples it to 15 minutes (mean of the three readings, rounded), fills NaN with 0 and
  saves ``ca/ca_his_<year>.h5`` (key ``"t"``).
- ``ca/ca_meta.csv``: one row per sensor with ``ID`` (the column name in the ``.h5`` files), ``District``
  and ``ID2`` (its row in ``ca_rn_adj.npy``), among others. SD is district 11, GBA district 4, GLA
  districts 7, 8 and 12; CA is every sensor.
- ``<sub>/<sub>_his_<year>.h5`` (key ``"t"``): the 15-minute frame restricted to the subset's columns, in
  ``<sub>_meta.csv`` order; ``<sub>/<sub>_rn_adj.npy``: ``ca_rn_adj.npy`` restricted to the subset's
  ``ID2`` rows and columns (an (N, N) road-network adjacency).

The protocol (2019, 15 minutes, 12 in / 12 out, windows split 6:2:2) is in :data:`stfast.configs.DATASETS`.
A folder is read as the benchmark reads it: ``<sub>_his_<year>.h5`` if present, else the subset cut from
``ca_his_<year>.h5`` or ``ca_his_raw_<year>.h5`` with ``ca_meta.csv`` (beside it or in ``../ca``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stfast.configs import LARGEST_DATASETS, DatasetInfo, dataset_info
from stfast.data.graph import load_adjacency
from stfast.data.hdf import import_pandas, read_timestamped_frame
from stfast.data.layouts import LayoutData
from stfast.data.series import time_features

__all__ = ["LARGEST_DISTRICTS", "read_largest_layout", "read_largest_series", "load_largest_adjacency",
           "largest_sensor_ids"]

# PeMS districts of each subset (the generate_*_dataset notebooks); CA takes every sensor.
LARGEST_DISTRICTS = {"SD": (11,), "GBA": (4,), "GLA": (7, 8, 12), "CA": None}
PROTOCOL_YEAR = "2019"
_RAW_STEP_SECONDS = 300


def read_largest_layout(path: Path, info: DatasetInfo | None) -> LayoutData | None:
    """The series of a LargeST dataset from its history file or folder (None for any other source), with
    ``<sub>_rn_adj.npy`` of the same folder as its graph when present."""
    if info is None or info.name not in LARGEST_DATASETS or not _holds_history(path):
        return None
    graph = (path if path.is_dir() else path.parent) / f"{info.name.lower()}_rn_adj.npy"
    return LayoutData("largest", read_largest_series(path, info.name), None, graph if graph.is_file() else None)


def _holds_history(path: Path) -> bool:
    if path.is_file():
        return _is_history_file(path)
    return path.is_dir() and any(_is_history_file(p) for p in path.iterdir())


def read_largest_series(
    path: str | os.PathLike, dataset: str, *, year: str = PROTOCOL_YEAR, meta: str | os.PathLike | None = None,
) -> np.ndarray:
    """The (T, N, 3) float32 series [flow, time of day, day of week] of LargeST subset ``dataset``.

    ``path`` is a history ``.h5`` file or a folder holding one for ``year``; ``meta`` is ``ca_meta.csv``,
    needed only to cut a subset out of a CA-wide file (found beside it or in ``../ca`` when None).
    """
    info = _largest_info(dataset)
    file = _history_file(Path(path), info, str(year))
    frame = _read_frame(file)
    frame = _to_protocol_interval(frame, file, info)
    frame = _subset_columns(frame, file, info, meta)
    return _series(frame, file, info)


def load_largest_adjacency(
    path: str | os.PathLike, dataset: str, *, meta: str | os.PathLike | None = None,
) -> np.ndarray:
    """The (N, N) float32 road-network adjacency of ``dataset``: ``<sub>_rn_adj.npy``, or ``ca_rn_adj.npy``
    restricted to the subset's ``ID2`` rows and columns of ``ca_meta.csv``. ``path`` is the file or its folder."""
    info = _largest_info(dataset)
    path = Path(path)
    if path.is_dir():
        path = _first_existing([path / f"{info.name.lower()}_rn_adj.npy", path / "ca_rn_adj.npy",
                                path.parent / "ca" / "ca_rn_adj.npy"], f"{info.name.lower()}_rn_adj.npy", path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    matrix = load_adjacency(path)
    if matrix.shape[0] == info.num_nodes:
        return matrix
    if matrix.shape[0] == dataset_info("CA").num_nodes and info.name != "CA":
        rows = _meta_column(_meta_rows(_meta_file(path, meta), info), "ID2", path)
        return matrix[np.ix_(rows, rows)]
    raise ValueError(
        f"path: expected an adjacency of shape ({info.num_nodes}, {info.num_nodes}) for {info.name} "
        f"(or CA's 8600 with ca_meta.csv), got {matrix.shape} from {path}"
    )


def largest_sensor_ids(meta: str | os.PathLike, dataset: str) -> list[str]:
    """The sensor IDs of ``dataset`` in ``ca_meta.csv`` row order (the column order of its history files)."""
    info = _largest_info(dataset)
    return [str(i) for i in _meta_column(_meta_rows(Path(meta), info), "ID", Path(meta))]


# -- history files -------------------------------------------------------------------------------------------------

def _is_history_file(path: Path) -> bool:
    stem = path.stem.lower()
    return path.suffix.lower() in (".h5", ".hdf5") and "_his_" in stem


def _history_file(path: Path, info: DatasetInfo, year: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"path: no such file or directory: {path}")
    sub = info.name.lower()
    candidates = [path / f"{sub}_his_{year}.h5", path / f"ca_his_{year}.h5", path / f"ca_his_raw_{year}.h5"]
    if sub != "ca":
        candidates += [path.parent / "ca" / f"ca_his_{year}.h5", path.parent / "ca" / f"ca_his_raw_{year}.h5"]
    return _first_existing(candidates, f"{sub}_his_{year}.h5", path)


def _first_existing(candidates: list[Path], expected: str, folder: Path) -> Path:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"path: expected {expected} (LargeST layout) in {folder}, found none of {names}")


def _read_frame(file: Path):
    frame = read_timestamped_frame(file, "a DataFrame indexed by timestamps (LargeST history)")
    if len(frame) < 2 or frame.shape[1] == 0:
        raise ValueError(f"path: expected at least 2 time steps and 1 sensor in {file}, got shape {frame.shape}")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _to_protocol_interval(frame, file: Path, info: DatasetInfo):
    """5-minute raw readings -> the benchmark's 15-minute means (rounded, NaN as 0); 15-minute frames as they are."""
    step = _regular_step_seconds(frame, file)
    protocol = 86400 // info.steps_per_day
    if step == protocol:
        return frame
    if step == _RAW_STEP_SECONDS:
        return frame.resample(f"{protocol}s").mean().round(0).fillna(0.0)
    raise ValueError(
        f"path: expected {protocol // 60}-minute (or raw 5-minute) steps in {file}, got {step / 60:g}-minute steps"
    )


def _regular_step_seconds(frame, file: Path) -> int:
    stamps = frame.index.to_numpy().astype("datetime64[s]").astype(np.int64)
    steps = np.diff(stamps)
    if steps.min() != steps.max() or steps[0] <= 0:
        first = int(np.argmax(steps != steps[0])) if steps.min() != steps.max() else 0
        raise ValueError(
            f"path: expected increasing timestamps at one regular interval in {file}, got a step of "
            f"{int(steps[first])} s after {frame.index[first]} (first step {int(steps[0])} s)"
        )
    return int(steps[0])


def _subset_columns(frame, file: Path, info: DatasetInfo, meta):
    if frame.shape[1] == info.num_nodes:
        return frame
    ca_nodes = dataset_info("CA").num_nodes
    if frame.shape[1] == ca_nodes and info.name != "CA":
        ids = largest_sensor_ids(_meta_file(file, meta), info.name)
        missing = [i for i in ids if i not in frame.columns]
        if missing:
            raise ValueError(f"path: expected the {info.name} sensors of ca_meta.csv as columns of {file}, "
                             f"{len(missing)} are missing (first {missing[:3]})")
        return frame[ids]
    raise ValueError(
        f"path: expected {info.num_nodes} sensor columns for {info.name} (or CA's {ca_nodes} with ca_meta.csv), "
        f"got {frame.shape[1]} in {file}"
    )


def _series(frame, file: Path, info: DatasetInfo) -> np.ndarray:
    value = frame.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(value)
    if bad.any():
        step, node = np.unravel_index(np.argmax(bad), bad.shape)
        raise ValueError(f"path: expected finite flows in {file}, got {int(bad.sum())} NaN/inf, first at "
                         f"(step, sensor) ({int(step)}, {frame.columns[node]!r})")
    tod, dow = time_features(str(frame.index[0].to_datetime64().astype("datetime64[s]")), len(frame),
                             info.steps_per_day)
    series = np.empty(value.shape + (3,), dtype=np.float32)
    series[..., 0] = value
    series[..., 1] = tod[:, None]
    series[..., 2] = dow[:, None]
    return series


# -- metadata ------------------------------------------------------------------------------------------------------

def _meta_file(beside: Path, meta) -> Path:
    if meta is not None:
        meta = Path(meta)
        if not meta.is_file():
            raise FileNotFoundError(f"meta: no such file: {meta}")
        return meta
    folder = beside.parent
    return _first_existing([folder / "ca_meta.csv", folder.parent / "ca" / "ca_meta.csv"], "ca_meta.csv", folder)


def _meta_rows(meta: Path, info: DatasetInfo):
    pandas = import_pandas()
    try:
        table = pandas.read_csv(meta)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"meta: cannot read {meta} as a CSV table ({error})") from error
    needed = {"ID", "District", "ID2"}
    if not needed <= set(table.columns):
        raise ValueError(f"meta: expected columns {sorted(needed)} (ca_meta.csv) in {meta}, got {list(table.columns)}")
    districts = LARGEST_DISTRICTS[info.name]
    rows = table if districts is None else table[table["District"].isin(districts)]
    if len(rows) != info.num_nodes:
        raise ValueError(f"meta: expected {info.num_nodes} sensors of {info.name} (districts {districts}) in {meta}, "
                         f"got {len(rows)}")
    return rows


def _meta_column(rows, column: str, where: Path) -> np.ndarray:
    values = rows[column].to_numpy()
    if column == "ID2" and (not np.issubdtype(values.dtype, np.integer) or values.min() < 0
                            or values.max() >= dataset_info("CA").num_nodes):
        raise ValueError(f"meta: expected ID2 as row indices 0..8599 of ca_rn_adj.npy (for {where}), "
                         f"got {values.dtype} in [{values.min()}, {values.max()}]")
    return values


def _largest_info(dataset: str) -> DatasetInfo:
    info = dataset_info(dataset)
    if info.name not in LARGEST_DATASETS:
        raise ValueError(f"dataset: expected one of {list(LARGEST_DATASETS)} (LargeST), got {dataset!r}")
    return info
