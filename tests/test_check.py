"""``stfast check``: the op sweep and the model check as users run them, exit codes, JSON, errors,
and the Triton backend under the interpreter.

Most tests call :func:`stfast.check.run_check` through a parser built with
:func:`stfast.check.add_check_parser` (the same parser ``stfast check`` uses); one runs
``python -m stfast check`` in a subprocess once the subcommand is wired into ``stfast.cli``, and
the interpreter test runs ``python -m stfast.check`` in a subprocess with ``TRITON_INTERPRET=1``.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stfast import check, models, testing
from stfast.ops import backends

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="stfast")
    check.add_check_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["check", *argv])


def run(*argv):
    return check.run_check(parse(*argv))


def _cli_knows_check() -> bool:
    from stfast.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "check" in action.choices
    return False


def _env():
    env = {k: v for k, v in os.environ.items() if k not in (backends.ENV_VAR, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO)
    return env


# ---------------------------------------------------------------- the op sweep

def test_quick_sweep_passes_with_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert run("--quick", "--device", "cpu", "--json", str(out)) == 0
    captured = capsys.readouterr()
    assert "stfast check [" in captured.err  # the progress bar
    for word in ("op", "backend", "precision", "worst rel err", "meta_gconv", "gconv", "torch", "fp32", "PASS"):
        assert word in captured.out
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["command"] == "ops" and data["device"].startswith("cpu (") and data["quick"] is True
    assert data["torch"] == torch.__version__
    assert set(data["tolerances"]) == set(testing.DEFAULT_TOLERANCES)
    summary = {(row["op"], row["backend"], row["precision"]): row for row in data["summary"]}
    for op in testing.OP_CASES:  # every registered op (node_lora too, once stfast.ops has it)
        assert summary[(op, "torch", "fp32")]["result"] == "pass"
        assert summary[(op, "torch", "fp32")]["passed"] >= 2
    assert "triton" in data["not_checked"] and "TRITON_INTERPRET" in data["not_checked"]["triton"]
    case = next(c for c in data["cases"] if c["backend"] == "torch" and c["name"] == "meta_gconv")
    assert case["status"] == "passed" and case["report"]["rows"][0]["name"] == "out"
    assert {"max_abs_err", "max_rel_err", "atol", "rtol", "passed"} <= set(case["report"]["rows"][0])
    # the grid: batch 1, a real dataset size, odd node counts
    specs = [c["spec"] for c in data["cases"] if c["name"] == "meta_gconv"]
    assert any(s["batch"] == 1 for s in specs) and any(s.get("dataset") == "METR-LA" for s in specs)
    assert all(s["nodes"] % 2 == 1 for s in specs)


def test_a_failing_op_exits_1_and_prints_its_table(tmp_path, capsys, monkeypatch):
    forward = backends._IMPLS["torch"]["meta_gconv"]
    monkeypatch.setitem(backends._IMPLS["torch"], "meta_gconv", lambda *a: forward(*a) * 1.01)
    out = tmp_path / "check.json"
    assert run("--quick", "--device", "cpu", "--backends", "torch", "--ops", "meta_gconv", "gconv",
               "--json", str(out), "--no-progress") == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "max abs err" in printed  # the failing case's own table
    data = json.loads(out.read_text())
    assert data["passed"] is False
    summary = {row["op"]: row for row in data["summary"]}
    assert summary["meta_gconv"]["result"] == "FAIL" and summary["meta_gconv"]["failed"] >= 1
    assert summary["gconv"]["result"] == "pass"


def test_a_crashing_backend_is_a_failed_case_not_a_traceback(capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(backends._IMPLS["torch"], "gconv", broken)
    assert run("--quick", "--device", "cpu", "--backends", "torch", "--ops", "gconv", "--no-progress") == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backends", "nope"], "--backends: expected names among"),
    (["--dtypes", "fp8"], "--dtypes: expected names among"),
    (["--ops", "conv3d"], "op: expected one of"),
    (["--checkpoint", "x.pt"], "--checkpoint: only used with --model"),
    (["--dataset", "METR-LA"], "--dataset: only used with --model"),
    (["--backends", "triton"], "triton cannot run any of the checked ops on cpu"),
    (["--dtypes", "tf32"], "nothing to check"),
    (["--model", "REFERENCE_ONLY"], "no fused module to check yet"),
    (["--model", "nosuchnet"], "model: expected one of"),
    (["--model", "himnet", "--backends", "reference"], "fused module runs on"),
    (["--model", "himnet", "--batch-size", "0"], "--batch-size: expected a positive integer"),
])
def test_bad_usage_is_a_value_error_with_a_clear_message(argv, message):
    argv = [reference_only_model() if a == "REFERENCE_ONLY" else a for a in argv]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run("--device", "cpu", "--quick", *argv)


def reference_only_model() -> str:
    """A zoo model without a fused module (more get one as the op families land)."""
    names = [name for name in models.available() if models.backends(name) == ["reference"]]
    if not names:
        pytest.skip("every zoo model has a fused module now")
    return "stid" if "stid" in names else names[0]


def test_bad_usage_exits_2_through_main(capsys):
    name = reference_only_model()
    assert check.main(["--device", "cpu", "--model", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stfast check: error: --model {name}: there is no fused module to check yet")
    assert "himnet" in err  # the models that can be checked are named


def test_cuda_on_a_machine_without_one_is_bad_usage():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="--device"):
        run("--device", "cuda", "--quick")


@pytest.mark.skipif(not _cli_knows_check(), reason="stfast check is not wired into the CLI yet")
def test_stfast_check_subprocess_through_the_cli(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "stfast", "check", "--quick", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["passed"] is True
    bad = subprocess.run([sys.executable, "-m", "stfast", "check", "--device", "cpu", "--dtypes", "fp8"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600, check=False)
    assert bad.returncode == 2 and "stfast check: error: --dtypes" in bad.stderr


def test_triton_under_the_interpreter_on_a_tiny_grid(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "triton.json"
    env = {**_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "stfast.check", "--quick", "--device", "cpu", "--backends", "triton",
                           "--dtypes", "fp32", "fp16", "bf16", "--json", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    summary = {(row["op"], row["precision"]): row for row in data["summary"]}
    assert summary[("meta_gconv", "fp32")]["result"] == "pass" and summary[("meta_gconv", "fp32")]["passed"] >= 3
    assert summary[("meta_gconv", "fp16")]["result"] == "pass"
    # the interpreter skips what it cannot do, saying why
    assert summary[("meta_gconv", "bf16")]["result"] == "skipped"
    assert "interpreter" in summary[("meta_gconv", "bf16")]["skip_reasons"][0]
    assert any("too slow in the Triton interpreter" in r for r in summary[("meta_gconv", "fp32")]["skip_reasons"])
    assert summary[("gconv", "fp32")]["result"] == "skipped"  # no gconv kernel in triton
    assert all(c["backend"] == "triton" for c in data["cases"])


# ---------------------------------------------------------------- the model check

def test_himnet_on_metr_la_passes_with_per_parameter_gradients(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert run("--device", "cpu", "--model", "himnet", "--dataset", "METR-LA", "--batch-size", "1",
               "--json", str(out)) == 0
    printed = capsys.readouterr().out
    assert "himnet on METR-LA, eval mode" in printed and "himnet on METR-LA, train mode" in printed
    assert "grad model.decoder.cells.0.gate.weights_pool" in printed and "teacher forcing" in printed
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["command"] == "model"
    assert data["model"]["dataset"] == "METR-LA" and data["model"]["batch_size"] == 1
    assert abs(data["model"]["sampling_threshold"] - 0.5) < 1e-3  # teacher-forced and free-running steps
    modes = {c["mode"]: c for c in data["cases"]}
    assert set(modes) == {"eval", "train"}
    for case in modes.values():
        rows = {row["name"]: row for row in case["report"]["rows"]}
        params = [name for name, _ in models.create("himnet", "METR-LA", backend="reference").named_parameters()]
        assert {f"grad {name}" for name in params} | {"output"} == set(rows)
        assert all(row["passed"] and row["max_rel_err"] < 1e-4 for row in rows.values())


def test_checkpoint_weights_are_the_ones_compared(tmp_path):
    torch.manual_seed(3)
    trained = models.create("himnet", "METR-LA", backend="reference")
    raw = tmp_path / "published.pt"
    torch.save(trained.model.state_dict(), raw)
    args = parse("--device", "cpu", "--model", "himnet", "--checkpoint", str(raw))
    cases, info, reference = check._model_cases(args, torch.device("cpu"))
    assert info["checkpoint"] == str(raw) and info["dataset"] == "METR-LA"
    assert [c.extra["mode"] for c in cases] == ["eval", "train"]
    # the reference the cases compare against holds the checkpoint's weights
    for key, value in trained.model.state_dict().items():
        assert torch.equal(reference.model.state_dict()[key], value), key

    # an stfast-style checkpoint of another model, and a state dict that does not fit, are clear errors
    other = tmp_path / "other.pt"
    torch.save({"format": "stfast", "model_name": "stid", "dataset": "METR-LA", "model": {}}, other)
    with pytest.raises(ValueError, match="holds a 'stid' model"):
        check._model_cases(parse("--model", "himnet", "--checkpoint", str(other)), torch.device("cpu"))
    state = dict(trained.model.state_dict())
    state["extra.weight"] = state.pop("out_proj.weight")
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError) as info:
        check._model_cases(parse("--model", "himnet", "--checkpoint", str(bad)), torch.device("cpu"))
    assert "missing keys" in str(info.value) and "out_proj.weight" in str(info.value)
    assert "unexpected keys" in str(info.value) and "extra.weight" in str(info.value)
    with pytest.raises(ValueError, match="trained on METR-LA"):
        ckpt = tmp_path / "ckpt.pt"
        torch.save({"format": "stfast", "model_name": "himnet", "dataset": "METR-LA", "model_args": {},
                    "model": trained.model.state_dict()}, ckpt)
        check._model_cases(parse("--model", "himnet", "--checkpoint", str(ckpt), "--dataset", "PEMS08"),
                           torch.device("cpu"))
    with pytest.raises(FileNotFoundError):
        check._model_cases(parse("--model", "himnet", "--checkpoint", str(tmp_path / "missing.pt")),
                           torch.device("cpu"))
