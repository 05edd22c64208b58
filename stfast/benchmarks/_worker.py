"""One row of the efficiency table, measured in a process of its own.

    python -m stfast.benchmarks._worker SPEC.json RESULT.json

The parent (:mod:`stfast.benchmarks.efficiency`) starts one such process per (model, backend) so
that the memory one run leaves behind cannot hide the next one's (CPU resident-set growth and the
CUDA caching allocator are per process) and so that a crash or an out-of-memory kill ends that row
only. ``SPEC.json`` holds the row's settings; ``RESULT.json`` receives ``{"ok": true, ...}`` with the
profiler's report, or ``{"ok": false, "error": ..., "traceback": ...}``. Progress goes to stderr.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import time
import traceback

from .report import STLORA_PREFIX


def _wrap_stlora():
    """``stfast.nn.stlora.wrap_forecaster`` when the ST-LoRA modules exist in this install, else None."""
    try:
        from ..nn import stlora
    except ImportError:
        return None
    return getattr(stlora, "wrap_forecaster", None)


def build(spec: dict):
    """The forecaster of ``spec`` (on the CPU, parameters initialised from ``spec["seed"]``)."""
    import torch

    from .. import models

    if spec.get("builder"):  # "module:function" building a variant, e.g. stfast.benchmarks.stlora's
        module, _, function = spec["builder"].partition(":")
        return getattr(importlib.import_module(module), function)(spec)
    name = spec["model"]
    wrap = None
    if name.startswith(STLORA_PREFIX):
        name = name[len(STLORA_PREFIX):]
        wrap = _wrap_stlora()
        if wrap is None:
            raise ImportError("ST-LoRA rows need stfast.nn.stlora.wrap_forecaster, which this install lacks")
    torch.manual_seed(spec["seed"])
    context = models.build_context(name, spec["dataset"], data=real_data(spec), synthetic_seed=spec["seed"])
    forecaster = models.create(name, spec["dataset"], backend=spec["backend"], context=context)
    return wrap(forecaster) if wrap is not None else forecaster


@functools.lru_cache(maxsize=1)
def _load_real_data(dataset: str, path: str, graph: str | None):
    from ..data import load_dataset

    return load_dataset(dataset, path, graph=graph)


def real_data(spec: dict):
    """The dataset read from ``spec["data"]`` (and ``spec["graph"]``), or None: synthetic data of its shape."""
    if not spec.get("data"):
        return None
    return _load_real_data(spec["dataset"], spec["data"], spec.get("graph"))


def measured_batch(spec: dict, device):
    """``(batch, scaler)`` of the timed steps: the first training batch of the real data when a file was
    given, else a synthetic batch of the dataset's exact shape (the time depends on the shapes only)."""
    data = real_data(spec)
    if data is None:
        from ..data import synthetic_batch

        return synthetic_batch(spec["dataset"], spec["batch_size"], seed=spec["seed"], device=device,
                               return_scaler=True)
    batch = next(data.batches("train", spec["batch_size"], device=device), None)
    if batch is None or batch.x.shape[0] != spec["batch_size"]:
        raise ValueError(f"--data: {spec['data']} has fewer than batch size {spec['batch_size']} training windows")
    return batch, data.scaler


def resolved_backend(backend: str, device) -> str:
    """The op backend that ``backend`` ("auto" included) runs HimNet's ops with on ``device``."""
    if backend == "reference":
        return "reference"
    from .. import ops

    with ops.use_backend(backend):
        return ops.resolve_backend("meta_gconv", device)


def full_epoch(forecaster, spec: dict, device) -> dict:
    """One real training epoch over the synthetic dataset of the dataset's full shape (shuffled
    batches cut from the series, as :class:`stfast.training.Trainer` does), timed end to end."""
    import torch

    from ..data import load_dataset
    from ..training.step import make_optimizer, train_step
    from ..metrics import get_loss

    data = load_dataset(spec["dataset"], synthetic=True, seed=spec["seed"])
    training = forecaster.config["training"]
    loss_fn = get_loss(training["loss"])
    forecaster.to(device).train()
    optimizer, _ = make_optimizer(forecaster, training)
    total = data.num_batches("train", spec["batch_size"])
    every = max(total // 20, 1)
    generator = torch.Generator().manual_seed(spec["seed"])
    start = time.perf_counter()
    for i, batch in enumerate(data.batches("train", spec["batch_size"], shuffle=True, generator=generator,
                                           device=device)):
        train_step(forecaster, batch, optimizer, loss_fn, data.scaler, batches_seen=i,
                   clip_grad=training.get("clip_grad", 0.0))
        if (i + 1) % every == 0 or i + 1 == total:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            print(f"    full epoch {i + 1}/{total} batches, {elapsed:,.0f} s, "
                  f"about {elapsed / (i + 1) * (total - i - 1):,.0f} s left", file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start, "batches": total}


def measure(spec: dict) -> dict:
    import torch

    from ..profiler import profile

    device = torch.device(spec["device"])
    started = time.perf_counter()
    forecaster = build(spec)
    build_s = time.perf_counter() - started
    # Resolving the backend probes it (a just-in-time build of the C++ extension happens here, untimed).
    backend = resolved_backend(spec["backend"], device)
    batch, scaler = measured_batch(spec, device)
    report = profile(forecaster, batch, scaler=scaler, warmup=spec["warmup"], repeats=spec["repeats"],
                     device=device, seed=spec["seed"], precision=spec.get("precision", "fp32"))
    result = {"ok": True, "report": report.to_dict(), "build_s": build_s,
              "resolved_backend": backend, "torch": torch.__version__}
    if spec.get("full_epoch"):
        del batch
        result["full_epoch"] = full_epoch(forecaster, spec, device)
    return result


def main(argv=None) -> int:
    spec_path, result_path = (sys.argv[1:] if argv is None else argv)[:2]
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        result = measure(spec)
        code = 0
    except BaseException as error:  # the row is reported as an error; the table goes on
        result = {"ok": False, "error": f"{type(error).__name__}: {error}".strip(),
                  "traceback": traceback.format_exc()}
        code = 1
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
