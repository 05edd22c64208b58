"""ST-LoRA on stfast's ops: node-adaptive low-rank layers (NALL), node-specific predictors (NSP)
and the :class:`STLoRA` wrapper around any forecasting backbone (``shared/specs/stlora.md``).

We follow the paper, not the public code: every node ``n`` owns its own ``A_n (d_in x r)`` and
``B_n (r x d_out)`` (the public code shares one pair across nodes and uses BatchNorm). Every NALL
runs on :func:`stfast.ops.node_lora`, which never builds a per-node full weight.

Choices where the paper is ambiguous (ours, kept here so they stay documented):

- NALL: ``A`` is uniform in ``+-1/sqrt(d_in)`` per node (Kaiming-uniform with ``a = sqrt(5)``
  and fan-in ``d_in``, as LoRA initialises its down-projection), ``B`` is zero, so a fresh NALL
  equals its base layer. ``scale = alpha / r`` with ``alpha`` defaulting to ``r`` (scale 1). The
  activation is LeakyReLU with slope 0.01; dropout acts on the low-rank path only. Because of
  the activation the adapter cannot be merged into the base weight.
- NSP: the temporal feature extraction is a convolution whose kernel covers the whole window,
  with weights shared by all nodes, i.e. one ``nn.Linear(T*C, hidden)`` applied to each node's
  window; the ``L`` residual layers are ``H + dropout(rmsnorm(act(NALL(H))))``; the projection to
  the horizon is a NALL ``hidden -> T_out*C_out``. ``hidden`` defaults to 32.
- STLoRA: each NSP block reads ``[history ; Y_{k-1}]`` concatenated on the time axis, where the
  history is ``x``'s value channel(s) (``history_channels``, default the first ``output_dim``
  channels); the fusion layer is one ``nn.Linear(2*T_out*C_out, T_out*C_out)`` shared by all nodes
  over ``[Y0 ; mean_k D_k]`` (time-axis concatenation, flattened per node), then a sigmoid; the gate
  ``G (N, T_out)`` starts at zero, so a fresh wrapper returns exactly the backbone's output; the
  regulariser is ``gate_l2 * ||G||^2`` with ``gate_l2 = 1e-4`` by default.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .. import ops
from ..ops import _torch_lora

__all__ = ["NALL", "NSP", "STLoRA", "RMSNorm", "wrap_forecaster", "parameter_overhead"]


def _activation(name):
    if name is not None and name not in ("leaky_relu", "relu", "tanh", "sigmoid"):
        raise ValueError(f"activation: expected one of None, 'leaky_relu', 'relu', 'tanh', 'sigmoid', got {name!r}")
    return lambda h: _torch_lora.activate(h, name)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")
    return float(value)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (defined here so that it does not
    depend on the PyTorch version)."""

    def __init__(self, features: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features, device=device, dtype=dtype))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class NALL(nn.Module):
    """Node-adaptive low-rank layer: ``x W^T + b + (alpha / r) act(dropout(x) A[n]) B[n]``.

    ``x (..., N, in_features)`` -> ``(..., N, out_features)``. ``base`` is an ``nn.Linear``;
    ``lora_a (N, in_features, rank)``, ``lora_b (N, rank, out_features)``. ``freeze_base=True``
    stops gradients to the base layer (the paper keeps ``W`` fixed and adapts ``A, B``).
    """

    def __init__(self, in_features: int, out_features: int, num_nodes: int, rank: int = 16, alpha=None,
                 activation="leaky_relu", dropout: float = 0.0, bias: bool = True, freeze_base: bool = False,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_nodes", num_nodes), ("rank", rank)):
            _positive_int(name, value)
        _activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_nodes, self.rank = in_features, out_features, num_nodes, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.activation = activation
        self.dropout = _probability("dropout", dropout)
        self.base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.lora_a = nn.Parameter(torch.empty(num_nodes, in_features, rank, **factory))
        self.lora_b = nn.Parameter(torch.zeros(num_nodes, rank, out_features, **factory))
        self.reset_lora_parameters()
        if freeze_base:
            self.base.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) with fan-in d_in, per node
        nn.init.uniform_(self.lora_a, -bound, bound)
        nn.init.zeros_(self.lora_b)

    def forward(self, x, seed=None, offset=0):
        return ops.node_lora(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.scale,
                             self.activation, self.dropout, self.training, seed, offset)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_nodes={self.num_nodes}, "
                f"rank={self.rank}, alpha={self.alpha:g}, activation={self.activation}, dropout={self.dropout:g}")


