"""stfast ops: custom ``torch.library`` ops with selectable backends.

Graph convolutions: :func:`meta_gconv` (weights generated from embeddings per node, per sample
or per (sample, node), never materialised) and :func:`gconv` (plain Chebyshev convolution).
Backend selection: :func:`available_backends`, :func:`set_backend`, :func:`use_backend`,
:func:`current_backend` and the ``STFAST_BACKEND`` environment variable.
"""

from .backends import available_backends, current_backend, resolve_backend, set_backend, use_backend
from .meta_gconv import gconv, meta_gconv

__all__ = [
    "available_backends",
    "current_backend",
    "gconv",
    "meta_gconv",
    "resolve_backend",
    "set_backend",
    "use_backend",
]
