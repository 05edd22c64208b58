"""A crafted ``.h5`` must not run code when stfast reads it (PyTables unpickles attributes and object
columns for pandas); real traffic frames (numbers, string sensor ids, timestamps with a frequency) load."""

import numpy as np
import pytest

pandas = pytest.importorskip("pandas")
tables = pytest.importorskip("tables")

from stfast.data.hdf import read_timestamped_frame  # noqa: E402
from stfast.data.largest import read_largest_series  # noqa: E402
from stfast.data.series import load_series  # noqa: E402


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if it is ever unpickled


def _frame(sensors=4, steps=30, minutes=5, start="2012-03-01"):
    index = pandas.date_range(start, periods=steps, freq=f"{minutes}min")
    values = np.arange(steps * sensors, dtype=np.float64).reshape(steps, sensors)
    return pandas.DataFrame(values, index=index, columns=[str(700 + i) for i in range(sensors)])


@pytest.mark.parametrize("layout", ["fixed", "table"])
def test_real_frames_load(tmp_path, layout):
    frame = _frame()
    frame.to_hdf(tmp_path / "x.h5", key="df", format=layout)
    loaded = read_timestamped_frame(tmp_path / "x.h5")
    pandas.testing.assert_frame_equal(loaded, frame, check_freq=False)


def _poison_attribute(path, node, marker):
    with tables.open_file(str(path), "a") as h5:
        h5.get_node(node)._v_attrs.pandas_version = _WritesMarker(marker)


@pytest.mark.parametrize("node", ["/", "/df", "/df/axis0"])
def test_a_pickled_attribute_is_refused_and_nothing_runs(tmp_path, node):
    path, marker = tmp_path / "x.h5", tmp_path / "ran"
    _frame().to_hdf(path, key="df")
    _poison_attribute(path, node, marker)
    with pytest.raises(ValueError, match=r"path: refusing to read .*x\.h5: it holds (builtins|io)\.open"):
        read_timestamped_frame(path)
    assert not marker.exists()


def test_a_column_of_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "x.h5"
    frame = _frame()
    frame["mixed"] = [1, "a"] * 15  # object dtype: the fixed format pickles it
    frame.to_hdf(path, key="df")
    with pytest.raises(ValueError, match=r"path: refusing to read .*: it holds pickled Python objects in /df/"):
        read_timestamped_frame(path)


def test_every_h5_reader_refuses_a_crafted_file(tmp_path):
    marker = tmp_path / "ran"
    metr = tmp_path / "metr-la.h5"
    _frame(sensors=207).to_hdf(metr, key="df")
    _poison_attribute(metr, "/df", marker)
    with pytest.raises(ValueError, match="refusing to read"):
        load_series(metr, "METR-LA")
    largest = tmp_path / "sd_his_2019.h5"
    _frame(sensors=716, minutes=15, start="2019-01-01").to_hdf(largest, key="t")
    _poison_attribute(largest, "/t", marker)
    with pytest.raises(ValueError, match="refusing to read"):
        read_largest_series(largest, "SD")
    assert not marker.exists()


def test_a_file_that_is_not_hdf_gets_a_clear_error(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not an HDF5 file")
    with pytest.raises(ValueError, match=r"path: cannot read .*x\.h5 as a pandas HDF file"):
        read_timestamped_frame(path)
