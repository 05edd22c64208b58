"""stfast ops: custom ``torch.library`` ops with selectable backends.

Graph convolutions: :func:`meta_gconv` (weights generated from embeddings per node, per sample
or per (sample, node), never materialised) and :func:`gconv` (plain Chebyshev convolution).
Node-adaptive low-rank linear: :func:`node_lora` (a shared layer plus one low-rank adapter per node).
Adaptive graphs ``softmax(relu(E E^T))`` without the ``N x N`` tensor: :func:`implicit_support`,
:func:`adaptive_propagate` (:mod:`stfast.ops.adaptive_graph`).
Backend selection: :func:`available_backends`, :func:`set_backend`, :func:`use_backend`,
:func:`current_backend` and the ``STFAST_BACKEND`` environment variable; :func:`cuda_tensor_cores`
turns the CUDA kernels' tensor-core path off (or back on) for a block.
"""

from ._ext import cuda_tensor_cores
from .adaptive_graph import ImplicitSupport, adaptive_propagate, implicit_support
from .backends import available_backends, current_backend, resolve_backend, set_backend, use_backend
from .meta_gconv import gconv, meta_gconv
from .node_lora import node_lora
from ._autocast import register_autocast_rules

register_autocast_rules()  # torch.autocast behaviour of the ops above

__all__ = [
    "ImplicitSupport",
    "adaptive_propagate",
    "available_backends",
    "cuda_tensor_cores",
    "current_backend",
    "gconv",
    "implicit_support",
    "meta_gconv",
    "node_lora",
    "resolve_backend",
    "set_backend",
    "use_backend",
]
