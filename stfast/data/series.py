"""Readers that turn a traffic file into one (T, N, 3) float32 series: [value, time of day, day of week].

Formats:
- HimNet / STAEformer directory: ``data.npz`` (key ``data``, (T, N, C)); channels 1 and 2 are the time
  of day and day of week when C >= 3, otherwise they are derived. A sibling ``index.npz`` holds the
  splits (read by :func:`stfast.data.load_dataset`).
- PEMS ``PEMSxx.npz`` and raw ``.npy`` / ``.npz`` arrays, (T, N) or (T, N, C): channel 0 is the value,
  the other channels (occupancy, speed in the ASTGCN files) are dropped.
- METR-LA / PEMS-BAY ``.h5``: a pandas DataFrame indexed by timestamps, one column per sensor.

Time features are derived from the dataset's start time (``stfast.configs``) and its step length,
or from the timestamps of an ``.h5`` file. Day of week counts Monday as 0.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from stfast.configs import DATASETS, DatasetInfo, canonical_dataset, dataset_info

__all__ = ["load_series", "time_features", "resolve_data_path", "read_series", "read_npz_arrays"]

_ARRAY_SUFFIXES = (".npz", ".npy", ".h5", ".hdf5")


def _key(name: str) -> str:
    return name.upper().replace("-", "").replace("_", "")


def load_series(path: str | os.PathLike, dataset: str | None = None) -> np.ndarray:
    """Read ``path`` (a file or a directory) as a (T, N, 3) float32 series.

    ``dataset`` (a known name) checks the number of nodes and supplies the start time when the file
    carries no time features; it may be None for ``data.npz`` with C >= 3 and for ``.h5`` files.
    """
    info = dataset_info(dataset) if dataset is not None else None
    return read_series(resolve_data_path(path, info.name if info else None), info)


def resolve_data_path(path: str | os.PathLike, dataset_name: str | None) -> Path:
    """The data file behind ``path``: the file itself, or in a directory ``data.npz`` or ``<DATASET>.npz/.npy/.h5``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no such file or directory: {path}")
    if not path.is_dir():
        return path
    if (path / "data.npz").is_file():
        return path / "data.npz"
    matches = sorted(
        p for p in path.iterdir()
        if dataset_name and p.is_file() and p.suffix.lower() in _ARRAY_SUFFIXES and _key(p.stem) == _key(dataset_name)
    )
    if not matches:
        expected = f"data.npz or {dataset_name}.npz/.npy/.h5 (any case)" if dataset_name else "data.npz"
        raise FileNotFoundError(f"path: expected {expected} in directory {path}, found none")
    return matches[0]


def read_series(file: Path, info: DatasetInfo | None, name: str | None = None) -> np.ndarray:
    """Read one resolved file; ``info`` is the known dataset (None for a custom ``name``)."""
    suffix = file.suffix.lower()
    if suffix == ".npz":
        array = _read_npz(file, prefer_key="data")
        stamps = None
    elif suffix == ".npy":
        array, stamps = _read_npy(file), None
    elif suffix in (".h5", ".hdf5"):
        array, stamps = _read_h5(file)
    else:
        raise ValueError(f"path: expected a .npz, .npy or .h5 file, got {file}")
    array = _check_array(array, file, info)
    value = array if array.ndim == 2 else array[..., 0]
    series = np.empty(value.shape + (3,), dtype=np.float32)
    series[..., 0] = _finite_float32(value, file)
    carries_time = file.name == "data.npz" and array.ndim == 3 and array.shape[2] >= 3
    if carries_time:
        series[..., 1:] = _checked_time_channels(array[..., 1:3], file)
    else:
        tod, dow = _derived_time(value.shape[0], stamps, info, file, name)
        series[..., 1] = tod[:, None]
        series[..., 2] = dow[:, None]
    return series


