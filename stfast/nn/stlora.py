"""ST-LoRA on stfast's ops: node-adaptive low-rank layers (NALL), node-specific predictors (NSP)
and the :class:`STLoRA` wrapper around any forecasting backbone (``shared/specs/stlora.md``).

We follow the paper, not the public code: every node ``n`` owns its own ``A_n (d_in x r)`` and
``B_n (r x d_out)`` (the public code shares one pair across nodes and uses BatchNorm). Every NALL
runs on :func:`stfast.ops.node_lora`, which never builds a per-node full weight.

That form costs ``N*r*(d_in + d_out)`` parameters per layer, far above the paper's "less than 1%
additional trainable parameters" claim for most backbones. A second form, ``adapter="shared"``
(:class:`SharedNALL`), keeps ``N*r`` per-node parameters per layer (shared factors, a per-node scale
of the rank space); ``stfast bench stlora`` measures both against the six backbones of the paper's
Figure 4. The per-node form stays the default: it is the one the paper's text describes.

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

import contextlib
import copy
import math

import torch
from torch import nn

from .. import ops
from .._checks import check_same_device_dtype
from ..ops import _torch_lora

__all__ = ["ADAPTERS", "NALL", "SharedNALL", "NSP", "node_lora_loop", "STLoRA", "RMSNorm", "wrap_forecaster",
           "parameter_overhead"]


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


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float (or None), got {value!r}")
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


class _AdaptedLinear(nn.Module):
    """What both adapter forms share: the base ``nn.Linear``, the checked options and ``scale``."""

    def __init__(self, in_features, out_features, num_nodes, rank, alpha, activation, dropout, bias, factory):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_nodes", num_nodes), ("rank", rank)):
            _positive_int(name, value)
        _activation(activation)
        self.in_features, self.out_features, self.num_nodes, self.rank = in_features, out_features, num_nodes, rank
        self.alpha = _finite("alpha", rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.activation = activation
        self.dropout = _probability("dropout", dropout)
        self.base = nn.Linear(in_features, out_features, bias=bias, **factory)

    def _check_path(self, path: str) -> str:
        if path not in self.PATHS:
            raise ValueError(f"path: expected one of {self.PATHS}, got {path!r}")
        return path

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_nodes={self.num_nodes}, "
                f"rank={self.rank}, alpha={self.alpha:g}, activation={self.activation}, dropout={self.dropout:g}, "
                f"path={self.path}")


class NALL(_AdaptedLinear):
    """Node-adaptive low-rank layer, the paper's per-node form (adapter ``"per_node"``):
    ``y[..., n, :] = x W^T + b + (alpha / r) act(dropout(x) A[n]) B[n]``.

    ``x (..., N, in_features)`` -> ``(..., N, out_features)``. ``base`` is an ``nn.Linear``;
    ``lora_a (N, in_features, rank)``, ``lora_b (N, rank, out_features)``. ``freeze_base=True``
    stops gradients to the base layer (the paper keeps ``W`` fixed and adapts ``A, B``).

    Parameters: ``out*(in + 1)`` (base, with bias) ``+ N*r*(in + out)`` (the adapters).

    ``path``: ``"op"`` runs :func:`stfast.ops.node_lora` (fused, no per-node loop); ``"loop"`` is
    the naive formulation, one small matmul pair per node in a Python loop
    (:func:`node_lora_loop`), kept as the baseline that ``stfast bench stlora`` measures.
    """

    PATHS = ("op", "loop")

    def __init__(self, in_features: int, out_features: int, num_nodes: int, rank: int = 16, alpha=None,
                 activation="leaky_relu", dropout: float = 0.0, bias: bool = True, freeze_base: bool = False,
                 path: str = "op", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, num_nodes, rank, alpha, activation, dropout, bias, factory)
        self.path = self._check_path(path)
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
        if self.path == "loop":
            return node_lora_loop(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.scale,
                                  self.activation, self.dropout, self.training)
        return ops.node_lora(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.scale,
                             self.activation, self.dropout, self.training, seed, offset)


class SharedNALL(_AdaptedLinear):
    """Node-adaptive low-rank layer with shared factors and a per-node scale of the rank space
    (adapter ``"shared"``): ``y[..., n, :] = x W^T + b + (alpha / r) act((dropout(x) A) * e[n]) B``.

    ``lora_a (in_features, rank)`` and ``lora_b (rank, out_features)`` are shared by all nodes;
    ``node_scale (N, rank)`` is node ``n``'s vector ``e_n``. It reads the paper's sensitivity study
    ("the node embedding dimension represents the rank of the low-rank matrix required for the
    additional parameters of the nodes") as per-node parameters of rank size.

    Parameters: ``out*(in + 1)`` (base, with bias) ``+ r*(in + out)`` (shared factors) ``+ N*r``
    (the node scales), against ``N*r*(in + out)`` adapter parameters for :class:`NALL`.

    Initialisation: ``A`` as NALL's (uniform in ``+-1/sqrt(in)``), ``B`` zero (a fresh layer equals
    its base), ``e`` ones. ``path``: ``"composed"`` (default) is two shared GEMMs around the
    elementwise node scale (PyTorch ops, no loop); ``"op"`` hands the per-node factors ``A * e_n`` and
    ``B`` to :func:`stfast.ops.node_lora` on the selected backend (it forms ``(N, in, r)`` and
    ``(N, r, out)``, parameter-sized, per call). ``"composed"`` is the default because it forms
    nothing per call; which path is faster is not settled: on a shared 2-core CPU
    (``bench/stlora_shared_paths.py``) the composed path had the lower minimum and the C++ op path
    the lower median, and ``stfast bench stlora`` times both on every device it runs on.
    """

    PATHS = ("composed", "op")

    def __init__(self, in_features: int, out_features: int, num_nodes: int, rank: int = 16, alpha=None,
                 activation="leaky_relu", dropout: float = 0.0, bias: bool = True, freeze_base: bool = False,
                 path: str = "composed", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, num_nodes, rank, alpha, activation, dropout, bias, factory)
        self.path = self._check_path(path)
        self.lora_a = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.lora_b = nn.Parameter(torch.zeros(rank, out_features, **factory))
        self.node_scale = nn.Parameter(torch.ones(num_nodes, rank, **factory))
        self.reset_lora_parameters()
        if freeze_base:
            self.base.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_a, -bound, bound)
        nn.init.zeros_(self.lora_b)
        nn.init.ones_(self.node_scale)

    def forward(self, x, seed=None, offset=0):
        if self.path == "op":
            nodes = self.num_nodes
            per_node_a = self.lora_a.unsqueeze(0) * self.node_scale.unsqueeze(1)  # (N, in, r)
            per_node_b = self.lora_b.unsqueeze(0).expand(nodes, -1, -1).contiguous()  # (N, r, out)
            return ops.node_lora(x, self.base.weight, self.base.bias, per_node_a, per_node_b, self.scale,
                                 self.activation, self.dropout, self.training, seed, offset)
        if x.dim() < 2 or x.shape[-2] != self.num_nodes or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (..., {self.num_nodes}, {self.in_features}), got {tuple(x.shape)}")
        check_same_device_dtype("x", x, weight=self.base.weight, lora_a=self.lora_a)
        dropped = nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x
        h = _torch_lora.activate((dropped @ self.lora_a) * self.node_scale, self.activation)
        return nn.functional.linear(x, self.base.weight, self.base.bias) + self.scale * (h @ self.lora_b)


def node_lora_loop(x, weight, bias, lora_a, lora_b, scale, activation="leaky_relu", dropout_p=0.0, training=False):
    """The naive per-node formulation of :func:`stfast.ops.node_lora`: a Python loop over the
    nodes, one ``(.., d_in) @ (d_in, r)`` and one ``(.., r) @ (r, d_out)`` matmul each. Correct but
    slow (``2N`` small matmuls forward, more backward): the baseline the fused op is measured against."""
    dropped = nn.functional.dropout(x, dropout_p, training) if dropout_p and training else x
    low_rank = [_torch_lora.activate(dropped[..., n, :] @ lora_a[n], activation) @ lora_b[n]
                for n in range(x.shape[-2])]
    return nn.functional.linear(x, weight, bias) + scale * torch.stack(low_rank, dim=-2)


ADAPTERS = {"per_node": NALL, "shared": SharedNALL}  # adapter form -> its layer; "per_node" is the paper's


def _adapter_layer(adapter: str):
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter: expected one of {list(ADAPTERS)}, got {adapter!r}")
    return ADAPTERS[adapter]


class NSP(nn.Module):
    """Node-specific predictor: ``(B, in_steps, N, in_dim)`` -> ``(B, out_steps, N, out_dim)``.

    Temporal feature extraction over the whole window (shared across nodes), ``num_layers``
    residual NALL layers ``H + dropout(rmsnorm(act(NALL(H))))``, and a NALL projection to the
    horizon. ``adapter`` picks the NALL form: ``"per_node"`` (:class:`NALL`) or ``"shared"``
    (:class:`SharedNALL`).

    Parameters, with ``h = hidden``, ``T = in_steps*in_dim``, ``P = out_steps*out_dim``, ``L =
    num_layers`` and ``a(i, o)`` the adapter parameters of one layer (``N*r*(i + o)`` per-node,
    ``r*(i + o) + N*r`` shared): ``h*(T + 1) + L*(h*(h + 1) + a(h, h) + h) + P*(h + 1) + a(h, P)``.
    """

    def __init__(self, num_nodes: int, in_steps: int, in_dim: int, out_steps: int, out_dim: int, hidden: int = 32,
                 num_layers: int = 4, rank: int = 16, alpha=None, activation="leaky_relu", dropout: float = 0.0,
                 freeze_base: bool = False, adapter: str = "per_node", device=None, dtype=None):
        super().__init__()
        layer = _adapter_layer(adapter)
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
        self.layers = nn.ModuleList(layer(hidden, hidden, **nall) for _ in range(num_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden, **factory) for _ in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.head = layer(hidden, out_steps * out_dim, **nall)

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

    ``adapter``: ``"per_node"`` (the paper's NALL, the default) or ``"shared"`` (:class:`SharedNALL`,
    rank-sized per-node parameters). Added parameters: ``num_blocks`` NSPs (see :class:`NSP`, with
    ``in_steps + out_steps`` input steps of ``output_dim`` channels) plus the fusion layer
    ``P*(2P + 1)`` and the gate ``N*out_steps``, ``P = out_steps*output_dim``. At the paper's
    defaults (rank 16, 4 layers, hidden 32, one block) on PEMS04 (N = 307, 12 -> 12 steps) that is
    1,483,132 per-node and 38,892 shared (:func:`parameter_overhead` gives the ratio to a backbone).

    :meth:`freeze_backbone` stops gradients to the backbone and keeps it in eval mode while the
    wrapper trains (its dropout off, its batch-norm statistics fixed), so fine-tuning leaves every
    backbone tensor, parameters and buffers, bitwise unchanged.

    ``op_backend``: the node_lora backend the predictors run on (None, the default: whatever the
    caller selected, e.g. the Forecaster's backend); set it to compare backends under one backbone.
    """

    op_backend = None

    def __init__(self, backbone: nn.Module, num_nodes: int, in_steps: int = 12, out_steps: int = 12,
                 input_dim: int = 1, output_dim: int = 1, num_blocks: int = 1, num_layers: int = 4, rank: int = 16,
                 hidden: int = 32, alpha=None, dropout: float = 0.0, gate_l2: float = 1e-4,
                 activation="leaky_relu", history_channels=None, freeze_base: bool = False, adapter: str = "per_node"):
        super().__init__()
        _adapter_layer(adapter)
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
                            activation=activation, history_channels=history_channels, freeze_base=freeze_base,
                            adapter=adapter)
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
                freeze_base=freeze_base, adapter=adapter, **factory)
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
        with ops.use_backend(self.op_backend) if self.op_backend else contextlib.nullcontext():
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
        """Stop (or restore) gradients to the backbone, for fine-tuning only the ST-LoRA parameters;
        a frozen backbone stays in eval mode (see :meth:`train`)."""
        self.backbone.requires_grad_(not freeze)
        self.backbone_frozen = freeze
        return self.train(self.training)

    def train(self, mode: bool = True) -> "STLoRA":
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self.backbone.eval()  # no dropout, no running-statistics update: the backbone is fixed
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
    ``rank``, ``hidden``, ``alpha``, ``dropout``, ``gate_l2``, ``activation``, ``freeze_base``,
    ``adapter``).
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
