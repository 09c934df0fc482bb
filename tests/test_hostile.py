"""The findings of a hostile-input probe (issue 22), one test each, and a few more of our own:
nothing runs code it should not, nothing edited loads, nothing bad is accepted, no finished work
or report is thrown away, and every invalid input exits 2 with one line naming the fix."""

from __future__ import annotations

import csv
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SENTENCES
from mrem_dist.artifact import ArtifactError, load_quantized
from mrem_dist.config import register_configs
from mrem_dist.engine.checkpoint import Checkpointer, CheckpointMismatch, Fingerprint
from mrem_dist.engine.statefile import StateFileError, load_state, read_header, save_state
from mrem_dist.preflight import InputError
from mrem_dist.runner import run
from test_artifact_export import artifact, tokenizer  # noqa: F401 (fixtures used below)
from test_pipeline import _cfg, _small_data

register_configs()
FP = Fingerprint("m", "d", "s")
MARKER = "/tmp/mrem-dist-hostile-marker"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class _Trainer:
    def __init__(self, value: float) -> None:
        self.value = value

    def state_dict(self):
        return {"w": torch.full((3,), self.value), "history": [self.value], "groups": ({"betas": (0.9, 0.99)},)}

    def load_state_dict(self, state):
        self.value = float(state["w"][0])


# -- 1. checkpoints cannot carry code ------------------------------------------------------------
def test_a_planted_pickle_checkpoint_is_never_executed(tmp_path):
    Path(MARKER).unlink(missing_ok=True)
    ck = Checkpointer(tmp_path / "ck", FP, stage=0, every=2)
    ck.prepare()
    for name in ("step00000002.ckpt", "step00000002.pt"):  # today's name and the old torch.save one
        torch.save({"fingerprint": FP.__dict__, "modules": [_Evil()]}, ck.dir / name)
    assert ck.latest() == 2
    with pytest.raises(CheckpointMismatch, match=r"step00000002.ckpt is not a readable checkpoint"):
        ck.load(2, [_Trainer(0.0)])
    assert not Path(MARKER).exists()


def test_a_checkpoint_is_plain_data_and_its_header_is_read_first(tmp_path):
    f = tmp_path / "s.ckpt"
    save_state(f, [_Trainer(2.0).state_dict()], {"fingerprint": {"model": "m"}, "step": 3})
    assert read_header(f) == {"fingerprint": {"model": "m"}, "step": 3}
    back = load_state(f)[0]
    assert torch.equal(back["w"], torch.full((3,), 2.0)) and back["groups"][0]["betas"] == [0.9, 0.99]
    with pytest.raises(StateFileError, match="a _Evil cannot be stored"):
        save_state(tmp_path / "x.ckpt", {"a": _Evil()}, {})
    # Another run's checkpoint is refused on its header, before any tensor is read.
    ck = Checkpointer(tmp_path / "ck", FP, stage=0, every=2)
    ck.save(2, [_Trainer(1.0)])
    other = Checkpointer(tmp_path / "ck", Fingerprint("m", "d", "other"), stage=0, every=2)
    with pytest.raises(CheckpointMismatch, match="belongs to a different run"):
        other.load(2, [_Trainer(0.0)])


def test_two_runs_cannot_share_a_checkpoint_folder(tmp_path):
    ck = Checkpointer(tmp_path / "ck", FP, stage=0, every=2)
    ck.dir.mkdir(parents=True)
    (ck.dir / ".lock").write_text(f"1@{socket.gethostname()}\n")  # pid 1 is alive: another run
    with pytest.raises(CheckpointMismatch, match=r"in use by another run \(1@"):
        ck.prepare()
    (ck.dir / ".lock").write_text(f"999999999@{socket.gethostname()}\n")  # a dead process: taken over
    ck.prepare()
    assert (ck.dir / ".lock").read_text().startswith(f"{os.getpid()}@")
    ck.remove()
    assert not (tmp_path / "ck").exists()


