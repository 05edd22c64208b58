"""Specification of stfast.data: readers, windows, splits, scaling, batching, graphs, synthetic data."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stfast.configs import dataset_info
from stfast.data import (
    Batch, ForecastData, StandardScaler, load_adjacency, load_dataset, load_series, synthetic_batch,
    synthetic_series, time_features,
)

PEMS08_NODES = 170
ALL_DATASETS = ["METR-LA", "PEMS-BAY", "PEMS03", "PEMS04", "PEMS07", "PEMS08"]


# ----------------------------------------------------------------------------------------------- helpers

def coded_values(num_steps: int, num_nodes: int) -> np.ndarray:
    """value[t, n] = 1000 t + n: every window can be recognised from its values."""
    return (1000.0 * np.arange(num_steps)[:, None] + np.arange(num_nodes)[None, :]).astype(np.float64)


def write_npy(tmp_path: Path, array: np.ndarray, name: str = "values.npy") -> Path:
    path = tmp_path / name
    np.save(path, array)
    return path


def write_himnet_dir(tmp_path: Path, data: np.ndarray, index: dict | None) -> Path:
    folder = tmp_path / "himnet"
    folder.mkdir()
    np.savez_compressed(folder / "data.npz", data=data)
    if index is not None:
        np.savez_compressed(folder / "index.npz", **index)
    return folder


def himnet_data(num_steps: int, num_nodes: int) -> np.ndarray:
    """A (T, N, 3) array in the HimNet layout with its own (unusual) calendar: it must be kept as is."""
    steps = np.arange(num_steps)
    data = np.empty((num_steps, num_nodes, 3), dtype=np.float32)
    data[..., 0] = coded_values(num_steps, num_nodes)
    data[..., 1] = ((steps + 100) % 288 / 288.0)[:, None]
    data[..., 2] = ((steps // 288 + 2) % 7)[:, None]
    return data


def rows(starts) -> np.ndarray:
    starts = np.asarray(starts, dtype=np.int64)
    return np.stack([starts, starts + 12, starts + 24], axis=1)


# ----------------------------------------------------------------------------------------------- scaler

def test_fit_windows_equals_statistics_of_the_stacked_windows():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 20.0, size=(60, 5)).astype(np.float32)
    values[rng.random(values.shape) < 0.1] = 0.0
    for starts in (np.arange(0, 37), np.array([3, 3, 10, 40, 17, 0, 48])):
        stacked = values[starts[:, None] + np.arange(12)]
        scaler = StandardScaler.fit_windows(values, starts, 12)
        assert scaler.mean == pytest.approx(stacked.astype(np.float64).mean(), rel=1e-12)
        assert scaler.std == pytest.approx(stacked.astype(np.float64).std(), rel=1e-12)
        assert scaler.mean == pytest.approx(float(stacked.mean()), rel=1e-5)  # the float32 numpy result
        assert scaler.std == pytest.approx(float(stacked.std()), rel=1e-5)
        assert type(scaler.mean) is float and type(scaler.std) is float


def test_scaler_transforms_numpy_and_torch_and_inverts():
    scaler = StandardScaler(mean=50.0, std=10.0)
    array = np.array([40.0, 50.0, 70.0], dtype=np.float32)
    scaled = scaler.transform(array)
    assert isinstance(scaled, np.ndarray) and scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [-1.0, 0.0, 2.0])
    tensor = torch.tensor([40.0, 50.0, 70.0], dtype=torch.float64)
    assert torch.is_tensor(scaler.transform(tensor)) and scaler.transform(tensor).dtype == torch.float64
    torch.testing.assert_close(scaler.inverse_transform(scaler.transform(tensor)), tensor)


def test_fit_windows_rejects_windows_outside_the_series_and_constant_data():
    with pytest.raises(ValueError, match=r"starts: expected windows inside \[0, 20\)"):
        StandardScaler.fit_windows(np.ones((20, 3)), np.array([0, 9]), 12)
    with pytest.raises(ValueError, match="standard deviation 0"):
        StandardScaler.fit_windows(np.ones((20, 3)), np.array([0, 1]), 12)


# ----------------------------------------------------------------------------------------------- batch

def test_batch_to_converts_every_tensor_and_reports_its_size():
    batch = Batch(torch.zeros(4, 12, 7, 3), torch.zeros(4, 12, 7, 1), torch.zeros(4, 12, 7, 2))
    assert len(batch) == 4 and batch.num_nodes == 7
    converted = batch.to(dtype=torch.float64)
    assert {t.dtype for t in (converted.x, converted.y, converted.y_cov)} == {torch.float64}
    with pytest.raises(ValueError, match=r"y_cov: expected a 4-d tensor \(B, T, N, 2\), got \(4, 12, 7, 3\)"):
        Batch(torch.zeros(4, 12, 7, 3), torch.zeros(4, 12, 7, 1), torch.zeros(4, 12, 7, 3))


# ----------------------------------------------------------------------------------------------- calendar

@pytest.mark.parametrize("dataset, weekday", [
    ("METR-LA", 3), ("PEMS-BAY", 6), ("PEMS03", 5), ("PEMS04", 0), ("PEMS07", 0), ("PEMS08", 4),
])
def test_day_of_week_of_step_zero_follows_the_start_date(dataset, weekday):
    series = synthetic_series(dataset, num_steps=290)
    assert series[0, 0, 2] == weekday and series[287, 0, 2] == weekday
    assert series[288, 0, 2] == (weekday + 1) % 7


def test_time_of_day_gives_the_right_slot_in_float32_and_float64():
    tod, dow = time_features("2016-07-01T00:00", 3 * 288)
    slots = np.arange(3 * 288) % 288
    assert tod.dtype == np.float32 and tod[0] == 0.0 and tod.max() < 1.0
    np.testing.assert_array_equal(np.floor(tod * np.float32(288)), slots)
    np.testing.assert_array_equal(np.floor(tod.astype(np.float64) * 288), slots)
    np.testing.assert_array_equal((torch.from_numpy(tod) * 288).long().numpy(), slots)
    np.testing.assert_allclose(tod, slots / 288.0, atol=1e-7)
    np.testing.assert_array_equal(dow, np.repeat([4, 5, 6], 288))  # Friday 2016-07-01, Monday = 0


def test_time_of_day_wraps_midnight_from_a_start_late_in_the_day():
    tod, dow = time_features("2012-03-01T23:50", 4)
    np.testing.assert_allclose(tod, [286 / 288, 287 / 288, 0.0, 1 / 288], atol=1e-7)
    np.testing.assert_array_equal(dow, [3, 3, 4, 4])


# ----------------------------------------------------------------------------------------------- windows and splits

@pytest.fixture
def pems08_npy(tmp_path) -> Path:
    return write_npy(tmp_path, coded_values(600, PEMS08_NODES))


def test_raw_npy_windows_align_x_and_y_with_the_series(pems08_npy):
    data = load_dataset("pems08", pems08_npy)
    assert isinstance(data, ForecastData) and data.name == "PEMS08" and data.num_nodes == PEMS08_NODES
    assert data.series.shape == (600, PEMS08_NODES, 3) and data.series.dtype == np.float32
    np.testing.assert_array_equal(data.series[..., 0], coded_values(600, PEMS08_NODES))
    start = 0
    for batch in data.batches("val", 50):
        for offset in range(len(batch)):
            i = data.index["val"][start + offset, 0]
            np.testing.assert_array_equal(batch.y[offset].numpy(), data.series[i + 12:i + 24, :, :1])
            np.testing.assert_array_equal(batch.y_cov[offset].numpy(), data.series[i + 12:i + 24, :, 1:])
            np.testing.assert_array_equal(batch.x[offset, ..., 1:].numpy(), data.series[i:i + 12, :, 1:])
            raw_x = data.scaler.inverse_transform(batch.x[offset, ..., 0].double()).numpy()
            np.testing.assert_allclose(raw_x, data.series[i:i + 12, :, 0], rtol=1e-5)
        start += len(batch)
    assert start == data.num_samples("val")


def test_sliding_windows_split_chronologically_by_the_published_fractions(pems08_npy):
    data = load_dataset("PEMS08", pems08_npy)
    windows = 600 - 24 + 1
    train, val = round(windows * 0.6), round(windows * 0.2)
    assert (train, val, windows - train - val) == dataset_info("PEMS08").split_sizes(num_steps=600)
    np.testing.assert_array_equal(data.index["train"], rows(range(train)))
    np.testing.assert_array_equal(data.index["val"], rows(range(train, train + val)))
    np.testing.assert_array_equal(data.index["test"], rows(range(train + val, windows)))
    assert all(data.index[s].dtype == np.int64 for s in ("train", "val", "test"))


def test_speed_datasets_split_seven_one_two():
    data = load_dataset("METR-LA", synthetic=True, num_steps=1000)
    assert [data.num_samples(s) for s in ("train", "val", "test")] == [684, 98, 195]  # 977 windows


def test_scaler_is_fitted_on_the_training_inputs_only(pems08_npy):
    data = load_dataset("PEMS08", pems08_npy)
    train_inputs = data.series[data.index["train"][:, :1] + np.arange(12), :, 0].astype(np.float64)
    assert data.scaler.mean == pytest.approx(train_inputs.mean(), rel=1e-12)
    assert data.scaler.std == pytest.approx(train_inputs.std(), rel=1e-12)


def test_batches_count_and_last_partial_batch(pems08_npy):
    data = load_dataset("PEMS08", pems08_npy)
    sizes = [len(b) for b in data.batches("train", 64)]
    assert data.num_batches("train", 64) == math.ceil(data.num_samples("train") / 64) == len(sizes)
    assert sizes[:-1] == [64] * (len(sizes) - 1) and sizes[-1] == data.num_samples("train") % 64


def test_shuffle_is_reproducible_with_a_seeded_generator_and_covers_every_window(pems08_npy):
    data = load_dataset("PEMS08", pems08_npy)

    def first_target_steps(seed):
        batches = data.batches("train", 32, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return np.concatenate([(b.y[:, 0, 0, 0].numpy() / 1000).astype(int) - 12 for b in batches])

    order = first_target_steps(7)
    np.testing.assert_array_equal(order, first_target_steps(7))
    assert not np.array_equal(order, first_target_steps(8))
    assert not np.array_equal(order, np.sort(order))
    np.testing.assert_array_equal(np.sort(order), data.index["train"][:, 0])


def test_batches_honour_dtype(pems08_npy):
    batch = next(load_dataset("PEMS08", pems08_npy).batches("test", 4, dtype=torch.float64, device="cpu"))
    assert {t.dtype for t in (batch.x, batch.y, batch.y_cov)} == {torch.float64}
    assert batch.x.shape == (4, 12, PEMS08_NODES, 3) and batch.y.shape == (4, 12, PEMS08_NODES, 1)


# ----------------------------------------------------------------------------------------------- file formats

def test_himnet_directory_uses_its_index_and_time_channels(tmp_path):
    data = himnet_data(300, PEMS08_NODES)
    index = dict(train=rows([5, 0, 40, 41]), val=rows([100, 120]), test=rows([200, 276]))
    folder = write_himnet_dir(tmp_path, data, index)
    for path in (folder, folder / "data.npz"):
        loaded = load_dataset("PEMS08", path)
        np.testing.assert_array_equal(loaded.series, data)
        for split in index:
            np.testing.assert_array_equal(loaded.index[split], index[split])
        batch = next(loaded.batches("train", 4))
        np.testing.assert_array_equal(batch.y[:, 0, 0, 0].numpy(), [17000.0, 12000.0, 52000.0, 53000.0])
    stacked = data[index["train"][:, :1] + np.arange(12), :, 0].astype(np.float64)
    assert loaded.scaler.mean == pytest.approx(stacked.mean(), rel=1e-12)


def test_himnet_directory_with_a_custom_dataset_name(tmp_path):
    data = himnet_data(60, 5)
    folder = write_himnet_dir(tmp_path, data, dict(train=rows([0, 1, 2]), val=rows([20]), test=rows([30, 36])))
    loaded = load_dataset("my-city", folder)
    assert loaded.name == "my-city" and loaded.num_nodes == 5 and loaded.num_samples("test") == 2


def test_data_npz_without_index_or_time_channels_derives_them(tmp_path):
    value = coded_values(100, PEMS08_NODES)[..., None]
    folder = write_himnet_dir(tmp_path, value, None)
    loaded = load_dataset("PEMS08", folder)
    np.testing.assert_array_equal(loaded.series[..., 0], value[..., 0])
    tod, dow = time_features("2016-07-01T00:00", 100)
    np.testing.assert_array_equal(loaded.series[:, 3, 1], tod)
    np.testing.assert_array_equal(loaded.series[:, 3, 2], dow)
    assert loaded.num_samples("train") == round(77 * 0.6)


def test_pems_npz_keeps_channel_zero_and_is_found_in_a_directory(tmp_path):
    flow = coded_values(80, PEMS08_NODES)
    astgcn = np.stack([flow, np.full_like(flow, 0.05), np.full_like(flow, 64.0)], axis=-1)
    np.savez(tmp_path / "pems08.npz", data=astgcn)
    for path in (tmp_path, tmp_path / "pems08.npz"):
        series = load_series(path, "PEMS08")
        assert series.shape == (80, PEMS08_NODES, 3)
        np.testing.assert_array_equal(series[..., 0], flow)
        assert series[0, 0, 2] == 4 and series[1, 0, 1] == np.float32(1 / 288)


def test_raw_npz_with_another_single_key_and_a_two_dimensional_npy(tmp_path):
    flow = coded_values(40, PEMS08_NODES)
    np.savez(tmp_path / "flows.npz", flow=flow.astype(np.int32))
    np.testing.assert_array_equal(load_series(tmp_path / "flows.npz", "PEMS08")[..., 0], flow)
    np.testing.assert_array_equal(load_series(write_npy(tmp_path, flow), "PEMS08")[..., 0], flow)


def _write_h5_or_skip(path: Path, frame) -> None:
    pytest.importorskip("tables")
    frame.to_hdf(path, key="df")


def test_h5_dataframe_uses_its_timestamps(tmp_path):
    pandas = pytest.importorskip("pandas")
    stamps = pandas.date_range("2012-03-01 23:50", periods=30, freq="5min")
    values = coded_values(30, 207)
    frame = pandas.DataFrame(values, index=stamps, columns=[str(773869 + i) for i in range(207)])
    _write_h5_or_skip(tmp_path / "metr-la.h5", frame)
    for path in (tmp_path / "metr-la.h5", tmp_path):
        series = load_series(path, "METR-LA")
        np.testing.assert_array_equal(series[..., 0], values)
        np.testing.assert_allclose(series[:4, 0, 1], [286 / 288, 287 / 288, 0.0, 1 / 288], atol=1e-7)
        np.testing.assert_array_equal(series[:4, 0, 2], [3, 3, 4, 4])
    assert load_dataset("METR-LA", tmp_path).num_samples("train") == round(7 * 0.7)


def test_h5_without_pandas_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "metr-la.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    with pytest.raises(ImportError, match=r"pip install stfast\[h5\]"):
        load_series(path, "METR-LA")


# ----------------------------------------------------------------------------------------------- real shared files

def test_real_pems08_prefix_loads_as_pems08(shared_file):
    path = shared_file("_partial/PEMS08_prefix_1282steps.npy")
    data = load_dataset("PEMS08", path)
    raw = np.load(path)
    assert data.series.shape == (1282, 170, 3) and data.num_nodes == 170
    np.testing.assert_array_equal(data.series[..., 0], raw[..., 0])
    assert np.array_equal(data.series[..., 0], np.round(data.series[..., 0]))  # flows are counts
    assert [data.num_samples(s) for s in ("train", "val", "test")] == [755, 252, 252]  # 6:2:2 of 1259
    assert data.series[0, 0, 2] == 4 and data.series[288, 0, 2] == 5
    assert 150 < data.scaler.mean < 300


def test_real_pems04_prefix_loads_with_its_graph(shared_file):
    data = load_dataset("PEMS04", shared_file("_partial/PEMS04_prefix_694steps.npy"),
                        graph=shared_file("PEMS04/PEMS04.csv"))
    assert data.series.shape == (694, 307, 3) and data.adjacency.shape == (307, 307)
    assert data.series[0, 0, 2] == 0  # 2018-01-01 was a Monday


@pytest.mark.parametrize("relative, nodes, nonzeros", [
    ("METR-LA/adj_mx.pkl", 207, 1722),
    ("PEMS-BAY/adj_mx_bay.pkl", 325, 2694),
    ("PEMS03/PEMS03.csv", 358, 547),  # raw sensor ids, mapped through the sibling PEMS03.txt
    ("PEMS04/PEMS04.csv", 307, 340),
    ("PEMS07/PEMS07.csv", 883, 866),
    ("PEMS08/PEMS08.csv", 170, 277),  # 295 rows, 18 of them repeat a (from, to) pair
])
def test_real_graphs_have_the_published_edge_counts(relative, nodes, nonzeros, shared_file):
    adjacency = load_adjacency(shared_file(relative), nodes)
    assert adjacency.shape == (nodes, nodes) and adjacency.dtype == np.float32
    assert np.count_nonzero(adjacency) == nonzeros


def test_gaussian_kernel_of_bay_distances_rebuilds_the_dcrnn_adjacency(shared_file):
    pkl = shared_file("PEMS-BAY/adj_mx_bay.pkl")
    rebuilt = load_adjacency(shared_file("PEMS-BAY/distances_bay_2017.csv"), 325, ids_path=pkl, kind="gaussian")
    published = load_adjacency(pkl, 325)
    np.testing.assert_array_equal(rebuilt != 0, published != 0)
    np.testing.assert_allclose(rebuilt, published, atol=1e-6)


def test_bay_distances_without_ids_ask_for_them(shared_file):
    with pytest.raises(ValueError, match="ids_path"):
        load_adjacency(shared_file("PEMS-BAY/distances_bay_2017.csv"), 325)


# ----------------------------------------------------------------------------------------------- graph files

def test_dcrnn_pickle_returns_its_matrix(tmp_path):
    matrix = np.eye(3, dtype=np.float32) + np.float32(0.5) * np.eye(3, k=1, dtype=np.float32)
    with open(tmp_path / "adj.pkl", "wb") as handle:
        pickle.dump([["a", "b", "c"], {"a": 0, "b": 1, "c": 2}, matrix], handle, protocol=2)
    np.testing.assert_array_equal(load_adjacency(tmp_path / "adj.pkl", 3), matrix)
    with pytest.raises(ValueError, match=r"num_nodes: expected an adjacency of shape \(4, 4\), got \(3, 3\)"):
        load_adjacency(tmp_path / "adj.pkl", 4)


def test_index_edge_list_gives_directed_binary_connectivity(tmp_path):
    (tmp_path / "g.csv").write_text("from,to,cost\n0,1,100.0\n1,2,200.0\n0,1,100.0\n3,0,50.0\n")
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[[0, 1, 3], [1, 2, 0]] = 1.0
    np.testing.assert_array_equal(load_adjacency(tmp_path / "g.csv", 4), expected)
    np.testing.assert_array_equal(load_adjacency(tmp_path / "g.csv"), expected)  # size from the largest index


def test_raw_id_edge_list_maps_through_the_sibling_ids_file(tmp_path):
    (tmp_path / "PEMSX.csv").write_text("from,to,distance\n318711,317842,1.5\n317842,400000,2.0\n")
    (tmp_path / "PEMSX.txt").write_text("400000\n317842\n318711\n")
    expected = np.zeros((3, 3), dtype=np.float32)
    expected[[2, 1], [1, 0]] = 1.0
    np.testing.assert_array_equal(load_adjacency(tmp_path / "PEMSX.csv", 3), expected)


def test_gaussian_kernel_follows_dcrnn(tmp_path):
    (tmp_path / "d.csv").write_text("0,1,1.0\n1,2,2.0\n2,0,5.0\n")
    distances = np.array([1.0, 2.0, 5.0])
    sigma = distances.std()
    adjacency = load_adjacency(tmp_path / "d.csv", 3, kind="gaussian")
    expected = np.eye(3)
    expected[0, 1], expected[1, 2] = np.exp(-(1.0 / sigma) ** 2), np.exp(-(2.0 / sigma) ** 2)
    assert np.exp(-(5.0 / sigma) ** 2) < 0.1  # below the threshold: dropped
    np.testing.assert_allclose(adjacency, expected, rtol=1e-6)
    wide = load_adjacency(tmp_path / "d.csv", 3, kind="gaussian", sigma=10.0, threshold=0.0)
    assert wide[2, 0] == pytest.approx(np.exp(-0.25))


def test_graph_file_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no such file: .*nothere.pkl"):
        load_adjacency(tmp_path / "nothere.pkl")
    (tmp_path / "bad.csv").write_text("src,dst,w\n0,1,1\n")
    with pytest.raises(ValueError, match="path: expected the header from,to,cost or from,to,distance"):
        load_adjacency(tmp_path / "bad.csv")
    (tmp_path / "g.csv").write_text("from,to,cost\n0,7,1\n")
    with pytest.raises(ValueError, match="num_nodes: expected node indices below 5 .* got 7"):
        load_adjacency(tmp_path / "g.csv", 5)
    (tmp_path / "ids.txt").write_text("1\n2\n")
    (tmp_path / "r.csv").write_text("from,to,cost\n1,3,1\n")
    with pytest.raises(ValueError, match="ids_path: expected every sensor id .* got 1 unknown, e.g. '3'"):
        load_adjacency(tmp_path / "r.csv", ids_path=tmp_path / "ids.txt")
    with pytest.raises(ValueError, match="kind: expected 'binary' or 'gaussian', got 'knn'"):
        load_adjacency(tmp_path / "g.csv", kind="knn")
    (tmp_path / "broken.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="path: cannot unpickle .*broken.pkl"):
        load_adjacency(tmp_path / "broken.pkl")


def test_load_dataset_checks_the_graph_size(pems08_npy, tmp_path):
    (tmp_path / "g.csv").write_text("from,to,cost\n0,1,1\n169,0,1\n")
    data = load_dataset("PEMS08", pems08_npy, graph=tmp_path / "g.csv")
    assert data.adjacency.shape == (170, 170) and data.adjacency[0, 1] == 1.0
    np.save(tmp_path / "big.npy", np.eye(207))
    with pytest.raises(ValueError, match=r"graph: expected an adjacency of shape \(170, 170\), got \(207, 207\) .*big.npy \(for PEMS08\)"):
        load_dataset("PEMS08", pems08_npy, graph=tmp_path / "big.npy")
    with pytest.raises(FileNotFoundError, match="graph: no such file: .*missing.csv"):
        load_dataset("PEMS08", pems08_npy, graph=tmp_path / "missing.csv")


# ----------------------------------------------------------------------------------------------- synthetic data

@pytest.mark.parametrize("dataset", ALL_DATASETS)
def test_synthetic_series_has_the_dataset_shape_and_plausible_values(dataset):
    info = dataset_info(dataset)
    series = synthetic_series(dataset, num_steps=400, seed=1)
    assert series.shape == (400, info.num_nodes, 3) and series.dtype == np.float32
    assert np.isfinite(series).all()
    value = series[..., 0]
    if info.quantity == "speed":
        assert value.min() >= 0 and value.max() <= 80 and 40 < value[value > 0].mean() < 70
    else:
        assert value.min() >= 0 and np.array_equal(value, np.round(value)) and 30 < value.mean() < 400
    assert 0 <= series[..., 1].min() and series[..., 1].max() < 1
    assert set(np.unique(series[..., 2])) <= set(range(7))
    np.testing.assert_array_equal(series, synthetic_series(dataset, num_steps=400, seed=1))
    assert not np.array_equal(value, synthetic_series(dataset, num_steps=400, seed=2)[..., 0])


def test_a_short_synthetic_series_is_a_prefix_of_a_longer_one():
    np.testing.assert_array_equal(synthetic_series("PEMS08", 300, seed=4), synthetic_series("PEMS08", 900, seed=4)[:300])


def test_full_size_synthetic_metr_la_is_realistic():
    series = synthetic_series("METR-LA")
    assert series.shape == (34272, 207, 3)
    value = series[..., 0].astype(np.float64)
    assert np.isfinite(value).all()
    assert 0.002 < (value == 0).mean() < 0.01  # missing readings
    centred = value - value.mean(axis=0)

    def autocorrelation(lag):
        return (centred[lag:] * centred[:-lag]).sum() / np.sqrt((centred[lag:] ** 2).sum() * (centred[:-lag] ** 2).sum())

    assert autocorrelation(288) > 0.2  # daily period
    assert autocorrelation(2016) > autocorrelation(288)  # weekday/weekend difference: weekly period
    assert autocorrelation(288) > autocorrelation(144) + 0.2


def test_synthetic_dataset_loads_with_full_default_length():
    data = load_dataset("PEMS08", synthetic=True)
    assert data.series.shape == (17856, 170, 3)
    assert [data.num_samples(s) for s in ("train", "val", "test")] == list(dataset_info("PEMS08").split_sizes())


def test_synthetic_batch_shapes_dtypes_and_ranges():
    batch = synthetic_batch("METR-LA", 16)
    assert batch.x.shape == (16, 12, 207, 3) and batch.y.shape == (16, 12, 207, 1)
    assert batch.y_cov.shape == (16, 12, 207, 2) and batch.x.dtype == torch.float32
    slots = torch.floor(batch.x[..., 1] * 288)
    assert slots.min() >= 0 and slots.max() < 288
    assert set(batch.x[..., 2].unique().tolist()) <= set(range(7))
    assert abs(batch.x[..., 0].double().mean().item()) < 1e-5
    assert batch.x[..., 0].double().std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    series = synthetic_series("METR-LA", num_steps=40)
    np.testing.assert_array_equal(batch.y[3].numpy(), series[15:27, :, :1])
    double, scaler = synthetic_batch("PEMS08", 2, dtype=torch.float64, seed=3, return_scaler=True)
    assert double.x.dtype == double.y.dtype == double.y_cov.dtype == torch.float64 and len(double) == 2
    torch.testing.assert_close(scaler.inverse_transform(double.x[..., 0]), double.x.new_tensor(
        synthetic_series("PEMS08", num_steps=25, seed=3)[np.arange(2)[:, None] + np.arange(12), :, 0]),
        rtol=1e-5, atol=1e-4)  # scaled in float32, then cast


# ----------------------------------------------------------------------------------------------- bad input

def test_missing_path_and_directory_without_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no such file or directory: .*absent"):
        load_dataset("PEMS08", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"path: expected data.npz or PEMS08.npz/.npy/.h5 \(any case\) in directory"):
        load_dataset("PEMS08", tmp_path)
    with pytest.raises(ValueError, match="path: expected a data file or directory for 'PEMS08'"):
        load_dataset("PEMS08")


def test_wrong_number_of_nodes_names_expected_and_actual_shape(tmp_path):
    path = tmp_path / "PEMS08.npz"
    np.savez(path, data=np.ones((100, 169, 3)))
    with pytest.raises(ValueError, match=r"path: expected data of shape \(T, 170, C\) for PEMS08, got \(100, 169, 3\) from .*PEMS08.npz"):
        load_dataset("PEMS08", path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_counted_and_located(tmp_path, bad):
    values = coded_values(50, PEMS08_NODES)
    values[7, 3] = bad
    values[9, 0] = bad
    with pytest.raises(ValueError, match=r"path: expected finite values, got 2 NaN/inf .* first at \(step, node\) \(7, 3\)"):
        load_dataset("PEMS08", write_npy(tmp_path, values))


def test_too_few_steps_for_one_window(tmp_path):
    with pytest.raises(ValueError, match="path: expected at least 24 time steps .* for PEMS08, got 23"):
        load_dataset("PEMS08", write_npy(tmp_path, coded_values(23, PEMS08_NODES)))
    with pytest.raises(ValueError, match="num_steps: expected at least 24 time steps .* got 20"):
        load_dataset("PEMS08", synthetic=True, num_steps=20)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: expected one of \[.*'PEMS08'.*\].* got 'PEMS09'"):
        load_dataset("PEMS09", synthetic=True)
    with pytest.raises(ValueError, match=r"dataset: expected one of .* got 'PEMS09'"):
        load_dataset("PEMS09", write_npy(tmp_path, coded_values(50, 10)))
    with pytest.raises(ValueError, match="dataset: expected one of"):
        synthetic_batch("nowhere", 4)


def test_corrupt_npz_names_the_file(tmp_path):
    whole = tmp_path / "whole.npz"
    np.savez_compressed(whole, data=np.random.default_rng(0).random((200, PEMS08_NODES)))
    truncated = tmp_path / "PEMS08.npz"
    truncated.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"path: cannot read .*PEMS08.npz as a .npz archive"):
        load_dataset("PEMS08", truncated)
    garbage = tmp_path / "garbage" / "PEMS08.npz"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ValueError, match=r"path: cannot read .*PEMS08.npz"):
        load_dataset("PEMS08", garbage.parent)


def test_unusable_arrays_are_rejected_not_cast(tmp_path):
    with pytest.raises(ValueError, match=r"path: expected a real numeric array of shape \(T, N\) or \(T, N, C\) .* got <U1"):
        load_series(write_npy(tmp_path, np.full((30, PEMS08_NODES), "a")), "PEMS08")
    with pytest.raises(ValueError, match=r"got float64 \(30, 170, 1, 1\)"):
        load_series(write_npy(tmp_path, np.ones((30, PEMS08_NODES, 1, 1))), "PEMS08")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"path: expected a .npz, .npy or .h5 file, got .*x.csv"):
        load_series(tmp_path / "x.csv", "PEMS08")


@pytest.mark.parametrize("index, message", [
    (dict(train=rows([0]).astype(np.float64), val=rows([1]), test=rows([2])),
     r"index: expected integer rows \(x_start, x_end, y_end\) of shape \(num, 3\) in index\['train'\] .* got float64"),
    (dict(train=rows([0]), val=np.array([[1, 12, 25]]), test=rows([2])),
     r"index: expected x_end - x_start == in_steps = 12 in index\['val'\] .* got row 0 = \[1, 12, 25\]"),
    (dict(train=rows([0]), val=rows([1]), test=np.array([[20, 32, 45]])),
     r"index: expected y_end - x_end == out_steps = 12 in index\['test'\] .* got row 0 = \[20, 32, 45\]"),
    (dict(train=rows([0, 30]), val=rows([1]), test=rows([2])),
     r"index: expected 0 <= x_start and y_end <= 40 \(the series length\) in index\['train'\] .* got row 1 = \[30, 42, 54\]"),
    (dict(train=rows([0]), val=rows([1])), r"index: expected keys \['train', 'val', 'test'\] .* got \['train', 'val'\]"),
    (dict(train=rows([])[:0], val=rows([1]), test=rows([2])), "index: expected at least one training window"),
])
def test_bad_index_rows_are_reported(tmp_path, index, message):
    folder = write_himnet_dir(tmp_path, himnet_data(40, PEMS08_NODES), index)
    with pytest.raises(ValueError, match=message):
        load_dataset("PEMS08", folder)


def test_bad_time_channels_in_data_npz(tmp_path):
    data = himnet_data(40, 4)
    data[5, :, 1] = 1.0
    folder = write_himnet_dir(tmp_path, data, dict(train=rows([0]), val=rows([1]), test=rows([2])))
    with pytest.raises(ValueError, match=r"path: expected time of day \(channel 1\) in \[0, 1\) in .*data.npz, got \[0.34.*, 1.0\]"):
        load_dataset("custom", folder)


def test_argument_errors_of_load_dataset_and_batches(pems08_npy):
    with pytest.raises(ValueError, match="path: expected None with synthetic=True"):
        load_dataset("PEMS08", pems08_npy, synthetic=True)
    with pytest.raises(ValueError, match="num_steps: only used with synthetic=True, got 50"):
        load_dataset("PEMS08", pems08_npy, num_steps=50)
    data = load_dataset("PEMS08", pems08_npy)
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'val', 'test'\], got 'training'"):
        next(data.batches("training", 8))
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        next(data.batches("train", 0))
    with pytest.raises(ValueError, match="num_steps: expected a positive int, got 0"):
        synthetic_series("PEMS08", num_steps=0)
    with pytest.raises(ValueError, match="seed: expected a non-negative int, got -1"):
        synthetic_series("PEMS08", num_steps=10, seed=-1)


def test_synthetic_adjacency_is_the_graph_behind_the_synthetic_series():
    from stfast.data import synthetic_adjacency

    adjacency = synthetic_adjacency("PEMS08", seed=3)
    assert adjacency.shape == (170, 170) and adjacency.dtype == np.float32
    assert np.array_equal(adjacency, synthetic_adjacency("PEMS08", seed=3))
    assert np.all(adjacency.diagonal() == 1) and np.all((adjacency >= 0) & (adjacency <= 1))
    assert np.all(np.count_nonzero(adjacency, axis=1) == 5)
    # Linked nodes share the smooth component: their day-detrended series correlate more.
    days = synthetic_series("PEMS08", num_steps=288 * 4, seed=3)[..., 0].reshape(4, 288, 170)
    residual = (days - days.mean(axis=0)).reshape(-1, 170)
    corr = np.corrcoef(residual.T)
    linked = adjacency > 0
    np.fill_diagonal(linked, False)
    assert corr[linked].mean() > corr[~linked & ~np.eye(170, dtype=bool)].mean() + 0.1
