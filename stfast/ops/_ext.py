"""The C++/CUDA extension (``csrc/``) and the ``cpu`` / ``cuda`` backends built on it.

The extension defines its own operator namespace, ``stfast_ext`` (``torch.ops.stfast_ext.
meta_gconv_fwd`` / ``meta_gconv_bwd``, kernels registered for the CPU and, when compiled with CUDA,
the CUDA dispatch keys). The public ops stay defined once, in Python (``stfast::meta_gconv`` in
:mod:`stfast.ops.meta_gconv`); this module registers thin wrappers around the ``stfast_ext`` ops as
the ``cpu`` and ``cuda`` backend implementations, with exactly the signatures of
``_torch_gconv.meta_gconv_forward`` / ``meta_gconv_backward``.

Loading (:func:`status`, called by the backend probes the first time the ``cpu`` / ``cuda``
backend is considered for a tensor on that device):

1. ``STFAST_SKIP_EXT=1`` disables the extension (install-time build and run-time loading).
2. ``stfast._C``, built by ``pip install -e .`` / ``setup.py`` when a C++ compiler was there.
3. Else a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load`` and ninja, cached
   under ``$STFAST_EXT_CACHE`` (default ``$XDG_CACHE_HOME/stfast/extensions`` or
   ``~/.cache/stfast/extensions``), one folder per source hash, torch and Python version; later
   processes reuse it (ninja rebuilds nothing). CUDA sources join when torch has CUDA and ``nvcc``
   is found; ``STFAST_CUDA_ARCH`` (e.g. ``"9.0"`` or ``"8.0;9.0"``) sets the arch list.
   ``STFAST_EXT_VERBOSE=1`` shows the compiler output.

Formulation: the CPU kernels choose theirs (``FORMULATION``, csrc/README.md). The CUDA kernels
always compute the "outer" formulation (``K = D*I``); for CUDA tensors whose S or T axis costs fewer
FLOPs "hoisted" (``W = E @ P`` once per node / sample, then a batched GEMM: about ``D`` times fewer
at HimNet's shapes), the call, forward or backward, runs the torch backend's hoisted path (cuBLAS)
instead of the extension: :func:`cuda_route` decides, by ``_formulation.call_formulation``'s count.

The CUDA kernels have a tensor-core path (sm_80+: fp16 / bf16 always, fp32 as TF32 where torch
allows TF32 matmuls); ``STFAST_CUDA_TENSOR_CORES=0``, or :func:`cuda_tensor_cores` (False) for a
block, makes them run their SIMT kernels instead.

When nothing loads, the reason is kept and reported by ``stfast.ops.available_backends()``; every
other backend keeps working.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from . import _torch_gconv, backends
from ._formulation import call_formulation

__all__ = [
    "FORMULATION",
    "SKIP_ENV",
    "build_info",
    "csrc_dir",
    "cuda_route",
    "jit_build_dir",
    "load",
    "meta_gconv_backward",
    "meta_gconv_forward",
    "node_lora_backward",
    "node_lora_dropout_mask",
    "node_lora_forward",
    "source_files",
    "sources_hash",
    "status",
]

SKIP_ENV = "STFAST_SKIP_EXT"
CACHE_ENV = "STFAST_EXT_CACHE"
ARCH_ENV = "STFAST_CUDA_ARCH"
VERBOSE_ENV = "STFAST_EXT_VERBOSE"
TENSOR_CORES_ENV = "STFAST_CUDA_TENSOR_CORES"  # read by the CUDA glue at every call (cuda_glue.h)

# How the CPU kernels organise the meta GEMM: "auto" (grouped for S / T, outer for ST), "outer" or
# "grouped" (see csrc/README.md). The CUDA kernels always use "outer"; with "auto", CUDA calls whose
# S / T axis is cheaper hoisted leave them for the hoisted torch GEMMs (cuda_route). Tests switch it.
FORMULATION = "auto"

# -fopenmp: at::parallel_for is inline and parallel only with OpenMP. -fno-trapping-math and
# -fno-math-errno (torch's own build flags; results unchanged) let loops with selects such as
# leaky_relu vectorise. setup.py passes the same flags.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
LD_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: bool | str | None = None  # None: not tried yet; True: loaded; str: why not
_origin = ""  # "installed stfast._C" or the JIT build folder


# ---------------------------------------------------------------- sources

def csrc_dir() -> Path | None:
    """``csrc/`` of a source checkout or editable install, or None (e.g. a wheel install)."""
    path = Path(__file__).resolve().parents[2] / "csrc"
    return path if (path / "stfast_ext.cpp").is_file() else None


def source_files(root: Path, cuda: bool) -> list[Path]:
    """The translation units: every ``.cpp`` in ``csrc/`` and ``csrc/cpu/``; with CUDA also the
    ``.cpp`` and ``.cu`` files of ``csrc/cuda/``. (``setup.py`` uses the same rule.)"""
    files = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if cuda:
        files += sorted((root / "cuda").glob("*.cpp")) + sorted((root / "cuda").glob("*.cu"))
    return files


def sources_hash(root: Path) -> str:
    """Hash of every source and header under ``root`` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in {".cpp", ".h", ".cu", ".cuh"}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return "src" + digest.hexdigest()[:16]


