"""The search for the largest batch that fits a memory budget, and its verification in a capped process.

The search is checked against an exhaustive scan with a mocked, affine memory model (no tracing); one real
search (STID on PEMS08's graph, a few fake-tensor traces) and two small verifying processes keep the rest cheap.
"""

import math
from types import SimpleNamespace

import pytest

from stfast.benchmarks.largest_fit import (GIB, candidate_batches, check_budget, largest_fit, machine_memory,
                                           search_largest_fit, verify_fit)
from stfast.memory import estimate_memory

RESTING, PER_SAMPLE = 1000, 300  # bytes of a mocked model: parameters + optimiser state, and per sample


def _affine(traced: list):
    def estimate_at(batch):
        traced.append(batch)
        return SimpleNamespace(total=RESTING + PER_SAMPLE * batch, parameters=RESTING // 3,
                               optimizer_state=RESTING - RESTING // 3)
    return estimate_at


def test_candidates_are_the_powers_of_two_below_the_configured_batch_and_that_batch():
    assert candidate_batches(1) == [1]
    assert candidate_batches(16) == [1, 2, 4, 8, 16]
    assert candidate_batches(45) == [1, 2, 4, 8, 16, 32, 45]


@pytest.mark.parametrize("max_batch", [1, 16, 45, 64])
def test_the_search_finds_what_an_exhaustive_scan_finds_tracing_a_few_sizes(max_batch):
    candidates = candidate_batches(max_batch)
    for budget in range(RESTING + 1, RESTING + PER_SAMPLE * (max_batch + 2), 97):
        traced = []
        search = search_largest_fit(_affine(traced), max_batch, budget)
        fitting = [b for b in candidates if RESTING + PER_SAMPLE * b <= budget]
        assert search.batch == (fitting[-1] if fitting else None), budget
        # the boundary is shown: the answer and the size one up were both predicted
        if search.batch is not None:
            assert search.predicted[search.batch] <= budget
        if search.next_up is not None:
            assert search.next_up == candidates[len(fitting)] and search.predicted[search.next_up] > budget
        assert len(traced) == len(set(traced)) <= math.ceil(math.log2(len(candidates) + 1))
        assert search.resting == RESTING


def test_a_budget_the_parameters_and_optimiser_state_exceed_is_refused():
    with pytest.raises(ValueError, match=r"budget: expected more than the .* GiB that the parameters and "
                                         r"optimiser state of stid \(reference\) on CA take alone, got"):
        search_largest_fit(_affine([]), 32, RESTING - 1, what="stid (reference) on CA")
    steps_only = search_largest_fit(_affine([]), 32, RESTING + PER_SAMPLE - 1)
    assert steps_only.batch is None and steps_only.next_up == 1


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"max_batch: expected a positive int, got 0"):
        candidate_batches(0)
    with pytest.raises(ValueError, match=r"budget: expected a positive int, got 1.5"):
        search_largest_fit(_affine([]), 8, 1.5)
    with pytest.raises(ValueError, match=r"budget: expected at most this machine's memory"):
        check_budget(machine_memory() + 1)
    with pytest.raises(ValueError, match=r"headroom: expected a non-negative int of bytes, got -1"):
        verify_fit("stid", "reference", "PEMS08", 2, GIB, headroom=-1)


def test_the_search_on_the_memory_model_stops_between_two_traced_sizes():
    four, eight = (estimate_memory("stid", b, "PEMS08", "reference", device="cpu").total for b in (4, 8))
    search = largest_fit("stid", "reference", "PEMS08", (four + eight) // 2)
    assert (search.batch, search.next_up) == (4, 8)
    assert search.predicted[4] == four and search.predicted[8] == eight


def test_verification_measures_the_step_in_a_capped_process_and_the_cap_refuses_what_exceeds_it():
    budget = GIB // 2
    predicted = estimate_memory("stid", 16, "PEMS08", "reference", device="cpu")
    result = verify_fit("stid", "reference", "PEMS08", 16, budget, timeout=300)
    assert result["ok"], result
    assert result["parameters"] == predicted.parameters and 5 * 2**20 < result["total"] <= budget
    assert abs(result["step_peak"] - predicted.step_peak) <= 0.1 * result["step_peak"]
    assert result["max_rss"] > result["baseline_rss"] > 0
    # no headroom and a 1 MiB budget: the process may barely grow, so the step's allocations are refused
    capped = verify_fit("stid", "reference", "PEMS08", 2, 2**20, timeout=300, headroom=0)
    assert not capped["ok"] and "allocation refused by the address-space cap" in capped["error"], capped
