"""The launcher-environment helpers (the one place that reads RANK / SLURM_PROCID / LOCAL_RANK)."""

import pytest
import torch

from mrem_dist.distributed import env_local_rank, env_rank, is_main_process, resolve_device


def test_rank_from_torchrun_then_slurm(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert env_rank() == 0 and env_local_rank() == 0 and is_main_process()
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_rank() == 3 and env_local_rank() == 1 and not is_main_process()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_rank() == 2 and env_local_rank() == 0


def test_device_auto_and_explicit():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device: use device=cpu"):
        resolve_device("cuda:0")
