"""``stfast bench efficiency``: the paper's efficiency table regenerated end to end on tiny settings."""

import argparse
import csv
import importlib.util
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stfast.benchmarks import efficiency
from stfast.benchmarks.efficiency import (
    add_bench_parser, describe_exit, himnet_theta_prime_breakdown, himnet_theta_prime_params, main, short_count,
)

REPO = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One run on two tiny models (STID trains; HI has nothing to train, so its row is an error)
    plus the analytic HimNet-Θ′ row: about 10 s."""
    out = tmp_path_factory.mktemp("efficiency")
    stdout, stderr = io.StringIO(), io.StringIO()
    args = efficiency.build_parser().parse_args(
        ["--quick", "--device", "cpu", "--models", "hi", "stid", "himnet_theta", "--batch-size", "2",
         "--repeats", "1", "--warmup", "0", "--out", str(out)])
    if efficiency._stlora_available():  # ST-LoRA rows exist once stfast.nn.stlora.wrap_forecaster does
        args.models.append("stlora-stid")
    code = efficiency.run(args, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_himnet_theta_prime_count_follows_the_spec_formula():
    assert himnet_theta_prime_params("METR-LA") == 10_874_347_200
    terms = himnet_theta_prime_breakdown("METR-LA")
    # One GCRU of 3H(K(C+H)+1) parameters per time of day x day of week, per node, per (context, node).
    assert terms["encoder_gcru_params"] == terms["decoder_gcru_params"] == 3 * 64 * (2 * (3 + 64) + 1) == 25_920
    assert (terms["temporal_contexts"], terms["nodes"]) == (288 * 7, 207)
    assert terms["gcrus"] == 2016 + 207 + 2016 * 207
    assert short_count(terms["params"]) == "10.9B"  # the paper's figure; HimNet's 6,777 extra are not added


def test_paper_style_counts():
    assert [short_count(n) for n in (117_868, 751_650, 1_250_937, 38_478_291)] == ["118K", "752K", "1251K", "38.5M"]


def test_quick_run_writes_table_json_csv_and_figure(quick_run):
    code, stdout, stderr, out = quick_run
    assert code == 0, stderr

    table = (out / "results.md").read_text(encoding="utf-8")
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| Model"))
    assert "Paper ms/batch" in header and "ms/batch median [min, max]" in header and "RSS growth MB" in header
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and line is not header}
    assert "117,868 ✓" in rows["STID"]  # the published count, in the same row as the paper's 118K
    assert "| 118K | 8 | 12 | 1,420 |" in rows["STID"]
    assert "10,874,347,200" in rows["HimNet-Θ′"] and rows["HimNet-Θ′"].count("N/A") >= 6
    assert "error: ValueError" in rows["hi"] and "trainable parameters" in rows["hi"]
    assert "HimNet-Θ′: the paper's ablation" in table  # the analytic row is explained in the notes
    # The terminal gets a narrow summary; the full table stays in the files.
    summary = stdout.splitlines()
    assert summary[0].split() == ["model", "implementation", "ms/batch", "speed-up", "memory"]
    assert max(len(line) for line in summary if not line.startswith(("error:", "note:"))) < 100
    assert any(line.startswith("note: HimNet-Θ′ is not runnable") and "10,874,347,200" in line for line in summary)
    assert any(line.startswith("STID") and "reference" in line for line in summary)
    assert "| Model" not in stdout and f"the full table is {out / 'results.md'}" in stderr

    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    meta = result["meta"]
    assert meta["device"].startswith("cpu") and meta["batch_size"] == 2 and meta["repeats"] == 1
    by_model = {row["model"]: row for row in result["rows"]}
    stlora = efficiency._stlora_available()
    assert [row["model"] for row in result["rows"]] == ["stid", "himnet_theta", "hi"] + ["stlora-stid"] * stlora
    if stlora:
        wrapped = result["rows"][-1]
        assert wrapped["status"] == "ok" and wrapped["params"] > 117_868 and wrapped["name"] == "ST-LoRA+STID"
        assert wrapped["stlora_time_overhead"] > -1 and "ST-LoRA time overhead" in header
    stid = by_model["stid"]
    assert stid["status"] == "ok" and stid["params"] == 117_868 and stid["params_match_paper"] is True
    times = stid["time_per_batch_ms"]
    assert 0 < times["min"] <= times["median"] <= times["max"] and times["repeats"] == 1
    assert stid["time_per_epoch_s"] == pytest.approx(times["median"] * meta["train_batches"] / 1000)
    assert stid["peak_memory_mb"]["rss_growth"] >= 0
    assert by_model["himnet_theta"]["params"] == 10_874_347_200
    assert by_model["himnet_theta"]["time_per_batch_ms"] is None and by_model["himnet_theta"]["status"] == "analytic"
    assert by_model["hi"]["status"] == "error" and "trainable" in by_model["hi"]["error"]

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert [r["model"] for r in records][:3] == ["stid", "himnet_theta", "hi"]
    assert int(records[0]["params"]) == 117_868 and float(records[0]["ms_per_batch_median"]) > 0
    assert records[0]["paper_ms_per_batch"] == "8"
    assert records[1]["ms_per_batch_median"] == "N/A" and records[1]["rss_growth_mb"] == "N/A"
    assert records[2]["status"] == "error"

    png = out / "efficiency.png"
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert meta["figure"] == "efficiency.png"
    else:
        assert not png.exists() and "efficiency.png skipped" in stderr and "matplotlib" in meta["figure_skipped"]


def test_figure_is_skipped_with_a_clear_note_without_matplotlib(quick_run, tmp_path, monkeypatch):
    result = json.loads((quick_run[3] / "results.json").read_text(encoding="utf-8"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    reason = efficiency.write_figure(result, tmp_path / "efficiency.png")
    assert "matplotlib is not installed" in reason and "stfast[plot]" in reason
    assert not (tmp_path / "efficiency.png").exists()


@pytest.mark.parametrize("argv, flag, bad", [
    (["--models", "stid", "not_a_model"], "--models", "'not_a_model'"),
    (["--models", "himnet", "--backends", "reference", "cudnn"], "--backends", "'cudnn'"),
    (["--batch-size", "0"], "--batch-size", "got 0"),
])
def test_bad_arguments_are_refused_with_exit_code_2(argv, flag, bad, capsys, tmp_path):
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert f"error: {flag}: expected" in message and bad in message
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_known_names_and_what_they_expect_are_in_the_message(capsys, tmp_path):
    assert main(["--models", "gwnett", "--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "'stid'" in message and "'himnet_theta'" in message and "'gwnett'" in message


def test_default_rows_pair_himnet_with_its_runnable_backends():
    import torch

    cpu = torch.device("cpu")
    plan, notes = efficiency.plan_rows(["stid", "himnet_theta", "himnet"], None, cpu, quick=False)
    fastest = efficiency._auto_backend(cpu)  # torch, or the C++ kernels (cpu) once they are built
    expected = [("stid", "reference"), ("himnet_theta", "analytic"), ("himnet", "reference"), ("himnet", "torch")]
    assert plan == expected + ([("himnet", "cpu")] if fastest == "cpu" else [])
    quick, _ = efficiency.plan_rows(["himnet"], None, cpu, quick=True)
    assert quick == [("himnet", "reference"), ("himnet", fastest)]
    chosen, notes = efficiency.plan_rows(["stid", "himnet"], ["reference", "triton"], cpu, quick=False)
    assert chosen == [("stid", "reference"), ("himnet", "reference")]
    assert any("'triton' skipped on cpu" in note for note in notes)


def test_a_killed_worker_is_an_error_row_not_a_crash():
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "memory" in describe_exit(-signal.SIGKILL)
    assert "status 3" in describe_exit(3)
    outcome = efficiency.run_worker({"model": "stid"}, stream=io.StringIO())  # a spec the worker cannot use
    assert outcome["ok"] is False and "KeyError" in outcome["error"]
    spec = {"model": "stid", "backend": "reference", "dataset": "METR-LA", "batch_size": 2, "device": "cpu",
            "warmup": 0, "repeats": 1, "seed": 0}
    outcome = efficiency.run_worker(spec, timeout=0.5, stream=io.StringIO())
    assert outcome == {"ok": False, "error": "timed out after 0.5 s (--timeout)"}


def test_bench_parser_wires_under_a_stfast_command_line():
    parser = argparse.ArgumentParser(prog="stfast")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "efficiency", "--quick", "--models", "stid", "--device", "cpu"])
    assert args.quick and args.models == ["stid"] and args.func is not None and args.batch_size == 16


def test_bench_script_is_the_same_command():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "efficiency.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stfast bench efficiency" in result.stdout and "--full-epoch" in result.stdout


def test_default_output_is_a_new_run_folder_never_the_recorded_results(tmp_path):
    parser = efficiency.build_parser()
    default = efficiency.output_folder(parser.parse_args(["--quick"]), "cpu (AMD EPYC, 2 threads)")
    assert default.parts[:2] == ("runs", "bench") and default.name.startswith("efficiency-")
    recorded = efficiency.output_folder(parser.parse_args(["--quick", "--record"]), "cpu (AMD EPYC, 2 threads)")
    assert recorded == Path("bench/results/cpu-amd-epyc-2-threads/efficiency")
    full = efficiency.output_folder(parser.parse_args(["--record"]), "cpu (AMD EPYC, 2 threads)")
    assert full.name == "efficiency-full"
    assert efficiency.output_folder(parser.parse_args(["--out", str(tmp_path)]), "cpu") == tmp_path
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args(["--out", str(tmp_path), "--record"])


def test_figure_links_each_reference_to_its_fast_rows_and_each_backbone_to_its_stlora_row():
    from stfast.benchmarks.report import _links

    rows = [{"model": model, "backend": backend} for model, backend in
            [("himnet", "reference"), ("himnet", "cpu"), ("himnet", "torch"), ("stid", "reference"),
             ("stlora-himnet", "cpu"), ("gwnet", "torch")]]
    assert _links(rows) == [(("himnet", "cpu"), ("stlora-himnet", "cpu"), ":"),
                            (("himnet", "reference"), ("himnet", "cpu"), "-"),
                            (("himnet", "reference"), ("himnet", "torch"), "-")]
