"""stfast: fast layers, profiling and correctness checks for spatio-temporal graph forecasting."""

from . import configs
from ._version import __version__

__all__ = ["__version__", "configs", "profile", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's generators (HimNet's teacher forcing draws from NumPy)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def __getattr__(name):
    # Imported on first use so that `import stfast` stays light.
    if name == "profile":
        from .profiler import profile

        return profile
    raise AttributeError(f"module 'stfast' has no attribute {name!r}")
