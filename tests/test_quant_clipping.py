import pytest
import torch

from mrem_dist.quant import ACIQ_ALPHA, clip_range, fake_quant, qrange, scale_zero_point


def test_aciq_constants_are_the_contract():
    assert ACIQ_ALPHA == {
        "laplace": {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89},
        "gauss": {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92},
    }


def test_minmax_symmetric_and_asymmetric():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 1.0, 4.0], [-2.0, -1.0, -0.5]])
    lo, hi = clip_range(x, 4, True, "minmax")
    assert torch.equal(hi, torch.tensor([[3.0], [4.0], [2.0]])) and torch.equal(lo, -hi)
    lo, hi = clip_range(x, 4, False, "minmax")
    # 0 is kept inside the range for all-positive / all-negative rows
    assert torch.equal(lo, torch.tensor([[-3.0], [0.0], [-2.0]]))
    assert torch.equal(hi, torch.tensor([[2.0], [4.0], [0.0]]))


def _outlier_row():
    # 99 zeros and one 100: mean 1, b = mean|x - 1| = (99*1 + 99)/100 = 1.98
    x = torch.zeros(1, 100)
    x[0, -1] = 100.0
    return x


def test_aciq_laplace_symmetric_formula():
    x = _outlier_row()
    lo, hi = clip_range(x, 4, True, "aciq", "laplace")
    assert torch.allclose(hi, torch.tensor([[5.03 * 1.98]]))
    assert torch.equal(lo, -hi)


def test_aciq_gauss_symmetric_formula():
    x = _outlier_row()
    std = x.std(correction=0)
    _, hi = clip_range(x, 3, True, "aciq", "gauss")
    assert torch.allclose(hi, (2.15 * std).reshape(1, 1))


def test_aciq_capped_at_max_abs():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # b = 1, alpha = 9.89 > max|x| = 1
    _, hi = clip_range(x, 8, True, "aciq")
    assert torch.equal(hi, torch.tensor([[1.0]]))


def test_aciq_asymmetric_formula():
    x = _outlier_row() + 5.0  # min 5, mean 6, max 105, b = 1.98
    alpha = 5.03 * 1.98
    lo, hi = clip_range(x, 4, False, "aciq")
    lo_ref = max(5.0, 6.0 - alpha)
    hi_ref = min(lo_ref + 2 * alpha, 105.0)
    # then 0 is put inside the range
    assert torch.allclose(lo, torch.tensor([[0.0]]))
    assert torch.allclose(hi, torch.tensor([[hi_ref]]))
    # a row straddling zero keeps the formula unchanged
    y = _outlier_row() - 5.0  # min -5, mean -4, max 95
    lo, hi = clip_range(y, 4, False, "aciq")
    lo_ref = max(-5.0, -4.0 - alpha)
    assert torch.allclose(lo, torch.tensor([[lo_ref]])) and torch.allclose(hi, torch.tensor([[lo_ref + 2 * alpha]]))


def _recon_err(x, lo, hi, bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    s, zp = scale_zero_point(lo, hi, bits, symmetric)
    return (x - fake_quant(x, s, zp, qmin, qmax)).pow(2).sum(dim=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_not_worse_than_minmax_on_heavy_tails(symmetric):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((8, 512))
    e_mm = _recon_err(x, *clip_range(x, 3, symmetric, "minmax"), 3, symmetric)
    e_mse = _recon_err(x, *clip_range(x, 3, symmetric, "mse"), 3, symmetric)
    assert (e_mse <= e_mm).all()
    assert e_mse.sum() < 0.9 * e_mm.sum()  # heavy tails: clipping really helps at 3 bits


@pytest.mark.parametrize("method", ["minmax", "aciq", "mse"])
def test_asymmetric_ranges_contain_zero(method):
    torch.manual_seed(1)
    x = torch.cat([torch.rand(3, 64) + 1.0, -(torch.rand(3, 64) + 1.0), torch.randn(3, 64)])
    lo, hi = clip_range(x, 4, False, method)
    assert (lo <= 0).all() and (hi >= 0).all() and (hi > lo).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["minmax", "aciq", "mse"])
def test_degenerate_rows_give_finite_positive_scale(method, symmetric):
    x = torch.stack([torch.zeros(16), torch.full((16,), 3.0), torch.full((16,), -2.0)])
    lo, hi = clip_range(x, 4, symmetric, method)
    s, zp = scale_zero_point(lo, hi, 4, symmetric)
    assert torch.isfinite(s).all() and (s > 0).all()
    qmin, qmax = qrange(4, symmetric)
    # constant rows are reproduced exactly by minmax-like ranges
    assert torch.allclose(fake_quant(x, s, zp, qmin, qmax), x)


def test_scale_zero_point():
    s, zp = scale_zero_point(torch.tensor([[-1.0]]), torch.tensor([[1.0]]), 8, True)
    assert zp is None and torch.equal(s, torch.tensor([[1 / 127]]))
    s, zp = scale_zero_point(torch.tensor([[-1.0]]), torch.tensor([[3.0]]), 2, False)
    assert torch.allclose(s, torch.tensor([[4 / 3]])) and torch.equal(zp, torch.tensor([[1.0]]))
    s, _ = scale_zero_point(torch.zeros(1, 1), torch.zeros(1, 1), 4, True)
    assert s.item() == pytest.approx(1e-8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="clip='max'"):
        clip_range(torch.ones(1, 4), 4, True, "max")
    with pytest.raises(ValueError, match="prior='cauchy'"):
        clip_range(torch.ones(1, 4), 4, True, "aciq", "cauchy")
    with pytest.raises(ValueError, match="2-D"):
        clip_range(torch.ones(4), 4, True)


def test_mse_blocked_search_matches_plain_search():
    # 70000 columns > one block of 2**16 values: exercises the row/column blocking of the search.
    torch.manual_seed(2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((2, 70000))
    lo_mm, hi_mm = clip_range(x, 3, False, "minmax")
    best = torch.stack(
        [_recon_err(x, lo_mm * r, hi_mm * r, 3, False) for r in torch.linspace(0.2, 1.0, 81).tolist()]
    ).amin(dim=0)
    torch.testing.assert_close(_recon_err(x, *clip_range(x, 3, False, "mse"), 3, False), best, rtol=1e-4, atol=0)
