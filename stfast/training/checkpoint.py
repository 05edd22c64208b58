"""Checkpoint files and the run folder that holds them.

Loading is safe: a checkpoint written by stfast holds only tensors and plain Python values (dicts,
lists, tuples, strings, numbers, booleans, None; every random generator's state is stored as a
tensor), so it is read with ``torch.load(weights_only=True)``, whose unpickler builds nothing else
and calls no function a file names: a crafted ``.pt`` is refused and runs no code. Checkpoints of
format version 1 (stfast before this module) pickled Python's and NumPy's generator states as
objects and so need the full unpickler, which runs whatever code a file carries: they load only with
``allow_unsafe=True`` (``--trust-checkpoint`` on the command line), for files whose origin you trust.

Writing is atomic: a uniquely named temporary file in the same folder, then a rename, so a reader
(or a run killed mid-write) never sees half a file and two writers never share a temporary name.

A run folder is written by one run at a time: :class:`RunLock` is an exclusive ``flock`` on
``<folder>/.lock`` (released by the kernel when the process ends, even by ``kill -9``), and a second
run is refused with the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_VERSION", "RunFolderBusyError", "RunLock", "check_keys", "load_checkpoint", "load_weights",
    "restore_rng_states", "rng_states", "save_atomic", "write_text_atomic",
]

CHECKPOINT_VERSION = 2  # 2: generator states as tensors (loads with weights_only=True); 1: pickled objects
TRUST_HINT = "--trust-checkpoint (command line) or allow_unsafe=True (Python)"


# ---------------------------------------------------------------- atomic writes

def _temporary_sibling(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def _replace_from_temporary(path, write) -> None:
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj, path) -> None:
    """``torch.save`` to a uniquely named temporary file in the same folder, then rename over ``path``."""
    _replace_from_temporary(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(text: str, path) -> None:
    """Write ``text`` to a uniquely named temporary file in the same folder, then rename over ``path``."""
    _replace_from_temporary(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- loading

def load_checkpoint(path, *, allow_unsafe: bool = False) -> dict:
    """An stfast checkpoint as a dict, read with ``torch.load(weights_only=True)``.

    ``allow_unsafe=True`` also reads version-1 checkpoints with the full unpickler, which runs any code
    the file carries: only for files whose origin you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if not _refused_by_safe_loader(error):  # a truncated or foreign file: say which one
            raise ValueError(f"checkpoint: {path} is not a readable stfast checkpoint ({error})") from error
        if not allow_unsafe:
            raise ValueError(_refusal(path, error)) from None
        checkpoint = _load_trusted(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "stfast":
        raise ValueError(f"checkpoint: {path} is not an stfast checkpoint (no 'format': 'stfast' entry)")
    if isinstance(checkpoint.get("rng"), dict) and isinstance(checkpoint["rng"].get("python"), tuple):
        checkpoint["rng"] = _rng_states_from_version_1(checkpoint["rng"])
    return checkpoint


def _refused_by_safe_loader(error: Exception) -> bool:
    """A well-formed pickle naming a global that ``weights_only=True`` does not admit (torch's wording;
    a corrupt file fails the same loader with another reason)."""
    return isinstance(error, pickle.UnpicklingError) and "unsupported global" in str(error).lower()


def _refusal(path: Path, error: Exception) -> str:
    reason = next((line.strip().split(" was not")[0] for line in str(error).splitlines()
                   if "unsupported global" in line.lower()), "")
    return (
        f"checkpoint: {path} holds Python objects that the safe loader (torch.load(weights_only=True)) refuses"
        f"{f' ({reason})' if reason else ''}. It is a file of another program, a crafted file, or an stfast "
        f"checkpoint of format version 1 (written before version 2). Loading it runs code stored in it: only "
        f"if you trust its origin, pass {TRUST_HINT}"
    )


def _load_trusted(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"checkpoint: {path} is not a readable stfast checkpoint ({error})") from error


def check_keys(checkpoint: dict, keys, path, purpose: str) -> None:
    """Raise a ``ValueError`` naming every key of ``keys`` that ``checkpoint`` lacks."""
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint: {path} lacks {', '.join(repr(k) for k in missing)}, needed to {purpose}")


def load_weights(model: torch.nn.Module, state_dict, path) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, or a ``ValueError`` that lists the missing,
    unexpected and mis-shaped entries (at most a few of each) instead of torch's traceback."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"checkpoint: {path}: expected the model's weights as a dict of tensors, "
                         f"got {type(state_dict).__name__}")
    own = model.state_dict()
    problems = []
    for label, names in (("missing", [k for k in own if k not in state_dict]),
                         ("unexpected", [k for k in state_dict if k not in own])):
        if names:
            problems.append(f"{len(names)} {label} ({_first(names)})")
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs the model's {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({_first(shapes)})")
    if problems:
        raise ValueError(f"checkpoint: {path} holds weights of another model: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)


def _first(items, count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


# ---------------------------------------------------------------- random generator states

def rng_states(shuffle_generator: torch.Generator) -> dict:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    version, python_state, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": {"version": int(version), "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "shuffle": shuffle_generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, shuffle_generator: torch.Generator) -> None:
    python, numpy_state = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    shuffle_generator.set_state(states["shuffle"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _rng_states_from_version_1(states: dict) -> dict:
    """Version 1 kept ``random.getstate()`` and ``np.random.get_state()`` as pickled tuples."""
    version, python_state, gauss_next = states["python"]
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    return {
        **states,
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


# ---------------------------------------------------------------- the run folder lock

class RunFolderBusyError(ValueError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder for as long as this process writes to it.

    Re-entrant within one holder (``acquire`` / ``release`` pairs nest); a second holder, in this
    process or another, gets a :class:`RunFolderBusyError` naming the pid written in the lock file.
    """

    FILE_NAME = ".lock"

    def __init__(self, folder):
        self.folder = Path(folder)
        self._handle = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> "RunLock":
        if self._handle is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / self.FILE_NAME, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunFolderBusyError(
                    f"out_dir: {self.folder} is in use by another run (pid {holder}); two runs writing one folder "
                    "would overwrite each other's checkpoints. Wait for it to end or choose another folder"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._handle = handle
        self._depth += 1
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        self._depth -= 1
        if self._depth == 0:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