def _cuda_toolkit() -> bool | str:
    """True when CUDA sources can be compiled into this torch, else why not."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (shutil.which("nvcc") or (Path(CUDA_HOME) / "bin" / "nvcc").is_file()):
        return "nvcc was not found (set CUDA_HOME)"
    return True


def _cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stfast" / "extensions"


def jit_build_dir(root: Path, cuda: bool) -> tuple[str, Path]:
    """Library name and build folder of the JIT build of ``root``."""
    name = f"stfast_ext_{sources_hash(root)[3:15]}{'_cuda' if cuda else ''}"
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return name, _cache_root() / f"{name}-{tag}"


# ---------------------------------------------------------------- loading

def _short_error(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    picked = (errors or lines or [type(err).__name__])[:3]
    return " | ".join(picked)[:600]


_OPS = ("meta_gconv_fwd", "meta_gconv_bwd", "node_lora_fwd", "node_lora_bwd", "node_lora_dropout_mask")


def _registered() -> bool:
    """Every op of the current sources is registered (an extension built from older sources is not)."""
    return hasattr(torch.ops, "stfast_ext") and all(hasattr(torch.ops.stfast_ext, op) for op in _OPS)


def _load_installed() -> bool | str:
    try:
        importlib.import_module("stfast._C")
    except ModuleNotFoundError:
        return "stfast._C is not installed (package installed without the extension)"
    except (ImportError, OSError) as err:  # e.g. built against another torch
        return f"stfast._C failed to load: {_short_error(err)}"
    return True if _registered() else "stfast._C loaded but registered no stfast_ext ops"


def _load_jit() -> bool | str:
    root = csrc_dir()
    if root is None:
        return "no csrc/ sources next to the package for a just-in-time build"
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
    except (ImportError, RuntimeError):
        return "just-in-time build needs ninja (pip install ninja)"
    cuda = _cuda_toolkit() is True
    name, build_dir = jit_build_dir(root, cuda)
    flags = CXX_FLAGS + [f"-DSTFAST_SOURCES_HASH={sources_hash(root)}"]
    cuda_flags = ["-O3", f"-DSTFAST_SOURCES_HASH={sources_hash(root)}"]  # torch adds -std and the archs
    if cuda:
        flags.append("-DSTFAST_WITH_CUDA")
        cuda_flags.append("-DSTFAST_WITH_CUDA")
    previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda and os.environ.get(ARCH_ENV) and previous_arch is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ[ARCH_ENV]
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").is_file():
            print(f"stfast: building the C++{'/CUDA' if cuda else ''} extension in {build_dir} "
                  "(first use only; set STFAST_SKIP_EXT=1 to skip)", file=sys.stderr)
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in source_files(root, cuda)],
            extra_cflags=flags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=LD_FLAGS,
            extra_include_paths=[str(root)],
            build_directory=str(build_dir),
            with_cuda=cuda,
            is_python_module=False,
            verbose=os.environ.get(VERBOSE_ENV) == "1",
        )
    except Exception as err:  # noqa: BLE001 - any build or load failure becomes the reason
        return f"just-in-time build of csrc/ failed ({_short_error(err)}); set {VERBOSE_ENV}=1 for the log"
    finally:
        if cuda and os.environ.get(ARCH_ENV) and previous_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    global _origin
    _origin = str(build_dir)
    return True if _registered() else "the just-in-time build loaded but registered no stfast_ext ops"


def load() -> bool | str:
    """Load the extension once per process; True, or why it is unavailable."""
    global _state, _origin
    if _state is not None:  # lock-free once decided
        return _state
    with _lock:
        if _state is not None:
            return _state
        if os.environ.get(SKIP_ENV) == "1":
            _state = f"the stfast C++ extension is disabled ({SKIP_ENV}=1)"
            return _state
        if _registered():  # loaded by someone else (e.g. torch.ops.load_library)
            _state, _origin = True, "already registered"
            return _state
        installed = _load_installed()
        if installed is True:
            _state, _origin = True, "installed stfast._C"
            _warn_if_stale()
            return _state
        jit = _load_jit()
        _state = True if jit is True else f"the stfast C++ extension is unavailable: {installed}; {jit}"
        return _state


def _warn_if_stale() -> None:
    root = csrc_dir()
    if root is None:
        return
    info = build_info()
    built = dict(part.split("=", 1) for part in info.split() if "=" in part).get("sources")
    if built is not None and built != sources_hash(root):
        print("stfast: the installed extension stfast._C was built from other csrc/ sources than the ones "
              "next to the package; rebuild it with `pip install -e .`", file=sys.stderr)


def build_info() -> str:
    """``"cuda=0|1 openmp=0|1 sources=<hash>"`` of the loaded extension plus where it came from."""
    if load() is not True:
        return ""
    return f"{torch.ops.stfast_ext.build_info()} origin={_origin}"


def status(kind: str) -> bool | str:
    """True if the ``cpu`` / ``cuda`` kernels can run, else why not (loads on first call)."""
    loaded = load()
    if loaded is not True:
        return loaded
    if kind == "cuda" and not torch.ops.stfast_ext.has_cuda():
        toolkit = _cuda_toolkit()
        why = toolkit if toolkit is not True else "it was built before CUDA was available"
        return f"the stfast extension was built without CUDA kernels ({why})"
    return True


@contextlib.contextmanager
def cuda_tensor_cores(enabled: bool):
    """Inside the block the ``cuda`` kernels take their tensor-core path where they can (``True``,
    the default behaviour) or always run their SIMT kernels (``False``: for comparisons and
    benchmarks). It sets ``STFAST_CUDA_TENSOR_CORES``, which is process-wide, and restores it after."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    previous = os.environ.get(TENSOR_CORES_ENV)
    os.environ[TENSOR_CORES_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TENSOR_CORES_ENV, None)
        else:
            os.environ[TENSOR_CORES_ENV] = previous


