"""MREM-P with real processes (gloo on CPU): every rank trains its modules at the same time on the
streamed activations, rank 0 validates and writes the artifact from the ranks' streamed shards. The result does not depend on how many ranks
share the work, lam = 1 reproduces one process training each module on full-precision inputs
(LKD), and a failing rank stops the run with its rank named instead of hanging it."""

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from mrem_dist.artifact.shard import state_digest, tensor_sha256
from dist_helpers import capture_states, gathered_state, run_ranks, run_ranks_unsupervised
from test_pipeline import _cfg, _small_data

pytestmark = pytest.mark.dist

# A few steps with weight learning rate low enough for the tiny model's 0.02-scale weights.
COMMON = ["quant=w2a8", "clip=mse", "method=mrem_p", "method.steps=8", "method.lr_weight=1e-4", "threads=1",
          "method.queue=2"]


def _job(rank: int, model_dir: str, data: tuple, run_dir: str, out_dir: str, overrides: list, fail_rank: int,
         kill: bool = False, revert: int = -1) -> None:
    import os

    from mrem_dist.engine import reconstruct as R
    from mrem_dist.runner import execute

    if revert >= 0:  # the never-worse check's call `revert` of this process keeps the initial state
        _plant_revert(revert)

    if rank == fail_rank:  # fault injection: this rank raises (or, kill=True, dies at once) mid-training
        original = R.ModuleTrainer.train_step

        def failing(self, t, *a, **k):
            if kill and t == 5:
                os._exit(9)  # like kill -9: no exception, no cleanup, no goodbye to the other rank
            if not kill and t == 3:
                raise RuntimeError(f"injected failure at step {t}")
            return original(self, t, *a, **k)

        R.ModuleTrainer.train_step = failing
    out = Path(out_dir)
    capture_states(out, rank)
    cfg = _cfg(run_dir, f"model.path={model_dir}", *COMMON, *_small_data(*data), *overrides)
    try:
        result = execute(cfg)
    except Exception as e:
        (out / f"{rank}.err").write_text(f"{type(e).__name__}: {e}")
        raise
    if result is not None:
        report, qmodel = result
        assert qmodel is None  # several ranks: the model is whole only in the artifact
        (out / "report.json").write_text(json.dumps(report))


def _plant_revert(call: int) -> None:
    from mrem_dist.engine import parallel

    calls = []

    def planted(before, after, never_worse):
        calls.append(1)
        return len(calls) - 1 != call

    parallel.keep_trained = planted


def _single(model_dir, data, run_dir, overrides):
    from mrem_dist.runner import execute

    report, qmodel = execute(_cfg(run_dir, f"model.path={model_dir}", *COMMON, *_small_data(*data), *overrides))
    return report, qmodel.state_dict()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _check_timeline(report: dict, rec: dict) -> None:
    """Every rank's phases, in order and without overlap, from the earliest start; the training
    span's blocked seconds are the ones the rank's stats count; rank 0 packs its shard like every
    leader, then gathers, assembles, validates and writes."""
    spans = report["timeline"]["spans"]
    for rank, stats in enumerate(rec["ranks"]):
        mine = [s for s in spans if s["rank"] == rank]
        phases = [s["phase"] for s in mine]
        assert phases[:1] == ["load"] and "reconstruct" in phases and phases.count("evaluate") >= 2, phases
        assert all(a["end_s"] <= b["start_s"] + 1e-3 for a, b in zip(mine, mine[1:]))
        assert all(0 <= s["blocked_s"] <= s["end_s"] - s["start_s"] + 1e-3 for s in mine)
        assert all(0 < a["peak_rss_gb"] <= b["peak_rss_gb"] for a, b in zip(mine, mine[1:]))  # a peak only grows
        (train,) = [s for s in mine if s["phase"] == "reconstruct"]
        assert train["blocked_s"] == pytest.approx(stats["recv_blocked_seconds"] + stats["send_blocked_seconds"],
                                                   abs=2e-3)
    assert min(s["start_s"] for s in spans) == 0.0
    assert [s["phase"] for s in spans if s["rank"] == 0][-5:] == ["pack", "gather", "assemble", "validate", "write"]