# -- 2. an edited artifact does not load ---------------------------------------------------------
@pytest.mark.parametrize("edit", ["a_bits", "symmetric", "layer_norm_eps", "added_file", "removed_tokenizer"])
def test_an_edited_artifact_is_refused_naming_the_file(artifact, edit):  # noqa: F811
    meta_file, config_file = artifact / "quantization.json", artifact / "config.json"
    if edit == "a_bits":
        meta = json.loads(meta_file.read_text())
        meta["quant"]["a_bits"] = 4
        meta_file.write_text(json.dumps(meta, indent=1))
        named = "quantization.json"
    elif edit == "symmetric":
        meta = json.loads(meta_file.read_text())
        next(iter(meta["modules"].values()))["symmetric"] = False
        meta_file.write_text(json.dumps(meta, indent=1))
        named = "quantization.json"
    elif edit == "layer_norm_eps":
        config_file.write_text(config_file.read_text().replace("1e-12", "1e-11"))
        named = "config.json"
    elif edit == "added_file":
        (artifact / "special_tokens_map.json").write_text("{}")
        named = "special_tokens_map.json"
    else:
        (artifact / "tokenizer.json").unlink()
        named = "tokenizer.json"
    with pytest.raises(ArtifactError, match=rf"{named}"):
        load_quantized(artifact)


# -- 3. whitespace text, NaN metrics, no report lost ---------------------------------------------
def _csv(path: Path, rows: list[tuple[str, object]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    return str(path)


def test_whitespace_only_text_is_refused_before_any_work(tmp_path, tiny_encoder_dir):
    bad = _csv(tmp_path / "bad.csv", [(s, 1) for s in SENTENCES] + [("   ", 0)])
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(bad, bad))
    with pytest.raises(InputError, match=r"empty or whitespace only in 1 row\(s\), first at row 8"):
        run(cfg)
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_nan_metric_fails_validation_and_the_report_is_still_written(tmp_path, monkeypatch, tiny_encoder_dir,
                                                                       sst_like_csv):
    from mrem_dist.models import tasks
    from mrem_dist.validation import ValidationFailed

    real = tasks.FidelityState.compute
    monkeypatch.setattr(tasks.FidelityState, "compute",
                        lambda self: (lambda fp, q: (fp, {**q, "rank_agreement": float("nan")}))(*real(self)))
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv))
    with pytest.raises(ValidationFailed, match="quantized model's rank_agreement is nan"):
        run(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())  # valid JSON: NaN written as null
    assert report["metrics"]["quantized"]["rank_agreement"] is None and not report["validation"]["passed"]
    assert not (tmp_path / "run" / "model").exists()


def test_a_failed_export_keeps_the_report(tmp_path, monkeypatch, tiny_encoder_dir, sst_like_csv):
    import mrem_dist.artifact.export as export

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_tensors", full_disk)  # the tensor file of the artifact
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv))
    with pytest.raises(OSError, match="No space left"):
        run(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["validation"]["passed"] and "No space left on device" in report["artifacts"]["mrem"]["error"]
    assert [p.name for p in (tmp_path / "run").iterdir() if "model" in p.name] == []  # no half-written folder


def test_reports_are_as_readable_as_the_artifact(tmp_path, tiny_encoder_dir, sst_like_csv):
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv))
    run(cfg)
    umask = os.umask(0)
    os.umask(umask)
    for f in ("report.json", "summary.md", "model/model.safetensors"):
        assert stat.S_IMODE((tmp_path / "run" / f).stat().st_mode) == 0o666 & ~umask, f


