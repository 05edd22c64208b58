"""DCRNN (Li et al., ICLR 2018) in the zoo: diffusion-convolutional GRU seq2seq on the road graph.

Written from ``shared/specs/baselines.md`` section 8 (sources there: XDZhelheim/Torch-MTS
models/DCRNN.py, runners/DCRNNRunner.py, configs/DCRNN.yaml; originally liyaguang/DCRNN and
chnsh/DCRNN_PyTorch). METR-LA: 2 DCGRU layers of 64 units in encoder and decoder, K = 2,
"dual_random_walk" supports, encoder input speed + time of day, scheduled sampling with tau = 2000;
372,353 parameters, all created at construction (the published module creates all but the
projection lazily).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import configs
from . import graph_ops
from .dcgru import DCGRUSeq2Seq
from .dataset_configs import for_dataset
from .spec import ModelSpec

SPEC = ModelSpec("dcrnn", x_channels=(0, 1), teacher_forcing=True, needs_graph=True)
BACKENDS = ("reference",)
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/DCRNN.yaml"
FILTER_TYPES = ("laplacian", "random_walk", "dual_random_walk")


def diffusion_supports(adjacency: np.ndarray, filter_type: str) -> np.ndarray:
    """``(S, N, N)`` float32 supports as the published DCGRU builds them from ``adjacency``.

    "dual_random_walk": ``[(D^-1 A)^T, (D'^-1 A^T)^T]``; "random_walk": the first only;
    "laplacian": the scaled Laplacian of ``max(A, A^T)``.
    """
    if filter_type == "dual_random_walk":
        return np.stack([m.T for m in graph_ops.double_transition(adjacency)])
    if filter_type == "random_walk":
        return graph_ops.transition(adjacency).T[None]
    if filter_type == "laplacian":
        return graph_ops.scaled_laplacian(adjacency)[None]
    raise ValueError(f"filter_type: expected one of {list(FILTER_TYPES)}, got {filter_type!r}")


class DCRNN(nn.Module):
    """``forward(x (B, seq_len, N, input_dim), labels=None, batches_seen=None) -> (B, horizon, N, output_dim)``.

    ``labels`` (scaled) and ``batches_seen`` are required while training with teacher forcing.
    """

    def __init__(self, adjacency, num_nodes, input_dim=2, output_dim=1, seq_len=12, horizon=12, rnn_units=64,
                 num_rnn_layers=2, max_diffusion_step=2, filter_type="dual_random_walk", tf_decay_steps=2000,
                 use_teacher_forcing=True):
        super().__init__()
        adjacency = graph_ops.check_adjacency(adjacency, num_nodes, "dcrnn")
        supports = torch.from_numpy(np.ascontiguousarray(diffusion_supports(adjacency, filter_type)))
        # Derived from the graph given at build time, so not part of the checkpoint.
        self.register_buffer("supports", supports, persistent=False)
        self.seq2seq = DCGRUSeq2Seq(num_nodes, input_dim, output_dim, seq_len, horizon, rnn_units, num_rnn_layers,
                                    len(supports), max_diffusion_step, tf_decay_steps, use_teacher_forcing)

    def forward(self, x, labels=None, batches_seen=None):
        return self.seq2seq(x, self.supports.to(x.dtype), labels, batches_seen)


# XDZhelheim/Torch-MTS configs/DCRNN.yaml: what each dataset's section changes from METRLA's (PEMS03/07/08
# set no clip_grad: no clipping).
_PUBLISHED = {
    "METR-LA": {},
    "PEMS-BAY": {},
    "PEMS03": {"training": {"lr": 3e-3, "milestones": [80], "lr_decay_rate": 0.3, "clip_grad": 0.0}},
    "PEMS04": {"training": {"lr": 3e-3, "milestones": [80], "lr_decay_rate": 0.3}},
    "PEMS07": {"training": {"lr": 3e-3, "milestones": [80], "lr_decay_rate": 0.3, "clip_grad": 0.0}},
    "PEMS08": {"training": {"lr": 3e-3, "milestones": [80], "lr_decay_rate": 0.3, "clip_grad": 0.0}},
}


def config(dataset: str) -> dict:
    """Torch-MTS configs/DCRNN.yaml (spec section 8), per dataset."""
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, input_dim=2, output_dim=1, seq_len=12, horizon=12, rnn_units=64,
                 num_rnn_layers=2, max_diffusion_step=2, filter_type="dual_random_walk", tf_decay_steps=2000,
                 use_teacher_forcing=True)
    # weight_decay 0 and lr_decay_rate 0.1 are the Torch-MTS training-script defaults (not in the yaml).
    training = dict(batch_size=64, max_epochs=200, early_stop=20, lr=0.01, eps=1e-3, weight_decay=0.0,
                    milestones=[20, 30, 40, 50], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> DCRNN:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for dcrnn, got {backend!r}")
    adjacency = None if context is None else context.adjacency
    return DCRNN(adjacency, **model_args)
