"""The INT8 inference path: integer GEMMs reproduce the fake-quant layers they replace (to float
rounding), really run the integer kernel, and refuse what they cannot compute exactly."""

import copy

import pytest
import torch
from torch import nn

import mrem_dist.quant.int8 as int8
from mrem_dist.quant import ActQuantizer, QuantEmbedding, QuantLinear, WeightQuantizer, calibrating
from mrem_dist.quant.int8 import Int8Embedding, Int8Linear, cpu_int8_code_limit, to_int8

# (weight bits, symmetric weights, activation mode, symmetric activations, OCS ratio[, full activation grid])
CASES = {
    "w4-dynamic-full-grid": (4, True, "dynamic", True, 0.0, True),
    "w4-static-full-grid": (4, True, "static", True, 0.0, True),
    "w4-static": (4, True, "static", True, 0.0),
    "w4-dynamic": (4, True, "dynamic", True, 0.0),
    "w2-dynamic": (2, True, "dynamic", True, 0.0),
    "w3-asym-static-asym": (3, False, "static", False, 0.0),
    "w6-asym-ocs": (6, False, "static", True, 0.1),
    "w4-asym-act-ocs": (4, True, "static", False, 0.05),
}


def _layer(w_bits, w_sym, a_mode, a_sym, ocs, full_range=False, in_features=90, out_features=37, seed=0):
    """A calibrated QuantLinear with odd sizes (K, N not multiples of 8) and moved-off-init params."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    act = ActQuantizer(8, a_mode, a_sym, learnable=False, full_range=full_range)
    m = nn.Sequential(QuantLinear(lin, WeightQuantizer(w_bits, w_sym, learnable=False), act, ocs_ratio=ocs))
    if a_mode == "static":
        with torch.no_grad(), calibrating(m):
            m(torch.randn(4, 16, in_features) * 2 + 0.3)
    return m


@pytest.mark.parametrize("backend", ["onednn", "int_mm"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [5, 64])  # fewer than cuBLASLt's 17 rows, and more
def test_int8_linear_matches_the_fake_quant_layer(case, backend, rows):
    m = _layer(*CASES[case])
    x = torch.randn(rows, 90) * 2 + 0.3
    with torch.no_grad():
        want = m(x)
        got = to_int8(copy.deepcopy(m), backend=backend)(x)
    assert got.shape == want.shape
    # Same integer codes on both sides; only the float rescaling differs in rounding order.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_int8_linear_keeps_leading_dims_and_dtype():
    m = _layer(4, True, "dynamic", True, 0.0)
    x = torch.randn(2, 3, 90)
    with torch.no_grad():
        got = to_int8(copy.deepcopy(m))(x)
        torch.testing.assert_close(got, m(x), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 37) and got.dtype == torch.float32


def test_the_integer_kernel_is_what_runs(monkeypatch):
    m = to_int8(_layer(4, True, "static", True, 0.0), backend="onednn")
    layer = m[0]
    calls = []
    real = int8._onednn_linear

    def spy(qx, *args):
        calls.append(qx.dtype)
        return real(qx, *args)

    monkeypatch.setattr(int8, "_onednn_linear", spy)
    with torch.no_grad():
        m(torch.randn(8, 90))
    assert calls == [torch.uint8]
    # No float weight is kept: the layer holds int8 codes and one step per output row.
    assert layer.codes.dtype == torch.int8 and not list(layer.parameters())
    assert layer.w_scale.shape == (37,)


def test_w8_weights_run_exactly_or_are_refused_on_cpu():
    """oneDNN on an x86 CPU without VNNI sums u8*s8 pairs in int16: 8-bit codes (127) overflow it.
    The limit is measured on this CPU; W8 must then be refused, never computed wrong."""
    limit = cpu_int8_code_limit()
    assert limit in (64, 127)
    m = _layer(8, True, "dynamic", True, 0.0)
    x = torch.randn(32, 90) * 3
    if limit < 127:
        with pytest.raises(ValueError, match="kernel='float'"):
            to_int8(copy.deepcopy(m), backend="onednn")
    else:
        with torch.no_grad():
            torch.testing.assert_close(to_int8(copy.deepcopy(m), backend="onednn")(x), m(x), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # torch._int_mm accumulates in int32 on every device
        torch.testing.assert_close(to_int8(copy.deepcopy(m), backend="int_mm")(x), m(x), rtol=1e-5, atol=1e-4)


def test_int8_embedding_is_bit_identical():
    torch.manual_seed(0)
    emb = QuantEmbedding(nn.Embedding(50, 12, padding_idx=0), WeightQuantizer(8, learnable=False))
    m = nn.Sequential(emb)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = m(ids)
        converted = to_int8(copy.deepcopy(m))
    assert isinstance(converted[0], Int8Embedding) and converted[0].codes.dtype == torch.int8
    assert torch.equal(converted(ids), want)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="no quantized modules"):
        to_int8(nn.Sequential(nn.Linear(4, 4)))
    fp_act = nn.Sequential(QuantLinear(nn.Linear(16, 8), WeightQuantizer(4), None))
    with pytest.raises(ValueError, match="full-precision activations"):
        to_int8(fp_act)
    asym8 = _layer(8, False, "dynamic", True, 0.0)
    with pytest.raises(ValueError, match="asymmetric 8-bit"):
        to_int8(asym8, backend="int_mm")
    uncalibrated = nn.Sequential(QuantLinear(nn.Linear(16, 8), WeightQuantizer(4), ActQuantizer(8, "static")))
    with pytest.raises(ValueError, match="not calibrated"):
        to_int8(uncalibrated)
    with pytest.raises(ValueError, match="backend='bogus'"):
        to_int8(_layer(4, True, "dynamic", True, 0.0), backend="bogus")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_int8_linear_on_cuda(case):
    m = _layer(*CASES[case]).cuda()
    x = torch.randn(64, 90, device="cuda") * 2
    with torch.no_grad():
        want = m(x)
        layer = to_int8(copy.deepcopy(m))
        assert isinstance(layer[0], Int8Linear) and layer[0].backend == "int_mm"
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
