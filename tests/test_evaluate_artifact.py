"""`python -m mrem_dist.evaluate`: a run's artifact, evaluated from disk, scores what the run
reported; the INT8 kernel scores the same to rounding; bad artifacts and configs exit with the
documented codes."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from mrem_dist.evaluate import evaluate_artifact
from mrem_dist.config import register_configs, validate_evaluate
from mrem_dist.runner import run
from test_pipeline import _cfg, _small_data

register_configs()


def _eval_cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose("evaluate", overrides=[f"run_dir={run_dir}", *overrides])
    return validate_evaluate(OmegaConf.to_object(dcfg))


@pytest.fixture()
def exported(tmp_path, tiny_classifier_dir, sst_like_csv):
    """A W4A8 PTQ run of the tiny classifier: its report and its artifact directory."""
    report = run(_cfg(tmp_path / "run", f"model.path={tiny_classifier_dir}", *_small_data(*sst_like_csv)))
    return report, tmp_path / "run" / "model"


def test_artifact_scores_what_the_run_reported(tmp_path, exported, sst_like_csv):
    report, artifact = exported
    data = _small_data(*sst_like_csv)
    result = evaluate_artifact(_eval_cfg(tmp_path / "ev", f"artifact={artifact}", *data))
    # The source model is found from the artifact's own record; the float kernel reproduces the run.
    assert result["reference"] == report["model"]["path"]
    assert result["metrics"]["full_precision"] == report["metrics"]["full_precision"]
    assert result["metrics"]["quantized"] == pytest.approx(report["metrics"]["quantized"], abs=1e-6)
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["metrics"] == result["metrics"]
    assert result["artifact_bytes"] > 0 and result["samples_per_s"] > 0

    int8 = evaluate_artifact(_eval_cfg(tmp_path / "ev8", f"artifact={artifact}", "kernel=int8", *data))
    assert int8["backend"] == "onednn"
    assert int8["metrics"]["quantized"]["fidelity_cosine"] == pytest.approx(
        report["metrics"]["quantized"]["fidelity_cosine"], abs=1e-3)

    alone = evaluate_artifact(_eval_cfg(tmp_path / "alone", f"artifact={artifact}", "compare=false", *data))
    assert alone["metrics"]["full_precision"] is None
    assert alone["metrics"]["quantized"] == {"accuracy": report["metrics"]["quantized"]["accuracy"]}


def test_wrong_reference_is_named(tmp_path, exported, sst_like_csv, tiny_encoder_dir):
    _, artifact = exported
    cfg = _eval_cfg(tmp_path / "ev", f"artifact={artifact}", f"reference={tiny_encoder_dir}", *_small_data(*sst_like_csv))
    with pytest.raises((ValueError, OSError), match="reference|classification head"):
        evaluate_artifact(cfg)


@pytest.mark.slow
def test_cli_exit_codes(tmp_path, exported, sst_like_csv):
    _, artifact = exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "mrem_dist.evaluate", *_small_data(*sst_like_csv)]

    ok = subprocess.run(base + [f"artifact={artifact}", "kernel=int8", f"hydra.run.dir={tmp_path / 'ok'}"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "evaluation.json").read_text())["kernel"] == "int8"

    bad_cfg = subprocess.run(base + [f"artifact={artifact}", "kernel=fast", f"hydra.run.dir={tmp_path / 'bad'}"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert bad_cfg.returncode == 2 and "kernel='fast'" in bad_cfg.stderr + bad_cfg.stdout

    tensors = artifact / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # truncated in transfer
    broken = subprocess.run(base + [f"artifact={artifact}", f"hydra.run.dir={tmp_path / 'broken'}"],
                            env=env, capture_output=True, text=True, timeout=300)
    out = broken.stderr + broken.stdout
    assert broken.returncode == 1 and "checksum mismatch" in out and str(tensors) in out
    assert not (tmp_path / "broken" / "evaluation.json").exists()
