"""Time and memory of one training batch, as the efficiency table of HimNet (KDD 2024) reports them.

The unit timed is :func:`stfast.training.step.train_step`: forward in training mode (teacher
forcing on where the model has it), loss on unscaled values, backward, gradient clipping and an
Adam step with the published settings. Time per epoch is the median time per batch times the
number of training batches of the full dataset (1,499 for METR-LA at batch 16), as in the table
(``shared/specs/baselines.md`` sections 2 and 19).

Profiling trains the model for ``warmup + repeats`` steps, but :func:`profile` restores the
parameters, buffers, gradients, train/eval mode, device and the global NumPy/torch random states
afterwards, so the caller's model is left as it was.

Memory is reported in MiB (2**20 bytes, what ``nvidia-smi`` calls MB):

- CUDA: ``allocated`` and ``reserved`` are the caching allocator's peaks over the timed steps;
  ``process`` is the device memory the driver reports for this process after them (CUDA context
  and allocator cache included; the table's memory column matches this one, see the spec), with
  ``process_source`` saying how it was read. Only ``"nvml_process"`` is truly per process; the
  fallbacks ``"nvml_device"`` and ``"cuda_mem_get_info"`` are device-wide and include other
  processes on the same GPU.
- CPU: ``rss_growth`` is the peak resident set size during the timed steps minus the resident set
  size before them, after returning freed heap pages to the OS (glibc ``malloc_trim``) so that
  pages left resident by the warm-up or by an earlier model do not hide the step's working set. On Linux the kernel's high-water mark is reset through ``/proc/self/clear_refs``
  (``rss_source: "vmhwm"``); where that file is not writable a thread samples ``/proc/self/statm``
  every millisecond (``"statm_sampler"``, may miss peaks shorter than that). Elsewhere
  ``resource.getrusage`` gives a lifetime peak that cannot be reset (``"getrusage"``), so the growth
  is 0 unless the steps exceed every earlier peak of the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .memory import MemoryEstimate, estimate_memory, measure_step_memory
from .metrics import get_loss
from .models import count_parameters
from .training.precision import Precision
from .training.step import make_optimizer, train_step

__all__ = ["ProfileReport", "describe_device", "device_slug", "profile", "MemoryEstimate", "estimate_memory", "measure_step_memory"]

_MIB = float(2**20)


@dataclass
class ProfileReport:
    params: int
    time_per_batch_ms: dict
    time_per_epoch_s: float
    peak_memory_mb: dict
    device: str
    precision: str = "fp32"  # fp32 / tf32 / bf16 / fp16 (stfast.training.precision)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path=None) -> str:
        """The report as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileReport":
        return cls(**data)

    @classmethod
    def from_json(cls, path) -> "ProfileReport":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def format(self) -> str:
        times = self.time_per_batch_ms
        lines = [
            f"params          {self.params:,}",
            f"time per batch  {times['median']:.2f} ms median of {times['repeats']} "
            f"[min {times['min']:.2f}, max {times['max']:.2f}]",
            f"time per epoch  {self.time_per_epoch_s:,.1f} s",
            f"peak memory     {_format_memory(self.peak_memory_mb)}",
            f"device          {self.device}",
            f"precision       {self.precision}",
        ]
        return "\n".join(lines)


def _format_memory(memory: dict) -> str:
    numbers = [f"{key} {value:,.1f} MB" for key, value in memory.items() if isinstance(value, (int, float))]
    sources = [f"{key}: {value}" for key, value in memory.items() if isinstance(value, str)]
    return ", ".join(numbers) + (f" ({', '.join(sources)})" if sources else "")