# -- 4. no input is used silently instead of the one asked for ------------------------------------
def test_model_hf_without_a_path_and_unknown_plus_keys_are_refused(tmp_path):
    from hydra import compose, initialize_config_dir

    from mrem_dist.config import entry_config, validate

    class Log:
        def error(self, fmt, *args):
            self.line = fmt % args

    for override, said in (("model=hf", "model.path is empty: model=hf needs model.path="),
                           ("+quant.w_bit=2", "unknown setting quant.w_bit")):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            dcfg = compose("config", overrides=[f"run_dir={tmp_path}", override])
        log = Log()
        with pytest.raises(SystemExit) as e:
            entry_config(dcfg, validate, log)
        assert e.value.code == 2 and said in log.line


# -- 5. labels mean the same in every split and to the model ------------------------------------
def test_string_labels_map_to_one_id_across_splits_and_to_the_models_names(tmp_path, tiny_classifier_dir):
    from mrem_dist.context import RunContext

    train = _csv(tmp_path / "train.csv", [(s, "pos" if i % 2 else "neg") for i, s in enumerate(SENTENCES)])
    only_pos = _csv(tmp_path / "dev.csv", [(s, "pos") for s in SENTENCES])
    data = ["data=local", f"data.train_file={train}", f"data.validation_file={only_pos}", "data.batch_size=4", "method=ptq"]
    ctx = RunContext.begin(_cfg(tmp_path / "run", f"model.path={tiny_classifier_dir}", *data))
    ctx.load()
    labels = torch.cat([b.labels for b in ctx.data.evalset.batches])
    assert labels.tolist() == [1] * len(SENTENCES)  # "pos" is 1 as in the training file, not 0
    # A model that names its labels decides the ids.
    from transformers import AutoModelForSequenceClassification

    named = tmp_path / "named"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    model.config.id2label, model.config.label2id = {0: "pos", 1: "neg"}, {"pos": 0, "neg": 1}
    model.save_pretrained(named)
    for f in Path(tiny_classifier_dir).glob("*"):
        if "token" in f.name or f.name == "vocab.txt":
            (named / f.name).write_bytes(f.read_bytes())
    ctx = RunContext.begin(_cfg(tmp_path / "run2", f"model.path={named}", *data))
    ctx.load()
    assert torch.cat([b.labels for b in ctx.data.evalset.batches]).tolist() == [0] * len(SENTENCES)
    wrong = _csv(tmp_path / "wrong.csv", [(s, "positive") for s in SENTENCES])
    ctx = RunContext.begin(_cfg(tmp_path / "run3", f"model.path={named}", "data=local", f"data.train_file={train}",
                                f"data.validation_file={wrong}"))
    with pytest.raises(ValueError, match=r"labels \['positive'\] of .* are not among the model's labels"):
        ctx.load()


# -- 6. late failures that would throw away finished work ---------------------------------------
def test_a_run_directory_holding_a_model_is_refused_before_the_work(tmp_path, tiny_encoder_dir, sst_like_csv):
    (tmp_path / "run" / "model").mkdir(parents=True)
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv))
    with pytest.raises(InputError, match="model already exists: this run directory holds a finished run"):
        run(cfg)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_the_work(tmp_path, tiny_encoder_dir, sst_like_csv):
    (tmp_path / "ckfile").write_text("")
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv), "method=mrem_s",
               f"checkpoint.dir={tmp_path / 'ckfile'}")
    with pytest.raises(InputError, match="checkpoint.dir=.*ckfile is a file, not a folder"):
        run(cfg)


def test_a_killed_exports_leftover_is_removed_by_the_next_attempt(tmp_path):
    from mrem_dist.io import atomic_dir

    dead = tmp_path / ".model.999999999.abc.tmp"
    alive = tmp_path / f".model.{os.getpid()}.def.tmp"
    for d in (dead, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "f").write_text("done")
    assert not dead.exists() and alive.exists() and (tmp_path / "model" / "f").read_text() == "done"


