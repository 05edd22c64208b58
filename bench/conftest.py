"""Benchmarks run with `pytest bench/ --benchmark-only`; they are never part of the test suite."""


import pytest
import torch

from stfast.profiler import describe_device


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
