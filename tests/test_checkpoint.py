"""Checkpoints and resume: a stop signal checkpoints and exits, the same command resumes to the
uninterrupted result, and checkpoints of a different model or data are refused by name."""

import os
import signal

import pytest
import torch

from conftest import save_tiny
from mrem_dist.engine.checkpoint import Checkpointer, CheckpointMismatch, Fingerprint, Preempted, fingerprint
from test_parallel import COMMON, _assert_same_state
from test_pipeline import _cfg, _small_data


class _Trainer:
    """The two methods Checkpointer needs from a ModuleTrainer."""

    def __init__(self, value: float) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"w": torch.tensor([self.value])}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["w"])


FP = Fingerprint("m1", "d1", "s1")


def test_save_keeps_the_latest_and_loads_them_back(tmp_path):
    ck = Checkpointer(tmp_path / "run", FP, stage=0, every=2, keep=2)
    ck.prepare()
    # The stage's folder is claimed at once (a folder that cannot be written fails here, not after
    # the first 200 steps): nothing but the lock is in it before the first checkpoint.
    assert [p.name for p in (tmp_path / "run").rglob("*")] == ["stage0", ".lock"]
    for step in (2, 4, 6):
        ck.save(step, [_Trainer(step)])
    assert ck.steps_on_disk() == [4, 6] and ck.latest() == 6
    assert not list((tmp_path / "run").rglob("*.tmp"))
    t = _Trainer(0.0)
    ck.load(4, [t])
    assert t.value == 4.0
    with pytest.raises(CheckpointMismatch, match="no checkpoint of step 2"):
        ck.load(2, [t])
    assert ck.due(2, 8) and not ck.due(3, 8) and not ck.due(8, 8)  # never after the last step


def test_a_different_model_or_data_is_refused_by_name(tmp_path):
    Checkpointer(tmp_path, FP, 0, 2).save(2, [_Trainer(1.0)])
    for other, named in ((Fingerprint("m2", "d1", "s1"), "model"), (Fingerprint("m1", "d2", "s1"), "data")):
        with pytest.raises(CheckpointMismatch, match=f"its {named} differ.*checkpoint.resume=never"):
            Checkpointer(tmp_path, other, 1, 2).prepare()
    fresh = Checkpointer(tmp_path, Fingerprint("m2", "d1", "s1"), 0, 2, resume="never")
    fresh.prepare()  # discards the other run's checkpoints instead
    assert fresh.latest() == 0 and not (tmp_path / "fingerprint.json").exists()


def test_keep_covers_how_far_rank_0_runs_ahead():
    assert Checkpointer.keep_for(1, 4, 200) == 2
    assert Checkpointer.keep_for(2, 2, 2) == 3
    assert Checkpointer.keep_for(8, 4, 10) == 2 + 3


def test_fingerprint_sees_weights_and_data(tiny_encoder_dir):
    from mrem_dist.models import load_model
    from test_engine import _batches

    model = load_model(tiny_encoder_dir).model
    batches = _batches(2)
    a = fingerprint(model, batches, {"x": 1})
    assert a == fingerprint(model, batches, {"x": 1})
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    b = fingerprint(model, batches[:1], {"x": 2})
    assert a.differences(b) == ["model", "data", "settings"]


def _run(tmp_path, name, model_dir, csvs, *extra):
    from mrem_dist.runner import execute

    return execute(_cfg(tmp_path / name, f"model.path={model_dir}", *COMMON, "method.modules=2",
                        *_small_data(*csvs), *extra))


