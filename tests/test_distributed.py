"""DistributedDataParallel training on the CPU with gloo: 2 spawned processes against a single process.

With the same global batch and seed, two ranks (each taking half of every global batch) must end with
the parameters of one process (fp32 tolerance), and a DDP run stopped after one epoch and resumed must
end where an uninterrupted DDP run ends. Evaluation is sharded (each rank its batches, the sums
all-reduced): both ranks report the validation loss and test metrics of one process, on data with missing
readings, ragged last batches and a split with fewer batches than ranks. A small AGCRN on a 7-node series
keeps it cheap.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stfast import metrics, models
from stfast.data import ForecastData, StandardScaler, sliding_window_index
from stfast.configs import dataset_info
from stfast.training.distributed import DistributedContext, DistributedTrainer, per_rank_batch_size, teardown
from stfast.training.trainer import Trainer

NODES, STEPS, GLOBAL_BATCH, EPOCHS = 7, 80, 8, 2
# (global batch, max_batches) of the sharded evaluations. 40 / 6 / 11 train / val / test samples: at batch 8
# the validation split is one batch (fewer than the ranks) and the test split 8 + 3; at batch 4 the test split
# is three batches (an odd count); at batch 2 with max_batches 3, three of its six batches are evaluated.
EVALUATIONS = ((8, None), (4, None), (2, 3))


def _data(missing: bool = False) -> ForecastData:
    rng = np.random.default_rng(0)
    series = np.empty((STEPS, NODES, 3), dtype=np.float32)
    series[..., 0] = rng.uniform(20.0, 70.0, (STEPS, NODES))  # no zeros: the masked loss is a plain mean
    if missing:  # zeros are missing readings: the masked loss and metrics leave them out (evaluation only)
        series[..., 0][rng.random((STEPS, NODES)) < 0.3] = 0.0
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
    evaluations = [None] * world
    dist.all_gather_object(evaluations, _sharded_evaluations(whole.forecaster.model.state_dict(), context))
    if rank == 0:
        torch.save({"whole": whole.forecaster.model.state_dict(), "resumed": resumed.forecaster.model.state_dict(),
                    "losses": losses, "error": error, "epochs": whole.state.epoch, "evaluations": evaluations},
                   os.path.join(folder, "rank0.pt"))
    del whole, first, resumed, elsewhere  # no DistributedDataParallel module may outlive the process group
    teardown()


def _evaluator(weights, batch_size: int, max_batches, trainer_class=Trainer, **kwargs):
    forecaster = _forecaster()
    forecaster.model.load_state_dict(weights)
    return trainer_class(forecaster, _data(missing=True), dict(_training(forecaster), batch_size=batch_size),
                         progress=False, verbose=False, max_batches=max_batches, **kwargs)


def _evaluation(trainer) -> dict:
    return {"val_loss": trainer.evaluate_loss("val"), "test": trainer.evaluate("test"),
            "batches": {split: len(list(trainer._evaluation_batches(split))) for split in ("val", "test")}}


def _sharded_evaluations(weights, context) -> list[dict]:
    return [_evaluation(_evaluator(weights, batch_size, max_batches, DistributedTrainer, context=context))
            for batch_size, max_batches in EVALUATIONS]


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


@pytest.mark.parametrize("case", range(len(EVALUATIONS)), ids=[f"batch{b}-max{m}" for b, m in EVALUATIONS])
def test_sharded_evaluation_reports_the_single_process_numbers_on_every_rank(ddp_run, case):
    ranks = [evaluations[case] for evaluations in ddp_run["evaluations"]]
    single = _evaluation(_evaluator(ddp_run["whole"], *EVALUATIONS[case]))
    # each rank evaluated its own share of the batches, together exactly those of one process
    for split in ("val", "test"):
        assert [rank["batches"][split] for rank in ranks] == [
            len(range(r, single["batches"][split], 2)) for r in range(2)]
    # identical on both ranks (early stopping agrees), equal to one process within fp tolerance
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] and ranks[0]["test"] == ranks[1]["test"]
    assert ranks[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
    for horizon, expected in single["test"].items():
        assert ranks[0]["test"][horizon] == pytest.approx(expected, rel=1e-6), horizon


def test_a_rank_without_rank_0s_checkpoint_stops_with_an_error(ddp_run):
    assert "rank(s) [1] cannot read rank 0's checkpoint" in ddp_run["error"]


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of the world size 3 .*got 8"):
        per_rank_batch_size(8, 3)
    forecaster = _forecaster()
    with pytest.raises(ValueError, match=r"multiple of the world size 3"):
        DistributedTrainer(forecaster, _data(), _training(forecaster), context=DistributedContext(0, 3, 0))


# -- the pieces of sharded evaluation, without processes ------------------------------------------------------------

def _same_batches(got, expected) -> bool:
    return len(got) == len(expected) and all(
        torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.y_cov, b.y_cov) for a, b in zip(got, expected))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 16])
def test_the_shards_of_a_split_hold_each_of_its_batches_once(batch_size, world):
    data = _data()  # 11 test samples: ragged last batches, and fewer batches than ranks at 4 x 7 and 16 x 2
    whole = list(data.batches("test", batch_size))
    shards = [list(data.batches("test", batch_size, shard=(rank, world))) for rank in range(world)]
    assert _same_batches([shards[i % world][i // world] for i in range(len(whole))], whole)
    assert sum(len(shard) for shard in shards) == len(whole)


@pytest.mark.parametrize("max_batches", [1, 2, 3, 5])
def test_the_shards_respect_the_batch_limit_of_the_whole_pass(max_batches):
    forecaster = _forecaster()
    trainer = Trainer(forecaster, _data(), dict(_training(forecaster), batch_size=2), progress=False,
                      max_batches=max_batches)
    whole = list(trainer._batches("test"))
    shards = [list(trainer._batches("test", shard=(rank, 2))) for rank in range(2)]
    assert _same_batches([shards[i % 2][i // 2] for i in range(len(whole))], whole) and len(whole) == max_batches
    assert sum(len(shard) for shard in shards) == max_batches


def test_metric_sums_of_disjoint_parts_add_up_to_the_metrics_of_the_whole():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(9, 12, 5, 1, generator=generator) * 50
    target[torch.rand(target.shape, generator=generator) < 0.3] = 0.0  # missing readings
    pred = target + torch.randn(target.shape, generator=generator)
    whole = metrics.MetricAccumulator()
    whole.update(pred, target)
    parts = [metrics.MetricAccumulator() for _ in range(3)]
    for part, rows in zip(parts, (slice(0, 4), slice(4, 9), slice(9, 9))):  # the last part saw nothing
        if rows.start < rows.stop:
            part.update(pred[rows], target[rows])
    combined = metrics.MetricAccumulator()
    combined.sums = sum(part.sums for part in parts)
    for horizon, expected in whole.compute().items():
        assert combined.compute()[horizon] == pytest.approx(expected, rel=1e-12), horizon


def test_bad_shards_and_sums_are_refused_naming_the_argument():
    for shard in [(2, 2), (-1, 2), (0, 0), [0, 1], (True, 2), (0, 1, 2)]:
        with pytest.raises(ValueError, match=r"shard: expected \(index, count\) with 0 <= index < count"):
            next(_data().batches("test", 4, shard=shard))
    accumulator = metrics.MetricAccumulator(out_steps=12)
    with pytest.raises(ValueError, match=r"sums: expected a float64 tensor of shape \(4, 12\), got \(4, 6\) "
                                         r"torch.float64"):
        accumulator.sums = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sums: .*got \(4, 12\) torch.float32"):
        accumulator.sums = torch.zeros(4, 12)
