"""How much memory one training step needs, predicted from the shapes alone, and measured on the CPU.

:func:`estimate_memory` runs one training step (:func:`stfast.training.step.train_step`: forward, loss,
backward, clipping, Adam) on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
autograd, no data, no flops), so it answers for LargeST's CA at batch 64 on a laptop. A dispatch mode
counts the bytes of every tensor storage the step creates and returns them when the storage dies (as
the caching allocator would), so the peak is exact for everything PyTorch allocates itself: the
activations autograd saves, gradients, optimiser updates and temporaries. Inside stfast's custom ops
the kernels' own work buffers are invisible to fake tensors; :data:`OP_WORKSPACE` adds them from the
glue code's shapes (Chebyshev terms and their concatenation, recomputed in backward). Input checks
that read tensor values are skipped during the trace, as under ``torch.compile``.

Three numbers, in bytes:

- ``parameters`` and ``optimizer_state`` (Adam's two moments): resident between steps;
- ``step_peak``: the highest memory one step adds on top of that resting state (gradients included:
  the step starts with ``zero_grad(set_to_none=True)``).

``total = parameters + optimizer_state + step_peak`` is what a GPU needs besides the CUDA context
and the allocator's fragmentation (on CUDA each block is rounded up to 512 bytes, as the caching
allocator does). :func:`measure_step_memory` measures ``step_peak`` on the CPU from the allocator
events of ``torch.profiler`` (every allocation PyTorch's CPU allocator serves, kernels' own
buffers included), the check of the prediction.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryEstimate", "estimate_memory", "measure_step_memory", "OP_WORKSPACE", "GPU_CAPACITIES"]

_CUDA_BLOCK = 512
GPU_CAPACITIES = {"80 GB (A100/H100)": 80 * 10**9, "141 GB (H200)": 141 * 10**9}


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    dataset: str
    backend: str
    batch_size: int
    device: str  # "cuda" (512-byte blocks) or "cpu"
    parameters: int
    optimizer_state: int
    step_peak: int

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.step_peak

    def fits(self, capacity_bytes: int) -> bool:
        return self.total <= capacity_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


# -- the workspaces of stfast's custom ops --------------------------------------------------------------------------

def _chebyshev_forward_bytes(x, cheb_k: int) -> int:
    """``chebyshev_features``: K-1 propagated terms, then their concatenation with x (K terms)."""
    return 0 if cheb_k == 1 else (2 * cheb_k - 1) * x.numel() * x.element_size()


def _meta_gconv_forward_workspace(args) -> int:
    x, cheb_k = args[0], args[5]
    return _chebyshev_forward_bytes(x, cheb_k)


def _meta_gconv_backward_workspace(args) -> int:
    # (grad, out, x, supports, embeddings, pool, bias_pool, cheb_k, ...): act'(y) * dy and its temporaries
    # (3 x (B, N, O)), x's Chebyshev features recomputed (kept, K terms) while their gradient (K terms) and
    # the backward of the recursion (3 terms) are formed, and the per-row embedding gradient (B, N, D).
    grad, x, embeddings, cheb_k = args[0], args[2], args[4], args[7]
    size = x.element_size()
    rows = x.shape[0] * x.shape[1]
    propagated = _chebyshev_forward_bytes(x, cheb_k) + (cheb_k + 3) * x.numel() * size
    return 3 * grad.numel() * size + propagated + rows * embeddings.shape[-1] * 4


def _gconv_forward_workspace(args) -> int:
    x, cheb_k = args[0], args[4]
    return _chebyshev_forward_bytes(x, cheb_k)


def _gconv_backward_workspace(args) -> int:
    # (grad, out, x, supports, weight, bias, cheb_k, ...)
    grad, x, cheb_k = args[0], args[2], args[6]
    size = x.element_size()
    return 3 * grad.numel() * size + _chebyshev_forward_bytes(x, cheb_k) + (cheb_k + 3) * x.numel() * size


def _node_lora_forward_workspace(args) -> int:
    # (x, weight, bias, lora_a, lora_b, ...): the rank-r activations of every row
    x, lora_a = args[0], args[3]
    return x.numel() // x.shape[-1] * lora_a.shape[-1] * x.element_size()


def _node_lora_backward_workspace(args) -> int:
    # (grad, x, weight, bias, lora_a, lora_b, ...): h recomputed and its gradient, and dropout(x)
    grad, x, lora_a = args[0], args[1], args[4]
    rows = x.numel() // x.shape[-1]
    return (2 * rows * lora_a.shape[-1] + x.numel()) * x.element_size()


def _adaptive_graph_shapes(embeddings, x=None):
    """(graphs G, nodes N, compute-dtype bytes, whether inputs are copied to the computation's layout or
    dtype) of :mod:`stfast.ops.adaptive_graph`: a shared (N, D) graph folds x's batch into its channels."""
    from .ops.adaptive_graph import compute_dtype

    size = compute_dtype(embeddings.dtype).itemsize
    graphs = embeddings.shape[0] if embeddings.dim() == 3 else 1
    copied = embeddings.dim() == 2 or size != embeddings.element_size()
    return graphs, embeddings.shape[-2], size, copied


