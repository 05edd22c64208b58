"""Readers for the folders other libraries write, each turned into one (T, N, 3) float32 series.

Layouts (facts from the public repositories, no code taken from them):

- BasicTS 1.x (``scripts/data_preparation/<DS>/generate_training_data.py``, GestaltCogTeam/BasicTS):
  ``{train,val,test}_data.npy`` (float32, (T_split, N) or (T_split, N, C), consecutive pieces of one
  series), ``{train,val,test}_timestamps.npy`` (float32 (T_split, K), columns named by
  ``meta.json["timestamps_description"]``: "time of day" as a fraction of the day, "day of week" as
  Monday=0 divided by 7) and ``meta.json`` (``num_time_steps``, ``frequency (minutes)``). The split is
  fixed by the files: ``train = int(T * 0.7)``, ``val = int(T * 0.1)`` steps for METR-LA, test the rest.
- BasicTS 0.x (same script, zezhishao/BasicTS up to late 2024): ``data.dat``, a raw float32 memmap of
  ``desc.json["shape"]`` = (T, N, C) whose channels ``desc.json["feature_description"]`` names (value,
  "time of day", "day of week" / 7), split at run time with ``val = int(T * r_val)``,
  ``test = int(T * r_test)`` steps and train the rest (``TimeSeriesForecastingDataset``).
- PyTorch Geometric Temporal ``METR-LA.zip`` / ``PEMS-BAY.zip`` (``METRLADatasetLoader``):
  ``node_values.npy`` (T, N, F), channel 0 the speed, and ``adj_mat.npy`` (N, N), the graph.

A file that is only one split of a BasicTS 1.x folder is refused: read alone it would be a shorter
series re-split by fractions without anyone noticing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stfast.configs import DatasetInfo
from stfast.data.series import _check_array as check_array
from stfast.data.series import _finite_float32 as finite_float32
from stfast.data.series import _read_npy as read_npy
from stfast.data.series import _time_from_stamps as time_from_stamps
from stfast.data.series import time_features

__all__ = ["LayoutData", "read_layout", "detect_layout", "LAYOUTS"]

LAYOUTS = ("basicts", "basicts-0.x", "pgt")
_BASICTS_SPLITS = ("train", "val", "test")
_BASICTS_SPLIT_FILES = {f"{split}_{kind}.npy" for split in _BASICTS_SPLITS for kind in ("data", "timestamps")}
_TIME_OF_DAY, _DAY_OF_WEEK = "time of day", "day of week"
_GRID_TOLERANCE = 1e-3  # stored float32 fractions sit within ~1e-5 of their slot; anything farther is not a grid


@dataclass(frozen=True)
class LayoutData:
    """What a layout reader found: the series, the split its files fix (time steps), and its graph file."""

    layout: str
    series: np.ndarray
    step_segments: tuple[int, int, int] | None = None
    graph_file: Path | None = None


def detect_layout(path: Path) -> str | None:
    """The layout of ``path`` (a folder or one of its files), or None for stfast's own formats."""
    folder = path if path.is_dir() else path.parent
    name = None if path.is_dir() else path.name
    if name in _BASICTS_SPLIT_FILES:
        return "basicts"
    if (path.is_dir() and (folder / "train_data.npy").is_file()) or name == "meta.json":
        return "basicts"
    if (path.is_dir() and (folder / "data.dat").is_file()) or name in ("data.dat", "desc.json"):
        return "basicts-0.x"
    if (path.is_dir() and (folder / "node_values.npy").is_file()) or name == "node_values.npy":
        return "pgt"
    return None


def read_layout(path: Path, info: DatasetInfo | None, name: str) -> LayoutData | None:
    """Read ``path`` when it is one of the layouts above (None otherwise); ``info`` checks the node count."""
    layout = detect_layout(path)
    if layout is None:
        return None
    if layout == "basicts" and path.is_file() and path.name in _BASICTS_SPLIT_FILES:
        raise ValueError(
            f"path: {path} is one split of a BasicTS 1.x folder; expected the folder {path.parent} so that "
            f"train, val and test are read together (read alone it would be a partial series)"
        )
    folder = path if path.is_dir() else path.parent
    readers = {"basicts": _read_basicts, "basicts-0.x": _read_basicts_0x, "pgt": _read_pgt}
    return readers[layout](folder, info, name)


# -- BasicTS 1.x ---------------------------------------------------------------------------------------------------

