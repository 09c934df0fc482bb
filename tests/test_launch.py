"""The launch scripts in launch/, run for real: torchrun, the DeepSpeed launcher, and SLURM (a real
one-node cluster started by launch/local_slurm.sh; CI installs it and sets MREM_REQUIRE_SLURM=1 so
that these tests cannot skip there). Each starts a 2-rank MREM-P run of a tiny model and checks
that the ranks shared one run directory holding the report and a loadable artifact."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from dist_helpers import free_port
from test_pipeline import _small_data

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def _overrides(model_dir, csvs, steps: int = 4) -> list[str]:
    return [f"model.path={model_dir}", "method.modules=2", f"method.steps={steps}", "device=cpu", *_small_data(*csvs)]


def _check_run(where, ranks: int = 2) -> dict:
    """Exactly one run directory under `where`/runs, with one log per rank, the report (written by
    rank 0 only) and an artifact that loads."""
    from mrem_dist.artifact import load_quantized

    run_dirs = list((where / "runs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert run_dir.name.endswith("_mrem_p_w4a8")
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted([".hydra", "model", *(f"rank{r}.log" for r in range(ranks)), "reconstruction.png",
                            "report.json", "summary.md"]), names
    report = json.loads((run_dir / "report.json").read_text())
    assert report["reconstruction"]["world_size"] == ranks and report["validation"]["passed"]
    assert f"[rank {ranks - 1}]" in (run_dir / f"rank{ranks - 1}.log").read_text()
    load_quantized(run_dir / "model")
    return report


def _run(cmd, cwd, env, timeout=300):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_script(tmp_path, tiny_encoder_dir, sst_like_csv):
    _run(["bash", str(REPO / "launch/torchrun.sh"), *_overrides(tiny_encoder_dir, sst_like_csv)], tmp_path,
         _env(NPROC="2"))
    _check_run(tmp_path)


# Loaded by every Python process that has its folder on PYTHONPATH: in torchrun's first attempt
# (TORCHELASTIC_RESTART_COUNT=0) rank 1 dies without a word at step 5, as a killed process would.
_KILL_RANK_1 = """
import os
if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    from mrem_dist.engine import reconstruct as R
    _step = R.ModuleTrainer.train_step
    def _dying(self, t, *a, **k):
        if t == 5:
            os._exit(9)
        return _step(self, t, *a, **k)
    R.ModuleTrainer.train_step = _dying
