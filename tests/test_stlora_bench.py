"""``stfast bench stlora``: the paper's Figure 4 regenerated, on tiny settings (one light backbone,
one adapter form, one round), plus the aggregation of interleaved rounds and bad input."""

import argparse
import csv
import importlib.util
import io
import json
import re

import pytest

from stfast import models
from stfast.benchmarks import stlora as bench
from stfast.nn.stlora import wrap_forecaster

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def parse(argv):
    return bench.add_stlora_options(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """STID at the PEMS04 shape, alone and with the shared adapter composed (the torch backend adds
    no other shared variant): two worker processes, about 15 s."""
    out = tmp_path_factory.mktemp("stlora")
    stdout, stderr = io.StringIO(), io.StringIO()
    args = parse(["--device", "cpu", "--backbones", "stid", "--adapters", "shared", "--node-lora-backends", "torch",
                  "--no-loop", "--batch-size", "2", "--rounds", "1", "--warmup", "0", "--repeats", "1",
                  "--out", str(out)])
    code = bench.run(args, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_tiny_run_writes_table_json_csv_and_figure(tiny_run):
    code, stdout, stderr, out = tiny_run
    assert code == 0, stderr
    result = json.loads((out / "results.json").read_text())
    backbone, wrapped = result["rows"]
    assert (backbone["variant"], wrapped["variant"]) == ("backbone", "+ST-LoRA shared (composed)")
    assert backbone["status"] == wrapped["status"] == "ok", (backbone["error"], wrapped["error"])

    # the counts come from the measured modules and agree with the wrapper built here
    forecaster = models.create("stid", "PEMS04")
    added = wrap_forecaster(forecaster, adapter="shared").model.added_parameters()
    assert backbone["params"] == models.count_parameters(forecaster)
    assert wrapped["added_params"] == added == wrapped["params"] - backbone["params"]
    assert wrapped["param_overhead_pct"] == pytest.approx(100 * added / backbone["params"])
    assert wrapped["paper"] is None and wrapped["config"] == "published"  # STID is not among the paper's six

    for row in (backbone, wrapped):
        assert row["ms_per_batch"]["median"] > 0 and row["ms_per_batch"]["rounds"] == 1
        epoch_ms = row["ms_per_batch"]["median"] * result["meta"]["train_batches"]
        assert row["s_per_epoch"] == pytest.approx(epoch_ms / 1000)
    ratio = wrapped["ms_per_batch"]["median"] / backbone["ms_per_batch"]["median"]
    assert wrapped["time_overhead_pct"] == pytest.approx(100 * (ratio - 1))
    assert result["meta"]["dataset"] == "PEMS04" and result["meta"]["device"].startswith("cpu")

    table = (out / "results.md").read_text()
    assert table == stdout and "arXiv:2404.07919" in table
    assert "| stid | published | +ST-LoRA shared (composed) |" in table
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [row["variant"] for row in rows] == ["backbone", "+ST-LoRA shared (composed)"]
    assert (out / "stlora.png").is_file() == HAS_MATPLOTLIB


def _round(ms, params=100, memory=10.0):
    return {"ok": True, "report": {"params": params, "device": "cpu (test)", "peak_memory_mb": {"rss_growth": memory},
                                   "time_per_batch_ms": {"median": ms, "min": ms - 1, "max": ms + 1, "repeats": 3}}}


def test_interleaved_rounds_give_the_median_per_round_overhead():
    """A noisy round slows the backbone and its variant alike: the overhead is taken per round."""
    backbone = [_round(10.0), _round(40.0), _round(12.0)]  # round 2 ran while the machine was busy
    variant = [_round(11.0, params=103), _round(44.0, params=103), _round(13.2, params=103, memory=11.0)]
    entry = {"backbone": "stgcn", "adapter": "shared", "node_lora": "torch"}
    row = bench.aggregate(entry, variant, backbone, train_batches=100)
    assert row["time_overhead_pct"] == pytest.approx(10.0)
    assert row["ms_per_batch"] == {"median": 13.2, "min": 10.0, "max": 45.0, "rounds": 3, "repeats": 3}
    assert (row["added_params"], row["param_overhead_pct"]) == (3, pytest.approx(3.0))
    assert row["added_s_per_epoch"] == pytest.approx((13.2 - 12.0) * 100 / 1000)
    assert row["memory_overhead_pct"] == pytest.approx(0.0)  # medians 10 vs 10

    frozen = bench.aggregate({**entry, "freeze_backbone": True}, [_round(11.0, params=3)], [_round(10.0)], 100)
    assert frozen["added_params"] == 3  # only the adapters train: the whole count is added

    failed = bench.aggregate(entry, [{"ok": False, "error": "worker killed by SIGKILL"}], backbone, 100)
    assert failed["status"] == "error" and "SIGKILL" in failed["error"]


def test_plan_puts_the_backbone_first_and_the_loop_last():
    variants = [bench.variant_name(e) for e in bench.plan(["stgcn"], ["per_node", "shared"], ["torch", "cpu"], True)]
    assert variants == ["backbone", "+ST-LoRA per_node (torch)", "+ST-LoRA per_node (cpu)",
                        "+ST-LoRA shared (composed)", "+ST-LoRA shared (cpu)", "+ST-LoRA per_node (loop)"]


@pytest.mark.parametrize("argv, message", [
    (["--adapters", "full"], r"--adapters: expected some of \['per_node', 'shared'\], got 'full'"),
    (["--node-lora-backends", "cuda"], r"--node-lora-backends: expected some of \[.*\], got 'cuda'"),
    (["--backbones", "nope"], r"--backbones: expected some of \[.*\], got 'nope'"),
    (["--rounds", "0"], r"--rounds: expected an integer >= 1, got 0"),
])
def test_bad_input_is_refused_before_anything_runs(argv, message, capsys):
    assert bench.main(["--device", "cpu", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_real_data_is_timed_when_given(shared_file, tmp_path):
    prefix = shared_file("_partial/PEMS04_prefix_694steps.npy")
    args = parse(["--device", "cpu", "--backbones", "stid", "--adapters", "shared", "--node-lora-backends", "torch",
                  "--no-loop", "--batch-size", "2", "--rounds", "1", "--warmup", "0", "--repeats", "1",
                  "--data", str(prefix), "--out", str(tmp_path)])
    stderr = io.StringIO()
    assert bench.run(args, stdout=io.StringIO(), stderr=stderr) == 0, stderr.getvalue()
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta"]["data"] == str(prefix.resolve())
    assert [row["status"] for row in result["rows"]] == ["ok", "ok"], [row["error"] for row in result["rows"]]
    assert "PEMS04 data from PEMS04_prefix_694steps.npy" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/PEMS04.npz"], r"--data: /no/such/PEMS04.npz does not exist"),
    (["--graph", "/no/such.csv"], r"--graph: only with --data"),
])
def test_bad_data_paths_are_refused_before_anything_runs(argv, message, capsys):
    assert bench.main(["--device", "cpu", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_timed_batch_is_the_first_training_batch_of_the_real_data(shared_file):
    import torch

    from stfast.benchmarks._worker import measured_batch
    from stfast.data import load_dataset

    prefix = str(shared_file("_partial/PEMS04_prefix_694steps.npy"))
    spec = {"dataset": "PEMS04", "data": prefix, "graph": None, "batch_size": 3, "seed": 0}
    batch, scaler = measured_batch(spec, torch.device("cpu"))
    expected = next(load_dataset("PEMS04", prefix).batches("train", 3))
    assert torch.equal(batch.x, expected.x) and torch.equal(batch.y, expected.y)
    with pytest.raises(ValueError, match="fewer than batch size 100000 training windows"):
        measured_batch({**spec, "batch_size": 100000}, torch.device("cpu"))