def test_two_ranks_train_at_once_and_equal_one_process(tmp_path, tiny_encoder_dir, sst_like_csv):
    # 3 modules on 2 ranks: rank 0 holds modules 0-1 (lockstep inside the rank), rank 1 module 2.
    overrides = ["method.modules=3", "method.t0=4"]
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(run_dir), str(out), overrides, -1)
    report = json.loads((out / "report.json").read_text())
    rec = report["reconstruction"]
    assert rec["world_size"] == 2 and rec["backend"] == "gloo" and rec["cache"] == "stream"
    assert [m["rank"] for m in rec["modules"]] == [0, 0, 1]
    assert [r["modules"] for r in rec["ranks"]] == [[0, 1], [2]]
    for r in rec["ranks"]:
        assert 0 <= r["blocked_fraction"] <= 1 and r["peak_rss_gb"] > 0 and r["train_seconds"] > 0
    # Annealed teacher forcing as the last rank saw it: lam_t = max(1 - t/T0, 0), T0 = 4.
    assert rec["modules"][2]["lams"] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert report["validation"]["passed"]
    assert sum(m["error_after"] for m in rec["modules"]) < sum(m["error_before"] for m in rec["modules"])
    # Only rank 0 wrote, into the one run directory.
    assert sorted(p.name for p in run_dir.iterdir()) == ["model", "reconstruction.png", "report.json", "summary.md"]
    _check_timeline(report, rec)

    single, state = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "single", overrides)
    _assert_same_state(gathered_state(out), state)
    assert [m["losses"] for m in single["reconstruction"]["modules"]] == [m["losses"] for m in rec["modules"]]
    # The artifact streamed from two ranks' shards is the one process's, byte for byte, and the
    # state digest in the report is the one of the whole model's state.
    for name in ("model.safetensors", "quantization.json", "manifest.json"):
        assert (run_dir / "model" / name).read_bytes() == (tmp_path / "single" / "model" / name).read_bytes(), name
    assert rec["state_sha256"] == single["reconstruction"]["state_sha256"] == \
        state_digest({name: tensor_sha256(t) for name, t in state.items()})
    # The artifact loads and runs like the model the ranks trained.
    import mrem_dist
    from mrem_dist.scoring import run_batch
    from test_engine import _batches

    art = mrem_dist.load_quantized(run_dir / "model")
    reference = copy.deepcopy(art.model)
    reference.load_state_dict(state)
    b = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(run_batch(art.model, art.family, b), run_batch(reference, art.family, b))
    assert report["artifacts"]["mrem"]["ratio_to_fp32"] < 0.5


def test_a_module_kept_at_its_start_feeds_the_next_rank_its_initial_outputs(tmp_path, tiny_encoder_dir, sst_like_csv,
                                                                             monkeypatch):
    # 3 modules on 2 ranks, module 1 (rank 0's last) planted to keep its initial state: rank 1
    # checks module 2 on the initial module 1's outputs, as one process does.
    overrides = ["method.modules=3", "method.t0=4"]
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(out), overrides, -1, False, 1)
    report = json.loads((out / "report.json").read_text())
    assert [m["kept"] for m in report["reconstruction"]["modules"]] == ["trained", "initial", "trained"]
    from mrem_dist.engine import parallel

    monkeypatch.setattr(parallel, "keep_trained", parallel.keep_trained)  # restored after the test
    _plant_revert(1)  # one process: module 1's check is its call 1 too
    single, state = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "single", overrides)
    _assert_same_state(gathered_state(out), state)
    decided = [[(m["error_before"], m["error_after"], m["kept"]) for m in r["reconstruction"]["modules"]]
               for r in (single, report)]
    assert decided[0] == decided[1]


