"""The end-to-end checks every finished model goes through (mrem_dist/validation.py)."""

import copy

import pytest

from conftest import build_tiny
from mrem_dist.scheme import QuantScheme
from mrem_dist.models import FAMILIES
from mrem_dist.quantize import quantize_model
from mrem_dist.validation import Structure, check_model, headline_metric, validate_result


@pytest.fixture()
def qmodel():
    return quantize_model(copy.deepcopy(build_tiny("bert", head=True)), FAMILIES["bert"], QuantScheme(w_bits=2))


@pytest.mark.parametrize("scheme", [QuantScheme(), QuantScheme(w_bits=2, ternary=True),
                                    QuantScheme(w_bits=3, w_symmetric=False),
                                    QuantScheme(w_granularity="group", w_groups=4, ocs_ratio=0.05)])
def test_a_sound_model_passes(scheme):
    model = quantize_model(copy.deepcopy(build_tiny("bert", head=True)), FAMILIES["bert"], scheme)
    assert check_model(model) == []


def test_nan_weight_is_named(qmodel):
    qmodel.bert.encoder.layer[1].output.dense.weight.data[0, 0] = float("nan")
    failures = check_model(qmodel)
    assert "bert.encoder.layer.1.output.dense.weight has NaN/inf values" in failures


def test_non_positive_step_size_is_named(qmodel):
    qmodel.bert.encoder.layer[0].intermediate.dense.weight_quantizer.scale.data[3] = -0.1
    assert any("layer.0.intermediate.dense: a quantization step size is not positive" in f or
               "layer.0.intermediate.dense: integer codes" in f for f in check_model(qmodel))


def test_metric_drop_beyond_max_drop_fails(qmodel):
    fp, q = {"accuracy": 0.90}, {"accuracy": 0.85, "fidelity_cosine": 0.9}
    assert headline_metric(q) == "accuracy"
    ok = validate_result(Structure.of(qmodel), fp, q, [0.1, 0.2], max_drop=0.1)
    assert ok["passed"] and ok["relative_drop"] == pytest.approx(0.05 / 0.90)
    bad = validate_result(Structure.of(qmodel), fp, q, [0.1, float("nan")], max_drop=0.01)
    assert not bad["passed"]
    assert any("modules [1] ended with a non-finite reconstruction error" in f for f in bad["failures"])
    assert any("accuracy dropped by 5.56%" in f for f in bad["failures"])
