"""``--set key=value``: override entries of a model's published configuration from the command line.

``key`` is ``model.<name>`` or ``training.<name>`` (a bare ``<name>`` when only one section has it);
``value`` is read as JSON (``5e-4``, ``64``, ``true``, ``[10, 20]``, ``null``), or taken as a string
when the entry is a string. The entry must exist and the value must have its type (an integer where
an integer is expected; an integer is accepted for a float); nothing is added or cast silently.
"""

from __future__ import annotations

import json

__all__ = ["parse_assignments", "apply_overrides", "SECTIONS"]

SECTIONS = ("model", "training")


def parse_assignments(assignments) -> list[tuple[str, str]]:
    """``["training.lr=1e-3"]`` -> ``[("training.lr", "1e-3")]``; a missing ``=`` or key raises."""
    pairs = []
    for text in assignments or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE (e.g. training.lr=5e-4), got {text!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def apply_overrides(config: dict, assignments) -> dict[str, dict]:
    """The overrides of ``assignments`` per section, checked against ``config`` (not modified).

    Returns ``{"model": {...}, "training": {...}}`` with the typed values; the caller builds the model
    with the model entries and updates its training dict with the others.
    """
    overrides = {section: {} for section in SECTIONS}
    for key, text in parse_assignments(assignments):
        section, name = _resolve_key(config, key)
        current = config[section][name]
        overrides[section][name] = _typed_value(f"{section}.{name}", text, current)
    return overrides


def _resolve_key(config: dict, key: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if dot and section in SECTIONS:
        if name not in config[section]:
            raise ValueError(f"--set: expected one of {_keys(config, section)}, got {key!r}")
        return section, name
    owners = [s for s in SECTIONS if key in config[s]]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ValueError(f"--set: {key!r} is in both sections; expected model.{key} or training.{key}")
    raise ValueError(f"--set: expected one of {_keys(config, 'model') + _keys(config, 'training')}, got {key!r}")


def _keys(config: dict, section: str) -> list[str]:
    return [f"{section}.{name}" for name in config[section]]


def _typed_value(key: str, text: str, current):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if isinstance(current, str):
            return text
        raise ValueError(f"--set: expected a JSON value for {key} (like {json.dumps(current)}), got {text!r}") from None
    if current is None:
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        if not (isinstance(current, bool) and isinstance(value, bool)):
            raise ValueError(f"--set: expected {type(current).__name__} for {key}, got {text!r}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if type(value) is not type(current):
        raise ValueError(f"--set: expected {type(current).__name__} for {key} (now {json.dumps(current)}), "
                         f"got {type(value).__name__} {text!r}")
    return value
