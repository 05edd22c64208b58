"""The roofline model (``stfast.benchmarks.roofline``, ``bench/roofline.py``): FLOPs of the cheapest
exact formulation, minimum bytes and ideal times, on tiny shapes counted by hand; the recorded table
under ``bench/results/`` is what the model gives today."""

import json
from pathlib import Path

import pytest
import torch

from stfast.benchmarks import roofline

RECORDED = Path(__file__).resolve().parents[1] / "bench" / "results" / "roofline.md"


def test_s_axis_counts_the_hoisted_formulation_when_it_is_cheaper():
    # B=2, N=3, C=2, K=2 (I=4), D=4, O=5, shared (N, N) supports.
    work = roofline.meta_gconv_work(2, 3, 2, 2, 4, 5, "S")
    propagation = 2 * 1 * (2 * 3) * 3 * 2  # one A @ x term: (N, N) @ (N, C) per sample
    generate = 2 * 3 * 4 * (4 + 1) * 5  # W = E [P; Pb] once per node
    apply = 2 * (2 * 3) * 4 * 5  # xg @ W per row
    assert work.formulation == "hoisted"
    assert work.flops == propagation + generate + apply
    assert work.elements == 2 * 3 * 2 + 3 * 3 + 3 * 4 + 4 * 4 * 5 + 4 * 5 + 2 * 3 * 5  # x, A, E, P, Pb, y
    assert work.bytes("fp32") == 4 * work.elements and work.bytes("bf16") == 2 * work.elements


def test_st_axis_always_counts_the_outer_product():
    work = roofline.meta_gconv_work(2, 3, 2, 2, 4, 5, "ST", per_sample_supports=True)
    assert work.formulation == "outer"
    assert work.flops == 2 * 1 * 6 * 3 * 2 + 2 * 6 * 4 * (4 + 1) * 5
    assert work.elements == 12 + 2 * 9 + 6 * 4 + 80 + 20 + 30


def test_backward_is_twice_the_forward_gemms_and_moves_every_gradient():
    forward = roofline.meta_gconv_work(4, 5, 3, 2, 2, 7, "T")
    backward = roofline.meta_gconv_work(4, 5, 3, 2, 2, 7, "T", backward=True)
    output = 4 * 5 * 7
    assert backward.flops == 2 * forward.flops
    assert backward.elements == 2 * (forward.elements - output) + 2 * output  # inputs + grads; dy + y


def test_node_lora_counts_base_shrink_and_expand():
    work = roofline.node_lora_work(2, 3, 4, 5, 2)
    assert work.flops == 2 * 6 * (4 * 5 + 4 * 2 + 2 * 5)
    assert work.elements == 6 * 4 + 5 * 4 + 5 + 3 * 4 * 2 + 3 * 2 * 5 + 6 * 5
    assert roofline.node_lora_work(2, 3, 4, 5, 2, backward=True).flops == 2 * work.flops


def test_ideal_time_is_the_larger_of_compute_and_memory_time():
    compute_bound = roofline.Work("k", "s", flops=67e12, elements=1.0)
    assert roofline.ideal_seconds(compute_bound, "H100", "fp32") == pytest.approx(1.0)
    assert roofline.ideal_seconds(compute_bound, "H100", "bf16") == pytest.approx(67 / 989.5)
    memory_bound = roofline.Work("k", "s", flops=1.0, elements=4.8e12 / 4)
    assert roofline.ideal_seconds(memory_bound, "H200", "fp32") == pytest.approx(1.0)
    assert roofline.ideal_seconds(memory_bound, "H200", "bf16") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gpu: expected one of"):
        roofline.ideal_seconds(compute_bound, "A100", "fp32")
    with pytest.raises(ValueError, match="precision: expected one of"):
        roofline.ideal_seconds(compute_bound, "H100", "fp8")


def test_measured_over_ideal_knows_the_gpu_by_its_name_and_sums_forward_and_backward():
    forward = roofline.Work("k", "s", flops=67e12, elements=1.0)
    assert roofline.measured_over_ideal(3.0, forward, "NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(3.0)
    assert roofline.measured_over_ideal(3.0, [forward, forward], "NVIDIA H200", "fp32") == pytest.approx(1.5)
    assert roofline.measured_over_ideal(3.0, forward, "cpu (AMD EPYC, 2 threads)", "fp32") is None
    assert roofline.format_ratio(None) == "-" and roofline.format_ratio(2.345) == "2.3x"


def test_precision_of_a_benchmark_dtype():
    assert roofline.precision_of(torch.float32) == "fp32"
    assert roofline.precision_of(torch.float32, tf32=True) == "tf32"
    assert roofline.precision_of(torch.bfloat16) == roofline.precision_of(torch.float16) == "bf16"
    with pytest.raises(ValueError, match="dtype: expected float32, bfloat16 or float16"):
        roofline.precision_of(torch.float64)


def test_main_writes_the_table_with_its_sources(tmp_path, capsys):
    assert roofline.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "roofline.md").read_text()
    assert roofline.PEAK_SOURCE in text
    data = json.loads((tmp_path / "roofline.json").read_text())
    calls_per_shape = 3 * 2 * 2 + 2  # S/T/ST x gate/update x fwd/bwd, node_lora fwd/bwd
    assert len(data["rows"]) == len(roofline.SHAPES) * calls_per_shape
    assert {row["shape"] for row in data["rows"]} == {label for label, _, _ in roofline.SHAPES}
    with pytest.raises(SystemExit):
        roofline.main(["--out", str(tmp_path / "missing")])
    assert "--out: no such folder" in capsys.readouterr().err


def test_recorded_table_is_what_the_model_gives():
    assert RECORDED.read_text() == roofline.markdown(roofline.rows(roofline.benchmark_workloads()))
