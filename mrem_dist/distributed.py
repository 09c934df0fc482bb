"""The one place that reads launcher environments (torchrun, SLURM, single process).

Algorithm code asks this module for its rank; it never reads RANK/SLURM_PROCID itself.
"""

from __future__ import annotations

import os


def _env_int(*keys: str) -> int:
    """The first of `keys` set to an integer in the environment, else 0 (single process)."""
    for key in keys:
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def env_rank() -> int:
    """Global rank as set by the launcher: torchrun first, then SLURM, else 0 (single process)."""
    return _env_int("RANK", "SLURM_PROCID")


def is_main_process() -> bool:
    return env_rank() == 0


def resolve_device(name: str):
    """`auto` picks CUDA when there is a GPU (the local rank's one under torchrun/SLURM), else CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{env_local_rank() % max(torch.cuda.device_count(), 1)}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but this machine has no CUDA device: use device=cpu or device=auto")
    return device


def env_local_rank() -> int:
    """Rank within the node: torchrun's LOCAL_RANK, then SLURM_LOCALID, else 0."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID")