def _read_basicts(folder: Path, info: DatasetInfo | None, name: str) -> LayoutData:
    meta = _read_json(folder / "meta.json")
    steps_per_day = _steps_per_day(meta, folder / "meta.json", info)
    pieces, stamps = [], []
    for split in _BASICTS_SPLITS:
        data_file = _required(folder / f"{split}_data.npy", "the BasicTS 1.x split files")
        pieces.append(check_array(read_npy(data_file), data_file, info))
        stamps_file = _required(folder / f"{split}_timestamps.npy", "the BasicTS 1.x split files")
        stamps.append((read_npy(stamps_file), stamps_file))
    _same_trailing_shape(pieces, folder)
    value = np.concatenate([p if p.ndim == 2 else p[..., 0] for p in pieces])
    _check_declared_length(meta, "num_time_steps", len(value), folder / "meta.json")
    columns = _time_columns(meta.get("timestamps_description"), folder / "meta.json", "timestamps_description")
    tod, dow = [], []
    for (array, file), piece in zip(stamps, pieces):
        if array.ndim != 2 or array.shape[0] != len(piece) or array.shape[1] <= max(columns):
            raise ValueError(
                f"path: expected timestamps of shape ({len(piece)}, >={max(columns) + 1}) in {file}, got {array.shape}"
            )
        tod.append(array[:, columns[0]])
        dow.append(array[:, columns[1]])
    series = _assemble(value, np.concatenate(tod), np.concatenate(dow), steps_per_day, folder)
    segments = tuple(len(p) for p in pieces)
    return LayoutData("basicts", series, segments)  # its adj_mx.pkl is a pickle: read only when passed as graph


# -- BasicTS 0.x ---------------------------------------------------------------------------------------------------

def _read_basicts_0x(folder: Path, info: DatasetInfo | None, name: str) -> LayoutData:
    desc_file = _required(folder / "desc.json", "desc.json beside data.dat")
    desc = _read_json(desc_file)
    shape = desc.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"path: expected 'shape' [T, N, C] of positive integers in {desc_file}, got {shape!r}")
    data_file = _required(folder / "data.dat", "data.dat beside desc.json")
    expected_bytes = math.prod(shape) * 4
    if data_file.stat().st_size != expected_bytes:
        raise ValueError(
            f"path: expected {expected_bytes} bytes (float32 {tuple(shape)} from {desc_file.name}) in {data_file}, "
            f"got {data_file.stat().st_size}"
        )
    array = check_array(np.fromfile(data_file, dtype="<f4").reshape(shape), data_file, info)
    steps_per_day = _steps_per_day(desc, desc_file, info)
    columns = _time_columns(desc.get("feature_description"), desc_file, "feature_description")
    if 0 in columns:
        raise ValueError(f"path: expected the value in channel 0 of {data_file}, {desc_file.name} names it a time feature")
    series = _assemble(array[..., 0], array[:, 0, columns[0]], array[:, 0, columns[1]], steps_per_day, folder)
    ratios = _ratios(desc, desc_file)
    segments = basicts_0x_segments(len(series), ratios)
    return LayoutData("basicts-0.x", series, segments)


def basicts_0x_segments(num_steps: int, ratios) -> tuple[int, int, int]:
    """BasicTS 0.x rounding: val and test are truncated, train takes the rest."""
    val, test = int(num_steps * ratios[1]), int(num_steps * ratios[2])
    return num_steps - val - test, val, test


def _ratios(desc: dict, desc_file: Path) -> tuple[float, float, float]:
    settings = desc.get("regular_settings") or {}
    ratios = settings.get("TRAIN_VAL_TEST_RATIO", settings.get("train_val_test_ratio"))
    valid = (isinstance(ratios, list) and len(ratios) == 3 and all(isinstance(r, (int, float)) for r in ratios)
             and all(0 <= r <= 1 for r in ratios) and abs(sum(ratios) - 1) < 1e-6)
    if not valid:
        raise ValueError(
            f"path: expected regular_settings.TRAIN_VAL_TEST_RATIO as three fractions summing to 1 in {desc_file}"
            f", got {ratios!r}"
        )
    return tuple(float(r) for r in ratios)


# -- PyTorch Geometric Temporal ---------------------------------------------------------------------------------

