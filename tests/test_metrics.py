"""Metrics against hand-computed values, and the fidelity metrics' identities."""

import math

import numpy as np
import pytest
import torch

from mrem_dist.data import compute_metrics, fidelity_metrics, mean_pool


def test_accuracy_f1_mcc_by_hand():
    pred = [1, 0, 1, 1, 0, 0]
    gold = [1, 0, 0, 1, 1, 0]
    # tp=2 (rows 0,3), tn=2 (rows 1,5), fp=1 (row 2), fn=1 (row 4)
    out = compute_metrics(["accuracy", "f1", "mcc"], pred, gold)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2tp / (2tp + fp + fn)
    assert out["mcc"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert all(type(v) is float for v in out.values())


def test_f1_is_binary_on_positive_class():
    # All-negative predictions: f1 of class 1 is 0 (not the macro average, which would be > 0).
    out = compute_metrics(["f1", "accuracy"], [0, 0, 0, 0], [0, 0, 1, 1])
    assert out == {"f1": 0.0, "accuracy": 0.5}


def test_pearson_spearman_by_hand():
    pred = [1.0, 2.0, 3.0, 4.0]
    gold = [2.0, 4.0, 6.0, 9.0]
    out = compute_metrics(["pearson", "spearman"], pred, gold)
    x, y = np.array(pred), np.array(gold)
    xc, yc = x - x.mean(), y - y.mean()
    assert out["pearson"] == pytest.approx(float((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))))
    assert out["spearman"] == pytest.approx(1.0)  # monotone, so ranks agree exactly
    # one swapped pair in 4: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert compute_metrics(["spearman"], [1, 2, 4, 3], [1, 2, 3, 4])["spearman"] == pytest.approx(0.8)


def test_metrics_accept_tensors_and_integral_floats():
    out = compute_metrics(["accuracy"], torch.tensor([1.0, 0.0]), torch.tensor([1, 1]))
    assert out["accuracy"] == 0.5


@pytest.mark.parametrize(
    "names, pred, gold, match",
    [
        (["bleu"], [1], [1], "unknown metric.*accuracy"),
        (["accuracy"], [1, 0], [1], "2 predictions for 1 labels"),
        (["accuracy"], [[0.1, 0.9]], [1], "argmax"),
        (["accuracy"], [0.3, 0.7], [0, 1], "argmax"),
        (["accuracy"], [], [], "empty"),
    ],
)
def test_metric_errors(names, pred, gold, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(names, pred, gold)


def test_fidelity_identity():
    ref = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    out = fidelity_metrics(ref, ref.clone())
    assert out["cosine"] == pytest.approx(1.0)
    assert out["cosine_min"] == pytest.approx(1.0)
    assert out["rank_agreement"] == pytest.approx(1.0)
    assert out["rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert set(out) == {"cosine", "cosine_min", "rank_agreement", "rel_error"}
    assert all(type(v) is float for v in out.values())


def test_fidelity_noise_lowers_agreement():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(30, 16, generator=g)
    small = fidelity_metrics(ref, ref + 0.1 * torch.randn(30, 16, generator=g))
    large = fidelity_metrics(ref, ref + 1.0 * torch.randn(30, 16, generator=g))
    assert 1.0 > small["cosine"] > large["cosine"]
    assert small["cosine_min"] <= small["cosine"]
    assert 1.0 > small["rank_agreement"] > large["rank_agreement"]
    assert 0.0 < small["rel_error"] < large["rel_error"]


def test_fidelity_scale_invariance_of_cosine_not_rel_error():
    ref = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    out = fidelity_metrics(ref, 2 * ref)
    assert out["cosine"] == pytest.approx(1.0)
    assert out["rank_agreement"] == pytest.approx(1.0)
    assert out["rel_error"] == pytest.approx(1.0)


def test_fidelity_errors():
    with pytest.raises(ValueError, match="same texts"):
        fidelity_metrics(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 3"):
        fidelity_metrics(torch.ones(2, 3), torch.ones(2, 3))


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    # an all-padding row gives zeros instead of NaN
    assert torch.equal(mean_pool(hidden, torch.zeros(1, 3)), torch.zeros(1, 2))
