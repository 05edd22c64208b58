"""Graph normalisations the zoo's models build from a road adjacency (numpy in, float32 numpy out).

Each follows the convention of the model code named in ``shared/specs/baselines.md``; they differ
on purpose (which side is normalised, whether A is transposed), so each has its own name.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_adjacency", "transition", "double_transition", "stgcn_normalized_laplacian",
           "scaled_laplacian"]


def check_adjacency(adjacency, num_nodes: int, model: str) -> np.ndarray:
    """A float64 ``(num_nodes, num_nodes)`` copy of ``adjacency``, or a clear error naming the model."""
    if adjacency is None:
        raise ValueError(f"graph: {model} needs the road graph (an adjacency of shape ({num_nodes}, {num_nodes})), "
                         "got None; pass --graph FILE or BuildContext(adjacency=...)")
    a = np.asarray(adjacency, dtype=np.float64)
    if a.shape != (num_nodes, num_nodes):
        raise ValueError(f"graph: expected an adjacency of shape ({num_nodes}, {num_nodes}) for {model}, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"graph: expected finite adjacency weights for {model}, got {int((~np.isfinite(a)).sum())} "
                         "non-finite entries")
    return a


def transition(adjacency: np.ndarray) -> np.ndarray:
    """Row-normalised ``D^-1 A`` (rows without edges stay zero)."""
    a = np.asarray(adjacency, dtype=np.float64)
    rows = a.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(rows > 0, 1.0 / rows, 0.0)
    return (inverse * a).astype(np.float32)


def double_transition(adjacency: np.ndarray) -> list[np.ndarray]:
    """``[D^-1 A, D'^-1 A^T]``: forward and backward random walks (Graph WaveNet's "doubletransition")."""
    a = np.asarray(adjacency, dtype=np.float64)
    return [transition(a), transition(a.T)]


def stgcn_normalized_laplacian(adjacency: np.ndarray) -> np.ndarray:
    """``I - D^-1/2 A^T D^-1/2`` with D the row sums of A (STGCN's "normlap" as Torch-MTS computes it)."""
    a = np.asarray(adjacency, dtype=np.float64)
    rows = a.sum(axis=1)
    with np.errstate(divide="ignore"):
        d = np.where(rows > 0, rows ** -0.5, 0.0)
    return (np.eye(len(a)) - d[:, None] * a.T * d[None, :]).astype(np.float32)


def scaled_laplacian(adjacency: np.ndarray) -> np.ndarray:
    """``2 L / lambda_max - I`` of the symmetric normalised Laplacian of ``max(A, A^T)``."""
    a = np.asarray(adjacency, dtype=np.float64)
    a = np.maximum(a, a.T)
    rows = a.sum(axis=1)
    with np.errstate(divide="ignore"):
        d = np.where(rows > 0, rows ** -0.5, 0.0)
    laplacian = np.eye(len(a)) - d[:, None] * a * d[None, :]
    lambda_max = np.linalg.eigvalsh(laplacian).max()
    return (2.0 * laplacian / lambda_max - np.eye(len(a))).astype(np.float32)
