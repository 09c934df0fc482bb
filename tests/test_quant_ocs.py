import math

import pytest
import torch

from mrem_dist.quant import ocs_num_split, ocs_split, ocs_split_quant_aware


def _weight_with_outlier(out=16, n_in=20, col=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    w[:, col] *= 100.0  # dominates even after two halvings
    return w


def _x(n_in, seed=1):
    return torch.randn(4, 7, n_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.05, 0.1])
def test_ocs_preserves_function_and_shrinks_max(ratio):
    w = _weight_with_outlier()
    new, idx = ocs_split(w, ratio)
    n = math.ceil(ratio * 20)
    assert new.shape == (16, 20 + n) and idx.shape == (20 + n,) and idx.dtype == torch.long
    assert torch.equal(idx[:20], torch.arange(20))
    x = _x(20)
    torch.testing.assert_close(x[..., idx] @ new.T, x @ w.T, rtol=1e-5, atol=1e-4)
    assert new.abs().max() < w.abs().max()


def test_outlier_column_is_split_twice():
    w = _weight_with_outlier()
    new, idx = ocs_split(w, 0.1)  # n = 2
    assert idx[20:].tolist() == [3, 3]
    # column 3 was split twice: a quarter of the original stays in place and in the last copy
    torch.testing.assert_close(new[:, 3], w[:, 3] / 4)
    torch.testing.assert_close(new[:, 20], w[:, 3] / 2)
    torch.testing.assert_close(new[:, 21], w[:, 3] / 4)
    assert new.abs().max() == pytest.approx(w.abs().max().item() / 2)


def test_num_split_and_ratio_zero():
    assert [ocs_num_split(20, r) for r in (0.0, 0.01, 0.05, 0.1)] == [0, 1, 1, 2]
    assert ocs_num_split(30, 0.1) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    w = torch.randn(3, 5)
    new, idx = ocs_split(w, 0.0)
    assert torch.equal(new, w) and new.data_ptr() != w.data_ptr() and torch.equal(idx, torch.arange(5))
    with pytest.raises(ValueError, match="ocs_ratio=1.5"):
        ocs_split(w, 1.5)


@pytest.mark.parametrize("ratio", [0.05, 0.1])
@pytest.mark.parametrize("step", [0.3, "per_row"])
def test_quant_aware_split(ratio, step):
    w = _weight_with_outlier()
    if step == "per_row":
        step = torch.rand(16, 1, generator=torch.Generator().manual_seed(2)) + 0.1
    _, idx_plain = ocs_split(w, ratio)
    new, idx = ocs_split_quant_aware(w, ratio, step)
    assert torch.equal(idx, idx_plain)  # same split sequence
    x = _x(20)
    torch.testing.assert_close(x[..., idx] @ new.T, x @ w.T, rtol=1e-5, atol=1e-4)
    s = torch.as_tensor(step).reshape(-1)
    if ratio == 0.05:  # one split: the pair sums to v and is v/2 -+ step/4
        torch.testing.assert_close(new[:, 3] + new[:, 20], w[:, 3])
        torch.testing.assert_close(new[:, 3], w[:, 3] / 2 - s / 4)
        torch.testing.assert_close(new[:, 20], w[:, 3] / 2 + s / 4)
    else:  # two splits of column 3: all three pieces still sum to v
        torch.testing.assert_close(new[:, 3] + new[:, 20] + new[:, 21], w[:, 3])


def test_quant_aware_split_rounds_better_than_halving():
    # v = k*step with k odd (on the grid): plain halves land on the half-grid (k/2 = m + 0.5) and
    # round-half-to-even loses a step; the quant-aware pair (k/2 -+ 1/4) round-trips exactly.
    step = 1.0
    v = (torch.arange(15.0) * 2 + 101).reshape(-1, 1)  # odd values, the outlier column
    w = torch.cat([v, torch.full((15, 3), 0.1)], dim=1)
    plain, _ = ocs_split(w, 0.25)
    qa, _ = ocs_split_quant_aware(w, 0.25, step)
    err_plain = (torch.round(plain[:, 0]) + torch.round(plain[:, 4]) - w[:, 0]).abs().sum()
    err_qa = (torch.round(qa[:, 0]) + torch.round(qa[:, 4]) - w[:, 0]).abs().sum()
    assert err_qa == 0 and err_plain > 0


def test_quant_aware_bad_step_shape():
    with pytest.raises(ValueError, match="16 rows"):
        ocs_split_quant_aware(_weight_with_outlier(), 0.1, torch.ones(5))