def profile(forecaster, batch, *, scaler, loss=None, training=None, warmup=3, repeats=10,
            num_train_batches=None, device=None, seed=0, on_step=None, precision="fp32") -> ProfileReport:
    """Time ``repeats`` training steps on ``batch`` after ``warmup`` untimed ones.

    ``forecaster`` is a :class:`stfast.models.Forecaster`; ``training`` overrides entries of its
    config's "training" dict (lr, eps, weight_decay, milestones, lr_decay_rate, clip_grad). ``loss`` is a
    name accepted by :func:`stfast.metrics.get_loss`, a callable ``(pred, target) -> loss``, or
    None for the config's published loss. ``device`` moves the model and the batch there for the
    run; without it the batch's device is used and the model must already be on it.
    ``num_train_batches`` replaces the dataset's training-batch count in the epoch time.
    ``on_step(phase)`` (``"warm-up"`` or ``"timed"``) is called after every step, outside the timed
    interval: a progress line for runs that take minutes. ``precision``: ``"fp32"``, ``"tf32"``,
    ``"bf16"`` or ``"fp16"`` (:class:`stfast.training.precision.Precision`).
    """
    on_step = on_step or (lambda phase: None)
    _check_counts(warmup=warmup, repeats=repeats)
    if num_train_batches is not None:
        _check_counts(num_train_batches=num_train_batches)
    training = {**forecaster.config["training"], **(training or {})}
    loss_fn = _resolve_loss(loss, training)
    device = _resolve_device(forecaster, batch, device)
    _check_batch(forecaster, batch, device)
    numerics = Precision(precision, device)
    grad_scaler = numerics.grad_scaler()
    if num_train_batches is None:
        num_train_batches = forecaster.config["dataset"].train_batches(len(batch))

    with _restored_model(forecaster), _restored_random_state(device, seed), numerics.matmul_precision():
        forecaster.to(device).train()
        batch = batch.to(device=device)
        optimizer, _ = make_optimizer(forecaster, training)

        def step(batches_seen):
            train_step(forecaster, batch, optimizer, loss_fn, scaler, batches_seen=batches_seen,
                       clip_grad=training.get("clip_grad", 0.0), precision=numerics, grad_scaler=grad_scaler)

        for i in range(warmup):
            step(i)
            on_step("warm-up")
        times_ms, memory = _timed_steps(step, range(warmup, warmup + repeats), device, on_step)

    median = statistics.median(times_ms)
    return ProfileReport(
        params=count_parameters(forecaster),
        time_per_batch_ms={"median": median, "min": min(times_ms), "max": max(times_ms), "repeats": repeats},
        time_per_epoch_s=median * num_train_batches / 1000,
        peak_memory_mb=memory,
        device=describe_device(device),
        precision=numerics.name,
    )


# ---------------------------------------------------------------------------------------- input


def _check_counts(**counts) -> None:
    minimum = {"warmup": 0, "repeats": 1, "num_train_batches": 1}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum[name]:
            raise ValueError(f"{name}: expected an int >= {minimum[name]}, got {value!r}")


def _resolve_loss(loss, training: dict):
    if callable(loss):
        return loss
    return get_loss(training["loss"] if loss is None else loss)


def _model_parameter(forecaster) -> torch.Tensor:
    trainable = [p for p in forecaster.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"forecaster: expected a model with trainable parameters, got "
                         f"{type(getattr(forecaster, 'model', forecaster)).__name__} with none; "
                         "a training step cannot be profiled")
    return trainable[0]


def _resolve_device(forecaster, batch, device) -> torch.device:
    parameter = _model_parameter(forecaster)
    if device is not None:
        return torch.device(device)
    if batch.x.device != parameter.device:
        raise ValueError(f"batch: expected device {parameter.device} (the forecaster's), got {batch.x.device}; "
                         "pass device= to move both")
    return batch.x.device


def _check_batch(forecaster, batch, device: torch.device) -> None:
    expected_nodes = forecaster.config.get("model", {}).get("num_nodes")
    if expected_nodes is not None and batch.x.shape[2] != expected_nodes:
        raise ValueError(f"batch: expected {expected_nodes} nodes (the forecaster's num_nodes), "
                         f"got x of shape {tuple(batch.x.shape)}")
    for name in ("y", "y_cov"):
        tensor = getattr(batch, name)
        if tensor.device != batch.x.device:
            raise ValueError(f"batch.{name}: expected device {batch.x.device} (the device of batch.x), "
                             f"got {tensor.device}")
    dtype = _model_parameter(forecaster).dtype
    if batch.x.dtype != dtype:
        raise TypeError(f"batch: expected dtype {dtype} (the forecaster's parameters), got {batch.x.dtype}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a cpu or cuda device (the ones the profiler can time), got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available")


# ------------------------------------------------------------------------------- model restore


@contextlib.contextmanager
def _restored_model(forecaster):
    # The saved copies live on the CPU so that they do not count in the device's peak memory.
    state = {key: value.detach().to("cpu", copy=True) for key, value in forecaster.state_dict().items()}
    grads = [(p, None if p.grad is None else p.grad.detach().to("cpu", copy=True)) for p in forecaster.parameters()]
    device = _model_parameter(forecaster).device
    was_training = forecaster.training
    try:
        yield
    finally:
        forecaster.to(device)
        forecaster.load_state_dict(state)
        for parameter, grad in grads:
            parameter.grad = None if grad is None else grad.to(parameter.device)
        forecaster.train(was_training)


