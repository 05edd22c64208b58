"""PDFormer: propagation-delay-aware dynamic long-range transformer (531,165 parameters, any N).

Written from ``shared/specs/baselines.md`` section 14, which summarises the official code
(BUAABIGSCity/PDFormer: libcity/model/traffic_flow_prediction/PDFormer.py, the model JSON
``PDFormer.json``, ``pdformer_dataset.py`` and ``pdformer_executor.py``). Settings the spec does not
list (max_epoch 300, curriculum step_size 1562, warm-up start lr 1e-6, random_flip true, drop and
attn_drop 0) are from LibCity/Bigscity-LibCity:libcity/config/model/traffic_state_pred/PDFormer.json.

The model sees value, time of day and day of week; its day-of-week embedding takes the integer day
(the original takes the argmax of a one-hot feature: the same index).

Data-derived inputs (buffers, no parameters), computed by :func:`build` from the ``BuildContext``:

- Laplacian positional encoding: the ``lape_dim`` eigenvectors of the symmetric normalised Laplacian
  of ``max(A, A^T)`` after the ``isolated + 1`` smallest (the original drops the same number but
  takes the real part of ``np.linalg.eig`` of ``I - D^-1/2 A^T D^-1/2`` of the directed graph). As in
  the original executor, their signs are flipped at random in every training forward. METR-LA's
  symmetrised graph has two components, so, as in the original, the first kept vector still has
  eigenvalue 0 (it marks the component).
- Geographic mask: query i may not attend to key j when the directed hop distance j -> i is at least
  ``far_mask_delta`` (BFS over ``A > 0``, unreachable = 511 hops as in the original).
- Semantic mask: each node attends to its ``dtw_delta`` most similar nodes (itself included). The
  original ranks by FastDTW between average-day profiles of the whole data file. Stand-in here: the
  Euclidean distance between average-day profiles of ``context.train_series`` (training split only);
  without ``train_series``, the nearest nodes by hop distance (ties by node index).
- Pattern keys: ``context.extras["pattern_keys"]`` (K, s_attn_size[, 1]) when given (e.g. the
  original's k-Shape centroids). Else a stand-in for k-Shape from ``context.train_series``: k-means
  (``cluster_max_iter`` Lloyd steps, seeded) on per-pattern z-normalised ``s_attn_size``-step patterns
  of the first ``cand_key_days`` days (k-Shape centroids are z-normalised shapes too). Else a fixed
  seeded N(0, 1) set. As in the original, the keys are shapes while the recent patterns they are
  matched with are the scaled values themselves. ``model.derived_inputs`` records each input's source.

All four are registered buffers, so a state dict carries them with the weights.

Training recipe features (AdamW, cosine LR with warm-up, curriculum over horizons) are in
:func:`config`'s training dict; the trainer applies them (``stfast.training.step``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .graph_ops import check_adjacency
from .dataset_configs import for_dataset
from .spec import ModelSpec

SPEC = ModelSpec("pdformer", x_channels=(0, 1, 2), needs_graph=True)
BACKENDS = ("reference",)

MINUTES_PER_DAY = 1440
DAYS_PER_WEEK = 7
UNREACHABLE_HOPS = 511
PATTERN_SEED = 0
MAX_PATTERN_CANDIDATES = 50_000  # k-means on a seeded subsample keeps build() fast

# keys of the model config that shape the data-derived inputs, not the module
_DERIVATION_DEFAULTS = dict(far_mask_delta=5, dtw_delta=5, n_cluster=16, cand_key_days=14, cluster_max_iter=5,
                            steps_per_day=288)


# ---------------------------------------------------------------------------------------------
# Data-derived inputs (numpy)
# ---------------------------------------------------------------------------------------------

def laplacian_positional_encoding(adjacency: np.ndarray, dim: int) -> np.ndarray:
    """(N, dim) eigenvectors of ``I - D^-1/2 S D^-1/2``, ``S = max(A, A^T)``, after the trivial ones."""
    a = np.asarray(adjacency, dtype=np.float64)
    sym = np.maximum(a, a.T)
    degree = sym.sum(axis=1)
    with np.errstate(divide="ignore"):
        d = np.where(degree > 0, degree ** -0.5, 0.0)
    laplacian = np.eye(len(a)) - d[:, None] * sym * d[None, :]
    _, vectors = np.linalg.eigh(laplacian)  # ascending eigenvalues
    skip = int((degree == 0).sum()) + 1
    chosen = vectors[:, skip:skip + dim]
    # graphs with fewer than dim + skip nodes: zero columns keep the Linear(lape_dim, .) shape
    return np.pad(chosen, ((0, 0), (0, dim - chosen.shape[1]))).astype(np.float32)


def hop_distances(adjacency: np.ndarray) -> np.ndarray:
    """(N, N) directed hop counts ``[i, j]`` from i to j over edges ``A > 0``; unreachable = 511."""
    edges = (np.asarray(adjacency) > 0).astype(np.float64)
    n = len(edges)
    hops = np.full((n, n), UNREACHABLE_HOPS, dtype=np.int64)
    reached = np.eye(n, dtype=bool)
    frontier = reached.copy()
    hops[reached] = 0
    for hop in range(1, n):
        frontier = ((frontier.astype(np.float64) @ edges) > 0) & ~reached
        if not frontier.any():
            break
        hops[frontier] = hop
        reached |= frontier
    return hops


def geographic_mask(hops: np.ndarray, far_mask_delta: int) -> np.ndarray:
    """True where query i must not see key j: hop distance j -> i >= far_mask_delta (the original's ``sh_mx.T``)."""
    return hops.T >= far_mask_delta


def semantic_mask(distances: np.ndarray, num_similar: int) -> np.ndarray:
    """True everywhere except each row's ``num_similar`` smallest distances (stable order)."""
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :num_similar]
    mask = np.ones(distances.shape, dtype=bool)
    np.put_along_axis(mask, nearest, False, axis=1)
    return mask


