"""Two per-node LSTM baselines that ignore the graph (``shared/specs/baselines.md`` section 16).

- ``"lstm"`` (:data:`SPEC`, :func:`config`, :func:`build`): the Torch-MTS seq2seq LSTM
  (XDZhelheim/Torch-MTS ``models/baseline/LSTM.py``, ``configs/LSTM.yaml``), kept for the timing
  comparison. Each node's speed series goes through an encoder LSTM(1 -> 64, 3 layers); a decoder
  LSTM(1 -> 64, 3 layers) starts from the encoder state and a zero input and is fed its own previous
  prediction (no teacher forcing); Linear(64 -> 1) reads each step. No dropout. 167,489 parameters.
- ``"lstm_largest"`` (:data:`SPEC_LARGEST`, :func:`config_largest`, :func:`build_largest`): the
  LargeST / ST-LoRA LSTM (liuxu77/LargeST ``src/models/lstm.py``, ``experiments/lstm/main.py``;
  RWLinno/ST-LoRA ``src/models/lstm.py``, ``src/utils/args.py``). Per node and time step the input
  features go through a 1x1 convolution (``input_dim -> 32``), then LSTM(32 -> 64, 2 layers,
  batch-first, dropout between layers), and the last step's output through Linear(64 -> 512), ReLU,
  Linear(512 -> horizon). 97,932 parameters with ``input_dim`` 3, independent of N.

LargeST data store the day of week as ``dow / 7``; stfast stores the integer 0..6, so the LargeST
LSTM divides channel 2 by 7 before the convolution (``dow_as_fraction``) to see what it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from .._checks import check_tensor
from .dataset_configs import for_dataset
from .spec import ModelSpec

__all__ = ["BACKENDS", "SPEC", "SPEC_LARGEST", "LargeSTLSTM", "Seq2SeqLSTM", "build", "build_largest", "config",
           "config_largest"]

SPEC = ModelSpec("lstm", x_channels=(0,))
TORCH_MTS_SOURCE = "XDZhelheim/Torch-MTS configs/LSTM.yaml"
SPEC_LARGEST = ModelSpec("lstm_largest", x_channels=(0, 1, 2))
BACKENDS = ("reference",)


def _per_node_sequences(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, N, C)`` -> ``(B * N, T, C)``, node-major within each sample."""
    batch, steps, nodes, channels = x.shape
    return x.transpose(1, 2).reshape(batch * nodes, steps, channels)


class Seq2SeqLSTM(nn.Module):
    """Torch-MTS ``LSTM`` with ``seq2seq: True``."""

    def __init__(self, num_nodes: int, in_steps: int = 12, out_steps: int = 12, input_dim: int = 1,
                 output_dim: int = 1, lstm_hidden_dim: int = 64, num_layers: int = 3):
        super().__init__()
        self.num_nodes = num_nodes
        self.in_steps = in_steps
        self.out_steps = out_steps
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.encoder = nn.LSTM(input_dim, lstm_hidden_dim, num_layers, batch_first=True)
        self.decoder = nn.LSTM(output_dim, lstm_hidden_dim, num_layers, batch_first=True)
        self.proj = nn.Linear(lstm_hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.in_steps, self.num_nodes, self.input_dim), floating=True)
        _, state = self.encoder(_per_node_sequences(x))
        step = x.new_zeros(x.shape[0] * self.num_nodes, 1, self.output_dim)
        outputs = []
        for _ in range(self.out_steps):
            hidden, state = self.decoder(step, state)
            step = self.proj(hidden)
            outputs.append(step)
        out = torch.cat(outputs, dim=1).view(x.shape[0], self.num_nodes, self.out_steps, self.output_dim)
        return out.transpose(1, 2)


