"""The memory model: predictions from fake tensors against one real training step measured on the CPU.

Tolerance: the predicted step peak is within 10% of the measured one (PyTorch's CPU allocator events),
and parameters and optimiser state are exact. Sizes are small (PEMS08's and METR-LA's graphs, reduced hidden sizes,
batch 2-4, 4 in / 4 out steps) so the measured steps stay cheap; the prediction does not depend on the size being small.
"""

import pytest
import torch

from stfast.memory import GPU_CAPACITIES, estimate_memory, measure_step_memory
from stfast.profiler import estimate_memory as exported

TOLERANCE = 0.10


def _predicted_and_measured(model, backend, batch, dataset, **overrides):
    predicted = estimate_memory(model, batch, dataset, backend, device="cpu", **overrides)
    measured = measure_step_memory(model, batch, dataset, backend, **overrides)
    assert predicted.parameters == measured.parameters > 0
    assert predicted.optimizer_state == measured.optimizer_state == 2 * measured.parameters  # Adam's two moments
    assert measured.step_peak > 5 * 2**20  # large enough for the comparison to mean something
    assert abs(predicted.step_peak - measured.step_peak) <= TOLERANCE * measured.step_peak, (
        predicted.step_peak / 2**20, measured.step_peak / 2**20)
    return predicted, measured


def test_himnet_prediction_matches_the_measured_cpu_step_for_reference_and_fused_ops():
    # the reference materialises the (B, N, K*C, O) weights; the fused ops keep their inputs and workspaces
    # 4 in / 4 out steps: a quarter of the ops to trace and to run, the same per-step sizes
    reference, _ = _predicted_and_measured("himnet", "reference", 2, "PEMS08", in_steps=4, out_steps=4, hidden_dim=16)
    fused, _ = _predicted_and_measured("himnet", "cpu", 4, "PEMS08", in_steps=4, out_steps=4, hidden_dim=16)
    assert fused.parameters == reference.parameters
    assert 2 * fused.step_peak < reference.step_peak  # at twice the batch


def test_agcrn_fused_prediction_matches_the_measured_cpu_step():
    _predicted_and_measured("agcrn", "cpu", 4, "METR-LA", in_steps=4, out_steps=4, rnn_units=16)


def test_prediction_grows_with_the_batch_and_leaves_the_random_state_alone():
    state = torch.random.get_rng_state()
    small = estimate_memory("stid", 2, "PEMS08")
    large = estimate_memory("stid", 8, "PEMS08")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert large.parameters == small.parameters and large.step_peak > 3 * small.step_peak


def test_cuda_rounds_blocks_and_reports_fit():
    cuda = estimate_memory("stid", 2, "PEMS08", device="cuda")
    cpu = estimate_memory("stid", 2, "PEMS08", device="cpu")
    assert cuda.step_peak >= cpu.step_peak and cuda.step_peak % 512 == 0
    assert cuda.fits(GPU_CAPACITIES["80 GB (A100/H100)"]) and not cuda.fits(cuda.total - 1)
    assert cuda.to_dict()["total"] == cuda.parameters + cuda.optimizer_state + cuda.step_peak
    assert exported is estimate_memory


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"device: expected 'cuda' or 'cpu', got 'tpu'"):
        estimate_memory("stid", 2, "PEMS08", device="tpu")
    with pytest.raises(ValueError, match=r"batch_size"):
        estimate_memory("stid", 0, "PEMS08")
    with pytest.raises(ValueError, match=r"dataset: expected one of"):
        estimate_memory("stid", 2, "nowhere")
