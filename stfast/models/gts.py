"""GTS (Shang et al., ICLR 2021) in the zoo: a graph learnt from the training series + a DCGRU seq2seq.

Written from ``shared/specs/baselines.md`` section 10 (sources there: XDZhelheim/Torch-MTS
models/GTS.py, runners/GTSRunner.py, lib/losses.py (GTSLoss), configs/GTS.yaml; originally
chaoshangcs/GTS, via BasicTS). METR-LA: 38,478,291 parameters, 99.7% of them in one Linear.

Graph learner (run at every forward, as published): the first ``train_steps`` steps of the raw
training series, standardised with one global mean/std, one signal per node ->
Conv1d(1->8, k=10) -> ReLU -> BatchNorm -> Conv1d(8->16, k=10) -> ReLU -> BatchNorm -> flatten
(``16 * (L - 18)``) -> Linear(->100) -> ReLU -> BatchNorm: a 100-d feature per node. Edge (i, j)
gets logits ``Linear(100->2)(ReLU(Linear(200->100)([h_j, h_i])))``; the adjacency is the first
class of a hard (straight-through) Gumbel-softmax sample at temperature ``temp``, diagonal zeroed.
The published code samples it in evaluation mode too, so GTS's predictions are stochastic; kept.
Forecaster: DCGRU seq2seq (1 layer, 64 units, K = 3) with the single support ``(D^-1 (A + I))^T``.
Auxiliary loss (training only): BCE between the edge probabilities ``softmax(logits)[..., 0]`` and
a kNN prior graph (k nearest nodes by cosine distance of the standardised series).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .dcgru import DCGRUSeq2Seq
from .dataset_configs import for_dataset
from .spec import ModelSpec

SPEC = ModelSpec("gts", x_channels=(0, 1), teacher_forcing=True, needs_train_series=True)
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/GTS.yaml"

NODE_FEATURE_DIM = 100
CONV_KERNEL = 10


def standardize(series: np.ndarray) -> np.ndarray:
    """``(series - mean) / std`` with one global mean and (population) std.

    A constant series has std 0; it is then only centred (the published code would give NaNs).
    """
    series = np.asarray(series, dtype=np.float64)
    std = series.std()
    return (series - series.mean()) / (std if std > 0 else 1.0)


def knn_prior_graph(node_series: np.ndarray, k: int) -> np.ndarray:
    """``(N, N)`` 0/1 float32 graph: row ``i`` has ones at the ``k`` nodes nearest to ``i`` by cosine distance.

    Replaces scikit-learn's ``kneighbors_graph(X, k, metric="cosine")`` of the published code. Node
    ``i`` itself is excluded (scikit-learn's default ``include_self=False`` there), so the diagonal
    is zero and every row has exactly ``k`` ones; ties go to the lower node index. A node with an
    all-zero series has cosine similarity 0 (distance 1) to every node.
    """
    x = np.asarray(node_series, dtype=np.float64)
    num_nodes = x.shape[0]
    if not 0 < k < num_nodes:
        raise ValueError(f"k: expected 0 < k < num_nodes={num_nodes} neighbours for the kNN prior graph, got {k}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    distance = 1.0 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
    graph = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    np.put_along_axis(graph, nearest, 1.0, axis=1)
    return graph


def random_walk_support(adjacency: torch.Tensor) -> torch.Tensor:
    """``(D^-1 (A + I))^T`` as GTS's DCGRU computes it from the learnt graph, shape ``(1, N, N)``."""
    a = adjacency + torch.eye(adjacency.shape[0], dtype=adjacency.dtype, device=adjacency.device)
    return (a / a.sum(dim=1, keepdim=True)).t()[None]


class GraphLearner(nn.Module):
    """Node features from the training series, then edge logits ``(N, N, 2)`` for every ordered pair."""

    def __init__(self, series_length: int):
        super().__init__()
        feature_length = series_length - 2 * (CONV_KERNEL - 1)
        if feature_length < 1:
            raise ValueError(f"train_series: expected at least {2 * CONV_KERNEL - 1} steps for the graph learner's "
                             f"two convolutions (kernel {CONV_KERNEL}), got {series_length}")
        # The published module also registers a Dropout(0.2) that it never applies (no parameters); left out.
        self.conv1 = nn.Conv1d(1, 8, CONV_KERNEL)
        self.conv2 = nn.Conv1d(8, 16, CONV_KERNEL)
        self.fc = nn.Linear(16 * feature_length, NODE_FEATURE_DIM)  # 383,552 inputs on METR-LA
        self.bn1 = nn.BatchNorm1d(8)
        self.bn2 = nn.BatchNorm1d(16)
        self.bn3 = nn.BatchNorm1d(NODE_FEATURE_DIM)
        self.fc_out = nn.Linear(2 * NODE_FEATURE_DIM, NODE_FEATURE_DIM)
        self.fc_cat = nn.Linear(NODE_FEATURE_DIM, 2)

    def node_features(self, node_series: torch.Tensor) -> torch.Tensor:
        h = self.bn1(F.relu(self.conv1(node_series[:, None, :])))
        h = self.bn2(F.relu(self.conv2(h)))
        return self.bn3(F.relu(self.fc(h.reshape(h.shape[0], -1))))

    def forward(self, node_series: torch.Tensor) -> torch.Tensor:
        h = self.node_features(node_series)
        # fc_out on [h_j, h_i] for entry (i, j), split into its two halves so that the (N*N, 200)
        # concatenation is never built: the first half of the input is node j's ("sender"), the
        # second node i's ("receiver"), as the published one-hot pair matrices order them.
        w_sender, w_receiver = self.fc_out.weight.split(NODE_FEATURE_DIM, dim=1)
        sender = h @ w_sender.t()
        receiver = h @ w_receiver.t() + self.fc_out.bias
        pair = F.relu(receiver[:, None, :] + sender[None, :, :])
        return self.fc_cat(pair)


class GTS(nn.Module):
    """``forward(x (B, seq_len, N, input_dim), labels=None, batches_seen=None) -> (B, horizon, N, output_dim)``.

    ``train_series`` is ``(T_train, N)`` raw channel-0 values of the training split; its first
    ``train_steps`` steps (all of them when None) feed the graph learner.
    """

    def __init__(self, train_series, num_nodes, input_dim=2, output_dim=1, seq_len=12, horizon=12, rnn_units=64,
                 num_rnn_layers=1, max_diffusion_step=3, tf_decay_steps=2000, use_teacher_forcing=True, temp=0.5,
                 k=10, train_steps=None):
        super().__init__()
        series = _check_train_series(train_series, num_nodes, train_steps)
        node_series = standardize(series).T  # (N, L)
        self.temp = temp
        self.register_buffer("node_series", torch.tensor(node_series, dtype=torch.float32), persistent=False)
        self.register_buffer("prior_adj", torch.from_numpy(knn_prior_graph(node_series, k)), persistent=False)
        self.graph_learner = GraphLearner(node_series.shape[1])
        self.seq2seq = DCGRUSeq2Seq(num_nodes, input_dim, output_dim, seq_len, horizon, rnn_units, num_rnn_layers,
                                    1, max_diffusion_step, tf_decay_steps, use_teacher_forcing)
        self._auxiliary_loss = None

    def sample_graph(self, logits: torch.Tensor) -> torch.Tensor:
        adjacency = F.gumbel_softmax(logits, tau=self.temp, hard=True)[..., 0]
        return adjacency * (1 - torch.eye(adjacency.shape[0], dtype=adjacency.dtype, device=adjacency.device))

    def forward(self, x, labels=None, batches_seen=None):
        self.seq2seq.check_inputs(x, labels, batches_seen)
        logits = self.graph_learner(self.node_series.to(x.dtype))
        supports = random_walk_support(self.sample_graph(logits))
        output = self.seq2seq.decode(self.seq2seq.encode(x, supports), supports, labels, batches_seen)
        self._auxiliary_loss = self.graph_loss(logits) if self.training else None
        return output

    def graph_loss(self, logits: torch.Tensor) -> torch.Tensor:
        edge_probability = torch.softmax(logits, dim=-1)[..., 0]
        return F.binary_cross_entropy(edge_probability.reshape(-1), self.prior_adj.to(logits.dtype).reshape(-1))

    def auxiliary_loss(self):
        """BCE of the last training forward's edge probabilities against the kNN prior; None in eval mode."""
        return self._auxiliary_loss if self.training else None


def _check_train_series(train_series, num_nodes: int, train_steps) -> np.ndarray:
    if train_series is None:
        raise ValueError(f"train_series: gts needs the training split's raw channel-0 series of shape (T_train, "
                         f"{num_nodes}), got None; pass BuildContext(train_series=...)")
    series = np.asarray(train_series)
    if series.ndim != 2 or series.shape[1] != num_nodes:
        raise ValueError(f"train_series: expected shape (T_train, {num_nodes}), got {series.shape}")
    if train_steps is not None:
        if series.shape[0] < train_steps:
            raise ValueError(f"train_series: expected at least train_steps={train_steps} steps, got {series.shape[0]}")
        series = series[:train_steps]
    if not np.isfinite(series).all():
        raise ValueError(f"train_series: expected finite values, got {int((~np.isfinite(series)).sum())} non-finite")
    return series


# XDZhelheim/Torch-MTS configs/GTS.yaml: what each dataset's section changes from METRLA's. Its dim_fc,
# 16 * (train_steps - 18), matches train_steps = round(num_steps * the dataset's train fraction) on all six.
_PUBLISHED = {
    "METR-LA": {},
    "PEMS-BAY": {"model": {"k": 30}},
    **{name: {"model": {"k": 30}, "training": {"lr": 1e-3, "milestones": [20, 30]}}
       for name in ("PEMS03", "PEMS04", "PEMS07", "PEMS08")},
}


def config(dataset: str) -> dict:
    """Torch-MTS configs/GTS.yaml (spec section 10), per dataset.

    ``train_steps`` is the published cut of the raw series, round(steps * train fraction): 23,990 on
    METR-LA, so the big Linear has 16 * (23,990 - 18) = 383,552 inputs (the yaml's ``dim_fc``). The
    yaml's ``filter_type`` and ``l1_decay`` are not used by the published GTS and are left out.
    """
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, input_dim=2, output_dim=1, seq_len=12, horizon=12, rnn_units=64,
                 num_rnn_layers=1, max_diffusion_step=3, tf_decay_steps=2000, use_teacher_forcing=True, temp=0.5,
                 k=10, train_steps=round(info.num_steps * info.split[0]))
    # weight_decay 0 and lr_decay_rate 0.1 are the Torch-MTS training-script defaults (not in the yaml).
    training = dict(batch_size=64, max_epochs=200, early_stop=10, lr=0.005, eps=1e-3, weight_decay=0.0,
                    milestones=[20, 30, 40], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> GTS:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for gts, got {backend!r}")
    train_series = None if context is None else context.train_series
    return GTS(train_series, **model_args)
