"""DistributedDataParallel training on the CPU with gloo: 2 spawned processes against a single process.

With the same global batch and seed, two ranks (each taking half of every global batch) must end with
the parameters of one process (fp32 tolerance), and a DDP run stopped after one epoch and resumed must
end where an uninterrupted DDP run ends. A small AGCRN on a 7-node series keeps it cheap.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stfast import models
from stfast.data import ForecastData, StandardScaler, sliding_window_index
from stfast.configs import dataset_info
from stfast.training.distributed import DistributedContext, DistributedTrainer, per_rank_batch_size, teardown
from stfast.training.trainer import Trainer

NODES, STEPS, GLOBAL_BATCH, EPOCHS = 7, 80, 8, 2


def _data() -> ForecastData:
    rng = np.random.default_rng(0)
    series = np.empty((STEPS, NODES, 3), dtype=np.float32)
    series[..., 0] = rng.uniform(20.0, 70.0, (STEPS, NODES))  # no zeros: the masked loss is a plain mean
    series[..., 1] = (np.arange(STEPS) % 288 / 288.0)[:, None]
    series[..., 2] = (np.arange(STEPS) // 288 % 7)[:, None]
    index = sliding_window_index(dataset_info("METR-LA"), STEPS)
    scaler = StandardScaler(float(series[..., 0].mean()), float(series[..., 0].std()))
    return ForecastData("METR-LA", series, scaler, index)


def _forecaster():
    torch.manual_seed(0)
    return models.create("agcrn", "METR-LA", backend="reference", num_nodes=NODES, rnn_units=8, embed_dim=3)


def _training(forecaster) -> dict:
    return dict(forecaster.config["training"], batch_size=GLOBAL_BATCH, early_stop=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    context = DistributedContext(rank, world, rank)
    data = _data()

    def trainer(out_dir):
        forecaster = _forecaster()
        return DistributedTrainer(forecaster, data, _training(forecaster), context=context, out_dir=out_dir,
                                  progress=False, verbose=False)

    whole = trainer(os.path.join(folder, "whole"))
    whole.fit(EPOCHS)
    first = trainer(os.path.join(folder, "resumed"))
    first.fit(1)
    resumed = trainer(os.path.join(folder, "resumed"))
    assert resumed.resume() and resumed.state.epoch == 1
    resumed.fit(EPOCHS)
    # every rank holds the same weights and the same validation loss
    losses = [None] * world
    dist.all_gather_object(losses, whole.evaluate_loss("val"))
    # a rank that cannot see rank 0's checkpoint stops with an error naming it
    elsewhere = trainer(os.path.join(folder, "whole" if rank == 0 else f"empty{rank}"))
    try:
        elsewhere.resume()
        error = None
    except FileNotFoundError as caught:
        error = str(caught)
    if rank == 0:
        torch.save({"whole": whole.forecaster.model.state_dict(), "resumed": resumed.forecaster.model.state_dict(),
                    "losses": losses, "error": error, "epochs": whole.state.epoch},
                   os.path.join(folder, "rank0.pt"))
    del whole, first, resumed, elsewhere  # no DistributedDataParallel module may outlive the process group
    teardown()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return torch.load(folder / "rank0.pt", weights_only=True)


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(ddp_run, tmp_path):
    forecaster = _forecaster()
    single = Trainer(forecaster, _data(), _training(forecaster), out_dir=tmp_path, progress=False, verbose=False)
    single.fit(EPOCHS)
    assert ddp_run["epochs"] == EPOCHS
    expected = single.forecaster.model.state_dict()
    for name, value in ddp_run["whole"].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the weights moved: the comparison is not between two untouched initialisations
    assert any(not torch.equal(value, _forecaster().model.state_dict()[name]) for name, value in expected.items())


def test_resumed_ddp_run_matches_an_uninterrupted_one(ddp_run):
    for name, value in ddp_run["whole"].items():
        torch.testing.assert_close(ddp_run["resumed"][name], value, rtol=0, atol=0, msg=name)


def test_every_rank_reports_the_same_validation_loss(ddp_run):
    assert ddp_run["losses"][0] == ddp_run["losses"][1]


def test_a_rank_without_rank_0s_checkpoint_stops_with_an_error(ddp_run):
    assert "rank(s) [1] cannot read rank 0's checkpoint" in ddp_run["error"]


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of the world size 3 .*got 8"):
        per_rank_batch_size(8, 3)
    forecaster = _forecaster()
    with pytest.raises(ValueError, match=r"multiple of the world size 3"):
        DistributedTrainer(forecaster, _data(), _training(forecaster), context=DistributedContext(0, 3, 0))