class LargeSTLSTM(nn.Module):
    """LargeST / ST-LoRA ``LSTM``: last hidden state of a per-node LSTM -> MLP -> all horizons at once."""

    def __init__(self, num_nodes: int, in_steps: int = 12, out_steps: int = 12, input_dim: int = 3,
                 output_dim: int = 1, init_dim: int = 32, hid_dim: int = 64, end_dim: int = 512, layer: int = 2,
                 dropout: float = 0.3, dow_as_fraction: bool = True):
        super().__init__()
        if output_dim != 1:
            raise ValueError(f"output_dim: expected 1 (the published head predicts one value per step), "
                             f"got {output_dim}")
        self.num_nodes = num_nodes
        self.in_steps = in_steps
        self.out_steps = out_steps
        self.input_dim = input_dim
        self.dow_as_fraction = dow_as_fraction
        # A 1x1 Conv2d over (features, 1, time) in the published code: the same map and init as this Linear.
        self.start_conv = nn.Linear(input_dim, init_dim)
        self.lstm = nn.LSTM(init_dim, hid_dim, layer, batch_first=True, dropout=dropout)
        self.end_linear1 = nn.Linear(hid_dim, end_dim)
        self.end_linear2 = nn.Linear(end_dim, out_steps)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.dow_as_fraction and self.input_dim >= 3:
            x = torch.cat([x[..., :2], x[..., 2:3] / 7.0, x[..., 3:]], dim=-1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ("B", self.in_steps, self.num_nodes, self.input_dim), floating=True)
        hidden, _ = self.lstm(self.start_conv(_per_node_sequences(self._features(x))))
        out = self.end_linear2(F.relu(self.end_linear1(hidden[:, -1])))  # (B * N, out_steps)
        return out.view(x.shape[0], self.num_nodes, self.out_steps, 1).transpose(1, 2)


# XDZhelheim/Torch-MTS configs/LSTM.yaml: what each dataset's section changes from METRLA's.
_PUBLISHED = {"METR-LA": {}, "PEMS-BAY": {}, "PEMS03": {}, "PEMS04": {}, "PEMS07": {},
              "PEMS08": {"training": {"max_epochs": 300}}}


def config(dataset: str) -> dict:
    """Torch-MTS ``configs/LSTM.yaml`` per dataset; early_stop and eps are Torch-MTS's train.py defaults."""
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, in_steps=12, out_steps=12, input_dim=1, output_dim=1,
                 lstm_hidden_dim=64, num_layers=3)
    training = dict(batch_size=64, max_epochs=200, early_stop=10, lr=0.01, eps=1e-8, weight_decay=0.0,
                    milestones=[10, 20], lr_decay_rate=0.1, clip_grad=0.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, _PUBLISHED, TORCH_MTS_SOURCE)


def build(model_args: dict, context=None, backend: str = "reference") -> Seq2SeqLSTM:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for lstm, got {backend!r}")
    return Seq2SeqLSTM(**model_args)


def config_largest(dataset: str) -> dict:
    """ST-LoRA's defaults for its LSTM backbone (``src/utils/args.py``): no LR schedule, dropout 0.3.

    LargeST's own script uses dropout 0.1 and weight decay 1e-4 with 100 epochs and patience 30; the
    ST-LoRA defaults (the ST-LoRA paper's baseline) are used on every dataset, so none is marked
    published.
    """
    name = configs.canonical_dataset(dataset)
    info = configs.DATASETS[name]
    model = dict(num_nodes=info.num_nodes, in_steps=12, out_steps=12, input_dim=3, output_dim=1, init_dim=32,
                 hid_dim=64, end_dim=512, layer=2, dropout=0.3, dow_as_fraction=True)
    training = dict(batch_size=64, max_epochs=200, early_stop=10, lr=1e-3, eps=1e-8, weight_decay=5e-4,
                    milestones=[], lr_decay_rate=0.1, clip_grad=5.0, loss=info.loss, in_steps=12, out_steps=12)
    return for_dataset(name, {"model": model, "training": training}, {}, "RWLinno/ST-LoRA src/utils/args.py",
                       reference_dataset="default")


def build_largest(model_args: dict, context=None, backend: str = "reference") -> LargeSTLSTM:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for lstm_largest, got {backend!r}")
    return LargeSTLSTM(**model_args)
