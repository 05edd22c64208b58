"""Synthetic traffic with the exact shapes and calendar of the six benchmarks (no real data needed).

The value of node n at step t combines: a daily rush-hour profile that differs between weekdays and
weekends (so both the 288-step and the 2016-step periods show), per-node level and sensitivity, a
smooth random component shared between nearby nodes (nodes get random positions in the unit square and
mix the smoothed noise of their nearest neighbours, so correlation follows proximity like on a road
graph), white noise, and about 0.5% zero readings standing for missing data.

Speed datasets give mph-like values (free flow 55-70, dipping in rush hours, kept in [3, 80]); flow
datasets give non-negative integer counts per 5 minutes (mostly below 500).

Each component draws from its own seeded stream and every stream is consumed step by step, so the
first k steps do not depend on ``num_steps``: a short series is a prefix of the full one.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from stfast.configs import DatasetInfo, dataset_info
from stfast.data.batch import Batch, StandardScaler, gather_batch, positive_int
from stfast.data.series import time_features

__all__ = ["synthetic_series", "synthetic_batch", "synthetic_adjacency"]

MISSING_RATE = 0.005
_SMOOTH_WIDTH = 24  # steps (2 hours) of each of the two box filters of the shared component
_NEIGHBOURS = 5
_DISTANCE_BLOCK_ROWS = 512


def synthetic_series(dataset: str, num_steps: int | None = None, seed: int = 0) -> np.ndarray:
    """A (T, N, 3) float32 series [value, time of day, day of week]; T defaults to the real length."""
    info = dataset_info(dataset)
    steps = info.num_steps if num_steps is None else positive_int(num_steps, "num_steps")
    param_rng, smooth_rng, noise_rng, missing_rng = _streams(info.name, _seed(seed))
    nodes = _node_parameters(param_rng, info)
    tod, dow = time_features(info.start, steps, info.steps_per_day)
    shared = _proximity_smooth_noise(smooth_rng, steps, nodes)
    noise = noise_rng.standard_normal((steps, info.num_nodes), dtype=np.float32)
    profile = _rush_hour_profile(tod * 24.0, dow < 5, info.quantity)
    shape_value = _speed if info.quantity == "speed" else _flow
    value = shape_value(profile, nodes, shared, noise)
    value[missing_rng.random((steps, info.num_nodes), dtype=np.float32) < MISSING_RATE] = 0.0
    series = np.empty((steps, info.num_nodes, 3), dtype=np.float32)
    series[..., 0] = value
    series[..., 1] = tod[:, None]
    series[..., 2] = dow[:, None]
    return series


def synthetic_batch(
    dataset: str, batch_size: int, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
    in_steps: int = 12, out_steps: int = 12, return_scaler: bool = False,
) -> Batch | tuple[Batch, StandardScaler]:
    """One batch of consecutive windows, generating only the steps they need (for profiling).

    x is scaled with a scaler fitted on these windows; ``return_scaler=True`` returns ``(batch, scaler)``.
    """
    batch_size = positive_int(batch_size, "batch_size")
    in_steps, out_steps = positive_int(in_steps, "in_steps"), positive_int(out_steps, "out_steps")
    series = synthetic_series(dataset, num_steps=batch_size + in_steps + out_steps - 1, seed=seed)
    starts = np.arange(batch_size)
    scaler = StandardScaler.fit_windows(series[..., 0], starts, in_steps)
    batch = gather_batch(series, starts, scaler, in_steps, out_steps, device=device, dtype=dtype)
    return (batch, scaler) if return_scaler else batch


def synthetic_adjacency(dataset: str, seed: int = 0) -> np.ndarray:
    """The (N, N) float32 road graph behind :func:`synthetic_series` with the same ``seed``.

    Each node links to its nearest nodes (the ones whose noise it mixes), weighted by a Gaussian
    kernel of the distance (as DCRNN builds road graphs), with self-loops of weight 1.
    """
    info = dataset_info(dataset)
    param_rng = _streams(info.name, _seed(seed))[0]
    nodes = _node_parameters(param_rng, info)
    adjacency = np.zeros((info.num_nodes, info.num_nodes), dtype=np.float32)
    rows = np.repeat(np.arange(info.num_nodes), nodes["neighbours"].shape[1])
    weights = nodes["weights"] / nodes["weights"][:, :1]  # the node itself (nearest, weight 1) first
    adjacency[rows, nodes["neighbours"].ravel()] = weights.ravel()
    return adjacency


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return int(seed)


def _streams(name: str, seed: int) -> list[np.random.Generator]:
    sequence = np.random.SeedSequence([seed, zlib.crc32(name.encode())])
    return [np.random.default_rng(child) for child in sequence.spawn(4)]


def _node_parameters(rng: np.random.Generator, info: DatasetInfo) -> dict[str, np.ndarray]:
    n = info.num_nodes
    positions = rng.random((n, 2))
    params = dict(
        level=rng.uniform(55.0, 70.0, n) if info.quantity == "speed" else rng.uniform(180.0, 520.0, n),
        depth=rng.uniform(3.0, 30.0, n),  # speed drop at the peak of congestion, mph
        morning=rng.uniform(0.5, 1.2, n),
        evening=rng.uniform(0.5, 1.2, n),
        noise=rng.uniform(0.5, 1.5, n),
    )
    params["neighbours"], params["weights"] = _nearest_neighbour_mixing(positions)
    return {key: np.asarray(value, dtype=np.float32) if key != "neighbours" else value for key, value in params.items()}


def _nearest_neighbour_mixing(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each node's k nearest nodes (itself first) and Gaussian weights of unit L2 norm."""
    k = min(_NEIGHBOURS, len(positions))
    neighbours = np.empty((len(positions), k), dtype=np.int64)
    near = np.empty((len(positions), k))
    # Rows in blocks, so that LargeST's CA (8,600 nodes) never holds an (N, N) distance matrix.
    for lo in range(0, len(positions), _DISTANCE_BLOCK_ROWS):
        block = slice(lo, lo + _DISTANCE_BLOCK_ROWS)
        dx = positions[block, None, 0] - positions[None, :, 0]
        dy = positions[block, None, 1] - positions[None, :, 1]
        distance = np.sqrt(dx * dx + dy * dy)  # what np.linalg.norm computes, without a (rows, N, 2) temporary
        neighbours[block] = _k_smallest(distance, k)
        near[block] = np.take_along_axis(distance, neighbours[block], axis=1)
    width = max(float(np.median(near[:, -1])), 1e-6)
    weights = np.exp(-0.5 * np.square(near / width))
    return neighbours, weights / np.linalg.norm(weights, axis=1, keepdims=True)


