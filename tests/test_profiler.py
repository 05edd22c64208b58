import json

import numpy as np
import pytest
import torch
from torch import nn

from stfast import configs, profiler
from stfast.data import Batch, StandardScaler, synthetic_batch
from stfast.models import Forecaster, ModelSpec, count_parameters, create
from stfast.profiler import ProfileReport, profile


def make_batch(dataset, batch_size, num_nodes=None):
    """A synthetic batch of ``dataset``, optionally cut down to its first ``num_nodes`` sensors."""
    batch = synthetic_batch(dataset, batch_size, seed=0)
    if num_nodes is None:
        return batch
    return Batch(*(t[:, :, :num_nodes].contiguous() for t in (batch.x, batch.y, batch.y_cov)))


SCALER = StandardScaler(50.0, 20.0)
REPORT_KEYS = {"params", "time_per_batch_ms", "time_per_epoch_s", "peak_memory_mb", "device", "precision"}


@pytest.fixture(scope="module")
def himnet():
    torch.manual_seed(0)
    return create("himnet", "PEMS08", hidden_dim=8)


@pytest.fixture(scope="module")
def pems08_batch():
    return make_batch("PEMS08", 2)


def _state_copy(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_profile_himnet_report(himnet, pems08_batch, tmp_path):
    himnet.eval()
    before = _state_copy(himnet)
    numpy_state, torch_state = np.random.get_state(), torch.get_rng_state()

    report = profile(himnet, pems08_batch, scaler=SCALER, warmup=1, repeats=2)

    data = report.to_dict()
    assert set(data) == REPORT_KEYS
    assert data["params"] == count_parameters(himnet)
    times = data["time_per_batch_ms"]
    assert set(times) == {"median", "min", "max", "repeats"} and times["repeats"] == 2
    assert 0 < times["min"] <= times["median"] <= times["max"]
    train_batches = configs.dataset_info("PEMS08").train_batches(2)
    assert data["time_per_epoch_s"] == pytest.approx(times["median"] * train_batches / 1000)
    assert data["peak_memory_mb"]["rss_growth"] >= 0
    assert data["peak_memory_mb"]["rss_source"] in {"vmhwm", "statm_sampler", "getrusage"}
    assert data["device"].startswith("cpu (") and "threads)" in data["device"]

    after = himnet.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not himnet.training and all(p.grad is None for p in himnet.parameters())
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)

    path = tmp_path / "report.json"
    report.to_json(path)
    assert set(json.loads(path.read_text())) == REPORT_KEYS
    assert ProfileReport.from_json(path) == report


def test_profile_trains_the_model_while_timing(himnet, pems08_batch, monkeypatch):
    seen = []
    original_step = profiler.train_step

    def recording_step(forecaster, batch, optimizer, loss_fn, scaler, *, batches_seen=0, clip_grad=0.0,
                       precision=None, grad_scaler=None):
        assert precision.name == "fp32" and grad_scaler is None  # the default precision
        seen.append((forecaster.training, batches_seen, clip_grad, loss_fn.__name__))
        return original_step(forecaster, batch, optimizer, loss_fn, scaler, batches_seen=batches_seen,
                             clip_grad=clip_grad, precision=precision, grad_scaler=grad_scaler)

    monkeypatch.setattr(profiler, "train_step", recording_step)
    profile(himnet, pems08_batch, scaler=SCALER, loss=None, warmup=1, repeats=2, num_train_batches=10)
    clip = himnet.config["training"]["clip_grad"]
    assert seen == [(True, i, clip, "huber_loss") for i in range(3)]

    seen.clear()
    profile(himnet, pems08_batch, scaler=SCALER, loss="masked_mae", training={"clip_grad": 0.0}, warmup=0, repeats=1)
    assert seen == [(True, 0, 0.0, "masked_mae_loss")]


def test_num_train_batches_override_and_format(himnet, pems08_batch):
    report = profile(himnet, pems08_batch, scaler=SCALER, warmup=0, repeats=1, num_train_batches=1499)
    assert report.time_per_epoch_s == pytest.approx(report.time_per_batch_ms["median"] * 1.499)
    text = report.format()
    assert f"{count_parameters(himnet):,}" in text
    for label in ("time per batch", "time per epoch", "peak memory", "device", "min", "max"):
        assert label in text