@pytest.mark.parametrize("world, overrides", [
    (2, ["method.modules=3", "method.replicas=2"]),  # 1 stage x 2 replicas
    (4, ["method.modules=2"]),  # more ranks than modules: 2 stages x 2 replicas, derived
])
def test_data_parallel_replicas_equal_one_process_on_the_full_batch(tmp_path, tiny_encoder_dir, sst_like_csv, world,
                                                                   overrides):
    """The replicas of a stage train on halves of every batch and all-reduce their gradients: one
    process on the whole batch, to float tolerance. What differs is the order of two sums: the
    step's gradient is the token-weighted sum of the halves' gradients, and the metrics add up the
    batches each replica scored."""
    overrides = [*overrides, "method.t0=4"]
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    run_ranks(_job, world, tiny_encoder_dir, sst_like_csv, str(run_dir), str(out), overrides, -1)
    report = json.loads((out / "report.json").read_text())
    rec = report["reconstruction"]
    stages = world // 2
    assert (rec["world_size"], rec["stages"], rec["replicas"]) == (world, stages, 2)
    assert [(r["rank"], r["stage"], r["replica"]) for r in rec["ranks"]] == [(r, r // 2, r % 2) for r in range(world)]
    assert len(rec["modules"]) == (3 if stages == 1 else 2)  # each module once, from its stage's leader
    assert report["validation"]["passed"]

    single, state = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "single", [o for o in overrides if "replicas" not in o])
    assert single["reconstruction"]["replicas"] == 1
    replicated = gathered_state(out)
    assert replicated.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(replicated[k], state[k], rtol=1e-4, atol=1e-6, msg=k)
    assert [m["kept"] for m in rec["modules"]] == [m["kept"] for m in single["reconstruction"]["modules"]]
    for got, want in zip(rec["modules"], single["reconstruction"]["modules"]):  # the full batch's losses
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-3, abs=1e-9)
    for name, value in single["metrics"]["quantized"].items():
        # rank_agreement is a Spearman correlation of the pairwise similarities, which are near-ties
        # on this tiny model: a 1e-9 change in the outputs swaps two ranks and moves it by ~1e-4.
        tolerance = dict(abs=1e-3) if name == "rank_agreement" else dict(rel=1e-4, abs=1e-6)
        assert report["metrics"]["quantized"][name] == pytest.approx(value, **tolerance), name


def test_lam_one_on_three_ranks_equals_sequential_lkd(tmp_path, tiny_encoder_dir, sst_like_csv):
    """The design's parity check: with lam = 1 throughout, N ranks give, module by module, the
    weights of one process training each module on full-precision inputs."""
    overrides = ["method.modules=3", "method.lam=one"]
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_job, 3, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(out), overrides, -1)
    from mrem_dist.runner import execute

    cfg = _cfg(tmp_path / "seq", f"model.path={tiny_encoder_dir}", *COMMON, *_small_data(*sst_like_csv),
               "method=lkd", "method.modules=3")
    _, qmodel = execute(cfg)
    _assert_same_state(gathered_state(out), qmodel.state_dict())
    # The streamed artifact of 3 ranks is the one LKD's driver writes from its whole model.
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "seq" / "model" / "model.safetensors").read_bytes()


def test_modules_that_training_made_worse_keep_their_initial_state_on_two_ranks(tmp_path, tiny_encoder_dir,
                                                                                sst_like_csv):
    # A planted learning rate that diverges (10 on weights of scale 0.02): both modules end worse on
    # the held-out samples, so the final model is the initial quantized one, bit for bit (the
    # reference: the same run at lr 0, whose weights never move).
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(out),
              ["method.modules=2", "method.lr_weight=10"], -1)
    report = json.loads((out / "report.json").read_text())
    modules = report["reconstruction"]["modules"]
    assert [m["kept"] for m in modules] == ["initial", "initial"]
    assert all(m["error_after"] > m["error_before"] for m in modules)
    assert report["metrics"]["quantized"] == report["metrics_before_reconstruction"]
    assert "Kept at their initialization" in (tmp_path / "run" / "summary.md").read_text()
    _, initial = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "lr0",
                         ["method.modules=2", "method.lr_weight=0", "method.lr_scale=0"])
    _assert_same_state(gathered_state(out), initial)


def _corrupting_job(rank: int, model_dir: str, data: tuple, run_dir: str, out_dir: str) -> None:
    """Rank 0 receives one of rank 1's tensors with a byte changed, as a faulty link would deliver it."""
    from mrem_dist.drivers import parallel
    from mrem_dist.runner import execute

    received = parallel.recv_bytes

    def damaged(dtype, shape, src, ctx):
        t = received(dtype, shape, src, ctx)
        if t.numel() > 8:
            t.reshape(-1).view(torch.uint8)[0] ^= 1
        return t

    parallel.recv_bytes = damaged
    try:
        execute(_cfg(run_dir, f"model.path={model_dir}", *COMMON, *_small_data(*data), "method.modules=2",
                     "timeout_s=30"))
    except Exception as e:
        (Path(out_dir) / f"{rank}.err").write_text(f"{type(e).__name__}: {e}")
        raise


