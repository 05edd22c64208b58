"""Specification of the foreign data layouts (BasicTS 1.x / 0.x, PyTorch Geometric Temporal), the split
conventions ("windows" vs "steps") and the check of a named dataset's length.

The folders are written here the way the other libraries' preparation scripts write them (file names,
dtypes, shapes, time encodings), from the facts listed in ``stfast/data/layouts.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from stfast.configs import dataset_info
from stfast.data import load_dataset, sliding_window_index, time_features
from stfast.data.splits import DatasetLengthWarning, step_segments

PEMS08 = dataset_info("PEMS08")
STEPS = 700  # a partial PEMS08 series: long enough for windows in every piece


def coded_values(num_steps: int, num_nodes: int = PEMS08.num_nodes) -> np.ndarray:
    """value[t, n] = 1000 t + n: every step of every node can be recognised."""
    return (1000.0 * np.arange(num_steps)[:, None] + np.arange(num_nodes)[None, :]).astype(np.float32)


def basicts_stamps(num_steps: int, start: str = PEMS08.start) -> np.ndarray:
    """BasicTS's two timestamp columns: time of day as a fraction of the day, day of week (Monday=0) / 7."""
    stamps = np.datetime64(start, "s") + np.arange(num_steps) * np.timedelta64(300, "s")
    days = stamps.astype("datetime64[D]")
    tod = (stamps - days).astype(np.int64) / 86400.0
    dow = ((days.astype(np.int64) + 3) % 7) / 7.0
    return np.stack([tod, dow], axis=-1)


def write_basicts(folder: Path, values: np.ndarray, ratios=(0.6, 0.2, 0.2)) -> Path:
    """A BasicTS 1.x folder: per-split float32 data and timestamps, split int/int/rest, plus meta.json."""
    folder.mkdir()
    stamps = basicts_stamps(len(values))
    train, val = int(len(values) * ratios[0]), int(len(values) * ratios[1])
    pieces = {"train": slice(0, train), "val": slice(train, train + val), "test": slice(train + val, None)}
    for split, piece in pieces.items():
        np.save(folder / f"{split}_data.npy", values[piece].astype(np.float32))
        np.save(folder / f"{split}_timestamps.npy", stamps[piece].astype(np.float32))
    meta = {"name": "PEMS08", "domain": "traffic flow", "frequency (minutes)": 5, "shape": list(values.shape),
            "timestamps_shape": list(stamps.shape), "timestamps_description": ["time of day", "day of week"],
            "num_time_steps": len(values), "num_vars": values.shape[1], "has_graph": True,
            "regular_settings": {"train_val_test_ratio": list(ratios)}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_basicts_0x(folder: Path, values: np.ndarray, ratios=(0.6, 0.2, 0.2)) -> Path:
    """A BasicTS 0.x folder: one raw float32 memmap [value, tod, dow/7] and desc.json."""
    folder.mkdir()
    stamps = basicts_stamps(len(values))
    data = np.empty(values.shape + (3,), dtype=np.float32)
    data[..., 0] = values
    data[..., 1:] = stamps[:, None, :]
    data.tofile(folder / "data.dat")
    desc = {"name": "PEMS08", "shape": list(data.shape), "num_time_steps": len(values),
            "feature_description": ["traffic flow", "time of day", "day of week"], "frequency (minutes)": 5,
            "regular_settings": {"TRAIN_VAL_TEST_RATIO": list(ratios)}}
    (folder / "desc.json").write_text(json.dumps(desc))
    return folder


def load_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetLengthWarning)
        return load_dataset(*args, **kwargs)


def expected_time_channels(num_steps: int):
    return time_features(PEMS08.start, num_steps, PEMS08.steps_per_day)


def assert_windows_inside_pieces(data, segments):
    edges = np.cumsum((0,) + tuple(segments))
    for split, lo, hi in zip(("train", "val", "test"), edges[:-1], edges[1:]):
        rows = data.index[split]
        assert len(rows) == segments[("train", "val", "test").index(split)] - 23
        assert rows[0, 0] == lo and rows[-1, 2] == hi  # first window at the piece's start, last ends at its end
        np.testing.assert_array_equal(np.diff(rows[:, 0]), 1)


# ----------------------------------------------------------------------------------------------- BasicTS 1.x

def test_basicts_folder_reads_the_three_pieces_as_one_series(tmp_path):
    values = coded_values(STEPS)
    data = load_quietly("PEMS08", write_basicts(tmp_path / "PEMS08", values))
    tod, dow = expected_time_channels(STEPS)
    np.testing.assert_array_equal(data.series[..., 0], values)
    np.testing.assert_array_equal(data.series[:, 0, 1], tod)  # stfast's own float32 time of day, not BasicTS's
    np.testing.assert_array_equal(data.series[:, 0, 2], dow)  # day of week back to 0..6 from dow / 7
    assert data.series[0, 0, 2] == 4  # 2016-07-01 was a Friday