def test_stop_signal_checkpoints_and_the_rerun_resumes(tmp_path, tiny_encoder_dir, sst_like_csv, monkeypatch):
    """SIGTERM during step 2 (as SLURM sends before the time limit): the run finishes that step,
    checkpoints it and stops with Preempted (exit code 4 from the CLI); the same command resumes at
    step 3 and ends with the result of a run that was never stopped."""
    from mrem_dist.engine import reconstruct as R

    ckpt = tmp_path / "ckpt"
    extra = [f"checkpoint.dir={ckpt}", "checkpoint.every=0"]  # no periodic checkpoints: only the signal's
    original = R.ModuleTrainer.train_step

    def signalled(self, t, *a, **k):
        if t == 2 and self.student.spec.index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, t, *a, **k)

    monkeypatch.setattr(R.ModuleTrainer, "train_step", signalled)
    with pytest.raises(Preempted, match="stopped after step 3 of 8") as stopped:
        _run(tmp_path, "stopped", tiny_encoder_dir, sst_like_csv, *extra)
    assert stopped.value.exit_code == 4
    assert [p.name for p in ckpt.glob("*/stage0/*.ckpt")] == ["step00000003.ckpt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.setattr(R.ModuleTrainer, "train_step", original)

    report, qmodel = _run(tmp_path, "resumed", tiny_encoder_dir, sst_like_csv, *extra)
    assert report["reconstruction"]["ranks"][0]["resumed_from"] == 3
    plain, plain_model = _run(tmp_path, "plain", tiny_encoder_dir, sst_like_csv, "checkpoint.dir=null")
    _assert_same_state(qmodel.state_dict(), plain_model.state_dict())
    assert [m["losses"] for m in report["reconstruction"]["modules"]] == [
        m["losses"] for m in plain["reconstruction"]["modules"]]


def test_checkpoints_of_other_weights_at_the_same_path_are_refused(tmp_path, sst_like_csv):
    """The model folder was overwritten between the crash and the rerun (same path, same settings,
    other weights): the checkpoint is refused, naming the model, instead of being mixed in."""
    model_dir = save_tiny(tmp_path / "model", "bert", head=False, seed=0)
    extra = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=2"]
    from mrem_dist.engine import reconstruct as R

    original = R.ModuleTrainer.train_step

    def crash(self, t, *a, **k):
        if t == 5:
            raise KeyboardInterrupt  # the process is interrupted after the step-4 checkpoint
        return original(self, t, *a, **k)

    R.ModuleTrainer.train_step = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "crashed", model_dir, sst_like_csv, *extra)
    finally:
        R.ModuleTrainer.train_step = original
    save_tiny(tmp_path / "model", "bert", head=False, seed=1)
    with pytest.raises(CheckpointMismatch, match="its model differ"):
        _run(tmp_path, "rerun", model_dir, sst_like_csv, *extra)
    report, _ = _run(tmp_path, "fresh", model_dir, sst_like_csv, *extra, "checkpoint.resume=never")
    assert report["reconstruction"]["ranks"][0]["resumed_from"] == 0
    assert report["validation"]["passed"]


def test_a_previous_handler_runs_after_ours():
    """submitit installs a SIGUSR1 handler that requeues the job: it must still run, after the
    training loop has checkpointed (when our block ends), not instead of it."""
    from mrem_dist.engine.checkpoint import StopSignal

    calls = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: calls.append("requeue"))
    try:
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received == "SIGUSR1" and calls == []  # only flagged while training runs
        assert calls == ["requeue"]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_mrem_s_resumes_mid_module_and_restores_finished_modules(tmp_path, tiny_encoder_dir, sst_like_csv,
                                                                  monkeypatch):
    """One process, one module after another: SIGTERM during module 1's step 5. The rerun restores
    module 0 from its checkpoint (not trained again), continues module 1 from step 5, and ends
    with the weights and loss curves of an uninterrupted run."""
    from mrem_dist.engine import reconstruct as R
    from mrem_dist.runner import execute

    def run(name, *extra):
        common = [x for x in COMMON if x != "method=mrem_p"]
        return execute(_cfg(tmp_path / name, f"model.path={tiny_encoder_dir}", *common, "method=mrem_s",
                            "method.modules=2", *_small_data(*sst_like_csv), *extra))

    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=2"]
    original = R.ModuleTrainer.train_step

    def signalled(self, t, *a, **k):
        if t == 4 and self.student.spec.index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, t, *a, **k)

    monkeypatch.setattr(R.ModuleTrainer, "train_step", signalled)
    with pytest.raises(Preempted, match="stopped after step 5 of 8 of module 1"):
        run("stopped", *ckpt)
    monkeypatch.setattr(R.ModuleTrainer, "train_step", original)

    report, qmodel = run("resumed", *ckpt)
    modules = report["reconstruction"]["modules"]
    assert [m["resumed_from"] for m in modules] == [0, 5]  # module 0 restored as it was recorded
    plain, plain_model = run("plain", "checkpoint.dir=null")
    _assert_same_state(qmodel.state_dict(), plain_model.state_dict())
    assert [m["losses"] for m in modules] == [m["losses"] for m in plain["reconstruction"]["modules"]]
    assert [m["error_before"] for m in modules] == [m["error_before"] for m in plain["reconstruction"]["modules"]]
    assert not (tmp_path / "ckpt").exists()  # the run's checkpoints, and the then empty directory, are gone
