import math

import pytest
import torch

from stfast.metrics import (
    MetricAccumulator, format_metrics_table, get_loss, horizon_metrics, huber_loss, masked_mae,
    masked_mae_loss, masked_mape, masked_rmse,
)

# target 0 is a missing reading; the valid errors are |1-2| = 1, |4-2| = 2, |3-3| = 0 and |8-4| = 4.
PRED = torch.tensor([1.0, 5.0, 4.0, 3.0, 8.0])
TARGET = torch.tensor([2.0, 0.0, 2.0, 3.0, 4.0])


def test_masked_metrics_by_hand():
    assert masked_mae(PRED, TARGET).item() == pytest.approx((1 + 2 + 0 + 4) / 4)
    assert masked_rmse(PRED, TARGET).item() == pytest.approx(math.sqrt((1 + 4 + 0 + 16) / 4))
    assert masked_mape(PRED, TARGET).item() == pytest.approx((1 / 2 + 2 / 2 + 0 / 3 + 4 / 4) / 4)


def test_masked_mae_equals_published_renormalised_form():
    pred, target = torch.randn(4, 12, 5, 1), torch.randn(4, 12, 5, 1)
    target[target < -0.5] = 0.0
    mask = (target != 0).float()
    mask = mask / mask.mean()
    published = torch.nan_to_num((pred - target).abs() * mask).mean()
    assert masked_mae(pred, target).item() == pytest.approx(published.item(), rel=1e-6)


def test_nan_null_value_skips_nan_targets():
    target = TARGET.clone()
    target[1] = float("nan")
    assert masked_mae(PRED, target, null_value=float("nan")).item() == pytest.approx(7 / 4)
    assert masked_rmse(PRED, target, null_value=float("nan")).item() == pytest.approx(math.sqrt(21 / 4))
    assert masked_mape(PRED, target, null_value=float("nan")).item() == pytest.approx(2.5 / 4)


def test_empty_mask_gives_zero_not_nan():
    zeros = torch.zeros(3)
    for metric in (masked_mae, masked_rmse, masked_mape):
        assert metric(torch.ones(3), zeros).item() == 0.0
    assert masked_mae(torch.ones(2), torch.full((2,), float("nan")), null_value=float("nan")).item() == 0.0


def test_gradient_flows_through_masked_mae():
    pred = PRED.clone().requires_grad_()
    masked_mae(pred, TARGET).backward()
    # d|p - t|/dp = sign(p - t) / valid count; zero where the target is missing or the error is 0.
    assert torch.allclose(pred.grad, torch.tensor([-1.0, 0.0, 1.0, 0.0, 1.0]) / 4)


def test_gradient_of_empty_mask_is_zero_not_nan():
    pred = torch.ones(3, requires_grad=True)
    masked_mae(pred, torch.zeros(3)).backward()
    assert torch.equal(pred.grad, torch.zeros(3))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        masked_mae(torch.zeros(2, 3), torch.zeros(3, 2))


def test_huber_equals_nn_huber_loss():
    pred, target = torch.randn(2, 12, 7, 1) * 3, torch.randn(2, 12, 7, 1) * 3
    expected = torch.nn.HuberLoss(delta=1.0)(pred, target)
    assert torch.allclose(huber_loss(pred, target), expected)
    assert torch.allclose(get_loss("huber")(pred, target), expected)


def test_get_loss_names_and_unknown():
    pred, target = torch.randn(10), torch.randn(10)
    assert get_loss("masked_mae") is masked_mae_loss
    assert torch.allclose(get_loss("mae")(pred, target), (pred - target).abs().mean())
    assert torch.allclose(get_loss("mse")(pred, target), (pred - target).square().mean())
    with pytest.raises(ValueError, match=r"loss: expected one of \['huber', 'mae', 'masked_mae', 'mse'\], got 'l2'"):
        get_loss("l2")


def _random_with_missing(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=generator) * 60 + 1
    target[torch.rand(shape, generator=generator) < 0.2] = 0.0
    return torch.randn(shape, generator=generator) * 5 + target, target