def read_npz_arrays(file: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz archive; a corrupt or truncated file raises ValueError naming it."""
    try:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:
        raise ValueError(f"path: cannot read {file} as a .npz archive ({error})") from error


def _read_npz(file: Path, prefer_key: str) -> np.ndarray:
    arrays = read_npz_arrays(file)
    if prefer_key in arrays:
        return arrays[prefer_key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(f"path: expected key {prefer_key!r} (or a single array) in {file}, got keys {list(arrays)}")


def _read_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"path: cannot read {file} as a .npy array ({error})") from error


def _read_h5(file: Path) -> tuple[np.ndarray, np.ndarray]:
    from .hdf import read_timestamped_frame

    frame = read_timestamped_frame(file)
    return frame.to_numpy(), frame.index.to_numpy().astype("datetime64[s]")


def _check_array(array: np.ndarray, file: Path, info: DatasetInfo | None) -> np.ndarray:
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not numeric or array.ndim not in (2, 3):
        raise ValueError(
            f"path: expected a real numeric array of shape (T, N) or (T, N, C) in {file}, "
            f"got {array.dtype} {array.shape}"
        )
    if info is not None and array.shape[1] != info.num_nodes:
        raise ValueError(
            f"path: expected data of shape (T, {info.num_nodes}, C) for {info.name}, "
            f"got {array.shape} from {file}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0 or (array.ndim == 3 and array.shape[2] == 0):
        raise ValueError(f"path: expected a non-empty array in {file}, got shape {array.shape}")
    return array


def _finite_float32(values: np.ndarray, file: Path, what: str = "values") -> np.ndarray:
    values = values.astype(np.float32)  # float64 storage is the norm for these files; float32 is the model's
    bad = ~np.isfinite(values)
    if bad.any():
        first = np.unravel_index(np.argmax(bad), bad.shape)
        raise ValueError(
            f"path: expected finite {what}, got {int(bad.sum())} NaN/inf (or beyond float32) in {file}, "
            f"first at (step, node) {tuple(int(i) for i in first[:2])}"
        )
    return values


def _checked_time_channels(channels: np.ndarray, file: Path) -> np.ndarray:
    channels = _finite_float32(channels, file, "time channels")
    tod, dow = channels[..., 0], channels[..., 1]
    if tod.min() < 0 or tod.max() >= 1:
        raise ValueError(f"path: expected time of day (channel 1) in [0, 1) in {file}, got [{tod.min()}, {tod.max()}]")
    if dow.min() < 0 or dow.max() > 6 or not np.array_equal(dow, np.round(dow)):
        raise ValueError(
            f"path: expected day of week (channel 2) as integers 0..6 in {file}"
            f", got [{dow.min()}, {dow.max()}]"
        )
    return channels


def _derived_time(num_steps: int, stamps: np.ndarray | None, info: DatasetInfo | None, file: Path, name):
    if stamps is not None:
        return _time_from_stamps(stamps)
    if info is None:
        raise ValueError(
            f"dataset: expected one of {sorted(DATASETS)} to derive time of day and day of week from its start "
            f"time ({file} carries neither time channels nor timestamps), got {name!r}"
        )
    return time_features(info.start, num_steps, info.steps_per_day)


def time_features(start: str, num_steps: int, steps_per_day: int = 288) -> tuple[np.ndarray, np.ndarray]:
    """Time of day (fraction, float32) and day of week (Monday = 0, float32) of ``num_steps`` regular steps."""
    step_seconds = 86400 // steps_per_day
    stamps = np.datetime64(start, "s") + np.arange(num_steps) * np.timedelta64(step_seconds, "s")
    return _time_from_stamps(stamps)


def _time_from_stamps(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seconds = stamps.astype("datetime64[s]")
    days = seconds.astype("datetime64[D]")
    fraction = (seconds - days).astype(np.int64) / 86400.0
    tod = fraction.astype(np.float32)
    # Round up to the next float32 where rounding went down, so floor(tod * steps_per_day) gives the
    # right slot in float32 and also after a cast to float64.
    tod = np.where(tod < fraction, np.nextafter(tod, np.float32(1)), tod)
    dow = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    return tod, dow.astype(np.float32)


def known_dataset(name: str | None) -> DatasetInfo | None:
    """The DatasetInfo of a known name, None for a custom name (``canonical_dataset`` rejects it)."""
    try:
        return dataset_info(canonical_dataset(name))
    except ValueError:
        return None