"""


def test_torchrun_restart_resumes_from_the_checkpoint(tmp_path, tiny_encoder_dir, sst_like_csv):
    """MAX_RESTARTS=1: rank 1 is killed at step 5 of 8; torchrun restarts both ranks, which resume
    from step 4 (checkpoints every 2 steps) and finish."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_RANK_1)
    overrides = [*_overrides(tiny_encoder_dir, sst_like_csv, steps=8), f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "checkpoint.every=2", "timeout_s=30"]
    env = _env(NPROC="2", MAX_RESTARTS="1", PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    _run(["bash", str(REPO / "launch/torchrun.sh"), *overrides], tmp_path, env)
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/report.json")]
    assert len(reports) == 1
    assert [r["resumed_from"] for r in reports[0]["reconstruction"]["ranks"]] == [4, 4]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed (pip install -e '.[dev]')")
def test_deepspeed_launcher(tmp_path, tiny_encoder_dir, sst_like_csv):
    _run(["bash", str(REPO / "launch/deepspeed.sh"), *_overrides(tiny_encoder_dir, sst_like_csv)], tmp_path,
         _env(NPROC="2", MASTER_PORT=str(free_port())))
    _check_run(tmp_path)


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM cluster: the one already up, or a one-node cluster started here (root, with
    the packages installed). Skips without one, unless MREM_REQUIRE_SLURM=1 (CI) makes that a failure."""
    def unavailable(why):
        if os.environ.get("MREM_REQUIRE_SLURM") == "1":
            pytest.fail(f"MREM_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)

    if shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        return
    if shutil.which("slurmctld") is None:
        unavailable("SLURM is not installed (sudo bash launch/local_slurm.sh start installs and starts one node)")
    if os.geteuid() != 0:
        unavailable("starting a local SLURM cluster needs root")
    done = subprocess.run(["bash", str(REPO / "launch/local_slurm.sh"), "start"], capture_output=True, text=True,
                          env={**os.environ, "MREM_SLURM_NO_INSTALL": "1"}, timeout=120)
    if done.returncode != 0:
        unavailable(f"launch/local_slurm.sh start failed: {done.stderr[-2000:]}")


@pytest.mark.parametrize("script,extra", [("slurm_tasks.sbatch", {}), ("slurm.sbatch", {"NPROC_PER_NODE": "2"})])
def test_sbatch_script_on_a_real_cluster(slurm, tmp_path, tiny_encoder_dir, sst_like_csv, script, extra):
    """sbatch --wait submits the project's script exactly as a user would; the job's exit code is
    sbatch's, and its output is kept next to the run for the failure message."""
    cmd = ["sbatch", "--wait", "--time=10", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out",
           str(REPO / "launch" / script), *_overrides(tiny_encoder_dir, sst_like_csv)]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(RDZV_PORT=str(free_port()), **extra), capture_output=True,
                          text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert done.returncode == 0, done.stdout + done.stderr + logs[-4000:]
    report = _check_run(tmp_path)
    assert report["environment"]["device"] == "cpu"


def _wait_for(predicate, timeout: float, what: str):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_sbatch_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, tiny_encoder_dir, sst_like_csv):
    """The pre-timeout path for real: once training runs, SLURM's warning signal reaches the batch
    script (as --signal=B:USR1@120 would deliver it); the ranks checkpoint and stop, the job
    requeues itself, and the requeued job resumes from the checkpoint and finishes."""
    ckpt = tmp_path / "ckpt"
    args = [*_overrides(tiny_encoder_dir, sst_like_csv, steps=400), f"checkpoint.dir={ckpt}", "checkpoint.every=0"]
    submit = subprocess.run(["sbatch", "--parsable", "--time=10", f"--chdir={tmp_path}",
                             f"--output={tmp_path}/slurm-%j.out", str(REPO / "launch/slurm_tasks.sbatch"), *args],
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def training():
        return any("steps a module" in p.read_text() for p in tmp_path.glob("runs/*/*/rank1.log"))

    def gone():
        # Finished jobs leave squeue ("Invalid job id" without accounting); any other squeue error is
        # a busy controller, not an answer.
        q = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        return (q.returncode == 0 and not q.stdout.strip()) or "Invalid job id" in q.stderr

    def pending():
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
        return q.stdout.strip() == "PENDING"

    try:
        _wait_for(training, 180, "the ranks to start training")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        _wait_for(pending, 120, f"job {job} to be requeued")
        # SLURM holds a requeued job until the old job's credential expires (cred_expire: 10 s in
        # launch/local_slurm.sh, 120 s by default); releasing it earlier gets it killed.
        _wait_for(gone, 400, f"job {job} to be requeued and finish")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "requeueing job" in out, out[-4000:]
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/report.json")]
    assert len(reports) == 1, out[-4000:]  # the stopped attempt wrote no report, the requeued one did
    ranks = reports[0]["reconstruction"]["ranks"]
    assert ranks[0]["resumed_from"] == ranks[1]["resumed_from"] > 0
    assert reports[0]["validation"]["passed"]


def test_hydra_sweep_on_slurm_through_submitit(slurm, tmp_path, tiny_encoder_dir, sst_like_csv):
    """conf/hydra/launcher/mrem_slurm.yaml: each job of the sweep is a 2-task SLURM job (one task
    per rank); the submitting process waits for them and writes the sweep summary."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[dev]' installs it")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mrem_dist", "-m", "hydra/launcher=mrem_slurm", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=2", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
           "method=mrem_p", "quant=w8a8,w4a8", *_overrides(tiny_encoder_dir, sst_like_csv), f"hydra.sweep.dir={sweep}"]
    _run(cmd, tmp_path, _env(), timeout=600)
    reports = sorted(sweep.glob("*/report.json"))
    assert [p.parent.name for p in reports] == ["0_mrem_p_w8a8", "1_mrem_p_w4a8"]
    assert all(json.loads(p.read_text())["reconstruction"]["world_size"] == 2 for p in reports)
    assert (sweep / "sweep_summary.md").read_text().count("| mrem_p |") == 2


def test_two_torchrun_nodes_run_mrem_p_across_them(tmp_path, tiny_encoder_dir, sst_like_csv):
    """Two torchrun "nodes" on this machine (--nnodes=2, --node_rank=0/1, c10d rendezvous on
    localhost), one rank each, exactly as launch/torchrun.sh starts them on two machines."""
    port = free_port()
    procs = [subprocess.Popen(["bash", str(REPO / "launch/torchrun.sh"), *_overrides(tiny_encoder_dir, sst_like_csv)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(NPROC="1", NNODES="2", NODE_RANK=str(node), RDZV_ID="two-nodes",
                                       RDZV_ENDPOINT=f"127.0.0.1:{port}"))
             for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    report = _check_run(tmp_path)
    assert [r["modules"] for r in report["reconstruction"]["ranks"]] == [[0], [1]]
