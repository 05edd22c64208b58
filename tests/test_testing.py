"""stfast.testing: compare_modules / assert_close_to_reference catch broken candidates and pass
honest ones, state-dict mismatches are named, compare_op checks every registered op, tolerances."""

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import stfast.nn
import stfast.reference
from stfast import testing
from stfast.ops import backends

SMALL = dict(num_nodes=5, hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=3,
             st_embedding_dim=3, out_steps=3, tf_decay_steps=3)


@pytest.fixture(autouse=True)
def _plain_backend_selection(monkeypatch):
    # The module comparisons test the comparison, not a backend: the fused HimNet runs on the torch
    # backend (every backend is swept by compare_op and by `stfast check`, see test_check.py).
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def himnet_pair(candidate_class=stfast.nn.HimNet, **overrides):
    config = {**SMALL, **overrides}
    torch.manual_seed(0)
    reference = stfast.reference.HimNet(**config)
    torch.manual_seed(1)  # other initial weights: compare_modules must copy the reference's
    candidate = candidate_class(**config)
    return candidate, reference


def himnet_inputs(batch=2, nodes=5, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, nodes, 3, generator=g)
    x[..., 1] = torch.randint(0, 288, (batch, 12, nodes), generator=g) / 288
    x[..., 2] = torch.randint(0, 7, (batch, 12, nodes), generator=g).float()
    y_cov = torch.stack([x[:, :steps, :, 1], x[:, :steps, :, 2]], dim=-1).contiguous()
    labels = torch.randn(batch, steps, nodes, 1, generator=g)
    return x, y_cov, labels


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, backward multiplied by ``scale``: a correct output with a wrong gradient."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class PerturbedOutput(stfast.nn.HimNet):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs) + 1e-2


class WrongGradient(stfast.nn.HimNet):
    def forward(self, *args, **kwargs):
        return _ScaleGradient.apply(super().forward(*args, **kwargs), 1.01)


# ---------------------------------------------------------------- compare_modules

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_honest_fused_himnet_passes_with_every_row(mode):
    candidate, reference = himnet_pair()
    x, y_cov, labels = himnet_inputs()
    candidate.train(mode == "train")
    reference.train(mode == "train")
    inputs = {"args": (x, y_cov), "kwargs": {"labels": labels, "batches_seen": 3}} if mode == "train" else (x, y_cov)
    report = testing.compare_modules(candidate, reference, inputs)
    assert report.passed, str(report)
    names = [row.name for row in report.rows]
    assert names[0] == "output"
    assert {f"grad {name}" for name, _ in reference.named_parameters()} == set(names[1:])
    assert all(row.max_rel < 1e-5 for row in report.rows), str(report)
    # the candidate now holds the reference's weights
    for key, value in reference.state_dict().items():
        assert torch.equal(candidate.state_dict()[key], value), key
    assert report.meta["mode"] == mode and report.meta["precision"] == "fp32"


def test_teacher_forcing_draws_are_seeded_identically():
    """Training mode with a 50/50 sampling threshold: only the same NumPy seed for both runs makes
    the reference agree with itself; compare_modules must provide it (and restore the caller's RNG)."""
    _, reference = himnet_pair(tf_decay_steps=3)
    twin = stfast.reference.HimNet(**{**SMALL, "tf_decay_steps": 3})
    x, y_cov, labels = himnet_inputs()
    reference.train(), twin.train()
    np.random.seed(123)
    random.seed(5)
    torch.manual_seed(9)
    before = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    report = testing.compare_modules(twin, reference, {"args": (x, y_cov),
                                                       "kwargs": {"labels": labels, "batches_seen": 3}})
    assert report.passed, str(report)
    assert np.array_equal(np.random.get_state()[1], before[0])
    assert random.getstate() == before[1]
    assert torch.equal(torch.get_rng_state(), before[2])


def test_output_perturbed_by_1e_2_fails_on_the_output_only():
    candidate, reference = himnet_pair(PerturbedOutput)
    report = testing.compare_modules(candidate.eval(), reference.eval(), himnet_inputs()[:2])
    assert not report.passed
    assert [row.name for row in report.failures] == ["output"]
    assert report.rows[0].max_abs == pytest.approx(1e-2, rel=1e-3)
    assert "FAIL" in str(report)