def _adaptive_graph_lse_workspace(args) -> int:
    # (embeddings, chunk): one chunk of scores (G, c, N), E in the compute dtype if cast
    embeddings, chunk = args
    graphs, nodes, size, _ = _adaptive_graph_shapes(embeddings)
    rows = min(chunk, nodes)
    cast = embeddings.numel() * size if size != embeddings.element_size() else 0
    return graphs * rows * nodes * size + cast


def _adaptive_propagate_workspace(args) -> int:
    # (embeddings, lse, x, chunk): one chunk of the graph (G, c, N) and its product (G, c, F); folded or cast
    # inputs, and the result in the computation's layout before it is unfolded or cast
    embeddings, _, x, chunk = args
    graphs, nodes, size, copied = _adaptive_graph_shapes(embeddings, x)
    rows = min(chunk, nodes)
    features = x.numel() // max(1, graphs * nodes)
    inputs = 2 * x.numel() * size + embeddings.numel() * size if copied else 0
    return graphs * rows * (nodes + features) * size + inputs


def _adaptive_propagate_backward_workspace(args) -> int:
    # (grad, embeddings, lse, x, chunk, needs): the graph's chunk and its gradient (G, c, N) in the compute dtype
    # and the ReLU mask (bool); row products (G, c, F) x 2 and (G, c, D); folded or cast inputs and gradients
    grad, embeddings, _, x, chunk = args[:5]
    graphs, nodes, size, copied = _adaptive_graph_shapes(embeddings, x)
    rows = min(chunk, nodes)
    features = x.numel() // max(1, graphs * nodes)
    chunk_buffers = graphs * rows * nodes * (2 * size + 1) + graphs * rows * (2 * features + embeddings.shape[-1]) * size
    inputs = (4 * x.numel() + 2 * embeddings.numel()) * size if copied else 0
    return chunk_buffers + inputs


OP_WORKSPACE = {
    "stfast::adaptive_graph_lse": _adaptive_graph_lse_workspace,
    "stfast::adaptive_propagate": _adaptive_propagate_workspace,
    "stfast::adaptive_propagate_backward": _adaptive_propagate_backward_workspace,
    "stfast::meta_gconv": _meta_gconv_forward_workspace,
    "stfast::meta_gconv_backward": _meta_gconv_backward_workspace,
    "stfast::gconv": _gconv_forward_workspace,
    "stfast::gconv_backward": _gconv_backward_workspace,
    "stfast::node_lora": _node_lora_forward_workspace,
    "stfast::node_lora_backward": _node_lora_backward_workspace,
}


# -- the counting dispatch mode --------------------------------------------------------------------------------------

