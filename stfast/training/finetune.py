"""Fine-tuning ST-LoRA on a pretrained backbone, as the paper deploys it.

    stfast train --model stgcn --dataset PEMS08 --data ... --out runs/stgcn          # the backbone
    stfast train --model stgcn --dataset PEMS08 --data ... --stlora \\
                 --init-from runs/stgcn/best.pt --freeze-backbone --out runs/stgcn+stlora

:func:`init_backbone` loads the backbone's weights from an stfast checkpoint (of the backbone
alone, or of an ST-LoRA run, whose ``backbone.`` entries are taken) or from a plain state dict (a
``torch.save(model.state_dict())`` file of the published code, where the module is state-dict
compatible). Every file is read with ``weights_only=True`` (:mod:`stfast.training.checkpoint`):
loading never runs code from it. Anything that does not match the model and dataset is refused
with the mismatches named.

:class:`BackboneGuard` records the backbone's tensors (parameters and buffers) before training and
checks afterwards that not one bit changed: with ``--freeze-backbone`` only the ST-LoRA
parameters train. The gate's L2 penalty is in the training loss through
:meth:`stfast.nn.STLoRA.auxiliary_loss`, which :func:`stfast.training.step.train_step` adds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint, load_weights

__all__ = ["BackboneGuard", "backbone_of", "init_backbone", "read_backbone_state"]

_SHOWN = 4  # mismatching keys listed in an error


def backbone_of(forecaster) -> torch.nn.Module:
    """The module a pretrained backbone's weights go into: the STLoRA wrapper's backbone, or the
    forecaster's model when it is not wrapped."""
    from ..nn.stlora import STLoRA

    model = forecaster.model
    return model.backbone if isinstance(model, STLoRA) else model


def _stfast_checkpoint_state(checkpoint: dict, path: Path, model_name: str, dataset: str,
                             model_args: dict) -> dict:
    for key, mine in (("model_name", model_name), ("dataset", dataset)):
        if checkpoint.get(key) != mine:
            raise ValueError(f"--init-from: {path} holds {key} {checkpoint.get(key)!r}, this run needs {mine!r}")
    if checkpoint.get("model_args") != model_args:
        theirs = checkpoint.get("model_args") or {}
        differ = sorted(k for k in set(theirs) | set(model_args) if theirs.get(k) != model_args.get(k))
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {model_args.get(k)!r} here" for k in differ[:_SHOWN])
        raise ValueError(f"--init-from: {path} was trained with other model arguments ({detail})")
    state = checkpoint["model"]
    if checkpoint.get("stlora") is not None:  # an ST-LoRA run: its backbone part
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _weights_only(path: Path):
    """The file's content loaded with ``weights_only=True`` (never runs code), or None if it needs more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickled objects beyond tensors and containers, or not a torch file at all
        return None


def _check_plain_state_dict(content, path: Path) -> dict:
    if not isinstance(content, dict) or not content or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        kind = type(content).__name__ if not isinstance(content, dict) else "a dict that is not {name: tensor}"
        raise ValueError(f"--init-from: expected an stfast checkpoint or a plain state dict {{name: tensor}} in "
                         f"{path}, got {kind}")
    return content


def read_backbone_state(path, *, model_name: str, dataset: str, model_args: dict) -> tuple[dict, str]:
    """``(state_dict, kind)`` from ``path``: ``kind`` is "stfast checkpoint" or "state dict"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from: no such file {path}")
    content = _weights_only(path)
    if content is not None and not (isinstance(content, dict) and content.get("format") == "stfast"):
        return _check_plain_state_dict(content, path), "state dict"
    checkpoint = load_checkpoint(path)  # safe (weights_only) and with its own errors for files that are neither
    return _stfast_checkpoint_state(checkpoint, path, model_name, dataset, model_args), "stfast checkpoint"


def init_backbone(forecaster, path, *, dataset: str) -> str:
    """Load pretrained backbone weights from ``path`` into ``forecaster`` (see the module
    docstring); returns a one-line description of what was loaded."""
    name = forecaster.spec.name
    state, kind = read_backbone_state(path, model_name=name, dataset=dataset,
                                      model_args=forecaster.config["model"])
    try:
        load_weights(backbone_of(forecaster), state, path)
    except ValueError as error:
        raise ValueError(f"--init-from: {error} ({name} on {dataset} expected)") from None
    return f"initialised the {name} backbone from {path} ({kind}, {len(state)} tensors)"


class BackboneGuard:
    """A bitwise copy of a backbone's parameters and buffers; :meth:`check` raises if any changed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.saved = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def changed(self) -> list[str]:
        now = self.module.state_dict()
        return [k for k, v in self.saved.items() if not torch.equal(v, now[k].detach().to(v.device))]

    def check(self) -> str:
        changed = self.changed()
        if changed:
            raise RuntimeError(f"frozen backbone: {len(changed)} tensor(s) changed during training, e.g. "
                               f"{changed[:_SHOWN]}")
        return f"frozen backbone bitwise unchanged ({len(self.saved)} tensors)"
