"""stfast: fast layers, profiling and correctness checks for spatio-temporal graph forecasting."""

from . import configs
from ._version import __version__

__all__ = ["__version__", "available_backends", "configs", "profile", "seed_everything", "set_backend", "use_backend"]

# The backend API at the top level (also under stfast.ops): imported on first use, as profile.
_BACKEND_API = ("available_backends", "set_backend", "use_backend")


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
    if name in _BACKEND_API:
        from .ops import backends

        return getattr(backends, name)
    raise AttributeError(f"module 'stfast' has no attribute {name!r}")