class _StorageCounter(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive, and the peak of that count."""

    def __init__(self, block: int = 1):
        super().__init__()
        self.block = block
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        workspace = OP_WORKSPACE.get(func._schema.name)
        if workspace is not None:
            self.peak = max(self.peak, self.live + workspace(args))
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen and self._seen[key]() is storage:
            return
        size = -(-storage.nbytes() // self.block) * self.block
        self._seen[key] = weakref.ref(storage, lambda _, size=size, key=key: self._release(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _release(self, key: int, size: int) -> None:
        self._seen.pop(key, None)
        self.live -= size


# -- the step ------------------------------------------------------------------------------------------------------

def _forecaster(model: str, dataset: str, backend: str | None, context, overrides: dict):
    from . import models

    return models.create(model, dataset, backend=backend, context=context, **overrides)


def _batch(num_nodes: int, batch_size: int, config: dict, in_steps: int | None):
    """A batch of the dataset's shape: random values (memory does not depend on them), valid time features.
    Output steps follow the model's ``out_steps`` where it has one (an override), else the training's."""
    from .data import Batch, StandardScaler
    from .data.batch import positive_int

    def time_features(steps):
        return torch.cat([torch.rand(batch_size, steps, num_nodes, 1),
                          torch.randint(0, 7, (batch_size, steps, num_nodes, 1)).float()], dim=-1)

    training = config["training"]
    in_steps = positive_int(in_steps, "in_steps") if in_steps is not None else training.get("in_steps", 12)
    out_steps = config["model"].get("out_steps", training.get("out_steps", 12))
    x = torch.cat([torch.randn(batch_size, in_steps, num_nodes, 1), time_features(in_steps)], dim=-1)
    y = torch.rand(batch_size, out_steps, num_nodes, 1) * 100 + 1
    return Batch(x=x, y=y, y_cov=time_features(out_steps)), StandardScaler(50.0, 30.0)


def _run_step(forecaster, batch, scaler, optimizer, training: dict) -> None:
    from .metrics import get_loss
    from .training.step import train_step

    train_step(forecaster, batch, optimizer, get_loss(training["loss"]), scaler, batches_seen=0,
               clip_grad=training.get("clip_grad", 0.0))


def _optimizer(forecaster, training: dict):
    from .training.step import make_optimizer

    return make_optimizer(forecaster, training)


def _resting_bytes(forecaster, optimizer) -> tuple[int, int]:
    parameters = sum(p.numel() * p.element_size() for p in forecaster.parameters())
    state = sum(t.numel() * t.element_size() for per_param in optimizer.state.values()
                for t in per_param.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return parameters, state


def estimate_memory(model: str, batch_size: int, dataset: str, backend: str | None = None, *,
                    device: str = "cuda", context=None, in_steps: int | None = None, **overrides) -> MemoryEstimate:
    """Predict the memory of one training step of ``model`` (a zoo name, with its configuration on
    ``dataset``, ``overrides`` replacing model arguments) at ``batch_size``, from the shapes alone: see
    the module docstring.

    ``backend``: "reference" or an op backend (default: the model's own default). The fused backends
    (cpu, cuda, triton, torch) share the op's autograd and therefore what it saves; their work buffers
    come from :data:`OP_WORKSPACE`. ``device``: "cuda" rounds every block to 512 bytes, "cpu" does not.
    ``context``: the model's :class:`stfast.models.BuildContext` (default: the synthetic graph).
    ``in_steps``: input steps of the batch (default: the configuration's); an ``out_steps`` override of
    the model sets the output steps.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .configs import canonical_dataset, dataset_info
    from .data.batch import positive_int

    batch_size = positive_int(batch_size, "batch_size")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    dataset = canonical_dataset(dataset)
    context = _real_context(model, dataset) if context is None else context
    with FakeTensorMode(allow_non_fake_inputs=True), _no_random_state_change(), _traced_as_compiled(model):
        forecaster = _forecaster(model, dataset, backend, context, overrides)
        forecaster.train()
        training = forecaster.config["training"]
        optimizer, _ = _optimizer(forecaster, training)
        batch, scaler = _batch(dataset_info(dataset).num_nodes, batch_size, forecaster.config, in_steps)
        _run_step(forecaster, batch, scaler, optimizer, training)  # creates the optimiser's state
        parameters, state = _resting_bytes(forecaster, optimizer)
        optimizer.zero_grad(set_to_none=True)
        with _StorageCounter(block=_CUDA_BLOCK if device == "cuda" else 1) as counter:
            _run_step(forecaster, batch, scaler, optimizer, training)
            peak = counter.peak
    return MemoryEstimate(model, dataset, forecaster.backend, batch_size, device, parameters, state, peak)


def _real_context(model: str, dataset: str):
    """The build context (graph, training series) as real arrays: built outside the fake mode."""
    from . import models

    return models.build_context(model, dataset)


@contextlib.contextmanager
def _traced_as_compiled(model: str):
    """Fake tensors have no values: input checks that read them are skipped, as models skip them under
    ``torch.compile`` (``torch.compiler.is_compiling()``); any other read of a value is an error."""
    from unittest import mock

    from torch._subclasses.fake_tensor import DataDependentOutputException

    try:
        with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
            yield
    except DataDependentOutputException as error:
        raise ValueError(f"model: {model} reads tensor values in its training step ({error}); the memory model "
                         "traces shapes only and cannot follow it") from error


@contextlib.contextmanager
def _no_random_state_change():
    with torch.random.fork_rng(devices=[]):
        yield


def measure_step_memory(model: str, batch_size: int, dataset: str, backend: str | None = None, *, context=None,
                        seed: int = 0, in_steps: int | None = None, **overrides) -> MemoryEstimate:
    """Run one real training step on the CPU and measure what :func:`estimate_memory` predicts.

    ``step_peak`` is the peak of PyTorch's CPU allocations during the step (``torch.profiler``'s allocator
    events, relative to the step's start) after one untimed step that creates the gradients and the
    optimiser state; the parameters and the state are counted from the tensors.
    """
    from .configs import canonical_dataset, dataset_info
    from .data.batch import positive_int

    batch_size = positive_int(batch_size, "batch_size")
    dataset = canonical_dataset(dataset)
    with _no_random_state_change():
        torch.manual_seed(seed)
        context = _real_context(model, dataset) if context is None else context
        forecaster = _forecaster(model, dataset, backend, context, overrides)
        forecaster.train()
        training = forecaster.config["training"]
        optimizer, _ = _optimizer(forecaster, training)
        batch, scaler = _batch(dataset_info(dataset).num_nodes, batch_size, forecaster.config, in_steps)
        _run_step(forecaster, batch, scaler, optimizer, training)
        parameters, state = _resting_bytes(forecaster, optimizer)
        optimizer.zero_grad(set_to_none=True)
        peak = _allocation_peak(lambda: _run_step(forecaster, batch, scaler, optimizer, training))
    return MemoryEstimate(model, dataset, forecaster.backend, batch_size, "cpu", parameters, state, peak)


def _allocation_peak(step) -> int:
    """Peak of the bytes PyTorch's allocator holds during ``step()``, above what it held before."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
