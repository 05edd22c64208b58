"""LargeST: the four datasets' protocol, the loader of the released files, synthetic data at their sizes,
and the LargeST configurations of HimNet, AGCRN, STID and GWNet.

The files are written by the tests in the released layout (liuxu77/LargeST, see stfast/data/largest.py):
pandas DataFrames of flow indexed by timestamps, one column per sensor ID, saved with key "t".
"""

from pathlib import Path

import numpy as np
import pytest

from stfast import configs
from stfast.data import load_dataset, synthetic_adjacency, synthetic_batch
from stfast.data.largest import load_largest_adjacency, read_largest_series

pandas = pytest.importorskip("pandas")
pytest.importorskip("tables")

NODES = {"SD": 716, "GBA": 2352, "GLA": 3834, "CA": 8600}


def _meta(num_sd: int = 716) -> "pandas.DataFrame":
    """A ca_meta.csv-shaped table: 8,600 sensors, the SD ones (district 11) scattered among the others."""
    rng = np.random.default_rng(1)
    districts = np.full(8600, 7)
    districts[rng.choice(8600, num_sd, replace=False)] = 11
    ids = 400000 + rng.choice(600000, 8600, replace=False)
    return pandas.DataFrame({"ID": ids, "Lat": 33.0, "Lng": -117.0, "District": districts, "ID2": rng.permutation(8600)})


def _frame(num_sensors: int, steps: int, minutes: int, ids=None, seed: int = 0, nan_rate: float = 0.0):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 600, size=(steps, num_sensors)).astype(np.float64)
    values[rng.random(values.shape) < nan_rate] = np.nan
    index = pandas.date_range("2019-01-01", periods=steps, freq=f"{minutes}min")
    columns = [str(i) for i in (ids if ids is not None else 1000 + np.arange(num_sensors))]
    return pandas.DataFrame(values, index=index, columns=columns)


