"""Load checkpoints published by other code bases into stfast's zoo models: ``load_published``.

stfast's zoo modules keep the parameter shapes and semantics of the code they were written from, but
not always its attribute names. Each (model, source) pair below is a *key map* (regex rules from the
source's names to stfast's) plus the input conventions a user must know to reproduce the source's
predictions. Facts from the public repositories (no code taken from them):

- ``"staeformer"``: XDZhelheim/STAEformer ``model/STAEformer.py``; ``train.py`` saves the bare
  ``state_dict``. Layers ``attn_layers_t.<i>`` / ``attn_layers_s.<i>``, attention ``attn.FC_Q``,
  ``attn.FC_K``, ``attn.FC_V``, ``attn.out_proj``, norms ``ln1`` / ``ln2``. Heads split the model
  dimension in contiguous blocks, as stfast's do.
- ``"basicts"``: zezhishao/BasicTS (0.x) and GestaltCogTeam/BasicTS (1.x) runners save
  ``{"epoch", "model_state_dict", "optim_state_dict", ...}``. ``baselines/AGCRN/arch``: the cells live
  in ``encoder.dcrnn_cells.<i>`` (``gate`` / ``update`` pools of the same shapes as stfast's); GWNet and
  STID use the names stfast uses. BasicTS's
  ``load_adj(..., "doubletransition")`` returns the *transposed* transition matrices, so a BasicTS
  GWNet propagates along the reversed edges: loading one transposes the model's fixed supports.
- ``"torch-mts"``: XDZhelheim/Torch-MTS (``models/*.py``; saves the bare ``state_dict``): STAEformer and
  AGCRN with the names above, GWNet and STID with stfast's names.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_published", "PublishedLoad", "SOURCES", "convert_state_dict"]

_DAY_OF_WEEK_NOTE = (
    "BasicTS stores day of week as Monday=0 divided by 7; stfast's BasicTS readers "
    "(stfast.data.load_dataset on a BasicTS folder) turn it back into 0..6, which the embedding tables index"
)


@dataclass(frozen=True)
class KeyMap:
    """Rules applied in order to every key of the source, and what stfast cannot take from it."""

    rules: tuple[tuple[str, str], ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()  # (key pattern, why stfast has no place for it)
    notes: tuple[str, ...] = ()
    transpose_supports: bool = False

    def rename(self, key: str) -> str:
        for pattern, replacement in self.rules:
            key = re.sub(pattern, replacement, key)
        return key


_STAEFORMER = KeyMap(
    rules=(
        (r"^attn_layers_t\.", "temporal_layers."),
        (r"^attn_layers_s\.", "spatial_layers."),
        (r"\.attn\.FC_Q\.", ".attention.query."),
        (r"\.attn\.FC_K\.", ".attention.key."),
        (r"\.attn\.FC_V\.", ".attention.value."),
        (r"\.attn\.out_proj\.", ".attention.out."),
        (r"\.ln1\.", ".norm1."),
        (r"\.ln2\.", ".norm2."),
    ),
    unsupported=(
        (r"^node_emb$", "spatial_embedding_dim > 0 (the published configurations use 0)"),
        (r"^temporal_proj\.", "use_mixed_proj=False (the published configurations use the mixed projection)"),
    ),
    notes=("inputs [value (z-scored), time of day in [0, 1), day of week 0..6], as stfast's readers give them",),
)

_AGCRN_CELLS = KeyMap(
    rules=((r"^encoder\.dcrnn_cells\.", "cells."),),
    notes=("inputs [value (z-scored), time of day] (BasicTS FORWARD_FEATURES [0, 1]), as stfast's",),
)

SOURCES: dict[tuple[str, str], KeyMap] = {
    ("staeformer", "staeformer"): _STAEFORMER,
    ("staeformer", "torch-mts"): _STAEFORMER,
    ("agcrn", "basicts"): _AGCRN_CELLS,
    ("agcrn", "torch-mts"): _AGCRN_CELLS,
    ("gwnet", "basicts"): KeyMap(
        notes=("BasicTS's 'doubletransition' supports are the transposed random-walk matrices: the fixed supports "
               "were transposed to match",),
        transpose_supports=True,
    ),
    ("gwnet", "torch-mts"): KeyMap(),
    ("stid", "basicts"): KeyMap(notes=(_DAY_OF_WEEK_NOTE,)),
    ("stid", "torch-mts"): KeyMap(),
}


@dataclass
class PublishedLoad:
    """What :func:`load_published` did: the keys renamed (source -> stfast) and the conventions to heed."""

    model: str
    source: str
    renamed: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def load_published(model: nn.Module, checkpoint, source: str) -> PublishedLoad:
    """Load a checkpoint written by ``source`` into ``model`` (a zoo module or a ``Forecaster``), strictly.

    ``checkpoint`` is a path (read with ``torch.load(weights_only=True)``: tensors and plain containers
    only, nothing executed) or an already loaded dict. A BasicTS runner's dict is unwrapped
    (``model_state_dict``) and a DataParallel ``module.`` prefix dropped. Every key must map onto a
    parameter or buffer of the same shape and every parameter must be covered; otherwise nothing is
    loaded and the error lists the differences.
    """
    module = getattr(model, "model", model)
    name = _zoo_name(module)
    key_map = SOURCES.get((name, source))
    if key_map is None:
        known = sorted({s for m, s in SOURCES if m == name})
        raise ValueError(f"source: expected one of {known} for {name}, got {source!r}")
    original = _read_state_dict(checkpoint)
    state = convert_state_dict(original, key_map, name, source)
    _check_against(module, state, name, source)
    module.load_state_dict(state, strict=True)
    if key_map.transpose_supports:
        module.supports = module.supports.transpose(-1, -2).contiguous()
    renamed = {old: new for old, new in zip(original, state) if old != new}
    return PublishedLoad(name, source, renamed, key_map.notes)


def convert_state_dict(state: dict, key_map: KeyMap, name: str = "model", source: str = "source") -> dict:
    """The source's state dict under stfast's names (order kept); unsupported keys raise."""
    converted = {}
    for key, value in state.items():
        for pattern, why in key_map.unsupported:
            if re.search(pattern, key):
                raise ValueError(f"checkpoint: {key!r} from {source} needs {why}; stfast's {name} has no such part")
        converted[key_map.rename(key)] = value
    return converted


def _read_state_dict(checkpoint) -> dict:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _load_file(Path(checkpoint))
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint: expected a state dict or a path to one, got {type(checkpoint).__name__}")
    if "model_state_dict" in checkpoint:  # a BasicTS runner checkpoint
        checkpoint = checkpoint["model_state_dict"]
    bad = [k for k, v in checkpoint.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint: expected a state dict of name -> tensor, got non-tensor entries {bad[:5]}")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def _load_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for code-carrying files, RuntimeError for corrupt ones
        raise ValueError(f"checkpoint: cannot read {path} as plain tensors (weights_only=True): {error}") from error


def _check_against(module: nn.Module, state: dict, name: str, source: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                 f"shape mismatches {shapes[:8]}" if shapes else ""]
        detail = "; ".join(p for p in parts if p)
        raise ValueError(f"checkpoint: does not match stfast's {name} after the {source} key map ({detail})")


def _zoo_name(module: nn.Module) -> str:
    spec = getattr(sys.modules.get(type(module).__module__), "SPEC", None)
    if spec is None:
        raise ValueError(f"model: expected a stfast zoo model or Forecaster, got {type(module).__name__}")
    return spec.name