def test_accumulator_over_uneven_batches_equals_whole_array():
    pred, target = _random_with_missing((23, 12, 6, 1), seed=0)
    accumulator = MetricAccumulator()
    for lo, hi in ((0, 7), (7, 8), (8, 23)):
        accumulator.update(pred[lo:hi], target[lo:hi])
    streamed = accumulator.compute()
    assert list(streamed) == ["horizon_3", "horizon_6", "horizon_12", "average"]
    whole = pred.double(), target.double()
    for key, step in (("horizon_3", 2), ("horizon_6", 5), ("horizon_12", 11)):
        p, t = whole[0][:, step], whole[1][:, step]
        assert streamed[key] == pytest.approx(
            {"mae": masked_mae(p, t).item(), "rmse": masked_rmse(p, t).item(), "mape": masked_mape(p, t).item()},
            rel=1e-12)
    assert streamed["average"] == pytest.approx(
        {"mae": masked_mae(*whole).item(), "rmse": masked_rmse(*whole).item(), "mape": masked_mape(*whole).item()},
        rel=1e-12)
    whole_array = horizon_metrics(pred, target)
    for key in streamed:
        assert whole_array[key] == pytest.approx(streamed[key], rel=1e-12)


def test_accumulator_by_hand_and_plain_floats():
    # B=1, T=2, N=2, C=1: step 0 errors |1-2|, |3-5|; step 1 errors |4-4| and a missing target.
    pred = torch.tensor([[[[1.0], [3.0]], [[4.0], [9.0]]]])
    target = torch.tensor([[[[2.0], [5.0]], [[4.0], [0.0]]]])
    result = horizon_metrics(pred, target, horizons=(1, 2))
    assert result["horizon_1"] == pytest.approx({"mae": 1.5, "rmse": math.sqrt(2.5), "mape": (0.5 + 0.4) / 2})
    assert result["horizon_2"] == pytest.approx({"mae": 0.0, "rmse": 0.0, "mape": 0.0})
    assert result["average"] == pytest.approx({"mae": 1.0, "rmse": math.sqrt(5 / 3), "mape": 0.9 / 3})
    assert all(type(v) is float for metrics in result.values() for v in metrics.values())


def test_accumulator_accepts_numpy_and_empty_state():
    pred, target = _random_with_missing((4, 12, 3, 1), seed=1)
    assert horizon_metrics(pred.numpy(), target.numpy()) == horizon_metrics(pred, target)
    empty = MetricAccumulator().compute()
    assert empty["average"] == {"mae": 0.0, "rmse": 0.0, "mape": 0.0}


def test_accumulator_bad_input():
    accumulator = MetricAccumulator(out_steps=12)
    with pytest.raises(ValueError, match=r"\(2, 12, 3, 1\).*\(2, 12, 4, 1\)"):
        accumulator.update(torch.zeros(2, 12, 3, 1), torch.zeros(2, 12, 4, 1))
    with pytest.raises(ValueError, match=r"T=12.*\(2, 6, 3, 1\)"):
        accumulator.update(torch.zeros(2, 6, 3, 1), torch.zeros(2, 6, 3, 1))
    with pytest.raises(ValueError, match="horizons"):
        accumulator.compute(horizons=(13,))


def test_format_metrics_table():
    metrics = {"horizon_3": {"mae": 2.5, "rmse": 4.75, "mape": 0.1234},
               "average": {"mae": 3.0, "rmse": 6.125, "mape": 0.08}}
    lines = format_metrics_table(metrics).splitlines()
    assert lines[0].split() == ["MAE", "RMSE", "MAPE"]
    assert lines[1].split() == ["horizon", "3", "2.5000", "4.7500", "12.34%"]
    assert lines[2].split() == ["average", "3.0000", "6.1250", "8.00%"]
    assert len({len(line) for line in lines}) == 1  # columns are right-aligned to one width
