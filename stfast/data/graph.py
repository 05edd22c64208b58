"""Graph (adjacency) files of the traffic benchmarks.

- DCRNN ``adj_mx.pkl`` / ``adj_mx_bay.pkl``: a pickle ``[sensor_ids, sensor_id_to_ind, adj]``; ``adj`` is
  returned as is. Read with a restricted unpickler that admits only lists, dicts, strings, numbers and
  NumPy arrays, so a crafted pickle is refused (``ValueError``) and runs no code.
- Edge lists ``from,to,cost`` or ``from,to,distance`` (``PEMSxx.csv``), with or without a header.
  ``from``/``to`` are node indices, or raw sensor ids mapped to indices by the order of an ids file:
  ``ids_path`` (one id per line or comma-separated ``.txt``, or a DCRNN pickle whose id list is used),
  or else a sibling ``<stem>.txt`` (``PEMS03.csv`` + ``PEMS03.txt``). PEMS-BAY's headerless
  ``distances_bay_2017.csv`` holds raw ids: pass ``ids_path=".../adj_mx_bay.pkl"``.

  ``kind="binary"`` (default) is the connectivity matrix the ASTGCN code builds: ``A[from, to] = 1`` for
  every row, directed, no self-loops added (repeated rows count once).
  ``kind="gaussian"`` is the DCRNN kernel ``exp(-(d / sigma)^2)`` over the listed pairs (a later row
  overwrites a repeated pair), sigma the population std of those distances unless given, entries below
  ``threshold`` zeroed, and ones on the diagonal.
- ``.npy``: an (N, N) array.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np

__all__ = ["load_adjacency"]

_DISTANCE_COLUMNS = ("cost", "distance")


def load_adjacency(
    path: str | os.PathLike, num_nodes: int | None = None, *, ids_path: str | os.PathLike | None = None,
    kind: str = "binary", sigma: float | None = None, threshold: float = 0.1,
) -> np.ndarray:
    """Read a graph file as a float32 (N, N) adjacency; ``num_nodes`` checks N when given."""
    path = _existing(path, "path")
    if kind not in ("binary", "gaussian"):
        raise ValueError(f"kind: expected 'binary' or 'gaussian', got {kind!r}")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        adjacency = _read_dcrnn_pickle(path)[1]
    elif suffix == ".npy":
        adjacency = _read_npy_matrix(path)
    elif suffix in (".csv", ".txt"):
        adjacency = _adjacency_from_edges(path, num_nodes, ids_path, kind, sigma, threshold)
    else:
        raise ValueError(f"path: expected a .pkl, .csv or .npy graph file, got {path}")
    if num_nodes is not None and adjacency.shape != (num_nodes, num_nodes):
        raise ValueError(
            f"num_nodes: expected an adjacency of shape ({num_nodes}, {num_nodes})"
            f", got {adjacency.shape} from {path}"
        )
    _warn_if_mostly_isolated(adjacency, path)
    return adjacency


# The benchmarks' own graphs leave at most 1.8% of their nodes without an edge (PEMS-BAY: 6 of 325);
# another dataset's graph whose node indices happen to fit leaves many more (PEMS08's on PEMS04: 137).
_ISOLATED_WARNING_FRACTION = 0.05


def _warn_if_mostly_isolated(adjacency: np.ndarray, path: Path) -> None:
    links = adjacency != 0
    np.fill_diagonal(links, False)
    isolated = int((~links.any(axis=0) & ~links.any(axis=1)).sum())
    if isolated > _ISOLATED_WARNING_FRACTION * len(adjacency):
        warnings.warn(f"graph: {isolated} of {len(adjacency)} nodes have no edge in {path}; is it this dataset's "
                      "graph? (the benchmarks' own graphs leave under 2% of their nodes isolated)", stacklevel=3)


def _existing(path, argument: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no such file: {path}")
    return path


# Everything a DCRNN adj_mx.pkl references (Python 2 pickles of [list, dict, ndarray], or the same
# written by Python 3): the ndarray reconstruction and dtypes, under NumPy 1's and NumPy 2's module
# names. Lists, dicts, strings and numbers need no global. Any other global (os.system, builtins.eval,
# ...) is refused before it is looked up, so loading a crafted file runs nothing.
_RECONSTRUCT_ARRAY = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, wherever this NumPy keeps it
_ARRAY_FROM_BUFFER = np.empty(1).__reduce_ex__(5)[0]  # numpy's _frombuffer (pickle protocol 5)
ARRAY_PICKLE_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes (an array's buffer) at protocol 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT_ARRAY,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT_ARRAY,
    ("numpy.core.numeric", "_frombuffer"): _ARRAY_FROM_BUFFER,
    ("numpy._core.numeric", "_frombuffer"): _ARRAY_FROM_BUFFER,
}


class _GraphUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = ARRAY_PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a graph pickle may only hold lists, dicts, strings, numbers "
                "and NumPy arrays"
            )
        return found


def _unpickle_restricted(data: bytes):
    return _GraphUnpickler(io.BytesIO(data), encoding="latin1").load()  # latin1: written by Python 2


def _read_dcrnn_pickle(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        content = _unpickle_restricted(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError) as error:
        raise ValueError(f"path: cannot unpickle {path} ({error})") from error
    if not (isinstance(content, (list, tuple)) and len(content) == 3):
        raise ValueError(
            f"path: expected a DCRNN pickle [sensor_ids, sensor_id_to_ind, adj] in {path}"
            f", got {type(content).__name__}"
        )
    ids, _, adjacency = content
    return [str(i) for i in ids], _square_float32(np.asarray(adjacency), path)


def _read_npy_matrix(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"path: cannot read {path} as a .npy array ({error})") from error
    return _square_float32(matrix, path)


def _square_float32(matrix: np.ndarray, path: Path) -> np.ndarray:
    numeric = np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)
    if not numeric or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"path: expected a square numeric (N, N) adjacency in {path}"
            f", got {matrix.dtype} {matrix.shape}"
        )
    matrix = matrix.astype(np.float32)
    if not np.isfinite(matrix).all():
        raise ValueError(
            f"path: expected finite adjacency entries in {path}"
            f", got {int((~np.isfinite(matrix)).sum())} NaN/inf"
        )
    return matrix


def _adjacency_from_edges(path, num_nodes, ids_path, kind, sigma, threshold) -> np.ndarray:
    sources, targets, distances = _read_edge_list(path)
    ids = _read_ids(ids_path) if ids_path is not None else _sibling_ids(path)
    if ids is not None:
        rows, cols = _map_ids(sources, ids, path), _map_ids(targets, ids, path)
        size = len(ids)
    else:
        rows, cols = _as_indices(sources, path), _as_indices(targets, path)
        size = _index_graph_size(rows, cols, num_nodes, path)
    if kind == "binary":
        adjacency = np.zeros((size, size), dtype=np.float32)
        adjacency[rows, cols] = 1.0
        return adjacency
    return _gaussian_kernel(rows, cols, distances, size, sigma, threshold)


def _read_edge_list(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if lines and not _is_number(lines[0].split(",")[0]):
        header = [field.strip().lower() for field in lines[0].split(",")]
        if header[:2] != ["from", "to"] or len(header) != 3 or header[2] not in _DISTANCE_COLUMNS:
            raise ValueError(f"path: expected the header from,to,cost or from,to,distance in {path}, got {lines[0]!r}")
        lines = lines[1:]
    sources, targets, distances = [], [], []
    for number, line in enumerate(lines, start=1):
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not _is_number(fields[2]):
            raise ValueError(f"path: expected rows 'from,to,distance' in {path}, got {line!r} (data row {number})")
        sources.append(fields[0])
        targets.append(fields[1])
        distances.append(float(fields[2]))
    if not sources:
        raise ValueError(f"path: expected at least one edge in {path}, got none")
    distances = np.asarray(distances, dtype=np.float64)
    if not np.isfinite(distances).all() or (distances < 0).any():
        raise ValueError(f"path: expected finite non-negative distances in {path}, got min {distances.min()}")
    return sources, targets, distances


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_ids(ids_path) -> list[str]:
    ids_path = _existing(ids_path, "ids_path")
    if ids_path.suffix.lower() == ".pkl":
        return _read_dcrnn_pickle(ids_path)[0]
    ids = [token.strip() for token in ids_path.read_text().replace(",", "\n").split()]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(
            f"ids_path: expected distinct sensor ids in {ids_path}"
            f", got {len(ids)} ids, {len(set(ids))} distinct"
        )
    return ids


def _sibling_ids(path: Path) -> list[str] | None:
    sibling = path.with_suffix(".txt")
    return _read_ids(sibling) if sibling.is_file() and sibling != path else None


def _map_ids(raw_ids: list[str], ids: list[str], path: Path) -> np.ndarray:
    position = {sensor: index for index, sensor in enumerate(ids)}
    missing = [sensor for sensor in raw_ids if sensor not in position]
    if missing:
        raise ValueError(
            f"ids_path: expected every sensor id of {path} in the ids list"
            f", got {len(set(missing))} unknown, e.g. {missing[0]!r}"
        )
    return np.array([position[sensor] for sensor in raw_ids], dtype=np.int64)


def _as_indices(fields: list[str], path: Path) -> np.ndarray:
    try:
        return np.array([int(field) for field in fields], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"path: expected integer node indices in {path} ({error})") from error


def _index_graph_size(rows: np.ndarray, cols: np.ndarray, num_nodes: int | None, path: Path) -> int:
    largest = int(max(rows.max(), cols.max()))
    if min(rows.min(), cols.min()) < 0:
        raise ValueError(f"path: expected non-negative node indices in {path}, got {int(min(rows.min(), cols.min()))}")
    if num_nodes is not None and largest >= num_nodes:
        raise ValueError(
            f"num_nodes: expected node indices below {num_nodes} in {path}, got {largest} "
            "(raw sensor ids need ids_path)"
        )
    if num_nodes is not None and largest < num_nodes - 1:  # isolated nodes: most likely another dataset's file
        raise ValueError(
            f"num_nodes: expected edges that reach node {num_nodes - 1}, but the largest node index in {path} is "
            f"{largest}, so nodes {largest + 1}..{num_nodes - 1} of {num_nodes} would have no edge "
            "(is this the graph of another dataset?)"
        )
    if num_nodes is None and largest >= 100_000:
        raise ValueError(
            f"ids_path: expected an ids file to map the raw sensor ids of {path} (up to {largest}) to indices, got None"
        )
    return num_nodes if num_nodes is not None else largest + 1


def _gaussian_kernel(rows, cols, distances, size, sigma, threshold) -> np.ndarray:
    distance = np.full((size, size), np.inf)
    distance[rows, cols] = distances  # a repeated pair keeps its last row, as DCRNN's loop does
    if sigma is None:
        sigma = distance[np.isfinite(distance)].std()
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive kernel width, got {sigma}")
    adjacency = np.exp(-np.square(distance / sigma))
    adjacency[adjacency < threshold] = 0.0
    np.fill_diagonal(adjacency, 1.0)
    return adjacency.astype(np.float32)