@contextlib.contextmanager
def _restored_random_state(device: torch.device, seed: int):
    numpy_state = np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        np.random.seed(seed)
        # Not torch.manual_seed: it would also reseed every CUDA device, which fork_rng does not restore.
        torch.random.default_generator.manual_seed(seed)
        if cuda_devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


# ------------------------------------------------------------------------------------- timing


def _timed_steps(step, batches_seen, device: torch.device, on_step):
    if device.type == "cuda":
        return _timed_steps_cuda(step, batches_seen, device, on_step)
    return _timed_steps_cpu(step, batches_seen, on_step)


def _timed_steps_cuda(step, batches_seen, device, on_step):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times_ms = []
    for i in batches_seen:
        start = time.perf_counter()
        step(i)
        torch.cuda.synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1000)
        on_step("timed")
    process_bytes, source = _cuda_process_memory(device)
    memory = {
        "allocated": torch.cuda.max_memory_allocated(device) / _MIB,
        "reserved": torch.cuda.max_memory_reserved(device) / _MIB,
        "process": None if process_bytes is None else process_bytes / _MIB,
        "process_source": source,
    }
    return times_ms, memory


def _timed_steps_cpu(step, batches_seen, on_step):
    times_ms = []
    with _PeakRss() as rss:
        for i in batches_seen:
            start = time.perf_counter()
            step(i)
            times_ms.append((time.perf_counter() - start) * 1000)
            on_step("timed")
    return times_ms, {"rss_growth": rss.growth_bytes / _MIB, "rss_source": rss.source}


# ------------------------------------------------------------------------------------- memory


def _cuda_process_memory(device: torch.device):
    """(bytes, source) of the device memory held by this process, as the driver reports it."""
    used = _nvml_process_memory(device)
    if used is not None:
        return used, "nvml_process"
    if hasattr(torch.cuda, "device_memory_used"):
        with contextlib.suppress(Exception):
            return int(torch.cuda.device_memory_used(device)), "nvml_device"
    with contextlib.suppress(Exception):
        free, total = torch.cuda.mem_get_info(device)
        return total - free, "cuda_mem_get_info"
    return None, "unavailable"


def _nvml_process_memory(device: torch.device):
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    # Inside a container the driver may list host PIDs; then no entry matches and we fall back.
    mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory is not None]
    return sum(mine) if mine else None


def _nvml_handle(pynvml, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        with contextlib.suppress(Exception):
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _read_status_kib(*fields) -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                values[key] = int(rest.split()[0])
    return values


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakRss:
    """Context manager measuring ``growth_bytes`` = peak RSS inside minus RSS on entry."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.growth_bytes = 0
        self.source = ""

    def __enter__(self):
        _release_free_heap()
        if sys.platform.startswith("linux") and _reset_peak_rss():
            self.source = "vmhwm"
            self._before = _read_status_kib("VmRSS")["VmRSS"] * 1024
        elif sys.platform.startswith("linux"):
            self.source = "statm_sampler"
            self._start_sampler()
        else:
            self.source = "getrusage"
            self._before = _getrusage_peak_bytes()
        return self

    def __exit__(self, *exc):
        if self.source == "vmhwm":
            peak = _read_status_kib("VmHWM")["VmHWM"] * 1024
        elif self.source == "statm_sampler":
            peak = self._stop_sampler()
        else:
            peak = _getrusage_peak_bytes()
        self.growth_bytes = max(peak - self._before, 0)
        return False

    def _start_sampler(self):
        self._before = _statm_rss_bytes()
        self._peak = self._before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _statm_rss_bytes())
            time.sleep(self.interval_s)

    def _stop_sampler(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self._peak, _statm_rss_bytes())


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so that the baseline RSS is live
    memory only: otherwise the steps reuse pages an earlier run left resident (a previous model,
    the warm-up) and their working set does not show as growth."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _statm_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _getrusage_peak_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


# ------------------------------------------------------------------------------------- device


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device) -> str:
    """``"cpu (<CPU model>, <threads> threads)"`` or ``"cuda:<i> (<GPU name>)"``: how results name their device."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads)"
    return str(device)


def device_slug(description: str) -> str:
    """A device description as a results folder name: ``"cpu (Intel(R) Xeon(R) Processor, 2 threads)"``
    -> ``"cpu-intel-xeon-processor-2-threads"`` (trademark marks dropped)."""
    plain = re.sub(r"\((r|tm)\)", "", description.lower())
    return re.sub(r"[^a-z0-9]+", "-", plain).strip("-") or "device"