def test_basicts_folder_keeps_basicts_split_by_time_steps(tmp_path):
    data = load_quietly("PEMS08", write_basicts(tmp_path / "PEMS08", coded_values(STEPS)))
    segments = (420, 140, 140)  # int(700 * 0.6), int(700 * 0.2), the rest: the files' lengths
    assert_windows_inside_pieces(data, segments)
    train_inputs = data.series[:420 - 12, :, 0]  # the scaler sees the inputs of the training windows only
    assert data.scaler.mean == pytest.approx(float(train_inputs.mean()), rel=1e-6)


def test_basicts_folder_can_be_split_by_windows_like_himnet(tmp_path):
    values = coded_values(STEPS)
    data = load_quietly("PEMS08", write_basicts(tmp_path / "PEMS08", values), split="windows")
    expected = sliding_window_index(PEMS08, STEPS)
    for split in expected:
        np.testing.assert_array_equal(data.index[split], expected[split])


def test_one_basicts_split_file_alone_is_refused(tmp_path):
    folder = write_basicts(tmp_path / "PEMS08", coded_values(STEPS))
    for name in ("train_data.npy", "test_timestamps.npy"):
        with pytest.raises(ValueError, match="one split of a BasicTS 1.x folder.*partial series"):
            load_dataset("PEMS08", folder / name)


def test_incomplete_or_inconsistent_basicts_folders_are_refused(tmp_path):
    folder = write_basicts(tmp_path / "a", coded_values(STEPS))
    (folder / "val_timestamps.npy").unlink()
    with pytest.raises(FileNotFoundError, match="val_timestamps.npy"):
        load_dataset("PEMS08", folder)

    folder = write_basicts(tmp_path / "b", coded_values(STEPS))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "num_time_steps": STEPS + 5}))
    with pytest.raises(ValueError, match=f"expected {STEPS + 5} time steps .* got {STEPS}"):
        load_dataset("PEMS08", folder)

    folder = write_basicts(tmp_path / "c", coded_values(STEPS))
    np.save(folder / "val_data.npy", coded_values(140, 100))
    with pytest.raises(ValueError, match=r"expected data of shape \(T, 170, C\)"):
        load_dataset("PEMS08", folder)

    folder = write_basicts(tmp_path / "d", coded_values(STEPS))
    (folder / "meta.json").write_text(json.dumps({**meta, "frequency (minutes)": 10}))
    with pytest.raises(ValueError, match="expected 5-minute steps for PEMS08"):
        load_dataset("PEMS08", folder)


def test_basicts_timestamps_off_the_calendar_grid_are_refused(tmp_path):
    folder = write_basicts(tmp_path / "PEMS08", coded_values(STEPS))
    stamps = np.load(folder / "train_timestamps.npy")
    shifted = stamps.copy()
    shifted[5, 0] += 0.4 / 288  # not a 5-minute slot
    np.save(folder / "train_timestamps.npy", shifted)
    with pytest.raises(ValueError, match="time of day .* at step 5"):
        load_dataset("PEMS08", folder)
    unscaled = stamps.copy()
    unscaled[:, 1] *= 7  # day of week stored as 0..6 instead of BasicTS's / 7
    np.save(folder / "train_timestamps.npy", unscaled)
    with pytest.raises(ValueError, match="day of week"):
        load_dataset("PEMS08", folder)


def test_a_custom_basicts_dataset_needs_no_known_name(tmp_path):
    values = coded_values(STEPS, 9)
    data = load_quietly("my-city", write_basicts(tmp_path / "city", values))
    assert data.name == "my-city" and data.num_nodes == 9
    assert_windows_inside_pieces(data, (420, 140, 140))
    with pytest.raises(ValueError, match="split: 'windows' needs a known dataset"):
        load_dataset("my-city", tmp_path / "city", split="windows")


# ----------------------------------------------------------------------------------------------- BasicTS 0.x

def test_basicts_0x_data_dat_reads_with_its_own_rounding(tmp_path):
    values = coded_values(STEPS + 3)
    data = load_quietly("PEMS08", write_basicts_0x(tmp_path / "PEMS08", values))
    tod, dow = expected_time_channels(STEPS + 3)
    np.testing.assert_array_equal(data.series[..., 0], values)
    np.testing.assert_array_equal(data.series[:, 0, 1], tod)
    np.testing.assert_array_equal(data.series[:, 0, 2], dow)
    # 0.x truncates val and test (int(703 * 0.2) = 140 each) and gives train the rest (423)
    assert_windows_inside_pieces(data, (423, 140, 140))
    assert step_segments(STEPS + 3, PEMS08.split) == (421, 140, 142)  # 1.x rounding differs: train truncated


