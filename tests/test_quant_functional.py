import pytest
import torch

from mrem_dist.quant import check_bits, dequantize, fake_quant, qrange, quantize_codes, round_ste, tokenwise_scale


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange(bits):
    q = 2 ** (bits - 1) - 1
    assert qrange(bits, True) == (-q, q)
    assert qrange(bits, False) == (0, 2**bits - 1)


def test_qrange_known_values():
    assert qrange(2, True) == (-1, 1)
    assert qrange(8, True) == (-127, 127)
    assert qrange(8, False) == (0, 255)


@pytest.mark.parametrize("bits", range(2, 9))
def test_full_range_uses_every_code(bits):
    lo, hi = qrange(bits, True, full_range=True)
    assert (lo, hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) and hi - lo + 1 == 2**bits
    assert qrange(bits, False, full_range=True) == qrange(bits, False)  # asymmetric has them all already


@pytest.mark.parametrize("bits", [1, 9, 0, 2.0, True])
def test_check_bits_errors(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        check_bits(bits)


def test_check_bits_message_names_value_and_fix():
    with pytest.raises(ValueError, match=r"bits=9 is outside 2\.\.8: choose bits between 2 and 8"):
        check_bits(9)


def test_round_ste():
    x = torch.tensor([-1.6, -0.4, 0.5, 1.5, 2.49], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


# 3-bit symmetric: qmax = 3, scale 0.25 -> representable range [-0.75, 0.75].
X = [-3.0, -0.26, 0.1, 0.74, 2.0]


def test_fake_quant_hand_example():
    y = fake_quant(torch.tensor(X), torch.tensor(0.25), None, -3, 3)
    assert torch.equal(y, torch.tensor([-0.75, -0.25, 0.0, 0.75, 0.75]))


def test_fake_quant_asymmetric_hand_example():
    # scale 0.5, zero point 2, codes 0..3 -> representable {-1, -0.5, 0, 0.5}
    y = fake_quant(torch.tensor([-2.0, -0.7, 0.2, 0.3, 4.0]), torch.tensor(0.5), torch.tensor(2.0), 0, 3)
    assert torch.equal(y, torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5]))


def test_fake_quant_ste_gradient_of_x():
    x = torch.tensor(X, requires_grad=True)
    fake_quant(x, torch.tensor(0.25), None, -3, 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_fake_quant_lsq_scale_gradient():
    x = torch.tensor(X)
    s = torch.tensor(0.25, requires_grad=True)
    fake_quant(x, s, None, -3, 3).sum().backward()
    # LSQ: d q/d s = round(v) - v inside the range, qmin / qmax outside (v = x/s).
    v = x / 0.25
    expected = torch.where(v <= -3, torch.tensor(-3.0), torch.where(v >= 3, torch.tensor(3.0), torch.round(v) - v))
    assert torch.allclose(s.grad, expected.sum(), atol=1e-6)
    assert abs(s.grad.item() - (-3 + 0.04 - 0.4 + 0.04 + 3)) < 1e-5


def test_fake_quant_grad_scale_only_scales_the_scale_gradient():
    x = torch.tensor(X, requires_grad=True)
    s = torch.tensor(0.25, requires_grad=True)
    y0 = fake_quant(x, s, None, -3, 3)
    y0.sum().backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad, s.grad = None, None
    y1 = fake_quant(x, s, None, -3, 3, grad_scale=0.1)
    y1.sum().backward()
    assert torch.equal(y0, y1)
    assert torch.equal(x.grad, gx)
    assert torch.allclose(s.grad, gs * 0.1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_dequantize_roundtrip_equals_fake_quant(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g) * 3
    qmin, qmax = qrange(bits, symmetric)
    scale = torch.rand(6, 1, generator=g) * 0.2 + 0.01
    zp = None if symmetric else torch.randint(qmin, qmax + 1, (6, 1), generator=g).float()
    codes = quantize_codes(x, scale, zp, qmin, qmax)
    assert codes.dtype == torch.int32
    assert codes.min() >= qmin and codes.max() <= qmax
    ref = fake_quant(x, scale, zp, qmin, qmax)
    assert torch.equal(dequantize(codes, scale, zp), ref)
    # exactness holds with the LSQ gradient scaling active too
    assert torch.equal(fake_quant(x, scale.requires_grad_(), zp, qmin, qmax, grad_scale=0.05), ref)


def test_tokenwise_scale():
    x = torch.tensor([[[1.0, -4.0, 2.0], [0.0, 0.0, 0.0]]])
    s = tokenwise_scale(x, 8)
    assert s.shape == (1, 2, 1)
    assert s[0, 0, 0] == 4.0 / 127
    assert s[0, 1, 0] > 0 and torch.isfinite(s).all()
    assert torch.equal(fake_quant(x, s, None, -127, 127)[0, 1], torch.zeros(3))