def test_a_short_run_checkpoints_by_default(tmp_path, tiny_encoder_dir, sst_like_csv):
    from mrem_dist.context import RunContext
    from mrem_dist.layout import ParallelLayout

    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv), "method=mrem_s",
               "method.steps=30", f"checkpoint.dir={tmp_path / 'ck'}")
    ctx = RunContext.begin(cfg)
    loaded = ctx.load()
    assert ctx.checkpointer(ParallelLayout.single(2), loaded.model).every == 7  # a quarter of the steps


# -- 7. messages and exit codes ------------------------------------------------------------------
def test_a_corrupt_config_and_a_truncated_weight_file_are_named(tmp_path, tiny_encoder_dir, sst_like_csv):
    import shutil

    from mrem_dist.models import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_encoder_dir, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text()[:-20])
    cfg = _cfg(tmp_path / "run", f"model.path={broken}", *_small_data(*sst_like_csv))
    with pytest.raises(InputError, match=r"config.json is not valid JSON"):
        run(cfg)
    shutil.copy(Path(tiny_encoder_dir) / "config.json", broken / "config.json")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(OSError, match=r"model.safetensors\) cannot be read .*truncated or corrupt"):
        load_model(str(broken))


def test_a_full_precision_model_producing_nan_is_not_blamed_on_quantization(tmp_path, tiny_encoder_dir,
                                                                             sst_like_csv, monkeypatch):
    import mrem_dist.context as context

    real = context.load_model

    def poisoned(*a, **k):
        loaded = real(*a, **k)
        with torch.no_grad():
            loaded.model.encoder.layer[3].output.LayerNorm.bias.fill_(float("nan"))
        return loaded

    monkeypatch.setattr(context, "load_model", poisoned)
    cfg = _cfg(tmp_path / "run", f"model.path={tiny_encoder_dir}", *_small_data(*sst_like_csv))
    with pytest.raises(FloatingPointError, match="the full-precision model itself produced NaN"):
        run(cfg)


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.slow
def test_invalid_inputs_exit_2_with_one_line_and_no_traceback(tmp_path, tiny_encoder_dir, sst_like_csv):
    data = _small_data(*sst_like_csv)
    cases = [
        (["mrem_dist", f"model.path={tiny_encoder_dir}", *data, "method=mrem_s", "method.modules=9"],
         "method.modules=9 but the model has 4 layers"),
        (["mrem_dist", f"model.path={tiny_encoder_dir}", *data, "quant=w4a8_fg", "quant.w_groups=5"],
         "quant.w_groups=5 does not divide"),
        (["mrem_dist", f"model.path={tiny_encoder_dir}", *data[:1], "data.train_file=/no/such.csv"], "/no/such.csv"),
        (["mrem_dist.evaluate"], "artifact is required"),
        (["mrem_dist.evaluate", f"artifact={tmp_path}", "data=local", "data.validation_file=/no/such.csv"],
         "/no/such.csv"),
    ]
    for args, said in cases:
        done = _cli(args, tmp_path)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert said in done.stderr + done.stdout and "Traceback" not in done.stderr, (args, done.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.dist
def test_the_torchrun_script_gives_back_the_ranks_exit_code(tmp_path, tiny_encoder_dir, sst_like_csv):
    done = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), f"model.path={tiny_encoder_dir}",
                           *_small_data(*sst_like_csv), "method.modules=2", "quant.w_groups=5", "quant=w4a8_fg"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NPROC": "2", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]  # torchrun itself says 1


def test_a_process_that_ends_releases_its_checkpoint_lock(tmp_path):
    # A requeued job may land on another node, where a leftover lock's pid cannot be checked.
    code = ("import sys; from mrem_dist.engine.checkpoint import Checkpointer, Fingerprint; "
            f"ck = Checkpointer({str(tmp_path / 'ck')!r}, Fingerprint('m', 'd', 's'), stage=0, every=2); ck.prepare(); "
            "assert (ck.dir / '.lock').exists(); raise SystemExit(4)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    assert not (tmp_path / "ck" / "stage0" / ".lock").exists()