def _write(frame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_hdf(path, key="t", mode="w")
    return path


# -- protocol ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["SD", "GBA", "GLA", "CA"])
def test_largest_protocol(name):
    info = configs.dataset_info(name.lower())
    assert (info.num_nodes, info.steps_per_day, info.num_steps, info.split) == (NODES[name], 96, 365 * 96, (0.6, 0.2, 0.2))
    assert info.start == "2019-01-01T00:00" and info.loss == "masked_mae"
    # LargeST's generate_data_for_training.py: windows t in [11, T - 12), round(0.6 n), round(0.2 n), the rest
    windows = 35040 - 23
    assert info.split_sizes() == (round(windows * 0.6), round(windows * 0.2), windows - round(windows * 0.6) - round(windows * 0.2))


@pytest.mark.parametrize("model", ["himnet", "agcrn", "stid", "gwnet"])
@pytest.mark.parametrize("name", ["SD", "CA"])
def test_models_have_largest_configurations_at_the_datasets_size(model, name):
    config = configs.load(model, name)
    assert config["model"]["num_nodes"] == NODES[name]
    assert config["training"]["loss"] == "masked_mae"
    assert (config["training"]["in_steps"], config["training"]["out_steps"]) == (12, 12)


def test_stid_largest_config_uses_fifteen_minute_slots():
    assert configs.load("stid", "GLA")["model"]["time_of_day_size"] == 96


# -- loader --------------------------------------------------------------------------------------------------------

def test_subset_history_file_reads_as_the_benchmark_does(tmp_path):
    frame = _frame(716, 200, 15)
    _write(frame, tmp_path / "sd" / "sd_his_2019.h5")
    adjacency = np.random.default_rng(2).random((716, 716)).astype(np.float32)
    np.save(tmp_path / "sd" / "sd_rn_adj.npy", adjacency)
    data = load_dataset("sd", tmp_path / "sd", length_check="ignore")
    assert data.name == "SD" and data.series.shape == (200, 716, 3) and data.steps_per_day == 96
    np.testing.assert_array_equal(data.series[..., 0], frame.to_numpy(np.float32))
    minutes = frame.index.hour * 60 + frame.index.minute
    np.testing.assert_allclose(data.series[:, 0, 1], minutes / 1440.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(data.series[:, 0, 2], frame.index.day_of_week)  # 2019-01-01 was a Tuesday (1)
    np.testing.assert_array_equal(data.adjacency, adjacency)
    windows = 200 - 23
    assert [data.num_samples(s) for s in ("train", "val", "test")] == [
        round(windows * 0.6), round(windows * 0.2), windows - round(windows * 0.6) - round(windows * 0.2)]


def test_raw_five_minute_ca_file_is_resampled_and_cut_to_the_subset(tmp_path):
    meta = _meta()
    (tmp_path / "ca").mkdir()
    meta.to_csv(tmp_path / "ca" / "ca_meta.csv", index=False)
    raw = _frame(8600, 24, 5, ids=meta["ID"], nan_rate=0.3)
    _write(raw, tmp_path / "ca" / "ca_his_raw_2019.h5")
    series = read_largest_series(tmp_path / "ca", "SD")
    sd_ids = [str(i) for i in meta.loc[meta["District"] == 11, "ID"]]
    # 15-minute means of the three 5-minute readings (missing ones ignored), rounded, an all-missing slot 0
    values = raw[sd_ids].to_numpy().reshape(8, 3, 716)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expected = np.round(np.nanmean(values, axis=1))
    assert np.isnan(expected).any()  # the NaN rate makes some slots empty: the fill is exercised
    np.testing.assert_array_equal(series[..., 0], np.nan_to_num(expected, nan=0.0).astype(np.float32))
    np.testing.assert_allclose(series[:, 0, 1], np.arange(8) * 15 / 1440.0, atol=1e-7)


def test_subset_adjacency_cut_from_ca_by_id2(tmp_path):
    meta = _meta()
    (tmp_path / "ca").mkdir()
    meta.to_csv(tmp_path / "ca" / "ca_meta.csv", index=False)
    ca = np.random.default_rng(3).integers(0, 2, size=(8600, 8600), dtype=np.uint8)
    np.save(tmp_path / "ca" / "ca_rn_adj.npy", ca)
    rows = meta.loc[meta["District"] == 11, "ID2"].to_numpy()
    sd = load_largest_adjacency(tmp_path / "ca", "SD")
    np.testing.assert_array_equal(sd, ca[np.ix_(rows, rows)].astype(np.float32))


def test_wrong_node_count_is_refused_naming_the_file(tmp_path):
    file = _write(_frame(700, 50, 15), tmp_path / "sd_his_2019.h5")
    with pytest.raises(ValueError, match=r"path: expected 716 sensor columns for SD .*got 700 in .*sd_his_2019.h5"):
        load_dataset("SD", file)


def test_wrong_interval_and_irregular_timestamps_are_refused(tmp_path):
    file = _write(_frame(716, 50, 10), tmp_path / "sd_his_2019.h5")
    with pytest.raises(ValueError, match=r"path: expected 15-minute \(or raw 5-minute\) steps in .*got 10-minute"):
        read_largest_series(file, "SD")
    frame = _frame(716, 50, 15)
    frame.index = frame.index.delete(10).append(pandas.DatetimeIndex(["2019-02-01"]))
    _write(frame, file)
    with pytest.raises(ValueError, match=r"path: expected increasing timestamps at one regular interval"):
        read_largest_series(file, "SD")


def test_missing_values_in_a_fifteen_minute_file_are_refused(tmp_path):
    file = _write(_frame(716, 50, 15, nan_rate=0.01), tmp_path / "sd_his_2019.h5")
    with pytest.raises(ValueError, match=r"path: expected finite flows in .*first at \(step, sensor\)"):
        read_largest_series(file, "SD")


def test_ca_wide_file_without_metadata_names_ca_meta(tmp_path):
    file = _write(_frame(8600, 4, 15), tmp_path / "ca" / "ca_his_2019.h5")
    with pytest.raises(FileNotFoundError, match=r"path: expected ca_meta.csv"):
        read_largest_series(file, "SD")


def test_not_a_dataframe_and_not_hdf_are_refused(tmp_path):
    series_file = tmp_path / "sd_his_2019.h5"
    pandas.Series([1.0, 2.0], index=pandas.date_range("2019-01-01", periods=2, freq="15min")).to_hdf(series_file, key="t")
    with pytest.raises(ValueError, match=r"path: expected a DataFrame indexed by timestamps"):
        read_largest_series(series_file, "SD")
    series_file.write_bytes(b"not an hdf file")
    with pytest.raises(ValueError, match=r"path: cannot read .* as a pandas HDF file"):
        read_largest_series(series_file, "SD")


def test_folder_without_history_names_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path: expected gla_his_2019.h5 \(LargeST layout\)"):
        read_largest_series(tmp_path, "GLA")


def test_loader_refuses_other_datasets():
    with pytest.raises(ValueError, match=r"dataset: expected one of \['SD', 'GBA', 'GLA', 'CA'\] \(LargeST\), got 'METR-LA'"):
        read_largest_series(".", "METR-LA")


# -- synthetic data ------------------------------------------------------------------------------------------------

def test_synthetic_ca_batch_and_graph_have_the_real_shape():
    batch = synthetic_batch("CA", 2)
    assert tuple(batch.x.shape) == (2, 12, 8600, 3) and tuple(batch.y.shape)[:3] == (2, 12, 8600)
    slots = batch.x[0, :, 0, 1].double() * 96
    assert np.allclose(slots.numpy(), np.round(slots.numpy())) and np.allclose(np.diff(slots.numpy()), 1.0)
    adjacency = synthetic_adjacency("SD")
    assert adjacency.shape == (716, 716) and (adjacency > 0).sum(axis=1).max() == 5