def check_train_series(train_series, num_nodes: int) -> np.ndarray:
    series = np.asarray(train_series, dtype=np.float64)
    if series.ndim != 2 or series.shape[1] != num_nodes:
        raise ValueError(f"train_series: expected shape (T_train, {num_nodes}), got {series.shape}")
    if not np.isfinite(series).all():
        raise ValueError(f"train_series: expected finite values, got {int((~np.isfinite(series)).sum())} non-finite")
    return series


def daily_profile_distances(series: np.ndarray, steps_per_day: int) -> np.ndarray:
    """(N, N) Euclidean distances between nodes' average-day profiles (a cheap stand-in for DTW)."""
    days = len(series) // steps_per_day
    profiles = series[:days * steps_per_day].reshape(days, steps_per_day, -1).mean(axis=0) if days else series
    sq = (profiles ** 2).sum(axis=0)
    squared = sq[:, None] + sq[None, :] - 2.0 * profiles.T @ profiles
    distances = np.sqrt(np.maximum(squared, 0.0))
    np.fill_diagonal(distances, 0.0)
    return distances


def candidate_patterns(series: np.ndarray, length: int, num_steps: int) -> np.ndarray:
    """Per-pattern z-normalised windows ``series[t:t+length, n]`` for t < num_steps, all nodes: (M, length)."""
    starts = min(num_steps, len(series) - length + 1)
    if starts < 1:
        raise ValueError(f"train_series: expected at least {length} steps for pattern keys, got {len(series)}")
    windows = np.stack([series[i:i + starts] for i in range(length)], axis=-1)  # (starts, N, length)
    windows = windows.reshape(-1, length)
    std = windows.std(axis=1, keepdims=True)
    centred = windows - windows.mean(axis=1, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def kmeans_centroids(points: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means from k distinct random points; an emptied cluster keeps its centroid."""
    if len(points) < k:
        raise ValueError(f"train_series: expected at least {k} candidate patterns for {k} pattern keys, "
                         f"got {len(points)}")
    centroids = points[rng.choice(len(points), size=k, replace=False)]
    for _ in range(iterations):
        squared = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
        labels = squared.argmin(axis=1)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points)
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    return centroids


def pattern_keys_from_series(series: np.ndarray, length: int, n_cluster: int, cand_key_days: int,
                             iterations: int, steps_per_day: int) -> np.ndarray:
    rng = np.random.default_rng(PATTERN_SEED)
    patterns = candidate_patterns(series, length, cand_key_days * steps_per_day)
    if len(patterns) > MAX_PATTERN_CANDIDATES:
        patterns = patterns[rng.choice(len(patterns), size=MAX_PATTERN_CANDIDATES, replace=False)]
    return kmeans_centroids(patterns, n_cluster, iterations, rng).astype(np.float32)


def check_pattern_keys(keys, length: int) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.float32)
    if keys.ndim == 3 and keys.shape[-1] == 1:  # the original's (K, s_attn_size, output_dim)
        keys = keys[..., 0]
    if keys.ndim != 2 or keys.shape[1] != length or len(keys) == 0:
        raise ValueError(f"pattern_keys: expected shape (K, {length}) or (K, {length}, 1), got {keys.shape}")
    return keys


def derive_inputs(adjacency: np.ndarray, context, num_nodes: int, lape_dim: int, s_attn_size: int,
                  far_mask_delta: int, dtw_delta: int, n_cluster: int, cand_key_days: int,
                  cluster_max_iter: int, steps_per_day: int) -> dict:
    """The four graph/data-derived inputs of :class:`PDFormer` and where each came from."""
    hops = hop_distances(adjacency)
    train_series = getattr(context, "train_series", None)
    extras = getattr(context, "extras", None) or {}
    series = None if train_series is None else check_train_series(train_series, num_nodes)
    if series is None:
        similarity, semantic_source = np.minimum(hops, hops.T), "hop distance (no train_series)"
    else:
        similarity, semantic_source = daily_profile_distances(series, steps_per_day), \
            "average-day profile distance (stand-in for DTW)"
    if extras.get("pattern_keys") is not None:
        keys, keys_source = check_pattern_keys(extras["pattern_keys"], s_attn_size), "extras['pattern_keys']"
    elif series is not None:
        keys = pattern_keys_from_series(series, s_attn_size, n_cluster, cand_key_days, cluster_max_iter, steps_per_day)
        keys_source = "k-means of z-normalised training patterns (stand-in for k-Shape)"
    else:
        keys = np.random.default_rng(PATTERN_SEED).standard_normal((n_cluster, s_attn_size)).astype(np.float32)
        keys_source = f"seeded random (seed {PATTERN_SEED}; no train_series or extras['pattern_keys'])"
    return dict(
        lap_pe=laplacian_positional_encoding(adjacency, lape_dim),
        geo_mask=geographic_mask(hops, far_mask_delta),
        sem_mask=semantic_mask(similarity, dtw_delta),
        pattern_keys=keys,
        sources=dict(semantic=semantic_source, pattern_keys=keys_source),
    )


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------

def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole branch per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x / keep * torch.bernoulli(torch.full(shape, keep, dtype=x.dtype, device=x.device))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., L, heads * h) -> (..., heads, L, h)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, h) -> (..., L, heads * h)."""
    return x.transpose(-3, -2).flatten(-2)


class QKV(nn.Module):
    """Three position-wise projections (the original's 1x1 convs: the same parameters as Linear layers)."""

    def __init__(self, dim: int, out_dim: int, bias: bool):
        super().__init__()
        self.q = nn.Linear(dim, out_dim, bias=bias)
        self.k = nn.Linear(dim, out_dim, bias=bias)
        self.v = nn.Linear(dim, out_dim, bias=bias)


class SpatioTemporalSelfAttention(nn.Module):
    """Temporal heads (along time), geographic heads (hop-masked, delay-aware keys), semantic heads."""

    def __init__(self, dim: int, geo_heads: int, sem_heads: int, t_heads: int, qkv_bias: bool, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        total_heads = geo_heads + sem_heads + t_heads
        if dim % total_heads:
            raise ValueError(f"embed_dim: expected a multiple of the {total_heads} heads, got {dim}")
        self.head_dim = dim // total_heads
        self.heads = dict(geo=geo_heads, sem=sem_heads, t=t_heads)
        self.attn_drop = attn_drop
        geo_dim = geo_heads * self.head_dim
        self.pattern_q = nn.Linear(dim, geo_dim)
        self.pattern_k = nn.Linear(dim, geo_dim)
        self.pattern_v = nn.Linear(dim, geo_dim)
        self.geo = QKV(dim, geo_dim, qkv_bias)
        self.sem = QKV(dim, sem_heads * self.head_dim, qkv_bias)
        self.t = QKV(dim, t_heads * self.head_dim, qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q, k, v, heads: int, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled dot-product attention over the second-last axis of (..., L, heads * h)."""
        q, k, v = (split_heads(t, heads) for t in (q, k, v))
        lead = q.shape[:-3]  # folded into one axis: the fused kernels take 4-D inputs
        q, k, v = (t.flatten(0, -4) for t in (q, k, v))
        mask = None if blocked is None else ~blocked
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return merge_heads(out.unflatten(0, lead))

    def delay_aware_keys(self, x_patterns: torch.Tensor, pattern_keys: torch.Tensor) -> torch.Tensor:
        """Each position's pattern attends over the pattern keys; returns the (B, T, N, geo_dim) key term."""
        scores = self.pattern_q(x_patterns) @ self.pattern_k(pattern_keys).T * self.head_dim ** -0.5
        return scores.softmax(dim=-1) @ self.pattern_v(pattern_keys)

    def forward(self, x, x_patterns, pattern_keys, geo_mask, sem_mask):
        # x: (B, T, N, D); temporal attention runs on (B, N, T, .), spatial on (B, T, N, .)
        xt = x.transpose(1, 2)
        t_out = self.attend(self.t.q(xt), self.t.k(xt), self.t.v(xt), self.heads["t"]).transpose(1, 2)
        geo_k = self.geo.k(x) + self.delay_aware_keys(x_patterns, pattern_keys)
        geo_out = self.attend(self.geo.q(x), geo_k, self.geo.v(x), self.heads["geo"], geo_mask)
        sem_out = self.attend(self.sem.q(x), self.sem.k(x), self.sem.v(x), self.heads["sem"], sem_mask)
        return self.proj_drop(self.proj(torch.cat([t_out, geo_out, sem_out], dim=-1)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, geo_heads: int, sem_heads: int, t_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path_rate: float, type_ln: str):
        super().__init__()
        if type_ln not in ("pre", "post"):
            raise ValueError(f"type_ln: expected 'pre' or 'post', got {type_ln!r}")
        self.type_ln = type_ln
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.st_attn = SpatioTemporalSelfAttention(dim, geo_heads, sem_heads, t_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim),
                                 nn.Dropout(drop))

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        return drop_path(y, self.drop_path_rate, self.training)

    def forward(self, x, x_patterns, pattern_keys, geo_mask, sem_mask):
        if self.type_ln == "pre":
            x = x + self._branch(self.st_attn(self.norm1(x), x_patterns, pattern_keys, geo_mask, sem_mask))
            return x + self._branch(self.mlp(self.norm2(x)))
        x = self.norm1(x + self._branch(self.st_attn(x, x_patterns, pattern_keys, geo_mask, sem_mask)))
        return self.norm2(x + self._branch(self.mlp(x)))


class PDFormer(nn.Module):
    def __init__(self, num_nodes: int, lap_pe, geo_mask, sem_mask, pattern_keys, in_steps: int = 12,
                 out_steps: int = 12, output_dim: int = 1, embed_dim: int = 64, skip_dim: int = 256,
                 lape_dim: int = 8, geo_num_heads: int = 4, sem_num_heads: int = 2, t_num_heads: int = 2,
                 mlp_ratio: float = 4, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.3, s_attn_size: int = 3, enc_depth: int = 6, type_ln: str = "post",
                 random_flip: bool = True):
        super().__init__()
        if output_dim != 1:
            raise ValueError(f"output_dim: expected 1 (speed or flow only), got {output_dim}")
        self.num_nodes = num_nodes
        self.in_steps = in_steps
        self.s_attn_size = s_attn_size
        self.random_flip = random_flip
        self.derived_inputs: dict = {}
        self._register_derived(num_nodes, lape_dim, s_attn_size, lap_pe, geo_mask, sem_mask, pattern_keys)
        self.register_buffer("position_encoding", sinusoidal_encoding(in_steps, embed_dim)[:, None, :])

        self.value_embedding = nn.Linear(1, embed_dim)
        self.daytime_embedding = nn.Embedding(MINUTES_PER_DAY, embed_dim)
        self.weekday_embedding = nn.Embedding(DAYS_PER_WEEK, embed_dim)
        self.spatial_embedding = nn.Linear(lape_dim, embed_dim)
        self.embed_dropout = nn.Dropout(drop)
        self.pattern_embedding = nn.Linear(s_attn_size, embed_dim)
        rates = torch.linspace(0, drop_path, enc_depth).tolist()
        self.encoder_blocks = nn.ModuleList([
            EncoderBlock(embed_dim, geo_num_heads, sem_num_heads, t_num_heads, mlp_ratio, qkv_bias, drop, attn_drop,
                         rate, type_ln) for rate in rates])
        self.skip_convs = nn.ModuleList([nn.Linear(embed_dim, skip_dim) for _ in range(enc_depth)])
        self.end_conv1 = nn.Linear(in_steps, out_steps)  # 1x1 conv with the time axis as channels
        self.end_conv2 = nn.Linear(skip_dim, output_dim)

    def _register_derived(self, num_nodes, lape_dim, s_attn_size, lap_pe, geo_mask, sem_mask, pattern_keys):
        inputs = dict(lap_pe=torch.as_tensor(np.asarray(lap_pe), dtype=torch.float32),
                      geo_mask=torch.as_tensor(np.asarray(geo_mask), dtype=torch.bool),
                      sem_mask=torch.as_tensor(np.asarray(sem_mask), dtype=torch.bool),
                      pattern_keys=torch.as_tensor(np.asarray(pattern_keys), dtype=torch.float32))
        expected = dict(lap_pe=(num_nodes, lape_dim), geo_mask=(num_nodes, num_nodes),
                        sem_mask=(num_nodes, num_nodes), pattern_keys=("K", s_attn_size))
        for name, tensor in inputs.items():
            check_tensor(name, tensor, expected[name])
            self.register_buffer(name, tensor)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        lap_pe = self.lap_pe
        if self.training and self.random_flip:
            lap_pe = lap_pe * torch.where(torch.rand(lap_pe.shape[1], device=x.device) >= 0.5, 1.0, -1.0)
        minute = (x[..., 1] * MINUTES_PER_DAY).round().long()
        out = self.value_embedding(x[..., :1]) + self.position_encoding
        out = out + self.daytime_embedding(minute) + self.weekday_embedding(x[..., 2].long())
        return self.embed_dropout(out + self.spatial_embedding(lap_pe))

    def recent_patterns(self, value: torch.Tensor) -> torch.Tensor:
        """(B, T, N) -> (B, T, N, s_attn_size): steps t-s+1..t of each node, zero before the window."""
        padded = F.pad(value, (0, 0, self.s_attn_size - 1, 0))
        return padded.unfold(1, self.s_attn_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.in_steps, self.num_nodes, 3), floating=True)
        x_patterns = self.pattern_embedding(self.recent_patterns(x[..., 0]))
        pattern_keys = self.pattern_embedding(self.pattern_keys)
        h = self.embed(x)
        skip = 0.0
        for block, skip_conv in zip(self.encoder_blocks, self.skip_convs):
            h = block(h, x_patterns, pattern_keys, self.geo_mask, self.sem_mask)
            skip = skip + skip_conv(h)
        out = self.end_conv1(torch.relu(skip).transpose(1, 3)).transpose(1, 3)  # mixes the time axis
        return self.end_conv2(torch.relu(out))


def config(dataset: str) -> dict:
    """PDFormer.json model defaults (the official repo has no METR-LA file) for METR-LA; on other
    datasets the same with the dataset's shape (marked as such).

    The repo's PeMS04/07/08.json use a Huber loss with delta 2, a bidirectional hop mask and gradient
    accumulation, which this port does not implement, so they are not offered as published.
    """
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, in_steps=12, out_steps=12, output_dim=1, embed_dim=64, skip_dim=256,
                 lape_dim=8, geo_num_heads=4, sem_num_heads=2, t_num_heads=2, mlp_ratio=4, qkv_bias=True, drop=0.0,
                 attn_drop=0.0, drop_path=0.3, s_attn_size=3, enc_depth=6, type_ln="post", random_flip=True,
                 **{**_DERIVATION_DEFAULTS, "steps_per_day": info.steps_per_day})
    # optimizer / lr_schedule / warm-up / curriculum: read by stfast.training.step (make_optimizer, curriculum_horizon).
    training = dict(batch_size=16, max_epochs=300, early_stop=50, lr=1e-3, eps=1e-8, weight_decay=0.05,
                    milestones=[], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss, in_steps=12, out_steps=12,
                    optimizer="adamw", lr_schedule="cosine", warmup_epochs=5, eta_min=1e-4, warmup_lr_init=1e-6,
                    curriculum="horizon", curriculum_step_size=1562)
    return for_dataset(name, {"model": model, "training": training}, {"METR-LA": {}},
                       "BUAABIGSCity/PDFormer libcity/config/model/traffic_state_pred/PDFormer.json")


def build(model_args: dict, context=None, backend: str = "reference") -> PDFormer:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for pdformer, got {backend!r}")
    module_args = dict(model_args)
    derivation = {key: module_args.pop(key, default) for key, default in _DERIVATION_DEFAULTS.items()}
    num_nodes = module_args["num_nodes"]
    adjacency = check_adjacency(getattr(context, "adjacency", None), num_nodes, "pdformer")
    inputs = derive_inputs(adjacency, context, num_nodes, module_args.get("lape_dim", 8),
                           module_args.get("s_attn_size", 3), **derivation)
    sources = inputs.pop("sources")
    model = PDFormer(**module_args, **inputs)
    model.derived_inputs = sources
    return model