class NSP(nn.Module):
    """Node-specific predictor: ``(B, in_steps, N, in_dim)`` -> ``(B, out_steps, N, out_dim)``.

    Temporal feature extraction over the whole window (shared across nodes), ``num_layers``
    residual NALL layers ``H + dropout(rmsnorm(act(NALL(H))))``, and a NALL projection to the
    horizon.
    """

    def __init__(self, num_nodes: int, in_steps: int, in_dim: int, out_steps: int, out_dim: int, hidden: int = 32,
                 num_layers: int = 4, rank: int = 16, alpha=None, activation="leaky_relu", dropout: float = 0.0,
                 freeze_base: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("num_nodes", num_nodes), ("in_steps", in_steps), ("in_dim", in_dim),
                            ("out_steps", out_steps), ("out_dim", out_dim), ("hidden", hidden)):
            _positive_int(name, value)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers: expected an int >= 0, got {num_layers!r}")
        self.num_nodes, self.in_steps, self.in_dim, self.out_steps, self.out_dim = (
            num_nodes, in_steps, in_dim, out_steps, out_dim)
        factory = {"device": device, "dtype": dtype}
        nall = dict(num_nodes=num_nodes, rank=rank, alpha=alpha, activation=activation, dropout=dropout,
                    freeze_base=freeze_base, **factory)
        self.act = _activation(activation)
        self.temporal = nn.Linear(in_steps * in_dim, hidden, **factory)
        self.layers = nn.ModuleList(NALL(hidden, hidden, **nall) for _ in range(num_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden, **factory) for _ in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.head = NALL(hidden, out_steps * out_dim, **nall)

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_steps, self.num_nodes, self.in_dim):
            raise ValueError(f"x: expected shape (B, {self.in_steps}, {self.num_nodes}, {self.in_dim}), "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        h = self.temporal(x.permute(0, 2, 1, 3).reshape(batch, self.num_nodes, -1))  # (B, N, hidden)
        for layer, norm in zip(self.layers, self.norms):
            h = h + self.drop(norm(self.act(layer(h))))
        out = self.head(h)  # (B, N, T_out * C_out)
        return out.reshape(batch, self.num_nodes, self.out_steps, self.out_dim).permute(0, 2, 1, 3)


class STLoRA(nn.Module):
    """Wrap ``backbone`` (``x (B, in_steps, N, input_dim) -> (B, out_steps, N, output_dim)``) with
    node-specific predictors whose gated, blended correction is added to its forecast.

    ``forward(x, *args, **kwargs)`` passes every argument on to the backbone (so HimNet's
    ``y_cov, labels=, batches_seen=`` go through unchanged); ``x[..., history_channels]`` is the
    history fed to the predictors. A fresh wrapper returns exactly the backbone's output (the gate
    starts at zero). See the module docstring for the choices made where the paper is ambiguous.
    """

    def __init__(self, backbone: nn.Module, num_nodes: int, in_steps: int = 12, out_steps: int = 12,
                 input_dim: int = 1, output_dim: int = 1, num_blocks: int = 1, num_layers: int = 4, rank: int = 16,
                 hidden: int = 32, alpha=None, dropout: float = 0.0, gate_l2: float = 1e-4,
                 activation="leaky_relu", history_channels=None, freeze_base: bool = False):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone: expected an nn.Module, got {type(backbone).__name__}")
        for name, value in (("num_nodes", num_nodes), ("in_steps", in_steps), ("out_steps", out_steps),
                            ("input_dim", input_dim), ("output_dim", output_dim), ("num_blocks", num_blocks)):
            _positive_int(name, value)
        if isinstance(gate_l2, bool) or not isinstance(gate_l2, (int, float)) or gate_l2 < 0:
            raise ValueError(f"gate_l2: expected a float >= 0, got {gate_l2!r}")
        if history_channels is None:
            if input_dim < output_dim:
                raise ValueError(f"history_channels: input_dim {input_dim} < output_dim {output_dim}, so name the "
                                 f"{output_dim} input channel(s) holding the history values")
            history_channels = tuple(range(output_dim))
        history_channels = tuple(int(c) for c in history_channels)
        if len(history_channels) != output_dim or not all(0 <= c < input_dim for c in history_channels):
            raise ValueError(f"history_channels: expected {output_dim} channel index(es) in [0, {input_dim}), "
                             f"got {history_channels}")
        self.options = dict(num_nodes=num_nodes, in_steps=in_steps, out_steps=out_steps, input_dim=input_dim,
                            output_dim=output_dim, num_blocks=num_blocks, num_layers=num_layers, rank=rank,
                            hidden=hidden, alpha=alpha, dropout=dropout, gate_l2=float(gate_l2),
                            activation=activation, history_channels=history_channels, freeze_base=freeze_base)
        self.num_nodes, self.in_steps, self.out_steps, self.output_dim = num_nodes, in_steps, out_steps, output_dim
        self.history_channels = history_channels
        self.gate_l2 = float(gate_l2)
        self.backbone = backbone
        reference = next(iter(backbone.parameters()), None)
        factory = {"device": None if reference is None else reference.device,
                   "dtype": None if reference is None else reference.dtype}
        self.blocks = nn.ModuleList(
            NSP(num_nodes, in_steps + out_steps, output_dim, out_steps, output_dim, hidden=hidden,
                num_layers=num_layers, rank=rank, alpha=alpha, activation=activation, dropout=dropout,
                freeze_base=freeze_base, **factory)
            for _ in range(num_blocks)
        )
        width = out_steps * output_dim
        self.fusion = nn.Linear(2 * width, width, **factory)
        self.gate = nn.Parameter(torch.zeros(num_nodes, out_steps, **factory))

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x, *args, **kwargs):
        y0 = self.backbone(x, *args, **kwargs)
        batch = x.shape[0]
        expected = (batch, self.out_steps, self.num_nodes, self.output_dim)
        if tuple(y0.shape) != expected:
            raise ValueError(f"backbone output: expected shape (B, T_out, N, C_out) = {expected}, got {tuple(y0.shape)}")
        history = x[..., list(self.history_channels)]
        y, deltas = y0, []
        for block in self.blocks:
            delta = block(torch.cat([history, y], dim=1))
            deltas.append(delta)
            y = y + delta
        mean_delta = deltas[0] if len(deltas) == 1 else torch.stack(deltas).mean(0)
        both = torch.cat([y0, mean_delta], dim=1).permute(0, 2, 1, 3).reshape(batch, self.num_nodes, -1)
        weights = torch.sigmoid(self.fusion(both)).reshape(batch, self.num_nodes, self.out_steps, self.output_dim)
        gate = self.gate.t()[None, :, :, None]  # (1, T_out, N, 1)
        return y0 + gate * weights.permute(0, 2, 1, 3) * mean_delta

    # -- training helpers --------------------------------------------------------------------
    def regularization(self) -> torch.Tensor:
        """The gate penalty ``gate_l2 * ||G||^2``."""
        return self.gate_l2 * self.gate.pow(2).sum()

    def auxiliary_loss(self):
        """The training step's extra loss: the gate penalty plus the backbone's own auxiliary loss
        (GTS, MegaCRN), if it has one (``stfast.training.step.train_step`` adds it)."""
        loss = self.regularization()
        extra = getattr(self.backbone, "auxiliary_loss", None)
        extra = extra() if callable(extra) else None
        return loss if extra is None else loss + extra

    def freeze_backbone(self, freeze: bool = True) -> "STLoRA":
        """Stop (or restore) gradients to the backbone, for fine-tuning only the ST-LoRA parameters."""
        self.backbone.requires_grad_(not freeze)
        return self

    # -- adapter parameters ------------------------------------------------------------------
    def adapter_named_parameters(self):
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def adapter_parameters(self):
        return [p for _, p in self.adapter_named_parameters()]

    def added_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters the wrapper adds to the backbone."""
        return sum(p.numel() for p in self.adapter_parameters() if p.requires_grad or not trainable_only)

    def backbone_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.backbone.parameters() if p.requires_grad or not trainable_only)

    def adapter_state_dict(self) -> dict:
        """The ST-LoRA parameters and buffers only (no ``backbone.`` entries), detached copies."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_adapter_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load what :meth:`adapter_state_dict` saved, leaving the backbone untouched."""
        backbone_keys = sorted(k for k in state_dict if k.startswith("backbone."))
        if backbone_keys:
            raise ValueError(f"state_dict: expected ST-LoRA entries only, got backbone entries {backbone_keys[:3]}...; "
                             "use load_state_dict for a full checkpoint")
        own = {k for k in self.state_dict() if not k.startswith("backbone.")}
        missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict: missing ST-LoRA keys {missing}, unexpected keys {unexpected}")
        result = self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        if result.unexpected_keys:  # pragma: no cover - filtered above
            raise ValueError(f"state_dict: unexpected keys {result.unexpected_keys}")

    def extra_repr(self) -> str:
        return f"added_parameters={self.added_parameters():,}, gate_l2={self.gate_l2:g}"