def test_a_tensor_damaged_in_transfer_is_an_error_and_leaves_no_artifact(tmp_path, tiny_encoder_dir, sst_like_csv):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    codes = run_ranks_unsupervised(_corrupting_job, 2, 120, tiny_encoder_dir, sst_like_csv, str(run_dir), str(out))
    assert codes[0] not in (0, None) and codes[1] is not None, codes  # nobody hangs
    assert "arrived from rank 1 with other bytes than the rank hashed" in (out / "0.err").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["validation"]["passed"] and "damaged in transfer" in report["artifacts"]["mrem"]["error"]
    assert not (run_dir / "model").exists() and not [p for p in run_dir.iterdir() if p.name.startswith(".model")]


def test_a_rank_that_raises_stops_every_rank_with_the_rank_named(tmp_path, tiny_encoder_dir, sst_like_csv):
    out = tmp_path / "out"
    out.mkdir()
    start = time.perf_counter()
    codes = run_ranks_unsupervised(_job, 2, 120, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(out),
                                   ["method.modules=2", "timeout_s=30"], 1)
    assert codes[0] not in (0, None) and codes[1] not in (0, None), codes  # nobody hangs, nobody succeeds
    assert time.perf_counter() - start < 100
    assert "injected failure at step 3" in (out / "1.err").read_text()
    assert "rank 1" in (out / "0.err").read_text()  # the survivor names the rank that failed
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_finish_phase_on_two_ranks_equals_one_process(tmp_path, tiny_encoder_dir, sst_like_csv):
    # 3 modules on 2 ranks, the last 3 of 8 steps on the finished upstream: rank 1 waits for rank 0's
    # finished stream, the result is the one process's bit for bit.
    overrides = ["method.modules=3", "method.finish_steps=3"]
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(out), overrides, -1)
    report = json.loads((out / "report.json").read_text())
    single, state = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "single", overrides)
    _assert_same_state(gathered_state(out), state)
    assert [m["losses"] for m in report["reconstruction"]["modules"]] == [
        m["losses"] for m in single["reconstruction"]["modules"]]
    assert report["validation"]["passed"]


@pytest.mark.parametrize("finish", [0, 4], ids=["parallel", "finish-phase"])
def test_a_killed_rank_resumes_to_the_uninterrupted_result(tmp_path, tiny_encoder_dir, sst_like_csv, finish):
    """Rank 1 dies (no cleanup) at step 5 of 8 with checkpoints every 2 steps; the same command run
    again resumes both ranks from step 4, the last step both have, and ends with exactly the weights
    and loss curves of a run that was never interrupted. With finish_steps=4, step 5 is in the finish
    phase (which takes no checkpoint): the rerun repeats it from the end of the parallel phase."""
    ckpt = tmp_path / "ckpt"
    overrides = ["method.modules=2", "timeout_s=30", f"checkpoint.dir={ckpt}", "checkpoint.every=2",
                 f"method.finish_steps={finish}"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first.mkdir()
    resumed.mkdir()
    codes = run_ranks_unsupervised(_job, 2, 120, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run1"), str(first),
                                   overrides, 1, True)
    assert codes[1] == 9 and codes[0] not in (0, None), codes
    (run_key,) = [p for p in ckpt.iterdir()]
    assert (run_key / "fingerprint.json").is_file()
    assert max(int(p.stem[4:]) for p in (run_key / "stage1").glob("step*.ckpt")) == 4

    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run2"), str(resumed), overrides, -1)
    report = json.loads((resumed / "report.json").read_text())
    assert [r["resumed_from"] for r in report["reconstruction"]["ranks"]] == [4, 4]
    assert not ckpt.exists()  # removed once the artifact was written

    single, state = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "single",
                            ["method.modules=2", "checkpoint.dir=null", f"method.finish_steps={finish}"])
    _assert_same_state(gathered_state(resumed), state)
    assert [m["losses"] for m in report["reconstruction"]["modules"]] == [
        m["losses"] for m in single["reconstruction"]["modules"]]