def test_basicts_0x_size_mismatch_and_missing_description_are_refused(tmp_path):
    folder = write_basicts_0x(tmp_path / "PEMS08", coded_values(STEPS))
    with open(folder / "data.dat", "ab") as handle:
        handle.write(b"\0" * 4)
    with pytest.raises(ValueError, match=r"expected \d+ bytes .* got \d+"):
        load_dataset("PEMS08", folder)
    (folder / "desc.json").unlink()
    with pytest.raises(FileNotFoundError, match="desc.json"):
        load_dataset("PEMS08", folder)


# ----------------------------------------------------------------------------------------------- PGT

def test_pgt_folder_reads_node_values_and_its_graph(tmp_path):
    folder = tmp_path / "PEMS08"
    folder.mkdir()
    values = coded_values(STEPS)
    node_values = np.stack([values, np.zeros_like(values)], axis=-1)  # (T, N, F): channel 0 is the value
    np.save(folder / "node_values.npy", node_values)
    adjacency = np.eye(PEMS08.num_nodes, dtype=np.float32) + np.eye(PEMS08.num_nodes, k=1, dtype=np.float32)
    np.save(folder / "adj_mat.npy", adjacency)
    data = load_quietly("PEMS08", folder)
    np.testing.assert_array_equal(data.series[..., 0], values)
    np.testing.assert_array_equal(data.adjacency, adjacency)
    tod, dow = expected_time_channels(STEPS)
    np.testing.assert_array_equal(data.series[:, 0, 1], tod)
    np.testing.assert_array_equal(data.series[:, 0, 2], dow)
    for split, rows in sliding_window_index(PEMS08, STEPS).items():  # stfast's default convention
        np.testing.assert_array_equal(data.index[split], rows)


# ----------------------------------------------------------------------------------------------- split conventions

def test_steps_split_of_a_plain_file_uses_basicts_rounding(tmp_path):
    np.save(tmp_path / "PEMS08.npy", coded_values(STEPS + 3))
    data = load_quietly("PEMS08", tmp_path / "PEMS08.npy", split="steps")
    assert_windows_inside_pieces(data, step_segments(STEPS + 3, PEMS08.split))
    assert step_segments(34272, dataset_info("METR-LA").split) == (23990, 3427, 6855)  # BasicTS 1.x METR-LA files


def test_bad_split_arguments_are_refused(tmp_path):
    np.save(tmp_path / "PEMS08.npy", coded_values(STEPS))
    with pytest.raises(ValueError, match=r"split: expected one of \['windows', 'steps'\] or None, got 'time'"):
        load_dataset("PEMS08", tmp_path / "PEMS08.npy", split="time")
    folder = tmp_path / "himnet"
    folder.mkdir()
    np.savez(folder / "data.npz", data=coded_values(STEPS)[..., None])
    starts = np.arange(10)
    np.savez(folder / "index.npz", **{s: np.stack([starts, starts + 12, starts + 24], 1) for s in ("train", "val", "test")})
    with pytest.raises(ValueError, match="split: expected None with .*index.npz"):
        load_quietly("PEMS08", folder, split="steps")


# ----------------------------------------------------------------------------------------------- length check

def test_a_partial_named_dataset_warns_and_can_be_refused(tmp_path):
    path = tmp_path / "PEMS08.npy"
    np.save(path, coded_values(STEPS))
    with pytest.warns(DatasetLengthWarning, match=f"PEMS08 has 17856 time steps .* holds {STEPS}"):
        load_dataset("PEMS08", path)
    with pytest.raises(ValueError, match=f"path: PEMS08 has 17856 time steps .* holds {STEPS}"):
        load_dataset("PEMS08", path, length_check="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("PEMS08", path, length_check="ignore")
    with pytest.raises(ValueError, match="length_check: expected one of"):
        load_dataset("PEMS08", path, length_check="strict")


def test_the_published_length_passes_silently(tmp_path):
    folder = write_basicts(tmp_path / "PEMS08", coded_values(PEMS08.num_steps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_dataset("PEMS08", folder, length_check="error")
    assert data.series.shape == (17856, 170, 3)
    # BasicTS 1.x files of the full series: 10713 / 3571 / 3572 steps, each split 23 windows short
    assert [data.num_samples(s) for s in ("train", "val", "test")] == [10713 - 23, 3571 - 23, 3572 - 23]


def test_synthetic_data_is_not_length_checked():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("PEMS08", synthetic=True, num_steps=300)
