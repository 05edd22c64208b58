"""Training on several processes with PyTorch's own engine: DistributedDataParallel under ``torchrun``.

``torchrun --nproc-per-node K -m stfast train ...`` (``--nnodes`` for several machines) runs one
process per rank; :func:`setup` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)
and joins the process group (NCCL on CUDA, gloo on the CPU). :class:`DistributedTrainer` then:

- keeps the configuration's ``batch_size`` as the **global** batch: every rank takes ``batch_size / K``
  samples of it (a batch size the world size does not divide is refused), so a run on K processes takes
  the same optimisation steps as a single process with that batch. All ranks shuffle with the same seeded
  generator and rank r takes the r-th slice of every global batch; the last, partial batch is split as
  evenly as possible and dropped when a rank would get no sample;
- runs the step through ``DistributedDataParallel`` (gradients averaged across ranks by its all-reduce);
- shards evaluation (the validation loss of every epoch, the test metrics): rank r evaluates batches
  r, r + K, r + 2K, ... of the split (at the global batch size; every sample once, a rank with no batch
  contributes zeros) and the float64 sums the numbers are made of (loss x samples and samples; the
  masked MAE / RMSE / MAPE sums and valid counts per horizon step) are all-reduced, so every rank reports
  the single-process numbers (within fp tolerance) and decides early stopping and the best epoch identically;
- lets only rank 0 take the run folder's lock and write checkpoints, logs, metrics and the progress
  bar (other ranks print nothing on stdout), with a barrier after every epoch so that every rank sees
  the files rank 0 wrote;
- resumes every rank from rank 0's ``last.pt`` (a rank that cannot see it, e.g. without a shared file
  system, stops with an error naming the path).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from stfast.data.batch import Batch
from stfast.training.trainer import Trainer

__all__ = ["DistributedContext", "setup", "teardown", "per_rank_batch_size", "DistributedTrainer"]


class DistributedContext:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str | torch.device) -> torch.device:
        """The rank's device: ``cuda:<local_rank>`` for a CUDA run, the CPU otherwise."""
        device = torch.device(device)
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device


def _environment_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer (set by torchrun), got {value!r}") from None


def setup(device: str | torch.device = "cpu") -> DistributedContext | None:
    """Join torchrun's process group; None when this process was not started by torchrun (or K = 1)."""
    if "WORLD_SIZE" not in os.environ or _environment_int("WORLD_SIZE") <= 1:
        return None
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{name}: expected in the environment of a distributed run (torchrun sets it), got none")
    context = DistributedContext(_environment_int("RANK"), _environment_int("WORLD_SIZE"),
                                 _environment_int("LOCAL_RANK"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(teardown)
    if not context.is_main:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # rank 0 speaks for the job; errors stay on stderr
    return context


def teardown() -> None:
    """Leave the job. Drop every DistributedDataParallel module first: one still alive when the process
    group is destroyed can abort the process at exit (gloo, seen on CPU in about 1 run in 8)."""
    if dist.is_initialized():
        gc.collect()  # DDP modules held only by reference cycles
        dist.destroy_process_group()


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"batch_size: expected a multiple of the world size {world_size} (the global batch is "
                         f"split evenly over the ranks: per-rank batch x {world_size}), got {batch_size}")
    return batch_size // world_size


class _DistributedForecaster(DistributedDataParallel):
    """DDP around a Forecaster that still answers ``spec``, ``config``, ``auxiliary_loss`` ... like it."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DistributedTrainer(Trainer):
    """:class:`Trainer` for one rank of a torchrun job (see the module docstring)."""

    def __init__(self, forecaster, data, training: dict, *, context: DistributedContext, **kwargs):
        per_rank_batch_size(training["batch_size"], context.world_size)
        self.context = context
        if not context.is_main:
            kwargs.update(progress=False, verbose=False)
        super().__init__(forecaster, data, training, **kwargs)
        if not context.is_main:
            self._run_lock = None  # rank 0 holds the folder; the others only read from it
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.step_module = _DistributedForecaster(self.forecaster, device_ids=device_ids)

    # -- data ----------------------------------------------------------------------------------
    def _batches(self, split, shuffle=False):
        batches = super()._batches(split, shuffle)
        return self._shards(batches) if split == "train" else batches

    def _evaluation_batches(self, split):
        # whole batches, one in K (not slices of each): per batch, the loss is the single process's
        return super()._batches(split, shard=(self.context.rank, self.context.world_size))

    def _shards(self, batches):
        for batch in batches:
            pieces = [torch.tensor_split(t, self.context.world_size) for t in (batch.x, batch.y, batch.y_cov)]
            if any(len(piece) == 0 for piece in pieces[0]):
                continue  # a last batch smaller than the world: no rank may step on nothing
            yield Batch(*(piece[self.context.rank] for piece in pieces))

    # -- agreement across ranks ------------------------------------------------------------------
    def _sum_over_processes(self, sums: torch.Tensor) -> torch.Tensor:
        total = sums.to(self._collective_device(), torch.float64, copy=True)
        dist.all_reduce(total)
        # every rank takes rank 0's copy: identical bits everywhere by construction, not by the reduction's order
        dist.broadcast(total, src=0)
        return total

    def _record(self, train_loss: float, val_loss: float) -> None:
        super()._record(train_loss, val_loss)
        dist.barrier()  # rank 0's checkpoints of this epoch are on disk before anyone goes on

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def resume(self, *, allow_unsafe: bool = False) -> bool:
        path = self.out_dir / "last.pt" if self.out_dir is not None else None
        found = path is not None and path.is_file()
        seen = [None] * self.context.world_size
        dist.all_gather_object(seen, found)
        if not seen[0]:
            return False
        missing = [rank for rank, has in enumerate(seen) if not has]
        if missing:
            raise FileNotFoundError(f"--resume: rank(s) {missing} cannot read rank 0's checkpoint {path}; every rank "
                                    "must see the run folder (a shared file system across machines)")
        resumed = super().resume(allow_unsafe=allow_unsafe)
        dist.barrier()
        return resumed

    # -- only rank 0 writes ----------------------------------------------------------------------
    def save_last(self) -> None:
        if self.context.is_main:
            super().save_last()

    def save_best(self) -> None:
        if self.context.is_main:
            super().save_best()

    def write_metrics(self, results: dict):
        return super().write_metrics(results) if self.context.is_main else None

    def _run_logs(self):
        return super()._run_logs() if self.context.is_main else contextlib.nullcontext()