def test_replicas_resume_from_their_leaders_checkpoints(tmp_path, tiny_encoder_dir, sst_like_csv):
    """1 stage x 2 replicas with checkpoints every 2 steps: the replica that is not the leader dies
    at step 5 of 8; only the leader wrote checkpoints, and the rerun resumes both replicas from its
    step 4 to exactly the weights of a replicated run that was never interrupted."""
    ckpt = tmp_path / "ckpt"
    overrides = ["method.modules=2", "method.replicas=2", "timeout_s=30", f"checkpoint.dir={ckpt}", "checkpoint.every=2"]
    first, resumed, straight = tmp_path / "first", tmp_path / "resumed", tmp_path / "straight"
    for d in (first, resumed, straight):
        d.mkdir()
    codes = run_ranks_unsupervised(_job, 2, 120, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run1"), str(first),
                                   overrides, 1, True)
    assert codes[1] == 9 and codes[0] not in (0, None), codes
    (run_key,) = [p for p in ckpt.iterdir()]
    assert [p.name for p in run_key.iterdir() if p.is_dir()] == ["stage0"]  # the one stage, its leader's files
    assert max(int(p.stem[4:]) for p in (run_key / "stage0").glob("step*.ckpt")) == 4

    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run2"), str(resumed), overrides, -1)
    report = json.loads((resumed / "report.json").read_text())
    assert [r["resumed_from"] for r in report["reconstruction"]["ranks"]] == [4, 4]
    assert not ckpt.exists()
    run_ranks(_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run3"), str(straight),
              [*overrides[:3], "checkpoint.dir=null"], -1)
    _assert_same_state(gathered_state(resumed), gathered_state(straight))


def _signalled_job(rank: int, model_dir: str, data: tuple, run_dir: str, out_dir: str) -> None:
    import os
    import signal

    from mrem_dist.engine import reconstruct as R
    from mrem_dist.engine.checkpoint import Preempted
    from mrem_dist.runner import execute

    original = R.ModuleTrainer.train_step

    def signalled(self, t, *a, **k):
        if rank == 0 and t == 0 and self.student.spec.index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, t, *a, **k)

    R.ModuleTrainer.train_step = signalled
    cfg = _cfg(run_dir, f"model.path={model_dir}", *COMMON, "method.modules=2", *_small_data(*data),
               f"checkpoint.dir={Path(out_dir) / 'ckpt'}", "checkpoint.every=0")
    try:
        execute(cfg)
    except Preempted as e:
        (Path(out_dir) / f"{rank}.stopped").write_text(str(e))


def test_a_stop_signal_in_the_first_step_stops_every_rank_after_the_second(tmp_path, tiny_encoder_dir, sst_like_csv):
    # Rank 0's first message goes out before it trains that step (the pipeline fill), without the
    # stop flag: a signal during the first step is honoured one step later, on every rank alike.
    run_ranks(_signalled_job, 2, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(tmp_path))
    for rank in (0, 1):
        assert f"rank {rank} stopped after step 2 of 8" in (tmp_path / f"{rank}.stopped").read_text()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*/stage*/*.ckpt")) == ["step00000002.ckpt"] * 2


def _plant_module_revert(index: int) -> None:
    """Module `index`'s never-worse decision keeps its initial state, whichever rank checks it."""
    from mrem_dist.engine import parallel

    decide, keep = parallel.RankPipeline._decide, parallel.keep_trained

    def planted(self, k, measured, initial, settings):
        parallel.keep_trained = (lambda *a: False) if self.held[k].index == index else keep
        try:
            return decide(self, k, measured, initial, settings)
        finally:
            parallel.keep_trained = keep

    parallel.RankPipeline._decide = planted


def _reverting_job(rank: int, model_dir: str, data: tuple, run_dir: str, out_dir: str, overrides: list, index: int) -> None:
    _plant_module_revert(index)
    _job(rank, model_dir, data, run_dir, out_dir, overrides, -1)


def test_a_one_module_rank_whose_inputs_changed_sends_its_outputs_again(tmp_path, tiny_encoder_dir, sst_like_csv,
                                                                       monkeypatch):
    # 3 modules on 3 ranks, module 0 planted to keep its initial state: rank 1 has measured and
    # already sent module 1's outputs on rank 0's trained outputs; told no, it measures again on
    # the initial module 0's, answers no and sends those, and rank 2 measures module 2 again.
    overrides = ["method.modules=3", "method.t0=4"]
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_reverting_job, 3, tiny_encoder_dir, sst_like_csv, str(tmp_path / "run"), str(out), overrides, 0)
    report = json.loads((out / "report.json").read_text())
    assert [m["kept"] for m in report["reconstruction"]["modules"]][0] == "initial"
    from mrem_dist.engine import parallel

    monkeypatch.setattr(parallel.RankPipeline, "_decide", parallel.RankPipeline._decide)  # restored after the test
    _plant_module_revert(0)
    single, state = _single(tiny_encoder_dir, sst_like_csv, tmp_path / "single", overrides)
    _assert_same_state(gathered_state(out), state)
    decided = [[(m["error_before"], m["error_after"], m["kept"]) for m in r["reconstruction"]["modules"]]
               for r in (single, report)]
    assert decided[0] == decided[1]