def _k_smallest(distance: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest entries, ascending, ties by index (a stable argsort's first k)."""
    if k == distance.shape[1]:
        return np.argsort(distance, axis=1, kind="stable")
    candidates = np.sort(np.argpartition(distance, k - 1, axis=1)[:, :k], axis=1)
    order = np.argsort(np.take_along_axis(distance, candidates, axis=1), axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def _proximity_smooth_noise(rng: np.random.Generator, steps: int, nodes: dict) -> np.ndarray:
    """Unit-variance noise, smooth in time (two causal box filters) and correlated between nearby nodes."""
    width = _SMOOTH_WIDTH
    white = rng.standard_normal((steps + 2 * width, nodes["level"].size), dtype=np.float32)
    smooth = _box_filter(_box_filter(white, width), width) / np.float32(np.sqrt(2.0 * width**3 / 3.0 + width / 3.0))
    mixed = np.zeros_like(smooth)
    for j in range(nodes["neighbours"].shape[1]):
        mixed += smooth[:, nodes["neighbours"][:, j]] * nodes["weights"][:, j]
    return mixed


def _box_filter(values: np.ndarray, width: int) -> np.ndarray:
    """Sum of each run of ``width`` consecutive rows (drops the first ``width`` rows)."""
    total = np.cumsum(values, axis=0)
    return total[width:] - total[:-width]


def _rush_hour_profile(hours: np.ndarray, weekday: np.ndarray, quantity: str) -> dict[str, np.ndarray]:
    """Time-only bumps, (T, 1) each: morning and evening peaks on weekdays, a midday bump on weekends."""
    def bump(centre, width):
        return np.exp(-0.5 * np.square((hours - centre) / width)).astype(np.float32)[:, None]

    on_weekday = weekday.astype(np.float32)[:, None]
    midday = bump(13.0, 3.5) if quantity == "flow" else bump(14.0, 2.5)
    return dict(
        morning=on_weekday * bump(8.0, 1.2),
        evening=on_weekday * bump(17.5, 1.5),
        midday=midday,
        weekend=(1.0 - on_weekday) * midday,
    )


def _speed(profile: dict, nodes: dict, shared: np.ndarray, noise: np.ndarray) -> np.ndarray:
    congestion = (profile["morning"] * nodes["morning"] + profile["evening"] * nodes["evening"]
                  + 0.3 * profile["weekend"])
    drop = nodes["depth"] * congestion * (1.0 + 0.4 * shared)
    speed = nodes["level"] - drop - 2.0 * shared + nodes["noise"] * noise
    return np.clip(speed, 3.0, 80.0)


def _flow(profile: dict, nodes: dict, shared: np.ndarray, noise: np.ndarray) -> np.ndarray:
    demand = (0.15 + 0.5 * profile["morning"] * nodes["morning"] + 0.45 * profile["evening"] * nodes["evening"]
              + 0.45 * profile["midday"] + 0.2 * profile["weekend"])
    flow = nodes["level"] * demand * np.exp(0.15 * shared)
    flow += noise * (0.02 * nodes["level"]) * nodes["noise"] * np.sqrt(demand)
    return np.rint(np.clip(flow, 0.0, None))
