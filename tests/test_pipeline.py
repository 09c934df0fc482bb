"""End to end: the PTQ method on tiny seeded models and local files, through the same `run()` the
entry point calls; the entry point itself in a subprocess; bad inputs fail before long work and
leave no report behind."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from mrem_dist.config import register_configs, validate
from mrem_dist.preflight import InputError
from mrem_dist.runner import execute, run

register_configs()


def _cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose("config", overrides=[f"run_dir={run_dir}", *overrides])
    return validate(OmegaConf.to_object(dcfg))


def _small_data(train, dev):
    return ["data=local", f"data.train_file={train}", f"data.validation_file={dev}", "data.max_length=16",
            "data.calib_samples=16", "data.eval_samples=16", "data.batch_size=8"]


def test_ptq_classifier_reports_task_metric(tmp_path, tiny_classifier_dir, sst_like_csv):
    cfg = _cfg(tmp_path, f"model.path={tiny_classifier_dir}", "method=ptq", "quant=w8a8", *_small_data(*sst_like_csv))
    report = run(cfg)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["metrics"] == report["metrics"]
    fp, q = report["metrics"]["full_precision"], report["metrics"]["quantized"]
    assert set(fp) == {"accuracy"} and 0 <= q["accuracy"] <= 1
    # W8A8 of a model reproduces its FP logits closely (label-free fidelity).
    assert q["fidelity_cosine"] > 0.99
    assert report["model"]["kind"] == "classifier"
    assert (tmp_path / "summary.md").read_text().startswith("# mrem-dist: ptq w8a8")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("quant,extra", [("w4a8", ["clip=aciq"]), ("w2a8", ["clip=mse"]), ("w3a8", ["clip=ocs"]),
                                         ("w4a8_fg", ["quant.w_groups=16"]), ("w2e2a8", ["quant.ternary=true"])])
def test_ptq_encoder_fidelity_orders_by_bits(tmp_path, tiny_encoder_dir, sst_like_csv, quant, extra):
    cfg = _cfg(tmp_path, f"model.path={tiny_encoder_dir}", f"quant={quant}", *extra, *_small_data(*sst_like_csv))
    report = run(cfg)
    fp, q = report["metrics"]["full_precision"], report["metrics"]["quantized"]
    assert fp["cosine"] == pytest.approx(1.0) and fp["rank_agreement"] == pytest.approx(1.0)
    assert 0 < q["cosine"] < 1 and math.isfinite(q["rank_agreement"])


def test_more_bits_is_more_faithful(tmp_path, tiny_encoder_dir, sst_like_csv):
    cos = {}
    for quant in ("w8a8", "w2a8"):
        cfg = _cfg(tmp_path / quant, f"model.path={tiny_encoder_dir}", f"quant={quant}", *_small_data(*sst_like_csv))
        cos[quant] = run(cfg)["metrics"]["quantized"]["cosine"]
    assert cos["w8a8"] > cos["w2a8"]


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        # All found before any weight is loaded (preflight), as InputError: exit code 2 at the command line.
        (["quant=w4a8_fg", "quant.w_groups=5"], InputError, r"groups=5 does not divide"),
        (["data.text_fields=[review]"], InputError, r"review"),
        (["data.label_field=stars"], InputError, r"stars"),
        (["model.path=/does/not/exist"], InputError, r"is not a directory"),
        (["method=mrem_s", "method.modules=9"], InputError, r"method.modules=9 but the model has 4 layers.*method.modules<=4"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, tiny_classifier_dir, sst_like_csv, overrides, exc, match):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, f"model.path={tiny_classifier_dir}", *_small_data(*sst_like_csv), *overrides)
    with pytest.raises(exc, match=match):
        run(cfg)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_nan_in_calibration_is_named(tmp_path, tiny_encoder_dir, sst_like_csv):
    import torch

    from mrem_dist.models import loading

    real = loading.load_model

    def poisoned(*a, **k):
        loaded = real(*a, **k)
        with torch.no_grad():
            loaded.model.embeddings.LayerNorm.weight[3] = float("nan")
        return loaded

    # Static activation ranges: the calibration pass is where the NaN shows first.
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv), "method=ptq",
               "quant.a_mode=static")
    import mrem_dist.context as context

    context.load_model, orig = poisoned, context.load_model
    try:
        with pytest.raises(FloatingPointError, match=r"encoder.layer.0.attention"):
            run(cfg)
    finally:
        context.load_model = orig
    assert not (tmp_path / "run" / "report.json").exists()


def test_nan_weight_is_named(tmp_path, tiny_encoder_dir):
    import torch

    from mrem_dist.models import load_model
    from mrem_dist.quantize import quantize_model

    loaded = load_model(tiny_encoder_dir)
    with torch.no_grad():
        loaded.model.encoder.layer[2].output.dense.weight[0, 0] = float("inf")
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match=r"encoder.layer.2.output.dense.*NaN/inf"):
        quantize_model(loaded.model, loaded.family, cfg.quant)


@pytest.mark.slow
def test_entry_point_runs_and_rejects_bad_bits(tmp_path, tiny_encoder_dir, sst_like_csv):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "mrem_dist", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv)]
    ok = subprocess.run(base + [f"hydra.run.dir={tmp_path / 'ok'}"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["config"]["run_dir"] == str(tmp_path / "ok")
    assert "[rank 0]" in ok.stdout + ok.stderr
    bad = subprocess.run(base + ["quant.w_bits=9", f"hydra.run.dir={tmp_path / 'bad'}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "quant.w_bits=9 is outside 2..8" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad" / "report.json").exists()
    # A model that fails validation: exit code 3, and the report says why.
    strict = subprocess.run(base + ["quant=w2a8", "max_drop=0", f"hydra.run.dir={tmp_path / 'strict'}"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert strict.returncode == 3, strict.stderr
    validation = json.loads((tmp_path / "strict" / "report.json").read_text())["validation"]
    assert not validation["passed"] and "cosine dropped by" in validation["failures"][0]


@pytest.mark.parametrize("method", ["rem", "lkd", "mrem_s", "mrem_p"])
def test_reconstruction_methods_end_to_end(tmp_path, tiny_encoder_dir, sst_like_csv, method):
    cfg = _cfg(tmp_path, f"model.path={tiny_encoder_dir}", "quant=w2a8", "clip=mse", f"method={method}",
               "method.steps=30", *_small_data(*sst_like_csv))
    report = run(cfg)
    rec = report["reconstruction"]
    assert len(rec["modules"]) == 4  # tiny model: 4 layers; mrem_s's default of 4 modules = one each
    assert rec["cache"] == ("stream" if method == "mrem_p" else "memory")
    assert rec["partition"][0].startswith("module 0: embeddings")
    before, after = report["metrics_before_reconstruction"], report["metrics"]["quantized"]
    assert after["rel_error"] < before["rel_error"]
    assert sum(m["error_after"] for m in rec["modules"]) < sum(m["error_before"] for m in rec["modules"])
    assert len(report["layer_error"]["before"]) == len(report["layer_error"]["after"]) == 4
    assert (tmp_path / "reconstruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert f"# mrem-dist: {method} w2a8" in summary and "error before" in summary
    assert report["timings_s"]["reconstruct"] > 0
    assert report["validation"]["passed"] and report["validation"]["checked_quantized_tensors"] == 4 * 6 + 1


def test_validation_failure_writes_the_report_and_raises(tmp_path, tiny_encoder_dir, sst_like_csv):
    from mrem_dist.validation import ValidationFailed

    cfg = _cfg(tmp_path, f"model.path={tiny_encoder_dir}", "quant=w2a8", "max_drop=0.0", *_small_data(*sst_like_csv))
    with pytest.raises(ValidationFailed, match=r"cosine dropped by .*more than max_drop=0.0"):
        run(cfg)
    validation = json.loads((tmp_path / "report.json").read_text())["validation"]
    assert validation["passed"] is False and validation["max_drop"] == 0.0 and validation["relative_drop"] > 0


def test_a_tensor_no_stage_holds_fails_validation_and_writes_no_artifact(tmp_path, tiny_encoder_dir, sst_like_csv,
                                                                          monkeypatch):
    # The coordinator writes the model from what the stages declare they hold: a tensor of the
    # model no stage declares (here layer 2's value projection, as if its module had been lost on
    # the way) must fail validation, naming it, and leave no artifact.
    from mrem_dist.drivers import parallel
    from mrem_dist.validation import ValidationFailed

    sent = parallel.gather_to_main

    def losing(payload, dist, layout):
        payload.covers = [n for n in payload.covers if not n.endswith("layer.2.attention.self.value.weight")]
        return sent(payload, dist, layout)

    monkeypatch.setattr(parallel, "gather_to_main", losing)
    cfg = _cfg(tmp_path, f"model.path={tiny_encoder_dir}", "quant=w4a8", "method=mrem_p", "method.steps=2",
               *_small_data(*sst_like_csv))
    with pytest.raises(ValidationFailed, match=r"no rank sent 1 of the model's tensors \(e\.g\. [a-z.]*layer\.2\.attention"
                                               r"\.self\.value\.weight, owned by module 2\)"):
        run(cfg)
    assert not json.loads((tmp_path / "report.json").read_text())["validation"]["passed"]
    assert not (tmp_path / "model").exists()


def test_a_parallel_run_of_a_sequential_method_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="method=mrem_s runs in one process but this was launched as 2 ranks"):
        run(_cfg(tmp_path, "method=mrem_s"))


@pytest.mark.parametrize(
    "override,match",
    [("method.steps=0", "method.steps=0 must be positive"), ("method.lam=half", "method.lam='half' is not one of"),
     ("method.loss=l1", "method.loss='l1'"), ("method.modules=-1", "method.modules=-1 must be >= 0"),
     ("method.queue=0", "method.queue=0 must be >= 1"), ("timeout_s=0", "timeout_s=0.0 must be positive"),
     ("max_drop=1.5", r"max_drop=1.5 must be in \[0, 1\]")],
)
def test_bad_method_settings_are_rejected(tmp_path, override, match):
    from mrem_dist.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, "method=mrem_s", override)


@pytest.mark.parametrize(
    "overrides,match",
    [(["method=mrem_p", "method.steps=10", "method.finish_steps=11"], r"method.finish_steps=11 must be in \[0, method.steps=10\]"),
     (["method=mrem_p", "method.finish_steps=-1"], r"method.finish_steps=-1 must be in \[0"),
     (["method=mrem_s", "method.finish_steps=5"], "MREM-P's finish phase: with method=mrem_s every module already"),
     (["method=mrem_p", "method.lam=one", "method.finish_steps=5"], "never sees its upstream's quantized outputs")],
)
def test_bad_finish_steps_are_rejected(tmp_path, overrides, match):
    from mrem_dist.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, *overrides)


@pytest.mark.slow
def test_hydra_sweep_runs_every_combination(tmp_path, tiny_encoder_dir, sst_like_csv):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mrem_dist", "-m", "quant=w8a8,w2a8", "method=ptq", f"model.path={tiny_encoder_dir}",
           *_small_data(*sst_like_csv), f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reports = sorted(tmp_path.glob("*/report.json"))
    assert [p.parent.name for p in reports] == ["0_ptq_w8a8", "1_ptq_w2a8"]
    cos = [json.loads(p.read_text())["metrics"]["quantized"]["cosine"] for p in reports]
    assert cos[0] > cos[1]


@pytest.mark.slow
def test_builtin_default_on_the_real_minilm(tmp_path):
    # The README's main job (MREM-P), on fewer samples and steps: the real model and text that ship offline.
    cfg = _cfg(tmp_path, "quant=w8a8", "method.steps=4", "data.calib_samples=64", "data.eval_samples=48",
               "data.max_length=32")
    report, qmodel = execute(cfg)
    assert report["config"]["method"]["name"] == "mrem_p" and len(report["reconstruction"]["modules"]) == 4
    assert report["model"]["family"] == "bert" and report["model"]["kind"] == "encoder"
    assert report["model"]["parameters"] > 22_000_000
    assert report["data"] == {"name": "builtin", "calibration_samples": 64, "holdout_samples": 16, "evaluation_samples": 48,
                              "max_length": 32, "labeled": False}
    assert 0.95 < report["metrics"]["quantized"]["cosine"] < 1.0
    # Its artifact: W8 weights, E8 embeddings packed one code per byte (about a quarter of FP32),
    # readable by others, and loading it gives the model that was evaluated.
    import mrem_dist
    from mrem_dist.scoring import run_batch

    art_dir = tmp_path / "model"
    assert 0.2 < report["artifacts"]["mrem"]["ratio_to_fp32"] < 0.3 and oct(art_dir.stat().st_mode)[-3:] != "700"
    art = mrem_dist.load_quantized(art_dir)
    enc = art.tokenizer(["a sentence to embed", "and one more"], return_tensors="pt", padding=True)
    from mrem_dist.data import Batch

    b = Batch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    with torch.no_grad():
        torch.testing.assert_close(run_batch(art.model, art.family, b), run_batch(qmodel, art.family, b),
                                   rtol=1e-4, atol=1e-4)



def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.attention_mask, y.attention_mask)
                                    for x, y in zip(a, b))


def test_held_out_samples_follow_the_calibration_ones(tmp_path, tiny_encoder_dir, sst_like_csv, caplog):
    # The never-worse check's samples come after the calibration ones in the same seeded order:
    # the calibration set does not depend on how many are held out.
    from mrem_dist.inputs import prepare_data
    from mrem_dist.models import load_model

    data = _cfg(tmp_path, f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv)).data  # 16 of 32 rows
    loaded = load_model(tiny_encoder_dir)
    plain, held = prepare_data(data, loaded), prepare_data(data, loaded, holdout=8)
    assert plain.holdout == [] and _same_batches(plain.calib, held.calib)
    assert [b.input_ids.shape[0] for b in held.holdout] == [8] and held.description["holdout_samples"] == 8
    with caplog.at_level("WARNING"):
        assert prepare_data(data, loaded, holdout=100).description["holdout_samples"] == 16
    assert "fewer than data.holdout_samples=100" in caplog.text
    every_row = _cfg(tmp_path, f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv), "data.calib_samples=32").data
    with pytest.raises(ValueError, match="leaves no sample for the held-out check.*lower data.calib_samples"):
        prepare_data(every_row, loaded, holdout=8)
    # A reconstruction run finds it before loading anything (exit code 2).
    from mrem_dist.preflight import InputError

    with pytest.raises(InputError, match="data.calib_samples=32 of 32 rows leaves no sample for the held-out check"):
        execute(_cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv),
                     "data.calib_samples=32", "method=mrem_s", "method.steps=2"))


def test_held_out_windows_of_a_decoder_follow_the_calibration_ones(tmp_path, tiny_llama_dir, wiki_like_txt):
    from mrem_dist.inputs import prepare_data
    from mrem_dist.models import load_model

    data = _cfg(tmp_path, f"model.path={tiny_llama_dir}", "data=local", f"data.train_file={wiki_like_txt[0]}",
                f"data.validation_file={wiki_like_txt[1]}", "data.seq_len=32", "data.calib_samples=8",
                "data.batch_size=4").data
    loaded = load_model(tiny_llama_dir)
    plain, held = prepare_data(data, loaded), prepare_data(data, loaded, holdout=4)
    assert plain.holdout == [] and _same_batches(plain.calib, held.calib)
    assert [tuple(b.input_ids.shape) for b in held.holdout] == [(4, 32)]
