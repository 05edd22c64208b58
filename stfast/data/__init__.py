"""Traffic datasets for forecasting: file readers, graphs, synthetic data, scaling and batching.

A dataset is held as one (T, N, 3) float32 series ``[raw value, time of day, day of week]`` plus, per
split, the rows ``(x_start, x_end, y_end)`` of its windows; batches are cut from the series on demand.
This package imports only numpy, torch, the standard library and ``stfast.configs`` (pandas lazily,
for ``.h5`` files).
"""

from stfast.data.batch import Batch, StandardScaler
from stfast.data.dataset import ForecastData, load_dataset, sliding_window_index
from stfast.data.graph import load_adjacency
from stfast.data.series import load_series, time_features
from stfast.data.synthetic import synthetic_adjacency, synthetic_batch, synthetic_series

__all__ = [
    "Batch", "StandardScaler", "ForecastData", "load_dataset", "synthetic_series", "synthetic_batch",
    "load_adjacency", "load_series", "synthetic_adjacency", "time_features", "sliding_window_index",
]
