"""AGCRN (Bai et al., NeurIPS 2020) in the zoo: node-adaptive graph-convolutional GRU encoder + conv head.

Written from ``shared/specs/baselines.md`` section 9 (sources there: XDZhelheim/Torch-MTS
models/AGCRN.py, configs/AGCRN.yaml; originally LeiBAI/AGCRN). METR-LA: input speed + time of
day, node embeddings ``E (N, 10)`` (standard normal), support ``A = softmax(relu(E E^T))``
(row-wise) with Chebyshev set ``[I, A]``, 2 GRU layers of 64 units with node-adaptive weights
``W_n = E[n] . P`` (pools Xavier-normal), head ``Conv2d(1 -> 12, kernel (1, 64))`` on the top
layer's last state; 751,650 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import PUBLISHED, for_dataset, mark
from .spec import ModelSpec

SPEC = ModelSpec("agcrn", x_channels=(0, 1))
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/AGCRN.yaml"
# "reference": the published formulation (per-node weights built in every convolution); any other
# name runs the convolutions on stfast.ops.meta_gconv with that op backend.
BACKENDS = ("auto", "reference", "torch", "triton", "cpu", "cuda")
DEFAULT_BACKEND = "auto"

_ACTIVATIONS = {None: lambda y: y, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def adaptive_support(embeddings: torch.Tensor) -> torch.Tensor:
    """Row-softmax of ``relu(E E^T)``: ``(N, D)`` -> ``(N, N)``."""
    return torch.softmax(torch.relu(embeddings @ embeddings.t()), dim=1)


def node_adaptive_gconv(x, supports, embeddings, weights_pool, bias_pool):
    """Spatial-axis meta-parameter graph convolution (AGCRN's NAPL-GCN).

    ``x (B, N, C)``; ``supports (N, N)`` the adaptive support ``A`` whose Chebyshev set
    ``[I, A, 2 A T_1 - T_0, ...]`` is applied; ``embeddings E (N, D)``; ``weights_pool P (D, K, C, O)``
    (``K = cheb_k``, read from its shape); ``bias_pool Pb (D, O)``. With ``W_n = E[n] . P`` and
    ``b_n = E[n] . Pb``: ``y[b, n] = sum_k (T_k x)[b, n] @ W_n[k] + b_n``, shape ``(B, N, O)``.

    Same computation as ``stfast.ops.meta_gconv(x, supports, embeddings,
    weights_pool.reshape(D, K * C, O), bias_pool, K, axis="S")`` (its features are ``k``-major too).
    """
    dim, cheb_k, channels, outputs = weights_pool.shape
    terms = [x, supports @ x][:cheb_k]
    for _ in range(2, cheb_k):
        terms.append(2 * (supports @ terms[-1]) - terms[-2])
    x_g = torch.cat(terms, dim=-1)  # (B, N, K*C), k-major
    weights = (embeddings @ weights_pool.reshape(dim, -1)).reshape(-1, cheb_k * channels, outputs)
    y = torch.bmm(x_g.transpose(0, 1), weights).transpose(0, 1)  # one (B, K*C) @ (K*C, O) per node
    return y + embeddings @ bias_pool


class NodeAdaptiveGraphConv(nn.Module):
    """Holds the pools ``P (D, K, C, O)`` and ``Pb (D, O)`` (both Xavier-normal) of one convolution.

    ``fused`` selects :func:`stfast.ops.meta_gconv` (activation fused) over the published formulation.
    """

    fused = False

    def __init__(self, input_dim: int, output_dim: int, cheb_k: int, embed_dim: int):
        super().__init__()
        self.weights_pool = nn.Parameter(torch.empty(embed_dim, cheb_k, input_dim, output_dim))
        self.bias_pool = nn.Parameter(torch.empty(embed_dim, output_dim))
        nn.init.xavier_normal_(self.weights_pool)
        nn.init.xavier_normal_(self.bias_pool)

    def forward(self, x, support, embeddings, activation=None):
        if not self.fused:
            return _ACTIVATIONS[activation](node_adaptive_gconv(x, support, embeddings, self.weights_pool,
                                                                self.bias_pool))
        from .. import ops

        dim, cheb_k, channels, outputs = self.weights_pool.shape
        return ops.meta_gconv(x.contiguous(), support, embeddings, self.weights_pool.reshape(dim, -1, outputs),
                              self.bias_pool, cheb_k, activation, axis="S")


class AGCRNCell(nn.Module):
    """``z, r = sigma(gate([x, h]))``, ``h' = r h + (1 - r) tanh(update([x, z h]))``."""

    def __init__(self, input_dim: int, hidden_dim: int, cheb_k: int, embed_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate = NodeAdaptiveGraphConv(input_dim + hidden_dim, 2 * hidden_dim, cheb_k, embed_dim)
        self.update = NodeAdaptiveGraphConv(input_dim + hidden_dim, hidden_dim, cheb_k, embed_dim)

    def forward(self, x, state, support, embeddings):
        z_r = self.gate(torch.cat([x, state], dim=-1), support, embeddings, activation="sigmoid")
        z, r = torch.split(z_r, self.hidden_dim, dim=-1)
        candidate = self.update(torch.cat([x, z * state], dim=-1), support, embeddings, activation="tanh")
        return r * state + (1 - r) * candidate


class AGCRN(nn.Module):
    """``forward(x (B, T_in, N, input_dim)) -> (B, out_steps, N, output_dim)``."""

    def __init__(self, num_nodes, out_steps=12, input_dim=2, output_dim=1, embed_dim=10, rnn_units=64, num_layers=2,
                 cheb_k=2):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.out_steps = out_steps
        self.rnn_units = rnn_units
        self.node_embeddings = nn.Parameter(torch.randn(num_nodes, embed_dim))
        dims = [input_dim] + [rnn_units] * (num_layers - 1)
        self.cells = nn.ModuleList(AGCRNCell(d, rnn_units, cheb_k, embed_dim) for d in dims)
        self.end_conv = nn.Conv2d(1, out_steps * output_dim, kernel_size=(1, rnn_units))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The top layer's last hidden state ``(B, N, rnn_units)`` from zero initial states."""
        # The published module rebuilds A inside every convolution; it is the same matrix all forward.
        support = adaptive_support(self.node_embeddings)
        layer_input = x
        for cell in self.cells:
            state = x.new_zeros(x.shape[0], self.num_nodes, self.rnn_units)
            outputs = []
            for step_input in layer_input.unbind(1):  # backward: one stack, not a zero-filled copy per step
                state = cell(step_input, state, support, self.node_embeddings)
                outputs.append(state)
            layer_input = torch.stack(outputs, dim=1)
        return layer_input[:, -1]

    def forward(self, x):
        check_tensor("x", x, ("B", "T_in", self.num_nodes, self.input_dim), floating=True)
        h = self.encode(x)
        out = self.end_conv(h[:, None])  # (B, out_steps * output_dim, N, 1)
        out = out.reshape(x.shape[0], self.out_steps, self.output_dim, self.num_nodes)
        return out.permute(0, 1, 3, 2)


# XDZhelheim/Torch-MTS configs/AGCRN.yaml: what each dataset's section changes from METRLA's. On PEMS0x
# the yaml turns time of day off (input_dim 1, the value channel only); PEMS03/07/08 set no milestones.
_PUBLISHED = {
    "METR-LA": {},
    "PEMS-BAY": {"training": {"milestones": [50]}},
    "PEMS03": {"model": {"input_dim": 1}, "training": {"lr": 3e-3, "milestones": []}, "x_channels": (0,)},
    "PEMS04": {"model": {"input_dim": 1}, "training": {"lr": 3e-3, "milestones": [50], "lr_decay_rate": 0.3},
               "x_channels": (0,)},
    "PEMS07": {"model": {"input_dim": 1}, "training": {"milestones": []}, "x_channels": (0,)},
    "PEMS08": {"model": {"input_dim": 1, "embed_dim": 2}, "training": {"lr": 3e-3, "milestones": []},
               "x_channels": (0,)},
}


def config(dataset: str) -> dict:
    """Torch-MTS configs/AGCRN.yaml (spec section 9) on the six traffic datasets; LargeST's runs on its four."""
    name = configs.canonical_dataset(dataset)
    if name in configs.LARGEST_DATASETS:
        return mark(_largest_config(name), PUBLISHED, "liuxu77/LargeST experiments/agcrn")
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, out_steps=12, input_dim=2, output_dim=1, embed_dim=10, rnn_units=64,
                 num_layers=2, cheb_k=2)
    # The yaml sets no eps nor weight decay: Adam's eps 1e-8, weight_decay 0 and lr_decay_rate 0.1 are
    # the Torch-MTS training-script defaults.
    training = dict(batch_size=64, max_epochs=200, early_stop=20, lr=1e-3, eps=1e-8, weight_decay=0.0,
                    milestones=[25], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


# LargeST (liuxu77/LargeST experiments/agcrn/run.sh): batch 64, 45 on GLA; the script lists no CA run,
# so CA's 64 is our choice.
_LARGEST_BATCH = {"SD": 64, "GBA": 64, "GLA": 45, "CA": 64}


def _largest_config(dataset: str) -> dict:
    """LargeST's AGCRN run (``experiments/agcrn/main.py``): the METR-LA sizes, 100 epochs, patience 30,
    no clipping, no LR schedule. LargeST feeds 3 input channels; the zoo's AGCRN keeps its 2."""
    info = configs.DATASETS[dataset]
    model = dict(num_nodes=info.num_nodes, out_steps=12, input_dim=2, output_dim=1, embed_dim=10, rnn_units=64,
                 num_layers=2, cheb_k=2)
    training = dict(batch_size=_LARGEST_BATCH[dataset], max_epochs=100, early_stop=30, lr=1e-3, eps=1e-8,
                    weight_decay=0.0, milestones=[], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss,
                    in_steps=12, out_steps=12)
    return {"model": model, "training": training}


def build(model_args: dict, context=None, backend: str = DEFAULT_BACKEND) -> AGCRN:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for agcrn, got {backend!r}")
    model = AGCRN(**model_args)
    for module in model.modules():
        if isinstance(module, NodeAdaptiveGraphConv):
            module.fused = backend != "reference"
    return model
