"""The launcher-environment helpers (the one place that reads RANK / SLURM_PROCID / LOCAL_RANK)."""

import os

import pytest
import torch

from mrem_dist.distributed import (
    _slurm_rendezvous,
    env_local_rank,
    env_rank,
    env_world_size,
    first_host,
    is_main_process,
    launcher,
    resolve_device,
)


LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "MASTER_ADDR", "MASTER_PORT")


def test_rank_from_torchrun_then_slurm(monkeypatch):
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert launcher() == "single" and env_rank() == 0 and env_world_size() == 1 and is_main_process()
    # An sbatch script's own body: SLURM describes the job's 2 tasks, but this is one process.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert launcher() == "single" and env_world_size() == 1
    # A task of an srun step: the step's tasks are the ranks.
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert launcher() == "slurm" and (env_rank(), env_local_rank(), env_world_size()) == (3, 1, 4)
    assert not is_main_process()
    # srun + torchrun: torchrun's variables win over the step's.
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launcher() == "torchrun" and (env_rank(), env_local_rank(), env_world_size()) == (2, 0, 8)


@pytest.mark.parametrize("nodelist,first", [("vm", "vm"), ("gpu[03-05,9],cpu1", "gpu03"), ("a1,a2", "a1"),
                                            ("rack[1-2]-n[07-09]", "rack1-n07"), ("node[1]", "node1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_tasks_find_their_master(monkeypatch):
    for key in LAUNCH_KEYS:
        monkeypatch.setenv(key, "")  # recorded, so that what the code under test sets is undone
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[12-13]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    _slurm_rendezvous()
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    monkeypatch.setenv("MASTER_PORT", "29999")  # set by the job script: kept
    _slurm_rendezvous()
    assert os.environ["MASTER_PORT"] == "29999"


def test_device_auto_and_explicit():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device: use device=cpu"):
        resolve_device("cuda:0")


# -- the process group, with real processes ------------------------------------------------------

def _allreduce_rank(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from mrem_dist.distributed import init_distributed, teardown_distributed

    ctx = init_distributed("cpu", timeout_s=30)
    try:
        again = init_distributed("cpu", timeout_s=30)  # idempotent
        t = torch.tensor([float(ctx.rank + 1)])
        dist.all_reduce(t)
        with open(f"{out_dir}/{rank}.txt", "w") as f:
            f.write(f"{ctx.rank} {ctx.world_size} {ctx.local_rank} {ctx.backend} {again.rank} {t.item()}")
    finally:
        teardown_distributed()


@pytest.mark.dist
def test_two_ranks_join_a_gloo_group(tmp_path):
    from dist_helpers import run_ranks

    run_ranks(_allreduce_rank, 2, str(tmp_path))
    lines = sorted((tmp_path / f"{r}.txt").read_text() for r in range(2))
    assert lines == ["0 2 0 gloo 0 3.0", "1 2 1 gloo 1 3.0"]


def test_single_process_has_no_group(monkeypatch):
    from mrem_dist.distributed import init_distributed, teardown_distributed

    for key in ("WORLD_SIZE", "SLURM_NTASKS", "RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    teardown_distributed()  # a no-op without a group


def test_multi_rank_without_a_master_address_is_a_clear_error(monkeypatch):
    from mrem_dist.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set for a 2-rank run: launch with torchrun"):
        init_distributed("cpu")


def test_backend_follows_the_device():
    from mrem_dist.distributed import backend_for

    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