# torch.compile traces the backend selection: evaluate status() while tracing and treat its result
# as a constant rather than tracing into the loader (locks, imports, builds). This is what
# torch._dynamo.assume_constant_result does, set directly so that importing stfast does not import
# dynamo (about a second).
status._dynamo_marked_constant = True


# ---------------------------------------------------------------- backend implementations

def cuda_route(device_type: str, formulation: str, x_shape, pool_shape, has_bias: bool, axis: str,
               needs=None) -> str:
    """Where a ``meta_gconv`` call of the ``cpu`` / ``cuda`` backends runs: ``"hoisted"`` (the torch
    backend's hoisted GEMMs) for CUDA tensors under ``formulation`` "auto" when the hoisted
    formulation costs fewer FLOPs (forward when ``needs`` is None, else the backward computing
    ``needs``), else ``"kernel"`` (the ``stfast_ext`` op). CPU tensors always get the kernel."""
    if device_type != "cuda" or formulation != "auto":
        return "kernel"
    return "hoisted" if call_formulation(x_shape, pool_shape, has_bias, axis, needs) == "hoisted" else "kernel"


def meta_gconv_forward(x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis):
    if cuda_route(x.device.type, FORMULATION, x.shape, pool.shape, bias_pool is not None, axis) == "hoisted":
        return _torch_gconv.meta_gconv_forward(x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis,
                                               formulation="hoisted")
    return torch.ops.stfast_ext.meta_gconv_fwd(
        x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis, FORMULATION
    )


def meta_gconv_backward(grad, out, x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis, needs):
    """``(dx, d supports, dE, dP, dPb)``, ``None`` where ``needs`` (same order) is false."""
    needs = [bool(n) for n in needs]
    if cuda_route(x.device.type, FORMULATION, x.shape, pool.shape, bias_pool is not None, axis, needs) == "hoisted":
        return _torch_gconv.meta_gconv_backward(grad, out, x, supports, embeddings, pool, bias_pool, cheb_k,
                                                activation, axis, needs, formulation="hoisted")
    grads = torch.ops.stfast_ext.meta_gconv_bwd(
        grad, out, x, supports, embeddings, pool, bias_pool, cheb_k, activation, axis, needs, FORMULATION
    )
    inputs = (x, supports, embeddings, pool, bias_pool)
    return tuple(g if need and t is not None else None for g, need, t in zip(grads, needs, inputs))


def node_lora_forward(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed):
    """``seed``: the int64 tensor ``(seed, offset)`` of the dropout draw, on x's device (the CUDA
    kernels read it from device memory)."""
    return torch.ops.stfast_ext.node_lora_fwd(x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed)


def node_lora_backward(grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, needs):
    """``(dx, dW, db, dA, dB)``, ``None`` where ``needs`` (same order) is false."""
    needs = [bool(n) for n in needs]
    grads = torch.ops.stfast_ext.node_lora_bwd(
        grad, x, weight, bias, lora_a, lora_b, scale, activation, dropout_p, seed, needs
    )
    inputs = (x, weight, bias, lora_a, lora_b)
    return tuple(g if need and t is not None else None for g, need, t in zip(grads, needs, inputs))


def node_lora_dropout_mask(x, dropout_p: float, seed: int, offset: int = 0):
    """The dropout multiplier (``keep / (1 - p)``, ``x``'s shape and dtype) that the ``cpu`` and
    ``cuda`` kernels draw for ``x`` (the same mask as the ``triton`` kernels'; see
    ``csrc/node_lora_math.h``)."""
    loaded = load()
    if loaded is not True:
        raise RuntimeError(loaded)
    return torch.ops.stfast_ext.node_lora_dropout_mask(x, float(dropout_p), int(seed), int(offset))


for _backend in ("cpu", "cuda"):
    backends.register_impl(_backend, "meta_gconv", meta_gconv_forward)
    backends.register_impl(_backend, "meta_gconv_backward", meta_gconv_backward)
    backends.register_impl(_backend, "node_lora", node_lora_forward)
    backends.register_impl(_backend, "node_lora_backward", node_lora_backward)