def parameter_overhead(model) -> dict:
    """``{"added", "backbone", "percent"}`` for an :class:`STLoRA` or a Forecaster wrapping one:
    the ST-LoRA parameters as a count and as a percentage of the backbone's (all parameters,
    trainable or frozen)."""
    stlora = getattr(model, "model", model)
    if not isinstance(stlora, STLoRA):
        raise TypeError(f"model: expected an STLoRA or a Forecaster wrapping one, got {type(stlora).__name__}")
    added, backbone = stlora.added_parameters(), stlora.backbone_parameters()
    return {"added": added, "backbone": backbone, "percent": 100.0 * added / backbone if backbone else float("inf")}


def wrap_forecaster(forecaster, *, freeze_backbone: bool = False, **options):
    """A :class:`stfast.models.Forecaster` whose model is ``STLoRA(forecaster.model, ...)``.

    Works with any zoo model (HimNet included): the node count, input and output steps come from
    the forecaster's config, the input channels from its spec (the history is the value channel);
    ``options`` are :class:`STLoRA`'s remaining keyword arguments (``num_blocks``, ``num_layers``,
    ``rank``, ``hidden``, ``alpha``, ``dropout``, ``gate_l2``, ``activation``, ``freeze_base``).
    The result keeps the spec and backend, and its config gains ``"stlora"``: the options that
    rebuild the same wrapper (``wrap_forecaster(create(...), **config["stlora"])``).
    """
    from ..models import Forecaster

    if isinstance(forecaster.model, STLoRA):
        raise ValueError("forecaster: already wrapped with STLoRA")
    fixed = {"num_nodes", "in_steps", "out_steps", "input_dim", "output_dim", "history_channels"}
    clash = sorted(fixed & set(options))
    if clash:
        raise ValueError(f"options: {clash} are taken from the forecaster's config and spec, not passed")
    config = copy.deepcopy(forecaster.config)
    spec = forecaster.spec
    if 0 not in spec.x_channels:
        raise ValueError(f"forecaster: {spec.name} does not take the value channel (x_channels {spec.x_channels}); "
                         "ST-LoRA needs the history values")
    training = config.get("training", {})
    stlora = STLoRA(forecaster.model, num_nodes=config["model"]["num_nodes"], in_steps=training.get("in_steps", 12),
                    out_steps=training.get("out_steps", 12), input_dim=len(spec.x_channels), output_dim=1,
                    history_channels=(spec.x_channels.index(0),), **options)
    if freeze_backbone:
        stlora.freeze_backbone()
    config["stlora"] = {k: v for k, v in stlora.options.items() if k not in fixed}
    config["stlora"]["freeze_backbone"] = freeze_backbone
    return Forecaster(stlora, spec, config, forecaster.backend)
