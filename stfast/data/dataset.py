"""A forecasting dataset: one series plus window indices per split, and `load_dataset`."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stfast.configs import DATASETS, DatasetInfo, canonical_dataset
from stfast.data.batch import Batch, StandardScaler, gather_batch, positive_int
from stfast.data.graph import load_adjacency
from stfast.data.largest import read_largest_layout
from stfast.data.layouts import read_layout
from stfast.data.series import known_dataset, read_npz_arrays, read_series, resolve_data_path
from stfast.data.splits import SPLIT_CONVENTIONS, check_dataset_length, step_segments, step_window_index
from stfast.data.synthetic import synthetic_adjacency, synthetic_series

__all__ = ["ForecastData", "load_dataset", "sliding_window_index", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass
class ForecastData:
    """One (T, N, 3) series [raw value, time of day, day of week] and the windows of each split.

    ``index[split]`` rows are (x_start, x_end = y_start, y_end). Batches are cut from ``series`` on
    demand, so the windows are never stored.
    """

    name: str
    series: np.ndarray
    scaler: StandardScaler
    index: dict[str, np.ndarray]
    adjacency: np.ndarray | None = None
    in_steps: int = 12
    out_steps: int = 12
    steps_per_day: int = 288
    synthetic: bool = False

    @property
    def num_nodes(self) -> int:
        return self.series.shape[1]

    def num_samples(self, split: str) -> int:
        return len(self._rows(split))

    def num_batches(self, split: str, batch_size: int) -> int:
        return math.ceil(self.num_samples(split) / positive_int(batch_size, "batch_size"))

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
        device=None, dtype: torch.dtype = torch.float32, shard: tuple[int, int] = (0, 1),
    ) -> Iterator[Batch]:
        """Batches of ``split`` in index order, or shuffled with ``generator``; the last may be partial.

        ``shard=(i, k)``: only batches number i, i + k, i + 2k, ... (process i of k's share of a sharded
        evaluation; the other batches are not cut from the series).
        """
        rows = self._rows(split)
        batch_size = positive_int(batch_size, "batch_size")
        index, count = check_shard(shard)
        order = torch.randperm(len(rows), generator=generator).numpy() if shuffle else np.arange(len(rows))
        for lo in range(index * batch_size, len(rows), count * batch_size):
            starts = rows[order[lo:lo + batch_size], 0]
            yield gather_batch(self.series, starts, self.scaler, self.in_steps, self.out_steps, device, dtype)

    def _rows(self, split: str) -> np.ndarray:
        if split not in self.index:
            raise ValueError(f"split: expected one of {list(self.index)}, got {split!r}")
        return self.index[split]


def check_shard(shard) -> tuple[int, int]:
    """``shard`` as ``(index, count)`` with ``0 <= index < count``, or a ValueError naming it."""
    valid = (isinstance(shard, tuple) and len(shard) == 2
             and all(isinstance(v, int) and not isinstance(v, bool) for v in shard) and 0 <= shard[0] < shard[1])
    if not valid:
        raise ValueError(f"shard: expected (index, count) with 0 <= index < count, got {shard!r}")
    return shard


def load_dataset(
    dataset: str, path: str | os.PathLike | None = None, *, synthetic: bool = False, num_steps: int | None = None,
    seed: int = 0, graph: str | os.PathLike | None = None, in_steps: int = 12, out_steps: int = 12,
    split: str | None = None, length_check: str = "warn",
) -> ForecastData:
    """Load ``dataset`` from ``path`` (file or directory), or generate it with ``synthetic=True``.

    ``path`` may also be a BasicTS 1.x or 0.x folder or a PyTorch Geometric Temporal folder
    (:mod:`stfast.data.layouts`). With an ``index.npz`` beside ``data.npz`` its splits are used as given
    (and ``dataset`` may then be a custom name); otherwise ``split`` chooses the convention
    (:mod:`stfast.data.splits`): ``"windows"`` (stride-1 windows split by the published fractions; the
    default) or ``"steps"`` (BasicTS's: time steps split first; the default for BasicTS folders, whose
    files fix the pieces). A named dataset whose length differs from the published one warns
    (``length_check="warn"``), raises (``"error"``) or passes (``"ignore"``). ``num_steps`` and ``seed``
    apply to synthetic data only. ``graph`` is read with :func:`load_adjacency` (a PyTorch Geometric
    Temporal folder's ``adj_mat.npy`` is used when it is None); synthetic data comes with the graph it
    was generated on.
    """
    in_steps, out_steps = positive_int(in_steps, "in_steps"), positive_int(out_steps, "out_steps")
    if split is not None and split not in SPLIT_CONVENTIONS:
        raise ValueError(f"split: expected one of {list(SPLIT_CONVENTIONS)} or None, got {split!r}")
    info = known_dataset(dataset)
    layout = None
    if synthetic:
        series, index_file, name = _synthetic_source(dataset, path, num_steps, seed)
        info = known_dataset(name)
    else:
        series, index_file, name, layout = _file_source(dataset, path, num_steps, info)
        if info is not None:
            check_dataset_length(info, series.shape[0], path, length_check)
    index = _split_index(series.shape[0], info, index_file, layout, split, in_steps, out_steps,
                         argument="num_steps" if synthetic else "path")
    scaler = StandardScaler.fit_windows(series[..., 0], index["train"][:, 0], in_steps)
    if graph is None and layout is not None and layout.graph_file is not None:
        graph = layout.graph_file
    adjacency = _load_graph(graph, series.shape[1], name) if graph is not None else None
    if synthetic and adjacency is None:
        adjacency = synthetic_adjacency(name, seed=seed)  # the graph the synthetic series was made on
    steps_per_day = info.steps_per_day if info is not None else 288
    return ForecastData(name, series, scaler, index, adjacency, in_steps, out_steps, steps_per_day, synthetic)


def _load_graph(graph, num_nodes: int, name: str) -> np.ndarray:
    try:
        return load_adjacency(graph, num_nodes)
    except (FileNotFoundError, ValueError) as error:
        detail = str(error).split(": ", 1)[-1]  # drop load_adjacency's own argument name
        raise type(error)(f"graph: {detail} (for {name})") from error


def _synthetic_source(dataset, path, num_steps, seed):
    if path is not None:
        raise ValueError(f"path: expected None with synthetic=True, got {str(path)!r}")
    name = canonical_dataset(dataset)
    return synthetic_series(name, num_steps=num_steps, seed=seed), None, name


def _file_source(dataset, path, num_steps, info: DatasetInfo | None):
    if path is None:
        raise ValueError(f"path: expected a data file or directory for {dataset!r} (or synthetic=True), got None")
    if num_steps is not None:
        raise ValueError(f"num_steps: only used with synthetic=True, got {num_steps!r} with path {str(path)!r}")
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"dataset: expected a dataset name, got {dataset!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"path: no such file or directory: {path}")
    layout = read_largest_layout(Path(path), info) or read_layout(Path(path), info, dataset)
    if layout is not None:
        return layout.series, None, info.name if info else dataset, layout
    file = resolve_data_path(path, info.name if info else None)
    index_file = file.with_name("index.npz") if file.name == "data.npz" else None
    if index_file is not None and not index_file.is_file():
        index_file = None
    if info is None and index_file is None:
        # The split fractions (and usually the calendar) come from the dataset's published protocol.
        raise ValueError(
            f"dataset: expected one of {sorted(DATASETS)} (a custom name needs data.npz and index.npz), "
            f"got {dataset!r} with {file}"
        )
    series = read_series(file, info, dataset)
    return series, index_file, info.name if info else dataset, None


def _split_index(num_steps, info, index_file, layout, split, in_steps, out_steps, *, argument):
    """The windows of each split: from index.npz, from the layout's own pieces, or by ``split``'s convention."""
    if index_file is not None:
        if split is not None:
            raise ValueError(f"split: expected None with {index_file} (it fixes the splits), got {split!r}")
        return _read_index(index_file, num_steps, in_steps, out_steps)
    fixed = layout.step_segments if layout is not None else None
    if split is None:
        split = "steps" if fixed is not None else "windows"
    if split == "windows":
        if info is None:
            raise ValueError("split: 'windows' needs a known dataset's published fractions, got a custom dataset")
        return sliding_window_index(info, num_steps, in_steps, out_steps, argument=argument)
    return step_window_index(fixed or step_segments(num_steps, info.split), in_steps, out_steps, argument=argument)


def sliding_window_index(
    info: DatasetInfo, num_steps: int, in_steps: int = 12, out_steps: int = 12, *, argument: str = "path",
) -> dict[str, np.ndarray]:
    """Stride-1 windows split chronologically by ``info.split_sizes``: rows (i, i + in, i + in + out)."""
    windows = info.num_windows(in_steps, out_steps, num_steps)
    train, val, _ = info.split_sizes(in_steps, out_steps, num_steps)
    if train < 1:
        raise ValueError(
            f"{argument}: expected at least {in_steps + out_steps} time steps (one window of {in_steps} + {out_steps}) "
            f"for {info.name}, got {num_steps}"
        )
    starts = np.arange(windows, dtype=np.int64)
    rows = np.stack([starts, starts + in_steps, starts + in_steps + out_steps], axis=1)
    return dict(train=rows[:train], val=rows[train:train + val], test=rows[train + val:])


def _read_index(file: Path, num_steps: int, in_steps: int, out_steps: int) -> dict[str, np.ndarray]:
    arrays = read_npz_arrays(file)
    missing = [split for split in SPLITS if split not in arrays]
    if missing:
        raise ValueError(f"index: expected keys {list(SPLITS)} in {file}, got {sorted(arrays)}")
    for split in SPLITS:
        _check_index_rows(split, arrays[split], file, num_steps, in_steps, out_steps)
    if len(arrays["train"]) == 0:
        raise ValueError(f"index: expected at least one training window in {file}, got 0")
    return {split: arrays[split].astype(np.int64) for split in SPLITS}


def _check_index_rows(split, rows, file, num_steps, in_steps, out_steps) -> None:
    where = f"index[{split!r}] of {file}"
    if not np.issubdtype(rows.dtype, np.integer) or rows.ndim != 2 or rows.shape[1] != 3:
        raise ValueError(
            f"index: expected integer rows (x_start, x_end, y_end) of shape (num, 3) in {where}"
            f", got {rows.dtype} {rows.shape}"
        )
    if len(rows) == 0:
        return
    rows = rows.astype(np.int64)  # unsigned rows must not wrap around in the differences
    checks = (
        (rows[:, 1] - rows[:, 0] != in_steps, f"x_end - x_start == in_steps = {in_steps}"),
        (rows[:, 2] - rows[:, 1] != out_steps, f"y_end - x_end == out_steps = {out_steps}"),
        ((rows[:, 0] < 0) | (rows[:, 2] > num_steps), f"0 <= x_start and y_end <= {num_steps} (the series length)"),
    )
    for bad, expected in checks:
        if bad.any():
            first = int(np.argmax(bad))
            raise ValueError(f"index: expected {expected} in {where}, got row {first} = {rows[first].tolist()}")