def test_wrong_gradient_fails_on_the_gradients_only():
    candidate, reference = himnet_pair(WrongGradient)
    report = testing.compare_modules(candidate.eval(), reference.eval(), himnet_inputs()[:2])
    assert not report.passed
    assert report.rows[0].name == "output" and report.rows[0].passed
    failed = {row.name for row in report.failures}
    assert "grad decoder.cells.0.gate.weights_pool" in failed and "grad out_proj.weight" in failed
    assert all(row.kind == "param grad" for row in report.failures)
    for row in report.failures:  # the gradients are 1 % off
        assert 5e-3 < row.max_rel < 2e-2, row


def test_assert_close_to_reference_raises_with_the_table_and_returns_the_report():
    candidate, reference = himnet_pair(PerturbedOutput)
    with pytest.raises(AssertionError) as info:
        testing.assert_close_to_reference(candidate.eval(), reference.eval(), himnet_inputs()[:2])
    message = str(info.value)
    assert "max abs err" in message and "max rel err" in message and "output" in message and "FAIL" in message
    honest, reference = himnet_pair()
    report = testing.assert_close_to_reference(honest.eval(), reference.eval(), himnet_inputs()[:2], grad=False)
    assert [row.name for row in report.rows] == ["output"]


def test_state_dict_mismatch_names_missing_unexpected_and_shapes():
    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 4)
            self.only_in_reference = nn.Parameter(torch.zeros(2))
            self.resized = nn.Parameter(torch.zeros(4, 3))

        def forward(self, x):
            return self.shared(x)

    class Cand(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 4)
            self.only_in_candidate = nn.Parameter(torch.zeros(2))
            self.resized = nn.Parameter(torch.zeros(3, 4))

        def forward(self, x):
            return self.shared(x)

    with pytest.raises(ValueError) as info:
        testing.compare_modules(Cand(), Ref(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "missing keys" in message and "only_in_candidate" in message
    assert "unexpected keys" in message and "only_in_reference" in message
    assert "resized: candidate (3, 4) vs reference (4, 3)" in message
    # without copying, modules with different layouts compare fine on their own weights
    cand, ref = Cand(), Ref()
    cand.shared.load_state_dict(ref.shared.state_dict())
    report = testing.compare_modules(cand, ref, (torch.randn(2, 3),), copy_weights=False)
    assert report.passed, str(report)
    notes = {row.name: row.note for row in report.rows}
    assert notes["grad only_in_candidate"] == "only in the candidate: not compared"
    assert notes["grad only_in_reference"] == "only in the reference: not compared"


def test_input_gradients_dict_inputs_and_nested_outputs():
    class Pair(nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = scale

        def forward(self, x, *, bias):
            y = self.lin(x) * self.scale
            return {"y": y, "extra": (y.sum(-1), bias * 2)}

    x = torch.randn(4, 3, requires_grad=True)
    bias = torch.randn(2)
    report = testing.compare_modules(Pair(), Pair(), {"args": (x,), "kwargs": {"bias": bias}})
    names = [row.name for row in report.rows]
    assert names == ["output['y']", "output['extra'][0]", "output['extra'][1]", "grad lin.weight", "grad lin.bias",
                     "grad input args[0]"]
    assert report.passed, str(report)
    assert x.grad is None  # the caller's tensors are not touched
    bad = testing.compare_modules(Pair(scale=1.001), Pair(), {"args": (x,), "kwargs": {"bias": bias}})
    assert "grad input args[0]" in {row.name for row in bad.failures}


def test_bad_inputs_and_modes_are_clear_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="'args'.*'kwargs'"):
        testing.compare_modules(lin, nn.Linear(3, 2), {"x": torch.randn(2, 3)})
    with pytest.raises(ValueError, match="training mode but the reference is in eval"):
        testing.compare_modules(nn.Linear(3, 2).train(), nn.Linear(3, 2).eval(), (torch.randn(2, 3),))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        testing.compare_modules(lambda x: x, lin, (torch.randn(2, 3),))
    # a single tensor is the one positional argument
    assert testing.compare_modules(nn.Linear(3, 2), lin, torch.randn(2, 3)).passed


def test_dropout_masks_match_under_one_seed():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    candidate = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    assert testing.compare_modules(candidate, reference, (torch.randn(5, 6),), reference_dtype=None).passed


def test_dtype_and_tolerance_choices():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    candidate = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    report = testing.compare_modules(candidate, reference, (x,), dtype=torch.float64)
    assert report.passed and report.meta["precision"] == "fp64" and report.rows[0].rtol == 1e-10
    assert next(candidate.parameters()).dtype == torch.float32  # a cast copy ran, not the module itself
    # the same module in the same precision: identical (the default reference runs in bf16 too)
    same = testing.compare_modules(candidate, reference, (x,), dtype="bf16")
    assert same.passed and same.worst.max_abs == 0 and same.meta["reference_dtype"] == "torch.bfloat16"
    # against a float64 oracle the bf16 error shows, within its tolerance
    half = testing.compare_modules(candidate, reference, (x,), dtype="bf16", reference_dtype=torch.float64)
    assert half.passed, str(half)
    assert half.rows[0].rtol == testing.DEFAULT_TOLERANCES["bf16"].rtol
    assert 1e-4 < half.worst.max_rel < 5e-2
    strict = testing.compare_modules(candidate, reference, (x,), dtype="bf16", reference_dtype="float64",
                                     rtol=1e-6, atol=0.0)
    assert not strict.passed and strict.rows[0].rtol == 1e-6


def test_report_table_and_json():
    candidate, reference = himnet_pair(PerturbedOutput)
    report = testing.compare_modules(candidate.eval(), reference.eval(), himnet_inputs()[:2])
    lines = str(report).splitlines()
    header = lines[1]
    for column in ("check", "shape", "max abs err", "max rel err", "atol", "rtol", "result"):
        assert column in header
    # columns are aligned: every row puts its result column at the header's position
    start = header.index("result")
    assert all(line[start:start + 2] in ("ok", "FA") for line in lines[2:-1])
    assert lines[-1].strip().startswith(f"{len(report.rows)} checks") and "FAIL" in lines[-1]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and len(data["rows"]) == len(report.rows)
    row = data["rows"][0]
    assert set(row) >= {"name", "max_abs_err", "max_rel_err", "atol", "rtol", "passed"}
    assert row["name"] == "output" and row["passed"] is False


def test_compare_tensors_handles_zeros_nonfinite_and_missing():
    tol = testing.Tolerance(1e-6, 1e-4)
    zeros = torch.zeros(3)
    assert testing.compare_tensors("z", zeros, zeros, tol).passed
    row = testing.compare_tensors("z", torch.tensor([0.0, 1e-3, 0.0]), zeros, tol)
    assert not row.passed and row.max_rel == math.inf and "all zeros" in row.note
    same_inf = torch.tensor([1.0, float("inf"), float("nan")])
    assert testing.compare_tensors("i", same_inf, same_inf.clone(), tol).passed
    row = testing.compare_tensors("i", torch.tensor([1.0, 2.0, float("nan")]), same_inf, tol)
    assert not row.passed and "non-finite" in row.note
    assert not testing.compare_tensors("m", None, torch.ones(2), tol, kind="param grad").passed
    assert testing.compare_tensors("m", None, None, tol, kind="param grad").passed
    assert not testing.compare_tensors("s", torch.ones(2, 3), torch.ones(3, 2), tol).passed


# ---------------------------------------------------------------- tolerances

def test_default_tolerances_cover_every_precision_and_are_ordered():
    assert set(testing.DEFAULT_TOLERANCES) == {"fp64", "fp32", "tf32", "bf16", "fp16"}
    rtol = {k: v.rtol for k, v in testing.DEFAULT_TOLERANCES.items()}
    assert rtol["fp64"] < rtol["fp32"] <= 1e-4 < rtol["fp16"] <= rtol["tf32"] <= rtol["bf16"]
    assert all(t.basis for t in testing.DEFAULT_TOLERANCES.values())
    assert {k for k, t in testing.DEFAULT_TOLERANCES.items() if t.provisional} == {"tf32", "bf16", "fp16"}
    assert testing.default_tolerance("fp32", device="cuda").provisional  # GPU values are not measured yet
    assert testing.parse_precision(torch.float16) == "fp16" and testing.parse_precision("bfloat16") == "bf16"
    assert testing.parse_precision("half") == "fp16" and testing.precision_name(torch.float32, tf32=True) == "tf32"
    with pytest.raises(ValueError, match="fp64, fp32, tf32, bf16, fp16"):
        testing.parse_precision("fp8")


# ---------------------------------------------------------------- ops

def test_reference_meta_gconv_is_the_published_himgcn():
    torch.manual_seed(0)
    for axis, emb_shape, support_shape in (("S", (7, 3), (7, 7)), ("T", (2, 3), (7, 7)), ("ST", (2, 7, 3), (2, 7, 7))):
        layer = stfast.reference.HimGCN(4, 5, 3, 3, axis).double()
        x, e, a = torch.randn(2, 7, 4).double(), torch.randn(*emb_shape).double(), torch.randn(*support_shape).double()
        want = layer(x, a, e)
        got = testing.reference_meta_gconv(x, a, e, layer.weights_pool, layer.bias_pool, 3, axis=axis)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = stfast.reference.HimGCN(4, 5, 2, 3, None).double()
    x, a = torch.randn(2, 7, 4).double(), torch.randn(7, 7).double()
    torch.testing.assert_close(testing.reference_gconv(x, a, plain.weights, plain.bias, 2), plain(x, a, None))


def _quick_op_specs():
    return [(name, spec) for name, case in testing.OP_CASES.items() for spec in case.grid(True)]


@pytest.mark.parametrize("name,spec", _quick_op_specs(),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(_quick_op_specs())])
def test_compare_op_passes_for_the_torch_backend(name, spec):
    report = testing.compare_op(name, "torch", spec, torch.float32)
    assert report.passed, str(report)
    assert report.rows[0].name == "out" and any(row.name.startswith("grad ") for row in report.rows)


def test_compare_op_fp64_and_real_dataset_shape():
    report = testing.compare_op("meta_gconv", "torch", {"axis": "T", "supports": "per_sample", "cheb_k": 3}, "fp64")
    assert report.passed and report.worst.max_rel < 1e-12, str(report)
    case = testing.OP_CASES["meta_gconv"]
    specs = [s for s in case.grid(False) if s.get("dataset") == "PEMS08"]
    assert {s["axis"] for s in specs} == {"S", "T", "ST"} and all(s["nodes"] == 170 for s in specs)


def test_compare_op_catches_a_broken_forward_and_a_broken_backward(monkeypatch):
    forward = backends._IMPLS["torch"]["meta_gconv"]
    monkeypatch.setitem(backends._IMPLS["torch"], "meta_gconv", lambda *a: forward(*a) * 1.001)
    report = testing.compare_op("meta_gconv", "torch", {"axis": "S"}, "fp32")
    assert not report.passed and "out" in {row.name for row in report.failures}
    monkeypatch.setitem(backends._IMPLS["torch"], "meta_gconv", forward)

    backward = backends._IMPLS["torch"]["meta_gconv_backward"]

    def wrong_embedding_gradient(*args):
        d_x, d_a, d_e, d_p, d_b = backward(*args)
        return d_x, d_a, None if d_e is None else d_e * 1.01, d_p, d_b

    monkeypatch.setitem(backends._IMPLS["torch"], "meta_gconv_backward", wrong_embedding_gradient)
    report = testing.compare_op("meta_gconv", "torch", {"axis": "ST"}, "fp32")
    assert [row.name for row in report.failures] == ["grad embeddings"], str(report)


def test_compare_op_errors_name_the_problem():
    with pytest.raises(ValueError, match="op: expected one of"):
        testing.compare_op("no_such_op", "torch", {}, "fp32")
    with pytest.raises(ValueError, match="unknown key"):
        testing.compare_op("meta_gconv", "torch", {"heads": 3}, "fp32")
    with pytest.raises(ValueError, match="triton.*cannot run meta_gconv on cpu"):
        testing.compare_op("meta_gconv", "triton", {}, "fp32")
    with pytest.raises(ValueError, match="backend: expected one of"):
        testing.compare_op("meta_gconv", "magic", {}, "fp32")


def test_op_cases_registry_plugs_in_a_new_op(monkeypatch):
    """A new op family is one OpCase: here a toy op checked against its definition."""
    monkeypatch.setattr(testing, "OP_CASES", dict(testing.OP_CASES))

    def make_inputs(spec, gen):
        return [("x", torch.randn(spec["n"], generator=gen, dtype=torch.float64))], {}

    testing.register_op_case(testing.OpCase(
        name="toy", kernel="gconv", function=lambda x: torch.tanh(x), reference=lambda x: torch.tanh(x),
        make_inputs=make_inputs, defaults={"n": 5}, grid=lambda quick: [{"n": 1}, {"n": 7}]))
    report = testing.compare_op("toy", "torch", {"n": 9}, "fp32")
    assert report.passed and [row.name for row in report.rows] == ["out", "grad x"]


@pytest.mark.skipif(not hasattr(__import__("stfast.ops", fromlist=["ops"]), "node_lora"),
                    reason="stfast.ops.node_lora has not landed yet")
def test_node_lora_is_registered_once_it_exists():
    assert "node_lora" in testing.OP_CASES