def _read_pgt(folder: Path, info: DatasetInfo | None, name: str) -> LayoutData:
    file = _required(folder / "node_values.npy", "node_values.npy")
    array = read_npy(file)
    if array.ndim != 3:
        raise ValueError(f"path: expected node values of shape (T, N, F) in {file}, got {array.dtype} {array.shape}")
    array = check_array(array, file, info)
    if info is None:
        raise ValueError(
            f"dataset: expected a known dataset name for {file} (its start time gives time of day and day of week)"
            f", got {name!r}"
        )
    tod, dow = time_features(info.start, array.shape[0], info.steps_per_day)
    series = np.empty(array.shape[:2] + (3,), dtype=np.float32)
    series[..., 0] = finite_float32(array[..., 0], file)
    series[..., 1], series[..., 2] = tod[:, None], dow[:, None]
    return LayoutData("pgt", series, None, _graph_in(folder, "adj_mat.npy"))


# -- shared -----------------------------------------------------------------------------------------------------

def _assemble(value, tod_fraction, dow_fraction, steps_per_day: int, where: Path) -> np.ndarray:
    """(T, N) values plus the stored fractions -> (T, N, 3) with stfast's time channels (dow 0..6)."""
    tod = _time_of_day(np.asarray(tod_fraction, dtype=np.float64), steps_per_day, where)
    dow = _on_grid(np.asarray(dow_fraction, dtype=np.float64) * 7, 7, where, "day of week (stored as Monday=0 over 7)")
    series = np.empty(value.shape + (3,), dtype=np.float32)
    series[..., 0] = finite_float32(value, where)
    series[..., 1], series[..., 2] = tod[:, None], dow.astype(np.float32)[:, None]
    return series


def _time_of_day(fraction: np.ndarray, steps_per_day: int, where: Path) -> np.ndarray:
    slots = _on_grid(fraction * steps_per_day, steps_per_day, where, "time of day (a fraction of the day)")
    seconds = (slots * (86400 // steps_per_day)).astype("timedelta64[s]")
    return time_from_stamps(np.datetime64("1970-01-01T00:00:00") + seconds)[0]  # stfast's own float32 rounding


def _on_grid(scaled: np.ndarray, size: int, where: Path, what: str) -> np.ndarray:
    finite = np.isfinite(scaled)
    slots = np.round(np.where(finite, scaled, -1)).astype(np.int64)
    bad = ~finite | (np.abs(scaled - slots) > _GRID_TOLERANCE) | (slots < 0) | (slots >= size)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"path: expected {what} on a grid of {size} slots in {where}, got {scaled[first] / size!r} at step {first}"
        )
    return slots


def _steps_per_day(meta: dict, file: Path, info: DatasetInfo | None) -> int:
    minutes = meta.get("frequency (minutes)")
    if not isinstance(minutes, (int, float)) or minutes <= 0 or 1440 % minutes:
        raise ValueError(f"path: expected 'frequency (minutes)' dividing a day in {file}, got {minutes!r}")
    steps_per_day = int(1440 // minutes)
    if info is not None and steps_per_day != info.steps_per_day:
        raise ValueError(
            f"path: expected {1440 // info.steps_per_day}-minute steps for {info.name} in {file}, got {minutes}"
        )
    return steps_per_day


def _time_columns(names, file: Path, key: str) -> tuple[int, int]:
    if not isinstance(names, list) or _TIME_OF_DAY not in names or _DAY_OF_WEEK not in names:
        raise ValueError(f"path: expected {key!r} listing {_TIME_OF_DAY!r} and {_DAY_OF_WEEK!r} in {file}, got {names!r}")
    return names.index(_TIME_OF_DAY), names.index(_DAY_OF_WEEK)


def _check_declared_length(meta: dict, key: str, actual: int, file: Path) -> None:
    declared = meta.get(key)
    if declared is not None and declared != actual:
        raise ValueError(f"path: expected {declared} time steps ({key} in {file}) across the split files, got {actual}")


def _same_trailing_shape(pieces, folder: Path) -> None:
    shapes = {p.shape[1:] for p in pieces}
    if len(shapes) != 1:
        raise ValueError(f"path: expected train/val/test data with the same (N, C) in {folder}, got {sorted(shapes)}")


def _read_json(file: Path) -> dict:
    file = _required(file, file.name)
    try:
        content = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"path: cannot read {file} as JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"path: expected a JSON object in {file}, got {type(content).__name__}")
    return content


def _required(file: Path, what: str) -> Path:
    if not file.is_file():
        raise FileNotFoundError(f"path: expected {file.name} ({what}) in {file.parent}, found none")
    return file


def _graph_in(folder: Path, name: str) -> Path | None:
    file = folder / name
    return file if file.is_file() else None