class _AllocatesInForward(nn.Module):
    """One weight; every forward fills a ``size_mib`` scratch tensor, so the step's peak RSS grows."""

    def __init__(self, size_mib):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.numel = size_mib * 2**20 // 4

    def forward(self, x):
        scratch = torch.ones(self.numel)
        return x[..., :1] * self.weight + scratch[-1] - 1


def _allocating_forecaster(num_nodes, size_mib):
    config = configs.load("hi", "METR-LA")
    config["model"]["num_nodes"] = num_nodes
    config["training"].update(lr=1e-3, clip_grad=5.0)
    return Forecaster(_AllocatesInForward(size_mib), ModelSpec("allocates"), config, "reference")


@pytest.mark.parametrize("reset_peak_available", [True, False])
def test_cpu_memory_growth_covers_a_large_allocation(monkeypatch, reset_peak_available):
    if not reset_peak_available:
        monkeypatch.setattr(profiler, "_reset_peak_rss", lambda: False)
    forecaster = _allocating_forecaster(num_nodes=3, size_mib=256)
    batch = make_batch("METR-LA", 2, num_nodes=3)
    report = profile(forecaster, batch, scaler=SCALER, warmup=1, repeats=2)
    memory = report.peak_memory_mb
    assert memory["rss_source"] == ("vmhwm" if reset_peak_available else "statm_sampler")
    # The rest of the process may hand back a few pages during the step, hence a little slack.
    assert memory["rss_growth"] >= 0.98 * 256


def test_bad_input(himnet, pems08_batch):
    with pytest.raises(ValueError, match=r"batch: expected 170 nodes .* got x of shape \(2, 12, 7, 3\)"):
        profile(himnet, make_batch("PEMS08", 2, num_nodes=7), scaler=SCALER)
    with pytest.raises(ValueError, match=r"batch: expected device cpu .* got meta"):
        profile(himnet, pems08_batch.to(device="meta"), scaler=SCALER)
    with pytest.raises(TypeError, match=r"batch: expected dtype torch.float32 .* got torch.float64"):
        profile(himnet, pems08_batch.to(dtype=torch.float64), scaler=SCALER)
    with pytest.raises(ValueError, match=r"device: expected a cpu or cuda device .* got meta"):
        profile(himnet, pems08_batch, scaler=SCALER, device="meta")
    with pytest.raises(ValueError, match=r"warmup: expected an int >= 0, got -1"):
        profile(himnet, pems08_batch, scaler=SCALER, warmup=-1)
    with pytest.raises(ValueError, match=r"repeats: expected an int >= 1, got 0"):
        profile(himnet, pems08_batch, scaler=SCALER, repeats=0)
    with pytest.raises(ValueError, match=r"num_train_batches: expected an int >= 1, got 0"):
        profile(himnet, pems08_batch, scaler=SCALER, num_train_batches=0)
    with pytest.raises(ValueError, match=r"loss: expected one of .* got 'l1'"):
        profile(himnet, pems08_batch, scaler=SCALER, loss="l1")


def test_model_without_parameters_is_rejected():
    forecaster = create("hi", "METR-LA", num_nodes=3)
    with pytest.raises(ValueError, match="forecaster: expected a model with trainable parameters"):
        profile(forecaster, make_batch("METR-LA", 2, num_nodes=3), scaler=SCALER)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_on_cuda_moves_and_restores(himnet, pems08_batch):
    before = _state_copy(himnet)
    report = profile(himnet, pems08_batch, scaler=SCALER, warmup=1, repeats=2, device="cuda")
    memory = report.peak_memory_mb
    assert {"allocated", "reserved", "process", "process_source"} <= set(memory)
    assert 0 < memory["allocated"] <= memory["reserved"]
    assert report.device.startswith("cuda:")
    assert all(p.device.type == "cpu" for p in himnet.parameters())
    after = himnet.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
