"""Shared fixtures: the real public data files, when this machine has them (never committed)."""

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("STFAST_SHARED_DATA", default))


def _shared_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.is_file():
        pytest.skip(f"shared data file {path} not available (set STFAST_SHARED_DATA)")
    return path


@pytest.fixture
def shared_file():
    """``shared_file("PEMS08/PEMS08.csv")``: the path, or a clean skip when it is absent."""
    return _shared_file


@pytest.fixture
def pems08_prefix() -> Path:
    return _shared_file("_partial/PEMS08_prefix_1282steps.npy")


@pytest.fixture
def clean_backend(monkeypatch):
    """No forced backend (neither STFAST_BACKEND nor set_backend) during the test, and none left after it."""
    from stfast import ops

    monkeypatch.delenv(ops.backends.ENV_VAR, raising=False)
    ops.set_backend(None)
    yield
    ops.set_backend(None)
